"""Memory and compile knobs: `scan_layers` (stacked params under `nn.scan`) equals the unrolled
model for every family (logits, KV-cache decode, greedy generations, HF load/export); remat
policies give the unrolled loss and gradients, with and without the scan; bfloat16 compute with
float32 parameters stays close to float32; the stacked layout shards with a replicated layer axis.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import PartitionSpec as P

from selfplay_jax import config_lib, models, sharding
from selfplay_jax.models import hf
from selfplay_jax.sampling import SamplingConfig, sample
from tests.hf_models import FAMILIES, hf_logits, make_hf_model, padded_batch

TOL = 1e-5  # scan vs unrolled: the same float32 ops, only scheduled differently
HF_TOL = 1e-4  # vs transformers (as in test_models_hf.py)


def _forward(config, params, seed=0):
  tokens, mask, positions = padded_batch(config.vocab_size, seed)
  return np.asarray(models.forward(config, params, tokens, positions, mask.astype(np.int32))), mask


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{family: (transformers model, checkpoint dir)}, built on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      model = make_hf_model(name, seed=3)
      path = tmp_path_factory.mktemp(name)
      model.save_pretrained(path, safe_serialization=True)
      cache[name] = model, path
    return cache[name]
  return get


@pytest.fixture(scope="module")
def gemma2(hf_dirs):
  """Gemma 2 (alternating sliding/full layers, soft-caps), 3 layers: (config, unrolled params)."""
  return hf.load_pretrained(hf_dirs("gemma2")[1])


# ---------------------------------------------------------------------------------------------
# Layouts


def test_stack_and_unstack_are_exact_inverses(gemma2):
  config, unrolled = gemma2
  stacked = models.stack_layers(unrolled, config)
  assert sorted(stacked) == ["embedding", "final_norm", "layers"]
  assert stacked["layers"]["attn"]["q_kernel"].shape == (3, 32, 4, 8)
  assert isinstance(stacked["layers"]["mlp"]["up_kernel"], np.ndarray)  # host trees stay NumPy
  jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(stacked, config), unrolled)
  again = models.stack_layers(models.unstack_layers(stacked, config), config)
  jax.tree.map(np.testing.assert_array_equal, again, stacked)
  on_device = models.stack_layers(jax.tree.map(jnp.asarray, unrolled), config)
  assert isinstance(on_device["layers"]["mlp"]["up_kernel"], jax.Array)
  jax.tree.map(np.testing.assert_array_equal, on_device, stacked)
  # The stacked layout is exactly what a scan_layers model initialises, and what its axes describe.
  scan = config.replace(scan_layers=True)
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
  assert shapes(jax.eval_shape(lambda: models.init_params(scan, jax.random.key(0)))) == shapes(stacked)
  axes = models.logical_axes(scan)
  assert axes["layers"]["attn"]["q_kernel"] == P("layers", "embed", "heads", "head_dim")
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(stacked)


def test_layout_errors_name_what_is_wrong(gemma2, tmp_path):
  config, unrolled = gemma2
  stacked = models.stack_layers(unrolled, config)
  deeper = config.replace(num_layers=4, layer_types=("sliding", "full") * 2)
  with pytest.raises(ValueError, match="num_layers=4"):
    models.stack_layers(unrolled, deeper)
  with pytest.raises(ValueError, match="expected unrolled layers"):
    models.stack_layers(stacked, config)
  with pytest.raises(ValueError, match="one stacked 'layers' entry"):
    models.unstack_layers(unrolled, config)
  with pytest.raises(ValueError, match=r"layers\['attn'\]\['k_kernel'\].*num_layers=4"):
    models.unstack_layers(stacked, deeper)
  with pytest.raises(models.ConfigError, match="model.scan_layers"):
    config.replace(scan_layers="yes").validate()
  mlp = stacked["layers"]["mlp"]  # a new dict (tree.map), not the fixture's
  mlp["up_kernel"] = mlp["up_kernel"][:1]
  with pytest.raises(hf.CheckpointFormatError, match=r"layers/mlp/up_kernel has shape \(1, 32, 48\)"):
    hf.save_pretrained(config.replace(scan_layers=True), stacked, tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# Same numerics as the unrolled model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_scan_logits_equal_unrolled_and_transformers(hf_dirs, name):
  model, path = hf_dirs(name)
  config, params = hf.load_pretrained(path)
  scan_config, stacked = hf.load_pretrained(path, scan_layers=True)
  assert scan_config == config.replace(scan_layers=True)
  # Loading stacks the per-layer tensors: bit-equal to stacking the unrolled load.
  jax.tree.map(np.testing.assert_array_equal, stacked, models.stack_layers(params, config))
  ours, mask = _forward(config, params)
  scanned, _ = _forward(scan_config, stacked)
  np.testing.assert_allclose(scanned[mask], ours[mask], atol=TOL, rtol=0, err_msg=name)
  ref = hf_logits(model, *padded_batch(config.vocab_size))
  np.testing.assert_allclose(scanned[mask], ref[mask], atol=HF_TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", ["gemma3_text"])
@pytest.mark.slow
def test_scan_decode_and_greedy_generations_equal_unrolled(hf_dirs, name):
  """Prefill + one-token steps over the stacked cache reproduce the forward logits, and greedy
  sampling (the sampler's while loop over the cache) gives the unrolled model's tokens."""
  _, path = hf_dirs(name)
  config, params = hf.load_pretrained(path)
  scan_config, stacked = hf.load_pretrained(path, scan_layers=True)
  tokens, mask, positions = padded_batch(config.vocab_size, seed=4)
  full = np.asarray(models.forward(config, params, tokens, positions, mask.astype(np.int32)))
  cache = models.init_cache(scan_config, batch=3, max_len=16)
  assert cache.k.shape == (3, config.num_layers, config.num_kv_heads, 16, config.head_dim)
  decode = jax.jit(models.decode, static_argnums=0)
  logits, cache = decode(scan_config, stacked, tokens[:, :6], positions[:, :6], cache, mask[:, :6])
  steps = [np.asarray(logits)]
  for t in range(6, tokens.shape[1]):
    logits, cache = decode(scan_config, stacked, tokens[:, t:t + 1], positions[:, t:t + 1], cache,
                           mask[:, t:t + 1])
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1)[mask], full[mask], atol=TOL * 10, rtol=0)

  sc = SamplingConfig(max_new_tokens=10, temperature=0.0, n=2, eos_ids=(config.vocab_size - 1,))
  prompt_mask = mask[:, :9]
  want = sample(config, params, tokens[:, :9], prompt_mask, jax.random.key(0), sc)
  got = sample(scan_config, stacked, tokens[:, :9], prompt_mask, jax.random.key(0), sc)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.model_logprobs), np.asarray(want.model_logprobs),
                             atol=TOL * 10)


# ---------------------------------------------------------------------------------------------
# Hugging Face export of the stacked layout


@pytest.mark.parametrize("name", ["gemma3_text", "llama3_scaled_bias"])
def test_scan_round_trip_through_transformers(hf_dirs, tmp_path, name):
  _, path = hf_dirs(name)
  scan_config, stacked = hf.load_pretrained(path, scan_layers=True)
  stacked = jax.tree.map(lambda p: p + 0.01 * np.sign(p), stacked)  # differ from the source
  out = hf.save_pretrained(scan_config, stacked, tmp_path / "export")
  written = json.loads((out / "config.json").read_text())
  assert "scan_layers" not in written
  assert written == hf.config_to_hf_dict(scan_config.replace(scan_layers=False)) | {"dtype": "float32"}
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  ours, mask = _forward(scan_config, stacked, seed=2)
  ref = hf_logits(reloaded, *padded_batch(scan_config.vocab_size, seed=2))
  np.testing.assert_allclose(ours[mask], ref[mask], atol=HF_TOL, rtol=0, err_msg=name)
  # Reading the export back: scan_layers=False unless asked for; both layouts bit-exact.
  config2, unrolled2 = hf.load_pretrained(out)
  assert config2 == scan_config.replace(scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, unrolled2, models.unstack_layers(stacked, scan_config))
  _, stacked2 = hf.load_pretrained(out, scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, stacked2, stacked)


# ---------------------------------------------------------------------------------------------
# remat and dtype


def _loss_and_grad(config, params, tokens):
  def loss(p):
    logits = models.forward(config, p, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  return jax.value_and_grad(loss)


@pytest.mark.slow
def test_remat_policies_give_the_same_loss_and_gradients_with_and_without_scan(gemma2):
  config, params = gemma2
  tokens = jnp.asarray(padded_batch(config.vocab_size)[0])
  want_loss, want_grad = jax.jit(_loss_and_grad(config, params, tokens))(params)
  assert float(want_loss) > 1.0
  stacked = models.stack_layers(params, config)
  for scan, policy in ((False, "full"), (False, "dots"), (True, "full"), (True, "dots")):
    variant = config.replace(remat=policy, scan_layers=scan)
    p = stacked if scan else params
    loss, grad = jax.jit(_loss_and_grad(variant, p, tokens))(p)
    if scan:
      grad = models.unstack_layers(grad, variant)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6, err_msg=variant.remat)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4,  # noqa: B023
                                                         err_msg=f"{policy}, scan={scan}"),
                 grad, want_grad)


@pytest.mark.slow
def test_bfloat16_compute_with_float32_params_is_close_to_float32(gemma2):
  config, params = gemma2
  want, mask = _forward(config, params)
  for scan in (False, True):
    bf16 = config.replace(dtype="bfloat16", scan_layers=scan)
    p = models.stack_layers(params, config) if scan else params
    got, _ = _forward(bf16, p)
    assert got.dtype == np.float32  # logits always come back in float32
    err = np.abs(got - want)[mask]
    # bfloat16 keeps 8 mantissa bits: small errors on logits of spread ~1, no outliers.
    assert err.max() < 0.1 * want[mask].std() and err.mean() < 0.02 * want[mask].std(), (
        scan, err.max(), err.mean(), want[mask].std())
    # Storage, gradients (and so optimizer moments) stay float32.
    assert {x.dtype for x in jax.tree.leaves(jax.eval_shape(
        lambda: models.init_params(bf16, jax.random.key(0))))} == {np.dtype("float32")}
    tokens = jnp.asarray(padded_batch(config.vocab_size)[0])
    _, grad = jax.eval_shape(_loss_and_grad(bf16, p, tokens), p)
    assert {x.dtype for x in jax.tree.leaves(grad)} == {np.dtype("float32")}


# ---------------------------------------------------------------------------------------------
# Sharding and config plumbing


def test_param_specs_of_the_stacked_layout_replicate_the_layer_axis(gemma2):
  config, unrolled = gemma2
  scan = config.replace(scan_layers=True)
  stacked = models.stack_layers(unrolled, config)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  want = sharding.param_specs(config, unrolled, mesh, sharding.DEFAULT_RULES)["layers_0"]
  # Without a "layers" rule (flax leaves unknown logical names unsharded) and with one.
  for rules in (sharding.DEFAULT_RULES, sharding.DEFAULT_RULES + (("layers", None),)):
    specs = sharding.param_specs(scan, stacked, mesh, rules)
    assert specs["embedding"] == sharding.param_specs(config, unrolled, mesh, rules)["embedding"]
    # Each stacked spec is the unrolled layer's spec behind a replicated layer axis.
    assert jax.tree.map(lambda s: (s[0], P(*s[1:])), specs["layers"], is_leaf=is_spec) == jax.tree.map(
        lambda s: (None, s), want, is_leaf=is_spec)
  assert specs["layers"]["attn"]["q_kernel"] == P(None, "fsdp", "tensor", None)


def test_scan_layers_is_a_config_key(gemma2):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), ["model.scan_layers=true"])
  assert config_lib.model_config(cfg.model).scan_layers is True
  config, _ = gemma2
  hf_dict = hf.config_to_hf_dict(config.replace(scan_layers=True))
  assert hf_dict == hf.config_to_hf_dict(config) and "scan_layers" not in hf_dict
  assert hf.config_from_hf_dict(hf_dict) == config  # scan_layers=False unless the run sets it
