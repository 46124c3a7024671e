"""The benchmarks' split into measurement and rendering, and their shared `main`.

Every committed `bench/results/<name>.json` must render to exactly the section that
docs/benchmarks.md holds; `main` must publish, fail and short-cut the same way for every benchmark.
Nothing here measures anything (no benchmark runs).
"""

import importlib
import json
import re

import pytest

from bench import __main__ as suite
from bench import common

# (module under bench/, its results file), in suite order.
COMMITTED = [("sampling", "sampling"), ("trl_compare", "trl_compare"),
             ("tunix_sampler", "tunix_sampler"), ("round", "round"), ("reward_fns", "reward_fns"),
             ("lora", "lora")]
MEASUREMENT_MODULES = ["sampling", "trl_compare", "trl_side", "tunix_sampler", "tunix_worker", "round",
                       "reward_fns", "lora", "accelerator", "wheels",
                       "round_limits", "timing", "profiling"]


@pytest.mark.parametrize("module,results", COMMITTED)
def test_committed_results_render_to_the_docs_section(module, results):
  benchmark = importlib.import_module(f"bench.{module}").BENCHMARK
  assert benchmark.name == module == suite.SUITES[benchmark.section]
  res = json.loads((common.RESULTS_DIR / f"{results}.json").read_text())
  section = common.docs_section(common.DOCS_FILE.read_text(), benchmark.section)
  assert section is not None, f"docs/benchmarks.md has no {benchmark.section} section"
  assert benchmark.render(res) == section


@pytest.mark.parametrize("module", MEASUREMENT_MODULES)
def test_measurement_modules_hold_no_markdown(module):
  source = (common.REPO_ROOT / "bench" / f"{module}.py").read_text()
  for pattern in (r"\|---", r"[\"']#{2,} ", r"\*\*[A-Z]", r"\| \{"):
    assert not re.search(pattern, source), (module, pattern)


def _benchmark(calls: list, **extra) -> common.Benchmark:
  def measure(args, log):
    calls.append(args.quick)
    return {"value": 2.0, "quick": args.quick}

  return common.Benchmark(name="fake", section="fake", doc="A fake benchmark.", measure=measure,
                          render=lambda res: f"## Fake\n\nvalue {res['value']:.1f}", **extra)


def test_main_publishes_results_and_the_docs_section(tmp_path, monkeypatch, capsys):
  docs = tmp_path / "benchmarks.md"
  monkeypatch.setattr(common, "DOCS_FILE", docs)
  calls: list = []
  assert common.main(_benchmark(calls), ["--quick", "--out-dir", str(tmp_path)]) == 0
  quick = json.loads((tmp_path / "fake_quick.json").read_text())
  assert quick["quick"] is True and quick["wall_s"] >= 0 and not docs.exists()
  assert capsys.readouterr().out == "## Fake\n\nvalue 2.0\n"
  assert common.main(_benchmark(calls), ["--out-dir", str(tmp_path)]) == 0
  assert json.loads((tmp_path / "fake.json").read_text())["quick"] is False
  assert common.docs_section(docs.read_text(), "fake") == "## Fake\n\nvalue 2.0"
  assert calls == [True, False]


def test_main_renders_a_saved_results_file_without_measuring(tmp_path, monkeypatch):
  docs = tmp_path / "benchmarks.md"
  monkeypatch.setattr(common, "DOCS_FILE", docs)
  saved = tmp_path / "saved.json"
  saved.write_text(json.dumps({"value": 7.0}))
  calls: list = []
  assert common.main(_benchmark(calls), ["--render-from", str(saved)]) == 0
  assert calls == [] and common.docs_section(docs.read_text(), "fake") == "## Fake\n\nvalue 7.0"


def test_main_exit_status_for_a_missing_dependency_a_failure_and_a_shortcut(tmp_path, monkeypatch):
  monkeypatch.setattr(common, "DOCS_FILE", tmp_path / "benchmarks.md")
  calls: list = []
  args = ["--quick", "--out-dir", str(tmp_path)]
  missing = _benchmark(calls, missing=lambda: "needs something")
  assert common.main(missing, args) == 2 and calls == [] and not list(tmp_path.iterdir())
  failed = _benchmark(calls, failure=lambda res: "wrong" if res["value"] == 2.0 else None)
  assert common.main(failed, args) == 1 and calls == [True]
  assert (tmp_path / "fake_quick.json").is_file()  # a failed run still leaves its numbers
  shortcut = _benchmark(calls, flags=lambda p: p.add_argument("--other", action="store_true"),
                        instead=lambda a, log: 5 if a.other else None)
  assert common.main(shortcut, [*args, "--other"]) == 5 and calls == [True]
  assert common.main(shortcut, args) == 0 and calls == [True, True]
