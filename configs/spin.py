"""SPIN (Chen et al. 2024): self-play against the previous iterate, on gold SFT data.

  selfplay-jax train --config=configs/spin.py --workdir=runs/spin

Each round pairs every gold response of the batch (chosen) with a response the opponent generated
for the same prompt (rejected); the opponent and the DPO reference are the previous iterate θ_t.
An iteration is `algorithm.iteration_rounds` rounds: the opponent / reference move to the new
parameters at its end. `algorithm.replay_previous=True` also trains each round on the pairs of the
previous iteration (the paper mixes the previous iteration's generated data). A pair whose
generated response equals the gold one contributes no gradient (its two log-ratios cancel).

Starts from `configs/default.py` (task, model, warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/spin.py:task=sort`). Paper settings for 7B models: β = 0.1,
RMSprop lr 5e-7; here a tiny model trains from scratch, so Adam and a larger rate are used.
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "spin"
  cfg.algorithm.loss_type = "sigmoid"  # or hinge
  cfg.algorithm.beta = 0.1
  cfg.algorithm.iteration_rounds = 1  # the opponent is the iterate of the previous round
  cfg.algorithm.replay_previous = False
  cfg.sampling.n = 1  # one generated response per gold response, as in the paper
  cfg.sampling.temperature = 1.0
  cfg.algorithm.num_minibatches = 1
  return cfg
