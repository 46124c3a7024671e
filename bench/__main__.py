"""Runs the benchmark suite: each module as `python -m bench.<module>`, one after the other.

  python -m bench --suite all            # sampling, trl, tunix, round, reward_fns, lora (full runs: docs + results)
  python -m bench --suite round --quick  # one benchmark, tiny sizes (results/<name>_quick.json only)
  python -m bench --suite all --dry-run  # print the commands, run nothing
  python -m bench --suite accelerator --wheels wheels/  # one GPU / TPU chip (docs/benchmarks.md)

Each module runs in its own process, so one that is missing or fails is reported and the rest
still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from bench import common, wheels

# --suite name -> module under bench/ (run as `python -m bench.<module>`), in suite order.
SUITES = {"sampling": "sampling", "trl": "trl_compare", "tunix": "tunix_sampler", "round": "round",
          "reward_fns": "reward_fns", "lora": "lora", "accelerator": "accelerator"}
# Suites `--suite all` runs (the accelerator one is for a GPU / TPU chip: run it by name).
ALL = [name for name in SUITES if name != "accelerator"]


@dataclasses.dataclass
class Outcome:
  suite: str
  module: str
  status: str  # ok | failed (exit N) | missing | dry-run
  seconds: float
  results: list[str]  # result files written (or rewritten) while the module ran


def command(module: str, quick: bool, out_dir: str | None) -> list[str]:
  cmd = [sys.executable, "-m", f"bench.{module}"]
  if quick:
    cmd.append("--quick")
  if out_dir is not None:
    cmd += ["--out-dir", out_dir]
  return cmd


def _snapshot(directory: Path) -> dict[str, int]:
  """{result file: mtime_ns}, to tell which files a module (re)wrote."""
  if not directory.is_dir():
    return {}
  return {str(p): p.stat().st_mtime_ns for p in directory.glob("*.json")}


def _written(before: dict[str, int], after: dict[str, int]) -> list[str]:
  return sorted(path for path, mtime in after.items() if before.get(path) != mtime)


def run_suites(names: Sequence[str], quick: bool = False, out_dir: str | None = None,
               dry_run: bool = False, runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
               log: Callable[[str], None] = print) -> list[Outcome]:
  """Runs each suite's module in turn; never stops at a failure."""
  results_dir = Path(out_dir) if out_dir is not None else common.RESULTS_DIR
  outcomes = []
  for name in names:
    module = SUITES[name]
    cmd = command(module, quick, out_dir)
    if dry_run:
      log(" ".join(cmd))
      outcomes.append(Outcome(name, module, "dry-run", 0.0, []))
      continue
    if importlib.util.find_spec(f"bench.{module}") is None:
      log(f"[bench] {name}: bench/{module}.py is missing; skipped")
      outcomes.append(Outcome(name, module, "missing", 0.0, []))
      continue
    log(f"[bench] {name}: {' '.join(cmd)}")
    before, start = _snapshot(results_dir), time.perf_counter()
    proc = runner(cmd, cwd=common.REPO_ROOT)
    seconds = time.perf_counter() - start
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    outcomes.append(Outcome(name, module, status, seconds, _written(before, _snapshot(results_dir))))
    log(f"[bench] {name}: {status} in {seconds:.0f} s")
  return outcomes


def summary(outcomes: Sequence[Outcome], quick: bool) -> str:
  lines = ["", "suite        module          status               time  results"]
  for o in outcomes:
    lines.append(f"{o.suite:<12} {o.module:<15} {o.status:<20} {o.seconds:5.0f}s  "
                 f"{', '.join(o.results) or '-'}")
  lines.append("")
  lines.append("docs: unchanged (--quick never writes docs)" if quick else
               f"docs: {common.DOCS_FILE} (each benchmark that ran rewrites its own section)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--suite", default="all", choices=["all", *SUITES],
                      help="which benchmark to run (default: all, in the order listed; all leaves out "
                           "accelerator)")
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a harness check, no docs")
  parser.add_argument("--out-dir", default=None, help="results directory (default bench/results)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--wheels", default=None, metavar="DIR",
                      help="folder of carried *.whl files for a machine without network "
                           f"(passed on as ${wheels.ENV}; docs/benchmarks.md)")
  args = parser.parse_args(argv)
  if args.wheels is not None:
    wheels.activate(args.wheels)  # sets $SELFPLAY_WHEELS: each module's process activates them
  names = ALL if args.suite == "all" else [args.suite]
  outcomes = run_suites(names, args.quick, args.out_dir, args.dry_run)
  if args.dry_run:
    return 0
  print(summary(outcomes, args.quick))
  failed = [o.suite for o in outcomes if o.status != "ok"]
  if failed:
    print(f"[bench] failed or missing: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
