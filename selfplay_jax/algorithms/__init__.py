"""Self-improvement algorithms: losses, advantages and per-algorithm recipes.

`losses` holds the pure, jittable loss and advantage functions (SFT, KL estimators, GRPO / Dr. GRPO /
DAPO / RLOO / REINFORCE++, the DPO family, SimPO, ORPO, KTO, SPIN). Formulas and reference defaults
are in `shared/ALGORITHMS.md`.
"""

# Names accepted by `algorithm.name` (specs are built in `selfplay_jax.evaluate.build_spec`).
PG_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "sharpen_rl")
PREFERENCE_ALGORITHMS = ("dpo", "spin", "self_rewarding")
ALGORITHMS = ("sft", "rest_em", "sharpen_sft") + PG_ALGORITHMS + PREFERENCE_ALGORITHMS
GROUP_ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo", "sharpen_rl", "sharpen_sft",
                    "self_rewarding")  # need sampling.n >= 2
PG_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "apo_zero", "discopop")
PREFERENCE_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo")
REWARDS = ("verifier", "judge", "likelihood")  # what scores a round's samples
