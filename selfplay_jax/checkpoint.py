"""Orbax checkpoints for training rounds: state + data-iterator state + config JSON + metrics.

  ckpt = Checkpointer(workdir, keep=3, best_metric="eval/accuracy")
  ckpt.save(r, state, data_state=it.get_state(), config_json=cfg.to_json(), metrics=m)  # async
  state, data_state, config_json, metrics = ckpt.restore(abstract_state=jax.eval_shape(...))
  ckpt.restored_step  # the step that restore() actually used

Layout: `<workdir>/checkpoints/<step>/{state,data_state,config,round_metrics}/`. Orbax writes each
step into `<step>.orbax-checkpoint-tmp-<time>/` and renames it when every item is written, so a
half-written step (killed process) is never listed by `all_steps()` nor restored.

Retention: the `keep` newest steps plus the `keep_best` best by `metrics[best_metric]` survive;
every other step is deleted once a newer save finalizes. This is one Orbax preservation policy,
`AnyPreservationPolicy([LatestN(keep), _BestByMetric(...)])`. The best-of ranking reads the metric
from our own `round_metrics` item (cached in memory; read once at start-up for existing steps)
rather than from Orbax's `metrics` item, so a corrupted metrics file cannot break start-up.

Restore checks the checkpoint's tree metadata against the abstract target first (tree paths,
shapes, dtypes: a mismatch raises `CheckpointMismatchError`, never a partial restore). A step that
fails to read (missing item, truncated or deleted file) is logged and the next older step is tried.

Typed PRNG keys (`jax.random.key`) round-trip natively in Orbax (0.12.8, tested): they are written as
`key_data` (uint32, trailing impl dims) and re-wrapped with the impl of the target's key dtype.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding
from orbax.checkpoint import checkpoint_managers as ocp_managers

from selfplay_jax import checkpoint_messages
from selfplay_jax.errors import (CheckpointCorruptedError, CheckpointError,  # noqa: F401
                                 CheckpointMismatchError, CheckpointNotFoundError,
                                 CheckpointWriteError)

PyTree = Any
log = logging.getLogger(__name__)

_STATE, _DATA, _CONFIG, _METRICS = "state", "data_state", "config", "round_metrics"
_ITEMS = (_STATE, _DATA, _CONFIG, _METRICS)


_SPACE_MARGIN = 1 << 18  # bytes of metadata / JSON items on top of the arrays


def state_nbytes(state: PyTree) -> int:
  """Bytes of the arrays in `state` (what one checkpoint step needs on disk, before metadata)."""
  total = 0
  for leaf in jax.tree.leaves(state):
    spec = _stored_spec(leaf)
    if spec is not None:
      total += math.prod(spec[0]) * spec[1].itemsize
  return total


# ---------------------------------------------------------------------------------------------
# Retention.


@dataclasses.dataclass
class _BestByMetric:
  """Orbax preservation policy: keep the `n` steps with the best metric (ties: the later step)."""

  n: int
  mode: str
  metric_of: Callable[[int], float | None]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    sign = 1.0 if self.mode == "max" else -1.0
    scored = [(sign * v, c.step) for c in checkpoints if (v := self.metric_of(c.step)) is not None]
    best = {step for _, step in sorted(scored, reverse=True)[:self.n]}
    return [c.step in best for c in checkpoints]


def _metric_value(metrics: Mapping[str, Any] | None, key: str | None) -> float | None:
  """`metrics[key]` (or the nested `metrics[a][b]` for key "a/b") as a finite float, else None."""
  if key is None or not metrics:
    return None
  value: Any = metrics.get(key)
  if value is None:
    value = metrics
    for part in key.split("/"):
      value = value.get(part) if isinstance(value, Mapping) else None
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# JSON items.


def _jsonable(x: Any) -> Any:
  """Host JSON version of a metrics tree (jax/numpy scalars -> Python numbers, arrays -> lists)."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(x).tolist()
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  return str(x)


def _encode_data_state(data_state: Mapping[str, Any] | bytes | None) -> dict[str, Any]:
  if data_state is None:
    return {"format": "none"}
  if isinstance(data_state, (bytes, bytearray)):
    return {"format": "bytes", "base64": base64.b64encode(bytes(data_state)).decode("ascii")}
  if isinstance(data_state, Mapping):
    return {"format": "json", "value": dict(data_state)}
  raise TypeError(f"data_state must be a JSON-able dict, bytes or None; got {type(data_state)}")


