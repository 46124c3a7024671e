"""Hugging Face interop: `config.json` + `*.safetensors` in, the same out.

  load_config(path) -> ModelConfig
  load_pretrained(path, dtype=..., scan_layers=False) -> (ModelConfig, params)
  save_pretrained(config, params, path)   # loadable by transformers.AutoModelForCausalLM

One table (`_tensor_specs`) maps every HF tensor to our parameter path and layout, and drives
both directions. Only safetensors are read: pickle-based `*.bin` checkpoints are refused.
With `config.scan_layers` a layer tensor lives at index i of the stacked `layers` leaf instead of
in `layers_i` (filled in place on load, sliced out on save; no unrolled copy is made).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from selfplay_jax.errors import CheckpointFormatError  # noqa: F401 (re-exported)
from selfplay_jax.errors import ConfigError
from selfplay_jax.models.config import ModelConfig

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _read_json(path: Path) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def _rope_from_hf(hf: dict, family: str) -> dict:
  """Reads RoPE settings from either the transformers-5 `rope_parameters` or the older
  `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys."""
  params = hf.get("rope_parameters")
  local = None
  if isinstance(params, dict) and "full_attention" in params:  # per-layer-type (Gemma 3)
    local = params.get("sliding_attention")
    params = params["full_attention"]
  if not params:
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if family == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
  rope_type = params.get("rope_type", params.get("type")) or "default"
  out: dict[str, Any] = dict(rope_theta=float(params.get("rope_theta", 10000.0)))
  if rope_type == "default":
    pass
  elif rope_type == "linear":
    out.update(rope_type="linear", rope_factor=float(params["factor"]))
  elif rope_type == "llama3":
    out.update(rope_type="llama3", rope_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_positions=int(params["original_max_position_embeddings"]))
  else:
    raise ConfigError(f"config.json rope_scaling.rope_type={rope_type!r} is not supported "
                      "(supported: default, linear, llama3)")
  if local is not None:
    if (local.get("rope_type") or "default") != "default":
      raise ConfigError("config.json rope_parameters.sliding_attention: only unscaled RoPE is supported")
    out["local_rope_theta"] = float(local.get("rope_theta", 10000.0))
  return out


def _layer_types_from_hf(hf: dict, family: str, n: int, window: int | None) -> tuple[str, ...]:
  if window is None:
    return ()
  if hf.get("layer_types"):
    types = tuple("sliding" if t == "sliding_attention" else "full" for t in hf["layer_types"])
  elif family == "mistral":
    types = ("sliding",) * n
  elif family in ("qwen2", "qwen3"):
    start = hf.get("max_window_layers", 28)
    types = tuple("sliding" if i >= start else "full" for i in range(n))
  elif family == "gemma2":
    types = tuple("sliding" if (i + 1) % 2 else "full" for i in range(n))
  elif family == "gemma3_text":
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(n))
  else:
    types = ()
  return types if "sliding" in types else ()


def config_from_hf_dict(hf: dict, source: str = "config.json") -> ModelConfig:
  """Translates a Hugging Face config dict into a validated `ModelConfig`."""
  family = hf.get("model_type")
  if family not in _ARCHITECTURES:
    raise ConfigError(f"{source}: model_type={family!r} is not supported; supported: "
                      f"{sorted(_ARCHITECTURES)}")
  try:
    n_layers = int(hf["num_hidden_layers"])
    n_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    act_name = hf.get("hidden_activation") if family in ("gemma2", "gemma3_text") else None
    act_name = act_name or hf.get("hidden_act", "silu")
    if family == "gemma" and act_name == "gelu":  # legacy Gemma configs mean the tanh approximation
      act_name = "gelu_pytorch_tanh"
    if act_name not in _ACTIVATIONS:
      raise ConfigError(f"{source}: hidden_act={act_name!r} is not supported ({sorted(_ACTIVATIONS)})")
    gemma = family.startswith("gemma")
    bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
      window = None
    eos = hf.get("eos_token_id")
    eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    kwargs = dict(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hidden // n_heads),
        activation=_ACTIVATIONS[act_name],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_plus_one=gemma,
        post_norms=family in ("gemma2", "gemma3_text"),
        qk_norm=family in ("qwen3", "gemma3_text"),
        qkv_bias=True if family == "qwen2" else bias,
        o_bias=False if family == "qwen2" else bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        embed_scale=gemma,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        query_pre_attn_scalar=(float(hf["query_pre_attn_scalar"])
                               if family in ("gemma2", "gemma3_text") else None),
        attn_logit_softcap=hf.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
        sliding_window=int(window) if window else None,
        layer_types=_layer_types_from_hf(hf, family, n_layers, window),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
        **_rope_from_hf(hf, family),
    )
  except KeyError as e:
    raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None
  if not kwargs["layer_types"]:
    kwargs["sliding_window"] = None  # a window no layer uses is dropped (keeps configs canonical)
  return ModelConfig(**kwargs).validate(prefix=source)


def load_config(path: str | os.PathLike) -> ModelConfig:
  """Reads `<path>/config.json` (or `path` itself if it is a JSON file)."""
  path = Path(path)
  file = path if path.suffix == ".json" else path / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"no config.json found at {file} (expected a Hugging Face model directory)")
  return config_from_hf_dict(_read_json(file), source=str(file))


def config_to_hf_dict(config: ModelConfig) -> dict:
  """The `config.json` of `config` for its family (transformers >= 5 keys, plus legacy rope keys)."""
  c = config.validate()
  rope: dict[str, Any] = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
  if c.rope_type == "linear":
    rope["factor"] = c.rope_factor
  elif c.rope_type == "llama3":
    rope.update(factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                high_freq_factor=c.rope_high_freq_factor,
                original_max_position_embeddings=c.rope_original_max_positions)
  eos = list(c.eos_token_ids)
  hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[c.family]],
      "model_type": c.family,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "rms_norm_eps": c.norm_eps,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_embeddings,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": c.pad_token_id,
      "dtype": c.param_dtype,
      "attention_dropout": 0.0,
  }
  act_key = "hidden_activation" if c.family in ("gemma2", "gemma3_text") else "hidden_act"
  hf[act_key] = _HF_ACTIVATION[c.activation]
  if c.family != "qwen2":
    hf["attention_bias"] = c.qkv_bias
  if c.family == "llama":
    hf["mlp_bias"] = c.mlp_bias
  if c.family in ("gemma2", "gemma3_text"):
    scalar = c.query_pre_attn_scalar or c.head_dim
    hf["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
    hf["attn_logit_softcapping"] = c.attn_logit_softcap
    hf["final_logit_softcapping"] = c.final_logit_softcap
  hf["sliding_window"] = c.sliding_window
  if c.family in ("qwen2", "qwen3"):
    hf["use_sliding_window"] = c.sliding_window is not None
    hf["max_window_layers"] = c.num_layers
  if c.family == "mistral" and c.layer_types and "full" in c.layer_types:
    raise ConfigError("model.layer_types: Mistral applies its sliding window to every layer")
  if c.family in ("gemma2", "gemma3_text", "qwen2", "qwen3"):
    types = c.layer_types or ("full",) * c.num_layers
    hf["layer_types"] = ["sliding_attention" if t == "sliding" else "full_attention" for t in types]
  elif c.family in ("llama", "gemma") and c.layer_types:
    raise ConfigError(f"model.layer_types: family {c.family!r} has no sliding-window layers")
  if c.family == "gemma3_text":
    local = {"rope_type": "default", "rope_theta": c.local_rope_theta or c.rope_theta}
    hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    hf["rope_theta"] = c.rope_theta
    hf["rope_local_base_freq"] = local["rope_theta"]
  else:
    if c.local_rope_theta is not None:
      raise ConfigError(f"model.local_rope_theta: family {c.family!r} has one RoPE base")
    hf["rope_parameters"] = rope
  return hf


# ----------------------------------------------------------------------------------------------
# Tensor table


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
  hf_name: str
  path: tuple[str, ...]  # path in our params tree
  shape: tuple[int, ...]  # our shape
  in_dims: int = 0  # >0: HF linear weight [out, in]; ours = W.T reshaped, first in_dims axes = input
  flat: bool = True  # in_dims == 0: HF stores it flattened (biases, norms); False: same layout
  layer: int | None = None  # decoder layer of the tensor (path starts with f"layers_{layer}")

  def location(self, config: ModelConfig) -> tuple[tuple[str, ...], int | None]:
    """(path in the params tree, index along the stacked layer axis or None) under `config`."""
    if config.scan_layers and self.layer is not None:
      return ("layers",) + self.path[1:], self.layer
    return self.path, None


def _tensor_specs(c: ModelConfig) -> list[_TensorSpec]:
  d, f, h, kv, hd, v = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                        c.vocab_size)
  specs = [_TensorSpec("model.embed_tokens.weight", ("embedding",), (v, d), flat=False),
           _TensorSpec("model.norm.weight", ("final_norm", "scale"), (d,))]
  if not c.tie_embeddings:
    specs.append(_TensorSpec("lm_head.weight", ("lm_head",), (d, v), in_dims=1))
  norms = {"input_layernorm": "pre_attn_norm"}
  if c.post_norms:
    norms.update(post_attention_layernorm="post_attn_norm", pre_feedforward_layernorm="pre_mlp_norm",
                 post_feedforward_layernorm="post_mlp_norm")
  else:
    norms["post_attention_layernorm"] = "pre_mlp_norm"
  for i in range(c.num_layers):
    pre, ours = f"model.layers.{i}.", f"layers_{i}"
    first = len(specs)
    for hf_norm, our_norm in norms.items():
      specs.append(_TensorSpec(f"{pre}{hf_norm}.weight", (ours, our_norm, "scale"), (d,)))
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
      specs.append(_TensorSpec(f"{pre}self_attn.{name}_proj.weight", (ours, "attn", f"{name}_kernel"),
                               (d, heads, hd), in_dims=1))
      if c.qkv_bias:
        specs.append(_TensorSpec(f"{pre}self_attn.{name}_proj.bias", (ours, "attn", f"{name}_bias"),
                                 (heads, hd)))
    specs.append(_TensorSpec(f"{pre}self_attn.o_proj.weight", (ours, "attn", "o_kernel"), (h, hd, d),
                             in_dims=2))
    if c.o_bias:
      specs.append(_TensorSpec(f"{pre}self_attn.o_proj.bias", (ours, "attn", "o_bias"), (d,)))
    if c.qk_norm:
      for name in ("q_norm", "k_norm"):
        specs.append(_TensorSpec(f"{pre}self_attn.{name}.weight", (ours, "attn", name, "scale"), (hd,)))
    for name, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
      specs.append(_TensorSpec(f"{pre}mlp.{name}_proj.weight", (ours, "mlp", f"{name}_kernel"), shape,
                               in_dims=1))
      if c.mlp_bias:
        specs.append(_TensorSpec(f"{pre}mlp.{name}_proj.bias", (ours, "mlp", f"{name}_bias"), shape[1:]))
    specs[first:] = [dataclasses.replace(spec, layer=i) for spec in specs[first:]]
  return specs


def _hf_shape(spec: _TensorSpec) -> tuple[int, ...]:
  if spec.in_dims:
    return (math.prod(spec.shape[spec.in_dims:]), math.prod(spec.shape[:spec.in_dims]))
  return (math.prod(spec.shape),) if spec.flat else spec.shape


def _to_ours(spec: _TensorSpec, w: np.ndarray) -> np.ndarray:
  return (w.T if spec.in_dims else w).reshape(spec.shape)


def _to_hf(spec: _TensorSpec, w: np.ndarray) -> np.ndarray:
  if spec.in_dims:
    return np.ascontiguousarray(w.reshape(_hf_shape(spec)[::-1]).T)
  return np.ascontiguousarray(w.reshape(_hf_shape(spec)))


# ----------------------------------------------------------------------------------------------
# Loading and saving


def _safetensors_files(path: Path) -> list[Path]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointFormatError(f"{index}: has no 'weight_map' object")
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
      raise CheckpointFormatError(f"{index} lists shard files that do not exist: {missing}")
    return files
  files = sorted(path.glob("*.safetensors"))
  if files:
    return files
  pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
  if pickled:
    raise CheckpointFormatError(
        f"{path}: only pickle-based weights ({', '.join(pickled)}) found; selfplay_jax never loads "
        "pickle. Convert them to safetensors first (transformers: model.save_pretrained(dir)).")
  raise FileNotFoundError(f"{path}: no *.safetensors weights found")


def _dtype_of(name: str):
  import jax.numpy as jnp  # local: keep the import cost off tools that only read configs
  return jnp.dtype(name)


def _read_tensors(files: list[Path], wanted: set[str]) -> dict[str, np.ndarray]:
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    try:
      with safetensors.safe_open(str(file), framework="numpy") as f:
        for key in f.keys():
          if key in wanted:
            tensors[key] = f.get_tensor(key)
    except (safetensors.SafetensorError, OSError) as e:
      raise CheckpointFormatError(f"{file}: cannot read safetensors file ({e})") from None
  return tensors


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", param_dtype: str = "float32",
                    scan_layers: bool = False) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face causal-LM directory. Returns (ModelConfig, params as numpy arrays).

  `dtype` is the compute dtype, `param_dtype` the storage dtype of the returned parameters;
  `scan_layers` returns the stacked layout (see `ModelConfig.scan_layers`).
  Missing, mis-shaped or non-float tensors raise `CheckpointFormatError` naming the tensor.
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"model directory {path} does not exist")
  config = load_config(path).replace(dtype=dtype, param_dtype=param_dtype,
                                     scan_layers=scan_layers).validate()
  specs = _tensor_specs(config)
  tensors = _read_tensors(_safetensors_files(path), {s.hf_name for s in specs})
  params: dict = {}
  np_dtype = _dtype_of(param_dtype)
  for spec in specs:
    if spec.hf_name not in tensors:
      raise CheckpointFormatError(f"{path}: tensor {spec.hf_name!r} is missing from the safetensors files")
    w = tensors.pop(spec.hf_name)
    if w.shape != _hf_shape(spec):
      raise CheckpointFormatError(f"{path}: tensor {spec.hf_name!r} has shape {tuple(w.shape)}, "
                                  f"config.json implies {_hf_shape(spec)}")
    if str(w.dtype) not in _FLOAT_DTYPES:
      raise CheckpointFormatError(f"{path}: tensor {spec.hf_name!r} has dtype {w.dtype}, expected a float")
    ours, layer = spec.location(config)
    node = params
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    if layer is None:
      node[ours[-1]] = _to_ours(spec, w).astype(np_dtype)
    else:
      if ours[-1] not in node:
        node[ours[-1]] = np.empty((config.num_layers,) + spec.shape, np_dtype)
      node[ours[-1]][layer] = _to_ours(spec, w)
  return config, params


def save_pretrained(config: ModelConfig, params, path: str | os.PathLike, dtype: str | None = None) -> Path:
  """Writes `config.json`, `generation_config.json` and `model.safetensors` to `path`.

  The result loads with `transformers.AutoModelForCausalLM.from_pretrained(path)`. `dtype`
  (default: the params' own dtype) sets the stored float type.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  hf = config_to_hf_dict(config)
  tensors = {}
  for spec in _tensor_specs(config):
    ours, layer = spec.location(config)
    node = params
    for key in ours:
      if key not in node:
        raise CheckpointFormatError(f"params are missing {'/'.join(ours)} (needed for {spec.hf_name})")
      node = node[key]
    want = spec.shape if layer is None else (config.num_layers,) + spec.shape
    if np.shape(node) != want:
      raise CheckpointFormatError(f"param {'/'.join(ours)} has shape {np.shape(node)}, config implies {want}")
    w = np.asarray(node if layer is None else node[layer])
    tensors[spec.hf_name] = _to_hf(spec, w.astype(_dtype_of(dtype)) if dtype else w)
  if dtype:
    hf["dtype"] = dtype
  else:
    hf["dtype"] = str(next(iter(tensors.values())).dtype)
  tmp = path / "model.safetensors.tmp"
  safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, path / "model.safetensors")
  with open(path / "config.json", "w") as f:
    json.dump(hf, f, indent=2)
  gen = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
         "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1
         else config.eos_token_ids[0]}
  with open(path / "generation_config.json", "w") as f:
    json.dump(gen, f, indent=2)
  return path
