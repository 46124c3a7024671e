"""Policy-gradient parity with TRL / OpenRLHF (issue 21): unscorable rewards, the sampling
temperature in every log-prob, the sampler's entropy, GSPO, two-sided clipping, CISPO, entropy
bonus and mask, truncated completions, reward scaling, the KL estimator key, DAPO's filter on the
raw reward and REINFORCE++'s token-mean loss.

Each term is checked against values worked out by hand (written next to them) or an independent
NumPy computation, then every option once end to end in a jitted round of a tiny model.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax import config_lib, config_validation, models, sampling, setup
from selfplay_jax import round as rnd
from selfplay_jax.algorithms import losses as L
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.algorithms.spec import LogProbs
from tests import task_helpers
from selfplay_jax.errors import ConfigError
from selfplay_jax.models.logprobs import completion_logprobs, completion_logprobs_and_entropy

NAN = float("nan")
EPS = 1e-4  # TRL's advantage eps


def close(actual, expected, atol=1e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=1e-5, atol=atol)


def _rollout(lengths, width=4, truncated=None):
  lengths = np.asarray(lengths)
  n = len(lengths)
  return types.SimpleNamespace(
      prompt_tokens=jnp.zeros((n, 2), jnp.int32), prompt_mask=jnp.ones((n, 2), bool),
      tokens=jnp.ones((n, width), jnp.int32),
      mask=jnp.asarray(np.arange(width)[None] < lengths[:, None]),
      lengths=jnp.asarray(lengths, jnp.int32),
      truncated=None if truncated is None else jnp.asarray(truncated))


_zeros = lambda rows: jnp.zeros(rows["mask"].shape)
_ZERO_LOGP = LogProbs(old=_zeros, ref=_zeros)  # old = reference: the first update of a round


def _advantages(spec, rewards, lengths=None):
  lengths = [4] * len(rewards) if lengths is None else lengths
  rows = spec.build({}, _rollout(lengths), jnp.asarray(rewards, jnp.float32), _ZERO_LOGP)
  return np.asarray(rows["advantages"]), rows


# ---- 2. unscorable (NaN) rewards ------------------------------------------------------------


def test_grpo_leaves_unscorable_rewards_out_of_the_group_statistics():
  # Valid rewards 1, 0, 0: mean 1/3, sample std sqrt(((2/3)² + 2·(1/3)²) / 2) = sqrt(1/3).
  # (Today's nan_to_num counted the NaN as 0: [.75, −.25, −.25, −.25] / (.5 + eps).)
  adv, _ = _advantages(PolicyGradient(group_size=4), [1.0, 0.0, NAN, 0.0])
  s = np.sqrt(1 / 3) + EPS
  close(adv, [(2 / 3) / s, (-1 / 3) / s, 0.0, (-1 / 3) / s])
  # One scorable reward in a group: nothing to compare it with, A = 0; all NaN: 0.
  adv, _ = _advantages(PolicyGradient(group_size=4), [NAN, 2.0, NAN, NAN, NAN, NAN, NAN, NAN])
  close(adv, np.zeros(8))


def test_rloo_leave_one_out_mean_counts_scorable_siblings_only():
  # Valid 1, 0, .5: A_0 = 1 − (0 + .5)/2 = .75, A_2 = 0 − (1 + .5)/2 = −.75, A_3 = .5 − .5 = 0.
  spec = PolicyGradient(group_size=4, advantage="rloo")
  adv, _ = _advantages(spec, [1.0, NAN, 0.0, 0.5])
  close(adv, [0.75, 0.0, -0.75, 0.0])
  close(L.rloo_advantages(jnp.array([NAN, 2.0, NAN, NAN]), 4), np.zeros(4))


@pytest.mark.parametrize("advantage", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_whitens_over_scorable_rows_only(advantage):
  # One token per row, no KL. Scorable returns 1 and 0 (baseline: the group mean .5 first,
  # giving .5 and −.5): mean and population std over those two -> ±1; the NaN row gets 0.
  spec = PolicyGradient(group_size=3, advantage=advantage, loss_type="bnpo")
  adv, _ = _advantages(spec, [1.0, NAN, 0.0], lengths=[1, 1, 1])
  close(adv[:, 0], [1.0, 0.0, -1.0], atol=1e-4)
  assert not np.any(adv[:, 1:])


def test_dapo_filter_ignores_unscorable_rewards():
  keep = L.dapo_group_filter(jnp.array([1, NAN, 1, 1, 1, NAN, 0, 1, NAN, NAN, NAN, 1.0]), 4)
  np.testing.assert_array_equal(keep, [False] * 4 + [True] * 4 + [False] * 4)


# ---- DAPO's filter reads the raw reward ---------------------------------------------------------


def test_dapo_dynamic_filter_reads_the_reward_before_overlong_shaping():
  cfg = config_lib.load_config("configs/dapo.py", ["sampling.n=4", "sampling.max_new_tokens=8",
                                                   "algorithm.overlong_buffer=4"])
  config_validation.validate(cfg)
  spec = setup.build_spec(cfg)
  logp = LogProbs(old=lambda r: jnp.zeros(r["mask"].shape), ref=None)
  # All four correct (accuracy 1): shaping by length (1, .5, .25, 0) must not make the group
  # informative. (Today's filter read the shaped rewards and kept it.)
  rows = spec.build({}, _rollout([4, 6, 7, 8], width=8), jnp.ones(4), logp)
  assert not np.any(np.asarray(rows["mask"]))
  rows = spec.build({}, _rollout([4, 6, 7, 8], width=8), jnp.array([1.0, 0, 0, 0]), logp)
  np.testing.assert_array_equal(np.asarray(rows["mask"]).sum(1), [4, 6, 7, 8])


# ---- scale_rewards -------------------------------------------------------------------------


def test_scale_rewards_group_batch_none():
  r = [1.0, 0, 0, 0, 1, 1, 1, 0]
  centered = np.array([.75, -.25, -.25, -.25, .25, .25, .25, -.75])  # group means .25, .75
  # Batch: mean .5, every deviation ±.5 -> sample variance 8·.25/7.
  batch_std = np.sqrt(2 / 7)
  got = {s: _advantages(PolicyGradient(group_size=4, scale_rewards=s), r)[0]
         for s in ("group", "batch", "none")}
  close(got["group"], centered / (np.array([.5] * 4 + [.5] * 4) + EPS))
  close(got["batch"], centered / (batch_std + EPS))
  close(got["none"], centered)
  # "" = the advantage's own: grpo scales per group, dr_grpo does not.
  close(_advantages(PolicyGradient(group_size=4), r)[0], got["group"])
  close(_advantages(PolicyGradient(group_size=4, advantage="dr_grpo"), r)[0], centered)


# ---- kl_estimator ----------------------------------------------------------------------------


def test_kl_estimator_reaches_shaped_rewards_and_the_loss():
  cfg = config_lib.load_config("configs/rloo.py", ["sampling.n=2", "algorithm.kl_estimator=k2"])
  config_validation.validate(cfg)
  spec = setup.build_spec(cfg)
  assert (spec.kl_kind, spec.reward_kl_kind) == ("k2", "k2")
  default = setup.build_spec(config_lib.load_config("configs/rloo.py", ["sampling.n=2"]))
  assert (default.kl_kind, default.reward_kl_kind) == ("k3", "k1")
  # lp_old − lp_ref = .5 on two tokens: k2 = .5²/2 = .125 each, k1 = .5 each; β = .1.
  old, ref, m = jnp.zeros((1, 2)), jnp.full((1, 2), -0.5), jnp.ones((1, 2), bool)
  close(L.kl_penalized_rewards(jnp.ones(1), old, ref, m, 0.1, kind="k2"), [1 - 0.1 * 0.25])
  close(L.kl_penalized_rewards(jnp.ones(1), old, ref, m, 0.1), [1 - 0.1 * 1.0])


# ---- REINFORCE++ aggregation ---------------------------------------------------------------


def test_reinforce_pp_defaults_to_the_token_mean_over_the_batch():
  spec = setup.build_spec(config_lib.load_config("configs/reinforce_pp.py", []))
  assert spec.loss_type == "bnpo"  # OpenRLHF PolicyLoss(token_level_loss=True)
  # Rows of 2 and 1 tokens, on-policy, A = 1 and −2: token mean (−1 − 1 + 2)/3, not (−1 + 2)/2.
  rows = {"old_logp": jnp.zeros((2, 2)), "advantages": jnp.array([[1.0, 1], [-2, 0]]),
          "mask": jnp.array([[1, 1], [1, 0]], bool)}
  close(spec.loss(jnp.zeros((2, 2)), rows)[0], 0.0)
  rows["advantages"] = jnp.array([[1.0, 1], [-1, 0]])
  close(spec.loss(jnp.zeros((2, 2)), rows)[0], (-1 - 1 + 1) / 3)


# ---- GSPO, delta, CISPO ----------------------------------------------------------------------


def test_sequence_level_importance_ratio():
  # Log-ratios per row (2 tokens): mean .05 -> ρ = e^.05 (inside the clip, A = 1);
  # mean .4 -> ρ = e^.4 = 1.49 > 1.2, A = 1: clipped to 1.2; mean −.4 -> ρ = .670 < .8, A = −1:
  # −min(−.670, −.8) = .8. grpo aggregation: per-row means, then the mean over 3 rows.
  old = jnp.zeros((3, 2))
  logp = jnp.array([[0.2, -0.1], [0.5, 0.3], [-0.6, -0.2]])
  adv, mask = jnp.array([1.0, 1.0, -1.0]), jnp.ones((3, 2), bool)
  fn = lambda x: L.policy_gradient_loss(x, old, adv, mask, importance_sampling_level="sequence")
  loss, aux = fn(logp)
  close(loss, (-np.exp(0.05) - 1.2 + 0.8) / 3)
  close(aux["clip_fraction"], 2 / 3)
  # d/dlp of row 0: −A·ρ·(1/2 per token of the mean)/3 rows; the clipped rows have no gradient.
  g = jax.grad(lambda x: fn(x)[0])(logp)
  close(g, [[-np.exp(0.05) / 6] * 2, [0, 0], [0, 0]])
  # Token level differs (ρ per token): the first row alone gives (−min(e^.2, 1.2) − e^−.1)/2.
  tok, _ = L.policy_gradient_loss(logp[:1], old[:1], adv[:1], mask[:1])
  close(tok, -(1.2 + np.exp(-0.1)) / 2)


def test_delta_caps_the_unclipped_ratio_of_negative_advantages():
  # ρ = e, A = −1, ε = .2: −min(ρA, 1.2A) = e without delta; with δ = 1.5: −min(−1.5, −1.2) = 1.5.
  lp, old, m, a = jnp.array([[0.0]]), jnp.array([[-1.0]]), jnp.ones((1, 1), bool), jnp.array([-1.])
  close(L.policy_gradient_loss(lp, old, a, m)[0], np.e)
  close(L.policy_gradient_loss(lp, old, a, m, delta=1.5)[0], 1.5)
  # A > 0 is already capped at 1 + ε_high: delta changes nothing there.
  close(L.policy_gradient_loss(lp, old, -a, m, delta=1.5)[0], -1.2)


def test_cispo_caps_the_detached_is_weight():
  # Token 0: lp = −1, lp_old = −2 -> ρ = e, capped at 1 + ε_high = 1.5; A = 2: ℓ = −1.5·2·(−1) = 3.
  # Token 1: ρ = .5 (no lower cap), A = −1, lp = −1: ℓ = −.5·(−1)·(−1) = −.5. Token mean: 1.25.
  lp = jnp.array([[-1.0], [-1.0]])
  old = jnp.array([[-2.0], [-1.0 + np.log(2.0)]])
  adv, m = jnp.array([2.0, -1.0]), jnp.ones((2, 1), bool)
  fn = lambda x: L.policy_gradient_loss(x, old, adv, m, loss_type="cispo", clip_high=0.5)
  loss, aux = fn(lp)
  close(loss, 1.25)
  # The weight is a constant: ∂ℓ/∂lp = −w·A / 2 tokens.
  close(jax.grad(lambda x: fn(x)[0])(lp), [[-1.5], [0.25]])
  close(aux["clip_high_fraction"], 0.5)
  close(aux["clip_low_fraction"], 0.0)


# ---- entropy mask and bonus ------------------------------------------------------------------


def test_high_entropy_mask_matches_numpy_quantile():
  h = np.array([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]], np.float32)
  m = np.array([[1, 1, 1], [1, 1, 0]], bool)
  # Valid 0.1 .3 .5 .7 .9; quantile(.6) = .5 + .4·(.7 − .5) = .58 -> keep .9 and .7.
  got = L.high_entropy_mask(h, m, 0.4)
  np.testing.assert_array_equal(got, [[0, 0, 1], [0, 1, 0]])
  assert np.isclose(np.quantile(h[m], 0.6), 0.58)
  np.testing.assert_array_equal(L.high_entropy_mask(h, m, 1.0), m)
  np.testing.assert_array_equal(L.high_entropy_mask(h, m, 0.0), [[0, 0, 1], [0, 0, 0]])
  assert not np.any(L.high_entropy_mask(h, np.zeros_like(m), 0.5))


def test_entropy_bonus_and_entropy_mask_in_the_spec_loss():
  # On-policy, A = 1 for row 0 and −1 for row 1, bnpo: the policy term is Σ −A over trained
  # tokens / all 5 valid tokens. Top 40%: tokens with H .9 (row 0, A = 1) and .7 (row 1, A = −1).
  h = jnp.array([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
  rows = {"old_logp": jnp.zeros((2, 3)), "advantages": jnp.array([1.0, -1.0]),
          "mask": jnp.array([[1, 1, 1], [1, 1, 0]], bool)}
  out = {"logp": jnp.zeros((2, 3)), "entropy": h}
  plain = PolicyGradient(loss_type="bnpo")
  close(plain.loss(out, rows)[0], (-3 + 2) / 5)
  bonus = PolicyGradient(loss_type="bnpo", entropy_coef=0.1)
  close(bonus.loss(out, rows)[0], (-3 + 2) / 5 - 0.1 * (0.1 + 0.5 + 0.9 + 0.3 + 0.7) / 5)
  top = PolicyGradient(loss_type="bnpo", top_entropy_quantile=0.4)
  close(top.loss(out, rows)[0], (-1 + 1) / 5)
  both = PolicyGradient(loss_type="bnpo", top_entropy_quantile=0.4, entropy_coef=0.1)
  close(both.loss(out, rows)[0], 0.0 - 0.1 * (0.9 + 0.7) / 2)
  # The bonus' gradient reaches the entropies of the trained tokens only.
  g = jax.grad(lambda e: both.loss({"logp": out["logp"], "entropy": e}, rows)[0])(h)
  close(g, [[0, 0, -0.05], [0, -0.05, 0]])


# ---- truncated completions -------------------------------------------------------------------


def test_mask_truncated_completions_zeroes_their_loss_weight():
  spec = PolicyGradient(group_size=4, mask_truncated_completions=True)
  rows = spec.build({}, _rollout([2, 4, 4, 1], truncated=[False, True, False, False]),
                    jnp.array([1.0, 0, 1, 0]), _ZERO_LOGP)
  np.testing.assert_array_equal(np.asarray(rows["mask"]).sum(1), [2, 0, 4, 1])
  # The advantages still come from every reward (TRL masks only the loss).
  close(rows["advantages"], np.array([.5, -.5, .5, -.5]) / (np.sqrt(1 / 3) + EPS))
  # A hand-built rollout without `truncated`: full-width rows count as truncated.
  rows = spec.build({}, _rollout([2, 4, 4, 1]), jnp.array([1.0, 0, 1, 0]), _ZERO_LOGP)
  np.testing.assert_array_equal(np.asarray(rows["mask"]).sum(1), [2, 0, 0, 1])


# ---- the tiny model: temperature, entropy, one jitted round per option ------------------------


G = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  _, tok, cfg, params, batch = task_helpers.tiny_arithmetic(tmp_path_factory.mktemp("tok"), 2)
  return cfg, params, batch, tuple(tok.eos_ids)


def _np_logits(cfg, params, rows):
  """float64 logits [R, N, V] scoring each completion token, one unpadded row at a time."""
  out = []
  for i in range(rows["tokens"].shape[0]):
    prompt = np.asarray(rows["prompt_tokens"][i])[np.asarray(rows["prompt_mask"][i])]
    seq = np.concatenate([prompt, np.asarray(rows["tokens"][i])])[None, :-1]
    logits = np.asarray(models.forward(cfg, params, jnp.asarray(seq)), np.float64)[0]
    out.append(logits[len(prompt) - 1:])
  return np.stack(out)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow
def test_sampler_entropy_and_temperature_log_probs(tiny):
  """Item 3 and 4: the sampler's per-token entropy is that of softmax(logits / T) at the sampled
  positions, `train/entropy` its masked mean (today: the mean NLL of the sampled tokens), and
  the PG family's old / reference log-probs are those of logits / T (today: T = 1)."""
  cfg, params, batch, eos = tiny
  t = 0.5
  sc = sampling.SamplingConfig(max_new_tokens=6, temperature=t, n=2, eos_ids=eos)
  rollout, _, metrics = rnd.sample_and_score(cfg, params, None, batch, jax.random.key(3), sc, None)
  rows = {"prompt_tokens": rollout.prompt_tokens, "prompt_mask": rollout.prompt_mask,
          "tokens": rollout.tokens, "mask": rollout.mask}
  logp_v = _np_log_softmax(_np_logits(cfg, params, rows) / t)
  ent = -(np.exp(logp_v) * logp_v).sum(-1)
  mask = np.asarray(rollout.mask)
  close(np.where(mask, rollout.entropy, 0), np.where(mask, ent, 0), atol=1e-4)
  close(metrics["train/entropy"], ent[mask].mean(), atol=1e-4)
  np.testing.assert_array_equal(rollout.truncated,
                                ~np.isin(np.asarray(rollout.tokens), eos).any(1))
  want = np.take_along_axis(logp_v, np.asarray(rollout.tokens)[..., None], -1)[..., 0]
  close(np.where(mask, completion_logprobs(cfg, params, rows, temperature=t), 0),
        np.where(mask, want, 0), atol=1e-4)
  logp, h = completion_logprobs_and_entropy(cfg, params, rows, temperature=t)
  close(np.where(mask, logp, 0), np.where(mask, want, 0), atol=1e-4)
  close(np.where(mask, h, 0), np.where(mask, ent, 0), atol=1e-4)
  # build_rows reads the spec's temperature for the frozen passes (old and reference).
  spec = PolicyGradient(group_size=2, kl_coef=0.1, temperature=t)
  built, _, _ = rnd.build_rows(cfg, spec, batch, rollout, jnp.arange(4.0), sampler_params=params,
                               ref_params=params, replay=None, replay_moves=False)
  for key in ("old_logp", "ref_logp"):
    close(np.where(mask, built[key], 0), np.where(mask, want, 0), atol=1e-4)
  # At T = 1 the sampler reuses the step's log-softmax: the same entropy as the model's.
  sc1 = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, eos_ids=eos)
  ro1 = sampling.sample(cfg, params, batch["prompt_tokens"], batch["prompt_mask"],
                        jax.random.key(4), sc1)
  rows1 = {"prompt_tokens": ro1.prompt_tokens, "prompt_mask": ro1.prompt_mask,
           "tokens": ro1.tokens, "mask": ro1.mask}
  logp1 = _np_log_softmax(_np_logits(cfg, params, rows1))
  m1 = np.asarray(ro1.mask)
  close(np.where(m1, ro1.entropy, 0), np.where(m1, -(np.exp(logp1) * logp1).sum(-1), 0), atol=1e-4)
  # And the PG specs of the registry take sampling.temperature (greedy: the model's T = 1).
  for temp, want_t in ((0.7, 0.7), (0.0, 1.0)):
    c = config_lib.load_config("configs/grpo.py", [f"sampling.temperature={temp}"])
    assert setup.build_spec(c).temperature == want_t


