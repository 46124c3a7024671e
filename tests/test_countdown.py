"""Countdown: generation, splits, widths, and the jitted token verifier against the host checker."""

import collections
import itertools

import jax
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, setup
from selfplay_jax.data import countdown as C
from selfplay_jax.data import tasks as T
from selfplay_jax.errors import ConfigError

# data.max_prompt_len / max_response_len / max_answer_len per difficulty (what a config needs)
WIDTHS = {2: (15, 17, 9), 3: (18, 29, 12), 4: (21, 41, 15)}
N = 48  # completion width of the agreement batches (longer than any gold response)
A = 16  # answer width of the agreement batches (up to 4 numbers + target)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return T.build_tokenizer(C.CountdownTask(num_numbers=4), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def verify(tok):
  return jax.jit(C.CountdownTask(num_numbers=4).make_verifier(tok))


def _problem(example):
  nums, target = example["answer"].split("=")
  return tuple(int(x) for x in nums.split(",")), int(target)


def _answer(numbers, target):
  return f"{','.join(map(str, numbers))}={target}"


# ---- generation and splits -----------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_problems_are_solvable_and_gold_is_canonical_shortest(n):
  task = C.CountdownTask(num_numbers=n)
  for split in T.SPLITS:
    exs = task.examples(split, seed=1, num=300)
    assert exs == C.CountdownTask(num_numbers=n).examples(split, seed=1, num=300)
    assert exs != task.examples(split, seed=2, num=300)
    assert task.example(split, 123, seed=1) == exs[123]
    for i, e in enumerate(exs):
      numbers, target = _problem(e)
      assert len(numbers) == n and all(1 <= x <= task.max_number for x in numbers)
      assert e["prompt"] == f"cd {','.join(map(str, numbers))} t{target}="
      assert target in C.problem_targets(numbers) and target not in numbers
      assert e["response"].endswith(f"####{target}")
      assert C.check_solution(numbers, target, e["response"])
      assert task.split_of((numbers, target)) == split
      if i < 40:  # canonical: a shortest solution, the first the exhaustive search writes
        sols = C.all_solutions(numbers, target)
        shortest = min(len(s) for s in sols)
        assert e["response"] == C.render_steps(next(s for s in sols if len(s) == shortest))
        assert all(C.check_solution(numbers, target, C.render_steps(s)) for s in sols)


def test_targets_two_independent_solvers_agree():
  """The subset DP (targets) and the step search (gold table) reach the same values."""
  rng = np.random.default_rng(0)
  for n in (2, 3, 4):
    for _ in range(60 if n < 4 else 25):
      numbers = tuple(int(x) for x in rng.integers(1, 13, size=n))
      searched = {t for t in C._gold_table(C._canon(numbers)) if t >= 1}
      assert set(C.reachable_targets(numbers)) == searched
      t = int(rng.integers(1, 200))
      assert bool(C.all_solutions(numbers, t)) == (t in searched)


def test_splits_disjoint_by_canonical_key_and_sizes():
  for n in (3, 4):
    task = C.CountdownTask(num_numbers=n)
    keys = {s: {task._key(_problem(e)) for e in task.examples(s, seed=0, num=600)}
            for s in T.SPLITS}
    assert keys["train"] and keys["heldout"] and not keys["train"] & keys["heldout"]
    # the same problem with the numbers permuted has one key, hence one split
    assert task._key(((3, 7, 12), 57)) == task._key(((12, 3, 7), 57)) != task._key(((3, 7, 12), 56))
  assert [C.num_problems(n, 12) for n in (2, 3, 4)] == [224, 6677, 118461]
  t3 = C.CountdownTask(num_numbers=3)
  assert t3.size("train") + t3.size("heldout") == 6677
  assert C.CountdownTask(num_numbers=4).size("train") == 100_000  # capped
  with pytest.raises(ValueError):
    C.CountdownTask(num_numbers=5)


def test_preference_pairs():
  task = C.CountdownTask(num_numbers=3)
  for i in range(50):
    e = task.preference_example("train", i)
    numbers, target = _problem(e)
    assert e["chosen"] == e["response"] and C.check_solution(numbers, target, e["chosen"])
    assert not C.check_solution(numbers, target, e["rejected"])


