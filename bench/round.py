"""One GRPO round: fused (one jitted program) vs split (jitted pieces with host round-trips), the
training step's and the round's model FLOPs utilisation (MFU), and how round time scales.

  python -m bench.round           # full run (~5 min): results/round.json + docs section
  python -m bench.round --quick   # tiny harness check (< 60 s): results/round_quick.json only

The round is `selfplay_jax.round.build_round_fn` on the arithmetic task with `PolicyGradient`
(GRPO): sample `n` completions per prompt, score them, recompute the sampling log-probs, then
`minibatches` Adam steps. "Split" does the same work as separate jitted calls with a
`jax.device_get` after each (sample -> score -> build rows / advantages -> shuffle -> one call per
update step), the way a pipeline that scores on the host is built; it uses the same RNG keys, so
both sides must end with the same completions, metrics and parameters (checked every run).

Every row decodes exactly `completion_len` tokens (the sampler's stop id is one the model cannot
emit: an id past the vocabulary), so a round's cost depends on its shape only. The reward is the
task's exact-answer verifier plus 0.5 x the fraction of digit tokens in the completion: an untrained
model never solves the task, and without reward variance inside groups every advantage (and so
every update) would be zero, which would make the fused == split check vacuous.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common

NAME = "round"
SEED = 0
LR = 1e-4  # Adam learning rate of every update step
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


@dataclasses.dataclass(frozen=True)
class Shape:
  """One round's size. The model has `Spec.layers` layers of this width (MLP 4x width)."""

  batch: int  # prompts per round
  n: int  # samples per prompt (GRPO group size)
  completion_len: int  # tokens decoded per sample (exactly)
  width: int  # hidden size

  @property
  def rows(self) -> int:
    return self.batch * self.n


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything a run depends on (recorded in the JSON)."""

  layers: int  # decoder layers of every model
  prompt_len: int  # prompt width (left-padded; arithmetic prompts are ~7 tokens with BOS)
  minibatches: int  # Adam steps per round (the rows split into this many minibatches, 1 epoch)
  fused: tuple[tuple[str, Shape, int], ...]  # fused vs split at these (label, shape, timed reps)
  mfu_label: str  # which of `fused` is the MFU model (width 1024 in the full run)
  scaling_base: Shape
  scaling: tuple[tuple[str, tuple[int, ...]], ...]  # (Shape field, values besides the base's)
  scaling_reps: int
  probe_reps: int  # matmul-peak probe: median of this many [n, n] dots, before every MFU rep
  matmul_n: int
  mfu_reps: int


FULL = Spec(
    layers=2, prompt_len=8, minibatches=2,
    fused=(("small", Shape(batch=8, n=4, completion_len=32, width=64), 25),
           ("large", Shape(batch=8, n=4, completion_len=56, width=1024), 3)),
    mfu_label="large",
    scaling_base=Shape(batch=8, n=4, completion_len=32, width=128),
    scaling=(("batch", (4, 16)), ("n", (2, 8)), ("completion_len", (16, 64)), ("width", (64, 256))),
    scaling_reps=7, probe_reps=3, matmul_n=2048, mfu_reps=3)

QUICK = Spec(
    layers=1, prompt_len=8, minibatches=2,
    fused=(("small", Shape(batch=2, n=2, completion_len=4, width=32), 2),),
    mfu_label="small",
    scaling_base=Shape(batch=2, n=2, completion_len=4, width=32),
    scaling=(),  # base only (reuses the fused-vs-split timing: no extra compile)
    scaling_reps=1, probe_reps=2, matmul_n=256, mfu_reps=2)


# ----------------------------------------------------------------------------------------------
# Task, model, round


@dataclasses.dataclass
class Setup:
  """The task side shared by every shape: tokenizer-derived ids, batches and the reward."""

  tokenizer: Any
  task: Any
  score: Callable  # jittable reward(tokens, mask, answer, answer_mask) -> float32 [rows]

  def batch(self, num: int, prompt_len: int) -> dict[str, np.ndarray]:
    from selfplay_jax.data import tasks
    examples = self.task.examples("train", seed=SEED, num=num)
    return tasks.encode_examples(examples, self.tokenizer, prompt_len, 8, 4)


def make_setup(workdir: str) -> Setup:
  from selfplay_jax.data import tasks
  task = tasks.get_task("arithmetic", num_digits=2)
  tok = tasks.build_tokenizer(task, workdir)
  verify = task.make_verifier(tok)
  digit_ids = jnp.asarray([tok.piece_to_id(d) for d in tasks.DIGITS], jnp.int32)

  def score(tokens, mask, answer, answer_mask):
    digits = jnp.sum(jnp.isin(tokens, digit_ids) & mask, axis=1) / jnp.maximum(mask.sum(axis=1), 1)
    return verify(tokens, mask, answer, answer_mask) + 0.5 * digits.astype(jnp.float32)

  return Setup(tokenizer=tok, task=task, score=score)


def model_config(setup: Setup, width: int, layers: int):
  from selfplay_jax.models import ModelConfig
  head_dim = 64 if width >= 256 else max(8, width // 4)
  tok = setup.tokenizer
  return ModelConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=4 * width,
                     num_layers=layers, num_heads=width // head_dim, num_kv_heads=width // head_dim,
                     head_dim=head_dim, bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                     pad_token_id=tok.pad_id).validate()


def non_embedding_params(config) -> int:
  return config.num_params() - config.vocab_size * config.hidden_size


@dataclasses.dataclass
class Round:
  """Everything one shape needs: config, params, batch and both round implementations."""

  shape: Shape
  config: Any
  params: Any
  batch: dict
  sampling_config: Any
  spec: Any
  optimizer: Any
  fused: Callable
  split: "Split"

  def fresh_state(self):
    from selfplay_jax import round as rnd
    return rnd.init_state(self.params, self.optimizer, self.spec, jax.random.key(SEED + 1))


def make_round(setup: Setup, shape: Shape, spec: Spec) -> Round:
  from selfplay_jax import models, sampling
  from selfplay_jax import round as rnd
  from selfplay_jax.algorithms.grpo import PolicyGradient
  config = model_config(setup, shape.width, spec.layers)
  params = models.init_params(config, jax.random.key(SEED))
  # Stop id = vocab_size: never sampled, so every row decodes exactly completion_len tokens.
  sc = sampling.SamplingConfig(max_new_tokens=shape.completion_len, temperature=1.0, n=shape.n,
                               eos_ids=(config.vocab_size,))
  alg = PolicyGradient(group_size=shape.n)
  opt = optax.adam(LR)
  fused = rnd.build_round_fn(config, alg, opt, sc, setup.score, num_minibatches=spec.minibatches,
                             num_samples=shape.rows)
  split = Split(config, alg, opt, sc, setup.score, spec.minibatches)
  return Round(shape=shape, config=config, params=params,
               batch=setup.batch(shape.batch, spec.prompt_len), sampling_config=sc, spec=alg,
               optimizer=opt, fused=fused, split=split)


def make_update_step(config, alg, optimizer):
  """One Adam step on the policy-gradient loss, the same computation as the fused round's."""
  from selfplay_jax import round as rnd

  def step(params, opt_state, minibatch):
    def loss_fn(p):
      return alg.loss(rnd.completion_logprobs(config, p, minibatch), minibatch)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), {"loss": loss,
                                                                       "grad_norm": grad_norm}

  return step


