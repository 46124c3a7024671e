"""TTRL / SRT: GRPO rewarded by the majority vote of the policy's own answers (label-free).

  selfplay-jax train --config=configs/ttrl.py --workdir=runs/ttrl

Each prompt's `sampling.n` samples vote: a sample whose final answer (after `####`) is the group's
most common one gets reward 1, the others 0 (docs/algorithms.md §6.6). The task's answers are never
read for rewards; with a verifier the run still logs `train/label_accuracy` (how often the vote's
answer is right) and held-out accuracy. The SFT warm-up must leave the model right by majority on
most prompts for the vote to teach the right answers. Starts from `configs/default.py`; the
`:key=value` argument is passed through to it.
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "grpo"
  cfg.algorithm.reward = "majority"
  cfg.algorithm.kl_coef = 0.0  # TRL default (TTRL: none)
  # A warm-up whose samples agree on the right answer often enough for the vote to be a useful
  # label (held-out maj@8 66% at T = 1, greedy 73% after 250 rounds, seed 0), and small steps:
  # at the default 3e-4 the vote's wrong labels (a third of the prompts) pull accuracy down.
  cfg.warmup.rounds = 250
  cfg.optimizer.learning_rate = 5e-5
  cfg.rounds = 100
  return cfg
