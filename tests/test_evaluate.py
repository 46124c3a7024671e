"""Held-out evaluation (evaluate.py): pass@k and greedy accuracy against a NumPy count over the
same samples; each example counts once, the padding rows of the last batch not at all. The eval
command on a trained run: test_train.py::test_eval_command_matches_training_eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import evaluate, models, sampling
from selfplay_jax.data import pipeline, tasks
from selfplay_jax.scoring import judge as judge_lib


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


@pytest.mark.slow
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


# ---- the held-out judge meter ----------------------------------------------------------------------


def _numpy_judge_meter(mc, params, batches, judge, sc, seed, judge_params=None):
  """The meter from its definition, one held-out problem at a time (padding rows left out);
  `judge_params`: the judge's weights when not the sampler's."""
  judge_params = params if judge_params is None else judge_params
  picks, means, wins, pairs, right, scored, samples = [], [], 0.0, 0, 0, 0, 0
  mid = (judge.score_min + judge.score_max) / 2
  for i, b in enumerate(batches):
    sample_rng, judge_rng = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    ro = sampling.sample(mc, params, b["prompt_tokens"], b["prompt_mask"], sample_rng, sc)
    rep = lambda x: jnp.repeat(x, sc.n, axis=0)
    s = np.asarray(judge.score(mc, judge_params, rep(b["prompt_tokens"]), rep(b["prompt_mask"]),
                               ro.tokens, ro.mask, judge_rng), np.float64).reshape(-1, sc.n)
    ok = ((np.asarray(ro.tokens)[:, 0] % 3 == 0) & np.asarray(ro.mask)[:, 0]).reshape(-1, sc.n)
    for scores, correct, valid in zip(s, ok, b["valid"]):
      if not valid:
        continue
      samples += sc.n
      for sc_, c in zip(scores, correct):
        if not np.isnan(sc_):
          scored += 1
          right += int((sc_ > mid) == c)
      for x in range(sc.n):
        for y in range(sc.n):
          if correct[x] and not correct[y]:
            pairs += 1
            wins += 1.0 if scores[x] > scores[y] else 0.5 if scores[x] == scores[y] else 0.0
      finite = [k for k in range(sc.n) if not np.isnan(scores[k])]
      if finite:
        best = max(scores[k] for k in finite)
        top = [k for k in finite if scores[k] == best]
        picks.append(np.mean([correct[k] for k in top]))
        means.append(np.mean(correct))
  return {"eval/judge_pick_accuracy": np.mean(picks), "eval/sample_accuracy": np.mean(means),
          "eval/gv_gap": np.mean(picks) - np.mean(means), "eval/judge_agreement": wins / pairs,
          "eval/judge_accuracy": right / scored, "eval/judge_unscored": 1 - scored / samples}


@pytest.mark.parametrize("num_samples", [0, 2])  # expected score in one pass / sampled judgements
@pytest.mark.slow
def test_judge_meter_matches_numpy(tmp_path, num_samples):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path, extra_symbols=judge_lib.JUDGE_SYMBOLS)
  mc = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                          bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                          pad_token_id=tok.pad_id).validate()
  params = models.init_params(mc, jax.random.key(1))
  batches = pipeline.eval_batches(task, "heldout", 6, tokenizer=tok, batch_size=4,
                                  max_prompt_len=8, max_response_len=8, max_answer_len=4)
  judge = judge_lib.Judge.from_template(judge_lib.TASK_TEMPLATE, tok, num_samples=num_samples,
                                        max_new_tokens=2)
  sc = sampling.SamplingConfig(max_new_tokens=3, temperature=1.0, n=4, eos_ids=tuple(tok.eos_ids))
  got = evaluate.judge_meter(mc, params, batches, _first_token_divisible_by_3, judge, sc, seed=2)
  want = _numpy_judge_meter(mc, params, batches, judge, sc, seed=2)
  assert set(got) == set(want)
  assert 0 < want["eval/sample_accuracy"] < 1 and np.isfinite(want["eval/judge_agreement"])
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-5), key
  if num_samples == 0:  # judge.model=reference: other weights judge the same samples
    judge_params = models.init_params(mc, jax.random.key(2))
    got = evaluate.judge_meter(mc, params, batches, _first_token_divisible_by_3, judge, sc,
                               seed=2, judge_params=judge_params)
    want = _numpy_judge_meter(mc, params, batches, judge, sc, seed=2, judge_params=judge_params)
    assert got["eval/sample_accuracy"] == pytest.approx(want["eval/sample_accuracy"], abs=1e-6)
    for key, value in want.items():
      assert got[key] == pytest.approx(value, abs=1e-5), key
