"""PPO with a value head (selfplay_jax/algorithms/ppo.py): every new term against an independent
NumPy computation (GAE on a hand-worked trajectory), the value warm-up's optimizer gate, one
jitted round end to end per option, and the value head's place in sharding, checkpoints and HF
export."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from selfplay_jax import checkpoint, config_lib, config_validation, export, models, sampling
from selfplay_jax import sharding, train
from selfplay_jax import round as rnd
from selfplay_jax import setup as setup_lib
from selfplay_jax.algorithms import losses, ppo
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.data import tasks
from selfplay_jax.errors import ConfigError
from selfplay_jax.models import hf
from selfplay_jax.models.logprobs import completion_logprobs

G = 4
REPO = Path(__file__).resolve().parent.parent

# ---- NumPy references (written from the formulas, not from ppo.py) -------------------------------


def np_gae(r, v, m, gamma, lam):
  """The textbook backward loop, one row and one token at a time."""
  r, v, m = (np.asarray(x, np.float64) for x in (r, v, m))
  adv = np.zeros_like(r)
  for b in range(r.shape[0]):
    last = 0.0
    for t in reversed(range(r.shape[1])):
      if not m[b, t]:
        last = 0.0
        continue
      nxt = v[b, t + 1] if t + 1 < r.shape[1] and m[b, t + 1] else 0.0
      delta = r[b, t] + gamma * nxt - v[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, np.where(m > 0, adv + v, 0.0)


def np_whiten(x, m):
  sel = x[m > 0]
  return np.where(m > 0, (x - sel.mean()) / np.sqrt(sel.var() + 1e-8), 0.0)


def np_value_loss(v, old, ret, m, clip):
  per = (v - ret) ** 2
  if clip > 0:
    per = np.maximum(per, (old + np.clip(v - old, -clip, clip) - ret) ** 2)
  rows = [per[b][m[b] > 0].mean() if m[b].any() else 0.0 for b in range(v.shape[0])]
  return 0.5 * np.mean(rows)


# ---- the new terms -------------------------------------------------------------------------------


def test_gae_on_a_hand_worked_trajectory():
  # Three completion tokens and one pad; gamma = 0.9, lambda = 0.5 (gamma * lambda = 0.45).
  #   r = [0, 0, 1 | pad], V = [0.5, 0.2, -0.1 | 9 (pad, ignored)], V after the last token = 0
  #   delta_2 = 1 + 0.9*0 - (-0.1)    = 1.1
  #   delta_1 = 0 + 0.9*(-0.1) - 0.2  = -0.29
  #   delta_0 = 0 + 0.9*0.2 - 0.5     = -0.32
  #   A_2 = 1.1
  #   A_1 = -0.29 + 0.45 * 1.1        = 0.205
  #   A_0 = -0.32 + 0.45 * 0.205      = -0.22775
  #   returns = A + V = [0.27225, 0.405, 1.0 | 0]
  r = jnp.array([[0.0, 0.0, 1.0, 0.0]])
  v = jnp.array([[0.5, 0.2, -0.1, 9.0]])
  m = jnp.array([[True, True, True, False]])
  adv, ret = ppo.gae_advantages(r, v, m, gamma=0.9, lam=0.5)
  np.testing.assert_allclose(adv, [[-0.22775, 0.205, 1.1, 0.0]], atol=1e-6)
  np.testing.assert_allclose(ret, [[0.27225, 0.405, 1.0, 0.0]], atol=1e-6)


def test_gae_matches_numpy_and_its_limits():
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
  lengths = np.array([7, 3, 1, 0, 5])
  m = np.arange(7)[None] < lengths[:, None]
  for gamma, lam in ((1.0, 0.95), (0.9, 0.0), (0.99, 1.0)):
    adv, ret = ppo.gae_advantages(jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32),
                                  jnp.asarray(m), gamma, lam)
    want_adv, want_ret = np_gae(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, atol=1e-5)
  # gamma = lambda = 1: returns are the reward-to-go (Monte Carlo), whatever the values.
  _, ret = ppo.gae_advantages(jnp.asarray(r, jnp.float32), jnp.asarray(v, jnp.float32),
                              jnp.asarray(m), 1.0, 1.0)
  togo = np.flip(np.cumsum(np.flip(np.where(m, r, 0.0), -1), -1), -1)
  np.testing.assert_allclose(ret, np.where(m, togo, 0.0), atol=1e-5)


def test_token_rewards_kl_shaped_on_the_last_token():
  # reward 1 on the last of 3 tokens; k1 = old - ref = [0.5, -1, 0]; kl_coef 0.1:
  #   r = [-0.05, 0.1, 0 + 1.0 | 0]
  mask = jnp.array([[True, True, True, False], [False] * 4])
  old = jnp.array([[-1.0, -2.0, -0.5, 3.0], [0.0] * 4])
  ref = jnp.array([[-1.5, -1.0, -0.5, -7.0], [0.0] * 4])
  got = ppo.token_rewards(jnp.array([1.0, 5.0]), mask, old, ref, kl_coef=0.1)
  np.testing.assert_allclose(got, [[-0.05, 0.1, 1.0, 0.0], [0.0] * 4], atol=1e-6)
  np.testing.assert_allclose(ppo.token_rewards(jnp.array([1.0, 5.0]), mask),
                             [[0.0, 0.0, 1.0, 0.0], [0.0] * 4])


def test_value_loss_clipping_by_hand_and_numpy():
  # token 0: (1 - 2)^2 = 1; clipped V = 0.5 + clip(0.5, +-0.2) = 0.7, (0.7 - 2)^2 = 1.69 -> 1.69
  # token 1: (0 - 0)^2 = 0;  clipped V = 0.1 + clip(-0.1) = 0.0, 0 -> 0
  # loss = 0.5 * mean(1.69, 0) = 0.4225; the clipped term is the larger one on 1 of 2 tokens.
  v, old, ret = jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.1]]), jnp.array([[2.0, 0.0]])
  loss, aux = ppo.value_loss(v, old, ret, jnp.ones((1, 2), bool), clip=0.2)
  np.testing.assert_allclose(loss, 0.4225, atol=1e-6)
  np.testing.assert_allclose(aux["value_clip_fraction"], 0.5)
  loss, _ = ppo.value_loss(v, old, ret, jnp.ones((1, 2), bool), clip=0.0)
  np.testing.assert_allclose(loss, 0.25, atol=1e-6)  # 0.5 * mean(1, 0)
  rng = np.random.default_rng(1)
  v, old, ret = (rng.normal(size=(4, 6)) for _ in range(3))
  m = np.arange(6)[None] < np.array([6, 2, 0, 4])[:, None]
  for clip in (0.0, 0.2, 1.0):
    got, _ = ppo.value_loss(*(jnp.asarray(x, jnp.float32) for x in (v, old, ret)), jnp.asarray(m),
                            clip)
    np.testing.assert_allclose(got, np_value_loss(v, old, ret, m, clip), rtol=1e-5)
  # The gradient reaches only the new values, and not through the clipped branch where it wins.
  g = jax.grad(lambda x: ppo.value_loss(x, jnp.array([[0.5, 0.1]]), jnp.array([[2.0, 0.0]]),
                                        jnp.ones((1, 2), bool), 0.2)[0])(jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(g, [[0.0, 0.0]], atol=1e-7)  # clipped (const) / zero error


def test_whiten_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 5)) * 3 + 1
  m = np.arange(5)[None] < np.array([5, 2, 3])[:, None]
  np.testing.assert_allclose(ppo.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(m)),
                             np_whiten(x, m), atol=1e-5)


def _rollout(tokens_mask):
  """A hand-built rollout: 2 prompt tokens, the given completion mask."""
  m = jnp.asarray(tokens_mask)
  r, n = m.shape
  return sampling.Rollout(
      prompt_tokens=jnp.ones((r, 2), jnp.int32), prompt_mask=jnp.ones((r, 2), bool),
      tokens=jnp.full((r, n), 3, jnp.int32), logprobs=jnp.zeros((r, n)),
      model_logprobs=jnp.zeros((r, n)), mask=m, lengths=m.sum(-1).astype(jnp.int32))


def test_spec_build_advantages_and_returns_vs_numpy():
  mask = np.arange(4)[None] < np.array([4, 2, 3])[:, None]
  rewards = np.array([1.0, 0.0, 0.5])
  old_logp = -np.arange(12, dtype=np.float32).reshape(3, 4) / 10
  ref_logp = old_logp - 0.3
  values = np.array([[0.2, 0.4, 0.1, -0.3], [0.5, 0.5, 7.0, 7.0], [0.0, 0.3, 0.6, 7.0]])
  logp = LogProbs(old=None, ref=lambda rows: jnp.asarray(ref_logp),
                  old_forward=lambda rows: (jnp.asarray(old_logp),
                                            jnp.asarray(values, jnp.float32)))
  spec = ppo.PPO(kl_coef=0.1, gamma=0.9, gae_lambda=0.8, reference="frozen")
  rows = spec.build({}, _rollout(mask), jnp.asarray(rewards), logp)
  r = np.where(mask, -0.1 * 0.3, 0.0)  # k1 = old - ref = 0.3 on every token
  r[np.arange(3), mask.sum(-1) - 1] += rewards
  adv, ret = np_gae(r, values, mask, 0.9, 0.8)
  np.testing.assert_allclose(rows["returns"], ret, atol=1e-5)
  np.testing.assert_allclose(rows["advantages"], np_whiten(adv, mask), atol=1e-4)
  np.testing.assert_allclose(rows["old_values"], values)
  assert set(rows) >= {"old_logp", "ref_logp", "mask", "tokens"}


def test_policy_loss_is_the_pg_clipped_loss_plus_the_value_loss():
  rng = np.random.default_rng(3)
  rows = {"mask": jnp.asarray(np.arange(5)[None] < np.array([5, 3])[:, None]),
          **{k: jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
             for k in ("old_logp", "advantages", "old_values", "returns")}}
  logp, values = (jnp.asarray(rng.normal(size=(2, 5)), jnp.float32) for _ in range(2))
  spec = ppo.PPO(vf_coef=0.3, value_clip=0.2)
  loss, aux = spec.loss((logp, values), rows)
  pg, _ = losses.policy_gradient_loss(logp, rows["old_logp"], rows["advantages"], rows["mask"],
                                      max_completion_len=5)
  m = np.asarray(rows["mask"])
  vf = np_value_loss(*(np.asarray(x) for x in (values, rows["old_values"], rows["returns"])), m,
                     0.2)
  np.testing.assert_allclose(loss, pg + 0.3 * vf, rtol=1e-5)
  np.testing.assert_allclose(aux["value_loss"], vf, rtol=1e-5)


def test_freeze_policy_gates_only_the_window():
  params = {"w": jnp.ones(2), ppo.VALUE_HEAD: {"kernel": jnp.ones((2, 1))}}
  tx = ppo.freeze_policy(optax.sgd(1.0, momentum=0.9), start=1, end=3)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  moved = []
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
    moved.append((float(jnp.abs(updates["w"]).sum()),
                  float(jnp.abs(updates[ppo.VALUE_HEAD]["kernel"]).sum())))
  # step 0 trains everything (momentum builds up); steps 1-2 only the head, although the policy's
  # momentum is non-zero; step 3 trains everything again.
  assert moved[0][0] > 0 and moved[1][0] == 0 and moved[2][0] == 0 and moved[3][0] > 0
  assert all(head > 0 for _, head in moved)
  assert int(state.count) == 4


# ---- params: value head, critic, sharding, export ------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok"))
  cfg = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                           pad_token_id=tok.pad_id).validate()
  batch = tasks.encode_examples(task.examples("train", seed=0, num=4), tok, 8, 8, 4)
  sc = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=G, eos_ids=tuple(tok.eos_ids))
  params = models.init_params(cfg, jax.random.key(0))
  return cfg, params, batch, sc


@pytest.mark.slow
def test_value_head_params_and_forward(setup):
  cfg, params, batch, _ = setup
  full = ppo.with_value_head(params, separate_critic=True)
  assert full[ppo.VALUE_HEAD]["kernel"].shape == (cfg.hidden_size, 1)
  assert jax.tree.structure(full[ppo.CRITIC]) == jax.tree.structure(params)
  assert jax.tree.structure(ppo.policy_params(full)) == jax.tree.structure(params)
  rows = {"prompt_tokens": batch["prompt_tokens"], "prompt_mask": batch["prompt_mask"],
          "tokens": batch["response_tokens"], "mask": batch["response_mask"]}
  head = {"kernel": jnp.arange(cfg.hidden_size, dtype=jnp.float32)[:, None] / 100,
          "bias": jnp.array([0.5])}
  logp, values = ppo.policy_and_values(cfg, {**params, ppo.VALUE_HEAD: head}, rows)
  np.testing.assert_allclose(logp, completion_logprobs(cfg, params, rows), atol=1e-5)
  hot, _ = ppo.policy_and_values(cfg, {**params, ppo.VALUE_HEAD: head}, rows, temperature=0.7)
  np.testing.assert_allclose(hot, completion_logprobs(cfg, params, rows, temperature=0.7),
                             atol=1e-5)  # the sampling temperature's log-probs, as the PG family
  # The value at completion position t reads the hidden state that predicts token t.
  p = rows["prompt_tokens"].shape[1]
  tokens = jnp.concatenate([rows["prompt_tokens"], rows["tokens"]], axis=1)[:, :-1]
  segs = jnp.concatenate([rows["prompt_mask"], jnp.ones_like(rows["mask"])], 1)[:, :-1]
  _, hidden = models.decoder.forward(cfg, params, tokens, segment_ids=segs.astype(jnp.int32),
                                     return_hidden=True)
  want = np.asarray(hidden[:, p - 1:], np.float32) @ np.asarray(head["kernel"][:, 0]) + 0.5
  np.testing.assert_allclose(values, want, atol=1e-4)
  # The separate critic's values come from its own trunk: a changed critic changes them.
  critic = jax.tree.map(lambda x: x * 1.5, params)
  _, v2 = ppo.policy_and_values(cfg, {**params, ppo.VALUE_HEAD: head, ppo.CRITIC: critic}, rows,
                                separate_critic=True)
  assert not np.allclose(v2, values)
  # after_warmup copies the (warmed-up) policy into the critic.
  spec = ppo.PPO(separate_critic=True)
  anchored = spec.after_warmup({**params, ppo.VALUE_HEAD: head, ppo.CRITIC: critic})
  for a, b in zip(jax.tree.leaves(anchored[ppo.CRITIC]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_sharding_and_export_with_a_value_head(setup, tmp_path):
  cfg, params, _, _ = setup
  full = ppo.with_value_head(params, separate_critic=True)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  specs = sharding.param_specs(cfg, full, mesh, sharding.logical_rules({}))
  model_specs = sharding.param_specs(cfg, params, mesh, sharding.logical_rules({}))
  assert specs[ppo.CRITIC] == model_specs  # the critic trunk is sharded like the model
  assert all(a is None for a in specs[ppo.VALUE_HEAD]["kernel"])  # tiny: replicated
  # HF export writes the model's tensors only: the same file with or without the head / critic.
  hf.save_pretrained(cfg, jax.device_get(full), tmp_path / "with")
  hf.save_pretrained(cfg, jax.device_get(params), tmp_path / "without")
  got = safetensors.numpy.load_file(str(tmp_path / "with" / "model.safetensors"))
  want = safetensors.numpy.load_file(str(tmp_path / "without" / "model.safetensors"))
  assert sorted(got) == sorted(want) and not any("value" in k or "critic" in k for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


# ---- one jitted round per option -----------------------------------------------------------------


def _length_scorer(sample_params, ref_params, batch, rollout, rng):
  """Rewards that vary within a group (completion length / 8), so returns are non-zero."""
  return rollout.lengths.astype(jnp.float32) / 8.0, {}


def _run_rounds(setup, spec, rounds, num_minibatches=2):
  cfg, params, batch, sc = setup
  opt = spec.wrap_optimizer(optax.adam(1e-2))
  fn = rnd.build_round_fn(cfg, spec, opt, sc, None, scorer=_length_scorer,
                          num_minibatches=num_minibatches)
  state = rnd.init_state(spec.init_params(params), opt, spec, jax.random.key(1))
  history = [jax.device_get(state.params)]
  metrics = []
  for _ in range(rounds):
    state, m = fn(state, batch)
    history.append(jax.device_get(state.params))
    metrics.append(jax.device_get(m))
  return history, metrics


def _changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_jitted_round_value_warmup_then_policy(setup):
  # value warm-up = optimizer steps [0, 2) = the first round (2 minibatches).
  spec = ppo.PPO(value_warmup=(0, 2), vf_coef=0.5)
  history, metrics = _run_rounds(setup, spec, rounds=2)
  for m in metrics:
    assert np.isfinite(m["train/loss"]) and np.isfinite(m["train/value_loss"])
    assert m["train/value_loss"] > 0 and m["train/skipped_fraction"] == 0
  before, warm, after = history
  assert _changed(before[ppo.VALUE_HEAD], warm[ppo.VALUE_HEAD])  # the head trains in warm-up
  assert not _changed(ppo.policy_params(before), ppo.policy_params(warm))  # the policy does not
  assert _changed(ppo.policy_params(warm), ppo.policy_params(after))  # ... until it is over
  assert _changed(warm[ppo.VALUE_HEAD], after[ppo.VALUE_HEAD])


@pytest.mark.slow
def test_jitted_round_separate_critic_and_kl(setup):
  spec = ppo.PPO(separate_critic=True, kl_coef=0.05, reference="frozen", value_clip=0.0,
                 gamma=0.99, gae_lambda=0.9)
  # Two steps: the zero-initialised head passes no gradient to the critic trunk in the first one.
  history, metrics = _run_rounds(setup, spec, rounds=1, num_minibatches=2)
  before, after = history
  assert np.isfinite(metrics[0]["train/loss"]) and "train/kl_ref" in metrics[0]
  assert _changed(before[ppo.CRITIC], after[ppo.CRITIC])  # the critic trunk trains
  assert _changed(ppo.policy_params(before), ppo.policy_params(after))


def test_ppo_round_without_the_spec_forward_is_refused():
  with pytest.raises(ValueError, match="old_forward"):
    ppo.PPO().build({}, _rollout(np.ones((2, 3), bool)), jnp.zeros(2),
                    LogProbs(old=None, ref=None))


def test_registry_spec_from_config():
  cfg = config_lib.load_config(str(REPO / "configs" / "ppo.py"), [
      "warmup.rounds=3", "warmup.num_minibatches=2", "algorithm.value_warmup_rounds=4",
      "algorithm.num_epochs=2"])
  spec = setup_lib.build_spec(cfg)
  assert isinstance(spec, ppo.PPO) and spec.reference == "none" and spec.temperature == 1.0
  assert spec.value_warmup == (6, 6 + 4 * 2 * cfg.algorithm.num_minibatches)
  state = setup_lib.build_optimizer(cfg).init({"w": jnp.zeros(1)})
  assert isinstance(state, ppo.FreezeState)


@pytest.mark.parametrize("override, key", [
    ("algorithm.advantage=rloo", "algorithm.advantage"),
    ("algorithm.overlong_buffer=4", "algorithm.overlong_buffer"),
    ("algorithm.gamma=1.5", "algorithm.gamma"),
    ("algorithm.gae_lambda=-0.1", "algorithm.gae_lambda"),
    ("algorithm.value_clip=-1.0", "algorithm.value_clip"),
    ("algorithm.vf_coef=-1.0", "algorithm.vf_coef"),
    ("algorithm.value_warmup_rounds=-1", "algorithm.value_warmup_rounds"),
    # GRPO-family options the PPO loss does not take are refused, not ignored
    ("algorithm.scale_rewards=batch", "algorithm.scale_rewards"),
    ("algorithm.importance_sampling_level=sequence", "algorithm.importance_sampling_level"),
    ("algorithm.delta=2.0", "algorithm.delta"),
    ("algorithm.entropy_coef=0.01", "algorithm.entropy_coef"),
    ("algorithm.top_entropy_quantile=0.2", "algorithm.top_entropy_quantile"),
    ("algorithm.mask_truncated_completions=True", "algorithm.mask_truncated_completions"),
    ("algorithm.kl_estimator=k3", "algorithm.kl_estimator")])
def test_config_errors_name_the_key(override, key):
  cfg = config_lib.load_config(str(REPO / "configs" / "ppo.py"), [override])
  with pytest.raises(ConfigError, match=f"^{key}:"):
    config_validation.validate(cfg)


# ---- the training loop: critic anchoring, value warm-up, resume, export ----------------------------


def _loop_cfg(*extra):
  from tests.test_train import OVERRIDES  # pylint: disable=import-outside-toplevel
  return config_lib.load_config(str(REPO / "configs" / "ppo.py"), [
      *OVERRIDES, "warmup.rounds=2", "rounds=3", "checkpoint.keep=10",
      "algorithm.value_warmup_rounds=1", "algorithm.separate_critic=true",
      # rewards that are not all 0 on an untrained model: verifier - 0.01 x length
      f"algorithm.scorer={REPO / 'examples' / 'extending' / 'awr.py'}:make_length_scorer", *extra])


def _restore(cfg, workdir, step):
  like = setup_lib.build(cfg, workdir).abstract_state()
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    return jax.device_get(ckpt.restore(step, abstract_state=like)[0])


def _distance(a, b) -> float:
  return sum(float(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).sum())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_training_loop_anchors_the_critic_resumes_and_exports(tmp_path):
  full, part = tmp_path / "full", tmp_path / "part"
  train.train_and_evaluate(_loop_cfg(), full)
  cfg = _loop_cfg()
  warm, value_warm, last = (_restore(cfg, full, r) for r in (2, 3, 5))
  # Round 3 is the value warm-up: the policy is the warmed-up one, bit for bit, and the critic
  # restarted from it (then trained one round), far closer to it than the initial copy was.
  policy = ppo.policy_params(warm.params)
  assert not _changed(policy, ppo.policy_params(value_warm.params))
  assert _distance(value_warm.params[ppo.CRITIC], policy) < 0.1 * _distance(
      warm.params[ppo.CRITIC], policy)
  assert _changed(warm.params[ppo.VALUE_HEAD], value_warm.params[ppo.VALUE_HEAD])
  assert _changed(policy, ppo.policy_params(last.params))  # the policy trains after it
  # Stopped after round 4 and resumed: the same state, bit for bit.
  train.train_and_evaluate(_loop_cfg("rounds=2"), part)
  train.train_and_evaluate(_loop_cfg(), part)
  resumed = _restore(cfg, part, 5)
  for x, y in zip(jax.tree.leaves((last.params, last.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Export writes the policy only.
  out, step = export.export_workdir(full, tmp_path / "hf")
  tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
  assert step == 5 and not any("value" in k or "critic" in k for k in tensors)
  want = tmp_path / "policy_only"
  hf.save_pretrained(setup_lib.build(cfg, full).model_config, ppo.policy_params(last.params), want)
  for k, v in safetensors.numpy.load_file(str(want / "model.safetensors")).items():
    np.testing.assert_array_equal(tensors[k], v)
