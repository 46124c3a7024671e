"""ReST-MCTS* (Zhang et al. 2024): tree-search rollouts with process values, then SFT on what the
search verified and a process value head on the steps' values.

Countdown by default (a step-structured search problem with many solutions).

  selfplay-jax train --config=configs/rest_mcts.py --workdir=runs/rest_mcts

Each round, for each of 16 problems: a step-level beam search of `algorithm.search_width` = 2
nodes over `algorithm.search_depth` = 3 levels, each node extended by `sampling.n` = 4 rollouts to
the end; a step's value is the fraction of the rollouts through it that the verifier accepts, and
the next beam is the best distinct steps by value + `search_bonus` * sqrt(ln N / n). The distinct
verified responses the search found are the policy's SFT rows; every step with its value is a row
for the process value head (`algorithm.vf_coef`). Comparable ReST-EM: the same warm-up, 16
problems x 24 samples (docs/recipes.md, "Tree search with process values").
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  if not arg or "task=" not in arg:  # Countdown unless `:task=...` says otherwise
    arg = ",".join(filter(None, [arg, "task=countdown"]))
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "rest_mcts"
  cfg.model.num_layers = 3  # Countdown needs the depth (docs/recipes.md, "Countdown, second pass")
  cfg.data.batch_size = 16  # problems per round: 16 x 2 x 3 x 4 = 384 rollouts
  cfg.sampling.n = 4  # rollouts per beam node (the root gets search_width x this)
  cfg.algorithm.search_width = 2
  cfg.algorithm.search_depth = 3  # two steps and the answer for 3 numbers
  cfg.algorithm.vf_coef = 1.0  # the value head's squared error beside the solutions' NLL
  cfg.algorithm.num_minibatches = 2
  cfg.optimizer.learning_rate = 3e-4
  cfg.warmup.rounds = 1600  # SFT on gold solutions first (25600 examples, as 400 rounds of 64)
  cfg.warmup.learning_rate = 1e-3
  cfg.eval.every_rounds = 50
  cfg.rounds = 100
  return cfg
