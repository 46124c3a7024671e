"""The generation-verification gap meter (scoring/judge.py `gv_gap`, `within_group_corr`,
`gap_meter`): each function against NumPy loops written from its definition, on hand-built groups
(ties at the top, all-correct / all-wrong groups, NaN scores, constant groups) and one example
worked by hand; then a jitted round with a judge and a verifier, whose `judge/*` metrics are
re-derived from the round's own sample dump; then the plot panel and the report columns."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax import metrics, models, report, sampling, scoring
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.data import tasks
from selfplay_jax.models.logprobs import completion_logprobs
from selfplay_jax.scoring import judge as judge_lib
from selfplay_jax.scoring.judge import gap_meter, gv_gap, within_group_corr

NAN = np.nan
GAP_KEYS = ("train/judge_agreement", "judge/gv_gap", "judge/corr_correct", "judge/corr_likelihood")

# ---- NumPy references, one group at a time -------------------------------------------------------


def np_gv_gap(scores, verified, group):
  """Mean over groups with a score of (mean correctness of the top-scored samples) - (mean
  correctness of the group)."""
  gaps = []
  for s, v in zip(np.reshape(scores, (-1, group)), np.reshape(verified, (-1, group))):
    correct = (v >= 1.0).astype(np.float64)
    scored = [i for i in range(group) if not math.isnan(s[i])]
    if not scored:
      continue
    best = max(s[i] for i in scored)
    top = [i for i in scored if s[i] == best]
    gaps.append(sum(correct[i] for i in top) / len(top) - correct.mean())
  return float(np.mean(gaps)) if gaps else NAN


def np_corr(x, y, group):
  """Mean over groups of the Pearson correlation over the samples where both are finite, for groups
  where neither is constant there."""
  rs = []
  for a, b in zip(np.reshape(x, (-1, group)), np.reshape(y, (-1, group))):
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = np.asarray(a, np.float64)[keep], np.asarray(b, np.float64)[keep]
    if len(a) < 2 or len(set(a.tolist())) < 2 or len(set(b.tolist())) < 2:
      continue
    rs.append(np.corrcoef(a, b)[0, 1])
  return float(np.mean(rs)) if rs else NAN


def _jitted(fn, *args, group):
  return float(jax.jit(fn, static_argnums=len(args))(*[jnp.asarray(a, jnp.float32) for a in args],
                                                     group))


def _close(got, want, tol=1e-5):
  if math.isnan(want):
    assert math.isnan(got), got
  else:
    assert got == pytest.approx(want, abs=tol), (got, want)


# ---- hand-built groups ---------------------------------------------------------------------------


def test_hand_worked_example():
  """Four prompts, four samples each (verifier reward 0.5 is not correct: correct means >= 1).

  group 1: scores 3 1 2 0, correct 1 0 0 0: the top (3) is correct: 1 - 1/4 = 0.75.
  group 2: scores 2 2 1 NaN, correct 1 0 1 1: two tied at the top, one correct: 1/2 - 3/4 = -0.25;
           the NaN-scored sample is correct but never wins (it still counts in the mean).
  group 3: all scores NaN: left out.
  group 4: scores all 1 (every sample tied), correct 1 0 1 0: 1/2 - 1/2 = 0.
  gv_gap = (0.75 - 0.25 + 0) / 3 = 1/6.

  corr_correct: group 1: dx = (1.5, -.5, .5, -1.5), dy = (.75, -.25, -.25, -.25): Σdxdy = 1.5,
  Σdx² = 5, Σdy² = .75, r = 1.5 / sqrt(3.75) = sqrt(0.6). Group 2 over its three scored samples:
  x = (2, 2, 1), y = (1, 0, 1): dx = (1, 1, -2)/3, dy = (1, -2, 1)/3, r = (-3/9) / (6/9) = -0.5.
  Groups 3 (no scores) and 4 (constant scores) are left out: (sqrt(0.6) - 0.5) / 2.
  corr_likelihood: group 1's likelihoods -1 -3 -2 -4 are linear in its scores: r = 1; group 2's
  -1 -2 -1 (-5) over the scored samples are 0, -1, 0 shifted: r = -0.5; (1 - 0.5) / 2 = 0.25.
  """
  scores = [3, 1, 2, 0, 2, 2, 1, NAN, NAN, NAN, NAN, NAN, 1, 1, 1, 1]
  verified = [1, 0.5, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0]
  likelihood = [-1, -3, -2, -4, -1, -2, -1, -5, -1, -2, -3, -4, -1, -2, -3, -4]
  got = jax.jit(gap_meter, static_argnums=3)(jnp.asarray(scores, jnp.float32),
                                             jnp.asarray(verified, jnp.float32),
                                             jnp.asarray(likelihood, jnp.float32), 4)
  assert set(got) == {"judge/gv_gap", "judge/corr_correct", "judge/corr_likelihood"}
  assert float(got["judge/gv_gap"]) == pytest.approx(1 / 6, abs=1e-6)
  assert float(got["judge/corr_correct"]) == pytest.approx((math.sqrt(0.6) - 0.5) / 2, abs=1e-6)
  assert float(got["judge/corr_likelihood"]) == pytest.approx(0.25, abs=1e-6)
  # The NumPy references agree with the hand-worked numbers.
  correct = (np.asarray(verified) >= 1).astype(float)
  assert np_gv_gap(scores, verified, 4) == pytest.approx(1 / 6)
  assert np_corr(scores, correct, 4) == pytest.approx((math.sqrt(0.6) - 0.5) / 2)
  assert np_corr(scores, likelihood, 4) == pytest.approx(0.25)


def test_ties_at_the_top_count_the_mean_accuracy_of_the_tied():
  # One group of 5: three tied at the top, of which 2 correct; the group has 3 correct of 5.
  scores, verified = [4, 1, 4, 4, 0], [1, 1, 0, 1, 0]
  _close(_jitted(gv_gap, scores, verified, group=5), 2 / 3 - 3 / 5)
  _close(_jitted(gv_gap, scores, verified, group=5), np_gv_gap(scores, verified, 5))
  # Every sample tied: picking by the score is picking at random, gap 0 whatever the correctness.
  _close(_jitted(gv_gap, [2.5] * 5, verified, group=5), 0.0)


def test_all_correct_and_all_wrong_groups_have_no_gap():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=12)
  ones, zeros = np.ones(12), np.zeros(12)
  mixed = np.repeat([1.0, 0.0, 1.0], 4)  # groups all correct, all wrong, all correct
  for verified in (ones, zeros, mixed):
    _close(_jitted(gv_gap, scores, verified, group=4), 0.0)
    # Correctness is constant in every group: no group counts for the correlation.
    _close(_jitted(within_group_corr, scores, verified, group=4), NAN)


def test_nan_scores_never_win_and_all_nan_groups_are_left_out():
  # Group 1: a correct sample without a score (it cannot win, but counts in the mean) and the
  # top-scored one wrong: 0 - 2/3. Group 2: all NaN (left out of both terms, though two of its
  # samples are correct).
  scores = [NAN, 0.2, 0.1, NAN, NAN, NAN]
  verified = [1, 0, 1, 1, 1, 0]
  _close(_jitted(gv_gap, scores, verified, group=3), -2 / 3)
  _close(_jitted(gv_gap, scores, verified, group=3), np_gv_gap(scores, verified, 3))
  # No group with a score: NaN, for the gap and for the correlations.
  _close(_jitted(gv_gap, [NAN] * 6, verified, group=3), NAN)
  _close(_jitted(within_group_corr, [NAN] * 6, verified, group=3), NAN)
  # A NaN score drops its sample from the correlation: (0.2, 0.1) against (0, 1) is r = -1.
  _close(_jitted(within_group_corr, scores, verified, group=3), -1.0)
  # A -inf log-prob drops its sample too.
  _close(_jitted(within_group_corr, [1, 2, 3], [-1, -2, -np.inf], group=3), -1.0)


def test_constant_groups_are_left_out_of_the_correlation():
  # Group 1: constant scores (0.1 three times: its float32 mean is not exactly 0.1, yet it must
  # count as constant); group 2: constant correctness; group 3: both vary.
  scores = [0.1, 0.1, 0.1, 0.3, 0.7, 0.2, 0.0, 1.0, 0.5]
  verified = [1, 0, 1, 1, 1, 1, 0, 1, 1]
  want = np_corr(scores, verified, 3)
  _close(want, np.corrcoef([0.0, 1.0, 0.5], [0, 1, 1])[0, 1])
  _close(_jitted(within_group_corr, scores, verified, group=3), want)
  # Only constant groups: NaN.
  _close(_jitted(within_group_corr, scores[:6], verified[:6], group=3), NAN)
  # One scored sample left in a group: no variance.
  _close(_jitted(within_group_corr, [NAN, NAN, 0.4], [0, 1, 1], group=3), NAN)


@pytest.mark.parametrize("seed", range(4))
def test_random_groups_match_numpy(seed):
  """Many small groups with integer scores (frequent ties), NaN scores (some groups all NaN),
  correctness with partial credit, and likelihoods with a few -inf."""
  rng = np.random.default_rng(seed)
  group, num = 5, 64
  scores = rng.integers(0, 4, size=num * group).astype(np.float64)
  scores[rng.random(scores.shape) < 0.2] = NAN
  scores[: 2 * group] = NAN  # two groups without any score
  verified = rng.choice([0.0, 0.5, 1.0], size=num * group, p=[0.5, 0.2, 0.3])
  verified[2 * group: 4 * group] = 1.0  # two all-correct groups
  likelihood = rng.normal(size=num * group)
  likelihood[rng.random(likelihood.shape) < 0.05] = -np.inf
  correct = (verified >= 1).astype(np.float64)
  _close(_jitted(gv_gap, scores, verified, group=group), np_gv_gap(scores, verified, group))
  _close(_jitted(within_group_corr, scores, correct, group=group), np_corr(scores, correct, group))
  _close(_jitted(within_group_corr, scores, likelihood, group=group),
         np_corr(scores, likelihood, group))
  # Symmetric in its two arguments.
  _close(_jitted(within_group_corr, likelihood, scores, group=group),
         np_corr(scores, likelihood, group))


# ---- in the round --------------------------------------------------------------------------------

B, G = 4, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok"),
                              extra_symbols=judge_lib.JUDGE_SYMBOLS)
  cfg = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                           num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                           bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                           pad_token_id=tok.pad_id).validate()
  batch = tasks.encode_examples(task.examples("train", seed=0, num=B), tok, 8, 8, 4)
  sc = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, n=G, eos_ids=tuple(tok.eos_ids))
  params = models.init_params(cfg, jax.random.key(0))
  judge = judge_lib.Judge.from_template(judge_lib.TASK_TEMPLATE, tok)
  return cfg, params, batch, sc, scoring.judge_scorer(judge, cfg)


def _parity(tokens, mask, answer, answer_mask):
  """A verifier with variance inside the groups (an untrained model never solves the task)."""
  del mask, answer, answer_mask
  return (tokens[:, 0] % 2 == 0).astype(jnp.float32)


def _self_likelihood(logprobs, mask):
  mask = np.asarray(mask, bool)
  return np.array([lp[m].mean() for lp, m in zip(np.asarray(logprobs, np.float64), mask)])


@pytest.mark.slow
def test_sample_and_score_logs_the_gap_meter_only_with_a_scorer_and_a_verifier(tiny):
  cfg, params, batch, sc, scorer = tiny
  run = lambda verifier, scorer: jax.jit(lambda p, b, k: rnd.sample_and_score(
      cfg, p, None, b, k, sc, verifier, scorer))(params, batch, jax.random.key(3))
  rollout, scores, got = run(_parity, scorer)
  tokens = np.asarray(rollout.tokens)
  verified = (tokens[:, 0] % 2 == 0).astype(np.float64)
  likelihood = _self_likelihood(rollout.model_logprobs, rollout.mask)
  scores = np.asarray(scores, np.float64)
  _close(float(got["judge/gv_gap"]), np_gv_gap(scores, verified, G))
  _close(float(got["judge/corr_correct"]), np_corr(scores, verified, G))
  _close(float(got["judge/corr_likelihood"]), np_corr(scores, likelihood, G), tol=1e-4)
  assert np.isfinite(float(got["judge/corr_likelihood"]))  # untrained: scores and lengths vary
  for verifier, s in ((_parity, None), (None, scorer)):  # one of the two alone: no gap meter
    assert not set(GAP_KEYS) & set(run(verifier, s)[2])


@pytest.mark.slow
def test_jitted_round_reports_the_gap_meter_from_its_own_samples(tiny):
  """One fused round with the policy as its own judge and a verifier: its `judge/*` metrics equal
  the NumPy values from its sample dump (all rows: tokens, lengths, the judge's scores as rewards),
  the verifier's verdicts re-derived from the dumped tokens and the self-likelihood from a
  teacher-forced pass of the dumped rows under the params that sampled them."""
  cfg, params, batch, sc, scorer = tiny
  spec, opt = PolicyGradient(group_size=G), optax.adam(1e-2)
  round_fn = rnd.build_round_fn(cfg, spec, opt, sc, _parity, scorer=scorer, num_samples=B * G)
  state = rnd.init_state(params, opt, spec, jax.random.key(5))  # copies: `params` stays ours
  _, got = round_fn(state, batch)
  got = jax.device_get(got)
  assert {"judge/gv_gap", "judge/corr_correct", "judge/corr_likelihood",
          "train/judge_agreement"} <= set(got)
  dump = {k.split("/", 1)[1]: np.asarray(v) for k, v in got.items() if k.startswith("samples/")}
  assert dump["tokens"].shape[0] == B * G
  scores = dump["rewards"].astype(np.float64)
  verified = (dump["tokens"][:, 0] % 2 == 0).astype(np.float64)
  assert float(got["train/accuracy"]) == pytest.approx(verified.mean())
  want_gap = np_gv_gap(scores, verified, G)
  want_corr = np_corr(scores, verified, G)
  assert np.isfinite(want_gap) and np.isfinite(want_corr)  # this seed has mixed groups
  _close(float(got["judge/gv_gap"]), want_gap)
  _close(float(got["judge/corr_correct"]), want_corr)
  mask = np.arange(dump["tokens"].shape[1])[None, :] < dump["lengths"][:, None]
  rows = {"prompt_tokens": dump["prompt_tokens"], "prompt_mask": dump["prompt_mask"],
          "tokens": dump["tokens"], "mask": mask}
  logprobs = completion_logprobs(cfg, params, jax.tree.map(jnp.asarray, rows))
  want_lik = np_corr(scores, _self_likelihood(logprobs, mask), G)
  assert np.isfinite(want_lik)
  _close(float(got["judge/corr_likelihood"]), want_lik, tol=1e-3)


# ---- where a person reads them -------------------------------------------------------------------


def _history():
  history = [{"round": r, "phase": "self_rewarding", "train/loss": 1.0 / r,
              "train/judge_agreement": 0.5 + 0.01 * r, "judge/gv_gap": 0.02 * r,
              "judge/corr_correct": 0.1 * r, "judge/corr_likelihood": -0.05 * r}
             for r in range(1, 6)]
  history[1]["judge/corr_correct"] = None  # a round where no group had variance (NaN -> None)
  return history


def test_self_critique_panel_draws_the_gap_meter():
  _, series = metrics.render_plot(_history())
  panel = {s["key"]: s["points"] for s in series if s["panel"] == "self-critique"}
  assert panel == {"train/judge_agreement": 5, "judge/gv_gap": 5, "judge/corr_correct": 4,
                   "judge/corr_likelihood": 5}
  # Judge agreement is drawn once, in the self-critique panel.
  assert [s["panel"] for s in series if s["key"] == "train/judge_agreement"] == ["self-critique"]
  # A run that logged judge agreement alone keeps its own panel, and no self-critique panel.
  old = [{k: v for k, v in r.items() if not k.startswith("judge/")} for r in _history()]
  _, series = metrics.render_plot(old)
  assert {s["panel"] for s in series} == {"judge agreement", "loss"}


def test_report_table_has_the_gap_meter_columns(tmp_path):
  history = _history()
  (tmp_path / "config.json").write_text(json.dumps({"algorithm": {"name": "self_rewarding"}}))
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
  page = report.write_report(tmp_path).read_text()
  titles = dict(report.TABLE_COLUMNS)
  for key in GAP_KEYS:
    assert f"<th>{titles[key]}</th>" in page, key
  assert f"<td>{history[-1]['judge/gv_gap']:.4g}</td>" in page
