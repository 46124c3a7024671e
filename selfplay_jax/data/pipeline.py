"""Input pipelines: validated JSONL loading, checkpointable grain batch iterators, eval batches.

  rows, report = load_jsonl("train.jsonl", tokenizer=tok, max_prompt_len=64,
                            max_response_len=128, max_answer_len=16)
  it = make_iterator(rows, tokenizer=tok, batch_size=32, max_prompt_len=64,
                     max_response_len=128, max_answer_len=16, seed=0)
  batch = next(it)                     # dict of numpy arrays, see `encode_examples`
  state = it.get_state()               # JSON-serialisable; `it.set_state(state)` resumes exactly
  evals = eval_batches(task, "heldout", 200, tokenizer=tok, batch_size=32, ...)

JSONL rows: `prompt` (str, required; or a list of chat messages), optional `response` (gold
response), `answer` (str or number), `chosen` / `rejected` (preference pairs), each read from the
JSON key `field_names` maps it to (GSM8K: `question`; MATH: `problem`, ...). An answer holding the
answer marker (`####`) keeps only what follows its last marker (a GSM8K solution ending `#### 72`
gives "72"). With `prompt_format="chat"` each prompt is rendered with the tokenizer's chat template
(a string becomes one user message; `system_prompt` is put first when the prompt has no system
message) and encoded as is. Every kept row also holds `fields`, the row's JSON object unchanged
(for reward functions). Bad rows are skipped and counted per reason (see `REASONS`), or raise
`DataError` under `strict=True`.

Multi-host: every process builds the same global batch of `batch_size` rows and encodes only its
own contiguous block of `batch_size // process_count` rows (`shard_rows`), so the union over
processes of one step's rows is exactly the single-process batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

from absl import logging
import grain
import jax
import numpy as np

from selfplay_jax.errors import DataError  # noqa: F401 (re-exported)
from selfplay_jax import chat, tokenizers
from selfplay_jax.data import encoding, tasks
from selfplay_jax.scoring import verifiers

__all__ = ["DataError", "RowReport", "REASONS", "FIELDS", "PROMPT_FORMATS", "MAX_LINE_BYTES",
           "load_jsonl", "final_answer", "make_dataset", "make_iterator", "eval_batches",
           "process_shard", "local_batch_size", "shard_rows"]

MAX_LINE_BYTES = 1 << 20  # longer lines are skipped unparsed ("line_too_long")
MAX_REPORT_EXAMPLES = 10
FIELDS = ("prompt", "response", "answer", "chosen", "rejected")
PROMPT_FORMATS = ("raw", "chat")
_RESPONSE_LIKE = ("response", "chosen", "rejected")
REASONS = ("line_too_long", "invalid_utf8", "invalid_json", "not_object", "missing_field",
           "wrong_type", "empty_prompt", "bad_messages", "template_error", "prompt_too_long",
           "response_too_long", "answer_too_long", "chosen_too_long", "rejected_too_long")
_SHOW_DETAIL = ("bad_messages", "template_error")  # the summary quotes the first one's message


class _BadRow(Exception):
  """Internal: why one row was rejected; `field` (missing_field: the JSON key) and `tokens` /
  `limit` (*_too_long) feed the summary. A `fatal` one stops the load whatever `strict` says (the
  run's settings, not the row, are wrong)."""

  def __init__(self, reason: str, detail: str = "", *, field: str = "", tokens: int = 0,
               limit: str = "", fatal: bool = False):
    super().__init__(reason)
    self.reason, self.detail = reason, detail
    self.field, self.tokens, self.limit, self.fatal = field, tokens, limit, fatal


@dataclasses.dataclass
class RowReport:
  """What `load_jsonl` kept and skipped.

  Attributes:
    path: the file.
    num_rows: non-blank lines seen.
    num_valid: rows kept.
    counts: skipped rows per reason (keys from `REASONS`).
    examples: the first few skipped rows as `(1-based line number, reason)`.
    missing: rows skipped as missing_field, per missing field.
    longest: per *_too_long reason, (the longest row's tokens, the limit it broke).
    why: per required field (its JSON key), why the run needs it (shown with missing_field).
    details: per reason of `_SHOW_DETAIL`, the first skipped row's message.
  """

  path: str
  num_rows: int = 0
  num_valid: int = 0
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: list[tuple[int, str]] = dataclasses.field(default_factory=list)
  missing: dict[str, int] = dataclasses.field(default_factory=dict)
  longest: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)
  why: dict[str, str] = dataclasses.field(default_factory=dict)
  details: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def num_skipped(self) -> int:
    return sum(self.counts.values())

  def add(self, line: int, reason: str, bad: _BadRow | None = None) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    if len(self.examples) < MAX_REPORT_EXAMPLES:
      self.examples.append((line, reason))
    if bad is not None and bad.field:
      self.missing[bad.field] = self.missing.get(bad.field, 0) + 1
    if bad is not None and bad.limit and bad.tokens > self.longest.get(reason, (0, ""))[0]:
      self.longest[reason] = (bad.tokens, bad.limit)
    if bad is not None and reason in _SHOW_DETAIL:
      self.details.setdefault(reason, bad.detail)

  def _note(self, reason: str) -> str:
    """What a reason's count means: the missing field(s) and why they are needed; the longest
    row against the limit."""
    if reason == "missing_field" and self.missing:
      return " (" + "; ".join(
          f"no {f!r} field in {n} row(s)" + (f": {self.why[f]}" if f in self.why else "")
          for f, n in sorted(self.missing.items())) + ")"
    if reason in self.longest:
      tokens, limit = self.longest[reason]
      return f" (longest {tokens} tokens{limit})"
    if reason in self.details:
      return f" (first: {self.details[reason]})"
    return ""

  def summary(self) -> str:
    reasons = ", ".join(f"{r}={n}{self._note(r)}" for r, n in sorted(self.counts.items())) or "none"
    first = ", ".join(f"line {n}: {r}" for n, r in self.examples)
    text = (f"{self.path}: kept {self.num_valid} of {self.num_rows} rows, skipped "
            f"{self.num_skipped} ({reasons})")
    return f"{text}; first skipped: {first}" if first else text