class Split:
  """The fused round's work as separate jitted calls, each result fetched to the host."""

  PHASES = ("sample", "score", "build", "shuffle", "update")

  def __init__(self, config, alg, optimizer, sampling_config, score, minibatches: int):
    from selfplay_jax import round as rnd
    from selfplay_jax import sampling
    from selfplay_jax.algorithms.spec import LogProbs
    self.n, self.minibatches = sampling_config.n, minibatches
    self.keys = jax.jit(lambda rng: tuple(jax.random.split(rng, 3)))
    self.sample = lambda params, tokens, mask, rng: sampling.sample(config, params, tokens, mask, rng,
                                                                     sampling_config)
    self.score = jax.jit(score)
    frozen = lambda p, rows: jax.lax.stop_gradient(
        rnd.completion_logprobs(config, p, rows, num_chunks=minibatches))

    def build(params, ref_params, batch, rollout, rewards):
      logp = LogProbs(old=lambda rows: frozen(params, rows), ref=lambda rows: frozen(ref_params, rows))
      return alg.build(batch, rollout, rewards, logp)

    self.build = jax.jit(build)
    self.shuffle = jax.jit(functools.partial(rnd._minibatches, num_epochs=1,
                                             num_minibatches=minibatches))
    self.update = jax.jit(make_update_step(config, alg, optimizer), donate_argnums=(0, 1))

  def __call__(self, state, batch) -> tuple[Any, dict, dict]:
    """-> (params, host metrics, seconds per phase). Consumes (donates) the state's params."""
    phases, t = {}, time.perf_counter()

    def lap(name):
      nonlocal t
      now = time.perf_counter()
      phases[name] = now - t
      t = now

    _, k_sample, k_shuffle = self.keys(state.rng)
    rollout = jax.device_get(self.sample(state.params, batch["prompt_tokens"], batch["prompt_mask"],
                                         k_sample))
    lap("sample")
    rep = lambda x: np.repeat(x, self.n, axis=0)
    rewards = jax.device_get(self.score(rollout.tokens, rollout.mask, rep(batch["answer_tokens"]),
                                        rep(batch["answer_mask"])))
    lap("score")
    rows = jax.device_get(self.build(state.params, state.ref_params, batch, rollout, rewards))
    lap("build")
    minibatches = jax.device_get(self.shuffle(rows, k_shuffle))
    lap("shuffle")
    params, opt_state, steps = state.params, state.opt_state, []
    for i in range(self.minibatches):
      params, opt_state, m = self.update(params, opt_state, jax.tree.map(lambda x: x[i], minibatches))
      steps.append(jax.device_get(m))  # a trainer logs each step
    lap("update")
    mask = rollout.mask
    metrics = {
        "train/accuracy": float(np.mean(rewards >= 1.0)),
        "train/reward_mean": float(np.nanmean(rewards)),
        "train/reward_std": float(np.nanstd(rewards)),
        "train/completion_len": float(np.mean(rollout.lengths)),
        "train/entropy": float(-np.sum(rollout.model_logprobs * mask) / max(mask.sum(), 1)),
        "train/loss": float(np.mean([s["loss"] for s in steps])),
        "train/grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
        "samples/tokens": rollout.tokens,
    }
    return params, metrics, phases


