"""Tests for selfplay_jax.checkpoint (8 fake CPU devices, see conftest.py)."""

import json
import logging
import shutil
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from selfplay_jax import checkpoint as ckpt_lib
from tests.fault_fs import tmpfs

# A failed tensorstore read (the corruption tests) can leave an "Event loop is closed" callback error
# that surfaces later, during any test: Orbax-internal noise after the error we test for was raised.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int = 0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"dense": {"w": jax.random.normal(k1, (4, 3), jnp.float32),
                      "b": jax.random.normal(k2, (3,), jnp.bfloat16)},
            "emb": jnp.arange(12, dtype=jnp.float32).reshape(6, 2) + seed}
  return {"params": params, "opt_state": optax.adamw(1e-3).init(params),
          "step": jnp.int32(seed), "rng": jax.random.key(seed + 1),
          "rbg": jax.random.key(seed + 2, impl="rbg"), "host": {"np": np.arange(5, dtype=np.int32) * seed}}


def _assert_tree_equal(a, b):
  """Same tree structure and every leaf bitwise equal (typed keys: same impl and key data)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert x.dtype == y.dtype, name
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    np.testing.assert_array_equal(x, y, err_msg=name)
    assert x.tobytes() == y.tobytes(), name


def _save_steps(ckpt, steps, **kw):
  for s in steps:
    ckpt.save(s, _state(s), data_state={"next_index": s}, config_json=json.dumps({"s": s}),
              metrics={"eval/accuracy": 0.1 * s}, **kw)
  ckpt.wait()


def test_roundtrip_is_bitwise(tmp_path):
  state = _state(3)
  config = json.dumps({"model": {"d": 8}, "lr": 1e-3})
  metrics = {"eval/accuracy": jnp.float32(0.5), "loss": np.float64(1.25), "n": 3,
             "hist": jnp.arange(3), "nested": {"x": jnp.bfloat16(2.0)}}
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, data_state={"next_index": 12, "epoch": [1, 2]},
                     config_json=config, metrics=metrics)
    ckpt.save(8, state, data_state=b"\x00grain\xffbytes")  # bytes state, no config/metrics
    ckpt.wait()
    assert ckpt.all_steps() == [7, 8] and ckpt.latest_step() == 8
    abstract = jax.eval_shape(lambda: state)
    got, data_state, config_json, got_metrics = ckpt.restore(7, abstract_state=abstract)
    assert ckpt.restored_step == 7
    _assert_tree_equal(state, got)
    assert got["rng"].dtype == state["rng"].dtype and got["rbg"].dtype == state["rbg"].dtype
    assert data_state == {"next_index": 12, "epoch": [1, 2]}
    assert config_json == config
    assert got_metrics == {"eval/accuracy": 0.5, "loss": 1.25, "n": 3, "hist": [0, 1, 2],
                           "nested": {"x": 2.0}}
    got, data_state, config_json, got_metrics = ckpt.restore(abstract_state=abstract)
    assert ckpt.restored_step == 8
    _assert_tree_equal(state, got)
    assert (data_state, config_json, got_metrics) == (b"\x00grain\xffbytes", None, {})


def test_sharded_restore_into_another_sharding(tmp_path):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  shard = lambda spec: NamedSharding(mesh, spec)
  state = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), shard(P("data", "fsdp"))),
           "v": jax.device_put(jnp.arange(16, dtype=jnp.bfloat16), shard(P(("data", "fsdp")))),
           "rng": jax.random.key(0), "step": jnp.int32(4)}
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state)
    target = {"w": shard(P("fsdp", None)), "v": shard(P()), "rng": shard(P()),
              "step": shard(P())}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, target)
    got = ckpt.restore(abstract_state=abstract)[0]
    _assert_tree_equal(state, got)
    for name in state:
      assert got[name].sharding.is_equivalent_to(target[name], got[name].ndim), name
    # `jax.eval_shape` gives shardings over an AbstractMesh: made concrete with the same spec.
    got = ckpt.restore(abstract_state=jax.eval_shape(lambda: state))[0]
    _assert_tree_equal(state, got)
    assert got["w"].sharding.spec == P("data", "fsdp")


def test_keeps_latest_n_plus_best(tmp_path):
  accuracy = {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.4, 6: 0.5}
  with ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1) as ckpt:
    for step, acc in accuracy.items():
      ckpt.save(step, {"x": jnp.float32(step)}, metrics={"eval/accuracy": acc})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
  on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert on_disk == [2, 5, 6]
  # A restarted run still knows step 2 is best (metrics re-read); steps without it just rotate.
  with ckpt_lib.Checkpointer(str(tmp_path), keep=2, keep_best=1) as ckpt:
    for step in (7, 8, 9):
      ckpt.save(step, {"x": jnp.float32(step)}, metrics={"loss": 1.0})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 8, 9]
  with ckpt_lib.Checkpointer(str(tmp_path / "min"), keep=1, best_metric="loss", best_mode="min",
                             keep_best=2) as ckpt:
    for step, loss in {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0, 5: 4.0}.items():
      ckpt.save(step, {"x": jnp.float32(step)}, metrics={"loss": loss})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3, 5]


def _step_dir(tmp_path, step):
  return tmp_path / "checkpoints" / str(step)


def _truncate_largest_data_file(d):
  f = max((p for p in (d / "state" / "d").iterdir()), key=lambda p: p.stat().st_size)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


CORRUPTIONS = {
    "truncated_array_data": _truncate_largest_data_file,
    "deleted_ocdbt_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "deleted_state_metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "deleted_item_dir": lambda d: shutil.rmtree(d / "data_state"),
    "truncated_json_item": lambda d: [p.write_text('{"conf') for p in (d / "config").iterdir()
                                      if p.name != "commit_success.txt"],
}


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog, corrupt):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    _save_steps(ckpt, [1, 2, 3])
  CORRUPTIONS[corrupt](_step_dir(tmp_path, 3))
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt, caplog.at_level(logging.WARNING):
    state, data_state, config_json, metrics = ckpt.restore(
        abstract_state=jax.eval_shape(lambda: _state(0)))
    assert ckpt.restored_step == 2
    _assert_tree_equal(_state(2), state)
    assert (data_state, config_json) == ({"next_index": 2}, '{"s": 2}')
    assert metrics == {"eval/accuracy": pytest.approx(0.2)}
    [message] = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    # The step and the file (or item) are named; TensorStore's spec JSON and status codes are not.
    assert "step 3" in message and f"({_step_dir(tmp_path, 3)}/" in message, message
    assert not any(t in message for t in ("tensorstore_spec", "OUT_OF_RANGE", "NOT_FOUND")), message
    if corrupt == "truncated_array_data":  # resuming overwrites the unreadable step
      _save_steps(ckpt, [3])
      ckpt.restore(abstract_state=jax.eval_shape(lambda: _state(0)))
      assert ckpt.restored_step == 3


def test_all_corrupted_is_a_clear_error(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    _save_steps(ckpt, [1, 2])
  for step in (1, 2):
    _truncate_largest_data_file(_step_dir(tmp_path, step))
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointCorruptedError, match=r"step 2: .*step 1: "):
      ckpt.restore(abstract_state=jax.eval_shape(lambda: _state(0)))
    with pytest.raises(ckpt_lib.CheckpointCorruptedError, match=r"step 2: "):  # no fallback
      ckpt.restore(2, abstract_state=jax.eval_shape(lambda: _state(0)))
  with ckpt_lib.Checkpointer(str(tmp_path / "empty")) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointNotFoundError, match="no complete checkpoint"):
      ckpt.restore(abstract_state={})
    with pytest.raises(ckpt_lib.CheckpointNotFoundError, match="step 5"):
      ckpt.restore(5, abstract_state={})


def test_mismatch_names_the_key_path(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, _state(1))
    abstract = jax.eval_shape(lambda: _state(0))

    wrong_shape = jax.tree.map(lambda x: x, abstract)
    wrong_shape["params"]["dense"]["w"] = jax.ShapeDtypeStruct((4, 5), jnp.float32)
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"params/dense/w.*\(4, 3\) dtype float32.*\(4, 5\) dtype float32"):
      ckpt.restore(abstract_state=wrong_shape)

    wrong_dtype = jax.tree.map(lambda x: x, abstract)
    wrong_dtype["params"]["emb"] = jax.ShapeDtypeStruct((6, 2), jnp.bfloat16)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"params/emb.*float32.*bfloat16"):
      ckpt.restore(abstract_state=wrong_dtype)

    extra_key = jax.tree.map(lambda x: x, abstract)
    extra_key["params"]["dense"]["scale"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"'params/dense/scale'.*missing from the checkpoint"):
      ckpt.restore(abstract_state=extra_key)

    missing_key = jax.tree.map(lambda x: x, abstract)
    del missing_key["rng"]
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"'rng'.*not in the target"):
      ckpt.restore(abstract_state=missing_key)

    wrong_key_impl = jax.tree.map(lambda x: x, abstract)
    wrong_key_impl["rng"] = jax.eval_shape(lambda: jax.random.key(0, impl="rbg"))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"'rng'.*\(2,\).*\(4,\)"):
      ckpt.restore(abstract_state=wrong_key_impl)


def test_in_progress_tmp_dir_is_ignored(tmp_path):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    _save_steps(ckpt, [1, 2])
  root = tmp_path / "checkpoints"
  # What a process killed mid-save leaves behind: a half-written, never renamed step.
  tmp_dir = root / "3.orbax-checkpoint-tmp-1712345678901234"
  shutil.copytree(root / "2", tmp_dir)
  _truncate_largest_data_file(tmp_dir)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    # Deleted at start-up, so its space comes back; Orbax does it in a background thread.
    deadline = time.monotonic() + 30
    while tmp_dir.exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not tmp_dir.exists()
    ckpt.restore(abstract_state=jax.eval_shape(lambda: _state(0)))
    assert ckpt.restored_step == 2
    _save_steps(ckpt, [3])  # the resumed run writes step 3 for real
    assert ckpt.latest_step() == 3
    _assert_tree_equal(_state(3), ckpt.restore(abstract_state=jax.eval_shape(_state))[0])


def test_async_save_is_visible_only_when_complete(tmp_path):
  big = lambda v: {"w": jnp.full((1024, 1024), v, jnp.float32)}
  with ckpt_lib.Checkpointer(str(tmp_path)) as writer, \
       ckpt_lib.Checkpointer(str(tmp_path)) as reader:
    writer.save(1, big(1.0))
    writer.wait()
    writer.save(2, big(2.0))  # async: returns while the write goes on in the background
    while 2 not in (steps := reader.all_steps()):  # a concurrent reader sees only step 1 ...
      assert steps == [1]
    got = reader.restore(abstract_state=jax.eval_shape(lambda: big(0.0)))[0]  # ... or all of 2
    assert reader.restored_step == 2
    np.testing.assert_array_equal(got["w"], big(2.0)["w"])


def test_grain_iterator_state_roundtrip(tmp_path):
  dataset = grain.MapDataset.range(100).shuffle(seed=0).batch(4)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(3, {"x": jnp.zeros(())}, data_state=iterator.get_state())
    expected = [next(iterator) for _ in range(5)]
    _, data_state, _, _ = ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((), jnp.float32)})
  fresh = iter(dataset)
  fresh.set_state(data_state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh), want)


def _big_state(value: float):
  w = jax.random.normal(jax.random.key(value), (64, 1024), jnp.float32)  # 256 KiB, incompressible
  return {"w": w, "step": jnp.int32(value)}


def test_space_is_checked_before_writing(tmp_path, monkeypatch):
  with ckpt_lib.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _big_state(1))
    ckpt.wait()
    free = lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 300 << 10)  # 300 KiB free
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", free)
    with pytest.raises(ckpt_lib.CheckpointWriteError,
                       match=r"writing checkpoint step 2 in .*checkpoints failed \(no space left: "
                             r"0\.29 MiB free, about 0\.51 MiB needed; nothing written\); the last "
                             r"complete checkpoint is step 1"):
      ckpt.save(2, _big_state(2))
    assert ckpt.all_steps() == [1]
    assert not list((tmp_path / "checkpoints").glob("2*"))
  # 64 * 1024 * 4 + 4 array bytes, + 5% + 256 KiB of metadata = 537399 bytes = 0.51 MiB
  assert ckpt_lib.state_nbytes(_big_state(0)) == 64 * 1024 * 4 + 4


def test_failed_async_write_is_reported_and_older_steps_survive(monkeypatch):
  """A real ENOSPC inside Orbax's writer threads (the space check fooled) surfaces at the next save
  or wait as one CheckpointWriteError naming the step; the previous step still restores."""
  monkeypatch.setattr(ckpt_lib.shutil, "disk_usage",
                      lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
  with tmpfs("600k") as mnt:
    ckpt = ckpt_lib.Checkpointer(str(mnt))
    ckpt.save(1, _big_state(1))
    ckpt.wait()
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
      ckpt.save(2, _big_state(2))
      ckpt.wait()
    message = str(info.value)
    assert "writing checkpoint step 2" in message and "No space left on device" in message
    assert message.endswith("the last complete checkpoint is step 1")
    ckpt.close()
    with ckpt_lib.Checkpointer(str(mnt)) as again:  # start-up removes the half-written step
      assert again.all_steps() == [1]
      state = again.restore(abstract_state=jax.eval_shape(lambda: _big_state(0)))[0]
      _assert_tree_equal(_big_state(1), state)
