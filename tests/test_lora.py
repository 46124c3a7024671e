"""LoRA (`model.lora.*`, selfplay_jax/models/lora.py): zero-initialised adapters are the base model,
only the adapters train and sit in the optimizer, the reference is the base (no second copy of it),
the merged export equals the live model in `transformers`, a resume is bit-identical with the base
kept out of checkpoints, and the round runs sharded on the 8-device mesh."""

import json

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from selfplay_jax import checkpoint, config_lib, config_validation, models, plan, sharding
from selfplay_jax import round as rnd
from selfplay_jax import setup, train
from selfplay_jax.algorithms.preference import Preference
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.data import tasks
from selfplay_jax.errors import ConfigError
from selfplay_jax.models import lora
from selfplay_jax.models.logprobs import completion_logprobs
from tests.test_train import OVERRIDES, _hf_and_pair_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok"))
  base = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                            pad_token_id=tok.pad_id).validate()
  mc = lora.with_lora(base, 4, 8.0, [".*"])
  batch = tasks.encode_examples([task.preference_example("train", i) for i in range(8)], tok, 8,
                                12, 4)
  return base, mc, batch


@pytest.fixture(scope="module")
def inits(tiny):
  """{scan_layers: (params with adapters, the base config's params)}, from the same key."""
  base, mc, _ = tiny
  init = jax.jit(models.init_params, static_argnums=0)
  out = {}

  def get(scan):
    if scan not in out:
      out[scan] = (init(mc.replace(scan_layers=scan), jax.random.key(0)),
                   init(base.replace(scan_layers=scan), jax.random.key(0)))
    return out[scan]

  return get


def _tokens(vocab, shape=(2, 10)):
  return np.random.default_rng(0).integers(3, vocab, size=shape).astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_zero_initialised_adapters_give_exactly_the_base_logits(tiny, inits, scan):
  base, mc, _ = tiny
  base, mc = base.replace(scan_layers=scan), mc.replace(scan_layers=scan)
  params, plain = inits(scan)
  adapters, frozen = lora.split(params)
  # Adding adapters changes none of the base weights, B starts at zero and A does not.
  for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert jax.tree.structure(frozen) == jax.tree.structure(plain)
  layer = adapters["layers" if scan else "layers_0"]
  assert set(layer["attn"]) == {f"{p}_lora_{ab}" for p in "qkvo" for ab in "ab"}
  assert set(layer["mlp"]) == {f"{p}_lora_{ab}" for p in ("gate", "up", "down") for ab in "ab"}
  assert all(not np.any(np.asarray(b)) for path, b in jax.tree_util.tree_leaves_with_path(adapters)
             if jax.tree_util.keystr(path).endswith("_lora_b']"))
  assert np.std(np.asarray(layer["attn"]["q_lora_a"])) > 0.05
  assert sum(x.size for x in jax.tree.leaves(adapters)) == lora.num_adapter_params(mc)
  tokens = _tokens(base.vocab_size)
  np.testing.assert_array_equal(np.asarray(models.forward(mc, params, tokens)),
                                np.asarray(models.forward(base, plain, tokens)))
  # Trained adapters change the logits; merged into the weights they give the same logits.
  rng = np.random.default_rng(3)
  moved = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                       adapters)
  live = np.asarray(models.forward(mc, lora.join(moved, frozen), tokens))
  assert np.max(np.abs(live - np.asarray(models.forward(base, plain, tokens)))) > 0.05
  merged = lora.merged(lora.join(moved, frozen), mc)
  assert jax.tree.structure(merged) == jax.tree.structure(plain)
  np.testing.assert_allclose(np.asarray(models.forward(base, merged, tokens)), live, atol=2e-5)


def _dpo_round(mc, batch, params, mesh_shape=None, rounds=2, **spec_options):
  spec = Preference(pairs="data", loss_type="sigmoid", beta=0.1, nll_coef=1.0, **spec_options)
  opt = optax.adam(1e-2, eps=1e-3)
  state = rnd.init_state(params, opt, spec, jax.random.key(1))
  kw = {}
  if mesh_shape is not None:
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    rules = sharding.logical_rules()
    state_sh = sharding.state_shardings(state, mesh, rules, mc)
    batch_sh = sharding.batch_shardings(batch, mesh)
    state, batch = jax.device_put(state, state_sh), jax.device_put(batch, batch_sh)
    kw = dict(mesh=mesh, rules=rules, state_shardings=state_sh, batch_shardings=batch_sh)
  round_fn = rnd.build_round_fn(mc, spec, opt, None, None, num_minibatches=2, **kw)
  history = []
  for _ in range(rounds):
    state, metrics = round_fn(state, batch)
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return state, history


@pytest.fixture(scope="module")
def trained(tiny, inits):
  _, mc, batch = tiny
  params = inits(False)[0]
  return params, _dpo_round(mc, batch, params)


