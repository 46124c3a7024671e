"""The B-STaR monitor and its per-round choices (scoring/bstar.py, round.sample_and_score).

Each function against NumPy loops written from the definition (selection `reward >= τ`, distinct
completions as sets of token tuples, balance `min(n_c_unique / n*, 1) · n_c / n_sel`); the sampler's
per-prompt temperatures against whole-batch temperatures; a jitted `sample_and_score` with a
temperature and a threshold grid against the same samples drawn directly and scored in NumPy; the
config keys' refusals; and a tiny rest_em run choosing both each round."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, sampling, train
from selfplay_jax import round as rnd
from selfplay_jax.errors import ConfigError
from selfplay_jax.scoring import bstar
from tests import task_helpers

# ---- NumPy references ----------------------------------------------------------------------------


def np_prompt_stats(rewards, verified, tokens, lengths, n, tau):
  """Per prompt: (n_sel, n_c, n_c_unique, any correct, distinct correct), from the definitions."""
  out = []
  for g in range(len(rewards) // n):
    rows = range(g * n, (g + 1) * n)
    seq = lambda i: tuple(int(t) for t in tokens[i][:lengths[i]])
    selected = [i for i in rows if not math.isnan(rewards[i]) and rewards[i] >= tau]
    correct_sel = [i for i in selected if verified[i] >= 1]
    correct = [i for i in rows if verified[i] >= 1]
    out.append((len(selected), len(correct_sel), len({seq(i) for i in correct_sel}),
                bool(correct), len({seq(i) for i in correct})))
  return out


def np_balance(stats, n_star):
  return float(np.mean([min(u / n_star, 1.0) * (c / s if s else 0.0) for s, c, u, _, _ in stats]))


def np_metrics(rewards, verified, tokens, lengths, n, n_star, tau):
  stats = np_prompt_stats(rewards, verified, tokens, lengths, n, tau)
  precisions = [c / s for s, c, _, _, _ in stats if s]
  return {"bstar/pass_at_n": np.mean([a for *_, a, _ in stats]),
          "bstar/distinct_correct": np.mean([d for *_, d in stats]),
          "bstar/selected_fraction": np.mean([s for s, *_ in stats]) / n,
          "bstar/precision": np.mean(precisions) if precisions else math.nan,
          "bstar/balance": np_balance(stats, n_star)}


def _random_group(seed, prompts=6, n=4, width=3, vocab=3):
  """Samples with many exact repeats (a small vocabulary, short rows), some NaN rewards."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, width + 1, prompts * n)
  tokens = rng.integers(1, vocab, (prompts * n, width))
  tokens[np.arange(width)[None, :] >= lengths[:, None]] = 0  # the sampler's filler after the end
  rewards = rng.integers(0, 6, prompts * n).astype(np.float32)
  rewards[rng.random(prompts * n) < 0.15] = np.nan
  verified = (rng.random(prompts * n) < 0.5).astype(np.float32)
  return rewards, verified, tokens, lengths


def _assert_metrics(got, want):
  assert set(got) == set(want)
  for k, v in want.items():
    if math.isnan(v):
      assert math.isnan(float(got[k])), k
    else:
      assert float(got[k]) == pytest.approx(v, abs=1e-6), k


# ---- the functions -------------------------------------------------------------------------------


