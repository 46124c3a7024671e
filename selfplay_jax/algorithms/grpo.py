"""The policy-gradient family on group samples: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ (and
RL-sharpening: the same losses with the self-likelihood as reward).

Rows are the round's rollouts (G = `group_size` contiguous samples per prompt). `lp_old` is the
log-prob under the parameters that sampled the round, recomputed with a forward pass so that the
first update's ratio is exactly 1; several updates per round (epochs x minibatches) then use
clipped importance ratios.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.losses import ADVANTAGES, PG_LOSS_TYPES
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.rows import Rows, rollout_rows


@dataclasses.dataclass(frozen=True)
class PolicyGradient:
  """One spec for the family; `configs/grpo.py` etc. pick the fields.

  loss_type: grpo | bnpo | dr_grpo | dapo (token aggregation, see `losses.policy_gradient_loss`)
  advantage: grpo (group-normalised) | dr_grpo (group-centred) | rloo (leave-one-out, sequence
    ratio) | reinforce_pp | reinforce_pp_baseline (KL-shaped return-to-go, batch whitened)
  dynamic_filter: DAPO's dynamic sampling, as a mask: groups with all-equal rewards are dropped.
  overlong_buffer: DAPO soft overlong penalty buffer (tokens); 0 = off.
  """

  name: str = "grpo"
  group_size: int = 4
  loss_type: str = "grpo"
  advantage: str = "grpo"
  clip_low: float = 0.2
  clip_high: float = 0.2
  kl_coef: float = 0.0
  kl_kind: str = "k3"
  dynamic_filter: bool = False
  overlong_buffer: int = 0
  max_completion_len: int = 0  # for dr_grpo's constant normaliser and overlong shaping
  samples: bool = True
  reference: str = "frozen"
  restart_from_base: bool = False

  def __post_init__(self):
    if self.advantage not in ADVANTAGES:
      raise ValueError(f"algorithm.advantage: {self.advantage!r} is not one of {ADVANTAGES}")
    if self.loss_type not in PG_LOSS_TYPES:
      raise ValueError(f"algorithm.loss_type: {self.loss_type!r} is not one of {PG_LOSS_TYPES}")

  @property
  def needs_ref(self) -> bool:
    return self.kl_coef > 0

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    rows = rollout_rows(rollout)
    rewards = jnp.nan_to_num(rewards.astype(jnp.float32))  # a judge's invalid score counts 0
    if self.overlong_buffer:
      rewards = rewards + losses.overlong_penalty(rollout.lengths, self.max_completion_len,
                                                  self.overlong_buffer)
    old = logp.old(rows)
    rows["old_logp"] = old
    if self.needs_ref:
      rows["ref_logp"] = logp.ref(rows)
    g = self.group_size
    if self.advantage in ("grpo", "dr_grpo"):
      adv = losses.grpo_advantages(rewards, g, scale=self.advantage == "grpo")
    elif self.advantage == "rloo":
      shaped = (losses.kl_penalized_rewards(rewards, old, rows["ref_logp"], rows["mask"], self.kl_coef)
                if self.needs_ref else rewards)
      adv = losses.rloo_advantages(shaped, g)
    else:
      ref = rows["ref_logp"] if self.needs_ref else old
      adv = losses.reinforce_pp_advantages(
          rewards, old, ref, rows["mask"], kl_coef=self.kl_coef, kl_kind="k1",
          baseline=self.advantage == "reinforce_pp_baseline", group_size=g)
    rows["advantages"] = adv
    if self.dynamic_filter:
      keep = losses.dapo_group_filter(rewards, g)
      rows["mask"] = rows["mask"] & keep[:, None]
    return rows

  def loss(self, logp_BxT, rows: Rows):
    if self.advantage == "rloo":
      return losses.rloo_loss(logp_BxT, rows["old_logp"], rows["advantages"], rows["mask"],
                              clip_low=self.clip_low, clip_high=self.clip_high)
    # REINFORCE++ folds its KL into the advantages; the others add it to the per-token loss.
    in_loss_kl = self.needs_ref and not self.advantage.startswith("reinforce_pp")
    return losses.policy_gradient_loss(
        logp_BxT, rows["old_logp"], rows["advantages"], rows["mask"], clip_low=self.clip_low,
        clip_high=self.clip_high, loss_type=self.loss_type,
        max_completion_len=self.max_completion_len or None,
        ref_logp_BxT=rows.get("ref_logp") if in_loss_kl else None, kl_coef=self.kl_coef,
        kl_kind=self.kl_kind)
