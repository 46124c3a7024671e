"""Easy-to-hard self-labelling (Lee et al. 2025): addition with gold labels up to 3 digits, then
a population of 5 models labels 4-, 5- and 6-digit problems by a unanimous vote and trains on its
own labels.

  selfplay-jax train --config=configs/easy_to_hard.py --workdir=runs/e2h

Warm-up: 5 tiny models (seeds 0..4; each its own gold problems) learn 1-3 digit addition from
gold responses (digits least significant first, zero-padded to 7: the `addition` task). Rounds:
each member answers 512 unlabelled problems of the current length greedily; a problem is
labelled when all 5 members give the same answer and it passes the length filter; each label
trains one member (`curriculum.split_labels`: member k replays the k-th fifth of the buffer), mixed
with gold 1-3 digit problems; the length grows by one digit once 60% of a round's problems are
labelled. No answer of a problem longer than 3 digits reaches training. Held-out greedy accuracy
at every length, per member and by the population's vote: `eval/accuracy@{digits}`,
`eval/accuracy_vote@{digits}`; plot `plots/accuracy_by_length.png`. Results and ablations:
docs/recipes.md.
"""

from selfplay_jax import config_lib


def get_config(arg: str | None = None):
  cfg = config_lib.load_sibling(__file__, "default.py", arg)
  cfg.data.task = "addition"
  cfg.algorithm.name = "sft"  # the rounds fine-tune on the population's own labels
  cfg.algorithm.num_minibatches = 8  # optimizer steps per round (64 rows each)
  cfg.data.batch_size = 512  # unlabelled problems and SFT rows per round
  cfg.curriculum.gold_max_digits = 3
  cfg.curriculum.max_digits = 6
  cfg.population.size = 5
  cfg.population.vote_threshold = 1.0  # all five members agree
  cfg.curriculum.split_labels = True  # each label trains one member: their errors stay less alike
  cfg.curriculum.advance_threshold = 0.6  # one digit longer once 60% of a round's problems get a label
  cfg.sampling.temperature = 0.0  # each member labels with its greedy answer
  cfg.sampling.n = 1
  cfg.data.step_by_step = False  # no carries scratchpad: it generalises worse (docs/recipes.md)
  cfg.sampling.max_new_tokens = 10  # "####", 8 answer digits (7 + a spare zero), EOS
  cfg.model.num_layers = 2
  cfg.warmup.rounds = 150
  cfg.warmup.num_minibatches = 8  # 1200 gold SFT steps of 64 rows
  cfg.warmup.learning_rate = 1e-3
  cfg.warmup.final_learning_rate = 1e-4  # cosine decay: the gold lengths are learnt to ~100%
  cfg.optimizer.learning_rate = 3e-4
  cfg.rounds = 150
  cfg.eval.every_rounds = 10
  cfg.eval.num_examples = 128
  cfg.eval.batch_size = 128
  return cfg