# ---- JSONL -----------------------------------------------------------------------------------


def _lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
  """Yields (1-based line number, raw line) with None for lines over `limit` bytes (unread)."""
  number = 0
  while True:
    line = f.readline(limit + 1)
    if not line:
      return
    number += 1
    if len(line) > limit:
      while line and not line.endswith(b"\n"):  # drain the rest of the huge line in chunks
        line = f.readline(1 << 16)
      yield number, None
    else:
      yield number, line


def _decode_line(raw: bytes | None, first: bool) -> str:
  if raw is None:
    raise _BadRow("line_too_long", f"more than {MAX_LINE_BYTES} bytes")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _BadRow("invalid_utf8", str(e)) from None
  return text.removeprefix("\ufeff") if first else text


def _parse(text: str) -> Any:
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:
    raise _BadRow("invalid_json", str(e)) from None


def _answer_str(value: Any, key: str = "answer") -> str:
  """An answer given as str or number, as a string (integral floats lose their ".0")."""
  if isinstance(value, str):
    return value
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if isinstance(value, float) and math.isfinite(value):
    return str(int(value)) if value.is_integer() else repr(value)
  raise _BadRow("wrong_type", f"{key} must be a string or number, got {type(value).__name__}")


final_answer = verifiers.final_answer  # the part after the last answer marker (GSM8K: "72")


def _field_names(field_names: Mapping[str, str] | None) -> dict[str, str]:
  """Each of `FIELDS` -> the JSON key it is read from (default: its own name)."""
  names = dict(zip(FIELDS, FIELDS))
  for name, key in (field_names or {}).items():
    if name not in FIELDS:
      raise ValueError(f"field_names must map fields of {FIELDS}, got {name!r}")
    if not isinstance(key, str) or not key:
      raise ValueError(f"field_names[{name!r}] must be a non-empty JSON key, got {key!r}")
    names[name] = key
  return names


