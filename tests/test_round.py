"""The round is one compiled program, equals the same steps run as separate jitted pieces, and never
writes a non-finite update into the state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax.models.logprobs import completion_logprobs
from selfplay_jax import models, sampling
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.algorithms.sft import SFT, RestEM
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.data import tasks

G = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok"))
  cfg = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=tok.bos_id,
                           eos_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id).validate()
  batch = tasks.encode_examples(task.examples("train", seed=0, num=4), tok, 8, 8, 4)
  sc = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=G, eos_ids=tuple(tok.eos_ids))
  params = models.init_params(cfg, jax.random.key(0))
  return cfg, params, batch, sc, task.make_verifier(tok)


def _leaves_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.slow
def test_round_is_one_program_traced_once(setup):
  cfg, params, batch, sc, verify = setup
  spec = PolicyGradient(group_size=G, kl_coef=0.05)
  opt = optax.adam(1e-2)
  traces = []
  raw = rnd.build_round_fn(cfg, spec, opt, sc, verify, num_epochs=2, num_minibatches=2, jit=False)

  def counted(state, b):
    traces.append(1)
    return raw(state, b)

  round_fn = jax.jit(counted, donate_argnums=0)
  state = rnd.init_state(params, opt, spec, jax.random.key(1))
  lowered = round_fn.lower(state, batch)
  assert "while" in lowered.as_text()  # the sampler's decode loop lives inside the one program
  for _ in range(3):
    state, metrics = round_fn(state, batch)
  assert len(traces) == 1  # traced once (shared by .lower() and the calls), never re-traced
  assert int(state.round) == 3 and int(state.step) == 3 * 4
  assert set(metrics) >= {"train/reward_mean", "train/loss", "train/grad_norm", "train/kl_ref",
                          "train/entropy", "train/completion_len", "train/skipped_fraction"}


@pytest.mark.parametrize("spec", [
    PolicyGradient(group_size=G, kl_coef=0.05),
    PolicyGradient(group_size=G, loss_type="dapo", clip_high=0.28, dynamic_filter=True),
    PolicyGradient(group_size=G, advantage="rloo", kl_coef=0.05),
    PolicyGradient(group_size=G, advantage="reinforce_pp", kl_coef=0.05),
    SFT(),
    RestEM(group_size=G, threshold=0.0),
], ids=lambda s: f"{s.name}-{getattr(s, 'advantage', '')}")
@pytest.mark.slow
def test_fused_round_equals_separate_pieces(setup, spec):
  """The fused round gives the same result as sample / verify / build / update jitted separately."""
  cfg, params, batch, sc, _ = setup
  # A reward with variance inside groups (an untrained model never solves the task).
  verify = lambda tokens, mask, answer, answer_mask: (tokens[:, 0] % 2 == 0).astype(jnp.float32)
  opt = optax.adam(1e-2)
  epochs, minibatches = 2, 2
  state = rnd.init_state(params, opt, spec, jax.random.key(7))
  fused = rnd.build_round_fn(cfg, spec, opt, sc, verify, num_epochs=epochs,
                             num_minibatches=minibatches)
  fused_state, fused_metrics = fused(state, batch)

  # The same work, piece by piece, with host round-trips in between.
  state = rnd.init_state(params, opt, spec, jax.random.key(7))
  rng, k_sample, k_shuffle = jax.random.split(state.rng, 3)
  rollout, rewards = None, None
  if spec.samples:
    rollout = jax.device_get(sampling.sample(cfg, state.params, batch["prompt_tokens"],
                                             batch["prompt_mask"], k_sample, sc))
    rep = lambda x: np.repeat(x, G, axis=0)
    rewards = jax.jit(verify)(rollout.tokens, rollout.mask, rep(batch["answer_tokens"]),
                              rep(batch["answer_mask"]))
  # The round's frozen passes run in num_minibatches chunks of rows (only round-off differs from
  # one pass, but Adam turns round-off in near-zero gradients into lr-sized steps).
  logp_fn = jax.jit(lambda p, rows: completion_logprobs(cfg, p, rows, num_chunks=minibatches))
  logp = LogProbs(old=lambda rows: logp_fn(state.params, rows),
                  ref=lambda rows: logp_fn(state.ref_params, rows))
  rows = jax.device_get(spec.build(batch, rollout, rewards, logp))
  minibatches_all = jax.device_get(rnd.minibatches(rows, k_shuffle, epochs, minibatches))

  @jax.jit
  def update(params, opt_state, mb):
    grads = jax.grad(lambda p: spec.loss(completion_logprobs(cfg, p, mb), mb)[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  p, o = state.params, state.opt_state
  for i in range(epochs * minibatches):
    p, o = update(p, o, jax.tree.map(lambda x: x[i], minibatches_all))
  _leaves_close(fused_state.params, p, atol=2e-5)
  assert not np.allclose(np.asarray(p["embedding"]), np.asarray(params["embedding"]))
  if spec.reference == "frozen":
    _leaves_close(fused_state.ref_params, params, atol=0)
  np.testing.assert_array_equal(jax.random.key_data(fused_state.rng), jax.random.key_data(rng))
  if rewards is not None:
    np.testing.assert_allclose(fused_metrics["train/reward_mean"], np.mean(rewards), atol=1e-6)


@dataclasses.dataclass(frozen=True)
class _PoisonedSFT(SFT):
  """SFT whose loss is NaN on every other round (to exercise the non-finite guard)."""

  def loss(self, logp_BxT, rows):
    loss, aux = super().loss(logp_BxT, rows)
    return loss * jnp.where(rows["poison"][0], jnp.nan, 1.0), aux

  def build(self, batch, rollout, rewards, logp):
    rows = super().build(batch, rollout, rewards, logp)
    rows["poison"] = jnp.broadcast_to(batch["poison"], rows["mask"].shape[:1])
    return rows


@pytest.mark.slow
def test_non_finite_update_is_skipped_and_counted(setup):
  cfg, params, batch, sc, verify = setup
  spec, opt = _PoisonedSFT(), optax.adam(1e-2)
  round_fn = rnd.build_round_fn(cfg, spec, opt, sc, verify)
  state = rnd.init_state(params, opt, spec, jax.random.key(0))
  before = jax.device_get(state.params)
  state, metrics = round_fn(state, {**batch, "poison": np.array(True)})
  assert float(metrics["train/skipped_fraction"]) == 1.0
  assert not np.isfinite(float(metrics["train/loss"]))
  _leaves_close(state.params, before, atol=0)  # bitwise unchanged
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.opt_state))
  assert int(state.bad_updates) == 1 and int(metrics["train/consecutive_skipped"]) == 1
  state, metrics = round_fn(state, {**batch, "poison": np.array(True)})
  assert int(state.bad_updates) == 2  # consecutive skips are counted across rounds
  _leaves_close(state.params, before, atol=0)
  state, metrics = round_fn(state, {**batch, "poison": np.array(False)})
  assert float(metrics["train/skipped_fraction"]) == 0.0
  assert int(state.bad_updates) == 0  # a good update resets the count
  assert not np.array_equal(np.asarray(state.params["embedding"]), before["embedding"])


@pytest.mark.parametrize("first, last, poisoned", [(2, 3, [False, True, True, False]),
                                                   (3, 0, [False, False, True, True])])
@pytest.mark.slow
def test_nan_injection_poisons_exactly_the_configured_rounds(setup, first, last, poisoned):
  """`nan_rounds` (debug.nan_*) NaNs every update of rounds first..last; the guard skips them all,
  and the consecutive count is the number of minibatch updates since the last good one."""
  cfg, params, batch, sc, verify = setup
  spec, opt = SFT(), optax.adam(1e-2)
  round_fn = rnd.build_round_fn(cfg, spec, opt, sc, verify, num_minibatches=2,
                                nan_rounds=(first, last))
  state = rnd.init_state(params, opt, spec, jax.random.key(0))
  run = 0
  for bad in poisoned:
    before = jax.device_get(state.params)
    state, metrics = round_fn(state, batch)
    assert float(metrics["train/skipped_fraction"]) == float(bad)
    assert np.isfinite(float(metrics["train/loss"])) != bad
    run = run + 2 if bad else 0
    assert int(state.bad_updates) == run
    if bad:
      _leaves_close(state.params, before, atol=0)


@pytest.mark.slow
def test_previous_iterate_reference_moves(setup):
  cfg, params, batch, sc, verify = setup
  spec = dataclasses.replace(PolicyGradient(group_size=G, kl_coef=0.1), reference="previous")
  opt = optax.adam(1e-2)
  round_fn = rnd.build_round_fn(cfg, spec, opt, sc, verify)
  state = rnd.init_state(params, opt, spec, jax.random.key(0))
  state, _ = round_fn(state, batch)
  _leaves_close(state.ref_params, state.params, atol=0)


@pytest.mark.slow
def test_restart_from_base_params(setup):
  """ReST-EM restart: each round's updates start from the initial params, not the last iterate."""
  cfg, params, batch, sc, verify = setup
  spec, opt = RestEM(group_size=G, threshold=0.0, restart_from_base=True), optax.sgd(0.1)
  round_fn = rnd.build_round_fn(cfg, spec, opt, sc, verify, jit=True)
  state = rnd.init_state(params, opt, spec, jax.random.key(0))
  state, _ = round_fn(state, batch)
  _leaves_close(state.base_params, params, atol=0)
  drift = np.abs(np.asarray(state.params["embedding"]) - np.asarray(params["embedding"])).max()
  state, _ = round_fn(state, batch)
  drift2 = np.abs(np.asarray(state.params["embedding"]) - np.asarray(params["embedding"])).max()
  assert drift2 < 1.5 * drift  # one round's worth of movement from base, not two


