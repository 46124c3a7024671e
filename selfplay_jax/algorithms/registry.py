"""The algorithm registry: everything the rest of the package knows about one method, in one entry.

  entry = registry.get("grpo")
  spec = entry.make_spec(cfg)          # what the round runs (see `spec.py`)
  rows, what = entry.train_rows(cfg)   # rows one round trains on (minibatch checks, plan)

Adding a method is one spec file (a frozen dataclass with `build` and `loss`), one `register`
call below (or in your own module, imported before the run is built) and one config under
`configs/`. Validation (`config_validation.py`), the memory plan (`plan.py`) and the run set-up
(`setup.py`) ask the entry; nothing else tests algorithm names. A spec from outside the package
(`algorithm.spec=path/file.py:Name`) is built by `build_spec` without an entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from selfplay_jax import config_lib
from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.algorithms.ppo import PPO
from selfplay_jax.algorithms.preference import KTO, Preference
from selfplay_jax.algorithms.score import SCoRe
from selfplay_jax.algorithms.search import RestMCTS, SearchConfig
from selfplay_jax.algorithms.sft import SFT, RestEM
from selfplay_jax.algorithms.spec import REFERENCES, Spec
from selfplay_jax.errors import ConfigError

# What scores a round's samples (algorithm.reward); math and python: host-side Python reward
# functions (scoring/python_rewards.py), python implied by algorithm.reward_fn(s); majority and
# self_certainty: label-free rewards (scoring/label_free.py, TTRL / SRT and INTUITOR).
REWARDS = ("verifier", "judge", "likelihood", "math", "python", "majority", "self_certainty")
# Rewards chosen in place of the verifier's (the algorithm must sample and read rewards).
SCORED_REWARDS = ("judge", "likelihood", "math", "python", "majority", "self_certainty")
Passes = list[tuple[str, int, int]]  # (what, sequences, length) of a round's forward passes


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One `algorithm.name`: how to build its spec and what it needs from the config and the data.

  make_spec: cfg -> Spec.
  default_reward: the reward when `algorithm.reward` is "" (judge, likelihood or verifier).
  samples: the round samples from the model (else nothing is scored: `algorithm.reward` is
    refused).
  uses_rewards: the samples' scores shape the update (SPIN samples but only pairs them with gold).
  loss_types: accepted `algorithm.loss_type` values ("" always means the algorithm's own).
  min_samples: the least `sampling.n` (2 for group-relative advantages and best-vs-worst pairs).
  pair_data: data batches carry chosen / rejected responses (offline DPO).
  needs_gold: JSONL rows need a `response` (trains on gold responses).
  iterates: the reference moves to the policy every `algorithm.iteration_rounds` rounds (SPIN,
    Self-Rewarding): `algorithm.beta_schedule` applies.
  ref_sync: a frozen reference that `algorithm.ref_sync_every` may mix towards the policy
    (TR-DPO).
  train_rows: cfg -> (rows one round trains on, how they come about); num_minibatches must divide.
  passes: (cfg, spec) -> forward passes over whole batches, for the memory plan.
  wrap_optimizer: (cfg, optimizer) -> optimizer, or None: the method's own gate around the
    run's optimizer (PPO's value warm-up freezes the policy; `setup.build_optimizer` applies it).
  sequence: cfg -> (the longest sequence the sampler holds, in tokens, and how it comes about):
    the position check (`model.max_position_embeddings`) and the memory plan's cache slots.
  sampler_rows: cfg -> rows of the round's largest sampler call (the memory plan's cache).
  """

  name: str
  make_spec: Callable[[Any], Spec]
  default_reward: str = "verifier"
  samples: bool = True
  uses_rewards: bool = True
  loss_types: tuple[str, ...] = ()
  min_samples: int = 1
  pair_data: bool = False
  needs_gold: bool = False
  iterates: bool = False
  ref_sync: bool = False
  train_rows: Callable[[Any], tuple[int, str]] = lambda cfg: (
      cfg.data.batch_size * cfg.sampling.n, "data.batch_size * sampling.n")
  passes: Callable[[Any, Spec], Passes] = lambda cfg, spec: []
  wrap_optimizer: Callable[[Any, Any], Any] | None = None
  sequence: Callable[[Any], tuple[int, str]] = lambda cfg: _prompt_and_completion(cfg)
  sampler_rows: Callable[[Any], int] = lambda cfg: cfg.data.batch_size * cfg.sampling.n


