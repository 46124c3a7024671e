"""Sampler: greedy parity with transformers.generate, sampling statistics, log-probs, jit nesting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from selfplay_jax import models
from selfplay_jax.models import hf
from selfplay_jax.sampling import Rollout, SamplingConfig, process_logits, sample
from tests.hf_models import FAMILIES, make_hf_model


def _prompts(vocab, lengths=(9, 4, 6), seed=0, left=True):
  rng = np.random.default_rng(seed)
  width = max(lengths)
  tokens = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), bool)
  for i, n in enumerate(lengths):
    row = rng.integers(3, vocab, size=n)
    sl = slice(width - n, width) if left else slice(0, n)
    tokens[i, sl], mask[i, sl] = row, True
  return tokens, mask


def _hf_greedy(model, tokens, mask, max_new, eos):
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                         max_new_tokens=max_new, min_new_tokens=0, eos_token_id=eos, pad_token_id=0,
                         num_beams=1)
  return out[:, tokens.shape[1]:].numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  model = make_hf_model(request.param, seed=11)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path, safe_serialization=True)
  config, params = hf.load_pretrained(path)
  return model, config, params


def _compare(ours: Rollout, ref: np.ndarray):
  tokens, lengths = np.asarray(ours.tokens), np.asarray(ours.lengths)
  for row in range(tokens.shape[0]):
    n = lengths[row]
    np.testing.assert_array_equal(tokens[row, :n], ref[row, :n], err_msg=f"row {row}")
  assert np.asarray(ours.mask).sum(axis=1).tolist() == lengths.tolist()


@pytest.mark.slow
def test_greedy_matches_transformers_generate(family):
  model, config, params = family
  tokens, mask = _prompts(config.vocab_size)
  max_new = 14
  # First with a stop token that never fires, then stopping at a token greedy decoding produces.
  for sentinel in range(config.vocab_size - 1, 0, -1):
    ref = _hf_greedy(model, tokens, mask, max_new, sentinel)
    if not (ref == sentinel).any():
      break
  never = SamplingConfig(max_new_tokens=max_new, temperature=0.0, eos_ids=(sentinel,))
  ours = sample(config, params, tokens, mask, jax.random.key(0), never)
  assert np.asarray(ours.lengths).tolist() == [max_new] * 3
  _compare(ours, ref)

  stop = int(ref[1, 5])  # row 1 stops at step <= 5; the other rows at their first occurrence, if any
  ours = sample(config, params, tokens, mask, jax.random.key(0),
                SamplingConfig(max_new_tokens=max_new, temperature=0.0, eos_ids=(stop,), pad_id=0))
  ref_stop = _hf_greedy(model, tokens, mask, max_new, stop)
  _compare(ours, ref_stop)
  lengths = np.asarray(ours.lengths)
  assert lengths[1] <= 6
  for row in range(3):  # the stop token ends the row and is included; filler after it
    n = lengths[row]
    if n < max_new:
      assert np.asarray(ours.tokens)[row, n - 1] == stop
      assert (np.asarray(ours.tokens)[row, n:] == 0).all()


def test_right_padding_equals_left_padding(family):
  _, config, params = family
  sc = SamplingConfig(max_new_tokens=8, temperature=0.0, eos_ids=(config.vocab_size - 1,), pad_id=0)
  left = sample(config, params, *_prompts(config.vocab_size, left=True), jax.random.key(0), sc)
  right = sample(config, params, *_prompts(config.vocab_size, left=False), jax.random.key(0), sc)
  np.testing.assert_array_equal(left.tokens, right.tokens)


@pytest.fixture(scope="module")
def llama():
  model = make_hf_model("llama", seed=3)
  config, params = _from_torch(model)
  return config, params


def _from_torch(model, tmp=None):
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d, safe_serialization=True)
    return hf.load_pretrained(d)


def _np_process(logits, temperature, top_k, top_p):
  """Independent NumPy reference of temperature / top-k / top-p filtering (float64)."""
  z = logits.astype(np.float64) / temperature
  if top_k:
    kth = np.sort(z)[::-1][top_k - 1]
    z = np.where(z < kth, -np.inf, z)
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p, kind="stable")
    cum_before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[cum_before < top_p]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.8, 10, 0.9)])
def test_sampled_frequencies_match_distribution(llama, temperature, top_k, top_p):
  config, params = llama
  prompt = np.array([[5, 17, 33, 8]], np.int32)
  mask = np.ones_like(prompt, bool)
  logits = np.asarray(models.forward(config, params, prompt))[0, -1]
  expected = _np_process(logits, temperature, top_k, top_p)
  draws = 6000
  sc = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, n=draws)
  out = sample(config, params, prompt, mask, jax.random.key(42), sc)
  counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=config.vocab_size)
  assert counts[expected == 0].sum() == 0, "sampled a token the filters remove"
  support = expected > 0
  # Merge rare tokens so the chi-square approximation holds (expected count >= 5 per cell).
  exp_counts = expected[support] * draws
  obs = counts[support]
  big = exp_counts >= 5
  obs_cells = np.append(obs[big], obs[~big].sum())
  exp_cells = np.append(exp_counts[big], exp_counts[~big].sum())
  if exp_cells[-1] == 0:
    obs_cells, exp_cells = obs_cells[:-1], exp_cells[:-1]
  p_value = scipy.stats.chisquare(obs_cells, exp_cells).pvalue
  assert p_value > 1e-3, (p_value, obs_cells, exp_cells)
  # The filters really bind for the truncated cases (so the test can fail).
  if top_k or top_p < 1:
    assert support.sum() < config.vocab_size


def test_chi_square_detects_wrong_temperature(llama):
  """The statistical test above has power: samples at T=1 are rejected against T=0.7."""
  config, params = llama
  prompt = np.array([[5, 17, 33, 8]], np.int32)
  logits = np.asarray(models.forward(config, params, prompt))[0, -1]
  expected = _np_process(logits, 0.5, 0, 1.0)
  out = sample(config, params, prompt, np.ones_like(prompt, bool), jax.random.key(1),
               SamplingConfig(max_new_tokens=1, temperature=1.0, n=6000))
  counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=config.vocab_size)
  big = expected * 6000 >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big] * 6000, expected[~big].sum() * 6000)
  assert scipy.stats.chisquare(obs, exp).pvalue < 1e-6


@pytest.mark.slow
def test_logprobs_equal_a_separate_forward(llama):
  config, params = llama
  tokens, mask = _prompts(config.vocab_size, seed=4)
  sc = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, n=2,
                      eos_ids=(7, 9))
  out = sample(config, params, tokens, mask, jax.random.key(3), sc)
  full = np.concatenate([np.asarray(out.prompt_tokens), np.asarray(out.tokens)], axis=1)
  seg = np.concatenate([np.asarray(out.prompt_mask), np.asarray(out.mask)], axis=1).astype(np.int32)
  logits = np.asarray(models.forward(config, params, full, segment_ids=seg), np.float64)
  p = tokens.shape[1]
  step_logits = logits[:, p - 1:-1]  # logits that predicted each completion token
  comp = np.asarray(out.tokens)
  cmask = np.asarray(out.mask)
  logz = np.log(np.exp(step_logits - step_logits.max(-1, keepdims=True)).sum(-1)) + step_logits.max(-1)
  model_lp = np.take_along_axis(step_logits, comp[..., None], -1)[..., 0] - logz
  np.testing.assert_allclose(np.asarray(out.model_logprobs)[cmask], model_lp[cmask], atol=2e-4)
  sample_lp = np.array([[np.log(_np_process(step_logits[r, t], 0.9, 20, 0.95)[comp[r, t]])
                         for t in range(comp.shape[1])] for r in range(comp.shape[0])])
  np.testing.assert_allclose(np.asarray(out.logprobs)[cmask], sample_lp[cmask], atol=2e-4)
  assert (np.asarray(out.logprobs)[~cmask] == 0).all() and (np.asarray(out.model_logprobs)[~cmask] == 0).all()
  # Rows are grouped by prompt: rows 2i and 2i+1 share prompt i.
  np.testing.assert_array_equal(np.asarray(out.prompt_tokens)[::2], tokens)
  np.testing.assert_array_equal(np.asarray(out.prompt_tokens)[1::2], tokens)


@pytest.mark.slow
def test_runs_inside_a_larger_jit(llama):
  config, params = llama
  tokens, mask = _prompts(config.vocab_size, seed=5)
  sc = SamplingConfig(max_new_tokens=6, temperature=1.0, n=3)

  @jax.jit
  def outer(params, rng):
    out = sample(config, params, tokens, mask, rng, sc)
    return out.tokens, jnp.sum(out.model_logprobs * out.mask)

  inner_tokens, total = outer(params, jax.random.key(9))
  direct = sample(config, params, tokens, mask, jax.random.key(9), sc)
  np.testing.assert_array_equal(inner_tokens, direct.tokens)
  np.testing.assert_allclose(total, np.sum(np.asarray(direct.model_logprobs) * np.asarray(direct.mask)),
                             rtol=1e-5)


def test_process_logits_greedy_limits():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
  out = process_logits(logits, SamplingConfig(temperature=1.0, top_k=1))
  assert np.isfinite(np.asarray(out)).sum() == 1 and int(jnp.argmax(out)) == 1
  out = process_logits(logits, SamplingConfig(temperature=1.0, top_p=1e-6))
  assert np.isfinite(np.asarray(out)).sum() == 1


@pytest.mark.parametrize("kwargs, key", [
    (dict(temperature=-0.5), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(top_p=1.5), "sampling.top_p"),
    (dict(n=0), "sampling.n"),
    (dict(top_k=-1), "sampling.top_k"),
    (dict(max_new_tokens=0), "sampling.max_new_tokens"),
])
def test_invalid_sampling_config(kwargs, key):
  with pytest.raises(models.ConfigError, match=key):
    SamplingConfig(**kwargs).validate()


def test_mismatched_prompt_shapes(llama):
  config, params = llama
  with pytest.raises(ValueError, match="prompt_mask"):
    sample(config, params, np.zeros((2, 5), np.int32), np.ones((2, 4), bool), jax.random.key(0),
           SamplingConfig(max_new_tokens=2))


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_decode_loop_re_lays_out_no_weight(scan_layers):
  """The compiled sampler's loops (prefill layer scan, decode steps) hold no copy or transpose of
  a weight-sized array: before the fix XLA re-laid out every layer's o kernel ([heads, H, D] ->
  [H, heads, D]) on every decode step. Unrolled, no transpose of a cache-sized array either (it
  re-laid out each K cache for the attention dot every step). Copies of the cache buffers
  themselves remain on XLA:CPU (docs/benchmarks.md, accelerator section)."""
  from bench.profiling import loop_relayouts
  config = models.ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2,
                              num_heads=8, num_kv_heads=2, head_dim=32, bos_token_id=1,
                              eos_token_ids=(2,), pad_token_id=0,
                              scan_layers=scan_layers).validate()
  params = models.init_params(config, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 250, (1, 16)), jnp.int32)
  sc = SamplingConfig(max_new_tokens=8, temperature=0.0, eos_ids=(255,))
  compiled = sample.lower(config, params, tokens, tokens > 0, jax.random.key(0), sc).compile()
  relayouts = loop_relayouts(compiled.as_text())
  assert any(r["op"] == "copy" for r in relayouts)  # the parser sees inside the loops
  smallest_weight = 4 * 256 * 2 * 32  # k_kernel [D, kv_heads, H] in float32
  assert [r for r in relayouts if r["bytes"] >= smallest_weight] == []
  if not scan_layers:
    cache = 4 * 2 * (16 + 8) * 32  # one layer's K (or V) cache [1, kv_heads, S, H] in float32
    assert [r for r in relayouts if r["op"] == "transpose" and r["bytes"] >= cache] == []
  # Same function as before: greedy completions are the teacher-forced forward's argmaxes.
  out = compiled(params, tokens, tokens > 0, jax.random.key(0))
  full = jnp.concatenate([tokens, out.tokens], axis=1)
  logits = np.asarray(models.forward(config, params, full))[0, 15:-1]
  np.testing.assert_array_equal(np.argmax(logits, -1), np.asarray(out.tokens)[0])
