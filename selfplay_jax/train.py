"""The training loop: Python decides when (rounds, eval, checkpoints, logs); XLA runs each round.

  train_and_evaluate(cfg, workdir) -> dict of final metrics

Warm-up SFT rounds first (`warmup.rounds`), then `rounds` self-improvement rounds with the
configured algorithm. Every round is checkpointed (Orbax, async) with the data-iterator state, so
a restart with the same workdir resumes exactly where the last complete checkpoint left off.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from selfplay_jax import checkpoint, config_lib, sharding
from selfplay_jax import metrics as metrics_lib
from selfplay_jax import evaluate as ev
from selfplay_jax import round as rnd
from selfplay_jax.data import pipeline

NUM_SAMPLES = 8  # rollout rows dumped per round to samples/round_XXXX.jsonl


WorkdirError = metrics_lib.WorkdirError
_writing = metrics_lib.writing


def _writable_workdir(workdir: Path) -> None:
  """Creates `workdir` and checks that files can be written there, naming it in the error."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not usable: {e.strerror or e}") from None


def _write_samples(path: Path, tok, samples: dict, limit: int = NUM_SAMPLES) -> None:
  """Decoded prompts, completions and rewards of the round's first rollout rows."""
  rows = []
  for i in range(min(limit, len(samples["samples/tokens"]))):
    prompt = samples["samples/prompt_tokens"][i][samples["samples/prompt_mask"][i]]
    completion = samples["samples/tokens"][i][:samples["samples/lengths"][i]]
    reward = samples.get("samples/rewards")
    rows.append({"prompt": tok.decode(prompt), "completion": tok.decode(completion),
                 "reward": None if reward is None else float(reward[i])})
  with _writing(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

_SUMMARY_KEYS = (("train/loss", "loss"), ("train/judge_loss", "judge_loss"),
                 ("train/reward_mean", "reward"), ("train/kl_ref", "kl"), ("train/margins", "margin"), ("train/judge_agreement", "judge_agree"),
                 ("train/completion_len", "len"), ("eval/accuracy", "heldout_acc"))


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


class Preempted(Exception):
  """The run stopped on SIGTERM / SIGINT after saving its last completed round."""

  def __init__(self, signum: int, round_number: int, workdir: Path):
    self.signum, self.round = signum, round_number
    super().__init__(f"received {signal.Signals(signum).name}: finished and saved round "
                     f"{round_number} in {workdir}/checkpoints; run the same command to resume")


class Diverged(Exception):
  """Too many consecutive updates had a non-finite loss or gradient (`optimizer.max_bad_updates`)."""


def _jax_preemption_service() -> bool:
  """Whether JAX's multi-host preemption service runs (it owns SIGTERM; see `_StopOnSignal`)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.preemption_sync_manager is not None


def _cluster_detected() -> bool:
  """A multi-process launch JAX can configure itself: explicit JAX_* coordinator variables,
  a SLURM step with several tasks, or a TPU slice with several workers."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
    return True
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts JAX's multi-controller runtime (`jax.distributed.initialize`) before any device is used.

  mode "on": always (missing coordinator values are auto-detected by JAX: TPU pods, SLURM);
  "off": never; "auto": when a coordinator address is given or `_cluster_detected()`.
  Returns whether it initialized. Raises ConfigError for inconsistent flags.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if mode not in ("auto", "on", "off"):
    raise config_lib.ConfigError(f"--distributed: must be auto, on or off, got {mode!r}")
  if mode == "off":
    if any(v is not None for v in given.values()):
      raise config_lib.ConfigError("--distributed=off: do not also give --coordinator_address / "
                                   "--num_processes / --process_id")
    return False
  if mode == "auto" and coordinator_address is None and not _cluster_detected():
    return False
  if coordinator_address is not None and None in (num_processes, process_id):
    missing = "--num_processes" if num_processes is None else "--process_id"
    raise config_lib.ConfigError(f"{missing}: required with --coordinator_address")
  if num_processes is not None and not (num_processes >= 1 and 0 <= (process_id or 0) < num_processes):
    raise config_lib.ConfigError(f"--process_id: need 0 <= process_id < num_processes, got "
                                 f"{process_id} and {num_processes}")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


class _StopOnSignal:
  """SIGTERM / SIGINT (preemption notice, Ctrl-C) ask the loop to finish the round in flight, save
  it and stop. A second signal gets the default behaviour (immediate exit). Handlers are installed
  only in the main thread and restored on exit.

  Multi-host (`jax.distributed` initialized, with its preemption service): JAX catches SIGTERM on
  whichever host gets the notice and agrees with every host on a round to stop at;
  `requested(round)` asks it each round (`multihost_utils.reached_preemption_sync_point`), so all
  hosts save the same round and exit together. SIGINT is passed on to it as SIGTERM then.
  """

  def __init__(self):
    self.signal = 0
    self._previous = {}
    self._multihost = _jax_preemption_service()
    self._SIGNALS = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)

  def requested(self, round_number: int) -> bool:
    """Whether to save `round_number` and stop (call once per round, on every host)."""
    if self._multihost and not self.signal:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(round_number):
        self.signal = signal.SIGTERM
    return bool(self.signal)

  def _handle(self, signum, frame):
    del frame
    if self._multihost:
      # Ctrl-C on one host must not stop it alone (the others would wait for it forever): hand
      # it to JAX's preemption notifier as SIGTERM, which agrees a stop round with every host.
      logging.warning("received SIGINT: asking every host to stop at the same round")
      signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
      os.kill(os.getpid(), signal.SIGTERM)
      return
    self.signal = signum
    for s, handler in self._previous.items():  # the next signal is not caught again
      signal.signal(s, handler)
    logging.warning("received %s: finishing the current round, then saving and stopping",
                    signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


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


def _check_resume_config(ckpt: checkpoint.Checkpointer, cfg, workdir: Path) -> None:
  """Resuming a run under a config that makes it another experiment (model, algorithm, task) is
  an error naming the keys; other changes (more rounds, a lower learning rate) are logged."""
  step = ckpt.latest_step()
  saved = ckpt.read_config(step)
  if not saved:
    return
  identity, other = config_lib.resume_differences(json.loads(saved), cfg)
  if identity:
    raise checkpoint.CheckpointMismatchError(
        f"{identity[0].split(':')[0]}: {workdir} holds a run (checkpoint round {step}) made with a "
        f"different {', '.join(identity)}; resume it with its own config ({workdir / 'config.json'})"
        " or use a new --workdir")
  if other:
    logging.warning("resuming %s with changed settings: %s", workdir, "; ".join(other))


def _anchor_references(state: rnd.TrainState) -> rnd.TrainState:
  """At the end of warm-up, the reference (and ReST-EM's restart point) become the warmed-up
  policy: self-improvement is measured against the model it starts from."""
  policy_if_kept = lambda slot: None if slot is None else jax.tree.map(jnp.copy, state.params)
  return state.replace(ref_params=policy_if_kept(state.ref_params),
                       base_params=policy_if_kept(state.base_params))


def train_and_evaluate(cfg, workdir: str | Path) -> dict[str, float]:
  workdir = Path(workdir)
  _writable_workdir(workdir)
  task, tok = ev.task_and_tokenizer(cfg, workdir)
  model_cfg = ev.model_config(cfg, tok)
  d, lens = cfg.data, ev.data_lengths(cfg)
  sc = ev.sampling_config(cfg, tok)
  verify = task.make_verifier(tok) if task.has_answers else None
  spec, optimizer = ev.build_spec(cfg), ev.build_optimizer(cfg)
  warm_spec = ev.build_warmup_spec(cfg, tok)
  nan_rounds = None
  if cfg.debug.nan_from_round:  # fault injection: NaN losses in these rounds
    nan_rounds = (cfg.debug.nan_from_round, cfg.debug.nan_to_round)
  # The device mesh (data x fsdp x tensor over every process's devices) and where each array of
  # the state lives; checked before anything is allocated or compiled.
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)
  sharding.check_processes(mesh)
  sharding.check_model(mesh, model_cfg, d.batch_size)
  sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")
  abstract = ev.abstract_state(cfg, model_cfg, spec, optimizer)
  state_sh = sharding.state_shardings(abstract, mesh, rules, model_cfg)
  on_mesh = dict(mesh=mesh, rules=rules, state_shardings=state_sh)
  main_fn = rnd.build_round_fn(model_cfg, spec, optimizer, sc, verify,
                               scorer=ev.build_scorer(cfg, model_cfg, tok, task),
                               num_epochs=cfg.algorithm.num_epochs,
                               num_minibatches=cfg.algorithm.num_minibatches, num_samples=NUM_SAMPLES,
                               nan_rounds=nan_rounds, **on_mesh)
  # Judge training labels `sampling.n` samples per prompt; plain SFT does not sample at all.
  warm_fn = rnd.build_round_fn(model_cfg, warm_spec, optimizer, sc, verify,
                               num_minibatches=cfg.warmup.num_minibatches, nan_rounds=nan_rounds,
                               **on_mesh)
  eval_data = pipeline.eval_batches(task, "heldout", cfg.eval.num_examples, tokenizer=tok,
                                    batch_size=cfg.eval.batch_size, **lens)
  if verify is None:
    logging.warning("%s has no answers: held-out accuracy is not measured", cfg.data.task)
  # Built-in tasks synthesise pairs on demand; JSONL rows carry their own chosen / rejected.
  pairs = ev.uses_pair_data(cfg) and not ev.is_jsonl_data(cfg)
  source = task.source("train", cfg.seed, pairs=True) if pairs else task.source("train", cfg.seed)
  data_iter = pipeline.make_iterator(source, tokenizer=tok, batch_size=d.batch_size, seed=cfg.seed,
                                     **lens)

  ckpt = checkpoint.Checkpointer(str(workdir), keep=cfg.checkpoint.keep)
  total_rounds = cfg.warmup.rounds + cfg.rounds
  if ckpt.latest_step() is None:  # a new run: the HF checkpoint's weights or a fresh init
    state = ev.initial_state(cfg, model_cfg, spec, optimizer, shardings=state_sh)
  else:
    _check_resume_config(ckpt, cfg, workdir)
    try:
      state, data_state, _, _ = ckpt.restore(
          abstract_state=ev.with_shardings(abstract, state_sh))
    except checkpoint.CheckpointMismatchError as e:
      raise checkpoint.CheckpointMismatchError(
          f"{e}; {workdir} holds a run whose saved state does not fit this config: resume it with "
          f"its own config ({workdir / 'config.json'}) or use a new --workdir") from None
    data_iter.set_state(data_state)
    metrics_lib.truncate_jsonl(workdir / "metrics.jsonl", ckpt.restored_step)
    logging.info("resumed from round %d", ckpt.restored_step)
    print(f"resumed from {workdir}/checkpoints at round {ckpt.restored_step}")
  config_json = config_lib.to_json(cfg)
  main_process = jax.process_index() == 0  # only process 0 writes logs, samples and plots
  if main_process:
    with _writing(workdir / "config.json"):
      (workdir / "config.json").write_text(config_json)

  def eval_now(params):
    if verify is None:
      return None
    return ev.greedy_accuracy(model_cfg, params, eval_data, verify, tok.eos_ids,
                              cfg.sampling.max_new_tokens, mesh=mesh, rules=rules)

  first = int(state.round)
  history: dict = {}
  bar = tqdm.tqdm(range(first, total_rounds), initial=first, total=total_rounds, desc="rounds",
                  disable=not cfg.progress_bar)
  writer = metrics_lib.writers_from_config(cfg, workdir, process_index=jax.process_index())
  with ckpt, writer, _StopOnSignal() as stop:
    for r in bar:
      _maybe_kill(cfg, r + 1, "round")
      warm = r < cfg.warmup.rounds
      extra = {}
      if r == cfg.warmup.rounds and cfg.warmup.rounds:
        extra["eval/accuracy_after_warmup"] = eval_now(state.params)
        state = _anchor_references(state)
      batch = sharding.global_batch(next(data_iter), mesh)  # this process's rows -> global
      start = time.perf_counter()
      state, metrics = (warm_fn if warm else main_fn)(state, batch)
      metrics = jax.device_get(metrics)
      samples = {k: metrics.pop(k) for k in list(metrics) if k.startswith("samples/")}
      if samples and main_process:
        _write_samples(workdir / "samples" / f"round_{r + 1:04d}.jsonl", tok, samples)
      # NaN (e.g. judge agreement in a round without a correct and a wrong sample) -> None.
      metrics = {k: float(v) if np.isfinite(v) else None for k, v in metrics.items()}
      metrics["time/round_s"] = time.perf_counter() - start
      metrics.update(extra, round=r + 1, phase="warmup" if warm else cfg.algorithm.name)
      # Keys every line carries; None where a round does not measure it.
      metrics.setdefault("train/reward_mean", None)
      metrics["eval/accuracy"] = None
      if (r + 1) % cfg.eval.every_rounds == 0 or r + 1 == total_rounds:
        metrics["eval/accuracy"] = eval_now(state.params)
      _check_updates(cfg, metrics, workdir / "metrics.jsonl", writer, ckpt)
      every = cfg.checkpoint.every_rounds
      stopping = stop.requested(r + 1)
      save = lambda: ckpt.save(r + 1, state, data_state=data_iter.get_state(),
                               config_json=config_json,
                               metrics={k: v for k, v in metrics.items() if isinstance(v, float)})
      saved = False
      if (every and ((r + 1) % every == 0 or r + 1 == total_rounds)) or stopping:
        saved = save()
        _maybe_kill(cfg, r + 1, "save")
      writer.write(metrics)
      if cfg.log_every_round and main_process:
        tqdm.tqdm.write(_summary_line(metrics))
      history.update({k: v for k, v in metrics.items() if v is not None})
      if stopping or stop.signal:  # a signal that came during the save stops here too
        if not saved:
          save()
        ckpt.wait()
        raise Preempted(stop.signal, r + 1, workdir)
    ckpt.wait()
  return history
