"""How far `bench.round`'s training step and whole round are from the machine's matmul peak.

  training_limits(r, spec, log) -> dict  # MFU of one update step (`round.update_step`, the round's
                                         #   minibatch shape) and of its forward, forward+backward,
                                         #   Adam and largest GEMM alone
  round_limits(r, row, spec) -> dict     # MFU of the fused round, and of each split phase

Every timing is paired with a matmul-peak probe (`timing.matmul_probe`) taken right before it, on
both clocks (wall and process CPU time), so noise from other processes hits both alike.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from bench.common import Log
from bench.timing import Clock, clocked, matmul_probe

if TYPE_CHECKING:
  from bench.round import Round, Shape, Spec

SEED = 0  # bench.round's
TRAIN_FLOPS_FORMULA = (
    "training FLOPs = 6 * N_nonembed * tokens + 12 * layers * T * (heads * head_dim) * tokens "
    "(forward + backward, PaLM appendix B: the full T x T attention score and value matmuls, as "
    "computed); tokens = rows * T, T = prompt_len + completion_len - 1; N_nonembed = all params "
    "except the input embedding table (LM head included); Adam's elementwise update not counted")
ROUND_FLOPS_FORMULA = (
    "round FLOPs = sampling [2 * N_nonembed per prompt token (prefill, once per prompt) and per "
    "decoded token (rows * completion_len) + 4 * layers * context * heads * head_dim per token, "
    "context = attended length (prompt_len for prefill, prompt_len + completion_len / 2 mean "
    "while decoding)] + the old-log-prob forward over all rows (1/3 of the training FLOPs of "
    "the same tokens) + `minibatches` training steps")


# ----------------------------------------------------------------------------------------------
# FLOPs


def non_embedding_params(config) -> int:
  return config.num_params() - config.vocab_size * config.hidden_size


def forward_flops(config, tokens: int, context: float) -> float:
  """2 * N_nonembed per token + 4 * layers * context * heads * head_dim per token."""
  attn = 4 * config.num_layers * context * config.num_heads * config.head_dim
  return tokens * (2 * non_embedding_params(config) + attn)


def train_flops(config, rows: int, seq: int) -> float:
  """Forward + backward over rows x seq tokens (seq = the model's input length)."""
  return 3 * forward_flops(config, rows * seq, seq)


def round_flops(config, shape: Shape, spec: Spec) -> dict[str, float]:
  p, length = spec.prompt_len, shape.completion_len
  seq = p + length - 1
  sample = (forward_flops(config, shape.batch * p, p)
            + forward_flops(config, shape.rows * length, p + length / 2))
  old_logp = forward_flops(config, shape.rows * seq, seq)
  train = train_flops(config, shape.rows, seq)  # minibatches steps over rows / minibatches each
  return {"sample": sample, "old_logp": old_logp, "train": train, "total": sample + old_logp + train}


# ----------------------------------------------------------------------------------------------
# The training step


def random_rows(config, rows: int, prompt_len: int, length: int) -> dict:
  rng = np.random.default_rng(SEED)
  v = config.vocab_size
  return {"prompt_tokens": jnp.asarray(rng.integers(3, v, (rows, prompt_len)), jnp.int32),
          "prompt_mask": jnp.ones((rows, prompt_len), bool),
          "tokens": jnp.asarray(rng.integers(3, v, (rows, length)), jnp.int32),
          "mask": jnp.ones((rows, length), bool),
          "old_logp": jnp.full((rows, length), -np.log(v), jnp.float32),
          "advantages": jnp.asarray(rng.normal(size=rows), jnp.float32)}


def step_pieces(r: Round, minibatch: dict, gemm: tuple[int, int, int]
                ) -> tuple[dict[str, Callable[[], Any]], float | None]:
  """Blocking calls of the whole update step (`round.update_step`, as the fused round runs it) and
  of its parts on `minibatch` (each compiled by a first call), and XLA's FLOP count of the step."""
  from selfplay_jax import round as rnd
  from selfplay_jax.models.logprobs import completion_logprobs
  logp = lambda p, mb: completion_logprobs(r.config, p, mb)
  params = jax.tree.map(jnp.copy, r.params)
  carry = (params, r.optimizer.init(params), jnp.zeros((), jnp.int32))
  step = jax.jit(rnd.update_step(r.spec, r.optimizer, logp), donate_argnums=0)
  forward = jax.jit(logp)
  grad = jax.jit(jax.grad(lambda p, mb: r.spec.loss(logp(p, mb), mb)[0]))
  grads = grad(params, minibatch)
  adam = jax.jit(lambda g, o, p: optax.apply_updates(p, r.optimizer.update(g, o, p)[0]))
  m, d, f = gemm
  a = jax.random.normal(jax.random.key(1), (m, d), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (d, f), jnp.float32)
  dot = jax.jit(jnp.dot)
  xla_flops = None
  try:
    xla_flops = float(step.lower(carry, minibatch).cost_analysis()["flops"])
  except Exception:  # cost analysis is best effort (backend dependent)
    pass
  state = {"carry": carry}

  def run_step():
    state["carry"], metrics = step(state["carry"], minibatch)
    jax.block_until_ready(metrics)

  pieces = {"step": run_step,
            "forward": lambda: jax.block_until_ready(forward(state["carry"][0], minibatch)),
            "forward_backward": lambda: jax.block_until_ready(grad(state["carry"][0], minibatch)),
            "adam": lambda: jax.block_until_ready(adam(grads, state["carry"][1], state["carry"][0])),
            "gemm": lambda: jax.block_until_ready(dot(a, b))}
  for fn in pieces.values():  # compile
    fn()
  return pieces, xla_flops


def probed_clocks(pieces: dict[str, Callable[[], Any]], spec: Spec
                  ) -> tuple[dict[str, list[Clock]], dict[str, list[tuple[float, float]]]]:
  """`spec.mfu_reps` rounds over the pieces, a peak probe right before each timing (same noise)."""
  clocks: dict[str, list[Clock]] = {k: [] for k in pieces}
  probes: dict[str, list[tuple[float, float]]] = {k: [] for k in pieces}
  for _ in range(spec.mfu_reps):
    for k, fn in pieces.items():
      probes[k].append(matmul_probe(spec.matmul_n, spec.probe_reps))
      clocks[k].append(clocked(fn)[0])
  return clocks, probes


def training_limits(r: Round, spec: Spec, log: Log) -> dict:
  """MFU of one update step (the round's minibatch shape), and where its time goes."""
  config, shape = r.config, r.shape
  rows, length = shape.rows // spec.minibatches, shape.completion_len
  seq = spec.prompt_len + length - 1
  d, f = config.hidden_size, config.intermediate_size
  pieces, xla_flops = step_pieces(r, random_rows(config, rows, spec.prompt_len, length),
                                  (rows * seq, d, f))
  flops = {"step": train_flops(config, rows, seq), "forward_backward": train_flops(config, rows, seq),
           "forward": train_flops(config, rows, seq) / 3, "gemm": 2 * rows * seq * d * f}
  clocks, probes = probed_clocks(pieces, spec)
  # Wall MFU: FLOP/s over the probe's FLOP/s just before. CPU MFU: FLOP per CPU second over the
  # probe's FLOP per CPU second (immune to time slicing by other processes; see the docs note).
  wall = {k: statistics.median(flops[k] / c.wall / pw for c, (pw, _) in zip(clocks[k], probes[k]))
          for k in flops}
  cpu = {k: statistics.median(flops[k] / c.cpu / pc for c, (_, pc) in zip(clocks[k], probes[k]))
         for k in flops}
  med = {k: statistics.median(c.wall for c in v) for k, v in clocks.items()}
  med_cpu = {k: statistics.median(c.cpu for c in v) for k, v in clocks.items()}
  walls = [pw for v in probes.values() for pw, _ in v]
  per_cpu = [pc for v in probes.values() for _, pc in v]
  out = {
      "rows": rows, "seq": seq, "tokens": rows * seq, "formula": TRAIN_FLOPS_FORMULA,
      "flops": flops["step"], "xla_cost_analysis_flops": xla_flops,
      "peak_probes_flops": walls, "peak_probes_flops_per_cpu_s": per_cpu,
      "peak_flops": statistics.median(walls),  # per CPU second x all cores, had we had them alone:
      "peak_flops_cpu_time": statistics.median(per_cpu) * common.usable_cores(),
      "times_s": {k: [c.wall for c in v] for k, v in clocks.items()},
      "cpu_s": {k: [c.cpu for c in v] for k, v in clocks.items()},
      "median_s": med, "median_cpu_s": med_cpu,
      "mfu": wall["step"], "mfu_cpu": cpu["step"],
      "mfu_vs_max_peak": flops["step"] / med["step"] / max(walls),
      "achieved_flops": flops["step"] / med["step"],
      "forward_mfu": wall["forward"], "forward_mfu_cpu": cpu["forward"],
      "forward_backward_mfu": wall["forward_backward"],
      "forward_backward_mfu_cpu": cpu["forward_backward"],
      "adam_share": med_cpu["adam"] / med_cpu["step"],
      "gemm_shape": [rows * seq, d, f],
      "gemm_fraction_of_peak": wall["gemm"], "gemm_fraction_of_peak_cpu": cpu["gemm"],
  }
  log(f"  training step: {med['step']:.3f} s, {common.fmt_si(out['achieved_flops'], 'FLOP/s')}; "
      f"MFU {out['mfu_cpu']:.0%} by CPU time, {out['mfu']:.0%} by wall clock (probes "
      f"{common.fmt_si(min(walls), 'FLOP/s')} - {common.fmt_si(max(walls), 'FLOP/s')} wall, "
      f"{common.fmt_si(out['peak_flops_cpu_time'], 'FLOP/s')} by CPU time); by CPU time: forward "
      f"{out['forward_mfu_cpu']:.0%}, forward+backward {out['forward_backward_mfu_cpu']:.0%}, Adam "
      f"{out['adam_share']:.0%} of the step, model-shaped GEMM {out['gemm_fraction_of_peak_cpu']:.0%}")
  return out


# ----------------------------------------------------------------------------------------------
# The round


def round_limits(r: Round, row: dict, spec: Spec) -> dict:
  """MFU of the fused round, each rep against the peak probe taken just before it."""
  flops = round_flops(r.config, r.shape, spec)
  phase = row["split_phase_s"]
  phase_flops = {"sample": flops["sample"], "build": flops["old_logp"], "update": flops["train"]}
  peak = statistics.median(row["peak_probes_flops"])
  mfu = statistics.median(flops["total"] / t / pk
                          for t, pk in zip(row["fused_times_s"], row["peak_probes_flops"]))
  mfu_cpu = statistics.median(flops["total"] / c / pk
                              for c, pk in zip(row["fused_cpu_s"], row["peak_probes_flops_per_cpu_s"]))
  return {"formula": ROUND_FLOPS_FORMULA, "flops": flops, "peak_flops": peak, "mfu": mfu,
          "mfu_cpu": mfu_cpu, "achieved_flops": flops["total"] / row["fused_s"],
          "phase_mfu_split": {k: v / phase[k] / peak for k, v in phase_flops.items()},
          "phase_share_split": {k: phase[k] / row["split_s"] for k in phase}}
