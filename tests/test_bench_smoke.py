"""Smoke test of the sampling benchmark harness (`python -m bench.sampling --quick`).

Checks the harness runs and writes a well-formed results file; asserts nothing about timings.
"""

import pytest

from tests.bench_helpers import run_quick

TOP_KEYS = {"machine", "probes", "config", "throughput", "compute_bound", "profile_batch1",
            "bandwidth_bound", "notes", "loadavg_end", "wall_s"}
ROW_KEYS = {"batch", "ours_times_s", "hf_times_s", "hf_1thread_times_s", "ours_tok_s", "hf_tok_s",
            "hf_1thread_tok_s", "ratio", "ratio_vs_best_hf", "greedy_rows_identical"}


@pytest.mark.slow
def test_quick_sampling_benchmark_writes_results(tmp_path):
  results, _ = run_quick("sampling", tmp_path)
  assert TOP_KEYS <= set(results)
  assert [row["batch"] for row in results["throughput"]] == [1, 2]
  for row in results["throughput"]:
    assert ROW_KEYS <= set(row)
    assert len(row["ours_times_s"]) == len(row["hf_times_s"]) == results["config"]["reps"]
  for key in ("cpu_model", "cpu_count", "jax", "torch", "transformers", "date"):
    assert key in results["machine"]
  assert results["probes"]["matmul_peak_flops"] > 0
  assert results["probes"]["memory_bandwidth_bytes_s"] > 0
  assert {"ours_fraction_of_peak", "flops_per_token", "formula"} <= set(results["compute_bound"])
  assert {"fraction_of_bandwidth", "bytes_per_step", "formula"} <= set(results["bandwidth_bound"])
  assert {"ours_prefill_s", "ours_step_in_loop_s", "hf_step_s"} <= set(results["profile_batch1"])


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
