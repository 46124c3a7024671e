"""Offline DPO (Rafailov et al. 2023) and its loss variants on preference pairs.

  selfplay-jax train --config=configs/dpo.py --workdir=runs/dpo
  selfplay-jax train --config=configs/dpo.py --config.data.task=pairs.jsonl \\
      --config.model.hf_path=path/to/hf_model --config.warmup.rounds=0

Pairs come from the data: JSONL rows `{"prompt", "chosen", "rejected"}` (optional `answer` to
measure held-out accuracy), or, on a built-in task, the gold response (chosen) against the same
response with a wrong final answer (rejected). `algorithm.loss_type` picks the loss: sigmoid (DPO),
hinge, ipo, robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, discopop, or the reference-
free simpo / orpo. The reference is the model training starts from (frozen).

Starts from `configs/default.py`; the `:key=value` argument is passed through to it.
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "dpo"
  cfg.algorithm.loss_type = "sigmoid"
  cfg.algorithm.beta = 0.1  # TRL default
  cfg.algorithm.nll_coef = 1.0  # RPO: + NLL(chosen); without it DPO lowers the chosen answers too
  cfg.algorithm.num_minibatches = 1
  return cfg
