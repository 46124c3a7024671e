"""The self-likelihood reward (scoring/likelihood.py, `scoring.likelihood_scorer`): `log pi(y|x)`
summed or token-averaged, against a NumPy log-softmax of the model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import models, sampling, scoring

CFG = models.get_preset("tiny").replace(vocab_size=32, hidden_size=32, intermediate_size=64,
                                        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


def _rows():
  rng = np.random.default_rng(0)
  return {"prompt_tokens": jnp.asarray(rng.integers(4, 32, (4, 3)), jnp.int32),
          "prompt_mask": jnp.ones((4, 3), bool),
          "tokens": jnp.asarray(rng.integers(4, 32, (4, 5)), jnp.int32),
          "mask": jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)}


def _numpy_sum(params, rows):
  """Summed log-probs of the masked completion tokens, by a NumPy log-softmax."""
  seq = np.concatenate([rows["prompt_tokens"], rows["tokens"]], 1)
  logits = np.asarray(models.forward(CFG, params, jnp.asarray(seq))).astype(np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tok_lp = np.take_along_axis(logp[:, 2:-1], np.asarray(rows["tokens"])[..., None], -1)[..., 0]
  return (tok_lp * np.asarray(rows["mask"])).sum(1)


def test_self_likelihood_matches_numpy():
  params = models.init_params(CFG, jax.random.key(0))
  rows = _rows()
  m = np.asarray(rows["mask"])
  want_sum = _numpy_sum(params, rows)
  np.testing.assert_allclose(scoring.self_likelihood(CFG, params, rows, "sum"), want_sum, rtol=1e-5)
  np.testing.assert_allclose(scoring.self_likelihood(CFG, params, rows, "mean"),
                             want_sum / m.sum(1), rtol=1e-5)
  with pytest.raises(ValueError, match="normalize must be one of"):
    scoring.self_likelihood(CFG, params, rows, "max")


def test_likelihood_scorer_reads_the_reference_when_there_is_one():
  """RL-sharpening scores under the reference (pi_base), SFT-sharpening (no reference) under the
  params that sampled; `train/self_likelihood` is the scores' mean."""
  sampler = models.init_params(CFG, jax.random.key(0))
  reference = models.init_params(CFG, jax.random.key(1))
  rows = _rows()
  ro = sampling.Rollout(prompt_tokens=rows["prompt_tokens"], prompt_mask=rows["prompt_mask"],
                        tokens=rows["tokens"], logprobs=jnp.zeros((4, 5)),
                        model_logprobs=jnp.zeros((4, 5)), mask=rows["mask"],
                        lengths=rows["mask"].sum(-1))
  scorer = scoring.likelihood_scorer(CFG, "sum")
  n = np.asarray(rows["mask"]).sum(1)
  for ref_params, want in ((reference, _numpy_sum(reference, rows)),
                           (None, _numpy_sum(sampler, rows))):
    scores, metrics = scorer(sampler, ref_params, {}, ro, jax.random.key(0))
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert float(metrics["train/self_likelihood"]) == pytest.approx(want.mean(), rel=1e-5)
  mean_scores, _ = scoring.likelihood_scorer(CFG)(sampler, None, {}, ro, jax.random.key(0))
  np.testing.assert_allclose(mean_scores, _numpy_sum(sampler, rows) / n, rtol=1e-5)