def test_hand_worked_example():
  """Two prompts, four samples each, n* = 2, τ = 3.

  prompt 1: rewards 5 4 3 1, correct 1 1 0 1, samples 1 and 2 identical: selected 0,1,2 (n_sel 3),
            correct among them 0,1 (n_c 2), one distinct (n_c_unique 1): min(1/2, 1) · 2/3 = 1/3.
  prompt 2: rewards 2 NaN 0 1: nothing selected: 0. Correct samples 1 and 3: pass, 2 distinct.
  """
  tokens = np.array([[7, 8], [7, 8], [9, 0], [6, 0], [1, 0], [2, 0], [3, 0], [4, 0]])
  rewards = np.array([5, 4, 3, 1, 2, np.nan, 0, 1], np.float32)
  verified = np.array([1, 1, 0, 1, 0, 1, 0, 1], np.float32)
  got = bstar.monitor_metrics(jnp.asarray(rewards), jnp.asarray(verified), jnp.asarray(tokens), 4,
                              bstar.Balance(n_star=2, threshold=3.0))
  _assert_metrics(got, {"bstar/pass_at_n": 1.0, "bstar/distinct_correct": (2 + 2) / 2,
                        "bstar/selected_fraction": 3 / 8, "bstar/precision": 2 / 3,
                        "bstar/balance": (1 / 3 + 0) / 2})


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau, n_star", [(0.0, 8), (3.0, 2), (5.0, 1)])
def test_monitor_matches_numpy(seed, tau, n_star):
  rewards, verified, tokens, lengths = _random_group(seed)
  got = jax.jit(bstar.monitor_metrics, static_argnums=(3, 4))(
      jnp.asarray(rewards), jnp.asarray(verified), jnp.asarray(tokens), 4,
      bstar.Balance(n_star=n_star, threshold=tau))
  _assert_metrics(got, np_metrics(rewards, verified, tokens, lengths, 4, n_star, tau))


def test_nothing_selected_anywhere_gives_nan_precision_and_zero_balance():
  rewards, verified, tokens, lengths = _random_group(0)
  got = bstar.monitor_metrics(jnp.asarray(rewards), jnp.asarray(verified), jnp.asarray(tokens), 4,
                              bstar.Balance(threshold=100.0))
  assert math.isnan(float(got["bstar/precision"]))
  assert float(got["bstar/balance"]) == 0.0 and float(got["bstar/selected_fraction"]) == 0.0


def test_choose_is_the_numpy_grid_argmax_with_earlier_entries_winning_ties():
  temps, taus, n, n_star = 3, (0.0, 2.0, 3.0, 4.0), 4, 2
  blocks = [_random_group(seed) for seed in range(temps)]
  stack = lambda i: jnp.asarray(np.stack([b[i] for b in blocks]))
  t_index, tau, means = bstar.choose(stack(0), stack(1), stack(2), n,
                                     bstar.Balance(n_star=n_star, thresholds=taus))
  want = np.array([[np_balance(np_prompt_stats(*b, n, t), n_star) for t in taus] for b in blocks])
  np.testing.assert_allclose(np.asarray(means), want, atol=1e-6)
  best = np.flatnonzero(want.reshape(-1) >= want.max() - 1e-7)[0]  # the first maximum
  assert (int(t_index), float(tau)) == (best // len(taus), taus[best % len(taus)])
  # All equal: the first temperature and the first threshold.
  zeros = jnp.zeros((temps, 8))
  t_index, tau, _ = bstar.choose(zeros, zeros, jnp.zeros((temps, 8, 2), jnp.int32), n,
                                 bstar.Balance(thresholds=taus))
  assert (int(t_index), float(tau)) == (0, taus[0])


# ---- the sampler's per-prompt temperatures -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  _, tok, cfg, params, batch = task_helpers.tiny_arithmetic(tmp_path_factory.mktemp("tok"), 3)
  sc = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, n=4,
                               eos_ids=tuple(tok.eos_ids))
  return cfg, params, {k: jnp.asarray(v) for k, v in batch.items()}, sc


def test_per_prompt_temperature_equals_the_whole_batch_at_that_temperature(tiny):
  """The same prompt twice, temperatures (0.4, 2.5): each prompt's rows are the rows a
  whole-batch run at its temperature draws (same key, same shapes, so the same noise)."""
  cfg, params, batch, sc = tiny
  prompts = jnp.concatenate([batch["prompt_tokens"][:1]] * 2)
  mask = jnp.concatenate([batch["prompt_mask"][:1]] * 2)
  key = jax.random.key(3)
  mixed = sampling.sample(cfg, params, prompts, mask, key, sc,
                          temperature=jnp.asarray([0.4, 2.5]))
  for p, t in enumerate((0.4, 2.5)):
    alone = sampling.sample(cfg, params, prompts, mask, key,
                            sampling.SamplingConfig(**{**sc.__dict__, "temperature": t}))
    rows = slice(p * sc.n, (p + 1) * sc.n)
    for field in ("tokens", "lengths", "mask"):
      np.testing.assert_array_equal(np.asarray(getattr(mixed, field))[rows],
                                    np.asarray(getattr(alone, field))[rows], err_msg=field)
    for field in ("logprobs", "entropy", "model_logprobs"):
      np.testing.assert_allclose(np.asarray(getattr(mixed, field))[rows],
                                 np.asarray(getattr(alone, field))[rows], atol=1e-5,
                                 err_msg=field)
  with pytest.raises(ValueError, match="temperature > 0"):
    sampling.sample(cfg, params, prompts, mask, key,
                    sampling.SamplingConfig(**{**sc.__dict__, "temperature": 0.0}),
                    temperature=jnp.asarray([0.4, 2.5]))