def _fields(obj: Any, required: frozenset[str], names: Mapping[str, str],
            answer_marker: str | None) -> dict[str, Any]:
  """Type-checks a parsed row; its known fields (read through `names`) as strings, the prompt
  possibly a list of messages (absent / null optional fields dropped)."""
  if not isinstance(obj, dict):
    raise _BadRow("not_object", f"row is a JSON {type(obj).__name__}, not an object")
  for name in FIELDS:
    if name in required and names[name] not in obj:
      raise _BadRow("missing_field", f"no {names[name]!r} field", field=names[name])
  out = {}
  for name in FIELDS:
    key = names[name]
    value = obj.get(key)
    if value is None and name not in required:
      continue
    if name == "answer":
      out[name] = final_answer(_answer_str(value, key), answer_marker)
    elif isinstance(value, str) or (name == "prompt" and isinstance(value, list)):
      out[name] = value
    else:
      raise _BadRow("wrong_type", f"{key} must be a string, got {type(value).__name__}")
  return out


def _prompt_text(prompt: str | list, key: str, tokenizer: tokenizers.Tokenizer,
                 prompt_format: str, system_prompt: str) -> tuple[str, bool]:
  """(the prompt as the model reads it, whether it is a rendered chat template)."""
  if prompt_format == "raw":
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m
                                                   for m in prompt):
      raise _BadRow("wrong_type", f"{key} is a list of chat messages, and the prompt format is raw "
                    "text: set data.prompt_format=chat to render it with the tokenizer's chat "
                    "template", fatal=True)
    if isinstance(prompt, list):
      raise _BadRow("wrong_type", f"{key} must be a string (or, with data.prompt_format=chat, a "
                    "list of messages), got a list")
    if not prompt.strip():
      raise _BadRow("empty_prompt", f"{key} is empty or whitespace")
    return prompt, False
  try:
    messages = chat.messages_of(prompt, system_prompt)
  except ValueError as e:
    raise _BadRow("bad_messages", f"{key}: {e}") from None
  if not any(m["content"].strip() for m in messages if m["role"] != "system"):
    raise _BadRow("empty_prompt", f"{key} has no non-empty message")
  try:
    return tokenizer.render_chat(messages), True
  except chat.ChatTemplateError as e:
    raise _BadRow("template_error", str(e)) from None


def _check_lengths(row: Mapping[str, Any], tokenizer: tokenizers.Tokenizer, max_prompt_len: int,
                   max_response_len: int, max_answer_len: int) -> None:
  """Rejects rows that `encode_examples` could not fit (the prompt as `encoding.prompt_ids`
  encodes it, response + EOS, answer)."""
  n = len(encoding.prompt_ids(tokenizer, row))
  if n > max_prompt_len:
    over = f"{'' if row.get(encoding.CHAT_KEY) else ' with BOS'} > data.max_prompt_len={max_prompt_len}"
    raise _BadRow("prompt_too_long", f"{n} tokens{over}", tokens=n, limit=over)
  checks = [("answer", {}, max_answer_len, "", "data.max_answer_len")]
  checks += [(f, dict(add_eos=True), max_response_len, " with EOS", "data.max_response_len")
             for f in _RESPONSE_LIKE]
  for name, kw, limit, extra, limit_name in checks:
    if name in row:
      n = len(tokenizer.encode(row[name], **kw))
      if n > limit:
        over = f"{extra} > {limit_name}={limit}"
        raise _BadRow(f"{name}_too_long", f"{n} tokens{over}", tokens=n, limit=over)


@dataclasses.dataclass(frozen=True)
class _RowFormat:
  """How `load_jsonl` reads a row: required fields, JSON keys, prompt format, widths."""

  required: frozenset[str]
  names: Mapping[str, str]
  prompt_format: str
  system_prompt: str
  answer_marker: str | None
  tokenizer: tokenizers.Tokenizer
  max_prompt_len: int
  max_response_len: int
  max_answer_len: int


