"""What a person reads about a run: the per-round plot, TensorBoard event files, W&B logging and the
HTML report, each checked against the run's own metrics.jsonl."""

import base64
import html.parser
import json
import math
import os
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from selfplay_jax import config_lib, metrics, train

OVERRIDES = ["warmup.rounds=2", "rounds=4", "eval.every_rounds=2", "eval.num_examples=8",
             "eval.batch_size=8", "data.batch_size=4", "sampling.n=2", "sampling.max_new_tokens=6",
             "data.difficulty=1", "model.hidden_size=32", "model.intermediate_size=64",
             "model.num_layers=1", "progress_bar=false", "metrics.tensorboard=true",
             "mesh.data=2", "mesh.tensor=2"]  # trains on 4 of the 8 test devices


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  cfg = config_lib.load_config(str(config_lib.default_config_path()), OVERRIDES)
  train.train_and_evaluate(cfg, workdir)
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return workdir, lines


def _finite_points(lines, key):
  return sum(1 for m in lines if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]))


@pytest.mark.slow
def test_plot_is_a_png_with_the_expected_series(run):
  workdir, lines = run
  image = Image.open(workdir / "plots" / "metrics.png")
  assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300
  series = json.loads(image.info["selfplay_jax:series"])
  shown = {s["key"]: s["points"] for s in series}
  expected = ["eval/accuracy", "train/reward_mean", "train/loss", "train/kl_ref",
              "train/completion_len", "time/round_s", "bstar/balance", "bstar/pass_at_n",
              "bstar/selected_fraction", "bstar/distinct_correct"]
  # Selection precision is NaN in a round that selected nothing: drawn when some round did.
  expected += ["bstar/precision"] if _finite_points(lines, "bstar/precision") else []
  assert sorted(shown) == sorted(expected)  # no judge panel: this run has no judge
  for key in expected:  # every logged value is drawn
    assert shown[key] == _finite_points(lines, key) > 0, key
  pixels = np.asarray(image.convert("RGB"))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # really drawn, not blank


def test_judge_agreement_panel_appears_when_logged():
  history = [{"round": r, "phase": "self_rewarding", "train/judge_agreement": 0.5 + 0.01 * r,
              "train/loss": 1.0} for r in range(1, 6)]
  history[2]["train/judge_agreement"] = None  # a round without a (correct, wrong) pair
  png, series = metrics.render_plot(history)
  assert {"panel": "judge agreement", "key": "train/judge_agreement", "points": 4} in series
  assert Image.open(__import__("io").BytesIO(png)).format == "PNG"


