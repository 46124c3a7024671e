"""Self-improvement algorithms: losses, advantages and per-algorithm recipes.

`losses` holds the pure, jittable loss and advantage functions (SFT, KL estimators, GRPO / Dr. GRPO /
DAPO / RLOO / REINFORCE++, the DPO family, SimPO, ORPO, KTO, SPIN). Formulas and reference defaults
are in `shared/ALGORITHMS.md`.
"""

# Names accepted by `algorithm.name` (specs are built in `selfplay_jax.evaluate.build_spec`).
ALGORITHMS = ("sft", "rest_em", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp")
GROUP_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo")  # need sampling.n >= 2
PG_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
