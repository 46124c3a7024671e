"""Smoke tests of the round benchmark (`python -m bench.round --quick`) and of the suite runner
(`python -m bench --suite ...`). Harness correctness only: nothing here asserts a timing."""

import subprocess
import sys

import pytest

from tests.bench_helpers import REPO, median, positive, run_quick


@pytest.fixture(scope="module")
def quick_round(tmp_path_factory) -> dict:
  """The results of one `python -m bench.round --quick` (shared by the tests below)."""
  return run_quick("round", tmp_path_factory.mktemp("round"))[0]


@pytest.mark.slow
def test_quick_round_benchmark_does_the_same_work_both_ways(quick_round):
  res = quick_round
  cfg = res["config"]
  for row in res["fused_vs_split"]:
    same = row["same_work"]
    # Same RNG keys, same work: identical completions, equal metrics, equal parameters.
    assert same["equal"] is True and same["tokens_equal"] is True, same
    assert max(same["metric_rel_diff"].values()) <= 1e-4
    assert same["param_max_abs_diff"] <= 0.01 * cfg["lr"]
    for key, value in same["fused_metrics"].items():
      assert value == pytest.approx(same["split_metrics"][key], rel=1e-4, abs=1e-6), key
    # The check is not vacuous: the rewards vary inside groups, so the updates move the weights.
    assert same["fused_metrics"]["train/reward_std"] > 0
    assert positive(same["fused_metrics"]["train/grad_norm"])
    assert same["fused_metrics"]["train/completion_len"] == row["shape"]["completion_len"]


@pytest.mark.slow
def test_quick_round_benchmark_figures_follow_from_its_timings(quick_round):
  res = quick_round
  cfg = res["config"]
  for row, (label, _, reps) in zip(res["fused_vs_split"], cfg["fused"], strict=True):
    assert row["label"] == label
    assert len(row["fused_times_s"]) == len(row["split_times_s"]) == reps
    assert positive(*row["fused_times_s"], *row["split_times_s"], *row["split_phase_s"].values())
    assert row["fused_s"] == median(row["fused_times_s"]) and row["split_s"] == median(row["split_times_s"])
    assert row["ratio"] == pytest.approx(row["split_s"] / row["fused_s"])
    assert row["ratio_cpu"] == pytest.approx(median(row["split_cpu_s"]) / median(row["fused_cpu_s"]))
    assert list(row["split_phase_s"]) == ["sample", "score", "build", "shuffle", "update"]
    assert row["host_calls_split"] == 5 + cfg["minibatches"]
  train = res["limits"]["training_step"]
  assert positive(train["flops"], train["mfu"], train["mfu_cpu"], *train["peak_probes_flops"])
  assert train["peak_flops"] == median(train["peak_probes_flops"])
  assert train["achieved_flops"] == pytest.approx(train["flops"] / train["median_s"]["step"])
  assert len(train["times_s"]["step"]) == cfg["mfu_reps"]
  rnd = res["limits"]["round"]
  mfu_row = next(r for r in res["fused_vs_split"] if r["label"] == cfg["mfu_label"])
  flops = rnd["flops"]
  assert positive(*flops.values(), rnd["mfu"], rnd["mfu_cpu"])
  assert flops["total"] == pytest.approx(flops["sample"] + flops["old_logp"] + flops["train"])
  assert rnd["achieved_flops"] == pytest.approx(flops["total"] / mfu_row["fused_s"])
  rows = res["scaling"]["rows"]
  assert rows[0]["axis"] == "base" and rows[0]["shape"] == res["scaling"]["base"]
  for row in rows:
    assert row["vs_base"] == pytest.approx(row["round_s"] / rows[0]["round_s"])
    assert row["samples_per_s"] == pytest.approx(row["shape"]["batch"] * row["shape"]["n"] / row["round_s"])


def test_suite_dry_run_lists_the_modules_in_order():
  proc = subprocess.run([sys.executable, "-m", "bench", "--suite", "all", "--quick", "--dry-run"],
                        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  modules = [line.split()[2] for line in proc.stdout.splitlines() if " -m bench." in line]
  assert modules == ["bench.sampling", "bench.trl_compare", "bench.tunix_sampler", "bench.round",
                     "bench.reward_fns", "bench.lora"]
  assert all("--quick" in line for line in proc.stdout.splitlines() if " -m bench." in line)
  one = subprocess.run([sys.executable, "-m", "bench", "--suite", "round", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
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