# ---- tokenizer and widths ------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tokenizer_symbols_and_widths(n, tmp_path):
  task = C.CountdownTask(num_numbers=n)
  tok = T.build_tokenizer(task, tmp_path)
  for s in task.symbols:
    assert len(tok.encode(s)) == 1 and tok.encode(s) == [tok.piece_to_id(s)]
  assert tok.encode(" ") == [tok.piece_to_id(C.SPACE)]
  p, r, a = WIDTHS[n]
  assert task.widths() == {"max_prompt_len": p, "max_response_len": r, "max_answer_len": a}
  exs = task.examples("train", seed=0, num=1500) + task.examples("heldout", seed=0, num=300)
  batch = T.encode_examples(exs, tok, p, r, a)  # raises if any row does not fit
  for e in exs[:50]:  # each character of a response / answer is one token ("####" too)
    assert len(tok.encode(e["response"])) == len(e["response"]) - 3
    assert len(tok.encode(e["answer"])) == len(e["answer"])
  rewards = jax.jit(task.make_verifier(tok, max_answer_len=a))(
      batch["response_tokens"], batch["response_mask"], batch["answer_tokens"],
      batch["answer_mask"])
  np.testing.assert_array_equal(np.asarray(rewards), 1.0)


# ---- the token verifier against the host checker ------------------------------------------


def _reference(tok, tokens, mask, numbers, target) -> float:
  """Host reference on tokens: text before the first (masked) EOS, all of it masked, rendered
  piece by piece (specials stay visible, ids out of range become '?'), then check_solution."""
  eos = [i for i, (t, m) in enumerate(zip(tokens, mask)) if m and t in tok.eos_ids]
  if not eos or not all(mask[:eos[0]]):
    return 0.0
  text = "".join(tok.id_to_piece(int(t)) if 0 <= t < tok.vocab_size else "?"
                 for t in tokens[:eos[0]])
  return float(C.check_solution(numbers, target, text.replace(C.SPACE, " ")))


def _swap_some(rng, steps):
  """A valid variant: commutative steps written b op a at random."""
  return [(b, op, a, c) if op in "+*" and rng.random() < 0.5 else (a, op, b, c)
          for a, op, b, c in steps]


