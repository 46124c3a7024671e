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
stopping at the first bad point; its last token is `<ok>` iff the verifier accepts the response:

  "12+7=19 19*3=57 ####57"  ->  "12+7=19<ok>=19<ok> 19*3=57<ok>=57<ok> ####57<ok>"
  "12+7=18 18*3=54 ####54"  ->  "12+7=18<ok>=19<no>"
  "12+8=20 20*3=60 ####60"  ->  "12+8=20<no>"              (8 is not one of the numbers)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from selfplay_jax import tokenizers
from selfplay_jax.data import tasks
from selfplay_jax.data.encoding import check_tokenizer
from selfplay_jax.rows import right_pack
from selfplay_jax.scoring.verifiers import Verifier

__all__ = ["CHECK_FAIL", "CHECK_OK", "MAX_VALUE", "OPS", "CountdownTask", "all_solutions",
           "check_solution", "gold_solution", "make_countdown_trace", "make_countdown_verifier",
           "num_problems", "problem_targets", "reachable_targets", "render_steps", "trace_width"]

MAX_VALUE = 999  # every written number has at most 3 digits
MAX_DIGITS = 3
OPS = "+-*/"
SPACE = "\u2581"  # SentencePiece's whitespace piece: " " encodes to this one token
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


# ---- the token verifier ------------------------------------------------------------------------

# token classes: digits 0-9 are their value
_PLUS, _MINUS, _TIMES, _DIV, _EQ, _SEP, _MARK, _COMMA, _OTHER = range(10, 19)
# parser states: even = expecting a number's first digit, odd = inside that number
_A, _A_IN, _B, _B_IN, _C, _C_IN, _ANS, _ANS_IN = range(8)


