"""What an algorithm is to the round engine: a small, hashable spec (not a trainer class).

The round calls, inside one jit:
  rows = spec.build(batch, rollout, rewards, logp)   # training rows + per-row targets
  loss, aux = spec.loss(logp_BxT, minibatch)         # for each of the K optimizer steps
and moves the reference as `spec.reference` says.

`logp` gives lazily computed completion log-probs: `logp.old(rows)` under the parameters that
sampled the round (`sample_from`), `logp.ref(rows)` under the reference parameters. Rows are dicts of arrays with
a leading row axis and at least `prompt_tokens`, `prompt_mask`, `tokens`, `mask` (completion).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax

from selfplay_jax.rows import Rows, gold_rows, rollout_rows  # noqa: F401 (re-exported)

REFERENCES = ("frozen", "previous", "none")


@dataclasses.dataclass(frozen=True)
class LogProbs:
  old: Callable[[Rows], jax.Array]
  ref: Callable[[Rows], jax.Array]
  # The spec's own `forward` (see below) under the sampler's params, frozen and in chunks like
  # `old`; None for a spec without one. PPO reads its old log-probs and old values here.
  old_forward: Callable[[Rows], Any] | None = None


class Spec(Protocol):
  """What the round reads of a spec. Required: the fields and methods without a default below.
  Optional ones (read with `option(spec, name)`, default in `OPTIONAL`) change how the round
  runs: who samples, when a "previous" reference moves, and a replay slot of earlier pairs."""

  name: str
  samples: bool  # does the round sample (and score) completions?
  reference: str  # frozen | previous | none: which reference params the state keeps
  restart_from_base: bool  # reset params to the initial ones before each round's updates
  # Optional (see OPTIONAL):
  #   sample_from: str      "policy" | "reference": whose params sample, are scored and give
  #                         logp.old
  #   reference_every: int  a "previous" reference moves to the policy every N rounds (an
  #                         iteration), counted from the start of the phase
  #   beta_schedule: tuple  the β of each iteration (the last one repeats); the round writes the
  #                         current one into the rows as `beta` [R]
  #   ref_sync_every: int, ref_sync_alpha: float  a "frozen" reference becomes
  #                         alpha·params + (1 − alpha)·ref every N rounds of the phase (TR-DPO)
  #   replay: bool          the state keeps last iteration's pairs; then the spec also has
  #                         pair_rows(batch, rollout, rewards) -> Rows (this round's pairs, no
  #                         log-probs) and annotate(rows, logp) -> Rows (adds the log-probs)
  #   forward(model_config, params, rows) -> what `loss` gets as its first argument: the
  #                         training forward of a minibatch (default: completion log-probs
  #                         [R, N], `models.logprobs.completion_logprobs`); a spec that also
  #                         needs entropies or values returns them here (a tuple or dict)
  #   init_params(params) -> params   the spec's own trainable params added beside the model's
  #                         when the state is made (PPO's value head / critic); they ride in
  #                         `state.params` (optimizer, sharding, checkpoints), export drops them
  #   after_warmup(params) -> params  called by the training loop once the SFT warm-up ends
  #                         (PPO's separate critic copies the warmed-up policy trunk)
  #   temperature: float    the T of the frozen old / reference log-probs and of the default
  #                         training forward (logits / T; the PG family: sampling.temperature)
  #   needs_round: bool     the round adds `batch["phase_round"]` (the phase's 1-based round,
  #                         one per prompt) before `build` (SCoRe's stage)
  #   attempts: int         2: the round samples a two-attempt episode (`round.two_attempts`),
  #                         `build` gets a `TwoAttempts` and rewards [R, 2] (SCoRe)
  #   correction / pad_id / repeat_prompt   with attempts=2: the correction instruction's
  #                         token ids, the filler, whether the prompt follows the instruction
  #   search: SearchConfig  the round runs the tree search (`tree_search.tree_search`, ReST-MCTS*)
  #                         instead of plain sampling; `build` gets its `SearchOut` and no
  #                         rewards; with `search.value_weight` > 0 the spec also has
  #                         value_fn(model_config) (the value head at a child's free slot)

  def build(self, batch: Rows, rollout: Any, rewards: jax.Array | None, logp: LogProbs) -> Rows:
    ...

  def loss(self, logp_BxT: jax.Array, rows: Rows) -> tuple[jax.Array, dict[str, jax.Array]]:
    ...


OPTIONAL = {"sample_from": "policy", "reference_every": 1, "replay": False, "forward": None,
            "beta_schedule": (), "ref_sync_every": 0, "ref_sync_alpha": 0.0,
            "init_params": None, "after_warmup": None,  # PPO's value head (algorithms/ppo.py)
            "temperature": 1.0, "needs_round": False, "attempts": 1, "correction": (),
            "pad_id": 0, "repeat_prompt": False, "search": None}


def option(spec: Spec, name: str) -> Any:
  """An optional spec field, or its default (`OPTIONAL`)."""
  return getattr(spec, name, OPTIONAL[name])
