"""Readable messages for checkpoint failures: which file of which step, without TensorStore's
internals, and no flood of "Event loop is closed" tracebacks after a failed read."""

from __future__ import annotations

import json
import re
import sys

from etils import epath

from selfplay_jax.errors import CheckpointError

_LOCAL_FILE = re.compile(r'local file "([^"]+)"')


def describe_failure(step_dir: epath.Path, error: BaseException,
                     json_items: tuple[str, ...] = ("data_state", "config", "round_metrics")) -> str:
  """What made a step unreadable, as `<file>: <problem>`: TensorStore's status code, driver chain
  and `tensorstore_spec` JSON are left out; a JSON item that does not parse is found by name."""
  text = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
  text = text[0] if text else type(error).__name__
  if isinstance(error, json.JSONDecodeError):
    for item in json_items:
      for f in sorted(p for p in (step_dir / item).glob("*") if p.name != "commit_success.txt"):
        try:
          json.loads(f.read_text())
        except (ValueError, OSError):
          return f"{f}: not valid JSON ({text})"
    return f"{step_dir}: a JSON item is not valid JSON ({text})"
  files = _LOCAL_FILE.findall(text)
  if not files:
    return text if isinstance(error, CheckpointError) else f"{step_dir}: {type(error).__name__}: {text}"
  code = re.match(r"([A-Z_]+): ", text)
  where = text.rfind(f'local file "{files[-1]}"')
  after = text[where + len(f'local file "{files[-1]}"'):]
  if after.startswith(":"):  # "... of local file "f": Requested byte range ... is not valid ..."
    problem = after[1:].strip()
  else:  # "Metadata at "x/.zarray" in OCDBT database at local file "d/" does not exist"
    clause = text[text.rfind(": ", 0, where) + 2:]
    problem = re.sub(r'\s*(in OCDBT database at |of )?local file "[^"]+"', "", clause).strip()
  hint = {"OUT_OF_RANGE": "truncated?", "DATA_LOSS": "corrupted?", "NOT_FOUND": "deleted?"}
  extra = f" ({hint[code.group(1)]})" if code and code.group(1) in hint else ""
  return f"{files[-1]}: {problem}{extra}"


_installed = False


def quiet_closed_event_loop_errors() -> None:
  """A failed TensorStore read leaves futures whose callbacks later try to reach the asyncio loop
  Orbax has already closed; each prints `RuntimeError: Event loop is closed` through
  `sys.unraisablehook` (dozens per failed step). From the first restore on, those, and only
  those, are dropped; every other unraisable error still reaches the previous hook."""
  global _installed
  if _installed:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  _installed = True
