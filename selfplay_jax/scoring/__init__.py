"""Scoring a round's samples: task verifiers (`verifiers`), the policy as its own judge
(`judge`), and self-likelihood (`likelihood`), all pure and jittable: they run inside the round;
and Python reward functions over decoded text (`python_rewards`, with the built-in `math_reward`),
which run on the host through a callback from inside the round.

A scorer is `scorer(sample_params, ref_params, batch, rollout, rng) -> (scores [R], metrics)`, with
R = `rollout.num_rows`; NaN marks a sample that got no valid score.
"""

from __future__ import annotations

import jax.numpy as jnp

from selfplay_jax.models.config import ModelConfig
from selfplay_jax.scoring.judge import Judge, ranking_agreement
from selfplay_jax.scoring.likelihood import self_likelihood

__all__ = ["Judge", "ranking_agreement", "self_likelihood", "judge_scorer",
           "likelihood_scorer"]


def judge_scorer(judge: Judge, config: ModelConfig, model: str = "policy"):
  """The policy judges its own samples (Self-Rewarding): `model="policy"` judges with the params
  that sampled the round, `model="reference"` with the run's reference params (for a frozen
  reference: the policy as the warm-up left it, a judge that does not drift with the updates)."""
  if model not in ("policy", "reference"):
    raise ValueError(f"judge.model: must be policy or reference, got {model!r}")

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del batch
    params = sample_params if model == "policy" else ref_params
    if params is None:
      raise ValueError("judge.model=reference: this algorithm keeps no reference params")
    s = judge.score(config, params, rollout.prompt_tokens, rollout.prompt_mask,
                    rollout.tokens, rollout.mask, rng)
    valid = ~jnp.isnan(s)
    return s, {"judge/score_mean": jnp.nanmean(s),
               "judge/valid_fraction": jnp.mean(valid.astype(jnp.float32))}

  return scorer


def likelihood_scorer(config: ModelConfig, normalize: str = "mean"):
  """Self-likelihood reward: `log pi_ref(y|x)` under the reference model (pi_base: RL-sharpening)
  when the algorithm keeps one, else under the policy that sampled (SFT-sharpening)."""

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del batch, rng
    params = sample_params if ref_params is None else ref_params
    rows = {"prompt_tokens": rollout.prompt_tokens, "prompt_mask": rollout.prompt_mask,
            "tokens": rollout.tokens, "mask": rollout.mask}
    s = self_likelihood(config, params, rows, normalize)
    return s, {"train/self_likelihood": jnp.mean(s)}

  return scorer
