"""Tokenizers: one small interface over SentencePiece and Hugging Face `tokenizer.json` files.

Everything downstream (data pipelines, samplers, reward functions) sees only `Tokenizer`:

  tok = load_tokenizer("/ckpt/gemma-2b")          # dir, tokenizer.json or *.model
  check_vocab(tok, model_cfg.vocab_size)
  tokens, mask = tok.encode_batch(prompts, max_len=256)   # left-padded int32 / bool

Conventions:
  * `encode` never adds special tokens unless asked (`add_bos` / `add_eos`), whatever the
    underlying post-processor would do, so BOS is never doubled.
  * A special token written in the text (`<s>`, `<|im_start|>`) encodes as its id, for both
    backends (as transformers does), so a rendered chat template tokenizes as transformers'.
  * `chat_template` is the tokenizer's own chat template (None without one) and `render_chat`
    renders messages with it as transformers does (`chat.render`); the rendered text holds the
    template's own BOS, so it is encoded with `add_bos=False`.
  * `decode` never stops at EOS; it always drops pad ids, and with `skip_special=True` (default)
    also drops BOS / EOS / other control tokens.
  * `eos_ids` lists every id that should end generation (EOS plus end-of-turn tokens such as
    `<end_of_turn>`, `<|im_end|>`, `<|eot_id|>` when present in the vocabulary).
  * `train_sentencepiece` models use pad=0, bos=1, eos=2, unk=3.

This module imports nothing else from `selfplay_jax` but `chat` (templates).
"""

from __future__ import annotations

import abc
import itertools
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from selfplay_jax import chat
from selfplay_jax.errors import TokenizerError  # noqa: F401 (re-exported)

__all__ = ["TokenizerError", "Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer",
           "check_vocab", "train_sentencepiece", "END_OF_TURN_PIECES", "SP_PAD_ID", "SP_BOS_ID",
           "SP_EOS_ID", "SP_UNK_ID"]


# Special-id convention of `train_sentencepiece`.
SP_PAD_ID, SP_BOS_ID, SP_EOS_ID, SP_UNK_ID = 0, 1, 2, 3

# Pieces that end a chat turn; any found in a vocabulary is appended to `eos_ids`.
END_OF_TURN_PIECES = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


