"""Sharpening (Huang et al. 2025): the model's own likelihood as the reward.

  selfplay-jax train --config=configs/sharpen.py --workdir=runs/sharpen        # SFT-sharpening
  selfplay-jax train --config=configs/sharpen.py:mode=rl --workdir=runs/sharpen_rl

mode=sft (default): sample `sampling.n` completions, keep the one with the highest self-likelihood
(`log π(y|x)` under the policy that sampled, token-averaged by default), NLL on it: amortised
best-of-N. mode=rl: GRPO with reward `log π_base(y|x)` (π_base = the warmed-up model, frozen) and a
KL penalty β·KL(π ‖ π_base). Neither reads the task's answers; held-out accuracy measures whether
sharpening towards the model's own confident outputs helps.

Other `key=value` pairs of the argument are passed through to `configs/default.py`.
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  own, rest = config_lib.pop_arg(arg, mode="sft")
  mode = own.mode
  cfg = config_lib.load_sibling(__file__, "default.py", rest)
  cfg.algorithm.reward = "likelihood"
  cfg.algorithm.likelihood_normalize = "mean"
  if mode == "rl":
    cfg.algorithm.name = "sharpen_rl"
    cfg.algorithm.kl_coef = 0.05  # β of the KL to π_base
  elif mode == "sft":
    cfg.algorithm.name = "sharpen_sft"
  else:
    raise config_lib.ConfigError(f"configs/sharpen.py: mode must be 'sft' or 'rl', got {mode!r}")
  return cfg