COMPARED = ("train/accuracy", "train/reward_mean", "train/reward_std", "train/completion_len",
            "train/entropy", "train/loss", "train/grad_norm")


def run_fused(r: Round, state) -> tuple[Any, dict]:
  state, metrics = r.fused(state, r.batch)
  metrics = jax.device_get(metrics)  # a training loop reads them
  return jax.block_until_ready(state.params), metrics


def run_split(r: Round, state) -> tuple[Any, dict, dict]:
  params, metrics, phases = r.split(state, r.batch)
  return jax.block_until_ready(params), metrics, phases


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


def timed_round(r: Round, fn: Callable) -> tuple[Clock, Any]:
  """`fn(r, state)` on a fresh copy of the initial state (made outside the timer)."""
  state = jax.block_until_ready(r.fresh_state())
  return clocked(lambda: fn(r, state))


@functools.lru_cache(maxsize=2)
def _probe_operands(n: int):
  keys = jax.random.split(jax.random.key(0))
  return (jax.random.normal(keys[0], (n, n), jnp.float32),
          jax.random.normal(keys[1], (n, n), jnp.float32), jax.jit(jnp.dot))


def matmul_probe(n: int, reps: int) -> tuple[float, float]:
  """`common.measure_matmul_peak`'s fp32 [n, n] @ [n, n] `jnp.dot` on both clocks: (FLOP per wall
  second (median of `reps`), FLOP per CPU second of the same calls)."""
  a, b, dot = _probe_operands(n)
  jax.block_until_ready(dot(a, b))
  clocks = [clocked(lambda: jax.block_until_ready(dot(a, b)))[0] for _ in range(reps)]
  flops = 2 * n**3
  return (flops / statistics.median(c.wall for c in clocks),
          flops * reps / sum(c.cpu for c in clocks))


def same_work(fused: tuple, split: tuple) -> dict:
  """Do both sides end with the same completions, metrics and parameters?"""
  (fp, fm), (sp, sm, _) = fused, split
  tokens_equal = bool(np.array_equal(fm["samples/tokens"], sm["samples/tokens"]))
  metric_diff = {k: abs(float(fm[k]) - float(sm[k])) / max(abs(float(fm[k])), 1e-6) for k in COMPARED}
  param_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(fp), jax.tree.leaves(sp)))
  # The one program and the pieces may round differently; different work (other completions,
  # rewards or minibatches) would move weights by ~LR (Adam's step size), so allow 1% of that.
  equal = tokens_equal and max(metric_diff.values()) <= 1e-4 and param_diff <= 0.01 * LR
  return {"equal": equal, "tokens_equal": tokens_equal, "metric_rel_diff": metric_diff,
          "param_max_abs_diff": param_diff, "fused_metrics": {k: float(fm[k]) for k in COMPARED},
          "split_metrics": {k: float(sm[k]) for k in COMPARED}}


# ----------------------------------------------------------------------------------------------
# FLOPs


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
# Measurements


