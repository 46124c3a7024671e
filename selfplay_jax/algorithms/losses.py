"""Pure, jittable losses and advantage estimators for self-improvement post-training.

Formulas and reference defaults follow `docs/algorithms.md` (TRL / SPIN / OpenRLHF semantics).

Conventions used throughout:
  * Shapes: `B` rows (completions or preference pairs), `T` completion positions, `V` vocabulary.
    `logits_BxTxV[:, t]` scores `targets_BxT[:, t]` (the caller does the one-position shift).
  * Masks are bool (or {0, 1}) `mask_BxT`; True marks a completion token that counts. Every masked
    reduction divides by `max(count, 1)`, so empty rows and empty batches give 0, never NaN.
  * Groups are contiguous: rows `i*G ... i*G + G - 1` are the G samples of prompt `i` (this is how
    `sampling.sample` lays out its `n` samples).
  * `lp` is a log-probability in nats; sequence log-probs are sums over the mask unless a function
    says "avg" (token mean). Losses are to be *minimised*.
  * Reference / old-policy log-probs and advantages are `stop_gradient`ed inside, so gradients only
    reach the policy terms. Auxiliary metrics are detached.
  * Log-ratios that get exponentiated (KL estimators, importance ratios) are clamped to +-20.
  * String options (`loss_type`, `kind`, ...) and group sizes are Python values: static under jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


# Names the loss and advantage functions below accept (config keys algorithm.loss_type / .advantage).
PG_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # algorithm.importance_sampling_level
SCALE_REWARDS = ("group", "batch", "none")  # algorithm.scale_rewards (GRPO advantage normaliser)
KL_ESTIMATORS = ("k1", "k2", "k3")  # algorithm.kl_estimator
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "apo_zero", "apo_down", "aot", "aot_pair", "sigmoid_norm",
                  "discopop")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo", "sft")
PREFERENCE_LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES

Array = jax.Array

LOG_RATIO_CLAMP = 20.0  # |L| bound before exp() in KL estimators and importance ratios
_LOG1MEXP_MAX = -1e-7  # log1mexp(x) needs x < 0; x is clamped to <= this (avoids log(0))

# ----------------------------------------------------------------------------------------------
# Masked reductions and log-prob helpers.
# ----------------------------------------------------------------------------------------------


def _sg(x: Array) -> Array:
  return jax.lax.stop_gradient(x)


def _bool(mask: Array) -> Array:
  return jnp.asarray(mask).astype(bool)


def masked_sum(x: Array, mask: Array, axis: int | None = None) -> Array:
  """`Σ x·m` with `jnp.where`, so non-finite values at masked positions never leak."""
  return jnp.sum(jnp.where(_bool(mask), x, 0.0), axis=axis)


def masked_count(mask: Array, axis: int | None = None) -> Array:
  """`max(Σ m, 1)` as float32: the safe denominator of every masked mean."""
  return jnp.maximum(jnp.sum(_bool(mask), axis=axis, dtype=jnp.float32), 1.0)


def _zero_invalid(x: Array, mask: Array) -> Array:
  """float32 `x` with masked positions set to 0, so padding garbage (±inf, NaN) cannot poison
  values or gradients downstream (`where`'s gradient is a select, never a product)."""
  return jnp.where(_bool(mask), jnp.asarray(x, jnp.float32), 0.0)


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
  """`Σ x·m / max(Σ m, 1)`; 0 where the mask is empty (never NaN)."""
  return masked_sum(x, mask, axis) / masked_count(mask, axis)


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array, temperature: float = 1.0) -> Array:
  """`logp_BxT[b, t] = log_softmax(logits[b, t] / temperature)[targets[b, t]]`, in float32."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32) / temperature
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None].astype(jnp.int32),
                                   axis=-1)[..., 0]
  return target_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)


def sequence_logprob(logp_BxT: Array, mask_BxT: Array, average: bool = False) -> Array:
  """`lp_B = Σ_t logp·m` (or `/ max(Σ_t m, 1)` when `average`); 0 for an empty row."""
  if average:
    return masked_mean(logp_BxT, mask_BxT, axis=-1)
  return masked_sum(logp_BxT, mask_BxT, axis=-1)


def token_entropy(logits_BxTxV: Array) -> Array:
  """`H_BxT = −Σ_v p_v log p_v` in float32; vocabulary entries with p = 0 (e.g. −inf) add 0."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  p_BxTxV = jnp.exp(logp_BxTxV)
  safe_logp_BxTxV = jnp.where(p_BxTxV > 0, logp_BxTxV, 0.0)
  return -jnp.sum(p_BxTxV * safe_logp_BxTxV, axis=-1)


def entropy_from_logits(logits_BxTxV: Array, mask_BxT: Array) -> Array:
  """Mean per-token entropy over valid tokens: `Σ H·m / max(Σ m, 1)` (a scalar metric)."""
  return masked_mean(token_entropy(logits_BxTxV), mask_BxT)