def _attempt(rng, numbers):
  """A random near-solution: operands mostly from the pool (sometimes reused or unknown),
  arithmetic mostly right; returns (steps text, last value). Validity is for the checker."""
  pool, seen, parts, last = list(numbers), list(numbers), [], None
  for _ in range(int(rng.integers(1, len(numbers) + 1))):
    ops = []
    for _ in range(2):
      u = rng.random()
      if u < 0.85 and pool:
        x = pool.pop(int(rng.integers(len(pool))))
      elif u < 0.95:
        x = seen[int(rng.integers(len(seen)))]
      else:
        x = int(rng.integers(0, 30))
      ops.append(x)
    a, b = ops
    if rng.random() < 0.5 and a < b:
      a, b = b, a
    op = "+-*/"[int(rng.integers(4))]
    c = {"+": a + b, "-": a - b, "*": a * b}.get(op, a // b if b and a % b == 0 else a + 1)
    if rng.random() < 0.08:
      c += int(rng.choice([-1, 1, 10]))
    parts.append(f"{a}{op}{b}={c}")
    pool.append(c)
    seen.append(c)
    last = c
  return parts, last


def _token_mutation(rng, row, vocab, ids):
  """A token-level corruption of a (response + EOS) token row; returns (tokens, mask)."""
  row = list(row)
  kind = rng.integers(10)
  mask = [True] * len(row)
  if kind == 0:  # truncated: cut before EOS
    row = row[:int(rng.integers(0, len(row)))]
    mask = [True] * len(row)
  elif kind == 1:  # empty
    row, mask = row[-1:], [True]
  elif kind == 2:  # extra text after the answer
    extra = [int(x) for x in rng.choice(ids, size=int(rng.integers(1, 3)))]
    row = row[:-1] + extra + row[-1:]
  elif kind == 3:  # missing marker
    row = [t for t in row if t != ids[10]]
  elif kind == 4:  # substitute one token (any id, incl. specials and out of range)
    i = int(rng.integers(len(row)))
    row[i] = int(rng.integers(-1, vocab + 3))
  elif kind == 5:  # delete one token
    i = int(rng.integers(len(row)))
    row = row[:i] + row[i + 1:]
  elif kind == 6:  # insert a symbol
    i = int(rng.integers(len(row) + 1))
    row = row[:i] + [int(rng.choice(ids))] + row[i:]
  elif kind == 7:  # an unmasked hole before EOS
    mask[int(rng.integers(len(row)))] = False
  elif kind == 8:  # garbage after EOS (ignored)
    row = row + [int(x) for x in rng.integers(0, vocab, size=3)]
    mask = [True] * len(row)
  else:  # leading zero on a number
    digits = [i for i, t in enumerate(row) if t in ids[:10]]
    i = digits[int(rng.integers(len(digits)))]
    row = row[:i] + [ids[0]] + row[i:]
  mask = mask + [True] * (len(row) - len(mask))
  return row, mask[:len(row)]


def _batch(tok, rows):
  """rows: (tokens or text, mask or None, numbers, target) -> padded arrays."""
  b = len(rows)
  toks, masks = np.zeros((b, N), np.int32), np.zeros((b, N), bool)
  ans, ans_mask = np.zeros((b, A), np.int32), np.zeros((b, A), bool)
  for i, (resp, mask, numbers, target) in enumerate(rows):
    if isinstance(resp, str):
      resp, mask = tok.encode(resp, add_eos=True), None
    resp = resp[:N]
    mask = [True] * len(resp) if mask is None else mask[:N]
    toks[i, :len(resp)], masks[i, :len(resp)] = resp, mask
    a = tok.encode(_answer(numbers, target))
    ans[i, :len(a)], ans_mask[i, :len(a)] = a, True
  return toks, masks, ans, ans_mask


def test_verifier_agrees_with_checker(tok, verify):
  rng = np.random.default_rng(0)
  ids = [tok.piece_to_id(s) for s in T.DIGITS + ("####", "+", "-", "*", "/", "=", ",", C.SPACE)]
  rows, kinds = [], []

  def add(kind, resp, numbers, target, mask=None):
    rows.append((resp, mask, numbers, target))
    kinds.append(kind)

  for n in (2, 3, 4, 4):
    task = C.CountdownTask(num_numbers=n)
    for e in task.examples("train", seed=5, num=150):
      numbers, target = _problem(e)
      gold = C.gold_solution(numbers, target)
      add("gold", e["response"], numbers, target)
      sols = C.all_solutions(numbers, target)
      for j in rng.choice(len(sols), size=min(2, len(sols)), replace=False):
        add("alternative", C.render_steps(_swap_some(rng, sols[j])), numbers, target)
      parts, last = _attempt(rng, numbers)
      t = last if rng.random() < 0.8 and isinstance(last, int) and 1 <= last <= 999 else target
      add("random", " ".join(parts) + f" ####{last if rng.random() < 0.9 else t}", numbers, t)
      # by construction invalid
      outside = next(x for x in itertools.count(1) if x not in numbers)
      a, op, b, c = gold[0]
      bad = [(outside, "+", b, outside + b)] + list(gold[1:])
      add("not_in_list", C.render_steps(bad), numbers, bad[-1][3])
      once = [x for x, k in collections.Counter(numbers).items() if k == 1]
      if once:
        x = once[0]
        add("used_twice", f"{x}+{x}={2 * x} ####{2 * x}", numbers, 2 * x)
      if c not in numbers:
        add("result_used_twice", f"{a}{op}{b}={c} {c}+{c}={2 * c} ####{2 * c}", numbers, 2 * c)
      add("wrong_arithmetic", C.render_steps([(a, op, b, c + 1)] + list(gold[1:]), target),
          numbers, target)
      if len(gold) > 1:  # right final value, bad intermediate step
        add("bad_intermediate", C.render_steps([(a, op, b, c + 1)] + list(gold[1:])),
            numbers, target)
      add("answer_not_last", C.render_steps(gold[:-1] or gold, target) if len(gold) > 1
          else C.render_steps(gold, target + 1), numbers, target)
      add("no_steps", f"####{target}", numbers, target)
      add("extra_space", e["response"].replace(" ", "  ", 1), numbers, target)
      add("missing_marker", e["response"].replace("####", ""), numbers, target)
      add("extra_after_answer", e["response"] + "=", numbers, target)
      toks, mask = _token_mutation(rng, tok.encode(e["response"], add_eos=True), tok.vocab_size,
                                   ids)
      add("token_mutation", toks, numbers, target, mask)
      toks, mask = _token_mutation(rng, tok.encode(e["response"], add_eos=True), tok.vocab_size,
                                   ids)
      add("token_mutation", toks, numbers, target, mask)
      add("truncated", tok.encode(e["response"]), numbers, target)
      add("empty", [tok.eos_id], numbers, target)
  assert len(rows) > 4000
  toks, masks, ans, ans_mask = _batch(tok, rows)
  got = np.asarray(verify(toks, masks, ans, ans_mask))
  want = np.array([_reference(tok, toks[i], masks[i], r[2], r[3]) for i, r in enumerate(rows)])
  bad = np.flatnonzero(got != want)
  assert not len(bad), [(kinds[i], tok.decode([int(t) for t in toks[i]]), rows[i][2:], got[i])
                        for i in bad[:5]]
  by_kind = collections.defaultdict(list)
  for k, r in zip(kinds, got):
    by_kind[k].append(r)
  assert min(by_kind["gold"]) == min(by_kind["alternative"]) == 1.0
  for k in ("not_in_list", "used_twice", "result_used_twice", "wrong_arithmetic",
            "bad_intermediate", "answer_not_last", "no_steps", "extra_space", "missing_marker",
            "extra_after_answer", "truncated", "empty"):
    assert len(by_kind[k]) >= 50 and max(by_kind[k]) == 0.0, k
  for k, lo in (("random", 0.15), ("token_mutation", 0.05)):  # both outcomes represented
    assert lo < np.mean(by_kind[k]) < 0.85, (k, np.mean(by_kind[k]))

  # the same answers left-padded give the same rewards
  shift = A - ans_mask.sum(axis=1)
  left = np.stack([np.roll(r, s) for r, s in zip(ans, shift)])
  left_mask = np.stack([np.roll(m, s) for m, s in zip(ans_mask, shift)])
  np.testing.assert_array_equal(np.asarray(verify(toks, masks, left, left_mask)), got)


def test_verifier_edge_cases_and_format_reward(tok):
  verify = jax.jit(C.make_countdown_verifier(tok, format_reward=0.25))
  cases = [  # (numbers, target, response, reward)
      ((3, 7, 12), 57, "12+7=19 19*3=57 ####57", 1.0),
      ((3, 7, 12), 57, "7+12=19 3*19=57 ####57", 1.0),
      ((2, 2, 5), 4, "2+2=4 ####4", 1.0),  # two copies of 2
      ((2, 5, 9), 4, "2+2=4 ####4", 0.25),  # one copy
      ((3, 4, 12), 12, "4*3=12 ####12", 1.0),  # a result equal to a given number
      ((3, 4, 12), 1, "4*3=12 12/12=1 ####1", 1.0),  # the given 12 and the produced 12
      ((3, 4, 12), 1, "4*3=12 12/12=1 12-12=0 ####1", 0.25),  # too many steps
      ((6, 3, 2), 1, "6/3=2 2/2=1 ####1", 1.0),
      ((6, 4, 2), 1, "6/4=1 ####1", 0.25),  # inexact division
      ((6, 6, 2), 0, "6-6=0 ####0", 1.0),  # zero is a value (never a generated target)
      ((6, 0, 2), 6, "6/0=6 ####6", 0.25),
      ((5, 3, 2), 2, "3-5=2 ####2", 0.25),  # negative
      ((12, 10, 11), 1320, "12*10=120 120*11=1320 ####1320", 0.0),  # over 999: malformed
      ((3, 7, 12), 57, "12+07=19 19*3=57 ####57", 0.0),  # leading zero
      ((3, 7, 12), 57, "12+7=19 19*3=57 ####057", 0.0),
      ((3, 7, 12), 57, "12+7=19 19*3=57 ####58", 0.25),
      ((3, 7, 12), 57, "12+7=19 19*3=57 ####", 0.0),
      ((3, 7, 12), 57, "12+7=19 19*3=57 ####57####57", 0.0),
      ((3, 7, 12), 57, " 12+7=19 19*3=57 ####57", 0.0),
      ((3, 7, 12), 57, "12+7=19 19*3=57 ####57 ", 0.0),
      ((3, 7, 12), 57, "12+7=19 19*3=57 t57", 0.0),
      ((3, 7, 12), 57, "12+7=19 19*3 ####57", 0.0),
      ((3, 7, 12), 57, "12+7+19 19*3=57 ####57", 0.0),
  ]
  toks, masks, ans, ans_mask = _batch(tok, [(r, None, nums, t) for nums, t, r, _ in cases])
  got = np.asarray(verify(toks, masks, ans, ans_mask))
  assert got.tolist() == [c[3] for c in cases], list(zip([c[2] for c in cases], got))
  for (nums, t, r, want), g in zip(cases, got):
    assert C.check_solution(nums, t, r) == (want == 1.0), r
  # truncated (no EOS) scores 0 even when well formed; an empty / malformed answer field too
  toks2 = toks.copy()
  toks2[0, np.argmax(toks[0] == tok.eos_id)] = tok.pad_id
  masks2 = masks & (toks2 != tok.pad_id)
  assert float(verify(toks2, masks2, ans, ans_mask)[0]) == 0.0
  assert float(verify(toks, masks, ans, np.zeros_like(ans_mask))[0]) == 0.25
  with pytest.raises(ValueError, match="max_answer_len"):
    C.make_countdown_verifier(tok, max_answer_len=8)(toks, masks, ans, ans_mask)


# ---- configured through setup ---------------------------------------------------------------


@pytest.mark.slow
def test_setup_builds_countdown_and_a_jitted_round_runs(tmp_path):
  p, r, a = WIDTHS[3]
  cfg = config_lib.load_config(str(config_lib.default_config_path()), [
      "data.task=countdown", "data.difficulty=3", f"data.max_prompt_len={p}",
      f"data.max_response_len={r}", f"data.max_answer_len={a}", f"sampling.max_new_tokens={r}",
      "data.batch_size=4", "sampling.n=2", "model.hidden_size=32", "model.intermediate_size=64",
      "model.num_layers=1", "mesh.data=1", "progress_bar=false"])
  config_validation.validate(cfg)
  task, tok = setup.task_and_tokenizer(cfg, tmp_path)
  assert isinstance(task, C.CountdownTask) and task.num_numbers == 3
  run = setup.build(cfg, tmp_path)
  batch = T.encode_examples(task.examples("train", num=4), tok, p, r, a)
  gold = run.verifier(batch["response_tokens"], batch["response_mask"], batch["answer_tokens"],
                      batch["answer_mask"])
  np.testing.assert_array_equal(np.asarray(gold), 1.0)
  state = run.initial_state()
  examples = task.examples("train", num=4)
  rows = len(examples) * cfg.sampling.n
  state, metrics = run.round_fn(num_samples=rows)(state, batch)  # GRPO: sample, verify, update
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["train/loss"])
  # The in-round rewards are the host-side checker's verdicts on the decoded samples.
  expected = []
  for i in range(rows):
    ex = examples[i // cfg.sampling.n]
    tokens = metrics["samples/tokens"][i][:metrics["samples/lengths"][i]].tolist()
    ended = bool(tokens) and tokens[-1] in tok.eos_ids
    text = tok.decode(tokens[:-1] if ended else tokens)
    nums, target = ex["answer"].split("=")
    expected.append(float(ended and C.check_solution([int(x) for x in nums.split(",")],
                                                     int(target), text)))
  np.testing.assert_array_equal(metrics["samples/rewards"], expected)
  assert metrics["train/reward_mean"] == pytest.approx(np.mean(expected))


def test_data_max_value_sets_the_number_range(tmp_path):
  """data.max_value: countdown's numbers come from 1..N, sort's values from 0..N (0 = the task's
  own default); arithmetic has no such range and says so."""
  base = [f"data.{k}={v}" for k, v in zip(("max_prompt_len", "max_response_len",
                                           "max_answer_len"), WIDTHS[3])]

  def task_of(*extra):
    cfg = config_lib.load_config(str(config_lib.default_config_path()), [*base, *extra])
    config_validation.validate(cfg)
    return setup._build_task(cfg)  # pylint: disable=protected-access

  assert task_of("data.task=countdown", "data.difficulty=3").max_number == 12
  task = task_of("data.task=countdown", "data.difficulty=3", "data.max_value=5")
  assert task.max_number == 5
  numbers = [int(x) for ex in task.examples("train", num=200)
             for x in ex["answer"].split("=")[0].split(",")]
  assert set(numbers) == set(range(1, 6))
  assert task_of("data.task=sort", "data.difficulty=4", "data.max_value=3").max_value == 3
  with pytest.raises(ConfigError, match=r"data.max_value: arithmetic has no value range"):
    task_of("data.task=arithmetic", "data.max_value=5")
  with pytest.raises(ConfigError, match=r"data.difficulty / data.max_value: max_number must be"):
    task_of("data.task=countdown", "data.difficulty=3", "data.max_value=100")
