"""Smoke tests of the Tunix sampler benchmark harness (`python -m bench.tunix_sampler --quick`).

Tunix lives in its own virtualenv (`python -m bench.tunix_sampler --make-venv`), which CI does not
create: there the harness must still run all of our side and record `tunix: unavailable (reason)`.
The both-sides test runs wherever that virtualenv exists. No assertions about timings.
"""

import sys

import pytest

from bench import profiling, tunix_sampler
from bench.render import tunix as render
from tests.bench_helpers import median, positive, run_quick

TUNIX_PYTHON = tunix_sampler.DEFAULT_TUNIX_VENV / "bin" / "python"


def _check_our_side(results: dict) -> None:
  cfg = results["config"]
  assert cfg["params"]["total"] == cfg["params"]["embedding"] + cfg["params"]["non_embedding"]
  assert positive(cfg["params"]["non_embedding"], cfg["params"]["embedding"])
  assert [row["batch"] for row in results["throughput"]] == list(cfg["batches"])
  for row, reps in zip(results["throughput"], cfg["reps"], strict=True):
    assert len(row["ours_times_s"]) == reps and positive(*row["ours_times_s"], row["ours_first_call_s"])
    assert row["ours_tok_s"] == pytest.approx(row["batch"] * cfg["new_tokens"] / median(row["ours_times_s"]))
  assert [prof["batch"] for prof in results["profile"]] == list(cfg["profile_batches"])
  for prof in results["profile"]:
    ours = prof["ours"]
    assert positive(ours["call_s"], ours["prefill_and_first_step_s"])
    assert ours["step_in_loop_s"] == pytest.approx(
        (ours["call_s"] - ours["prefill_and_first_step_s"]) / (cfg["new_tokens"] - 1))
    trace = prof["ours_trace"]
    assert set(trace["op_ms_by_kind"]) <= set(render.KIND_COLUMNS), trace
    assert trace["op_ms_total"] == pytest.approx(sum(trace["op_ms_by_kind"].values()))
    assert positive(trace["op_ms_by_kind"].get("matmuls", 0))  # a decode step is mostly matmuls


@pytest.mark.slow
def test_quick_without_tunix_runs_our_side_and_records_why(tmp_path):
  results, _ = run_quick("tunix_sampler", tmp_path,
                         "--tunix-python", str(tmp_path / "no-venv" / "bin" / "python"))
  _check_our_side(results)
  assert results["tunix"]["available"] is False
  assert "no Tunix interpreter" in results["tunix"]["reason"]
  for row in results["throughput"]:
    assert "tunix_tok_s" not in row and "ratio" not in row
  assert all(t["met"] is None and t["ratio"] is None for t in results["targets"].values())


@pytest.mark.slow
@pytest.mark.skipif(not TUNIX_PYTHON.is_file(),
                    reason=f"no Tunix virtualenv at {TUNIX_PYTHON.parent.parent} "
                           "(python -m bench.tunix_sampler --make-venv)")
def test_quick_with_tunix_compares_both_sides(tmp_path):
  results, _ = run_quick("tunix_sampler", tmp_path)
  _check_our_side(results)
  tunix = results["tunix"]
  assert tunix["available"] is True, tunix
  assert tunix["versions"]["google-tunix"] and tunix["versions"]["jax"]
  assert tunix["params"] == results["config"]["params"]["total"]
  assert results["logits"]["max_abs_diff"] < 1e-4  # the same weights, the same function
  for row, reps in zip(results["throughput"], results["config"]["reps"], strict=True):
    assert len(row["tunix_times_s"]) == reps and positive(*row["tunix_times_s"])
    assert row["ratio"] == pytest.approx(row["ours_tok_s"] / row["tunix_tok_s"])
  by_batch = {row["batch"]: row for row in results["throughput"]}
  assert by_batch[1]["agreement"]["rows_identical"] == 1.0  # greedy: token for token
  for key, target in results["targets"].items():  # a target at a batch the run skips: no verdict
    ratio = by_batch.get(int(key.removeprefix("batch_")), {}).get("ratio")
    assert target["ratio"] == ratio
    assert target["met"] == (None if ratio is None else ratio >= target["target_ratio"])
  for prof in results["profile"]:
    assert positive(prof["tunix"]["decode_loop_s"], prof["tunix_trace"]["op_ms_total"])
    assert prof["step_ratio"] == pytest.approx(
        prof["tunix"]["step_in_loop_s"] / prof["ours"]["step_in_loop_s"])


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
  assert profiling.op_kind("ynn_fusion") == profiling.op_kind("dot") == "matmuls"
  assert profiling.op_kind("transpose_copy_fusion") == "copies/transposes"
  assert profiling.op_kind("bitcast_dynamic-update-slice_fusion") == "cache writes"
  assert profiling.op_kind("add_multiply_fusion") == "other ops"
