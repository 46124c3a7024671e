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


def completion_logprobs(config: ModelConfig, params, rows: Rows, num_chunks: int = 1,
                        temperature: float = 1.0) -> jax.Array:
  """log pi(completion token | prefix) for each completion position: float32 [R, N].

  `temperature` T: the log-probs of softmax(logits / T), the distribution the sampler drew from
  (before top-k / top-p), as TRL's GRPO computes its training, old and reference log-probs; the
  policy-gradient specs pass `sampling.temperature` (1 when greedy), everything else T = 1.

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
    return completion_logprobs(config, params, flat, num_chunks,
                               temperature).reshape(rows["tokens"].shape)
  r = rows["tokens"].shape[0]
  if num_chunks > 1 and r % num_chunks == 0:
    chunked = {k: rows[k].reshape((r // num_chunks, num_chunks) + rows[k].shape[1:]).swapaxes(0, 1)
               for k in _KEYS}
    out = jax.lax.map(lambda chunk: completion_logprobs(config, params, chunk,
                                                        temperature=temperature), chunked)
    return out.swapaxes(0, 1).reshape((r,) + out.shape[2:])
  logits = _completion_logits(config, params, rows, temperature)
  target = jnp.take_along_axis(logits, rows["tokens"][..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target - jax.nn.logsumexp(logits, axis=-1)


def completion_logprobs_and_entropy(config: ModelConfig, params, rows: Rows,
                                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`(logp [R, N], entropy [R, N])` from one forward pass: `completion_logprobs` and the entropy
  `−Σ_v p_v log p_v` of p = softmax(logits / T) at each completion position (float32; a training
  forward for entropy bonuses and entropy masks, so rows are [R, ...] and unchunked)."""
  logits = _completion_logits(config, params, rows, temperature)
  logp_V = jax.nn.log_softmax(logits, axis=-1)
  target = jnp.take_along_axis(logp_V, rows["tokens"][..., None].astype(jnp.int32), axis=-1)[..., 0]
  p_V = jnp.exp(logp_V)
  entropy = -jnp.sum(p_V * jnp.where(p_V > 0, logp_V, 0.0), axis=-1)
  return target, entropy


def completion_self_certainty(config: ModelConfig, params, rows: Rows,
                              vocab_size: int | None = None, num_chunks: int = 1) -> jax.Array:
  """Self-certainty (INTUITOR, Zhao et al. 2025) at each completion position: float32 [R, N],
  `KL(U || p) = −log V − (1/V) Σ_{j<V} log p_j`, p = softmax(logits) (T = 1) given the prefix,
  U uniform over the first `vocab_size` = V ids (None: all of the model's rows). With a padded
  embedding, pass the tokenizer's real vocabulary: U then covers only ids a token can have, while
  p stays the whole softmax the sampler draws from. Computed as `logsumexp(logits) − mean_{j<V}
  logits_j − log V`, so no [R, N, V] array beyond the logits exists. `num_chunks`: as
  `completion_logprobs` (rows j, j + num_chunks, ... per chunk, one chunk's logits at a time)."""
  r = rows["tokens"].shape[0]
  if num_chunks > 1 and r % num_chunks == 0:
    chunked = {k: rows[k].reshape((r // num_chunks, num_chunks) + rows[k].shape[1:]).swapaxes(0, 1)
               for k in _KEYS}
    out = jax.lax.map(lambda chunk: completion_self_certainty(config, params, chunk, vocab_size),
                      chunked)
    return out.swapaxes(0, 1).reshape((r,) + out.shape[2:])
  logits = _completion_logits(config, params, rows, 1.0)
  v = logits.shape[-1] if vocab_size is None else vocab_size
  if not 0 < v <= logits.shape[-1]:
    raise ValueError(f"vocab_size {v} must be in [1, {logits.shape[-1]}] (the model's rows)")
  return jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits[..., :v], axis=-1) - jnp.log(v)


def _completion_logits(config: ModelConfig, params, rows: Rows, temperature: float) -> jax.Array:
  """float32 logits / T [R, N, V] scoring each completion token (position t scores token t)."""
  prompt_len = rows["prompt_tokens"].shape[1]
  tokens = jnp.concatenate([rows["prompt_tokens"], rows["tokens"]], axis=1)
  # Every completion slot is segment 1 (padding after the stop token too, so positions stay
  # contiguous; it is masked in the losses); only prompt padding is segment 0.
  segments = jnp.concatenate([rows["prompt_mask"], jnp.ones_like(rows["mask"])],
                             axis=1).astype(jnp.int32)
  logits = decoder.forward(config, params, tokens[:, :-1], segment_ids=segments[:, :-1])
  logits = logits[:, prompt_len - 1:].astype(jnp.float32)
  return logits if temperature == 1.0 else logits / temperature
