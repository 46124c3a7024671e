"""Held-out evaluation (evaluate.py): pass@k and greedy accuracy against a NumPy count over the
same samples; each example counts once, the padding rows of the last batch not at all. The eval
command on a trained run: test_train.py::test_eval_command_matches_training_eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import evaluate, models, sampling
from selfplay_jax.data import pipeline, tasks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok"))
  mc = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                          bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                          pad_token_id=tok.pad_id).validate()
  # 6 examples in batches of 4: the second batch has 2 padding rows (copies of example 0).
  batches = pipeline.eval_batches(task, "heldout", 6, tokenizer=tok, batch_size=4,
                                  max_prompt_len=8, max_response_len=8, max_answer_len=4)
  assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True, True, False, False]]
  return mc, models.init_params(mc, jax.random.key(0)), batches, tok


def _first_token_divisible_by_3(tokens, mask, answers, answer_mask):
  """A stand-in verifier that passes a part of an untrained model's samples."""
  return ((tokens[:, 0] % 3 == 0) & mask[:, 0]).astype(jnp.float32)


def _numpy_pass_rate(mc, params, batches, sc, seed):
  solved = total = 0
  for i, b in enumerate(batches):
    ro = sampling.sample(mc, params, b["prompt_tokens"], b["prompt_mask"],
                         jax.random.fold_in(jax.random.key(seed), i), sc)
    ok = (np.asarray(ro.tokens)[:, 0] % 3 == 0) & np.asarray(ro.mask)[:, 0]
    per_example = ok.reshape(-1, sc.n).any(axis=1)
    solved += per_example[b["valid"]].sum()
    total += b["valid"].sum()
  return solved / total


def test_pass_at_k_counts_each_example_once(tiny):
  mc, params, batches, tok = tiny
  sc = sampling.SamplingConfig(max_new_tokens=3, temperature=1.0, n=2, eos_ids=tuple(tok.eos_ids))
  got = evaluate.pass_rates(mc, params, batches, _first_token_divisible_by_3, sc, seed=5)
  want = _numpy_pass_rate(mc, params, batches, sc, seed=5)
  assert 0 < want < 1  # the stand-in verifier passes some examples and fails others
  assert got == pytest.approx(want)


def test_greedy_accuracy_is_pass_at_1_at_temperature_0(tiny):
  mc, params, batches, tok = tiny
  got = evaluate.greedy_accuracy(mc, params, batches, _first_token_divisible_by_3, tok.eos_ids, 3)
  sc = sampling.SamplingConfig(max_new_tokens=3, temperature=0.0, eos_ids=tuple(tok.eos_ids))
  assert got == pytest.approx(_numpy_pass_rate(mc, params, batches, sc, seed=0))
