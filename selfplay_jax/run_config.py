"""A run's saved config: reading it back (`eval`, `export`, `report`), and comparing it with the
config of a run that resumes in the same workdir (`train`).

Changing a key of `RUN_IDENTITY_KEYS` makes the checkpoints another experiment: resuming is
refused. Other changes (more rounds, a lower learning rate) are allowed and logged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from selfplay_jax.config_lib import default_config_path, flatten, load_config, to_json
from selfplay_jax.errors import ConfigError

__all__ = ["RUN_IDENTITY_KEYS", "read_run_config", "load_run_config", "resume_differences"]

# Keys whose change makes a run's checkpoints a different experiment (resuming would silently mix
# two runs); prefixes end with ".". Everything else (rounds, learning rate, eval, logging, ...) may
# change between restarts and is reported as a warning.
RUN_IDENTITY_KEYS = ("model.", "algorithm.name", "data.task", "data.difficulty", "optimizer.name",
                     "population.size")
_RESUME_KNOBS = ("model.dtype", "model.remat", "model.preset")  # compute settings, not the model


def read_run_config(workdir: str | Path) -> dict[str, Any]:
  """The config dict a run saved as `<workdir>/config.json`, with one error naming the file when it
  is missing or unreadable."""
  path = Path(workdir) / "config.json"
  if Path(workdir).exists() and not Path(workdir).is_dir():
    raise NotADirectoryError(f"workdir {workdir} is a file, not a directory; give the directory a "
                             "training run wrote (config.json and checkpoints/)")
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a selfplay-jax training workdir?")
  try:
    saved = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not a readable run config ({e})") from None
  if not isinstance(saved, dict):
    raise ConfigError(f"{path}: not a run config (a JSON {type(saved).__name__})")
  return saved


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
  """The config a run saved, over today's defaults (keys added since the run take them)."""
  saved = read_run_config(workdir)
  cfg = load_config(str(default_config_path())).to_dict()

  def merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
      base[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(
          base.get(key), dict) else value
    return base

  return ml_collections.ConfigDict(merge(cfg, saved))


def resume_differences(saved: Mapping[str, Any], cfg: ml_collections.ConfigDict
                       ) -> tuple[list[str], list[str]]:
  """(identity keys, other keys) whose values differ between a saved run config and `cfg`, each
  as `key: saved -> now`. Keys missing on one side (added since the run was made) are skipped."""
  old, new = flatten(saved), flatten(json.loads(to_json(cfg)))
  identity, other = [], []
  for key in sorted(old.keys() & new.keys()):
    if old[key] != new[key]:
      is_identity = key not in _RESUME_KNOBS and any(
          key == k or (k.endswith(".") and key.startswith(k)) for k in RUN_IDENTITY_KEYS)
      (identity if is_identity else other).append(f"{key}: {old[key]!r} -> {new[key]!r}")
  return identity, other