def _prompt_and_completion(cfg) -> tuple[int, str]:
  return (cfg.data.max_prompt_len + cfg.sampling.max_new_tokens,
          "data.max_prompt_len + sampling.max_new_tokens")


def sampler_shape(cfg) -> tuple[int, int, str]:
  """(rows, longest sequence in tokens, how that length comes about) of the round's largest
  sampler call: the entry's `sampler_rows` and `sequence`; your own spec samples B·n prompts and
  completions."""
  entry = entry_of(cfg)
  if entry is None:
    return (cfg.data.batch_size * cfg.sampling.n, *_prompt_and_completion(cfg))
  return (entry.sampler_rows(cfg), *entry.sequence(cfg))


_REGISTRY: dict[str, Algorithm] = {}


def register(entry: Algorithm) -> Algorithm:
  """Adds (or replaces) an entry; `algorithm.name=<entry.name>` then selects it."""
  _REGISTRY[entry.name] = entry
  return entry


def get(name: str) -> Algorithm:
  if name not in _REGISTRY:
    raise ConfigError(f"algorithm.name: must be one of {names()} (or set algorithm.spec to your "
                      f"own spec), got {name!r}")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def entry_of(cfg) -> Algorithm | None:
  """The entry of `algorithm.name`, or None for your own spec (`algorithm.spec`)."""
  return None if cfg.algorithm.spec else get(cfg.algorithm.name)


# ---- spec from a config -------------------------------------------------------------------------

_SPEC_ATTRIBUTES = ("name", "samples", "reference", "restart_from_base", "build", "loss")


def build_spec(cfg) -> Spec:
  """The spec a run trains with: the registry entry's, or your own (`algorithm.spec`)."""
  if cfg.algorithm.spec:
    return _custom_spec(cfg)
  return get(cfg.algorithm.name).make_spec(cfg)


def _custom_spec(cfg) -> Spec:
  """`algorithm.spec`: a class with `from_config(cfg)`, or a function `f(cfg)`, giving a spec."""
  ref = cfg.algorithm.spec
  obj = config_lib.import_object(ref, "algorithm.spec")
  if isinstance(obj, type):
    if not hasattr(obj, "from_config"):
      raise ConfigError(f"algorithm.spec: class {ref} needs a from_config(cfg) classmethod (or "
                        "name a function f(cfg) -> spec)")
    spec = obj.from_config(cfg)
  elif callable(obj):
    spec = obj(cfg)
  else:
    raise ConfigError(f"algorithm.spec: {ref} is not a spec class or a function (got a "
                      f"{type(obj).__name__} object)")
  missing = [a for a in _SPEC_ATTRIBUTES if not hasattr(spec, a)]
  if missing:
    raise ConfigError(f"algorithm.spec: {ref} gave a {type(spec).__name__} without "
                      f"{', '.join(missing)} (see selfplay_jax/algorithms/spec.py)")
  if spec.reference not in REFERENCES:
    raise ConfigError(f"algorithm.spec: {ref}.reference must be one of {REFERENCES}, got "
                      f"{spec.reference!r}")
  return spec


# ---- forward passes (memory plan) -----------------------------------------------------------------


def _chunk(cfg, rows: int) -> int:
  """Rows of one chunk of a frozen pass (`completion_logprobs(num_chunks=num_minibatches)`)."""
  k = cfg.algorithm.num_minibatches
  return rows // k if rows % k == 0 else rows


