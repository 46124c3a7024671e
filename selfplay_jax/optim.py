"""The optimizer a run config names (`optimizer.name`), built from optax.

  tx = optim.build_optimizer(cfg)   # an optax.GradientTransformation for both training phases

Every optimizer follows one learning-rate schedule over both phases, so a run has one optimizer
(one state layout) and checkpoints look the same in either phase:

  steps [0, warmup.rounds * warmup.num_minibatches)   warmup.learning_rate (the warm-up SFT steps;
                                                      with warmup.final_learning_rate > 0, a
                                                      cosine decay from it to that value)
  after that                                          optimizer.learning_rate, reached by a linear
                                                      ramp from 0 over optimizer.warmup_steps
                                                      (0 = no ramp); with
                                                      optimizer.final_learning_rate > 0, then a
                                                      cosine decay from it to that value by the
                                                      run's last round (`main_steps(cfg)`)

With `optimizer.grad_clip > 0`, `optax.clip_by_global_norm(grad_clip)` comes first in the chain.

Keys each optimizer reads, besides the schedule keys above (`warmup.rounds`,
`warmup.num_minibatches`, `warmup.learning_rate`, `optimizer.learning_rate`,
`optimizer.warmup_steps`) and `optimizer.grad_clip`, which all of them read:

  adamw      optax.adamw: b1, b2, weight_decay (decoupled: each step subtracts
             lr * weight_decay * param)
  adam       optax.adam: b1, b2; weight_decay > 0 adds weight_decay * param to the (clipped)
             gradient first (L2, as torch.optim.Adam), via optax.add_decayed_weights
  sgd        optax.sgd (no momentum); weight_decay > 0 adds weight_decay * param to the (clipped)
             gradient first (L2 = lr-scaled decoupled decay for plain SGD), via
             optax.add_decayed_weights
  lion       optax.lion: b1, b2, weight_decay (decoupled, lr-scaled; optax's default 1e-3 is not
             used: weight_decay 0 means none)
  adafactor  optax.adafactor with its other defaults (factored second moments, relative step
             size, no momentum): weight_decay as `weight_decay_rate` (0 = none). Note optax
             applies this one per step *without* the learning rate: each step subtracts
             weight_decay * param, so a value comparable to adamw's is lr times smaller.

`b1` and `b2` are not read by sgd or adafactor; changing `optimizer.name` changes the optimizer
state, so a checkpoint resumes only with the optimizer that wrote it.
"""

from __future__ import annotations

import optax

from selfplay_jax.errors import ConfigError

__all__ = ["OPTIMIZERS", "build_optimizer", "learning_rate_schedule", "main_steps"]

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")


def main_steps(cfg) -> int:
  """Optimizer steps of the run's `rounds` self-improvement rounds: `algorithm.num_minibatches`
  per round (times `algorithm.num_epochs`, except in the easy-to-hard curriculum, whose rounds
  make one pass). The horizon of `optimizer.final_learning_rate`'s decay."""
  per_round = cfg.algorithm.num_minibatches
  if not cfg.curriculum.max_digits:
    per_round *= cfg.algorithm.num_epochs
  return cfg.rounds * per_round


def learning_rate_schedule(cfg) -> optax.Schedule:
  """`warmup.learning_rate` for the warm-up SFT steps (cosine-decayed to
  `warmup.final_learning_rate` when that is > 0), then `optimizer.learning_rate` (after
  `optimizer.warmup_steps` of linear ramp from 0) for self-improvement, cosine-decayed to
  `optimizer.final_learning_rate` by the last round when that is > 0."""
  o, w = cfg.optimizer, cfg.warmup
  if o.final_learning_rate:
    decay = max(main_steps(cfg) - o.warmup_steps, 1)
    main = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, o.warmup_steps + decay, o.final_learning_rate)
  elif o.warmup_steps:
    main = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
  else:
    main = optax.constant_schedule(o.learning_rate)
  warm_steps = w.rounds * w.num_minibatches
  warm = (optax.cosine_decay_schedule(w.learning_rate, max(warm_steps, 1),
                                      alpha=w.final_learning_rate / w.learning_rate)
          if w.final_learning_rate else optax.constant_schedule(w.learning_rate))
  return optax.join_schedules([warm, main], [warm_steps])


def build_optimizer(cfg) -> optax.GradientTransformation:
  """The optimizer `cfg.optimizer.name` names (one of OPTIMIZERS) over both training phases, with
  `learning_rate_schedule(cfg)`, after global-norm clipping when `optimizer.grad_clip > 0`.

  Raises ConfigError naming `optimizer.name` for a name not in OPTIMIZERS."""
  o = cfg.optimizer
  if o.name not in OPTIMIZERS:
    raise ConfigError(f"optimizer.name: must be one of {OPTIMIZERS}, got {o.name!r}")
  lr = learning_rate_schedule(cfg)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  if o.name == "adamw":
    chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  elif o.name == "lion":
    chain.append(optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  elif o.name == "adafactor":
    chain.append(optax.adafactor(lr, weight_decay_rate=o.weight_decay or None))
  else:  # adam, sgd: weight decay as L2 on the gradient
    if o.weight_decay:
      chain.append(optax.add_decayed_weights(o.weight_decay))
    chain.append(optax.adam(lr, b1=o.b1, b2=o.b2) if o.name == "adam" else optax.sgd(lr))
  return optax.chain(*chain)
