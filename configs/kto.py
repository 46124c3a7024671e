"""KTO (Ethayarajh et al. 2024) on the round's own samples, labelled by the verifier.

  selfplay-jax train --config=configs/kto.py --workdir=runs/kto

Each round samples `sampling.n` completions per prompt from the policy; each is one unpaired
example, desirable iff its reward >= `algorithm.kto_threshold` (1 = verified correct). The loss is
TRL's KTOTrainer loss: desirable `w_d·(1 − σ(β(ρ − z0)))`, undesirable `w_u·(1 − σ(β(z0 − ρ)))`,
ρ = lp_θ(y) − lp_ref(y), with the KL reference point z0 estimated on mismatched (prompt,
completion) pairs of the batch. The reference is the warmed-up model, frozen (or mixed towards the
policy with `algorithm.ref_sync_every`, TR-DPO). One optimizer step per round keeps z0 exactly
TRL's (it is taken under the parameters that sampled the round). Unlike best-vs-worst pairs, a
group whose samples are all correct (or all wrong) still trains.

Starts from `configs/default.py`; the `:key=value` argument is passed through to it. TRL defaults:
β = 0.1, desirable_weight = undesirable_weight = 1 (TRL advises keeping
w_d·n_d / (w_u·n_u) in [1, 4/3]).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "kto"
  cfg.algorithm.beta = 0.1  # TRL default
  cfg.algorithm.desirable_weight = 1.0
  cfg.algorithm.undesirable_weight = 1.0
  cfg.algorithm.kto_threshold = 1.0  # desirable = verified correct
  cfg.algorithm.num_minibatches = 1  # one step per round: z0 is TRL's (see above)
  cfg.sampling.n = 4
  return cfg
