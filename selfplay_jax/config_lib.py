"""Loading and overriding `ml_collections` run configs (see `configs/default.py`).

Plain Python (no absl flags), so tests and notebooks run the same code as the CLI:

  cfg = config_lib.load_config("configs/default.py:model=llama3_8b", ["model.num_layers=2"])
  config_validation.validate(cfg)                      # raises ConfigError naming the dotted key
  model_cfg = config_lib.model_config(cfg.model)

Every error is a `ConfigError` whose message starts with the dotted key it is about.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging
from ml_collections import config_dict

from selfplay_jax.errors import ConfigError
from selfplay_jax.models.config import ModelConfig, get_preset

__all__ = ["ConfigError", "apply_overrides", "config_file_error", "default_config_path",
           "load_config", "model_config",
           "parse_arg", "resolve_config_path", "set_preset", "split_argv", "to_json"]

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")
_HF_OVERRIDABLE = ("dtype", "param_dtype", "remat", "scan_layers")  # applied on top of an HF checkpoint's config

# ----------------------------------------------------------------------------------------------
# Config files


def default_config_path() -> Path:
  """`configs/default.py` in the CWD if present, else the one shipped next to the package."""
  local = Path("configs") / "default.py"
  if local.is_file():
    return local
  return _package_root() / "configs" / "default.py"


def _package_root() -> Path:
  import selfplay_jax  # pylint: disable=import-outside-toplevel
  return Path(selfplay_jax.__file__).resolve().parent.parent


def resolve_config_path(path_with_arg: str) -> str:
  """Resolves `file.py[:arg]`: as given, else relative to the repo root. Keeps the `:arg` tail."""
  path, sep, arg = path_with_arg.partition(":")
  candidates = [Path(path)]
  if not Path(path).is_absolute():
    candidates.append(_package_root() / path)
  for candidate in candidates:
    if candidate.is_file():
      if candidate.suffix != ".py":
        raise ConfigError(f"config: {candidate} is not a Python config file; --config takes a .py "
                          "file that defines get_config(), e.g. configs/default.py")
      return f"{candidate}{sep}{arg}"
    if candidate.is_dir():
      raise ConfigError(f"config: {candidate} is a directory; --config takes a .py file that "
                        "defines get_config(), e.g. configs/default.py")
  raise ConfigError(f"config: file not found: {path!r}")


def config_file_error(path: str | os.PathLike, error: BaseException) -> ConfigError | None:
  """One line for a config file whose code failed (SyntaxError, NameError, ImportError, no
  `get_config`, ...): `config: <file> line <n>: <ErrorType>: <message>`. None when `error` did not
  come from that file's code (a ConfigError it raised on purpose passes through unchanged)."""
  if isinstance(error, ConfigError):
    return None
  where = os.path.abspath(path)
  seen: BaseException | None = error
  while seen is not None:  # flag parsers re-raise the file's error with it as the context
    text = str(seen).strip().splitlines()[0] if str(seen).strip() else ""
    kind = type(seen).__name__
    if isinstance(seen, SyntaxError) and seen.filename and os.path.abspath(seen.filename) == where:
      return ConfigError(f"config: {path} line {seen.lineno}: {kind}: {seen.msg}")
    frames = [f for f in traceback.extract_tb(seen.__traceback__)
              if os.path.abspath(f.filename) == where]
    if frames:
      return ConfigError(f"config: {path} line {frames[-1].lineno}: {kind}: {text}")
    if isinstance(seen, AttributeError) and getattr(seen, "name", None) == "get_config":
      return ConfigError(f"config: {path} defines no get_config()")
    seen = seen.__cause__ or seen.__context__
  return None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config-path argument `key=value,key=value` (big_vision style) over `defaults`.

  `--config=configs/default.py:model=llama3_8b,task=arithmetic` calls `get_config("model=...")`;
  values take the type of their default; keys not in `defaults` raise `ConfigError`.
  """
  result = dict(defaults)
  for item in (s.strip() for s in (arg or "").split(",")):
    if not item:
      continue
    key, sep, raw = (s.strip() for s in item.partition("="))
    if not sep:
      raise ConfigError(f"config arg {item!r}: expected key=value (keys: {', '.join(defaults)})")
    if key not in defaults:
      raise ConfigError(f"config arg {key!r}: unknown key; choose from {', '.join(defaults)}"
                        + _did_you_mean(key, list(defaults)))
    result[key] = _parse_value(f"config arg {key!r}", raw, type(defaults[key]), nullable=False)
  return ml_collections.ConfigDict(result)


def pop_arg(arg: str | None, **defaults: Any) -> tuple[ml_collections.ConfigDict, str]:
  """Splits a config argument into this file's own keys (parsed over `defaults`) and the rest,
  which a recipe passes on to the config it extends (`configs/sharpen.py:mode=rl,task=sort`)."""
  own, rest = [], []
  for item in (s.strip() for s in (arg or "").split(",")):
    if item:
      (own if item.partition("=")[0].strip() in defaults else rest).append(item)
  return parse_arg(",".join(own), **defaults), ",".join(rest)


def load_sibling(file: str, name: str = "default.py", arg: str | None = None
                 ) -> ml_collections.ConfigDict:
  """The config of `name` in the folder of `file`: how a recipe extends `configs/default.py`."""
  return load_config(str(Path(file).with_name(name)) + (f":{arg}" if arg else ""))


def load_config(path_with_arg: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Imports `file.py[:arg]`, calls `get_config([arg])` and applies `a.b.c=value` overrides."""
  resolved = resolve_config_path(path_with_arg)
  path, sep, arg = resolved.partition(":")
  spec = importlib.util.spec_from_file_location(f"_selfplay_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"config: {path} defines no get_config()")
    cfg = module.get_config(arg) if sep else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    error = config_file_error(path, e)
    if error is None:
      raise
    raise error from None
  return apply_overrides(cfg, overrides)


def split_argv(argv: Sequence[str], name: str = "config") -> tuple[list[str], list[str]]:
  """Splits command-line args into (other args, `key=value` overrides given as `--<name>.key`).

  Accepts `--config.k=v`, `--config.k v`, `--config.k` (true) and `--noconfig.k` (false); the
  `--config=file.py[:arg]` path is resolved with `resolve_config_path`. Stops at `--`.
  """
  args, rest, overrides = list(argv), [], []
  while args:
    arg = args.pop(0)
    flag, sep, value = arg.lstrip("-").partition("=")
    if arg == "--":
      rest += [arg] + args
      break
    if not arg.startswith("-"):
      rest.append(arg)
    elif flag.startswith(f"no{name}."):
      overrides.append(f"{flag[len(name) + 3:]}=false")
    elif flag.startswith(f"{name}."):
      if not sep:
        value = args.pop(0) if args and not args[0].startswith("-") else "true"
      overrides.append(f"{flag[len(name) + 1:]}={value}")
    elif flag == name and (sep or args):
      rest.append(f"--{name}={resolve_config_path(value if sep else args.pop(0))}")
    else:
      rest.append(arg)
  return rest, overrides


# ----------------------------------------------------------------------------------------------
# Model group


def model_hints() -> dict[str, Any]:
  return typing.get_type_hints(ModelConfig)


def optional_inner(hint: Any) -> type | None:
  """`int` for `int | None`; None if the hint is not Optional."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(hint):
      return args[0]
  return None


def set_preset(model: ml_collections.ConfigDict, name: str) -> None:
  """Sets `model.preset = name` and every `ModelConfig` field to that preset's value.

  Missing fields are created (Optional ones as typed placeholders, so `--config.model.x=...` and
  `x=None` work); existing fields are assigned, so this also re-targets a loaded config.
  """
  preset = get_preset(name)
  model.preset = name
  hints = model_hints()
  for field in dataclasses.fields(ModelConfig):
    value = getattr(preset, field.name)
    inner = optional_inner(hints[field.name])
    if field.name not in model and inner is not None:
      ref = config_dict.placeholder(inner)
      if value is not None:
        ref.set(value)
      model[field.name] = ref
    else:
      model[field.name] = value


def ignored_with_hf_path(model: ml_collections.ConfigDict) -> list[str]:
  """`model.<field>=<value>` for each architecture field that differs from `model.preset`'s value
  (so the user or the config file set it) although `model.hf_path` makes it ineffective."""
  try:
    preset = get_preset(model.get("preset"))
  except ConfigError:
    return []
  norm = lambda v: tuple(v) if isinstance(v, list) else v
  return [f"model.{f.name}={model[f.name]}" for f in dataclasses.fields(ModelConfig)
          if f.name not in _HF_OVERRIDABLE and f.name in model
          and norm(model[f.name]) != norm(getattr(preset, f.name))]


_WARNED_HF_OVERRIDES: set[tuple[str, ...]] = set()  # warn once per process, not per model_config()


def model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """Builds the validated `ModelConfig` of `cfg.model`.

  With `model.hf_path` set, the architecture comes from that Hugging Face directory's config.json
  and only `dtype`, `param_dtype`, `remat` and `scan_layers` apply on top; other `model.*` fields
  set away from the preset's values are ignored, with one warning naming them.
  """
  if model.get("hf_path"):
    try:
      from selfplay_jax.models import hf  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ConfigError(f"model.hf_path: Hugging Face import is unavailable ({e})") from e
    try:
      base = hf.load_config(model.hf_path)
    except ConfigError:
      raise
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"model.hf_path: {e}") from e
    result = base.replace(**{k: model[k] for k in _HF_OVERRIDABLE})
    ignored = tuple(ignored_with_hf_path(model))
    if ignored and (model.hf_path,) + ignored not in _WARNED_HF_OVERRIDES:
      _WARNED_HF_OVERRIDES.add((model.hf_path,) + ignored)
      logging.warning("model.hf_path=%s sets the architecture (its config.json), so %s %s "
                      "ignored; only model.dtype, model.param_dtype, model.remat and "
                      "model.scan_layers apply on top of it", model.hf_path, ", ".join(ignored),
                      "is" if len(ignored) == 1 else "are")
  else:
    result = ModelConfig(**{f.name: model[f.name] for f in dataclasses.fields(ModelConfig)})
  if "lora" in model and model.lora.rank:  # adapters (models/lora.py) on top of the architecture
    from selfplay_jax.models import lora  # pylint: disable=import-outside-toplevel
    result = lora.with_lora(result, model.lora.rank, model.lora.alpha, model.lora.targets)
  return result.validate("model")


# ----------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Returns a copy of `cfg` with `a.b.c=value` overrides applied, values parsed by field type.

  `model.preset=<name>` is applied first and resets every architecture field to that preset, so
  field overrides on the same command line still win.
  """
  cfg = copy.deepcopy(cfg)
  pairs = [_split_override(o) for o in overrides]
  pairs.sort(key=lambda pair: pair[0] != "model.preset")  # stable: presets first, order kept
  for key, raw in pairs:
    parent, leaf = _lookup(cfg, key)
    if key == "model.preset":
      set_preset(parent, _parse_value(key, raw, str, nullable=False))
      continue
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"{key}: is a group of settings; override its fields, e.g. "
                        f"{key}.{next(iter(current.keys()), 'field')}=...")
    # Optional fields are typed placeholders (FieldReference) and accept None.
    fields = parent._fields  # pylint: disable=protected-access
    nullable = isinstance(fields[leaf], config_dict.FieldReference)
    field_type = parent.get_type(leaf) if current is not None or nullable else None
    value = _parse_value(key, raw, field_type, nullable=nullable, current=current)
    try:
      parent[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{key}: cannot set {raw!r} ({e})") from e
  return cfg


def _split_override(override: str) -> tuple[str, str]:
  key, sep, raw = override.partition("=")
  key = key.strip().removeprefix("config.")
  if not sep or not key:
    raise ConfigError(f"override {override!r}: expected key=value, e.g. model.num_layers=4")
  return key, raw.strip()


def _lookup(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  """(parent group, leaf name) of dotted `key`; ConfigError with close matches if unknown."""
  *groups, leaf = key.split(".")
  node = cfg
  for depth, name in enumerate(groups):
    child = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(child, ml_collections.ConfigDict):
      if name in node:
        value_key = ".".join(groups[:depth + 1])
        raise ConfigError(f"{key}: unknown config key; {value_key!r} is a value, not a group")
      raise _unknown(cfg, key)
    node = child
  if leaf not in node:
    raise _unknown(cfg, key)
  return node, leaf


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for name in cfg.keys():
    full = f"{prefix}{name}"
    keys.append(full)
    if isinstance(cfg[name], ml_collections.ConfigDict):
      keys.extend(flat_keys(cfg[name], f"{full}."))
  return keys


def get_key(cfg: ml_collections.ConfigDict, key: str) -> Any:
  """The value of dotted `key`; ConfigError when it is missing."""
  node = cfg
  for name in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ConfigError(f"{key}: missing from the config")
    node = node[name]
  return node


def _did_you_mean(key: str, options: Sequence[str]) -> str:
  matches = difflib.get_close_matches(key, options, n=3, cutoff=0.6)
  return f" (did you mean {', '.join(matches)}?)" if matches else ""


def _unknown(cfg: ml_collections.ConfigDict, key: str) -> ConfigError:
  options = flat_keys(cfg)
  leaf = key.rsplit(".", 1)[-1]
  same_leaf = [o for o in options if o.rsplit(".", 1)[-1] == leaf and o != key]
  hint = _did_you_mean(key, options) or (f" (did you mean {', '.join(same_leaf)}?)"
                                          if same_leaf else "")
  return ConfigError(f"{key}: unknown config key{hint}")


def _type_name(field_type: Any, current: Any = None) -> str:
  if field_type is tuple and current:
    return f"tuple of {type(current[0]).__name__}"
  if field_type is bool:
    return "bool (true/false/1/0)"
  return getattr(field_type, "__name__", str(field_type))


def _parse_bool(raw: str) -> bool:
  if raw.lower() in _TRUE_WORDS:
    return True
  if raw.lower() in _FALSE_WORDS:
    return False
  raise ValueError(raw)


def _unquote(raw: str) -> str:
  if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
    return raw[1:-1]
  return raw


def _tuple_items(raw: str) -> list[str]:
  """'(1, 2)', '[1,2]', '1,2', '(1,)', '()' and '5' -> item strings."""
  text = raw.strip()
  if len(text) >= 2 and (text[0], text[-1]) in (("(", ")"), ("[", "]")):
    text = text[1:-1]
  return [item.strip() for item in text.split(",") if item.strip()]


def _literal(raw: str) -> Any:
  """Best-effort value for a field whose type is unknown (its value is None): literal, else str."""
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return _unquote(raw)


# Command-line text -> value, by the field's current type (None: type unknown, guess a literal).
_PARSERS: dict[Any, Callable[[str], Any]] = {
    bool: _parse_bool, int: int, float: float, str: _unquote, None: _literal}


def _parse_value(key: str, raw: str, field_type: Any, *, nullable: bool,
                 current: Any = None) -> Any:
  """Parses command-line text `raw` as `field_type`; ConfigError naming key, value and type."""
  if nullable and raw.lower() in _NONE_WORDS:
    return None
  error = ConfigError(f"{key}: cannot parse {raw!r} as {_type_name(field_type, current)}")
  if field_type is tuple:
    elem_type = type(current[0]) if current else None
    try:
      return tuple(_parse_value(key, item, elem_type, nullable=False) for item in _tuple_items(raw))
    except ConfigError:
      raise error from None
  if field_type not in _PARSERS:
    raise ConfigError(f"{key}: fields of type {_type_name(field_type)} cannot be overridden")
  try:
    return _PARSERS[field_type](raw)
  except (ValueError, SyntaxError):
    raise error from None


# ----------------------------------------------------------------------------------------------
# Serialisation


def to_json(cfg: ml_collections.ConfigDict) -> str:
  """The resolved config as indented, key-sorted JSON (tuples become lists)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of a nested config dict (tuples as lists, as in the JSON config)."""
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


# ----------------------------------------------------------------------------------------------
# User code named in a config (research forks: algorithm.spec, algorithm.scorer, data.task)


def import_object(ref: str, key: str) -> Any:
  """The object `ref` names: "path/to/file.py:name" or "package.module:name". Every failure is a
  ConfigError naming `key` (file or module missing, import error, no such name)."""
  module_ref, sep, name = ref.rpartition(":")
  if not sep or not module_ref or not name.isidentifier():
    raise ConfigError(f"{key}: expected 'path/to/file.py:name' or 'package.module:name', got {ref!r}")
  if module_ref.endswith(".py"):
    path = Path(module_ref).resolve()
    if not path.is_file():
      raise ConfigError(f"{key}: file {module_ref} not found")
    module_name = f"_selfplay_user_{path.stem}_{abs(hash(str(path))):x}"
    module = sys.modules.get(module_name)
    if module is None:
      spec = importlib.util.spec_from_file_location(module_name, path)
      module = importlib.util.module_from_spec(spec)
      sys.modules[module_name] = module  # dataclasses and pickling-free lookups need it registered
      try:
        spec.loader.exec_module(module)
      except Exception as e:  # pylint: disable=broad-except
        del sys.modules[module_name]
        raise ConfigError(f"{key}: importing {module_ref} failed: {type(e).__name__}: {e}") from None
  else:
    try:
      module = importlib.import_module(module_ref)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{key}: cannot import {module_ref!r} ({type(e).__name__}: {e}); is it on "
                        "PYTHONPATH?") from None
  if not hasattr(module, name):
    raise ConfigError(f"{key}: {module_ref} has no {name!r}")
  return getattr(module, name)

