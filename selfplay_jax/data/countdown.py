"""Countdown: reach a target from a few numbers with + - * /; every valid solution is accepted.

  prompt    "cd 3,7,12 t57="                 the numbers (as drawn) and the target
  response  "12+7=19 19*3=57 ####57"         steps, then the marker and the target, then EOS
  answer    "3,7,12=57"                      what the token verifier checks against (the numbers
                                             and the target; there is no single gold string)

Rules, shared by the jittable token verifier (`CountdownTask.make_verifier`) and the host-side
reference `check_solution`:

- A response is one or more steps, each `a op b=c` followed by exactly one space, then `####`,
  the final answer and EOS. Nothing else: no other token, no extra space, no text after the
  answer; a completion cut off before EOS is wrong.
- op is `+`, `-`, `*` or `/`, and `a op b` must equal `c` exactly: every value is a non-negative
  integer, so `a-b` needs a >= b and `a/b` needs b > 0 and b*c == a (exact division only).
- Every number written (operands, results, the final answer) has 1 to 3 digits and no leading
  zero ("0" itself is fine): all values stay in 0..999 (a step whose result would exceed 999 is
  not allowed).
- Standard Countdown availability, "each number, given or produced, is used at most once": a pool
  starts as the multiset of the given numbers; a step takes one copy of `a` and one copy of `b`
  out of the pool (so `a` and `b` may be equal only if the pool holds two copies) and puts `c`
  in. Hence at most n - 1 steps for n numbers. Not every number has to be used.
- At least one step (even when the target is one of the numbers); the last step's result must be
  the target, and so must the final answer after `####`.

Problems: `num_numbers` (= `data.difficulty`, 2..4) numbers drawn uniformly, with replacement,
from 1..`max_number` (12); the target is drawn uniformly from the distinct values in 1..999 that
some sequence of steps reaches from them and that are not one of the numbers. So every problem is
solvable, none is solved by copying a number, and targets are not biased to easy ones: most
reachable values need most of the numbers (gold lengths 1/2/3 steps: 36/64% of problems with 3
numbers, 13/30/57% with 4). Distinct problems (multiset, target): 224, 6677 and 118461 for 2, 3
and 4 numbers. The gold response is the canonical shortest solution: breadth-first over step
sequences, the pool in descending order, operand pairs (a, b) with a before b (so a >= b), ops in
the order + - * /, the first sequence whose last result is the target. Splits: by the canonical
key (sorted numbers + target), as for the other built-in tasks.

Widths (tokens; `CountdownTask.widths()`): data.max_prompt_len / max_response_len /
max_answer_len = 18 / 29 / 12 for 3 numbers, 21 / 41 / 15 for 4 (15 / 17 / 9 for 2).

Tokens: digits, `+ - * / = ,`, the marker and the space (SentencePiece's `▁` piece, which a
space encodes to) are user-defined symbols, so each is exactly one token; so are the check tokens
`<ok>` / `<no>` of the verification trace.

Verification trace (`CountdownTask.make_trace_fn`, what a judge with `judge.trace=verify` writes
before its verdict; `make_countdown_trace`): the response re-walked step by step with checks,
stopping at the first bad point; its last token is `<ok>` iff the verifier accepts the response.
Each step's operands, `<ok>` if both are available, `=` their recomputed result, `=` the step's
claimed result (copied after the recomputation), `<ok>` if the two are equal; the answer, `=` the
target, `<ok>` if they agree (and the answer is the last result, and the response ends there):

  "12+7=19 19*3=57 ####57"  ->  "12+7<ok>=19=19<ok> 19*3<ok>=57=57<ok> ####57=57<ok>"
  "12+7=18 18*3=54 ####54"  ->  "12+7<ok>=19=18<no>"       (12+7 is not 18)
  "12+8=20 20*3=60 ####60"  ->  "12+8<no>"                 (8 is not one of the numbers)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np

from selfplay_jax import tokenizers
from selfplay_jax.data import tasks
from selfplay_jax.data.encoding import check_tokenizer
from selfplay_jax.scoring.verifiers import Verifier
from selfplay_jax.data.countdown_tokens import (CHECK_FAIL, CHECK_OK, MAX_DIGITS,  # noqa: F401
                                               MAX_VALUE, OPS, SPACE,
                                               make_countdown_corruption, make_countdown_trace,
                                               make_countdown_verifier, trace_width)

__all__ = ["CHECK_FAIL", "CHECK_OK", "MAX_VALUE", "OPS", "CountdownTask", "all_solutions",
           "check_solution", "gold_solution", "make_countdown_corruption", "make_countdown_trace",
           "make_countdown_verifier", "num_problems", "problem_targets", "reachable_targets",
           "render_steps", "trace_width"]

Step = tuple[int, str, int, int]  # a, op, b, c


def _apply(a: int, op: str, b: int) -> int | None:
  """a op b under the task's rules (non-negative, exact division, <= MAX_VALUE), else None."""
  if op == "+":
    c = a + b
  elif op == "-":
    c = a - b
  elif op == "*":
    c = a * b
  else:
    if b == 0 or a % b:
      return None
    c = a // b
  return c if 0 <= c <= MAX_VALUE else None


