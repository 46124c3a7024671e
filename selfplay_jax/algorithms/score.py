"""SCoRe: self-correction by multi-turn RL (Kumar et al. 2024, "Training Language Models to
Self-Correct via Reinforcement Learning"), and its supervised baseline on correction traces.

One episode is two attempts inside one round (`round.two_attempts`): attempt 1 `y1 ~ π(·|x)`
(`group_size` samples per problem), then attempt 2 `y2 ~ π(·|x2)` with `x2 = x · y1 · c` (the first
attempt without its stop token, then the fixed correction instruction `c`; with `{prompt}` in the
instruction, `x · y1 · c · x`: the problem asked again), one per attempt 1.
The verifier scores both: `r1`, `r2`. The spec receives `rollout = TwoAttempts(first, second)`
and `rewards [R, 2]`, and trains on both attempts' rows (attempt-1 prompts left-padded to the
attempt-2 prompts' width, so one row set holds both).

SCoRe (`objective="rl"`), REINFORCE with a leave-one-out baseline over a problem's samples
(`losses.rloo_advantages`) and a per-row KL to the reference (the warmed-up policy; k3):

  stage I (the first `stage1_rounds` rounds of the phase): maximise the second attempt's reward
    while a strong KL (`kl_first`) holds the first attempt at the reference:
      attempt 1: A = 0,                              KL weight kl_first
      attempt 2: A = rloo(r2),                       KL weight kl_coef
  stage II: RL on both attempts, the second's reward shaped by the progress bonus α·(r2 − r1):
      attempt 1: A = rloo(r1),                       KL weight kl_coef
      attempt 2: A = rloo(r2 + α·(r2 − r1)),         KL weight kl_coef

  loss = mean over rows of [ −A · mean_t ρ_t + w · mean_t k3(lp_θ, lp_ref) ],  ρ = exp(lp_θ − lp_old)

(on-policy: one update per round gives ρ = 1 and the REINFORCE gradient). The round reads the
stage from `batch["phase_round"]` (spec option `needs_round`).

The baseline (`objective="sft"`, `algorithm.name=score_sft`): SFT on the round's verified second
attempts, conditioned on the first (x2 → y2 where r2 = 1; the "SFT on correction traces" the
paper finds does not teach self-correction), no first-attempt rows.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.rows import (Rows, concat_rows, gold_rows, left_pack, left_pad_to, rollout_rows,
                               token_key)

OBJECTIVES = ("rl", "sft")


@flax.struct.dataclass
class TwoAttempts:
  """A round's two attempts (`sampling.Rollout` each, R rows in the same order: row i of `second`
  corrects row i of `first`)."""

  first: object
  second: object

  @property
  def num_rows(self) -> int:
    return self.first.num_rows


def attempt_rows(rollout: TwoAttempts, pad_id: int = 0) -> tuple[Rows, Rows]:
  """(attempt-1 rows, attempt-2 rows) with one prompt width: the first attempt's prompts
  left-padded to the second's (x2 is longer: it holds x, y1 and the instruction)."""
  first, second = rollout_rows(rollout.first), rollout_rows(rollout.second)
  width = second["prompt_tokens"].shape[1]
  first["prompt_tokens"], first["prompt_mask"] = left_pad_to(
      first["prompt_tokens"], first["prompt_mask"], width, pad_id)
  return first, second


def score_advantages(r1, r2, group_size: int, stage2, bonus: float):
  """(A1, A2), each [R]: attempt 1's advantage (0 in stage I) and attempt 2's (stage II: its
  reward plus `bonus · (r2 − r1)`), leave-one-out over each problem's `group_size` samples.
  `stage2`: a bool scalar (traced)."""
  shaped = r2 + jnp.where(stage2, bonus, 0.0) * (r2 - r1)
  a1 = jnp.where(stage2, losses.rloo_advantages(r1, group_size), 0.0)
  return a1, losses.rloo_advantages(shaped, group_size)


