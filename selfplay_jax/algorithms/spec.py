"""What an algorithm is to the round engine: a small, hashable spec (not a trainer class).

The round calls, inside one jit:
  rows = spec.build(batch, rollout, rewards, logp)   # training rows + per-row targets
  loss, aux = spec.loss(logp_BxT, minibatch)         # for each of the K optimizer steps
and moves the reference as `spec.reference` says.

`logp` gives lazily computed completion log-probs: `logp.old(rows)` under the parameters that
sampled the round, `logp.ref(rows)` under the reference parameters. Rows are dicts of arrays with
a leading row axis and at least `prompt_tokens`, `prompt_mask`, `tokens`, `mask` (completion).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax

Rows = dict[str, jax.Array]
REFERENCES = ("frozen", "previous", "none")


@dataclasses.dataclass(frozen=True)
class LogProbs:
  old: Callable[[Rows], jax.Array]
  ref: Callable[[Rows], jax.Array]


class Spec(Protocol):
  name: str
  samples: bool  # does the round sample from the policy?
  reference: str  # frozen | previous | none
  restart_from_base: bool  # reset params to the initial ones before each round's updates

  def build(self, batch: Rows, rollout: Any, rewards: jax.Array | None, logp: LogProbs) -> Rows:
    ...

  def loss(self, logp_BxT: jax.Array, rows: Rows) -> tuple[jax.Array, dict[str, jax.Array]]:
    ...


def rollout_rows(rollout) -> Rows:
  """The common row fields of a sampled round."""
  return {"prompt_tokens": rollout.prompt_tokens, "prompt_mask": rollout.prompt_mask,
          "tokens": rollout.tokens, "mask": rollout.mask}


def gold_rows(batch: Rows) -> Rows:
  """Rows of the gold responses in the data batch (SFT, SPIN's chosen side)."""
  return {"prompt_tokens": batch["prompt_tokens"], "prompt_mask": batch["prompt_mask"],
          "tokens": batch["response_tokens"], "mask": batch["response_mask"]}
