"""Timing and roofline probes shared by the benchmarks.

  timed(fn) -> (seconds, fn())                       # one wall-clock timing
  clocked(fn) -> (Clock(wall, cpu), fn())            # wall and process CPU seconds
  median_of(fn, reps) -> (median_s, [seconds])       # fn must block until its work is done
  interleaved(sides, reps, warmup) -> dict           # one call per side per rep, with other
                                                     #   processes' CPU use (ForeignCpu) per call
  matmul_probe(n, reps) -> (FLOP/s wall, FLOP per CPU second)  # jitted fp32 [n, n] @ [n, n]
  measure_matmul_peak(n, reps) -> FLOP/s             # the same, wall clock only
  measure_memory_bandwidth(mbytes, reps) -> B/s      # jitted fp32 sum over a large array (read only)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


@dataclasses.dataclass(frozen=True)
class Clock:
  """Wall seconds and process CPU seconds (all threads) of one timed call. Other processes on the
  shared cores stretch wall time; CPU time counts only the cycles this process got."""

  wall: float
  cpu: float


def clocked(fn: Callable[[], Any]) -> tuple[Clock, Any]:
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return Clock(time.perf_counter() - wall, time.process_time() - cpu), out


def median_of(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
  """Runs `fn` `reps` times; returns (median seconds, every time). `fn` must block on its result."""
  times = [timed(fn)[0] for _ in range(reps)]
  return statistics.median(times), times


class ForeignCpu:
  """CPU time other processes used since construction (whole machine, /proc/stat, minus this
  process's own), so each timed call says how many cores it had to share: 2 OpenMP threads on
  2 cores stall badly when another process takes one, and load averages are too coarse to show it."""

  def __init__(self):
    self.start = self._sample()

  @staticmethod
  def _sample() -> tuple[float, float] | None:
    try:
      with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
      return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system

  def cores(self, wall_s: float) -> float | None:
    """Mean number of cores other processes kept busy over `wall_s` (None off Linux)."""
    end = self._sample()
    if self.start is None or end is None or wall_s <= 0:
      return None
    return max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1])) / wall_s


def interleaved(sides: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, Any]:
  """Warm-up calls (the first timed as `<side>_first_call_s`, its float return value kept as
  `<side>_first_value`), then `reps` rounds of one call per side: `<side>_times_s`,
  `<side>_median_s` and `<side>_other_processes_cores` (per call, `ForeignCpu`)."""
  out: dict[str, Any] = {}
  for name, fn in sides.items():
    out[f"{name}_first_call_s"], value = timed(fn)
    if isinstance(value, float):
      out[f"{name}_first_value"] = value
    for _ in range(warmup - 1):
      fn()
  times: dict[str, list[float]] = {name: [] for name in sides}
  others: dict[str, list[float | None]] = {name: [] for name in sides}
  for _ in range(reps):
    for name, fn in sides.items():
      cpu = ForeignCpu()
      times[name].append(timed(fn)[0])
      others[name].append(cpu.cores(times[name][-1]))
  for name, t in times.items():
    out[f"{name}_times_s"] = t
    out[f"{name}_median_s"] = statistics.median(t)
    out[f"{name}_other_processes_cores"] = others[name]
  return out


@functools.lru_cache(maxsize=2)
def _matmul_operands(n: int):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0))
  return (jax.random.normal(keys[0], (n, n), jnp.float32),
          jax.random.normal(keys[1], (n, n), jnp.float32), jax.jit(jnp.dot))


def matmul_probe(n: int = 2048, reps: int = 7) -> tuple[float, float]:
  """Achievable fp32 FLOP/s of a jitted [n, n] @ [n, n] `jnp.dot` (after a warm-up call), on both
  clocks: (FLOP per wall second, median of `reps`; FLOP per CPU second of the same calls)."""
  import jax
  a, b, dot = _matmul_operands(n)
  jax.block_until_ready(dot(a, b))
  clocks = [clocked(lambda: jax.block_until_ready(dot(a, b)))[0] for _ in range(reps)]
  flops = 2 * n**3
  return (flops / statistics.median(c.wall for c in clocks),
          flops * reps / sum(c.cpu for c in clocks))


def measure_matmul_peak(n: int = 2048, reps: int = 7) -> float:
  """Achievable fp32 FLOP/s by wall clock: `matmul_probe`'s first figure."""
  return matmul_probe(n, reps)[0]


def measure_memory_bandwidth(mbytes: int = 256, reps: int = 7) -> float:
  """Achievable read bandwidth (bytes/s): a jitted fp32 sum over an `mbytes` MB array.

  A decode step mostly *reads* weights, so read bandwidth is the matching roofline.
  """
  import jax
  import jax.numpy as jnp
  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  seconds, _ = median_of(lambda: jax.block_until_ready(total(x)), reps)
  return x.nbytes / seconds
