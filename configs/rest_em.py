"""ReST-EM / STaR expert iteration: sample n per prompt, keep verified-correct samples, SFT on them.

  selfplay-jax train --config=configs/rest_em.py --workdir=runs/rest_em

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/rest_em.py:task=sort`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "rest_em"
  cfg.algorithm.restart_from_base = False  # True: each round fine-tunes from the warmed-up params
  return cfg
