"""Data pipeline: JSONL validation, checkpointable grain iterators, sharding, eval batches."""

import json
import logging
import string

import numpy as np
import pytest

from selfplay_jax import tokenizers
from selfplay_jax.data import pipeline as P
from selfplay_jax.data import tasks as T

LENS = dict(max_prompt_len=8, max_response_len=6, max_answer_len=3)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
  """One token per character: token counts are string lengths."""
  corpus = [string.ascii_letters + string.digits + " +=,#{}[]\":.-"]
  return tokenizers.train_sentencepiece(corpus, 200, tmp_path_factory.mktemp("tok") / "char",
                                        model_type="char")


@pytest.fixture(scope="module")
def arith():
  return T.get_task("arithmetic", num_digits=2)


@pytest.fixture(scope="module")
def arith_tok(arith, tmp_path_factory):
  return T.build_tokenizer(arith, tmp_path_factory.mktemp("arith"))


def _line(obj) -> bytes:
  return json.dumps(obj).encode() + b"\n"


# (raw line, expected reason or None for a valid row); line numbers are 1-based positions.
ROWS = [
    (_line({"prompt": "abc", "response": "def", "answer": "42", "id": 7}), None),
    (_line({"prompt": "xy", "answer": 7}), None),
    (b'{"prompt": "a"\n', "invalid_json"),
    (_line([1, 2]), "not_object"),
    (_line({"response": "r"}), "missing_field"),
    (_line({"prompt": 5}), "wrong_type"),
    (_line({"prompt": None}), "wrong_type"),
    (_line({"prompt": ["a"]}), "wrong_type"),
    (_line({"prompt": "   "}), "empty_prompt"),
    (_line({"prompt": "abcdefg"}), None),  # 7 chars + BOS = max_prompt_len
    (_line({"prompt": "abcdefgh"}), "prompt_too_long"),
    (_line({"prompt": "p", "response": "abcdef"}), "response_too_long"),  # 6 + EOS > 6
    (_line({"prompt": "p", "answer": "1234"}), "answer_too_long"),
    (b'{"prompt": "\xff\xfeab"}\n', "invalid_utf8"),
    (b'{"prompt": "' + b"a" * (P.MAX_LINE_BYTES + 10) + b'"}\n', "line_too_long"),
    (b"   \n", None),  # blank: ignored, not a row
    (_line({"prompt": "p", "chosen": "good", "rejected": "bad", "response": None}), None),
    (_line({"prompt": "p", "answer": [1]}), "wrong_type"),
    (_line({"prompt": "p", "answer": True}), "wrong_type"),
    (_line({"prompt": "p", "response": 3}), "wrong_type"),
    (_line({"prompt": "p", "chosen": "abcdefg"}), "chosen_too_long"),
    (b'{"prompt": "crlf", "answer": 2.0}\r\n', None),
]
VALID = [
    {"prompt": "abc", "response": "def", "answer": "42"},
    {"prompt": "xy", "response": "", "answer": "7"},
    {"prompt": "abcdefg", "response": "", "answer": ""},
    {"prompt": "p", "response": "", "answer": "", "chosen": "good", "rejected": "bad"},
    {"prompt": "crlf", "response": "", "answer": "2"},
]


def _known(rows):
  """The rows without `fields` (each row's JSON object, checked in the first test)."""
  return [{k: v for k, v in r.items() if k != "fields"} for r in rows]


def _write(path, lines):
  path.write_bytes(b"".join(lines))
  return path


# ---- JSONL -----------------------------------------------------------------------------------


def test_load_jsonl_skips_and_reports_bad_rows(tmp_path, char_tok, caplog):
  path = _write(tmp_path / "data.jsonl", [raw for raw, _ in ROWS])
  with caplog.at_level(logging.INFO):
    rows, report = P.load_jsonl(path, tokenizer=char_tok, **LENS)
  assert _known(rows) == VALID
  # Each kept row also holds its JSON object unchanged, every key (e.g. "id") included.
  assert [r["fields"] for r in rows] == [json.loads(raw) for raw, reason in ROWS
                                         if reason is None and raw.strip()]
  bad = [(i + 1, r) for i, (_, r) in enumerate(ROWS) if r is not None]
  counts = {}
  for _, r in bad:
    counts[r] = counts.get(r, 0) + 1
  assert report.counts == counts and set(counts) <= set(P.REASONS)
  assert report.examples == bad[:P.MAX_REPORT_EXAMPLES]
  assert (report.num_valid, report.num_skipped, report.num_rows) == (5, len(bad), len(ROWS) - 1)
  logged = [r.getMessage() for r in caplog.records if "load_jsonl" in r.getMessage()]
  assert len(logged) == 1 and str(path) in logged[0] and "line_too_long=1" in logged[0]
  # Valid rows encode.
  batch = T.encode_examples(rows, char_tok, **LENS)
  assert batch["prompt_tokens"].shape == (5, 8) and batch["answer_mask"].sum() == 2 + 1 + 1


