"""SCoRe (algorithms/score.py, round.two_attempts): the two-attempt rows, the stage-I KL and
stage-II bonus against NumPy, the held-out two-attempt metrics, and a tiny run through the config.

The second prompt is checked token by token against the first attempt (the prompt, the attempt
without its stop token, the instruction); the loss is recomputed in NumPy from its definition
(REINFORCE with a leave-one-out baseline, per-row KL weights); the deltas against the two verdicts
counted by hand."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, sampling, setup, train
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.score import EpisodeSFT, SCoRe, TwoAttempts, score_advantages
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.data import tasks
from selfplay_jax.errors import ConfigError
from tests import task_helpers

EOS, PAD = 2, 0
CORRECTION = (7, 8)


def _hand_rollout():
  """Two rows: left-padded prompts, completions with a stop token (row 0) and without (row 1)."""
  return sampling.Rollout(
      prompt_tokens=jnp.asarray([[0, 5, 6], [4, 5, 6]], jnp.int32),
      prompt_mask=jnp.asarray([[0, 1, 1], [1, 1, 1]], bool),
      tokens=jnp.asarray([[9, 3, EOS, 0], [3, 3, 3, 3]], jnp.int32),
      logprobs=jnp.zeros((2, 4)), model_logprobs=jnp.zeros((2, 4)),
      mask=jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], bool), lengths=jnp.asarray([3, 4]))


def test_correction_prompt_is_the_prompt_the_attempt_and_the_instruction():
  tokens, mask = rnd.correction_prompts(_hand_rollout(), CORRECTION, (EOS,), PAD)
  assert tokens.shape == (2, 3 + 4 + 2)
  want = [[5, 6, 9, 3, 7, 8], [4, 5, 6, 3, 3, 3, 3, 7, 8]]  # the stop token left out
  for row, w in enumerate(want):
    m = np.asarray(mask[row])
    assert m[-len(w):].all() and not m[:-len(w)].any()  # left-padded
    assert np.asarray(tokens[row])[m].tolist() == w
    assert (np.asarray(tokens[row])[~m] == PAD).all()


def test_correction_prompt_can_ask_the_problem_again():
  tokens, mask = rnd.correction_prompts(_hand_rollout(), CORRECTION, (EOS,), PAD,
                                        repeat_prompt=True)
  assert tokens.shape == (2, 3 + 4 + 2 + 3)
  want = [[5, 6, 9, 3, 7, 8, 5, 6], [4, 5, 6, 3, 3, 3, 3, 7, 8, 4, 5, 6]]
  for row, w in enumerate(want):
    assert np.asarray(tokens[row])[np.asarray(mask[row])].tolist() == w


@pytest.mark.parametrize("text, ids, repeat", [("", (), True), ("+{prompt}", ("+",), True),
                                               ("+=", ("+", "="), False)])
def test_correction_prompt_config(text, ids, repeat, tmp_path):
  cfg = config_lib.load_config("configs/score.py:task=arithmetic",
                               TINY + [f"algorithm.correction_prompt={text}"])
  run = setup.build(cfg, tmp_path)
  assert run.spec.correction == tuple(run.tokenizer.piece_to_id(p) for p in ids)
  assert run.spec.repeat_prompt == repeat and run.spec.pad_id == (run.tokenizer.pad_id or 0)
  cfg.algorithm.correction_prompt = "{prompt}+{prompt}"
  with pytest.raises(ConfigError, match="algorithm.correction_prompt"):
    setup.build(cfg, tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  task, tok, cfg, params, batch = task_helpers.tiny_arithmetic(tmp_path_factory.mktemp("tok"), 3)
  sc = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, n=2,
                               eos_ids=tuple(tok.eos_ids))
  correction = tuple(tok.encode(tasks.ANSWER_MARKER))
  return (cfg, params, {k: jnp.asarray(v) for k, v in batch.items()}, sc, tok,
          task.make_verifier(tok), correction)


def test_two_attempts_second_prompts_hold_the_first_and_both_are_verified(tiny):
  cfg, params, batch, sc, tok, verifier, correction = tiny
  key = jax.random.key(4)
  episode, rewards, metrics = jax.jit(
      lambda p, b, k: rnd.two_attempts(cfg, p, b, k, sc, verifier, correction, tok.pad_id))(
          params, batch, key)
  first, second = episode.first, episode.second
  r = first.num_rows
  assert r == 3 * sc.n and second.num_rows == r  # one second attempt per first
  eos = set(tok.eos_ids)
  for i in range(r):
    prompt = np.asarray(first.prompt_tokens[i])[np.asarray(first.prompt_mask[i])].tolist()
    attempt = [t for t, m in zip(np.asarray(first.tokens[i]).tolist(), np.asarray(first.mask[i]))
               if m and t not in eos]
    x2 = np.asarray(second.prompt_tokens[i])[np.asarray(second.prompt_mask[i])].tolist()
    assert x2 == prompt + attempt + list(correction), i
  # The second attempt is the sampler's on those prompts (n = 1, the round's second key).
  k2 = jax.random.split(key)[1]
  direct = sampling.sample(cfg, params, second.prompt_tokens, second.prompt_mask, k2,
                           sampling.SamplingConfig(**{**sc.__dict__, "n": 1}))
  np.testing.assert_array_equal(np.asarray(second.tokens), np.asarray(direct.tokens))
  answers = {k: jnp.repeat(batch[k], sc.n, axis=0) for k in ("answer_tokens", "answer_mask")}
  for j, out in enumerate((first, second)):
    want = verifier(out.tokens, out.mask, answers["answer_tokens"], answers["answer_mask"])
    np.testing.assert_array_equal(np.asarray(rewards[:, j]), np.asarray(want))
  c1, c2 = np.asarray(rewards[:, 0]) >= 1, np.asarray(rewards[:, 1]) >= 1
  assert float(metrics["train/delta_i2c"]) == pytest.approx(np.mean(~c1 & c2))
  assert float(metrics["train/accuracy@t2"]) == pytest.approx(c2.mean())


def test_attempt_metrics_count_changes_with_weights():
  r1 = jnp.asarray([1, 1, 0, 0, 1, 0], jnp.float32)
  r2 = jnp.asarray([1, 0, 1, 0, 0, 1], jnp.float32)
  w = jnp.asarray([1, 1, 1, 1, 1, 0])  # the last row is padding
  m = {k: float(v) for k, v in rnd.attempt_metrics(r1, r2, "eval", w).items()}
  assert m == pytest.approx({"eval/accuracy@t1": 3 / 5, "eval/accuracy@t2": 2 / 5,
                             "eval/delta_i2c": 1 / 5, "eval/delta_c2i": 2 / 5})
  assert m["eval/accuracy@t2"] - m["eval/accuracy@t1"] == pytest.approx(
      m["eval/delta_i2c"] - m["eval/delta_c2i"])


def test_episode_warmup_rows_are_gold_after_gold():
  """EpisodeSFT: the gold rows, then the same gold responses after `x · y* · c · x`."""
  batch = {"prompt_tokens": jnp.asarray([[0, 5, 6], [4, 5, 6]], jnp.int32),
           "prompt_mask": jnp.asarray([[0, 1, 1], [1, 1, 1]], bool),
           "response_tokens": jnp.asarray([[9, 3, EOS, 0], [3, 4, 3, EOS]], jnp.int32),
           "response_mask": jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], bool)}
  spec = EpisodeSFT(correction=CORRECTION, repeat_prompt=True, eos_ids=(EOS,), mode="copy")
  rows = spec.build(batch, None, None, None)
  assert rows["prompt_tokens"].shape == (4, 3 + 4 + 2 + 3)
  np.testing.assert_array_equal(rows["tokens"], np.concatenate([batch["response_tokens"]] * 2))
  np.testing.assert_array_equal(rows["mask"], np.concatenate([batch["response_mask"]] * 2))
  prompts = [np.asarray(t)[np.asarray(m)].tolist()
             for t, m in zip(rows["prompt_tokens"], rows["prompt_mask"])]
  assert prompts == [[5, 6], [4, 5, 6], [5, 6, 9, 3, 7, 8, 5, 6],
                     [4, 5, 6, 3, 4, 3, 7, 8, 4, 5, 6]]


def test_mixed_warmup_shows_corrupted_first_attempts_for_half_the_rows():
  """mode=mixed: each episode row's first attempt is the gold response or `corrupt` of it (here:
  every token + 10), a coin per row; the target is always the gold response."""
  rng = np.random.default_rng(3)
  rows_n = 64
  gold = rng.integers(3, 7, (rows_n, 4))
  batch = {"prompt_tokens": jnp.asarray(rng.integers(3, 7, (rows_n, 3)), jnp.int32),
           "prompt_mask": jnp.ones((rows_n, 3), bool),
           "response_tokens": jnp.asarray(gold, jnp.int32),
           "response_mask": jnp.ones((rows_n, 4), bool)}
  corrupt = lambda tokens, mask, key: tokens + 10
  spec = EpisodeSFT(correction=CORRECTION, eos_ids=(EOS,), mode="mixed", corrupt=corrupt)
  rows = spec.build(batch, None, None, None)
  first = np.asarray(rows["prompt_tokens"])[rows_n:, 3:7]  # x (3) then the first attempt (4)
  corrupted = (first == gold + 10).all(axis=1)
  assert ((first == gold).all(axis=1) | corrupted).all()
  assert 0.3 < corrupted.mean() < 0.7  # a fair coin over 64 rows
  np.testing.assert_array_equal(np.asarray(rows["tokens"])[rows_n:], gold)
  again = spec.build(batch, None, None, None)  # the same batch: the same coins
  np.testing.assert_array_equal(np.asarray(again["prompt_tokens"]), np.asarray(rows["prompt_tokens"]))
  with pytest.raises(ValueError, match="corrupt"):
    EpisodeSFT(mode="mixed")


# ---- advantages and loss against NumPy -----------------------------------------------------------


def np_rloo(r, g):
  r = np.asarray(r, np.float64).reshape(-1, g)
  return (r - (r.sum(1, keepdims=True) - r) / (g - 1)).reshape(-1)


@pytest.mark.parametrize("stage2", [False, True])
def test_advantages_stage_one_and_two(stage2):
  rng = np.random.default_rng(0)
  r1, r2 = rng.integers(0, 2, 8).astype(np.float32), rng.integers(0, 2, 8).astype(np.float32)
  a1, a2 = score_advantages(jnp.asarray(r1), jnp.asarray(r2), 4, jnp.asarray(stage2), 2.0)
  if stage2:
    np.testing.assert_allclose(a1, np_rloo(r1, 4), atol=1e-6)
    np.testing.assert_allclose(a2, np_rloo(r2 + 2.0 * (r2 - r1), 4), atol=1e-6)
  else:
    np.testing.assert_array_equal(a1, 0.0)
    np.testing.assert_allclose(a2, np_rloo(r2, 4), atol=1e-6)


def _episode(rng, rows=8, p=3, n=4):
  """A hand-made two-attempt episode: random tokens and masks, second prompts wider."""
  def rollout(width):
    mask = np.zeros((rows, n), bool)
    for i, length in enumerate(rng.integers(1, n + 1, rows)):
      mask[i, :length] = True
    return sampling.Rollout(
        prompt_tokens=jnp.asarray(rng.integers(3, 9, (rows, width)), jnp.int32),
        prompt_mask=jnp.ones((rows, width), bool),
        tokens=jnp.asarray(rng.integers(3, 9, (rows, n)), jnp.int32),
        logprobs=jnp.zeros((rows, n)), model_logprobs=jnp.zeros((rows, n)),
        mask=jnp.asarray(mask), lengths=jnp.asarray(mask.sum(1)))
  return TwoAttempts(first=rollout(p), second=rollout(p + n + 2))


@pytest.mark.parametrize("phase_round, stage2", [(3, False), (4, True)])
def test_loss_matches_numpy(phase_round, stage2):
  rng = np.random.default_rng(1)
  episode = _episode(rng)
  rewards = jnp.asarray(rng.integers(0, 2, (8, 2)), jnp.float32)
  spec = SCoRe(group_size=4, stage1_rounds=3, kl_first=5.0, kl_coef=0.1, bonus=2.0)
  ref = rng.normal(size=(16, 4)).astype(np.float32) - 2
  old = rng.normal(size=(16, 4)).astype(np.float32) - 2
  logp = LogProbs(old=lambda rows: jnp.asarray(old), ref=lambda rows: jnp.asarray(ref))
  batch = {"phase_round": jnp.full((2,), phase_round)}
  rows = spec.build(batch, episode, rewards, logp)
  # The rows: attempt 1 then attempt 2, prompts at the second's width, completions untouched.
  assert rows["prompt_tokens"].shape == (16, 3 + 4 + 2)
  np.testing.assert_array_equal(rows["tokens"][:8], episode.first.tokens)
  np.testing.assert_array_equal(rows["prompt_tokens"][8:], episode.second.prompt_tokens)
  np.testing.assert_array_equal(rows["prompt_tokens"][:8, -3:], episode.first.prompt_tokens)
  assert not np.asarray(rows["prompt_mask"][:8, :-3]).any()
  cur = rng.normal(size=(16, 4)).astype(np.float32) - 2
  loss, aux = spec.loss(jnp.asarray(cur), rows)

  r1, r2 = np.asarray(rewards[:, 0]), np.asarray(rewards[:, 1])
  a1 = np_rloo(r1, 4) if stage2 else np.zeros(8)
  a2 = np_rloo(r2 + (2.0 * (r2 - r1) if stage2 else 0.0), 4)
  adv = np.concatenate([a1, a2])
  w = np.concatenate([np.full(8, 0.1 if stage2 else 5.0), np.full(8, 0.1)])
  mask = np.asarray(rows["mask"], np.float64)
  ratio = np.exp(cur - old)
  clipped = np.clip(ratio, 0.8, 1.2)
  per_token = -np.minimum(ratio * adv[:, None], clipped * adv[:, None])
  pg = np.mean((per_token * mask).sum(1) / np.maximum(mask.sum(1), 1))
  k3 = np.exp(ref - cur) - (ref - cur) - 1
  kl = np.mean(w * (k3 * mask).sum(1) / np.maximum(mask.sum(1), 1))
  assert float(loss) == pytest.approx(pg + kl, rel=1e-5)
  kl_rows = (k3 * mask).sum(1) / np.maximum(mask.sum(1), 1)
  # Minibatches shuffle rows: the same loss, and each attempt's KL still read from its own rows.
  perm = rng.permutation(16)
  shuffled = {k: v[perm] for k, v in rows.items()}
  loss2, aux2 = spec.loss(jnp.asarray(cur)[perm], shuffled)
  assert float(loss2) == pytest.approx(float(loss), rel=1e-5)
  for got in (aux, aux2):
    assert float(got["kl_first"]) == pytest.approx(kl_rows[:8].mean(), rel=1e-5)
    assert float(got["kl_second"]) == pytest.approx(kl_rows[8:].mean(), rel=1e-5)
  # With ratio 1 (old = current, one on-policy update) the gradient is REINFORCE's.
  grad = jax.grad(lambda c: spec.loss(c, {**rows, "old_logp": jax.lax.stop_gradient(c),
                                          "kl_weight": jnp.zeros(16)})[0])(jnp.asarray(cur))
  np.testing.assert_allclose(np.asarray(grad), -adv[:, None] * mask
                             / np.maximum(mask.sum(1, keepdims=True), 1) / 16, atol=1e-6)


def test_sft_baseline_trains_only_verified_second_attempts():
  rng = np.random.default_rng(2)
  episode = _episode(rng)
  rewards = jnp.asarray(np.stack([np.zeros(8), [1, 0, 1, 0, 0, 0, 1, 1]], 1), jnp.float32)
  spec = SCoRe(objective="sft", group_size=4)
  rows = spec.build({"phase_round": jnp.ones(2)}, episode, rewards, None)
  assert rows["tokens"].shape[0] == 8  # second attempts only
  np.testing.assert_array_equal(np.asarray(rows["prompt_tokens"]),
                                np.asarray(episode.second.prompt_tokens))
  kept = np.asarray(rows["mask"]).any(1)
  np.testing.assert_array_equal(kept, np.asarray(rewards[:, 1]) >= 1)
  assert spec.reference == "none" and SCoRe().reference == "frozen"


# ---- config and a run ----------------------------------------------------------------------------

TINY = ["warmup.rounds=2", "rounds=3", "eval.every_rounds=3", "eval.num_examples=8",
        "eval.batch_size=8", "data.batch_size=4", "sampling.n=2", "sampling.max_new_tokens=8",
        "data.difficulty=1", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_layers=1", "progress_bar=false", "mesh.data=1", "eval.judge_samples=0",
        "metrics.plot_every_rounds=0", "checkpoint.every_rounds=0",
        "algorithm.score_stage1_rounds=1"]


def test_mixed_warmup_needs_a_task_that_corrupts(tmp_path):
  cfg = config_lib.load_config("configs/score.py:task=arithmetic",
                               TINY + ["algorithm.score_warmup_episodes=mixed"])
  with pytest.raises(ConfigError, match="algorithm.score_warmup_episodes: 'mixed'"):
    setup.build(cfg, tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.reward=likelihood"], "algorithm.reward: score rewards both attempts"),
    (["algorithm.scorer=tests.test_score:_no_scorer"], "algorithm.scorer: score rewards both"),
    (["sampling.temperature=0"], "sampling.temperature: 0"),
    (["population.size=2"], "population.size: 2 members with score"),
])
def test_score_refuses_what_it_would_ignore(overrides, message):
  cfg = config_lib.load_config("configs/score.py:task=arithmetic", TINY + overrides)
  with pytest.raises(ConfigError, match=message):
    config_validation.validate(cfg)


def _no_scorer(*args):  # a scorer reference that imports (validation imports it first)
  raise AssertionError("never called")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["score", "score_sft"])
def test_a_run_logs_both_attempts_and_their_changes(tmp_path, name):
  cfg = config_lib.load_config("configs/score.py:task=arithmetic",
                               TINY + [f"algorithm.name={name}"])
  config_validation.validate(cfg)
  train.train_and_evaluate(cfg, tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rounds = [m for m in lines if m.get("phase") == name]
  assert len(rounds) == 3
  for m in rounds:  # a change needs a wrong (right) first attempt: bounded by the verdicts
    assert 0 <= m["train/delta_i2c"] <= 1 - m["train/accuracy@t1"] + 1e-6
    assert 0 <= m["train/delta_c2i"] <= m["train/accuracy@t1"] + 1e-6
    assert m["train/accuracy"] == m["train/accuracy@t1"]
  last = [m for m in lines if "eval/accuracy@t2" in m][-1]
  assert last["eval/accuracy"] == last["eval/accuracy@t1"] and last["round"] == 5
  if name == "score":  # both attempts' rows are trained and measured against the reference
    assert all(m["train/kl_first"] >= 0 and m["train/kl_second"] >= 0 for m in rounds)
    assert rounds[-1]["train/kl_second"] > 0  # the policy has moved from the warmed-up one
  samples = (tmp_path / "samples").glob("*.jsonl")
  assert any(True for _ in samples)  # the second attempts are dumped (their prompts hold the first)
