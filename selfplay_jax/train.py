"""The training loop: Python decides when (rounds, eval, checkpoints, logs); XLA runs each round.

  train_and_evaluate(cfg, workdir) -> dict of final metrics

Warm-up SFT rounds first (`warmup.rounds`), then `rounds` self-improvement rounds with the
configured algorithm. Every round is checkpointed (Orbax, async) with the data-iterator state, so
a restart with the same workdir resumes exactly where the last complete checkpoint left off.

The loop dispatches round t before it reads round t-1's metrics, so the host's logging overlaps
the device's work; a round that is saved, evaluated or stops the run is read before its save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from selfplay_jax import checkpoint, config_lib, evaluate, run_config, setup, sharding
from selfplay_jax import metrics as metrics_lib
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.spec import option
from selfplay_jax.data import pipeline
from selfplay_jax.errors import CheckpointMismatchError, WorkdirError
from selfplay_jax.models import lora
from selfplay_jax.runtime import Preempted, StopOnSignal
from selfplay_jax.scoring import python_rewards

NUM_SAMPLES = 8  # rollout rows dumped per round to samples/round_XXXX.jsonl
_writing = metrics_lib.writing

_SUMMARY_KEYS = (("train/loss", "loss"), ("train/judge_loss", "judge_loss"),
                 ("train/reward_mean", "reward"), ("train/kl_ref", "kl"),
                 ("train/margins", "margin"), ("train/judge_agreement", "judge_agree"),
                 ("train/majority_ratio", "maj_ratio"), ("train/label_accuracy", "label_acc"),
                 ("train/completion_len", "len"), ("eval/accuracy", "heldout_acc"),
                 ("eval/accuracy_vote", "heldout_vote"),
                 ("eval/judge_pick_accuracy", "heldout_judge_pick"), ("eval/gv_gap", "heldout_gap"))


class Diverged(Exception):
  """Too many consecutive updates had a non-finite loss or gradient (`optimizer.max_bad_updates`)."""


# ---- small pieces -----------------------------------------------------------------------------------


def _writable_workdir(workdir: Path) -> None:
  """Creates `workdir` and checks that files can be written there, naming it in the error."""
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"workdir {workdir} is a file, not a directory; give a new or existing "
                       "directory as --workdir")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not usable: {e.strerror or e}") from None


def _write_samples(path: Path, tok, samples: dict, limit: int = NUM_SAMPLES,
                   chat: bool = False) -> None:
  """Decoded prompts, completions and rewards of the round's first rollout rows. A chat prompt
  (`data.prompt_format=chat`) keeps its special tokens: it reads as the rendered template."""
  rows = []
  for i in range(min(limit, len(samples["samples/tokens"]))):
    prompt = samples["samples/prompt_tokens"][i][samples["samples/prompt_mask"][i]]
    completion = samples["samples/tokens"][i][:samples["samples/lengths"][i]]
    reward = samples.get("samples/rewards")
    rows.append({"prompt": tok.decode(prompt, skip_special=not chat, strict=False),
                 "completion": tok.decode(completion, strict=False),
                 # NaN (an unscorable sample) -> null: the file stays strict JSON
                 "reward": None if reward is None or not np.isfinite(reward[i]) else float(reward[i])})
  with _writing(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _summary_line(metrics: dict) -> str:
  """One line of key metrics per round, e.g. `round 12 [grpo] loss=0.0123 reward=0.41 ...`."""
  parts = [f"{name}={metrics[key]:.4g}" for key, name in _SUMMARY_KEYS if metrics.get(key) is not None]
  return (f"round {metrics['round']} [{metrics['phase']}] " + " ".join(parts) +
          f" ({metrics['time/round_s']:.2f}s)")


def _maybe_kill(cfg, round_number: int, point: str) -> None:
  """Fault injection (`debug.kill_at_round`): sends `debug.kill_signal` to this process; SIGKILL
  dies like a lost host, with no clean-up; SIGTERM / SIGINT take the graceful preemption path."""
  if cfg.debug.kill_at_round == round_number and cfg.debug.kill_point == point:
    os.kill(os.getpid(), getattr(signal, cfg.debug.kill_signal))


def _check_updates(cfg, metrics: dict, metrics_path: Path, writer, ckpt) -> None:
  """Warns about skipped (non-finite) updates; after `optimizer.max_bad_updates` consecutive ones,
  logs the round's metrics and raises `Diverged` without saving the round (the last complete
  checkpoint stays the newest, so a restart with a fixed config resumes from it)."""
  skipped, bad = metrics.get("train/skipped_fraction"), metrics.get("train/consecutive_skipped")
  if not skipped:
    return
  limit = cfg.optimizer.max_bad_updates
  logging.warning("round %d: %.0f%% of the updates had a non-finite loss or gradient and were "
                  "skipped (%d consecutive; the run stops at optimizer.max_bad_updates=%d)",
                  metrics["round"], 100 * skipped, bad, limit)
  if limit and bad >= limit:
    writer.write(metrics)
    ckpt.wait()
    last = ckpt.latest_step()
    kept = (f"the last complete checkpoint is round {last} in {ckpt.directory}" if last is not None
            else "no checkpoint was written")
    raise Diverged(
        f"round {metrics['round']}: {int(bad)} consecutive updates had a non-finite loss or "
        f"gradient (optimizer.max_bad_updates={limit}); stopped without saving this round, {kept}."
        f" Lower optimizer.learning_rate (or warmup.learning_rate), set optimizer.grad_clip, or "
        f"check the data; metrics up to this round are in {metrics_path}")


def _saved_config(workdir: Path, ckpt: checkpoint.Checkpointer | None, step: int | None
                  ) -> dict | None:
  """The config of the run in `workdir`: the one saved with checkpoint `step`, else its
  `config.json` (written as a run starts, so also there when it died before its first save)."""
  text = ckpt.read_config(step) if ckpt is not None and step is not None else None
  path = workdir / "config.json"
  if not text and path.is_file():
    text = path.read_text(errors="replace")
  try:
    saved = json.loads(text) if text else None
  except ValueError:
    return None
  return saved if isinstance(saved, dict) else None


def _check_resume_config(ckpt: checkpoint.Checkpointer | None, cfg, workdir: Path) -> None:
  """Resuming a run (or reusing the workdir of a run that died before its first checkpoint) under
  a config that makes it another experiment (model, algorithm, task) is an error naming the keys;
  other changes (more rounds, a lower learning rate) are logged."""
  step = ckpt.latest_step() if ckpt is not None else None
  saved = _saved_config(workdir, ckpt, step)
  if not saved:
    return
  identity, other = run_config.resume_differences(saved, cfg)
  held = f"checkpoint round {step}" if step is not None else "stopped before its first checkpoint"
  if identity:
    raise CheckpointMismatchError(
        f"{identity[0].split(':')[0]}: {workdir} holds a run ({held}) made with a "
        f"different {', '.join(identity)}; resume it with its own config ({workdir / 'config.json'})"
        " or use a new --workdir" + ("" if step is not None else f" (or delete {workdir})"))
  if other and step is not None:
    logging.warning("resuming %s with changed settings: %s", workdir, "; ".join(other))


# What a run writes into its workdir besides checkpoints/ and the task's tokenizer/ (a cache).
_RUN_RECORDS = ("metrics.jsonl", "config.json", "samples", "plots", "tensorboard",
                "wandb_run_id.txt", "report.html")


def _claim_workdir(cfg, workdir: Path, main_process: bool) -> None:
  """A run never appends to another run's records. With no complete checkpoint, what a run that
  died before its first save left (metrics, config.json, samples, ...) is moved to
  `<workdir>/abandoned-<time>/`, which is printed; a workdir whose config.json is another
  experiment is refused first (one error, nothing moved). With a checkpoint, `_prepare` resumes."""
  if checkpoint.complete_steps(workdir):
    return
  _check_resume_config(None, cfg, workdir)
  left = [workdir / name for name in _RUN_RECORDS if (workdir / name).exists()]
  left += sorted(workdir.glob("eval_round_*.json"))
  if not left or not main_process:
    return
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dest, n = workdir / f"abandoned-{stamp}", 1
  while dest.exists():
    n += 1
    dest = workdir / f"abandoned-{stamp}-{n}"
  with _writing(dest):
    dest.mkdir()
    for path in left:
      os.replace(path, dest / path.name)
  print(f"{workdir} holds records of a run that stopped before its first checkpoint "
        f"({', '.join(p.name for p in left)}); moved them to {dest} and starting a new run")


COLLAPSE_RATIO = 0.95  # train/majority_ratio at which a consensus this close to 1 is suspect
COLLAPSE_DROP = 0.2  # ... when label accuracy or entropy fell by more than this (relative)


def consensus_collapse(metrics: dict, first: dict, ratio: float = COLLAPSE_RATIO,
                       drop: float = COLLAPSE_DROP) -> str | None:
  """The consensus collapse SRT (Shafayat et al. 2025) reports for majority-vote rewards: the
  samples agree ever more (`train/majority_ratio` >= `ratio`) while the agreed answers get worse
  (`train/label_accuracy`) or the policy stops exploring (`train/entropy`), either below
  `(1 − drop)` times its value in `first` (the first main-phase round's metrics). Returns the
  warning to log, or None. Missing or None values are not compared."""
  share = metrics.get("train/majority_ratio")
  if share is None or share < ratio:
    return None
  for key in ("train/label_accuracy", "train/entropy"):
    now, then = metrics.get(key), first.get(key)
    if now is not None and then is not None and then > 0 and now < (1.0 - drop) * then:
      return (f"round {metrics.get('round')}: possible consensus collapse: train/majority_ratio="
              f"{share:.3f} while {key} fell from {then:.4g} (first {metrics.get('phase')} round) "
              f"to {now:.4g}; the majority reward now reinforces agreement, not correctness "
              "(docs/algorithms.md, label-free rewards)")
  return None


def _watch_consensus(loop: "_Loop", metrics: dict) -> None:
  """Logs `consensus_collapse`'s warning once per run (main-phase rounds with a majority vote;
  the first such round this process reads is the baseline)."""
  if metrics.get("phase") == "warmup" or metrics.get("train/majority_ratio") is None:
    return
  if loop.consensus_first is None:
    loop.consensus_first = dict(metrics)
    return
  if not loop.consensus_warned:
    message = consensus_collapse(metrics, loop.consensus_first)
    if message:
      logging.warning("%s", message)
      loop.consensus_warned = True


def _anchor_references(state: rnd.TrainState, spec=None) -> rnd.TrainState:
  """At the end of warm-up, the reference (and ReST-EM's restart point) become the warmed-up
  policy: self-improvement is measured against the model it starts from. A spec's
  `after_warmup` (PPO's separate critic copies the warmed-up trunk) runs first."""
  after_warmup = option(spec, "after_warmup") if spec is not None else None
  if after_warmup is not None:
    state = state.replace(params=after_warmup(state.params))
  policy = lora.trainable(state.params)  # with LoRA the slots hold adapters only
  policy_if_kept = lambda slot: None if slot is None else jax.tree.map(jnp.copy, policy)
  return state.replace(ref_params=policy_if_kept(state.ref_params),
                       base_params=policy_if_kept(state.base_params))


# ---- the loop's parts -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Loop:
  """What the loop needs besides the state: the run, the mesh, data, checkpoints and writers."""

  run: setup.Run
  workdir: Path
  mesh: Any
  rules: Any
  warm_fn: Any
  main_fn: Any
  sft_fn: Any  # the warm-up's plain-SFT rounds before the judge trains, or None
  data_iter: Any
  eval_data: Any
  ckpt: checkpoint.Checkpointer
  config_json: str
  main_process: bool

  judge: Any = None  # the judge meter's (judge, SamplingConfig), or None when it is off
  consensus_first: dict | None = None  # the first main-phase round's metrics (_watch_consensus)
  consensus_warned: bool = False

  def heldout(self, params) -> dict[str, float]:
    """Greedy held-out accuracy (a population's: per member, mean and vote); {} without a
    verifier."""
    return evaluate.heldout_accuracy(self.run, params, self.eval_data, mesh=self.mesh,
                                     rules=self.rules)

  def eval_accuracy(self, params) -> float | None:
    return self.heldout(params).get("eval/accuracy")

  def evaluation(self, state: rnd.TrainState, round_number: int) -> dict[str, float]:
    """The held-out metrics of an evaluation round: greedy accuracy and the judge meter (a
    population's: member 0's)."""
    out = {"eval/accuracy": None, **self.heldout(state.params)}
    if self.judge is not None and self.run.verifier is not None:
      r = self.run
      if setup.population_size(r.cfg) > 1:
        state = evaluate.member(state, 0)
      out.update(evaluate.judge_meter(
          r.model_config, state.params, self.eval_data, r.verifier, *self.judge, seed=r.cfg.seed,
          mesh=self.mesh, rules=self.rules,
          judge_params=evaluate.judge_params_of(r.cfg, state, round_number)))
    return out


def _prepare(cfg, workdir: Path) -> tuple[_Loop, rnd.TrainState]:
  """Builds the run on its mesh, checked before anything is allocated or compiled, and the state
  to start from: a new one, or the newest checkpoint's (with the data iterator's position)."""
  run = setup.build(cfg, workdir)
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)
  sharding.check_processes(mesh)
  sharding.check_model(mesh, run.model_config, cfg.data.batch_size)
  sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")
  abstract = run.abstract_state()
  state_sh = sharding.state_shardings(abstract, mesh, rules, run.model_config,
                                      population=setup.population_size(cfg))
  on_mesh = dict(mesh=mesh, rules=rules, state_shardings=state_sh)
  lens = setup.data_lengths(cfg)
  if run.verifier is None:
    logging.warning("%s has no answers: held-out accuracy is not measured", cfg.data.task)
  loop = _Loop(
      run=run, workdir=workdir, mesh=mesh, rules=rules,
      warm_fn=run.round_fn(warmup=True, **on_mesh),
      main_fn=run.round_fn(num_samples=NUM_SAMPLES, **on_mesh),
      sft_fn=run.round_fn(warmup=True, sft=True, **on_mesh) if run.sft_warmup_rounds else None,
      data_iter=pipeline.make_iterator(run.train_source(), tokenizer=run.tokenizer,
                                       batch_size=cfg.data.batch_size, seed=setup.data_seed(cfg),
                                       **lens),
      eval_data=pipeline.eval_batches(run.task, "heldout", cfg.eval.num_examples,
                                      tokenizer=run.tokenizer, batch_size=cfg.eval.batch_size,
                                      **lens),
      ckpt=checkpoint.Checkpointer(str(workdir), keep=cfg.checkpoint.keep),
      config_json=config_lib.to_json(cfg), main_process=jax.process_index() == 0)
  meter = evaluate.judge_meter_config(cfg, run.tokenizer)
  if meter is not None:
    loop.judge = (setup.build_judge(cfg, run.tokenizer, run.task), meter)
  ckpt = loop.ckpt
  if ckpt.latest_step() is None:  # a new run: the HF checkpoint's weights or a fresh init
    return loop, run.initial_state(state_sh)
  _check_resume_config(ckpt, cfg, workdir)
  try:
    state, data_state, _, _ = run.restore(ckpt, shardings=state_sh)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(
        f"{e}; {workdir} holds a run whose saved state does not fit this config: resume it with "
        f"its own config ({workdir / 'config.json'}) or use a new --workdir") from None
  loop.data_iter.set_state(data_state)
  metrics_lib.truncate_jsonl(workdir / "metrics.jsonl", ckpt.restored_step)
  logging.info("resumed from round %d", ckpt.restored_step)
  print(f"resumed from {workdir}/checkpoints at round {ckpt.restored_step}")
  return loop, state


@dataclasses.dataclass
class _Pending:
  """A dispatched round whose metrics the host has not read yet."""

  number: int  # 1-based round number
  warm: bool
  metrics: Any  # device arrays
  extra: dict
  dispatched: float  # perf_counter() when it was dispatched


def _read_round(loop: _Loop, p: _Pending, ready_since: float) -> dict:
  """Round `p`'s metrics on the host (waits for the device), its sample dump written. The round
  time runs from when the device could start it (its dispatch, or the previous round's end)."""
  cfg = loop.run.cfg
  metrics = jax.device_get(p.metrics)
  # A Python reward function that failed in this round stops the run here, before the round is
  # saved or logged (the rounds saved before it stay the newest checkpoint).
  python_rewards.raise_if_failed(loop.run.scorer, metrics)
  samples = {k: metrics.pop(k) for k in list(metrics) if k.startswith("samples/")}
  if samples and loop.main_process:
    _write_samples(loop.workdir / "samples" / f"round_{p.number:04d}.jsonl", loop.run.tokenizer,
                   samples, chat=cfg.data.prompt_format == "chat")
  # NaN (e.g. judge agreement in a round without a correct and a wrong sample) -> None.
  metrics = {k: float(v) if np.isfinite(v) else None for k, v in metrics.items()}
  metrics["time/round_s"] = time.perf_counter() - max(p.dispatched, ready_since)
  metrics.update(p.extra, round=p.number, phase="warmup" if p.warm else cfg.algorithm.name)
  metrics.setdefault("train/reward_mean", None)  # keys every line carries; None if not measured
  metrics["eval/accuracy"] = None
  return metrics


def _needs_sync(cfg, r: int, total: int, stopping: bool) -> bool:
  """Must the host read round `r` before going on: it is evaluated, saved, the last or the end of
  the warm-up, or the run stops after it."""
  every = cfg.checkpoint.every_rounds
  return (r % cfg.eval.every_rounds == 0 or r == total or r == cfg.warmup.rounds
          or bool(every and r % every == 0) or stopping)


def _finish(loop: _Loop, state, metrics: dict, writer, stop: StopOnSignal, *, synced: bool,
            stopping: bool) -> None:
  """Evaluates, checks, saves and logs one read round; `synced`: `state` is that round's state
  (evaluation and saving happen only then); `stopping`: a stop was asked for at this round (the
  round is saved, then `Preempted` raised)."""
  cfg, r = loop.run.cfg, metrics["round"]
  total = loop.run.total_rounds
  if synced and (r % cfg.eval.every_rounds == 0 or r == total):
    metrics.update(loop.evaluation(state, r))
  _check_updates(cfg, metrics, loop.workdir / "metrics.jsonl", writer, loop.ckpt)
  _watch_consensus(loop, metrics)
  every = cfg.checkpoint.every_rounds
  saved = False
  if synced and ((every and (r % every == 0 or r == total)) or stopping):
    saved = _save(loop, state, r, metrics)
    _maybe_kill(cfg, r, "save")
  writer.write(metrics)
  if cfg.log_every_round and loop.main_process:
    tqdm.tqdm.write(_summary_line(metrics))
  if synced and (stopping or stop.signal):  # a signal that came during the save stops here too
    if not saved:
      _save(loop, state, r, metrics)
    loop.ckpt.wait()
    raise Preempted(stop.signal, r, loop.workdir)


def _save(loop: _Loop, state, r: int, metrics: dict) -> bool:
  # With LoRA the checkpoint holds the adapters, not the base weights (`Run.restore`).
  return loop.ckpt.save(r, lora.saved_state(state), data_state=loop.data_iter.get_state(),
                        config_json=loop.config_json,
                        metrics={k: v for k, v in metrics.items() if isinstance(v, float)})


# ---- the loop -----------------------------------------------------------------------------------------


def train_and_evaluate(cfg, workdir: str | Path) -> dict[str, float]:
  workdir = Path(workdir)
  _writable_workdir(workdir)
  _claim_workdir(cfg, workdir, jax.process_index() == 0)
  if cfg.curriculum.max_digits:  # easy-to-hard self-labelling: its own loop (curriculum.py)
    from selfplay_jax import curriculum  # pylint: disable=import-outside-toplevel
    return curriculum.train(cfg, workdir)
  loop, state = _prepare(cfg, workdir)
  if loop.main_process:
    with _writing(workdir / "config.json"):
      (workdir / "config.json").write_text(loop.config_json)
  # A population's members all have completed the same rounds: member 0's count.
  first = int(jax.device_get(state.round).reshape(-1)[0])
  total, warmup = loop.run.total_rounds, cfg.warmup.rounds
  history: dict = {}
  pending, ready_since = None, time.perf_counter()
  bar = tqdm.tqdm(range(first, total), initial=first, total=total, desc="rounds",
                  disable=not cfg.progress_bar)
  writer = metrics_lib.writers_from_config(cfg, workdir, process_index=jax.process_index())

  def read(p: _Pending, synced: bool, stopping: bool = False):
    nonlocal ready_since
    metrics = _read_round(loop, p, ready_since)
    ready_since = time.perf_counter()
    _finish(loop, state, metrics, writer, stop, synced=synced, stopping=stopping)
    history.update({k: v for k, v in metrics.items() if v is not None})

  with loop.ckpt, writer, StopOnSignal() as stop:
    for r in bar:
      _maybe_kill(cfg, r + 1, "round")
      extra = {}
      if r == warmup and warmup:  # the warm-up's last round was read (a sync point)
        extra["eval/accuracy_after_warmup"] = loop.eval_accuracy(state.params)
        state = _anchor_references(state, loop.run.spec)
      batch = sharding.global_batch(next(loop.data_iter), loop.mesh)  # this process's rows
      dispatched = time.perf_counter()
      fn = (loop.sft_fn if r < loop.run.sft_warmup_rounds else loop.warm_fn if r < warmup
            else loop.main_fn)
      state, metrics = fn(state, batch)
      if pending is not None:  # round r's work is queued: now log round r - 1
        read(pending, synced=False)
      pending = _Pending(r + 1, r < warmup, metrics, extra, dispatched)
      stopping = stop.requested(r + 1)  # every round, on every host (multi-host agreement)
      if _needs_sync(cfg, r + 1, total, stopping):
        read(pending, synced=True, stopping=stopping)
        pending = None
    if pending is not None:
      read(pending, synced=True)
    loop.ckpt.wait()
  return history
