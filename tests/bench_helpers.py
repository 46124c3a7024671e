"""Driver shared by the benchmark smoke tests: `python -m bench.<module> --quick` into a temporary
directory, which must succeed, write `<module>_quick.json` and leave docs/benchmarks.md alone; and
checks that hold for every benchmark's results."""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"


def docs_text(section: str | None = None) -> str | None:
  """docs/benchmarks.md, or only one benchmark's section of it (others may rewrite theirs)."""
  if section is None:
    return DOCS.read_text() if DOCS.is_file() else None
  from bench import common
  return common.docs_section(DOCS.read_text() if DOCS.is_file() else "", section)


def run_quick(module: str, out_dir: Path, *extra: str) -> tuple[dict, str]:
  """(the results JSON, the printed stdout) of a --quick run of `bench.<module>`; the printed
  section must be what rendering that JSON gives."""
  benchmark = importlib.import_module(f"bench.{module}").BENCHMARK
  docs_before = docs_text(benchmark.section)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick", "--out-dir",
                         str(out_dir), *extra], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert docs_text(benchmark.section) == docs_before, "--quick must not touch docs/benchmarks.md"
  results = json.loads((out_dir / f"{module}_quick.json").read_text())
  assert proc.stdout.rstrip("\n").endswith(benchmark.render(results)), proc.stdout[-2000:]
  assert positive(results["wall_s"])
  return results, proc.stdout


def positive(*values: float) -> bool:
  """Every value a finite number above zero."""
  return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def median(values) -> float:
  return statistics.median(values)
