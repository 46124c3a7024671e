"""Self-Rewarding LMs (Yuan et al. 2024): the policy judges its own samples; DPO on its verdicts.

  selfplay-jax train --config=configs/self_rewarding.py --workdir=runs/self_rewarding

Warm-up (M1): SFT on gold responses plus judge training (EFT): the policy's own samples and the
gold responses wrapped in the judge template, labelled by the task verifier (correct = 5, wrong =
0). Then each round: sample `sampling.n` candidates per prompt with the iterate M_t, score each
with M_t as the judge (expected score over the score tokens "0".."5", `judge.*`), pair the best
with the worst (ties dropped) and take DPO steps with M_t as the reference. An iteration is
`algorithm.iteration_rounds` rounds; then M_{t+1} becomes the sampler, judge and reference.
The verifier is not used for training; it only measures `train/judge_agreement` (how often the
judge ranks a correct answer above a wrong one; 0.5 = chance) and held-out accuracy.

Starts from `configs/default.py`; the `:key=value` argument is passed through to it. The paper:
N = 4 candidates at T = 0.7, top-p 0.9, 3 sampled judgements each (`judge.num_samples=3`).
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.algorithm.name = "self_rewarding"
  cfg.algorithm.reward = "judge"
  cfg.algorithm.loss_type = "sigmoid"
  cfg.algorithm.beta = 0.1
  cfg.algorithm.iteration_rounds = 1
  cfg.algorithm.num_minibatches = 1
  cfg.sampling.n = 4  # candidates per prompt
  cfg.judge.train_in_warmup = True
  return cfg
