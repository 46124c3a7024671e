"""Tests for selfplay_jax.tokenizers against the sentencepiece / tokenizers / transformers refs."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers as hf_tokenizers

from selfplay_jax.tokenizers import (HFTokenizer, SentencePieceTokenizer, check_vocab,
                                     load_tokenizer, train_sentencepiece)

ARITH = [f"{a}+{b}={a + b}" for a in range(0, 40, 3) for b in range(0, 40, 7)]
SP_TEXTS = ["12+34=46", "7+8=15", "0+0=0", "99+1=100<sep>", "3+4=7 and 5+5=10", " 1+1=2"]

HF_CORPUS = ["the cat sat on the mat", "the dog ate the cat food", "a cat and a dog",
             "dogs and cats are pets", "the mat is on the floor"]
HF_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<end_of_turn>"]
HF_TEXTS = ["the cat sat", "a dog on the mat", "cats and dogs", "the floor<end_of_turn>", ""]


# ---------------------------------------------------------------------------------------------
# SentencePiece backend


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("sp") / "arith")
  tok = train_sentencepiece(ARITH + ["3+4=7 and 5+5=10"], vocab_size=48, path_prefix=prefix,
                            user_defined_symbols=["<sep>"])
  return tok, prefix + ".model"


def test_sp_encode_matches_reference(sp_model):
  tok, path = sp_model
  ref = spm.SentencePieceProcessor(model_file=path)
  assert isinstance(tok, SentencePieceTokenizer)
  assert tok.vocab_size == ref.get_piece_size() <= 48
  for text in SP_TEXTS:
    assert tok.encode(text) == ref.encode(text), text
    assert tok.decode(tok.encode(text)) == text  # identity normalization: exact round trip


def test_sp_special_ids_and_add_bos_eos(sp_model):
  tok, path = sp_model
  ref = spm.SentencePieceProcessor(model_file=path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert (ref.pad_id(), ref.bos_id(), ref.eos_id(), ref.unk_id()) == (0, 1, 2, 3)
  assert tok.eos_ids == (2,)
  assert tok.piece_to_id("<sep>") == ref.piece_to_id("<sep>") == 4
  assert tok.id_to_piece(4) == "<sep>"
  assert tok.piece_to_id("<unk>") == 3 and tok.piece_to_id("no-such-piece") is None
  body = ref.encode("12+34=46")
  assert tok.encode("12+34=46", add_bos=True) == [1] + body
  assert tok.encode("12+34=46", add_eos=True) == body + [2]
  assert tok.encode("12+34=46", add_bos=True, add_eos=True) == [1] + body + [2]
  # decode: pad always stripped, specials only with skip_special, never stops at EOS.
  ids = np.array([0, 0, 1] + body + [2] + ref.encode("7+8=15") + [0], dtype=np.int32)
  assert tok.decode(ids) == "12+34=467+8=15"
  assert tok.decode(list(ids), skip_special=False) == "<s>12+34=46</s>7+8=15"


def test_sp_encode_batch_layout(sp_model):
  tok, path = sp_model
  ref = spm.SentencePieceProcessor(model_file=path)
  texts, max_len = ["12+34=46", "0+0=0", "99+1=100<sep>"], 16
  rows = [[ref.bos_id()] + ref.encode(t) for t in texts]
  for pad_left in (True, False):
    want_tok = np.full((3, max_len), ref.pad_id(), np.int32)
    want_mask = np.zeros((3, max_len), bool)
    for b, r in enumerate(rows):
      cols = range(max_len - len(r), max_len) if pad_left else range(len(r))
      for c, v in zip(cols, r):
        want_tok[b, c], want_mask[b, c] = v, True
    got_tok, got_mask = tok.encode_batch(texts, max_len, pad_left=pad_left)
    assert got_tok.dtype == np.int32 and got_mask.dtype == np.bool_
    np.testing.assert_array_equal(got_tok, want_tok)
    np.testing.assert_array_equal(got_mask, want_mask)
    assert [tok.decode(r) for r in got_tok] == texts
  no_bos, _ = tok.encode_batch(["1+1=2"], 8, add_bos=False, add_eos=True)
  assert no_bos[0].tolist() == [0] * (8 - len(ref.encode("1+1=2")) - 1) + ref.encode("1+1=2") + [2]


def test_sp_training_is_deterministic(tmp_path):
  a = train_sentencepiece(ARITH, 40, str(tmp_path / "m"), model_type="unigram")
  first = (tmp_path / "m.model").read_bytes()
  b = train_sentencepiece(iter(ARITH), 40, str(tmp_path / "m"), model_type="unigram")
  assert (tmp_path / "m.model").read_bytes() == first  # byte-identical retrain
  assert a.encode("12+34=46") == b.encode("12+34=46")
  # The model file records its prefix, so compare pieces across directories.
  other = train_sentencepiece(ARITH, 40, str(tmp_path / "b" / "m"), model_type="unigram")
  assert [other.id_to_piece(i) for i in range(other.vocab_size)] == \
      [a.id_to_piece(i) for i in range(a.vocab_size)]
  # Tiny corpus, large requested vocab: soft limit yields fewer pieces instead of failing.
  c = train_sentencepiece(["1+1=2", "2+2=4"], 1000, str(tmp_path / "c" / "m"))
  assert 4 + 5 <= c.vocab_size < 1000
  char = train_sentencepiece(["1+1=2", "2+2=4"], 1000, str(tmp_path / "d" / "m"),
                             model_type="char")
  assert [char.id_to_piece(i) for i in char.encode("12+4")] == ["1", "2", "+", "4"]
  with pytest.raises(ValueError, match="required_chars"):
    train_sentencepiece(ARITH, 6, str(tmp_path / "e" / "m"))


def test_sp_model_without_pad_trained_directly(tmp_path):
  prefix = str(tmp_path / "plain")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(ARITH), model_prefix=prefix,
                                 vocab_size=30, model_type="bpe", hard_vocab_limit=False,
                                 user_defined_symbols=["<end_of_turn>"], minloglevel=2)
  ref = spm.SentencePieceProcessor(model_file=prefix + ".model")
  tok = load_tokenizer(prefix + ".model")
  assert isinstance(tok, SentencePieceTokenizer)
  assert tok.pad_id is None and ref.pad_id() == -1
  assert (tok.bos_id, tok.eos_id) == (ref.bos_id(), ref.eos_id())
  eot = ref.piece_to_id("<end_of_turn>")
  assert tok.eos_ids == (ref.eos_id(), eot)  # end-of-turn piece picked up automatically
  for text in SP_TEXTS[:3]:
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
  toks, mask = tok.encode_batch(["1+2=3"], 10)
  assert toks[0, ~mask[0]].tolist() == [0] * int((~mask[0]).sum())  # pad falls back to 0
  over = load_tokenizer(prefix + ".model", pad=ref.unk_id(), extra_eos=[5])
  assert over.pad_id == ref.unk_id() and 5 in over.eos_ids


# ---------------------------------------------------------------------------------------------
# Hugging Face backend


def _build_hf_tokenizer() -> hf_tokenizers.Tokenizer:
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=330, special_tokens=HF_SPECIALS, show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(HF_CORPUS, trainer=trainer)
  bos = tok.token_to_id("<s>")
  tok.post_processor = hf_tokenizers.processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
  return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  _build_hf_tokenizer().save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
      "pad_token": "<pad>"}))
  return d


def test_hf_encode_matches_reference(hf_dir):
  tok = load_tokenizer(str(hf_dir))
  ref = hf_tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  assert isinstance(tok, HFTokenizer)
  assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
  bos = ref.token_to_id("<s>")
  assert ref.encode("the cat").ids[0] == bos  # the post-processor adds BOS ...
  for text in HF_TEXTS:
    want = ref.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == want, text  # ... but encode() does not
    assert tok.encode(text, add_bos=True) == [bos] + want  # and add_bos adds it once
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == \
        ref.decode(want, skip_special_tokens=True)
  assert tok.decode(tok.encode("the cat sat")) == "the cat sat"


def test_hf_matches_transformers(hf_dir):
  transformers = pytest.importorskip("transformers")
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
  tok = load_tokenizer(hf_dir / "tokenizer.json")
  for text in HF_TEXTS:
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False), text
    assert tok.encode(text, add_bos=True) == fast.encode(text), text  # template adds BOS
  ids = tok.encode("a dog on the mat", add_bos=True, add_eos=True)
  assert tok.decode(ids, skip_special=False) == fast.decode(ids, skip_special_tokens=False)


def test_hf_special_tokens_from_configs(hf_dir, tmp_path):
  ref = hf_tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  tid = ref.token_to_id
  tok = load_tokenizer(hf_dir)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tid("<s>"), tid("</s>"), tid("<pad>"))
  assert tok.eos_ids == (tid("</s>"), tid("<end_of_turn>"))
  assert tok.id_to_piece(tok.eos_id) == "</s>" and tok.piece_to_id("nope") is None

  # encode_batch pads with <pad> on the left; decode strips pad and specials.
  toks, mask = tok.encode_batch(["the cat", "a dog on the mat"], 12)
  for row, m, text in zip(toks, mask, ["the cat", "a dog on the mat"]):
    want = [tid("<s>")] + ref.encode(text, add_special_tokens=False).ids
    assert row.tolist() == [tid("<pad>")] * (12 - len(want)) + want
    assert m.tolist() == [False] * (12 - len(want)) + [True] * len(want)
    assert tok.decode(row) == text

  # No tokenizer_config: ids from special_tokens_map + generation_config / config.json.
  d = tmp_path / "gen"
  d.mkdir()
  shutil.copy(hf_dir / "tokenizer.json", d / "tokenizer.json")
  (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}}))
  (d / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": tid("<s>"), "eos_token_id": [tid("</s>"), tid("<unk>")]}))
  (d / "config.json").write_text(json.dumps({"eos_token_id": tid("<end_of_turn>")}))
  tok2 = load_tokenizer(d)
  assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tid("<s>"), tid("</s>"), tid("<pad>"))
  assert tok2.eos_ids == (tid("</s>"), tid("<unk>"), tid("<end_of_turn>"))

  # No configs at all: nothing guessed, explicit overrides (strings or ids) win.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(hf_dir / "tokenizer.json", bare / "tokenizer.json")
  tok3 = load_tokenizer(bare / "tokenizer.json")
  assert (tok3.bos_id, tok3.eos_id, tok3.pad_id) == (None, None, None)
  assert tok3.encode("the cat", add_bos=True) == ref.encode("the cat", add_special_tokens=False).ids
  with pytest.raises(ValueError, match="no EOS"):
    tok3.encode("the cat", add_eos=True)
  tok4 = load_tokenizer(bare, bos="<s>", eos=tid("</s>"), pad="<pad>")
  assert (tok4.bos_id, tok4.eos_id, tok4.pad_id) == (tid("<s>"), tid("</s>"), tid("<pad>"))
  with pytest.raises(ValueError, match="not in the vocabulary"):
    load_tokenizer(bare, eos="<nonexistent>")


def test_directory_prefers_tokenizer_json(hf_dir, sp_model, tmp_path):
  shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  shutil.copy(sp_model[1], tmp_path / "tokenizer.model")
  assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
  os.remove(tmp_path / "tokenizer.json")
  assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_and_corrupt_files(tmp_path):
  missing = tmp_path / "nowhere" / "tokenizer.model"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    load_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match="tokenizer.json and tokenizer.model"):
    load_tokenizer(tmp_path)
  bad_model = tmp_path / "bad.model"
  bad_model.write_bytes(b"not a protobuf")
  with pytest.raises(ValueError, match="bad.model"):
    load_tokenizer(bad_model)
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    load_tokenizer(tmp_path)


def test_corrupt_config_names_file(hf_dir, tmp_path):
  shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text("{oops")
  with pytest.raises(ValueError, match="tokenizer_config.json"):
    load_tokenizer(tmp_path)


def test_check_vocab(sp_model):
  tok = sp_model[0]
  check_vocab(tok, tok.vocab_size)
  check_vocab(tok, 256)  # padded embedding rows are fine
  with pytest.raises(ValueError, match=rf"{tok.vocab_size}.*{tok.vocab_size - 1}.*more ids"):
    check_vocab(tok, tok.vocab_size - 1)


def test_encode_batch_and_decode_errors(sp_model):
  tok = sp_model[0]
  with pytest.raises(ValueError, match="row 1 "):
    tok.encode_batch(["1+1=2", "123456+654321=777777", "1"], max_len=6)
  with pytest.raises(TypeError):
    tok.encode_batch("1+1=2", max_len=6)
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match="1-D"):
    tok.decode(np.zeros((2, 2), np.int32))
  empty_tok, empty_mask = tok.encode_batch([], 4)
  assert empty_tok.shape == empty_mask.shape == (0, 4)


def test_lenient_decode_marks_ids_past_the_vocabulary(sp_model, hf_dir):
  """strict=False (sample logs, `generate`): ids a padded or larger model embedding can sample
  are written as <id N> between the decoded runs around them; in-range ids decode as before."""
  for tok in (sp_model[0], load_tokenizer(hf_dir)):
    ids = tok.encode("the cat sat" if tok is not sp_model[0] else "3+4=7", add_bos=False)
    v = tok.vocab_size
    assert tok.decode(ids, strict=False) == tok.decode(ids)
    mixed = ids[:2] + [v, v + 5] + ids[2:]
    assert tok.decode(mixed, strict=False) == \
        f"{tok.decode(ids[:2])}<id {v}><id {v + 5}>{tok.decode(ids[2:])}"
    assert tok.decode([v + 1], strict=False) == f"<id {v + 1}>"
    with pytest.raises(ValueError, match=f"token id {v} is out of range"):
      tok.decode(mixed)


def test_sample_log_shows_ids_past_the_tokenizer(sp_model, tmp_path):
  """A run's samples.jsonl: a completion with an id the tokenizer lacks (a model exported with
  extra judge symbols, loaded with the task's own tokenizer) is logged, not a crash mid-run."""
  import json as json_lib
  from selfplay_jax import train
  tok = sp_model[0]
  ids = tok.encode("3+4=7", add_bos=False)
  comp = np.asarray([ids + [tok.vocab_size] + [tok.eos_id]])
  samples = {"samples/tokens": comp, "samples/lengths": np.asarray([comp.shape[1]]),
             "samples/prompt_tokens": np.asarray([ids]),
             "samples/prompt_mask": np.ones((1, len(ids)), bool),
             "samples/rewards": np.asarray([0.0])}
  train._write_samples(tmp_path / "s.jsonl", tok, samples)
  row = json_lib.loads((tmp_path / "s.jsonl").read_text())
  assert row["completion"] == f"3+4=7<id {tok.vocab_size}>" and row["prompt"] == "3+4=7"


def test_reward_functions_read_ids_past_the_tokenizer_as_text(sp_model):
  """Python rewards and the math check read a completion with an id the tokenizer lacks as text
  with `<id N>` in it (so it scores wrong), instead of stopping the round."""
  from selfplay_jax.scoring import python_rewards
  tok = sp_model[0]
  ids = tok.encode("3+4=7", add_bos=False)
  text = python_rewards.completion_text(tok, ids + [tok.vocab_size, tok.eos_id, 5])
  assert text == f"3+4=7<id {tok.vocab_size}>"
