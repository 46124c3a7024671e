"""One config-driven Flax linen decoder for Llama, Mistral, Qwen2/3 and Gemma 1/2/3.

Pure functions on top of the module:
  forward(config, params, tokens, positions=None, segment_ids=None) -> float32 logits [B, T, V]
  init_cache(config, batch, max_len) -> KVCache
  decode(config, params, tokens, positions, cache, token_mask=None) -> (logits, KVCache)

The KV cache is an explicit pytree passed in and out (no mutable collections), so the sampler
stays a pure function. Every parameter carries logical axis names for sharding
(`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `norm`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from selfplay_jax.models.config import ModelConfig

_NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked rows stay NaN-free
_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def _dtype(name: str):
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(config: ModelConfig, local: bool) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] (float32), including Llama-3 / linear scaling."""
  dim = config.head_dim
  if local and config.local_rope_theta is not None:
    return 1.0 / (config.local_rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  if config.rope_type == "linear":
    inv = inv / config.rope_factor
  elif config.rope_type == "llama3":
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_positions
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions_BxT: jax.Array, local: bool):
  inv = jnp.asarray(rope_inv_freq(config, local))
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
  """Rotate-half convention (matches Hugging Face checkpoints)."""
  half = x_BxTxNxD.shape[-1] // 2
  x1, x2 = x_BxTxNxD[..., :half], x_BxTxNxD[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_BxTxD[:, :, None, :].astype(x_BxTxNxD.dtype)
  sin = sin_BxTxD[:, :, None, :].astype(x_BxTxNxD.dtype)
  return x_BxTxNxD * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
  eps: float
  plus_one: bool
  dtype: str
  param_dtype: str
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = _param(self, "scale", init, (x.shape[-1],), (self.axis_name,), _dtype(self.param_dtype))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    w = scale.astype(jnp.float32)
    y = y * (1.0 + w) if self.plus_one else y * w
    return y.astype(_dtype(self.dtype))


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, cos_sin, mask_BxTxS, kv=None, write_index=None):
    c = self.config
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    d, h, kvh, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

    def proj(name, heads, axes):
      w = _param(self, f"{name}_kernel", _KERNEL_INIT, (d, heads, hd), ("embed",) + axes, pdt)
      y = jnp.einsum("btd,dnh->btnh", x_BxTxD, w.astype(dt))
      if c.qkv_bias:
        b = _param(self, f"{name}_bias", nn.initializers.zeros, (heads, hd), axes, pdt)
        y = y + b.astype(dt)
      return y

    q = proj("q", h, ("heads", "head_dim"))
    k = proj("k", kvh, ("kv_heads", "head_dim"))
    v = proj("v", kvh, ("kv_heads", "head_dim"))
    if c.qk_norm:
      q = RMSNorm(c.norm_eps, c.norm_plus_one, c.dtype, c.param_dtype, "head_dim", name="q_norm")(q)
      k = RMSNorm(c.norm_eps, c.norm_plus_one, c.dtype, c.param_dtype, "head_dim", name="k_norm")(k)
    cos, sin = cos_sin
    q = apply_rope(q, cos, sin)
    # Keys and values as [B, kv_heads, S, head_dim]: the cache layout, chosen so that a decode step
    # reads the cache in place (no per-step relayout of the whole cache for the attention dots).
    k = apply_rope(k, cos, sin).transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)

    if kv is not None:  # decode: write the new keys/values into the cache, attend over all slots
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), write_index, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), write_index, axis=2)
      new_kv = (k, v)
    else:
      new_kv = None

    b, t = q.shape[:2]
    q = q.reshape(b, t, kvh, h // kvh, hd)
    logits = jnp.einsum("btkgh,bksh->bkgts", q, k.astype(dt), preferred_element_type=jnp.float32)
    logits = logits * c.attn_scale
    if c.attn_logit_softcap:
      logits = jnp.tanh(logits / c.attn_logit_softcap) * c.attn_logit_softcap
    logits = jnp.where(mask_BxTxS[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v.astype(dt)).reshape(b, t, h, hd)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads",
                                           "head_dim"))
    wo = _param(self, "o_kernel", _KERNEL_INIT, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
    y = jnp.einsum("btnh,nhd->btd", out, wo.astype(dt))
    if c.o_bias:
      y = y + _param(self, "o_bias", nn.initializers.zeros, (d,), ("embed",), pdt).astype(dt)
    return y, new_kv


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    d, f = c.hidden_size, c.intermediate_size

    def dense(name, shape, axes, inp):
      y = inp @ _param(self, f"{name}_kernel", _KERNEL_INIT, shape, axes, pdt).astype(dt)
      if c.mlp_bias:
        y = y + _param(self, f"{name}_bias", nn.initializers.zeros, shape[-1:], axes[-1:], pdt).astype(dt)
      return y

    gate = dense("gate", (d, f), ("embed", "mlp"), x)
    up = dense("up", (d, f), ("embed", "mlp"), x)
    if c.activation == "silu":
      act = jax.nn.silu(gate)
    else:
      act = jax.nn.gelu(gate, approximate=c.activation == "gelu_tanh")
    hidden = nn.with_logical_constraint(act * up, ("activation_batch", "activation_length", "activation_mlp"))
    return dense("down", (f, d), ("mlp", "embed"), hidden)


class DecoderLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos_sin, mask, kv=None, write_index=None):
    c = self.config
    norm = functools.partial(RMSNorm, c.norm_eps, c.norm_plus_one, c.dtype, c.param_dtype)
    h = norm(name="pre_attn_norm")(x)
    h, new_kv = Attention(c, name="attn")(h, cos_sin, mask, kv, write_index)
    if c.post_norms:
      h = norm(name="post_attn_norm")(h)
    x = x + h
    h = MLP(c, name="mlp")(norm(name="pre_mlp_norm")(x))
    if c.post_norms:
      h = norm(name="post_mlp_norm")(h)
    x = x + h
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, new_kv


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nn.Module):
  """Embeds tokens, runs the layers, returns float32 logits (and the updated KV cache)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, masks, kv_cache=None, write_index=None):
    c = self.config
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    embedding = _param(self, "embedding", _KERNEL_INIT, (c.vocab_size, c.hidden_size),
                       ("vocab", "embed"), pdt)
    x = jnp.take(embedding, tokens_BxT, axis=0).astype(dt)
    if c.embed_scale:
      x = x * jnp.asarray(c.hidden_size**0.5, dt)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    rope = {"full": rope_cos_sin(c, positions_BxT, local=False)}
    if "sliding" in c.resolved_layer_types:
      rope["sliding"] = rope_cos_sin(c, positions_BxT, local=True)

    layer_cls = DecoderLayer
    if c.remat != "none":
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[c.remat])
    new_k, new_v = [], []
    for i, layer_type in enumerate(c.resolved_layer_types):
      kv = None if kv_cache is None else (kv_cache[0][i], kv_cache[1][i])
      x, layer_kv = layer_cls(c, name=f"layers_{i}")(x, rope[layer_type], masks[layer_type], kv,
                                                      write_index)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])

    x = RMSNorm(c.norm_eps, c.norm_plus_one, c.dtype, c.param_dtype, name="final_norm")(x)
    if c.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dt), preferred_element_type=jnp.float32)
    else:
      head = _param(self, "lm_head", _KERNEL_INIT, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pdt)
      logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
    if c.final_logit_softcap:
      logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
    new_cache = (tuple(new_k), tuple(new_v)) if kv_cache is not None else None
    return logits, new_cache


# ----------------------------------------------------------------------------------------------
# Masks


def _attention_masks(config: ModelConfig, base_BxTxS, q_pos_BxT, k_pos_BxS) -> dict:
  masks = {"full": base_BxTxS}
  if "sliding" in config.resolved_layer_types:
    dist = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
    masks["sliding"] = base_BxTxS & (dist < config.sliding_window)
  return masks


def default_positions(segment_ids_BxT: jax.Array) -> jax.Array:
  """Position of each token within its segment (0-based); padding (segment 0) gets 0."""
  t = segment_ids_BxT.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BxT.shape)
  prev = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jnp.where(segment_ids_BxT != prev, idx, 0)
  first = jax.lax.cummax(starts, axis=1)
  return jnp.where(segment_ids_BxT != 0, idx - first, 0)


# ----------------------------------------------------------------------------------------------
# Public functional API


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Randomly initialised parameters (plain arrays, `param_dtype`)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  masks = _attention_masks(config, jnp.ones((1, 1, 1), bool), tokens, tokens)
  variables = Decoder(config).init(rng, tokens, tokens, masks)
  return nn.meta.unbox(variables["params"])


def logical_axes(config: ModelConfig):
  """Pytree (same structure as params) of `PartitionSpec`s over logical axis names."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  masks = _attention_masks(config, jnp.ones((1, 1, 1), bool), tokens, tokens)
  abstract = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens, tokens, masks))
  return nn.get_partition_spec(abstract)["params"]