def _moves(pool: tuple[int, ...]) -> Iterator[tuple[Step, tuple[int, ...]]]:
  """Every step from a pool sorted in descending order (a before b, so a >= b), in the fixed
  search order, with the pool after it (sorted again)."""
  seen = set()
  for i, j in itertools.combinations(range(len(pool)), 2):
    a, b = pool[i], pool[j]
    if (a, b) in seen:  # equal values at other positions give the same steps
      continue
    seen.add((a, b))
    rest = pool[:i] + pool[i + 1:j] + pool[j + 1:]
    for op in OPS:
      c = _apply(a, op, b)
      if c is not None:
        yield (a, op, b, c), tuple(sorted(rest + (c,), reverse=True))


@functools.lru_cache(maxsize=8192)
def _gold_table(numbers: tuple[int, ...]) -> dict[int, tuple[Step, ...]]:
  """Target -> its canonical shortest solution, for a sorted (descending) multiset."""
  table: dict[int, tuple[Step, ...]] = {}
  level = {numbers: ()}  # pool -> first step sequence reaching it (dicts keep insertion order)
  while level:
    nxt: dict[tuple[int, ...], tuple[Step, ...]] = {}
    for pool, steps in level.items():
      for step, after in _moves(pool):
        table.setdefault(step[3], steps + (step,))
        nxt.setdefault(after, steps + (step,))
    level = {p: s for p, s in nxt.items() if len(p) >= 2}
  return table


def _canon(numbers: Sequence[int]) -> tuple[int, ...]:
  return tuple(sorted((int(x) for x in numbers), reverse=True))


def gold_solution(numbers: Sequence[int], target: int) -> tuple[Step, ...] | None:
  """The canonical shortest solution (steps `(a, op, b, c)`), or None if there is none."""
  return _gold_table(_canon(numbers)).get(int(target))


@functools.lru_cache(maxsize=8192)
def _reachable(numbers: tuple[int, ...]) -> tuple[int, ...]:
  """Targets (1..MAX_VALUE) some expression over >= 2 of the numbers reaches, by a subset DP
  independent of the step search (expression trees over disjoint leaves = step sequences)."""
  n = len(numbers)
  values: dict[int, set[int]] = {1 << i: {x} for i, x in enumerate(numbers)}
  for mask in sorted(range(1, 1 << n), key=lambda m: m.bit_count()):
    if mask in values:
      continue
    out: set[int] = set()
    sub = (mask - 1) & mask
    while sub:
      other = mask ^ sub
      if sub < other:  # each unordered split once; both operand orders below
        for x in values[sub]:
          for y in values[other]:
            for a, b in ((x, y), (y, x)):
              for op in OPS:
                c = _apply(a, op, b)
                if c is not None:
                  out.add(c)
      sub = (sub - 1) & mask
    values[mask] = out
  targets = set()
  for mask, vals in values.items():
    if mask.bit_count() >= 2:
      targets |= vals
  return tuple(sorted(t for t in targets if t >= 1))


