"""Meshes from config and the sharded round: under 8 fake CPU devices, every mesh shape gives the
single-device round's metrics and parameters (float tolerance), and shardings follow the rules."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from selfplay_jax import models, sampling, scoring, sharding
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.algorithms.preference import Preference
from selfplay_jax.data import tasks
from selfplay_jax.models.config import ConfigError

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
ROUNDS = 2
# Counts of sign tests on margins that start at exactly 0 (policy == reference in round 1): round-off
# of a different reduction order decides ties, so these are compared only through the margins.
DISCRETE = {"train/pair_accuracy"}


def _mesh_cfg(data, fsdp, tensor):
  return {"data": data, "fsdp": fsdp, "tensor": tensor}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  assert jax.device_count() == 8
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok"))
  cfg = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                           num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                           bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                           pad_token_id=tok.pad_id).validate()
  examples = [task.preference_example("train", i) for i in range(8)]
  batch = tasks.encode_examples(examples, tok, 8, 12, 4)
  params = models.init_params(cfg, jax.random.key(0))
  return cfg, tok, task, batch, params


def _recipes(cfg, tok, task):
  sc = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=4, eos_ids=tuple(tok.eos_ids))
  # GRPO on the self-likelihood reward: an untrained model gets all-zero verifier rewards, whose
  # gradient is pure round-off that Adam would blow up into different updates on every mesh.
  grpo = dict(spec=PolicyGradient(group_size=4, kl_coef=0.05), sc=sc, num_minibatches=2,
              scorer=scoring.likelihood_scorer(cfg, "mean"))
  dpo = dict(spec=Preference(pairs="data", loss_type="sigmoid", beta=0.1, nll_coef=1.0), sc=sc,
             num_minibatches=2, scorer=None)
  return {"grpo": grpo, "dpo": dpo}


def _run(setup, recipe, mesh_shape):
  cfg, tok, task, batch, params = setup
  r = _recipes(cfg, tok, task)[recipe]
  # eps 1e-3: Adam divides by sqrt(v) + eps, so with the default 1e-8 a gradient of pure round-off
  # (1e-9) moves a weight by a full learning rate, and reduction order would decide its sign.
  opt = optax.adam(1e-3, eps=1e-3)
  state = rnd.init_state(params, opt, r["spec"], jax.random.key(1))
  kw = dict(scorer=r["scorer"], num_minibatches=r["num_minibatches"])
  verify = task.make_verifier(tok)
  if mesh_shape is None:
    round_fn = rnd.build_round_fn(cfg, r["spec"], opt, r["sc"], verify, **kw)
  else:
    mesh = sharding.make_mesh(_mesh_cfg(*mesh_shape))
    rules = sharding.logical_rules()
    sharding.check_model(mesh, cfg, batch["prompt_tokens"].shape[0])
    state_sh = sharding.state_shardings(state, mesh, rules, cfg)
    batch_sh = sharding.batch_shardings(batch, mesh)
    state, batch = jax.device_put(state, state_sh), jax.device_put(batch, batch_sh)
    round_fn = rnd.build_round_fn(cfg, r["spec"], opt, r["sc"], verify, mesh=mesh, rules=rules,
                                  state_shardings=state_sh, batch_shardings=batch_sh, **kw)
  history = []
  for _ in range(ROUNDS):
    state, metrics = round_fn(state, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return state, history


@pytest.fixture(scope="module")
def single_device(setup):
  return {recipe: _run(setup, recipe, None) for recipe in ("grpo", "dpo")}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m)))
@pytest.mark.parametrize("recipe", ["grpo", "dpo"])
def test_every_mesh_gives_the_single_device_round(setup, single_device, recipe, mesh_shape):
  ref_state, ref_history = single_device[recipe]
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
              zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(setup[-1])))
  assert moved > 1e-3  # the rounds really trained: the comparison below is not trivially true
  state, history = _run(setup, recipe, mesh_shape)
  for ref, got in zip(ref_history, history):
    assert ref.keys() == got.keys()
    for key in ref:
      if np.isfinite(ref[key]) and key not in DISCRETE:
        assert got[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-5), key
  for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-3)
  # The state really is sharded as the rules say (and stays so after the donated round).
  q = state.params["layers_0"]["attn"]["q_kernel"]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert len(q.sharding.device_set) == 8
  mu = state.opt_state[0].mu["layers_0"]["attn"]["q_kernel"]
  assert mu.sharding.spec == q.sharding.spec  # optimizer moments follow their parameters


def test_param_specs_follow_the_rules_and_keep_indivisible_dims_whole(setup):
  cfg, *_ , params = setup
  rules = sharding.logical_rules()
  mesh = sharding.make_mesh(_mesh_cfg(1, 2, 4))
  specs = sharding.param_specs(cfg, params, mesh, rules)
  assert specs["layers_0"]["attn"]["q_kernel"] == P("fsdp", "tensor", None)
  assert specs["layers_0"]["attn"]["o_kernel"] == P("tensor", None, "fsdp")
  assert specs["layers_0"]["mlp"]["up_kernel"] == P("fsdp", "tensor")
  assert specs["layers_0"]["pre_attn_norm"]["scale"] == P(None)
  vocab = cfg.vocab_size
  assert specs["embedding"] == P("tensor" if vocab % 4 == 0 else None, "fsdp")
  mesh8 = sharding.make_mesh(_mesh_cfg(1, 1, 8))
  odd = sharding.param_specs(cfg.replace(num_heads=8, num_kv_heads=8), models.init_params(
      cfg.replace(num_heads=8, num_kv_heads=8), jax.random.key(0)), mesh8, rules)
  assert odd["embedding"][0] == ("tensor" if vocab % 8 == 0 else None)
  custom = sharding.logical_rules({"rules": ["embed=", "mlp=fsdp+tensor"]})
  assert dict(custom)["embed"] is None and dict(custom)["mlp"] == ("fsdp", "tensor")


@pytest.mark.parametrize("mesh_cfg, text", [
    (dict(data=3, fsdp=2, tensor=2), "mesh.data: mesh 3 x 2 x 2 = 12 devices, but only 8 are available"),
    (dict(data=-1, fsdp=3, tensor=1), "mesh.data: the other mesh axes (3 devices) do not divide the 8"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one mesh axis may be -1"),
    (dict(data=1, fsdp=1, tensor=0), "mesh.tensor: must be -1 (fill) or >= 1"),
])
def test_bad_meshes_are_config_errors(mesh_cfg, text):
  with pytest.raises(ConfigError, match=None) as info:
    sharding.make_mesh(mesh_cfg)
  assert text in str(info.value)


def test_a_smaller_mesh_uses_the_first_devices(caplog):
  mesh = sharding.make_mesh(_mesh_cfg(3, 1, 1))
  assert mesh.devices.ravel().tolist() == jax.devices()[:3]
  assert "uses 3 of the 8 devices" in caplog.text
  sharding.check_processes(mesh)  # one process: nothing to check


def test_model_and_batch_checks_name_the_keys(setup):
  cfg, *_ = setup
  mesh = sharding.make_mesh(_mesh_cfg(1, 1, 8))
  with pytest.raises(ConfigError, match=r"mesh.tensor: 8 does not divide model.num_heads=4"):
    sharding.check_model(mesh, cfg)
  mesh = sharding.make_mesh(_mesh_cfg(4, 2, 1))
  with pytest.raises(ConfigError, match=r"data.batch_size: 12 is not divisible by mesh.data x "
                                        r"mesh.fsdp = 8"):
    sharding.check_model(mesh, cfg, batch_size=12)
  with pytest.raises(ConfigError, match="mesh.rules"):
    sharding.logical_rules({"rules": ["embed=nonsense"]})


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_rows_and_kv_heads_are_sharded(setup, scan):
  cfg, *_ = setup
  cfg = cfg.replace(scan_layers=scan)
  mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
  make = jax.jit(lambda: sampling._shard_cache(models.init_cache(cfg, 8, 16)))
  with sharding.activation_rules(mesh, sharding.logical_rules()):
    cache = make()
  k = jax.tree.leaves(cache.k)[0]
  want = (("data", "fsdp"), None, "tensor") if scan else (("data", "fsdp"), "tensor")
  assert k.sharding.spec == P(*want)
  assert k.addressable_shards[0].data.shape[0] == 2  # 8 rows over 4 batch shards
  assert cache.pos.sharding.spec == P(("data", "fsdp"))
