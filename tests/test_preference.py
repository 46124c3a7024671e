"""The preference family (algorithms/preference.py): pair losses, pairs from data, gold vs sample
and best vs worst, SPIN's moving reference, and Self-Rewarding's judge-training warm-up (JudgeSFT).

Each checked against an independent NumPy computation or hand-built expectations. The judge itself
is tested in test_judge.py, `completion_logprobs` in test_logprobs.py.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax import models, sampling
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.preference import JudgeSFT, Preference
from selfplay_jax.scoring.judge import Judge
from tests.stand_ins import CharTokenizer as _Tok

CFG = models.get_preset("tiny").replace(vocab_size=32, hidden_size=32, intermediate_size=64,
                                        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _pairs(rng, p=6, t=5):
  """Random pair rows + per-token log-probs (policy, reference), and the masks' NumPy twins."""
  mask = np.zeros((p, 2, t), bool)
  for i in range(p):
    for k in range(2):
      mask[i, k, :rng.integers(1, t + 1)] = True
  logp = -rng.uniform(0.1, 2.0, size=(p, 2, t)).astype(np.float32)
  ref = -rng.uniform(0.1, 2.0, size=(p, 2, t)).astype(np.float32)
  weight = np.array([1, 1, 0, 1, 0, 1], np.float32)[:p]
  rows = {"mask": jnp.asarray(mask), "ref_logp": jnp.asarray(ref), "weight": jnp.asarray(weight)}
  return rows, logp, ref, mask, weight


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo"])
def test_preference_loss_is_weighted_mean_of_pair_losses(loss_type):
  rows, logp, ref, mask, w = _pairs(np.random.default_rng(0))
  spec = Preference(loss_type=loss_type, beta=0.2, nll_coef=0.5)
  loss, aux = spec.loss(jnp.asarray(logp), rows)
  lp = (logp * mask).sum(-1).astype(np.float64)
  rl = (ref * mask).sum(-1).astype(np.float64)
  n = mask.sum(-1)
  avg = lp / n
  if loss_type == "sigmoid":
    per = -_log_sigmoid(0.2 * ((lp[:, 0] - rl[:, 0]) - (lp[:, 1] - rl[:, 1])))
  elif loss_type == "ipo":
    d = (lp[:, 0] - rl[:, 0]) / n[:, 0] - (lp[:, 1] - rl[:, 1]) / n[:, 1]
    per = (d - 1 / (2 * 0.2))**2
  elif loss_type == "simpo":
    per = -_log_sigmoid(0.2 * (avg[:, 0] - avg[:, 1]) - 0.5)
  else:
    log_odds = (avg[:, 0] - avg[:, 1]) - (np.log1p(-np.exp(avg[:, 0])) - np.log1p(-np.exp(avg[:, 1])))
    per = -avg[:, 0] - 0.1 * _log_sigmoid(log_odds)
  per = per - 0.5 * avg[:, 0]  # nll_coef * NLL(chosen)
  np.testing.assert_allclose(float(loss), (per * w).sum() / w.sum(), rtol=2e-5)
  assert float(aux["pair_fraction"]) == pytest.approx(w.mean())


def test_dropped_pairs_get_no_gradient():
  rows, logp, _, _, w = _pairs(np.random.default_rng(1))
  grad = jax.grad(lambda lp: Preference().loss(lp, rows)[0])(jnp.asarray(logp))
  assert np.all(np.asarray(grad)[w == 0] == 0)
  assert np.any(np.asarray(grad)[w == 1] != 0)


def _rollout(prompt_tokens, prompt_mask, tokens, mask):
  z = jnp.zeros(tokens.shape, jnp.float32)
  return sampling.Rollout(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens,
                          logprobs=z, model_logprobs=z, mask=mask, lengths=mask.sum(-1))


