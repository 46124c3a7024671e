"""Filesystems that refuse writes, for fault tests: a tiny or read-only tmpfs (needs root, as on
our CI machines; tests using it are skipped where mounting is not allowed)."""

import contextlib
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(size: str, *options: str):
  """A small tmpfs mounted for the test (root only; skipped where mounting is not allowed)."""
  target = Path(f"/tmp/selfplay-tmpfs-{uuid.uuid4().hex[:8]}")
  target.mkdir()
  try:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}",) + options),
                          "tmpfs", str(target)], capture_output=True, text=True, check=False)
    problem = res.stderr.strip() or res.returncode
  except OSError as e:  # no mount binary
    res, problem = None, e
  if res is None or res.returncode:
    target.rmdir()
    pytest.skip(f"cannot mount a tmpfs here ({problem})")
  try:
    yield target
  finally:
    subprocess.run(["umount", "-l", str(target)], check=False)
    shutil.rmtree(target, ignore_errors=True)
