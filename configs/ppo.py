"""PPO with a value head (issue 21): GAE advantages from a value head on the policy trunk, clipped
policy and value losses, the value head warmed up first (docs/algorithms.md, "PPO with a value
head").

  selfplay-jax train --config=configs/ppo.py --workdir=runs/ppo

Starts from `configs/default.py` (task, model, SFT warm-up, evaluation); the `:key=value` argument
is passed through to it (e.g. `configs/ppo.py:task=sort`). `--config.algorithm.separate_critic=True`
gives the values a critic trunk of their own (a copy of the warmed-up policy).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "ppo"
  cfg.algorithm.clip_low = 0.2
  cfg.algorithm.clip_high = 0.2
  cfg.algorithm.kl_coef = 0.0  # per-token KL to the reference in the rewards (OpenRLHF: 0.01)
  cfg.algorithm.gamma = 1.0  # TRL / OpenRLHF default
  cfg.algorithm.gae_lambda = 0.95  # TRL / OpenRLHF default
  cfg.algorithm.value_clip = 0.2  # TRL cliprange_value
  cfg.algorithm.vf_coef = 0.1  # TRL default
  cfg.algorithm.value_warmup_rounds = 10  # first, the value head learns the returns alone
  return cfg
