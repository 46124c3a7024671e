"""Logit parity with `transformers` for every family, HF round trips, KV-cache decode, bad checkpoints."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from selfplay_jax import models
from selfplay_jax.models import hf
from tests.hf_models import FAMILIES, hf_logits, make_hf_model, padded_batch

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
  model = make_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path, safe_serialization=True)
  return request.param, model, path


def test_logits_match_transformers(family_dir):
  name, model, path = family_dir
  config, params = hf.load_pretrained(path)
  assert config.family == model.config.model_type
  tokens, mask, positions = padded_batch(config.vocab_size)
  ours = np.asarray(models.forward(config, params, tokens, positions, mask.astype(np.int32)))
  ref = hf_logits(model, tokens, mask, positions)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours[mask], ref[mask], atol=TOL, rtol=0, err_msg=name)
  # The inputs really exercise the model: logits are not near-constant.
  assert np.std(ref[mask]) > 0.1


def test_default_positions_follow_segments(family_dir):
  """With positions omitted, each segment counts from 0 (left padding handled)."""
  _, model, path = family_dir
  config, params = hf.load_pretrained(path)
  tokens, mask, positions = padded_batch(config.vocab_size, seed=1)
  explicit = models.forward(config, params, tokens, positions, mask.astype(np.int32))
  implicit = models.forward(config, params, tokens, segment_ids=mask.astype(np.int32))
  np.testing.assert_array_equal(np.asarray(explicit)[mask], np.asarray(implicit)[mask])


def test_round_trip_through_transformers(family_dir, tmp_path):
  """save_pretrained(our params) loads in transformers with equal logits; reload is bit-exact."""
  name, _, path = family_dir
  config, params = hf.load_pretrained(path)
  params = jax.tree.map(lambda p: p + 0.01 * np.sign(p), params)  # differ from the source weights
  out = hf.save_pretrained(config, params, tmp_path / "export")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert type(reloaded).__name__ == hf._ARCHITECTURES[config.family]
  tokens, mask, positions = padded_batch(config.vocab_size, seed=2)
  ours = np.asarray(models.forward(config, params, tokens, positions, mask.astype(np.int32)))
  np.testing.assert_allclose(ours[mask], hf_logits(reloaded, tokens, mask, positions)[mask],
                             atol=TOL, rtol=0, err_msg=name)
  config2, params2 = hf.load_pretrained(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_decode_matches_forward(family_dir):
  """Prefill + one-token decode steps over the KV cache reproduce the full forward logits."""
  _, _, path = family_dir
  config, params = hf.load_pretrained(path)
  tokens, mask, positions = padded_batch(config.vocab_size, seed=3)
  full = np.asarray(models.forward(config, params, tokens, positions, mask.astype(np.int32)))
  decode = jax.jit(models.decode, static_argnums=0)
  cache = models.init_cache(config, batch=3, max_len=16)
  prefill = 6
  logits, cache = decode(config, params, tokens[:, :prefill], positions[:, :prefill], cache,
                         mask[:, :prefill])
  steps = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = decode(config, params, tokens[:, t:t + 1], positions[:, t:t + 1], cache,
                           mask[:, t:t + 1])
    steps.append(logits)
  stepped = np.concatenate([np.asarray(s) for s in steps], axis=1)
  np.testing.assert_allclose(stepped[mask], full[mask], atol=TOL, rtol=0)
  assert int(cache.index) == tokens.shape[1]


def test_sharded_safetensors_index(tmp_path):
  model = make_hf_model("qwen2", seed=5)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  config, params = hf.load_pretrained(tmp_path)
  tokens, mask, positions = padded_batch(config.vocab_size)
  ours = np.asarray(models.forward(config, params, tokens, positions, mask.astype(np.int32)))
  np.testing.assert_allclose(ours[mask], hf_logits(model, tokens, mask, positions)[mask], atol=TOL)


def test_bfloat16_params_load_and_save(tmp_path):
  model = make_hf_model("llama", seed=6).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "src", safe_serialization=True)
  config, params = hf.load_pretrained(tmp_path / "src", param_dtype="bfloat16")
  assert params["embedding"].dtype == np.dtype("bfloat16") and config.param_dtype == "bfloat16"
  expected = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params["embedding"], np.float32), expected)
  hf.save_pretrained(config, params, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert again.model.embed_tokens.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one clear error that names the thing.


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama_src")
  make_hf_model("llama", seed=7).save_pretrained(path, safe_serialization=True)
  return path


def _copy(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_pretrained(_mk(tmp_path / "empty"))


def _mk(p):
  p.mkdir()
  return p


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    hf.load_pretrained(tmp_path / "does-not-exist")


@pytest.mark.parametrize("edit, match", [
    (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)), "rope_type='yarn'"),
    (dict(num_attention_heads=3), "num_kv_heads"),
    (dict(hidden_act="relu6"), "hidden_act='relu6'"),
])
def test_bad_config_json(llama_dir, tmp_path, edit, match):
  d = _copy(llama_dir, tmp_path / "m")
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(edit)
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(models.ConfigError, match=match):
    hf.load_pretrained(d)


def test_missing_key_in_config_json(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path / "m")
  cfg = json.loads((d / "config.json").read_text())
  del cfg["hidden_size"]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(models.ConfigError, match="'hidden_size' is missing"):
    hf.load_pretrained(d)


def _rewrite_tensors(d, fn):
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  fn(tensors)
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))


def test_missing_tensor_is_named(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path / "m")
  _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
    hf.load_pretrained(d)


def test_misshaped_tensor_is_named(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path / "m")
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
  _rewrite_tensors(d, shrink)
  with pytest.raises(hf.CheckpointFormatError, match=r"k_proj\.weight.*shape \(8, 32\)"):
    hf.load_pretrained(d)


def test_wrong_dtype_tensor_is_named(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path / "m")
  def to_int(t):
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
  _rewrite_tensors(d, to_int)
  with pytest.raises(hf.CheckpointFormatError, match=r"model\.norm\.weight.*dtype int32"):
    hf.load_pretrained(d)


def test_truncated_safetensors_file(llama_dir, tmp_path):
  d = _copy(llama_dir, tmp_path / "m")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(hf.CheckpointFormatError, match="model.safetensors"):
    hf.load_pretrained(d)


def test_pickle_checkpoints_are_refused(llama_dir, tmp_path):
  d = _mk(tmp_path / "m")
  (d / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
  (d / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(hf.CheckpointFormatError, match="pickle"):
    hf.load_pretrained(d)


def test_family_traits_are_enforced():
  with pytest.raises(models.ConfigError, match="model.qk_norm"):
    models.ModelConfig(family="llama", qk_norm=True).validate()
  with pytest.raises(models.ConfigError, match="model.num_kv_heads"):
    models.ModelConfig(num_heads=4, num_kv_heads=3).validate()