def high_entropy_mask(entropy_BxT: Array, mask_BxT: Array, quantile: float) -> Array:
  """The valid tokens whose entropy is in the top `quantile` of this batch's valid tokens.

  TRL's `top_entropy_quantile` (Wang et al. 2025, "Beyond the 80/20 rule"): threshold =
  `quantile(H[m], 1 − quantile)` (linear interpolation, as `torch.quantile`), keep `H ≥ threshold`.
  `quantile = 1` keeps every valid token, `0` only the highest-entropy one(s); no valid token
  keeps nothing. The entropies are detached (the mask selects, it is not trained).
  """
  mask_BxT = _bool(mask_BxT)
  h_BxT = _sg(jnp.asarray(entropy_BxT, jnp.float32))
  threshold = jnp.nanquantile(jnp.where(mask_BxT, h_BxT, jnp.nan), 1.0 - quantile)
  return mask_BxT & (h_BxT >= threshold)  # NaN threshold (no valid token): all False


# ----------------------------------------------------------------------------------------------
# Supervised fine-tuning.
# ----------------------------------------------------------------------------------------------


def nll_loss(logp_BxT: Array, mask_BxT: Array, normalize: str = "token") -> Array:
  """Masked negative log-likelihood (SFT, ReST-EM, STaR, sharpening).

  normalize="token":    `Σ_bt −logp·m / max(Σ_bt m, 1)` (every token weighs the same; TRL SFT).
  normalize="sequence": `mean_b [Σ_t −logp·m / max(Σ_t m, 1)]` (every row weighs the same; empty
                        rows contribute 0 but still count in the mean over B).
  """
  nll_BxT = -logp_BxT.astype(jnp.float32)
  if normalize == "token":
    return masked_mean(nll_BxT, mask_BxT)
  if normalize == "sequence":
    return jnp.mean(masked_mean(nll_BxT, mask_BxT, axis=-1))
  raise ValueError(f"normalize must be 'token' or 'sequence', got {normalize!r}")


# ----------------------------------------------------------------------------------------------
# KL estimators (per token), with L = lp_ref − lp_θ clamped to ±20.
# ----------------------------------------------------------------------------------------------


def _log_ref_ratio(logp: Array, ref_logp: Array) -> Array:
  return jnp.clip(_sg(ref_logp) - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_k1(logp: Array, ref_logp: Array) -> Array:
  """k1 = −L = lp_θ − lp_ref (unbiased, can be negative)."""
  return -_log_ref_ratio(logp, ref_logp)


def kl_k2(logp: Array, ref_logp: Array) -> Array:
  """k2 = ½ L² (biased, low variance, ≥ 0)."""
  return 0.5 * jnp.square(_log_ref_ratio(logp, ref_logp))


def kl_k3(logp: Array, ref_logp: Array) -> Array:
  """k3 = exp(L) − L − 1 (unbiased, ≥ 0; the GRPO penalty). Computed as expm1(L) − L."""
  log_ratio = _log_ref_ratio(logp, ref_logp)
  return jnp.expm1(log_ratio) - log_ratio


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Array, ref_logp: Array, kind: str = "k3") -> Array:
  """Per-token KL(π_θ ‖ π_ref) estimate; `kind` in {"k1", "k2", "k3"}. Gradient only via `logp`."""
  if kind not in _KL_ESTIMATORS:
    raise ValueError(f"kl kind must be one of {sorted(_KL_ESTIMATORS)}, got {kind!r}")
  return _KL_ESTIMATORS[kind](logp, ref_logp)


# ----------------------------------------------------------------------------------------------
# Advantages and reward shaping for RL with verifiable rewards.
# ----------------------------------------------------------------------------------------------


def _groups(rewards_B: Array, group_size: int) -> Array:
  """`rewards_B` → `rewards_NxG` (N prompts, G contiguous samples each), float32."""
  n = rewards_B.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"batch of {n} rows is not a whole number of groups of {group_size}")
  return rewards_B.astype(jnp.float32).reshape(n // group_size, group_size)


def _scorable(r: Array) -> tuple[Array, Array]:
  """`(valid, r with invalid entries 0)`: a non-finite reward (a judge's NaN) is unscorable."""
  valid = jnp.isfinite(r)
  return valid, jnp.where(valid, r, 0.0)


def _sample_std(r: Array, valid: Array, axis: int | None = None) -> Array:
  """Unbiased (ddof = 1) std of the valid entries (TRL's `nanstd`); 0 with fewer than two."""
  count = jnp.sum(valid, axis=axis, keepdims=True, dtype=jnp.float32)
  mean = jnp.sum(jnp.where(valid, r, 0.0), axis=axis, keepdims=True) / jnp.maximum(count, 1.0)
  sq = jnp.sum(jnp.where(valid, jnp.square(r - mean), 0.0), axis=axis, keepdims=True)
  return jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))