def test_best_vs_worst_pairs_drop_ties_and_invalid_scores():
  g, t = 4, 3
  scores = np.array([[1, 3, 2, 0],          # best 1, worst 3
                     [2, 2, 2, 2],          # all tied -> dropped
                     [np.nan, 4, np.nan, 1],  # NaN never chosen: best 1, worst 3
                     [np.nan, np.nan, 5, np.nan]], np.float32)  # one valid score -> dropped
  b = scores.shape[0]
  tokens = jnp.arange(b * g * t, dtype=jnp.int32).reshape(b * g, t)
  prompts = jnp.repeat(jnp.arange(b, dtype=jnp.int32)[:, None], g, axis=0)
  ro = _rollout(prompts, jnp.ones_like(prompts, bool), tokens, jnp.ones_like(tokens, bool))
  rows = Preference(pairs="best_vs_worst", group_size=g).pair_rows({}, ro, jnp.asarray(scores).reshape(-1))
  np.testing.assert_array_equal(rows["weight"], [1, 0, 1, 0])
  np.testing.assert_array_equal(rows["tokens"][0, 0], tokens[1])
  np.testing.assert_array_equal(rows["tokens"][0, 1], tokens[3])
  np.testing.assert_array_equal(rows["tokens"][2, 0], tokens[2 * g + 1])
  np.testing.assert_array_equal(rows["tokens"][2, 1], tokens[2 * g + 3])
  np.testing.assert_array_equal(rows["prompt_tokens"][2, :, 0], [2, 2])
  gap = Preference(pairs="best_vs_worst", group_size=g, min_score_gap=2.5)
  np.testing.assert_array_equal(gap.pair_rows({}, ro, jnp.asarray(scores).reshape(-1))["weight"],
                                [1, 0, 1, 0])  # gaps 3 and 3 pass, a gap of 2.5 would not