def _pg_rows(setup, spec):
  """One round's GRPO rows (old log-probs from the frozen pass) and the params that sampled them."""
  cfg, params, batch, sc, _ = setup
  verify = lambda tokens, mask, answer, answer_mask: (tokens[:, 0] % 2 == 0).astype(jnp.float32)
  rollout, rewards, _ = rnd.sample_and_score(cfg, params, None, batch, jax.random.key(3), sc, verify)
  rows, _, _ = rnd.build_rows(cfg, spec, batch, rollout, rewards, sampler_params=params,
                              ref_params=params, replay=None, replay_moves=False)
  return rows


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    PolicyGradient(group_size=G),
    PolicyGradient(group_size=G, loss_type="dapo", clip_high=0.28, entropy_coef=0.01),
], ids=["grpo", "dapo-entropy"])
def test_old_logp_from_the_update_forward_gives_the_same_loss_and_grad(setup, spec):
  """One update on freshly sampled rows: `old_logp` taken (stop-gradient) from the update's own
  forward gives the loss, aux metrics and gradient of the frozen pass's `old_logp`."""
  cfg, params = setup[0], setup[1]
  rows = _pg_rows(setup, spec)
  logp_fn = lambda p, mb: spec.forward(cfg, p, mb)

  def loss_and_grad(minibatch, from_current):
    def loss_fn(p):
      out = logp_fn(p, minibatch)
      r = minibatch if not from_current else {
          **minibatch, "old_logp": jax.lax.stop_gradient(rnd._logp_of(out))}
      return spec.loss(out, r)
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  (loss_a, aux_a), grad_a = loss_and_grad(rows, False)
  shortcut = {k: v for k, v in rows.items() if k != "old_logp"}
  (loss_b, aux_b), grad_b = loss_and_grad(shortcut, True)
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6, atol=1e-7)
  for k in aux_a:
    np.testing.assert_allclose(float(aux_a[k]), float(aux_b[k]), rtol=1e-5, atol=1e-6)
  _leaves_close(grad_a, grad_b, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad_a)) > 1e-4  # not vacuous


