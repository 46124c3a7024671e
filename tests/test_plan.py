"""`selfplay-jax plan` and the real-model recipes (configs/real_model.py): memory per device from
abstract shapes only, checked against arithmetic on the published model shapes."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfplay_jax import config_validation
from selfplay_jax import config_lib, models, plan
from selfplay_jax.models import hf
from selfplay_jax.models.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "configs" / "real_model.py")
MODELS = ("llama3_8b", "qwen2_5_7b", "gemma2_9b")
ALGORITHMS = ("grpo", "spin", "self_rewarding")
HARDWARE = {"h100x8": 8, "v5e_64": 64}


def recipe(model="llama3_8b", algorithm="grpo", hardware="h100x8", *overrides):
  return config_lib.load_config(f"{RECIPE}:model={model},algorithm={algorithm},hardware={hardware}",
                                list(overrides))


@pytest.mark.parametrize("hardware, fsdp, tensor", [("h100x8", 8, 1), ("v5e_64", 16, 4)])
def test_llama3_8b_grpo_matches_hand_arithmetic(hardware, fsdp, tensor):
  cfg = recipe("llama3_8b", "grpo", hardware)
  p = plan.plan(cfg)
  assert p["mesh"] == {"data": 1, "fsdp": fsdp, "tensor": tensor}
  assert p["num_devices"] == fsdp * tensor

  # Llama-3-8B as published: untied embeddings, GQA, no biases.
  V, D, F, L, H, KV, HD = 128256, 4096, 14336, 32, 32, 8, 128
  layer_kernels = D * H * HD + 2 * D * KV * HD + H * HD * D + 3 * D * F  # q, k+v, o, gate+up+down
  kernels = L * layer_kernels + 2 * V * D  # + embedding and lm_head
  norms = (2 * L + 1) * D  # two RMSNorm vectors per layer + the final one
  assert p["model"]["num_params"] == kernels + norms == 8_030_261_248

  # Rules: embed -> fsdp; vocab, heads, kv_heads, mlp -> tensor; head_dim and norm -> replicated.
  # Every kernel has an embed dimension (4096 / fsdp) and, with tensor > 1, one of vocab (128256),
  # heads (32), kv_heads (8) or mlp (14336), all divisible by 4: each kernel is split fsdp x tensor
  # ways. The norm vectors carry the "norm" axis, which no rule splits: whole on every device.
  devices = fsdp * tensor
  params = (kernels // devices + norms) * 4  # float32
  assert kernels % devices == 0
  per_device = p["per_device_bytes"]
  assert per_device["params"] == params
  assert per_device["opt_state"] == 2 * params + 2 * 4  # Adam mu + nu, + two int32 step counts
  assert per_device["ref_params"] == params  # kl_coef 0.04: a frozen reference copy
  assert per_device["base_params"] == per_device["replay"] == 0
  assert per_device["other"] == 4 + 4 + 8 + 4  # step, round, rng key, bad_updates

  # Sampler KV cache: 32 prompts x 8 samples (h100x8) / 64 x 8 (v5e_64) rows over the fsdp shards,
  # 512 + 1024 slots, per layer k and v of kv_heads / tensor heads x 128, bfloat16.
  rows = cfg.data.batch_size * 8 // fsdp
  assert rows == 32
  kv_cache = L * 2 * rows * (KV // tensor) * (512 + 1024) * HD * 2
  assert per_device["kv_cache"] == kv_cache
  assert per_device["total"] == 4 * params + 8 + 20 + kv_cache
  if hardware == "h100x8":
    assert params == 4_016_062_464 and kv_cache == 6 * 2**30  # 3.74 GiB, 6 GiB

  # Largest array: with scan_layers (the recipes' setting) the KV cache's k (and v) is one array
  # stacked over the layers, half the cache (3 GiB / 768 MiB per device): larger than the largest
  # parameter, an MLP kernel stacked over the layers (L x D x F / devices floats).
  assert cfg.model.scan_layers
  assert kv_cache // 2 > L * D * F // devices * 4
  assert p["largest_array"]["per_device_bytes"] == kv_cache // 2
  assert p["largest_array"]["shape"] == [cfg.data.batch_size * 8, L, KV, 512 + 1024, HD]
  # Logits of the old / reference log-prob pass, which runs in num_minibatches (8) chunks of the
  # 256 (512) rows: 4 rows per batch shard at a time, float32.
  assert cfg.algorithm.num_minibatches == 8
  chunk_rows = cfg.data.batch_size * 8 // 8 // fsdp
  assert chunk_rows == 4
  assert p["logits"]["per_device_bytes"] == chunk_rows * (512 + 1024) * (V // tensor) * 4
  assert p["peak_estimate_bytes"] == per_device["total"] + p["logits"]["per_device_bytes"]
  assert p["fits"] is True


def test_every_recipe_validates_and_plans(monkeypatch):
  # The logical axes of a model are a pure function of its (hashable) config: trace each once.
  monkeypatch.setattr(models, "logical_axes", functools.lru_cache(models.logical_axes))
  for model in MODELS:
    for algorithm in ALGORITHMS:
      for hardware, devices in HARDWARE.items():
        cfg = recipe(model, algorithm, hardware)
        config_validation.validate(cfg)
        assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == devices
        assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "float32")
        p = plan.plan(cfg)
        assert p["num_devices"] == devices and p["algorithm"]["name"] == algorithm
        assert p["fits"], (model, algorithm, hardware, plan.format_plan(p))
        assert p["per_device_bytes"]["ref_params"] == p["per_device_bytes"]["params"]


def test_bad_recipe_args_and_fit_warning():
  with pytest.raises(ConfigError, match="config arg 'hardware'"):
    recipe(hardware="tpu_v9")
  with pytest.raises(ConfigError, match="mesh.tensor: 8 does not divide model.num_heads=28"):
    plan.plan(recipe("qwen2_5_7b", "grpo", "h100x8", "mesh.fsdp=1", "mesh.tensor=8"))
  p = plan.plan(recipe(), device_memory_gib=16)
  assert p["fits"] is False and "WARNING: does not fit" in plan.format_plan(p)
  p = plan.plan(recipe("llama3_8b", "grpo", "h100x8", "mesh.data=-1"), num_devices=16)
  assert p["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1}


def test_hf_path_reads_config_json_only(tmp_path):
  """With model.hf_path the architecture is its config.json; no weights (none exist here)."""
  qwen = models.PRESETS["qwen2_5_7b"]
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf_dict(qwen)))
  p = plan.plan(recipe("llama3_8b", "grpo", "h100x8", f"model.hf_path={tmp_path}"))
  assert p["model"]["family"] == "qwen2" and p["model"]["num_params"] == qwen.num_params()
  assert p["model"]["source"] == str(tmp_path)


def cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "plan", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_json_and_text():
  result = cli(f"--config={RECIPE}:model=llama3_8b,algorithm=grpo,hardware=v5e_64", "--json")
  assert result.returncode == 0, result.stderr
  p = json.loads(result.stdout)
  assert p["num_devices"] == 64 and p["fits"] is True and p["per_device_bytes"]["total"] > 0
  result = cli("--config.model.num_layers=1", "--devices=1")  # the default config
  assert result.returncode == 0, result.stderr
  assert "params" in result.stdout and "peak estimate" in result.stdout


def test_cli_bad_mesh_is_one_line_error():
  result = cli(f"--config={RECIPE}:model=qwen2_5_7b,hardware=h100x8", "--config.mesh.fsdp=1",
               "--config.mesh.tensor=8")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: mesh.tensor"), result.stderr


@pytest.mark.parametrize("config, overrides, rows, slots", [
    ("configs/rest_em.py", [], 64 * 8, 16 + 32),
    ("configs/rest_em.py", ["sampling.auto_temperature=0.5,0.8,1.0"], 3 * 64 * 8, 16 + 32),
    ("configs/rest_mcts.py", [], 16 * 2 * 4, 18 + 2 * 29),  # a level: B·W·n after the steps
])
def test_kv_cache_counts_the_largest_sampler_call(config, overrides, rows, slots):
  cfg = config_lib.load_config(config, ["mesh.data=1"] + overrides)
  kv = plan.plan(cfg, num_devices=1)["kv_cache"]
  assert (kv["rows"], kv["slots"]) == (rows, slots)
