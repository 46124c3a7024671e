"""`selfplay-jax plan`: what a config needs per device on its mesh, without allocating anything.

  selfplay-jax plan --config=configs/real_model.py:model=llama3_8b,algorithm=grpo,hardware=v5e_64
  selfplay-jax plan --config=configs/grpo.py:model=llama3_8b --devices=8 --device_memory_gib=80

The train state is `jax.eval_shape`d exactly as training builds it (`setup.abstract_state`) and
sharded with training's rules (`sharding.state_shardings`) on an `AbstractMesh` of the config's mesh
sizes, so any device count can be planned on a laptop. Reported per device: parameters, optimizer
state, the reference / base copies and replay slot the algorithm keeps, the sampler's KV cache
(`data.batch_size * sampling.n` rows over mesh.data x mesh.fsdp, `max_prompt_len + max_new_tokens`
slots, kv heads over mesh.tensor), their total, the largest single array, and an estimate of the
float32 logits of the round's largest forward pass (the largest transient buffer at 128k-256k
vocabularies). Not counted: other activations (small with `model.remat`), XLA scratch space, the
evaluation sampler, sampled judgements (`judge.num_samples > 0`).

The device count is `--devices`, else `hardware.num_devices` of the config (the real-model recipes
set it), else the local `jax.device_count()`; device memory is `--device_memory_gib`, else
`hardware.device_memory_gib`. The model is `cfg.model` (a preset's fields, or `model.hf_path`'s
config.json; weights are never read); from-scratch runs on a built-in task use the preset's
vocabulary, not the task tokenizer's.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from selfplay_jax import config_lib, config_validation, setup, sharding
from selfplay_jax.algorithms import registry
from selfplay_jax.algorithms.spec import option
from selfplay_jax.models import lora

__all__ = ["plan", "format_plan", "to_json", "STATE_PARTS"]

STATE_PARTS = ("params", "opt_state", "ref_params", "base_params", "replay")
GiB, MiB = 2**30, 2**20


def _itemsize(dtype) -> int:
  return int(jnp.dtype(dtype).itemsize) if isinstance(dtype, str) else int(dtype.itemsize)


def _split(n: int, ways: int) -> int:
  """Per-shard size of a dimension `n` split `ways` ways (kept whole when it does not divide)."""
  return n // ways if n % ways == 0 else n


def _state_bytes(state, shardings) -> tuple[dict[str, int], dict[str, int], dict[str, Any]]:
  """(per-device bytes, global bytes) by TrainState field, and the largest per-device leaf."""
  per_device, total = {}, {}
  largest = {"name": "", "shape": [], "dtype": "", "per_device_bytes": -1}
  for field in state.__dataclass_fields__:
    leaves = jax.tree_util.tree_flatten_with_path(getattr(state, field))[0]
    shards = jax.tree.leaves(getattr(shardings, field))
    per_device[field] = total[field] = 0
    for (path, leaf), sh in zip(leaves, shards, strict=True):
      size = _itemsize(leaf.dtype)
      here = math.prod(sh.shard_shape(leaf.shape)) * size
      per_device[field] += here
      total[field] += math.prod(leaf.shape) * size
      if here > largest["per_device_bytes"]:
        largest = {"name": field + jax.tree_util.keystr(path), "shape": list(leaf.shape),
                   "dtype": str(leaf.dtype), "per_device_bytes": here}
  return per_device, total, largest


def _kv_cache(cfg, mc, sizes: dict[str, int]) -> dict[str, Any]:
  """The sampler's cache: per layer, k and v of [rows, kv_heads, slots, head_dim] in model.dtype.
  Rows and slots of the largest sampler call (the registry entry's `sampler_rows` and `sequence`:
  B·n prompts of P + N slots by default; rest_mcts's levels B·W·n rows of P + 2N; SCoRe's second
  attempt the whole episode); a B-STaR temperature grid tiles the rows T times."""
  rows, slots, _ = registry.sampler_shape(cfg)
  rows *= max(len(registry.parse_floats("sampling.auto_temperature",
                                        cfg.sampling.auto_temperature)), 1)
  rows_dev = _split(rows, sizes["data"] * sizes["fsdp"])
  heads_dev = _split(mc.num_kv_heads, sizes["tensor"])
  layer = rows_dev * heads_dev * slots * mc.head_dim * _itemsize(mc.dtype)
  # Per-layer tuples of k and v arrays, or with scan_layers one stacked k and one v array.
  array = layer * (mc.num_layers if mc.scan_layers else 1)
  return {"rows": rows, "rows_per_device": rows_dev, "slots": slots,
          "kv_heads_per_device": heads_dev, "dtype": mc.dtype, "array_bytes": array,
          "per_device_bytes": mc.num_layers * 2 * layer,
          "global_bytes": mc.num_layers * 2 * rows * mc.num_kv_heads * slots * mc.head_dim
                          * _itemsize(mc.dtype)}


def _forward_passes(cfg, spec) -> list[tuple[str, int, int]]:
  """(what, sequences, length) of the round's forward passes over whole batches (estimates): the
  scorer's pass, then the algorithm's (its registry entry says; none known for your own spec)."""
  b, n, d = cfg.data.batch_size, cfg.sampling.n, cfg.data
  passes = []
  kind = setup.reward_kind(cfg)
  if kind in ("judge", "likelihood", "self_certainty"):
    what = {"judge": "judge pass (+ template tokens)", "likelihood": "self-likelihood pass",
            "self_certainty": "self-certainty pass (one chunk)"}[kind]
    rows = b * n
    if kind == "self_certainty" and rows % cfg.algorithm.num_minibatches == 0:
      rows //= cfg.algorithm.num_minibatches  # chunked like the frozen log-prob passes
    passes.append((what, rows, d.max_prompt_len + cfg.sampling.max_new_tokens))
  entry = registry.entry_of(cfg)
  return passes + (entry.passes(cfg, spec) if entry else [])


def _logits(cfg, spec, mc, sizes: dict[str, int]) -> dict[str, Any] | None:
  passes = _forward_passes(cfg, spec)
  if not passes:
    return None  # an own spec: its passes are unknown
  what, rows, length = max(passes, key=lambda x: x[1] * x[2])
  rows_dev = _split(rows, sizes["data"] * sizes["fsdp"])
  return {"pass": what, "rows": rows, "length": length,
          "per_device_bytes": rows_dev * length * _split(mc.vocab_size, sizes["tensor"]) * 4}


def _population_activations(cfg, rules, sizes: dict[str, int], kv, logits):
  """A population's members sample and train side by side (vmapped): the KV cache and the
  logits estimates times the members a device holds (K, or K / the `population` rule's shards),
  the KV cache's global size times K. The state needs nothing here: `abstract_state` has them."""
  k = setup.population_size(cfg)
  if k == 1:
    return kv, logits
  axes = sharding.population_axes(rules)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  here = _split(k, math.prod(sizes[a] for a in axes))
  if kv:
    kv = {**kv, "members_per_device": here, "per_device_bytes": kv["per_device_bytes"] * here,
          "global_bytes": kv["global_bytes"] * k}
  if logits:
    logits = {**logits, "per_device_bytes": logits["per_device_bytes"] * here}
  return kv, logits


def _local_memory_gib() -> float | None:
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  limit = stats.get("bytes_limit")
  return limit / GiB if limit else None


def plan(cfg, *, num_devices: int | None = None,
         device_memory_gib: float | None = None) -> dict[str, Any]:
  """The memory plan of `cfg` (validated first). Raises `ConfigError` naming the key, as training
  does, for a mesh that does not fit the device count, the heads or the batch."""
  config_validation.validate(cfg)
  hw = cfg.get("hardware") or {}
  devices = num_devices or hw.get("num_devices") or jax.device_count()
  if device_memory_gib is None:
    device_memory_gib = hw.get("device_memory_gib") or (
        _local_memory_gib() if not (num_devices or hw.get("num_devices")) else None)
  shape = sharding.mesh_shape(cfg.mesh, devices)
  sizes = dict(zip(sharding.AXES, shape))
  mesh = AbstractMesh(shape, sharding.AXES)
  rules = sharding.logical_rules(cfg.mesh)
  mc = config_lib.model_config(cfg.model)
  sharding.check_model(mesh, mc, cfg.data.batch_size)
  sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")  # as training checks
  spec, optimizer = setup.build_spec(cfg), setup.build_optimizer(cfg)
  state = setup.abstract_state(cfg, mc, spec, optimizer)
  per_device, total, largest = _state_bytes(
      state, sharding.state_shardings(state, mesh, rules, mc,
                                      population=setup.population_size(cfg)))
  parts = {name: per_device.pop(name) for name in STATE_PARTS}
  parts["other"] = sum(per_device.values())  # step, round, rng, counters
  global_parts = {name: total.pop(name) for name in STATE_PARTS}
  global_parts["other"] = sum(total.values())
  kv = _kv_cache(cfg, mc, sizes) if spec.samples else None
  logits = _logits(cfg, spec, mc, sizes)
  kv, logits = _population_activations(cfg, rules, sizes, kv, logits)
  parts["kv_cache"] = kv["per_device_bytes"] if kv else 0
  global_parts["kv_cache"] = kv["global_bytes"] if kv else 0
  if kv and kv["array_bytes"] > largest["per_device_bytes"]:
    kv_shape = [kv["rows"], mc.num_kv_heads, kv["slots"], mc.head_dim]
    largest = {"name": "kv_cache.k" if mc.scan_layers else "kv_cache.k[0]", "dtype": mc.dtype,
               "per_device_bytes": kv["array_bytes"],
               "shape": kv_shape[:1] + [mc.num_layers] + kv_shape[1:] if mc.scan_layers else kv_shape}
  resident = sum(parts.values())
  peak = resident + (logits["per_device_bytes"] if logits else 0)
  memory = float(device_memory_gib) if device_memory_gib else None
  return {
      "model": {"family": mc.family, "source": cfg.model.hf_path or f"preset {cfg.model.preset}",
                "num_params": mc.num_params(), "dtype": mc.dtype, "param_dtype": mc.param_dtype,
                "remat": mc.remat,
                # LoRA: the adapters (params and optimizer state above count them; only they train)
                "lora": None if not lora.enabled(mc) else {
                    "rank": mc.lora_rank, "alpha": mc.lora_alpha, "targets": list(mc.lora_targets),
                    "adapter_params": lora.num_adapter_params(mc)}},
      "algorithm": {"name": spec.name, "reference": spec.reference,
                    "sampler": option(spec, "sample_from") if spec.samples else None},
      "hardware": hw.get("name") or None,
      "num_devices": math.prod(shape), "devices_available": devices, "mesh": sizes,
      "device_memory_gib": memory,
      "batch": {"prompts": cfg.data.batch_size, "samples_per_prompt": cfg.sampling.n,
                "batch_shards": sizes["data"] * sizes["fsdp"]},
      "per_device_bytes": {**parts, "total": resident},
      "global_bytes": {**global_parts, "total": sum(global_parts.values())},
      "largest_array": largest, "kv_cache": kv, "logits": logits,
      "peak_estimate_bytes": peak,
      "fits": None if memory is None else peak <= memory * GiB,
  }


# ---- text ---------------------------------------------------------------------------------------

_LABELS = {"params": "params", "opt_state": "optimizer state", "ref_params": "reference params",
           "base_params": "base params", "replay": "replay slot", "other": "step, rng, counters",
           "kv_cache": "KV cache (sampler)"}


def _size(n: int) -> str:
  if n >= GiB:
    return f"{n / GiB:.2f} GiB"
  return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def format_plan(p: dict[str, Any]) -> str:
  m, mesh, b = p["model"], p["mesh"], p["batch"]
  hw = f" ({p['hardware']})" if p["hardware"] else ""
  if p["devices_available"] != p["num_devices"]:
    hw += f" of {p['devices_available']}"
  lines = [
      f"model      {m['family']}, {m['source']}: {m['num_params']:,} parameters, params "
      f"{m['param_dtype']}, compute {m['dtype']}, remat {m['remat']}",
      *([f"lora       rank {m['lora']['rank']}, alpha {m['lora']['alpha']:g} on "
         f"{', '.join(m['lora']['targets'])}: {m['lora']['adapter_params']:,} trainable adapter "
         "parameters (the optimizer holds only these)"] if m.get("lora") else []),
      f"algorithm  {p['algorithm']['name']}: reference {p['algorithm']['reference']}, sampler "
      f"{p['algorithm']['sampler'] or '-'}",
      f"mesh       data {mesh['data']} x fsdp {mesh['fsdp']} x tensor {mesh['tensor']} = "
      f"{p['num_devices']} devices{hw}",
      f"batch      {b['prompts']} prompts x {b['samples_per_prompt']} sample"
      f"{'s' if b['samples_per_prompt'] != 1 else ''} over "
      f"{b['batch_shards']} batch shards",
      "", f"{'':<26}{'global':>12}{'per device':>14}"]
  for key, label in _LABELS.items():
    per, total = p["per_device_bytes"][key], p["global_bytes"][key]
    if per or key in ("params", "opt_state"):
      detail = ""
      if key == "params":
        detail = f"  {m['param_dtype']}"
      if key == "kv_cache":
        kv = p["kv_cache"]
        detail = (f"  {kv['rows_per_device']} rows x {kv['slots']} slots x "
                  f"{kv['kv_heads_per_device']} kv heads, {kv['dtype']}")
      lines.append(f"  {label:<24}{_size(total):>12}{_size(per):>14}{detail}")
  lines.append(f"  {'total':<24}{_size(p['global_bytes']['total']):>12}"
               f"{_size(p['per_device_bytes']['total']):>14}")
  big = p["largest_array"]
  lines += ["", f"largest array   {big['name']} {big['shape']} {big['dtype']}: "
                f"{_size(big['per_device_bytes'])} per device"]
  if p["logits"]:
    lg = p["logits"]
    lines.append(f"+ logits (f32)   {lg['pass']}: {lg['rows']} x {lg['length']} tokens: "
                 f"{_size(lg['per_device_bytes'])} per device (estimate)")
  peak = p["peak_estimate_bytes"]
  if p["device_memory_gib"] is None:
    lines.append(f"peak estimate   {_size(peak)} per device (device memory unknown: "
                 "--device_memory_gib)")
  else:
    share = peak / (p["device_memory_gib"] * GiB)
    verdict = "fits" if p["fits"] else "WARNING: does not fit"
    lines.append(f"peak estimate   {_size(peak)} of {p['device_memory_gib']:g} GiB per device "
                 f"({share:.0%}): {verdict}")
  return "\n".join(lines)


def to_json(p: dict[str, Any]) -> str:
  return json.dumps(p, indent=2)
