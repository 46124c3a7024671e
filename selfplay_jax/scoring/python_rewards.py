"""Python reward functions (TRL's `reward_funcs` convention), run on the host from inside the
jitted round through a host callback.

  def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float | None]: ...

  algorithm.reward_fn=rewards.py:my_reward                  # one function ("module:fn" too)
  algorithm.reward_fns=math,rewards.py:fmt  algorithm.reward_weights=1,0.1   # a weighted sum

One entry per completion: each prompt is repeated for its `sampling.n` samples. `prompts` are the
prompt tokens decoded with the run's tokenizer (padding and the BOS the pipeline adds dropped,
other special tokens kept, so a chat prompt reads as rendered); `completions` are the completion
tokens up to and excluding the stop token, special tokens skipped. `fields` maps every other field
of the rows (each JSONL row's own fields, or a built-in task's `answer` / `response`) to a list of
that field's values, one per completion. `prompt` and `completion` are not repeated in `fields`.

A function returns one number per completion, or None (NaN) for "cannot score this one". The
reward of a completion is the weighted sum of the functions that scored it (TRL's nansum); a
completion no function scored is unscorable (NaN): the policy-gradient family leaves it out of its
group's baseline and gives it advantage 0.

How it runs: `python_scorer` is a scorer (`scoring/__init__.py`) whose
`jax.pure_callback` hands the rollout's tokens and each row's index in the training source
(`batch["row_index"]`, added by `pipeline.make_iterator`) to `HostRewards` on the host, which
looks the rows up, decodes and calls the functions. On a mesh the callback is wrapped in a
`shard_map` over every mesh axis, so each device's callback scores only the rows it holds, on the
process that holds them (with several processes each one scores its own rows; no strings cross
XLA). An exception in a function, or a malformed return value, is recorded on the host and
returned as NaN plus an error flag in the round's metrics (`reward/errors`); `raise_if_failed`
(called by the training loop when it reads the round, before anything is saved) then stops the
run with one `RewardFunctionError` naming the function and the row.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from selfplay_jax import config_lib
from selfplay_jax.errors import ConfigError, RewardFunctionError

__all__ = ["BUILTIN", "RewardFn", "reward_fn_specs", "load_reward_fns", "HostRewards",
           "python_scorer", "on_each_device", "completion_text", "raise_if_failed", "ERROR_METRIC", "TIME_METRIC"]

BUILTIN = {"math": "selfplay_jax.scoring.math_reward:math_reward"}  # names usable in reward_fns
ERROR_METRIC = "reward/errors"  # > 0: a reward function failed this round (raise_if_failed)
TIME_METRIC = "time/reward_fns_s"  # host seconds in the reward callback (slowest shard)
_PROMPT_CHARS = 200  # of a failing row's prompt quoted in the error


@dataclasses.dataclass(frozen=True)
class RewardFn:
  """One configured reward function: `name` as configured ("rewards.py:fn", "module:fn", or a
  built-in name), its metric name (`reward/<metric>`), the function and its weight."""

  name: str
  metric: str
  fn: Callable[..., Any]
  weight: float


def reward_fn_specs(cfg) -> tuple[list[str], list[float]]:
  """The configured functions and weights: `algorithm.reward_fn` (shorthand for a one-element
  `reward_fns`) or `algorithm.reward_fns`, or `["math"]` for `algorithm.reward=math`; weights from
  `algorithm.reward_weights` (default 1 each). ConfigError naming the key on a bad value."""
  a = cfg.algorithm
  if a.reward_fn and a.reward_fns:
    raise ConfigError(f"algorithm.reward_fn: set either algorithm.reward_fn={a.reward_fn!r} (one "
                      f"function) or algorithm.reward_fns={a.reward_fns!r} (a list), not both")
  text = a.reward_fn or a.reward_fns or ("math" if a.reward == "math" else "")
  names = [s.strip() for s in text.split(",")] if text else []
  key = "algorithm.reward_fn" if a.reward_fn else "algorithm.reward_fns"
  if any(not s for s in names):
    raise ConfigError(f"{key}: an empty entry in {text!r} (comma-separated 'file.py:fn', "
                      f"'module:fn' or {', '.join(BUILTIN)})")
  if a.reward_weights and not names:
    raise ConfigError(f"algorithm.reward_weights: {a.reward_weights!r} weighs reward functions, "
                      "and none is set (algorithm.reward_fn / algorithm.reward_fns); leave it ''")
  weights = [1.0] * len(names)
  if a.reward_weights:
    try:
      weights = [float(w) for w in a.reward_weights.split(",")]
    except ValueError:
      raise ConfigError(f"algorithm.reward_weights: expected comma-separated numbers, got "
                        f"{a.reward_weights!r}") from None
    if len(weights) != len(names):
      raise ConfigError(f"algorithm.reward_weights: {len(weights)} weight(s) {a.reward_weights!r} "
                        f"for the {len(names)} function(s) of {key}={text!r}; give one weight per "
                        "function")
    if not all(math.isfinite(w) for w in weights):
      raise ConfigError(f"algorithm.reward_weights: weights must be finite, got "
                        f"{a.reward_weights!r}")
  return names, weights


def load_reward_fns(cfg) -> list[RewardFn]:
  """The configured functions, imported (ConfigError naming the key when one cannot be)."""
  names, weights = reward_fn_specs(cfg)
  key = "algorithm.reward_fn" if cfg.algorithm.reward_fn else "algorithm.reward_fns"
  out, seen = [], {}
  for name, weight in zip(names, weights):
    fn = config_lib.import_object(BUILTIN.get(name, name), key)
    if not callable(fn):
      raise ConfigError(f"{key}: {name} is a {type(fn).__name__}, not a function")
    metric = name if name in BUILTIN else name.rpartition(":")[2]
    seen[metric] = seen.get(metric, 0) + 1
    if seen[metric] > 1:
      metric = f"{metric}_{seen[metric]}"
    out.append(RewardFn(name, metric, fn, weight))
  return out


def _fields_of(row: Any) -> dict[str, Any]:
  """A source row's fields for the reward functions: the original JSONL object when the pipeline
  keeps it (`row["fields"]`, plus the row's `answer` when the file names it otherwise:
  `data.answer_field`), else the row itself (a built-in task's example); never `prompt` /
  `completion` (passed positionally, TRL's convention)."""
  row = dict(row)
  fields = row.get("fields")
  if isinstance(fields, dict):
    fields = dict(fields)
    if row.get("answer") and "answer" not in fields:
      fields["answer"] = row["answer"]
  else:
    fields = row
  return {k: v for k, v in fields.items() if k not in ("prompt", "completion", "fields", "chat")}


def _is_score(value: Any) -> bool:
  return value is None or (isinstance(value, numbers.Real) and not isinstance(value, str))


class HostRewards:
  """The host side of `python_scorer`: looks rows up in `source` by index, decodes prompts and
  completions with `tokenizer`, calls the functions and sums them. `error` holds the first
  failure's message (None while all is well)."""

  def __init__(self, fns: Sequence[RewardFn], tokenizer, source: Any):
    if not fns:
      raise ValueError("HostRewards needs at least one reward function")
    self.fns, self.tokenizer, self.source = tuple(fns), tokenizer, source
    self.error: str | None = None
    self._lock = threading.Lock()  # callbacks of several devices may run at once

  # -- decoding -----------------------------------------------------------------------------------

  def decode_prompt(self, tokens: np.ndarray, mask: np.ndarray) -> str:
    ids = [int(t) for t in np.asarray(tokens)[np.asarray(mask, bool)]]
    if ids and self.tokenizer.bos_id is not None and ids[0] == self.tokenizer.bos_id:
      ids = ids[1:]  # the BOS `encode_examples` adds
    return self.tokenizer.decode(ids, skip_special=False, strict=False)

  def decode_completion(self, tokens: np.ndarray, length: int) -> str:
    return completion_text(self.tokenizer, np.asarray(tokens)[:int(length)])

  # -- scoring ------------------------------------------------------------------------------------

  def inputs(self, row_index, prompt_tokens, prompt_mask, tokens, lengths):
    """(prompts, completions, fields) as the functions get them, one entry per completion."""
    prompts, cache = [], {}
    for i, (p, m) in enumerate(zip(prompt_tokens, prompt_mask)):
      key = int(row_index[i])
      if key not in cache:
        cache[key] = self.decode_prompt(p, m)
      prompts.append(cache[key])
    completions = [self.decode_completion(t, n) for t, n in zip(tokens, lengths)]
    looked_up = {}  # a prompt's n samples share one row
    for i in row_index:
      if int(i) not in looked_up:
        looked_up[int(i)] = _fields_of(self.source[int(i)])
    rows = [looked_up[int(i)] for i in row_index]
    names = list(dict.fromkeys(k for r in rows for k in r))
    fields = {k: [r.get(k) for r in rows] for k in names}
    return prompts, completions, fields

  def _row(self, row_index, prompts, i: int) -> str:
    prompt = prompts[i] if len(prompts[i]) <= _PROMPT_CHARS else prompts[i][:_PROMPT_CHARS] + "..."
    return f"training row {int(row_index[i])} (prompt {prompt!r})"

  def _failed(self, f: RewardFn, row_index, prompts, completions, fields, e: Exception) -> str:
    """The message for `f` raising `e` on a batch: the first row that raises on its own is named
    (the batch is re-run one completion at a time), with the line of `f`'s file that raised."""
    where = ""
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
      where = f" at {frames[-1].filename}:{frames[-1].lineno}"
    row = f"one of training rows {sorted({int(i) for i in row_index})}"
    for i in range(len(completions)):
      try:
        f.fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in fields.items()})
      except Exception:  # pylint: disable=broad-except
        row = self._row(row_index, prompts, i)
        break
    return (f"reward function {f.name} raised {type(e).__name__}: {e}{where}, on {row}")

  def _check(self, f: RewardFn, values: Any, row_index, prompts, n: int) -> np.ndarray:
    """`values` as float64 [n] (None -> NaN), or RewardFunctionError naming `f` and the row."""
    if isinstance(values, np.ndarray):
      values = values.tolist()
    if not isinstance(values, (list, tuple)):
      raise RewardFunctionError(f"reward function {f.name} returned a {type(values).__name__}; "
                                f"it must return a list of {n} floats (or None), one per completion")
    if len(values) != n:
      raise RewardFunctionError(f"reward function {f.name} returned {len(values)} values for {n} "
                                "completions; it must return one float (or None) per completion")
    for i, v in enumerate(values):
      if not _is_score(v):
        raise RewardFunctionError(
            f"reward function {f.name} returned a {type(v).__name__} ({v!r}) for completion {i} "
            f"of {self._row(row_index, prompts, i)}; each value must be a float or None")
    return np.asarray([np.nan if v is None else float(v) for v in values], np.float64)

  def score(self, row_index, prompt_tokens, prompt_mask, tokens, lengths):
    """(rewards float32 [r], per-function float32 [r, F], failed int32 [1], seconds float32 [1]).
    On a failure the rewards are NaN, `failed` is 1 and `error` holds the message."""
    start = time.perf_counter()
    n = len(row_index)
    per_fn = np.full((n, len(self.fns)), np.nan, np.float64)
    failed = 0
    try:
      prompts, completions, fields = self.inputs(row_index, prompt_tokens, prompt_mask, tokens,
                                                  lengths)
      for j, f in enumerate(self.fns):
        try:
          values = f.fn(list(prompts), list(completions), **{k: list(v) for k, v in fields.items()})
        except Exception as e:  # pylint: disable=broad-except
          raise RewardFunctionError(self._failed(f, row_index, prompts, completions, fields, e))
        per_fn[:, j] = self._check(f, values, row_index, prompts, n)
    except Exception as e:  # pylint: disable=broad-except
      failed = 1
      message = str(e) if isinstance(e, RewardFunctionError) else (
          f"reward functions: {type(e).__name__}: {e} while preparing the rows "
          f"{sorted({int(i) for i in row_index})}")
      with self._lock:  # the loop raises it once it reads the round (`raise_if_failed`)
        if self.error is None:
          self.error = message
      per_fn[:] = np.nan
    weights = np.asarray([f.weight for f in self.fns], np.float64)
    scored = ~np.isnan(per_fn)
    total = np.where(scored, per_fn * weights, 0.0).sum(axis=1)
    total = np.where(scored.any(axis=1), total, np.nan)
    seconds = time.perf_counter() - start
    return (total.astype(np.float32), per_fn.astype(np.float32), np.asarray([failed], np.int32),
            np.asarray([seconds], np.float32))


