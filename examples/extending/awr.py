"""A new method outside the package: advantage-weighted regression (AWR) on the policy's samples.

Peng et al. 2019, "Advantage-Weighted Regression": regress the policy onto its own samples with
weights exp(A / beta), here with group-normalised advantages (as GRPO computes them) and the
weight clipped at `max_weight`. One frozen dataclass with `build` and `loss` is all the round needs;
`from_config` maps the config onto it. Run it with `config.py` in this folder:

  selfplay-jax train --config=examples/extending/config.py --workdir=runs/awr

This file also shows the two other extension points: a scorer (`make_length_scorer`: verifier
reward minus a length penalty) and a task (`make_reverse_task`: reverse a string of digits).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.spec import rollout_rows
from selfplay_jax.data import tasks


@dataclasses.dataclass(frozen=True)
class AdvantageWeightedSFT:
  """Weighted NLL of each sample, weight = min(exp(A / beta), max_weight), A group-normalised."""

  name: str = "awr"
  group_size: int = 4
  beta: float = 1.0
  max_weight: float = 20.0
  samples: bool = True  # the round samples `group_size` completions per prompt
  reference: str = "none"  # no reference model is kept
  restart_from_base: bool = False

  @classmethod
  def from_config(cls, cfg) -> AdvantageWeightedSFT:
    return cls(group_size=cfg.sampling.n, beta=cfg.algorithm.beta)

  def build(self, batch, rollout, rewards, logp):
    rows = rollout_rows(rollout)
    advantages = losses.grpo_advantages(jnp.nan_to_num(rewards), self.group_size)
    rows["weight"] = jnp.minimum(jnp.exp(advantages / self.beta), self.max_weight)
    return rows

  def loss(self, logp_BxT, rows):
    nll = -losses.masked_mean(logp_BxT, rows["mask"], axis=-1)  # per sample, token-averaged
    loss = jnp.mean(rows["weight"] * nll)
    return loss, {"awr_weight_mean": jnp.mean(rows["weight"])}


def make_length_scorer(cfg, model_config, tokenizer, task):
  """Scorer: the task verifier's reward minus `0.01` per completion token (prefers short answers)."""
  del model_config
  verify = task.make_verifier(tokenizer)
  n = cfg.sampling.n

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del sample_params, ref_params, rng
    rep = lambda x: jnp.repeat(x, n, axis=0)
    correct = verify(rollout.tokens, rollout.mask, rep(batch["answer_tokens"]),
                     rep(batch["answer_mask"]))
    penalty = 0.01 * rollout.lengths.astype(jnp.float32)
    return correct - penalty, {"scorer/length_penalty": jnp.mean(penalty)}

  return scorer


@dataclasses.dataclass(frozen=True)
class ReverseTask(tasks.Task):
  """Reverse a string of `length` digits: "rev 3 1 4=" -> "#### 4 1 3"."""

  name: ClassVar[str] = "reverse"
  symbols: ClassVar[tuple[str, ...]] = tasks.DIGITS + (tasks.ANSWER_MARKER, "=")
  length: int = 3
  heldout_fraction: float = 0.1

  def _sample(self, rng):
    return tuple(int(d) for d in rng.integers(0, 10, size=self.length))

  def _key(self, problem):
    return "".join(map(str, problem))

  def _render(self, problem):
    answer = "".join(map(str, reversed(problem)))
    return {"prompt": f"rev {''.join(map(str, problem))}=",
            "response": f"{tasks.ANSWER_MARKER}{answer}", "answer": answer}

  def _num_problems(self):
    return 10**self.length


def make_reverse_task(cfg) -> ReverseTask:
  return ReverseTask(length=cfg.data.difficulty)