def _read_row(raw: bytes | None, first: bool, fmt: _RowFormat) -> dict[str, Any] | None:
  """One validated, normalized row; None for a blank line; `_BadRow` when invalid."""
  text = _decode_line(raw, first)
  if not text.strip():
    return None
  obj = _parse(text)
  row = _fields(obj, fmt.required, fmt.names, fmt.answer_marker)
  row["prompt"], row[encoding.CHAT_KEY] = _prompt_text(
      row["prompt"], fmt.names["prompt"], fmt.tokenizer, fmt.prompt_format, fmt.system_prompt)
  _check_lengths(row, fmt.tokenizer, fmt.max_prompt_len, fmt.max_response_len,
                 fmt.max_answer_len)
  row["fields"] = obj
  return _normalize(row)


def _normalize(row: Mapping[str, Any]) -> dict[str, Any]:
  """An example dict for `encode_examples`: missing response / answer become ""; the chat flag
  (`encoding.CHAT_KEY`) and the JSONL row's `fields` are kept when present."""
  out = {"prompt": row["prompt"], "response": row.get("response", ""),
         "answer": row.get("answer", "")}
  out.update({k: row[k] for k in ("chosen", "rejected", "fields") if k in row})
  if row.get(encoding.CHAT_KEY):
    out[encoding.CHAT_KEY] = True
  return out


