"""Smoke tests of the Tunix sampler benchmark harness (`python -m bench.tunix_sampler --quick`).

Tunix lives in its own virtualenv (`python -m bench.tunix_sampler --make-venv`), which CI does not
create: there the harness must still run all of our side and record `tunix: unavailable (reason)`.
The both-sides test runs wherever that virtualenv exists. No assertions about timings.
"""

import sys

import pytest

from bench import tunix_sampler
from tests.bench_helpers import run_quick

TUNIX_PYTHON = tunix_sampler.DEFAULT_TUNIX_VENV / "bin" / "python"
TOP_KEYS = {"machine", "tunix", "config", "throughput", "targets", "profile", "notes", "loadavg_end",
            "wall_s"}


def _run_quick(tmp_path, *extra) -> dict:
  results, stdout = run_quick("tunix_sampler", tmp_path, *extra)
  assert "## Sampler vs Tunix" in stdout  # the docs section is rendered (printed) either way
  return results


def _check_our_side(results: dict) -> None:
  assert TOP_KEYS <= set(results)
  for key in ("cpu_model", "cpu_count", "jax", "flax", "loadavg", "date"):
    assert key in results["machine"]
  assert results["config"]["params"]["total"] > 0
  assert [row["batch"] for row in results["throughput"]] == [1, 2]
  for row, reps in zip(results["throughput"], results["config"]["reps"], strict=True):
    assert len(row["ours_times_s"]) == reps
    assert row["ours_tok_s"] > 0 and row["ours_first_call_s"] > 0
  for prof in results["profile"]:
    assert {"prefill_and_first_step_s", "call_s", "step_in_loop_s"} <= set(prof["ours"])
    assert prof["ours_trace"]["op_ms_total"] > 0, prof["ours_trace"]
    assert "matmuls" in prof["ours_trace"]["op_ms_by_kind"]


@pytest.mark.slow
def test_quick_without_tunix_runs_our_side_and_records_why(tmp_path):
  results = _run_quick(tmp_path, "--tunix-python", str(tmp_path / "no-venv" / "bin" / "python"))
  _check_our_side(results)
  assert results["tunix"]["available"] is False
  assert "no Tunix interpreter" in results["tunix"]["reason"]
  for row in results["throughput"]:
    assert "tunix_tok_s" not in row and "ratio" not in row
  assert all(t["met"] is None for t in results["targets"].values())


@pytest.mark.slow
@pytest.mark.skipif(not TUNIX_PYTHON.is_file(),
                    reason=f"no Tunix virtualenv at {TUNIX_PYTHON.parent.parent} "
                           "(python -m bench.tunix_sampler --make-venv)")
def test_quick_with_tunix_compares_both_sides(tmp_path):
  results = _run_quick(tmp_path)
  _check_our_side(results)
  tunix = results["tunix"]
  assert tunix["available"] is True, tunix
  assert tunix["versions"]["google-tunix"] and tunix["versions"]["jax"]
  assert tunix["params"] == results["config"]["params"]["total"]
  assert results["logits"]["max_abs_diff"] < 1e-4  # the same weights, the same function
  for row, reps in zip(results["throughput"], results["config"]["reps"], strict=True):
    assert len(row["tunix_times_s"]) == reps
    assert row["tunix_tok_s"] > 0 and row["ratio"] > 0
  by_batch = {row["batch"]: row for row in results["throughput"]}
  assert by_batch[1]["agreement"]["rows_identical"] == 1.0  # greedy: token for token
  assert results["targets"]["batch_1"]["met"] in (True, False)
  for prof in results["profile"]:
    assert prof["tunix"]["decode_loop_s"] > 0 and prof["tunix_trace"]["op_ms_total"] > 0


def test_worker_without_tunix_is_reported_unavailable():
  """Our own interpreter has no Tunix: the worker starts, fails its import, and says why."""
  client, info = tunix_sampler.start_tunix(sys.executable, log=lambda _: None)
  assert client is None and info["available"] is False
  assert "failed to start" in info["reason"] and "tunix" in info["reason"], info["reason"]


def test_missing_interpreter_is_reported_unavailable(tmp_path):
  client, info = tunix_sampler.start_tunix(tmp_path / "python", log=lambda _: None)
  assert client is None and info["available"] is False
  assert "no Tunix interpreter" in info["reason"] and "--make-venv" in info["reason"]


def test_agreement_and_op_kinds():
  stats = tunix_sampler.agreement_stats([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 6]])
  assert stats == {"rows_identical": 0.5, "tokens_identical": 5 / 6, "first_divergence": [None, 1]}
  assert tunix_sampler.op_kind("ynn_fusion") == tunix_sampler.op_kind("dot")
  assert tunix_sampler.op_kind("transpose_copy_fusion") == "copies/transposes"
  assert tunix_sampler.op_kind("bitcast_dynamic-update-slice_fusion") == "cache writes"
