"""Smoke test of the TRL comparison harness (`python -m bench.trl_compare --quick`).

Checks the harness runs on a minimal size and that every figure follows from its raw numbers;
asserts nothing about timings. Needs the `bench` extra (TRL); skipped, with the install command,
where TRL is not installed.
"""

import importlib.util

import pytest

from tests.bench_helpers import median, positive, run_quick

SIDES = ("ours", "trl", "trl_1thread")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL is not installed; install the bench extra (pip install -e '.[bench]') "
                           "to smoke-test bench/trl_compare.py")
def test_quick_trl_benchmark_figures_follow_from_its_timings(tmp_path):
  res, _ = run_quick("trl_compare", tmp_path)
  cfg, targets = res["config"], res["targets"]
  # Same weights and tokens on both sides: log-probs agree to float32 noise (not a timing).
  assert res["same_weights_max_logp_diff"] < 1e-3
  samples = cfg["grpo_prompts"] * cfg["group_size"]
  for name, unit, reps, per_call, target, met in (
      ("dpo", "steps_s", cfg["update_reps"], 1, "update_step_ratio", "dpo_update"),
      ("grpo_update", "steps_s", cfg["update_reps"], 1, "update_step_ratio", "grpo_update"),
      ("grpo_round", "samples_s", cfg["round_reps"], samples, "grpo_round_ratio", "grpo_round")):
    row = res[name]
    for side in SIDES:
      times = row[f"{side}_times_s"]
      assert len(times) == reps and positive(*times, row[f"{side}_first_call_s"]), (name, side)
      assert row[f"{side}_median_s"] == median(times)
      assert row[f"{side}_{unit}"] == pytest.approx(per_call / row[f"{side}_median_s"])
    assert row["ratio"] == pytest.approx(row[f"ours_{unit}"] / row[f"trl_{unit}"])
    best_trl = max(row[f"trl_{unit}"], row[f"trl_1thread_{unit}"])
    assert row["ratio_vs_best_trl"] == pytest.approx(row[f"ours_{unit}"] / best_trl)
    assert targets[met] == (row["ratio_vs_best_trl"] >= targets[target])
  for name in ("dpo", "grpo_update"):  # our update steps are profiled kernel by kernel
    kernels = res[name]["ours_kernels"]
    assert kernels["top"] and positive(kernels["kernel_ms_per_call"], kernels["top"][0]["ms_per_call"])
  lim = res["limits"]
  assert lim["matmul_peak_flops"] == max(lim["matmul_peak_probes_flops"])
  for name in ("dpo", "grpo_update"):
    assert positive(lim[name]["flops"])
    assert lim[name]["at_peak_s"] == pytest.approx(lim[name]["flops"] / lim["matmul_peak_flops"])
    assert lim[name]["ours_fraction_of_peak"] == pytest.approx(
        lim[name]["at_peak_s"] / res[name]["ours_median_s"])
  rnd, lr = res["grpo_round"], lim["grpo_round"]
  assert lr["trl_best_round_s"] == min(rnd["trl_median_s"], rnd["trl_1thread_median_s"])
  assert lr["max_ratio_with_update_at_peak"] == pytest.approx(
      lr["trl_best_round_s"] / lr["update_at_peak_plus_our_sampling_s"])
  b = rnd["breakdown"]
  assert b["ours_update_s"] == res["grpo_update"]["ours_median_s"]
  assert b["ours_parts_sum_s"] == pytest.approx(
      b["ours_sample_s"] + b["ours_old_logp_forward_s"] + b["ours_update_s"])
  assert b["trl_rest_s"] == pytest.approx(rnd["trl_median_s"] - b["trl_generate_s"])
  assert b["trl_generate_share"] == pytest.approx(b["trl_generate_s"] / rnd["trl_median_s"])
  assert len(b["trl_generate_times_s"]) == cfg["round_reps"] and positive(*b["trl_generate_times_s"])
  # EOS never cuts a row short: both sides decode exactly completion_len tokens per row.
  assert rnd["ours_completion_len"] == rnd["trl_completion_len"] == cfg["completion_len"]