def _decode_data_state(item: Mapping[str, Any]) -> Mapping[str, Any] | bytes | None:
  fmt = item["format"]
  if fmt == "none":
    return None
  if fmt == "bytes":
    return base64.b64decode(item["base64"])
  if fmt == "json":
    return item["value"]
  raise ValueError(f"unknown data_state format {fmt!r}")


# ---------------------------------------------------------------------------------------------
# Restore-target checks.


def _path_parts(path: Sequence[Any]) -> tuple[str, ...]:
  """A jax key path as plain strings (dict key, sequence index or attribute name)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return tuple(parts)


def _stored_spec(leaf: Any) -> tuple[tuple[int, ...], np.dtype] | None:
  """Shape and canonical dtype a leaf has on disk (typed keys are stored as their key data)."""
  if not hasattr(leaf, "dtype"):
    if not isinstance(leaf, (bool, int, float, complex, np.generic)):
      return None
    leaf = np.asarray(leaf)
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape), np.dtype(jax.dtypes.canonicalize_dtype(leaf.dtype))


def _describe(spec: tuple[tuple[int, ...], np.dtype] | None) -> str:
  return "unknown shape/dtype" if spec is None else f"shape {spec[0]} dtype {spec[1]}"


def check_matches(tree_metadata: PyTree, abstract_state: PyTree, *, where: str = "") -> None:
  """Raises CheckpointMismatchError at the first key path where checkpoint and target differ."""
  is_leaf = lambda x: x is not None and not isinstance(x, (Mapping, list, tuple))
  saved = {_path_parts(p): leaf for p, leaf in
           jax.tree_util.tree_flatten_with_path(tree_metadata, is_leaf=is_leaf)[0]}
  seen = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    key = _path_parts(path)
    name = "/".join(key)
    if key not in saved:
      raise CheckpointMismatchError(
          f"{where}target key '{name}' ({_describe(_stored_spec(leaf))}) is missing from the "
          "checkpoint")
    seen.add(key)
    want, got = _stored_spec(leaf), _stored_spec(saved[key])
    if want is not None and got is not None and want != got:
      raise CheckpointMismatchError(
          f"{where}mismatch at '{name}': checkpoint has {_describe(got)}, target has "
          f"{_describe(want)}")
  extra = sorted(k for k in saved if k not in seen)
  if extra:
    raise CheckpointMismatchError(
        f"{where}checkpoint key '{'/'.join(extra[0])}' ({_describe(_stored_spec(saved[extra[0]]))})"
        f" is not in the target state ({len(extra)} extra key(s))")


def _concrete_shardings(abstract_state: PyTree, mesh: jax.sharding.Mesh | None) -> PyTree:
  """Replaces NamedShardings over an AbstractMesh (as `jax.eval_shape` gives) by concrete ones, and
  no sharding by this process's first device."""
  meshes: dict[Any, jax.sharding.Mesh] = {}

  def concrete_mesh(am: jax.sharding.AbstractMesh) -> jax.sharding.Mesh:
    if am not in meshes:
      m = mesh or jax.make_mesh(am.axis_sizes, am.axis_names, axis_types=am.axis_types)
      if tuple(m.shape.items()) != tuple(am.shape.items()):
        raise ValueError(f"restore(mesh=...) has shape {dict(m.shape)}, target leaves use "
                         f"{dict(am.shape)}")
      meshes[am] = m
    return meshes[am]

  def fix(leaf: Any) -> Any:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.ShapeDtypeStruct) and sharding is None:
      # No sharding asked for (eval, export): this process's first device, whatever mesh wrote it.
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type,
                                  sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    if (isinstance(leaf, jax.ShapeDtypeStruct) and isinstance(sharding, NamedSharding)
        and isinstance(sharding.mesh, jax.sharding.AbstractMesh)):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type,
                                  sharding=NamedSharding(concrete_mesh(sharding.mesh),
                                                         sharding.spec))
    return leaf

  return jax.tree.map(fix, abstract_state)


# ---------------------------------------------------------------------------------------------
# Unreadable steps: one line naming the file, and no asyncio noise.


def complete_steps(workdir: str | os.PathLike) -> list[int]:
  """Finalized steps under `<workdir>/checkpoints`, ascending; creates nothing (unlike a
  `Checkpointer`), so `eval` / `export` / `train` can look before they write."""
  directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(m.step for m in ocp.step.standard_name_format().find_all(directory))