@functools.partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params, tokens, positions=None, segment_ids=None) -> jax.Array:
  """Full causal forward pass. Returns float32 logits [B, T, V].

  `segment_ids` (int [B, T]) marks packed sequences; 0 marks padding (never attended to).
  `positions` default to each token's index within its segment.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  if positions is None:
    positions = default_positions(segment_ids)
  positions = jnp.asarray(positions, jnp.int32)
  t = tokens.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
  masks = _attention_masks(config, causal & same, positions, positions)
  logits, _ = Decoder(config).apply({"params": params}, tokens, positions, masks)
  return logits


@flax.struct.dataclass
class KVCache:
  """Explicit decode cache. k, v: per-layer tuples of [B, kv_heads, S, head_dim];
  pos: [B, S] position held by each slot (-1 = empty or padding); index: next slot to write."""

  k: tuple
  v: tuple
  pos: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.pos.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                 pos=jnp.full((batch, max_len), -1, jnp.int32), index=jnp.zeros((), jnp.int32))


def decode(config: ModelConfig, params, tokens, positions, cache: KVCache, token_mask=None):
  """Runs T new tokens through the model, appending them to the cache at `cache.index`.

  Used both for prefill (T = prompt length) and for each decode step (T = 1). Tokens with
  `token_mask == False` (e.g. left padding) are written but never attended to.
  Returns (float32 logits [B, T, V], updated cache).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  positions = jnp.asarray(positions, jnp.int32)
  if token_mask is None:
    token_mask = jnp.ones(tokens.shape, bool)
  slot_pos = jnp.where(token_mask, positions, -1)
  k_pos = jax.lax.dynamic_update_slice_in_dim(cache.pos, slot_pos, cache.index, axis=1)
  base = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= positions[:, :, None])
  masks = _attention_masks(config, base, positions, k_pos)
  logits, (k, v) = Decoder(config).apply({"params": params}, tokens, positions, masks,
                                         (cache.k, cache.v), cache.index)
  new_cache = KVCache(k=k, v=v, pos=k_pos, index=cache.index + tokens.shape[1])
  return logits, new_cache
