"""The multi-host launch scripts in launch/: syntax, shellcheck, usage, and their process plumbing.

No selfplay-jax, SLURM or gcloud is run: stand-ins in tmp_path record what they were started with
(argv, environment, signals) — a fake interpreter (PYTHON=...), fake `srun` / `scontrol` and a
fake `gcloud` on PATH."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
LOCAL, SLURM, TPU = LAUNCH / "local.sh", LAUNCH / "gpu_slurm.sbatch", LAUNCH / "tpu_pod.sh"
SCRIPTS = [LOCAL, SLURM, TPU]

# Stands in for `python -m selfplay_jax.cli ...`: records argv, a few env vars and any signal.
FAKE_PYTHON = f"""#!{sys.executable} -S
import json, os, signal, sys, time
argv = sys.argv[1:]
proc = next(a.split("=", 1)[1] for a in argv if a.startswith("--process_id="))
rec = os.environ["FAKE_RECORD_DIR"]
mode = os.environ.get("FAKE_MODE", "ok")

def on_signal(signum, frame):
    with open(os.path.join(rec, f"sig.{{proc}}"), "a") as f:
        f.write(f"{{signum}}\\n")
    if mode != "ignore_term":
        sys.exit(128 + signum)

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
runs = len([f for f in os.listdir(rec) if f.startswith(f"run.{{proc}}.")])
env = {{k: os.environ.get(k) for k in
       ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_LOCAL_DEVICE_IDS", "SLURM_PROCID")}}
tmp = os.path.join(rec, f".tmp.{{proc}}")
with open(tmp, "w") as f:
    json.dump({{"argv": argv, "pid": os.getpid(), "env": env}}, f)
os.rename(tmp, os.path.join(rec, f"run.{{proc}}.{{runs}}.json"))
print(f"fake process {{proc}} started", flush=True)
if mode == "exit3":
    sys.exit(3)
if mode == "stop_once":
    sys.exit(143 if runs == 0 else 0)
if mode == "fail" and proc == "1":  # once every process is up (its signal handler installed)
    count = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--num_processes=")))
    deadline = time.time() + 10
    while len([f for f in os.listdir(rec) if f.startswith("run.")]) < count:
        if time.time() > deadline:
            sys.exit(1)
        time.sleep(0.02)
    sys.exit(7)
if mode in ("fail", "wait", "ignore_term"):
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(0.05)
    sys.exit(99)
"""

# srun: starts the command once per task (SLURM_PROCID, SLURM_LOCALID, step sizes set), forwards
# SIGTERM to them, exits with the highest status.
FAKE_SRUN = f"""#!{sys.executable} -S
import json, os, signal, subprocess, sys
args = sys.argv[1:]
log = os.environ["FAKE_SLURM_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"srun": args, "pid": os.getpid()}}) + "\\n")
while args and args[0].startswith("-"):
    args.pop(0)
ntasks, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_JOB_NUM_NODES"])
procs = []
for i in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % (ntasks // nodes)),
               SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NUM_NODES=str(nodes))
    procs.append(subprocess.Popen(args, env=env))
signal.signal(signal.SIGTERM, lambda s, f: [p.send_signal(s) for p in procs])
codes = [p.wait() for p in procs]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
"""

FAKE_SCONTROL = f"""#!{sys.executable} -S
import json, os, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps({{"scontrol": sys.argv[1:]}}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("gpu-node-a")
    print("gpu-node-b")
"""

# gcloud: records argv; with FAKE_GCLOUD_EXEC=1 runs `ssh --command=...` with bash in FAKE_HOME.
FAKE_GCLOUD = f"""#!{sys.executable} -S
import json, os, subprocess, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
cmd = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--command=")]
if cmd and os.environ.get("FAKE_GCLOUD_EXEC") == "1":
    sys.exit(subprocess.run(["bash", "-c", cmd[0]], cwd=os.environ["FAKE_HOME"]).returncode)
"""


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


def _run(args, env=None, timeout=20, **kw):
  return subprocess.run(["bash", *map(str, args)], env=env, capture_output=True, text=True,
                        timeout=timeout, **kw)


def _records(rec: Path):
  out = {}
  for f in sorted(rec.glob("run.*.json")):
    _, proc, run, _ = f.name.split(".")
    out[(int(proc), int(run))] = json.loads(f.read_text())
  return out


def _wait_for(predicate, timeout=10.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.02)
  return False


def _gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  return False


@pytest.fixture
def fake(tmp_path):
  """Directories and the environment for the stand-ins."""
  rec = tmp_path / "records"
  rec.mkdir()
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  python = _write_exe(tmp_path / "fake_python", FAKE_PYTHON)
  env = dict(os.environ, FAKE_RECORD_DIR=str(rec), PYTHON=str(python),
             LOG_DIR=str(tmp_path / "logs"), FAKE_SLURM_LOG=str(tmp_path / "slurm.jsonl"),
             FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"),
             PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  for var in [v for v in env if v.startswith("SLURM_")] + ["XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                                                             "JAX_LOCAL_DEVICE_IDS", "EXTRA",
                                                             "WORKDIR", "CONFIG", "BUCKET"]:
    env.pop(var, None)
  return type("Fake", (), dict(tmp=tmp_path, rec=rec, bin=bin_dir, python=python, env=env))


# ------------------------------------------------------------------------------------ all three


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = _run(["-n", script])
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (CI installs it: apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage(script, flag):
  result = _run([script, flag])
  assert result.returncode == 0, result.stderr
  assert "Usage:" in result.stdout
  assert "Example" in result.stdout or "sbatch" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "--", "train"], "-n must be a whole number >= 1"),
    (["-d", "x", "--", "train"], "-d must be a whole number >= 1"),
    (["-p", "70000", "--", "train"], "-p must be a port number"),
    (["-q", "--", "train"], "unknown option -q"),
    (["-n"], "option -n needs a value"),
    (["-n", "2"], "missing the selfplay-jax arguments"),
    (["--", "train", "--process_id=1"], "sets --process_id itself"),
])
def test_local_bad_usage(fake, args, message):
  result = _run([LOCAL, *args], env=fake.env)
  assert result.returncode == 2
  assert message in result.stderr
  assert "--help" in result.stderr
  assert not _records(fake.rec)


def test_local_missing_interpreter(fake):
  result = _run([LOCAL, "--", "train"], env=dict(fake.env, PYTHON=str(fake.tmp / "nope")))
  assert result.returncode == 2
  assert "PYTHON=" in result.stderr and "not an executable" in result.stderr


def test_slurm_outside_a_job_is_refused(fake):
  result = _run([SLURM], env=fake.env)
  assert result.returncode == 2
  assert "not inside a SLURM job" in result.stderr


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "missing COMMAND"),
    (["launch"], {}, "unknown command 'launch'"),
    (["create"], {"TPU_NAME": ""}, "TPU_NAME is not set"),
    (["create"], {"ZONE": ""}, "ZONE is not set"),
    (["delete", "now"], {}, "delete takes no arguments"),
    (["logs", "x"], {}, "WORKER must be a worker number"),
    (["run"], {}, "set WORKDIR"),
    (["run"], {"WORKDIR": "gs://bucket/runs/x"}, "needs a file path"),
    (["create"], {"GCLOUD": "/nonexistent/gcloud"}, "not found"),
])
def test_tpu_bad_usage(fake, args, env, message):
  _write_exe(fake.bin / "gcloud", FAKE_GCLOUD)
  result = _run([TPU, *args], env={**fake.env, "TPU_NAME": "pod", "ZONE": "z", **env})
  assert result.returncode == 2
  assert message in result.stderr
  assert not Path(fake.env["FAKE_GCLOUD_LOG"]).exists()


# ------------------------------------------------------------------------------------- local.sh


def test_local_starts_the_processes_with_their_flags_and_devices(fake):
  env = dict(fake.env, XLA_FLAGS="--xla_foo=1 --xla_force_host_platform_device_count=8 --xla_bar")
  result = _run([LOCAL, "-n", "3", "-d", "2", "--", "train", "--config=configs/x.py",
                 "--config.data.task=a b"], env=env)
  assert result.returncode == 0, result.stderr
  records = _records(fake.rec)
  assert sorted(records) == [(0, 0), (1, 0), (2, 0)]
  coordinators = set()
  for (proc, _), r in records.items():
    argv = r["argv"]
    assert argv[:5] == ["-m", "selfplay_jax.cli", "train", "--config=configs/x.py",
                        "--config.data.task=a b"]
    assert argv[6:] == ["--num_processes=3", f"--process_id={proc}"]
    assert argv[5].startswith("--coordinator_address=localhost:")
    coordinators.add(argv[5])
    assert r["env"]["JAX_PLATFORMS"] == "cpu"
    assert r["env"]["XLA_FLAGS"] == (
        "--xla_foo=1 --xla_bar --xla_force_host_platform_device_count=2")
  assert len(coordinators) == 1
  port = int(coordinators.pop().rsplit(":", 1)[1])
  assert 1 <= port <= 65535
  # process 0 writes to the terminal, the others to LOG_DIR
  assert "fake process 0 started" in result.stdout
  logs = fake.tmp / "logs"
  assert not (logs / "selfplay_jax_local.0.log").exists()
  for i in (1, 2):
    assert f"fake process {i} started" in (logs / f"selfplay_jax_local.{i}.log").read_text()


def test_local_port_and_log_dir_flags(fake):
  result = _run([LOCAL, "-p", "23456", "-l", fake.tmp / "elsewhere", "--", "train"],
                env=fake.env)
  assert result.returncode == 0, result.stderr
  records = _records(fake.rec)
  assert [r["argv"][-3] for r in records.values()] == ["--coordinator_address=localhost:23456"] * 2
  assert (fake.tmp / "elsewhere" / "selfplay_jax_local.1.log").exists()
  assert [r["env"]["XLA_FLAGS"] for r in records.values()] == [
      "--xla_force_host_platform_device_count=4"] * 2


def test_local_failure_stops_the_others_and_returns_its_status(fake):
  start = time.time()
  result = _run([LOCAL, "-n", "3", "--", "train"], env=dict(fake.env, FAKE_MODE="fail"))
  assert result.returncode == 7, result.stderr
  assert time.time() - start < 8  # the others sleep 30 s unless stopped
  assert "process 1 exited with status 7" in result.stderr
  records = _records(fake.rec)
  for proc in (0, 2):
    assert (fake.rec / f"sig.{proc}").read_text().split() == [str(int(signal.SIGTERM))]
    assert _wait_for(lambda p=records[(proc, 0)]["pid"]: _gone(p), timeout=2)


def test_local_kills_a_process_that_ignores_sigterm_after_the_grace_period(fake):
  # FAKE_MODE=ignore_term: process 1 keeps running after SIGTERM; -g 1 then SIGKILLs it.
  env = dict(fake.env, FAKE_MODE="ignore_term")
  proc = subprocess.Popen(["bash", str(LOCAL), "-n", "2", "-g", "1", "--", "train"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert _wait_for(lambda: len(_records(fake.rec)) == 2)
    records = _records(fake.rec)
    os.kill(records[(0, 0)]["pid"], signal.SIGKILL)  # process 0 "crashes"
    _, err = proc.communicate(timeout=8)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGKILL, err
  assert (fake.rec / "sig.1").read_text().split() == [str(int(signal.SIGTERM))]
  assert _wait_for(lambda: _gone(records[(1, 0)]["pid"]), timeout=2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_local_forwards_signals_to_every_process(fake, sig):
  proc = subprocess.Popen(["bash", str(LOCAL), "-n", "3", "--", "train"],
                          env=dict(fake.env, FAKE_MODE="wait"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert _wait_for(lambda: len(_records(fake.rec)) == 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=8)
  finally:
    proc.kill()
  assert proc.returncode == 128 + sig, err
  for i in range(3):
    assert (fake.rec / f"sig.{i}").read_text().split() == [str(int(sig))]  # once each


# ------------------------------------------------------------------------------ gpu_slurm.sbatch


def _slurm_env(fake, ntasks=4, nodes=2, **extra):
  _write_exe(fake.bin / "srun", FAKE_SRUN)
  _write_exe(fake.bin / "scontrol", FAKE_SCONTROL)
  env = dict(fake.env, SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="gpu-node-[a-b]",
             SLURM_NTASKS=str(ntasks), SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NAME="sp",
             SLURM_SUBMIT_DIR=str(fake.tmp), RESTART_DELAY="0")
  env.update(extra)
  return env


def _slurm_log(fake):
  path = Path(fake.env["FAKE_SLURM_LOG"])
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_slurm_one_process_per_gpu(fake):
  env = _slurm_env(fake, CUDA_VISIBLE_DEVICES="0,1", CONFIG="configs/dpo.py",
                   EXTRA="--config.rounds=2 --config.seed=1")
  result = _run([SLURM, "--config.model.dtype=bfloat16"], env=env)
  assert result.returncode == 0, result.stderr
  records = _records(fake.rec)
  assert sorted(records) == [(i, 0) for i in range(4)]
  for (proc, _), r in records.items():
    assert r["argv"] == [
        "-m", "selfplay_jax.cli", "train", "--config=configs/dpo.py",
        f"--workdir={fake.tmp}/runs/sp", "--distributed=on", "--config.rounds=2",
        "--config.seed=1", "--config.model.dtype=bfloat16",
        "--coordinator_address=gpu-node-a:21234", "--num_processes=4", f"--process_id={proc}"]
    assert r["env"]["JAX_LOCAL_DEVICE_IDS"] is None  # JAX picks SLURM_LOCALID's GPU
  log = _slurm_log(fake)
  assert [e for e in log if "scontrol" in e] == [{"scontrol": ["show", "hostnames",
                                                               "gpu-node-[a-b]"]}]
  assert len([e for e in log if "srun" in e]) == 1


@pytest.mark.parametrize("ntasks, visible, expected", [
    (2, "0,1,2,3", "0,1,2,3"),  # one process per node: all of the node's GPUs
    (4, "3", "0"),  # the site binds one GPU per task
])
def test_slurm_local_devices(fake, ntasks, visible, expected):
  env = _slurm_env(fake, ntasks=ntasks, CUDA_VISIBLE_DEVICES=visible, WORKDIR="/shared/w")
  result = _run([SLURM], env=env)
  assert result.returncode == 0, result.stderr
  records = _records(fake.rec)
  assert len(records) == ntasks
  assert {r["env"]["JAX_LOCAL_DEVICE_IDS"] for r in records.values()} == {expected}
  assert all("--workdir=/shared/w" in r["argv"] for r in records.values())


def test_slurm_bad_input_is_not_restarted(fake):
  result = _run([SLURM], env=_slurm_env(fake, FAKE_MODE="exit3"))
  assert result.returncode == 3
  assert "not restarting" in result.stderr
  log = _slurm_log(fake)
  assert len([e for e in log if "srun" in e]) == 1
  assert not [e for e in log if e.get("scontrol", [""])[0] == "requeue"]


def test_slurm_stopped_run_resumes_in_the_allocation(fake):
  result = _run([SLURM], env=_slurm_env(fake, FAKE_MODE="stop_once"))
  assert result.returncode == 0, result.stderr
  assert sorted(_records(fake.rec)) == [(i, r) for i in range(4) for r in (0, 1)]
  assert len([e for e in _slurm_log(fake) if "srun" in e]) == 2


def test_slurm_max_restarts(fake):
  result = _run([SLURM], env=_slurm_env(fake, FAKE_MODE="stop_once", SLURM_RESTART_COUNT="10"))
  assert result.returncode == 143
  assert "MAX_RESTARTS=10 reached" in result.stderr
  assert len([e for e in _slurm_log(fake) if "srun" in e]) == 1


def test_slurm_time_limit_warning_stops_the_tasks_and_requeues(fake):
  proc = subprocess.Popen(["bash", str(SLURM)], env=_slurm_env(fake, FAKE_MODE="wait"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert _wait_for(lambda: len(_records(fake.rec)) == 4)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends
    _, err = proc.communicate(timeout=8)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  for i in range(4):
    assert (fake.rec / f"sig.{i}").read_text().split() == [str(int(signal.SIGTERM))]
  assert {"scontrol": ["requeue", "1234"]} in _slurm_log(fake)


def test_slurm_job_termination_waits_for_the_tasks_and_does_not_requeue(fake):
  proc = subprocess.Popen(["bash", str(SLURM)], env=_slurm_env(fake, FAKE_MODE="wait"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert _wait_for(lambda: len(_records(fake.rec)) == 4)
    # scancel / preemption: SLURM signals the batch script and the tasks (here: through srun).
    proc.send_signal(signal.SIGTERM)
    srun_pid = next(e["pid"] for e in _slurm_log(fake) if "srun" in e)
    os.kill(srun_pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=8)
  finally:
    proc.kill()
  assert proc.returncode == 143, err
  assert "SLURM is ending the job" in err
  assert not [e for e in _slurm_log(fake) if e.get("scontrol", [""])[0] == "requeue"]


# ---------------------------------------------------------------------------------- tpu_pod.sh


def _gcloud_calls(fake):
  path = Path(fake.env["FAKE_GCLOUD_LOG"])
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_tpu_create_and_delete(fake):
  _write_exe(fake.bin / "gcloud", FAKE_GCLOUD)
  env = dict(fake.env, TPU_NAME="pod", ZONE="us-west4-a", PROJECT="proj",
             ACCELERATOR_TYPE="v5litepod-64", SPOT="1")
  assert _run([TPU, "create"], env=env).returncode == 0
  assert _run([TPU, "delete"], env=env).returncode == 0
  assert _gcloud_calls(fake) == [
      ["compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-west4-a", "--project=proj",
       "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite", "--spot"],
      ["compute", "tpus", "tpu-vm", "delete", "pod", "--zone=us-west4-a", "--project=proj",
       "--quiet"],
  ]


def test_tpu_install_copies_the_checkout_and_mounts_the_bucket(fake):
  _write_exe(fake.bin / "gcloud", FAKE_GCLOUD)
  env = dict(fake.env, TPU_NAME="pod", ZONE="z", BUCKET="gs://my-bucket/team")
  result = _run([TPU, "install"], env=env)
  assert result.returncode == 0, result.stderr
  scp, ssh = _gcloud_calls(fake)
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[-1] == "pod:selfplay_jax_src.tgz"
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
  script = next(a for a in ssh if a.startswith("--command=")).split("=", 1)[1]
  assert "pip install -q -e . 'jax[tpu]'" in script
  assert ("gcsfuse --implicit-dirs --rename-dir-limit=200000 --only-dir=team my-bucket "
          "/mnt/bucket") in script
  assert _run(["-n"], input=script).returncode == 0


def test_tpu_run_status_stop_on_every_worker(fake):
  # The fake gcloud runs the ssh commands here, in a fake worker home with a fake venv.
  _write_exe(fake.bin / "gcloud", FAKE_GCLOUD)
  home = fake.tmp / "worker"
  venv_bin = home / "selfplay_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  _write_exe(venv_bin / "python", textwrap.dedent(f"""\
      #!/usr/bin/env bash
      exec {fake.python} "$@" --process_id=0
      """))
  env = dict(fake.env, TPU_NAME="pod", ZONE="z", FAKE_GCLOUD_EXEC="1", FAKE_HOME=str(home),
             FAKE_MODE="wait", WORKDIR="/nfs/runs/x", EXTRA="--config.rounds=3")
  result = _run([TPU, "run", "--config.data.task=a b"], env=env)
  assert result.returncode == 0, result.stderr
  assert _wait_for(lambda: len(_records(fake.rec)) == 1)
  record = _records(fake.rec)[(0, 0)]
  assert record["argv"] == ["-m", "selfplay_jax.cli", "train", "--config=configs/grpo.py",
                            "--workdir=/nfs/runs/x", "--distributed=on", "--config.rounds=3",
                            "--config.data.task=a b", "--process_id=0"]
  assert all("--worker=all" in call for call in _gcloud_calls(fake))
  status = _run([TPU, "status"], env=env)
  assert f"running (pid {record['pid']})" in status.stdout
  again = _run([TPU, "run"], env=env)
  assert "a run is going" in again.stderr
  assert _run([TPU, "stop"], env=env).returncode == 0
  assert _wait_for(lambda: (home / "selfplay_jax" / "run.exit").exists())
  assert (home / "selfplay_jax" / "run.exit").read_text().strip() == "143"
  assert "exited with status 143" in _run([TPU, "status"], env=env).stdout
  logs_call = _run([TPU, "logs", "2"], env=dict(env, FAKE_GCLOUD_EXEC="0"))
  assert logs_call.returncode == 0
  assert _gcloud_calls(fake)[-1][4:] == ["pod", "--zone=z", "--worker=2",
                                         "--command=tail -n 200 -F selfplay_jax/run.log"]
