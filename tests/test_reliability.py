"""Faults a long run meets: divergence (non-finite updates), a full or read-only disk, a workdir
that holds another run, and the multi-host preemption notice. Each ends in one clear error (or a
clean stop) that loses nothing saved, and the restarted run matches an uninterrupted one."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from selfplay_jax import checkpoint
from tests.fault_fs import tmpfs
from tests.test_resume_kill import OVERRIDES, _state, _train

pytestmark = pytest.mark.slow


def _assert_same_run(a, b):
  (state_a, data_a, step_a), (state_b, data_b, step_b) = a, b
  assert step_a == step_b
  for x, y in zip(jax.tree.leaves((state_a.params, state_a.opt_state, state_a.ref_params)),
                  jax.tree.leaves((state_b.params, state_b.opt_state, state_b.ref_params))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(jax.random.key_data(state_a.rng), jax.random.key_data(state_b.rng))
  assert data_a == data_b


def _rounds(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _tree_bytes(directory):
  """{relative path: bytes} of every file under `directory` (to show nothing was touched)."""
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(Path(directory).rglob("*")) if p.is_file()}


# ---- divergence --------------------------------------------------------------------------------

NAN_ROUND_4 = ["debug.nan_from_round=4", "debug.nan_to_round=4", "optimizer.max_bad_updates=0"]


def test_divergence_stops_with_the_last_good_checkpoint_then_resumes(tmp_path):
  """NaN losses from round 4 on (2 updates per round): after 4 consecutive skipped updates (end of
  round 5) the run exits 3 without saving round 5. Restarted with the fault gone after round 4, it
  ends bit-identical to a run whose only bad round was round 4."""
  ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
  assert _train(ref_dir, *NAN_ROUND_4).returncode == 0
  bad = _train(run_dir, "debug.nan_from_round=4", "optimizer.max_bad_updates=4")
  assert bad.returncode == 3, bad.stderr
  assert "Traceback" not in bad.stderr
  assert ("error: round 5: 4 consecutive updates had a non-finite loss or gradient "
          "(optimizer.max_bad_updates=4); stopped without saving this round, the last complete "
          "checkpoint is round 4") in bad.stderr
  with checkpoint.Checkpointer(str(run_dir)) as ckpt:
    assert ckpt.all_steps()[-1] == 4
  lines = _rounds(run_dir)
  assert [m["round"] for m in lines] == [1, 2, 3, 4, 5]
  assert [m["train/skipped_fraction"] for m in lines[2:]] == [0.0, 1.0, 1.0]
  assert [m["train/consecutive_skipped"] for m in lines[2:]] == [0.0, 2.0, 4.0]
  assert lines[3]["train/loss"] is None  # NaN is logged as null
  resumed = _train(run_dir, *NAN_ROUND_4)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from" in resumed.stdout and "at round 4" in resumed.stdout
  _assert_same_run(_state(ref_dir), _state(run_dir))
  assert [m["round"] for m in _rounds(run_dir)] == list(range(1, 7))


# ---- disks that refuse writes ------------------------------------------------------------------


def test_read_only_and_impossible_workdirs_are_named(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  res = _train(not_a_dir / "run")
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert f"error: workdir {not_a_dir}/run is not usable: Not a directory" in res.stderr
  with tmpfs("1m", "ro") as mnt:
    res = _train(mnt / "run")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: workdir {mnt}/run is not usable: Read-only file system" in res.stderr


# ---- a workdir that holds another run ----------------------------------------------------------

SPIN = ["algorithm.name=spin", "sampling.n=1", "algorithm.num_minibatches=1", "rounds=1"]


@pytest.fixture(scope="module")
def spin_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("spin")
  res = _train(workdir, *SPIN)
  assert res.returncode == 0, res.stderr
  return workdir


@pytest.mark.parametrize("change, text", [
    ("algorithm.name=dpo", "error: algorithm.name: {w} holds a run (checkpoint round 3) made with "
                            "a different algorithm.name: 'spin' -> 'dpo'"),
    ("model.num_layers=2", "error: model.num_layers: {w} holds a run (checkpoint round 3) made with "
                           "a different model.num_layers: 1 -> 2"),
    # Not an identity key, but SPIN's replay slot changes the saved state's structure.
    ("algorithm.replay_previous=true", "does not fit this config: resume it with its own config"),
])
def test_resuming_another_run_is_one_error_and_touches_nothing(spin_run, change, text):
  before = _tree_bytes(spin_run)
  res = _train(spin_run, *SPIN, "rounds=2", change)
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr
  assert text.format(w=spin_run) in res.stderr.strip().splitlines()[-1]
  assert _tree_bytes(spin_run) == before


def test_resuming_with_changed_settings_warns_and_continues(spin_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(spin_run, workdir)
  res = _train(workdir, *SPIN, "rounds=2", "optimizer.learning_rate=0.0001")
  assert res.returncode == 0, res.stderr
  assert "resuming" in res.stderr and "optimizer.learning_rate: 0.0003 -> 0.0001" in res.stderr
  assert "rounds: 1 -> 2" in res.stderr
  assert [m["round"] for m in _rounds(workdir)] == [1, 2, 3, 4]


def test_a_run_killed_before_its_first_checkpoint_is_never_mixed_with_the_next(tmp_path):
  """Killed in round 3 with checkpoints every 5 rounds: metrics.jsonl and config.json exist but no
  checkpoint. A run of another model is refused by the same config check a checkpoint would get
  (nothing touched); the same run starts clean, moving the dead run's records aside and saying so,
  so metrics.jsonl holds rounds 1..6 once (it held [1, 2, 1, 2, 3, ...] before)."""
  workdir = tmp_path / "run"
  every5 = "checkpoint.every_rounds=5"
  killed = _train(workdir, every5, "debug.kill_at_round=3", "debug.kill_point=round")
  assert killed.returncode == -9, killed.stderr
  assert [m["round"] for m in _rounds(workdir)] == [1, 2]
  before = _tree_bytes(workdir)
  other = _train(workdir, every5, "model.num_layers=2")
  assert other.returncode == 2, other.stderr[-2000:]
  assert "Traceback" not in other.stderr
  assert other.stderr.strip().splitlines()[-1].startswith(
      f"error: model.num_layers: {workdir} holds a run (stopped before its first checkpoint) made "
      "with a different model.num_layers: 1 -> 2")
  assert _tree_bytes(workdir) == before
  again = _train(workdir, every5)
  assert again.returncode == 0, again.stderr[-2000:]
  [abandoned] = workdir.glob("abandoned-*")
  assert f"moved them to {abandoned}" in again.stdout
  assert [m["round"] for m in _rounds(workdir)] == list(range(1, 7))
  assert [m["round"] for m in _rounds(abandoned)] == [1, 2]
  assert json.loads((abandoned / "config.json").read_text())["debug"]["kill_at_round"] == 3
  assert json.loads((workdir / "config.json").read_text())["debug"]["kill_at_round"] != 3


def test_a_metrics_line_with_a_non_integer_round_is_dropped_on_resume(tmp_path):
  """`{"round": "seven"}` in metrics.jsonl stopped the resume with a TypeError; it is dropped and
  counted like a line cut short."""
  workdir = tmp_path / "run"
  assert _train(workdir, "rounds=1").returncode == 0
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"round": "seven"}\n{"round": true, "train/loss": 1.0}\n')
  resumed = _train(workdir, "rounds=2")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Traceback" not in resumed.stderr
  assert "dropped 2 unreadable line(s)" in resumed.stderr
  assert [m["round"] for m in _rounds(workdir)] == [1, 2, 3, 4]


# ---- multi-host preemption notice --------------------------------------------------------------

_PREEMPTED_WORKER = textwrap.dedent("""
    import sys
    import time
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=1, process_id=0)
    from selfplay_jax import config_lib, runtime, train
    # Rounds of this tiny model take ~10 ms, less than the coordination service needs to agree on a
    # sync round; slow the per-round check down so the notice lands within the run.
    requested = runtime.StopOnSignal.requested
    def slow_requested(self, round_number):
      time.sleep(0.2)
      return requested(self, round_number)
    runtime.StopOnSignal.requested = slow_requested
    cfg = config_lib.load_config(str(config_lib.default_config_path()), sys.argv[3:])
    try:
      train.train_and_evaluate(cfg, sys.argv[1])
    except runtime.Preempted as e:
      print(f"PREEMPTED {e.round}", flush=True)
      sys.exit(143)
    print("FINISHED", flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_jax_preemption_notice_stops_all_hosts_at_the_sync_round(tmp_path):
  """Under `jax.distributed` (here 1 process on localhost), SIGTERM goes to JAX's preemption
  notifier rather than our handler; the loop asks `reached_preemption_sync_point` every round and
  saves and stops at the agreed round. The restarted run matches an uninterrupted one."""
  extra = ["rounds=12", "eval.every_rounds=100", "checkpoint.every_rounds=5"]
  ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
  assert _train(ref_dir, *extra).returncode == 0
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = tmp_path / "worker.py"
  script.write_text(_PREEMPTED_WORKER)
  args = [f"{o}" for o in OVERRIDES + extra + ["debug.kill_at_round=4", "debug.kill_point=round",
                                               "debug.kill_signal=SIGTERM"]]
  res = subprocess.run([sys.executable, str(script), str(run_dir), f"localhost:{_free_port()}",
                        *args], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parent.parent)
  assert res.returncode == 143, res.stdout + res.stderr
  stopped = int(res.stdout.split("PREEMPTED ")[1].split()[0])
  assert 4 <= stopped < 14
  assert "SIGTERM caught" in res.stderr  # JAX's notifier, not Python's handler, took the signal
  with checkpoint.Checkpointer(str(run_dir)) as ckpt:
    assert ckpt.latest_step() == stopped  # saved although not a checkpoint.every_rounds round
  assert [m["round"] for m in _rounds(run_dir)] == list(range(1, stopped + 1))
  resumed = _train(run_dir, *extra)
  assert resumed.returncode == 0, resumed.stderr
  _assert_same_run(_state(ref_dir), _state(run_dir))


def test_ctrl_c_under_jax_distributed_goes_through_the_preemption_service(tmp_path):
  """SIGINT on one host must not stop it alone (the other hosts would wait for it forever): under
  `jax.distributed` the handler hands it to JAX's notifier as SIGTERM, and the run stops at the
  agreed sync round like a preemption notice (exit 143, that round saved)."""
  run_dir = tmp_path / "run"
  script = tmp_path / "worker.py"
  script.write_text(_PREEMPTED_WORKER)
  args = OVERRIDES + ["rounds=12", "eval.every_rounds=100", "checkpoint.every_rounds=5",
                      "debug.kill_at_round=4", "debug.kill_point=round", "debug.kill_signal=SIGINT"]
  res = subprocess.run([sys.executable, str(script), str(run_dir), f"localhost:{_free_port()}",
                        *args], env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
  assert res.returncode == 143, res.stdout + res.stderr
  assert "asking every host to stop at the same round" in res.stderr
  assert "SIGTERM caught" in res.stderr  # re-raised as SIGTERM, taken by JAX's notifier
  stopped = int(res.stdout.split("PREEMPTED ")[1].split()[0])
  assert 4 <= stopped < 14
  with checkpoint.Checkpointer(str(run_dir)) as ckpt:
    assert ckpt.latest_step() == stopped


# ---- bad model directories and tokenizers, through the train command ---------------------------


def _bad_model_dirs(root):
  """(name, model dir, tokenizer file, text the error must contain) for a set of broken inputs."""
  import safetensors.numpy

  from selfplay_jax.data import tasks
  from tests import hf_models
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, root / "tok")
  model_file = next((root / "tok").glob("*.model"))

  def model(name, vocab_size=tok.vocab_size, edit=None):
    d = root / name
    hf_models.make_hf_model("llama", vocab_size=vocab_size, bos_token_id=tok.bos_id,
                            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(d)
    if edit:
      edit(d)
    return d

  def misshape(d):
    t = safetensors.numpy.load_file(str(d / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:5]
    safetensors.numpy.save_file(t, str(d / "model.safetensors"))

  def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])

  def unsupported(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))

  return [
      ("misshaped", model("misshaped", edit=misshape), model_file,
       "model.layers.0.mlp.up_proj.weight"),
      ("truncated", model("truncated", edit=truncate), model_file, "model.safetensors"),
      ("unsupported", model("unsupported", edit=unsupported), model_file,
       "model_type='gpt2' is not supported"),
      ("small_vocab", model("small_vocab", vocab_size=tok.vocab_size - 4), model_file,
       f"tokenizer vocab_size {tok.vocab_size} > model vocab_size {tok.vocab_size - 4}"),
  ]