def completion_text(tokenizer, ids) -> str:
  """A completion's text as reward functions and the math verifier read it: the tokens up to and
  excluding the first stop token, special tokens skipped; an id past the tokenizer's vocabulary (a
  model with more embedding rows) reads as `<id N>`, so such a completion simply scores wrong."""
  ids = [int(t) for t in ids]
  eos = set(tokenizer.eos_ids)
  end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
  return tokenizer.decode(ids[:end], skip_special=True, strict=False)


def on_each_device(local, args, num_outputs: int):
  """`local(*args)` (a host callback over rows: every arg and output has a leading row axis),
  where on a mesh every device runs it on the rows it holds, on the process that holds them
  (callbacks need every mesh axis manual; rows that do not divide over the tensor axis too are
  split over the other axes only)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(*args)
  axes = tuple(mesh.axis_names)
  rows = PartitionSpec(axes if args[0].shape[0] % mesh.size == 0 else
                       tuple(a for a in axes if a != "tensor"))
  return jax.shard_map(local, mesh=mesh, in_specs=(rows,) * len(args),
                       out_specs=(rows,) * num_outputs, check_vma=False)(*args)


def python_scorer(host: HostRewards):
  """The scorer (`scorer(sample_params, ref_params, batch, rollout, rng) -> (scores, metrics)`)
  whose scores are `host`'s, computed through a host callback (see the module docstring). Its
  `host` attribute is `host` (the training loop reads its error)."""
  num_fns = len(host.fns)

  def local(row_index, prompt_tokens, prompt_mask, tokens, lengths):
    r = row_index.shape[0]
    shapes = (jax.ShapeDtypeStruct((r,), jnp.float32),
              jax.ShapeDtypeStruct((r, num_fns), jnp.float32),
              jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.float32))
    # pure_callback, not io_callback: the scores are a function of the callback's inputs (the
    # functions are meant to be pure), the order of calls across devices does not matter, and
    # io_callback's ordering cannot be kept across the devices of a shard_map.
    return jax.pure_callback(host.score, shapes, row_index, prompt_tokens, prompt_mask, tokens,
                             lengths)

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del sample_params, ref_params, rng
    if "row_index" not in batch:
      raise ValueError("Python reward functions need batch['row_index'] (each row's index in the "
                       "training source; pipeline.make_iterator adds it)")
    n = rollout.num_rows // batch["row_index"].shape[0]
    args = (jnp.repeat(batch["row_index"].astype(jnp.int32), n), rollout.prompt_tokens,
            rollout.prompt_mask, rollout.tokens, rollout.lengths)
    total, per_fn, failed, seconds = on_each_device(local, args, num_outputs=4)
    metrics = {ERROR_METRIC: jnp.sum(failed), TIME_METRIC: jnp.max(seconds)}
    for j, f in enumerate(host.fns):
      metrics[f"reward/{f.metric}"] = jnp.nanmean(per_fn[:, j])
    return total, metrics

  scorer.host = host
  return scorer


def raise_if_failed(scorer: Any, metrics: dict) -> None:
  """Raises the recorded `RewardFunctionError` when a round's (host) metrics say a reward
  function failed in it; pops the flag either way. Every process sees the flag (metrics are
  global); a process whose own rows all scored names the failure as another process's."""
  failed = metrics.pop(ERROR_METRIC, None)
  if failed is None or not float(failed):
    return
  host = getattr(scorer, "host", None)
  message = host.error if host is not None and host.error else (
      "a reward function failed on another process's rows (that process's error names the "
      "function and the row)")
  raise RewardFunctionError(message)

