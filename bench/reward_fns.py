"""Python reward functions' cost: the host callback's share of a demo-sized GRPO round.

  python -m bench.reward_fns           # full run (~3 min): results/reward_fns.json + docs section
  python -m bench.reward_fns --quick   # tiny harness check (< 60 s): results/reward_fns_quick.json

The demo's round (configs/default.py: the tiny model, 64 prompts x 8 samples of up to 32 tokens,
2-digit step-by-step addition), after the demo's SFT warm-up so the completions look like the
ones a run scores, is run with three rewards: the task's jitted verifier (no callback), a trivial
Python function (TRL's length-style reward: the callback's fixed cost of shipping tokens, decoding
and looking up rows) and the built-in `math` reward (math-verify on every completion). Each round
reports its callback's host time (`time/reward_fns_s`), so the share of the round spent in the
callback is measured in the same rounds; rounds of the three rewards are interleaved, so machine
noise hits them alike. Target: the math reward's callback < 10% of the round.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench import common
from bench.common import Log
from bench.render import reward_fns as render

NAME = "reward_fns"
TARGET = 0.10  # the math reward's callback: at most this share of a round

# A TRL-style reward over strings: its cost is the callback's own.
LENGTH_REWARD = '''
def length_reward(prompts, completions, **fields):
  return [-len(c) / 100 for c in completions]
'''


@dataclasses.dataclass(frozen=True)
class Spec:
  overrides: tuple[str, ...]  # on top of configs/default.py
  warmup_rounds: int  # SFT rounds before the measured rounds (the demo's warm-up)
  reps: int  # measured rounds per reward


FULL = Spec(overrides=(), warmup_rounds=110, reps=15)
QUICK = Spec(overrides=("data.batch_size=4", "sampling.n=2", "sampling.max_new_tokens=8",
                        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1"),
             warmup_rounds=2, reps=2)


def _config(spec: Spec, *extra: str):
  from selfplay_jax import config_lib, config_validation
  cfg = config_lib.load_config(str(config_lib.default_config_path()),
                               list(spec.overrides) + ["progress_bar=false", *extra])
  config_validation.validate(cfg)
  return cfg


def measure(args: argparse.Namespace, log: Log) -> dict:
  from selfplay_jax import setup
  from selfplay_jax.data import pipeline
  spec = QUICK if args.quick else FULL
  res: dict[str, Any] = {"machine": common.machine_info()}
  with tempfile.TemporaryDirectory() as workdir:
    user = Path(workdir) / "rewards.py"
    user.write_text(LENGTH_REWARD)
    rewards = {"verifier": (), "python": (f"algorithm.reward_fn={user}:length_reward",),
               "math": ("algorithm.reward=math",)}
    runs = {name: setup.build(_config(spec, *extra), workdir) for name, extra in rewards.items()}
    base = runs["verifier"]
    cfg = base.cfg
    res["config"] = {"overrides": list(spec.overrides), "warmup_rounds": spec.warmup_rounds,
                     "reps": spec.reps, "prompts": cfg.data.batch_size, "n": cfg.sampling.n,
                     "rows": cfg.data.batch_size * cfg.sampling.n,
                     "max_new_tokens": cfg.sampling.max_new_tokens,
                     "model": cfg.model.preset, "params": base.model_config.num_params(),
                     "task": cfg.data.task, "rewards": {k: list(v) for k, v in rewards.items()}}
    data = pipeline.make_iterator(base.train_source(), tokenizer=base.tokenizer,
                                  batch_size=cfg.data.batch_size, seed=cfg.seed,
                                  **setup.data_lengths(cfg))
    log(f"warm-up: {spec.warmup_rounds} SFT rounds")
    state = base.initial_state()
    warm = base.round_fn(warmup=True)
    for _ in range(spec.warmup_rounds):
      state, _ = warm(state, next(data))
    jax.block_until_ready(state)
    batches = [next(data) for _ in range(spec.reps)]
    fns = {name: run.round_fn() for name, run in runs.items()}
    states = {name: jax.tree.map(jnp.copy, state) for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    callback: dict[str, list[float]] = {name: [] for name in runs}
    first: dict[str, float] = {}
    for name, fn in fns.items():  # compile (the first call), on the first batch
      start = time.perf_counter()
      out = jax.block_until_ready(fn(jax.tree.map(jnp.copy, state), batches[0]))
      first[name] = time.perf_counter() - start
      del out
      log(f"  {name}: first call {first[name]:.1f} s")
    for i, batch in enumerate(batches):
      order = list(fns) if i % 2 == 0 else list(fns)[::-1]
      for name in order:
        start = time.perf_counter()
        states[name], metrics = jax.block_until_ready(fns[name](states[name], batch))
        times[name].append(time.perf_counter() - start)
        host = jax.device_get(metrics)
        callback[name].append(float(host.get("time/reward_fns_s", 0.0)))
        if host.get("reward/errors"):
          raise RuntimeError(f"{name}: {runs[name].scorer.host.error}")
  rows = []
  verifier_s = statistics.median(times["verifier"])
  for name in runs:
    round_s = statistics.median(times[name])
    callback_s = statistics.median(callback[name])
    share = statistics.median(c / t for c, t in zip(callback[name], times[name]))
    rows.append({"reward": name, "round_times_s": times[name], "callback_times_s": callback[name],
                 "first_call_s": first[name], "round_s": round_s, "callback_s": callback_s,
                 "callback_share": share, "vs_verifier": round_s / verifier_s,
                 "callback_per_row_us": 1e6 * callback_s / res["config"]["rows"]})
    log(f"  {name}: round {round_s:.3f} s, callback {callback_s * 1e3:.1f} ms ({share:.1%})")
  res["rows"] = rows
  res["target_share"] = TARGET
  res["loadavg_end"] = common.loadavg()
  return res


def over_target(res: dict) -> str | None:
  math = next(r for r in res["rows"] if r["reward"] == "math")
  if math["callback_share"] <= res["target_share"]:
    return None
  return (f"the math reward's callback took {math['callback_share']:.1%} of the round "
          f"(target < {res['target_share']:.0%})")


BENCHMARK = common.Benchmark(name=NAME, section=NAME, doc=__doc__, measure=measure,
                             render=render.render, failure=over_target)

if __name__ == "__main__":
  raise SystemExit(common.main(BENCHMARK))