def test_gold_vs_sample_pairs_have_the_gold_response_as_chosen():
  batch = {"prompt_tokens": jnp.array([[0, 1, 5], [1, 6, 7]]),
           "prompt_mask": jnp.array([[0, 1, 1], [1, 1, 1]], bool),
           "response_tokens": jnp.array([[8, 9, 2, 0], [10, 2, 0, 0]]),
           "response_mask": jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)}
  n = 2
  samples = jnp.array([[11, 2], [12, 2], [13, 2], [14, 2]])
  ro = _rollout(jnp.repeat(batch["prompt_tokens"], n, 0), jnp.repeat(batch["prompt_mask"], n, 0),
                samples, jnp.ones_like(samples, bool))
  rows = Preference(name="spin", pairs="gold_vs_sample").pair_rows(batch, ro, None)
  assert rows["tokens"].shape == (4, 2, 4)  # completions padded to one width
  for i in range(4):
    np.testing.assert_array_equal(rows["tokens"][i, 0], batch["response_tokens"][i // n])
    np.testing.assert_array_equal(rows["mask"][i, 0], batch["response_mask"][i // n])
    np.testing.assert_array_equal(rows["tokens"][i, 1, :2], samples[i])
    assert not rows["mask"][i, 1, 2:].any()
    np.testing.assert_array_equal(rows["prompt_tokens"][i, 0], batch["prompt_tokens"][i // n])


# ---- SPIN's moving reference -----------------------------------------------------------------


def _spin_batch(rng, b=4, p=4, r=5):
  return {"prompt_tokens": jnp.asarray(rng.integers(4, 32, (b, p)), jnp.int32),
          "prompt_mask": jnp.ones((b, p), bool),
          "response_tokens": jnp.asarray(np.concatenate([rng.integers(4, 32, (b, r - 1)),
                                                         np.full((b, 1), 2)], 1), jnp.int32),
          "response_mask": jnp.ones((b, r), bool)}


def _tree_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.slow
def test_spin_reference_is_the_previous_iterate(every):
  spec = Preference(name="spin", pairs="gold_vs_sample", reference="previous",
                    reference_every=every, sample_from="reference", replay=True)
  sc = sampling.SamplingConfig(max_new_tokens=4, n=1, eos_ids=(2,))
  opt = optax.adam(1e-2)
  rng = np.random.default_rng(0)
  batches = [_spin_batch(rng) for _ in range(4)]
  replay = rnd.empty_replay(spec, batches[0], sc)
  state = rnd.init_state(models.init_params(CFG, jax.random.key(0)), opt, spec, jax.random.key(1),
                         replay)
  round_fn = rnd.build_round_fn(CFG, spec, opt, sc, None)
  iterate = jax.device_get(state.params)  # the reference of the current iteration
  for r, batch in enumerate(batches, start=1):
    before = jax.device_get(state.params)
    state, metrics = round_fn(state, batch)
    after = jax.device_get(state.params)
    assert not _tree_equal(before, after)
    if r % every == 0:
      assert _tree_equal(state.ref_params, after)  # the reference moved to the new iterate
      iterate = after
      assert float(metrics["train/pair_fraction"]) == (0.5 if r == every else 1.0)
    else:
      assert _tree_equal(state.ref_params, iterate)  # mid-iteration: still the previous one
    # Replay holds pairs of a finished iteration (gold chosen), all with weight 1.
    if r >= every:
      assert np.all(np.asarray(state.replay["weight"]) == 1.0)
      np.testing.assert_array_equal(np.asarray(state.replay["tokens"][:, 0]),
                                    np.asarray(batches[(r // every) * every - 1]["response_tokens"]))


@pytest.mark.slow
def test_sampling_from_the_reference_uses_the_reference_params():
  """With sample_from="reference", the round's samples come from ref_params, not params."""
  spec = Preference(name="spin", pairs="gold_vs_sample", reference="previous",
                    sample_from="reference")
  sc = sampling.SamplingConfig(max_new_tokens=4, n=1, temperature=0.0, eos_ids=(2,))
  batch = _spin_batch(np.random.default_rng(0))
  p0 = models.init_params(CFG, jax.random.key(0))
  p1 = models.init_params(CFG, jax.random.key(5))
  state = rnd.init_state(p1, optax.sgd(0.0), spec, jax.random.key(1))
  state = state.replace(ref_params=jax.tree.map(jnp.copy, p0))
  _, metrics = rnd.build_round_fn(CFG, spec, optax.sgd(0.0), sc, None, num_samples=4)(state, batch)
  want = sampling.sample(CFG, p0, batch["prompt_tokens"], batch["prompt_mask"], jax.random.key(0), sc)
  np.testing.assert_array_equal(metrics["samples/tokens"], want.tokens)


# ---- the judge-training warm-up (JudgeSFT) -----------------------------------------------------


def test_judge_sft_rows_mix_gold_and_judged_samples():
  tok = _Tok()
  judge = Judge.from_template("j{prompt}{response}s", tok)
  batch = _spin_batch(np.random.default_rng(0), b=2)
  samples = jnp.array([[20, 2, 0], [21, 22, 2]])
  ro = _rollout(batch["prompt_tokens"], batch["prompt_mask"], samples,
                jnp.array([[1, 1, 0], [1, 1, 1]], bool))
  rows = JudgeSFT(judge).build(batch, ro, jnp.array([1.0, 0.0]), None)
  assert rows["tokens"].shape[0] == 6
  np.testing.assert_array_equal(rows["is_judge"], [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(rows["tokens"][:2], batch["response_tokens"])  # SFT on gold
  # Judge rows: gold -> 5, sample 0 (correct) -> 5, sample 1 (wrong) -> 0.
  np.testing.assert_array_equal(rows["tokens"][2:, 0], [tok.vocab[s] for s in "5550"])


@pytest.mark.slow
def test_rationale_judge_sft_rows_solve_each_rows_own_prompt():
  """Each judged sample's rationale is the gold response of its own prompt (samples are grouped
  by prompt), and the SFT rows are padded to the judge rows' width."""
  tok = _Tok()
  judge = Judge.from_template("{response}s{prompt}", tok, score_marker=":", num_samples=1,
                              rationale=True)
  batch = _spin_batch(np.random.default_rng(0), b=2)
  samples = jnp.array([[20, 2, 0], [21, 22, 2], [23, 2, 0], [24, 2, 0]])  # 2 per prompt
  ro = _rollout(jnp.repeat(batch["prompt_tokens"], 2, 0), jnp.repeat(batch["prompt_mask"], 2, 0),
                samples, samples != 0)
  rows = JudgeSFT(judge).build(batch, ro, jnp.array([1.0, 0.0, 0.0, 1.0]), None)
  np.testing.assert_array_equal(rows["is_judge"], [0, 0] + [1] * 6)
  gold, gold_mask = np.asarray(batch["response_tokens"]), np.asarray(batch["response_mask"])
  owner = [0, 1, 0, 0, 1, 1]  # judge rows: gold of prompts 0, 1; then samples 0, 0, 1, 1
  scores = "555005"
  for k, (p, score) in enumerate(zip(owner, scores)):
    solution = [t for t, m in zip(gold[p], gold_mask[p]) if m and t != 2]
    want = solution + [tok.vocab[":"], tok.vocab[score], 2]
    np.testing.assert_array_equal(np.asarray(rows["tokens"][2 + k, :len(want)]), want)
    assert int(rows["mask"][2 + k].sum()) == len(want)
  np.testing.assert_array_equal(rows["tokens"][:2, :gold.shape[1]], gold)  # SFT on gold


@pytest.mark.parametrize("balance", [False, True])
def test_judge_sft_loss_is_three_token_means_with_optional_class_balance(balance):
  """The warm-up loss against NumPy: NLL of the SFT rows' tokens + NLL of the judge rows'
  rationale tokens + judge_weight * NLL of their verdict tokens, each a token mean; with
  `balance` each judge row's tokens weigh 1 / (judge rows of its class: correct or wrong)."""
  tok = _Tok()
  judge = Judge.from_template("{response}s{prompt}", tok, score_marker=":", num_samples=1,
                              rationale=True)
  batch = _spin_batch(np.random.default_rng(0), b=2)
  samples = jnp.array([[20, 2, 0], [21, 22, 2], [23, 2, 0], [24, 2, 0]])
  ro = _rollout(jnp.repeat(batch["prompt_tokens"], 2, 0), jnp.repeat(batch["prompt_mask"], 2, 0),
                samples, samples != 0)
  spec = JudgeSFT(judge, judge_weight=0.7, balance=balance)
  rows = spec.build(batch, ro, jnp.array([1.0, 1.0, 0.0, 0.0]), None)
  correct = np.asarray(rows["judge_correct"])
  np.testing.assert_array_equal(correct, [0, 0, 1, 1, 1, 1, 0, 0])  # gold, gold, samples 0, 1
  logp = -jnp.asarray(np.random.default_rng(1).uniform(0.1, 3.0, rows["tokens"].shape),
                      jnp.float32)
  loss, aux = spec.loss(logp, rows)
  nll, mask = -np.asarray(logp, np.float64), np.asarray(rows["mask"], bool)
  verdict, is_judge = np.asarray(rows["verdict"], bool), np.asarray(rows["is_judge"], bool)
  w = np.ones(len(correct))
  if balance:  # 4 correct judge rows, 2 wrong ones
    w = np.where(correct, 1 / correct[is_judge].sum(), 1 / (~correct[is_judge]).sum())
  def mean(select, weights):
    m = mask & select
    return (nll * weights[:, None] * m).sum() / (weights[:, None] * m).sum()
  sft = mean(~is_judge[:, None], np.ones(len(w)))
  rationale = mean(is_judge[:, None] & ~verdict, w)
  judged = mean(verdict, w)
  np.testing.assert_allclose(float(loss), sft + rationale + 0.7 * judged, rtol=1e-5)
  np.testing.assert_allclose(float(aux["rationale_loss"]), rationale, rtol=1e-5)
  np.testing.assert_allclose(float(aux["judge_correct_fraction"]), 4 / 6)
  if balance:  # the weights differ from the unweighted means: the test can tell them apart
    assert abs(rationale - mean(is_judge[:, None] & ~verdict, np.ones(len(w)))) > 1e-4
