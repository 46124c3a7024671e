"""Multi-host: 2 JAX processes x 4 CPU devices joined by `jax.distributed` on localhost (started
by `launch/local.sh`) train on one 8-device mesh, checkpoint, restore, and match one process on one
device (float tolerance): same per-round metrics, same final parameters, one set of logs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from selfplay_jax import run_config
from selfplay_jax import runtime
from selfplay_jax import config_lib
from tests.test_train import _final_params

REPO = Path(__file__).resolve().parent.parent
# 1 warm-up (SFT) round, then GRPO rounds scored by a Python reward function, through the host
# callback each process runs for its own rows (an untrained model gets all-zero verifier rewards,
# whose round-off gradients Adam would turn into noise).
OVERRIDES = ["warmup.rounds=1", "eval.every_rounds=1", "eval.num_examples=8", "eval.batch_size=8",
             "data.batch_size=4", "sampling.n=2", "sampling.max_new_tokens=6", "data.difficulty=1",
             "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
             "algorithm.reward_fn=tests/reward_helpers.py:distinct_characters", "progress_bar=false", "plot_every_rounds=0"]
OVERRIDES = [o.replace("plot_every", "metrics.plot_every") for o in OVERRIDES]
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]  # batch over data x fsdp spans both hosts


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  return env


def _flags(overrides):
  return [f"--config.{o}" for o in overrides]


def _single(workdir, *extra):
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "train", f"--workdir={workdir}",
                         *_flags(OVERRIDES + list(extra))], env=_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def _two_hosts(workdir, log_dir, *extra):
  return subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "-n", "2", "-d", "4",
                         "-l", str(log_dir), "--", "train", f"--workdir={workdir}",
                         *_flags(OVERRIDES + MESH + list(extra))], env=_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def _metrics(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def _params(workdir):
  return _final_params(run_config.load_run_config(workdir), workdir).params


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one_device(tmp_path):
  single, multi, logs = tmp_path / "single", tmp_path / "multi", tmp_path / "logs"
  res = _single(single, "rounds=2")
  assert res.returncode == 0, res.stderr[-3000:]

  # 2 rounds (warm-up + GRPO), checkpointed; the same command with more rounds resumes at round 2.
  first = _two_hosts(multi, logs, "rounds=1")
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["1", "2"]
  second = _two_hosts(multi, logs, "rounds=2")
  assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
  assert "resumed from" in second.stdout and "at round 2" in second.stdout

  # One metrics line per round (process 0 only), with the single-device run's numbers.
  ref, got = _metrics(single), _metrics(multi)
  assert [m["round"] for m in got] == [1, 2, 3] == [m["round"] for m in ref]
  for r, g in zip(ref, got):
    assert set(r) == set(g)
    for key, value in r.items():
      if isinstance(value, float):
        assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (r["round"], key)
      else:
        assert g[key] == value, (r["round"], key)
  assert ref[-1]["train/reward_mean"] is not None
  assert ref[-1]["reward/distinct_characters"] == pytest.approx(ref[-1]["train/reward_mean"])

  # Final parameters (restored from the multi-host checkpoint) match.
  a, b = _params(single), _params(multi)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
  # The 8-device, 2-process checkpoint also restores on one device (`eval`, a single process).
  res = subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "eval", f"--workdir={multi}",
                        "--k=0"], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads((multi / "eval_round_0003.json").read_text())["eval/accuracy"] == pytest.approx(
      got[-1]["eval/accuracy"])
  # Process 1 ran the same rounds but wrote no metrics, samples or plots of its own.
  assert (logs / "selfplay_jax_local.1.log").exists()
  assert len(list((multi / "samples").iterdir())) == len(list((single / "samples").iterdir()))


def test_distributed_flags_are_checked():
  with pytest.raises(config_lib.ConfigError, match="--num_processes: required"):
    runtime.initialize_distributed("on", "localhost:1234", None, 0)
  with pytest.raises(config_lib.ConfigError, match="--process_id: need 0 <= process_id"):
    runtime.initialize_distributed("on", "localhost:1234", 2, 2)
  with pytest.raises(config_lib.ConfigError, match="--distributed=off"):
    runtime.initialize_distributed("off", "localhost:1234", 2, 0)
  assert runtime.initialize_distributed("auto") is False  # nothing detected: a single process
