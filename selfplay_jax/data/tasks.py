"""Built-in verifiable tasks: deterministic problems, gold responses, exact token-space verifiers.

Every response ends with `ANSWER_MARKER`, the answer, then EOS. Digits, the marker and the task's
operators are user-defined symbols of the task tokenizer, so each is exactly one token and the
answer's tokens inside a response equal `tokenizer.encode(answer)`:

  arithmetic (direct)        "12+34="           -> "####46"
  arithmetic (step_by_step)  "58+67="           -> "8+7+0=15 5+6+1=12 ####125"
                             "52-17="           -> "12-7-0=5 5-1-1=3 ####35"
                             "23*47="           -> "23*7=161 23*40=920 161+920=1081 ####1081"
  sort                       "sort 3,1,4,1,5="  -> "####1,1,3,4,5"

Splits: a problem is "heldout" iff a hash of its canonical key (commuted operands and permuted lists
share one key; difficulty settings and seeds are not part of it) falls below `heldout_fraction`, so
train and heldout never overlap, whatever the seeds, and stay disjoint across difficulty levels.

  task = get_task("arithmetic", num_digits=3, step_by_step=True)
  tok = build_tokenizer(task, workdir)                    # cached <workdir>/<name>-<digest>.model
  batch = encode_examples(task.examples("train", seed=0, num=64), tok, 16, 48, 8)
  verify = task.make_verifier(tok)                        # jittable, rewards float32 [B]
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from selfplay_jax import tokenizers
from selfplay_jax.data.encoding import (EncodingError, build_tokenizer,  # noqa: F401 (re-exported)
                                        check_tokenizer, encode_examples)
from selfplay_jax.scoring.verifiers import Verifier, make_answer_verifier  # noqa: F401 (re-exported)

__all__ = ["ANSWER_MARKER", "DIGITS", "SPLITS", "Task", "ArithmeticTask", "SortTask",
           "AdditionTask", "TASKS", "get_task", "build_tokenizer", "check_tokenizer", "encode_examples",
           "make_answer_verifier", "extract_answer", "wrong_response"]

ANSWER_MARKER = "####"
DIGITS = tuple("0123456789")
SPLITS = ("train", "heldout")
Example = dict[str, str]


def stable_fraction(key: str) -> float:
  """A stable (process- and platform-independent) hash of `key` in [0, 1)."""
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def _check_split(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return SPLITS.index(split)


class Task(abc.ABC):
  """A generator of verifiable problems. Subclasses are frozen dataclasses.

  Subclasses define `name`, `symbols` (user-defined tokenizer symbols, each one token),
  `answer_symbols` (what an answer may consist of) and the problem hooks below.
  """

  name: ClassVar[str]
  symbols: ClassVar[tuple[str, ...]]
  answer_symbols: ClassVar[tuple[str, ...]] = DIGITS
  max_size: ClassVar[dict[str, int]] = {"train": 100_000, "heldout": 1_000}
  max_tries: ClassVar[int] = 10_000
  has_answers: ClassVar[bool] = True  # every example can be verified
  value_range_field: ClassVar[str | None] = None  # the field `data.max_value` sets, if any
  step_separator: ClassVar[str | None] = None  # text that ends a solution step (tree search)
  heldout_fraction: float

  # ---- problem hooks -------------------------------------------------------------------------

  @abc.abstractmethod
  def _sample(self, rng: np.random.Generator) -> Any:
    """One random problem."""

  @abc.abstractmethod
  def _key(self, problem: Any) -> str:
    """Canonical key of a problem (equal for problems that are the same up to symmetry)."""

  @abc.abstractmethod
  def _render(self, problem: Any) -> Example:
    """The example dict {"prompt", "response", "answer"} of a problem."""

  @abc.abstractmethod
  def _num_problems(self) -> int:
    """How many distinct problems `_sample` can return."""

  # ---- public API ----------------------------------------------------------------------------

  def split_of(self, problem: Any) -> str:
    """"heldout" or "train": fixed by the problem's canonical key alone."""
    return "heldout" if stable_fraction(f"{self.name}:{self._key(problem)}") < self.heldout_fraction \
        else "train"

  def example(self, split: str, index: int, seed: int = 0) -> Example:
    """The `index`-th example of `split` for `seed` (random access; problems repeat by chance)."""
    split_id = _check_split(split)
    if index < 0 or seed < 0:
      raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, split_id, index])
    for _ in range(self.max_tries):
      problem = self._sample(rng)
      if self.split_of(problem) == split:
        return self._render(problem)
    raise ValueError(f"{self!r} found no {split} problem in {self.max_tries} tries: the problem "
                     f"space is too small for heldout_fraction={self.heldout_fraction}")

  def examples(self, split: str, seed: int = 0, num: int | None = None) -> list[Example]:
    """`num` (default `size(split)`) examples: `[example(split, i, seed) for i in range(num)]`."""
    num = self.size(split) if num is None else num
    return [self.example(split, i, seed) for i in range(num)]

  def size(self, split: str) -> int:
    """Nominal length of a split: about its number of problems, capped by `max_size`."""
    frac = self.heldout_fraction if _check_split(split) else 1.0 - self.heldout_fraction
    return int(min(self.max_size[split], max(1, round(self._num_problems() * frac))))

  def source(self, split: str, seed: int = 0, pairs: bool = False) -> "TaskSource":
    """A random-access source (`len`, `[i]`) for `grain.MapDataset.source`; with `pairs`, each
    example also has `chosen` (the gold response) and `rejected` (`wrong_response`)."""
    return TaskSource(self, split, seed, pairs)

  def preference_example(self, split: str, index: int, seed: int = 0) -> Example:
    """`example(...)` plus a synthetic preference pair: chosen = the gold response, rejected =
    the same response with a wrong final answer (offline DPO on a built-in task)."""
    ex = self.example(split, index, seed)
    rng = np.random.default_rng([seed, _check_split(split), index, 1])
    return {**ex, "chosen": ex["response"], "rejected": wrong_response(ex, rng)}

  def corpus(self, num: int = 1000) -> list[str]:
    """Texts to train the task tokenizer on (train prompts + responses, plus every symbol)."""
    texts = [e["prompt"] + e["response"] for e in self.examples("train", seed=0, num=num)]
    return texts + [" ".join(self.symbols)]

  def make_verifier(self, tokenizer: tokenizers.Tokenizer, max_answer_len: int | None = None,
                    format_reward: float = 0.0) -> Verifier:
    """The jittable exact-answer verifier for this task's format (see `make_answer_verifier`)."""
    check_tokenizer(self, tokenizer)
    answer_ids = [tokenizer.piece_to_id(s) for s in self.answer_symbols]
    return make_answer_verifier(tokenizer.piece_to_id(ANSWER_MARKER), tokenizer.eos_ids,
                                answer_ids, max_answer_len=max_answer_len,
                                format_reward=format_reward)

  def make_trace_fn(self, tokenizer: tokenizers.Tokenizer) -> Any:
    """The verification trace a checking judge writes (`judge.trace=verify`), or None (the
    default): this task has none. A trace is a jittable
    `trace(answer [R, A], answer_mask, response [R, N], response_mask) -> (tokens [R, W], mask)`
    (right-padded, no EOS) with an int attribute `width` = W, fixed for the task's setting: the
    response re-checked step by step, whose last token says whether the verifier accepts it (see
    `countdown.make_countdown_trace`). Return one stable object per tokenizer."""
    del tokenizer
    return None

  def make_corrupt_fn(self, tokenizer: tokenizers.Tokenizer) -> Any:
    """Hard negatives for judge training (`judge.hard_negatives`), or None (the default): this
    task has none. A jittable `corrupt(response [R, N], response_mask, key) -> response [R, N]`
    that turns a correct response into a wrong one of the kind the policy writes (countdown: one
    step's operator or one digit of its claimed result changed,
    `countdown.make_countdown_corruption`); the mask is kept."""
    del tokenizer
    return None


