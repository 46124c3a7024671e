"""The self-likelihood reward (sharpening, Huang et al. 2025)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfplay_jax.models.config import ModelConfig
from selfplay_jax.models.logprobs import completion_logprobs
from selfplay_jax.rows import Rows

NORMALIZE = ("sum", "mean")


def self_likelihood(config: ModelConfig, params, rows: Rows, normalize: str = "mean") -> jax.Array:
  """`log pi(y | x)` of each completion under `params`: summed over its tokens (incl. the stop
  token), or their mean (`normalize="mean"`, the length-normalised self-reward). float32 [R]."""
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
  logp = jax.lax.stop_gradient(completion_logprobs(config, params, rows))
  mask = rows["mask"].astype(bool)
  total = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)
  return total / jnp.maximum(mask.sum(-1), 1) if normalize == "mean" else total
