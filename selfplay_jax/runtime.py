"""The process runtime around a training run: `jax.distributed` start-up and stop signals.

  initialize_distributed("auto")            # before any device is used (multi-host launches)
  with StopOnSignal() as stop:              # SIGTERM / SIGINT: finish the round, save, stop
    ... if stop.requested(round_number): save and raise Preempted(...)
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import jax
from absl import logging

from selfplay_jax.errors import ConfigError

__all__ = ["Preempted", "StopOnSignal", "initialize_distributed"]


class Preempted(Exception):
  """The run stopped on SIGTERM / SIGINT after saving its last completed round."""

  def __init__(self, signum: int, round_number: int, workdir: Path):
    self.signum, self.round = signum, round_number
    super().__init__(f"received {signal.Signals(signum).name}: finished and saved round "
                     f"{round_number} in {workdir}/checkpoints; run the same command to resume")


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
    raise ConfigError(f"--distributed: must be auto, on or off, got {mode!r}")
  if mode == "off":
    if any(v is not None for v in given.values()):
      raise ConfigError("--distributed=off: do not also give --coordinator_address / "
                                   "--num_processes / --process_id")
    return False
  if mode == "auto" and coordinator_address is None and not _cluster_detected():
    return False
  if coordinator_address is not None and None in (num_processes, process_id):
    missing = "--num_processes" if num_processes is None else "--process_id"
    raise ConfigError(f"{missing}: required with --coordinator_address")
  if num_processes is not None and not (num_processes >= 1 and 0 <= (process_id or 0) < num_processes):
    raise ConfigError(f"--process_id: need 0 <= process_id < num_processes, got "
                                 f"{process_id} and {num_processes}")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


class StopOnSignal:
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
