"""GRPO (DeepSeekMath): group-normalised advantages, clipped token ratios, per-sequence token mean.

  selfplay-jax train --config=configs/grpo.py --workdir=runs/grpo

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/grpo.py:task=sort`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "grpo"
  cfg.algorithm.clip_low = 0.2
  cfg.algorithm.clip_high = 0.2
  cfg.algorithm.kl_coef = 0.0  # TRL default (paper: 0.04)
  return cfg
