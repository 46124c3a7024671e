"""One config-driven Flax linen decoder for Llama, Mistral, Qwen2/3 and Gemma 1/2/3.

Pure functions on top of the module:
  forward(config, params, tokens, positions=None, segment_ids=None) -> float32 logits [B, T, V]
  init_cache(config, batch, max_len) -> KVCache
  decode(config, params, tokens, positions, cache, token_mask=None) -> (logits, KVCache)
  stack_layers(params, config) / unstack_layers(params, config)  # layouts of `scan_layers`

The KV cache is an explicit pytree passed in and out (no mutable collections), so the sampler
stays a pure function. Every parameter carries logical axis names for sharding
(`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `norm`).

Layers are `layers_0` ... `layers_{L-1}`, one Python-unrolled call each; with
`config.scan_layers` they are one `layers` entry whose leaves have a leading layer axis (logical
name `layers`), run by `nn.scan`, so the compiled program does not grow with depth. The per-layer
differences (sliding or full attention, Gemma 3's local RoPE base) are then scanned inputs.

With a LoRA config (`models/lora.py`) the projections named by `lora_targets` get adapters
(`<p>_lora_a`, `<p>_lora_b`) beside their kernels; a params tree without them runs the base model.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from selfplay_jax.models import lora
from selfplay_jax.models.config import ModelConfig

_NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked rows stay NaN-free
_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def _dtype(name: str):
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _lora(module: nn.Module, prefix: str, x, in_shape, in_axes, out_shape, out_axes, down: str,
          up: str):
  """The LoRA update `alpha/r * B(A x)` of kernel `<prefix>_kernel` (`models/lora.py`), or None
  when `prefix` takes no adapter or the params tree holds none (then this is the base model).
  `down` / `up`: the einsums x, A -> [.., r] and [.., r], B -> output."""
  c = module.config
  if prefix not in lora.targets_of(c):
    return None
  if not module.is_initializing() and not module.has_variable("params", f"{prefix}_lora_a"):
    return None
  dt, pdt, r = _dtype(c.dtype), _dtype(c.param_dtype), c.lora_rank
  a = _param(module, f"{prefix}_lora_a", lora.adapter_init(len(in_shape)), tuple(in_shape) + (r,),
             tuple(in_axes) + (None,), pdt)
  b = _param(module, f"{prefix}_lora_b", nn.initializers.zeros, (r,) + tuple(out_shape),
             (None,) + tuple(out_axes), pdt)
  h = jnp.einsum(down, x, a.astype(dt))
  return jnp.einsum(up, h, b.astype(dt)) * jnp.asarray(c.lora_scale, dt)


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
  def __call__(self, x_BxTxD, cos_sin, mask_BxTxS, kv=None, write_index=None, layer_index=None):
    """`kv`: this layer's cache (k, v) [B, K, S, H]; with `layer_index`, the stacked cache of all
    layers [B, L, K, S, H], of which only this layer's slots are written and read."""
    c = self.config
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    d, h, kvh, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

    def proj(name, heads, axes):
      w = _param(self, f"{name}_kernel", _KERNEL_INIT, (d, heads, hd), ("embed",) + axes, pdt)
      y = jnp.einsum("btd,dnh->btnh", x_BxTxD, w.astype(dt))
      if c.qkv_bias:
        b = _param(self, f"{name}_bias", nn.initializers.zeros, (heads, hd), axes, pdt)
        y = y + b.astype(dt)
      delta = _lora(self, name, x_BxTxD, (d,), ("embed",), (heads, hd), axes, "btd,dr->btr",
                    "btr,rnh->btnh")
      return y if delta is None else y + delta

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

    b, t = q.shape[:2]
    if kv is not None:
      # Decode / prefill: attend over the cache as it was (a loop-carried buffer with a fixed
      # layout, so XLA fits the attention dot to it) plus the new keys and values, and write those
      # into the cache for the next steps (`_write_cache`, below). Attending over the updated
      # cache instead let XLA:CPU pick a transposed layout for it and re-lay out the whole K
      # cache on every decode step (tests/test_sampling.py checks the decode loop's HLO).
      start = jnp.clip(jnp.asarray(write_index, jnp.int32), 0, mask_BxTxS.shape[-1] - t)
      if layer_index is None:
        old = kv
      else:  # the stacked cache [B, L, K, S, H]: this layer's slots
        old = tuple(jax.lax.dynamic_index_in_dim(cache, jnp.asarray(layer_index, jnp.int32), axis=1,
                                                 keepdims=False) for cache in kv)
      slots = jnp.arange(mask_BxTxS.shape[-1])
      stale = (slots >= start) & (slots < start + t)  # the slots being written: old contents
      parts = [(old[0], old[1], mask_BxTxS & ~stale),
               (k.astype(old[0].dtype), v.astype(old[1].dtype),  # as the cache holds them
                jax.lax.dynamic_slice_in_dim(mask_BxTxS, start, t, axis=2))]
    else:
      parts = [(k, v, mask_BxTxS)]

    q = q.reshape(b, t, kvh, h // kvh, hd)
    logits = jnp.concatenate(
        [jnp.einsum("btkgh,bksh->bkgts", q, pk.astype(dt), preferred_element_type=jnp.float32)
         for pk, _, _ in parts], axis=-1)
    mask = jnp.concatenate([pm for _, _, pm in parts], axis=-1)
    logits = logits * c.attn_scale
    if c.attn_logit_softcap:
      logits = jnp.tanh(logits / c.attn_logit_softcap) * c.attn_logit_softcap
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    # The output projection is one 2-D matmul [B * T, heads * H] @ [heads * H, D] on the o kernel
    # viewed as [heads * H, D] (a reshape, no copy); the attention output is transposed to
    # [B, T, heads, H] first (activations only). An einsum "btnh,nhd->btd" on the 3-D kernel made
    # XLA:CPU re-lay out the whole kernel, and computing the attention output directly in
    # [B, T, ...] order the V cache, on every decode step (tests/test_sampling.py checks the
    # decode loop's HLO for both).
    bounds = np.cumsum([pk.shape[2] for pk, _, _ in parts])[:-1].tolist()
    out = sum(jnp.einsum("bkgts,bksh->bkgth", pp, pv.astype(dt))
              for pp, (_, pv, _) in zip(jnp.split(probs, bounds, axis=-1), parts))
    new_kv = None if kv is None else _write_cache(kv, (k, v), start, layer_index)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads",
                                           "head_dim"))
    wo = _param(self, "o_kernel", _KERNEL_INIT, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
    y = (out.reshape(b * t, h * hd) @ wo.astype(dt).reshape(h * hd, d)).reshape(b, t, d)
    if c.o_bias:
      y = y + _param(self, "o_bias", nn.initializers.zeros, (d,), ("embed",), pdt).astype(dt)
    delta = _lora(self, "o", out, (h, hd), ("heads", "head_dim"), (d,), ("embed",),
                  "btnh,nhr->btr", "btr,rd->btd")
    if delta is not None:
      y = y + delta
    return y, new_kv


def _write_cache(kv, new, start, layer_index):
  """`new` (k, v) [B, K, T, H] written into the cache `kv` at slot `start` (this layer's slots of a
  stacked cache [B, L, K, S, H] when `layer_index` is given)."""
  if layer_index is None:
    return tuple(jax.lax.dynamic_update_slice_in_dim(cache, x.astype(cache.dtype), start, axis=2)
                 for cache, x in zip(kv, new))
  zero = jnp.zeros((), jnp.int32)
  index = (zero, jnp.asarray(layer_index, jnp.int32), zero, start, zero)
  return tuple(jax.lax.dynamic_update_slice(cache, x[:, None].astype(cache.dtype), index)
               for cache, x in zip(kv, new))


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
      delta = _lora(self, name, inp, shape[:1], axes[:1], shape[1:], axes[1:], "ni,ir->nr",
                    "nr,ro->no")
      return y if delta is None else y + delta

    # The matmuls run on [batch * length, features] operands: XLA:CPU otherwise fuses the gate's
    # backward with a transpose of the 3-D gradient into a slow copy (measured: GRPO forward +
    # backward 1.17 s -> 0.81 s on a width-256 model, gradients bit-identical).
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    gate = dense("gate", (d, f), ("embed", "mlp"), x2)
    up = dense("up", (d, f), ("embed", "mlp"), x2)
    if c.activation == "silu":
      act = jax.nn.silu(gate)
    else:
      act = jax.nn.gelu(gate, approximate=c.activation == "gelu_tanh")
    hidden = nn.with_logical_constraint((act * up).reshape(lead + (f,)),
                                        ("activation_batch", "activation_length", "activation_mlp"))
    return dense("down", (f, d), ("mlp", "embed"), hidden.reshape(-1, f)).reshape(lead + (d,))


class DecoderLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos_sin, mask, kv=None, write_index=None, layer_index=None):
    c = self.config
    norm = functools.partial(RMSNorm, c.norm_eps, c.norm_plus_one, c.dtype, c.param_dtype)
    h = norm(name="pre_attn_norm")(x)
    h, new_kv = Attention(c, name="attn")(h, cos_sin, mask, kv, write_index, layer_index)
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
  """Embeds tokens, runs the layers, returns float32 logits (and the updated KV cache).
  `return_hidden`: the logits come as (logits, final hidden states after the final norm
  [B, T, D]), for heads on the trunk (PPO's value head)."""

  config: ModelConfig
  return_hidden: bool = False

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
    if c.remat != "none":  # under scan the loop already stops XLA merging recompute away (no CSE guard)
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      x, new_cache = _scan_layers(layer_cls(c, name="layers"), x, rope, masks, kv_cache, write_index)
    else:
      new_k, new_v = [], []
      for i, layer_type in enumerate(c.resolved_layer_types):
        kv = None if kv_cache is None else (kv_cache[0][i], kv_cache[1][i])
        x, layer_kv = layer_cls(c, name=f"layers_{i}")(x, rope[layer_type], masks[layer_type], kv,
                                                        write_index)
        if layer_kv is not None:
          new_k.append(layer_kv[0])
          new_v.append(layer_kv[1])
      new_cache = (tuple(new_k), tuple(new_v)) if kv_cache is not None else None

    x = RMSNorm(c.norm_eps, c.norm_plus_one, c.dtype, c.param_dtype, name="final_norm")(x)
    if c.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dt), preferred_element_type=jnp.float32)
    else:
      head = _param(self, "lm_head", _KERNEL_INIT, (c.hidden_size, c.vocab_size), ("embed", "vocab"), pdt)
      logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
    if c.final_logit_softcap:
      logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
    if self.return_hidden:
      return (logits, x), new_cache
    return logits, new_cache


