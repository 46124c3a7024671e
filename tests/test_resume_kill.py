"""SIGKILL mid-run (as a round starts, while the previous async save may be in flight) and right
after a checkpoint save starts, and SIGTERM / SIGINT (preemption, Ctrl-C: finish the round, save,
exit 128 + signal); in every case the restarted run ends bit-identical to an uninterrupted one."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from selfplay_jax import checkpoint, config_lib
from selfplay_jax import setup
from tests.fault_fs import tmpfs

OVERRIDES = ["warmup.rounds=2", "rounds=4", "eval.every_rounds=3", "eval.num_examples=8",
             "eval.batch_size=8", "data.batch_size=4", "sampling.n=2", "sampling.max_new_tokens=6",
             "data.difficulty=1", "model.hidden_size=32", "model.intermediate_size=64",
             "model.num_layers=1", "progress_bar=false"]


def _train(workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [f"--config.{o}" for o in OVERRIDES + list(extra)]
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "train", f"--workdir={workdir}",
                         *args], env=env, capture_output=True, text=True, timeout=600)


def _state(workdir):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), OVERRIDES)
  task, tok = setup.task_and_tokenizer(cfg, workdir)
  mc = setup.model_config(cfg, tok)
  like = setup.initial_state(cfg, mc, setup.build_spec(cfg), setup.build_optimizer(cfg))
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, data_state, _, _ = ckpt.restore(abstract_state=like)
    return jax.device_get(state), data_state, ckpt.restored_step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  res = _train(workdir)
  assert res.returncode == 0, res.stderr
  return _state(workdir), workdir


@pytest.mark.slow
@pytest.mark.parametrize("kill_round, point, sig", [
    (4, "save", "SIGKILL"), (5, "round", "SIGKILL"), (2, "save", "SIGKILL"),
    (3, "round", "SIGTERM"), (4, "save", "SIGINT")])
def test_kill_then_resume_is_bit_identical(reference, tmp_path, kill_round, point, sig):
  (ref_state, ref_data, ref_step), ref_dir = reference
  killed = _train(tmp_path, f"debug.kill_at_round={kill_round}", f"debug.kill_point={point}",
                  f"debug.kill_signal={sig}")
  if sig == "SIGKILL":
    assert killed.returncode == -9, killed.stderr  # really died of SIGKILL
  else:  # graceful: the round in flight finishes and is saved, then exit 128 + signal number
    assert killed.returncode == {"SIGTERM": 143, "SIGINT": 130}[sig], killed.stderr
    assert f"received {sig}: finished and saved round {kill_round}" in killed.stderr
    assert "Traceback" not in killed.stderr
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
      assert ckpt.latest_step() == kill_round
    rounds = [json.loads(l)["round"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, kill_round + 1))
  resumed = _train(tmp_path)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from" in resumed.stdout
  state, data_state, step = _state(tmp_path)
  assert step == ref_step == 6
  for a, b in zip(jax.tree.leaves((ref_state.params, ref_state.opt_state, ref_state.ref_params)),
                  jax.tree.leaves((state.params, state.opt_state, state.ref_params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(jax.random.key_data(ref_state.rng), jax.random.key_data(state.rng))
  assert data_state == ref_data
  # metrics.jsonl has each round exactly once, and the same training numbers.
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  ref_lines = [json.loads(l) for l in (ref_dir / "metrics.jsonl").read_text().splitlines()]
  assert [m["round"] for m in lines] == list(range(1, 7))
  for m, r in zip(lines, ref_lines):
    assert m["train/loss"] == r["train/loss"] and m["eval/accuracy"] == r["eval/accuracy"]


@pytest.mark.slow
def test_full_disk_stops_with_a_clear_error_then_resumes_bit_identically(reference):
  """On a 1.5 MiB filesystem the third checkpoint does not fit: the run stops with one error naming
  the step and the last complete checkpoint, before writing anything. After the disk grows, the same
  command resumes and ends where an uninterrupted run ends."""
  (ref_state, ref_data, ref_step), _ = reference
  with tmpfs("1536k") as mnt:
    workdir = mnt / "run"
    full = _train(workdir)
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith("error: writing checkpoint step ") and "no space left" in error, error
    assert f"in {workdir}/checkpoints failed" in error
    failed_step = int(error.split("checkpoint step ")[1].split()[0])
    with checkpoint.Checkpointer(str(workdir)) as ckpt:
      steps = ckpt.all_steps()
    assert steps and steps[-1] == failed_step - 1 and f"last complete checkpoint is step {steps[-1]}" in error
    assert _state(workdir)[2] == steps[-1]  # the newest complete step restores
    subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)], check=True)
    resumed = _train(workdir)
    assert resumed.returncode == 0, resumed.stderr
    state, data_state, step = _state(workdir)
    assert step == ref_step == 6 and data_state == ref_data
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state)):
      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
