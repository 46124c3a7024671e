"""The training forward (models/logprobs.py): `completion_logprobs` against a NumPy log-softmax of
the model's logits, for left-padded prompts, pair rows and chunked passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import models
from selfplay_jax.models.logprobs import completion_logprobs

CFG = models.get_preset("tiny").replace(vocab_size=32, hidden_size=32, intermediate_size=64,
                                        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


def _numpy_logprobs(params, prompt, completion):
  """log p(completion[t] | prompt, completion[:t]) of one unpadded row, by a NumPy log-softmax."""
  seq = np.asarray(list(prompt) + list(completion))[None]
  logits = np.asarray(models.forward(CFG, params, jnp.asarray(seq)))[0].astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  p = len(prompt)
  return np.array([logp[p - 1 + t, c] for t, c in enumerate(completion)])


def test_left_padded_prompts_give_the_log_probs_of_the_unpadded_rows():
  """Prompt padding is never attended to and does not shift positions; every completion slot is
  read, the masked ones included (the losses mask them)."""
  params = models.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(1)
  prompt_lens, width, n = [4, 2, 1], 4, 5
  prompt = np.zeros((3, width), np.int32)
  prompt_mask = np.zeros((3, width), bool)
  for i, k in enumerate(prompt_lens):
    prompt[i, width - k:] = rng.integers(4, 32, k)
    prompt_mask[i, width - k:] = True
  tokens = rng.integers(4, 32, (3, n)).astype(np.int32)
  mask = np.arange(n)[None] < np.array([[5], [3], [1]])
  got = completion_logprobs(CFG, params, {"prompt_tokens": jnp.asarray(prompt),
                                          "prompt_mask": jnp.asarray(prompt_mask),
                                          "tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)})
  assert got.shape == (3, n) and got.dtype == jnp.float32
  for i, k in enumerate(prompt_lens):
    want = _numpy_logprobs(params, prompt[i, width - k:], tokens[i])
    np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_completion_logprobs_of_pairs_equal_those_of_single_rows():
  params = models.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = {"prompt_tokens": jnp.asarray(rng.integers(4, 32, (3, 2, 4)), jnp.int32),
          "prompt_mask": jnp.ones((3, 2, 4), bool).at[:, :, 0].set(False),
          "tokens": jnp.asarray(rng.integers(4, 32, (3, 2, 5)), jnp.int32),
          "mask": jnp.ones((3, 2, 5), bool)}
  pairs = completion_logprobs(CFG, params, rows)
  for k in range(2):
    single = completion_logprobs(CFG, params, {key: v[:, k] for key, v in rows.items()})
    np.testing.assert_allclose(pairs[:, k], single, atol=1e-6)
  # In chunks of rows (6 flat rows in 3 chunks of 2; 4 chunks do not divide them: one pass).
  for chunks in (3, 6, 4):
    np.testing.assert_allclose(completion_logprobs(CFG, params, rows, num_chunks=chunks), pairs,
                               atol=1e-6)
