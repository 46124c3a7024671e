"""DAPO: clip-higher (0.2 / 0.28), token-level mean over the batch, dynamic filtering of groups whose rewards are all equal (masked), no KL.

  selfplay-jax train --config=configs/dapo.py --workdir=runs/dapo

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/dapo.py:task=sort`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "dapo"
  cfg.algorithm.clip_low = 0.2
  cfg.algorithm.clip_high = 0.28
  cfg.algorithm.kl_coef = 0.0
  return cfg
