"""SFT (masked NLL on the gold responses) and ReST-EM / STaR rejection-sampling fine-tuning."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.rows import Rows, gold_rows, rollout_rows


@dataclasses.dataclass(frozen=True)
class SFT:
  """Supervised fine-tuning on the data batch's gold responses; no sampling, no reference."""

  name: str = "sft"
  normalize: str = "token"  # token: mean over all response tokens; sequence: mean of row means
  samples: bool = False
  reference: str = "none"
  restart_from_base: bool = False

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    return gold_rows(batch)

  def loss(self, logp_BxT, rows: Rows):
    return losses.nll_loss(logp_BxT, rows["mask"], self.normalize), {}


@dataclasses.dataclass(frozen=True)
class RestEM:
  """ReST-EM / STaR: keep the samples whose reward reaches `threshold`, SFT on them.

  Rows whose sample failed get zero weight (static shapes: masked, not dropped). With
  `restart_from_base`, each round's updates start from the initial parameters (ReST-EM's
  "fine-tune the base model on the new data" each iteration) instead of the previous iterate.
  `max_per_prompt` caps how many correct samples of one prompt are kept (ReST-EM: ~10).

  `select="best"` keeps instead the single highest-reward sample of each prompt (best-of-N; with
  the self-likelihood as reward this is SFT-sharpening, Huang et al. 2025). NaN rewards never win.
  """

  name: str = "rest_em"
  group_size: int = 4
  threshold: float = 1.0
  max_per_prompt: int = 0  # 0 = keep all correct samples
  select: str = "threshold"  # threshold | best
  restart_from_base: bool = False
  samples: bool = True
  reference: str = "none"

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    rows = rollout_rows(rollout)
    if self.select == "best":
      scores = jnp.asarray(rewards, jnp.float32).reshape(-1, self.group_size)
      scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
      best = jnp.argmax(scores, axis=1)
      keep = (jnp.arange(self.group_size)[None] == best[:, None]) & jnp.isfinite(scores)
      rows["mask"] = rows["mask"] & keep.reshape(-1)[:, None]
      return rows
    keep = rewards >= self.threshold
    if self.max_per_prompt:
      keep_NxG = keep.reshape(-1, self.group_size)
      rank_NxG = jnp.cumsum(keep_NxG, axis=1)
      keep = (keep_NxG & (rank_NxG <= self.max_per_prompt)).reshape(-1)
    rows["mask"] = rows["mask"] & keep[:, None]
    return rows

  def loss(self, logp_BxT, rows: Rows):
    return losses.nll_loss(logp_BxT, rows["mask"], "token"), {
        "kept_fraction": jnp.mean(jnp.any(rows["mask"], axis=-1).astype(jnp.float32))}
