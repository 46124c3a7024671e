"""`eval` and `export` on a finished run when something is wrong around it: a read-only workdir, a
full disk, no checkpoint, an unreadable newest checkpoint, a file where a directory should be, bad
flag values. Each is one `error:` line (exit 2) or a clean fallback, never a traceback, and nothing
half-written is left behind. Through the CLI, as a user runs it."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.fault_fs import tmpfs
from tests.test_resume_kill import _train

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", *args], env=env,
                        capture_output=True, text=True, timeout=300)


def _no_traceback(res: subprocess.CompletedProcess) -> None:
  assert "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A finished tiny run: 3 rounds, checkpoints 1, 2, 3. Tests that change it use a copy."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  res = _train(workdir, "rounds=1")
  assert res.returncode == 0, res.stderr
  return workdir


def _copy(run_dir, dest):
  shutil.copytree(run_dir, dest)
  for f in dest.glob("eval_round_*.json"):
    f.unlink()
  return dest


# ---- eval ----------------------------------------------------------------------------------------


def test_eval_prints_results_without_orbax_info_lines(run_dir, tmp_path):
  """`train` hides Orbax's INFO lines; `eval` does the same (about 60 of them before)."""
  workdir = _copy(run_dir, tmp_path / "run")
  res = _cli("eval", f"--workdir={workdir}", "--k=0")
  assert res.returncode == 0, res.stderr
  info = [l for l in res.stderr.splitlines() if re.match(r"I\d{4} ", l)]
  assert not info, info[:5]
  assert "round: 3" in res.stdout and "eval/accuracy: " in res.stdout
  assert json.loads((workdir / "eval_round_0003.json").read_text())["round"] == 3


def test_eval_on_a_read_only_workdir_shows_the_results_then_says_they_were_not_saved(run_dir):
  with tmpfs("4m") as mnt:
    workdir = _copy(run_dir, mnt / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    res = _cli("eval", f"--workdir={workdir}", "--k=0")
  assert res.returncode == 2, res.stderr[-2000:]
  _no_traceback(res)
  assert "round: 3" in res.stdout and "eval/accuracy: " in res.stdout  # the results survive
  assert res.stderr.strip().splitlines()[-1] == (
      f"error: cannot write {workdir}/eval_round_0003.json: Read-only file system (the results "
      "above were not saved)")


def test_eval_without_a_checkpoint_is_one_error_and_creates_no_checkpoints_dir(run_dir, tmp_path):
  workdir = tmp_path / "no_checkpoint"
  workdir.mkdir()
  shutil.copy(run_dir / "config.json", workdir / "config.json")
  for command in (["eval", "--k=0"], ["export", f"--out={tmp_path / 'model'}"]):
    res = _cli(command[0], f"--workdir={workdir}", *command[1:])
    assert res.returncode == 2, res.stderr[-2000:]
    _no_traceback(res)
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"error: no complete checkpoint in {workdir}/checkpoints"), res.stderr[-2000:]
    assert not (workdir / "checkpoints").exists()
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("value", ["0", "-5"])
def test_eval_num_examples_must_be_positive(run_dir, value):
  res = _cli("eval", f"--workdir={run_dir}", f"--num_examples={value}")
  assert res.returncode == 2
  _no_traceback(res)
  assert res.stderr.strip().splitlines() == [
      f"error: --num_examples: must be >= 1, got {value} (leave it out for the run's "
      "eval.num_examples)"]


def test_unreadable_newest_checkpoint_is_named_without_tensorstore_internals(run_dir, tmp_path):
  """The newest step's array data truncated: eval falls back to the previous step with one
  warning naming the step and the file, and none of TensorStore's spec JSON or the asyncio
  "Event loop is closed" tracebacks its failed read used to print by the dozen."""
  workdir = _copy(run_dir, tmp_path / "run")
  data = workdir / "checkpoints" / "3" / "state" / "d"
  damaged = max(data.iterdir(), key=lambda p: p.stat().st_size)
  damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
  res = _cli("eval", f"--workdir={workdir}", "--k=0")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "round: 2" in res.stdout
  _no_traceback(res)
  assert "Event loop is closed" not in res.stderr
  # "is unreadable (": pytest's tmp_path is named after this test, so a bare "unreadable" also
  # matches any other line that mentions the workdir.
  lines = [l for l in res.stderr.splitlines() if "is unreadable (" in l]
  assert len(lines) == 1, res.stderr[-3000:]
  [line] = lines
  assert f"checkpoint step 3 in {workdir}/checkpoints is unreadable ({damaged}: " in line, line
  assert "trying the previous step" in line
  for internal in ("tensorstore_spec", "OCDBT", "zarr", "OUT_OF_RANGE"):
    assert internal not in line, line


# ---- export --------------------------------------------------------------------------------------


def test_export_to_a_full_disk_is_one_error_and_leaves_nothing(run_dir, tmp_path):
  with tmpfs("16k") as mnt:
    res = _cli("export", f"--workdir={run_dir}", f"--out={mnt / 'model'}")
    left = sorted(p.name for p in mnt.iterdir())
  assert res.returncode == 2, res.stderr[-2000:]
  _no_traceback(res)
  assert res.stderr.strip().splitlines()[-1] == (
      f"error: --out {mnt}/model: cannot write the model (No space left on device); nothing was "
      "left there")
  assert left == []  # no empty or half-written model directory, no hidden temporary one
  # With room, the same export succeeds and leaves only the model.
  res = _cli("export", f"--workdir={run_dir}", f"--out={tmp_path / 'out' / 'model'}")
  assert res.returncode == 0, res.stderr[-2000:]
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]
  assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "out" / "model").iterdir()}


# ---- a file where a directory should be ----------------------------------------------------------


def test_a_file_given_as_workdir_or_out_is_named(run_dir, tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("x")
  cases = [
      (["train", f"--workdir={a_file}"],
       f"error: workdir {a_file} is a file, not a directory; give a new or existing directory as "
       "--workdir"),
      (["eval", f"--workdir={a_file}"],
       f"error: workdir {a_file} is a file, not a directory; give the directory a training run "
       "wrote (config.json and checkpoints/)"),
      (["report", f"--workdir={a_file}"], f"error: workdir {a_file} is a file, not a directory"),
      (["export", f"--workdir={a_file}", f"--out={tmp_path / 'model'}"],
       f"error: workdir {a_file} is a file, not a directory"),
      (["export", f"--workdir={run_dir}", f"--out={a_file}"],
       f"error: --out {a_file} is a file, not a directory; choose a new directory"),
  ]
  for args, text in cases:
    res = _cli(*args)
    assert res.returncode == 2, (args, res.stderr[-2000:])
    _no_traceback(res)
    assert res.stderr.strip().splitlines()[-1].startswith(text), (args, res.stderr[-500:])
  assert a_file.read_text() == "x"