class Tokenizer(abc.ABC):
  """Backend-independent tokenizer. Subclasses implement `_encode`, `_decode` and piece lookup.

  Attributes:
    vocab_size: number of ids (max id + 1); may be less than the model's embedding rows.
    bos_id, eos_id, pad_id: special ids, or None when the tokenizer has none.
    eos_ids: every id that ends generation (contains `eos_id` first when it is set).
  """

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  eos_ids: tuple[int, ...]
  chat_template: str | None = None  # the tokenizer's own chat template (`chat.find_template`)
  special_tokens: dict[str, str] = {}  # named special tokens as strings, for the template

  # ---- backend hooks -------------------------------------------------------------------------

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text` with no special tokens added."""

  @abc.abstractmethod
  def _decode(self, ids: list[int], skip_special: bool) -> str:
    """Text of `ids` (already stripped of pad / specials as requested)."""

  @abc.abstractmethod
  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary string of `token_id`; raises ValueError when out of range."""

  @abc.abstractmethod
  def piece_to_id(self, piece: str) -> int | None:
    """The id of vocabulary string `piece`, or None when it is not in the vocabulary."""

  @abc.abstractmethod
  def _special_ids(self) -> frozenset[int]:
    """Control / special ids that `decode(skip_special=True)` drops."""

  # ---- public API ----------------------------------------------------------------------------

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Tokenizes one string.

    Args:
      text: the string.
      add_bos: prepend `bos_id`. A no-op when the tokenizer has no BOS (e.g. Qwen).
      add_eos: append `eos_id`; raises ValueError when the tokenizer has no EOS.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._encode(text)
    if add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if add_eos:
      if self.eos_id is None:
        raise TokenizerError("add_eos=True but the tokenizer has no EOS token; pass eos=...")
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True,
             strict: bool = True) -> str:
    """Detokenizes a 1-D sequence of ids (list, numpy or jax array).

    Pad ids are always dropped (unless pad doubles as an EOS id and `skip_special=False`).
    With `skip_special`, BOS / EOS / end-of-turn and other control ids are dropped too.
    Decoding does not stop at EOS: truncate first if that is wanted. An id outside the
    vocabulary raises TokenizerError, or with `strict=False` is written as `<id N>`: what a model
    whose embedding has more rows than the tokenizer has ids (padded, or trained with extra
    symbols) may sample, shown instead of stopping the program that logs it.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
      raise TokenizerError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
    id_list = [int(i) for i in arr.tolist()]
    drop: set[int] = set()
    if self.pad_id is not None and (skip_special or self.pad_id not in self.eos_ids):
      drop.add(self.pad_id)
    if skip_special:
      drop |= self._special_ids() | set(self.eos_ids)
      if self.bos_id is not None:
        drop.add(self.bos_id)
    id_list = [i for i in id_list if i not in drop]
    outside = lambda i: not 0 <= i < self.vocab_size
    bad = next((i for i in id_list if outside(i)), None)
    if bad is None:
      return self._decode(id_list, skip_special)
    if strict:
      raise TokenizerError(f"token id {bad} is out of range for vocab_size {self.vocab_size}")
    # runs of in-vocabulary ids decoded as usual, each id outside written as <id N>
    return "".join("".join(f"<id {i}>" for i in run) if out
                   else self._decode(list(run), skip_special)
                   for out, run in itertools.groupby(id_list, key=outside))

  def encode_batch(self, texts: Sequence[str], max_len: int, add_bos: bool = True,
                   add_eos: bool = False, pad_left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes and pads a batch to a fixed width.

    Args:
      texts: B strings.
      max_len: output width; a row longer than this raises ValueError naming its index.
      add_bos: prepend BOS to every row (default True: batches are usually model prompts).
      add_eos: append EOS to every row.
      pad_left: left-pad (default; what autoregressive sampling wants) or right-pad.

    Returns:
      tokens: int32 [B, max_len], padding filled with `pad_id` (0 when there is none).
      mask: bool [B, max_len], True on real tokens.
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch expects a sequence of strings, got a single str")
    if max_len < 1:
      raise TokenizerError(f"max_len must be positive, got {max_len}")
    rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
    tokens = np.full((len(rows), max_len), self.pad_id if self.pad_id is not None else 0,
                     dtype=np.int32)
    mask = np.zeros((len(rows), max_len), dtype=bool)
    for b, row in enumerate(rows):
      n = len(row)
      if n > max_len:
        raise TokenizerError(f"row {b} has {n} tokens, more than max_len={max_len}: "
                         f"{texts[b][:60]!r}")
      if n == 0:
        continue
      sl = slice(max_len - n, max_len) if pad_left else slice(0, n)
      tokens[b, sl] = row
      mask[b, sl] = True
    return tokens, mask

  def render_chat(self, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = True) -> str:
    """`messages` rendered with this tokenizer's chat template, as transformers'
    `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders them.
    Encode the result with `add_bos=False`: the template writes its own BOS where it wants one.

    Raises:
      TokenizerError: the tokenizer has no chat template.
      chat.ChatTemplateError: the template rejects the conversation.
    """
    if self.chat_template is None:
      where = getattr(self, "path", "this tokenizer")
      raise TokenizerError(
          f"{where} has no chat template: put {chat.TEMPLATE_FILE} or a tokenizer_config.json "
          "with a chat_template next to it, or use the raw prompt format")
    return chat.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                       special_tokens=self.special_tokens)

  def _init_chat(self, folder: str, token_cfgs: Sequence[Mapping[str, Any]]) -> None:
    """Sets `chat_template` (from `folder`) and `special_tokens`: each named token as the token
    configs spell it, else the piece of this tokenizer's own id."""
    self.chat_template = chat.find_template(folder)
    names: dict[str, str] = {}
    for name in chat.SPECIAL_TOKEN_NAMES:
      for cfg in token_cfgs:
        content = _token_content(cfg.get(name))
        if content is not None:
          names[name] = content
          break
    for kind in ("bos", "eos", "pad", "unk"):
      token_id = getattr(self, f"{kind}_id", None)
      if f"{kind}_token" not in names and token_id is not None:
        names[f"{kind}_token"] = self.id_to_piece(token_id)
    self.special_tokens = names

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, eos_ids={self.eos_ids})")

  # ---- shared helpers ------------------------------------------------------------------------

  def _resolve(self, spec: Any, what: str) -> int | None:
    """Turns a token given as string or id into an id (None stays None)."""
    if spec is None:
      return None
    if isinstance(spec, (bool, np.bool_)):
      raise TypeError(f"{what} must be a token string or id, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
      spec = int(spec)
      if not 0 <= spec < self.vocab_size:
        raise TokenizerError(f"{what} id {spec} is out of range for vocab_size {self.vocab_size}")
      return spec
    if isinstance(spec, str):
      token_id = self.piece_to_id(spec)
      if token_id is None:
        raise TokenizerError(f"{what} token {spec!r} is not in the vocabulary")
      return token_id
    raise TypeError(f"{what} must be a token string or id, got {type(spec).__name__}")

  def _set_eos_ids(self, extra: Iterable[int | None], extra_eos: Iterable[Any]) -> None:
    """Sets `eos_ids` = eos_id, then `extra`, explicit `extra_eos`, then end-of-turn pieces."""
    ids: list[int] = []
    for i in [self.eos_id, *extra, *(self._resolve(e, "extra_eos") for e in extra_eos),
              *(self.piece_to_id(p) for p in END_OF_TURN_PIECES)]:
      if i is not None and i not in ids:
        ids.append(i)
    self.eos_ids = tuple(ids)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file.

  BOS / EOS / PAD come from the model's own ids (-1 means absent); `bos`, `eos`, `pad` override
  them (token string or id; pass a value to override, leave the sentinel to keep the model's).
  """

  def __init__(self, path: str | os.PathLike, *, bos: Any = ..., eos: Any = ..., pad: Any = ...,
               extra_eos: Iterable[Any] = ()):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"cannot read SentencePiece model {self.path}: {e}") from e
    self.vocab_size = int(self._sp.get_piece_size())
    own = lambda i: None if i < 0 else int(i)
    self.bos_id = own(self._sp.bos_id()) if bos is ... else self._resolve(bos, "bos")
    self.eos_id = own(self._sp.eos_id()) if eos is ... else self._resolve(eos, "eos")
    self.pad_id = own(self._sp.pad_id()) if pad is ... else self._resolve(pad, "pad")
    self.unk_id = own(self._sp.unk_id())
    self._control = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
    # SentencePiece reads a control piece written in text ("<s>") as characters; a rendered chat
    # template writes them, so they are split out first (as transformers splits special tokens).
    pieces = sorted({self._sp.id_to_piece(i) for i in self._control} - {""}, key=len, reverse=True)
    self._control_re = re.compile("|".join(map(re.escape, pieces))) if pieces else None
    self._set_eos_ids((), extra_eos)
    folder = os.path.dirname(os.path.abspath(self.path))
    self._init_chat(folder, [c for c in (_read_json(os.path.join(folder, n))
                                         for n in HFTokenizer._CONFIG_FILES) if c is not None])

  def _encode(self, text: str) -> list[int]:
    if self._control_re is None or self._control_re.search(text) is None:
      return list(self._sp.encode(text))
    ids, start = [], 0
    for m in self._control_re.finditer(text):
      if m.start() > start:
        ids += self._sp.encode(text[start:m.start()])
      ids.append(int(self._sp.piece_to_id(m.group())))
      start = m.end()
    if start < len(text):
      ids += self._sp.encode(text[start:])
    return ids

  def _decode(self, ids: list[int], skip_special: bool) -> str:
    if skip_special:
      return self._sp.decode(ids)
    # SentencePiece renders control ids as ""; keep them visible as their piece strings.
    out, run = [], []
    for i in ids:
      if i in self._control:
        out.append(self._sp.decode(run))
        out.append(self._sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    out.append(self._sp.decode(run))
    return "".join(out)

  def id_to_piece(self, token_id: int) -> str:
    if not 0 <= int(token_id) < self.vocab_size:
      raise TokenizerError(f"token id {token_id} is out of range for vocab_size {self.vocab_size}")
    return self._sp.id_to_piece(int(token_id))

  def piece_to_id(self, piece: str) -> int | None:
    i = int(self._sp.piece_to_id(piece))
    # Unknown pieces map to unk_id; only report unk when `piece` really is the unk piece.
    if i == self._sp.unk_id() and self._sp.id_to_piece(i) != piece:
      return None
    return i

  def _special_ids(self) -> frozenset[int]:
    return self._control


_read_json = chat.read_json_object  # a JSON object file, None if absent; TokenizerError if corrupt


def _token_content(value: Any) -> str | None:
  """`"<s>"` or `{"content": "<s>", ...}` -> "<s>"; anything else -> None."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _id_list(value: Any) -> list[int]:
  """`eos_token_id` may be an int, a list of ints, or null."""
  if isinstance(value, bool) or value is None:
    return []
  if isinstance(value, int):
    return [value]
  if isinstance(value, (list, tuple)):
    return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
  return []


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (fast tokenizer) file.

  Special tokens are looked up, first hit wins, in: constructor kwargs (token string or id);
  `tokenizer_config.json`; `special_tokens_map.json` (`bos_token` / `eos_token` / `pad_token`,
  strings or `{"content": ...}` dicts); `generation_config.json`; `config.json`
  (`bos_token_id` / `eos_token_id` / `pad_token_id`, where `eos_token_id` may be a list, all of
  whose ids go into `eos_ids`). Files are read from the directory holding `tokenizer.json`.
  """

  _CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
  _MODEL_CONFIG_FILES = ("generation_config.json", "config.json")

  def __init__(self, path: str | os.PathLike, *, bos: Any = ..., eos: Any = ..., pad: Any = ...,
               extra_eos: Iterable[Any] = ()):
    import tokenizers  # pylint: disable=g-import-not-at-top

    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"tokenizer.json not found: {self.path}")
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception on parse errors.
      raise TokenizerError(f"cannot read Hugging Face tokenizer {self.path}: {e}") from e
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values(), default=-1) + 1
    self._special = frozenset(
        i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    folder = os.path.dirname(os.path.abspath(self.path))
    token_cfgs = [c for c in (_read_json(os.path.join(folder, n)) for n in self._CONFIG_FILES)
                  if c is not None]
    model_cfgs = [c for c in (_read_json(os.path.join(folder, n))
                              for n in self._MODEL_CONFIG_FILES) if c is not None]

    def lookup(kind: str, override: Any) -> int | None:
      if override is not ...:
        return self._resolve(override, kind)
      for cfg in token_cfgs:
        content = _token_content(cfg.get(f"{kind}_token"))
        if content is not None and self.piece_to_id(content) is not None:
          return self.piece_to_id(content)
      for cfg in model_cfgs:
        ids = [i for i in _id_list(cfg.get(f"{kind}_token_id")) if 0 <= i < self.vocab_size]
        if ids:
          return ids[0]
      return None

    self.bos_id = lookup("bos", bos)
    self.eos_id = lookup("eos", eos)
    self.pad_id = lookup("pad", pad)
    config_eos = [i for c in model_cfgs for i in _id_list(c.get("eos_token_id"))
                  if 0 <= i < self.vocab_size]
    self._set_eos_ids(config_eos, extra_eos)
    self._init_chat(folder, token_cfgs)

  def _encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def _decode(self, ids: list[int], skip_special: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  def id_to_piece(self, token_id: int) -> str:
    piece = self._tok.id_to_token(int(token_id))
    if piece is None:
      raise TokenizerError(f"token id {token_id} is not in the vocabulary "
                       f"(vocab_size {self.vocab_size})")
    return piece

  def piece_to_id(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def _special_ids(self) -> frozenset[int]:
    return self._special


def load_tokenizer(path: str | os.PathLike, **overrides: Any) -> Tokenizer:
  """Opens a tokenizer from a `.model` file, a `tokenizer.json`, or a directory holding either.

  A directory with both `tokenizer.json` and `tokenizer.model` uses `tokenizer.json`.
  `overrides` (bos, eos, pad, extra_eos) go to the backend constructor.

  Raises:
    FileNotFoundError: nothing usable at `path` (the message says what was looked for).
    ValueError: the file exists but cannot be parsed.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return cls(candidate, **overrides)
    raise FileNotFoundError(
        f"no tokenizer in directory {path}: looked for tokenizer.json and tokenizer.model")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer not found: {path} (expected a SentencePiece .model file, a tokenizer.json, "
        "or a directory containing tokenizer.json or tokenizer.model)")
  if path.endswith(".json"):
    return HFTokenizer(path, **overrides)
  return SentencePieceTokenizer(path, **overrides)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises ValueError if the tokenizer can emit ids the model has no embedding row for.

  A model vocabulary larger than the tokenizer's is fine (embeddings are often padded to a
  multiple of 64 or 128).
  """
  if tokenizer.vocab_size > model_vocab_size:
    raise TokenizerError(
        f"tokenizer vocab_size {tokenizer.vocab_size} > model vocab_size {model_vocab_size}: "
        "the tokenizer has more ids than the model's embedding rows")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path_prefix: str | os.PathLike,
                        user_defined_symbols: Sequence[str] = (), model_type: str = "bpe",
                        **trainer_kwargs: Any) -> SentencePieceTokenizer:
  """Trains a small SentencePiece model in-process and returns it (writes `<prefix>.model`).

  Ids: pad=0, bos=1, eos=2, unk=3, then `user_defined_symbols` (always kept whole, e.g.
  `"<sep>"`), then learned pieces. Text is kept verbatim so that `decode(encode(s)) == s` for
  characters seen in training and encodings of pieces concatenate: identity normalization, no
  whitespace collapsing, no dummy "▁" prefix, full character coverage.

  `vocab_size` is an upper bound (`hard_vocab_limit=False`): a tiny corpus (e.g. "12+34=46")
  may yield fewer pieces; `model_type="char"` ignores it. It must still cover the 4 special ids,
  the user symbols, and every distinct character, else ValueError. Training is single-threaded
  and deterministic for the same inputs. `trainer_kwargs` override any SentencePiece trainer
  option (e.g. `split_digits=True`, `byte_fallback=True`).
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  if model_type not in ("bpe", "unigram", "char", "word"):
    raise TokenizerError(f"model_type must be bpe, unigram, char or word, got {model_type!r}")
  texts = [t for t in texts if t]  # the trainer rejects empty sentences
  if not texts:
    raise TokenizerError("train_sentencepiece needs at least one non-empty text")
  prefix = os.fspath(path_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  options = dict(
      model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
      pad_id=SP_PAD_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID, unk_id=SP_UNK_ID,
      user_defined_symbols=list(user_defined_symbols), hard_vocab_limit=False,
      character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, num_threads=1, minloglevel=2)
  options.update(trainer_kwargs)
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), **options)
  except RuntimeError as e:
    raise TokenizerError(f"SentencePiece training failed for {prefix}.model: {e}") from e
  return SentencePieceTokenizer(prefix + ".model")