@pytest.mark.slow
def test_only_the_adapters_train_and_sit_in_the_optimizer(tiny, inits, trained):
  base, mc, batch = tiny
  params, (state, history) = trained
  adapters, frozen = lora.split(params)
  new_adapters, new_frozen = lora.split(jax.device_get(state.params))
  for x, y in zip(jax.tree.leaves(new_frozen), jax.tree.leaves(frozen)):  # base: bit for bit
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  moved = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
           for x, y in zip(jax.tree.leaves(new_adapters), jax.tree.leaves(adapters))]
  assert min(moved) > 1e-4  # every adapter trained (B away from zero, so A gets gradients too)
  assert history[0]["train/grad_norm"] > 0
  # Adam's state: count + mu + nu over the adapters only, nothing base-shaped.
  mu, nu = state.opt_state[0].mu, state.opt_state[0].nu
  assert jax.tree.structure(mu) == jax.tree.structure(nu) == jax.tree.structure(adapters)
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
  assert opt_bytes == 2 * adapter_bytes + 4
  # The gradient the update step takes is over the adapters alone: the base is a constant.
  spec = Preference(pairs="data", loss_type="sigmoid", beta=0.1, nll_coef=1.0)
  opt = optax.adam(1e-2)
  seen = []
  probe = optax.GradientTransformation(
      opt.init, lambda g, s, p=None: (seen.append(jax.tree.structure(g)), opt.update(g, s, p))[1])
  logp = lambda p, rows: completion_logprobs(mc, p, rows)
  frozen_logp = lambda rows: jax.lax.stop_gradient(logp(params, rows))
  rows = spec.build(batch, None, None, LogProbs(old=frozen_logp, ref=frozen_logp))
  out, _, _, _ = rnd.train_steps(spec, probe, logp, params, probe.init(adapters),
                                 np.zeros((), np.int32), rows, jax.random.key(0))
  assert seen == [jax.tree.structure(adapters)]
  assert jax.tree.structure(out) == jax.tree.structure(params)
  # The reference slot holds adapters only (a copy of the initial ones: B = 0), so the reference
  # model is the base: exactly the base logits, with no second copy of the base weights.
  assert jax.tree.structure(state.ref_params) == jax.tree.structure(adapters)
  reference = lora.full(jax.device_get(state.params), state.ref_params)
  tokens = _tokens(base.vocab_size)
  np.testing.assert_array_equal(np.asarray(models.forward(mc, reference, tokens)),
                                np.asarray(models.forward(base, inits(False)[1], tokens)))


@pytest.mark.slow
def test_previous_reference_and_restart_point_hold_adapters_only(tiny, inits):
  """A "previous" reference becomes the policy's adapters after each round; a restart point
  (ReST-EM's `restart_from_base`) keeps the initial adapters; neither copies the base."""
  _, mc, batch = tiny
  params = inits(False)[0]
  adapters = lora.trainable(params)
  state, _ = _dpo_round(mc, batch, params, rounds=1, reference="previous", restart_from_base=True)
  state = jax.device_get(state)
  policy = lora.trainable(state.params)
  for slot, want in ((state.ref_params, policy), (state.base_params, adapters)):
    assert jax.tree.structure(slot) == jax.tree.structure(adapters)
    for x, y in zip(jax.tree.leaves(slot), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(policy["layers_0"]["attn"]["q_lora_b"]),
                            np.asarray(adapters["layers_0"]["attn"]["q_lora_b"]))


@pytest.mark.slow
def test_lora_round_on_the_8_device_mesh_matches_one_device(tiny, trained):
  _, mc, batch = tiny
  params, (ref_state, ref_history) = trained
  state, history = _dpo_round(mc, batch, params, mesh_shape=(2, 2, 2))
  for ref, got in zip(ref_history, history):
    for key in ref:
      if np.isfinite(ref[key]) and key != "train/pair_accuracy":
        assert got[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-5), key
  for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-3)
  attn = state.params["layers_0"]["attn"]
  # Adapters carry the weight's logical axes (none on the rank axis): sharded like their weight.
  assert attn["q_kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert attn["q_lora_a"].sharding.spec == P("fsdp", None)
  assert attn["q_lora_b"].sharding.spec == P(None, "tensor", None)
  mu = state.opt_state[0].mu["layers_0"]["attn"]
  assert mu["q_lora_b"].sharding.spec == attn["q_lora_b"].sharding.spec  # moments follow
  assert state.ref_params["layers_0"]["attn"]["q_lora_a"].sharding.spec == P("fsdp", None)


# ---- config, plan ---------------------------------------------------------------------------------


def _cfg(*extra):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), OVERRIDES + list(extra))
  config_validation.validate(cfg)
  return cfg


@pytest.mark.parametrize("overrides, text", [
    (["model.lora.rank=-1"], "model.lora.rank: must be >= 0"),
    (["model.lora.rank=4", "model.lora.alpha=0.0"], "model.lora.alpha: must be > 0"),
    (["model.lora.rank=4", "model.lora.targets=('qproj',)"], "model.lora.targets: 'qproj' matches none"),
    (["model.lora.rank=4", "model.lora.targets=('q_proj(',)"], "model.lora.targets: 'q_proj(' is not a regular"),
    (["model.lora.rank=4", "model.lora.targets=()"], "model.lora.targets: must be a non-empty list"),
    (["model.lora.rank=4", "algorithm.name=ppo"], "model.lora.rank: 4 with algorithm.name=ppo"),
    (["model.lora.rank=4", "algorithm.name=dpo", "algorithm.ref_sync_every=2"],
     "model.lora.rank: 4 with algorithm.ref_sync_every=2"),
])
def test_bad_lora_settings_are_config_errors(overrides, text):
  with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace(")", r"\)")):
    _cfg(*overrides)