def load_jsonl(path: str | os.PathLike, *, tokenizer: tokenizers.Tokenizer, max_prompt_len: int,
               max_response_len: int, max_answer_len: int, strict: bool = False,
               require: Sequence[str] = ("prompt",), why: Mapping[str, str] | None = None,
               field_names: Mapping[str, str] | None = None, prompt_format: str = "raw",
               system_prompt: str = "", answer_marker: str | None = tasks.ANSWER_MARKER,
               ) -> tuple[list[dict[str, Any]], RowReport]:
  """Reads and validates a JSONL file of examples.

  Each kept row is `{"prompt", "response", "answer", "fields"}` (response / answer "" when absent;
  a numeric answer becomes its string; an answer holding `answer_marker` keeps what follows its
  last marker, `final_answer`) plus `chosen` / `rejected` when present; `fields` is the row's JSON
  object unchanged, every key kept. Each field is read from the JSON key `field_names` maps it to
  (default: its own name), and errors name that key. `prompt` is always required; `require` may
  add more of `FIELDS`. A null optional field counts as absent. Blank lines are ignored.

  `prompt_format="chat"` renders each prompt with the tokenizer's chat template
  (`Tokenizer.render_chat`, generation prompt added): a string prompt is one user message, a list
  is the messages; `system_prompt` ("" = none) comes first when they have no system message. The
  rendered text is the row's `prompt`, with `encoding.CHAT_KEY` set (it is encoded without an
  added BOS). With `"raw"`, a prompt given as messages stops the load (DataError naming
  data.prompt_format).

  Bad rows (`REASONS`) are skipped, counted in the returned `RowReport` and logged once as a
  summary. `why` says, per required field, why the run needs it (named with the rows that lack it).

  Raises:
    FileNotFoundError: `path` does not exist (IsADirectoryError: it is a directory).
    DataError: with `strict`, at the first bad row (message: file, line number, reason); or when
      no row is valid.
  """
  path = os.fspath(path)
  unknown = set(require) - set(FIELDS)
  if unknown:
    raise ValueError(f"require must name fields of {FIELDS}, got {sorted(unknown)}")
  if prompt_format not in PROMPT_FORMATS:
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
  if prompt_format == "chat" and tokenizer.chat_template is None:
    raise tokenizers.TokenizerError(f"prompt_format='chat' needs a chat template, and {tokenizer!r} "
                                    "has none")
  if tokenizer.eos_id is None:
    raise ValueError("load_jsonl needs a tokenizer with an EOS token (responses end with EOS)")
  if os.path.isdir(path):
    raise IsADirectoryError(f"JSONL file {path} is a directory, not a file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"JSONL file not found: {path}")
  names = _field_names(field_names)
  fmt = _RowFormat(frozenset(("prompt", *require)), names, prompt_format, system_prompt,
                   answer_marker, tokenizer, max_prompt_len, max_response_len, max_answer_len)
  report = RowReport(path, why={names[k]: v for k, v in (why or {}).items() if k in names})
  rows = []
  with open(path, "rb") as f:
    for number, raw in _lines(f, MAX_LINE_BYTES):
      try:
        row = _read_row(raw, number == 1, fmt)
      except _BadRow as bad:
        if strict or bad.fatal:
          because = f"; {report.why[bad.field]}" if bad.field in report.why else ""
          raise DataError(f"{path} line {number}: {bad.reason} ({bad.detail}{because})") from None
        report.num_rows += 1
        report.add(number, bad.reason, bad)
        continue
      if row is not None:
        report.num_rows += 1
        rows.append(row)
  report.num_valid = len(rows)
  log = logging.warning if report.num_skipped else logging.info
  log("load_jsonl %s", report.summary())
  if not rows:
    raise DataError(f"no valid rows in {path}: {report.summary()}")
  return rows, report


# ---- process sharding ------------------------------------------------------------------------


def process_shard(process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """`(process_index, process_count)`, each defaulting to JAX's; validated."""
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"need 0 <= process_index < process_count, got {index} and {count}")
  return index, count


def local_batch_size(batch_size: int, process_count: int) -> int:
  """Rows per process of a global batch; ValueError unless `process_count` divides it."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the number of JAX processes "
                     f"({process_count}); each process must get an equal share")
  return batch_size // process_count


def shard_rows(rows: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
  """This process's contiguous block of a global batch (the identity for one process)."""
  n = local_batch_size(len(rows), process_count)
  return list(rows[process_index * n:(process_index + 1) * n])


# ---- batching --------------------------------------------------------------------------------


def _encode_rows(rows: Sequence[Mapping[str, Any]], *, tokenizer: tokenizers.Tokenizer,
                 max_prompt_len: int, max_response_len: int, max_answer_len: int,
                 process_index: int, process_count: int) -> dict[str, np.ndarray]:
  local = [_normalize(r) for r in shard_rows(rows, process_index, process_count)]
  return tasks.encode_examples(local, tokenizer, max_prompt_len, max_response_len, max_answer_len)


def _indexed(index: int, row: Any, *, size: int) -> tuple[int, Any]:
  return index % size, row  # grain's index runs on across epochs of a repeated source


def _encode_indexed(pairs: Sequence[tuple[int, Any]], *, process_index: int, process_count: int,
                    **kw) -> dict[str, np.ndarray]:
  """`_encode_rows` of the rows plus `row_index` (int32 [b]): each row's index in the source
  (how a host callback, e.g. Python reward functions, finds a row's text and fields)."""
  batch = _encode_rows([row for _, row in pairs], process_index=process_index,
                       process_count=process_count, **kw)
  batch["row_index"] = np.asarray(shard_rows([i for i, _ in pairs], process_index, process_count),
                                  np.int32)
  return batch


def make_dataset(source: Sequence[Mapping[str, Any]] | Any, *, tokenizer: tokenizers.Tokenizer,
                 batch_size: int, max_prompt_len: int, max_response_len: int,
                 max_answer_len: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
  """The grain `MapDataset` of encoded local batches behind `make_iterator`."""
  index, count = process_shard(process_index, process_count)
  local_batch_size(batch_size, count)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError("cannot build a data pipeline from an empty source")
  ds = grain.MapDataset.source(source).map_with_index(  # (index in source, row)
      functools.partial(_indexed, size=len(source)))
  if shuffle:
    ds = ds.shuffle(seed)  # reshuffled every epoch (seed + epoch)
  ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True, batch_fn=list)
  return ds.map(functools.partial(
      _encode_indexed, tokenizer=tokenizer, max_prompt_len=max_prompt_len,
      max_response_len=max_response_len, max_answer_len=max_answer_len, process_index=index,
      process_count=count))


def make_iterator(source: Sequence[Mapping[str, Any]] | Any, *,
                  tokenizer: tokenizers.Tokenizer, batch_size: int, max_prompt_len: int,
                  max_response_len: int, max_answer_len: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, num_threads: int = 2,
                  prefetch: int = 8) -> grain.DatasetIterator:
  """A checkpointable iterator of encoded batches (dicts of numpy arrays, `encode_examples`, plus
  `row_index`: int32 [b], each row's index in `source`).

  `source` is a task source (`task.source(split, seed)`) or a list of example dicts. Examples are
  shuffled by `seed` (a new order every epoch), repeated `num_epochs` times (None: forever) and
  batched with the remainder dropped. Each process gets `batch_size // process_count` rows.
  `get_state()` is JSON-serialisable; `set_state()` resumes exactly.
  """
  ds = make_dataset(source, tokenizer=tokenizer, batch_size=batch_size,
                    max_prompt_len=max_prompt_len, max_response_len=max_response_len,
                    max_answer_len=max_answer_len, seed=seed, shuffle=shuffle,
                    num_epochs=num_epochs, process_index=process_index,
                    process_count=process_count)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def eval_batches(task_or_examples: tasks.Task | Sequence[Mapping[str, Any]],
                 split: str = "heldout", num: int | None = None, *,
                 tokenizer: tokenizers.Tokenizer, batch_size: int, max_prompt_len: int,
                 max_response_len: int, max_answer_len: int, seed: int = 0,
                 process_index: int | None = None,
                 process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """A fixed, deterministic list of encoded evaluation batches.

  Takes the first `num` examples (default: all) of a task's `split` (for `seed`) or of a list of
  example dicts (`split` then unused), in order, padded to a multiple of `batch_size` by repeating
  the first example. Each batch adds `valid` (bool [b], False on padding, so summing a metric
  over `valid` counts every example exactly once) and `index` (int32 [b], the example's position,
  -1 on padding). Batches are process-sharded like `make_iterator`.
  """
  index, count = process_shard(process_index, process_count)
  local_batch_size(batch_size, count)
  if isinstance(task_or_examples, tasks.Task):
    examples = task_or_examples.examples(split, seed=seed, num=num)
  elif isinstance(task_or_examples, JsonlData):
    examples = task_or_examples.source(split)[:num]
  else:
    n = len(task_or_examples) if num is None else min(num, len(task_or_examples))
    examples = [task_or_examples[i] for i in range(n)]
  if not examples:
    raise ValueError("eval_batches got no examples")
  total = -(-len(examples) // batch_size) * batch_size
  padded = examples + [examples[0]] * (total - len(examples))
  ids = np.where(np.arange(total) < len(examples), np.arange(total), -1).astype(np.int32)
  out = []
  for start in range(0, total, batch_size):
    batch = _encode_rows(padded[start:start + batch_size], tokenizer=tokenizer,
                         max_prompt_len=max_prompt_len, max_response_len=max_response_len,
                         max_answer_len=max_answer_len, process_index=index,
                         process_count=count)
    batch["index"] = np.asarray(shard_rows(ids[start:start + batch_size], index, count), np.int32)
    batch["valid"] = batch["index"] >= 0
    out.append(batch)
  return out


def _warn_if_heldout_leaks(path: str, eval_path: str, train: Sequence[Mapping[str, str]],
                           heldout: Sequence[Mapping[str, str]]) -> int:
  """Warns when held-out prompts are also trained on (`data.eval_path` is, or overlaps, the
  training file): held-out accuracy would then measure memorisation. Returns the overlap."""
  seen = {r["prompt"] for r in train}
  overlap = sum(r["prompt"] in seen for r in heldout)
  if not overlap:
    return 0
  same = os.path.realpath(path) == os.path.realpath(eval_path)
  logging.warning(
      "data.eval_path %s %s: %d of its %d held-out prompts are also training prompts, so the "
      "held-out set leaks (held-out accuracy measures memorisation); give data.eval_path rows "
      "whose prompts are not in data.task, or leave it empty to hold out by prompt",
      eval_path, "is the training file" if same else f"overlaps the training file {path}",
      overlap, len(heldout))
  return overlap


def _split_key(row: Mapping[str, Any], prompt_key: str) -> str:
  """What the held-out hash reads: the prompt as the file gives it (a list of messages as JSON),
  so a row falls in the same split whatever `prompt_format` / `system_prompt` render it to."""
  value = row.get("fields", {}).get(prompt_key, row["prompt"])
  return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class JsonlData:
  """User data from JSONL files, used where a built-in task would be (`data.task=path.jsonl`).

  Held-out rows come from `eval_path` when given, else from a stable hash of each prompt as the
  file gives it (`heldout_fraction` of them; the same split under either prompt format), so train
  and held-out never share a prompt. The verifier compares
  the tokens after `answer_marker` in a completion with the row's `answer` (see
  `verifiers.make_answer_verifier`); the marker must be one token of the tokenizer. A row's answer
  holding the marker (a GSM8K solution) keeps only what follows its last marker (`final_answer`).
  `options` go to `load_jsonl` (the widths, `field_names`, `prompt_format`, `system_prompt`).
  """

  train_rows: tuple
  heldout_rows: tuple
  answer_marker: str = tasks.ANSWER_MARKER

  @classmethod
  def load(cls, path: str, *, tokenizer: tokenizers.Tokenizer, eval_path: str = "",
           heldout_fraction: float = 0.1, answer_marker: str = tasks.ANSWER_MARKER,
           strict: bool = False, require: Sequence[str] = ("prompt",),
           why: Mapping[str, str] | None = None, **options: Any) -> "JsonlData":
    rows, _ = load_jsonl(path, tokenizer=tokenizer, strict=strict, require=tuple(require),
                         why=why, answer_marker=answer_marker, **options)
    if eval_path:
      heldout, _ = load_jsonl(eval_path, tokenizer=tokenizer, strict=strict, require=tuple(require),
                              why=why, answer_marker=answer_marker, **options)
      train = rows
      _warn_if_heldout_leaks(path, eval_path, train, heldout)
    else:
      key = (options.get("field_names") or {}).get("prompt", "prompt")
      is_heldout = [tasks.stable_fraction(_split_key(r, key)) < heldout_fraction for r in rows]
      train = [r for r, h in zip(rows, is_heldout) if not h]
      heldout = [r for r, h in zip(rows, is_heldout) if h]
      if not train or not heldout:
        distinct = len({r["prompt"] for r in rows})
        raise DataError(
            f"{path}: {len(rows)} valid rows with {distinct} distinct prompt(s) cannot be split "
            f"{heldout_fraction:.0%} held-out (the split is by prompt, so rows with the same "
            "prompt stay together); use more distinct prompts or pass data.eval_path")
    return cls(tuple(train), tuple(heldout), answer_marker)

  @property
  def has_answers(self) -> bool:
    """Every row has an answer, so samples can be verified and held-out accuracy measured."""
    return all(r["answer"] for r in self.train_rows + self.heldout_rows)

  def source(self, split: str, seed: int = 0) -> list[dict[str, Any]]:
    del seed  # the rows are fixed; the iterator shuffles them
    return list(self.train_rows if split == "train" else self.heldout_rows)

  def make_verifier(self, tokenizer: tokenizers.Tokenizer):
    ids = tokenizer.encode(self.answer_marker)
    if len(ids) != 1:
      raise DataError(f"data.answer_marker {self.answer_marker!r} is {len(ids)} tokens in this "
                      "tokenizer; the verifier needs a single-token marker")
    return verifiers.make_answer_verifier(ids[0], tokenizer.eos_ids)