# ---- the round's choice --------------------------------------------------------------------------

TEMPS, TAUS, N_STAR = (0.5, 1.0, 3.0), (0.0, 1.0, 2.0, 3.0), 2


def _verifier(tokens, mask, answer_tokens, answer_mask):
  """Correct = an even first token: about half the samples, varying with the temperature."""
  return (tokens[:, 0] % 2 == 0).astype(jnp.float32)


def _scorer(params, ref_params, batch, rollout, rng):
  """A graded reward read from the second token (0-3), NaN when the row stopped before it."""
  score = (rollout.tokens[:, 1] % 4).astype(jnp.float32)
  return jnp.where(rollout.lengths > 1, score, jnp.nan), {"own/metric": jnp.mean(score)}


def test_round_keeps_the_best_balanced_temperature_and_threshold(tiny):
  cfg, params, batch, sc = tiny
  key = jax.random.key(7)
  balance = bstar.Balance(n_star=N_STAR, temperatures=TEMPS, thresholds=TAUS)
  run = jax.jit(lambda p, b, k: rnd.sample_and_score(cfg, p, p, b, k, sc, _verifier, _scorer,
                                                     0, balance))
  rollout, rewards, metrics = run(params, batch, key)

  # The same samples drawn directly: the batch tiled once per temperature, the same key.
  b = batch["prompt_tokens"].shape[0]
  tile = lambda x: jnp.concatenate([x] * len(TEMPS))
  every = sampling.sample(cfg, params, tile(batch["prompt_tokens"]), tile(batch["prompt_mask"]),
                          key, sc, temperature=jnp.repeat(jnp.asarray(TEMPS), b))
  tokens, lengths = np.asarray(every.tokens), np.asarray(every.lengths)
  verified = (tokens[:, 0] % 2 == 0).astype(np.float32)
  scores = np.where(lengths > 1, tokens[:, 1] % 4, np.nan).astype(np.float32)
  rows = b * sc.n
  block = lambda x, t: x[t * rows:(t + 1) * rows]
  means = np.array([[np_balance(np_prompt_stats(block(scores, t), block(verified, t),
                                                block(tokens, t), block(lengths, t), sc.n, tau),
                                N_STAR) for tau in TAUS] for t in range(len(TEMPS))])
  best = int(np.flatnonzero(means.reshape(-1) >= means.max() - 1e-7)[0])
  t_best, tau_best = best // len(TAUS), TAUS[best % len(TAUS)]
  assert float(metrics["bstar/temperature"]) == pytest.approx(TEMPS[t_best])
  assert float(metrics["bstar/threshold"]) == tau_best
  np.testing.assert_array_equal(np.asarray(rollout.tokens), block(tokens, t_best))
  # ReST-EM keeps the chosen selection: rewards become 1[score >= τ], NaN stays NaN.
  kept = block(scores, t_best)
  want = np.where(np.isnan(kept), np.nan, (kept >= tau_best).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(rewards), want)
  # The monitor and the round's other metrics read the chosen block.
  _assert_metrics({k: v for k, v in metrics.items() if k.startswith("bstar/")
                   and k not in ("bstar/temperature", "bstar/threshold")},
                  np_metrics(kept, block(verified, t_best), block(tokens, t_best),
                             block(lengths, t_best), sc.n, N_STAR, tau_best))
  assert float(metrics["train/accuracy"]) == pytest.approx(block(verified, t_best).mean())
  assert float(metrics["train/reward_mean"]) == pytest.approx(np.nanmean(kept))
  assert means[t_best].max() > means.min()  # the grid really differed: the choice was a choice


