"""B-STaR's exploration / exploitation monitor and its per-round choice of temperature and threshold
(Zeng et al. 2024, "B-STaR: Monitoring and Balancing Exploration and Exploitation in Self-Taught
Reasoners").

Self-improvement from its own samples stalls when the samples stop being diverse and correct
(exploration) or when the reward stops telling the correct ones from the wrong ones
(exploitation). Per prompt, with its `n` samples, the verifier's correctness and the selection
`reward >= τ` (what ReST-EM keeps; NaN rewards are never selected):

  n_sel       selected samples
  n_c         selected samples the verifier accepts
  n_c_unique  distinct ones among those (token-for-token different completions)
  balance     min(n_c_unique / n*, 1) · n_c / n_sel          (0 when nothing is selected)

The round logs their means over prompts (`bstar/*`, docs/metrics.md). With a grid of sampling
temperatures (`sampling.auto_temperature`) the round samples the batch once at every temperature
(one sampler call, the prompts tiled, a temperature per row), scores all of it, and keeps the block
whose mean balance is highest; with a grid of thresholds (`algorithm.auto_threshold`) it also
picks τ, jointly with the temperature (the pair with the highest mean balance, as B-STaR's sweep
does). Ties go to the earlier grid entry. Everything here is pure and jittable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Balance", "distinct_first", "prompt_counts", "balance_scores", "monitor_metrics",
           "choose"]


@dataclasses.dataclass(frozen=True)
class Balance:
  """What the round measures and chooses (static: part of the jitted program).

  n_star: n* of the balance score, the distinct correct samples per prompt that count as full
    exploration (B-STaR: 8).
  threshold: τ of the monitor's selection `reward >= τ` when no grid is given
    (`algorithm.reward_threshold`; 1 = verified for the verifier's 0 / 1 reward).
  temperatures: the sampling temperatures to choose from each round; () = sample at
    `sampling.temperature` only.
  thresholds: the thresholds to choose from each round; () = `threshold` only.
  """

  n_star: int = 8
  threshold: float = 1.0
  temperatures: tuple[float, ...] = ()
  thresholds: tuple[float, ...] = ()

  @property
  def grid_thresholds(self) -> tuple[float, ...]:
    return self.thresholds or (self.threshold,)


def distinct_first(tokens: jax.Array, eligible: jax.Array, group_size: int) -> jax.Array:
  """bool [R]: the eligible samples that no earlier eligible sample of the same prompt equals
  token for token, i.e. one per distinct eligible completion. `tokens` [R, N] hold the same filler
  after every completion's end (the sampler's pad), so whole rows compare as sequences."""
  r, width = tokens.shape
  t = tokens.reshape(r // group_size, group_size, width)
  e = eligible.reshape(r // group_size, group_size)
  same = jnp.all(t[:, :, None, :] == t[:, None, :, :], axis=-1)  # [G, i, j]
  earlier = jnp.tril(jnp.ones((group_size, group_size), bool), k=-1)  # j < i
  repeat = jnp.any(same & earlier[None] & e[:, None, :], axis=-1)
  return (e & ~repeat).reshape(r)


def prompt_counts(rewards: jax.Array, verified: jax.Array, tokens: jax.Array, group_size: int,
                  threshold) -> dict[str, jax.Array]:
  """Per prompt ([G] float32): `selected`, `correct` (selected and verified), `unique`
  (distinct selected-correct), `any_correct` (some sample verified, selected or not) and
  `distinct_correct` (distinct verified samples, selected or not)."""
  correct = verified >= 1.0
  selected = rewards >= threshold  # NaN >= τ is False: an unscored sample is never selected
  per_prompt = lambda x: x.reshape(-1, group_size).astype(jnp.float32).sum(axis=1)
  return {"selected": per_prompt(selected), "correct": per_prompt(selected & correct),
          "unique": per_prompt(distinct_first(tokens, selected & correct, group_size)),
          "any_correct": per_prompt(correct) > 0,
          "distinct_correct": per_prompt(distinct_first(tokens, correct, group_size))}


def balance_scores(counts: dict[str, jax.Array], n_star: int) -> jax.Array:
  """float32 [G]: each prompt's balance score `min(n_c_unique / n*, 1) · n_c / n_sel` (0 when
  nothing is selected)."""
  precision = counts["correct"] / jnp.maximum(counts["selected"], 1.0)
  return jnp.minimum(counts["unique"] / n_star, 1.0) * precision


def monitor_metrics(rewards: jax.Array, verified: jax.Array, tokens: jax.Array, group_size: int,
                    balance: Balance, threshold=None) -> dict[str, jax.Array]:
  """The round's `bstar/*` metrics (means over prompts; `bstar/precision` over the prompts that
  selected something, NaN when none did)."""
  c = prompt_counts(rewards, verified, tokens, group_size,
                    balance.threshold if threshold is None else threshold)
  has = c["selected"] > 0
  precision = jnp.where(has, c["correct"] / jnp.maximum(c["selected"], 1.0), 0.0)
  return {"bstar/pass_at_n": jnp.mean(c["any_correct"].astype(jnp.float32)),
          "bstar/distinct_correct": jnp.mean(c["distinct_correct"]),
          "bstar/selected_fraction": jnp.mean(c["selected"]) / group_size,
          "bstar/precision": jnp.where(has.any(), precision.sum() / jnp.maximum(has.sum(), 1),
                                       jnp.nan),
          "bstar/balance": jnp.mean(balance_scores(c, balance.n_star))}


def choose(rewards: jax.Array, verified: jax.Array, tokens: jax.Array, group_size: int,
           balance: Balance) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The grid point with the highest mean balance score.

  `rewards`, `verified` [T, R] and `tokens` [T, R, N] hold the round's samples at each of the T
  temperatures (T = 1 without a temperature grid). Returns (temperature index, threshold, the
  mean balance score of every pair [T, len(thresholds)]); ties go to the earlier temperature, then
  the earlier threshold.
  """
  grid = balance.grid_thresholds
  means = jnp.stack([
      jax.vmap(lambda r, v, t: jnp.mean(balance_scores(
          prompt_counts(r, v, t, group_size, tau), balance.n_star)))(rewards, verified, tokens)
      for tau in grid], axis=1)  # [T, len(grid)]
  best = jnp.argmax(means.reshape(-1))  # the first maximum: earlier grid entries win ties
  return best // len(grid), jnp.asarray(grid, jnp.float32)[best % len(grid)], means
