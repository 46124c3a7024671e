"""Dr. GRPO: group-centred advantages without std scaling, constant length normaliser, no KL.

  selfplay-jax train --config=configs/dr_grpo.py --workdir=runs/dr_grpo

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/dr_grpo.py:task=sort`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "dr_grpo"
  cfg.algorithm.kl_coef = 0.0
  return cfg
