"""`selfplay-jax report --workdir=W [--out=FILE]`: one self-contained HTML page about a run.

The page holds: a summary (held-out accuracy after warm-up, at the end and at its best; skipped
updates), the per-round plot (the same figure as `plots/metrics.png`, embedded), a table of every
round's key metrics, sampled prompts / completions / rewards from the earliest and the latest
rounds that dumped samples, and the resolved config. No network, no external files: it can be
mailed or attached to an issue as is.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selfplay_jax import run_config
from selfplay_jax import metrics as metrics_lib

__all__ = ["write_report", "TABLE_COLUMNS"]

# (metrics key, column title); columns a run never logs are left out.
TABLE_COLUMNS = (
    ("phase", "phase"), ("train/loss", "loss"), ("train/reward_mean", "reward"),
    ("train/reward_std", "reward std"), ("train/accuracy", "sample acc."),
    ("train/kl_ref", "KL ref"), ("train/judge_agreement", "judge agree."),
    ("judge/gv_gap", "g-v gap"), ("judge/corr_correct", "corr correct"),
    ("judge/corr_likelihood", "corr self-lik."),
    ("bstar/pass_at_n", "pass@n"), ("bstar/distinct_correct", "distinct correct"),
    ("bstar/precision", "sel. precision"), ("bstar/balance", "balance"),
    ("bstar/temperature", "auto T"), ("bstar/threshold", "auto τ"),
    ("train/pair_accuracy", "pair acc."), ("train/completion_len", "length"),
    ("train/skipped_fraction", "skipped"), ("eval/accuracy", "held-out acc."),
    ("eval/judge_pick_accuracy", "held-out judge pick"), ("eval/gv_gap", "held-out g-v gap"),
    ("time/round_s", "time (s)"),
)
SAMPLE_ROUNDS = 2  # sample dumps shown from each end of the run
SAMPLES_PER_ROUND = 4

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.text { text-align: left; white-space: pre-wrap; font-family: monospace; }
.scroll { max-height: 480px; overflow-y: auto; display: inline-block; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
img { max-width: 100%; }
"""


def _fmt(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _summary(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  rows = [("rounds", str(len(history)))]
  evals = [(r["round"], r["eval/accuracy"]) for r in history if r.get("eval/accuracy") is not None]
  after_warmup = [r["eval/accuracy_after_warmup"] for r in history
                  if r.get("eval/accuracy_after_warmup") is not None]
  if after_warmup:
    rows.append(("held-out accuracy after warm-up", f"{after_warmup[0]:.1%}"))
  if evals:
    rows.append(("held-out accuracy at the end", f"{evals[-1][1]:.1%} (round {evals[-1][0]})"))
    best = max(evals, key=lambda e: (e[1], e[0]))
    rows.append(("best held-out accuracy", f"{best[1]:.1%} (round {best[0]})"))
  skipped = sum(1 for r in history if (r.get("train/skipped_fraction") or 0) > 0)
  rows.append(("rounds with skipped (non-finite) updates", str(skipped)))
  seconds = sum(r.get("time/round_s") or 0.0 for r in history)
  rows.append(("time in rounds", f"{seconds:.1f} s"))
  return rows


def _table(history: Sequence[Mapping[str, Any]]) -> str:
  columns = [(k, t) for k, t in TABLE_COLUMNS if any(r.get(k) is not None for r in history)]
  head = "".join(f"<th>{html.escape(t)}</th>" for t in ["round"] + [t for _, t in columns])
  body = []
  for r in history:
    cells = "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in columns)
    body.append(f"<tr><td>{r.get('round', '')}</td>{cells}</tr>")
  return (f'<div class="scroll"><table id="rounds"><thead><tr>{head}</tr></thead><tbody>'
          + "".join(body) + "</tbody></table></div>")


def _sample_files(workdir: Path) -> list[tuple[int, Path]]:
  files = []
  for f in sorted((workdir / "samples").glob("round_*.jsonl")):
    try:
      files.append((int(f.stem.split("_")[1]), f))
    except ValueError:
      continue
  if len(files) <= 2 * SAMPLE_ROUNDS:
    return files
  return files[:SAMPLE_ROUNDS] + files[-SAMPLE_ROUNDS:]


def _samples(workdir: Path) -> str:
  parts = []
  for number, path in _sample_files(workdir):
    rows = metrics_lib.read_jsonl(path)[:SAMPLES_PER_ROUND]
    body = "".join(
        f'<tr><td class="text">{html.escape(str(s.get("prompt", "")))}</td>'
        f'<td class="text">{html.escape(str(s.get("completion", "")))}</td>'
        f"<td>{html.escape(_fmt(s.get('reward')))}</td></tr>" for s in rows)
    parts.append(f'<h3>round {number}</h3><table class="samples" data-round="{number}"><thead><tr>'
                 f"<th>prompt</th><th>completion</th><th>reward</th></tr></thead><tbody>{body}"
                 "</tbody></table>")
  return "".join(parts) or "<p>No sample dumps (warm-up only, or no sampling rounds yet).</p>"


def write_report(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
  """Writes the HTML report of the run in `workdir` (default `<workdir>/report.html`)."""
  workdir = Path(workdir)
  metrics_path = workdir / "metrics.jsonl"
  config = run_config.read_run_config(workdir)
  history = metrics_lib.read_jsonl(metrics_path)
  if not history:
    raise FileNotFoundError(f"{metrics_path}: no rounds logged yet")
  algorithm = config.get("algorithm", {}).get("name", "?")
  task = Path(str(config.get("data", {}).get("task", "?"))).name
  title = f"{algorithm} on {task}"
  png, _ = metrics_lib.render_plot(history, title)
  image = base64.b64encode(png).decode("ascii")
  summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                    for k, v in _summary(history))
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>selfplay_jax report: {html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>selfplay_jax run report: {html.escape(title)}</h1>
<p>Workdir <code>{html.escape(str(workdir.resolve()))}</code></p>
<h2>Summary</h2><table id="summary">{summary}</table>
<h2>Per-round metrics</h2><img id="plot" alt="per-round metrics" src="data:image/png;base64,{image}">
<h2>Every round</h2>{_table(history)}
<h2>Samples: early and late rounds</h2>{_samples(workdir)}
<h2>Config</h2><pre id="config">{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>
</body></html>
"""
  out = Path(out) if out is not None else workdir / "report.html"
  with metrics_lib.writing(out):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
  return out
