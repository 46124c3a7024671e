"""The accelerator suite (`python -m bench --suite accelerator`): its --quick run end to end on CPU
with the results' schema and the figures that follow from its timings, fail-soft parts, the
rendering of errors and skips, and the carried-wheels folder. Nothing here asserts a timing."""

import json
import subprocess
import sys
import zipfile

import pytest

from bench import accelerator, wheels
from bench.render import accelerator as render
from tests.bench_helpers import REPO, median, positive, run_quick

PARTS = ("probes", "model", "sampler", "train", "round", "waste", "trl")


@pytest.mark.slow
def test_quick_accelerator_suite_runs_every_part_and_its_figures_follow(tmp_path):
  res, out = run_quick("accelerator", tmp_path)
  assert "harness check on CPU" in out
  for part in PARTS:  # every part ran (no error, no skip) on this machine, which has them all
    assert part in res and "error" not in res[part] and "skipped" not in res[part], res[part]
  cfg, pr = res["config"], res["probes"]
  assert res["machine"]["device"]["platform"] == "cpu"
  assert positive(pr["matmul_peak_flops"], pr["read_bytes_s"], pr["copy_bytes_s"])
  assert pr["bandwidth_bytes_s"] == max(pr["read_bytes_s"], pr["copy_bytes_s"])
  sp = res["sampler"]
  assert [r["batch"] for r in sp["rows"]] == list(cfg["batches"])
  for r in sp["rows"]:
    assert r["ours_s"] == median(r["ours_times_s"]) and len(r["ours_times_s"]) == cfg["reps"]
    assert r["ours_tok_s"] == pytest.approx(r["batch"] * cfg["new_tokens"] / r["ours_s"])
    assert r["hf_tok_s"] == pytest.approx(r["batch"] * cfg["new_tokens"] / r["hf_s"])
    assert r["greedy_rows_identical"] == 1.0  # same weights, same greedy completions
  b1 = sp["batch1"]
  assert b1["step_s"] == pytest.approx((b1["call_s"] - b1["prefill_s"]) / (cfg["new_tokens"] - 1))
  m = cfg["model"]
  hd = m["hidden_size"] // m["num_attention_heads"]
  cache = 2 * m["num_hidden_layers"] * (cfg["prompt_len"] + cfg["new_tokens"]) * \
      m["num_key_value_heads"] * hd * 4
  assert b1["bytes_per_step"] == 4 * (res["model"]["non_embedding"] + m["hidden_size"]) + cache
  assert b1["fraction_of_bandwidth"] == pytest.approx(
      b1["bytes_per_step"] / b1["step_s"] / pr["bandwidth_bytes_s"])
  tr = res["train"]
  assert tr["mfu"] == pytest.approx(tr["flops"] / tr["step_s"] / pr["matmul_peak_flops"])
  rd = res["round"]
  assert rd["same_work"]["equal"] and rd["ratio"] == pytest.approx(rd["split_s"] / rd["fused_s"])
  old, judge = res["waste"]["old_logp"], res["waste"]["judge"]
  assert old["speedup"] == pytest.approx(old["with_old_logp_pass_s"] / old["old_logp_from_update_s"])
  assert old["xla_flops"]["with_old_logp_pass"] > old["xla_flops"]["old_logp_from_update"]
  assert judge["scores_max_abs_diff"] < 1e-5
  assert judge["unchunked_temp_bytes"] > judge["chunked_temp_bytes"]
  trl = res["trl"]
  assert trl["ratio"] == pytest.approx(trl["trl_s"] / old["old_logp_from_update_s"])
  json.dumps(res)  # plain JSON throughout


def test_a_failing_part_is_recorded_and_the_rest_goes_on():
  res, logs = {}, []
  budget = accelerator.Budget(60)
  assert accelerator.soft(res, "a", budget, 0, logs.append, lambda: 1 / 0) is None
  assert res["a"]["error"].startswith("ZeroDivisionError")
  assert accelerator.soft(res, "b", budget, 0, logs.append, lambda: {"x": 1.0})["x"] == 1.0
  assert res["b"]["part_s"] >= 0
  assert accelerator.soft(res, "c", budget, 10**6, logs.append, lambda: {"x": 2.0}) is None
  assert res["c"]["skipped"].startswith("time budget")


def test_render_says_why_a_part_is_missing():
  res = {"machine": {"device": {"platform": "gpu", "device_kind": "NVIDIA H100", "device_count": 1},
                     "cpu_model": "x", "date": "d", "jax": "j", "torch": None, "transformers": None,
                     "trl": None},
         "config": {**accelerator.QUICK.__dict__, "model": accelerator.QUICK.model},
         "wall_s": 1.0, "probes": {"error": "RuntimeError: no"},
         "model": {"params": 10, "from": "init_params"},
         "sampler": {"skipped": "time budget: 1 s left"}, "train": {"error": "OOM"},
         "round": {"skipped": "time budget"}, "waste": {"error": "E"},
         "trl": {"skipped": "trl does not import"}}
  text = render.render(res)
  assert text.startswith("## Accelerator: one chip (NVIDIA H100)")
  for why in ("failed: `RuntimeError: no`", "skipped: time budget: 1 s left", "failed: `OOM`",
              "trl does not import", "failed: `E`"):
    assert why in text, why


def test_wheels_folder_is_unpacked_and_importable_after_site_packages(tmp_path, monkeypatch):
  with zipfile.ZipFile(tmp_path / "carried_pkg-1.0-py3-none-any.whl", "w") as z:
    z.writestr("carried_pkg/__init__.py", "VALUE = 7\n")
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.delenv(wheels.ENV, raising=False)
  added = wheels.activate(tmp_path)
  assert added == [str(tmp_path / "_unpacked" / "carried_pkg-1.0-py3-none-any")]
  assert sys.path[-1] == added[0]  # after the image's own packages: never shadows them
  import carried_pkg
  assert carried_pkg.VALUE == 7
  assert wheels.activate(tmp_path) == added and sys.path.count(added[0]) == 1  # idempotent
  del sys.modules["carried_pkg"]
  with pytest.raises(FileNotFoundError, match="--wheels"):
    wheels.activate(tmp_path / "missing")


def test_suite_runs_the_accelerator_benchmark_by_name_only():
  one = subprocess.run([sys.executable, "-m", "bench", "--suite", "accelerator", "--quick",
                        "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       check=False)
  assert one.returncode == 0 and one.stdout.split()[1:] == ["-m", "bench.accelerator", "--quick"]
  every = subprocess.run([sys.executable, "-m", "bench", "--suite", "all", "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=False)
  assert "bench.accelerator" not in every.stdout
