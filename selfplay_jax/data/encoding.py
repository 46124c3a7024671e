"""Turning examples into tokens: a task's own SentencePiece tokenizer, and fixed-width batches.

  tok = build_tokenizer(task, workdir)                    # cached <workdir>/<name>-<digest>.model
  batch = encode_examples(examples, tok, max_prompt_len=16, max_response_len=48, max_answer_len=8)
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np

from selfplay_jax import tokenizers
from selfplay_jax.errors import EncodingError

Example = Mapping[str, Any]  # "prompt", "response", "answer" (str); optional others


# ---- tokenizer -------------------------------------------------------------------------------


def check_tokenizer(task: Any, tokenizer: tokenizers.Tokenizer) -> None:
  """Raises ValueError unless every task symbol (digits, marker, ...) is exactly one token."""
  for s in task.symbols:
    if tokenizer.piece_to_id(s) is None or len(tokenizer.encode(s)) != 1:
      raise ValueError(f"tokenizer {tokenizer!r} does not encode {s!r} as a single token; build "
                       f"it with build_tokenizer({task!r}, ...)")
  if tokenizer.eos_id is None:
    raise ValueError(f"tokenizer {tokenizer!r} has no EOS token; task responses end with EOS")


def build_tokenizer(task: Any, path: str | os.PathLike, vocab_size: int = 64,
                    extra_symbols: Sequence[str] = ()) -> tokenizers.SentencePieceTokenizer:
  """Trains (or loads from cache) the task's tiny SentencePiece tokenizer; no downloads.

  `path` is a `.model` file, or a directory that gets `<task.name>-<digest>.model`, the digest
  covering the corpus, symbols and vocab size (so different tasks never share a cached file).
  `extra_symbols` become single tokens too (e.g. the judge template's `scoring.judge.JUDGE_SYMBOLS`).
  Training is deterministic and written atomically (safe with concurrent processes).
  """
  path = os.fspath(path)
  corpus = task.corpus()
  symbols = tuple(task.symbols) + tuple(s for s in extra_symbols if s not in task.symbols)
  if not path.endswith(".model"):
    blob = "\n".join([str(vocab_size), *symbols, *corpus]).encode("utf-8")
    digest = hashlib.blake2b(blob, digest_size=6).hexdigest()
    path = os.path.join(path, f"{task.name}-{digest}.model")
  if not os.path.isfile(path):
    tmp = f"{path[:-len('.model')]}.tmp{os.getpid()}"
    tokenizers.train_sentencepiece(corpus, vocab_size, tmp, user_defined_symbols=symbols)
    os.replace(tmp + ".model", path)
    os.replace(tmp + ".vocab", path[:-len(".model")] + ".vocab")
  tok = tokenizers.SentencePieceTokenizer(path)
  check_tokenizer(task, tok)
  return tok


# ---- batching --------------------------------------------------------------------------------

# An example whose `prompt` is a rendered chat template carries CHAT_KEY=True: its prompt is
# encoded as is, with no BOS added (the template writes its own, as transformers encodes a rendered
# chat with add_special_tokens=False).
CHAT_KEY = "chat"


def prompt_ids(tokenizer: tokenizers.Tokenizer, example: Mapping[str, Any]) -> list[int]:
  """The prompt's ids as the model sees them: BOS + prompt, or a rendered chat prompt as is."""
  return tokenizer.encode(example["prompt"], add_bos=not example.get(CHAT_KEY, False))



def _pad(rows: list[list[int]], width: int, left: bool, pad_id: int, what: str,
         width_name: str) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    if len(row) > width:
      raise EncodingError(f"data.{width_name}: example {i}: {what} has {len(row)} tokens, more "
                          f"than {width_name}={width}")
    sl = slice(width - len(row), width) if left else slice(0, len(row))
    tokens[i, sl], mask[i, sl] = row, True
  return tokens, mask


def encode_examples(examples: Sequence[Example], tokenizer: tokenizers.Tokenizer,
                    max_prompt_len: int, max_response_len: int,
                    max_answer_len: int) -> dict[str, np.ndarray]:
  """Tokenizes examples into fixed-width numpy arrays.

  Returns `prompt_tokens` [B, P] (BOS + prompt, left-padded; `prompt_ids`), `response_tokens` [B, R] (response
  + EOS, right-padded), `answer_tokens` [B, A] (answer, right-padded), each int32, plus the bool
  `*_mask` of each; when every example has `chosen` and `rejected`, also `chosen_tokens` and
  `rejected_tokens` [B, R] (like responses). Raises ValueError naming the example index when a row
  does not fit. Other keys of an example (e.g. the JSONL row's `fields`) are ignored.
  """
  if tokenizer.eos_id is None:
    raise ValueError("encode_examples needs a tokenizer with an EOS token")
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  fields = (("prompt", dict(add_bos=True), max_prompt_len, True, "max_prompt_len"),
            ("response", dict(add_eos=True), max_response_len, False, "max_response_len"),
            ("answer", {}, max_answer_len, False, "max_answer_len"))
  if examples and all("chosen" in e and "rejected" in e for e in examples):
    fields += tuple((f, dict(add_eos=True), max_response_len, False, "max_response_len")
                    for f in ("chosen", "rejected"))
  out = {}
  for field, kw, width, left, width_name in fields:
    rows = [prompt_ids(tokenizer, e) if field == "prompt" else tokenizer.encode(e[field], **kw)
            for e in examples]
    out[f"{field}_tokens"], out[f"{field}_mask"] = _pad(rows, width, left, pad, field, width_name)
  return out