def _sample_passes(cfg, spec) -> Passes:
  b, n = cfg.data.batch_size, cfg.sampling.n
  p, new = cfg.data.max_prompt_len, cfg.sampling.max_new_tokens
  k = cfg.algorithm.num_minibatches
  return [("old / reference log-prob pass (one chunk)", _chunk(cfg, b * n), p + new),
          ("training step", b * n // k, p + new)]


def _rejection_passes(cfg, spec) -> Passes:
  b, n, k = cfg.data.batch_size, cfg.sampling.n, cfg.algorithm.num_minibatches
  return [("training step", b * n // k, cfg.data.max_prompt_len + cfg.sampling.max_new_tokens)]


def _sft_passes(cfg, spec) -> Passes:
  b, k = cfg.data.batch_size, cfg.algorithm.num_minibatches
  return [("training step", b // k, cfg.data.max_prompt_len + cfg.data.max_response_len)]


def _pair_passes(cfg, spec) -> Passes:
  b, n, d = cfg.data.batch_size, cfg.sampling.n, cfg.data
  new, k = cfg.sampling.max_new_tokens, cfg.algorithm.num_minibatches
  pairs, width = {"data": (b, d.max_response_len),
                  "gold_vs_sample": (b * n, max(d.max_response_len, new)),
                  "best_vs_worst": (b, new)}[spec.pairs]
  pairs *= 2 if spec.replay else 1
  passes = []
  if spec.reference != "none":
    passes.append(("reference log-prob pass (pairs, one chunk)", _chunk(cfg, 2 * pairs),
                   d.max_prompt_len + width))
  passes.append(("training step (pairs)", 2 * pairs // k, d.max_prompt_len + width))
  return passes


# ---- the built-in methods -------------------------------------------------------------------------


def _sft(cfg) -> Spec:
  return SFT()


def _rest_em(cfg) -> Spec:
  a = cfg.algorithm
  # judge.model=reference: a frozen copy of the warmed-up policy judges the samples
  return RestEM(name=a.name, group_size=cfg.sampling.n, restart_from_base=a.restart_from_base,
                max_per_prompt=a.max_per_prompt, threshold=a.reward_threshold,
                select="best" if a.name == "sharpen_sft" else "threshold",
                reference="frozen" if cfg.judge.model == "reference" else "none")


def _policy_gradient(loss_type: str, advantage: str, *, dynamic_filter: bool = False,
                     reference_reward: bool = False) -> Callable[[Any], Spec]:
  """A PolicyGradient factory with the method's own loss type and advantage estimator.
  `reference_reward`: the reward reads the frozen reference (RL-sharpening keeps it even
  without a KL term)."""

  def make(cfg) -> Spec:
    a = cfg.algorithm
    # Without a KL term (or a reward that reads it) the reference is never read: no copy kept.
    # judge.model=reference: the frozen reference judges the samples.
    keep_ref = a.kl_coef > 0 or reference_reward or cfg.judge.model == "reference"
    return PolicyGradient(name=a.name, group_size=cfg.sampling.n,
                          loss_type=a.loss_type or loss_type, advantage=a.advantage or advantage,
                          clip_low=a.clip_low, clip_high=a.clip_high, kl_coef=a.kl_coef,
                          kl_kind=a.kl_estimator or "k3", reward_kl_kind=a.kl_estimator or "k1",
                          scale_rewards=a.scale_rewards,
                          temperature=cfg.sampling.temperature or 1.0,  # greedy: the model's
                          importance_sampling_level=a.importance_sampling_level, delta=a.delta,
                          entropy_coef=a.entropy_coef, top_entropy_quantile=a.top_entropy_quantile,
                          mask_truncated_completions=a.mask_truncated_completions,
                          dynamic_filter=dynamic_filter,
                          max_completion_len=cfg.sampling.max_new_tokens,
                          overlong_buffer=a.overlong_buffer,
                          reference="frozen" if keep_ref else "none")

  return make


def split_list(text: str) -> tuple[str, ...]:
  """`"a, b,c"` -> ("a", "b", "c"); "" -> () (list-valued config keys are comma-separated)."""
  return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_floats(key: str, text: str) -> tuple[float, ...]:
  """A comma-separated list of numbers (`algorithm.loss_weights`, `algorithm.beta_schedule`)."""
  try:
    return tuple(float(part) for part in split_list(text))
  except ValueError:
    raise ConfigError(f"{key}: must be comma-separated numbers, got {text!r}") from None


def _preference(pairs: str, reference: str, sample_from: str,
                replay_key: bool = False) -> Callable[[Any], Spec]:
  """A Preference factory: where pairs come from, which reference, who samples; `replay_key`:
  `algorithm.replay_previous` keeps the previous iteration's pairs."""

  def make(cfg) -> Spec:
    a = cfg.algorithm
    loss_type = a.loss_type or "sigmoid"
    loss_types = split_list(a.loss_types)
    ref = reference
    if pairs == "data" and all(t in losses.REFERENCE_FREE_LOSS_TYPES
                               for t in loss_types or (loss_type,)):
      ref = "none"  # reference-free losses, nothing samples
    return Preference(name=a.name, pairs=pairs, loss_type=loss_type, beta=a.beta,
                      label_smoothing=a.label_smoothing, simpo_gamma=a.simpo_gamma,
                      orpo_lambda=a.orpo_lambda, nll_coef=a.nll_coef, group_size=cfg.sampling.n,
                      min_score_gap=a.min_score_gap, reference=ref,
                      reference_every=a.iteration_rounds, sample_from=sample_from,
                      replay=replay_key and a.replay_previous, loss_types=loss_types,
                      loss_weights=parse_floats("algorithm.loss_weights", a.loss_weights),
                      beta_schedule=parse_floats("algorithm.beta_schedule", a.beta_schedule),
                      ref_sync_alpha=a.ref_sync_alpha,
                      ref_sync_every=a.ref_sync_every if ref == "frozen" else 0)

  return make


def _kto(cfg) -> Spec:
  a = cfg.algorithm
  return KTO(name=a.name, beta=a.beta, desirable_weight=a.desirable_weight,
             undesirable_weight=a.undesirable_weight, threshold=a.kto_threshold,
             group_size=cfg.sampling.n, ref_sync_alpha=a.ref_sync_alpha,
             ref_sync_every=a.ref_sync_every)


def _kto_passes(cfg, spec) -> Passes:
  b, n, k = cfg.data.batch_size, cfg.sampling.n, cfg.algorithm.num_minibatches
  width = cfg.data.max_prompt_len + cfg.sampling.max_new_tokens
  return [("reference / mismatched-pair log-prob pass (one chunk)", _chunk(cfg, b * n), width),
          ("training step", b * n // k, width)]


def _spin_rows(cfg) -> tuple[int, str]:
  rows = cfg.data.batch_size * cfg.sampling.n
  if cfg.algorithm.replay_previous:
    return 2 * rows, "2 * data.batch_size * sampling.n (new and replayed pairs)"
  return rows, "data.batch_size * sampling.n"


_ONE_PAIR_PER_PROMPT = lambda cfg: (cfg.data.batch_size, "data.batch_size (one pair per prompt)")
_PG = losses.PG_LOSS_TYPES
_PREF = losses.PREFERENCE_LOSS_TYPES

register(Algorithm("sft", _sft, samples=False, uses_rewards=False, needs_gold=True,
                   train_rows=lambda cfg: (cfg.data.batch_size, "data.batch_size"),
                   passes=_sft_passes))
register(Algorithm("rest_em", _rest_em, passes=_rejection_passes))
register(Algorithm("sharpen_sft", _rest_em, default_reward="likelihood", min_samples=2,
                   passes=_rejection_passes))
register(Algorithm("grpo", _policy_gradient("grpo", "grpo"), loss_types=_PG, min_samples=2,
                   passes=_sample_passes))
register(Algorithm("dr_grpo", _policy_gradient("dr_grpo", "dr_grpo"), loss_types=_PG,
                   min_samples=2, passes=_sample_passes))
register(Algorithm("dapo", _policy_gradient("dapo", "grpo", dynamic_filter=True), loss_types=_PG,
                   min_samples=2, passes=_sample_passes))
register(Algorithm("rloo", _policy_gradient("grpo", "rloo"), loss_types=_PG, min_samples=2,
                   passes=_sample_passes))
register(Algorithm("reinforce_pp", _policy_gradient("bnpo", "reinforce_pp"), loss_types=_PG,
                   passes=_sample_passes))
register(Algorithm("sharpen_rl", _policy_gradient("grpo", "grpo", reference_reward=True),
                   default_reward="likelihood", loss_types=_PG, min_samples=2,
                   passes=_sample_passes))
register(Algorithm("dpo", _preference("data", "frozen", "policy"), samples=False,
                   uses_rewards=False, loss_types=_PREF, pair_data=True, ref_sync=True,
                   train_rows=_ONE_PAIR_PER_PROMPT, passes=_pair_passes))
register(Algorithm("spin", _preference("gold_vs_sample", "previous", "reference", replay_key=True),
                   uses_rewards=False, loss_types=_PREF, needs_gold=True, iterates=True,
                   train_rows=_spin_rows, passes=_pair_passes))
register(Algorithm("self_rewarding", _preference("best_vs_worst", "previous", "reference"),
                   default_reward="judge", loss_types=_PREF, min_samples=2, iterates=True,
                   train_rows=_ONE_PAIR_PER_PROMPT, passes=_pair_passes))
register(Algorithm("kto", _kto, ref_sync=True, passes=_kto_passes))


# SCoRe (algorithms/score.py): two attempts per episode; its keys are the "SCoRe" block of
# configs/default.py. The correction instruction's token ids are set by `setup.correction_tokens`
# (it has the tokenizer); for JSONL data with `algorithm.correction_prompt` "" the instruction is
# the paper's, for MATH.
SCORE_JSONL_INSTRUCTION = (
    "\n\nThere might be an error in the solution above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution.\n")


def score_episode_len(cfg) -> int:
  """A bound on one SCoRe episode's length in tokens: x, y1, the instruction (at most a token per
  character), x again, y2 (the position check and the memory plan's widths)."""
  instruction = cfg.algorithm.correction_prompt.replace("{prompt}", "") or (
      SCORE_JSONL_INSTRUCTION if cfg.data.task.endswith(".jsonl") else "")
  return 2 * (cfg.data.max_prompt_len + cfg.sampling.max_new_tokens) + len(instruction)


def _score(cfg) -> Spec:
  a = cfg.algorithm
  return SCoRe(name=a.name, group_size=cfg.sampling.n,
               objective="sft" if a.name == "score_sft" else "rl",
               stage1_rounds=a.score_stage1_rounds, kl_first=a.score_kl_first, kl_coef=a.kl_coef,
               bonus=a.score_bonus,
               # the RL objective trains log-probs at the sampling temperature; SFT at T = 1
               temperature=(cfg.sampling.temperature or 1.0) if a.name == "score" else 1.0,
               clip_low=a.clip_low, clip_high=a.clip_high)


def _score_passes(cfg, spec) -> Passes:
  b, n, k = cfg.data.batch_size, cfg.sampling.n, cfg.algorithm.num_minibatches
  width = score_episode_len(cfg)
  rows = b * n if spec.objective == "sft" else 2 * b * n
  passes = [("training step", rows // k, width)]
  if spec.objective == "rl":
    passes.insert(0, ("old / reference log-prob pass (one chunk)", _chunk(cfg, rows), width))
  return passes


_SCORE_SEQUENCE = lambda cfg: (  # x, y1, the instruction, x again, y2
    score_episode_len(cfg),
    "a SCoRe episode (2 * (data.max_prompt_len + sampling.max_new_tokens) + instruction)")
register(Algorithm("score", _score, min_samples=2, passes=_score_passes,
                   train_rows=lambda cfg: (2 * cfg.data.batch_size * cfg.sampling.n,
                                           "2 * data.batch_size * sampling.n (both attempts)"),
                   sequence=_SCORE_SEQUENCE))
register(Algorithm("score_sft", _score, passes=_score_passes, sequence=_SCORE_SEQUENCE))


# ReST-MCTS* (algorithms/search.py): tree-search rollouts with process values; its keys are the
# "ReST-MCTS*" block of configs/default.py. The step separator's token ids and the filler are set by
# `setup.run_spec` (it has the tokenizer). K = sampling.n rollouts per beam node.
def _rest_mcts(cfg) -> Spec:
  a = cfg.algorithm
  return RestMCTS(search=SearchConfig(width=a.search_width, depth=a.search_depth,
                                      bonus=a.search_bonus, token_budget=a.search_token_budget,
                                      value_weight=a.search_value_weight,
                                      verified_only=a.search_verified_only),
                  max_per_prompt=a.max_per_prompt, vf_coef=a.vf_coef)


def search_rows(cfg) -> int:
  """Rollouts (complete responses) one search makes per problem: depth x width x sampling.n."""
  return cfg.algorithm.search_depth * cfg.algorithm.search_width * cfg.sampling.n


def _rest_mcts_passes(cfg, spec) -> Passes:
  rows = 2 * cfg.data.batch_size * search_rows(cfg)
  return [("training step (solutions and value rows)", rows // cfg.algorithm.num_minibatches,
           cfg.data.max_prompt_len + cfg.sampling.max_new_tokens)]


register(Algorithm("rest_mcts", _rest_mcts, passes=_rest_mcts_passes,
                   # a level's rollouts: B·W·n rows after the prompt and a node's steps
                   sampler_rows=lambda cfg: (cfg.data.batch_size * cfg.algorithm.search_width
                                             * cfg.sampling.n),
                   sequence=lambda cfg: (
                       cfg.data.max_prompt_len + 2 * cfg.sampling.max_new_tokens,
                       "data.max_prompt_len + 2 * sampling.max_new_tokens (a node's steps, "
                       "then a rollout)"),
                   train_rows=lambda cfg: (
                       2 * cfg.data.batch_size * search_rows(cfg),
                       "2 * data.batch_size * search_depth * search_width * sampling.n "
                       "(solution rows and value rows)")))


# PPO with a value head (algorithms/ppo.py): its keys are the "PPO" block of configs/default.py.
def _ppo(cfg) -> Spec:
  a, w = cfg.algorithm, cfg.warmup
  for key, value in (("advantage", a.advantage), ("overlong_buffer", a.overlong_buffer),
                     ("scale_rewards", a.scale_rewards)):
    if value:  # group-PG knobs PPO does not read
      raise ConfigError(f"algorithm.{key}: ppo's advantages are GAE on its value head (no "
                        f"{key}); leave it at its default")
  for key, default in (("importance_sampling_level", "token"), ("delta", 0.0),
                       ("entropy_coef", 0.0), ("top_entropy_quantile", 1.0),
                       ("mask_truncated_completions", False)):
    if a[key] != default:  # PG-family loss options the PPO loss does not take (yet)
      raise ConfigError(f"algorithm.{key}: the GRPO-family option is not implemented for ppo; "
                        f"leave it {default!r}")
  if a.kl_estimator not in ("", "k1"):
    raise ConfigError(f"algorithm.kl_estimator: ppo shapes its token rewards with the k1 "
                      f"estimate (OpenRLHF's); {a.kl_estimator!r} is not implemented for it")
  start = w.rounds * w.num_minibatches  # optimizer steps of the SFT warm-up
  value_steps = a.value_warmup_rounds * a.num_epochs * a.num_minibatches
  return PPO(loss_type=a.loss_type or "grpo", clip_low=a.clip_low, clip_high=a.clip_high,
             kl_coef=a.kl_coef, gamma=a.gamma, gae_lambda=a.gae_lambda, value_clip=a.value_clip,
             vf_coef=a.vf_coef, separate_critic=a.separate_critic,
             value_warmup=(start, start + value_steps),
             temperature=cfg.sampling.temperature or 1.0,  # greedy: the model's
             # judge.model=reference: the frozen reference judges the samples
             reference="frozen" if a.kl_coef > 0 or cfg.judge.model == "reference" else "none")


register(Algorithm("ppo", _ppo, loss_types=_PG, passes=_sample_passes,
                   wrap_optimizer=lambda cfg, tx: _ppo(cfg).wrap_optimizer(tx)))