def _verify(tokens, mask, answer, answer_mask):
  """A reward with variance inside groups, and some unscorable (NaN) samples."""
  r = (tokens[:, 0] % 2 == 0).astype(jnp.float32) + mask.sum(1) / 10
  return jnp.where(tokens[:, 0] % 7 == 3, jnp.nan, r)


ROUNDS = {
    "gspo_delta_entropy": dict(importance_sampling_level="sequence", delta=1.5,
                               entropy_coef=0.01, top_entropy_quantile=0.5, scale_rewards="batch",
                               kl_coef=0.05, kl_kind="k2", temperature=0.7),
    "cispo_truncated": dict(loss_type="cispo", clip_high=4.0, mask_truncated_completions=True,
                            advantage="reinforce_pp", kl_coef=0.05, reward_kl_kind="k3"),
    "rloo_entropy_bonus": dict(advantage="rloo", kl_coef=0.05, reward_kl_kind="k2",
                               entropy_coef=0.01, temperature=1.3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROUNDS))
def test_options_end_to_end_in_one_jitted_round(tiny, name):
  cfg, params, batch, eos = tiny
  spec = PolicyGradient(group_size=G, **ROUNDS[name])
  # More stop tokens: an untrained model rarely samples its EOS, and truncation should vary.
  stops = eos + tuple(range(4, 9)) if spec.mask_truncated_completions else eos
  sc = sampling.SamplingConfig(max_new_tokens=6, temperature=spec.temperature, n=G, eos_ids=stops)
  opt = optax.adam(1e-2)
  rows = batch["prompt_tokens"].shape[0] * G
  round_fn = rnd.build_round_fn(cfg, spec, opt, sc, _verify, num_minibatches=2, num_samples=rows)
  state, metrics = round_fn(rnd.init_state(params, opt, spec, jax.random.key(5)), batch)
  metrics = jax.device_get(metrics)
  for key in ("train/loss", "train/grad_norm", "train/entropy", "train/kl_ref",
              "train/ratio_mean"):
    assert np.isfinite(metrics[key]), key
  assert metrics["train/skipped_fraction"] == 0
  moved = np.abs(np.asarray(state.params["embedding"]) - np.asarray(params["embedding"]))
  if spec.mask_truncated_completions:
    truncated = ~np.isin(metrics["samples/tokens"], stops).any(1)
    assert 0 < truncated.sum() < rows  # both kinds in the round
    # Tokens that only truncated completions sampled get no gradient (their embedding row).
    seen = lambda keep: np.unique(metrics["samples/tokens"][keep][
        np.arange(6)[None] < metrics["samples/lengths"][keep][:, None]])
    only_truncated = np.setdiff1d(seen(truncated), seen(~truncated))
    only_truncated = np.setdiff1d(only_truncated, np.asarray(batch["prompt_tokens"]))
    assert only_truncated.size and not moved[only_truncated].any()
  assert moved.any(), (metrics["samples/tokens"], metrics["samples/rewards"])


