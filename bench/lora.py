"""LoRA vs full fine-tuning: optimizer memory and update time on one Llama-shaped model.

  python -m bench.lora            # width 1024 (docs section `lora`, results/lora.json)
  python -m bench.lora --quick    # width 128, harness check (results/lora_quick.json only)

Both sides run the training step as the round does (`round.train_steps`, one GRPO minibatch,
AdamW): full fine-tuning differentiates and updates every weight; LoRA (rank 8, alpha 16, on all
seven projections, `models/lora.py`) differentiates and updates the adapters only, the base a
constant. Measured in one process, calls interleaved (one full step, one LoRA step, ...): the
median update time of each (wall and process CPU) and their ratio; the bytes of the optimizer
state (`optimizer.init` of what trains), of the parameters, and of one round's checkpoint of the
state (`lora.saved_state`: without the base weights).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from bench import common
from bench.round_limits import random_rows
from bench.timing import clocked, interleaved

SEED = 0
RANK, ALPHA = 8, 16.0
FULL = dict(hidden_size=1024, intermediate_size=2816, num_layers=2, num_heads=16, num_kv_heads=8,
            head_dim=64, vocab_size=4096, rows=8, prompt_len=32, completion_len=96, reps=5)
QUICK = dict(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=32, vocab_size=512, rows=4, prompt_len=8, completion_len=16, reps=2)


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure(args, log) -> dict:
  from selfplay_jax import checkpoint, config_lib, models, optim
  from selfplay_jax import round as rnd
  from selfplay_jax.algorithms.grpo import PolicyGradient
  from selfplay_jax.models import lora
  from selfplay_jax.models.logprobs import completion_logprobs

  shape = QUICK if args.quick else FULL
  base = models.ModelConfig(**{k: shape[k] for k in ("hidden_size", "intermediate_size",
                                                     "num_layers", "num_heads", "num_kv_heads",
                                                     "head_dim", "vocab_size")}).validate()
  configs = {"full": base, "lora": lora.with_lora(base, RANK, ALPHA, list(lora.TARGETS))}
  spec = PolicyGradient(group_size=2)
  # The run's optimizer as configs/default.py builds it (global-norm clipping, AdamW).
  optimizer = optim.build_optimizer(config_lib.load_config(str(config_lib.default_config_path())))
  rows = random_rows(base, shape["rows"], shape["prompt_len"], shape["completion_len"])
  sides, sizes = {}, {}
  for name, mc in configs.items():
    params = models.init_params(mc, jax.random.key(SEED))
    state = rnd.init_state(params, optimizer, spec, jax.random.key(SEED))
    trainable = lora.trainable(state.params)
    sizes[name] = {
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable))),
        "param_bytes": _nbytes(state.params),
        "optimizer_bytes": _nbytes(state.opt_state),
        "checkpoint_bytes": checkpoint.state_nbytes(lora.saved_state(state)),
    }
    logp = lambda p, mb, mc=mc: completion_logprobs(mc, p, mb)
    step = jax.jit(lambda p, o, mb: rnd.train_steps(spec, optimizer, logp, p, o,
                                                    jnp.zeros((), jnp.int32), mb,
                                                    jax.random.key(1))[:2], donate_argnums=(0, 1))
    held = {"carry": (state.params, state.opt_state)}

    def run(step=step, held=held):
      held["carry"] = step(*held["carry"], rows)
      jax.block_until_ready(held["carry"])

    first, _ = clocked(run)
    log(f"{name}: compiled and ran the first step in {first.wall:.1f} s")
    sides[name] = run
  cpu = {name: [] for name in sides}

  def cpu_timed(name, fn):
    def call():
      clock, _ = clocked(fn)
      cpu[name].append(clock.cpu)
    return call

  timings = interleaved({name: cpu_timed(name, fn) for name, fn in sides.items()},
                        reps=shape["reps"], warmup=1)
  for name in sides:
    cpu[name] = cpu[name][1:]  # the warm-up call's
  times = {name: {"times_s": timings[f"{name}_times_s"],
                  "median_s": timings[f"{name}_median_s"],
                  "cpu_times_s": cpu[name], "cpu_median_s": statistics.median(cpu[name]),
                  "other_processes_cores": timings[f"{name}_other_processes_cores"]}
           for name in sides}
  return {
      "quick": bool(args.quick),
      "config": {**shape, "rank": RANK, "alpha": ALPHA, "targets": list(lora.TARGETS),
                 "optimizer": "configs/default.py's (clip 1.0, adamw)", "algorithm": "PolicyGradient(grpo)", "seed": SEED,
                 "base_params": base.num_params(), "tokens_per_step": shape["rows"] * (
                     shape["prompt_len"] + shape["completion_len"] - 1)},
      "sizes": sizes,
      "times": times,
      "optimizer_bytes_ratio": sizes["full"]["optimizer_bytes"] / sizes["lora"]["optimizer_bytes"],
      "checkpoint_bytes_ratio": sizes["full"]["checkpoint_bytes"] / sizes["lora"]["checkpoint_bytes"],
      "update_time_ratio": times["lora"]["median_s"] / times["full"]["median_s"],
      "update_cpu_ratio": times["lora"]["cpu_median_s"] / times["full"]["cpu_median_s"],
      "machine": common.machine_info(),
  }


def _render(res: dict) -> str:
  from bench.render.lora import render
  return render(res)


BENCHMARK = common.Benchmark(name="lora", section="lora", doc=__doc__, measure=measure,
                             render=_render)

if __name__ == "__main__":
  raise SystemExit(common.main(BENCHMARK))
