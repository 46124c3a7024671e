"""Verifiers (scoring/verifiers.py): the jitted answer check of the built-in tasks against gold
responses, corruptions of them, a Python string check, and inside an outer jit."""

import jax
import numpy as np
import pytest

from selfplay_jax.data import tasks as T
from selfplay_jax.data.encoding import build_tokenizer, encode_examples
from tests.task_helpers import string_reward


def _batch(task, tok, examples, width=128):
  b = encode_examples(examples, tok, 24, width, 16)
  return b, jax.jit(task.make_verifier(tok))


def test_gold_responses_verify(task_and_tok):
  task, tok = task_and_tok
  examples = task.examples("train", 0, 32) + task.examples("heldout", 0, 32)
  b, verify = _batch(task, tok, examples)
  reward = verify(b["response_tokens"], b["response_mask"], b["answer_tokens"], b["answer_mask"])
  assert reward.dtype == np.float32 and reward.shape == (64,)
  np.testing.assert_array_equal(np.asarray(reward), 1.0)
  # Left-padded gold answers are read the same way.
  shift = np.roll(b["answer_tokens"], 3, axis=1), np.roll(b["answer_mask"], 3, axis=1)
  np.testing.assert_array_equal(
      np.asarray(verify(b["response_tokens"], b["response_mask"], *shift)), 1.0)


def _corruptions(tok, row):
  """(name, tokens, mask) variants of one gold response row that must all score 0."""
  marker, eos = tok.piece_to_id("####"), tok.eos_id
  digits = [tok.piece_to_id(d) for d in "0123456789"]
  seq = list(row)
  m = seq.index(marker)
  ans = seq[m + 1:-1]
  first = seq[m + 1]
  changed = digits[(digits.index(first) + 1) % 10] if first in digits else digits[0]
  return {
      "digit_changed": seq[:m + 1] + [changed] + seq[m + 2:],
      "truncated": seq[:m + 1] + ans[:-1] + [eos],
      "extra_digit": seq[:m + 1] + ans + [digits[0], eos],
      "leading_zero": seq[:m + 1] + [digits[0]] + ans + [eos],
      "missing_marker": seq[:m] + seq[m + 1:],
      "double_marker": seq[:m + 1] + [marker] + ans + [eos],
      "empty_answer": seq[:m + 1] + [eos],
      "no_eos": seq[:-1],
      "answer_after_eos": seq[:m] + [eos, marker] + ans + [eos],
      "eos_unmasked": "MASK",  # gold tokens, EOS outside the mask (cut off by max length)
  }


def test_corrupted_answers_score_zero(task_and_tok):
  task, tok = task_and_tok
  examples = task.examples("train", 2, 6)
  b, verify = _batch(task, tok, examples)
  width = b["response_tokens"].shape[1]
  rows, masks, answers, amasks, labels = [], [], [], [], []
  for i in range(len(examples)):
    gold = b["response_tokens"][i][b["response_mask"][i]].tolist()
    for name, seq in _corruptions(tok, gold).items():
      if seq == "MASK":
        seq, n = gold, len(gold) - 1
      else:
        n = len(seq)
      row = np.zeros(width, np.int32)
      row[:len(seq)] = seq
      rows.append(row), masks.append(np.arange(width) < n)
      answers.append(b["answer_tokens"][i]), amasks.append(b["answer_mask"][i])
      labels.append((i, name))
  reward = np.asarray(verify(np.stack(rows), np.stack(masks), np.stack(answers), np.stack(amasks)))
  bad = [labels[k] for k in np.flatnonzero(reward != 0.0)]
  assert not bad, bad
  # A completion that fills the whole width without EOS (cut off by max_new_tokens) scores 0.
  gold = b["response_tokens"][0][b["response_mask"][0]]
  cut = np.stack([gold, np.concatenate([[tok.piece_to_id("=")], gold[:-1]])])  # 2nd: no EOS
  full = np.ones_like(cut, bool)
  reward = verify(cut, full, b["answer_tokens"][[0, 0]], b["answer_mask"][[0, 0]])
  assert np.asarray(reward).tolist() == [1.0, 0.0]


def test_format_reward_flag(task_and_tok):
  task, tok = task_and_tok
  examples = task.examples("train", 5, 4)
  b = encode_examples(examples, tok, 24, 128, 16)
  verify = jax.jit(task.make_verifier(tok, format_reward=0.1))
  marker = tok.piece_to_id("####")
  wrong, junk = b["response_tokens"].copy(), b["response_tokens"].copy()
  for i in range(4):
    m = int(np.flatnonzero(wrong[i] == marker)[0])
    wrong[i, m + 1] = tok.piece_to_id("9" if examples[i]["answer"][0] != "9" else "8")
    junk[i, m + 1] = tok.piece_to_id("=")  # not an answer symbol
  args = b["response_mask"], b["answer_tokens"], b["answer_mask"]
  np.testing.assert_allclose(np.asarray(verify(b["response_tokens"], *args)), 1.0)
  np.testing.assert_allclose(np.asarray(verify(wrong, *args)), 0.1)
  np.testing.assert_allclose(np.asarray(verify(junk, *args)), 0.0)