def fused_vs_split(r: Round, label: str, spec: Spec, reps: int, log, probe: bool = False) -> dict:
  """Interleaved fused / split reps; with `probe`, a matmul-peak probe right before each fused rep
  (for the round's MFU)."""
  compile_fused, fused_out = timed_round(r, run_fused)
  compile_split, split_out = timed_round(r, run_split)
  check = same_work(fused_out, split_out)
  log(f"  {label}: compiled (fused {compile_fused.wall:.1f} s, split {compile_split.wall:.1f} s); "
      f"same work: {check['equal']}")
  fused, split, phases, probes = [], [], [], []
  for i in range(reps):  # interleaved, order alternating, so machine noise hits both alike
    for side in (("fused", "split") if i % 2 == 0 else ("split", "fused")):
      if side == "fused":
        if probe:
          probes.append(matmul_probe(spec.matmul_n, spec.probe_reps))
        fused.append(timed_round(r, run_fused)[0])
      else:
        clock, (_, _, ph) = timed_round(r, run_split)
        split.append(clock)
        phases.append(ph)
  med = lambda clocks, attr: statistics.median(getattr(c, attr) for c in clocks)
  fused_s, split_s = med(fused, "wall"), med(split, "wall")
  phase_s = {k: statistics.median(p[k] for p in phases) for k in Split.PHASES}
  return {"label": label, "shape": dataclasses.asdict(r.shape), "params": r.config.num_params(),
          "non_embedding_params": non_embedding_params(r.config), "rows": r.shape.rows,
          "fused_times_s": [c.wall for c in fused], "split_times_s": [c.wall for c in split],
          "fused_cpu_s": [c.cpu for c in fused], "split_cpu_s": [c.cpu for c in split],
          "fused_first_call_s": compile_fused.wall, "split_first_call_s": compile_split.wall,
          "fused_s": fused_s, "split_s": split_s, "ratio": split_s / fused_s,
          "ratio_cpu": med(split, "cpu") / med(fused, "cpu"),
          "split_phase_s": phase_s, "host_calls_split": 4 + spec.minibatches + 1,
          "samples_per_s_fused": r.shape.rows / fused_s, "same_work": check,
          "peak_probes_flops": [w for w, _ in probes], "peak_probes_flops_per_cpu_s": [c for _, c in probes]}


def random_rows(config, rows: int, prompt_len: int, length: int) -> dict:
  rng = np.random.default_rng(SEED)
  v = config.vocab_size
  return {"prompt_tokens": jnp.asarray(rng.integers(3, v, (rows, prompt_len)), jnp.int32),
          "prompt_mask": jnp.ones((rows, prompt_len), bool),
          "tokens": jnp.asarray(rng.integers(3, v, (rows, length)), jnp.int32),
          "mask": jnp.ones((rows, length), bool),
          "old_logp": jnp.full((rows, length), -np.log(v), jnp.float32),
          "advantages": jnp.asarray(rng.normal(size=rows), jnp.float32)}


