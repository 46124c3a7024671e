"""LoRA adapters on the decoder's projections: `W x  ->  W x + (alpha / rank) * B (A x)`.

The adapters are ordinary parameters of the attention and MLP modules, beside the weight they
adapt, in the weight's own einsum layout:

  q/k/v  W [embed, heads, head_dim]:  <p>_lora_a [embed, r],         <p>_lora_b [r, heads, head_dim]
  o      W [heads, head_dim, embed]:  o_lora_a [heads, head_dim, r], o_lora_b [r, embed]
  MLP    W [in, out]:                 <p>_lora_a [in, r],            <p>_lora_b [r, out]

(with `scan_layers`, a leading layer axis on each). A is initialised like peft's
(uniform, bound 1 / sqrt(fan_in)), B with zeros, so a fresh adapter leaves the model unchanged.
They carry logical axis names (the weight's, `None` on the rank axis), so they shard with the
model. A params tree with the adapters applies them; the same tree without them is the base model
(`forward` runs whatever the tree holds).

Which pieces of the code know about LoRA, and what they do (each with a function here):
  round.init_state / train_steps  differentiate and optimise `trainable(params)` (the adapters)
                                  only, the base a constant (`split` / `join`); the reference
                                  slot holds adapters only (`full` rebuilds the reference model)
  train.py / setup.Run.restore    checkpoints hold `saved_state(state)` (no base weights); a
                                  restore re-reads the base (`model.hf_path` or the seed's init)
  export.py                       `merged(params, config)`: W + alpha/rank * A @ B, HF layout
  plan.py                         `num_adapter_params(config)`

Why not qwix (0.1.8, installed): its linen interception does not work on this decoder. Its
einsum path sets an attribute on the (frozen) linen module (`SetAttributeFrozenModuleError` on
q_proj's "btd,dnh->btnh"); its dot_general path finds the weight by matching the module's params
against the operand, which left up_proj and every layer after the first without an adapter; and
under `nn.scan` the interceptor leaks tracers (`UnexpectedTracerError`). Explicit adapters are a
few lines in `decoder.py` and work unrolled, scanned and rematerialised alike.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from selfplay_jax.errors import ConfigError
from selfplay_jax.models.config import ModelConfig

# Hugging Face (peft) names of the projections that take adapters -> our kernel prefix.
TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
           "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_SUFFIXES = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig(ModelConfig):
  """A `ModelConfig` whose decoder carries LoRA adapters (`with_lora`). The architecture fields
  are the base model's; these three say where the adapters are and how they scale."""

  lora_rank: int = 0  # adapter rank r
  lora_alpha: float = 16.0  # the update is scaled by alpha / r
  lora_targets: tuple[str, ...] = ()  # projection names (TARGETS keys) that take adapters

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank


def resolve_targets(patterns: Sequence[str], key: str = "model.lora.targets") -> tuple[str, ...]:
  """The projection names (in TARGETS order) fully matched by any of `patterns` (regexes).
  A bad regex or a pattern that matches no projection is a ConfigError naming it."""
  if isinstance(patterns, str) or not patterns:
    raise ConfigError(f"{key}: must be a non-empty list of patterns over {list(TARGETS)}, "
                      f"got {patterns!r}")
  chosen = set()
  for pattern in patterns:
    try:
      hits = {name for name in TARGETS if re.fullmatch(str(pattern), name)}
    except re.error as e:
      raise ConfigError(f"{key}: {pattern!r} is not a regular expression ({e})") from None
    if not hits:
      raise ConfigError(f"{key}: {pattern!r} matches none of the projections {list(TARGETS)}")
    chosen |= hits
  return tuple(name for name in TARGETS if name in chosen)


def with_lora(config: ModelConfig, rank: int, alpha: float, targets: Sequence[str]) -> ModelConfig:
  """`config` with adapters of `rank` on the projections `targets` matches (rank 0: unchanged)."""
  if rank == 0:
    return base_config(config)
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)}
  return LoraConfig(**fields, lora_rank=int(rank), lora_alpha=float(alpha),
                    lora_targets=resolve_targets(targets))


def base_config(config: ModelConfig) -> ModelConfig:
  """The architecture alone (a plain ModelConfig): what config.json describes."""
  if type(config) is ModelConfig:
    return config
  return ModelConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ModelConfig)})


def enabled(config: ModelConfig) -> bool:
  return getattr(config, "lora_rank", 0) > 0


def targets_of(config: ModelConfig) -> tuple[str, ...]:
  """Our kernel prefixes ("q", "gate", ...) that take adapters under `config`."""
  return tuple(TARGETS[t] for t in getattr(config, "lora_targets", ())) if enabled(config) else ()


def num_adapter_params(config: ModelConfig) -> int:
  """Adapter parameters: r * (fan_in + fan_out) per adapted projection and layer."""
  if not enabled(config):
    return 0
  d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
  q, kv = config.num_heads * hd, config.num_kv_heads * hd
  dims = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
          "down": (f, d)}
  per_layer = sum(sum(dims[t]) for t in targets_of(config))
  return config.lora_rank * per_layer * config.num_layers


