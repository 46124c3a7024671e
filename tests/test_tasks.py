"""Built-in tasks (data/tasks.py): determinism, split disjointness, formats, and the task registry.

The tokenizer / encoding tests are in test_encoding.py, the verifier's in test_verifiers.py."""

import re

import numpy as np
import pytest

from selfplay_jax.data import tasks as T
from tests.task_helpers import IDS, TASK_SPECS, gold

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
    assert e["response"].endswith("####" + e["answer"]) and e["answer"] == gold(e["prompt"])


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
  assert final == "####" + gold(prompt)
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


# ---- task registry ----------------------------------------------------------------------------


def test_registry_and_argument_errors():
  assert isinstance(T.get_task("arithmetic", num_digits=3), T.ArithmeticTask)
  assert isinstance(T.get_task("sort", length=4), T.SortTask)
  with pytest.raises(ValueError, match=r"unknown task 'chess'.*arithmetic, countdown, sort"):
    T.get_task("chess")
  with pytest.raises(ValueError, match="num_digit"):
    T.get_task("arithmetic", num_digit=3)
  with pytest.raises(ValueError, match="operations"):
    T.ArithmeticTask(operations="+/")
  with pytest.raises(ValueError, match="num_digits"):
    T.ArithmeticTask(num_digits=0)
  with pytest.raises(ValueError, match="split"):
    T.SortTask().example("test", 0)
