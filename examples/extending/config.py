"""Config for the AWR example (`awr.py` next to this file): the default demo with the algorithm
named by import path. Nothing in the package changes.

  selfplay-jax train --config=examples/extending/config.py --workdir=runs/awr
  selfplay-jax train --config=examples/extending/config.py:task=sort ...   # default.py's arguments

`algorithm.spec` / `algorithm.scorer` / `data.task` take `path/to/file.py:name` or
`package.module:name` (a module on PYTHONPATH).
"""

from pathlib import Path

from selfplay_jax import config_lib

HERE = Path(__file__).resolve().parent


def get_config(arg: str | None = None):
  cfg = config_lib.load_config(str(config_lib.default_config_path()) + (f":{arg}" if arg else ""))
  cfg.algorithm.name = "awr"  # the phase label in logs and metrics
  cfg.algorithm.spec = f"{HERE / 'awr.py'}:AdvantageWeightedSFT"
  cfg.algorithm.beta = 0.5  # AWR temperature: weight = exp(advantage / beta)
  cfg.optimizer.learning_rate = 1e-4
  return cfg
