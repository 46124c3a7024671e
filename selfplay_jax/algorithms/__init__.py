"""Self-improvement algorithms: losses, advantages and per-algorithm recipes.

`losses` holds the pure, jittable loss and advantage functions (SFT, KL estimators, GRPO / Dr. GRPO /
DAPO / RLOO / REINFORCE++, the DPO family, SimPO, ORPO, KTO, SPIN). Formulas and reference defaults
are in `shared/ALGORITHMS.md`.
"""
