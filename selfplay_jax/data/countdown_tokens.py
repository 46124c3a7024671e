"""Countdown in token space: the jittable verifier and the verification trace. `countdown.py` has
the task, the solver and the host-side reference checker; the rules are in its docstring.

Both run inside the training round on token arrays: a `lax.scan` state machine (`_check_steps`)
parses a response's steps, keeps the pool of available numbers and checks each step; the verifier
reads its verdict, the trace writes down what it found, step by step.

The trace is built from the scan's per-position outputs: each position emits a few slots (its own
token, unless it belongs to a step's claimed result "=c"; a passing or failing step's space: its
checks, then itself; the first bad position: `<no>`; the end: the answer's check), packed to the
left (`rows.right_pack`). Its width W assumes the task's setting: answers with more than
`num_numbers` numbers allow longer traces, which are cut at W.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from selfplay_jax import tokenizers
from selfplay_jax.data import tasks
from selfplay_jax.rows import right_pack
from selfplay_jax.scoring.verifiers import Verifier, completion_end, verifier_inputs

MAX_VALUE = 999  # every written number has at most 3 digits
MAX_DIGITS = 3
OPS = "+-*/"
SPACE = "\u2581"  # SentencePiece's whitespace piece: " " encodes to this one token


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


def _classify(table, tokens):
  """Each token's class (`_class_table`); ids outside the table are `_OTHER`."""
  inside = (tokens >= 0) & (tokens < table.shape[0])
  return jnp.where(inside, table[jnp.clip(tokens, 0, table.shape[0] - 1)], _OTHER)


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
  right, a, op, b, c, the token is part of a step's claimed result "=c"))."""
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
    in_c = is_eq | (is_dig & ((st == _C) | (st == _C_IN)))  # the step's claimed result "=c"
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
    here = (syn_bad, is_sep, found_a & found_b, arith, a, op, bb, res, in_c)
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

  classify = functools.partial(_classify, table)

  def verify(completion_BxN, completion_mask_BxN, answer_BxA, answer_mask_BxA):
    tokens, mask, gold, gold_mask = verifier_inputs(completion_BxN, completion_mask_BxN,
                                                    answer_BxA, answer_mask_BxA, max_answer_len)
    n, a = tokens.shape[1], gold.shape[1]
    pool, target, answer_ok = _parse_answer(classify(gold), gold_mask, max(1, (a + 1) // 2))
    pos_N = jnp.arange(n)
    has_eos, end_B = completion_end(tokens, mask, eos)
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
_STEP_LEN = 2 * MAX_DIGITS + 1  # "a op b" (the claimed "=c" is not copied in place)
_CHECKS_LEN = 1 + 2 * (1 + MAX_DIGITS) + 1  # "<ok>", "=" the recomputed result, "=c", "<ok>"
_ANSWER_LEN = 1 + MAX_DIGITS + 1 + MAX_DIGITS + 1  # "####x=t<ok>"


def trace_width(num_numbers: int) -> int:
  """Longest trace of any response for `num_numbers` numbers (27 / 45 / 63 for 2 / 3 / 4): at
  most n - 1 steps pass (each takes two numbers out of the pool and puts one back), each written
  with its checks and space ("ddd+ddd<ok>=ddd=ddd<ok> ", 18 tokens at most); after them the pool
  holds one number, so what follows is a step that fails its availability check or earlier
  ("ddd+ddd<no>", 8), or the answer ("####ddd=ddd<ok>", 9). (A step failing its arithmetic, up to
  "ddd+ddd<ok>=ddd=ddd<no>", 17, comes at the latest in place of step n - 1, so within the
  bound.)"""
  return (num_numbers - 1) * (_STEP_LEN + _CHECKS_LEN + 1) + max(_STEP_LEN + 1, _ANSWER_LEN)


def _recompute(a, op, b):
  """(a op b, whether it is a value of the task: exact, 0..MAX_VALUE) for op classes."""
  safe_b = jnp.where(b > 0, b, 1)
  value = jnp.select([op == _PLUS, op == _MINUS, op == _TIMES], [a + b, a - b, a * b], a // safe_b)
  exact = (op != _DIV) | ((b > 0) & (a % safe_b == 0))
  return value, exact & (value >= 0) & (value <= MAX_VALUE)


def _single_token_ids(tokenizer: tokenizers.Tokenizer, symbols) -> dict[str, int]:
  """The token id of each symbol; ValueError when one is not a single token."""
  ids = {}
  for sym in symbols:
    enc = tokenizer.encode(sym)
    if len(enc) != 1:
      raise ValueError(f"tokenizer {tokenizer!r} encodes {sym!r} as {len(enc)} tokens; the "
                       "countdown trace needs it to be one (build it with build_tokenizer)")
    ids[sym] = enc[0]
  return ids


def make_countdown_trace(tokenizer: tokenizers.Tokenizer, num_numbers: int):
  """A pure, jittable `trace(answer_BxA, answer_mask_BxA, response_BxN, response_mask_BxN)` ->
  (tokens [B, W], mask [B, W], right-padded), W = `trace_width(num_numbers)`: the verification
  trace of each response, what a judge that checks (instead of solving) writes before its verdict.

  It re-walks the response the way the verifier does (the same scan, `_check_steps`):

    "12+7=19 19*3=57 ####57"  ->  "12+7<ok>=19=19<ok> 19*3<ok>=57=57<ok> ####57=57<ok>"

  each step's operands `a op b` copied, then whether both were available (given numbers and
  earlier results, each used at most once), then `=` and the recomputed `a op b`, `=` and the
  step's claimed result c copied beside it, and whether the two are equal (when `a op b` is not a
  value of the task, negative, inexact division or over 999, neither number is written), then
  the space; then `####x` copied, `=` and the target, and whether x is the target and the last
  step's result and the response ended there (EOS). The claim is copied after the recomputation,
  not before it (where the response has it), so the judge computes before it sees the number it
  compares with, and each comparison is between two adjacent numbers: a tiny judge trained on a
  trace that copied `a op b=c` first learned to write c again as the "recomputed" value, and one
  trained without the copy of c compared with the wrong number. The trace stops at the first bad
  point with `<no>`: a step that fails a check ("12+8<no>", "12+7<ok>=19=18<no>" for "12+7=18",
  "7/2<ok>=<no>"), a token the grammar does not allow there, a masked token before EOS, the end
  of a response cut off before EOS. So its last token is `<ok>` exactly when the verifier
  accepts the response, and no EOS is written. How it is built: the module docstring."""
  table = jnp.asarray(_class_table(tokenizer))
  eos = jnp.asarray(list(tokenizer.eos_ids) or [-1], jnp.int32)
  ids = _single_token_ids(tokenizer, tasks.DIGITS + ("=", CHECK_OK, CHECK_FAIL))
  digit_ids = jnp.asarray([ids[d] for d in tasks.DIGITS], jnp.int32)
  ok_id, no_id, eq_id = ids[CHECK_OK], ids[CHECK_FAIL], ids["="]
  space_id = tokenizer.encode(" ")[0]
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  width = trace_width(num_numbers)

  classify = functools.partial(_classify, table)

  def trace(answer_BxA, answer_mask_BxA, response_BxN, response_mask_BxN):
    tokens, mask = jnp.asarray(response_BxN, jnp.int32), jnp.asarray(response_mask_BxN, bool)
    gold, gold_mask = jnp.asarray(answer_BxA, jnp.int32), jnp.asarray(answer_mask_BxA, bool)
    b, n = tokens.shape
    pool, target, answer_ok = _parse_answer(classify(gold), gold_mask,
                                            max(1, (gold.shape[1] + 1) // 2))
    pos_N = jnp.arange(n)
    has_eos, end_B = completion_end(tokens, mask, eos)
    active = pos_N[None] < end_B[:, None]
    st, final, last, _, _, here = _check_steps(classify(tokens), active, pool)
    syn_bad, is_sep, avail, arith, a, op, bb, c, in_c = here
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
    show = step_here & ext(avail)  # "=", the recomputed result, the claim, its check
    value, valid = _recompute(ext(a), ext(op), ext(bb))
    claim = ext(c)
    answered = end_at & (st == _ANS_IN)[:, None]  # "=t": the target beside the answer
    number = lambda v, k: digit_ids[jnp.clip(v, 0, MAX_VALUE) // 10**k % 10]
    digits = lambda v, written: [(number(v, k), written & ((v >= 10**k) | (k == 0)))
                                 for k in reversed(range(MAX_DIGITS))]
    verdict = lambda ok: jnp.where(ok, ok_id, no_id)
    full = lambda v: jnp.full((b, n + 1), v, jnp.int32)
    # (token, written) of each slot, [B, n + 1]; each position writes one of: its own token (not
    # inside a claim "=c"), `<no>` (a bad token), a step's checks and space, the answer's check
    slots = [(jnp.where(bad_at & ~step_here, no_id, ext(tokens, pad_id)),
              (before & ~ext(in_c) & ~step_here) | (bad_at & ~step_here)),
             (verdict(ext(avail)), step_here), (full(eq_id), show)]
    slots += digits(value, show & valid)
    slots += [(full(eq_id), show & valid)]
    slots += digits(claim, show & valid)
    slots += [(verdict(ext(arith)), show), (full(space_id), step_here & before),
              (full(eq_id), answered)]
    slots += digits(jnp.broadcast_to(target[:, None], (b, n + 1)), answered)
    slots += [(jnp.broadcast_to(verdict(final_ok)[:, None], (b, n + 1)), end_at)]
    out = jnp.stack([t for t, _ in slots], axis=2).reshape(b, -1)
    out_mask = jnp.stack([m for _, m in slots], axis=2).reshape(b, -1)
    out, out_mask = right_pack(out, out_mask, pad_id)
    extra = max(width - out.shape[1], 0)
    out = jnp.pad(out, ((0, 0), (0, extra)), constant_values=pad_id)[:, :width]
    return out, jnp.pad(out_mask, ((0, 0), (0, extra)))[:, :width]

  trace.width = width
  return trace


def make_countdown_corruption(tokenizer: tokenizers.Tokenizer):
  """A pure, jittable `corrupt(response_BxN, response_mask_BxN, key)` -> response_BxN: each
  response with one step made wrong, so the verifier rejects it (a hard negative for judge
  training, `judge.hard_negatives`). Half the rows (drawn per row) get a step's operator changed
  to one whose result differs from the claim (or is no value of the task), the claim kept:

    "12+7=19 19*3=57 ####57"  ->  "12+7=19 19+3=57 ####57"

  the policy's own kind of mistake (a wrong step that still writes the target), where copying
  the claim or the target is not the recomputation; the other half get one digit of a step's
  claimed result changed ("12+7=39 19*3=57 ####57"), where copying the claim is not either. The
  step (operator) or digit is drawn uniformly from the response's complete steps, the new digit
  from the other nine (one that would write a leading zero is moved to 1-9). A response with no
  complete step is returned unchanged."""
  table = jnp.asarray(_class_table(tokenizer))
  eos = jnp.asarray(list(tokenizer.eos_ids) or [-1], jnp.int32)
  digit_ids = jnp.asarray([tokenizer.piece_to_id(d) for d in tasks.DIGITS], jnp.int32)
  op_ids = jnp.asarray([tokenizer.piece_to_id(o) for o in OPS], jnp.int32)  # classes 10..13
  classify = functools.partial(_classify, table)

  def pick(key, where_BxN):
    """One-hot of a uniform choice among each row's True positions (all False if none)."""
    u = jnp.where(where_BxN, jax.random.uniform(key, where_BxN.shape), -1.0)
    return (jnp.arange(u.shape[1])[None] == jnp.argmax(u, axis=1)[:, None]) & where_BxN

  def corrupt(response_BxN, response_mask_BxN, key):
    tokens, mask = jnp.asarray(response_BxN, jnp.int32), jnp.asarray(response_mask_BxN, bool)
    b, n = tokens.shape
    cls = classify(tokens)
    _, end_B = completion_end(tokens, mask, eos)
    active = (jnp.arange(n)[None] < end_B[:, None]) & mask
    *_, (_, is_sep, _, _, a, _, bb, c, in_c) = _check_steps(cls, active,
                                                             jnp.full((b, 1), -1, jnp.int32))
    k_kind, k_pos, k_val, k_op = jax.random.split(key, 4)
    # each position's step: the values at the space that completes it (n: none completes it)
    sep_at = jnp.where(is_sep & active, jnp.arange(n)[None], n)
    next_sep = jax.lax.cummin(sep_at, axis=1, reverse=True)
    complete = next_sep < n
    digit = cls <= 9
    claim = in_c & digit & active & complete
    is_op = (cls >= _PLUS) & (cls <= _DIV) & active & complete & ~in_c
    # operator change: among the three others, one whose value is not the claim
    at_op = pick(k_pos, is_op)
    step = lambda x: jnp.take_along_axis(x, jnp.clip(next_sep, 0, n - 1), axis=1)
    sel = lambda x: jnp.sum(jnp.where(at_op, step(x), 0), axis=1)  # [B], at the chosen operator
    sa, sb, sc, sop = sel(a), sel(bb), sel(c), jnp.sum(jnp.where(at_op, cls, 0), axis=1)
    alt = _PLUS + (sop[:, None] - _PLUS + jnp.arange(1, 4)[None]) % 4  # [B, 3] op classes
    value, valid = _recompute(sa[:, None], alt, sb[:, None])
    wrong = ~valid | (value != sc[:, None])  # always one: + and - differ unless b = 0, / by 0
    new_op = op_ids[jnp.sum(jnp.where(pick(k_op, wrong), alt, 0), axis=1) - _PLUS]
    # claim digit change
    at_digit = pick(k_pos, claim)
    old = jnp.where(digit, cls, 0)
    new = (old + jax.random.randint(k_val, (b, n), 1, 10)) % 10
    prev_eq = jnp.pad(cls[:, :-1] == _EQ, ((0, 0), (1, 0)))
    next_digit = jnp.pad(digit[:, 1:], ((0, 0), (0, 1)))
    lead = prev_eq & next_digit  # the first digit of a number with more than one
    new = jnp.where(lead & (new == 0), old % 9 + 1, new)
    by_op = jax.random.bernoulli(k_kind, 0.5, (b,))[:, None]
    out = jnp.where(at_digit & ~by_op, digit_ids[new], tokens)
    return jnp.where(at_op & by_op, new_op[:, None], out)

  return corrupt