def test_targets_resolve_to_projection_names_and_plan_counts_the_adapters():
  cfg = _cfg("model.lora.rank=8", "model.lora.targets=('[qv]_proj', '.*up.*')")
  mc = config_lib.model_config(cfg.model)
  assert mc.lora_targets == ("q_proj", "v_proj", "up_proj") and mc.lora_scale == 16.0 / 8
  d, f, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
  per_layer = 8 * ((d + mc.num_heads * hd) + (d + mc.num_kv_heads * hd) + (d + f))
  assert lora.num_adapter_params(mc) == per_layer * mc.num_layers
  p = plan.plan(cfg, num_devices=1, device_memory_gib=16)
  full = plan.plan(_cfg(), num_devices=1, device_memory_gib=16)
  assert p["model"]["lora"]["adapter_params"] == per_layer * mc.num_layers
  # AdamW (mu, nu in float32) over the adapters only; params = base + adapters (float32).
  adam_bytes = 2 * 4 * per_layer * mc.num_layers
  assert abs(p["per_device_bytes"]["opt_state"] - adam_bytes) < 64
  assert p["per_device_bytes"]["params"] == full["per_device_bytes"]["params"] + 4 * per_layer * mc.num_layers
  assert full["per_device_bytes"]["opt_state"] > 2 * full["per_device_bytes"]["params"] - 64
  assert "trainable adapter parameters" in plan.format_plan(p)


# ---- end to end: HF base, resume, export ----------------------------------------------------------


def _restored(cfg, workdir):
  run = setup.build(cfg, workdir)
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    return jax.device_get(run.restore(ckpt)[0])


@pytest.mark.slow
def test_lora_on_an_hf_base_resumes_bit_identically_and_exports_the_merged_model(tmp_path):
  """GRPO with rank-4 adapters on a tiny random HF Llama: stopped after 2 of 3 rounds and
  resumed, the state equals an uninterrupted run's bit for bit, although checkpoints hold no base
  weights (the resume re-reads them from model.hf_path); `export` merges the adapters, and
  transformers on the export gives the live model's logits."""
  import torch
  import transformers

  from selfplay_jax import export

  path, model_file, hf_dir = _hf_and_pair_jsonl(tmp_path)
  small = [o for o in OVERRIDES if not o.startswith(("model.", "warmup.rounds", "rounds"))]
  extra = [f"data.task={path}", f"model.hf_path={hf_dir}", f"model.tokenizer_path={model_file}",
           "warmup.rounds=1", "model.lora.rank=4", "model.lora.alpha=8.0",
           "optimizer.learning_rate=0.01"]
  cfg = lambda *more: config_validation.validate(c := config_lib.load_config(
      str(config_lib.default_config_path()), small + extra + list(more))) or c
  full, part = tmp_path / "full", tmp_path / "part"
  train.train_and_evaluate(cfg("rounds=2"), full)
  train.train_and_evaluate(cfg("rounds=1"), part)
  train.train_and_evaluate(cfg("rounds=2"), part)
  a, b = _restored(cfg("rounds=2"), full), _restored(cfg("rounds=2"), part)
  assert int(a.round) == int(b.round) == 3
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.ref_params)),
                  jax.tree.leaves((b.params, b.opt_state, b.ref_params))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))
  records = {name: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                    for line in (run / "metrics.jsonl").read_text().splitlines()]
             for name, run in (("full", full), ("part", part))}
  assert records["part"] == records["full"] and len(records["full"]) == 3

  # Checkpoints hold the adapters, not the base: the saved tree has no base weight.
  meta = json.loads((full / "checkpoints" / "3" / "state" / "_METADATA").read_text())
  saved = " ".join(meta["tree_metadata"])
  assert "q_lora_a" in saved and "embedding" not in saved and "q_kernel" not in saved

  # The base never moved: still the HF checkpoint's weights; the adapters did.
  run = setup.build(cfg("rounds=2"), full)
  mc = run.model_config
  start = run.initial_state().params
  for x, y in zip(jax.tree.leaves(lora.split(a.params)[1]), jax.tree.leaves(lora.split(start)[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ids = run.tokenizer.encode("3+4=", add_bos=True)
  live = np.asarray(models.forward(mc, a.params, np.array([ids])))
  assert np.max(np.abs(live - np.asarray(models.forward(mc, start, np.array([ids]))))) > 1e-3

  out, used = export.export_workdir(full, tmp_path / "export")
  assert used == 3
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(live, ref, atol=1e-4, rtol=0)
  config = json.loads((out / "config.json").read_text())
  assert not any("lora" in k for k in config)
