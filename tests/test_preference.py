"""Preference pairs, SPIN's moving reference, the self-critique judge and self-likelihood scores.

Each checked against an independent NumPy computation or hand-built expectations.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax import models, sampling, scoring
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.preference import JudgeSFT, Preference
from selfplay_jax.algorithms.sft import RestEM
from selfplay_jax.models.config import ConfigError
from selfplay_jax.scoring.judge import Judge

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


def test_completion_logprobs_of_pairs_equal_those_of_single_rows():
  params = models.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = {"prompt_tokens": jnp.asarray(rng.integers(4, 32, (3, 2, 4)), jnp.int32),
          "prompt_mask": jnp.ones((3, 2, 4), bool).at[:, :, 0].set(False),
          "tokens": jnp.asarray(rng.integers(4, 32, (3, 2, 5)), jnp.int32),
          "mask": jnp.ones((3, 2, 5), bool)}
  pairs = rnd.completion_logprobs(CFG, params, rows)
  for k in range(2):
    single = rnd.completion_logprobs(CFG, params, {key: v[:, k] for key, v in rows.items()})
    np.testing.assert_allclose(pairs[:, k], single, atol=1e-6)
  # In chunks of rows (6 flat rows in 3 chunks of 2; 4 chunks do not divide them: one pass).
  for chunks in (3, 6, 4):
    np.testing.assert_allclose(rnd.completion_logprobs(CFG, params, rows, num_chunks=chunks), pairs,
                               atol=1e-6)


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


# ---- judge -----------------------------------------------------------------------------------


class _Tok:
  """A stand-in tokenizer: characters map to ids; digits are single tokens."""
  bos_id, pad_id, eos_id = 1, 0, 2
  eos_ids = (2,)
  vocab = {ch: i + 4 for i, ch in enumerate("0123456789abcdefghijklmnopqrstuvwxyz:<> ")}

  def encode(self, text):
    return [self.vocab[ch] for ch in text]


def test_judge_prompt_layout_matches_host_construction():
  tok = _Tok()
  judge = Judge.from_template("ab{prompt}:{response}<s>", tok)
  # Two rows: prompts left-padded with BOS; responses with the stop token and right padding.
  prompt = np.array([[0, 1, 10, 11], [1, 12, 13, 14]])
  prompt_mask = prompt != 0
  resp = np.array([[20, 21, 2, 0], [22, 2, 0, 0]])
  resp_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  tokens, mask = judge.prompts(jnp.asarray(prompt), jnp.asarray(prompt_mask), jnp.asarray(resp),
                               jnp.asarray(resp_mask))
  enc = tok.encode
  want = [[1] + enc("ab") + [10, 11] + enc(":") + [20, 21] + enc("<s>"),
          [1] + enc("ab") + [12, 13, 14] + enc(":") + [22] + enc("<s>")]
  width = judge.prompt_width(4, 4)
  assert tokens.shape == (2, width)
  for i, row in enumerate(want):
    got = np.asarray(tokens[i])[np.asarray(mask[i])]
    np.testing.assert_array_equal(got, row)
    assert np.all(np.asarray(mask[i])[width - len(row):])  # left-padded
    assert not np.any(np.asarray(mask[i])[:width - len(row)])


def test_response_first_template_swaps_the_fields():
  tok = _Tok()
  judge = Judge.from_template("a{response}<>{prompt}:", tok)
  assert judge.response_first
  prompt = np.array([[0, 1, 10, 11], [1, 12, 13, 14]])
  resp = np.array([[20, 21, 2, 0], [22, 2, 0, 0]])
  resp_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  tokens, mask = judge.prompts(jnp.asarray(prompt), jnp.asarray(prompt != 0), jnp.asarray(resp),
                               jnp.asarray(resp_mask))
  enc = tok.encode
  want = [[1] + enc("a") + [20, 21] + enc("<>") + [10, 11] + enc(":"),
          [1] + enc("a") + [22] + enc("<>") + [12, 13, 14] + enc(":")]
  for i, row in enumerate(want):
    got = np.asarray(tokens[i])
    np.testing.assert_array_equal(got[-len(row):], row)
    assert not np.any(np.asarray(mask[i])[:-len(row)])


def test_rationale_training_rows_write_the_gold_solution_then_the_score():
  tok = _Tok()
  v = tok.vocab
  judge = Judge.from_template("{response}<>{prompt}", tok, score_marker="s:", num_samples=1,
                              rationale=True)
  gold = np.array([[30, 31, 2, 0], [32, 2, 0, 0], [33, 34, 35, 2]])  # with EOS, right-padded
  gold_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
  width = judge.completion_width(gold.shape[1])
  assert width == 4 + 2 + 2
  rows = judge.training_rows(jnp.array([[1, 10]]).repeat(3, 0), jnp.ones((3, 2), bool),
                             jnp.array([[20, 2]]).repeat(3, 0), jnp.ones((3, 2), bool),
                             jnp.array([5.0, 0.0, 2.6]), completion_width=width + 1,
                             rationale=(jnp.asarray(gold), jnp.asarray(gold_mask)))
  want = [[30, 31, v["s"], v[":"], v["5"], 2],
          [32, v["s"], v[":"], v["0"], 2],
          [33, 34, 35, v["s"], v[":"], v["3"], 2]]
  assert rows["tokens"].shape == (3, width + 1)
  for i, row in enumerate(want):  # right-padded: the completion from position 0, then padding
    np.testing.assert_array_equal(np.asarray(rows["tokens"][i, :len(row)]), row)
    np.testing.assert_array_equal(np.asarray(rows["mask"][i]), np.arange(width + 1) < len(row))
    np.testing.assert_array_equal(np.asarray(rows["verdict"][i]),  # marker "s:", score, EOS
                                  (np.arange(width + 1) < len(row))
                                  & (np.arange(width + 1) >= len(row) - 4))
  # What the judge is taught to write is what `read_scores` reads back.
  np.testing.assert_array_equal(judge.read_scores(rows["tokens"], rows["mask"]), [5.0, 0.0, 3.0])
  with pytest.raises(ValueError, match="rationale"):
    judge.training_rows(jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), bool),
                        jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), bool), jnp.ones(1))


def test_judge_template_errors_name_the_key():
  tok = _Tok()
  with pytest.raises(ConfigError, match=r"judge.template.*\{response\}"):
    Judge.from_template("{prompt} only", tok)
  with pytest.raises(ConfigError, match=r"judge.template.*exactly once"):
    Judge.from_template("{response}{prompt}{prompt}", tok)
  with pytest.raises(ConfigError, match=r"judge.num_samples.*rationale"):
    Judge.from_template("{response}{prompt}", tok, rationale=True, score_marker="s")
  with pytest.raises(ConfigError, match=r"judge.score_marker.*rationale"):
    Judge.from_template("{response}{prompt}", tok, rationale=True, num_samples=1)

  class Wide(_Tok):
    def encode(self, text):
      return super().encode(text) * (2 if text == "3" else 1)

  with pytest.raises(ConfigError, match=r"judge.score_max.*score 3 is 2 tokens"):
    Judge.from_template("{prompt}{response}", Wide())


def test_expected_score_is_the_mean_over_score_tokens():
  tok = _Tok()
  judge = Judge.from_template("j{prompt}{response}s", tok, score_max=5)
  params = models.init_params(CFG.replace(vocab_size=48), jax.random.key(3))
  cfg = CFG.replace(vocab_size=48)
  prompt = jnp.array([[0, 1, 10], [1, 11, 12]])
  resp = jnp.array([[20, 2], [21, 22]])
  got = judge.score(cfg, params, prompt, prompt != 0, resp, jnp.ones_like(resp, bool),
                    jax.random.key(0))
  for i in range(2):
    seq = [1] + tok.encode("j") + [int(x) for x in prompt[i] if x > 1] + \
        [int(x) for x in resp[i] if x != 2] + tok.encode("s")
    logits = np.asarray(models.forward(cfg, params, jnp.asarray([seq])))[0, -1].astype(np.float64)
    ids = [tok.vocab[str(k)] for k in range(6)]
    p = np.exp(logits[ids] - logits[ids].max())
    p /= p.sum()
    np.testing.assert_allclose(float(got[i]), (p * np.arange(6)).sum(), rtol=1e-4)


def test_read_scores_after_the_marker():
  tok = _Tok()
  judge = Judge.from_template("{prompt}{response}", tok, score_marker="s:", num_samples=2)
  v = tok.vocab
  gen = [[v["a"], v["s"], v[":"], v["4"], 2, 0],        # "as:4" -> 4
         [v["s"], v[":"], v["1"], v["s"], v[":"], v["3"]],  # last marker wins -> 3
         [v["3"], v["b"], 2, 0, 0, 0],                  # no marker -> NaN
         [v["s"], v[":"], 2, 0, 0, 0]]                  # marker without a score -> NaN
  mask = np.array([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
  got = np.asarray(judge.read_scores(jnp.asarray(gen), jnp.asarray(mask)))
  np.testing.assert_array_equal(got[:2], [4.0, 3.0])
  assert np.isnan(got[2]) and np.isnan(got[3])
  plain = Judge.from_template("{prompt}{response}", tok)
  got = np.asarray(plain.read_scores(jnp.asarray(gen), jnp.asarray(mask)))
  assert got[2] == 3.0 and np.isnan(got[0])  # without a marker: the first generated token


def test_judge_training_rows_target_the_score_token():
  tok = _Tok()
  judge = Judge.from_template("{prompt}{response}", tok, score_min=1, score_max=5)
  rows = judge.training_rows(jnp.array([[1, 10]]).repeat(3, 0), jnp.ones((3, 2), bool),
                             jnp.array([[20, 2]]).repeat(3, 0), jnp.ones((3, 2), bool),
                             jnp.array([5.0, 0.0, 2.6]), prompt_width=6, completion_width=4)
  np.testing.assert_array_equal(rows["tokens"][:, 0], [tok.vocab["5"], tok.vocab["1"], tok.vocab["3"]])
  np.testing.assert_array_equal(rows["tokens"][:, 1], [2, 2, 2])
  np.testing.assert_array_equal(rows["mask"], [[1, 1, 0, 0]] * 3)
  assert rows["prompt_tokens"].shape == (3, 6)


def test_ranking_agreement_counts_correct_over_wrong_pairs():
  scores = jnp.array([3.0, 1.0, 1.0, 2.0,   # correct {0, 3} vs wrong {1, 2}: 4 wins of 4
                      1.0, 1.0, 0.0, 5.0])  # correct {0} vs wrong {1, 2, 3}: tie, win, loss
  verified = jnp.array([1, 0, 0, 1, 1, 0, 0, 0], jnp.float32)
  assert float(scoring.ranking_agreement(scores, verified, 4)) == pytest.approx((4 + 1.5) / 7)
  assert np.isnan(float(scoring.ranking_agreement(scores, jnp.ones(8), 4)))


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


# ---- self-likelihood and SFT-sharpening ------------------------------------------------------


def test_self_likelihood_matches_numpy_and_best_of_n_keeps_its_argmax():
  params = models.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = {"prompt_tokens": jnp.asarray(rng.integers(4, 32, (4, 3)), jnp.int32),
          "prompt_mask": jnp.ones((4, 3), bool),
          "tokens": jnp.asarray(rng.integers(4, 32, (4, 5)), jnp.int32),
          "mask": jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)}
  seq = np.concatenate([rows["prompt_tokens"], rows["tokens"]], 1)
  logits = np.asarray(models.forward(CFG, params, jnp.asarray(seq))).astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tok_lp = np.take_along_axis(logp[:, 2:-1], np.asarray(rows["tokens"])[..., None], -1)[..., 0]
  m = np.asarray(rows["mask"])
  want_sum = (tok_lp * m).sum(1)
  np.testing.assert_allclose(scoring.self_likelihood(CFG, params, rows, "sum"), want_sum, rtol=1e-5)
  np.testing.assert_allclose(scoring.self_likelihood(CFG, params, rows, "mean"),
                             want_sum / m.sum(1), rtol=1e-5)

  ro = _rollout(rows["prompt_tokens"], rows["prompt_mask"], rows["tokens"], rows["mask"])
  scores = jnp.array([0.5, 2.0, np.nan, -1.0])
  kept = RestEM(group_size=2, select="best").build({}, ro, scores, None)
  np.testing.assert_array_equal(kept["mask"].any(1), [False, True, False, True])
  np.testing.assert_array_equal(kept["mask"][1], rows["mask"][1])
