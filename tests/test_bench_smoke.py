"""Smoke test of the sampling benchmark harness (`python -m bench.sampling --quick`).

Checks the harness runs and that its figures follow from its raw numbers; asserts nothing about
timings.
"""

import pytest

from tests.bench_helpers import median, positive, run_quick


@pytest.mark.slow
def test_quick_sampling_benchmark_figures_follow_from_its_timings(tmp_path):
  res, _ = run_quick("sampling", tmp_path)
  cfg = res["config"]
  assert [row["batch"] for row in res["throughput"]] == list(cfg["batches"])
  for row in res["throughput"]:
    tokens = row["batch"] * cfg["new_tokens"]
    for side in ("ours", "hf", "hf_1thread"):
      assert len(row[f"{side}_times_s"]) == cfg["reps"] and positive(*row[f"{side}_times_s"])
      assert row[f"{side}_tok_s"] == pytest.approx(tokens / median(row[f"{side}_times_s"]))
    assert row["ratio"] == pytest.approx(row["ours_tok_s"] / row["hf_tok_s"])
    assert row["ratio_vs_best_hf"] == pytest.approx(
        row["ours_tok_s"] / max(row["hf_tok_s"], row["hf_1thread_tok_s"]))
  probes = res["probes"]
  assert positive(probes["matmul_peak_flops"], probes["memory_bandwidth_bytes_s"])
  assert probes["matmul_peak_flops_used"] == max(probes["matmul_peak_flops"],
                                                 probes["matmul_peak_flops_reprobe"])
  assert probes["memory_bandwidth_bytes_s_used"] == max(probes["memory_bandwidth_bytes_s"],
                                                        probes["memory_bandwidth_bytes_s_reprobe"])
  cb = res["compute_bound"]
  largest = max(res["throughput"], key=lambda row: row["batch"])
  assert cb["batch"] == largest["batch"] and positive(cb["flops_per_token"])
  assert cb["ours_fraction_of_peak"] == pytest.approx(
      cb["flops_per_token"] * largest["ours_tok_s"] / probes["matmul_peak_flops_used"])
  bb = res["bandwidth_bound"]
  assert positive(bb["bytes_per_step"], bb["ours_call_s"], bb["ours_prefill_s"])
  assert bb["ours_step_in_loop_s"] == pytest.approx(
      (bb["ours_call_s"] - bb["ours_prefill_s"]) / (bb["new_tokens"] - 1))
  assert bb["fraction_of_bandwidth"] == pytest.approx(
      bb["bytes_per_step"] / bb["ours_step_in_loop_s"] / probes["memory_bandwidth_bytes_s_used"])
  prof = res["profile_batch1"]
  assert positive(prof["ours_prefill_s"], prof["ours_call_s"], prof["hf_call_s"])
  assert prof["prefill_share_of_call"] == pytest.approx(prof["ours_prefill_s"] / prof["ours_call_s"])


@pytest.mark.slow
def test_quick_lora_benchmark_sizes_and_ratios_follow_from_its_numbers(tmp_path):
  """`python -m bench.lora --quick`: the byte counts are those of the state's arrays (AdamW: two
  moments per trained parameter, float32) and the ratios follow from the timings."""
  res, _ = run_quick("lora", tmp_path)
  sizes, times, cfg = res["sizes"], res["times"], res["config"]
  assert sizes["full"]["trainable_params"] == cfg["base_params"]
  d, f, hd, r = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"], cfg["rank"]
  q, kv = cfg["num_heads"] * hd, cfg["num_kv_heads"] * hd
  per_layer = r * (2 * (d + q) + 2 * (d + kv) + 3 * (d + f))
  assert sizes["lora"]["trainable_params"] == per_layer * cfg["num_layers"]
  for side in ("full", "lora"):  # AdamW's mu and nu, plus a few step counters
    assert 0 <= sizes[side]["optimizer_bytes"] - 8 * sizes[side]["trainable_params"] < 64
    assert len(times[side]["times_s"]) == cfg["reps"] and positive(*times[side]["times_s"])
    assert times[side]["median_s"] == pytest.approx(median(times[side]["times_s"]))
  assert sizes["lora"]["param_bytes"] == sizes["full"]["param_bytes"] + 4 * sizes["lora"]["trainable_params"]
  # A checkpoint: full = params + optimizer state (+ counters); LoRA = adapters + their state.
  assert sizes["lora"]["checkpoint_bytes"] < sizes["full"]["param_bytes"]
  assert res["optimizer_bytes_ratio"] == pytest.approx(
      sizes["full"]["optimizer_bytes"] / sizes["lora"]["optimizer_bytes"])
  assert res["update_time_ratio"] == pytest.approx(times["lora"]["median_s"] / times["full"]["median_s"])


def test_docs_section_is_replaced_between_markers(tmp_path):
  from bench import common
  path = tmp_path / "benchmarks.md"
  common.update_docs_section("a", "first", path)
  common.update_docs_section("b", "other", path)
  common.update_docs_section("a", "second\nversion", path)
  text = path.read_text()
  assert text.startswith("# Benchmarks")
  assert "first" not in text and "<!-- BEGIN a -->\nsecond\nversion\n<!-- END a -->" in text
  assert text.count("<!-- BEGIN a -->") == 1 and "<!-- BEGIN b -->\nother\n<!-- END b -->" in text
  assert common.docs_section(text, "a") == "second\nversion" and common.docs_section(text, "c") is None
