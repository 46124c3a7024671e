"""Label-free signals: votes among answers that need no gold label (TTRL / SRT majority rewards,
the population vote of easy-to-hard self-labelling). Pure and jittable.

Answers are fixed-width token rows (`verifiers.extract_answers`): two answers agree when their rows
are equal; an invalid answer (no marker, no stop token, too long) votes for nothing and agrees with
nothing.

Tie rule: when several answers share the largest count, the majority is the one that appears
first (the smallest index among the voters), so a vote is deterministic and does not depend on
the answers' token values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["majority_vote", "group", "majority_rewards", "winners", "label_accuracy",
           "WINNER_KEY"]

# The scorer's private metric: each group's majority voter ([G] int32, -1 when no answer is valid).
# `round.sample_and_score` pops it (keys starting with "_" are never logged) to measure
# `train/label_accuracy` with the verifier, which the scorer does not see.
WINNER_KEY = "_label_free/winner"


def majority_vote(answers: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Votes within each group: `answers` [G, n, A] (int), `valid` [G, n] (bool).

  Returns
    count [G, n]     how many valid voters of the group give voter i's answer (0 if i is invalid)
    share [G, n]     count / n (the SRT soft reward)
    winner [G]       index of the first voter holding the majority answer (0 if none is valid)
    majority [G, n]  whether voter i gives the majority answer (False for invalid voters)
    top_share [G]    the majority answer's count / n (0 when no voter is valid)
  """
  answers, valid = jnp.asarray(answers), jnp.asarray(valid, bool)
  n = answers.shape[1]
  same = (answers[:, :, None, :] == answers[:, None, :, :]).all(-1)  # [G, n, n]
  same = same & valid[:, :, None] & valid[:, None, :]
  count = same.sum(-1).astype(jnp.int32)  # 0 for invalid voters
  winner = jnp.argmax(count, axis=1)  # first index among the largest counts (the tie rule)
  top = jnp.take_along_axis(count, winner[:, None], axis=1)[:, 0]
  majority = jnp.take_along_axis(same, winner[:, None, None], axis=1)[:, 0] & (top > 0)[:, None]
  return {"count": count, "share": count.astype(jnp.float32) / n, "winner": winner,
          "majority": majority, "top_share": top.astype(jnp.float32) / n}


def group(x: jax.Array, n: int) -> jax.Array:
  """[G·n, ...] rows (the n samples of a prompt consecutive) -> [G, n, ...]."""
  return x.reshape((x.shape[0] // n, n) + x.shape[1:])


def majority_rewards(vote: dict[str, jax.Array], *, soft: bool = False,
                     threshold: float = 0.0) -> jax.Array:
  """The TTRL / SRT reward of each voter from `majority_vote`'s result, float32 [G, n]: 1 for the
  majority answer, else 0 (an invalid answer: 0); `soft`: the share of the voter's own answer in
  its group (0 for an invalid one). `threshold > 0`: every reward of a group whose majority share
  is below it is NaN (unscorable: the GRPO family gives it advantage 0)."""
  r = vote["share"] if soft else vote["majority"].astype(jnp.float32)
  if threshold > 0:
    r = jnp.where((vote["top_share"] < threshold)[:, None], jnp.nan, r)
  return r


def winners(vote: dict[str, jax.Array]) -> jax.Array:
  """[G] int32: each group's majority voter (`vote["winner"]`), -1 when no answer is valid."""
  return jnp.where(vote["top_share"] > 0, vote["winner"], -1).astype(jnp.int32)


def label_accuracy(winner: jax.Array, verified: jax.Array, n: int) -> jax.Array:
  """The fraction of groups whose majority answer the verifier accepts: `winner` [G] (`winners`:
  -1 = no valid answer, counted wrong), `verified` [G·n] (the verifier's rewards, >= 1 = correct).
  For monitoring only: a label-free reward never reads it."""
  ok = group(verified, n) >= 1.0
  hit = jnp.take_along_axis(ok, jnp.maximum(winner, 0)[:, None], axis=1)[:, 0] & (winner >= 0)
  return jnp.mean(hit.astype(jnp.float32))
