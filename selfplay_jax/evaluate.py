"""Held-out evaluation: greedy accuracy and pass@k; `selfplay-jax eval --workdir=W` on a finished run.

The run is rebuilt by the composition root (`setup.py`), so evaluation restores exactly the state
layout training saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from selfplay_jax import checkpoint, run_config, sampling, setup, sharding
from selfplay_jax.data import pipeline
from selfplay_jax.errors import CheckpointNotFoundError


# ---- metrics -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _solved(mc, params, batch, verify, rng, sc: sampling.SamplingConfig):
  """(examples with at least one verified sample, valid examples) of one batch, as global sums."""
  out = sampling.sample(mc, params, batch["prompt_tokens"], batch["prompt_mask"], rng, sc)
  rep = lambda x: jnp.repeat(x, sc.n, axis=0)
  r = verify(out.tokens, out.mask, rep(batch["answer_tokens"]), rep(batch["answer_mask"]))
  any_ok = (r.reshape(-1, sc.n) >= 1.0).any(axis=1)
  valid = batch["valid"].astype(jnp.float32)
  return jnp.sum(any_ok * valid), jnp.sum(valid)


def pass_rates(mc, params, batches, verify, sc: sampling.SamplingConfig, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, rules=None) -> float:
  """Fraction of examples with at least one of `sc.n` samples verified correct (pass@n); with
  `temperature=0, n=1` this is greedy accuracy. Each example counts once (`valid` masks padding).

  With a `mesh`, `batches` hold this process's rows (`pipeline.eval_batches` shards them) and
  are sampled sharded over the mesh's batch axes; the counts are summed over all processes."""
  solved = total = 0.0
  context = (sharding.activation_rules(mesh, rules or sharding.DEFAULT_RULES) if mesh is not None
             else contextlib.nullcontext())
  with context:
    for i, b in enumerate(batches):
      b = sharding.global_batch(b, mesh) if mesh is not None else b
      s, t = _solved(mc, params, b, verify, jax.random.fold_in(jax.random.key(seed), i), sc)
      solved += float(s)
      total += float(t)
  return solved / max(total, 1.0)


def greedy_accuracy(mc, params, batches, verify, eos_ids, max_new_tokens: int,
                    mesh: jax.sharding.Mesh | None = None, rules=None) -> float:
  sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=tuple(eos_ids))
  return pass_rates(mc, params, batches, verify, sc, mesh=mesh, rules=rules)


# ---- `selfplay-jax eval` -------------------------------------------------------------------------


def require_checkpoint(workdir: Path) -> None:
  """`CheckpointNotFoundError` when `workdir` has no complete checkpoint, before anything (an
  empty `checkpoints/`, Orbax's background threads) is created."""
  if not checkpoint.complete_steps(workdir):
    raise CheckpointNotFoundError(f"no complete checkpoint in {workdir / 'checkpoints'}: the run "
                                  "saved none yet (see checkpoint.every_rounds)")


def evaluate_workdir(workdir: str | Path, *, step: int | None = None, k: int = 8,
                     num_examples: int | None = None) -> dict[str, float]:
  """Greedy held-out accuracy and pass@k of a run's checkpoint (default: the newest)."""
  workdir = Path(workdir)
  cfg = run_config.load_run_config(workdir)
  require_checkpoint(workdir)
  run = setup.build(cfg, workdir)
  task, tok, mc = run.task, run.tokenizer, run.model_config
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, _, _, _ = ckpt.restore(step, abstract_state=run.abstract_state())
    used = ckpt.restored_step
  if num_examples is None:
    num_examples = cfg.eval.num_examples
  batches = pipeline.eval_batches(task, "heldout", num_examples, tokenizer=tok,
                                  batch_size=cfg.eval.batch_size, **setup.data_lengths(cfg))
  verify = task.make_verifier(tok)
  n_new = cfg.sampling.max_new_tokens
  result = {"round": float(used),
            "eval/accuracy": greedy_accuracy(mc, state.params, batches, verify, tok.eos_ids, n_new)}
  if k > 0:
    sc = setup.sampling_config(cfg, tok, n=k)
    sc = dataclasses.replace(sc, temperature=sc.temperature or 1.0)  # sampled even if T = 0
    result[f"eval/pass@{k}"] = pass_rates(mc, state.params, batches, verify, sc, seed=cfg.seed)
  return result