@dataclasses.dataclass(frozen=True)
class SCoRe:
  """See the module docstring. `correction`: the instruction's token ids, `repeat_prompt`: the
  problem is asked again after it (both set by `setup` from `algorithm.correction_prompt` and the
  run's tokenizer)."""

  name: str = "score"
  group_size: int = 4
  objective: str = "rl"
  stage1_rounds: int = 20
  kl_first: float = 1.0
  kl_coef: float = 0.1
  bonus: float = 1.0
  correction: tuple[int, ...] = ()
  repeat_prompt: bool = False
  pad_id: int = 0
  temperature: float = 1.0
  clip_low: float = 0.2
  clip_high: float = 0.2
  attempts: int = 2
  needs_round: bool = True
  samples: bool = True
  restart_from_base: bool = False

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"SCoRe objective must be one of {OBJECTIVES}, got {self.objective!r}")

  @property
  def reference(self) -> str:
    return "frozen" if self.objective == "rl" else "none"

  def build(self, batch: Rows, rollout: TwoAttempts, rewards, logp: LogProbs) -> Rows:
    first, second = attempt_rows(rollout, self.pad_id)
    r1, r2 = rewards[:, 0], rewards[:, 1]
    if self.objective == "sft":  # the verified corrections, x2 -> y2
      second["mask"] = second["mask"] & (r2 >= 1.0)[:, None]
      return second
    rows = concat_rows(first, second)
    stage2 = batch["phase_round"][0] > self.stage1_rounds
    a1, a2 = score_advantages(r1, r2, self.group_size, stage2, self.bonus)
    r = r1.shape[0]
    rows["advantages"] = jnp.concatenate([a1, a2])
    rows["second"] = jnp.arange(2 * r) >= r  # which attempt a row is (minibatches shuffle rows)
    rows["kl_weight"] = jnp.concatenate([
        jnp.full((r,), jnp.where(stage2, self.kl_coef, self.kl_first)),
        jnp.full((r,), self.kl_coef)]).astype(jnp.float32)
    rows["old_logp"] = logp.old(rows)
    rows["ref_logp"] = logp.ref(rows)
    return rows

  def loss(self, logp_BxT, rows: Rows):
    mask = rows["mask"]
    if self.objective == "sft":
      return losses.nll_loss(logp_BxT, mask, "token"), {
          "kept_fraction": jnp.mean(jnp.any(mask, axis=-1).astype(jnp.float32))}
    pg, aux = losses.policy_gradient_loss(logp_BxT, rows["old_logp"], rows["advantages"], mask,
                                          clip_low=self.clip_low, clip_high=self.clip_high,
                                          loss_type="grpo")
    kl_row = losses.masked_mean(losses.kl_k3(logp_BxT, rows["ref_logp"]), mask, axis=1)
    kl = jnp.mean(rows["kl_weight"] * kl_row)
    aux.pop("kl", None)  # the PG loss got no reference: its in-loss KL is the one below
    second = rows["second"]
    mean_of = lambda rows_mask: jax.lax.stop_gradient(
        jnp.sum(jnp.where(rows_mask, kl_row, 0.0)) / jnp.maximum(jnp.sum(rows_mask), 1))
    return pg + kl, {**aux, "kl_first": mean_of(~second), "kl_second": mean_of(second)}


def episode_prompts(prompt_tokens, prompt_mask, attempt_tokens, attempt_mask, correction,
                    eos_ids, pad_id: int = 0, repeat_prompt: bool = False):
  """The second attempt's prompts `x · y1 · c` (`repeat_prompt`: `x · y1 · c · x`, the problem
  asked again), left-packed [R, P + N + len(c) (+ P)]: the prompt, the first attempt without its
  stop token, the correction instruction (and the prompt again)."""
  keep = attempt_mask & ~jnp.isin(attempt_tokens, jnp.asarray(eos_ids, jnp.int32))
  c = jnp.broadcast_to(jnp.asarray(correction, jnp.int32), (prompt_tokens.shape[0], len(correction)))
  tokens = [prompt_tokens, attempt_tokens, c]
  mask = [prompt_mask, keep, jnp.ones(c.shape, bool)]
  if repeat_prompt:
    tokens.append(prompt_tokens)
    mask.append(prompt_mask)
  return left_pack(jnp.concatenate(tokens, axis=1), jnp.concatenate(mask, axis=1), pad_id)


WARMUP_EPISODES = ("none", "copy", "mixed")


@dataclasses.dataclass(frozen=True)
class EpisodeSFT:
  """SCoRe's warm-up (`algorithm.score_warmup_episodes`): SFT on the gold responses, and on the
  same gold responses as second attempts after a first attempt (`x · y1 · c → y*`), which teaches
  the episode's format (a second prompt is longer and holds the problem twice).

  mode "copy": the first attempt shown is the gold response, so these rows teach repeating it.
  mode "mixed": for half the rows (a coin per row, drawn from a key hashed from the batch's
  prompts) it is the gold response made wrong by `corrupt` (the task's hard negatives,
  `Task.make_corrupt_fn`: one operator or one claimed digit changed): SFT on synthetic correction
  traces, gold-labelled, before any round reads a reward.
  """

  correction: tuple[int, ...] = ()
  repeat_prompt: bool = False
  pad_id: int = 0
  eos_ids: tuple[int, ...] = ()
  mode: str = "copy"
  corrupt: object = None
  name: str = "sft"
  samples: bool = False
  reference: str = "none"
  restart_from_base: bool = False

  def __post_init__(self):
    if self.mode not in WARMUP_EPISODES[1:]:
      raise ValueError(f"EpisodeSFT mode must be one of {WARMUP_EPISODES[1:]}, got {self.mode!r}")
    if self.mode == "mixed" and self.corrupt is None:
      raise ValueError("EpisodeSFT mode 'mixed' needs a corrupt function")

  def first_attempts(self, gold: Rows) -> jax.Array:
    """The first attempts the episode rows show: the gold responses, or (mixed) half of them
    corrupted."""
    if self.mode == "copy":
      return gold["tokens"]
    k_coin, k_corrupt = jax.random.split(token_key(gold["prompt_tokens"]))
    wrong = self.corrupt(gold["tokens"], gold["mask"], k_corrupt)
    coin = jax.random.bernoulli(k_coin, 0.5, (gold["tokens"].shape[0], 1))
    return jnp.where(coin, wrong, gold["tokens"])

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    gold = gold_rows(batch)
    prompts, mask = episode_prompts(gold["prompt_tokens"], gold["prompt_mask"],
                                    self.first_attempts(gold), gold["mask"], self.correction,
                                    self.eos_ids, self.pad_id, self.repeat_prompt)
    second = {**gold, "prompt_tokens": prompts, "prompt_mask": mask}
    gold["prompt_tokens"], gold["prompt_mask"] = left_pad_to(
        gold["prompt_tokens"], gold["prompt_mask"], prompts.shape[1], self.pad_id)
    return concat_rows(gold, second)

  def loss(self, logp_BxT, rows: Rows):
    return losses.nll_loss(logp_BxT, rows["mask"], "token"), {}

