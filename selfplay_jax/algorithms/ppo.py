"""PPO with a value head (issue 21): GAE advantages from a learned value, clipped policy and value
losses, all inside the one jitted round (docs/algorithms.md, "PPO with a value head").

The value head is a Dense(hidden -> 1) on the final hidden state (after the final norm) at each
completion position, the state before that token is chosen: V(s_t) sits where the logits of
token t are (OpenRLHF's `CriticModel`, TRL's `values[:, context_length - 1:-1]`). Its params live
in the training params tree beside the model's (`params["value_head"]`), so the optimizer,
sharding, checkpoints and resume carry them; HF export writes only the model's tensors, so it
drops them. With `separate_critic` the values come from a second trunk, `params["critic"]`, a copy
of the policy's params (made when the state is made, and again from the warmed-up policy when the
SFT warm-up ends: `after_warmup`).

Per round (`build`): old log-probs and old values under the sampling params (`logp.old_forward`),
token rewards (the sequence reward on the last completion token, minus `kl_coef * (lp_old -
lp_ref)` on every token, OpenRLHF's `compute_reward`), GAE over completion tokens
(`gae_advantages`), returns = advantages + old values, advantages whitened over the round's tokens.
Per minibatch (`loss`): the clipped token loss of the PG family (`losses.policy_gradient_loss`) plus
`vf_coef` x the clipped value loss (`value_loss`).

Value warm-up: for the first `value_warmup_rounds` PPO rounds only the value head (or critic)
trains. That is an optimizer gate (`freeze_policy`), not a loss weight: Adam's momentum from the
SFT warm-up would otherwise keep moving the policy on zero gradients. The gate sits in the
optimizer state (its own step count), so it is inside the jitted round and resumes exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.losses import PG_LOSS_TYPES
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.models import decoder
from selfplay_jax.models.config import ModelConfig
from selfplay_jax.rows import Rows, rollout_rows

VALUE_HEAD = "value_head"  # params["value_head"] = {"kernel": [D, 1], "bias": [1]} (float32)
CRITIC = "critic"  # params["critic"]: the separate critic's trunk (a copy of the model's params)
OWN_PARAMS = (VALUE_HEAD, CRITIC)  # PPO's entries of the params tree (not the policy's)

Array = jax.Array


# ---- the value head ------------------------------------------------------------------------------


def policy_params(params: dict) -> dict:
  """The model's own entries of a PPO params tree (what sampling, evaluation and export read)."""
  return {k: v for k, v in params.items() if k not in OWN_PARAMS}


def with_value_head(params: dict, separate_critic: bool = False) -> dict:
  """`params` plus a zero-initialised value head (and with `separate_critic`, a copy of the
  model's params as the critic trunk). Zeros: V = 0 before any update, and the head's gradient
  (the hidden state) is non-zero, so it learns from the first step."""
  hidden = params["final_norm"]["scale"].shape[-1]
  out = dict(params)
  out[VALUE_HEAD] = {"kernel": jnp.zeros((hidden, 1), jnp.float32),
                     "bias": jnp.zeros((1,), jnp.float32)}
  if separate_critic:  # host (NumPy) leaves of a loaded checkpoint stay on the host
    out[CRITIC] = jax.tree.map(_copy, policy_params(params))
  return out


def _copy(x):
  return np.array(x, copy=True) if isinstance(x, np.ndarray) else jnp.copy(x)


def value_head(head: dict, hidden_BxTxD: Array) -> Array:
  """V = h . kernel + bias in float32: [B, T]."""
  return (jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), head["kernel"][:, 0])
          + head["bias"][0])


def completion_forward(config: ModelConfig, params, rows: Rows,
                       temperature: float = 1.0) -> tuple[Array, Array]:
  """(log-probs [R, N] float32 of softmax(logits / T), final hidden states [R, N, D]) of the
  completion tokens: the inputs and the one-position shift of
  `models.logprobs.completion_logprobs`, with the trunk's hidden state at each position that
  predicts a completion token."""
  prompt_len = rows["prompt_tokens"].shape[1]
  tokens = jnp.concatenate([rows["prompt_tokens"], rows["tokens"]], axis=1)
  segments = jnp.concatenate([rows["prompt_mask"], jnp.ones_like(rows["mask"])],
                             axis=1).astype(jnp.int32)
  logits, hidden = decoder.forward(config, params, tokens[:, :-1], segment_ids=segments[:, :-1],
                                   return_hidden=True)
  logits = logits[:, prompt_len - 1:].astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  target = jnp.take_along_axis(logits, rows["tokens"][..., None].astype(jnp.int32), axis=-1)[..., 0]
  return target - jax.nn.logsumexp(logits, axis=-1), hidden[:, prompt_len - 1:]