@pytest.mark.parametrize("overrides, text", [
    (["algorithm.importance_sampling_level=seq"], "algorithm.importance_sampling_level: must be "
                                                  "one of ('token', 'sequence')"),
    (["algorithm.entropy_coef=-0.1"], "algorithm.entropy_coef: must be >= 0"),
    (["algorithm.top_entropy_quantile=1.5"], "algorithm.top_entropy_quantile: must be in [0, 1]"),
    (["algorithm.scale_rewards=std"], "algorithm.scale_rewards: must be ''"),
    (["algorithm.delta=-1.0"], "algorithm.delta: must be >= 0"),
    (["algorithm.delta=1.1"], "algorithm.delta: 1.1 must exceed 1 + algorithm.clip_high"),
    (["algorithm.delta=2.0", "algorithm.loss_type=cispo"], "algorithm.delta: cispo caps"),
    (["algorithm.kl_estimator=k4"], "algorithm.kl_estimator: must be ''"),
    (["algorithm.advantage=dr_grpo", "algorithm.scale_rewards=batch"],
     "algorithm.scale_rewards: 'batch' with the dr_grpo advantage"),
    (["algorithm.name=rloo", "algorithm.scale_rewards=group"],
     "algorithm.scale_rewards: the rloo advantage has its own"),
    (["algorithm.name=rloo", "algorithm.importance_sampling_level=sequence"],
     "algorithm.importance_sampling_level: the rloo advantage trains with its own"),
    (["algorithm.name=rloo", "algorithm.top_entropy_quantile=0.2"],
     "algorithm.top_entropy_quantile: the rloo advantage"),
])
def test_pg_knob_errors_name_the_key(overrides, text):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), overrides)
  with pytest.raises(ConfigError) as info:
    config_validation.validate(cfg)
  assert text in str(info.value)


def test_pg_knobs_reach_the_spec():
  cfg = config_lib.load_config("configs/grpo.py", [
      "algorithm.importance_sampling_level=sequence",
      "algorithm.entropy_coef=0.01", "algorithm.top_entropy_quantile=0.2",
      "algorithm.mask_truncated_completions=true", "algorithm.scale_rewards=batch",
      "algorithm.loss_type=cispo"])
  config_validation.validate(cfg)
  spec = setup.build_spec(cfg)
  assert (spec.importance_sampling_level, spec.entropy_coef, spec.top_entropy_quantile,
          spec.mask_truncated_completions, spec.scale_rewards, spec.loss_type) == (
              "sequence", 0.01, 0.2, True, "batch", "cispo")
  cfg = config_lib.load_config("configs/grpo.py", ["algorithm.delta=2.0"])
  config_validation.validate(cfg)
  assert setup.build_spec(cfg).delta == 2.0
