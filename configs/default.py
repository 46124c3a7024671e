"""Default (embedded demo) config: GRPO on 2-digit step-by-step addition with the `tiny` model.

With no downloads, `selfplay-jax train` builds a task tokenizer, trains a ~0.4M-parameter model
from scratch with a short SFT warm-up (held-out accuracy 21.5% at seed 0), then runs 200 GRPO rounds
with the task verifier as reward (85.2% at the end); 209 s on an idle 2-core CPU (README).

Usage:
  selfplay-jax train --config=configs/default.py --config.rounds=5 --workdir=runs/demo
  selfplay-jax train --config=configs/default.py:model=llama3_8b,task=arithmetic

The part after `:` is a comma-separated list of `key=value` pairs passed to `get_config(arg)`:
  model      architecture preset, a name in `selfplay_jax.models.config.PRESETS` (default tiny)
  task       built-in task, sets `data.task` (default arithmetic)
  algorithm  sets `algorithm.name` (default grpo)

`--config.model.preset=<name>` on the command line does the same as `:model=<name>`: it resets
every architecture field to that preset before the other `--config.model.*` overrides apply.
Optional fields (e.g. `model.sliding_window`) accept `None` as an override value.
"""

import ml_collections

from selfplay_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; `arg` is the `key=value,...` tail of the config path."""
  arg = config_lib.parse_arg(arg, model="tiny", task="arithmetic", algorithm="grpo")
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0  # PRNG seed for parameter init, sampling and data
  cfg.rounds = 200  # self-improvement rounds (each: sample -> score -> update)
  cfg.progress_bar = True  # tqdm bar over rounds
  cfg.log_every_round = True  # one line of key metrics per round

  cfg.warmup = ml_collections.ConfigDict()
  cfg.warmup.rounds = 110  # SFT rounds on gold responses before self-improvement
  cfg.warmup.num_minibatches = 1  # optimizer steps per warm-up round
  cfg.warmup.learning_rate = 3e-3  # warm-up SFT learning rate (self-improvement: optimizer.*)
  cfg.warmup.final_learning_rate = 0.0  # cosine-decay the warm-up rate to this by its last step; 0 = constant
  cfg.warmup.judge_rounds = -1  # judge.train_in_warmup: the last N warm-up rounds train the judge; -1 = all

  cfg.eval = ml_collections.ConfigDict()
  cfg.eval.every_rounds = 10  # greedy held-out accuracy every N rounds (and at the end)
  cfg.eval.num_examples = 256  # held-out examples per evaluation
  cfg.eval.batch_size = 64  # prompts per evaluation batch
  cfg.eval.search_examples = 64  # rest_mcts: held-out problems of the search vs best-of-N meter; 0 = off
  cfg.eval.judge_samples = -1  # judge meter: samples per held-out prompt; -1 = sampling.n with a judge, 0 = off

  cfg.model = ml_collections.ConfigDict()
  cfg.model.hf_path = ""  # HF checkpoint dir (config.json + safetensors); "" = build from fields
  cfg.model.tokenizer_path = ""  # tokenizer.model / tokenizer.json; "" = the task's own tokens
  # `model.preset` (a name in models.config.PRESETS) plus every ModelConfig field set to that
  # preset's value, generated from the dataclass so the two never drift. Field meanings: see
  # selfplay_jax/models/config.py. With hf_path set only dtype, param_dtype, remat and scan_layers apply.
  config_lib.set_preset(cfg.model, arg.model)
  cfg.model.lora = ml_collections.ConfigDict()  # LoRA adapters (selfplay_jax/models/lora.py)
  cfg.model.lora.rank = 0  # adapter rank; 0 = off (full fine-tuning); > 0: only the adapters train
  cfg.model.lora.alpha = 16.0  # adapter update scale alpha / rank (peft's lora_alpha)
  cfg.model.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj")  # projections with adapters: regexes, each fully matching some of these

  cfg.sampling = ml_collections.ConfigDict()
  cfg.sampling.max_new_tokens = 32  # completion length cap (tokens)
  cfg.sampling.temperature = 1.0  # softmax temperature; 0 = greedy
  cfg.sampling.top_k = 0  # keep the k most likely tokens; 0 = off
  cfg.sampling.top_p = 1.0  # nucleus mass in (0, 1]; 1 = off
  cfg.sampling.n = 8  # completions per prompt (the GRPO group size)
  cfg.sampling.auto_temperature = ""  # B-STaR: temperatures, e.g. "0.5,0.7,0.9,1.1"; each round samples at all, keeps the best-balanced; "" = off

  cfg.optimizer = ml_collections.ConfigDict()
  cfg.optimizer.name = "adamw"  # adamw | adam | sgd | lion | adafactor (optax, selfplay_jax/optim.py)
  cfg.optimizer.learning_rate = 3e-4  # self-improvement learning rate (warm-up: warmup.*)
  cfg.optimizer.warmup_steps = 0  # linear warmup (optimizer steps)
  cfg.optimizer.final_learning_rate = 0.0  # cosine-decay learning_rate to this by the last round; 0 = constant
  cfg.optimizer.weight_decay = 0.0  # decoupled weight decay
  cfg.optimizer.grad_clip = 1.0  # global-norm clipping threshold; 0 = off
  cfg.optimizer.b1 = 0.9  # Adam first-moment decay
  cfg.optimizer.b2 = 0.999  # Adam second-moment decay
  cfg.optimizer.max_bad_updates = 20  # stop after N consecutive non-finite updates (skipped); 0 = never

  cfg.algorithm = ml_collections.ConfigDict()
  cfg.algorithm.name = arg.algorithm  # algorithm spec in selfplay_jax/algorithms/
  cfg.algorithm.spec = ""  # your own spec, "path/file.py:Name" or "module:Name" (docs/extending.md)
  cfg.algorithm.scorer = ""  # your own scorer factory, "file.py:make" or "module:make"; "" = reward
  cfg.algorithm.num_epochs = 1  # passes over each round's rollouts
  cfg.algorithm.num_minibatches = 2  # optimizer steps per epoch (must divide batch_size * n)
  cfg.algorithm.kl_coef = 0.02  # weight of the KL penalty to the reference (the warmed-up policy)
  cfg.algorithm.beta = 0.1  # preference temperature (DPO-family / SPIN losses)
  cfg.algorithm.loss_type = ""  # PG: grpo|bnpo|dr_grpo|dapo|cispo; preference: a DPO loss_type|simpo|orpo|sft
  cfg.algorithm.advantage = ""  # grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline; "" = the algorithm's own
  cfg.algorithm.clip_low = 0.2  # PPO-style ratio clip below 1
  cfg.algorithm.clip_high = 0.2  # ratio clip above 1 (DAPO clip-higher: 0.28)
  cfg.algorithm.restart_from_base = False  # rest_em: each round fine-tunes from the initial params
  cfg.algorithm.max_per_prompt = 0  # rest_em: keep at most N correct samples per prompt; 0 = all
  cfg.algorithm.overlong_buffer = 0  # PG: DAPO soft overlong penalty over the last N tokens; 0 = off
  cfg.algorithm.scale_rewards = ""  # PG advantage std: group | batch | none; "" = the advantage's
  cfg.algorithm.importance_sampling_level = "token"  # PG: token | sequence (GSPO) importance ratio
  cfg.algorithm.delta = 0.0  # PG: two-sided clip, unclipped ratio <= delta (> 1 + clip_high); 0 = off
  cfg.algorithm.entropy_coef = 0.0  # PG: loss -= coef * mean token entropy (training logits / T)
  cfg.algorithm.top_entropy_quantile = 1.0  # PG: train the top-quantile tokens by entropy; 1 = all
  cfg.algorithm.mask_truncated_completions = False  # PG: no loss on completions cut by the budget
  cfg.algorithm.kl_estimator = ""  # PG: k1|k2|k3, KL penalty and KL-shaped rewards; "" = k3 / k1
  cfg.algorithm.reward = ""  # verifier|judge|likelihood|math|python|majority|self_certainty; "" = the algorithm's own
  cfg.algorithm.reward_fn = ""  # a Python reward fn(prompts, completions, **fields), "file.py:fn" or "module:fn"
  cfg.algorithm.reward_fns = ""  # several, comma-separated ("math" = the built-in); their weighted sum
  cfg.algorithm.reward_weights = ""  # comma-separated weights of reward_fns; "" = 1 each
  cfg.algorithm.majority_threshold = 0.0  # reward=majority: prompts whose majority share is below it score NaN; 0 = off
  cfg.algorithm.majority_soft = False  # reward=majority: reward = the share of the sample's answer (SRT soft)
  cfg.algorithm.likelihood_normalize = "mean"  # self-likelihood reward: mean or sum token log-prob
  cfg.algorithm.iteration_rounds = 1  # spin / self_rewarding: rounds per iteration (reference moves)
  cfg.algorithm.replay_previous = False  # spin: also train on the previous iteration's pairs
  cfg.algorithm.label_smoothing = 0.0  # DPO sigmoid/robust/exo_pair, SimPO: label smoothing
  cfg.algorithm.simpo_gamma = 0.5  # SimPO target reward margin
  cfg.algorithm.orpo_lambda = 0.1  # ORPO odds-ratio weight
  cfg.algorithm.nll_coef = 0.0  # preference: + nll_coef * NLL(chosen) per pair (RPO)
  cfg.algorithm.min_score_gap = 0.0  # self_rewarding: pairs need best - worst score > this
  cfg.algorithm.loss_types = ""  # preference: summed loss types, e.g. "sigmoid,bco_pair,sft" (MPO); "" = loss_type
  cfg.algorithm.loss_weights = ""  # ... their weights, e.g. "0.8,0.2,1.0"; "" = 1 each
  cfg.algorithm.beta_schedule = ""  # spin / self_rewarding: beta per iteration, e.g. "0.1,0.1,0.1,5.0"; last repeats
  cfg.algorithm.ref_sync_every = 0  # dpo / kto (TR-DPO): mix the reference towards the policy every N rounds; 0 = off
  cfg.algorithm.ref_sync_alpha = 0.6  # ... ref <- alpha * policy + (1 - alpha) * ref (TRL default 0.6)
  cfg.algorithm.desirable_weight = 1.0  # kto: weight of desirable examples' losses
  cfg.algorithm.undesirable_weight = 1.0  # kto: weight of undesirable examples' losses
  cfg.algorithm.reward_threshold = 1.0  # rest_em: keep samples whose reward >= this (1 = verified; reward=judge: a score); B-STaR monitor's selection
  cfg.algorithm.auto_threshold = ""  # rest_em (B-STaR): thresholds, e.g. "1,2,3,4"; each round keeps the best-balanced; "" = off
  cfg.algorithm.balance_n_star = 8  # B-STaR monitor (bstar/*): distinct correct samples per prompt that count as full exploration
  cfg.algorithm.kto_threshold = 1.0  # kto: a sample is desirable iff its reward >= this (1 = verified correct)

  # PPO with a value head (algorithm.name=ppo, configs/ppo.py; docs/algorithms.md, "PPO with a
  # value head").
  cfg.algorithm.gamma = 1.0  # ppo: GAE discount over completion tokens
  cfg.algorithm.gae_lambda = 0.95  # ppo: GAE lambda (1 = Monte-Carlo returns, 0 = one-step TD)
  cfg.algorithm.value_clip = 0.2  # ppo: value clip range around the old values; 0 = off
  cfg.algorithm.vf_coef = 0.1  # ppo: weight of the value loss (TRL default); rest_mcts: of the value head's loss
  cfg.algorithm.value_warmup_rounds = 0  # ppo: first N rounds train only the value head / critic
  cfg.algorithm.separate_critic = False  # ppo: values from a critic trunk copied from the policy

  # SCoRe, two attempts per episode (algorithm.name=score | score_sft, configs/score.py;
  # docs/algorithms.md, "SCoRe").
  cfg.algorithm.score_stage1_rounds = 20  # score: first N rounds train attempt 2 only, attempt 1 held by score_kl_first
  cfg.algorithm.score_kl_first = 1.0  # score: stage I KL weight on attempt 1 (strong; kl_coef elsewhere)
  cfg.algorithm.score_bonus = 2.0  # score: stage II bonus alpha, attempt 2's reward + alpha * (r2 - r1)
  cfg.algorithm.score_warmup_episodes = "copy"  # score: warm-up rows of gold second attempts after a gold (copy) or half-corrupted (mixed) first; none
  cfg.algorithm.correction_prompt = ""  # score: the instruction after attempt 1, "{prompt}" at its end asks again; "" = "{prompt}" (JSONL: SCoRe's text)

  # ReST-MCTS*, tree-search rollouts with process values (algorithm.name=rest_mcts,
  # configs/rest_mcts.py; docs/algorithms.md, "Tree search with process values").
  cfg.algorithm.search_width = 2  # rest_mcts: beam nodes per problem kept at each level (sampling.n rollouts each)
  cfg.algorithm.search_depth = 3  # rest_mcts: levels of steps searched (countdown with 3 numbers: 2 steps, the answer)
  cfg.algorithm.search_bonus = 0.5  # rest_mcts: exploration bonus c, score = value + c * sqrt(ln N / n)
  cfg.algorithm.search_token_budget = 0  # rest_mcts: sampled tokens per problem the search may use; 0 = no limit
  cfg.algorithm.search_value_weight = 0.0  # rest_mcts: lambda, score mixes (1 - lambda) * rollout value + lambda * value head
  cfg.algorithm.search_verified_only = False  # rest_mcts: extend only steps a rollout through them verified; other slots sample the problem anew
  cfg.algorithm.search_value_warmup = False  # rest_mcts: the warm-up also trains the value head on gold (1) and broken (0) step prefixes (countdown)
  cfg.algorithm.search_separator = ""  # rest_mcts: text that ends a step; "" = the task's own (countdown: a space)

  # The policy as its own judge (algorithm.reward=judge; self_rewarding's default).
  cfg.judge = ml_collections.ConfigDict()
  cfg.judge.template = ""  # "...{prompt}...{response}..."; "" = built-in task / 5-point rubric
  cfg.judge.score_min = 0  # lowest score (a single-digit token)
  cfg.judge.score_max = 5  # highest score
  cfg.judge.num_samples = 0  # 0 = expected score in one pass; m = mean of m sampled judgements
  cfg.judge.temperature = 1.0  # sampled judgements: temperature (0 = greedy, for num_samples=1)
  cfg.judge.max_new_tokens = 8  # sampled judgements: length cap
  cfg.judge.score_marker = ""  # sampled: the score follows this text ("" = first token; rationale: built-in)
  cfg.judge.rationale = False  # judge solves the prompt itself, then scores (needs num_samples)
  cfg.judge.trace = "solve"  # rationale: solve (write the gold solution) | verify (task's check trace)
  cfg.judge.train_in_warmup = True  # warm-up also trains the judge on verifier-labelled samples
  cfg.judge.loss_weight = 1.0  # warm-up loss = NLL(gold) + NLL(rationales) + this * NLL(verdicts)
  cfg.judge.model = "policy"  # who judges: the sampling policy | the reference (frozen: the warmed-up policy)
  cfg.judge.balance = False  # warm-up judge rows: weigh correct and wrong judged responses equally
  cfg.judge.hard_negatives = False  # warm-up judge rows: also each gold response made wrong (countdown)

  cfg.data = ml_collections.ConfigDict()
  cfg.data.task = arg.task  # arithmetic | sort | countdown, a .jsonl file, or file.py:factory
  cfg.data.eval_path = ""  # JSONL data: held-out file; "" = hold out data.heldout_fraction of rows
  cfg.data.heldout_fraction = 0.1  # JSONL data without eval_path: share of prompts held out
  cfg.data.answer_marker = "####"  # JSONL data: the verifier compares what follows this token
  cfg.data.strict = False  # JSONL data: a bad row is an error (True) or skipped and counted
  cfg.data.prompt_format = "raw"  # JSONL data: raw (prompt text as is) | chat (the tokenizer's chat template)
  cfg.data.system_prompt = ""  # chat format: a system message put first when a prompt has none; "" = none
  cfg.data.prompt_field = "prompt"  # JSONL data: the key of the prompt (GSM8K: question; MATH: problem)
  cfg.data.answer_field = "answer"  # JSONL data: the key of the answer (cut after its last answer_marker)
  cfg.data.response_field = "response"  # JSONL data: the key of the gold response (SFT warm-up)
  cfg.data.chosen_field = "chosen"  # JSONL data: the key of a preference pair's chosen response
  cfg.data.rejected_field = "rejected"  # JSONL data: the key of a preference pair's rejected response
  cfg.data.batch_size = 64  # prompts per round (global, across all devices)
  cfg.data.difficulty = 2  # arithmetic: digits per operand; sort: list length; countdown: numbers (2-4)
  cfg.data.max_value = 0  # sort: largest list value (9); countdown: numbers from 1..N (12); 0 = default
  cfg.data.step_by_step = True  # arithmetic: digit-wise worked answer first; addition: the carries first
  cfg.data.max_prompt_len = 16  # prompt length after padding/truncation (tokens)
  cfg.data.max_response_len = 32  # gold response length incl. EOS (tokens)
  cfg.data.max_answer_len = 8  # answer length for the verifier (tokens)
  cfg.data.seed = -1  # shuffle order of the training data (and synthesised rows); -1 = seed

  cfg.population = ml_collections.ConfigDict()  # K models trained side by side (docs/design.md)
  cfg.population.size = 1  # members K; member k inits and samples with seed + k, same data order
  cfg.population.vote_threshold = 1.0  # curriculum: share of the K * sampling.n voters that must agree on a label

  cfg.curriculum = ml_collections.ConfigDict()  # easy-to-hard self-labelling (selfplay_jax/curriculum.py)
  cfg.curriculum.max_digits = 0  # longest addition the rounds label (data.task=addition); 0 = off
  cfg.curriculum.gold_max_digits = 3  # gold labels (warm-up SFT and replay) only up to this length
  cfg.curriculum.advance_threshold = 0.8  # move one digit longer once this share of a round's problems is labelled
  cfg.curriculum.length_filter = True  # drop labels whose answer is longer than a sum of the length can be
  cfg.curriculum.gold_fraction = 0.25  # share of each step's rows that are gold (short) problems; the rest replay labels
  cfg.curriculum.replay_size = 4096  # self-labelled rows kept (a ring buffer in the state)
  cfg.curriculum.split_labels = False  # member k replays only its 1/K share of the labels (less alike errors)

  cfg.metrics = ml_collections.ConfigDict()
  cfg.metrics.plot_every_rounds = 1  # redraw plots/metrics.png every N rounds (and at the end); 0 = off
  cfg.metrics.plot_min_interval_s = 10.0  # ... but at most once per this many seconds (0 = every time)
  cfg.metrics.tensorboard = False  # also write TensorBoard event files to <workdir>/tensorboard
  cfg.metrics.wandb = False  # also log to Weights & Biases (needs `pip install wandb`)
  cfg.metrics.wandb_project = "selfplay_jax"  # W&B project
  cfg.metrics.wandb_name = ""  # W&B run name; "" = the workdir's name

  cfg.checkpoint = ml_collections.ConfigDict()
  cfg.checkpoint.every_rounds = 1  # save every N rounds (and the last); 0 = never (no resume)
  cfg.checkpoint.keep = 3  # most recent checkpoints kept on disk

  cfg.debug = ml_collections.ConfigDict()
  cfg.debug.kill_at_round = 0  # fault injection for tests: SIGKILL this process at round N; 0 = off
  cfg.debug.kill_point = "save"  # "round": as round N starts; "save": right after its save starts
  cfg.debug.kill_signal = "SIGKILL"  # SIGKILL (no clean-up) | SIGTERM | SIGINT (graceful stop)
  cfg.debug.nan_from_round = 0  # fault injection: NaN loss in every update from round N; 0 = off
  cfg.debug.nan_to_round = 0  # ... through round N (inclusive); 0 = to the end

  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.data = -1  # data-parallel axis size; -1 = fill the remaining devices
  cfg.mesh.fsdp = 1  # parameter/optimizer-sharding axis size
  cfg.mesh.tensor = 1  # tensor-parallel axis size
  cfg.mesh.rules = ()  # overrides of sharding.DEFAULT_RULES, e.g. ("mlp=fsdp+tensor", "embed=")
  if arg.task == "countdown":  # numbers and a target (selfplay_jax/data/countdown.py)
    _countdown(cfg)
  return cfg


def _countdown(cfg: ml_collections.ConfigDict) -> None:
  """Token widths for Countdown with `data.difficulty` numbers (3), and a judge that checks: with
  algorithm.reward=judge it writes the task's verification trace of a response, then its score."""
  from selfplay_jax.data import countdown  # pylint: disable=import-outside-toplevel
  cfg.data.difficulty = 3
  task = countdown.CountdownTask(num_numbers=cfg.data.difficulty)
  for key, width in task.widths().items():
    cfg.data[key] = width
  cfg.sampling.max_new_tokens = cfg.data.max_response_len
  cfg.judge.rationale = True
  cfg.judge.trace = "verify"
  cfg.judge.num_samples = 1
  cfg.judge.temperature = 0.0  # a check is deterministic: the greedy trace, not a sampled one
  cfg.judge.max_new_tokens = countdown.trace_width(cfg.data.difficulty) + 3  # + <score>, digit, EOS
