"""End-to-end tests of the `selfplay-jax` command line (subprocesses, CPU only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "configs" / "default.py")


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough here
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",)])
def test_help_lists_commands(args):
  result = cli(*args)
  assert result.returncode == 0, result.stderr
  for command in ("train", "eval", "export", "generate", "plan"):
    assert f"  {command} " in result.stdout


def test_unknown_key_is_one_line_error():
  result = cli("train", f"--config={DEFAULT}", "--config.model.nmu_layers=3")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: model.nmu_layers")
  assert "model.num_layers" in lines[0]  # close match suggested


def test_wrong_type_is_one_line_error():
  result = cli("train", "--config.optimizer.learning_rate=fast")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip() == ("error: optimizer.learning_rate: cannot parse 'fast' as float")


@pytest.mark.parametrize("args, key", [
    (("--config.model.num_kv_heads=3",), "model.num_kv_heads"),
    ((f"--config={DEFAULT}:model=bogus",), "model.preset"),
    (("--config=no/such/file.py",), "config"),
])
def test_invalid_config_is_one_line_error(args, key):
  result = cli("train", *args)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().startswith(f"error: {key}")
  assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_command():
  result = cli("fly")
  assert result.returncode == 2 and "error: unknown command 'fly'" in result.stderr


def test_train_default_config_outside_repo(tmp_path):
  workdir = tmp_path / "run"  # given relative to the working directory, as a user would
  result = cli("train", "--config.model.num_layers=1", "--config.warmup.rounds=2", "--config.rounds=1",
               "--config.eval.num_examples=8", "--config.data.batch_size=4", "--config.sampling.n=2",
               "--config.sampling.max_new_tokens=4", "--config.data.max_response_len=24",
               "--workdir=run", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "llama" in result.stdout and "held-out accuracy after round 3" in result.stdout
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["num_layers"] == 1 and saved["model"]["preset"] == "tiny"


def test_console_script_installed():
  script = Path(sys.executable).parent / "selfplay-jax"
  if not script.exists():
    pytest.skip("console script not installed in this environment")
  result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and "train" in result.stdout


def test_train_reports_too_narrow_token_widths_by_key(tmp_path):
  result = cli("train", "--config.data.max_answer_len=1", "--config.warmup.rounds=1",
               "--config.rounds=1", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "data.max_answer_len" in result.stderr


def test_task_too_small_to_hold_out_is_a_config_error(tmp_path):
  result = cli("train", "--config=configs/default.py:task=sort", "--config.data.difficulty=1",
               f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "error: data.difficulty:" in result.stderr and "heldout" in result.stderr
