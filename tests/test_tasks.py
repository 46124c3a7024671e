"""Built-in tasks: determinism, split disjointness, formats, tokenizer, and the jitted verifier."""

import re

import jax
import numpy as np
import pytest

from selfplay_jax.data import tasks as T

ARITH_CONFIGS = [dict(num_digits=2, operations="+"),
                 dict(num_digits=3, operations="+-*", step_by_step=True),
                 dict(num_digits=1, operations="-", step_by_step=True)]
TASK_SPECS = [("arithmetic", c) for c in ARITH_CONFIGS] + [("sort", dict(length=5, max_value=9)),
                                                             ("sort", dict(length=3, max_value=20))]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, c in TASK_SPECS]


@pytest.fixture(scope="module", params=TASK_SPECS[:4], ids=IDS[:4])
def task_and_tok(request, tmp_path_factory):
  name, kwargs = request.param
  task = T.get_task(name, **kwargs)
  return task, T.build_tokenizer(task, tmp_path_factory.mktemp("tok"))


def _gold(prompt: str) -> str:
  """Independent reference: the answer from the prompt by Python int arithmetic / sorted()."""
  if prompt.startswith("sort "):
    return ",".join(map(str, sorted(int(v) for v in prompt[5:-1].split(","))))
  a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
  return str({"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(a), int(b)))


def _string_reward(tok, tokens, mask, prompt) -> float:
  """Independent string check: text before the first EOS, answer after the first '####'."""
  seq = [int(t) for t, m in zip(tokens, mask) if m]
  if tok.eos_id not in seq:
    return 0.0
  text = tok.decode(seq[:seq.index(tok.eos_id)])
  return float("####" in text and text.split("####", 1)[1] == _gold(prompt))


# ---- generation and splits -----------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", TASK_SPECS, ids=IDS)
def test_deterministic_and_seeded(name, kwargs):
  task = T.get_task(name, **kwargs)
  for split in T.SPLITS:
    a = task.examples(split, seed=3, num=50)
    assert a == T.get_task(name, **kwargs).examples(split, seed=3, num=50)
    assert a != task.examples(split, seed=4, num=50)
    assert task.example(split, 17, seed=3) == a[17]  # random access agrees
    source = task.source(split, seed=3)
    assert len(source) == task.size(split) and source[17] == a[17]
  for e in task.examples("train", seed=0, num=200):
    assert e["response"].endswith("####" + e["answer"]) and e["answer"] == _gold(e["prompt"])


@pytest.mark.parametrize("name,kwargs", TASK_SPECS, ids=IDS)
def test_train_and_heldout_never_overlap(name, kwargs):
  task = T.get_task(name, **kwargs)
  def keys(split):
    out = set()
    for seed in range(2):
      out |= {task._key(_problem(e["prompt"])) for e in task.examples(split, seed, num=1500)}
    return out
  train, heldout = keys("train"), keys("heldout")
  assert train and heldout and not train & heldout
  # The partition ignores difficulty: held-out problems of another size are held out here too.
  other = type(task)(**{**kwargs, **({"num_digits": 4} if name == "arithmetic" else
                                     {"max_value": 30})})
  assert all(task.split_of(_problem(e["prompt"])) == "heldout"
             for e in other.examples("heldout", 0, num=100))


def _problem(prompt: str):
  if prompt.startswith("sort "):
    return tuple(int(v) for v in prompt[5:-1].split(","))
  a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
  return (op, int(a), int(b))


def test_commuted_and_permuted_problems_share_a_split():
  arith, sort = T.ArithmeticTask(operations="+*"), T.SortTask()
  rng = np.random.default_rng(0)
  for _ in range(300):
    a, b = (int(x) for x in rng.integers(0, 100, 2))
    for op in "+*":
      assert arith.split_of((op, a, b)) == arith.split_of((op, b, a))
    values = tuple(int(x) for x in rng.integers(0, 10, 5))
    assert sort.split_of(values) == sort.split_of(tuple(rng.permutation(values).tolist()))


# ---- step-by-step format -------------------------------------------------------------------


def _check_steps(prompt: str, response: str, n: int) -> None:
  a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
  a, b = int(a), int(b)
  *steps, final = response.split(" ")
  assert final == "####" + _gold(prompt)
  digit = lambda x, i: x // 10**i % 10
  if op == "+":
    carry, digits = 0, []
    for i, step in enumerate(steps):
      x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+([01])=(\d\d)", step).groups())
      assert (x, y, c) == (digit(a, i), digit(b, i), carry) and x + y + c == s
      carry, digits = s // 10, [s % 10] + digits
    assert len(steps) == n and int("".join(map(str, [carry] + digits))) == a + b
  elif op == "-":
    borrow, digits = 0, []
    for i, step in enumerate(steps):
      x, y, c, d = map(int, re.fullmatch(r"(1?\d)-(\d)-([01])=(\d)", step).groups())
      taken = int(x >= 10)
      assert (x - 10 * taken, y, c) == (digit(a, i), digit(b, i), borrow) and x - y - c == d
      assert taken == int(digit(a, i) - y - c < 0)
      borrow, digits = taken, [d] + digits
    assert len(steps) == n and borrow == 0 and int("".join(map(str, digits))) == a - b
  else:
    parts = [tuple(map(int, re.fullmatch(r"(\d+)\*(\d+)=(\d+)", s).groups())) for s in steps[:n]]
    assert [p for _, p, _ in parts] == [digit(b, i) * 10**i for i in range(n)]
    assert all(x == a and x * p == r for x, p, r in parts)
    total = parts[0][2]
    for step, (_, _, r) in zip(steps[n:], parts[1:]):
      s, p, t = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())
      assert (s, p, t) == (total, r, total + r)
      total = t
    assert len(steps) == 2 * n - 1 and total == a * b


@pytest.mark.parametrize("num_digits", [1, 2, 4])
def test_step_by_step_work_is_arithmetically_right(num_digits):
  task = T.ArithmeticTask(num_digits=num_digits, operations="+-*", step_by_step=True)
  examples = task.examples("train", 0, 300) + task.examples("heldout", 0, 100)
  assert {e["prompt"][len(re.match(r"\d+", e["prompt"])[0])] for e in examples} == set("+-*")
  for e in examples:
    _check_steps(e["prompt"], e["response"], num_digits)
  direct = T.ArithmeticTask(num_digits=num_digits, operations="+-*")
  assert all(e["response"] == "####" + e["answer"] for e in direct.examples("train", 0, 50))


# ---- tokenizer and encoding ----------------------------------------------------------------


def test_tokenizer_symbols_are_single_tokens_and_cached(task_and_tok, tmp_path):
  task, tok = task_and_tok
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  ids = [tok.piece_to_id(s) for s in task.symbols]
  assert None not in ids and len(set(ids)) == len(ids)
  for s in task.symbols:
    assert tok.encode(s) == [tok.piece_to_id(s)]
  for e in task.examples("heldout", 0, 50):
    full = tok.encode(e["response"])
    answer = tok.encode(e["answer"])
    assert full[-len(answer) - 1:] == [tok.piece_to_id("####")] + answer
    assert all(tok.id_to_piece(i) in task.answer_symbols for i in answer)
    assert tok.decode(tok.encode(e["prompt"] + e["response"])) == e["prompt"] + e["response"]
  again = T.build_tokenizer(task, tmp_path)
  assert again.path != tok.path and [again.id_to_piece(i) for i in range(again.vocab_size)] == \
      [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert T.build_tokenizer(task, tmp_path).path == again.path  # cache hit
  with pytest.raises(ValueError, match="single token"):
    T.check_tokenizer(T.SortTask(), T.build_tokenizer(T.ArithmeticTask(), tmp_path))


def test_encode_examples_layout_and_errors(task_and_tok):
  task, tok = task_and_tok
  examples = task.examples("train", 1, 8)
  b = T.encode_examples(examples, tok, 24, 96, 16)
  assert b["prompt_tokens"].shape == (8, 24) and b["response_tokens"].shape == (8, 96)
  assert b["answer_tokens"].shape == (8, 16)
  for i, e in enumerate(examples):
    p = b["prompt_tokens"][i][b["prompt_mask"][i]].tolist()
    r = b["response_tokens"][i][b["response_mask"][i]].tolist()
    a = b["answer_tokens"][i][b["answer_mask"][i]].tolist()
    assert b["prompt_mask"][i, -1] and b["response_mask"][i, 0] and b["answer_mask"][i, 0]
    assert p == [1] + tok.encode(e["prompt"]) and r == tok.encode(e["response"]) + [2]
    assert a == tok.encode(e["answer"])
  assert all(v.dtype == (bool if k.endswith("mask") else np.int32) for k, v in b.items())
  too_long = examples[:3] + [dict(examples[3], response=examples[3]["response"] + "0" * 100)]
  with pytest.raises(ValueError, match=r"example 3: response has \d+ tokens.*max_response_len=96"):
    T.encode_examples(too_long, tok, 24, 96, 16)
  with pytest.raises(ValueError, match="example 0: prompt"):
    T.encode_examples(examples, tok, 2, 96, 16)


# ---- verifier --------------------------------------------------------------------------------


def _batch(task, tok, examples, width=128):
  b = T.encode_examples(examples, tok, 24, width, 16)
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
  b = T.encode_examples(examples, tok, 24, 128, 16)
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
  expected = np.array([_string_reward(tok, tokens[i], mask[i], e["prompt"])
                       for i, e in enumerate(examples)])
  np.testing.assert_array_equal(reward, expected)
  assert 0.2 < expected.mean() < 0.9  # both outcomes are well represented


def test_verifier_nests_in_an_outer_jit(tmp_path):
  task = T.ArithmeticTask()
  tok = T.build_tokenizer(task, tmp_path)
  b = T.encode_examples(task.examples("train", 0, 4), tok, 8, 12, 4)
  verify = task.make_verifier(tok)

  @jax.jit
  def mean_reward(r, rm, a, am):
    return verify(r, rm, a, am).mean()
  assert float(mean_reward(b["response_tokens"], b["response_mask"], b["answer_tokens"],
                           b["answer_mask"])) == 1.0


# ---- registry --------------------------------------------------------------------------------


def test_registry_and_argument_errors():
  assert isinstance(T.get_task("arithmetic", num_digits=3), T.ArithmeticTask)
  assert isinstance(T.get_task("sort", length=4), T.SortTask)
  with pytest.raises(ValueError, match=r"unknown task 'chess'.*arithmetic, sort"):
    T.get_task("chess")
  with pytest.raises(ValueError, match="num_digit"):
    T.get_task("arithmetic", num_digit=3)
  with pytest.raises(ValueError, match="operations"):
    T.ArithmeticTask(operations="+/")
  with pytest.raises(ValueError, match="num_digits"):
    T.ArithmeticTask(num_digits=0)
  with pytest.raises(ValueError, match="split"):
    T.SortTask().example("test", 0)