def test_load_jsonl_strict_names_line_and_reason(tmp_path, char_tok):
  path = _write(tmp_path / "data.jsonl", [raw for raw, _ in ROWS])
  with pytest.raises(P.DataError, match=r"data\.jsonl line 3: invalid_json"):
    P.load_jsonl(path, tokenizer=char_tok, strict=True, **LENS)
  path = _write(tmp_path / "utf.jsonl", [ROWS[0][0], ROWS[13][0]])
  with pytest.raises(P.DataError, match=r"utf\.jsonl line 2: invalid_utf8"):
    P.load_jsonl(path, tokenizer=char_tok, strict=True, **LENS)
  path = _write(tmp_path / "ok.jsonl", [ROWS[0][0], ROWS[1][0]])
  rows, report = P.load_jsonl(path, tokenizer=char_tok, strict=True, **LENS)
  assert _known(rows) == VALID[:2] and report.counts == {}


def test_load_jsonl_require_and_errors(tmp_path, char_tok):
  path = _write(tmp_path / "req.jsonl", [ROWS[0][0], ROWS[1][0]])
  rows, report = P.load_jsonl(path, tokenizer=char_tok, require=("prompt", "response"), **LENS)
  assert _known(rows) == VALID[:1] and report.examples == [(2, "missing_field")]
  with pytest.raises(ValueError, match="require"):
    P.load_jsonl(path, tokenizer=char_tok, require=("question",), **LENS)
  bad = _write(tmp_path / "allbad.jsonl", [ROWS[2][0], ROWS[3][0]])
  with pytest.raises(P.DataError, match=r"allbad\.jsonl.*invalid_json=1.*not_object=1"):
    P.load_jsonl(bad, tokenizer=char_tok, **LENS)
  with pytest.raises(P.DataError, match="empty.jsonl"):
    P.load_jsonl(_write(tmp_path / "empty.jsonl", []), tokenizer=char_tok, **LENS)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    P.load_jsonl(tmp_path / "nope.jsonl", tokenizer=char_tok, **LENS)


def test_jsonl_summary_names_missing_fields_and_too_long_limits(tmp_path, char_tok, caplog):
  path = _write(tmp_path / "d.jsonl", [
      _line({"prompt": "ab"}), _line({"prompt": "abcdefgh", "response": "b"}),
      _line({"prompt": "abcdefghijk", "response": "b"}), _line({"answer": "1"}),
      _line({"prompt": "a", "response": "b"})])
  with caplog.at_level(logging.WARNING):
    rows, report = P.load_jsonl(path, tokenizer=char_tok, require=("response",),
                                why={"response": "the warm-up trains on them"}, **LENS)
  assert len(rows) == 1 and report.missing == {"response": 1, "prompt": 1}
  summary = report.summary()
  assert ("missing_field=2 (no 'prompt' field in 1 row(s); no 'response' field in 1 row(s): the "
          "warm-up trains on them)") in summary
  assert "prompt_too_long=2 (longest 12 tokens with BOS > data.max_prompt_len=8)" in summary
  with pytest.raises(P.DataError, match=r"line 1: missing_field \(no 'response' field; the warm-up"):
    P.load_jsonl(path, tokenizer=char_tok, require=("response",), strict=True,
                 why={"response": "the warm-up trains on them"}, **LENS)
  with pytest.raises(IsADirectoryError, match="is a directory"):
    P.load_jsonl(tmp_path, tokenizer=char_tok, **LENS)


