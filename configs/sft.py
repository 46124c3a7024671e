"""SFT only: keep fine-tuning on the gold responses (the baseline self-improvement must beat).

  selfplay-jax train --config=configs/sft.py --workdir=runs/sft

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/sft.py:task=sort`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "sft"  # masked NLL on data gold responses; no sampling
  return cfg