def training_limits(r: Round, spec: Spec, log) -> dict:
  """MFU of one update step (the round's minibatch shape), and where its time goes."""
  from selfplay_jax import round as rnd
  config, shape = r.config, r.shape
  rows, length = shape.rows // spec.minibatches, shape.completion_len
  seq = spec.prompt_len + length - 1
  minibatch = random_rows(config, rows, spec.prompt_len, length)
  params = jax.tree.map(jnp.copy, r.params)
  opt_state = r.optimizer.init(params)
  step = jax.jit(make_update_step(config, r.spec, r.optimizer), donate_argnums=(0, 1))
  forward = jax.jit(lambda p, mb: rnd.completion_logprobs(config, p, mb))
  grad = jax.jit(jax.grad(lambda p, mb: r.spec.loss(rnd.completion_logprobs(config, p, mb), mb)[0]))
  grads = grad(params, minibatch)
  adam = jax.jit(lambda g, o, p: optax.apply_updates(p, r.optimizer.update(g, o, p)[0]))
  d, f = config.hidden_size, config.intermediate_size
  a = jax.random.normal(jax.random.key(1), (rows * seq, d), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (d, f), jnp.float32)
  gemm = jax.jit(jnp.dot)
  xla_flops = None
  try:
    xla_flops = float(step.lower(params, opt_state, minibatch).cost_analysis()["flops"])
  except Exception:  # cost analysis is best effort (backend dependent)
    pass
  state = {"p": params, "o": opt_state}

  def run_step():
    state["p"], state["o"], m = step(state["p"], state["o"], minibatch)
    jax.block_until_ready(m)

  pieces = {"step": run_step,
            "forward": lambda: jax.block_until_ready(forward(state["p"], minibatch)),
            "forward_backward": lambda: jax.block_until_ready(grad(state["p"], minibatch)),
            "adam": lambda: jax.block_until_ready(adam(grads, state["o"], state["p"])),
            "gemm": lambda: jax.block_until_ready(gemm(a, b))}
  for fn in pieces.values():  # compile
    fn()
  flops = {"step": train_flops(config, rows, seq), "forward_backward": train_flops(config, rows, seq),
           "forward": train_flops(config, rows, seq) / 3, "gemm": 2 * rows * seq * d * f}
  clocks: dict[str, list[Clock]] = {k: [] for k in pieces}
  probes: dict[str, list[tuple[float, float]]] = {k: [] for k in pieces}
  for _ in range(spec.mfu_reps):
    for k, fn in pieces.items():  # a peak probe right before each timing: same noise, same run
      probes[k].append(matmul_probe(spec.matmul_n, spec.probe_reps))
      clocks[k].append(clocked(fn)[0])
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
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  out = {
      "rows": rows, "seq": seq, "tokens": rows * seq, "formula": TRAIN_FLOPS_FORMULA,
      "flops": flops["step"], "xla_cost_analysis_flops": xla_flops,
      "peak_probes_flops": walls, "peak_probes_flops_per_cpu_s": per_cpu,
      "peak_flops": statistics.median(walls),
      "peak_flops_cpu_time": statistics.median(per_cpu) * cores,  # all cores, had we had them alone
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


def scaling(setup: Setup, spec: Spec, known: dict[Shape, tuple[list, list]], log) -> dict:
  base = spec.scaling_base
  points = [("base", base)] + [(axis, dataclasses.replace(base, **{axis: v}))
                               for axis, values in spec.scaling for v in values]
  rows = []
  for axis, shape in points:
    if shape in known:
      first = None
    else:
      r = make_round(setup, shape, spec)
      first = timed_round(r, run_fused)[0].wall
      clocks = [timed_round(r, run_fused)[0] for _ in range(spec.scaling_reps)]
      known[shape] = ([c.wall for c in clocks], [c.cpu for c in clocks])
    (times, cpu_times) = known[shape]
    seconds = statistics.median(times)
    config = model_config(setup, shape.width, spec.layers)
    flops = round_flops(config, shape, spec)["total"]
    rows.append({"axis": axis, "shape": dataclasses.asdict(shape), "times_s": times,
                 "cpu_s": cpu_times, "round_cpu_s": statistics.median(cpu_times),
                 "first_call_s": first, "round_s": seconds, "samples_per_s": shape.rows / seconds,
                 "flops": flops, "achieved_flops": flops / seconds,
                 "params": config.num_params()})
    log(f"  {axis} {dataclasses.asdict(shape)}: {seconds:.3f} s")
  base_s = rows[0]["round_s"]
  for row in rows:
    row["vs_base"] = row["round_s"] / base_s
  return {"base": dataclasses.asdict(base), "rows": rows, "law": fit_law(rows, base, "round_s"),
          "law_cpu": fit_law(rows, base, "round_cpu_s")}


AXES = ("batch", "n", "completion_len", "width")


def fit_law(rows: list[dict], base: Shape, key: str = "round_s") -> dict:
  """Two rough laws of `key` (round_s or round_cpu_s): a log-log slope per axis (time ~ value^k,
  the others at the base), and at the base width a least-squares line c0 + c * batch * n * len."""
  law: dict[str, Any] = {"seconds": key, "exponents": {}}
  for axis in AXES:
    pts = sorted({(r["shape"][axis], r[key]) for r in rows if r["axis"] in ("base", axis)})
    if len(pts) >= 2:
      x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
      law["exponents"][axis] = float(np.polyfit(x, y, 1)[0])
  same_width = [r for r in rows if r["shape"]["width"] == base.width]
  work = np.array([r["shape"]["batch"] * r["shape"]["n"] * r["shape"]["completion_len"]
                   for r in same_width], float)
  y = np.array([r[key] for r in same_width])
  if len(set(work)) >= 2:
    (c, c0) = np.polyfit(work, y, 1)
    law["linear"] = {"form": f"{key} = c0 + c * batch * n * completion_len (width {base.width})",
                     "c0_s": float(c0), "c_s_per_sampled_token": float(c),
                     "max_rel_error": float(np.max(np.abs(c0 + c * work - y) / y))}
  return law


def sampling_reference() -> dict | None:
  """The decode-vs-bandwidth figure measured by bench.sampling (not re-measured here)."""
  path = common.RESULTS_DIR / "sampling.json"
  try:
    bb = json.loads(path.read_text())["bandwidth_bound"]
    return {"source": "bench/results/sampling.json", "fraction_of_bandwidth": bb["fraction_of_bandwidth"],
            "memory_bandwidth_bytes_s": bb["memory_bandwidth_bytes_s"],
            "params": bb["params"]["total"]}
  except (OSError, KeyError, ValueError):
    return None


# ----------------------------------------------------------------------------------------------
# Reporting


def fused_note(rows: list[dict]) -> str:
  parts = []
  for r in rows:
    ph = r["split_phase_s"]
    fused_cpu, split_cpu = statistics.median(r["fused_cpu_s"]), statistics.median(r["split_cpu_s"])
    extra = split_cpu - fused_cpu
    parts.append(f"{r['label']} (width {r['shape']['width']}): the split round costs "
                 f"{extra * 1e3:+.1f} ms of CPU time more per round ({extra / fused_cpu:+.1%}; "
                 f"{extra / r['host_calls_split'] * 1e3:+.2f} ms per host round-trip if all of it were "
                 f"theirs, {r['host_calls_split']} of them); the split round's time goes to "
                 + ", ".join(f"{k} {ph[k] / r['split_s']:.0%}" for k in Split.PHASES))
  met = all(min(r["ratio"], r["ratio_cpu"]) >= 1.5 for r in rows)
  head = ("Target (fused >= 1.5x split) met: " if met else
          "Target (fused >= 1.5x split) not met: fused and split run the same computations, and "
          "on the CPU backend a 'device' array already lives in host memory, "
          "so a `device_get` is a memcpy and a jitted call's dispatch costs microseconds; the "
          "round-trips the fused program removes are cheap next to the compute they separate. ")
  return (head + "; ".join(parts) + ". The wall-clock ratios move with the other processes on "
          "these cores; the CPU-time ratios are the steady ones. On an accelerator each "
          "`device_get` drains the device queue and crosses PCIe, and host-side scoring "
          "serialises the pipeline: that is where fusing pays.")


def mfu_note(lim: dict, width: int) -> str:
  head = (f"Target (training MFU >= 60% of the measured matmul peak at width {width}): "
          f"{'met' if lim['mfu_cpu'] >= 0.6 else 'not met'} by CPU time ({lim['mfu_cpu']:.0%}); "
          f"wall clock gives {lim['mfu']:.0%}.")
  why = (f" Where the rest goes: the forward pass alone reaches {lim['forward_mfu_cpu']:.0%} and "
         f"forward+backward {lim['forward_backward_mfu_cpu']:.0%}, while a lone GEMM of the step's "
         f"largest shape {lim['gemm_shape']} reaches {lim['gemm_fraction_of_peak_cpu']:.0%} of the "
         "square probe; the backward GEMMs run on transposed operands, and XLA:CPU runs attention "
         "softmax, RMSNorm, RoPE, SiLU and the log-softmax as memory-bound loops between them. "
         f"Adam's elementwise update is {lim['adam_share']:.0%} of the step.")
  return head + why


def render_docs(res: dict) -> str:
  mach, cfg, lim = res["machine"], res["config"], res["limits"]
  tl, rl = lim["training_step"], lim["round"]
  mfu_row = next(r for r in res["fused_vs_split"] if r["label"] == cfg["mfu_label"])
  probes = tl["peak_probes_flops"] + mfu_row["peak_probes_flops"]
  lines = [
      "## GRPO round: fused vs split, MFU, scaling (CPU)",
      "",
      f"`python -m bench.round` on {mach['cpu_model']} ({mach['usable_cores']} cores), {mach['date']}; "
      f"jax {mach['jax']}, flax {mach['flax']}; load average {mach['loadavg']} at start, "
      f"{res['loadavg_end']} at end. One round = `build_round_fn` with GRPO on the arithmetic task: "
      f"sample n per prompt (temperature 1, exactly `len` tokens each), score (exact-answer "
      f"verifier + 0.5 x digit fraction), old log-probs, {cfg['minibatches']} Adam steps. Models: "
      f"random Llama-style, {cfg['layers']} layers, MLP 4x width, vocab {cfg['vocab_size']}, fp32. "
      f"{cfg['prompt_len']}-token prompts. Medians of interleaved reps, compile excluded.",
      "",
      "### Fused vs split",
      "",
      "Split = the same work as separate jitted calls with a `device_get` after each (sample, score, "
      "build rows, shuffle, one call per update step); same RNG keys, so both must give the same "
      "completions, metrics and parameters.",
      "",
      "| model | params | prompts x n x len | fused s | split s | fused speed-up (wall / CPU time) "
      "| same work | split: sample / score / build / shuffle / update |",
      "|---|---:|---|---:|---:|---:|---|---|",
  ]
  for r in res["fused_vs_split"]:
    s, ph = r["shape"], r["split_phase_s"]
    lines.append(
        f"| {r['label']} (width {s['width']}) | {r['params'] / 1e6:.2f}M | "
        f"{s['batch']} x {s['n']} x {s['completion_len']} | {r['fused_s']:.3f} | {r['split_s']:.3f} | "
        f"{r['ratio']:.2f}x / {r['ratio_cpu']:.2f}x | {'yes' if r['same_work']['equal'] else 'NO'} "
        f"(max param diff {r['same_work']['param_max_abs_diff']:.1e}) | "
        + " / ".join(f"{ph[k] * 1e3:.0f}" for k in Split.PHASES) + " ms |")
  lines += ["", res["notes"]["fused"], "", "### Limits", ""]
  bw = res.get("decode_bandwidth")
  shp = mfu_row["shape"]
  lines += [
      f"Width-{shp['width']} model ({mfu_row['non_embedding_params'] / 1e6:.1f}M non-embedding "
      f"params); training step = one of its round's minibatches, {tl['rows']} rows x {tl['seq']} "
      f"tokens (forward + backward + Adam of the GRPO loss on `completion_logprobs`, "
      f"{tl['median_s']['step']:.2f} s, {common.fmt_si(tl['achieved_flops'], 'FLOP/s')}); round = "
      f"{shp['batch']} x {shp['n']} x {shp['completion_len']} ({rl['flops']['total'] / 1e12:.2f} "
      f"TFLOP in {mfu_row['fused_s']:.2f} s).",
      "",
      "| fraction of the measured matmul peak | by CPU time | by wall clock |",
      "|---|---:|---:|",
      f"| **training step (MFU)** | **{tl['mfu_cpu']:.0%}** | {tl['mfu']:.0%} |",
      f"| forward only | {tl['forward_mfu_cpu']:.0%} | {tl['forward_mfu']:.0%} |",
      f"| forward + backward | {tl['forward_backward_mfu_cpu']:.0%} | "
      f"{tl['forward_backward_mfu']:.0%} |",
      f"| one GEMM {tl['gemm_shape']} (the step's largest) | {tl['gemm_fraction_of_peak_cpu']:.0%} | "
      f"{tl['gemm_fraction_of_peak']:.0%} |",
      f"| **whole round (MFU)** | **{rl['mfu_cpu']:.0%}** | {rl['mfu']:.0%} |",
      "",
      f"- **Matmul peak:** a {cfg['matmul_n']}^2 fp32 `jnp.dot` probe right before every timing "
      f"above ({len(probes)} probes): {common.fmt_si(min(probes), 'FLOP/s')} - "
      f"{common.fmt_si(max(probes), 'FLOP/s')} by wall clock (median "
      f"{common.fmt_si(tl['peak_flops'], 'FLOP/s')}); by CPU time {common.fmt_si(tl['peak_flops_cpu_time'], 'FLOP/s')} "
      f"(FLOP per CPU-second x {mach['usable_cores']} cores). Each fraction is the median over reps of (FLOPs / "
      "seconds) / (the probe's FLOPs / seconds) on the same clock. Other processes time-slice "
      "these cores (see the load average), which stretches wall time of both the probe and the "
      "timed call by whatever happened during each; CPU time counts only the cycles this process "
      "ran, so it is the steadier measure here (an upper estimate for an idle machine if XLA's "
      "threads sleep rather than spin while waiting).",
      f"- {res['notes']['mfu']}",
      f"- **Round:** by phase (split run, wall): sampling {rl['phase_share_split']['sample']:.0%} of "
      f"the time at {rl['phase_mfu_split']['sample']:.0%} of the peak (the decode loop is "
      f"bandwidth- and step-bound), old log-probs {rl['phase_share_split']['build']:.0%} at "
      f"{rl['phase_mfu_split']['build']:.0%}, updates {rl['phase_share_split']['update']:.0%} at "
      f"{rl['phase_mfu_split']['update']:.0%}.",
      f"- **FLOPs:** {tl['formula']}"
      + (f" (XLA's cost analysis of the jitted step counts {tl['xla_cost_analysis_flops'] / tl['flops']:.2f}x "
         "this)." if tl.get("xla_cost_analysis_flops") else ".") + f" {rl['formula']}.",
      ("- **Decode vs the memory-bandwidth bound:** measured by `bench.sampling` (section above): "
       f"{bw['fraction_of_bandwidth']:.0%} of {common.fmt_si(bw['memory_bandwidth_bytes_s'], 'B/s')} "
       f"at batch 1 on a {bw['params'] / 1e6:.0f}M-param model." if bw else
       "- **Decode vs the memory-bandwidth bound:** see the sampling section (`bench.sampling`)."),
      "",
      "### Scaling",
      "",
      f"Fused round time, varying one factor at a time around prompts x n x len = "
      f"{res['scaling']['base']['batch']} x {res['scaling']['base']['n']} x "
      f"{res['scaling']['base']['completion_len']}, width {res['scaling']['base']['width']}.",
      "",
      "| varied | prompts | n | len | width | round s | x base | CPU s | samples/s | GFLOP/s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in res["scaling"]["rows"]:
    s = r["shape"]
    lines.append(f"| {r['axis']} | {s['batch']} | {s['n']} | {s['completion_len']} | {s['width']} | "
                 f"{r['round_s']:.3f} | {r['vs_base']:.2f} | {r['round_cpu_s']:.3f} | "
                 f"{r['samples_per_s']:,.0f} | "
                 f"{r['achieved_flops'] / 1e9:.1f} |")
  lines += ["", res["notes"]["scaling"], "",
            "Raw numbers (every repetition, split phases, metrics of both sides): "
            "`bench/results/round.json`. Timings on this shared 2-core machine swing between runs; "
            "compare ratios, not absolute times."]
  return "\n".join(lines)


def scaling_note(sc: dict) -> str:
  names = {"batch": "prompts", "n": "n", "completion_len": "len", "width": "width"}
  law, cpu, parts = sc["law"], sc["law_cpu"], []
  power = lambda lw: " * ".join(f"{names[k]}^{v:.2f}" for k, v in lw["exponents"].items())
  if law["exponents"]:
    parts.append(f"Rough law (log-log slope along each axis, the others at the base): CPU time ~ "
                 f"{power(cpu)}; wall time ~ {power(law)}.")
  if "linear" in cpu:
    lin = cpu["linear"]
    parts.append(
        f"At width {sc['base']['width']}, CPU seconds ~ {lin['c0_s'] * 1e3:.0f} ms + "
        f"{lin['c_s_per_sampled_token'] * 1e6:.1f} us x prompts x n x len (least squares, max error "
        f"{lin['max_rel_error']:.0%}; wall: {law['linear']['c0_s'] * 1e3:.0f} ms + "
        f"{law['linear']['c_s_per_sampled_token'] * 1e6:.1f} us x prompts x n x len, max error "
        f"{law['linear']['max_rel_error']:.0%}). So the cost is close to linear in the number of "
        "sampled tokens (prompts x n x len: decode, the old-log-prob pass and the updates all scale "
        "with it); exponents below 1 mean fixed per-call and per-decode-step costs still show at "
        "these small sizes. Width enters as FLOPs do (width^2 per token at fixed depth) once the "
        "matrices are big enough to run near the matmul peak; below that, with less.")
  return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Entry point


def run(spec: Spec, log: Callable[[str], None]) -> dict:
  res: dict[str, Any] = {"machine": common.machine_info()}
  with tempfile.TemporaryDirectory() as workdir:
    setup = make_setup(workdir)
  res["config"] = {**dataclasses.asdict(spec), "vocab_size": setup.tokenizer.vocab_size,
                   "seed": SEED, "lr": LR, "algorithm": "PolicyGradient(grpo)",
                   "reward": "exact-answer verifier + 0.5 * digit fraction"}
  known: dict[Shape, tuple[list, list]] = {}  # shape -> (wall, CPU) seconds of fused rounds
  rows, rounds = [], {}
  for label, shape, reps in spec.fused:
    log(f"fused vs split: {label} {dataclasses.asdict(shape)}")
    r = make_round(setup, shape, spec)
    row = fused_vs_split(r, label, spec, reps, log, probe=label == spec.mfu_label)
    log(f"  fused {row['fused_s']:.3f} s, split {row['split_s']:.3f} s, ratio {row['ratio']:.2f}")
    rows.append(row)
    rounds[label] = r
    known[shape] = (row["fused_times_s"], row["fused_cpu_s"])
  res["fused_vs_split"] = rows
  log(f"limits: training step MFU ({spec.mfu_label} model)")
  mfu_round = rounds[spec.mfu_label]
  train = training_limits(mfu_round, spec, log)
  mfu_row = next(r for r in rows if r["label"] == spec.mfu_label)
  res["limits"] = {"training_step": train, "round": round_limits(mfu_round, mfu_row, spec)}
  rounds.clear()
  res["decode_bandwidth"] = sampling_reference()
  log("scaling")
  res["scaling"] = scaling(setup, spec, known, log)
  res["loadavg_end"] = common.loadavg()
  res["notes"] = {"fused": fused_note(rows), "mfu": mfu_note(train, mfu_row["shape"]["width"]),
                  "scaling": scaling_note(res["scaling"]),
                  "fused_target_met": all(min(r["ratio"], r["ratio_cpu"]) >= 1.5 for r in rows),
                  "mfu_target_met_cpu_time": train["mfu_cpu"] >= 0.6,
                  "mfu_target_met_wall": train["mfu"] >= 0.6}
  return res


def main(argv: list[str] | None = None) -> int:
  args = common.arg_parser(__doc__).parse_args(argv)
  log = common.logger(NAME)
  res = common.timed_run(lambda: run(QUICK if args.quick else FULL, log))
  common.publish(NAME, NAME, res, render_docs, args.quick, args.out_dir, log)
  if not all(r["same_work"]["equal"] for r in res["fused_vs_split"]):
    log("ERROR: fused and split rounds disagree (see same_work in the results)")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