def reachable_targets(numbers: Sequence[int]) -> tuple[int, ...]:
  """The sorted targets (1..999) that some valid response reaches from `numbers`."""
  return _reachable(_canon(numbers))


def problem_targets(numbers: Sequence[int]) -> tuple[int, ...]:
  """The targets a problem on `numbers` may have: the reachable ones that are not themselves
  one of the numbers (no zero-work problems such as 4,1,1 -> 1 by "1*1=1")."""
  return tuple(t for t in reachable_targets(numbers) if t not in numbers)


def all_solutions(numbers: Sequence[int], target: int) -> list[tuple[Step, ...]]:
  """Every solution as the step search writes it (a >= b; the verifier also accepts b op a
  for + and *), in search order."""
  out = []

  def walk(pool, steps):
    for step, after in _moves(pool):
      if step[3] == target:
        out.append(steps + (step,))
      if len(after) >= 2:
        walk(after, steps + (step,))

  walk(_canon(numbers), ())
  return out


def render_steps(steps: Sequence[Step], answer: int | None = None) -> str:
  """"12+7=19 19*3=57 ####57" (the answer defaults to the last step's result)."""
  answer = steps[-1][3] if answer is None else answer
  return "".join(f"{a}{op}{b}={c} " for a, op, b, c in steps) + f"{tasks.ANSWER_MARKER}{answer}"


@functools.cache
def num_problems(num_numbers: int, max_number: int) -> int:
  """Distinct problems (multiset of numbers, target) of a setting."""
  return sum(len(problem_targets(c)) for c in
             itertools.combinations_with_replacement(range(1, max_number + 1), num_numbers))


# ---- host-side reference -----------------------------------------------------------------------

_NUM = r"(0|[1-9][0-9]{0,2})"
_STEP_RE = re.compile(_NUM + r"([-+*/])" + _NUM + "=" + _NUM)
_FINAL_RE = re.compile(re.escape(tasks.ANSWER_MARKER) + _NUM)


def check_solution(numbers: Sequence[int], target: int, text: str) -> bool:
  """Host-side reference: is `text` (a response without EOS) a valid solution? Same rules as the
  token verifier (module docstring), written independently with regexes and a Counter."""
  *steps, final = text.split(" ")
  m = _FINAL_RE.fullmatch(final)
  if not steps or m is None:
    return False
  pool = collections.Counter(int(x) for x in numbers)
  last = None
  for s in steps:
    sm = _STEP_RE.fullmatch(s)
    if sm is None:
      return False
    a, op, b, c = int(sm.group(1)), sm.group(2), int(sm.group(3)), int(sm.group(4))
    for x in (a, b):
      if pool[x] <= 0:
        return False
      pool[x] -= 1
    if op == "+":
      ok = a + b == c
    elif op == "-":
      ok = a - b == c
    elif op == "*":
      ok = a * b == c
    else:
      ok = b != 0 and a == b * c
    if not ok:
      return False
    pool[c] += 1
    last = c
  return last == int(target) == int(m.group(1))