def _scan_layers(layer: nn.Module, x, rope: dict, masks: dict, kv_cache, write_index):
  """Runs `layer` (unbound, named "layers") once per layer under `nn.scan`: params get a leading
  layer axis; the stacked KV cache [B, L, K, S, H] rides in the carry and is updated in place.

  Which mask and RoPE table a layer uses is data (a scanned `sliding` flag selecting between
  precomputed ones), so one traced body serves every layer type."""
  c = layer.config
  types = c.resolved_layer_types
  mixed = len(set(types)) > 1
  per_layer = {"index": jnp.arange(c.num_layers, dtype=jnp.int32)}
  if mixed:
    per_layer["sliding"] = jnp.asarray([t == "sliding" for t in types])

  def body(layer, carry, xs, rope, masks, write_index):
    h, kv = carry
    cos_sin, mask = rope[types[0]], masks[types[0]]
    if mixed:  # a select, not a branch: one program for every layer
      mask = jnp.where(xs["sliding"], masks["sliding"], masks["full"])
      if c.local_rope_theta is not None:  # else the two RoPE tables are equal
        cos_sin = tuple(jnp.where(xs["sliding"], s, f) for s, f in zip(rope["sliding"], rope["full"]))
    h, kv = layer(h, cos_sin, mask, kv, write_index, xs["index"] if kv is not None else None)
    return (h, kv), None

  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  (x, new_cache), _ = scan(layer, (x, kv_cache), per_layer, rope, masks, write_index)
  return x, new_cache


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
  """Randomly initialised parameters (plain arrays, `param_dtype`). With LoRA (`models/lora.py`)
  the base weights are those of the base config from the same `rng` and the adapters come from
  their own stream, so adding adapters never changes the base."""
  if lora.enabled(config):
    return lora.join(lora.new_adapters(config, lora.adapter_rng(rng)),
                     init_params(lora.base_config(config), rng))
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


