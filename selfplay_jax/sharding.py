"""Device meshes and shardings from config, MaxText style: parameters and activations carry logical
axis names (`models/decoder.py`); rules map them to the mesh axes ("data", "fsdp", "tensor").

  mesh = make_mesh(cfg.mesh)                            # -1 = fill the remaining devices
  rules = logical_rules(cfg.mesh)                       # (logical name, mesh axes) pairs
  check_model(mesh, model_config, batch_size)           # clear errors before anything compiles
  state_sh = state_shardings(state, mesh, rules, model_config)
  state = put(host_state, state_sh)                     # host arrays -> global sharded arrays
  batch = global_batch(process_local_rows, mesh)        # each process holds its own rows
  with activation_rules(mesh, rules): ... trace the round ...

The same config runs on 1 device or many: with one device every sharding is replicated and the
program is the single-device one. With several JAX processes (`jax.distributed`), the mesh spans
every process's devices and each process feeds the rows of the batch its own devices hold
(`global_batch`), so the data x fsdp axes must split the batch across processes
(`check_processes`). A dimension a rule would split but the mesh axes do not divide
(e.g. a 20-token vocabulary over 4 tensor shards) is kept whole (replicated) rather than padded.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfplay_jax import models
from selfplay_jax.models import lora
from selfplay_jax.errors import ConfigError
from selfplay_jax.models.config import ModelConfig

__all__ = ["AXES", "DEFAULT_RULES", "POPULATION", "population_axes", "check_population", "mesh_shape", "make_mesh", "logical_rules", "check_model",
           "check_batch", "param_specs", "state_shardings", "batch_shardings", "activation_rules",
           "check_processes", "replicated", "put", "global_batch"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # rows of a batch are split over both: fsdp is data parallel too

# Logical axis -> mesh axes. Parameters: embed dims over fsdp (ZeRO-3 style), heads / mlp / vocab
# over tensor (Megatron style); activations: batch over data x fsdp, features over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("head_dim", None), ("norm", None), ("layers", None),
    ("activation_batch", BATCH_AXES), ("activation_length", None), ("activation_embed", None),
    ("activation_heads", "tensor"), ("activation_kv_heads", "tensor"), ("activation_mlp", "tensor"), ("activation_vocab", "tensor"),
)

# The leading member axis of a population's state (`population.size` > 1): replicated by default;
# a rule such as "population=data" shards the members over that mesh axis (which no other rule
# may then use: the round is vmapped with that `spmd_axis_name`).
POPULATION = "population"
DEFAULT_RULES += ((POPULATION, None),)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with at most one -1 filled in; ConfigError naming `mesh.*` otherwise."""
  sizes = {axis: int(mesh_cfg[axis]) for axis in AXES}
  fill = [axis for axis, n in sizes.items() if n == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh.{fill[1]}: at most one mesh axis may be -1 (fill)")
  for axis, n in sizes.items():
    if n == 0 or n < -1:
      raise ConfigError(f"mesh.{axis}: must be -1 (fill) or >= 1, got {n}")
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(f"mesh.{fill[0]}: the other mesh axes ({fixed} devices) do not divide the "
                        f"{num_devices} devices")
    sizes[fill[0]] = num_devices // fixed
  elif fixed > num_devices:
    raise ConfigError(f"mesh.data: mesh {sizes['data']} x {sizes['fsdp']} x {sizes['tensor']} = "
                      f"{fixed} devices, but only {num_devices} are available")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh. Sizes that multiply to fewer devices than there are use
  the first ones (with a warning) -- on one host only: every JAX process must take part."""
  # Grouped by process, so that each host's devices are a contiguous block of the mesh: the batch
  # axes then give every host its own rows (`check_processes`) and tensor stays within a host.
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  shape = mesh_shape(mesh_cfg, len(devices))
  used = math.prod(shape)
  if used < len(devices):
    if len({d.process_index for d in devices}) > 1:
      raise ConfigError(f"mesh.data: mesh {shape[0]} x {shape[1]} x {shape[2]} = {used} devices, but "
                        f"the {len(devices)} devices of all JAX processes must be used (-1 fills)")
    logging.warning("mesh %s uses %d of the %d devices", "x".join(map(str, shape)), used,
                    len(devices))
  return Mesh(np.asarray(devices[:used]).reshape(shape), AXES)


def logical_rules(mesh_cfg: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
  """The default rules, with `mesh.rules` (a sequence of "logical=axis1+axis2" / "logical=" for
  replicated) overriding single entries when the config has it."""
  rules = dict(DEFAULT_RULES)
  for entry in (mesh_cfg or {}).get("rules", ()) or ():
    name, sep, axes = str(entry).partition("=")
    if not sep or name not in rules:
      raise ConfigError(f"mesh.rules: {entry!r} must be '<logical axis>=<mesh axes joined by +>' "
                        f"for one of {sorted(rules)}")
    parts = tuple(a for a in axes.split("+") if a)
    bad = [a for a in parts if a not in AXES]
    if bad:
      raise ConfigError(f"mesh.rules: {entry!r} names unknown mesh axes {bad}; use {AXES}")
    rules[name] = parts if len(parts) > 1 else (parts[0] if parts else None)
  return tuple(rules.items())


def _axes_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_model(mesh: Mesh, config: ModelConfig, batch_size: int | None = None) -> None:
  """Errors a user can fix in the config, before anything compiles."""
  tensor = mesh.shape["tensor"]
  for field, n in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads)):
    if n % tensor:
      raise ConfigError(f"mesh.tensor: {tensor} does not divide model.{field}={n}")
  if batch_size is not None:
    check_batch(mesh, batch_size, "data.batch_size")


def check_batch(mesh: Mesh, batch_size: int, key: str) -> None:
  """`batch_size` (global rows) must split evenly over the batch axes and the processes."""
  rows = _axes_size(mesh, BATCH_AXES)
  if batch_size % rows:
    raise ConfigError(f"{key}: {batch_size} is not divisible by mesh.data x mesh.fsdp = "
                      f"{rows} (each data-parallel shard gets whole prompts)")
  if batch_size % jax.process_count():
    raise ConfigError(f"{key}: {batch_size} is not divisible by the {jax.process_count()} JAX "
                      "processes (each encodes an equal share)")


def check_processes(mesh: Mesh) -> None:
  """With several JAX processes each one encodes its own block of every batch
  (`data/pipeline.py`): the data x fsdp shards must therefore fall into per-process blocks in
  process order (process p's devices hold rows [p*B/P, (p+1)*B/P)). A mesh whose tensor axis
  spans processes while data x fsdp is smaller than the process count cannot be fed that way."""
  count = jax.process_count()
  if count == 1:
    return
  devices = mesh.devices  # (data, fsdp, tensor)
  shards = devices.shape[0] * devices.shape[1]
  owner = np.vectorize(lambda d: d.process_index)(devices).reshape(shards, -1)
  per_process = shards // count if shards % count == 0 else 0
  ok = per_process > 0 and all(
      (owner[i] == i // per_process).all() for i in range(shards))
  if not ok:
    raise ConfigError(f"mesh.data: with {count} JAX processes, mesh.data x mesh.fsdp "
                      f"({devices.shape[0]} x {devices.shape[1]}) must split the batch into "
                      "per-process blocks (each host holds different prompts): keep mesh.tensor "
                      "within a host and give data x fsdp a multiple of the process count")


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """`spec` with every split that does not divide its dimension dropped (kept whole)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return PartitionSpec(*[a if a is None or dim % _axes_size(mesh, a) == 0 else None
                         for a, dim in zip(entries, shape)])


def param_specs(config: ModelConfig, params: Any, mesh: Mesh,
                rules: Sequence[tuple[str, Any]]) -> Any:
  """Mesh `PartitionSpec`s of the model parameters (same tree as `params`). Entries a spec adds
  beside the model's (`init_params`: PPO's value head, its critic trunk) take the model's specs
  when they are a copy of the model's tree, else are replicated."""
  logical = _with_extra_entries(models.logical_axes(config), params)
  specs = nn.logical_to_mesh(logical, rules)
  return jax.tree.map(lambda s, p: _fit(s, p.shape, mesh), specs, params,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def _with_extra_entries(logical: dict, params: Any) -> dict:
  """`logical` extended to the top-level entries of `params` that the model does not have."""
  if not isinstance(params, dict) or set(params) <= set(logical):
    return logical
  model = jax.tree.structure({k: v for k, v in params.items() if k in logical})
  out = dict(logical)
  for key in set(params) - set(logical):
    like_model = jax.tree.structure(params[key]) == model
    out[key] = logical if like_model else jax.tree.map(lambda _: PartitionSpec(), params[key])
  return out


def population_axes(rules: Sequence[tuple[str, Any]] | None) -> Any:
  """The mesh axes of the population axis under `rules` (None: replicated), as a vmap
  `spmd_axis_name` takes them."""
  return dict(rules or DEFAULT_RULES).get(POPULATION)


def check_population(mesh: Mesh, rules: Sequence[tuple[str, Any]], size: int) -> None:
  """A population sharded over mesh axes (`mesh.rules` "population=...") needs them to divide
  `population.size` and to be used by no other rule (inside the members' vmap, the model's own
  constraints cannot name the axis the members are split over)."""
  axes = population_axes(rules)
  if size <= 1 or axes is None:
    return
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  if size % _axes_size(mesh, axes):
    raise ConfigError(f"mesh.rules: population={'+'.join(names)} splits the members over "
                      f"{_axes_size(mesh, axes)} devices, which does not divide "
                      f"population.size={size}")
  for name, other in rules:
    other = () if other is None else (other,) if isinstance(other, str) else tuple(other)
    shared = sorted(set(other) & set(names))
    if name != POPULATION and shared:
      raise ConfigError(f"mesh.rules: population={'+'.join(names)} and {name} both use mesh axis "
                        f"{shared[0]}; map {name} to other axes (e.g. '{name}=' to replicate it)")


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                    config: ModelConfig, population: int = 1) -> Any:
  """NamedShardings for a TrainState: every params-shaped subtree (policy, reference, base, the
  optimizer's moments) follows the parameter rules; everything else is replicated. With
  `population` > 1 every leaf has a leading member axis: it gets the `population` rule's mesh
  axes (replicated by default) in front of the member's own sharding."""
  if population > 1:
    check_population(mesh, rules, population)
    member = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)
    axes = population_axes(rules)
    lead = axes if axes is not None and population % _axes_size(mesh, axes) == 0 else None
    return jax.tree.map(lambda sh: NamedSharding(mesh, PartitionSpec(lead, *sh.spec)),
                        state_shardings(member, mesh, rules, config))
  like_params = jax.tree.map(lambda s: NamedSharding(mesh, s),
                             param_specs(config, state.params, mesh, rules),
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
  param_structure = jax.tree.structure(state.params)
  # With LoRA, the optimizer's moments and the reference / restart slots are adapter-shaped.
  like_adapters = lora.trainable(like_params) if lora.has_adapters(state.params) else None
  adapter_structure = jax.tree.structure(lora.trainable(state.params))
  replicated = NamedSharding(mesh, PartitionSpec())

  def assign(tree):
    if tree is None:
      return None
    if jax.tree.structure(tree) == param_structure:
      return like_params
    if like_adapters is not None and jax.tree.structure(tree) == adapter_structure:
      return like_adapters
    if isinstance(tree, dict):
      return {k: assign(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple optimizer states
      return type(tree)(*[assign(v) for v in tree])
    if isinstance(tree, (list, tuple)):
      return type(tree)(assign(v) for v in tree)
    return jax.tree.map(lambda _: replicated, tree)

  fields = {name: assign(getattr(state, name)) for name in state.__dataclass_fields__}
  return state.replace(**fields)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """Rows (the leading axis) over data x fsdp; scalars replicated."""
  def one(x):
    ndim = np.ndim(x)
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES) if ndim else PartitionSpec())
  return jax.tree.map(one, batch)


def put(tree: Any, shardings: Any) -> Any:
  """Host (or single-device) arrays -> global arrays with `shardings`. Every process passes the
  same full values; each device receives only its own slice (nothing is gathered on one device)."""
  def one(x, sh):
    if isinstance(x, jax.Array) and x.sharding == sh:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """A batch whose rows this process encoded (its block; all of it with one process) -> global
  arrays sharded by `batch_shardings` (the global batch has process_count x the local rows)."""
  return jax.tree.map(lambda x, sh: jax.make_array_from_process_local_data(sh, np.asarray(x)),
                      local_batch, batch_shardings(local_batch, mesh))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]]):
  """Makes the model's `nn.with_logical_constraint`s real for jitted calls made inside (the mesh
  is set outside `jax.jit`; the rules are read while the call traces)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
