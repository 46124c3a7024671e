"""Every error a user can cause, in one place (the lowest layer: imports nothing of the package).

Each is one line for the CLI (`cli.py` prints `error: <message>` and exits 2), and each message
names the bad thing: a dotted config key, a file, a JSONL row, a shape.

  ConfigError         a config value or combination (message starts with the dotted key)
  DataError           a data file that cannot be used
  EncodingError       an example that does not fit the configured token widths
  TokenizerError      a tokenizer file that cannot be used or does not fit the model
  CheckpointFormatError  a Hugging Face model directory that does not match its config.json
  CheckpointError     (and subclasses) a training checkpoint: missing, corrupted, mismatched,
                      unwritable
  WorkdirError        a workdir (or a file in it) that cannot be created or written
  RewardFunctionError  a Python reward function raised or returned a bad value (names it and the row)
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key."""


class DataError(ValueError):
  """A data file that cannot be used (a bad row under `strict=True`, or no valid rows)."""


class EncodingError(ValueError):
  """An example does not fit the configured token widths (names the `data.*` key to raise)."""


class TokenizerError(ValueError):
  """A tokenizer file that cannot be used, or a tokenizer that does not fit the model or input."""


class CheckpointFormatError(ValueError):
  """A model directory or tensor does not match what its config.json promises."""


class CheckpointError(Exception):
  """Base class for checkpoint errors."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No complete checkpoint (or not the requested step) exists."""


class CheckpointCorruptedError(CheckpointError):
  """Every candidate checkpoint failed to read."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """The checkpoint's tree structure, shapes or dtypes differ from the restore target."""


class CheckpointWriteError(CheckpointError, OSError):
  """A checkpoint could not be written (disk full, no permission, ...); older steps are intact."""


class WorkdirError(OSError):
  """The workdir (or a file in it) cannot be created or written."""


class RewardFunctionError(Exception):
  """A Python reward function raised, or returned something other than one float (or None) per
  completion; the message names the function and the row. The run stops; saved rounds are kept."""
