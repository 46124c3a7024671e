"""Driver shared by the benchmark smoke tests: `python -m bench.<module> --quick` into a temporary
directory, which must succeed, write `<module>_quick.json` and leave docs/benchmarks.md alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"


def docs_text(section: str | None = None) -> str | None:
  """docs/benchmarks.md, or only one benchmark's section of it (others may rewrite theirs)."""
  if section is None:
    return DOCS.read_text() if DOCS.is_file() else None
  text = DOCS.read_text() if DOCS.is_file() else ""
  start = text.find(f"<!-- BEGIN {section} -->")
  return text[start:text.find(f"<!-- END {section} -->", start)] if start >= 0 else None


def run_quick(module: str, out_dir: Path, *extra: str, section: str | None = None
              ) -> tuple[dict, str]:
  """(the results JSON, the printed stdout) of a --quick run of `bench.<module>`."""
  docs_before = docs_text(section)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick", "--out-dir",
                         str(out_dir), *extra], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert docs_text(section) == docs_before, "--quick must not touch docs/benchmarks.md"
  return json.loads((out_dir / f"{module}_quick.json").read_text()), proc.stdout
