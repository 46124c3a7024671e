"""Preference-family parity with TRL / SPIN (issue 21): the DPO loss types apo_down, aot, aot_pair,
sigmoid_norm and sft, several loss types with weights (MPO), KTO on the round's own samples,
TR-DPO reference syncing, SPIN's β schedule, and iterations counted from the end of the warm-up.

Each loss term against an independent NumPy computation and hand-checked values; each option end
to end through the jitted round that `setup.Run.round_fn` builds for the self-improvement phase
(one compile per option family: a SPIN run, a DPO run, a KTO run).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, setup
from selfplay_jax import round as rnd
from selfplay_jax.algorithms import losses as L
from selfplay_jax.algorithms.preference import KTO, Preference, mismatched_rows
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.data import pipeline
from selfplay_jax.errors import ConfigError
from selfplay_jax.models.logprobs import completion_logprobs
from tests.test_preference import _pairs as _pair_rows  # random pair rows and log-probs
from tests.test_train import OVERRIDES


def _ls(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _sig(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol,
                             atol=tol)


# ---- the new DPO loss terms: hand values -------------------------------------------------------


def test_apo_down_hand_values():
  z = jnp.zeros(1)
  close(L.dpo_loss(z, z, z, z, loss_type="apo_down")[0], [1.0])  # σ(0) + 1 − σ(0)
  # c = 0, r = −10, β = 0.1: σ(0) + 1 − σ(1) = 0.5 + 0.2689414.
  close(L.dpo_loss(z, -10 * jnp.ones(1), z, z, loss_type="apo_down")[0], [0.7689414])


def test_sigmoid_norm_is_length_normalised_and_keeps_summed_rewards():
  # c = 2 over 2 tokens, r = −3 over 3 tokens, β = 1: −logσ(1 − (−1)) = log(1 + e^−2).
  loss, aux = L.dpo_loss(jnp.array([2.0]), jnp.array([-3.0]), jnp.zeros(1), jnp.zeros(1),
                         loss_type="sigmoid_norm", beta=1.0, chosen_len_B=jnp.array([2]),
                         rejected_len_B=jnp.array([3]))
  close(loss, [0.1269280])
  close(aux["chosen_rewards"], [2.0])  # TRL logs β·c, not normalised
  with pytest.raises(ValueError, match="sigmoid_norm needs chosen_len_B"):
    L.dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), loss_type="sigmoid_norm")


def test_aot_sorts_over_the_batch_hand_values():
  # Policy log-ratios lp(y_w) − lp(y_l) = [2, 0], reference ones [0, 1]; sorted: [0, 2] vs [0, 1],
  # so Δ = [0, 1] and β = 1 gives [log 2, log(1 + e^−1)] (unsorted DPO would pair 2 with 0).
  pc, pr, rc, rr = (jnp.array(v) for v in ([2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]))
  loss, _ = L.dpo_loss(pc, pr, rc, rr, loss_type="aot", beta=1.0)
  close(loss, [np.log(2.0), 0.3132617])
  # aot_pair sorts c = [2, −1] and r = [0, 0] separately: Δ = [−1, 2].
  loss, _ = L.dpo_loss(pc, pr, rc, rr, loss_type="aot_pair", beta=1.0)
  close(loss, [1.3132617, 0.1269280])


def test_aot_leaves_out_invalid_pairs():
  """Pairs with weight 0 sort last and take no part: the valid ones give the loss of the batch
  without them, reported at the valid pairs in order."""
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(0, 3, 6).astype(np.float32) for _ in range(4))
  valid = np.array([1, 0, 1, 1, 0, 1], bool)
  for loss_type in ("aot", "aot_pair"):
    got, _ = L.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.3, label_smoothing=0.1,
                        valid_B=valid)
    want, _ = L.dpo_loss(*(x[valid] for x in (pc, pr, rc, rr)), loss_type=loss_type, beta=0.3,
                         label_smoothing=0.1)
    close(np.asarray(got)[valid], want)
    assert not np.any(np.asarray(got)[~valid])
    grad = jax.grad(lambda p: jnp.sum(L.dpo_loss(p, pr, rc, rr, loss_type=loss_type,
                                                 valid_B=valid)[0]))(jnp.asarray(pc))
    assert np.all(np.isfinite(grad)) and not np.any(np.asarray(grad)[~valid])


def test_sft_term_is_the_token_mean_nll_of_the_weighted_chosen_side():
  # (2 + 6) / (2 + 3) tokens; the weight-0 pair's −100 over 5 tokens is left out.
  loss = L.sft_pair_loss(jnp.array([-2.0, -6.0, -100.0]), jnp.array([2, 3, 5]),
                         jnp.array([1.0, 1.0, 0.0]))
  close(loss, [1.6, 1.6, 1.6])


# ---- several loss types with weights (MPO), the scheduled β ------------------------------------




def test_mpo_loss_is_the_weighted_sum_of_its_terms_vs_numpy():
  rows, logp, ref, mask, w = _pair_rows(np.random.default_rng(1))
  spec = Preference(loss_types=("sigmoid", "sigmoid_norm", "aot_pair", "apo_down", "sft"),
                    loss_weights=(0.8, 0.5, 0.3, 0.2, 1.0), beta=0.2, nll_coef=0.25)
  loss, aux = spec.loss(jnp.asarray(logp), rows)
  lp, rl = (logp * mask).sum(-1).astype(np.float64), (ref * mask).sum(-1).astype(np.float64)
  n = mask.sum(-1)
  c, r = lp[:, 0] - rl[:, 0], lp[:, 1] - rl[:, 1]
  sigmoid = -_ls(0.2 * (c - r))
  norm = -_ls(0.2 * (c / n[:, 0] - r / n[:, 1]))
  valid = w > 0  # aot_pair: the valid pairs' sorted losses, in order, at the valid pairs
  aot = np.zeros(len(w))
  aot[valid] = -_ls(0.2 * (np.sort(c[valid]) - np.sort(r[valid])))
  apo_down = _sig(0.2 * c) + 1 - _sig(0.2 * (c - r))
  sft = -(w * lp[:, 0]).sum() / (w * n[:, 0]).sum()
  per = 0.8 * sigmoid + 0.5 * norm + 0.3 * aot + 0.2 * apo_down + 1.0 * sft
  per = per + 0.25 * -(lp[:, 0] / n[:, 0])  # nll_coef
  close(loss, (per * w).sum() / w.sum())
  close(aux["margins"], (0.2 * (c - r) * w).sum() / w.sum())  # the first term's rewards


def test_scheduled_beta_from_the_rows_replaces_beta():
  rows, logp, _, _, _ = _pair_rows(np.random.default_rng(2))
  beta = jnp.full((6,), 0.7)
  got = Preference(beta=0.1).loss(jnp.asarray(logp), {**rows, "beta": beta})[0]
  close(got, Preference(beta=0.7).loss(jnp.asarray(logp), rows)[0])
  schedule = (0.1, 0.2, 5.0)
  assert [float(rnd.scheduled_beta(schedule, i)) for i in range(5)] == pytest.approx(
      [0.1, 0.2, 5.0, 5.0, 5.0])


def test_synced_reference_is_the_tr_dpo_soft_update():
  params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([4.0], jnp.bfloat16)}
  ref = {"w": jnp.array([3.0, -2.0]), "b": jnp.array([0.0], jnp.bfloat16)}
  got = rnd.synced_reference(params, ref, 0.25, jnp.asarray(True))
  close(got["w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2])
  assert got["b"].dtype == jnp.bfloat16 and float(got["b"][0]) == 1.0
  kept = rnd.synced_reference(params, ref, 0.25, jnp.asarray(False))
  close(kept["w"], ref["w"])


# ---- KTO ---------------------------------------------------------------------------------------


class _Rollout:
  def __init__(self, prompt_tokens, tokens, mask):
    self.prompt_tokens, self.prompt_mask = prompt_tokens, jnp.ones_like(prompt_tokens, bool)
    self.tokens, self.mask = tokens, mask


def _fake_logp(scale):
  """Per-token log-probs that depend on the prompt (so mismatched pairs differ)."""
  return lambda rows: -scale * (1.0 + (rows["prompt_tokens"].sum(1, keepdims=True) % 5)
                                ) * jnp.ones(rows["mask"].shape) * (1.0 + rows["tokens"] % 3)


def test_kto_rows_and_loss_vs_numpy():
  g = 2  # 3 prompts x 2 samples
  prompts = jnp.repeat(jnp.array([[3, 4], [5, 9], [7, 7]], jnp.int32), g, axis=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 30, (6, 4)), jnp.int32)
  mask = jnp.asarray(np.arange(4)[None] < np.array([[4], [2], [3], [1], [4], [2]]))
  rewards = jnp.array([1.0, 0.0, np.nan, 1.0, 0.0, 0.0])
  spec = KTO(beta=0.5, desirable_weight=1.5, undesirable_weight=0.5, group_size=g)
  logp = LogProbs(old=_fake_logp(0.1), ref=_fake_logp(0.2))
  rows = spec.build({}, _Rollout(prompts, tokens, mask), rewards, logp)
  np.testing.assert_array_equal(rows["desirable"], [1, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(rows["weight"], [1, 1, 0, 1, 1, 1])
  # Mismatched pairs: each completion under the previous prompt's prompt (cyclically).
  kl = mismatched_rows({"prompt_tokens": prompts, "prompt_mask": jnp.ones_like(prompts, bool),
                        "tokens": tokens, "mask": mask}, g)
  np.testing.assert_array_equal(kl["prompt_tokens"][:, 0], [7, 7, 3, 3, 5, 5])
  m = np.asarray(mask)
  seq = lambda f, rws: (np.asarray(f(rws)) * m).sum(1)
  close(rows["kl_logp"], seq(_fake_logp(0.1), kl))
  close(rows["kl_ref_logp"], seq(_fake_logp(0.2), kl))

  policy = -jnp.asarray(np.random.default_rng(1).uniform(0.1, 1.0, (6, 4)), jnp.float32)
  loss, aux = spec.loss(policy, rows)
  rho = (np.asarray(policy) * m).sum(1) - seq(_fake_logp(0.2), rows)
  z0 = max(0.0, float(np.mean(np.asarray(rows["kl_logp"]) - np.asarray(rows["kl_ref_logp"]))))
  d = np.asarray(rows["desirable"], bool)
  w = np.asarray(rows["weight"])
  per = np.where(d, 1.5 * (1 - _sig(0.5 * (rho - z0))), 0.5 * (1 - _sig(0.5 * (z0 - rho))))
  close(loss, (per * w).sum() / w.sum())
  close(aux["kto_kl"], z0)
  close(aux["desirable_fraction"], 2 / 5)
  close(aux["chosen_rewards"], (0.5 * rho)[d & (w > 0)].mean())
  close(aux["rejected_rewards"], (0.5 * rho)[~d & (w > 0)].mean())


def test_kto_z0_hand_value():
  # z0 = max(0, mean(1, 3)) = 2; desirable ρ = 2 -> w_d·(1 − σ(0)) = ½; undesirable ρ = 0 ->
  # 1 − σ(β(2 − 0)) with β = 1: 1 − σ(2) = 0.1192029.
  loss, aux = L.kto_loss(jnp.array([2.0, 0.0]), jnp.zeros(2), jnp.array([True, False]),
                         jnp.array([1.0, 3.0]), jnp.zeros(2), beta=1.0)
  close(loss, [0.5, 0.1192029])
  close(aux["kl"], 2.0)


# ---- config keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config, overrides, text", [
    ("configs/dpo.py", ["algorithm.loss_types=sigmoid,grpo"],
     "algorithm.loss_types: dpo takes names from"),
    ("configs/grpo.py", ["algorithm.loss_types=sigmoid"], "algorithm.loss_types: grpo takes no"),
    ("configs/dpo.py", ["algorithm.loss_types=sigmoid,sft", "algorithm.loss_weights=1.0"],
     "algorithm.loss_weights: 1 weights for the 2"),
    ("configs/dpo.py", ["algorithm.loss_types=sigmoid", "algorithm.loss_weights=x"],
     "algorithm.loss_weights: must be comma-separated numbers"),
    ("configs/dpo.py", ["algorithm.loss_types=sigmoid", "algorithm.loss_weights=-1"],
     "algorithm.loss_weights: must be >= 0"),
    ("configs/dpo.py", ["algorithm.beta_schedule=0.1,5"], "algorithm.beta_schedule: dpo has no"),
    ("configs/spin.py", ["algorithm.beta_schedule=0.1,0"], "algorithm.beta_schedule: every beta"),
    ("configs/spin.py", ["algorithm.ref_sync_every=2"], "algorithm.ref_sync_every: spin has no"),
    ("configs/dpo.py", ["algorithm.loss_type=simpo", "algorithm.ref_sync_every=2"],
     "algorithm.ref_sync_every: dpo has no"),
    ("configs/dpo.py", ["algorithm.ref_sync_alpha=0.0"], "algorithm.ref_sync_alpha: must be in"),
    ("configs/kto.py", ["algorithm.desirable_weight=-1.0"],
     "algorithm.desirable_weight: must be >= 0"),
    ("configs/kto.py", ["algorithm.undesirable_weight=-1.0"],
     "algorithm.undesirable_weight: must be >= 0"),
    ("configs/kto.py", ["algorithm.kto_threshold=x"], "algorithm.kto_threshold: cannot parse"),
    ("configs/kto.py", ["algorithm.loss_type=sigmoid"], "algorithm.loss_type: kto takes no"),
])
def test_new_keys_are_validated_naming_the_key(config, overrides, text):
  with pytest.raises(ConfigError) as info:
    cfg = config_lib.load_config(config, overrides)
    config_validation.validate(cfg)
  assert text in str(info.value)


def test_specs_read_the_new_keys():
  spec = setup.build_spec(config_lib.load_config("configs/dpo.py", [
      "algorithm.loss_types=sigmoid, sft", "algorithm.loss_weights=0.5,2",
      "algorithm.ref_sync_every=3", "algorithm.ref_sync_alpha=0.4"]))
  assert (spec.types, spec.weights) == (("sigmoid", "sft"), (0.5, 2.0))
  assert (spec.ref_sync_every, spec.ref_sync_alpha, spec.reference) == (3, 0.4, "frozen")
  assert setup.build_spec(config_lib.load_config("configs/dpo.py", [
      "algorithm.loss_types=simpo,sft"])).reference == "none"  # reference-free: no copy kept
  spec = setup.build_spec(config_lib.load_config("configs/spin.py", [
      "algorithm.beta_schedule=0.1,0.1,5.0"]))
  assert spec.beta_schedule == (0.1, 0.1, 5.0)
  kto = setup.build_spec(config_lib.load_config("configs/kto.py", [
      "algorithm.desirable_weight=1.33", "algorithm.kto_threshold=0.5"]))
  assert (kto.desirable_weight, kto.threshold, kto.group_size) == (1.33, 0.5, 4)


# ---- end to end: the self-improvement round that setup.Run builds --------------------------------


def _run(tmp_path_factory, config, *extra):
  cfg = config_lib.load_config(config, OVERRIDES + ["algorithm.num_minibatches=1", *extra])
  config_validation.validate(cfg)
  run = setup.build(cfg, tmp_path_factory.mktemp("run"))
  batches = pipeline.make_iterator(run.train_source(), tokenizer=run.tokenizer,
                                   batch_size=cfg.data.batch_size, seed=0,
                                   **setup.data_lengths(cfg))
  return cfg, run, run.round_fn(), batches


def _same(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_spin_iterations_count_from_the_end_of_the_warm_up(tmp_path_factory):
  """Warm-up W = 3 rounds (not a multiple of k = 2): the reference and the replay slot move after
  phase rounds 2 and 4 (rounds 5 and 7 of the run), not after rounds 4 and 6; β follows the
  schedule by iteration. The round is the one the training loop runs (`Run.round_fn`)."""
  cfg, run, round_fn, batches = _run(tmp_path_factory, "configs/spin.py",
                                     "algorithm.iteration_rounds=2",
                                     "algorithm.replay_previous=true",
                                     "algorithm.beta_schedule=0.1,0.5")
  assert cfg.warmup.rounds == 3
  state = run.initial_state().replace(round=jnp.asarray(cfg.warmup.rounds, jnp.int32))
  ref = jax.device_get(state.ref_params)
  for phase_round in range(1, 5):
    state, metrics = round_fn(state, next(batches))
    assert int(state.round) == cfg.warmup.rounds + phase_round
    params = jax.device_get(state.params)
    moved = phase_round % 2 == 0
    assert _same(state.ref_params, params if moved else ref), phase_round
    ref = jax.device_get(state.ref_params)
    replay_on = np.asarray(state.replay["weight"])
    assert np.all(replay_on == (1.0 if phase_round >= 2 else 0.0)), phase_round
    close(metrics["train/beta"], 0.1 if phase_round <= 2 else 0.5)


@pytest.mark.slow
def test_dpo_new_loss_types_with_weights_and_tr_dpo_sync(tmp_path_factory):
  """One jitted DPO round with every new loss type summed (MPO) gives the spec's loss under the
  round's starting params; the reference stays put in phase round 1 and becomes
  α·θ + (1 − α)·ref after phase round 2 (ref_sync_every = 2)."""
  cfg, run, round_fn, batches = _run(
      tmp_path_factory, "configs/dpo.py", "warmup.rounds=2",
      "algorithm.loss_types=apo_down,aot,aot_pair,sigmoid_norm,sft",
      "algorithm.loss_weights=1,0.5,0.5,1,0.1", "algorithm.ref_sync_every=2",
      "algorithm.ref_sync_alpha=0.25")
  spec, mc = run.spec, run.model_config
  state = run.initial_state().replace(round=jnp.asarray(cfg.warmup.rounds, jnp.int32))
  ref0 = jax.device_get(state.ref_params)
  batch = next(batches)
  frozen = lambda p: (lambda rows: completion_logprobs(mc, p, rows))
  rows = spec.build(batch, None, None, LogProbs(old=frozen(state.params),
                                               ref=frozen(state.ref_params)))
  want, _ = spec.loss(completion_logprobs(mc, state.params, rows), rows)
  state, metrics = round_fn(state, batch)
  close(metrics["train/loss"], want, tol=1e-4)
  assert np.isfinite(float(metrics["train/grad_norm"])) and metrics["train/skipped_fraction"] == 0
  assert _same(state.ref_params, ref0)  # phase round 1: no sync
  state, _ = round_fn(state, next(batches))
  params = jax.device_get(state.params)
  want_ref = jax.tree.map(lambda p, r: (0.25 * np.asarray(p, np.float32) +
                                        0.75 * np.asarray(r, np.float32)), params, ref0)
  for got, exp in zip(jax.tree.leaves(jax.device_get(state.ref_params)),
                      jax.tree.leaves(want_ref)):
    close(np.asarray(got, np.float32), exp, tol=1e-6)


@pytest.mark.slow
def test_kto_round_trains_on_verifier_labelled_samples(tmp_path_factory):
  cfg, run, round_fn, batches = _run(tmp_path_factory, "configs/kto.py", "sampling.n=2")
  assert run.spec.name == "kto"
  state = run.initial_state()
  before = jax.device_get(state.params)
  state, metrics = round_fn(state, next(batches))
  # Verifier rewards are 0 / 1 with threshold 1: desirable = verified correct.
  close(metrics["train/desirable_fraction"], metrics["train/accuracy"])
  assert float(metrics["train/kto_kl"]) >= 0.0 and np.isfinite(float(metrics["train/loss"]))
  assert metrics["train/skipped_fraction"] == 0 and not _same(state.params, before)
  assert _same(state.ref_params, before)  # the frozen reference
