"""The preference family on pairs: offline DPO (and its loss variants, SimPO, ORPO), SPIN and
Self-Rewarding; KTO on unpaired samples; plus the judge-training (EFT) warm-up of Self-Rewarding.

Pair rows carry a completion axis of size 2 (chosen, rejected): `prompt_tokens/prompt_mask`
[P, 2, Lp], `tokens/mask` [P, 2, N], `weight` [P] (0 = no pair: a tie, a prompt without enough
valid scores, or an empty replay slot). The round computes log-probs of both completions in one
forward pass over the flattened rows. Where the pairs come from (`pairs`):

  data          chosen / rejected responses of the data batch (offline DPO)
  gold_vs_sample  the data's gold response vs each sample of the opponent (SPIN)
  best_vs_worst   per prompt, the highest- vs the lowest-scored sample (Self-Rewarding; scores
                  from the judge, or any scorer); ties (gap <= `min_score_gap`) are dropped
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.losses import DPO_LOSS_TYPES, PREFERENCE_LOSS_TYPES
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.rows import (Rows, concat_rows, gold_rows, left_pad_to, pad_right, repeat_rows,
                               token_key,
                               rollout_rows, stack_pairs)

PAIR_SOURCES = ("data", "gold_vs_sample", "best_vs_worst")


@dataclasses.dataclass(frozen=True)
class Preference:
  """One spec for the pair methods; `configs/dpo.py`, `spin.py`, `self_rewarding.py` pick fields.

  loss_type: a DPO `loss_type` (sigmoid, hinge, ipo, robust, exo_pair, nca_pair, bco_pair,
    sppo_hard, apo_zero, apo_down, aot, aot_pair, sigmoid_norm, discopop), or simpo / orpo
    (token-averaged log-probs, no reference) / sft (NLL of the chosen side, no reference).
  loss_types, loss_weights: several loss types summed with weights (TRL's MPO): per pair
    `Σ_k w_k·loss_k`; empty = `(loss_type,)`, weights default to 1 each.
  nll_coef: adds `nll_coef * NLL(chosen)` (token mean) per pair (RPO; SimPO's optional SFT term).
  beta_schedule: β of iteration i (0-based, counted by the round) is `beta_schedule[min(i, n-1)]`;
    the round writes it into the rows as `beta` (empty = `beta` throughout).
  ref_sync_alpha, ref_sync_every: TR-DPO; every `ref_sync_every` rounds the round sets a frozen
    reference to `alpha·θ + (1 − alpha)·ref` (0 = never).
  reference: frozen (DPO: the model training starts from) | previous (SPIN, Self-Rewarding: the
    previous iterate, moved every `reference_every` rounds) | none (SimPO, ORPO).
  sample_from: policy | reference (SPIN's opponent and Self-Rewarding's M_t are the iterate the
    round trains from, i.e. the reference).
  replay: keep the previous iteration's pairs (SPIN mixes them into each round's data).
  """

  name: str = "dpo"
  pairs: str = "data"
  loss_type: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  orpo_lambda: float = 0.1
  nll_coef: float = 0.0
  group_size: int = 1
  min_score_gap: float = 0.0
  reference: str = "frozen"
  reference_every: int = 1
  sample_from: str = "policy"
  replay: bool = False
  restart_from_base: bool = False
  loss_types: tuple[str, ...] = ()
  loss_weights: tuple[float, ...] = ()
  beta_schedule: tuple[float, ...] = ()
  ref_sync_alpha: float = 0.0
  ref_sync_every: int = 0

  def __post_init__(self):
    if self.pairs not in PAIR_SOURCES:
      raise ValueError(f"algorithm.pairs: {self.pairs!r} is not one of {PAIR_SOURCES}")
    for t in self.types:
      if t not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"algorithm.loss_type: {t!r} is not one of {PREFERENCE_LOSS_TYPES}")
    if self.loss_weights and len(self.loss_weights) != len(self.types):
      raise ValueError(f"algorithm.loss_weights: {len(self.loss_weights)} weights for "
                       f"{len(self.types)} loss types")
    if self.needs_ref and self.reference == "none":
      raise ValueError(f"algorithm.loss_type: {'+'.join(self.types)} needs a reference model")

  @property
  def samples(self) -> bool:
    return self.pairs != "data"

  @property
  def types(self) -> tuple[str, ...]:
    """The loss types summed per pair: `loss_types`, or the single `loss_type`."""
    return tuple(self.loss_types) or (self.loss_type,)

  @property
  def weights(self) -> tuple[float, ...]:
    return tuple(self.loss_weights) or (1.0,) * len(self.types)

  @property
  def needs_ref(self) -> bool:
    return any(t in DPO_LOSS_TYPES for t in self.types)

  # ---- pairs ----------------------------------------------------------------------------------

  def pair_rows(self, batch: Rows, rollout, rewards) -> Rows:
    """This round's pairs, before any log-probs."""
    if self.pairs == "data":
      prompt = {"prompt_tokens": batch["prompt_tokens"], "prompt_mask": batch["prompt_mask"]}
      chosen = {**prompt, "tokens": batch["chosen_tokens"], "mask": batch["chosen_mask"]}
      rejected = {**prompt, "tokens": batch["rejected_tokens"], "mask": batch["rejected_mask"]}
      return stack_pairs(chosen, rejected, jnp.ones(batch["prompt_tokens"].shape[0]))
    sampled = rollout_rows(rollout)
    if self.pairs == "gold_vs_sample":
      n = rollout.num_rows // batch["prompt_tokens"].shape[0]
      gold = repeat_rows(gold_rows(batch), n)
      return stack_pairs(gold, sampled, jnp.ones(rollout.num_rows))
    g = self.group_size
    s = jnp.asarray(rewards, jnp.float32).reshape(-1, g)
    valid = ~jnp.isnan(s)
    best = jnp.argmax(jnp.where(valid, s, -jnp.inf), axis=1)
    worst = jnp.argmin(jnp.where(valid, s, jnp.inf), axis=1)
    pick = lambda x, i: jnp.take_along_axis(x.reshape((-1, g) + x.shape[1:]),
                                            i.reshape((-1, 1) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
    score_of = lambda i: jnp.take_along_axis(s, i[:, None], axis=1)[:, 0]
    gap = score_of(best) - score_of(worst)
    ok = (valid.sum(axis=1) >= 2) & (gap > self.min_score_gap)
    return stack_pairs(jax.tree.map(lambda x: pick(x, best), sampled),
                       jax.tree.map(lambda x: pick(x, worst), sampled), ok)

  def annotate(self, rows: Rows, logp: LogProbs) -> Rows:
    if self.needs_ref:
      rows = {**rows, "ref_logp": logp.ref(rows)}
    return rows

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    return self.annotate(self.pair_rows(batch, rollout, rewards), logp)

  # ---- loss -----------------------------------------------------------------------------------

  def _term(self, loss_type: str, lp, length, rows: Rows, beta):
    """One loss type's per-pair loss and aux (`lp`, `length`: [P, 2] summed log-probs, lengths)."""
    avg = lp / length
    w = rows["weight"]
    if loss_type == "simpo":
      return losses.simpo_loss(avg[:, 0], avg[:, 1], beta=beta, gamma=self.simpo_gamma,
                               label_smoothing=self.label_smoothing)
    if loss_type == "orpo":
      return losses.orpo_loss(avg[:, 0], avg[:, 1], -avg[:, 0], lam=self.orpo_lambda)
    if loss_type == "sft":  # no preference rewards: TRL logs zeros
      zeros = jnp.zeros_like(lp[:, 0])
      return (losses.sft_pair_loss(lp[:, 0], length[:, 0], w),
              losses.dpo_loss(zeros, zeros, zeros, zeros)[1])
    ref = losses.sequence_logprob(rows["ref_logp"], rows["mask"])
    return losses.dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], loss_type=loss_type,
                           beta=beta, label_smoothing=self.label_smoothing,
                           chosen_len_B=length[:, 0], rejected_len_B=length[:, 1],
                           valid_B=w > 0)

  def loss(self, logp_PxKxT, rows: Rows):
    mask = rows["mask"]
    lp = losses.sequence_logprob(logp_PxKxT, mask)  # [P, 2]
    length = losses.masked_count(mask, axis=-1)  # >= 1
    beta = rows["beta"] if "beta" in rows else self.beta  # the round's scheduled β, per pair
    terms = [self._term(t, lp, length, rows, beta) for t in self.types]
    loss_p = sum(weight * term[0] for weight, term in zip(self.weights, terms))
    # The logged rewards are those of the first term with preference rewards (sft has none).
    aux = next((a for t, (_, a) in zip(self.types, terms) if t != "sft"), terms[0][1])
    if self.nll_coef:
      loss_p = loss_p - self.nll_coef * (lp[:, 0] / length[:, 0])
    w = rows["weight"]
    total = jnp.maximum(jnp.sum(w), 1.0)
    mean = lambda x: jnp.sum(x * w) / total
    metrics = {k: mean(aux[k]) for k in ("chosen_rewards", "rejected_rewards", "margins")}
    # How often the implicit reward ranks chosen above rejected (not `accuracy`: that key is the
    # verified accuracy of the round's samples).
    metrics["pair_accuracy"] = mean(aux["accuracy"])
    metrics["pair_fraction"] = jnp.mean((w > 0).astype(jnp.float32))
    return mean(loss_p), metrics


def _round_key(rollout) -> jax.Array:
  """A PRNG key hashed from the round's sampled tokens (`rows.token_key`): each round draws other
  hard negatives, and a resumed round, which samples the same tokens, the same ones."""
  return token_key(rollout.tokens)


def mismatched_rows(rows: Rows, group_size: int) -> Rows:
  """Each completion under the prompt `group_size` rows earlier (the previous prompt's group,
  cyclically): KTO's mismatched (prompt, completion) pairs for its KL reference point z0. TRL
  rotates the completions of a batch by one example; here a prompt has `group_size` samples in a
  row, so the rotation is one prompt. With a single prompt in the batch the prompt stays the
  same (z0 is then the KL of the matched samples)."""
  roll = lambda x: jnp.roll(x, group_size, axis=0)
  return {**rows, "prompt_tokens": roll(rows["prompt_tokens"]),
          "prompt_mask": roll(rows["prompt_mask"])}


@dataclasses.dataclass(frozen=True)
class KTO:
  """KTO (Ethayarajh et al. 2024; TRL KTOTrainer) on the round's own samples, unpaired.

  Each of the `sampling.n` samples per prompt (from the policy) is one example, desirable iff its
  reward >= `threshold` (default 1: verified correct), undesirable otherwise; a sample without a
  score (NaN) gets weight 0. Per example, with ρ = lp_θ(y) − lp_ref(y) (summed log-probs):
  desirable `w_d·(1 − σ(β(ρ − z0)))`, undesirable `w_u·(1 − σ(β(z0 − ρ)))`, and the loss is the
  mean over the minibatch's scored examples (TRL: mean over the batch). z0 = max(0, mean over the
  minibatch of lp(y′|x′) − lp_ref(y′|x′)) on mismatched pairs (`mismatched_rows`), detached; its
  policy log-probs are taken under the parameters that sampled the round (`logp.old`), i.e. TRL's
  z0 exactly when a round takes one optimizer step (`configs/kto.py`), else as of the round start.
  """

  name: str = "kto"
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  threshold: float = 1.0
  group_size: int = 1
  samples: bool = True
  reference: str = "frozen"
  restart_from_base: bool = False
  ref_sync_alpha: float = 0.0
  ref_sync_every: int = 0

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    rows = rollout_rows(rollout)
    r = jnp.asarray(rewards, jnp.float32)
    kl = mismatched_rows(rows, self.group_size)
    return {**rows, "desirable": r >= self.threshold,
            "weight": (~jnp.isnan(r)).astype(jnp.float32),
            "ref_logp": logp.ref(rows),
            "kl_logp": losses.sequence_logprob(logp.old(kl), kl["mask"]),
            "kl_ref_logp": losses.sequence_logprob(logp.ref(kl), kl["mask"])}

  def loss(self, logp_BxT, rows: Rows):
    mask = rows["mask"]
    lp = losses.sequence_logprob(logp_BxT, mask)
    ref = losses.sequence_logprob(rows["ref_logp"], mask)
    desirable = rows["desirable"].astype(bool)
    loss_b, aux = losses.kto_loss(lp, ref, desirable, rows["kl_logp"], rows["kl_ref_logp"],
                                  beta=self.beta, desirable_weight=self.desirable_weight,
                                  undesirable_weight=self.undesirable_weight)
    w = rows["weight"]
    mean = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
    good, bad = w * desirable, w * ~desirable
    return mean(loss_b, w), {"kto_kl": aux["kl"],
                             "chosen_rewards": mean(aux["rewards"], good),
                             "rejected_rewards": mean(aux["rewards"], bad),
                             "desirable_fraction": mean(desirable.astype(jnp.float32), w)}


@dataclasses.dataclass(frozen=True)
class JudgeSFT:
  """Self-Rewarding's warm-up M1: SFT on gold responses plus judge training (EFT).

  Judge rows are built from the round's own samples and the gold responses, each labelled with
  the verifier's verdict on the judge's scale (correct = score_max, wrong = score_min), so the
  policy learns to judge its own kind of outputs; a rationale judge's rows write the gold response
  to the prompt before the marker and score, or with `trace` (`judge.trace=verify`) the task's
  verification trace of the judged response against its answer. Loss = NLL(gold responses) +
  NLL(rationales) + judge_weight * NLL(verdicts), each a token mean (`loss`); with `balance` the
  judge rows' tokens are weighted 1 / (judge rows of the same class: correct or wrong response).
  Needs a verifier (the task's, or JSONL answers).
  """

  judge: object  # scoring.Judge
  judge_weight: float = 1.0
  name: str = "sft+judge"
  samples: bool = True
  reference: str = "none"
  restart_from_base: bool = False
  trace: object = None  # Task.make_trace_fn(tokenizer) (one stable function), or None = solve
  balance: bool = False  # weigh correct and wrong judged responses equally (judge.balance)
  # Task.make_corrupt_fn(tokenizer), or None: judge rows also take each gold response corrupted
  # into a wrong one (judge.hard_negatives), drawn afresh each round
  corrupt: object = None

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    j = self.judge
    gold = gold_rows(batch)
    sampled = rollout_rows(rollout)
    lo, hi = float(j.score_min), float(j.score_max)
    gold_score = jnp.full((gold["tokens"].shape[0],), hi)
    sample_score = lo + (hi - lo) * jnp.clip(jnp.asarray(rewards, jnp.float32), 0.0, 1.0)
    width = j.prompt_width(batch["prompt_tokens"].shape[1],
                           max(gold["tokens"].shape[1], sampled["tokens"].shape[1]))
    n = sampled["tokens"].shape[0] // gold["tokens"].shape[0]
    if self.trace is None:  # a rationale judge's own solution: the gold response of the prompt
      rationale = lambda rows, k: (jnp.repeat(gold["tokens"], k, axis=0),
                                   jnp.repeat(gold["mask"], k, axis=0))
    else:  # a checking judge's rationale: the trace of the judged response against its answer
      rationale = lambda rows, k: self.trace(jnp.repeat(batch["answer_tokens"], k, axis=0),
                                             jnp.repeat(batch["answer_mask"], k, axis=0),
                                             rows["tokens"], rows["mask"])
    parts = ((gold, gold_score, rationale(gold, 1)), (sampled, sample_score, rationale(sampled, n)))
    if self.corrupt is not None:  # hard negatives: the gold responses made wrong, labelled so
      bad = {**gold, "tokens": self.corrupt(gold["tokens"], gold["mask"], _round_key(rollout))}
      parts += ((bad, jnp.full_like(gold_score, lo), rationale(bad, 1)),)
    completion = max(gold["tokens"].shape[1],
                     j.completion_width(max(r[0].shape[1] for _, _, r in parts)))
    judged = [j.training_rows(r["prompt_tokens"], r["prompt_mask"], r["tokens"], r["mask"], s,
                              prompt_width=width, completion_width=completion, rationale=why)
              for r, s, why in parts]
    prompt_tokens, prompt_mask = left_pad_to(gold["prompt_tokens"], gold["prompt_mask"], width,
                                             j.pad_id)
    sft = {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask,
           "tokens": pad_right(gold["tokens"], completion, j.pad_id),
           "mask": pad_right(gold["mask"], completion)}
    sft["verdict"] = jnp.zeros_like(sft["mask"])
    rows = functools.reduce(concat_rows, judged, sft)
    n_sft = sft["tokens"].shape[0]
    rows["is_judge"] = jnp.arange(rows["tokens"].shape[0]) >= n_sft
    # what each judge row teaches: the judged response is correct (gold, verified samples) or not
    rows["judge_correct"] = jnp.concatenate([jnp.zeros((n_sft,), bool)] +
                                            [s >= hi for _, s, _ in parts])
    return rows

  def loss(self, logp_BxT, rows: Rows):
    # Three token means: the gold responses (solving), the rationales written in judge rows (gold
    # solution or verification trace) and the verdict tokens. Each keeps its weight however many
    # judge rows there are and however long their rationales: pooled into one mean, the traces of
    # n samples per prompt would outweigh the gold responses ~10:1 and training the judge would
    # unlearn solving.
    mask = rows["mask"].astype(bool)
    verdict = rows["verdict"].astype(bool)
    is_judge = rows["is_judge"].astype(bool)
    correct = rows["judge_correct"].astype(bool) & is_judge
    sft = losses.nll_loss(logp_BxT, mask & ~is_judge[:, None])
    # Judge rows weigh 1 each, or with `balance` 1 / (rows of their class): correct and wrong
    # judged responses then teach the judge equally however skewed the round's samples are.
    n_correct, n_wrong = jnp.sum(correct), jnp.sum(is_judge & ~correct)
    weight = (jnp.where(correct, 1.0 / jnp.maximum(n_correct, 1), 1.0 / jnp.maximum(n_wrong, 1))
              if self.balance else jnp.ones(correct.shape, jnp.float32))[:, None]
    nll = -logp_BxT.astype(jnp.float32)
    weighted = lambda m: losses.masked_sum(nll * weight, m) / jnp.maximum(
        losses.masked_sum(jnp.broadcast_to(weight, m.shape), m), 1e-9)
    rationale = weighted(mask & is_judge[:, None] & ~verdict)
    judge = weighted(mask & verdict)
    return (sft + rationale + self.judge_weight * judge,
            {"sft_loss": sft, "rationale_loss": rationale, "judge_loss": judge,
             "judge_correct_fraction": n_correct / jnp.maximum(n_correct + n_wrong, 1)})