# ---- the task ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CountdownTask(tasks.Task):
  """Reach a target from `num_numbers` numbers in 1..`max_number` (module docstring)."""

  name: ClassVar[str] = "countdown"
  symbols: ClassVar[tuple[str, ...]] = tasks.DIGITS + (tasks.ANSWER_MARKER, "+", "-", "*", "/",
                                                         "=", ",", SPACE, CHECK_OK, CHECK_FAIL)
  answer_symbols: ClassVar[tuple[str, ...]] = tasks.DIGITS + (",", "=")
  value_range_field: ClassVar[str | None] = "max_number"
  step_separator: ClassVar[str | None] = " "  # "12+7=19 19*3=57 ####57": a space ends a step
  num_numbers: int = 3
  max_number: int = 12
  heldout_fraction: float = 0.1

  def __post_init__(self):
    if not isinstance(self.num_numbers, int) or not 2 <= self.num_numbers <= 4:
      raise ValueError(f"num_numbers must be an int in [2, 4], got {self.num_numbers!r}")
    if not isinstance(self.max_number, int) or not 2 <= self.max_number <= 99:
      raise ValueError(f"max_number must be an int in [2, 99], got {self.max_number!r}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

  def _sample(self, rng):
    while True:
      numbers = tuple(int(x) for x in rng.integers(1, self.max_number + 1, size=self.num_numbers))
      targets = problem_targets(numbers)
      if targets:
        return numbers, targets[int(rng.integers(len(targets)))]

  def _key(self, problem):
    numbers, target = problem
    return f"{','.join(map(str, sorted(numbers)))}:{target}"

  def _render(self, problem):
    numbers, target = problem
    nums = ",".join(map(str, numbers))
    return {"prompt": f"cd {nums} t{target}=",
            "response": render_steps(gold_solution(numbers, target), target),
            "answer": f"{nums}={target}"}

  def _num_problems(self):
    return num_problems(self.num_numbers, self.max_number)

  def widths(self) -> dict[str, int]:
    """Upper bounds (tokens, BOS / EOS included) of the prompt, gold response and answer for
    this setting: what `data.max_prompt_len` / `max_response_len` / `max_answer_len` need. (The
    prompt's letters are learned pieces, counted at one token per character.)"""
    k = len(str(self.max_number)) * self.num_numbers + self.num_numbers - 1  # "3,7,12"
    t = len(str(MAX_VALUE))
    return {"max_prompt_len": 1 + len("cd ") + k + len(" t") + t + 1,
            "max_response_len": (self.num_numbers - 1) * (3 * t + 3) + 1 + t + 1,
            "max_answer_len": k + 1 + t}

  def preference_example(self, split, index, seed=0):
    """`example(...)` plus chosen = the gold response, rejected = it with one digit of the final
    answer changed (so the answer is not the last step's result)."""
    ex = self.example(split, index, seed)
    rng = np.random.default_rng([seed, tasks.SPLITS.index(split), index, 1])
    target = ex["answer"].rsplit("=", 1)[1]
    rejected = tasks.wrong_response({"response": ex["response"], "answer": target}, rng)
    return {**ex, "chosen": ex["response"], "rejected": rejected}

  def make_verifier(self, tokenizer: tokenizers.Tokenizer, max_answer_len: int | None = None,
                    format_reward: float = 0.0) -> Verifier:
    """The jittable countdown verifier (`make_countdown_verifier`)."""
    check_tokenizer(self, tokenizer)
    return make_countdown_verifier(tokenizer, max_answer_len=max_answer_len,
                                   format_reward=format_reward)

  def make_trace_fn(self, tokenizer: tokenizers.Tokenizer):
    """The jittable verification trace (`make_countdown_trace`), W = `trace.width`; one object
    per (setting, tokenizer), so specs that hold it compare equal across builds."""
    check_tokenizer(self, tokenizer)
    return _cached_trace(self.num_numbers, tokenizer)

  def make_corrupt_fn(self, tokenizer: tokenizers.Tokenizer):
    """Hard negatives: one step's operator or one digit of its claimed result changed
    (`make_countdown_corruption`); one object per tokenizer, so specs that hold it compare equal
    across builds."""
    check_tokenizer(self, tokenizer)
    return _cached_corruption(tokenizer)


@functools.lru_cache(maxsize=16)
def _cached_corruption(tokenizer: tokenizers.Tokenizer):
  return make_countdown_corruption(tokenizer)


@functools.lru_cache(maxsize=16)
def _cached_trace(num_numbers: int, tokenizer: tokenizers.Tokenizer):
  return make_countdown_trace(tokenizer, num_numbers)
