"""Smoke tests of the round benchmark (`python -m bench.round --quick`) and of the suite runner
(`python -m bench --suite ...`). Harness correctness only: nothing here asserts a timing."""

import subprocess
import sys

import pytest

from tests.bench_helpers import REPO, run_quick

TOP_KEYS = {"machine", "config", "fused_vs_split", "limits", "decode_bandwidth", "scaling", "notes",
            "loadavg_end", "wall_s"}
ROW_KEYS = {"label", "shape", "params", "fused_times_s", "split_times_s", "fused_s", "split_s", "ratio",
            "split_phase_s", "same_work"}


@pytest.mark.slow
def test_quick_round_benchmark_writes_results(tmp_path):
  res, _ = run_quick("round", tmp_path)
  assert TOP_KEYS <= set(res)
  for key in ("cpu_model", "cpu_count", "jax", "flax", "loadavg", "date"):
    assert key in res["machine"]
  for row in res["fused_vs_split"]:
    assert ROW_KEYS <= set(row)
    assert len(row["fused_times_s"]) == len(row["split_times_s"]) == res["config"]["fused"][0][2]
    same = row["same_work"]
    # Same RNG keys, same work: identical completions, equal metrics, equal parameters.
    assert same["equal"] and same["tokens_equal"], same
    assert same["fused_metrics"].keys() == same["split_metrics"].keys()
    for key, value in same["fused_metrics"].items():
      assert value == pytest.approx(same["split_metrics"][key], rel=1e-4, abs=1e-6), key
  train = res["limits"]["training_step"]
  assert train["peak_flops"] > 0 and train["flops"] > 0 and 0 < train["mfu"]
  assert {"forward_mfu", "forward_backward_mfu", "adam_share", "formula"} <= set(train)
  assert res["limits"]["round"]["mfu"] > 0
  assert res["scaling"]["rows"][0]["axis"] == "base" and res["scaling"]["rows"][0]["vs_base"] == 1.0


def test_suite_dry_run_lists_the_modules_in_order():
  proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "all", "--quick", "--dry-run"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  modules = [line.split()[2] for line in proc.stdout.splitlines() if " -m bench." in line]
  assert modules == ["bench.sampling", "bench.trl_compare", "bench.tunix_sampler", "bench.round"]
  assert all("--quick" in line for line in proc.stdout.splitlines() if " -m bench." in line)
  one = subprocess.run([sys.executable, "-m", "bench", "--suite", "round", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert one.returncode == 0 and one.stdout.split()[1:] == ["-m", "bench.round"], one.stdout


def test_suite_reports_a_failed_or_missing_module_and_runs_the_rest(tmp_path, monkeypatch):
  from bench import __main__ as suite
  monkeypatch.setitem(suite.SUITES, "ghost", "no_such_benchmark")
  calls = []

  def runner(cmd, cwd):
    calls.append(cmd)
    (tmp_path / f"{cmd[2]}.json").write_text(str(len(calls)))
    return subprocess.CompletedProcess(cmd, 0 if cmd[2] == "bench.round" else 3)

  outcomes = suite.run_suites(["sampling", "ghost", "round"], quick=True, out_dir=str(tmp_path),
                              runner=runner, log=lambda msg: None)
  assert [c[2] for c in calls] == ["bench.sampling", "bench.round"]
  assert [o.status for o in outcomes] == ["failed (exit 3)", "missing", "ok"]
  assert outcomes[2].results == [str(tmp_path / "bench.round.json")]
  assert calls[1][3:] == ["--quick", "--out-dir", str(tmp_path)]
  assert "failed (exit 3)" in suite.summary(outcomes, quick=True)
