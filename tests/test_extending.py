"""Research forks: an algorithm spec, a scorer and a task from a module outside the package, named in
the config, run in the fused round (examples/extending/, the walk-through of docs/extending.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_validation
from selfplay_jax import config_lib
from selfplay_jax import setup
from selfplay_jax.models.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "extending"
SMALL = ["warmup.rounds=2", "rounds=3", "eval.every_rounds=3", "eval.num_examples=8",
         "eval.batch_size=8", "data.batch_size=4", "sampling.n=4", "sampling.max_new_tokens=6",
         "data.difficulty=1", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_layers=1", "progress_bar=false"]


def _cli(cwd, *args):
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", *args], cwd=cwd,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=600)


def _lines(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_algorithm_from_outside_the_package_runs_in_the_round(tmp_path):
  """The example config (run from another directory, so nothing is importable by accident) trains
  with the AWR spec in `examples/extending/awr.py`."""
  workdir = tmp_path / "awr"
  res = _cli(tmp_path, "train", f"--config={EXAMPLE / 'config.py'}", f"--workdir={workdir}",
             *[f"--config.{o}" for o in SMALL])
  assert res.returncode == 0, res.stderr[-3000:]
  lines = _lines(workdir)
  assert [m["phase"] for m in lines] == ["warmup"] * 2 + ["awr"] * 3
  for m in lines[2:]:
    assert m["train/awr_weight_mean"] >= np.exp(-1) and np.isfinite(m["train/loss"])
    assert m["train/reward_mean"] is not None  # the verifier scored the samples
  assert "round 5 [awr]" in res.stdout


@pytest.mark.slow
def test_a_task_and_a_scorer_from_outside_the_package(tmp_path):
  workdir = tmp_path / "reverse"
  res = _cli(tmp_path, "train", f"--config={EXAMPLE / 'config.py'}", f"--workdir={workdir}",
             f"--config.data.task={EXAMPLE / 'awr.py'}:make_reverse_task",
             f"--config.algorithm.scorer={EXAMPLE / 'awr.py'}:make_length_scorer",
             *[f"--config.{o}" for o in SMALL])
  assert res.returncode == 0, res.stderr[-3000:]
  lines = _lines(workdir)
  for m in lines[2:]:  # reward = verifier - 0.01 * length, the scorer's own metric logged
    penalty = m["scorer/length_penalty"]
    assert penalty == pytest.approx(0.01 * m["train/completion_len"], rel=1e-5)
    assert m["train/reward_mean"] == pytest.approx(m["train/accuracy"] - penalty, abs=1e-5)
  samples = [json.loads(l) for l in (workdir / "samples" / "round_0003.jsonl").read_text()
             .splitlines()]
  assert all(s["prompt"].startswith("rev ") for s in samples)


def test_awr_loss_matches_numpy():
  sys.path.insert(0, str(EXAMPLE))
  try:
    import awr  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(EXAMPLE))
  spec = awr.AdvantageWeightedSFT(group_size=2, beta=0.5, max_weight=3.0)
  rewards = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
  rollout = type("R", (), dict(prompt_tokens=jnp.zeros((4, 2), jnp.int32),
                               prompt_mask=jnp.ones((4, 2), bool), tokens=jnp.zeros((4, 3), jnp.int32),
                               mask=jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], bool)))
  rows = spec.build({}, rollout, jnp.asarray(rewards), None)
  logp = np.log(np.array([[0.5, 0.25, 0.9], [0.1, 0.9, 0.9], [0.5, 0.5, 0.5], [0.2, 0.4, 0.8]]))
  # Group-normalised advantages as GRPO computes them (sample std, + 1e-4); the all-zero group gets 0.
  r = rewards.reshape(2, 2)
  adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
  weight = np.minimum(np.exp(adv / 0.5), 3.0)
  mask = np.asarray(rollout.mask, np.float32)
  nll = -(logp * mask).sum(1) / mask.sum(1)
  loss, aux = spec.loss(jnp.asarray(logp, jnp.float32), rows)
  np.testing.assert_allclose(np.asarray(rows["weight"]), weight, rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(weight * nll), rtol=1e-5)
  assert float(aux["awr_weight_mean"]) == pytest.approx(weight.mean(), rel=1e-5)


@pytest.mark.parametrize("key, value, text", [
    ("algorithm.spec", "nowhere/x.py:Spec", "algorithm.spec: file nowhere/x.py not found"),
    ("algorithm.spec", "no_such_module_xyz:Spec", "algorithm.spec: cannot import 'no_such_module_xyz'"),
    ("algorithm.spec", "Spec", "algorithm.spec: expected 'path/to/file.py:name'"),
    ("algorithm.spec", f"{EXAMPLE / 'awr.py'}:Nope", "awr.py has no 'Nope'"),
    ("algorithm.scorer", "json:nope", "algorithm.scorer: json has no 'nope'"),
])
def test_bad_references_are_one_config_error(key, value, text):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), [f"{key}={value}"])
  with pytest.raises(ConfigError, match=None) as info:
    config_validation.validate(cfg)
  assert text in str(info.value)


def test_objects_that_are_not_specs_are_named(tmp_path):
  module = tmp_path / "mine.py"
  module.write_text("class NoFactory:\n  pass\n\nVALUE = 3\n\n"
                    "def half(cfg):\n  return object()\n\ndef boom(cfg):\n  raise RuntimeError('x')\n")
  for name, text in [("NoFactory", "needs a from_config(cfg) classmethod"),
                     ("VALUE", "is not a spec class or a function (got a int object)"),
                     ("half", "gave a object without name, samples, reference")]:
    cfg = config_lib.load_config(str(config_lib.default_config_path()),
                                 [f"algorithm.spec={module}:{name}"])
    with pytest.raises(ConfigError, match="algorithm.spec") as info:
      setup.build_spec(cfg)
    assert text in str(info.value)
  broken = tmp_path / "broken.py"
  broken.write_text("raise ValueError('bad module')\n")
  cfg = config_lib.load_config(str(config_lib.default_config_path()),
                               [f"data.task={broken}:make"])
  with pytest.raises(ConfigError, match="data.task: importing .*broken.py failed: ValueError"):
    setup.task_and_tokenizer(cfg, tmp_path)