@pytest.mark.slow
def test_one_update_round_skips_the_old_logp_forward(setup):
  """With one update per round the round drops the frozen old-log-prob pass (XLA counts a whole
  forward over the rows fewer FLOPs) and ends where the round with the pass ends; with two
  minibatches the pass stays (the second update's ratio is not 1)."""
  cfg, params, batch, sc, _ = setup
  verify = lambda tokens, mask, answer, answer_mask: (tokens[:, 0] % 2 == 0).astype(jnp.float32)
  spec, opt = PolicyGradient(group_size=G), optax.sgd(1e-2)

  def run(reuse, minibatches=1):
    fn = rnd.build_round_fn(cfg, spec, opt, sc, verify, num_minibatches=minibatches,
                            reuse_old_logp=reuse)
    state = rnd.init_state(params, opt, spec, jax.random.key(5))
    flops = fn.lower(state, batch).compile().cost_analysis()
    flops = flops[0] if isinstance(flops, list) else flops
    new_state, metrics = fn(state, batch)
    return float(flops["flops"]), new_state, metrics

  flops_skip, state_skip, m_skip = run(True)
  flops_full, state_full, m_full = run(False)
  rows = sc.n * batch["prompt_tokens"].shape[0]
  seq = batch["prompt_tokens"].shape[1] + sc.max_new_tokens - 1
  forward = 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) * rows * seq
  assert flops_full - flops_skip > 0.5 * forward, (flops_full, flops_skip, forward)
  np.testing.assert_allclose(float(m_skip["train/loss"]), float(m_full["train/loss"]), atol=1e-6)
  _leaves_close(state_skip.params, state_full.params, atol=1e-6)
  assert float(m_full["train/grad_norm"]) > 0
  flops_two, _, _ = run(True, minibatches=2)
  flops_two_full, _, _ = run(False, minibatches=2)
  assert flops_two == pytest.approx(flops_two_full, rel=1e-3)
