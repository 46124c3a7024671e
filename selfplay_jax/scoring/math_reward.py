"""The built-in `math` reward (`algorithm.reward=math`, or `math` in `algorithm.reward_fns`):
a completion's final answer against the row's gold answer, compared by the `math-verify` library
(numeric and symbolic equivalence: `1/2` = `0.5` = `\\frac{1}{2}`, `3.0` = `3`,
`x^2+2x` = `x(x+2)`). A Python reward function (`scoring.python_rewards`), called on the host.

Gold (the row's `answer` field):
  GSM8K    the text after the last `####` ("... so 72 clips.\\n#### 72" -> 72)
  MATH     the last `\\boxed{...}` of a solution
  plain    the answer itself ("72", "\\frac{1}{2}"; a bare expression with no spaces that
           math-verify does not find as is, e.g. "x^2+2x", is read as LaTeX math "$x^2+2x$")
The completion is parsed by `math_verify.parse` (its last `\\boxed{}`, else LaTeX / plain
expressions it finds; a `#### n` line counts too). Reward 1.0 when equivalent, else 0.0; a
completion with no answer math-verify can read is wrong (0.0), not unscorable. A row whose gold
answer math-verify cannot read (or that has none) is unscorable: None (NaN, left out of the
group baseline), so a data error never teaches the policy anything.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import math_verify
import numpy as np

from selfplay_jax.scoring import verifiers

__all__ = ["math_reward", "gold_answer", "parse_gold", "parse", "make_verifier"]

GSM8K_MARKER = "####"




def _not_timeout_notice(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Timeout is disabled")


# Off on purpose (below); math-verify's one-time notice about it would only alarm users.
for _name in ("math_verify.parser", "math_verify.grader"):
  logging.getLogger(_name).addFilter(_not_timeout_notice)


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> tuple:
  # Host callbacks run off the main thread, where signal-based timeouts (math-verify's default,
  # SIGALRM) cannot be installed: parse and verify run with their timeouts off.
  return tuple(math_verify.parse(text, parsing_timeout=None))


def parse(text: str) -> list:
  """`math_verify.parse(text)` (timeouts off: see `_parse_cached`); [] when nothing parses."""
  return list(_parse_cached(text))


def gold_answer(answer: str) -> str:
  """The gold answer's text: after the last `####` (GSM8K) when there is one, else the answer
  (a `\\boxed{}` in a MATH solution is found by `parse`, which prefers boxed answers)."""
  return verifiers.final_answer(str(answer), GSM8K_MARKER).strip()


def parse_gold(answer: str) -> list:
  """The gold answer parsed: `gold_answer`'s text as math-verify finds it, else (a bare
  expression with no spaces, e.g. `x^2+2x`, which math-verify only reads between `$`s) as LaTeX
  math. [] when neither parses (the row is then unscorable)."""
  text = gold_answer(answer)
  parsed = parse(text)
  if not parsed and text and not any(c.isspace() for c in text):
    parsed = parse(f"${text}$")
  return parsed


def _completion_text(completion: str) -> str:
  """A completion that ends with a GSM8K-style `#### n` line is read from there."""
  if GSM8K_MARKER in completion:
    return completion.rsplit(GSM8K_MARKER, 1)[1]
  return completion


@functools.lru_cache(maxsize=65536)
def _score(gold_text: str, completion_text: str) -> float | None:
  """The reward of one (gold, completion answer) pair, cached: a policy's samples repeat answers
  across samples and rounds, and math-verify costs milliseconds per parse and verify."""
  gold = parse_gold(gold_text)
  if not gold:
    return None
  got = parse(completion_text)
  # timeout_seconds=None: no SIGALRM off the main thread (see `_parse_cached`).
  return 1.0 if got and math_verify.verify(gold, got, timeout_seconds=None) else 0.0


def math_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                **fields) -> list[float | None]:
  """1.0 / 0.0 per completion (equivalent to its row's gold `answer` or not); None where the gold
  is unreadable (or absent). TRL's reward-function signature."""
  del prompts, fields
  return [None if gold is None else _score(str(gold), _completion_text(completion))
          for completion, gold in zip(completions, answer)]


def make_verifier(tokenizer):
  """The held-out verifier of a run whose reward is `math`: jittable, with the token verifiers'
  signature `verify(tokens [R, N], mask [R, N], answer_tokens [R, A], answer_mask [R, A]) -> float32
  [R]`, 1.0 where `math_reward` accepts the completion (decoded up to its stop token) against the
  row's answer tokens decoded, else 0.0 (an unreadable gold answer counts as wrong here). Runs
  through a host callback, on a mesh on every device for its own rows; so `eval/accuracy` of a
  GSM8K / MATH run is math-verify's verdict, as its rewards are. The answer tokens are the row's
  answer field, so a MATH solution must fit `data.max_answer_len`."""
  from selfplay_jax.scoring import python_rewards  # pylint: disable=import-outside-toplevel

  def host(tokens, mask, answer_tokens, answer_mask):
    completions, golds = [], []
    for t, m, a, am in zip(tokens, mask, answer_tokens, answer_mask):
      completions.append(python_rewards.completion_text(tokenizer, np.asarray(t)[np.asarray(m, bool)]))
      golds.append(tokenizer.decode([int(x) for x in np.asarray(a)[np.asarray(am, bool)]],
                                    skip_special=True))
    scores = math_reward([""] * len(completions), completions, golds)
    return (np.asarray([1.0 if s == 1.0 else 0.0 for s in scores], np.float32),)

  def local(tokens, mask, answer_tokens, answer_mask):
    shape = jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32)
    return jax.pure_callback(host, (shape,), tokens, mask, answer_tokens, answer_mask)

  def verify(tokens, mask, answer_tokens, answer_mask):
    return python_rewards.on_each_device(local, (tokens, mask, answer_tokens, answer_mask),
                                         num_outputs=1)[0]

  return verify