def test_eval_path_overlapping_the_training_file_warns_with_the_count(tmp_path, char_tok, caplog):
  train = _write(tmp_path / "train.jsonl", [_line({"prompt": f"p{i}"}) for i in range(20)])
  held = _write(tmp_path / "held.jsonl", [_line({"prompt": f"p{i}"}) for i in range(16, 26)])
  with caplog.at_level(logging.WARNING):
    P.JsonlData.load(str(train), tokenizer=char_tok, eval_path=str(held), **LENS)
  [warning] = [r.getMessage() for r in caplog.records if "leaks" in r.getMessage()]
  assert f"overlaps the training file {train}: 4 of its 10 held-out prompts" in warning
  caplog.clear()
  apart = _write(tmp_path / "apart.jsonl", [_line({"prompt": f"q{i}"}) for i in range(10)])
  with caplog.at_level(logging.WARNING):
    P.JsonlData.load(str(train), tokenizer=char_tok, eval_path=str(apart), **LENS)
  assert not [r for r in caplog.records if "leaks" in r.getMessage()]


def test_load_jsonl_utf8_bom_and_unicode(tmp_path, char_tok):
  path = _write(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + _line({"prompt": "ab"}),
                                         '{"prompt": "é"}\n'.encode()])
  rows, _ = P.load_jsonl(path, tokenizer=char_tok, **LENS)
  assert [r["prompt"] for r in rows] == ["ab", "é"]


# ---- iterator --------------------------------------------------------------------------------

ARITH_LENS = dict(max_prompt_len=8, max_response_len=8, max_answer_len=4)


def _it(source, tok, **kw):
  args = dict(tokenizer=tok, batch_size=4, seed=0, **ARITH_LENS)
  args.update(kw)
  return P.make_iterator(source, **args)


def _prompts(tok, batch):
  return [tok.decode(t[m]) for t, m in zip(batch["prompt_tokens"], batch["prompt_mask"])]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_iterator_shapes_and_seed(arith, arith_tok):
  source = arith.source("train", seed=0)
  batch = next(_it(source, arith_tok))
  for k, width in (("prompt", 8), ("response", 8), ("answer", 4)):
    assert batch[f"{k}_tokens"].shape == (4, width) and batch[f"{k}_tokens"].dtype == np.int32
    assert batch[f"{k}_mask"].shape == (4, width) and batch[f"{k}_mask"].dtype == bool
  assert batch["prompt_mask"][:, -1].all()  # left-padded
  a, b = _take(_it(source, arith_tok), 3), _take(_it(source, arith_tok), 3)
  c = _take(_it(source, arith_tok, seed=1), 3)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
  assert [_prompts(arith_tok, x) for x in a] != [_prompts(arith_tok, x) for x in c]
  plain = next(_it(source, arith_tok, shuffle=False))
  assert _prompts(arith_tok, plain) == [source[i]["prompt"] for i in range(4)]


def test_iterator_epochs_reshuffle(arith, arith_tok):
  examples = arith.examples("train", seed=0, num=8)
  batches = list(_it(examples, arith_tok, batch_size=8, num_epochs=3))
  assert len(batches) == 3
  orders = [_prompts(arith_tok, b) for b in batches]
  assert all(sorted(o) == sorted(e["prompt"] for e in examples) for o in orders)
  assert len({tuple(o) for o in orders}) == 3
  assert len(list(_it(examples, arith_tok, batch_size=3, num_epochs=1))) == 2  # remainder dropped


def test_row_index_names_each_rows_source_row_in_every_epoch(arith, arith_tok):
  """`row_index` (how reward functions find a row's fields) stays an index into the source after
  the first epoch, where grain's own running index goes past its length."""
  examples = arith.examples("train", seed=0, num=6)
  batches = list(_it(examples, arith_tok, batch_size=4, num_epochs=3))
  assert len(batches) == 4
  for b in batches:
    assert b["row_index"].dtype == np.int32
    assert _prompts(arith_tok, b) == [examples[i]["prompt"] for i in b["row_index"]]


def test_iterator_state_round_trip(arith, arith_tok):
  source = arith.source("train", seed=0)
  it = _it(source, arith_tok)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  fresh = _it(source, arith_tok)
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 2)):
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)


# ---- sharding --------------------------------------------------------------------------------


