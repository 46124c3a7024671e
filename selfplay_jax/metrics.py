"""Run metrics out of the loop: JSONL (always), TensorBoard and W&B (opt-in), per-round PNG plots.

  writer = metrics.writers_from_config(cfg, workdir)  # process 0 writes; other processes: no-op
  writer.write(round_metrics)   # one flat dict per round: numbers, None (not measured), strings
  writer.close()

Files in the workdir: `metrics.jsonl` (one JSON object per round), `plots/metrics.png` (re-rendered
in a background thread every `metrics.plot_every_rounds` rounds, at most every
`metrics.plot_min_interval_s` seconds, and at the end), `tensorboard/`
(event files, `metrics.tensorboard=true`), W&B (`metrics.wandb=true`, needs `pip install wandb`;
the run id is kept in `wandb_run_id.txt` so a resumed run continues the same W&B run).

`render_plot(history)` draws the same figure into PNG bytes for `report`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import logging
from selfplay_jax.errors import WorkdirError  # noqa: F401 (re-exported)

__all__ = ["WorkdirError", "writing", "read_jsonl", "truncate_jsonl", "JsonlWriter",
           "TensorBoardWriter", "WandbWriter", "Plotter", "MultiWriter", "writers_from_config",
           "render_plot", "PANELS", "PLOT_FILE"]

PLOT_FILE = Path("plots") / "metrics.png"

# (panel title, [(metric key, label)], band key): the per-round plot's panels. The reward panel
# shades mean ± std. Panels whose metrics a run never logs (e.g. judge agreement) are left out, and
# so is a panel when another one shows every metric it would show and more: with the
# generation-verification gap meter logged (a scorer and a verifier), "self-critique" replaces
# "judge agreement"; a run that logged judge agreement alone keeps the "judge agreement" panel.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], str | None], ...] = (
    ("held-out accuracy", (("eval/accuracy", "greedy accuracy"),
                           ("eval/judge_pick_accuracy", "self-judge's pick of n"),
                           ("eval/sample_accuracy", "mean of n samples")), None),
    ("reward", (("train/reward_mean", "mean"),), "train/reward_std"),
    ("loss", (("train/loss", "loss"),), None),
    ("KL to reference", (("train/kl_ref", "KL (k3)"),), None),
    ("judge agreement", (("train/judge_agreement", "agreement"),), None),
    ("self-critique", (("train/judge_agreement", "judge agreement"),
                       ("judge/gv_gap", "gen.-verif. gap"),
                       ("judge/corr_correct", "corr(score, correct)"),
                       ("judge/corr_likelihood", "corr(score, self-lik.)"),
                       ("eval/gv_gap", "held-out gap"),
                       ("eval/judge_agreement", "held-out agreement")), None),
    ("exploration / exploitation", (("bstar/balance", "balance score"),
                                    ("bstar/pass_at_n", "pass@n"),
                                    ("bstar/precision", "selection precision"),
                                    ("bstar/selected_fraction", "selected share")), None),
    ("distinct correct per prompt", (("bstar/distinct_correct", "samples"),), None),
    ("B-STaR choice", (("bstar/temperature", "temperature"),
                       ("bstar/threshold", "reward threshold")), None),
    ("completion length", (("train/completion_len", "tokens"),), None),
    ("round time", (("time/round_s", "seconds"),), None),
)

_ZERO_LINE = ("self-critique",)  # panels with a dashed line at 0 (no gap, no correlation)


@contextlib.contextmanager
def writing(path: Path):
  """Re-raises a failed write (disk full, read-only) as one error naming the file."""
  try:
    yield
  except OSError as e:
    if isinstance(e, WorkdirError):
      raise
    raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from None


def _finite(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


# ---- JSONL --------------------------------------------------------------------------------------


def _parse_line(line: str) -> dict | None:
  """The record of one line; None for a line that is not one (cut short, not an object, or a
  `round` that is not an integer, e.g. `{"round": "seven"}`)."""
  try:
    record = json.loads(line)
  except (ValueError, RecursionError):
    return None
  if not isinstance(record, dict):
    return None
  number = record.get("round", 0)
  if isinstance(number, bool) or not isinstance(number, int):
    return None
  return record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics file (lines cut short by a killed process are skipped)."""
  path = Path(path)
  if not path.is_file():
    return []
  lines = path.read_text(errors="replace").splitlines()
  return [r for l in lines if l.strip() and (r := _parse_line(l)) is not None]


