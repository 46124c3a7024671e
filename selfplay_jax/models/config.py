"""`ModelConfig`: one frozen, hashable description of every decoder family we support.

The config is a static argument of jitted functions, so every field is a plain hashable value
(tuples, not lists or dicts). Family presets live in `PRESETS`; Hugging Face `config.json`
translation lives in `hf.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from selfplay_jax.errors import ConfigError  # noqa: F401 (re-exported)

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full", "sliding")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")


# Structural traits fixed by each family (Hugging Face semantics). A config that claims a family
# must match them, so that export to that family's `config.json` is exact.
FAMILY_TRAITS: dict[str, dict[str, bool]] = {
    "llama": dict(norm_plus_one=False, post_norms=False, qk_norm=False, embed_scale=False),
    "mistral": dict(norm_plus_one=False, post_norms=False, qk_norm=False, embed_scale=False,
                    qkv_bias=False, o_bias=False, mlp_bias=False),
    "qwen2": dict(norm_plus_one=False, post_norms=False, qk_norm=False, embed_scale=False,
                  qkv_bias=True, o_bias=False, mlp_bias=False),
    "qwen3": dict(norm_plus_one=False, post_norms=False, qk_norm=True, embed_scale=False, mlp_bias=False),
    "gemma": dict(norm_plus_one=True, post_norms=False, qk_norm=False, embed_scale=True, mlp_bias=False),
    "gemma2": dict(norm_plus_one=True, post_norms=True, qk_norm=False, embed_scale=True, mlp_bias=False),
    "gemma3_text": dict(norm_plus_one=True, post_norms=True, qk_norm=True, embed_scale=True,
                        mlp_bias=False),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only LM. Field names follow the transformer literature.

  Families differ only through these fields; `decoder.Decoder` reads nothing else.
  """

  family: str = "llama"  # llama | mistral | qwen2 | qwen3 | gemma | gemma2 | gemma3_text
  vocab_size: int = 256  # embedding rows (token ids); from scratch: the tokenizer's size
  hidden_size: int = 64  # model width, the residual stream ("embed" axis)
  intermediate_size: int = 256  # hidden width of the gated MLP ("mlp" axis)
  num_layers: int = 2  # decoder layers
  num_heads: int = 4  # query heads
  num_kv_heads: int = 2  # grouped-query attention when < num_heads
  head_dim: int = 16  # width of each attention head
  activation: str = "silu"  # gated MLP activation: silu (SwiGLU) | gelu_tanh (GeGLU) | gelu
  norm_eps: float = 1e-6  # RMSNorm epsilon
  norm_plus_one: bool = False  # Gemma RMSNorm: x * (1 + w)
  post_norms: bool = False  # Gemma 2/3: extra norms after attention and MLP (sandwich)
  qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over head_dim on q and k before RoPE
  qkv_bias: bool = False  # Qwen2: bias on q, k, v projections
  o_bias: bool = False  # Llama `attention_bias=True` also biases o_proj
  mlp_bias: bool = False  # bias on the MLP projections
  embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(hidden_size)
  tie_embeddings: bool = False  # output projection = embedding matrix transposed
  rope_theta: float = 10000.0  # RoPE base
  rope_type: str = "default"  # default | linear | llama3
  rope_factor: float = 1.0  # RoPE scaling factor (linear, llama3)
  rope_low_freq_factor: float = 1.0  # llama3 scaling
  rope_high_freq_factor: float = 4.0  # llama3 scaling
  rope_original_max_positions: int = 8192  # llama3 scaling
  local_rope_theta: float | None = None  # Gemma 3: sliding layers use their own (unscaled) RoPE base
  query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma 2/3); else head_dim
  attn_logit_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention logits
  final_logit_softcap: float | None = None  # Gemma 2: tanh soft-capping of output logits
  sliding_window: int | None = None  # window size (tokens, including the current one)
  layer_types: tuple[str, ...] = ()  # per layer "full" | "sliding"; () = all full
  max_position_embeddings: int = 8192  # longest prompt + completion (tokens) the model takes
  bos_token_id: int | None = 1  # begin-of-sequence id, written to an exported config.json
  eos_token_ids: tuple[int, ...] = (2,)  # stop ids (sampling stops at any, with the tokenizer's)
  pad_token_id: int | None = 0  # filler id after a sample stops; None = 0
  # Memory and compile knobs: how the model runs, not what it computes (equal up to float rounding).
  # They apply on top of a Hugging Face config.json (`model.hf_path`); only param_dtype is written
  # to one (as its "dtype"). remat "dots" keeps the weight matmuls' outputs, recomputes the rest.
  dtype: str = "float32"  # compute dtype (activations, matmul inputs); bfloat16 halves activations
  param_dtype: str = "float32"  # storage dtype of params, and so of their grads and Adam moments
  remat: str = "none"  # recompute layers in backward: none | full (keep layer inputs) | dots (+ matmuls)
  scan_layers: bool = False  # params stacked on a leading "layers" axis, run by nn.scan: compile once

  def __post_init__(self):
    # Normalise sequence fields so configs built from JSON (lists) stay hashable.
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

  def replace(self, **kwargs: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  @property
  def resolved_layer_types(self) -> tuple[str, ...]:
    return self.layer_types or ("full",) * self.num_layers

  @property
  def attn_scale(self) -> float:
    base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
    return float(base) ** -0.5

  def num_params(self) -> int:
    """Exact parameter count (used by `plan` and benchmarks)."""
    d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                       self.num_kv_heads, self.head_dim)
    attn = d * h * hd * 2 + d * kv * hd * 2
    if self.qkv_bias:
      attn += (h + 2 * kv) * hd
    if self.o_bias:
      attn += d
    if self.qk_norm:
      attn += 2 * hd
    mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
    norms = d * (4 if self.post_norms else 2)
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * (attn + mlp + norms) + embed + d

  def validate(self, prefix: str = "model") -> "ModelConfig":
    """Raises `ConfigError` naming the first bad key; returns self for chaining."""

    def fail(key: str, msg: str):
      raise ConfigError(f"{prefix}.{key}: {msg}")

    if self.family not in FAMILY_TRAITS:
      fail("family", f"{self.family!r} is not one of {sorted(FAMILY_TRAITS)}")
    for key, want in FAMILY_TRAITS[self.family].items():
      if getattr(self, key) != want:
        fail(key, f"family {self.family!r} requires {key}={want} (got {getattr(self, key)}); "
             "change model.family or this field")
    if self.family != "qwen2" and self.qkv_bias != self.o_bias:
      fail("o_bias", f"family {self.family!r} biases q/k/v and o together (attention_bias); "
           f"got qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(key, f"must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      fail("num_kv_heads", f"{self.num_kv_heads} must divide {prefix}.num_heads={self.num_heads}")
    if self.head_dim % 2:
      fail("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
    if self.activation not in ACTIVATIONS:
      fail("activation", f"{self.activation!r} is not one of {ACTIVATIONS}")
    if self.rope_type not in ROPE_TYPES:
      fail("rope_type", f"{self.rope_type!r} is not one of {ROPE_TYPES}")
    if self.rope_theta <= 0:
      fail("rope_theta", f"must be > 0, got {self.rope_theta}")
    if self.rope_factor <= 0:
      fail("rope_factor", f"must be > 0, got {self.rope_factor}")
    if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      fail("rope_high_freq_factor", "must exceed rope_low_freq_factor for llama3 scaling")
    if not self.norm_eps > 0:
      fail("norm_eps", f"must be > 0, got {self.norm_eps}")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        fail(key, f"{getattr(self, key)!r} is not one of {DTYPES}")
    if self.remat not in REMAT_POLICIES:
      fail("remat", f"{self.remat!r} is not one of {REMAT_POLICIES}")
    if not isinstance(self.scan_layers, bool):
      fail("scan_layers", f"must be true or false, got {self.scan_layers!r}")
    if self.layer_types:
      if len(self.layer_types) != self.num_layers:
        fail("layer_types", f"has {len(self.layer_types)} entries but num_layers={self.num_layers}")
      bad = [t for t in self.layer_types if t not in LAYER_TYPES]
      if bad:
        fail("layer_types", f"{bad[0]!r} is not one of {LAYER_TYPES}")
      if "sliding" in self.layer_types and not self.sliding_window:
        fail("sliding_window", "sliding layers are configured but sliding_window is not set")
    if self.sliding_window is not None and self.sliding_window < 1:
      fail("sliding_window", f"must be a positive integer or None, got {self.sliding_window}")
    for key in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar", "local_rope_theta"):
      value = getattr(self, key)
      if value is not None and not value > 0:
        fail(key, f"must be > 0 or None, got {value}")
    for key in ("bos_token_id", "pad_token_id"):
      value = getattr(self, key)
      if value is not None and not 0 <= value < self.vocab_size:
        fail(key, f"{value} is outside the vocabulary [0, {self.vocab_size})")
    for value in self.eos_token_ids:
      if not 0 <= value < self.vocab_size:
        fail("eos_token_ids", f"{value} is outside the vocabulary [0, {self.vocab_size})")
    return self


def _gemma_common(**kw) -> dict:
  return dict(activation="gelu_tanh", norm_plus_one=True, embed_scale=True, tie_embeddings=True,
              bos_token_id=2, eos_token_ids=(1,), pad_token_id=0, **kw)


# Architecture presets. Small ones are for tests and demos; the large ones match the released
# checkpoints' config.json (used by `plan` and the real-model recipes; weights come from `hf.py`).
PRESETS: dict[str, ModelConfig] = {
    # The embedded demo's model (~0.4 M parameters plus the task vocabulary).
    "tiny": ModelConfig(hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=2,
                        head_dim=32),
    "llama3_8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500000.0,
        rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_positions=8192, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), pad_token_id=None, dtype="bfloat16"),
    "mistral_7b": ModelConfig(
        family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,), pad_token_id=None,
        dtype="bfloat16"),
    "qwen2_5_7b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, norm_eps=1e-6, qkv_bias=True,
        rope_theta=1000000.0, max_position_embeddings=32768, bos_token_id=151643,
        eos_token_ids=(151645, 151643), pad_token_id=151643, dtype="bfloat16"),
    "qwen3_8b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-6, qk_norm=True,
        rope_theta=1000000.0, max_position_embeddings=40960, bos_token_id=151643,
        eos_token_ids=(151645, 151643), pad_token_id=151643, dtype="bfloat16"),
    "gemma_2b": ModelConfig(
        family="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_layers=18,
        num_heads=8, num_kv_heads=1, head_dim=256, max_position_embeddings=8192, dtype="bfloat16",
        **_gemma_common()),
    "gemma2_9b": ModelConfig(
        family="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_layers=42,
        num_heads=16, num_kv_heads=8, head_dim=256, post_norms=True, query_pre_attn_scalar=256.0,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
        layer_types=("sliding", "full") * 21, max_position_embeddings=8192, dtype="bfloat16",
        **_gemma_common()),
    "gemma3_4b_text": ModelConfig(
        family="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, post_norms=True, qk_norm=True,
        query_pre_attn_scalar=256.0, sliding_window=1024, rope_theta=1000000.0, rope_type="linear",
        rope_factor=8.0, local_rope_theta=10000.0,
        layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(34)),
        max_position_embeddings=131072, dtype="bfloat16", **_gemma_common()),
}


def get_preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]