def policy_and_values(config: ModelConfig, params, rows: Rows, separate_critic: bool = False,
                      temperature: float = 1.0) -> tuple[Array, Array]:
  """(log-probs [R, N] under logits / T, values [R, N]): one trunk pass with the head on the
  policy's hidden states, or with `separate_critic` a second pass through the critic trunk (its
  logits are unused, so XLA drops its LM head)."""
  logp, hidden = completion_forward(config, policy_params(params), rows, temperature)
  if separate_critic:
    _, hidden = completion_forward(config, params[CRITIC], rows)
  return logp, value_head(params[VALUE_HEAD], hidden)


# ---- rewards, GAE, whitening, value loss ---------------------------------------------------------


def token_rewards(rewards_B: Array, mask_BxT: Array, old_logp_BxT: Array | None = None,
                  ref_logp_BxT: Array | None = None, kl_coef: float = 0.0) -> Array:
  """r_t = -kl_coef * (lp_old - lp_ref)_t on every completion token, plus the sequence reward on
  the last one (OpenRLHF `compute_reward`, k1 clamped +-20); 0 off the mask. An all-False row
  drops its reward (it has no token to carry it)."""
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  r_BxT = jnp.where(losses.last_token_mask(mask_BxT), rewards_B.astype(jnp.float32)[:, None], 0.0)
  if kl_coef and ref_logp_BxT is not None:
    kl_BxT = losses.kl_k1(old_logp_BxT, ref_logp_BxT)
    r_BxT = r_BxT + jnp.where(mask_BxT, -kl_coef * kl_BxT, 0.0)
  return r_BxT