def test_shard_rows_and_batch_size():
  rows = list(range(8))
  shards = [P.shard_rows(rows, i, 4) for i in range(4)]
  assert shards == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert P.shard_rows(rows, 0, 1) == rows
  assert P.local_batch_size(8, 2) == 4
  with pytest.raises(ValueError, match="not divisible"):
    P.local_batch_size(8, 3)
  with pytest.raises(ValueError, match="process_index"):
    P.process_shard(2, 2)
  assert P.process_shard() == (0, 1)


def test_iterator_process_shards_partition_global_batch(arith, arith_tok):
  source = arith.source("train", seed=0)
  full = _take(_it(source, arith_tok), 2)
  parts = [_take(_it(source, arith_tok, process_index=i, process_count=2), 2) for i in range(2)]
  for step in range(2):
    for k in full[step]:
      assert parts[0][step][k].shape[0] == 2
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][k], parts[1][step][k]]), full[step][k])
  with pytest.raises(ValueError, match="not divisible"):
    _it(source, arith_tok, process_index=0, process_count=3)


# ---- eval ------------------------------------------------------------------------------------


def test_eval_batches(arith, arith_tok):
  kw = dict(tokenizer=arith_tok, batch_size=4, **ARITH_LENS)
  batches = P.eval_batches(arith, "heldout", 10, **kw)
  assert len(batches) == 3 and batches[-1]["valid"].tolist() == [True, True, False, False]
  assert sum(int(b["valid"].sum()) for b in batches) == 10
  ids = np.concatenate([b["index"] for b in batches])
  assert ids.tolist() == list(range(10)) + [-1, -1]
  want = [e["prompt"] for e in arith.examples("heldout", seed=0, num=10)]
  got = [p for b in batches for p, v in zip(_prompts(arith_tok, b), b["valid"]) if v]
  assert got == want
  again = P.eval_batches(arith.examples("heldout", seed=0, num=10), num=None, **kw)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, again) for k in x)
  halves = [P.eval_batches(arith, "heldout", 10, process_index=i, process_count=2, **kw)
            for i in range(2)]
  merged = np.concatenate([np.concatenate([h0["index"], h1["index"]])
                           for h0, h1 in zip(*halves)])
  assert merged.tolist() == ids.tolist()


# ---- fuzzing: every row is kept or skipped with a reason; strict mode names the same line ------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
                     st.text(alphabet="abc 12", min_size=1, max_size=9))
_JSON = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=4), c, max_size=3), max_leaves=6)
_OBJECTS = st.dictionaries(st.sampled_from(P.FIELDS + ("id", "meta")), _JSON, max_size=5)
_LINES = st.one_of(
    _OBJECTS.map(lambda o: json.dumps(o).encode()),
    _JSON.map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.just(b'{"prompt": "' + b"a" * (P.MAX_LINE_BYTES + 1) + b'"}'),
    st.just(b""), st.just(b"\xef\xbb\xbf{\"prompt\": \"ab\"}"))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINES, min_size=1, max_size=6))
def test_fuzzed_rows_are_kept_or_skipped_with_a_reason(tmp_path, char_tok, lines):
  path = tmp_path / "fuzz.jsonl"
  path.write_bytes(b"".join(l + b"\n" for l in lines))
  try:
    rows, report = P.load_jsonl(path, tokenizer=char_tok, **LENS)
  except P.DataError as e:  # nothing valid: one error naming the file and the reasons
    assert str(path) in str(e) and "\n" not in str(e)
    rows, report = [], None
  if report is not None:
    assert report.num_valid == len(rows) == report.num_rows - report.num_skipped
    assert set(report.counts) <= set(P.REASONS)
    for row in rows:
      assert isinstance(row["prompt"], str) and row["prompt"].strip()
      assert all(isinstance(v, str) for k, v in row.items() if k != "fields")
      assert isinstance(row["fields"], dict)
  # Strict mode stops at the first line that lenient mode skipped, and names it.
  first_bad = report.examples[0][0] if report is not None and report.examples else None
  try:
    P.load_jsonl(path, tokenizer=char_tok, strict=True, **LENS)
  except P.DataError as e:
    if first_bad is not None:
      assert f"line {first_bad}: {report.examples[0][1]}" in str(e)
    else:
      assert report is None
  else:
    assert first_bad is None