def truncate_jsonl(path: str | os.PathLike, last_round: int) -> int:
  """Drops the lines of rounds after `last_round` (they will be run again) and any line that is
  not a record (a partial line a killed process left behind, a `round` that is not an integer);
  returns how many unreadable lines were dropped (logged as a warning)."""
  path = Path(path)
  if not path.is_file():
    return 0
  lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
  records = [_parse_line(l) for l in lines]
  kept = [l for l, r in zip(lines, records) if r is not None and r.get("round", 0) <= last_round]
  unreadable = sum(r is None for r in records)
  if unreadable:
    logging.warning("%s: dropped %d unreadable line(s) (cut short, not a JSON object, or a "
                    "non-integer round)", path, unreadable)
  if len(kept) != len(lines):
    with writing(path):
      path.write_text("".join(l + "\n" for l in kept))
  return unreadable


class JsonlWriter:
  """Appends one JSON object per round to `path`, flushed each round."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    with writing(self.path):
      self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, metrics: Mapping[str, Any]) -> None:
    with writing(self.path):
      self._file.write(json.dumps(dict(metrics)) + "\n")
      self._file.flush()

  def close(self) -> None:
    self._file.close()


# ---- TensorBoard / W&B --------------------------------------------------------------------------


class TensorBoardWriter:
  """Scalars to TensorBoard event files under `logdir` (tensorboardX: no TensorFlow needed)."""

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.logdir = Path(logdir)
    with writing(self.logdir):
      self._writer = SummaryWriter(logdir=str(self.logdir))

  def write(self, metrics: Mapping[str, Any]) -> None:
    step = int(metrics["round"])
    for key, value in metrics.items():
      if key != "round" and (v := _finite(value)) is not None:
        self._writer.add_scalar(key, v, global_step=step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class WandbWriter:
  """Scalars to Weights & Biases. The run id lives in `<workdir>/wandb_run_id.txt`, so a resumed
  run logs into the same W&B run."""

  def __init__(self, workdir: Path, *, project: str, name: str, config: Mapping[str, Any]):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError:
      from selfplay_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
      raise ConfigError("metrics.wandb: the wandb package is not installed "
                        "(pip install wandb, or set metrics.wandb=false)") from None
    id_file = workdir / "wandb_run_id.txt"
    with writing(id_file):
      if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:16])
      run_id = id_file.read_text().strip()
    self._wandb = wandb
    self._run = wandb.init(project=project, name=name or workdir.name, id=run_id, resume="allow",
                           dir=str(workdir), config=dict(config))

  def write(self, metrics: Mapping[str, Any]) -> None:
    values = {k: _finite(v) for k, v in metrics.items() if k != "round"}
    values = {k: v for k, v in values.items() if v is not None}
    self._run.log(values, step=int(metrics["round"]))

  def close(self) -> None:
    self._run.finish()


# ---- plots --------------------------------------------------------------------------------------


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  xs, ys = [], []
  for record in history:
    if (y := _finite(record.get(key))) is not None and "round" in record:
      xs.append(int(record["round"]))
      ys.append(y)
  return xs, ys


def _warmup_span(history: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
  rounds = [int(r["round"]) for r in history if r.get("phase") == "warmup" and "round" in r]
  return (min(rounds) - 1, max(rounds)) if rounds else None


def render_plot(history: Sequence[Mapping[str, Any]], title: str = "") -> tuple[bytes, list[dict]]:
  """PNG bytes of the per-round figure, and what it shows: `[{panel, key, points}]` (also stored in
  the PNG as the `selfplay_jax:series` text chunk)."""
  # The object-oriented API with the Agg canvas: no pyplot state, safe off the main thread.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  logged = [frozenset(k for k, _ in keys if _series(history, k)[0]) for _, keys, _ in PANELS]
  # Left out: nothing logged, or all of it shown by another panel (of two equal ones, the first).
  panels = [p for i, (p, mine) in enumerate(zip(PANELS, logged))
            if mine and not any(mine < other or (mine == other and j < i)
                                for j, other in enumerate(logged))]
  cols = 3 if len(panels) > 4 else max(len(panels), 1)
  rows = max(1, math.ceil(len(panels) / cols))
  fig = Figure(figsize=(4.2 * cols, 2.8 * rows), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  shown, warm = [], _warmup_span(history)
  for i, (panel, keys, band) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    if warm is not None:
      ax.axvspan(warm[0], warm[1], color="0.9", lw=0, label="warm-up" if i == 0 else None)
    for j, (key, label) in enumerate(keys):
      xs, ys = _series(history, key)
      if not xs:  # a metric of a shared panel that this run never measured
        continue
      marker = "o" if len(xs) < 40 else None
      # A metric keeps its colour whichever of its panel's other metrics a run logs.
      ax.plot(xs, ys, marker=marker, ms=3, lw=1.3, label=label, color=f"C{j}")
      shown.append({"panel": panel, "key": key, "points": len(xs)})
      if band is not None:
        by_round = dict(zip(*_series(history, band)))
        bx = [x for x in xs if x in by_round]
        mean = dict(zip(xs, ys))
        ax.fill_between(bx, [mean[x] - by_round[x] for x in bx],
                        [mean[x] + by_round[x] for x in bx], alpha=0.25, lw=0, label="± std")
    ax.set_title(panel, fontsize=10)
    ax.set_xlabel("round", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if panel in _ZERO_LINE:
      ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    if band is not None or len(keys) > 1 or (warm is not None and i == 0):
      ax.legend(fontsize=7, loc="best")
  if not panels:
    fig.text(0.5, 0.5, "no metrics yet", ha="center", va="center")
  if title:
    fig.suptitle(title, fontsize=11)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", metadata={"selfplay_jax:series": json.dumps(shown)})
  return buf.getvalue(), shown


class Plotter:
  """Keeps the run's history and re-renders `<workdir>/plots/metrics.png` in a background thread
  every `every` rounds, but not more often than every `min_interval_s` seconds (a render costs
  ~0.3 s of CPU: drawing after each 0.1 s round of a tiny model would slow it by a third), and once
  more, synchronously, on `close`. The next round never waits; the file is replaced atomically."""

  def __init__(self, path: str | os.PathLike, history: Iterable[Mapping[str, Any]] = (), *,
               every: int = 1, min_interval_s: float = 10.0, title: str = ""):
    self.path, self.every, self.title = Path(path), every, title
    self.min_interval_s = min_interval_s
    self.history = [dict(r) for r in history]
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="plot")
    self._future: concurrent.futures.Future | None = None
    self._rendered = -1  # len(history) at the last render
    self._last_start = -math.inf

  def _render(self, snapshot: list[dict]) -> None:
    try:
      data, _ = render_plot(snapshot, self.title)
      self.path.parent.mkdir(parents=True, exist_ok=True)
      tmp = self.path.with_suffix(".png.tmp")
      tmp.write_bytes(data)
      os.replace(tmp, self.path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("could not write the plot %s: %s", self.path, e)  # never stops training

  def write(self, metrics: Mapping[str, Any]) -> None:
    self.history.append(dict(metrics))
    due = self.every and int(metrics.get("round", 0)) % self.every == 0
    if due and time.monotonic() - self._last_start >= self.min_interval_s:
      if self._future is None or self._future.done():
        self._rendered, self._last_start = len(self.history), time.monotonic()
        self._future = self._pool.submit(self._render, list(self.history))

  def close(self) -> None:
    if self._future is not None:
      self._future.result()
    if self.every and self._rendered != len(self.history) and self.history:
      self._render(self.history)
    self._pool.shutdown()


# ---- together -----------------------------------------------------------------------------------


class MultiWriter:
  """Writes each round to every writer; `close` closes them all (the first error is re-raised)."""

  def __init__(self, writers: Sequence[Any]):
    self.writers = list(writers)

  def write(self, metrics: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write(metrics)

  def close(self) -> None:
    error = None
    for w in self.writers:
      try:
        w.close()
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    if error is not None:
      raise error

  def __enter__(self) -> MultiWriter:
    return self

  def __exit__(self, exc_type: Any, *exc: Any) -> None:
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      if exc_type is None:
        raise


def writers_from_config(cfg, workdir: str | os.PathLike, *, process_index: int = 0) -> MultiWriter:
  """The writers `cfg.metrics` asks for; JSONL always. Only process 0 writes (others: none)."""
  workdir = Path(workdir)
  if process_index != 0:
    return MultiWriter([])
  m = cfg.metrics
  writers: list[Any] = [JsonlWriter(workdir / "metrics.jsonl")]
  if m.plot_every_rounds:
    writers.append(Plotter(workdir / PLOT_FILE, read_jsonl(workdir / "metrics.jsonl"),
                           every=m.plot_every_rounds, min_interval_s=m.plot_min_interval_s,
                           title=f"{cfg.algorithm.name} on {Path(str(cfg.data.task)).name}"))
  if m.tensorboard:
    writers.append(TensorBoardWriter(workdir / "tensorboard"))
  if m.wandb:
    writers.append(WandbWriter(workdir, project=m.wandb_project, name=m.wandb_name,
                               config=cfg.to_dict()))
  return MultiWriter(writers)
