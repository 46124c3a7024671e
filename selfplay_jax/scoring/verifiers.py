"""Verifiers: exact, jittable checks of a completion against a gold answer, run inside the round.

A verifier is `verify(completion_BxN, completion_mask_BxN, answer_BxA, answer_mask_BxA) -> [B]`
float32 rewards (1.0 = correct). Built-in tasks and JSONL data with answers make theirs with
`make_answer_verifier` (the answer follows a marker token and ends at EOS); a task may define any
other jittable check with the same signature (`Task.make_verifier`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Verifier = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def verifier_inputs(completion_BxN, completion_mask_BxN, answer_BxA, answer_mask_BxA,
                    max_answer_len: int | None = None):
  """A verifier's four inputs as (int32, bool, int32, bool) arrays; ValueError when the answer
  is wider than `max_answer_len`."""
  gold = jnp.asarray(answer_BxA, jnp.int32)
  if max_answer_len is not None and gold.shape[1] > max_answer_len:
    raise ValueError(f"answer width {gold.shape[1]} exceeds max_answer_len={max_answer_len}")
  return (jnp.asarray(completion_BxN, jnp.int32), jnp.asarray(completion_mask_BxN, bool), gold,
          jnp.asarray(answer_mask_BxA, bool))


def completion_end(tokens: jax.Array, mask: jax.Array, eos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(has_eos [B], end [B]) of completions [B, N]: whether a stop token (`eos`, ids) is among the
  masked tokens, and the position of the first one (N when there is none)."""
  is_eos = jnp.isin(tokens, eos) & mask
  has_eos = is_eos.any(axis=1)
  return has_eos, jnp.where(has_eos, jnp.argmax(is_eos, axis=1), tokens.shape[1])


def make_answer_verifier(marker_id: int, eos_ids: Sequence[int], answer_ids: Sequence[int] = (),
                         max_answer_len: int | None = None,
                         format_reward: float = 0.0) -> Verifier:
  """A pure, jittable `verify(completion_BxN, completion_mask_BxN, answer_BxA, answer_mask_BxA)`.

  A completion ends at its first EOS (any of `eos_ids`) among masked tokens; its answer is the
  tokens after its first `marker_id`, up to that EOS. Reward is 1.0 iff the completion has both,
  every token in between is masked, and the answer equals the gold answer exactly (gold: the masked
  tokens of `answer_BxA`, one contiguous run, left- or right-padded; an empty gold scores 0).
  Otherwise `format_reward` (default 0.0) if the completion is well formed (marker, non-empty
  answer made only of `answer_ids`, EOS), else 0.0. A completion cut off before EOS scores 0.0.
  Returns float32 [B].
  """
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  allowed = jnp.asarray(list(answer_ids) or [-1], jnp.int32)

  def verify(completion_BxN, completion_mask_BxN, answer_BxA, answer_mask_BxA):
    tokens, mask, gold, gold_mask = verifier_inputs(completion_BxN, completion_mask_BxN,
                                                    answer_BxA, answer_mask_BxA, max_answer_len)
    n, a = tokens.shape[1], gold.shape[1]
    span = answer_span(tokens, mask, marker_id, eos)
    start_B, length_B, complete = span["start"], span["length"], span["complete"]
    gold_len_B = gold_mask.sum(axis=1)
    gold_start_B = jnp.argmax(gold_mask, axis=1)
    j_A = jnp.arange(a)
    got = jnp.take_along_axis(tokens, jnp.clip(start_B[:, None] + j_A, 0, n - 1), axis=1)
    want = jnp.take_along_axis(gold, jnp.clip(gold_start_B[:, None] + j_A, 0, a - 1), axis=1)
    same = ((got == want) | (j_A[None] >= gold_len_B[:, None])).all(axis=1)
    correct = complete & (length_B == gold_len_B) & same & (gold_len_B > 0)
    if format_reward == 0.0:
      return correct.astype(jnp.float32)
    well_formed = complete & ~(span["region"] & ~jnp.isin(tokens, allowed)).any(axis=1)
    return jnp.where(correct, 1.0, jnp.where(well_formed, format_reward, 0.0)).astype(jnp.float32)

  return verify


def answer_span(tokens: jax.Array, mask: jax.Array, marker_id: int, eos: jax.Array) -> dict:
  """Where each completion's answer is: the tokens after its first `marker_id`, up to its first
  stop token (`eos`, ids). Returns `start` [B], `length` [B], `region` [B, N] (the answer's
  positions) and `complete` [B] (marker and stop token present, every answer token masked, the
  answer non-empty): what `make_answer_verifier` and `extract_answers` read."""
  n = tokens.shape[1]
  pos_N = jnp.arange(n)
  has_eos, end_B = completion_end(tokens, mask, eos)
  is_marker = (tokens == marker_id) & mask & (pos_N[None] < end_B[:, None])
  has_marker = is_marker.any(axis=1)
  start_B = jnp.argmax(is_marker, axis=1) + 1
  region = (pos_N[None] >= start_B[:, None]) & (pos_N[None] < end_B[:, None])
  length_B = end_B - start_B
  complete = has_eos & has_marker & ~(region & ~mask).any(axis=1) & (length_B > 0)
  return {"start": start_B, "length": length_B, "region": region, "complete": complete}


PAD_ANSWER = -1  # fills `extract_answers`' rows past each answer's end


def extract_answers(tokens: jax.Array, mask: jax.Array, marker_id: int, eos_ids: Sequence[int],
                    width: int) -> tuple[jax.Array, jax.Array]:
  """Each completion's answer as a fixed-width row, for comparing answers with one another
  (majority votes) without a gold answer: `(answers [B, width] int32, valid [B] bool)`, the
  answer's tokens left-aligned and `PAD_ANSWER` after them. Valid = a complete answer (marker,
  non-empty answer, stop token: `answer_span`) of at most `width` tokens; an invalid row is all
  `PAD_ANSWER`, so it never equals a valid one."""
  tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  span = answer_span(tokens, mask, marker_id, eos)
  valid = span["complete"] & (span["length"] <= width)
  j = jnp.arange(width)
  got = jnp.take_along_axis(tokens, jnp.clip(span["start"][:, None] + j, 0, tokens.shape[1] - 1),
                            axis=1)
  keep = valid[:, None] & (j[None] < span["length"][:, None])
  return jnp.where(keep, got, PAD_ANSWER), valid


def final_answer(answer: str, marker: str | None) -> str:
  """What the verifier compares: the part after the last `marker` (whitespace stripped) when the
  answer holds one, e.g. a GSM8K solution "...\\n#### 72" -> "72"; else the answer unchanged."""
  if marker and marker in answer:
    return answer.rsplit(marker, 1)[1].strip()
  return answer
