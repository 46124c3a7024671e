"""Smoke test of the TRL comparison harness (`python -m bench.trl_compare --quick`).

Checks the harness runs on a minimal size and writes every figure; asserts nothing about timings.
Needs the `bench` extra (TRL); skipped, with the install command, where TRL is not installed.
"""

import importlib.util

import pytest

from tests.bench_helpers import run_quick

TOP_KEYS = {"machine", "config", "same_weights_max_logp_diff", "dpo", "grpo_update", "grpo_round",
            "limits", "targets", "notes", "loadavg_end", "wall_s"}
SIDES = ("ours", "trl", "trl_1thread")
BREAKDOWN_KEYS = {"ours_sample_s", "ours_old_logp_forward_s", "ours_update_s", "ours_parts_sum_s",
                  "trl_generate_s", "trl_rest_s", "trl_generate_share", "trl_1thread_generate_s"}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL is not installed; install the bench extra (pip install -e '.[bench]') "
                           "to smoke-test bench/trl_compare.py")
def test_quick_trl_benchmark_writes_every_figure(tmp_path):
  res, _ = run_quick("trl_compare", tmp_path, section="trl")
  assert TOP_KEYS <= set(res)
  cfg = res["config"]
  for key in ("cpu_model", "usable_cores", "jax", "torch", "transformers", "trl", "loadavg", "date"):
    assert key in res["machine"]
  assert set(cfg["includes"]) == {"dpo", "grpo_update", "grpo_round"}
  # Same weights and tokens on both sides: log-probs agree to float32 noise (not a timing).
  assert res["same_weights_max_logp_diff"] < 1e-3
  for name, unit, reps in (("dpo", "steps_s", cfg["update_reps"]),
                           ("grpo_update", "steps_s", cfg["update_reps"]),
                           ("grpo_round", "samples_s", cfg["round_reps"])):
    row = res[name]
    for side in SIDES:
      assert len(row[f"{side}_times_s"]) == reps, (name, side)
      assert row[f"{side}_median_s"] > 0 and row[f"{side}_first_call_s"] > 0
      assert row[f"{side}_{unit}"] > 0
    assert row["ratio"] > 0 and row["ratio_vs_best_trl"] > 0
    assert len(row["trl_other_processes_cores"]) == reps
  for name in ("dpo", "grpo_update"):  # our update steps are profiled kernel by kernel
    assert res[name]["ours_kernels"]["top"] and res[name]["ours_kernels"]["kernel_ms_per_call"] > 0
    assert {"flops", "ours_fraction_of_peak", "trl_fraction_of_peak"} <= set(res["limits"][name])
  assert res["limits"]["matmul_peak_flops"] > 0
  assert res["limits"]["grpo_round"]["max_ratio_with_update_at_peak"] > 0
  rnd = res["grpo_round"]
  assert BREAKDOWN_KEYS <= set(rnd["breakdown"])
  # EOS never cuts a row short: both sides decode exactly completion_len tokens per row.
  assert rnd["ours_completion_len"] == rnd["trl_completion_len"] == cfg["completion_len"]
  assert 0 <= rnd["ours_reward_mean"] <= 1 and 0 <= rnd["trl_reward_mean"] <= 1
  for key in ("dpo_update", "grpo_update", "grpo_round"):
    assert isinstance(res["targets"][key], bool)