@functools.partial(jax.jit, static_argnums=0, static_argnames="return_hidden")
def forward(config: ModelConfig, params, tokens, positions=None, segment_ids=None,
            return_hidden: bool = False) -> jax.Array:
  """Full causal forward pass. Returns float32 logits [B, T, V]; with `return_hidden`,
  (logits, final hidden states [B, T, D] after the final norm, in `config.dtype`).

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
  out, _ = Decoder(config, return_hidden=return_hidden).apply({"params": params}, tokens,
                                                            positions, masks)
  return out


@flax.struct.dataclass
class KVCache:
  """Explicit decode cache. k, v: per-layer tuples of [B, kv_heads, S, head_dim], or with
  `scan_layers` one stacked array [B, L, kv_heads, S, head_dim] each (batch first, like every
  other leaf); pos: [B, S] position held by each slot (-1 = empty or padding); index: next slot
  to write."""

  k: tuple | jax.Array
  v: tuple | jax.Array
  pos: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.pos.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  if config.scan_layers:
    shape = (batch, config.num_layers) + shape[1:]
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
  else:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=k, v=v, pos=jnp.full((batch, max_len), -1, jnp.int32),
                 index=jnp.zeros((), jnp.int32))


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


# ----------------------------------------------------------------------------------------------
# Parameter layouts


def _layer_names(config: ModelConfig) -> list[str]:
  return [f"layers_{i}" for i in range(config.num_layers)]


def stack_layers(params: dict, config: ModelConfig) -> dict:
  """Unrolled params (`layers_0` ... `layers_{L-1}`) -> the `scan_layers` layout (`layers`, each
  leaf stacked on a new leading axis). Other entries are shared, not copied. NumPy leaves stay
  NumPy (host-side checkpoint conversion); anything else is stacked with `jnp.stack`."""
  names = _layer_names(config)
  found = sorted(k for k in params if k.startswith("layers"))
  if found != sorted(names):
    raise ValueError(f"stack_layers: expected unrolled layers {names[0]} ... {names[-1]} "
                     f"(num_layers={config.num_layers}), found {found}")

  def stack(*leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
      return np.stack(leaves)
    return jnp.stack(leaves)

  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = jax.tree.map(stack, *[params[n] for n in names])
  return out


def unstack_layers(params: dict, config: ModelConfig) -> dict:
  """Inverse of `stack_layers`: the `layers` entry split back into `layers_0` ... `layers_{L-1}`."""
  if "layers" not in params or any(k.startswith("layers_") for k in params):
    raise ValueError(f"unstack_layers: expected one stacked 'layers' entry, found "
                     f"{sorted(k for k in params if k.startswith('layers'))}")
  for path, x in jax.tree_util.tree_leaves_with_path(params["layers"]):
    if np.shape(x)[:1] != (config.num_layers,):
      raise ValueError(f"unstack_layers: layers{jax.tree_util.keystr(path)} has shape "
                       f"{np.shape(x)}; expected a leading axis of num_layers={config.num_layers}")
  out = {k: v for k, v in params.items() if k != "layers"}
  for i, name in enumerate(_layer_names(config)):
    out[name] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out
