"""Wheels carried to a machine without network (a GPU image with jax, flax, optax, orbax, torch and
transformers but not the rest of selfplay_jax's dependencies), made importable without pip.

  python -m bench --suite accelerator --wheels wheels/   # or SELFPLAY_WHEELS=wheels/
  activate(directory) -> [unpacked dirs]   # unpack every *.whl once, append them to sys.path;
                                           #   $SELFPLAY_WHEELS tells subprocesses to do the same

A wheel is a zip of importable files: each is unpacked into `<directory>/_unpacked/<wheel name>/`
and appended to `sys.path` *after* the image's own site-packages, so a carried wheel never shadows
the image's jax, torch or numpy (pip download pulls those in as dependencies; PYTHONPATH would
put them first, so subprocesses get $SELFPLAY_WHEELS and call `activate` themselves). Prepare the folder on
a machine with network (docs/benchmarks.md, "Accelerator"). Standard library only.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

ENV = "SELFPLAY_WHEELS"


def activate(directory: str | os.PathLike | None = None) -> list[str]:
  """Makes the wheels in `directory` (default: $SELFPLAY_WHEELS; none: nothing) importable."""
  directory = directory or os.environ.get(ENV)
  if not directory:
    return []
  root = Path(directory)
  if not root.is_dir():
    raise FileNotFoundError(f"--wheels: {root} is not a directory")
  added = []
  for wheel in sorted(root.glob("*.whl")):
    target = root / "_unpacked" / wheel.stem
    if not (target / ".done").is_file():
      target.mkdir(parents=True, exist_ok=True)
      with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
      (target / ".done").write_text("")
    if str(target) not in sys.path:
      sys.path.append(str(target))
    added.append(str(target))
  os.environ[ENV] = str(root.resolve())
  return added