def grpo_advantages(rewards_B: Array, group_size: int, scale: bool | str = True,
                    eps: float = 1e-4) -> Array:
  """GRPO: `A_i = (r_i − mean_G r) / (std + eps)`; without scaling Dr. GRPO `r_i − mean_G r`.

  `scale` (TRL's `scale_rewards`): "group" (or True) divides by the group's std, "batch" by the
  std of all rewards of the batch (PPO-Lite), "none" (or False) not at all. std is the unbiased
  *sample* std (ddof = 1), matching TRL's `torch.std` / `nanstd`; eps = 1e-4 as in TRL. A group of
  identical rewards gives A = 0 (≈0 up to rounding); for G = 1 the std is taken as 0 (so A = 0)
  instead of torch's NaN. Unscorable (non-finite) rewards are left out of the mean and std and
  get A = 0 (TRL); a group with one scorable reward gives it A = 0.
  """
  scale = {True: "group", False: "none"}.get(scale, scale)
  if scale not in SCALE_REWARDS:
    raise ValueError(f"scale must be one of {SCALE_REWARDS} (or a bool), got {scale!r}")
  r_NxG = _groups(rewards_B, group_size)
  valid_NxG, r0_NxG = _scorable(r_NxG)
  count_N1 = jnp.maximum(jnp.sum(valid_NxG, axis=1, keepdims=True, dtype=jnp.float32), 1.0)
  mean_N1 = jnp.sum(r0_NxG, axis=1, keepdims=True) / count_N1
  centered_NxG = jnp.where(valid_NxG, r0_NxG - mean_N1, 0.0)
  if scale == "group":
    centered_NxG = centered_NxG / (_sample_std(r0_NxG, valid_NxG, axis=1) + eps)
  elif scale == "batch":
    centered_NxG = centered_NxG / (_sample_std(r0_NxG, valid_NxG) + eps)
  return centered_NxG.reshape(-1)


def rloo_advantages(rewards_B: Array, group_size: int) -> Array:
  """RLOO: `A_i = r_i − mean_{j≠i} r_j = r_i − (Σ_j r_j − r_i) / (G − 1)`; needs G ≥ 2.

  Unscorable (non-finite) rewards are left out of the leave-one-out mean (the divisor is the
  number of scorable others) and get A = 0, as does a group's only scorable sample (TRL RLOO).
  For the TRL RLOO objective, first fold the KL penalty in with `kl_penalized_rewards`.
  """
  if group_size < 2:
    raise ValueError(f"RLOO needs group_size >= 2, got {group_size}")
  r_NxG = _groups(rewards_B, group_size)
  valid_NxG, r0_NxG = _scorable(r_NxG)
  count_N1 = jnp.sum(valid_NxG, axis=1, keepdims=True, dtype=jnp.float32)
  baseline_NxG = (jnp.sum(r0_NxG, axis=1, keepdims=True) - r0_NxG) / jnp.maximum(count_N1 - 1, 1)
  return jnp.where(valid_NxG & (count_N1 >= 2), r0_NxG - baseline_NxG, 0.0).reshape(-1)


def kl_penalized_rewards(rewards_B: Array, old_logp_BxT: Array, ref_logp_BxT: Array,
                         mask_BxT: Array, kl_coef: float, kind: str = "k1") -> Array:
  """RLOO reward shaping: `r ← r − β Σ_t KL_t·m`, KL_t the `kind` estimator of lp_old vs lp_ref
  (TRL: k1 = lp_old − lp_ref, clamped ±20). A non-finite reward stays non-finite."""
  kl_B = masked_sum(kl_estimate(_sg(old_logp_BxT), ref_logp_BxT, kind), mask_BxT, axis=-1)
  return rewards_B.astype(jnp.float32) - kl_coef * kl_B


def last_token_mask(mask_BxT: Array) -> Array:
  """One-hot of the last True position of each row; an all-False row stays all False."""
  mask_BxT = _bool(mask_BxT)
  t = mask_BxT.shape[-1]
  last_B = t - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=-1)
  return (jnp.arange(t)[None, :] == last_B[:, None]) & jnp.any(mask_BxT, axis=-1, keepdims=True)


