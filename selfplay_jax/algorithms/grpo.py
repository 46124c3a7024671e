"""The policy-gradient family on group samples: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ (and
RL-sharpening: the same losses with the self-likelihood as reward).

Rows are the round's rollouts (G = `group_size` contiguous samples per prompt). `lp_old` is the
log-prob under the parameters that sampled the round, recomputed with a forward pass so that the
first update's ratio is exactly 1; several updates per round (epochs x minibatches) then use
clipped importance ratios. With one update per round the round skips that pass and the update
reads `old_logp` from its own forward (`round.train_steps(fresh_rows=...)`), the same loss. All of the family's log-probs (training, old, reference) are taken
under logits / `temperature`, the sampling temperature (TRL's GRPO).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.losses import (ADVANTAGES, IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS,
                                            PG_LOSS_TYPES, SCALE_REWARDS)
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.models.logprobs import completion_logprobs, completion_logprobs_and_entropy
from selfplay_jax.rows import Rows, rollout_rows


@dataclasses.dataclass(frozen=True)
class PolicyGradient:
  """One spec for the family; `configs/grpo.py` etc. pick the fields.

  loss_type: grpo | bnpo | dr_grpo | dapo | cispo (token aggregation and CISPO's capped IS
    weight, see `losses.policy_gradient_loss`)
  advantage: grpo (group-normalised) | dr_grpo (group-centred) | rloo (leave-one-out, sequence
    ratio) | reinforce_pp | reinforce_pp_baseline (KL-shaped return-to-go, batch whitened)
  scale_rewards: the grpo advantage's std normaliser, group | batch | none ("" = the advantage's
    own: group for grpo, none for dr_grpo).
  dynamic_filter: DAPO's dynamic sampling, as a mask: groups whose raw rewards (before the
    overlong shaping: the verifier's accuracy under a verifier reward) are all equal are dropped.
  overlong_buffer: DAPO soft overlong penalty buffer (tokens); 0 = off.
  kl_kind / reward_kl_kind: KL estimator of the in-loss penalty / of the KL-shaped rewards (RLOO,
    REINFORCE++).
  temperature: the log-probs' T (logits / T), the sampling temperature (1 when greedy).
  importance_sampling_level: token | sequence (GSPO: one length-normalised ratio per row).
  delta: two-sided clipping, the unclipped ratio is capped at delta (0 = off).
  entropy_coef: loss −= coef · mean token entropy of softmax(logits / T) (trained tokens).
  top_entropy_quantile: train only the minibatch's top-quantile tokens by entropy (1 = all).
  mask_truncated_completions: rows that hit the token budget without a stop token get no loss.
  Unscorable (NaN) rewards are left out of the group / batch statistics and get advantage 0.
  """

  name: str = "grpo"
  group_size: int = 4
  loss_type: str = "grpo"
  advantage: str = "grpo"
  clip_low: float = 0.2
  clip_high: float = 0.2
  kl_coef: float = 0.0
  kl_kind: str = "k3"
  reward_kl_kind: str = "k1"
  scale_rewards: str = ""
  temperature: float = 1.0
  importance_sampling_level: str = "token"
  delta: float = 0.0
  entropy_coef: float = 0.0
  top_entropy_quantile: float = 1.0
  mask_truncated_completions: bool = False
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
    if self.scale_rewards not in ("",) + SCALE_REWARDS:
      raise ValueError(f"algorithm.scale_rewards: {self.scale_rewards!r} is not one of "
                       f"{SCALE_REWARDS}")
    if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
      raise ValueError(f"algorithm.importance_sampling_level: {self.importance_sampling_level!r} "
                       f"is not one of {IMPORTANCE_SAMPLING_LEVELS}")
    for kind in (self.kl_kind, self.reward_kl_kind):
      if kind not in KL_ESTIMATORS:
        raise ValueError(f"algorithm.kl_estimator: {kind!r} is not one of {KL_ESTIMATORS}")

  @property
  def needs_ref(self) -> bool:
    return self.kl_coef > 0

  @property
  def needs_entropy(self) -> bool:
    return self.entropy_coef > 0 or self.top_entropy_quantile < 1.0

  def forward(self, model_config, params, rows: Rows):
    """The training forward: completion log-probs under logits / T, with the per-token entropies
    (`{"logp", "entropy"}`) when an entropy bonus or entropy mask needs them. The entropies carry
    a gradient only for the bonus."""
    if not self.needs_entropy:
      return completion_logprobs(model_config, params, rows, temperature=self.temperature)
    logp, entropy = completion_logprobs_and_entropy(model_config, params, rows,
                                                    temperature=self.temperature)
    if not self.entropy_coef:
      entropy = jax.lax.stop_gradient(entropy)
    return {"logp": logp, "entropy": entropy}

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    rows = rollout_rows(rollout)
    raw = rewards.astype(jnp.float32)  # NaN: unscorable (a judge's invalid score), advantage 0
    rewards = raw
    if self.overlong_buffer:
      rewards = rewards + losses.overlong_penalty(rollout.lengths, self.max_completion_len,
                                                  self.overlong_buffer)
    old = logp.old(rows)
    rows["old_logp"] = old
    if self.needs_ref:
      rows["ref_logp"] = logp.ref(rows)
    g = self.group_size
    if self.advantage in ("grpo", "dr_grpo"):
      own = "group" if self.advantage == "grpo" else "none"
      adv = losses.grpo_advantages(rewards, g, scale=self.scale_rewards or own)
    elif self.advantage == "rloo":
      shaped = (losses.kl_penalized_rewards(rewards, old, rows["ref_logp"], rows["mask"],
                                            self.kl_coef, kind=self.reward_kl_kind)
                if self.needs_ref else rewards)
      adv = losses.rloo_advantages(shaped, g)
    else:
      ref = rows["ref_logp"] if self.needs_ref else old
      adv = losses.reinforce_pp_advantages(
          rewards, old, ref, rows["mask"], kl_coef=self.kl_coef, kl_kind=self.reward_kl_kind,
          baseline=self.advantage == "reinforce_pp_baseline", group_size=g)
    rows["advantages"] = adv
    if self.dynamic_filter:  # on accuracy: the raw rewards, before the overlong shaping (DAPO)
      keep = losses.dapo_group_filter(raw, g)
      rows["mask"] = rows["mask"] & keep[:, None]
    if self.mask_truncated_completions:
      rows["mask"] = rows["mask"] & ~truncated(rollout)[:, None]
    return rows

  def loss(self, out, rows: Rows):
    """`out`: this spec's `forward` (log-probs [R, N], or `{"logp", "entropy"}`); plain log-probs
    (e.g. `completion_logprobs`) also work when no entropy term is configured."""
    logp_BxT, entropy_BxT = (out["logp"], out["entropy"]) if isinstance(out, dict) else (out, None)
    if self.needs_entropy and entropy_BxT is None:
      raise ValueError("entropy_coef / top_entropy_quantile need the entropies of `forward`")
    mask = rows["mask"]
    policy_mask = None
    if self.top_entropy_quantile < 1.0:
      policy_mask = losses.high_entropy_mask(entropy_BxT, mask, self.top_entropy_quantile)
    if self.advantage == "rloo":
      loss, aux = losses.rloo_loss(logp_BxT, rows["old_logp"], rows["advantages"], mask,
                                   clip_low=self.clip_low, clip_high=self.clip_high)
    else:
      # REINFORCE++ folds its KL into the advantages; the others add it to the per-token loss.
      in_loss_kl = self.needs_ref and not self.advantage.startswith("reinforce_pp")
      loss, aux = losses.policy_gradient_loss(
          logp_BxT, rows["old_logp"], rows["advantages"], mask, clip_low=self.clip_low,
          clip_high=self.clip_high, loss_type=self.loss_type,
          max_completion_len=self.max_completion_len or None,
          ref_logp_BxT=rows.get("ref_logp") if in_loss_kl else None, kl_coef=self.kl_coef,
          kl_kind=self.kl_kind, importance_sampling_level=self.importance_sampling_level,
          delta=self.delta, policy_mask_BxT=policy_mask)
    if self.entropy_coef:  # TRL: the bonus acts on the tokens the policy term trains
      trained = mask if policy_mask is None else policy_mask
      loss = loss - self.entropy_coef * losses.masked_mean(entropy_BxT, trained)
    return loss, aux


def truncated(rollout) -> jax.Array:
  """bool [R]: the completion hit the token budget without a stop token (`Rollout.truncated`;
  a hand-built rollout without it: every row whose length is the full width)."""
  if getattr(rollout, "truncated", None) is not None:
    return rollout.truncated
  return rollout.lengths >= rollout.tokens.shape[1]
