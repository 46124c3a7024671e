"""Turning examples into tokens (data/encoding.py): a task's own SentencePiece tokenizer (single-
token symbols, cached by digest) and the fixed-width batches the round reads."""

import numpy as np
import pytest

from selfplay_jax.data import encoding as E
from selfplay_jax.data import tasks as T
from selfplay_jax.errors import EncodingError


def test_tokenizer_symbols_are_single_tokens_and_cached(task_and_tok, tmp_path):
  task, tok = task_and_tok
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  ids = [tok.piece_to_id(s) for s in task.symbols]
  assert None not in ids and len(set(ids)) == len(ids)
  for s in task.symbols:
    assert tok.encode(s) == [tok.piece_to_id(s)]
  for e in task.examples("heldout", 0, 50):
    full = tok.encode(e["response"])
    answer = tok.encode(e["answer"])
    assert full[-len(answer) - 1:] == [tok.piece_to_id("####")] + answer
    assert all(tok.id_to_piece(i) in task.answer_symbols for i in answer)
    assert tok.decode(tok.encode(e["prompt"] + e["response"])) == e["prompt"] + e["response"]
  again = E.build_tokenizer(task, tmp_path)
  assert again.path != tok.path and [again.id_to_piece(i) for i in range(again.vocab_size)] == \
      [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert E.build_tokenizer(task, tmp_path).path == again.path  # cache hit
  with pytest.raises(ValueError, match="single token"):
    E.check_tokenizer(T.SortTask(), E.build_tokenizer(T.ArithmeticTask(), tmp_path))


def test_encode_examples_layout_and_errors(task_and_tok):
  task, tok = task_and_tok
  examples = task.examples("train", 1, 8)
  b = E.encode_examples(examples, tok, 24, 96, 16)
  assert b["prompt_tokens"].shape == (8, 24) and b["response_tokens"].shape == (8, 96)
  assert b["answer_tokens"].shape == (8, 16)
  for i, e in enumerate(examples):
    p = b["prompt_tokens"][i][b["prompt_mask"][i]].tolist()
    r = b["response_tokens"][i][b["response_mask"][i]].tolist()
    a = b["answer_tokens"][i][b["answer_mask"][i]].tolist()
    assert b["prompt_mask"][i, -1] and b["response_mask"][i, 0] and b["answer_mask"][i, 0]
    assert p == [1] + tok.encode(e["prompt"]) and r == tok.encode(e["response"]) + [2]
    assert a == tok.encode(e["answer"])
  assert all(v.dtype == (bool if k.endswith("mask") else np.int32) for k, v in b.items())
  too_long = examples[:3] + [dict(examples[3], response=examples[3]["response"] + "0" * 100)]
  with pytest.raises(EncodingError, match=r"example 3: response has \d+ tokens.*max_response_len=96"):
    E.encode_examples(too_long, tok, 24, 96, 16)
  with pytest.raises(EncodingError, match=r"^data.max_prompt_len: example 0: prompt"):
    E.encode_examples(examples, tok, 2, 96, 16)
