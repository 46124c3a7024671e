"""Jitted KV-cache sampler: batched prefill, then a `lax.while_loop` decode.

  sample(config, params, prompt_tokens, prompt_mask, rng, sampling_config) -> Rollout

Pure and jittable (the round engine calls it from inside its own jit). Prompts may be left- or
right-padded: a token's position is the number of real prompt tokens before it, and padding is
never attended to. Each prompt is prefilled once; its cache is then copied for the `n` samples,
which sit next to each other in the output (rows `i * n ... i * n + n - 1` belong to prompt `i`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from selfplay_jax.models import decoder
from selfplay_jax.errors import ConfigError
from selfplay_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How completions are drawn. Hashable: a static argument of the jitted sampler."""

  max_new_tokens: int = 32  # completion budget per row (tokens)
  temperature: float = 1.0  # 0 = greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # nucleus: smallest set with cumulative probability >= top_p; 1 = off
  n: int = 1  # samples per prompt
  eos_ids: tuple[int, ...] = ()  # stop tokens; () = the model config's eos_token_ids
  pad_id: int | None = None  # filler after a row stops; None = model pad id (or 0)

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

  def validate(self, prefix: str = "sampling") -> "SamplingConfig":
    def fail(key, msg):
      raise ConfigError(f"{prefix}.{key}: {msg}" if prefix else f"--{key}: {msg}")

    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      fail("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
    if not self.temperature >= 0:
      fail("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      fail("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      fail("top_p", f"must be in (0, 1], got {self.top_p}")
    if not isinstance(self.n, int) or self.n < 1:
      fail("n", f"must be an integer >= 1, got {self.n!r}")
    return self

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@flax.struct.dataclass
class Rollout:
  """Completions of a batch of prompts; every array has B * n rows."""

  prompt_tokens: jax.Array  # int32 [B*n, P] (the prompts, repeated n times)
  prompt_mask: jax.Array  # bool [B*n, P]
  tokens: jax.Array  # int32 [B*n, N] completion tokens; pad after the stop token
  logprobs: jax.Array  # float32 [B*n, N] log-prob under the sampling distribution (0 if greedy)
  model_logprobs: jax.Array  # float32 [B*n, N] log-prob under the raw model (temperature 1)
  mask: jax.Array  # bool [B*n, N] completion tokens, the stop token included
  lengths: jax.Array  # int32 [B*n] number of completion tokens
  # float32 [B*n, N] entropy of softmax(logits / T) at each sampled position (T = 1 if greedy;
  # before top-k / top-p, as TRL's), 0 after the stop token; None for hand-built rollouts
  entropy: jax.Array | None = None
  # bool [B*n] the row hit max_new_tokens without a stop token; None for hand-built rollouts
  truncated: jax.Array | None = None

  @property
  def num_rows(self) -> int:
    return self.tokens.shape[0]


def process_logits(logits_BxV: jax.Array, sc: SamplingConfig,
                   temperature_B: jax.Array | None = None) -> jax.Array:
  """Temperature, top-k and top-p applied to float32 logits (removed tokens get -inf).
  `temperature_B`: a temperature per row instead of `sc.temperature`."""
  t = sc.temperature if temperature_B is None else temperature_B[:, None]
  logits = logits_BxV.astype(jnp.float32) / t
  if sc.top_k and sc.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sc.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sc.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
    keep = before < sc.top_p  # the top token always stays
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _take(logp_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]


def _entropy(logits_BxV: jax.Array, model_logp_BxV: jax.Array, temperature) -> jax.Array:
  """Entropy of softmax(logits / T) per row, float32 (T = 0, greedy: the model's T = 1, whose
  log-softmax `model_logp_BxV` the step has already computed). `temperature`: a float, or a
  float32 [B] array of per-row temperatures."""
  if isinstance(temperature, jax.Array):
    logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32) / temperature[:, None], axis=-1)
  else:
    logp = model_logp_BxV if temperature in (0, 1) else jax.nn.log_softmax(
        logits_BxV.astype(jnp.float32) / temperature, axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


@flax.struct.dataclass
class _LoopState:
  step: jax.Array
  logits: jax.Array  # [R, V] next-token logits
  positions: jax.Array  # [R] position of the next token
  done: jax.Array  # [R]
  tokens: jax.Array
  logprobs: jax.Array
  model_logprobs: jax.Array
  entropy: jax.Array
  cache: decoder.KVCache
  rng: jax.Array


_CACHE_AXES = {4: ("activation_batch", "activation_kv_heads", "activation_length", None),
               5: ("activation_batch", None, "activation_kv_heads", "activation_length", None)}


def _shard_cache(cache: decoder.KVCache) -> decoder.KVCache:
  """KV cache rows over the batch mesh axes and kv heads over tensor (a no-op without a mesh):
  the cache is the sampler's largest buffer, and each device keeps only its own slice."""
  constrain = lambda x: nn.with_logical_constraint(x, _CACHE_AXES[x.ndim])
  return cache.replace(k=jax.tree.map(constrain, cache.k), v=jax.tree.map(constrain, cache.v),
                       pos=nn.with_logical_constraint(cache.pos, ("activation_batch", None)))


def _repeat_rows(x: jax.Array, n: int) -> jax.Array:
  return x if n == 1 else jnp.repeat(x, n, axis=0)


@functools.partial(jax.jit, static_argnums=(0, 5))
def sample(config: ModelConfig, params, prompt_tokens, prompt_mask, rng, sampling_config: SamplingConfig,
           temperature: jax.Array | None = None) -> Rollout:
  """Samples `n` completions per prompt. See the module docstring.

  `temperature` (optional, float32 [batch]): each prompt's own sampling temperature (all `n` of
  its samples), in place of `sampling_config.temperature`, which must then be > 0 (the greedy
  path is chosen when the program is built). Top-k and top-p still apply.
  """
  sc = sampling_config.validate()
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, bool)
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} must "
                     "both be [batch, prompt_len]")
  batch, prompt_len = prompt_tokens.shape
  rows, steps = batch * sc.n, sc.max_new_tokens
  eos = jnp.asarray(sc.eos_ids or config.eos_token_ids or (-1,), jnp.int32)
  pad_id = sc.pad_id if sc.pad_id is not None else (config.pad_token_id or 0)
  row_temperature = None
  if temperature is not None:
    if sc.greedy:
      raise ValueError("sample(temperature=...) needs sampling_config.temperature > 0 (greedy "
                       "decoding is fixed when the program is built)")
    row_temperature = _repeat_rows(jnp.broadcast_to(
        jnp.asarray(temperature, jnp.float32), (batch,)), sc.n)

  # Prefill each prompt once, then copy its cache for the n samples.
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
  cache = _shard_cache(decoder.init_cache(config, batch, prompt_len + steps))
  logits, cache = decoder.decode(config, params, prompt_tokens, positions, cache, prompt_mask)
  last = jnp.argmax(jnp.where(prompt_mask, jnp.arange(prompt_len), -1), axis=1)
  next_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  cache = _shard_cache(jax.tree.map(lambda x: _repeat_rows(x, sc.n) if x.ndim else x, cache))

  def cond(s: _LoopState):
    return (s.step < steps) & ~jnp.all(s.done)

  def body(s: _LoopState) -> _LoopState:
    rng, key = jax.random.split(s.rng)
    model_logp = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
    if sc.greedy:
      token = jnp.argmax(s.logits, axis=-1).astype(jnp.int32)
      sample_logp = jnp.zeros((rows,), jnp.float32)
    else:
      processed = process_logits(s.logits, sc, row_temperature)
      token = jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
      sample_logp = _take(jax.nn.log_softmax(processed, axis=-1), token)
    active = ~s.done
    token = jnp.where(active, token, pad_id)
    write = lambda buf, value: jax.lax.dynamic_update_index_in_dim(buf, value, s.step, axis=1)
    tokens = write(s.tokens, token)
    logprobs = write(s.logprobs, jnp.where(active, sample_logp, 0.0))
    model_logprobs = write(s.model_logprobs, jnp.where(active, _take(model_logp, token), 0.0))
    entropy = write(s.entropy,
                    jnp.where(active, _entropy(s.logits, model_logp,
                                                      sc.temperature if row_temperature is None
                                                      else row_temperature), 0.0))
    done = s.done | jnp.isin(token, eos)
    logits, cache = decoder.decode(config, params, token[:, None], s.positions[:, None], s.cache,
                                   active[:, None])
    return _LoopState(step=s.step + 1, logits=logits[:, 0], positions=s.positions + 1, done=done,
                      tokens=tokens, logprobs=logprobs, model_logprobs=model_logprobs,
                      entropy=entropy, cache=cache, rng=rng)

  init = _LoopState(
      step=jnp.zeros((), jnp.int32),
      logits=_repeat_rows(next_logits, sc.n),
      positions=_repeat_rows(prompt_mask.sum(axis=1).astype(jnp.int32), sc.n),
      done=jnp.zeros((rows,), bool),
      tokens=jnp.full((rows, steps), pad_id, jnp.int32),
      logprobs=jnp.zeros((rows, steps), jnp.float32),
      model_logprobs=jnp.zeros((rows, steps), jnp.float32),
      entropy=jnp.zeros((rows, steps), jnp.float32),
      cache=cache,
      rng=rng,
  )
  final = jax.lax.while_loop(cond, body, init)
  # A row's completion runs up to and including its first stop token.
  is_eos = jnp.isin(final.tokens, eos)
  first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, steps)
  lengths = jnp.minimum(first_eos, final.step).astype(jnp.int32)
  mask = jnp.arange(steps)[None, :] < lengths[:, None]
  return Rollout(prompt_tokens=_repeat_rows(prompt_tokens, sc.n),
                 prompt_mask=_repeat_rows(prompt_mask, sc.n), tokens=final.tokens,
                 logprobs=final.logprobs, model_logprobs=final.model_logprobs, mask=mask,
                 lengths=lengths, entropy=final.entropy, truncated=~is_eos.any(axis=1))