def reinforce_pp_advantages(rewards_B: Array, old_logp_BxT: Array, ref_logp_BxT: Array,
                            mask_BxT: Array, *, kl_coef: float = 0.0, kl_kind: str = "k1",
                            baseline: bool = False, group_size: int | None = None,
                            eps: float = 1e-8) -> Array:
  """REINFORCE++ token advantages `A_BxT` (OpenRLHF).

  Per-token reward `−β·k1_t` (k1 = lp_old − lp_ref) plus the outcome reward on the last valid token;
  return-to-go with γ = 1 (`G_t = Σ_{s≥t} r_s`); then whitened over all valid tokens of the batch:
  `(G − mean) · rsqrt(max(var, eps))`, population variance. `baseline=True` (REINFORCE++-baseline)
  first subtracts each group's mean outcome reward. Invalid positions get 0; a fully masked row
  drops its outcome reward. A row with an unscorable (non-finite) reward is left out of the group
  mean and the whitening and gets A = 0.
  """
  valid_B, r_B = _scorable(rewards_B.astype(jnp.float32))
  mask_BxT = _bool(mask_BxT) & valid_B[:, None]
  if baseline:
    if group_size is None:
      raise ValueError("baseline=True needs group_size")
    r_NxG, valid_NxG = _groups(r_B, group_size), valid_B.reshape(-1, group_size)
    mean_N1 = jnp.sum(r_NxG, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(valid_NxG, axis=1, keepdims=True, dtype=jnp.float32), 1.0)
    r_B = jnp.where(valid_NxG, r_NxG - mean_N1, 0.0).reshape(-1)
  kl_BxT = kl_estimate(_sg(old_logp_BxT), ref_logp_BxT, kl_kind)
  token_r_BxT = jnp.where(mask_BxT, -kl_coef * kl_BxT, 0.0)
  token_r_BxT = token_r_BxT + jnp.where(last_token_mask(mask_BxT), r_B[:, None], 0.0)
  returns_BxT = jnp.flip(jnp.cumsum(jnp.flip(token_r_BxT, -1), axis=-1), -1)
  mean = masked_mean(returns_BxT, mask_BxT)
  var = masked_mean(jnp.square(returns_BxT - mean), mask_BxT)
  adv_BxT = (returns_BxT - mean) * jax.lax.rsqrt(jnp.maximum(var, eps))
  return _sg(jnp.where(mask_BxT, adv_BxT, 0.0))


def dapo_group_filter(rewards_B: Array, group_size: int) -> Array:
  """DAPO dynamic sampling: `keep_B` is False for every row of a group whose scorable (finite)
  rewards are all equal (fewer than two scorable: dropped too)."""
  r_NxG = _groups(rewards_B, group_size)
  valid_NxG = jnp.isfinite(r_NxG)
  keep_N = (jnp.max(jnp.where(valid_NxG, r_NxG, -jnp.inf), axis=1) >
            jnp.min(jnp.where(valid_NxG, r_NxG, jnp.inf), axis=1))
  return jnp.repeat(keep_N, group_size)