@dataclasses.dataclass(frozen=True)
class TaskSource:
  """`len` / `__getitem__` view of one split of a task (grain's RandomAccessDataSource protocol)."""

  task: Task
  split: str
  seed: int = 0
  pairs: bool = False

  def __len__(self) -> int:
    return self.task.size(self.split)

  def __getitem__(self, index: int) -> Example:
    if self.pairs:
      return self.task.preference_example(self.split, int(index), self.seed)
    return self.task.example(self.split, int(index), self.seed)


def wrong_response(example: Example, rng: np.random.Generator) -> str:
  """The response with one digit of its final answer changed (so the answer is wrong)."""
  answer = example["answer"]
  digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
  if not digits:
    raise ValueError(f"cannot build a wrong answer for {example!r}: its answer has no digit")
  i = digits[rng.integers(len(digits))]
  wrong = answer[:i] + str((int(answer[i]) + int(rng.integers(1, 10))) % 10) + answer[i + 1:]
  head = example["response"][:len(example["response"]) - len(answer)]
  return head + wrong


# ---- arithmetic ------------------------------------------------------------------------------


def _digit(x: int, i: int) -> int:
  return x // 10**i % 10


def add_steps(a: int, b: int, num_digits: int) -> list[str]:
  """Digit-wise addition, least significant first: "x+y+carry_in=two-digit sum" (carry = tens)."""
  steps, carry = [], 0
  for i in range(num_digits):
    x, y = _digit(a, i), _digit(b, i)
    s = x + y + carry
    steps.append(f"{x}+{y}+{carry}={s:02d}")
    carry = s // 10
  return steps


