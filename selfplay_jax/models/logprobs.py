"""The training forward: log-probabilities of completions given prompts, under a model's params.

Every loss, frozen pass (old / reference log-probs) and log-likelihood scorer reads completions
through `completion_logprobs`, so the training forward is defined once, next to the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfplay_jax.models import decoder
from selfplay_jax.models.config import ModelConfig
from selfplay_jax.rows import ROW_KEYS as _KEYS
from selfplay_jax.rows import Rows


def completion_logprobs(config: ModelConfig, params, rows: Rows, num_chunks: int = 1) -> jax.Array:
  """log pi(completion token | prefix) for each completion position: float32 [R, N].

  `rows` holds `prompt_tokens/prompt_mask` [R, P] (left-padded) and `tokens/mask` [R, N]. Rows with
  an extra completion axis ([R, K, ...], e.g. K = 2 for a preference pair) give [R, K, N].

  `num_chunks > 1` (when it divides R) runs the forward pass over that many chunks of rows in
  sequence (`lax.map`), so only one chunk's [rows, length, vocab] logits exist at a time: the
  frozen old / reference passes over a whole round's samples would otherwise hold the largest
  buffer of the round at 100k+ vocabularies. Chunk j takes rows j, j + num_chunks, ..., so each
  chunk keeps the rows' split over the batch mesh axes (no data moves between devices).
  """
  if rows["tokens"].ndim == 3:
    flat = {k: rows[k].reshape((-1,) + rows[k].shape[2:]) for k in _KEYS}
    return completion_logprobs(config, params, flat, num_chunks).reshape(rows["tokens"].shape)
  r = rows["tokens"].shape[0]
  if num_chunks > 1 and r % num_chunks == 0:
    chunked = {k: rows[k].reshape((r // num_chunks, num_chunks) + rows[k].shape[1:]).swapaxes(0, 1)
               for k in _KEYS}
    out = jax.lax.map(lambda chunk: completion_logprobs(config, params, chunk), chunked)
    return out.swapaxes(0, 1).reshape((r,) + out.shape[2:])
  prompt_len = rows["prompt_tokens"].shape[1]
  tokens = jnp.concatenate([rows["prompt_tokens"], rows["tokens"]], axis=1)
  # Every completion slot is segment 1 (padding after the stop token too, so positions stay
  # contiguous; it is masked in the losses); only prompt padding is segment 0.
  segments = jnp.concatenate([rows["prompt_mask"], jnp.ones_like(rows["mask"])],
                             axis=1).astype(jnp.int32)
  logits = decoder.forward(config, params, tokens[:, :-1], segment_ids=segments[:, :-1])
  logits = logits[:, prompt_len - 1:].astype(jnp.float32)
  target = jnp.take_along_axis(logits, rows["tokens"][..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target - jax.nn.logsumexp(logits, axis=-1)