def test_bad_model_directories_and_tokenizers_are_one_error(tmp_path):
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": f"{i + 1}",
                                      "answer": str(i + 1)}) + "\n" for i in range(40)))
  for name, model_dir, tokenizer, text in _bad_model_dirs(tmp_path):
    workdir = tmp_path / f"run_{name}"
    res = _train(workdir, f"model.hf_path={model_dir}", f"model.tokenizer_path={tokenizer}",
                 f"data.task={data}")
    assert res.returncode == 2, (name, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, name
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and text in last, (name, last)
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


def test_partial_metrics_line_and_unreadable_run_config(tmp_path):
  """A process killed mid-write leaves half a metrics line: the resumed run drops it. A garbled
  config.json makes `eval` (and `export`, which reads it the same way) name the file."""
  workdir = tmp_path / "run"
  assert _train(workdir, "rounds=1").returncode == 0
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"train/loss": 0.25, "rou')
  resumed = _train(workdir, "rounds=2")
  assert resumed.returncode == 0, resumed.stderr
  assert [m["round"] for m in _rounds(workdir)] == [1, 2, 3, 4]
  (workdir / "config.json").write_text('{"rounds": 2,')
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for command in (["eval", "--k=0"],):  # export reads the run config the same way
    res = subprocess.run([sys.executable, "-m", "selfplay_jax.cli", command[0],
                          f"--workdir={workdir}", *command[1:]], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"error: {workdir}/config.json: not a readable run config" in res.stderr
