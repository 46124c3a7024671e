"""Rows: the data every layer above the models passes around, and their builders and padding.

A `Rows` is a dict of arrays with a leading row axis. Every row set the round trains on has at
least `prompt_tokens` / `prompt_mask` ([R, P], left-padded) and `tokens` / `mask` ([R, N], the
completion, right-padded); algorithms add per-row targets (`advantages`, `old_logp`, `weight`, ...).
Preference pairs carry a completion axis of size 2 (chosen, rejected): [P, 2, ...].

This module is the lowest layer of the training stack (it imports only JAX): the engine
(`round.py`), the algorithms and the scorers all build rows with it, so none of them imports
another for a helper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Rows = dict[str, jax.Array]
ROW_KEYS = ("prompt_tokens", "prompt_mask", "tokens", "mask")


def rollout_rows(rollout) -> Rows:
  """The common row fields of a sampled round (`sampling.Rollout`)."""
  return {"prompt_tokens": rollout.prompt_tokens, "prompt_mask": rollout.prompt_mask,
          "tokens": rollout.tokens, "mask": rollout.mask}


def gold_rows(batch: Rows) -> Rows:
  """Rows of the gold responses in the data batch (SFT, SPIN's chosen side)."""
  return {"prompt_tokens": batch["prompt_tokens"], "prompt_mask": batch["prompt_mask"],
          "tokens": batch["response_tokens"], "mask": batch["response_mask"]}


def repeat_rows(rows: Rows, n: int) -> Rows:
  """Each row `n` times in a row (a batch's prompts lined up with their `n` samples)."""
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), rows)


def token_key(tokens: jax.Array) -> jax.Array:
  """A PRNG key hashed from token ids (a spec's build gets no key): other tokens give other draws,
  the same tokens (a resumed round) the same ones."""
  t = tokens.astype(jnp.uint32)
  pos = jnp.arange(t.size, dtype=jnp.uint32).reshape(t.shape)
  return jax.random.fold_in(jax.random.key(0), jnp.sum(t * (pos * jnp.uint32(2654435761) + 1)))


def concat_rows(a: Rows, b: Rows) -> Rows:
  """The rows of `a`, then those of `b` (same keys and widths)."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def map_chunks(fn, rows: Rows, num_chunks: int):
  """`fn(rows)` run over `num_chunks` chunks of rows in sequence (`lax.map`), outputs (any pytree
  with a leading row axis) put back in row order; chunk j takes rows j, j + num_chunks, ... as
  `completion_logprobs(num_chunks=...)` does. One chunk when `num_chunks` does not divide."""
  r = jax.tree.leaves(rows)[0].shape[0]
  if num_chunks <= 1 or r % num_chunks:
    return fn(rows)
  split = lambda x: x.reshape((r // num_chunks, num_chunks) + x.shape[1:]).swapaxes(0, 1)
  out = jax.lax.map(fn, jax.tree.map(split, rows))
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape((r,) + y.shape[2:]), out)


def pad_right(x: jax.Array, width: int, value=0) -> jax.Array:
  """Right-pads [R, T] to [R, width]."""
  return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def left_pad_to(tokens, mask, width: int, pad_id: int = 0):
  """Left-pads [R, T] tokens / mask to [R, width]."""
  extra = width - tokens.shape[1]
  return (jnp.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
          jnp.pad(mask, ((0, 0), (extra, 0))))


def _pack(tokens: jax.Array, mask: jax.Array, pad_id: int, to_right: bool):
  """Moves each row's masked tokens to one end, in order; the padding goes to the other."""
  keep = mask.astype(bool)
  order = jnp.argsort(keep if to_right else ~keep, axis=1, stable=True)
  tokens = jnp.take_along_axis(tokens, order, axis=1)
  mask = jnp.take_along_axis(mask, order, axis=1)
  return jnp.where(mask, tokens, pad_id), mask


def left_pack(tokens: jax.Array, mask: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Moves each row's masked tokens to the right end, in order (left padding): [R, T]."""
  return _pack(tokens, mask, pad_id, to_right=True)


def right_pack(tokens: jax.Array, mask: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Moves each row's masked tokens to the left end, in order (right padding): [R, T]."""
  return _pack(tokens, mask, pad_id, to_right=False)


def stack_pairs(chosen: Rows, rejected: Rows, weight: jax.Array) -> Rows:
  """Pair rows [P, 2, ...] from two row sets of equal prompt width (completions padded to one
  width); `weight` [P] (0 = no pair)."""
  width = max(chosen["tokens"].shape[1], rejected["tokens"].shape[1])
  rows = {}
  for key in ROW_KEYS:
    c, r = chosen[key], rejected[key]
    if key in ("tokens", "mask"):
      c, r = pad_right(c, width), pad_right(r, width)
    rows[key] = jnp.stack([c, r], axis=1)
  rows["weight"] = weight.astype(jnp.float32)
  return rows