def _tfrecords(path):
  """(step, tag, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  data, out, pos = path.read_bytes(), [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
    for value in event.summary.value:
      out.append((event.step, value.tag, value.simple_value))
  return out


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_logged_number(run):
  workdir, lines = run
  files = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert files
  scalars = {(step, tag): value for f in files for step, tag, value in _tfrecords(f)}
  expected = {(m["round"], k): v for m in lines for k, v in m.items()
              if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)}
  assert set(scalars) == set(expected)
  for key, value in expected.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_wandb_writer_logs_each_round_and_resumes_the_same_run(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, values, step):
      calls.append(("log", step, values))

    def finish(self):
      calls.append(("finish",))

  fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for _ in range(2):  # a run and its resumption
    writer = metrics.WandbWriter(tmp_path, project="p", name="", config={"seed": 0})
    writer.write({"round": 3, "phase": "grpo", "train/loss": 0.5, "eval/accuracy": None,
                  "train/kl_ref": float("nan")})
    writer.close()
  inits = [c[1] for c in calls if c[0] == "init"]
  assert inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
  assert inits[0]["project"] == "p" and inits[0]["name"] == tmp_path.name
  assert ("log", 3, {"train/loss": 0.5}) in calls  # None, NaN and strings are not logged


def test_wandb_missing_is_a_config_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
  with pytest.raises(config_lib.ConfigError, match="metrics.wandb: the wandb package"):
    metrics.WandbWriter(tmp_path, project="p", name="", config={})


def test_only_process_zero_writes(tmp_path):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), OVERRIDES)
  assert metrics.writers_from_config(cfg, tmp_path, process_index=1).writers == []
  assert not (tmp_path / "metrics.jsonl").exists()


class _Page(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.images, self.tables, self._table, self._cell, self.pre = [], [], None, None, ""
    self._in_pre = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.images.append(attrs["src"])
    elif tag == "table":
      self._table = {"id": attrs.get("id"), "round": attrs.get("data-round"), "rows": []}
      self.tables.append(self._table)
    elif tag == "tr" and self._table is not None:
      self._table["rows"].append([])
    elif tag in ("td", "th") and self._table is not None:
      self._cell = ""
    elif tag == "pre":
      self._in_pre = True

  def handle_endtag(self, tag):
    if tag in ("td", "th") and self._cell is not None:
      self._table["rows"][-1].append(self._cell)
      self._cell = None
    elif tag == "table":
      self._table = None
    elif tag == "pre":
      self._in_pre = False

  def handle_data(self, data):
    if self._cell is not None:
      self._cell += data
    if self._in_pre:
      self.pre += data


@pytest.mark.slow
def test_report_command_writes_one_self_contained_page(run, tmp_path):
  workdir, lines = run
  out = tmp_path / "report.html"
  res = subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "report", f"--workdir={workdir}",
                        f"--out={out}"], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  page = _Page()
  page.feed(out.read_text())
  assert "http" not in out.read_text().replace("http://www.w3.org", "")  # nothing fetched
  (src,) = page.images
  assert src.startswith("data:image/png;base64,")
  image = Image.open(__import__("io").BytesIO(base64.b64decode(src.split(",", 1)[1])))
  assert image.format == "PNG"
  rounds = next(t for t in page.tables if t["id"] == "rounds")
  assert [int(r[0]) for r in rounds["rows"][1:]] == [m["round"] for m in lines]
  header = rounds["rows"][0]
  col = header.index("held-out acc.")
  for row, m in zip(rounds["rows"][1:], lines):
    assert row[col] == ("" if m["eval/accuracy"] is None else f"{m['eval/accuracy']:.4g}")
  # Samples from the earliest and the latest sampling rounds, as dumped.
  sample_tables = [t for t in page.tables if t["round"] is not None]
  dumped = sorted(int(p.stem.split("_")[1]) for p in (workdir / "samples").iterdir())
  assert [int(t["round"]) for t in sample_tables] == dumped[:2] + dumped[-2:]
  first = [json.loads(l) for l in (workdir / "samples" / f"round_{dumped[0]:04d}.jsonl")
           .read_text().splitlines()]
  assert [r[:2] for r in sample_tables[0]["rows"][1:]] == [[s["prompt"], s["completion"]]
                                                          for s in first[:4]]
  assert json.loads(page.pre) == json.loads((workdir / "config.json").read_text())
  missing = subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "report",
                            f"--workdir={tmp_path / 'nothing'}"], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  assert "config.json not found" in missing.stderr


@pytest.mark.parametrize("every, interval, drawn", [(2, 0.0, [2, 4, 5]), (1, 3600.0, [1, 5]),
                                                    (0, 0.0, [])])
def test_plot_is_redrawn_every_n_rounds_but_not_more_often_than_the_interval(
    tmp_path, every, interval, drawn):
  plotter = metrics.Plotter(tmp_path / "p.png", every=every, min_interval_s=interval)
  seen = []
  plotter._render = lambda snapshot: seen.append(len(snapshot))  # pylint: disable=protected-access
  for r in range(1, 6):
    plotter.write({"round": r, "train/loss": 1.0 / r})
    if plotter._future is not None:  # pylint: disable=protected-access
      plotter._future.result()  # let each background render finish before the next round
  plotter.close()
  assert seen == drawn  # the last render (on close) always holds every round
