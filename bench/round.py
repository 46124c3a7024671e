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
from bench.common import Log
from bench.render import round as render
from bench.round_limits import non_embedding_params, round_flops, round_limits, training_limits
from bench.timing import Clock, clocked, matmul_probe

NAME = "round"
SEED = 0
LR = 1e-4  # Adam learning rate of every update step

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


class Split:
  """The fused round's work as separate jitted calls, each result fetched to the host: the round
  engine's own pieces (`round.build_rows`, `round.minibatches`, `round.update_step`), with sampling
  and scoring apart and one call per update step."""

  PHASES = ("sample", "score", "build", "shuffle", "update")

  def __init__(self, config, alg, optimizer, sampling_config, score, minibatches: int):
    from selfplay_jax import round as rnd
    from selfplay_jax import sampling
    from selfplay_jax.models.logprobs import completion_logprobs
    self.n, self.minibatches = sampling_config.n, minibatches
    self.keys = jax.jit(lambda rng: tuple(jax.random.split(rng, 3)))
    self.sample = lambda params, tokens, mask, rng: sampling.sample(config, params, tokens, mask, rng,
                                                                     sampling_config)
    self.score = jax.jit(score)
    self.build = jax.jit(lambda params, ref_params, batch, rollout, rewards: rnd.build_rows(
        config, alg, batch, rollout, rewards, sampler_params=params, ref_params=ref_params,
        replay=None, replay_moves=False, num_chunks=minibatches)[0])
    self.shuffle = jax.jit(functools.partial(rnd.minibatches, num_epochs=1,
                                             num_minibatches=minibatches))
    logp = lambda params, rows: completion_logprobs(config, params, rows)
    self.update = jax.jit(rnd.update_step(alg, optimizer, logp), donate_argnums=0)

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
    carry, steps = (state.params, state.opt_state, state.bad_updates), []
    for i in range(self.minibatches):
      carry, m = self.update(carry, jax.tree.map(lambda x: x[i], minibatches))
      steps.append(jax.device_get(m))  # a trainer logs each step
    lap("update")
    mask = rollout.mask
    metrics = {
        "train/accuracy": float(np.mean(rewards >= 1.0)),
        "train/reward_mean": float(np.nanmean(rewards)),
        "train/reward_std": float(np.nanstd(rewards)),
        "train/completion_len": float(np.mean(rollout.lengths)),
        "train/entropy": float(np.sum(rollout.entropy * mask) / max(mask.sum(), 1)),
        "train/loss": float(np.mean([s["loss"] for s in steps])),
        "train/grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
        "samples/tokens": rollout.tokens,
    }
    return carry[0], metrics, phases


COMPARED = ("train/accuracy", "train/reward_mean", "train/reward_std", "train/completion_len",
            "train/entropy", "train/loss", "train/grad_norm")


def run_fused(r: Round, state) -> tuple[Any, dict]:
  state, metrics = r.fused(state, r.batch)
  metrics = jax.device_get(metrics)  # a training loop reads them
  return jax.block_until_ready(state.params), metrics


def run_split(r: Round, state) -> tuple[Any, dict, dict]:
  params, metrics, phases = r.split(state, r.batch)
  return jax.block_until_ready(params), metrics, phases


def timed_round(r: Round, fn: Callable) -> tuple[Clock, Any]:
  """`fn(r, state)` on a fresh copy of the initial state (made outside the timer)."""
  state = jax.block_until_ready(r.fresh_state())
  return clocked(lambda: fn(r, state))


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
# Entry point


def run(spec: Spec, log: Log) -> dict:
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
  mfu_row = next(r for r in rows if r["label"] == spec.mfu_label)
  res["limits"] = {"training_step": training_limits(mfu_round, spec, log),
                   "round": round_limits(mfu_round, mfu_row, spec)}
  rounds.clear()
  res["decode_bandwidth"] = sampling_reference()
  log("scaling")
  res["scaling"] = scaling(setup, spec, known, log)
  res["loadavg_end"] = common.loadavg()
  return res


def different_work(res: dict) -> str | None:
  """Why the run failed: the fused and split rounds did not do the same work."""
  if all(r["same_work"]["equal"] for r in res["fused_vs_split"]):
    return None
  return "fused and split rounds disagree (see same_work in the results)"


BENCHMARK = common.Benchmark(
    name=NAME, section=NAME, doc=__doc__, render=render.render, failure=different_work,
    measure=lambda args, log: run(QUICK if args.quick else FULL, log))


if __name__ == "__main__":
  sys.exit(common.main(BENCHMARK))
