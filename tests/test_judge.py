"""The self-critique judge (scoring/judge.py): judge prompts in token space, judge-training rows,
the expected and the sampled score against independent computations, the ranking agreement, and
the judge a config builds (`setup.build_judge`). End to end (warm-up, rounds): test_self_rewarding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, models, sampling, scoring, setup
from selfplay_jax.models.config import ConfigError
from selfplay_jax.scoring.judge import Judge
from tests.stand_ins import CharTokenizer as _Tok

CFG = models.get_preset("tiny").replace(vocab_size=32, hidden_size=32, intermediate_size=64,
                                        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_expected_scores_in_chunks_equal_the_unchunked_pass():
  """`Judge.score(num_chunks=...)` (the Self-Rewarding scorer with `algorithm.num_minibatches`)
  runs the judge forward over chunks of rows and gives each row the score of one pass over all."""
  tok = _Tok()
  judge = Judge.from_template("j{prompt}{response}s", tok, score_max=5)
  cfg = CFG.replace(vocab_size=48)
  params = models.init_params(cfg, jax.random.key(3))
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(3, 40, (8, 4)), jnp.int32)
  resp = jnp.asarray(rng.integers(3, 40, (8, 3)), jnp.int32)
  args = (cfg, params, prompt, prompt != 0, resp, jnp.ones_like(resp, bool), jax.random.key(0))
  whole = np.asarray(jax.jit(judge.score, static_argnums=0)(*args))
  for chunks in (2, 4, 3):  # 3 does not divide 8 rows: one pass
    got = np.asarray(jax.jit(judge.score, static_argnums=(0, 7))(*args, chunks))
    np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6)
  scorer = scoring.judge_scorer(judge, cfg, num_chunks=4)
  rollout = sampling.Rollout(prompt_tokens=prompt, prompt_mask=prompt != 0, tokens=resp,
                             logprobs=jnp.zeros(resp.shape), model_logprobs=jnp.zeros(resp.shape),
                             mask=jnp.ones_like(resp, bool), lengths=jnp.full((8,), 3))
  scores, _ = scorer(params, None, None, rollout, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(scores), whole, rtol=1e-6, atol=1e-6)


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


def _judge_sequence(tok, prompt_row, response_row, response_mask_row, before, middle, after):
  """One judge prompt by hand: BOS + before + prompt (no BOS / padding) + middle + response
  (masked, no stop token) + after."""
  prompt = [int(t) for t in prompt_row if t not in (tok.pad_id, tok.bos_id)]
  response = [int(t) for t, m in zip(response_row, response_mask_row) if m and t not in tok.eos_ids]
  return [tok.bos_id] + tok.encode(before) + prompt + tok.encode(middle) + response + tok.encode(after)


@pytest.mark.slow
def test_sampled_score_is_the_mean_of_the_judgements_read_back():
  """Sampled judging (`num_samples=3`, no marker: a judgement's score is its first token) equals
  judgements drawn by the sampler from hand-built judge prompts and read in Python: the mean of
  the valid ones, NaN without one; `judge_scorer` reports their mean and valid fraction."""
  tok = _Tok()
  cfg = CFG.replace(vocab_size=48)
  params = models.init_params(cfg, jax.random.key(3))
  judge = Judge.from_template("j{prompt}:{response}s", tok, num_samples=3, max_new_tokens=4)
  rng = np.random.default_rng(0)
  r = 8
  prompt = np.zeros((r, 3), np.int32)
  resp = np.zeros((r, 4), np.int32)
  resp_mask = np.zeros((r, 4), bool)
  for i in range(r):
    p_len, r_len = rng.integers(1, 3), rng.integers(1, 4)
    prompt[i, 3 - p_len - 1:] = [tok.bos_id] + list(rng.integers(4, 44, p_len))
    resp[i, :r_len + 1] = list(rng.integers(4, 44, r_len)) + [tok.eos_id]
    resp_mask[i, :r_len + 1] = True
  width = judge.prompt_width(3, 4)
  seqs = [_judge_sequence(tok, prompt[i], resp[i], resp_mask[i], "j", ":", "s") for i in range(r)]
  judge_tokens = np.zeros((r, width), np.int32)
  judge_mask = np.zeros((r, width), bool)
  for i, seq in enumerate(seqs):  # left-padded
    judge_tokens[i, width - len(seq):], judge_mask[i, width - len(seq):] = seq, True
  got_tokens, got_mask = judge.prompts(jnp.asarray(prompt), jnp.asarray(prompt != 0),
                                       jnp.asarray(resp), jnp.asarray(resp_mask))
  np.testing.assert_array_equal(got_tokens, judge_tokens)
  np.testing.assert_array_equal(got_mask, judge_mask)

  key = jax.random.key(7)
  sc = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0, n=3, eos_ids=(tok.eos_id,),
                               pad_id=tok.pad_id)
  out = sampling.sample(cfg, params, jnp.asarray(judge_tokens), jnp.asarray(judge_mask), key, sc)
  score_of = {tok.vocab[str(k)]: float(k) for k in range(6)}
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  read = [score_of.get(int(t[0])) if m[0] else None for t, m in zip(tokens, mask)]
  want = np.full(r, np.nan)
  for i in range(r):
    valid = [v for v in read[3 * i:3 * i + 3] if v is not None]
    if valid:
      want[i] = np.mean(valid)
  assert np.isnan(want).any() and not np.isnan(want).all()  # both cases occur with these seeds

  got = np.asarray(judge.score(cfg, params, jnp.asarray(prompt), jnp.asarray(prompt != 0),
                               jnp.asarray(resp), jnp.asarray(resp_mask), key))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  rollout = sampling.Rollout(prompt_tokens=jnp.asarray(prompt), prompt_mask=jnp.asarray(prompt != 0),
                             tokens=jnp.asarray(resp), logprobs=jnp.zeros(resp.shape),
                             model_logprobs=jnp.zeros(resp.shape), mask=jnp.asarray(resp_mask),
                             lengths=jnp.asarray(resp_mask.sum(1)))
  scores, metrics = scoring.judge_scorer(judge, cfg)(params, None, None, rollout, key)
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-6)
  assert float(metrics["judge/score_mean"]) == pytest.approx(np.nanmean(want), rel=1e-6)
  assert float(metrics["judge/valid_fraction"]) == np.mean(~np.isnan(want))
  # judge.model=reference: the same judgements from the reference params, whatever sampled.
  other = models.init_params(cfg, jax.random.key(4))
  frozen, _ = scoring.judge_scorer(judge, cfg, "reference")(other, params, None, rollout, key)
  np.testing.assert_allclose(np.asarray(frozen), want, rtol=1e-6)
  policy, _ = scoring.judge_scorer(judge, cfg)(other, params, None, rollout, key)
  assert not np.allclose(np.nan_to_num(np.asarray(policy), nan=-1), np.nan_to_num(want, nan=-1))


# ---- the judge a config builds ----------------------------------------------------------------

RATIONALE = ["judge.rationale=True", "judge.num_samples=2", "judge.max_new_tokens=34",
             "data.batch_size=4", "sampling.n=2", "warmup.rounds=1"]


def test_rationale_judge_config(tmp_path):
  """The built-in rationale template and marker, and one error naming judge.max_new_tokens when a
  judgement has no room for a whole solution, the marker and the score."""
  cfg = config_lib.load_config("configs/self_rewarding.py", RATIONALE)
  config_validation.validate(cfg)
  task, tok = setup.task_and_tokenizer(cfg, tmp_path)
  judge = setup.build_judge(cfg, tok)
  assert judge.rationale and judge.response_first
  assert judge.marker == (tok.piece_to_id("<score>"),)
  short = config_lib.load_config("configs/self_rewarding.py", RATIONALE + ["judge.max_new_tokens=20"])
  with pytest.raises(config_lib.ConfigError, match=r"judge.max_new_tokens: .*needs >= 34, got 20"):
    setup.build_judge(short, tok)
  with pytest.raises(config_lib.ConfigError, match=r"judge.num_samples"):
    setup.build_judge(config_lib.load_config("configs/self_rewarding.py",
                                          RATIONALE + ["judge.num_samples=0"]), tok)


def test_judge_model_reference_needs_a_judge_and_a_kept_reference():
  """`judge.model=reference` keeps GRPO's frozen reference even without a KL term (it judges),
  and ReST-EM's (which keeps none otherwise); it is refused, naming the key, where there is no judge or no reference to judge with."""
  load = lambda path, *o: config_lib.load_config(path, ["judge.model=reference", *o])
  cfg = load("configs/grpo.py", "algorithm.reward=judge", "algorithm.kl_coef=0.0")
  config_validation.validate(cfg)
  assert setup.build_spec(cfg).reference == "frozen"
  config_validation.validate(load("configs/self_rewarding.py"))
  with pytest.raises(config_lib.ConfigError, match=r"judge.model: .*no judge"):
    config_validation.validate(load("configs/grpo.py"))
  # ReST-EM keeps the frozen copy only to judge with (its loss reads no reference)
  cfg = load("configs/rest_em.py", "algorithm.reward=judge")
  config_validation.validate(cfg)
  assert setup.build_spec(cfg).reference == "frozen"
  assert setup.build_spec(config_lib.load_config(
      "configs/rest_em.py", ["algorithm.reward=judge"])).reference == "none"
  with pytest.raises(config_lib.ConfigError, match=r"judge.model: .*awr keeps none"):
    config_validation.validate(load("examples/extending/config.py", "algorithm.reward=judge"))
  with pytest.raises(config_lib.ConfigError, match=r"judge.model: must be"):
    config_validation.validate(config_lib.load_config("configs/grpo.py", ["judge.model=critic"]))