def gae_advantages(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[Array, Array]:
  """Generalised advantage estimation over completion tokens: (advantages, returns), [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    returns_t = A_t + V_t.
  Values and rewards off the mask count 0, so the value after the last token is 0 (the episode
  ends there), as in OpenRLHF `get_advantages_and_returns` / TRL's PPO loop. Both outputs are 0
  off the mask and carry no gradient."""
  m = jnp.asarray(mask_BxT).astype(bool)
  r = jnp.where(m, rewards_BxT, 0.0).astype(jnp.float32)
  v = jnp.where(m, jax.lax.stop_gradient(values_BxT), 0.0).astype(jnp.float32)
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta_TxB = (r + gamma * next_v - v).T

  def back(carry, delta_B):
    adv_B = delta_B + gamma * lam * carry
    return adv_B, adv_B

  _, adv_TxB = jax.lax.scan(back, jnp.zeros_like(delta_TxB[0]), delta_TxB, reverse=True)
  adv = jnp.where(m, adv_TxB.T, 0.0)
  return adv, jnp.where(m, adv + v, 0.0)


def whiten(x_BxT: Array, mask_BxT: Array, eps: float = 1e-8) -> Array:
  """(x - mean) * rsqrt(var + eps) over the valid tokens of the whole batch (population
  variance, OpenRLHF's advantage normalisation); 0 off the mask."""
  mean = losses.masked_mean(x_BxT, mask_BxT)
  var = losses.masked_mean(jnp.square(x_BxT - mean), mask_BxT)
  return jnp.where(jnp.asarray(mask_BxT).astype(bool), (x_BxT - mean) * jax.lax.rsqrt(var + eps),
                   0.0)


def value_loss(values_BxT: Array, old_values_BxT: Array, returns_BxT: Array, mask_BxT: Array,
               clip: float = 0.2) -> tuple[Array, dict[str, Array]]:
  """Clipped value loss, 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) (plain
  0.5 * (V - R)^2 with `clip` 0), a token mean per sequence then a mean over the batch (OpenRLHF
  `ValueLoss`). Returns (loss, aux): value_clip_fraction (tokens where the clipped term is the
  larger one), value_mean, return_mean, value_error (masked mean |V - R|), all detached."""
  mask_BxT = jnp.asarray(mask_BxT).astype(bool)
  v = jnp.where(mask_BxT, values_BxT.astype(jnp.float32), 0.0)
  old = jax.lax.stop_gradient(jnp.where(mask_BxT, old_values_BxT, 0.0))
  ret = jax.lax.stop_gradient(jnp.where(mask_BxT, returns_BxT, 0.0))
  plain = jnp.square(v - ret)
  if clip > 0:
    clipped = jnp.square(old + jnp.clip(v - old, -clip, clip) - ret)
    per_token = jnp.maximum(plain, clipped)
    clip_frac = losses.masked_mean((clipped > plain).astype(jnp.float32), mask_BxT)
  else:
    per_token, clip_frac = plain, jnp.zeros(())
  loss = 0.5 * jnp.mean(losses.masked_mean(per_token, mask_BxT, axis=-1))
  aux = {"value_clip_fraction": clip_frac, "value_mean": losses.masked_mean(v, mask_BxT),
         "return_mean": losses.masked_mean(ret, mask_BxT),
         "value_error": losses.masked_mean(jnp.abs(v - ret), mask_BxT)}
  return loss, jax.tree.map(jax.lax.stop_gradient, aux)


# ---- the value warm-up's optimizer gate ----------------------------------------------------------


class FreezeState(NamedTuple):
  count: Array  # optimizer steps taken through this gate
  inner: Any


def freeze_policy(inner: optax.GradientTransformation, start: int,
                  end: int) -> optax.GradientTransformation:
  """`inner` with the gradients and updates of every param outside PPO's own (value head,
  critic) zeroed for the optimizer steps `start <= step < end`: the value warm-up trains only
  the value. Zeroing the updates too stops Adam's momentum from earlier steps (the SFT warm-up)
  moving the policy; zeroing the gradients keeps them out of the moments and the global-norm
  clip. `start == end`: a no-op gate (the step count is still kept)."""

  def gate(tree, frozen):
    return {k: v if k in OWN_PARAMS else jax.tree.map(
        lambda x: jnp.where(frozen, jnp.zeros_like(x), x), v) for k, v in tree.items()}

  def init(params):
    return FreezeState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(grads, state, params=None):
    frozen = (state.count >= start) & (state.count < end)
    updates, inner_state = inner.update(gate(grads, frozen), state.inner, params)
    return gate(updates, frozen), FreezeState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


# ---- the spec ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PPO:
  """PPO on the round's rollouts; `configs/ppo.py` picks the fields (keys in docs/algorithms.md).

  loss_type: the PG family's token aggregation of the clipped policy loss (default grpo: token
    mean per sequence, then batch mean, OpenRLHF's `PolicyLoss`).
  kl_coef: per-token KL penalty to the frozen reference folded into the rewards (0: no reference
    kept). gamma / gae_lambda: GAE. value_clip: value clip range around the old values (0 = off).
  vf_coef: weight of the value loss. separate_critic: values from a critic trunk of their own.
  value_warmup: (first, last + 1) optimizer steps of the value warm-up (`freeze_policy`).
  temperature: the log-probs' T (logits / T), the sampling temperature (1 when greedy), as the
    PG family; the round's frozen reference pass reads it too (spec option `temperature`).
  """

  name: str = "ppo"
  loss_type: str = "grpo"
  clip_low: float = 0.2
  clip_high: float = 0.2
  kl_coef: float = 0.0
  gamma: float = 1.0
  gae_lambda: float = 0.95
  value_clip: float = 0.2
  vf_coef: float = 0.1
  separate_critic: bool = False
  value_warmup: tuple[int, int] = (0, 0)
  temperature: float = 1.0
  samples: bool = True
  reference: str = "none"
  restart_from_base: bool = False

  def __post_init__(self):
    if self.loss_type not in PG_LOSS_TYPES:
      raise ValueError(f"algorithm.loss_type: {self.loss_type!r} is not one of {PG_LOSS_TYPES}")

  # -- spec options (spec.OPTIONAL) --

  def init_params(self, params: dict) -> dict:
    return with_value_head(params, self.separate_critic)

  def after_warmup(self, params: dict) -> dict:
    """The separate critic restarts from the warmed-up policy's trunk (the value head stays)."""
    if not self.separate_critic:
      return params
    return {**params, CRITIC: jax.tree.map(jnp.copy, policy_params(params))}

  def forward(self, model_config: ModelConfig, params, rows: Rows) -> tuple[Array, Array]:
    return policy_and_values(model_config, params, rows, self.separate_critic, self.temperature)

  def wrap_optimizer(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    return freeze_policy(optimizer, *self.value_warmup)

  # -- the round --

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    if logp.old_forward is None:
      raise ValueError("PPO.build needs logp.old_forward (round.build_rows gives it for a spec "
                       "with a forward)")
    rows = rollout_rows(rollout)
    rewards = jnp.nan_to_num(rewards.astype(jnp.float32))  # a judge's invalid score counts 0
    old_logp, old_values = logp.old_forward(rows)
    ref_logp = logp.ref(rows) if self.kl_coef > 0 else None
    r_BxT = token_rewards(rewards, rows["mask"], old_logp, ref_logp, self.kl_coef)
    adv, returns = gae_advantages(r_BxT, old_values, rows["mask"], self.gamma, self.gae_lambda)
    rows.update(old_logp=old_logp, old_values=old_values, returns=returns,
                advantages=whiten(adv, rows["mask"]))
    if ref_logp is not None:
      rows["ref_logp"] = ref_logp  # for train/kl_ref
    return rows

  def loss(self, out: tuple[Array, Array], rows: Rows):
    logp, values = out
    pg, aux = losses.policy_gradient_loss(
        logp, rows["old_logp"], rows["advantages"], rows["mask"], clip_low=self.clip_low,
        clip_high=self.clip_high, loss_type=self.loss_type,
        max_completion_len=rows["mask"].shape[-1])
    aux.pop("kl", None)  # the KL is in the rewards here (train/kl_ref reports it)
    vf, value_aux = value_loss(values, rows["old_values"], rows["returns"], rows["mask"],
                               self.value_clip)
    return pg + self.vf_coef * vf, {**aux, **value_aux, "policy_loss": pg, "value_loss": vf}
