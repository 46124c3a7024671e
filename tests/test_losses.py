"""Losses and advantages vs independent float64 NumPy re-derivations, hand values and edge cases.

The `np_*` references below are written from `docs/algorithms.md` with explicit loops and do not
call the JAX code. Edge cases: all-equal group rewards, fully masked rows, length-1 completions,
all-masked batches (no NaN), ±1e4 margins (finite losses and gradients), and gradient isolation
(nothing flows into reference / old-policy log-probs or advantages).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax.algorithms import losses as L

RTOL, ATOL = 2e-5, 2e-5
DPO_TYPES = L.DPO_LOSS_TYPES
PG_TYPES = L.PG_LOSS_TYPES


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------
# float64 NumPy references (independent of the JAX code).
# ------------------------------------------------------------------------------------------------


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sigmoid(x):
  return np.exp(np_log_sigmoid(x))


def np_masked_mean(x, m):
  x, m = np.asarray(x, np.float64), np.asarray(m, bool)
  n = m.sum()
  return float(x[m].sum() / n) if n else 0.0


def np_token_logprobs(logits, targets, temperature=1.0):
  logits = np.asarray(logits, np.float64) / temperature
  b, t, _ = logits.shape
  out = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      row = logits[i, j]
      mx = row.max()
      out[i, j] = row[targets[i, j]] - (mx + np.log(np.exp(row - mx).sum()))
  return out


def np_entropy(logits):
  logits = np.asarray(logits, np.float64)
  mx = logits.max(-1, keepdims=True)
  p = np.exp(logits - mx)
  p = p / p.sum(-1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return -plogp.sum(-1)


def np_seq_logprob(logp, mask, average):
  out = []
  for row, m in zip(np.asarray(logp, np.float64), np.asarray(mask, bool)):
    s = row[m].sum()
    out.append(s / m.sum() if (average and m.sum()) else s)
  return np.array(out)


def np_kl(logp, ref, kind):
  l = np.clip(np.asarray(ref, np.float64) - np.asarray(logp, np.float64), -20, 20)
  return {"k1": -l, "k2": 0.5 * l * l, "k3": np.exp(l) - l - 1}[kind]


def np_grpo_adv(r, g, scale=True, eps=1e-4):
  r = np.asarray(r, np.float64)
  out = np.zeros_like(r)
  for s in range(0, len(r), g):
    grp = r[s:s + g]
    a = grp - grp.mean()
    if scale:
      std = grp.std(ddof=1) if g > 1 else 0.0
      a = a / (std + eps)
    out[s:s + g] = a
  return out


def np_rloo_adv(r, g):
  r = np.asarray(r, np.float64)
  out = np.zeros_like(r)
  for i in range(len(r)):
    s = (i // g) * g
    others = [r[j] for j in range(s, s + g) if j != i]
    out[i] = r[i] - np.mean(others)
  return out


def np_reinforce_pp(r, old, ref, mask, kl_coef, baseline=False, g=None, kind="k1"):
  r = np.asarray(r, np.float64).copy()
  mask = np.asarray(mask, bool)
  if baseline:
    for s in range(0, len(r), g):
      r[s:s + g] -= r[s:s + g].mean()
  kl = np_kl(old, ref, kind)
  b, t = mask.shape
  ret = np.zeros((b, t))
  for i in range(b):
    valid = np.nonzero(mask[i])[0]
    rew = np.zeros(t)
    for j in valid:
      rew[j] = -kl_coef * kl[i, j]
    if len(valid):
      rew[valid[-1]] += r[i]
    acc = 0.0
    for j in reversed(range(t)):
      acc += rew[j]
      ret[i, j] = acc
  vals = ret[mask]
  if vals.size == 0:
    return np.zeros((b, t))
  mean, var = vals.mean(), vals.var()
  return np.where(mask, (ret - mean) / np.sqrt(max(var, 1e-8)), 0.0)


def np_pg_loss(logp, old, adv, mask, clip_low, clip_high, loss_type, max_len=None, ref=None,
               kl_coef=0.0, kl_kind="k3", num_active=None):
  logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
  mask = np.asarray(mask, bool)
  b, t = mask.shape
  adv = np.asarray(adv, np.float64)
  if adv.ndim == 1:
    adv = np.repeat(adv[:, None], t, axis=1)
  ell = np.zeros((b, t))
  kl = np.zeros((b, t))
  ratio = np.zeros((b, t))
  region, low, high = np.zeros((b, t)), np.zeros((b, t)), np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      rho = math.exp(min(max(logp[i, j] - old[i, j], -20), 20))
      a = adv[i, j]
      ratio[i, j] = rho
      if loss_type == "cispo":  # capped IS weight (a constant) times A times lp
        ell[i, j] = -min(rho, 1 + clip_high) * a * logp[i, j]
      else:
        ell[i, j] = -min(rho * a, min(max(rho, 1 - clip_low), 1 + clip_high) * a)
      if ref is not None:
        kl[i, j] = np_kl(logp[i, j], ref[i, j], kl_kind)
        ell[i, j] += kl_coef * kl[i, j]
      low[i, j] = rho < 1 - clip_low and a < 0 and loss_type != "cispo"
      high[i, j] = rho > 1 + clip_high and a > 0
      region[i, j] = low[i, j] or high[i, j]
  total = sum(ell[i, j] for i in range(b) for j in range(t) if mask[i, j])
  if loss_type == "grpo":
    per_seq = [sum(ell[i][mask[i]]) / max(mask[i].sum(), 1) for i in range(b)]
    loss = np.mean(per_seq)
  elif loss_type == "bnpo":
    loss = total / max(mask.sum(), 1)
  elif loss_type == "dr_grpo":
    loss = total / (b * (t if max_len is None else max_len))
  else:
    loss = total / max(mask.sum() if num_active is None else num_active, 1)
  aux = {"clip_fraction": np_masked_mean(region, mask),
         "clip_low_fraction": np_masked_mean(low, mask),
         "clip_high_fraction": np_masked_mean(high, mask), "kl": np_masked_mean(kl, mask),
         "ratio_mean": np_masked_mean(ratio, mask)}
  return loss, aux


def np_dpo(pc, pr, rc, rr, loss_type, beta=0.1, ls=0.0, len_c=None, len_r=None, tau=0.05,
           delta_bco=0.0):
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  if loss_type == "ipo":
    lc, lr = np.maximum(len_c, 1), np.maximum(len_r, 1)
    pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
  c, r = pc - rc, pr - rr
  z = beta * (c - r)
  ls_ = np_log_sigmoid
  if loss_type == "sigmoid":
    loss = -(1 - ls) * ls_(z) - ls * ls_(-z)
  elif loss_type == "hinge":
    loss = np.maximum(0.0, 1 - z)
  elif loss_type == "ipo":
    loss = ((c - r) - 1 / (2 * beta))**2
  elif loss_type == "robust":
    loss = (-(1 - ls) * ls_(z) + ls * ls_(-z)) / (1 - 2 * ls)
  elif loss_type == "exo_pair":
    eps = ls if ls else 1e-3
    loss = np_sigmoid(z) * (ls_(z) - np.log(1 - eps)) + np_sigmoid(-z) * (ls_(-z) - np.log(eps))
  elif loss_type == "nca_pair":
    loss = -ls_(beta * c) - 0.5 * ls_(-beta * c) - 0.5 * ls_(-beta * r)
  elif loss_type == "bco_pair":
    loss = -ls_(beta * c - delta_bco) - ls_(-(beta * r - delta_bco))
  elif loss_type == "sppo_hard":
    loss = (c - 1 / (2 * beta))**2 + (r + 1 / (2 * beta))**2
  elif loss_type == "apo_zero":
    loss = (1 - np_sigmoid(beta * c)) + np_sigmoid(beta * r)
  elif loss_type == "apo_down":
    loss = np_sigmoid(beta * c) + (1 - np_sigmoid(z))
  elif loss_type in ("aot", "aot_pair"):  # every pair valid: the i-th sorted loss at pair i
    d = (np.sort(pc - pr) - np.sort(rc - rr) if loss_type == "aot" else np.sort(c) - np.sort(r))
    loss = -(1 - ls) * ls_(beta * d) - ls * ls_(-beta * d)
  elif loss_type == "sigmoid_norm":
    lc, lr = np.maximum(len_c, 1), np.maximum(len_r, 1)
    loss = -ls_(beta * (c / lc - r / lr))
  elif loss_type == "discopop":
    m = np_sigmoid(z / tau)
    loss = (1 - m) * (-ls_(z)) + m * np.exp(-z)
  else:
    raise ValueError(loss_type)
  return loss, beta * c, beta * r


def np_log1mexp(x):
  return np.log(1 - np.exp(np.asarray(x, np.float64)))


# ------------------------------------------------------------------------------------------------
# Fixtures.
# ------------------------------------------------------------------------------------------------


def _rng(seed=0):
  return np.random.default_rng(seed)


def _mask(b=5, t=7, seed=0):
  """Right-padded mask with a fully masked row (1), a length-1 row (2) and a full row (3)."""
  lengths = _rng(seed).integers(2, t, size=b)
  lengths[1], lengths[2], lengths[3] = 0, 1, t
  return np.arange(t)[None, :] < lengths[:, None]


def _pg_inputs(b=6, t=7, seed=0):
  rng = _rng(seed)
  logp = -rng.uniform(0.05, 3.0, size=(b, t)).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.5, size=(b, t))).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  return logp, old, ref, adv, _mask(b, t, seed)


def _pair_inputs(b=6, seed=0, scale=20.0):
  rng = _rng(seed)
  return tuple((-rng.uniform(1, scale, size=b)).astype(np.float32) for _ in range(4))


# ------------------------------------------------------------------------------------------------
# Masked reductions and log-prob helpers.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs(temperature):
  rng = _rng(1)
  logits = (rng.normal(size=(3, 4, 11)) * 5).astype(np.float32)
  targets = rng.integers(0, 11, size=(3, 4))
  got = L.token_logprobs(logits, targets, temperature)
  close(got, np_token_logprobs(logits, targets, temperature))
  assert got.dtype == jnp.float32
  # bf16 logits are upcast to float32 before the softmax.
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = L.token_logprobs(logits_bf16, targets, temperature)
  assert got.dtype == jnp.float32
  close(got, np_token_logprobs(np.asarray(logits_bf16.astype(jnp.float32)), targets, temperature))


def test_token_logprobs_hand():
  # Uniform over 4 tokens: log(1/4) whatever the target.
  close(L.token_logprobs(jnp.zeros((1, 2, 4)), np.array([[0, 3]])), [[-math.log(4)] * 2])


def test_masked_mean_and_sequence_logprob():
  x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, np.inf, np.nan]], np.float32)
  m = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], bool)
  close(L.masked_mean(x, m), np_masked_mean(x, m))
  close(L.masked_mean(x, m), (1 + 2 + 7) / 3)
  close(L.masked_mean(x, m, axis=-1), [1.5, 0.0, 7.0])
  close(L.masked_mean(x, np.zeros_like(m)), 0.0)  # empty mask: 0, not NaN
  for average in (False, True):
    got = L.sequence_logprob(x, m, average=average)
    close(got, np_seq_logprob(x, m, average))
  close(L.sequence_logprob(x, m), [3.0, 0.0, 7.0])
  close(L.sequence_logprob(x, m, average=True), [1.5, 0.0, 7.0])


def test_entropy():
  rng = _rng(2)
  logits = rng.normal(size=(2, 3, 6)).astype(np.float32) * 3
  logits[0, 0, :3] = -np.inf  # impossible tokens add 0, never NaN
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  close(L.token_entropy(logits), np_entropy(logits))
  close(L.entropy_from_logits(logits, mask), np_masked_mean(np_entropy(logits), mask))
  close(L.token_entropy(jnp.zeros((1, 1, 8))), [[math.log(8)]])  # uniform: log V
  close(L.entropy_from_logits(logits, np.zeros_like(mask)), 0.0)
  g = jax.grad(lambda z: L.entropy_from_logits(z, mask))(jnp.asarray(logits))
  assert all_finite(g)


# ------------------------------------------------------------------------------------------------
# SFT.
# ------------------------------------------------------------------------------------------------


def test_nll_loss():
  logp, _, _, _, mask = _pg_inputs()
  tok = sum(-logp[i, j] for i in range(6) for j in range(7) if mask[i, j]) / mask.sum()
  seq = np.mean([(-logp[i][mask[i]]).sum() / max(mask[i].sum(), 1) for i in range(6)])
  close(L.nll_loss(logp, mask, "token"), tok)
  close(L.nll_loss(logp, mask, "sequence"), seq)
  # Hand: rows [-1, -3] and [-2, pad] -> token 6/3 = 2; sequence mean(2, 2) = 2.
  lp, m = np.array([[-1., -3.], [-2., 0.]]), np.array([[1, 1], [1, 0]], bool)
  close(L.nll_loss(lp, m, "token"), 2.0)
  close(L.nll_loss(lp, m, "sequence"), 2.0)
  for norm in ("token", "sequence"):
    empty = np.zeros_like(mask)
    assert float(L.nll_loss(logp, empty, norm)) == 0.0
    assert all_finite(jax.grad(lambda x, n=norm: L.nll_loss(x, empty, n))(jnp.asarray(logp)))
  with pytest.raises(ValueError):
    L.nll_loss(logp, mask, "sum")


# ------------------------------------------------------------------------------------------------
# KL estimators.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators(kind):
  rng = _rng(3)
  logp = -rng.uniform(0, 5, size=(4, 5)).astype(np.float32)
  ref = (logp + rng.normal(0, 1, size=(4, 5))).astype(np.float32)
  ref[0, 0] = logp[0, 0] + 50.0  # clamped to L = +20
  ref[0, 1] = logp[0, 1] - 50.0  # clamped to L = -20
  fn = {"k1": L.kl_k1, "k2": L.kl_k2, "k3": L.kl_k3}[kind]
  close(fn(logp, ref), np_kl(logp, ref, kind), rtol=1e-5, atol=1e-4)
  close(L.kl_estimate(logp, ref, kind), np_kl(logp, ref, kind), rtol=1e-5, atol=1e-4)
  g_ref = jax.grad(lambda r: L.kl_estimate(logp, r, kind).sum())(jnp.asarray(ref))
  assert not np.any(np.asarray(g_ref))
  if kind != "k1":
    assert np.all(np.asarray(fn(logp, ref)) >= 0)


def test_kl_hand_values():
  # L = lp_ref − lp_θ = log 2: k1 = −log 2, k2 = ½ log²2, k3 = 2 − log 2 − 1.
  lp, ref = jnp.array([0.0]), jnp.array([math.log(2)])
  close(L.kl_k1(lp, ref), [-math.log(2)])
  close(L.kl_k2(lp, ref), [0.5 * math.log(2)**2])
  close(L.kl_k3(lp, ref), [1 - math.log(2)])
  close(L.kl_k3(lp, lp), [0.0])
  with pytest.raises(ValueError):
    L.kl_estimate(lp, ref, "k4")


# ------------------------------------------------------------------------------------------------
# Advantages.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages(scale):
  r = _rng(4).normal(size=12).astype(np.float32)
  r[4:8] = 0.5  # all-equal group
  got = L.grpo_advantages(r, 4, scale=scale)
  close(got, np_grpo_adv(r, 4, scale), atol=1e-4)
  close(got[4:8], np.zeros(4), atol=1e-4)
  assert all_finite(got)


def test_grpo_advantages_hand():
  # [1,0,0,0]: mean .25, sample std sqrt((.75² + 3·.25²)/3) = .5.
  got = L.grpo_advantages(jnp.array([1., 0., 0., 0.]), 4)
  close(got, np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
  close(L.grpo_advantages(jnp.array([1., 0., 0., 0.]), 4, scale=False), [0.75, -.25, -.25, -.25])
  close(L.grpo_advantages(jnp.array([3., 3., 1., 1.]), 2), np.zeros(4))  # equal groups: 0
  close(L.grpo_advantages(jnp.array([3., 1.]), 1), [0.0, 0.0])  # G = 1: 0, not NaN
  with pytest.raises(ValueError):
    L.grpo_advantages(jnp.zeros(6), 4)


def test_rloo_advantages_and_kl_rewards():
  r = _rng(5).normal(size=8).astype(np.float32)
  close(L.rloo_advantages(r, 4), np_rloo_adv(r, 4))
  close(L.rloo_advantages(jnp.array([1., 0., 0., 0.]), 4), [1.0, -1 / 3, -1 / 3, -1 / 3])
  close(L.rloo_advantages(jnp.array([2., 2.]), 2), [0.0, 0.0])
  with pytest.raises(ValueError):
    L.rloo_advantages(jnp.zeros(4), 1)
  logp, old, ref, _, mask = _pg_inputs(b=8)
  want = r - 0.05 * np.array([(old[i] - ref[i])[mask[i]].sum() for i in range(8)])
  close(L.kl_penalized_rewards(r, old, ref, mask, 0.05), want)


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_reinforce_pp_advantages(baseline, kl_coef):
  _, old, ref, _, mask = _pg_inputs(b=6)
  r = np.array([1., 0., 1., 1., 0., 0.5], np.float32)
  got = L.reinforce_pp_advantages(r, old, ref, mask, kl_coef=kl_coef, baseline=baseline,
                                  group_size=2)
  close(got, np_reinforce_pp(r, old, ref, mask, kl_coef, baseline, 2), atol=1e-4)
  assert not np.any(np.asarray(got)[~mask])
  # Whitened: zero mean, unit variance over valid tokens.
  vals = np.asarray(got)[mask]
  close(vals.mean(), 0.0, atol=1e-5)
  close(vals.std(), 1.0, atol=1e-4)


def test_reinforce_pp_hand_and_edges():
  # Rewards 1 and 0, two full tokens, no KL: returns [1,1,0,0] -> mean .5, std .5 -> ±1.
  m = np.ones((2, 2), bool)
  z = np.zeros((2, 2), np.float32)
  close(L.reinforce_pp_advantages(jnp.array([1., 0.]), z, z, m), [[1, 1], [-1, -1]], atol=1e-4)
  # Return-to-go with KL: row [k1 = .5, .5], reward 1 -> rewards [−.05, .95] -> returns [.9, .95].
  old = np.array([[0., 0.], [0., 0.]], np.float32)
  ref = np.array([[-.5, -.5], [0., 0.]], np.float32)
  got = L.reinforce_pp_advantages(jnp.array([1., 0.]), old, ref, m, kl_coef=0.1)
  close(got, np_reinforce_pp([1., 0.], old, ref, m, 0.1), atol=1e-4)
  # Right-padded, length-1 and fully masked rows; all-equal returns whiten to 0 (not NaN).
  m2 = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
  z2 = np.zeros((3, 3), np.float32)
  got = L.reinforce_pp_advantages(jnp.array([1., 5., 1.]), z2, z2, m2)
  close(got, np.zeros((3, 3)))
  got = L.reinforce_pp_advantages(jnp.array([1., 5., 0.]), z2, z2, m2)
  close(got, np_reinforce_pp([1., 5., 0.], z2, z2, m2, 0.0), atol=1e-4)
  empty = L.reinforce_pp_advantages(jnp.array([1., 5., 0.]), z2, z2, np.zeros_like(m2))
  close(empty, np.zeros((3, 3)))
  with pytest.raises(ValueError):
    L.reinforce_pp_advantages(jnp.array([1., 5., 0.]), z2, z2, m2, baseline=True)


def test_last_token_mask():
  m = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], bool)
  want = np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], bool)
  np.testing.assert_array_equal(L.last_token_mask(m), want)


def test_dapo_group_filter_and_overlong():
  r = jnp.array([1., 1., 1., 0., 1., 0., 0.3, 0.3])
  np.testing.assert_array_equal(L.dapo_group_filter(r, 2), [False, False, True, True, True, True,
                                                            False, False])
  np.testing.assert_array_equal(L.dapo_group_filter(r, 4), [True] * 8)
  np.testing.assert_array_equal(L.dapo_group_filter(jnp.zeros(4), 4), [False] * 4)
  # L_max = 20, L_buf = 4: free up to 16, then −(|y| − 16)/4.
  lengths = np.array([0, 10, 16, 17, 18, 20])
  want = np.minimum(-(lengths - 16) / 4, 0)
  close(L.overlong_penalty(jnp.asarray(lengths), 20, 4), want)
  close(L.overlong_penalty(jnp.asarray(lengths), 20, 4), [0, 0, 0, -.25, -.5, -1])
  with pytest.raises(ValueError):
    L.overlong_penalty(jnp.asarray(lengths), 20, 0)


# ------------------------------------------------------------------------------------------------
# Policy-gradient losses.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", PG_TYPES)
@pytest.mark.parametrize("with_kl", [False, True])
def test_policy_gradient_loss(loss_type, with_kl):
  logp, old, ref, adv, mask = _pg_inputs()
  kw = dict(clip_low=0.2, clip_high=0.28, loss_type=loss_type, max_completion_len=9)
  if with_kl:
    kw.update(ref_logp_BxT=ref, kl_coef=0.04)
  loss, aux = L.policy_gradient_loss(logp, old, adv, mask, **kw)
  want, want_aux = np_pg_loss(logp, old, adv, mask, 0.2, 0.28, loss_type, 9,
                              ref if with_kl else None, 0.04 if with_kl else 0.0)
  close(loss, want)
  for k, v in want_aux.items():
    close(aux[k], v)
  if loss_type != "cispo":  # cispo caps ρ > 1 + ε_high with A > 0 only (tests/test_pg_parity.py)
    assert 0 < float(aux["clip_fraction"]) < 1  # the inputs exercise both clipping branches


def test_policy_gradient_loss_token_advantages_and_active_tokens():
  logp, old, ref, _, mask = _pg_inputs(seed=7)
  adv_BxT = _rng(7).normal(size=logp.shape).astype(np.float32)
  for loss_type in PG_TYPES:
    loss, _ = L.policy_gradient_loss(logp, old, adv_BxT, mask, loss_type=loss_type,
                                     ref_logp_BxT=ref, kl_coef=0.1, kl_kind="k2")
    want, _ = np_pg_loss(logp, old, adv_BxT, mask, 0.2, 0.2, loss_type, ref=ref, kl_coef=0.1,
                         kl_kind="k2")
    close(loss, want)
  loss, _ = L.policy_gradient_loss(logp, old, adv_BxT, mask, loss_type="dapo",
                                   num_active_tokens=100)
  close(loss, np_pg_loss(logp, old, adv_BxT, mask, 0.2, 0.2, "dapo", num_active=100)[0])


def test_policy_gradient_loss_hand():
  # On-policy, one token, A = 1: ρ = 1 -> ℓ = −1 for grpo / bnpo / dapo; dr_grpo divides by B·L.
  lp, m = jnp.array([[-1.0, 0.0]]), np.array([[1, 0]], bool)
  for loss_type, want in [("grpo", -1), ("bnpo", -1), ("dapo", -1), ("dr_grpo", -0.25)]:
    loss, aux = L.policy_gradient_loss(lp, None, jnp.array([1.0]), m, loss_type=loss_type,
                                       max_completion_len=4)
    close(loss, want)
    close(aux["ratio_mean"], 1.0)
    close(aux["clip_fraction"], 0.0)
  # grpo weighs rows equally, bnpo weighs tokens equally: rows [ℓ, ℓ] with A=1 and [ℓ] with A=−2.
  lp2, m2 = jnp.zeros((2, 2)), np.array([[1, 1], [1, 0]], bool)
  adv = jnp.array([1.0, -2.0])
  close(L.policy_gradient_loss(lp2, None, adv, m2, loss_type="grpo")[0], (-1 + 2) / 2)
  close(L.policy_gradient_loss(lp2, None, adv, m2, loss_type="bnpo")[0], (-1 - 1 + 2) / 3)
  close(L.policy_gradient_loss(lp2, None, adv, m2, loss_type="dr_grpo")[0], (-1 - 1 + 2) / 4)
  # ρ = e^1 > 1.2 with A > 0: clipped -> ℓ = −1.2 A, and no gradient.
  old = jnp.array([[-2.0, 0.0]])
  loss_fn = lambda x: L.policy_gradient_loss(x, old, jnp.array([1.0]), m, loss_type="bnpo")[0]
  close(loss_fn(lp), -1.2)
  close(jax.grad(loss_fn)(lp), np.zeros((1, 2)))
  # On-policy gradient is −A·m / normaliser (∂ρ/∂lp = 1).
  g = jax.grad(lambda x: L.policy_gradient_loss(x, None, adv, m2, loss_type="bnpo")[0])(lp2)
  close(g, [[-1 / 3, -1 / 3], [2 / 3, 0.0]])
  with pytest.raises(ValueError):
    L.policy_gradient_loss(lp, None, jnp.array([1.0]), m, loss_type="ppo")


@pytest.mark.parametrize("loss_type", PG_TYPES)
def test_policy_gradient_loss_empty_and_padding(loss_type):
  logp, old, ref, adv, mask = _pg_inputs()
  # Garbage at padded positions changes nothing and cannot produce NaN values or gradients.
  dirty = logp.copy()
  dirty[~mask] = -np.inf
  dirty_ref = ref.copy()
  dirty_ref[~mask] = np.nan

  def fn(x, msk, r):
    return L.policy_gradient_loss(x, old, adv, msk, loss_type=loss_type, ref_logp_BxT=r,
                                  kl_coef=0.1)

  clean_loss, _ = fn(logp, mask, ref)
  dirty_loss, dirty_aux = fn(dirty, mask, dirty_ref)
  close(dirty_loss, clean_loss)
  assert all_finite(dirty_aux)
  assert all_finite(jax.grad(lambda x: fn(x, mask, dirty_ref)[0])(jnp.asarray(dirty)))
  empty = np.zeros_like(mask)
  loss, aux = fn(logp, empty, ref)
  assert float(loss) == 0.0 and all_finite(aux)
  g = jax.grad(lambda x: fn(x, empty, ref)[0])(jnp.asarray(logp))
  assert all_finite(g) and not np.any(np.asarray(g))
  # The fully masked row 1 gets no gradient.
  g = jax.grad(lambda x: fn(x, mask, ref)[0])(jnp.asarray(logp))
  assert not np.any(np.asarray(g)[1]) and np.any(np.asarray(g)[2])


def test_rloo_loss():
  logp, old, _, adv, mask = _pg_inputs(b=6, seed=11)
  old = (logp + _rng(11).normal(0, 0.1, size=logp.shape)).astype(np.float32)
  loss, aux = L.rloo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
  per, region, ratios = [], [], []
  for i in range(6):
    lr = min(max(float((logp[i] - old[i])[mask[i]].astype(np.float64).sum()), -20), 20)
    rho = math.exp(lr)
    a = float(adv[i])
    per.append(max(-a * rho, -a * min(max(rho, 0.8), 1.2)))
    region.append((rho < 0.8 and a < 0) or (rho > 1.2 and a > 0))
    ratios.append(rho)
  close(loss, np.mean(per))
  close(aux["clip_fraction"], np.mean(region))
  close(aux["ratio_mean"], np.mean(ratios))
  # Hand: on-policy ρ = 1 -> loss = −mean(A).
  close(L.rloo_loss(logp, None, adv, mask)[0], -adv.astype(np.float64).mean())


# ------------------------------------------------------------------------------------------------
# Preference losses.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_loss_vs_numpy(loss_type):
  pc, pr, rc, rr = _pair_inputs()
  len_c = np.array([3, 1, 7, 0, 5, 2])  # a zero length is clamped to 1
  len_r = np.array([4, 6, 1, 2, 1, 9])
  ls = {"robust": 0.1, "exo_pair": 0.0, "sigmoid": 0.1}.get(loss_type, 0.0)
  loss, aux = L.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.1, label_smoothing=ls,
                         chosen_len_B=len_c, rejected_len_B=len_r, bco_delta=0.05)
  want, cr, rr_ = np_dpo(pc, pr, rc, rr, loss_type, 0.1, ls, len_c, len_r, delta_bco=0.05)
  close(loss, want, rtol=1e-4, atol=1e-5)
  close(aux["chosen_rewards"], cr)
  close(aux["rejected_rewards"], rr_)
  close(aux["margins"], cr - rr_)
  np.testing.assert_array_equal(aux["accuracy"], (cr > rr_).astype(np.float32))


def test_dpo_hand_values():
  z = jnp.zeros(1)
  one = jnp.ones(1)
  # Δ = 0: sigmoid log 2, hinge 1, ipo (1/(2β))² = 25, apo_zero 1/2 + 1/2, discopop ½log2 + ½.
  close(L.dpo_loss(z, z, z, z)[0], [math.log(2)])
  close(L.dpo_loss(z, z, z, z, loss_type="hinge")[0], [1.0])
  close(L.dpo_loss(z, z, z, z, loss_type="ipo", chosen_len_B=one, rejected_len_B=one)[0], [25.0])
  close(L.dpo_loss(z, z, z, z, loss_type="apo_zero")[0], [1.0])
  close(L.dpo_loss(z, z, z, z, loss_type="discopop")[0], [0.5 * math.log(2) + 0.5])
  close(L.dpo_loss(z, z, z, z, loss_type="sppo_hard")[0], [50.0])
  # βΔ = 1 (c = 10, r = 0): sigmoid −logσ(1) = log(1 + e^−1); hinge 0.
  pc = jnp.array([-5.0])
  rc = jnp.array([-15.0])
  close(L.dpo_loss(pc, z, rc, z)[0], [math.log1p(math.exp(-1))])
  close(L.dpo_loss(pc, z, rc, z, loss_type="hinge")[0], [0.0])
  loss, aux = L.dpo_loss(pc, z, rc, z)
  close(aux["chosen_rewards"], [1.0])
  close(aux["margins"], [1.0])
  close(aux["accuracy"], [1.0])
  # ipo normalises by length: c = 10/5 = 2, r = 0 -> (2 − 5)² = 9.
  close(L.dpo_loss(pc, z, rc, z, loss_type="ipo", chosen_len_B=jnp.array([5]),
                   rejected_len_B=one)[0], [9.0])
  with pytest.raises(ValueError):
    L.dpo_loss(z, z, z, z, loss_type="ipo")
  with pytest.raises(ValueError):
    L.dpo_loss(z, z, z, z, loss_type="kto")
  with pytest.raises(ValueError):
    L.dpo_loss(z, z, z, z, loss_type="robust", label_smoothing=0.5)


def test_spin_loss():
  pc, pr, rc, rr = _pair_inputs(seed=3)
  for loss_type in ("sigmoid", "hinge"):
    loss, aux = L.spin_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type)
    want, cr, rj = np_dpo(pc, pr, rc, rr, loss_type, beta=0.5)
    close(loss, want)
    close(aux["margins"], cr - rj)
  with pytest.raises(ValueError):
    L.spin_loss(pc, pr, rc, rr, loss_type="ipo")


def test_simpo_loss():
  rng = _rng(6)
  ac, ar = (-rng.uniform(0.1, 3, size=5).astype(np.float32) for _ in range(2))
  for beta, gamma, ls in [(0.1, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.5, 0.1)]:
    loss, aux = L.simpo_loss(ac, ar, beta=beta, gamma=gamma, label_smoothing=ls)
    z = beta * (ac.astype(np.float64) - ar) - gamma
    close(loss, -(1 - ls) * np_log_sigmoid(z) - ls * np_log_sigmoid(-z))
    close(aux["chosen_rewards"], beta * ac.astype(np.float64))
  # Hand: equal averages, γ = 0.5 -> −logσ(−0.5) = log(1 + e^0.5).
  close(L.simpo_loss(jnp.array([-1.0]), jnp.array([-1.0]))[0], [math.log1p(math.exp(0.5))])


def test_log1mexp():
  x = np.array([-1e-6, -1e-3, -0.5, -math.log(2), -1.0, -5.0, -50.0], np.float32)
  close(L.log1mexp(x), np_log1mexp(x.astype(np.float64)), rtol=1e-4)
  ext = L.log1mexp(jnp.array([0.0, 1e4, -1e4]))
  assert all_finite(ext) and float(ext[2]) == 0.0
  assert all_finite(jax.grad(lambda v: L.log1mexp(v).sum())(jnp.array([0.0, -1e-8, -1e4])))


def test_orpo_loss():
  rng = _rng(8)
  ac, ar = (-rng.uniform(0.05, 4, size=6).astype(np.float32) for _ in range(2))
  nll = np.float32(1.3)
  loss, aux = L.orpo_loss(ac, ar, nll, lam=0.1)
  a64, r64 = ac.astype(np.float64), ar.astype(np.float64)
  log_odds = (a64 - r64) - (np_log1mexp(a64) - np_log1mexp(r64))
  close(loss, 1.3 - 0.1 * np_log_sigmoid(log_odds), rtol=1e-4)
  close(aux["log_odds"], log_odds, rtol=1e-4)
  close(aux["chosen_rewards"], 0.1 * a64)
  # Per-pair NLL broadcasts too.
  per_nll = rng.uniform(0, 2, size=6).astype(np.float32)
  close(L.orpo_loss(ac, ar, per_nll)[0], per_nll - 0.1 * np_log_sigmoid(log_odds), rtol=1e-4)
  # Hand: equal averages -> log_odds 0 -> nll + λ log 2.
  close(L.orpo_loss(jnp.array([-1.0]), jnp.array([-1.0]), 2.0)[0], [2.0 + 0.1 * math.log(2)])


def test_kto_loss():
  rng = _rng(9)
  lp, ref, kl_lp, kl_ref = (-rng.uniform(1, 20, size=8).astype(np.float32) for _ in range(4))
  desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
  loss, aux = L.kto_loss(lp, ref, desirable, kl_lp, kl_ref, beta=0.1, desirable_weight=1.0,
                         undesirable_weight=1.33)
  z0 = max(0.0, float(np.mean(kl_lp.astype(np.float64) - kl_ref)))
  rho = lp.astype(np.float64) - ref
  want = np.where(desirable, 1 - np_sigmoid(0.1 * (rho - z0)),
                  1.33 * (1 - np_sigmoid(0.1 * (z0 - rho))))
  close(loss, want)
  close(aux["kl"], z0)
  close(aux["rewards"], 0.1 * rho)
  # Hand: z0 clamps at 0 (mean KL-sample log-ratio −1); ρ = 0 -> 1 − σ(0) = ½ for both labels.
  z = jnp.zeros(2)
  loss, aux = L.kto_loss(z, z, np.array([1, 0], bool), -jnp.ones(2), z)
  close(loss, [0.5, 0.5])
  close(aux["kl"], 0.0)


# ------------------------------------------------------------------------------------------------
# Gradient isolation, extreme inputs and jit.
# ------------------------------------------------------------------------------------------------


def _preference_fns():
  """name -> f(policy_a, policy_b, ref_a, ref_b) -> per-pair loss; ref args must get no gradient."""
  fns = {}
  for t in DPO_TYPES:
    fns[f"dpo_{t}"] = functools.partial(
        lambda a, b, c, d, t: L.dpo_loss(a, b, c, d, loss_type=t, chosen_len_B=jnp.full(a.shape, 3),
                                         rejected_len_B=jnp.full(a.shape, 5))[0], t=t)
  fns["spin_sigmoid"] = lambda a, b, c, d: L.spin_loss(a, b, c, d)[0]
  fns["spin_hinge"] = lambda a, b, c, d: L.spin_loss(a, b, c, d, loss_type="hinge")[0]
  fns["kto"] = lambda a, b, c, d: L.kto_loss(
      a, c, jnp.arange(a.shape[0]) % 2 == 0, b, d)[0]
  # No reference: c, d are unused (their gradient is trivially zero).
  fns["simpo"] = lambda a, b, c, d: L.simpo_loss(a, b)[0]
  fns["orpo"] = lambda a, b, c, d: L.orpo_loss(a, b, 1.0)[0]
  return fns


@pytest.mark.parametrize("name", sorted(_preference_fns()))
def test_preference_gradients_only_reach_policy(name):
  fn = _preference_fns()[name]
  args = [jnp.asarray(x) for x in _pair_inputs(seed=2, scale=3.0)]
  grads = jax.grad(lambda *xs: fn(*xs).sum(), argnums=(0, 1, 2, 3))(*args)
  assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3])), name
  if name == "kto":  # arg 1 is the KL-sample policy log-prob: detached too (z0 is a constant)
    assert not np.any(np.asarray(grads[1]))
  assert np.any(np.asarray(grads[0])), name  # and the policy does get a gradient


@pytest.mark.parametrize("name", sorted(_preference_fns()))
def test_preference_losses_finite_at_extremes(name):
  fn = _preference_fns()[name]
  # ±1e4 margins either way, both log-probs at −1e4, and (−1e4, 0) / (0, −1e4) in one batch.
  a = jnp.array([1e4, -1e4, -1e4, -1e4, 0.0, 0.0])
  b = jnp.array([-1e4, 1e4, -1e4, 0.0, -1e4, 0.0])
  zero = jnp.zeros(6)
  loss, grads = jax.value_and_grad(lambda x, y: fn(x, y, zero, zero).sum(), argnums=(0, 1))(a, b)
  assert all_finite(fn(a, b, zero, zero)) and all_finite(grads), name


@pytest.mark.parametrize("loss_type,kl_kind", list(zip(PG_TYPES, ("k1", "k2", "k3", "k3"))))
def test_pg_gradients_and_extremes(loss_type, kl_kind):
  logp, old, ref, adv, mask = _pg_inputs()

  def fn(x, o, r, a):
    return L.policy_gradient_loss(x, o, a, mask, loss_type=loss_type, ref_logp_BxT=r,
                                  kl_coef=0.1, kl_kind=kl_kind)[0]

  g = jax.grad(fn, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (logp, old, ref, adv)))
  assert np.any(np.asarray(g[0]))
  assert not any(np.any(np.asarray(x)) for x in g[1:])
  # ±1e4 log-ratios (clamped at ±20) and large advantages stay finite.
  sign = np.where(_rng(1).random(logp.shape) < 0.5, 1.0, -1.0).astype(np.float32)
  x_ext = jnp.asarray(logp + 1e4 * sign)
  val, grads = jax.value_and_grad(fn)(x_ext, old, ref, adv * 1e3)
  assert all_finite(val) and all_finite(grads)


def test_rloo_loss_gradients_and_extremes():
  logp, old, _, adv, mask = _pg_inputs()
  g = jax.grad(lambda x, o, a: L.rloo_loss(x, o, a, mask)[0], argnums=(0, 1, 2))(
      *map(jnp.asarray, (logp, old, adv)))
  assert np.any(np.asarray(g[0]))
  assert not np.any(np.asarray(g[1])) and not np.any(np.asarray(g[2]))
  sign = np.where(_rng(1).random(logp.shape) < 0.5, 1.0, -1.0).astype(np.float32)
  x_ext = jnp.asarray(logp + 1e4 * sign)
  val, grads = jax.value_and_grad(lambda x: L.rloo_loss(x, old, adv * 1e3, mask)[0])(x_ext)
  assert all_finite(val) and all_finite(grads)


def test_advantages_finite_at_extremes():
  r = jnp.array([1e4, -1e4, 0.0, 0.0, 1e4, 1e4, -1e4, -1e4])
  assert all_finite(L.grpo_advantages(r, 4)) and all_finite(L.rloo_advantages(r, 4))
  m = np.ones((8, 3), bool)
  lp = jnp.full((8, 3), -1e4)
  assert all_finite(L.reinforce_pp_advantages(r, lp, -lp, m, kl_coef=0.1, kl_kind="k3"))


def test_jit_matches_eager():
  logp, old, ref, adv, mask = _pg_inputs()
  pg = jax.jit(L.policy_gradient_loss, static_argnames=("loss_type", "kl_kind", "clip_low",
                                                        "clip_high", "max_completion_len",
                                                        "kl_coef"))
  got = pg(logp, old, adv, mask, loss_type="dapo", ref_logp_BxT=ref, kl_coef=0.1)
  want = L.policy_gradient_loss(logp, old, adv, mask, loss_type="dapo", ref_logp_BxT=ref,
                                kl_coef=0.1)
  close(got[0], want[0], rtol=1e-6, atol=1e-6)
  dpo = jax.jit(L.dpo_loss, static_argnames=("loss_type", "beta", "label_smoothing",
                                              "discopop_tau"))
  pair = _pair_inputs()
  close(dpo(*pair, loss_type="discopop")[0], L.dpo_loss(*pair, loss_type="discopop")[0],
        rtol=1e-6, atol=1e-6)
  adv_fn = jax.jit(L.grpo_advantages, static_argnums=(1, 2))
  r = jnp.arange(8.0)
  close(adv_fn(r, 4, True), L.grpo_advantages(r, 4, True), rtol=1e-6, atol=1e-6)
  rpp = jax.jit(L.reinforce_pp_advantages, static_argnames=("kl_coef", "kl_kind", "baseline",
                                                             "group_size", "eps"))
  close(rpp(jnp.arange(6.0), old, ref, mask, baseline=True, group_size=2),
        L.reinforce_pp_advantages(jnp.arange(6.0), old, ref, mask, baseline=True, group_size=2),
        rtol=1e-6, atol=1e-6)
