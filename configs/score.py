"""SCoRe (Kumar et al. 2024): two-attempt episodes, RL for correcting the first attempt.

Countdown by default (a step-structured search problem with many solutions).

  selfplay-jax train --config=configs/score.py --workdir=runs/score
  selfplay-jax train --config=configs/score.py --config.algorithm.name=score_sft --workdir=runs/score_sft

Each round: 4 first attempts per problem; each is followed by the problem asked again (the
built-in tasks' correction instruction, `{prompt}`) and a second attempt; the verifier scores both. Stage I
(the first `algorithm.score_stage1_rounds` rounds) trains the second attempt while a strong KL
(`algorithm.score_kl_first`) holds the first at the warmed-up policy; stage II trains both, the
second with the progress bonus alpha * (r2 - r1) (`algorithm.score_bonus`). `score_sft` is the
baseline: SFT on the verified second attempts (correction traces). Held-out greedy metrics:
`eval/accuracy@t1`, `eval/accuracy@t2`, `eval/delta_i2c`, `eval/delta_c2i`
(docs/recipes/score.md).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  if not arg or "task=" not in arg:  # Countdown unless `:task=...` says otherwise
    arg = ",".join(filter(None, [arg, "task=countdown"]))
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "score"
  cfg.model.num_layers = 3  # Countdown needs the depth (docs/recipes.md, "Countdown, second pass")
  cfg.sampling.n = 4  # first attempts per problem (the leave-one-out baseline's group)
  cfg.data.batch_size = 64  # problems per round: 256 episodes, 512 training rows
  cfg.algorithm.num_minibatches = 1  # one on-policy update per round
  cfg.algorithm.kl_coef = 0.05  # KL to the warmed-up policy on every attempt (stage II, attempt 2)
  cfg.optimizer.learning_rate = 3e-4
  cfg.warmup.rounds = 400  # SFT on gold solutions first
  cfg.warmup.num_minibatches = 2
  cfg.warmup.learning_rate = 1e-3
  cfg.eval.every_rounds = 20
  if cfg.data.task == "countdown":  # the format, and half the first attempts shown wrong
    cfg.algorithm.score_warmup_episodes = "mixed"
  cfg.rounds = 100
  return cfg