def _class_table(tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  ids = {d: tokenizer.piece_to_id(d) for d in tasks.DIGITS}
  ids.update({"+": tokenizer.piece_to_id("+"), "-": tokenizer.piece_to_id("-"),
              "*": tokenizer.piece_to_id("*"), "/": tokenizer.piece_to_id("/"),
              "=": tokenizer.piece_to_id("="), ",": tokenizer.piece_to_id(","),
              tasks.ANSWER_MARKER: tokenizer.piece_to_id(tasks.ANSWER_MARKER)})
  space = tokenizer.encode(" ")
  if len(space) != 1:
    raise ValueError(f"tokenizer {tokenizer!r} encodes a space as {len(space)} tokens; countdown "
                     "separates steps with a one-token space (build it with build_tokenizer)")
  ids[" "] = space[0]
  classes = {**{d: int(d) for d in tasks.DIGITS}, "+": _PLUS, "-": _MINUS, "*": _TIMES,
             "/": _DIV, "=": _EQ, " ": _SEP, tasks.ANSWER_MARKER: _MARK, ",": _COMMA}
  table = np.full(max(tokenizer.vocab_size, max(ids.values()) + 1), _OTHER, np.int32)
  for s, i in ids.items():
    table[i] = classes[s]
  if len(set(ids.values())) != len(ids):
    raise ValueError(f"tokenizer {tokenizer!r} maps two countdown symbols to one token")
  return table


def _read_digit(st, cur, nd, lead0, d):
  """Digit `d` in a number state: (state, value, digits, leading zero, malformed)."""
  start = st % 2 == 0
  bad = ~start & (lead0 | (nd >= MAX_DIGITS))
  cur = jnp.where(start, d, jnp.where(nd >= MAX_DIGITS, cur, cur * 10 + d))
  return (jnp.where(start, st + 1, st), cur, jnp.where(start, 1, nd + 1),
          jnp.where(start, d == 0, lead0), bad)


def _parse_answer(cls_BxA, mask_BxA, pool_size):
  """"3,7,12=57" -> (pool [B, P] of the numbers, -1 = empty; target [B]; well formed [B])."""
  b = cls_BxA.shape[0]
  z = jnp.zeros((b,), jnp.int32)
  slot_P = jnp.arange(pool_size)

  def body(carry, x):
    st, cur, nd, lead0, cnt, pool, err = carry
    c, act = x
    is_dig = c <= 9
    d_st, d_cur, d_nd, d_lead0, d_bad = _read_digit(st, cur, nd, lead0, c)
    push = ((c == _COMMA) | (c == _EQ)) & (st == 1)
    bad = jnp.where(is_dig, d_bad, ~push) | (push & (cnt >= pool_size))
    pool_n = jnp.where(push[:, None] & (slot_P[None] == cnt[:, None]), cur[:, None], pool)
    st_n = jnp.where(is_dig, d_st, jnp.where(c == _EQ, 2, 0))
    new = (st_n, jnp.where(is_dig, d_cur, cur), jnp.where(is_dig, d_nd, nd),
           jnp.where(is_dig, d_lead0, lead0), cnt + push, pool_n)
    keep = lambda n, o: jnp.where(act if n.ndim == 1 else act[:, None], n, o)
    return tuple(map(keep, new, carry[:6])) + (err | (act & bad),), None

  init = (z, z, z, z.astype(bool), z, jnp.full((b, pool_size), -1, jnp.int32),
          z.astype(bool))
  (st, cur, _, _, cnt, pool, err), _ = jax.lax.scan(body, init, (cls_BxA.T, mask_BxA.T))
  return pool, cur, ~err & (st == 3) & (cnt >= 1)


def _check_steps(cls_BxN, active_BxN, pool_BxP):
  """The step parser: (final state, final answer value, last result, syntax error, rule error,
  per position [B, N]: (syntax error here, a step's space, its operands available, its arithmetic
  right, a, op, b, c))."""
  b = cls_BxN.shape[0]
  z = jnp.zeros((b,), jnp.int32)
  f = z.astype(bool)

  def body(carry, x):
    st, cur, nd, lead0, a, op, bb, steps, last, pool, syn, sem = carry
    c, act = x
    is_dig = c <= 9
    d_st, d_cur, d_nd, d_lead0, d_bad = _read_digit(st, cur, nd, lead0, c)
    is_op = (c >= _PLUS) & (c <= _DIV) & (st == _A_IN)
    is_eq = (c == _EQ) & (st == _B_IN)
    is_sep = (c == _SEP) & (st == _C_IN)
    is_mark = (c == _MARK) & (st == _A) & (steps >= 1)
    syn_bad = jnp.where(is_dig, d_bad, ~(is_op | is_eq | is_sep | is_mark))
    # a step is complete at its space: take a and bb out of the pool, put cur (= c) in
    res = cur
    arith = jnp.select([op == _PLUS, op == _MINUS, op == _TIMES],
                       [a + bb == res, a - bb == res, a * bb == res],
                       (bb > 0) & (bb * res == a))
    hit_a = pool == a[:, None]
    found_a, ia = hit_a.any(axis=1), jnp.argmax(hit_a, axis=1)
    slot = jnp.arange(pool.shape[1])[None] == ia[:, None]
    pool1 = jnp.where(slot & found_a[:, None], -1, pool)
    hit_b = pool1 == bb[:, None]
    found_b, ib = hit_b.any(axis=1), jnp.argmax(hit_b, axis=1)
    slot_b = jnp.arange(pool.shape[1])[None] == ib[:, None]
    pool2 = jnp.where(slot_b & found_b[:, None], -1, pool1)
    pool3 = jnp.where(slot, res[:, None], pool2)
    sem_bad = is_sep & ~(found_a & found_b & arith)
    new = (jnp.select([is_dig, is_op, is_eq, is_sep, is_mark],
                      [d_st, jnp.full_like(st, _B), jnp.full_like(st, _C),
                       jnp.full_like(st, _A), jnp.full_like(st, _ANS)], st),
           jnp.where(is_dig, d_cur, cur), jnp.where(is_dig, d_nd, nd),
           jnp.where(is_dig, d_lead0, lead0), jnp.where(is_op, cur, a), jnp.where(is_op, c, op),
           jnp.where(is_eq, cur, bb), steps + is_sep, jnp.where(is_sep, res, last),
           jnp.where(is_sep[:, None], pool3, pool))
    keep = lambda n, o: jnp.where(act if n.ndim == 1 else act[:, None], n, o)
    # per position (what `make_countdown_trace` writes): this token's own verdicts and, at a
    # step's space, the step it completes
    here = (syn_bad, is_sep, found_a & found_b, arith, a, op, bb, res)
    return (tuple(map(keep, new, carry[:10])) + (syn | (act & syn_bad), sem | (act & sem_bad)),
            here)

  init = (z, z, z, f, z, z, z, z, z - 1, pool_BxP, f, f)
  out, here = jax.lax.scan(body, init, (cls_BxN.T, active_BxN.T))
  st, cur, *_, last, _, syn, sem = out
  return st, cur, last, syn, sem, tuple(x.T for x in here)


def make_countdown_verifier(tokenizer: tokenizers.Tokenizer, max_answer_len: int | None = None,
                            format_reward: float = 0.0) -> Verifier:
  """A pure, jittable `verify(completion_BxN, completion_mask_BxN, answer_BxA, answer_mask_BxA)`
  -> float32 [B]: 1.0 iff the completion, up to its first EOS (every token before it masked), is
  a valid solution (module docstring) of the problem in the answer field ("3,7,12=57": its masked
  tokens, left- or right-padded). Otherwise `format_reward` if it is well formed (the grammar
  holds, EOS present, but a step or the final value is wrong), else 0.0. The pool holds up to
  (A + 1) // 2 numbers for an answer width A."""
  table = jnp.asarray(_class_table(tokenizer))
  eos = jnp.asarray(list(tokenizer.eos_ids) or [-1], jnp.int32)

  def classify(tokens):
    inside = (tokens >= 0) & (tokens < table.shape[0])
    return jnp.where(inside, table[jnp.clip(tokens, 0, table.shape[0] - 1)], _OTHER)

  def verify(completion_BxN, completion_mask_BxN, answer_BxA, answer_mask_BxA):
    tokens, mask = jnp.asarray(completion_BxN, jnp.int32), jnp.asarray(completion_mask_BxN, bool)
    gold, gold_mask = jnp.asarray(answer_BxA, jnp.int32), jnp.asarray(answer_mask_BxA, bool)
    n, a = tokens.shape[1], gold.shape[1]
    if max_answer_len is not None and a > max_answer_len:
      raise ValueError(f"answer width {a} exceeds max_answer_len={max_answer_len}")
    pool, target, answer_ok = _parse_answer(classify(gold), gold_mask, max(1, (a + 1) // 2))
    pos_N = jnp.arange(n)
    is_eos = jnp.isin(tokens, eos) & mask
    has_eos = is_eos.any(axis=1)
    end_B = jnp.where(has_eos, jnp.argmax(is_eos, axis=1), n)
    active = pos_N[None] < end_B[:, None]
    complete = has_eos & ~(active & ~mask).any(axis=1)
    st, final, last, syn, sem, _ = _check_steps(classify(tokens), active, pool)
    well_formed = complete & ~syn & (st == _ANS_IN)
    correct = well_formed & ~sem & answer_ok & (final == target) & (last == target)
    if format_reward == 0.0:
      return correct.astype(jnp.float32)
    return jnp.where(correct, 1.0, jnp.where(well_formed, format_reward, 0.0)).astype(jnp.float32)

  return verify


# ---- the verification trace --------------------------------------------------------------------

CHECK_OK, CHECK_FAIL = "<ok>", "<no>"  # the trace's check tokens (symbols of the task tokenizer)
_STEP_LEN = 3 * MAX_DIGITS + 2  # "a op b=c"
_CHECKS_LEN = 1 + 1 + MAX_DIGITS + 1  # "<ok>", "=", the recomputed result, "<ok>"
_SLOTS = _CHECKS_LEN + 1  # what one response position may emit (a step's space: checks + space)


def trace_width(num_numbers: int) -> int:
  """Longest trace of any response for `num_numbers` numbers (30 / 48 / 66 for 2 / 3 / 4): at
  most n - 1 steps pass (each takes two numbers out of the pool and puts one back), each written
  with its checks and space (18 tokens at most); after them the pool holds one number, so what
  follows is a step that fails its availability check or earlier ("ddd+ddd=ddd<no>", 12), or the
  answer ("####ddd<ok>", 5). (A step failing its arithmetic, up to "ddd+ddd=ddd<ok>=ddd<no>", 17,
  comes at the latest in place of step n - 1, so within the bound.)"""
  return (num_numbers - 1) * (_STEP_LEN + _SLOTS) + _STEP_LEN + 1


def _recompute(a, op, b):
  """(a op b, whether it is a value of the task: exact, 0..MAX_VALUE) for op classes."""
  safe_b = jnp.where(b > 0, b, 1)
  value = jnp.select([op == _PLUS, op == _MINUS, op == _TIMES], [a + b, a - b, a * b], a // safe_b)
  exact = (op != _DIV) | ((b > 0) & (a % safe_b == 0))
  return value, exact & (value >= 0) & (value <= MAX_VALUE)


def make_countdown_trace(tokenizer: tokenizers.Tokenizer, num_numbers: int):
  """A pure, jittable `trace(answer_BxA, answer_mask_BxA, response_BxN, response_mask_BxN)` ->
  (tokens [B, W], mask [B, W], right-padded), W = `trace_width(num_numbers)`: the verification
  trace of each response, what a judge that checks (instead of solving) writes before its verdict.

  It re-walks the response the way the verifier does (the same scan, `_check_steps`):

    "12+7=19 19*3=57 ####57"  ->  "12+7=19<ok>=19<ok> 19*3=57<ok>=57<ok> ####57<ok>"

  each step `a op b=c` copied, then whether both operands were available (given numbers and
  earlier results, each used at most once), then `=` and the recomputed `a op b` (nothing when it
  is not a value: negative, inexact division, over 999) and whether it equals c, then the space;
  then `####x` copied and whether x is the target and the last step's result and the response
  ended there (EOS). The trace stops at the first bad point with `<no>`: a step that fails a check
  ("12+8=20<no>", "12+7=18<ok>=19<no>", "7/2=3<ok>=<no>"), a token the grammar does not allow
  there, a masked token before EOS, the end of a response cut off before EOS. So its last token is
  `<ok>` exactly when the verifier accepts the response, and no EOS is written.

  Built in token space from the scan's per-position outputs: each position emits up to `_SLOTS`
  tokens (itself; a passing step's space: its checks, then itself; the first bad position or the
  end: its checks), packed to the left (`rows.right_pack`). W assumes the task's setting: answers
  with more than `num_numbers` numbers allow longer traces, which are cut at W."""
  table = jnp.asarray(_class_table(tokenizer))
  eos = jnp.asarray(list(tokenizer.eos_ids) or [-1], jnp.int32)
  ids = {}
  for s in tasks.DIGITS + ("=", CHECK_OK, CHECK_FAIL):
    enc = tokenizer.encode(s)
    if len(enc) != 1:
      raise ValueError(f"tokenizer {tokenizer!r} encodes {s!r} as {len(enc)} tokens; the countdown "
                       "trace needs it to be one (build it with build_tokenizer)")
    ids[s] = enc[0]
  digit_ids = jnp.asarray([ids[d] for d in tasks.DIGITS], jnp.int32)
  ok_id, no_id, eq_id = ids[CHECK_OK], ids[CHECK_FAIL], ids["="]
  space_id = tokenizer.encode(" ")[0]
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  width = trace_width(num_numbers)

  def classify(tokens):
    inside = (tokens >= 0) & (tokens < table.shape[0])
    return jnp.where(inside, table[jnp.clip(tokens, 0, table.shape[0] - 1)], _OTHER)

  def trace(answer_BxA, answer_mask_BxA, response_BxN, response_mask_BxN):
    tokens, mask = jnp.asarray(response_BxN, jnp.int32), jnp.asarray(response_mask_BxN, bool)
    gold, gold_mask = jnp.asarray(answer_BxA, jnp.int32), jnp.asarray(answer_mask_BxA, bool)
    b, n = tokens.shape
    pool, target, answer_ok = _parse_answer(classify(gold), gold_mask,
                                            max(1, (gold.shape[1] + 1) // 2))
    pos_N = jnp.arange(n)
    is_eos = jnp.isin(tokens, eos) & mask
    has_eos = is_eos.any(axis=1)
    end_B = jnp.where(has_eos, jnp.argmax(is_eos, axis=1), n)
    active = pos_N[None] < end_B[:, None]
    st, final, last, _, _, here = _check_steps(classify(tokens), active, pool)
    syn_bad, is_sep, avail, arith, a, op, bb, _ = here  # (c: the verifier's arith)
    hole = active & ~mask
    step = is_sep & ~hole
    bad = active & (hole | syn_bad | (step & ~(avail & arith)))
    first_bad = jnp.where(bad.any(axis=1), jnp.argmax(bad, axis=1), n + 1)
    failed = first_bad < end_B
    stop = jnp.minimum(first_bad, end_B)  # the position that writes the last token, 0..n
    final_ok = has_eos & (st == _ANS_IN) & answer_ok & (final == target) & (last == target)
    # n + 1 positions: the response's, then the end of one without EOS
    ext = lambda x, v=0: jnp.pad(x, ((0, 0), (0, 1)), constant_values=v)
    col = jnp.arange(n + 1)[None]
    before, at = col < stop[:, None], col == stop[:, None]
    bad_at, end_at = at & failed[:, None], at & ~failed[:, None]
    step_here = ext(step) & (before | bad_at)
    show = step_here & ext(avail)  # "=", the recomputed result, its check
    value, valid = _recompute(ext(a), ext(op), ext(bb))
    digit = lambda k: digit_ids[jnp.clip(value, 0, MAX_VALUE) // 10**k % 10]
    verdict = lambda ok: jnp.where(ok, ok_id, no_id)
    full = lambda v: jnp.full((b, n + 1), v, jnp.int32)
    slots = [  # (token, written) of each slot, [B, n + 1]
        (jnp.where(step_here, verdict(ext(avail)),
                   jnp.where(end_at, verdict(final_ok)[:, None],
                             jnp.where(bad_at, no_id, ext(tokens, pad_id)))), before | at),
        (full(eq_id), show)]
    slots += [(digit(k), show & valid & ((value >= 10**k) | (k == 0)))
              for k in reversed(range(MAX_DIGITS))]
    slots += [(verdict(ext(arith)), show), (full(space_id), step_here & before)]
    assert len(slots) == _SLOTS
    out = jnp.stack([t for t, _ in slots], axis=2).reshape(b, -1)
    out_mask = jnp.stack([m for _, m in slots], axis=2).reshape(b, -1)
    out, out_mask = right_pack(out, out_mask, pad_id)
    extra = max(width - out.shape[1], 0)
    out = jnp.pad(out, ((0, 0), (0, extra)), constant_values=pad_id)[:, :width]
    return out, jnp.pad(out_mask, ((0, 0), (0, extra)))[:, :width]

  trace.width = width
  return trace


# ---- the task ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CountdownTask(tasks.Task):
  """Reach a target from `num_numbers` numbers in 1..`max_number` (module docstring)."""

  name: ClassVar[str] = "countdown"
  symbols: ClassVar[tuple[str, ...]] = tasks.DIGITS + (tasks.ANSWER_MARKER, "+", "-", "*", "/",
                                                         "=", ",", SPACE, CHECK_OK, CHECK_FAIL)
  answer_symbols: ClassVar[tuple[str, ...]] = tasks.DIGITS + (",", "=")
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


@functools.lru_cache(maxsize=16)
def _cached_trace(num_numbers: int, tokenizer: tokenizers.Tokenizer):
  return make_countdown_trace(tokenizer, num_numbers)
