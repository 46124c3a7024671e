"""Self-Rewarding end to end on the tiny arithmetic model: the warm-up trains the judge (EFT), the
judge then ranks verified-correct answers above wrong ones more often than chance, and the
self-rewarding rounds log that agreement every round."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, models, sampling, scoring
from selfplay_jax import evaluate as ev
from selfplay_jax import round as rnd
from selfplay_jax.data import pipeline

WARMUP_ROUNDS = 150
SMALL = ["data.batch_size=32", "sampling.n=4", "eval.num_examples=128",
         f"warmup.rounds={WARMUP_ROUNDS}"]


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
  cfg = config_lib.load_config("configs/self_rewarding.py", SMALL)
  config_lib.validate(cfg)
  task, tok = ev.task_and_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
  mc, lens = ev.model_config(cfg, tok), ev.data_lengths(cfg)
  verify = task.make_verifier(tok)
  opt, warm_spec = ev.build_optimizer(cfg), ev.build_warmup_spec(cfg, tok)
  assert warm_spec.name == "sft+judge"
  state = rnd.init_state(models.init_params(mc, jax.random.key(0)), opt, warm_spec, jax.random.key(1))
  warm = rnd.build_round_fn(mc, warm_spec, opt, ev.sampling_config(cfg, tok), verify)
  it = pipeline.make_iterator(task.source("train", 0), tokenizer=tok, batch_size=32, seed=0, **lens)
  judge_losses = []
  for _ in range(WARMUP_ROUNDS):
    state, metrics = warm(state, next(it))
    judge_losses.append(float(metrics["train/judge_loss"]))
  return cfg, task, tok, mc, state, it, judge_losses


def _agreement_counts(scores, verified, group):
  """(wins, pairs) over (correct, wrong) pairs of each group: a NumPy re-count of the metric."""
  s, ok = scores.reshape(-1, group), verified.reshape(-1, group) >= 1
  wins = pairs = 0.0
  for srow, orow in zip(s, ok):
    for i in np.flatnonzero(orow):
      for j in np.flatnonzero(~orow):
        pairs += 1
        wins += 1.0 if srow[i] > srow[j] else 0.5 if srow[i] == srow[j] else 0.0
  return wins, pairs


@pytest.mark.slow
def test_warmed_up_judge_ranks_correct_answers_above_wrong_ones(warmed):
  cfg, task, tok, mc, state, _, judge_losses = warmed
  assert np.mean(judge_losses[-10:]) < np.mean(judge_losses[:10])  # the judge learned something
  judge, verify = ev.build_judge(cfg, tok), task.make_verifier(tok)
  sc = ev.sampling_config(cfg, tok, n=8)
  batches = pipeline.eval_batches(task, "heldout", 256, tokenizer=tok, batch_size=64,
                                  **ev.data_lengths(cfg))
  wins = pairs = 0.0
  for i, b in enumerate(batches):
    ro = sampling.sample(mc, state.params, b["prompt_tokens"], b["prompt_mask"],
                         jax.random.key(100 + i), sc)
    rep = lambda x: np.repeat(x, sc.n, axis=0)
    v = np.asarray(verify(ro.tokens, ro.mask, rep(b["answer_tokens"]), rep(b["answer_mask"])))
    s = np.asarray(judge.score(mc, state.params, ro.prompt_tokens, ro.prompt_mask, ro.tokens,
                               ro.mask, jax.random.key(0)))
    w, p = _agreement_counts(s, v, sc.n)
    np.testing.assert_allclose(float(scoring.ranking_agreement(s, v, sc.n)),
                               w / p if p else np.nan, rtol=1e-6)
    wins, pairs = wins + w, pairs + p
  print(f"held-out judge agreement after {WARMUP_ROUNDS} warm-up rounds: {wins / pairs:.3f} "
        f"over {int(pairs)} (correct, wrong) pairs")
  assert pairs >= 200
  assert wins / pairs > 0.5


@pytest.mark.slow
def test_self_rewarding_rounds_log_judge_agreement(warmed):
  cfg, task, tok, mc, state, it, _ = warmed
  spec, opt = ev.build_spec(cfg), ev.build_optimizer(cfg)
  assert spec.name == "self_rewarding" and spec.pairs == "best_vs_worst"
  round_fn = rnd.build_round_fn(mc, spec, opt, ev.sampling_config(cfg, tok), task.make_verifier(tok),
                                scorer=ev.build_scorer(cfg, mc, tok))
  # As train.py does at the end of warm-up: the reference (and sampler / judge) is the warmed-up M1.
  state = rnd.init_state(state.params, opt, spec, jax.random.key(2)).replace(
      opt_state=jax.tree.map(jnp.copy, state.opt_state))
  seen = []
  for _ in range(3):
    state, metrics = round_fn(state, next(it))
    assert np.isfinite(float(metrics["train/loss"]))
    assert 0.0 <= float(metrics["judge/score_mean"]) <= 5.0
    assert 0.0 < float(metrics["train/pair_fraction"]) <= 1.0
    seen.append(float(metrics["train/judge_agreement"]))  # NaN only without a mixed group
  assert any(np.isfinite(seen))


RATIONALE = ["judge.rationale=True", "judge.num_samples=2", "judge.max_new_tokens=34",
             "data.batch_size=4", "sampling.n=2", "warmup.rounds=1"]


def test_rationale_judge_config(tmp_path):
  """The built-in rationale template and marker, and one error naming judge.max_new_tokens when a
  judgement has no room for a whole solution, the marker and the score."""
  cfg = config_lib.load_config("configs/self_rewarding.py", RATIONALE)
  config_lib.validate(cfg)
  task, tok = ev.task_and_tokenizer(cfg, tmp_path)
  judge = ev.build_judge(cfg, tok)
  assert judge.rationale and judge.response_first
  assert judge.marker == (tok.piece_to_id("<score>"),)
  short = config_lib.load_config("configs/self_rewarding.py", RATIONALE + ["judge.max_new_tokens=20"])
  with pytest.raises(config_lib.ConfigError, match=r"judge.max_new_tokens: .*needs >= 34, got 20"):
    ev.build_judge(short, tok)
  with pytest.raises(config_lib.ConfigError, match=r"judge.num_samples"):
    ev.build_judge(config_lib.load_config("configs/self_rewarding.py",
                                          RATIONALE + ["judge.num_samples=0"]), tok)


@pytest.mark.slow
def test_rationale_judge_rounds_run_and_read_scores(tmp_path):
  """Warm-up with rationale rows and a self-rewarding round whose judgements are sampled
  solutions followed by the marker and a score: jitted end to end, scores on the scale."""
  cfg = config_lib.load_config("configs/self_rewarding.py", RATIONALE)
  task, tok = ev.task_and_tokenizer(cfg, tmp_path)
  mc, lens = ev.model_config(cfg, tok), ev.data_lengths(cfg)
  verify, opt = task.make_verifier(tok), ev.build_optimizer(cfg)
  it = pipeline.make_iterator(task.source("train", 0), tokenizer=tok, batch_size=4, seed=0, **lens)
  warm_spec = ev.build_warmup_spec(cfg, tok)
  state = rnd.init_state(models.init_params(mc, jax.random.key(0)), opt, warm_spec, jax.random.key(1))
  state, metrics = rnd.build_round_fn(mc, warm_spec, opt, ev.sampling_config(cfg, tok), verify)(
      state, next(it))
  assert np.isfinite(float(metrics["train/judge_loss"]))
  spec = ev.build_spec(cfg)
  round_fn = rnd.build_round_fn(mc, spec, opt, ev.sampling_config(cfg, tok), verify,
                                scorer=ev.build_scorer(cfg, mc, tok))
  state = rnd.init_state(state.params, opt, spec, jax.random.key(2))
  state, metrics = round_fn(state, next(it))
  assert np.isfinite(float(metrics["train/loss"]))
  valid = float(metrics["judge/valid_fraction"])
  assert 0.0 <= valid <= 1.0
  if valid:  # an untrained judge rarely writes the marker; any score it reads is on the scale
    assert 0.0 <= float(metrics["judge/score_mean"]) <= 5.0


@pytest.mark.slow
def test_study_script_runs_at_smoke_size(tmp_path):
  """examples/self_rewarding_study.py (the numbers in docs/recipes.md) at tiny sizes: it writes
  the judge report and one row per control, and the flipped-verifier scorer flips at its rate."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("study", "examples/self_rewarding_study.py")
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  out = tmp_path / "study.json"
  result = study.main(["--warmup_rounds=2", "--rounds=1", "--eval_examples=16",
                       "--judge_examples=16", "--flips=0.3", f"--out={out}"])
  assert [c["scores"] for c in result["controls"]] == [
      "verifier", "verifier flipped p=0.3", "self-judge, min_score_gap=0.5"]
  assert out.exists() and 0.0 <= result["warmup_accuracy"] <= 1.0
  assert {"agreement", "corr_score_likelihood", "gap>0.5"} <= set(result["judge"])
  # The flipped verifier: all-correct verdicts come back flipped at about the rate asked for.
  verify = lambda tokens, mask, answers, answer_mask: jnp.ones(tokens.shape[0])
  scorer = study.flipped_verifier(verify, 4, 0.3)
  rows = 4000
  ro = sampling.Rollout(prompt_tokens=jnp.zeros((rows, 1), jnp.int32),
                        prompt_mask=jnp.ones((rows, 1), bool), tokens=jnp.zeros((rows, 2), jnp.int32),
                        logprobs=jnp.zeros((rows, 2)), model_logprobs=jnp.zeros((rows, 2)),
                        mask=jnp.ones((rows, 2), bool), lengths=jnp.full((rows,), 2))
  batch = {"answer_tokens": jnp.zeros((rows // 4, 1), jnp.int32),
           "answer_mask": jnp.ones((rows // 4, 1), bool)}
  scores, _ = scorer(None, None, batch, ro, jax.random.key(0))
  assert abs(float(jnp.mean(scores == 0.0)) - 0.3) < 0.03
