"""The configuration reference (`docs/configuration.md`), generated from the config files.

  python -m selfplay_jax.config_reference > docs/configuration.md

Every key of `configs/default.py` with its default and the comment written next to it, grouped as
in the file (the `model.*` fields: the comments in `selfplay_jax/models/config.py`; the accepted
`algorithm.name` values: the registry), then the keys only some recipes have (e.g. `hardware.*`),
then for each recipe in `configs/` the keys it sets differently. `tests/test_config.py` checks that
the committed page equals what this prints, so the reference cannot drift. The command-line flags
are in the hand-written `docs/cli.md` (linked from the page; `tests/test_docs.py` checks it).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import sys
import tokenize
from pathlib import Path

from selfplay_jax import config_lib
from selfplay_jax.models import config as model_config_lib
from selfplay_jax.models.config import get_preset

__all__ = ["default_comments", "reference_markdown"]


def _target_key(node: ast.AST) -> str | None:
  """`cfg.a.b = ...` -> "a.b"; other assignment targets -> None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == "cfg" and parts:
    return ".".join(reversed(parts))
  return None


def default_comments(path: str | Path) -> dict[str, str]:
  """{dotted key: the `# comment` on the first line that assigns it} in a config file (a helper
  that sets the key again later, e.g. for one task, does not replace its meaning)."""
  source = Path(path).read_text()
  comments = {tok.start[0]: tok.string.lstrip("#").strip()
              for tok in tokenize.generate_tokens(io.StringIO(source).readline)
              if tok.type == tokenize.COMMENT}
  out = {}
  assigns = sorted((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)),
                   key=lambda n: n.lineno)
  for node in assigns:
    for target in node.targets:
      key = _target_key(target)
      if key is not None and node.end_lineno in comments:
        out.setdefault(key, comments[node.end_lineno])
  return out


def _value(v) -> str:
  return f"`{json.dumps(v)}`"


def _line_comments(source: str) -> dict[int, str]:
  return {tok.start[0]: tok.string.lstrip("#").strip()
          for tok in tokenize.generate_tokens(io.StringIO(source).readline)
          if tok.type == tokenize.COMMENT}


def model_field_comments() -> dict[str, str]:
  """{"model.<field>": the `# comment` on its line in `models/config.py`'s `ModelConfig`}."""
  source = Path(model_config_lib.__file__).read_text()
  comments = _line_comments(source)
  out = {}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ClassDef) and node.name == "ModelConfig":
      for item in node.body:
        if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            and item.end_lineno in comments):
          out[f"model.{item.target.id}"] = comments[item.end_lineno]
  return out


def _model_field_docs() -> str:
  presets = ", ".join(f"`{name}`" for name in model_config_lib.PRESETS)
  return ("The architecture fields (`model.family` … `model.pad_token_id`) and the compute knobs "
          "(`model.dtype`, `model.param_dtype`, `model.remat`, `model.scan_layers`) are the fields "
          "of `selfplay_jax.models.ModelConfig`, with the meanings written next to them. "
          "`model.preset` (or `:model=<name>` after the config path) resets every field to a "
          f"preset before other overrides apply: {presets}. With `model.hf_path` set the "
          "architecture comes from its `config.json` and only `model.dtype`, "
          "`model.param_dtype`, `model.remat` and `model.scan_layers` apply. Training from "
          "scratch, the vocabulary and special ids come from the tokenizer.")


def _algorithm_names() -> str:
  from selfplay_jax.algorithms import registry  # pylint: disable=import-outside-toplevel
  names = ", ".join(f"`{name}`" for name in registry.names())
  return (f"`algorithm.name` accepts: {names} (`selfplay_jax/algorithms/registry.py`; the recipe "
          "pages: [recipes/](recipes/README.md)). With `algorithm.spec` set (your own spec) the "
          "name is only the label of its rounds.")


