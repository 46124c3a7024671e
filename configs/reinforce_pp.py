"""REINFORCE++: per-token KL reward plus outcome reward, return-to-go, batch-whitened advantages, PPO-clip.

  selfplay-jax train --config=configs/reinforce_pp.py --workdir=runs/reinforce_pp

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/reinforce_pp.py:task=sort`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "reinforce_pp"
  cfg.algorithm.kl_coef = 0.01
  return cfg
