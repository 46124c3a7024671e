"""RLOO: leave-one-out baseline, KL folded into the reward, PPO-clip on the sequence ratio.

  selfplay-jax train --config=configs/rloo.py --workdir=runs/rloo

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/rloo.py:task=sort`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "rloo"
  cfg.algorithm.kl_coef = 0.05  # TRL default beta
  return cfg