# ---- params trees ---------------------------------------------------------------------------------


def is_adapter(name: str) -> bool:
  return isinstance(name, str) and name.endswith(_SUFFIXES)


def _partition(tree: Mapping, take) -> tuple[dict, dict]:
  yes, no = {}, {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      a, b = _partition(value, take)
      if a:
        yes[key] = a
      if b:
        no[key] = b
    elif take(key):
      yes[key] = value
    else:
      no[key] = value
  return yes, no


def has_adapters(params: Any) -> bool:
  return isinstance(params, Mapping) and bool(_partition(params, is_adapter)[0])


def split(params: Any) -> tuple[Any, Any]:
  """(trainable, frozen): the adapters and the base weights when `params` holds adapters, else
  (params, None) (full fine-tuning: everything trains)."""
  if not has_adapters(params):
    return params, None
  return _partition(params, is_adapter)


def join(trainable: Any, frozen: Any) -> Any:
  """Inverse of `split`: one params tree again."""
  if frozen is None:
    return trainable
  out = dict(frozen)
  for key, value in trainable.items():
    out[key] = join(value, out[key]) if isinstance(value, Mapping) and key in out else value
  return out


def trainable(params: Any) -> Any:
  """What the optimizer holds and the reference slots copy: the adapters, or all of `params`."""
  return split(params)[0]


def full(params: Any, slot: Any) -> Any:
  """The model a params-shaped state slot (reference, restart point) stands for: with adapters,
  the slot holds adapters only and shares `params`' base weights; else the slot itself."""
  if slot is None or not has_adapters(params):
    return slot
  return join(slot, split(params)[1])


def saved_state(state: Any) -> Any:
  """A TrainState as checkpoints hold it: without the base weights when it has adapters (the
  base is re-read from `model.hf_path` or re-initialised from the seed on restore)."""
  if not has_adapters(state.params):
    return state
  return state.replace(params=trainable(state.params))


def restored_state(saved: Any, base_params: Any) -> Any:
  """Inverse of `saved_state`: the restored adapters joined with `base_params`' base weights."""
  if not has_adapters(base_params):
    return saved
  return saved.replace(params=join(saved.params, split(base_params)[1]))


def adapter_rng(rng: jax.Array) -> jax.Array:
  """The adapters' own init stream, split from the model's init key."""
  return jax.random.fold_in(rng, 0x10CA)


def new_adapters(config: ModelConfig, rng: jax.Array) -> dict:
  """Freshly initialised adapters of `config` (only the adapters are computed: the base's
  initialisers are dead code in the jitted program)."""
  from selfplay_jax.models import decoder  # pylint: disable=import-outside-toplevel
  tokens = jnp.zeros((1, 1), jnp.int32)
  masks = decoder._attention_masks(config, jnp.ones((1, 1, 1), bool), tokens, tokens)  # pylint: disable=protected-access

  def init():
    variables = decoder.Decoder(config).init(rng, tokens, tokens, masks)
    return split(nn.meta.unbox(variables["params"]))[0]

  return init() if isinstance(rng, jax.core.Tracer) else jax.jit(init)()


# ---- merging --------------------------------------------------------------------------------------


def merged(params: Any, config: ModelConfig) -> Any:
  """Plain params (no adapters) computing what `params` computes under `config`:
  each adapted kernel W becomes W + alpha/rank * A @ B in its own layout, in W's dtype."""
  if not has_adapters(params):
    return params
  scale = config.lora_scale

  def merge_module(node: Mapping) -> dict:
    out = {}
    for key, value in node.items():
      if is_adapter(key):
        continue
      if isinstance(value, Mapping):
        out[key] = merge_module(value)
        continue
      prefix = key[:-len("_kernel")] if key.endswith("_kernel") else None
      if prefix is None or f"{prefix}_lora_a" not in node:
        out[key] = value
        continue
      a, b = np.asarray(node[f"{prefix}_lora_a"], np.float32), np.asarray(node[f"{prefix}_lora_b"],
                                                                          np.float32)
      w = np.asarray(value)
      lead = a.ndim + b.ndim - 2 - w.ndim  # the layer axis under scan_layers
      r = a.shape[-1]
      a2 = a.reshape(a.shape[:lead] + (-1, r))
      b2 = b.reshape(b.shape[:lead] + (r, -1))
      delta = np.matmul(a2, b2).reshape(w.shape)
      out[key] = (w.astype(np.float32) + scale * delta).astype(w.dtype)
    return out

  return merge_module(jax.device_get(params))


def adapter_init(fan_in_axes: int):
  """peft's A init (kaiming-uniform with a=sqrt(5)): uniform in +-1/sqrt(fan_in), fan_in the
  product of the leading `fan_in_axes` dims (the rank axis is last)."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = int(np.prod(shape[:fan_in_axes]))
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init
