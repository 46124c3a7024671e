"""Chat templates: a model's own Jinja template, rendered the way transformers renders it.

  template = chat.find_template("/ckpt/qwen2.5-7b-instruct")   # None when the folder has none
  text = chat.render(template, [{"role": "user", "content": "2+2?"}],
                     add_generation_prompt=True, special_tokens={"eos_token": "<|im_end|>"})

`render` gives the same text as transformers'
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`: the same
sandboxed Jinja environment (`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension), the same `tojson` filter (no HTML escaping, `ensure_ascii=False`), the
same globals (`raise_exception`, `strftime_now`), and the same variables: `messages`,
`add_generation_prompt`, `tools=None`, `documents=None`, and the tokenizer's named special tokens
(`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...; those it does not have stay undefined).

The rendered text already holds whatever special tokens the template writes (Llama 3 and Gemma
start with `{{ bos_token }}`), so it is tokenized as is, with no BOS added (transformers encodes a
rendered chat with `add_special_tokens=False`).

Where the template comes from (`find_template`), first hit wins: `chat_template.jinja` next to the
tokenizer, then `chat_template` of `tokenizer_config.json` (a string, or a list of
`{"name", "template"}` of which "default" is used), as transformers loads it.

This module imports nothing of `selfplay_jax` except its errors.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Sequence

from selfplay_jax.errors import TokenizerError

__all__ = ["ChatTemplateError", "TEMPLATE_FILE", "SPECIAL_TOKEN_NAMES", "find_template", "render",
           "messages_of", "check_messages"]

TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens transformers hands a template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class ChatTemplateError(ValueError):
  """A template that cannot be compiled or that rejects a conversation (its `raise_exception`)."""


# ---- finding the template -------------------------------------------------------------------------


def _named_template(value: Any, where: str) -> str:
  """`chat_template` of tokenizer_config.json: a string, or named templates (use "default")."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    try:
      named = {t["name"]: t["template"] for t in value}
    except (TypeError, KeyError):
      raise TokenizerError(f"{where}: chat_template must be a string or a list of "
                           "{\"name\", \"template\"} objects") from None
  elif isinstance(value, dict):
    named = value
  else:
    raise TokenizerError(f"{where}: chat_template must be a string or a list of named templates, "
                         f"got {type(value).__name__}")
  if "default" not in named or not isinstance(named["default"], str):
    raise TokenizerError(f"{where}: chat_template lists templates {sorted(named)} but none named "
                         "'default'")
  return named["default"]


def find_template(folder: str | os.PathLike) -> str | None:
  """The chat template of the tokenizer in `folder`, or None when it has none."""
  folder = os.fspath(folder)
  jinja_file = os.path.join(folder, TEMPLATE_FILE)
  if os.path.isfile(jinja_file):
    try:
      with open(jinja_file, encoding="utf-8") as f:
        return f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise TokenizerError(f"cannot read {jinja_file}: {e}") from e
  config_file = os.path.join(folder, "tokenizer_config.json")
  config = read_json_object(config_file)
  if config is None or config.get("chat_template") is None:
    return None
  return _named_template(config["chat_template"], config_file)


def read_json_object(path: str) -> dict[str, Any] | None:
  """Parses a JSON object file, None if absent; TokenizerError naming the file if corrupt."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f"cannot read {path}: {e}") from e
  if not isinstance(data, dict):
    raise TokenizerError(f"{path} does not hold a JSON object")
  return data


# ---- rendering ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  """The compiled template, in an environment like transformers' (`_compile_jinja_template`)."""
  import jinja2  # pylint: disable=g-import-not-at-top
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' AssistantTracker tag, which marks
    the assistant's tokens for training masks): renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols, Generation])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def render(template: str, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = True,
           special_tokens: Mapping[str, str | None] | None = None, **variables: Any) -> str:
  """The text of `messages` under `template`, as transformers' `apply_chat_template` renders it.

  Args:
    template: the Jinja source (`find_template`).
    messages: `[{"role": ..., "content": ...}, ...]`.
    add_generation_prompt: end with the header that opens the assistant's turn.
    special_tokens: named special tokens (`bos_token`, `eos_token`, ...) as strings; None values
      are left undefined, as transformers leaves a tokenizer's missing tokens.
    **variables: more template variables (e.g. `date_string`), overriding the special tokens.

  Raises:
    ChatTemplateError: the template does not compile, or rejects the conversation (its own
      `raise_exception`, e.g. Gemma's "System role not supported").
  """
  import jinja2  # pylint: disable=g-import-not-at-top

  compiled = _compile(template)
  context = {k: v for k, v in (special_tokens or {}).items() if v is not None}
  context.update(variables)
  try:
    return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **context)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"the chat template rejects the conversation: {e}") from e


# ---- prompts as messages --------------------------------------------------------------------------


def check_messages(value: Any) -> list[dict[str, str]]:
  """A JSONL prompt given as messages, checked: a non-empty list of `{"role": str, "content":
  str}` objects (other keys kept). ValueError saying what is wrong."""
  if not isinstance(value, list) or not value:
    raise ValueError("a chat prompt must be a non-empty list of {\"role\", \"content\"} messages")
  out = []
  for i, message in enumerate(value):
    if not isinstance(message, dict):
      raise ValueError(f"message {i} is a JSON {type(message).__name__}, not an object")
    for key in ("role", "content"):
      if not isinstance(message.get(key), str):
        got = "nothing" if key not in message else type(message[key]).__name__
        raise ValueError(f"message {i}: {key!r} must be a string, got {got}")
    out.append(dict(message))
  return out


def messages_of(prompt: str | Sequence[Mapping[str, Any]],
                system_prompt: str = "") -> list[dict[str, Any]]:
  """The conversation of a prompt: a string is one user message, a list is taken as is (see
  `check_messages`); `system_prompt` ("" = none) is put first when there is no system message."""
  messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
              else check_messages(list(prompt)))
  if system_prompt and not any(m["role"] == "system" for m in messages):
    messages = [{"role": "system", "content": system_prompt}, *messages]
  return messages