def sub_steps(a: int, b: int, num_digits: int) -> list[str]:
  """Digit-wise a-b (a >= b): "x-y-borrow_in=d", with x written as 1x when it borrows ten."""
  steps, borrow = [], 0
  for i in range(num_digits):
    x, y = _digit(a, i), _digit(b, i)
    out = int(x - y - borrow < 0)
    steps.append(f"{x + 10 * out}-{y}-{borrow}={x + 10 * out - y - borrow}")
    borrow = out
  return steps


def mul_steps(a: int, b: int, num_digits: int) -> list[str]:
  """Long multiplication: partial products "a*(d*10^i)=p", then running sums "s+p=s'"."""
  parts = [_digit(b, i) * 10**i for i in range(num_digits)]
  steps = [f"{a}*{p}={a * p}" for p in parts]
  total = a * parts[0]
  for p in parts[1:]:
    steps.append(f"{total}+{a * p}={total + a * p}")
    total += a * p
  return steps


_OPS = {"+": (lambda a, b: a + b, add_steps), "-": (lambda a, b: a - b, sub_steps),
        "*": (lambda a, b: a * b, mul_steps)}


@dataclasses.dataclass(frozen=True)
class ArithmeticTask(Task):
  """`a op b` with operands of up to `num_digits` digits; op drawn uniformly from `operations`.

  Subtraction is drawn with a >= b (answers are never negative). `step_by_step` writes the
  digit-wise work (carries / borrows / partial products) before the answer, STaR style.
  """

  name: ClassVar[str] = "arithmetic"
  symbols: ClassVar[tuple[str, ...]] = DIGITS + (ANSWER_MARKER, "+", "-", "*", "=")
  num_digits: int = 2
  operations: str = "+"
  step_by_step: bool = False
  heldout_fraction: float = 0.1

  def __post_init__(self):
    if not isinstance(self.num_digits, int) or not 1 <= self.num_digits <= 9:
      raise ValueError(f"num_digits must be an int in [1, 9], got {self.num_digits!r}")
    if not self.operations or set(self.operations) - set(_OPS) or \
        len(set(self.operations)) != len(self.operations):
      raise ValueError(f"operations must be distinct characters of '+-*', got {self.operations!r}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

  def _sample(self, rng):
    op = self.operations[int(rng.integers(len(self.operations)))]
    a, b = (int(x) for x in rng.integers(0, 10**self.num_digits, size=2))
    return (op, b, a) if op == "-" and a < b else (op, a, b)

  def _key(self, problem):
    op, a, b = problem
    return f"{op}:{min(a, b)}:{max(a, b)}" if op in "+*" else f"{op}:{a}:{b}"

  def _render(self, problem):
    op, a, b = problem
    fn, steps = _OPS[op]
    answer = str(fn(a, b))
    work = " ".join(steps(a, b, self.num_digits)) + " " if self.step_by_step else ""
    return {"prompt": f"{a}{op}{b}=", "response": f"{work}{ANSWER_MARKER}{answer}",
            "answer": answer}

  def _num_problems(self):
    n = 10**self.num_digits
    return sum(n * (n + 1) // 2 if op == "-" else n * n for op in self.operations)


# ---- addition by length (easy-to-hard) -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdditionTask(Task):
  """`a+b` with both operands of exactly `num_digits` digits (1 digit: 0..9), written least
  significant digit first and zero-padded to `width` digits (the answer to `width + 1`):

    num_digits=3, width=6:  123+456  ->  prompt "321000+654000="  response "####9750000"

  Every length is written at the same positions, so one length-agnostic digit-by-digit procedure
  (Lee et al. 2025 also reverse the digits) solves every length up to `width`: the format the
  easy-to-hard curriculum (`curriculum.*`) extends from short to long operands. `width=0` means
  `num_digits`. `plausible` is the length filter of self-labelling: a sum of two n-digit numbers
  has at most n + 1 digits, so every answer digit past the first n + 1 must be 0.

  `carries=True` writes the carry out of each position (least significant first, `width` digits
  0/1) before the marker, a scratchpad that makes every answer digit a function of its two operand
  digits and one carry already written, at fixed offsets:

    num_digits=3, width=6, carries:  "321000+654000="  ->  "000000####9750000"
                                     "987000+654000="  ->  "111000####5421000"  (789+456=1245)
  """

  name: ClassVar[str] = "addition"
  symbols: ClassVar[tuple[str, ...]] = DIGITS + (ANSWER_MARKER, "+", "=")
  num_digits: int = 3
  width: int = 0
  carries: bool = False
  heldout_fraction: float = 0.1

  def __post_init__(self):
    if not isinstance(self.num_digits, int) or not 1 <= self.num_digits <= 32:
      raise ValueError(f"num_digits must be an int in [1, 32], got {self.num_digits!r}")
    if not isinstance(self.width, int) or not (self.width == 0 or
                                               self.num_digits <= self.width <= 32):
      raise ValueError(f"width must be 0 or an int in [num_digits={self.num_digits}, 32], got "
                       f"{self.width!r}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

  @property
  def padded_width(self) -> int:
    return self.width or self.num_digits

  def with_digits(self, num_digits: int) -> "AdditionTask":
    """The same format (width, split) at another operand length: a curriculum's next level."""
    return dataclasses.replace(self, num_digits=num_digits, width=self.padded_width)

  def _sample(self, rng):
    lo = 0 if self.num_digits == 1 else 10**(self.num_digits - 1)
    return tuple(int(x) for x in rng.integers(lo, 10**self.num_digits, size=2))

  def _key(self, problem):
    return f"+:{min(problem)}:{max(problem)}"

  def _render(self, problem):
    a, b = problem
    w = self.padded_width
    rev = lambda x, n: f"{x:0{n}d}"[::-1]
    answer = rev(a + b, w + 1)
    work = "".join(str((a % 10**(i + 1) + b % 10**(i + 1)) // 10**(i + 1)) for i in range(w)) \
        if self.carries else ""
    return {"prompt": f"{rev(a, w)}+{rev(b, w)}=", "response": f"{work}{ANSWER_MARKER}{answer}",
            "answer": answer}

  @property
  def response_len(self) -> int:
    """Tokens of every response, the stop token included: the carries (with `carries`), the
    marker, `width + 1` answer digits."""
    w = self.padded_width
    return (w if self.carries else 0) + 1 + (w + 1) + 1

  def _num_problems(self):
    count = 10 if self.num_digits == 1 else 9 * 10**(self.num_digits - 1)
    return count * count

  def corpus(self, num: int = 1000) -> list[str]:
    # every length up to the width, so the tokenizer does not depend on the curriculum's level
    levels = [self.with_digits(n) for n in range(1, self.padded_width + 1)]
    texts = [e["prompt"] + e["response"] for i in range(num)
             for e in [levels[i % len(levels)].example("train", i)]]
    return texts + [" ".join(self.symbols)]

  def plausible(self, answers: Any, zero_id: int, num_digits: int | None = None) -> Any:
    """The length filter, jittable: `answers` [B, A] from `verifiers.extract_answers` (answer
    tokens left-aligned, then `verifiers.PAD_ANSWER`) -> bool [B]: exactly `width + 1` digit
    tokens, every one past the first `num_digits + 1` (default: this task's) the digit 0."""
    n = self.num_digits if num_digits is None else num_digits
    w = self.padded_width + 1
    a = answers.shape[1]
    j = jnp.arange(a)
    length = (answers >= 0).sum(axis=1)
    past = (j[None] >= n + 1) & (j[None] < w)
    return (length == w) & ~(past & (answers != zero_id)).any(axis=1)


# ---- sort ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SortTask(Task):
  """Sort `length` integers drawn uniformly from [0, max_value], comma-separated.

  Splits partition by the multiset, so a held-out answer never appears as a train answer.
  """

  name: ClassVar[str] = "sort"
  symbols: ClassVar[tuple[str, ...]] = DIGITS + (ANSWER_MARKER, ",", "=")
  answer_symbols: ClassVar[tuple[str, ...]] = DIGITS + (",",)
  value_range_field: ClassVar[str | None] = "max_value"
  length: int = 5
  max_value: int = 9
  heldout_fraction: float = 0.1

  def __post_init__(self):
    if not isinstance(self.length, int) or not 1 <= self.length <= 64:
      raise ValueError(f"length must be an int in [1, 64], got {self.length!r}")
    if not isinstance(self.max_value, int) or not 1 <= self.max_value <= 999:
      raise ValueError(f"max_value must be an int in [1, 999], got {self.max_value!r}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

  def _sample(self, rng):
    return tuple(int(x) for x in rng.integers(0, self.max_value + 1, size=self.length))

  def _key(self, problem):
    return ",".join(map(str, sorted(problem)))

  def _render(self, problem):
    answer = ",".join(map(str, sorted(problem)))
    return {"prompt": f"sort {','.join(map(str, problem))}=",
            "response": f"{ANSWER_MARKER}{answer}", "answer": answer}

  def _num_problems(self):
    return (self.max_value + 1)**self.length


# ---- registry --------------------------------------------------------------------------------

# countdown.py subclasses Task (defined above), so it is imported here, not at the top
from selfplay_jax.data.countdown import CountdownTask  # noqa: E402

TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask, "sort": SortTask,
                                "countdown": CountdownTask, "addition": AdditionTask}


def get_task(name: str, **kwargs: Any) -> Task:
  """A task by registry name, e.g. `get_task("arithmetic", num_digits=3, operations="+-")`."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choices: {', '.join(sorted(TASKS))}")
  try:
    return TASKS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for task {name!r}: {e}") from e


def extract_answer(text: str) -> str | None:
  """Host-side helper: the text after the first `ANSWER_MARKER` (None if absent). It cannot see
  EOS; use the token verifier for rewards."""
  return text.split(ANSWER_MARKER, 1)[1] if ANSWER_MARKER in text else None