def _recipe_only_keys(configs_dir: Path, default: dict) -> list[str]:
  """A section per key group that only some recipes have (e.g. real_model.py's `hardware.*`)."""
  lines = []
  for path in sorted(configs_dir.glob("*.py")):
    if path.name == "default.py":
      continue
    recipe = config_lib.flatten(config_lib.load_config(str(path)).to_dict())
    extra = [k for k in recipe if k not in default]
    if not extra:
      continue
    comments = default_comments(path)
    groups = sorted({k.split(".")[0] for k in extra})
    lines += [f"## {', '.join(f'`{g}`' for g in groups)} (only in `configs/{path.name}`)", "",
              "| key | value there | meaning |", "|---|---|---|"]
    for key in extra:
      text = comments.get(key, "").replace("|", chr(92) + "|")
      lines.append(f"| `{key}` | {_value(recipe[key])} | {text} |")
    lines.append("")
  return lines


def reference_markdown(configs_dir: str | Path | None = None) -> str:
  configs_dir = Path(configs_dir or config_lib.default_config_path().parent)
  default_path = configs_dir / "default.py"
  default = config_lib.flatten(config_lib.load_config(str(default_path)).to_dict())
  comments = {**model_field_comments(), **default_comments(default_path)}
  lines = ["# Configuration reference", "",
           ("Generated by `python -m selfplay_jax.config_reference` from `configs/`; do not edit "
            "by hand (`tests/test_config.py` checks it is current)."), "",
           ("Override any key on the command line: `--config.<key>=<value>` (values are parsed by "
            "the key's type; optional keys accept `None`). Unknown keys, wrong types and "
            "out-of-range values are one error naming the key, before anything compiles."), "",
           ("Every flag of every command (`train`'s `--workdir`, default `runs/default`; the "
            "distributed flags `--distributed`, `--coordinator_address`, `--num_processes`, "
            "`--process_id`; `eval`, which writes `<workdir>/eval_round_NNNN.json`; `export`, "
            "`report`, `plan`, `generate`): [cli.md](cli.md). Every key a run writes to "
            "`metrics.jsonl`: [metrics.md](metrics.md)."), ""]
  groups: dict[str, list[str]] = {}
  for key in default:
    groups.setdefault(key.split(".")[0] if "." in key else "", []).append(key)
  for group, keys in groups.items():
    lines += [f"## `{group}`" if group else "## top level", ""]
    if group == "model":
      lines += [_model_field_docs(), ""]
    lines += ["| key | default | meaning |", "|---|---|---|"]
    for key in keys:
      text = comments.get(key, "")
      if key == "model.preset":
        text = "the preset the other architecture fields come from (see above)"
      lines.append(f"| `{key}` | {_value(default[key])} | {text.replace('|', chr(92) + '|')} |")
    lines.append("")
    if group == "algorithm":
      lines += [_algorithm_names(), ""]
  lines += _recipe_only_keys(configs_dir, default)
  lines += ["## Recipes", "", "Each recipe file starts from `configs/default.py` and sets:", ""]
  for path in sorted(configs_dir.glob("*.py")):
    if path.name == "default.py":
      continue
    recipe = config_lib.flatten(config_lib.load_config(str(path)).to_dict())
    changed = [k for k in recipe if recipe.get(k) != default.get(k)]
    if recipe.get("model.preset") != default.get("model.preset"):  # its fields follow the preset
      preset = config_lib.flatten({"model": dataclasses.asdict(get_preset(recipe["model.preset"]))})
      changed = [k for k in changed if k not in preset or recipe[k] != preset[k]]
    doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip().splitlines()
    lines += [f"### `configs/{path.name}`", "", doc[0] if doc else "", ""]
    lines += [", ".join(f"`{k}={json.dumps(recipe[k])}`" + (" (and its architecture fields)"
                                                            if k == "model.preset" else "")
                        for k in changed) or "(no changes)", ""]
  return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
  text = reference_markdown()
  if len(argv) > 1:
    Path(argv[1]).write_text(text)
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