def test_without_grids_the_round_samples_as_before(tiny):
  """No grid: the same rollout as a plain sampler call, rewards untouched, no choice logged."""
  cfg, params, batch, sc = tiny
  key = jax.random.key(1)
  rollout, rewards, metrics = rnd.sample_and_score(cfg, params, params, batch, key, sc, _verifier,
                                                   _scorer)
  plain = sampling.sample(cfg, params, batch["prompt_tokens"], batch["prompt_mask"], key, sc)
  np.testing.assert_array_equal(np.asarray(rollout.tokens), np.asarray(plain.tokens))
  assert "bstar/temperature" not in metrics and "bstar/threshold" not in metrics
  assert "bstar/balance" in metrics and set(np.unique(np.asarray(rewards)[~np.isnan(rewards)])) \
      - {1.0, 0.0}  # graded scores, not binarised


# ---- config --------------------------------------------------------------------------------------

TINY = ["warmup.rounds=2", "rounds=2", "eval.every_rounds=2", "eval.num_examples=8",
        "eval.batch_size=8", "data.batch_size=4", "sampling.n=4", "sampling.max_new_tokens=6",
        "data.difficulty=1", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_layers=1", "progress_bar=false", "mesh.data=1", "eval.judge_samples=0",
        "metrics.plot_every_rounds=0", "checkpoint.every_rounds=0"]


def _cfg(config, *extra):
  cfg = config_lib.load_config(f"configs/{config}.py", TINY + list(extra))
  config_validation.validate(cfg)
  return cfg


@pytest.mark.parametrize("config, overrides, message", [
    ("rest_em", ["sampling.auto_temperature=0.7"], "one value"),
    ("rest_em", ["sampling.auto_temperature=0.7,0.7"], "lists a value twice"),
    ("rest_em", ["sampling.auto_temperature=0.7,x"], "comma-separated numbers"),
    ("rest_em", ["sampling.auto_temperature=0,0.7"], "must be > 0"),
    ("rest_em", ["sampling.auto_temperature=0.5,0.7", "sampling.temperature=0"], "greedy"),
    ("grpo", ["sampling.auto_temperature=0.5,0.7"], "off-policy"),
    ("grpo", ["algorithm.auto_threshold=0,1"], "only rest_em"),
    ("rest_em", ["algorithm.auto_threshold=0,1", "algorithm.reward_threshold=0.5"],
     "algorithm.reward_threshold"),
    ("sft", ["algorithm.reward_threshold=0.5"], "does not sample"),
    ("rest_em", ["algorithm.balance_n_star=0"], "algorithm.balance_n_star"),
])
def test_bad_grids_are_refused_naming_the_key(config, overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    _cfg(config, *overrides)
  key = overrides[0].split("=")[0] if "reward_threshold" not in message else message
  assert key in str(e.value)


@pytest.mark.slow
def test_rest_em_run_chooses_temperature_and_threshold_every_round(tmp_path):
  """rest_em with the self-likelihood reward (a graded score) and both grids: every round logs a
  temperature and a threshold from its grid, and the monitor."""
  cfg = _cfg("rest_em", "algorithm.reward=likelihood", "sampling.auto_temperature=0.6,1.2",
             "algorithm.auto_threshold=-4,-2,-1", "algorithm.balance_n_star=2")
  train.train_and_evaluate(cfg, tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rounds = [m for m in lines if m.get("phase") == "rest_em"]
  assert len(rounds) == 2
  for m in rounds:
    assert m["bstar/temperature"] == pytest.approx(0.6) or m["bstar/temperature"] == pytest.approx(1.2)
    assert m["bstar/threshold"] in (-4.0, -2.0, -1.0)
    assert 0.0 <= m["bstar/balance"] <= 1.0 and m["bstar/pass_at_n"] is not None
  warm = [m for m in lines if m.get("phase") == "warmup"]
  assert all("bstar/temperature" not in m for m in warm)  # the grids are the rounds' only