def overlong_penalty(lengths_B: Array, max_len: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> Array:
  """DAPO soft overlong shaping: `min(−(|y| − (L_max − L_buf)) / L_buf · factor, 0)` (≤ 0)."""
  if buffer_len <= 0:
    raise ValueError(f"buffer_len must be positive, got {buffer_len}")
  excess_B = lengths_B.astype(jnp.float32) - (max_len - buffer_len)
  return jnp.minimum(-excess_B / buffer_len * penalty_factor, 0.0)


# ----------------------------------------------------------------------------------------------
# Policy-gradient losses.
# ----------------------------------------------------------------------------------------------


def policy_gradient_loss(logp_BxT: Array, old_logp_BxT: Array | None, advantages: Array,
                         mask_BxT: Array, *, clip_low: float = 0.2, clip_high: float = 0.2,
                         loss_type: str = "grpo", max_completion_len: int | None = None,
                         num_active_tokens: Array | None = None,
                         ref_logp_BxT: Array | None = None, kl_coef: float = 0.0,
                         kl_kind: str = "k3", importance_sampling_level: str = "token",
                         delta: float = 0.0,
                         policy_mask_BxT: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """Clipped token-level policy gradient (GRPO / BNPO / Dr. GRPO / DAPO / CISPO), TRL semantics.

  Per token `ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β·KL`, `ρ = exp(lp_θ − lp_old)` (log-ratio
  clamped ±20). `advantages` is `A_B` (broadcast over tokens) or `A_BxT`. `old_logp_BxT=None` means
  on-policy (`lp_old = stop_gradient(lp_θ)`, so ρ = 1 with the policy gradient of ρ).
  `importance_sampling_level="sequence"` (GSPO): one ratio per row, `ρ_b = exp(Σ_t (lp_θ −
  lp_old)·m / max(Σ_t m, 1))`, clipped per sequence and used for each of its tokens.
  `delta > 0` (INTELLECT-2 two-sided clipping): the unclipped term uses `min(ρ, δ)`, which bounds
  the loss of tokens with A < 0. `loss_type="cispo"` (MiniMax-M1):
  `ℓ = −sg(min(ρ, 1+ε_high))·A·lp_θ` (the IS weight is capped, never the gradient; TRL caps at
  `epsilon_high`, here at `1 + clip_high`).
  `policy_mask_BxT` (e.g. `high_entropy_mask`) multiplies the policy term only (not the KL term,
  not the denominators), as TRL's `top_entropy_quantile`.
  Aggregation by `loss_type`:
    grpo:    mean_b [Σ_t ℓm / max(Σ_t m, 1)]  (empty rows add 0 and still count in B)
    bnpo:    Σ ℓm / max(Σ m, 1)
    dr_grpo: Σ ℓm / (B · max_completion_len)  (max_completion_len defaults to T)
    dapo, cispo: Σ ℓm / max(num_active_tokens, 1)  (default Σ m; pass the global count when
             accumulating gradients over micro-batches)
  The KL term (estimator `kl_kind`) is computed when `ref_logp_BxT` is given and weighted by
  `kl_coef`. Returns `(loss, aux)`; aux (detached, masked token means): clip_fraction (TRL
  "region": ρ clipped low with A < 0 or high with A > 0; cispo: capped with A > 0),
  clip_low_fraction, clip_high_fraction, kl, ratio_mean.
  """
  if loss_type not in PG_LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {PG_LOSS_TYPES}, got {loss_type!r}")
  if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                     f"got {importance_sampling_level!r}")
  mask_BxT = _bool(mask_BxT)
  logp_BxT = _zero_invalid(logp_BxT, mask_BxT)
  old_BxT = _sg(logp_BxT if old_logp_BxT is None else _zero_invalid(old_logp_BxT, mask_BxT))
  adv = _sg(jnp.asarray(advantages, jnp.float32))
  adv_BxT = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp_BxT.shape)

  log_ratio_BxT = logp_BxT - old_BxT
  if importance_sampling_level == "sequence":
    log_ratio_BxT = jnp.broadcast_to(masked_mean(log_ratio_BxT, mask_BxT, axis=-1)[:, None],
                                     logp_BxT.shape)
  ratio_BxT = jnp.exp(jnp.clip(log_ratio_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  if loss_type == "cispo":
    per_token_BxT = -_sg(jnp.minimum(ratio_BxT, 1.0 + clip_high)) * adv_BxT * logp_BxT
  else:
    unclipped_BxT = jnp.minimum(ratio_BxT, delta) if delta > 0 else ratio_BxT
    per_token_BxT = -jnp.minimum(unclipped_BxT * adv_BxT, clipped_BxT * adv_BxT)
  if policy_mask_BxT is not None:
    per_token_BxT = jnp.where(_bool(policy_mask_BxT), per_token_BxT, 0.0)
  if ref_logp_BxT is not None:
    kl_BxT = kl_estimate(logp_BxT, _zero_invalid(ref_logp_BxT, mask_BxT), kl_kind)
    per_token_BxT = per_token_BxT + kl_coef * kl_BxT
  else:
    kl_BxT = jnp.zeros_like(logp_BxT)

  total = masked_sum(per_token_BxT, mask_BxT)
  if loss_type == "grpo":
    loss = jnp.mean(masked_mean(per_token_BxT, mask_BxT, axis=-1))
  elif loss_type == "bnpo":
    loss = total / masked_count(mask_BxT)
  elif loss_type == "dr_grpo":
    width = logp_BxT.shape[-1] if max_completion_len is None else max_completion_len
    loss = total / (logp_BxT.shape[0] * width)
  else:  # dapo, cispo
    count = masked_count(mask_BxT) if num_active_tokens is None else jnp.maximum(
        jnp.asarray(num_active_tokens, jnp.float32), 1.0)
    loss = total / count

  low_BxT = (ratio_BxT < 1.0 - clip_low) & (adv_BxT < 0) & (loss_type != "cispo")
  high_BxT = (ratio_BxT > 1.0 + clip_high) & (adv_BxT > 0)
  aux = {
      "clip_fraction": masked_mean((low_BxT | high_BxT).astype(jnp.float32), mask_BxT),
      "clip_low_fraction": masked_mean(low_BxT.astype(jnp.float32), mask_BxT),
      "clip_high_fraction": masked_mean(high_BxT.astype(jnp.float32), mask_BxT),
      "kl": masked_mean(kl_BxT, mask_BxT),
      "ratio_mean": masked_mean(ratio_BxT, mask_BxT),
  }
  return loss, jax.tree.map(_sg, aux)


def rloo_loss(logp_BxT: Array, old_logp_BxT: Array | None, advantages_B: Array,
              mask_BxT: Array, *, clip_low: float = 0.2,
              clip_high: float = 0.2) -> tuple[Array, dict[str, Array]]:
  """TRL RLOO: PPO-clip on the *sequence* ratio, batch mean.

  `ρ_b = exp(Σ_t (lp_θ − lp_old)·m)` (log-ratio clamped ±20);
  `loss = mean_b max(−A_b ρ_b, −A_b clip(ρ_b, 1−ε_low, 1+ε_high))`. `advantages_B` usually
  comes from `rloo_advantages(kl_penalized_rewards(...))`. aux: clip_fraction (sequences whose
  clipped branch is active, TRL "region" definition), ratio_mean.
  """
  logp_BxT = _zero_invalid(logp_BxT, mask_BxT)
  old_BxT = _sg(logp_BxT if old_logp_BxT is None else _zero_invalid(old_logp_BxT, mask_BxT))
  adv_B = _sg(advantages_B.astype(jnp.float32))
  log_ratio_B = jnp.clip(masked_sum(logp_BxT - old_BxT, mask_BxT, axis=-1), -LOG_RATIO_CLAMP,
                         LOG_RATIO_CLAMP)
  ratio_B = jnp.exp(log_ratio_B)
  clipped_B = jnp.clip(ratio_B, 1.0 - clip_low, 1.0 + clip_high)
  loss = jnp.mean(jnp.maximum(-adv_B * ratio_B, -adv_B * clipped_B))
  region_B = (((ratio_B < 1.0 - clip_low) & (adv_B < 0)) |
              ((ratio_B > 1.0 + clip_high) & (adv_B > 0)))
  aux = {"clip_fraction": jnp.mean(region_B.astype(jnp.float32)), "ratio_mean": jnp.mean(ratio_B)}
  return loss, jax.tree.map(_sg, aux)


# ----------------------------------------------------------------------------------------------
# Preference losses (per pair; take the batch mean outside).
# ----------------------------------------------------------------------------------------------


def _pair_aux(chosen_rewards_B: Array, rejected_rewards_B: Array) -> dict[str, Array]:
  chosen_rewards_B, rejected_rewards_B = _sg(chosen_rewards_B), _sg(rejected_rewards_B)
  return {
      "chosen_rewards": chosen_rewards_B,
      "rejected_rewards": rejected_rewards_B,
      "margins": chosen_rewards_B - rejected_rewards_B,
      "accuracy": (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32),
  }


def _smoothed_sigmoid_loss(z: Array, label_smoothing: float) -> Array:
  """`−(1−ε)·logσ(z) − ε·logσ(−z)` (conservative DPO / SimPO label smoothing)."""
  loss = -jax.nn.log_sigmoid(z)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-z)
  return loss


def dpo_loss(policy_chosen_logp_B: Array, policy_rejected_logp_B: Array,
             ref_chosen_logp_B: Array, ref_rejected_logp_B: Array, *, loss_type: str = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0, chosen_len_B: Array | None = None,
             rejected_len_B: Array | None = None, discopop_tau: float = 0.05,
             bco_delta: float | Array = 0.0,
             valid_B: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """DPO family per pair, TRL `loss_type` semantics. Inputs are summed sequence log-probs.

  With c = lp_θ(y_w) − lp_ref(y_w), r = lp_θ(y_l) − lp_ref(y_l), Δ = c − r, z = βΔ:
    sigmoid   −(1−ε)logσ(z) − ε·logσ(−z)        (ε = label_smoothing; 0 = plain DPO)
    hinge     relu(1 − z)
    ipo       (Δ̄ − 1/(2β))², all four lps divided by their completion length first
              (`chosen_len_B`, `rejected_len_B` required; lengths clamp to ≥ 1)
    robust    [−(1−ε)logσ(z) + ε·logσ(−z)] / (1 − 2ε), ε ∈ [0, 0.5)
    exo_pair  σ(z)[logσ(z) − log(1−ε)] + σ(−z)[logσ(−z) − log ε], ε = label_smoothing or 1e-3
    nca_pair  −logσ(βc) − ½logσ(−βc) − ½logσ(−βr)
    bco_pair  −logσ(βc − δ) − logσ(−(βr − δ)); δ = `bco_delta` (0 as in current TRL; older TRL
              used a running mean of the rewards, which the caller may pass)
    sppo_hard (c − 1/(2β))² + (r + 1/(2β))²
    apo_zero  (1 − σ(βc)) + σ(βr)
    apo_down  σ(βc) + (1 − σ(βΔ))
    aot       smoothed sigmoid (as `sigmoid`) of β·[sort_B(lp_θ(y_w) − lp_θ(y_l)) −
              sort_B(lp_ref(y_w) − lp_ref(y_l))]: the i-th smallest policy log-ratio against the
              i-th smallest reference one (AOT, paired)
    aot_pair  smoothed sigmoid of β·[sort_B(c) − sort_B(r)] (AOT, unpaired; TRL >= 0.20 calls it
              `aot_unpaired`)
    sigmoid_norm  −logσ(β(c/|y_w| − r/|y_l|)): length-normalised log-ratios (lengths required,
              clamped to ≥ 1; no label smoothing, as TRL)
    discopop  m = σ(z/τ): (1 − m)(−logσ(z)) + m·exp(−z), with m·exp(−z) = exp(logσ(z/τ) − z)
  The aot types sort over the batch: `valid_B` (default all True) marks the pairs that take part;
  the others sort last in both orders and get the loss 0, and the i-th sorted loss is reported at
  the i-th valid pair, so a 0/1-weighted mean over pairs is TRL's mean over the valid batch.
  Reference log-probs are stop_gradient'ed. Returns `(loss_B, aux)`, aux (detached, per pair):
  chosen_rewards = βc, rejected_rewards = βr (length-normalised for ipo), margins, accuracy.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pc, pr = f32(policy_chosen_logp_B), f32(policy_rejected_logp_B)
  rc, rr = _sg(f32(ref_chosen_logp_B)), _sg(f32(ref_rejected_logp_B))
  if loss_type in ("ipo", "sigmoid_norm"):
    if chosen_len_B is None or rejected_len_B is None:
      raise ValueError(f"{loss_type} needs chosen_len_B and rejected_len_B (length-normalised "
                       "log-probs)")
    len_c = jnp.maximum(f32(chosen_len_B), 1.0)
    len_r = jnp.maximum(f32(rejected_len_B), 1.0)
  if loss_type == "ipo":
    pc, rc, pr, rr = pc / len_c, rc / len_c, pr / len_r, rr / len_r
  c, r = pc - rc, pr - rr
  delta = c - r
  z = beta * delta
  log_sig = jax.nn.log_sigmoid

  if loss_type == "sigmoid":
    loss = _smoothed_sigmoid_loss(z, label_smoothing)
  elif loss_type == "hinge":
    loss = jax.nn.relu(1.0 - z)
  elif loss_type == "ipo":
    loss = jnp.square(delta - 1.0 / (2.0 * beta))
  elif loss_type == "robust":
    if not 0.0 <= label_smoothing < 0.5:
      raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {label_smoothing}")
    loss = ((1.0 - label_smoothing) * -log_sig(z) + label_smoothing * log_sig(-z)) / (
        1.0 - 2.0 * label_smoothing)
  elif loss_type == "exo_pair":
    eps = label_smoothing or 1e-3
    loss = (jax.nn.sigmoid(z) * (log_sig(z) - math.log1p(-eps)) +
            jax.nn.sigmoid(-z) * (log_sig(-z) - math.log(eps)))
  elif loss_type == "nca_pair":
    loss = -log_sig(beta * c) - 0.5 * log_sig(-beta * c) - 0.5 * log_sig(-beta * r)
  elif loss_type == "bco_pair":
    delta_bco = _sg(f32(bco_delta))
    loss = -log_sig(beta * c - delta_bco) - log_sig(-(beta * r - delta_bco))
  elif loss_type == "sppo_hard":
    loss = jnp.square(c - 0.5 / beta) + jnp.square(r + 0.5 / beta)
  elif loss_type == "apo_zero":
    loss = (1.0 - jax.nn.sigmoid(beta * c)) + jax.nn.sigmoid(beta * r)
  elif loss_type == "apo_down":
    loss = jax.nn.sigmoid(beta * c) + (1.0 - jax.nn.sigmoid(z))
  elif loss_type in ("aot", "aot_pair"):
    first, second = ((pc - pr, rc - rr) if loss_type == "aot" else (c, r))
    loss = _sorted_pair_loss(first, second, beta, label_smoothing, valid_B)
  elif loss_type == "sigmoid_norm":
    loss = -log_sig(beta * (c / len_c - r / len_r))
  else:  # discopop
    loss = (jax.nn.sigmoid(-z / discopop_tau) * -log_sig(z) +
            jnp.exp(log_sig(z / discopop_tau) - z))
  return loss, _pair_aux(beta * c, beta * r)


def _sorted_pair_loss(first_B: Array, second_B: Array, beta, label_smoothing: float,
                      valid_B: Array | None) -> Array:
  """AOT: the smoothed sigmoid loss of β·(sort(first) − sort(second)) over the valid pairs.

  Invalid pairs sort last in both orders (the same count in each), so the valid ones pair up
  among themselves; the i-th sorted loss is put at the i-th valid pair (in batch order) and
  invalid pairs get 0, so `Σ_p valid_p·loss_p` is the sum over the sorted valid positions.
  """
  valid = (jnp.ones(first_B.shape, bool) if valid_B is None else _bool(valid_B))
  big = jnp.finfo(jnp.float32).max
  sort = lambda x: jnp.sort(jnp.where(valid, x, big))
  delta = sort(first_B) - sort(second_B)  # big − big = 0 at the invalid tail
  loss_sorted = _smoothed_sigmoid_loss(beta * delta, label_smoothing)
  rank = jnp.cumsum(valid) - 1  # the i-th valid pair takes the i-th sorted loss
  return jnp.where(valid, loss_sorted[jnp.clip(rank, 0, first_B.shape[0] - 1)], 0.0)


def sft_pair_loss(chosen_logp_B: Array, chosen_len_B: Array, weight_B: Array) -> Array:
  """MPO's `sft` term (TRL `loss_type="sft"`): the token-mean NLL of the chosen completions of the
  batch, `−Σ_p w_p·lp_θ(y_w) / max(Σ_p w_p·|y_w|, 1)` (summed lps; w = pair weight), broadcast
  to `[B]` so that a weighted mean over pairs gives it back."""
  w = jnp.asarray(weight_B, jnp.float32)
  nll = -jnp.sum(w * jnp.asarray(chosen_logp_B, jnp.float32)) / jnp.maximum(
      jnp.sum(w * jnp.asarray(chosen_len_B, jnp.float32)), 1.0)
  return jnp.broadcast_to(nll, w.shape)


def spin_loss(policy_real_logp_B: Array, policy_generated_logp_B: Array,
              ref_real_logp_B: Array, ref_generated_logp_B: Array, *, beta: float = 0.1,
              loss_type: str = "sigmoid") -> tuple[Array, dict[str, Array]]:
  """SPIN: `−logσ(β[(lp_θ(y) − lp_t(y)) − (lp_θ(y′) − lp_t(y′))])` (or hinge `relu(1 − βΔ)`).

  y = gold SFT response, y′ = generated by the previous iterate θ_t, which is also the reference.
  Summed log-probs. Same `(loss_B, aux)` as `dpo_loss`.
  """
  if loss_type not in ("sigmoid", "hinge"):
    raise ValueError(f"SPIN loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
  return dpo_loss(policy_real_logp_B, policy_generated_logp_B, ref_real_logp_B,
                  ref_generated_logp_B, loss_type=loss_type, beta=beta)


def simpo_loss(avg_chosen_logp_B: Array, avg_rejected_logp_B: Array, *, beta: float = 0.1,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """SimPO (TRL CPOTrainer): `−logσ(β(avg_w − avg_l) − γ)`, token-averaged lps, no reference.

  TRL defaults β = 0.1, γ = 0.5 (the paper uses β ≈ 2–2.5). The optional NLL term on y_w is left to
  the caller. aux: chosen/rejected_rewards = β·avg, margins, accuracy.
  """
  avg_c = jnp.asarray(avg_chosen_logp_B, jnp.float32)
  avg_r = jnp.asarray(avg_rejected_logp_B, jnp.float32)
  loss = _smoothed_sigmoid_loss(beta * (avg_c - avg_r) - gamma, label_smoothing)
  return loss, _pair_aux(beta * avg_c, beta * avg_r)


def log1mexp(x: Array) -> Array:
  """`log(1 − exp(x))` for x < 0, stable (Mächler 2012); x is clamped to ≤ −1e-7 (finite)."""
  x = jnp.minimum(x, _LOG1MEXP_MAX)
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(avg_chosen_logp_B: Array, avg_rejected_logp_B: Array, chosen_nll: Array, *,
              lam: float = 0.1) -> tuple[Array, dict[str, Array]]:
  """ORPO: `NLL(y_w) − λ·logσ(log_odds)`.

  `log_odds = (a_w − a_l) − (log1mexp(a_w) − log1mexp(a_l))`, a = token-averaged lp. `chosen_nll`
  is a scalar (TRL: token-mean NLL of the chosen batch) or per pair, broadcast to `loss_B`, so
  `mean(loss_B)` is the TRL loss. aux: chosen/rejected_rewards = λ·a (TRL logs β·a with β = λ),
  margins, accuracy, log_odds, log_odds_ratio = logσ(log_odds).
  """
  a_c = jnp.asarray(avg_chosen_logp_B, jnp.float32)
  a_r = jnp.asarray(avg_rejected_logp_B, jnp.float32)
  log_odds_B = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
  ratio_B = jax.nn.log_sigmoid(log_odds_B)
  loss = jnp.asarray(chosen_nll, jnp.float32) - lam * ratio_B
  loss = jnp.broadcast_to(loss, ratio_B.shape)
  aux = _pair_aux(lam * a_c, lam * a_r)
  aux["log_odds"] = _sg(log_odds_B)
  aux["log_odds_ratio"] = _sg(ratio_B)
  return loss, aux


def kto_loss(policy_logp_B: Array, ref_logp_B: Array, desirable_B: Array,
             policy_kl_logp_B: Array, ref_kl_logp_B: Array, *, beta: float = 0.1,
             desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """KTO (TRL): unpaired examples labelled desirable / undesirable.

  `z0 = max(0, mean(lp_θ(y′) − lp_ref(y′)))` over mismatched (prompt, completion) pairs, detached;
  ρ = lp_θ(y) − lp_ref(y); desirable `w_d·(1 − σ(β(ρ − z0)))`, undesirable
  `w_u·(1 − σ(β(z0 − ρ)))`. Returns `(loss_B, aux)`; aux: rewards = βρ (detached), kl = z0.
  """
  z0 = jnp.maximum(
      jnp.mean(_sg(jnp.asarray(policy_kl_logp_B, jnp.float32)) -
               _sg(jnp.asarray(ref_kl_logp_B, jnp.float32))), 0.0)
  log_ratio_B = jnp.asarray(policy_logp_B, jnp.float32) - _sg(jnp.asarray(ref_logp_B, jnp.float32))
  desirable_loss_B = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (log_ratio_B - z0)))
  undesirable_loss_B = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - log_ratio_B)))
  loss = jnp.where(_bool(desirable_B), desirable_loss_B, undesirable_loss_B)
  return loss, {"rewards": _sg(beta * log_ratio_B), "kl": z0}