# ---------------------------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """Async Orbax checkpoints of one run under `<workdir>/checkpoints` (see the module doc)."""

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: str | None = "eval/accuracy",
               best_mode: str = "max", keep_best: int = 1, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1 (the newest step is always kept), got {keep}")
    if keep_best < 0 or best_mode not in ("max", "min"):
      raise ValueError(f"need keep_best >= 0 and best_mode in ('max', 'min'); got {keep_best}, "
                       f"{best_mode!r}")
    # Orbax needs an absolute path; a relative --workdir is relative to the current directory.
    self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
    self.best_metric = best_metric
    self.restored_step: int | None = None
    self._metric_cache: dict[int, float | None] = {}
    self._skipped_steps: set[int] = set()
    policies: list[Any] = [ocp_managers.LatestN(n=keep)]
    if best_metric is not None and keep_best > 0:
      policies.append(_BestByMetric(n=keep_best, mode=best_mode, metric_of=self._metric_cache.get))
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies))
    handlers = {_STATE: ocp.StandardCheckpointHandler(),
                **{name: ocp.JsonCheckpointHandler() for name in (_DATA, _CONFIG, _METRICS)}}
    try:
      self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                            options=options)
    except OSError as e:
      raise CheckpointWriteError(f"cannot create or clean {self.directory}: "
                                 f"{e.strerror or e}") from None
    self._pending: int | None = None  # the step whose async save may still be running
    for step in self._manager.all_steps():  # steps of earlier runs compete for "best" too
      self._metric_cache[step] = self._read_metric(step)

  # -- bookkeeping ---------------------------------------------------------------------------

  def _read_metric(self, step: int) -> float | None:
    """The best-metric value saved with `step` (None if absent or unreadable)."""
    if self.best_metric is None:
      return None
    try:
      metrics = self._manager.restore(step, args=ocp.args.Composite(
          **{_METRICS: ocp.args.JsonRestore()}))[_METRICS]
    except Exception as e:  # pylint: disable=broad-except
      log.warning("checkpoint step %d: cannot read its metrics (%s)", step, e)
      metrics = None
    return _metric_value(metrics, self.best_metric)

  def all_steps(self) -> list[int]:
    """Finalized steps on disk, ascending (in-progress `*.orbax-checkpoint-tmp-*` dirs excluded)."""
    return complete_steps(self.directory.parent)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _write_failed(self, step: int | None, error: BaseException) -> CheckpointWriteError:
    """A clear error for a failed save (Orbax raises it from its writer threads as ValueError)."""
    text = str(error).strip().splitlines()[0][:400] if str(error).strip() else type(error).__name__
    try:
      done = [s for s in self.all_steps() if s != step]
    except OSError:
      done = []
    kept = (f"the last complete checkpoint is step {done[-1]}" if done else
            "no complete checkpoint exists yet")
    return CheckpointWriteError(f"writing checkpoint step {step} in {self.directory} failed "
                                f"({text}); {kept}")

  def wait(self) -> None:
    """Blocks until pending async saves are finalized (and old steps deleted)."""
    pending, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_failed(pending, e) from None

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type: Any, *exc: Any) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # already failing: finish or drop pending saves quietly, keep the original error
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      log.warning("while stopping after an error: %s", e)

  def check_space(self, step: int, state: PyTree) -> None:
    """Raises CheckpointWriteError before writing when the disk cannot hold one more step (with an
    async save still writing, it is counted too; when that makes the difference, it is waited for
    and the check repeated)."""
    one = state_nbytes(state) * 21 // 20 + _SPACE_MARGIN
    try:
      free = shutil.disk_usage(str(self.directory)).free
    except (OSError, ValueError):
      return  # e.g. a remote filesystem without statvfs: let the write itself report
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._pending = None
    if self._pending is not None and free < 2 * one:
      self.wait()
      free = shutil.disk_usage(str(self.directory)).free
    if free < one:
      raise self._write_failed(step, OSError(
          f"no space left: {free / 2**20:.2f} MiB free, about {one / 2**20:.2f} MiB needed; "
          "nothing written"))

  # -- save ----------------------------------------------------------------------------------

  def save(self, step: int, state: PyTree, *, data_state: Mapping[str, Any] | bytes | None = None,
           config_json: str | None = None, metrics: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Starts an async save of `step`; returns whether a save was started.

    `state`: a pytree of jax arrays (possibly sharded), numpy arrays, Python scalars, typed keys.
    `data_state`: the data iterator's `get_state()` (JSON-able dict or bytes). `metrics`: the round
    metrics (converted to host JSON here, which waits for them). A step that `restore` skipped as
    unreadable is deleted before it is written again.
    """
    metrics_json = _jsonable(dict(metrics or {}))
    if step in self._skipped_steps:
      log.warning("deleting unreadable checkpoint step %d before saving it again", step)
      self.wait()
      self._manager.reload()
      self._manager.delete(step)
      self._skipped_steps.discard(step)
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(_encode_data_state(data_state)),
        _CONFIG: ocp.args.JsonSave({"config_json": config_json}),
        _METRICS: ocp.args.JsonSave(metrics_json),
    })
    had, previous = step in self._metric_cache, self._metric_cache.get(step)
    self._metric_cache[step] = _metric_value(metrics_json, self.best_metric)  # seen by retention
    saved = False
    try:
      if self.directory.exists():
        self.check_space(step, state)
      saved = self._manager.save(step, args=args, force=force)
    except CheckpointWriteError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Saving first waits for the previous async save, whose failure surfaces here.
      raise self._write_failed(self._pending if self._pending is not None else step, e) from None
    finally:
      if not saved:
        self._metric_cache.pop(step)
        if had:
          self._metric_cache[step] = previous
    if saved:
      self._pending = step
    return saved

  # -- restore -------------------------------------------------------------------------------

  def restore(self, step: int | None = None, *, abstract_state: PyTree,
              mesh: jax.sharding.Mesh | None = None,
              ) -> tuple[PyTree, Mapping[str, Any] | bytes | None, str | None, dict[str, Any]]:
    """Restores `(state, data_state, config_json, metrics)` into `abstract_state`'s structure.

    `abstract_state`: `jax.ShapeDtypeStruct`s (with the shardings wanted) or concrete arrays.
    Shardings over an AbstractMesh (from `jax.eval_shape`) are made concrete on `mesh`, or on
    `jax.make_mesh` of the same axes; leaves without a sharding go to the first local device. A
    checkpoint written on any mesh restores onto any other. With `step=None`, the newest readable step is used and
    unreadable newer ones are logged and skipped; the step used is `self.restored_step`.
    """
    checkpoint_messages.quiet_closed_event_loop_errors()
    self.wait()
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(found {sorted(steps)})")
    if not steps:
      raise CheckpointNotFoundError(f"no complete checkpoint in {self.directory}")
    abstract_state = _concrete_shardings(abstract_state, mesh)
    problems = []
    for s in [step] if step is not None else steps:
      try:
        out = self._restore_step(s, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        problem = checkpoint_messages.describe_failure(self.directory / str(s), e,
                                                       (_DATA, _CONFIG, _METRICS))[:500]
        problems.append(f"step {s}: {problem}")
        self._skipped_steps.add(s)
        log.warning("checkpoint step %d in %s is unreadable (%s)%s", s, self.directory, problem,
                    "" if step is not None else "; trying the previous step")
        continue
      self.restored_step = s
      return out
    raise CheckpointCorruptedError(f"no usable checkpoint in {self.directory}: "
                                   + "; ".join(problems))

  def read_config(self, step: int) -> str | None:
    """The config JSON saved with `step`, or None when it cannot be read (restore reports why)."""
    try:
      item = self._manager.restore(step, args=ocp.args.Composite(
          **{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
      return item["config_json"]
    except Exception as e:  # pylint: disable=broad-except
      log.warning("checkpoint step %d: cannot read its config (%s)", step, e)
      return None

  def _restore_step(self, step: int, abstract_state: PyTree):
    meta = self._manager.item_metadata(step)
    missing = [n for n in _ITEMS if n not in meta.keys()]
    step_dir = self.directory / str(step)
    if missing:
      raise CheckpointCorruptedError(f"{step_dir / missing[0]}: missing ({len(missing)} item(s))")
    if meta[_STATE] is None:
      raise CheckpointCorruptedError(f"{step_dir / _STATE / '_METADATA'}: missing or unreadable")
    tree = getattr(meta[_STATE], "tree", meta[_STATE])
    check_matches(tree, abstract_state, where=f"checkpoint step {step}: ")
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract_state),
        _DATA: ocp.args.JsonRestore(), _CONFIG: ocp.args.JsonRestore(),
        _METRICS: ocp.args.JsonRestore()}))
    missing = [n for n in _ITEMS if restored[n] is None]
    if missing:
      raise CheckpointCorruptedError(f"{step_dir / missing[0]}: could not be read")
    return (restored[_STATE], _decode_data_state(restored[_DATA]),
            restored[_CONFIG]["config_json"], dict(restored[_METRICS]))
