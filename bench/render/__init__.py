"""Markdown: each benchmark's results dict -> its docs/benchmarks.md section.

One module per benchmark (`sampling`, `trl`, `tunix`, `round`, `reward_fns`, `accelerator`, ...),
each with `render(res) -> str`, plus the formatting they share. Rendering reads only the results dict (standard library only, no
jax), so any saved results file renders again: `python -m bench.<module> --render-from <json>`.
"""

from __future__ import annotations

from bench.common import fmt_si

__all__ = ["fmt_si", "ms", "opening", "ran_on", "raw_numbers_note"]


def ms(seconds: float, spec: str = ".3g") -> str:
  """0.00123 -> '1.23 ms' (`spec` formats the milliseconds)."""
  return f"{seconds * 1e3:{spec}} ms"


def ran_on(module: str, mach: dict) -> str:
  """How a section's run line starts: the command, the machine and the date."""
  return (f"`python -m bench.{module}` on {mach['cpu_model']} ({mach['usable_cores']} cores), "
          f"{mach['date']}; ")


def opening(title: str, module: str, mach: dict, run_line: str) -> list[str]:
  """A section's first lines: its title, then its run line (`ran_on` + `run_line`)."""
  return [title, "", ran_on(module, mach) + run_line]


def raw_numbers_note(name: str) -> str:
  """The closing sentence of a benchmark's docs section: where its raw numbers are, and the noise."""
  return (f"Raw numbers (every repetition): `bench/results/{name}.json`. Timings on this shared "
          "2-core machine swing 2-3x between runs; compare ratios, not absolute rates.")