def test_verifier_agrees_with_python_string_check(task_and_tok):
  task, tok = task_and_tok
  examples = task.examples("heldout", 7, 200)
  b, verify = _batch(task, tok, examples)
  rng = np.random.default_rng(0)
  marker, eos = tok.piece_to_id("####"), tok.eos_id
  # Perturbation alphabet: every non-special token, with marker / EOS / digits over-represented.
  digits = [tok.piece_to_id(d) for d in "0123456789"]
  alphabet = list(range(4, tok.vocab_size)) + [marker, eos] * 3 + digits * 2
  width = b["response_tokens"].shape[1]
  tokens = np.zeros((len(examples), width), np.int32)
  mask = np.zeros((len(examples), width), bool)
  for i in range(len(examples)):
    seq = b["response_tokens"][i][b["response_mask"][i]].tolist()
    for _ in range(rng.integers(0, 3)):  # 0..2 edits: replace, insert or delete near the answer
      k = int(rng.integers(max(0, len(seq) - 8), len(seq)))
      kind = rng.integers(3)
      if kind == 0:
        seq[k] = int(rng.choice(alphabet))
      elif kind == 1:
        seq.insert(k, int(rng.choice(alphabet)))
      elif len(seq) > 1:
        del seq[k]
    seq = seq[:width]
    tokens[i, :len(seq)] = seq
    n = len(seq) if rng.random() > 0.1 else int(rng.integers(0, len(seq) + 1))
    mask[i, :n] = True
  reward = np.asarray(verify(tokens, mask, b["answer_tokens"], b["answer_mask"]))
  expected = np.array([string_reward(tok, tokens[i], mask[i], e["prompt"])
                       for i, e in enumerate(examples)])
  np.testing.assert_array_equal(reward, expected)
  assert 0.2 < expected.mean() < 0.9  # both outcomes are well represented


def test_verifier_nests_in_an_outer_jit(tmp_path):
  task = T.ArithmeticTask()
  tok = build_tokenizer(task, tmp_path)
  b = encode_examples(task.examples("train", 0, 4), tok, 8, 12, 4)
  verify = task.make_verifier(tok)

  @jax.jit
  def mean_reward(r, rm, a, am):
    return verify(r, rm, a, am).mean()
  assert float(mean_reward(b["response_tokens"], b["response_mask"], b["answer_tokens"],
                           b["answer_mask"])) == 1.0


def test_make_answer_verifier_hand_built_rows():
  """`make_answer_verifier` itself, on hand-built ids: marker 9, stop tokens 2 and 3, answer
  symbols 10..19; the gold answer [11, 12] right- or left-padded; `format_reward` for a
  well-formed wrong answer only."""
  from selfplay_jax.scoring.verifiers import make_answer_verifier
  rows = [  # (completion, mask, gold, gold mask, reward, reward with format_reward=0.25)
      ([5, 9, 11, 12, 2, 0], [1, 1, 1, 1, 1, 0], [11, 12, 0], [1, 1, 0], 1.0, 1.0),
      ([5, 9, 11, 12, 3, 0], [1, 1, 1, 1, 1, 0], [11, 12, 0], [1, 1, 0], 1.0, 1.0),  # 2nd stop id
      ([9, 11, 12, 2, 0, 0], [1, 1, 1, 1, 0, 0], [0, 11, 12], [0, 1, 1], 1.0, 1.0),  # left-padded
      ([9, 2, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0], [0, 0, 0], 0.0, 0.0),  # empty gold
      ([9, 11, 13, 2, 0, 0], [1, 1, 1, 1, 0, 0], [11, 12, 0], [1, 1, 0], 0.0, 0.25),  # wrong
      ([9, 11, 5, 2, 0, 0], [1, 1, 1, 1, 0, 0], [11, 12, 0], [1, 1, 0], 0.0, 0.0),  # not a symbol
      ([9, 11, 12, 2, 0, 0], [1, 1, 0, 1, 0, 0], [11, 12, 0], [1, 1, 0], 0.0, 0.0),  # mask hole
      ([9, 11, 12, 9, 12, 2], [1] * 6, [11, 12, 0], [1, 1, 0], 0.0, 0.0),  # 2nd marker in answer
      ([2, 9, 11, 12, 2, 0], [1, 1, 1, 1, 1, 0], [11, 12, 0], [1, 1, 0], 0.0, 0.0),  # EOS first
      ([9, 11, 12, 2, 0, 0], [1, 1, 1, 0, 0, 0], [11, 12, 0], [1, 1, 0], 0.0, 0.0),  # EOS masked
  ]
  tokens, mask, answer, answer_mask, want, want_format = (np.array(c) for c in zip(*rows))
  args = tokens, mask.astype(bool), answer, answer_mask.astype(bool)
  verify = make_answer_verifier(9, (2, 3), answer_ids=range(10, 20), max_answer_len=3)
  np.testing.assert_array_equal(np.asarray(jax.jit(verify)(*args)), want)
  with_format = make_answer_verifier(9, (2, 3), answer_ids=range(10, 20), format_reward=0.25)
  np.testing.assert_array_equal(np.asarray(jax.jit(with_format)(*args)),
                                np.float32(want_format))
  narrow = make_answer_verifier(9, (2, 3), max_answer_len=2)
  with pytest.raises(ValueError, match="answer width 3 exceeds max_answer_len=2"):
    narrow(*args)
