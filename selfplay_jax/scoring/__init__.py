"""Scoring a round's samples: task verifiers (`verifiers`), the policy as its own judge
(`judge`), and self-likelihood (`likelihood`), all pure and jittable: they run inside the round;
and Python reward functions over decoded text (`python_rewards`, with the built-in `math_reward`),
which run on the host through a callback from inside the round.

A scorer is `scorer(sample_params, ref_params, batch, rollout, rng) -> (scores [R], metrics)`, with
R = `rollout.num_rows`; NaN marks a sample that got no valid score. Metric keys starting with "_"
are private to the round (`label_free.WINNER_KEY`): the round reads and drops them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from typing import Sequence

from selfplay_jax.models.config import ModelConfig
from selfplay_jax.models.logprobs import completion_self_certainty
from selfplay_jax.scoring import label_free
from selfplay_jax.scoring.judge import Judge, ranking_agreement
from selfplay_jax.scoring.likelihood import self_likelihood
from selfplay_jax.scoring.verifiers import extract_answers

__all__ = ["Judge", "ranking_agreement", "self_likelihood", "judge_scorer",
           "likelihood_scorer", "majority_scorer", "self_certainty_scorer"]


def judge_scorer(judge: Judge, config: ModelConfig, model: str = "policy", num_chunks: int = 1):
  """The policy judges its own samples (Self-Rewarding): `model="policy"` judges with the params
  that sampled the round, `model="reference"` with the run's reference params (for a frozen
  reference: the policy as the warm-up left it, a judge that does not drift with the updates).
  The judge's forward runs in `num_chunks` chunks of rows (`Judge.score`)."""
  if model not in ("policy", "reference"):
    raise ValueError(f"judge.model: must be policy or reference, got {model!r}")

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del batch
    params = sample_params if model == "policy" else ref_params
    if params is None:
      raise ValueError("judge.model=reference: this algorithm keeps no reference params")
    s = judge.score(config, params, rollout.prompt_tokens, rollout.prompt_mask,
                    rollout.tokens, rollout.mask, rng, num_chunks)
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


def majority_scorer(marker_id: int, eos_ids: Sequence[int], group_size: int, width: int, *,
                    soft: bool = False, threshold: float = 0.0):
  """Label-free majority-vote reward (TTRL, Zuo et al. 2025; SRT, Shafayat et al. 2025): each
  sample's answer (the tokens after `marker_id` up to its stop token, `extract_answers`, at most
  `width` tokens) is compared with its prompt's `group_size` samples; reward 1 for the majority
  answer, 0 otherwise (`label_free.majority_rewards`: `soft`, `threshold`). No gold answer is
  read. Metrics: `train/majority_ratio` (mean majority share) and the private winner indices
  (`label_free.WINNER_KEY`) from which the round measures `train/label_accuracy`."""

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del sample_params, ref_params, batch, rng
    answers, valid = extract_answers(rollout.tokens, rollout.mask, marker_id, eos_ids, width)
    vote = label_free.majority_vote(label_free.group(answers, group_size),
                                    label_free.group(valid, group_size))
    rewards = label_free.majority_rewards(vote, soft=soft, threshold=threshold).reshape(-1)
    return rewards, {"train/majority_ratio": jnp.mean(vote["top_share"]),
                     label_free.WINNER_KEY: label_free.winners(vote)}

  return scorer


def self_certainty_scorer(config: ModelConfig, vocab_size: int, num_chunks: int = 1):
  """Self-certainty reward (INTUITOR, Zhao et al. 2025): each sample's mean over its completion
  tokens (stop token included) of `KL(U || p)`, p the untempered next-token distribution of the
  params that sampled it, U uniform over `vocab_size` ids (`completion_self_certainty`); one
  frozen forward pass in `num_chunks` chunks of rows."""

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del ref_params, batch, rng
    rows = {"prompt_tokens": rollout.prompt_tokens, "prompt_mask": rollout.prompt_mask,
            "tokens": rollout.tokens, "mask": rollout.mask}
    per_token = jax.lax.stop_gradient(completion_self_certainty(
        config, sample_params, rows, vocab_size, num_chunks))
    mask = rollout.mask.astype(bool)
    s = jnp.sum(jnp.where(mask, per_token, 0.0), axis=-1) / jnp.maximum(mask.sum(-1), 1)
    return s, {"train/self_certainty": jnp.mean(s)}

  return scorer
