"""Validating a config before anything is built or compiled: types, ranges and combinations.

  config_validation.validate(cfg)   # raises ConfigError; the message starts with the dotted key

Single keys are checked by the `_RULES` table (type, predicate, requirement); settings that are
fine alone but impossible together by `_validate_combinations`, which asks the algorithm registry
what the chosen algorithm needs (rows per round, loss types, samples per prompt).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from selfplay_jax import config_lib
from selfplay_jax.algorithms import losses, registry
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.data import tasks
from selfplay_jax.errors import ConfigError
from selfplay_jax.models.config import PRESETS, ModelConfig
from selfplay_jax.optim import OPTIMIZERS
from selfplay_jax.scoring import judge, python_rewards

__all__ = ["validate"]

_LOSS_TYPES = losses.PG_LOSS_TYPES + losses.PREFERENCE_LOSS_TYPES


_Check = Callable[[Any], bool]


def _positive(v) -> bool:
  return v >= 1


def _non_negative(v) -> bool:
  return v >= 0


# (dotted key, expected type, predicate or None, what the predicate requires)
_RULES: tuple[tuple[str, type, _Check | None, str], ...] = (
    ("seed", int, None, ""),
    ("rounds", int, _positive, "must be >= 1"),
    ("progress_bar", bool, None, ""),
    ("log_every_round", bool, None, ""),
    ("model.preset", str, lambda v: v in PRESETS, f"must be one of {sorted(PRESETS)}"),
    ("model.hf_path", str, None, ""),
    ("model.tokenizer_path", str, None, ""),
    ("model.lora.rank", int, _non_negative, "must be >= 0 (0 = off)"),
    ("model.lora.alpha", float, lambda v: v > 0, "must be > 0"),
    ("sampling.max_new_tokens", int, _positive, "must be >= 1"),
    ("sampling.temperature", float, _non_negative, "must be >= 0 (0 = greedy)"),
    ("sampling.top_k", int, _non_negative, "must be >= 0 (0 = off)"),
    ("sampling.top_p", float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("sampling.n", int, _positive, "must be >= 1"),
    ("sampling.auto_temperature", str, None, ""),
    ("optimizer.name", str, lambda v: v in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
    ("optimizer.learning_rate", float, lambda v: v > 0, "must be > 0"),
    ("optimizer.final_learning_rate", float, _non_negative, "must be >= 0 (0 = constant)"),
    ("optimizer.warmup_steps", int, _non_negative, "must be >= 0"),
    ("optimizer.weight_decay", float, _non_negative, "must be >= 0"),
    ("optimizer.grad_clip", float, _non_negative, "must be >= 0 (0 = off)"),
    ("optimizer.b1", float, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optimizer.b2", float, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("algorithm.name", str, bool, "must be non-empty"),
    ("algorithm.spec", str, None, ""),
    ("algorithm.scorer", str, None, ""),
    ("metrics.plot_every_rounds", int, _non_negative, "must be >= 0 (0 = off)"),
    ("metrics.plot_min_interval_s", float, _non_negative, "must be >= 0"),
    ("metrics.tensorboard", bool, None, ""),
    ("metrics.wandb", bool, None, ""),
    ("metrics.wandb_project", str, bool, "must be non-empty"),
    ("metrics.wandb_name", str, None, ""),
    ("algorithm.loss_type", str, lambda v: v in ("",) + _LOSS_TYPES,
     f"must be '' (the algorithm's own) or one of {_LOSS_TYPES}"),
    ("algorithm.reward", str, lambda v: v in ("",) + registry.REWARDS,
     f"must be '' (the algorithm's own) or one of {registry.REWARDS}"),
    ("algorithm.reward_fn", str, None, ""),  # checked with reward_fns: _validate_reward_fns
    ("algorithm.reward_fns", str, None, ""),
    ("algorithm.reward_weights", str, None, ""),
    ("algorithm.majority_threshold", float, lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = off)"),
    ("algorithm.majority_soft", bool, None, ""),
    ("algorithm.likelihood_normalize", str, lambda v: v in ("sum", "mean"),
     "must be 'sum' or 'mean'"),
    ("algorithm.iteration_rounds", int, _positive, "must be >= 1"),
    ("algorithm.replay_previous", bool, None, ""),
    ("algorithm.label_smoothing", float, lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    ("algorithm.simpo_gamma", float, None, ""),
    ("algorithm.orpo_lambda", float, _non_negative, "must be >= 0"),
    ("algorithm.nll_coef", float, _non_negative, "must be >= 0"),
    ("algorithm.min_score_gap", float, _non_negative, "must be >= 0"),
    ("algorithm.loss_types", str, None, ""),  # names and weights: _validate_preference
    ("algorithm.loss_weights", str, None, ""),
    ("algorithm.beta_schedule", str, None, ""),
    ("algorithm.ref_sync_every", int, _non_negative, "must be >= 0 (0 = off)"),
    ("algorithm.ref_sync_alpha", float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("algorithm.desirable_weight", float, _non_negative, "must be >= 0"),
    ("algorithm.undesirable_weight", float, _non_negative, "must be >= 0"),
    ("algorithm.reward_threshold", float, None, ""),
    ("algorithm.kto_threshold", float, None, ""),
    ("algorithm.auto_threshold", str, None, ""),
    ("algorithm.score_stage1_rounds", int, _non_negative, "must be >= 0"),
    ("algorithm.score_kl_first", float, _non_negative, "must be >= 0"),
    ("algorithm.score_bonus", float, _non_negative, "must be >= 0"),
    ("algorithm.correction_prompt", str, None, ""),
    ("algorithm.score_warmup_episodes", str, lambda v: v in ("none", "copy", "mixed"),
     "must be 'none', 'copy' or 'mixed'"),
    ("algorithm.balance_n_star", int, _positive, "must be >= 1"),
    ("algorithm.search_width", int, _positive, "must be >= 1"),
    ("algorithm.search_depth", int, _positive, "must be >= 1"),
    ("algorithm.search_bonus", float, _non_negative, "must be >= 0 (0 = by value alone)"),
    ("algorithm.search_token_budget", int, _non_negative, "must be >= 0 (0 = no limit)"),
    ("algorithm.search_value_weight", float, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("algorithm.search_separator", str, None, ""),
    ("algorithm.search_verified_only", bool, None, ""),
    ("algorithm.search_value_warmup", bool, None, ""),
    ("judge.template", str, None, ""),
    ("judge.score_min", int, None, ""),  # the scale is checked by judge.check_score_range
    ("judge.score_max", int, None, ""),
    ("judge.num_samples", int, _non_negative, "must be >= 0 (0 = expected score)"),
    ("judge.temperature", float, _non_negative, "must be >= 0 (0 = greedy)"),
    ("judge.max_new_tokens", int, _positive, "must be >= 1"),
    ("judge.score_marker", str, None, ""),
    ("judge.rationale", bool, None, ""),
    ("judge.trace", str, lambda v: v in ("solve", "verify"), "must be 'solve' or 'verify'"),
    ("judge.train_in_warmup", bool, None, ""),
    ("judge.loss_weight", float, _non_negative, "must be >= 0"),
    ("judge.balance", bool, None, ""),
    ("judge.hard_negatives", bool, None, ""),
    ("judge.model", str, lambda v: v in ("policy", "reference"), "must be 'policy' or 'reference'"),
    ("algorithm.advantage", str, lambda v: v in ("",) + losses.ADVANTAGES,
     f"must be '' (the algorithm's own) or one of {losses.ADVANTAGES}"),
    ("algorithm.clip_low", float, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("algorithm.max_per_prompt", int, _non_negative, "must be >= 0 (0 = keep all)"),
    ("algorithm.overlong_buffer", int, _non_negative, "must be >= 0 (0 = off)"),
    ("algorithm.scale_rewards", str, lambda v: v in ("",) + losses.SCALE_REWARDS,
     f"must be '' (the advantage's own) or one of {losses.SCALE_REWARDS}"),
    ("algorithm.importance_sampling_level", str, lambda v: v in losses.IMPORTANCE_SAMPLING_LEVELS,
     f"must be one of {losses.IMPORTANCE_SAMPLING_LEVELS}"),
    ("algorithm.delta", float, _non_negative, "must be >= 0 (0 = off)"),
    ("algorithm.entropy_coef", float, _non_negative, "must be >= 0"),
    ("algorithm.top_entropy_quantile", float, lambda v: 0 <= v <= 1, "must be in [0, 1] (1 = all)"),
    ("algorithm.mask_truncated_completions", bool, None, ""),
    ("algorithm.kl_estimator", str, lambda v: v in ("",) + losses.KL_ESTIMATORS,
     f"must be '' (k3 in the loss, k1 in shaped rewards) or one of {losses.KL_ESTIMATORS}"),
    ("algorithm.clip_high", float, _non_negative, "must be >= 0"),
    # PPO (algorithms/ppo.py)
    ("algorithm.gamma", float, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("algorithm.gae_lambda", float, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("algorithm.value_clip", float, _non_negative, "must be >= 0 (0 = off)"),
    ("algorithm.vf_coef", float, _non_negative, "must be >= 0"),
    ("algorithm.value_warmup_rounds", int, _non_negative, "must be >= 0"),
    ("algorithm.separate_critic", bool, None, ""),
    ("warmup.rounds", int, _non_negative, "must be >= 0"),
    ("warmup.num_minibatches", int, _positive, "must be >= 1"),
    ("warmup.learning_rate", float, lambda v: v > 0, "must be > 0"),
    ("warmup.final_learning_rate", float, _non_negative, "must be >= 0 (0 = constant)"),
    ("warmup.judge_rounds", int, lambda v: v >= -1, "must be >= 0, or -1 (all warm-up rounds)"),
    ("eval.every_rounds", int, _positive, "must be >= 1"),
    ("eval.num_examples", int, _positive, "must be >= 1"),
    ("eval.batch_size", int, _positive, "must be >= 1"),
    ("eval.search_examples", int, _non_negative, "must be >= 0 (0 = off)"),
    ("eval.judge_samples", int, lambda v: v in (-1, 0) or v >= 2,
     "must be -1 (sampling.n with a judge), 0 (off) or >= 2 (a judge picks among them)"),
    ("data.difficulty", int, _positive, "must be >= 1"),
    ("data.max_value", int, _non_negative, "must be >= 0 (0 = the task's default)"),
    ("data.heldout_fraction", float, lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("data.eval_path", str, None, ""),
    ("data.answer_marker", str, bool, "must be non-empty"),
    ("data.strict", bool, None, ""),
    ("data.prompt_format", str, lambda v: v in ("raw", "chat"), "must be 'raw' or 'chat'"),
    ("data.system_prompt", str, None, ""),
    ("data.prompt_field", str, bool, "must be a non-empty JSON key"),
    ("data.answer_field", str, bool, "must be a non-empty JSON key"),
    ("data.response_field", str, bool, "must be a non-empty JSON key"),
    ("data.chosen_field", str, bool, "must be a non-empty JSON key"),
    ("data.rejected_field", str, bool, "must be a non-empty JSON key"),
    ("data.max_response_len", int, _positive, "must be >= 1"),
    ("data.max_answer_len", int, _positive, "must be >= 1"),
    ("data.seed", int, lambda v: v >= -1, "must be >= 0, or -1 (the run's seed)"),
    ("population.size", int, _positive, "must be >= 1 (1 = a single model)"),
    ("population.vote_threshold", float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("curriculum.max_digits", int, lambda v: v == 0 or 2 <= v <= 32, "must be 0 (off) or in [2, 32]"),
    ("curriculum.gold_max_digits", int, _positive, "must be >= 1"),
    ("curriculum.advance_threshold", float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("curriculum.length_filter", bool, None, ""),
    ("curriculum.split_labels", bool, None, ""),
    ("curriculum.gold_fraction", float, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("curriculum.replay_size", int, _positive, "must be >= 1"),
    ("debug.kill_at_round", int, _non_negative, "must be >= 0 (0 = off)"),
    ("debug.kill_point", str, lambda v: v in ("round", "save"), "must be 'round' or 'save'"),
    ("debug.kill_signal", str, lambda v: v in ("SIGKILL", "SIGTERM", "SIGINT"),
     "must be SIGKILL, SIGTERM or SIGINT"),
    ("debug.nan_from_round", int, _non_negative, "must be >= 0 (0 = off)"),
    ("debug.nan_to_round", int, _non_negative, "must be >= 0 (0 = no end)"),
    ("optimizer.max_bad_updates", int, _non_negative, "must be >= 0 (0 = never stop)"),
    ("algorithm.num_epochs", int, _positive, "must be >= 1"),
    ("algorithm.num_minibatches", int, _positive, "must be >= 1"),
    ("algorithm.kl_coef", float, _non_negative, "must be >= 0"),
    ("algorithm.beta", float, lambda v: v > 0, "must be > 0"),
    ("data.task", str, bool, "must be non-empty"),
    ("data.batch_size", int, _positive, "must be >= 1"),
    ("data.max_prompt_len", int, _positive, "must be >= 1"),
    ("checkpoint.every_rounds", int, _non_negative, "must be >= 0 (0 = never)"),
    ("checkpoint.keep", int, _positive, "must be >= 1"),
    ("mesh.data", int, lambda v: v == -1 or v >= 1, "must be -1 (fill) or >= 1"),
    ("mesh.fsdp", int, lambda v: v == -1 or v >= 1, "must be -1 (fill) or >= 1"),
    ("mesh.tensor", int, lambda v: v == -1 or v >= 1, "must be -1 (fill) or >= 1"),
)


def _is_type(value: Any, hint: Any) -> bool:
  """isinstance against a ModelConfig-style hint: int, float, str, bool, X | None, tuple[X, ...]."""
  inner = config_lib.optional_inner(hint)
  if inner is not None:
    return value is None or _is_type(value, inner)
  if typing.get_origin(hint) is tuple:
    elem = typing.get_args(hint)[0]
    return isinstance(value, tuple) and all(_is_type(v, elem) for v in value)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_type(key: str, value: Any, hint: Any) -> None:
  if not _is_type(value, hint):
    raise ConfigError(f"{key}: expected {_hint_name(hint)}, got {value!r}")
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"{key}: must be finite, got {value!r}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks types, ranges and combinations before anything compiles; ConfigError names the key."""
  for key, hint, check, requirement in _RULES:
    value = config_lib.get_key(cfg, key)
    _check_type(key, value, hint)
    if check is not None and not check(value):
      raise ConfigError(f"{key}: {requirement}, got {value!r}")
  hints = config_lib.model_hints()
  for field in dataclasses.fields(ModelConfig):
    _check_type(f"model.{field.name}", config_lib.get_key(cfg, f"model.{field.name}"), hints[field.name])
  for key in ("model.hf_path", "model.tokenizer_path", "data.eval_path"):
    path = config_lib.get_key(cfg, key)
    if path and not Path(path).exists():
      raise ConfigError(f"{key}: {path!r} does not exist")
  if sum(config_lib.get_key(cfg, f"mesh.{axis}") == -1 for axis in ("data", "fsdp", "tensor")) > 1:
    raise ConfigError("mesh.data: at most one mesh axis may be -1 (fill)")
  rules = cfg.mesh.get("rules", ())
  if isinstance(rules, str) or not isinstance(rules, (tuple, list)):
    raise ConfigError(f"mesh.rules: must be a tuple of 'logical=axes' strings, got {rules!r}")
  from selfplay_jax import sharding  # pylint: disable=import-outside-toplevel
  sharding.logical_rules(cfg.mesh)  # an unknown logical or mesh axis fails here, naming the key
  model = config_lib.model_config(cfg.model)  # model.lora.targets: resolved (and checked) here
  _validate_lora(cfg)
  _validate_population(cfg)
  _validate_curriculum(cfg)
  _validate_combinations(cfg, model)


def _validate_curriculum(cfg: ml_collections.ConfigDict) -> None:
  """What the easy-to-hard curriculum (`curriculum.max_digits` > 0, selfplay_jax/curriculum.py)
  needs: the addition task, SFT on its own labels, a model trained from scratch."""
  c = cfg.curriculum
  if not c.max_digits:
    return
  if cfg.data.task != "addition":
    raise ConfigError(f"data.task: the easy-to-hard curriculum (curriculum.max_digits="
                      f"{c.max_digits}) runs on the built-in 'addition' task, got {cfg.data.task!r}")
  if c.gold_max_digits >= c.max_digits:
    raise ConfigError(f"curriculum.gold_max_digits: must be below curriculum.max_digits="
                      f"{c.max_digits}, got {c.gold_max_digits}")
  if cfg.algorithm.name != "sft":
    raise ConfigError(f"algorithm.name: the curriculum trains by SFT on its own labels; set "
                      f"algorithm.name=sft (got {cfg.algorithm.name!r})")
  if cfg.model.lora.rank or cfg.model.hf_path:
    raise ConfigError("model.hf_path: the curriculum trains tiny models from scratch; it takes "
                      "neither model.hf_path nor model.lora.rank")
  if cfg.data.batch_size % cfg.algorithm.num_minibatches:
    raise ConfigError(f"algorithm.num_minibatches: {cfg.algorithm.num_minibatches} does not divide"
                      f" data.batch_size={cfg.data.batch_size}")
  w = c.max_digits + 1  # curriculum.SPARE_DIGITS: the curriculum's operand width
  need = tasks.AdditionTask(num_digits=1, width=w, carries=cfg.data.step_by_step).response_len
  if cfg.sampling.max_new_tokens < need:
    raise ConfigError(f"sampling.max_new_tokens: {cfg.sampling.max_new_tokens} cannot hold a "
                      f"response of curriculum.max_digits={c.max_digits} digits (needs {need}: "
                      + (f"{w} carries (data.step_by_step), " if cfg.data.step_by_step else "")
                      + "the marker, max_digits + 2 digits (one spare zero), the stop token)")


def _validate_population(cfg: ml_collections.ConfigDict) -> None:
  """What a population (`population.size` > 1, members vmapped in one round) does not support."""
  k = cfg.population.size
  if k == 1:
    return
  if cfg.model.lora.rank:
    raise ConfigError(f"population.size: {k} members with model.lora.rank={cfg.model.lora.rank}: "
                      "LoRA runs train a single model (use population.size=1 or model.lora.rank=0)")
  if cfg.algorithm.reward_fn or cfg.algorithm.reward_fns or cfg.algorithm.reward in (
      "python", "math"):
    key = ("algorithm.reward_fns" if cfg.algorithm.reward_fns else "algorithm.reward_fn"
           if cfg.algorithm.reward_fn else "algorithm.reward")
    raise ConfigError(f"population.size: {k} members with {key}: host-side Python reward "
                      "functions are not supported under the members' vmap (use population.size=1 "
                      "or a jittable reward: verifier, judge, likelihood, algorithm.scorer)")
  if cfg.algorithm.name == "ppo":
    raise ConfigError(f"population.size: {k} members with algorithm.name=ppo: PPO's value head "
                      "and critic are not supported in a population (use population.size=1)")


def _validate_lora(cfg: ml_collections.ConfigDict) -> None:
  """LoRA (`model.lora.rank > 0`) trains adapters on the decoder's projections; the state pieces
  that are full weights by design do not combine with it."""
  lora = cfg.model.lora
  if any(not isinstance(t, str) for t in lora.targets):
    raise ConfigError(f"model.lora.targets: must be a list of regex strings, got {lora.targets!r}")
  if not lora.rank:
    return
  if cfg.algorithm.name == "ppo":
    raise ConfigError(f"model.lora.rank: {lora.rank} with algorithm.name=ppo: PPO's value head "
                      "and critic are full weights that LoRA would freeze; use model.lora.rank=0")
  if cfg.algorithm.get("ref_sync_every"):
    raise ConfigError(f"model.lora.rank: {lora.rank} with algorithm.ref_sync_every="
                      f"{cfg.algorithm.ref_sync_every}: TR-DPO mixes weights, and a mix of two "
                      "adapters' A and B is not the mix of their updates; use ref_sync_every=0")


def _validate_preference(cfg: ml_collections.ConfigDict, entry: registry.Algorithm) -> None:
  """The preference-family list keys (MPO loss types and weights, SPIN's β schedule) and TR-DPO's
  reference sync, against what the algorithm takes."""
  a = cfg.algorithm
  types = registry.split_list(a.loss_types)
  for t in types:
    if t not in entry.loss_types or t not in losses.PREFERENCE_LOSS_TYPES:
      preference = any(x in losses.PREFERENCE_LOSS_TYPES for x in entry.loss_types)
      takes = (f"names from {entry.loss_types}" if preference
               else "no loss_types (leave it '')")
      raise ConfigError(f"algorithm.loss_types: {a.name} takes {takes}, got {t!r}")
  weights = registry.parse_floats("algorithm.loss_weights", a.loss_weights)
  if weights and len(weights) != len(types):
    raise ConfigError(f"algorithm.loss_weights: {len(weights)} weights for the {len(types)} "
                      f"algorithm.loss_types {a.loss_types!r}")
  if any(w < 0 for w in weights):
    raise ConfigError(f"algorithm.loss_weights: must be >= 0, got {a.loss_weights!r}")
  schedule = registry.parse_floats("algorithm.beta_schedule", a.beta_schedule)
  if schedule and not entry.iterates:
    raise ConfigError(f"algorithm.beta_schedule: {a.name} has no iterations (a schedule is for "
                      "spin / self_rewarding); leave it ''")
  if any(b <= 0 for b in schedule):
    raise ConfigError(f"algorithm.beta_schedule: every beta must be > 0, got {a.beta_schedule!r}")
  if a.ref_sync_every:
    free = all(t in losses.REFERENCE_FREE_LOSS_TYPES for t in types or (a.loss_type,))
    if not entry.ref_sync or (entry.pair_data and free):
      raise ConfigError(f"algorithm.ref_sync_every: {a.name} has no frozen reference to sync "
                        "(TR-DPO applies to dpo with a reference loss, and kto); use 0")


def _validate_policy_gradient(cfg: ml_collections.ConfigDict, spec: PolicyGradient) -> None:
  """The policy-gradient knobs against the advantage and loss the algorithm ends up with."""
  a = cfg.algorithm
  if spec.advantage in ("rloo", "reinforce_pp", "reinforce_pp_baseline") and a.scale_rewards:
    raise ConfigError(f"algorithm.scale_rewards: the {spec.advantage} advantage has its own "
                      "normalisation (scale_rewards is for grpo / dr_grpo); leave it ''")
  if spec.advantage == "dr_grpo" and a.scale_rewards in ("group", "batch"):
    raise ConfigError(f"algorithm.scale_rewards: {a.scale_rewards!r} with the dr_grpo advantage "
                      "(unscaled by definition); use algorithm.advantage=grpo to scale")
  if spec.advantage == "rloo":  # rloo_loss: one sequence ratio, PPO-clip, batch mean
    for key, on in (("loss_type", a.loss_type == "cispo"),
                    ("importance_sampling_level", a.importance_sampling_level != "token"),
                    ("delta", a.delta > 0), ("top_entropy_quantile", a.top_entropy_quantile < 1)):
      if on:
        raise ConfigError(f"algorithm.{key}: the rloo advantage trains with its own "
                          f"sequence-level loss (rloo_loss), which has no {key}; leave it default")
  if a.delta and spec.loss_type == "cispo":
    raise ConfigError("algorithm.delta: cispo caps its IS weight at 1 + clip_high already; use 0")
  if a.delta and a.delta <= 1 + a.clip_high:
    raise ConfigError(f"algorithm.delta: {a.delta} must exceed 1 + algorithm.clip_high = "
                      f"{1 + a.clip_high} (it caps the unclipped ratio of tokens with A < 0)")


def _validate_reward_fns(cfg: ml_collections.ConfigDict) -> None:
  """Python reward functions: `reward_fn` xor `reward_fns`, weights to match, no other reward
  chosen beside them, and every function importable (scoring/python_rewards.py)."""
  a = cfg.algorithm
  python_rewards.reward_fn_specs(cfg)  # both set, bad or mismatched weights: ConfigError
  fns = a.reward_fn or a.reward_fns
  key = "algorithm.reward_fn" if a.reward_fn else "algorithm.reward_fns"
  if fns and a.scorer:
    raise ConfigError(f"algorithm.scorer: set either algorithm.scorer (your own scorer) or {key}="
                      f"{fns!r} (Python reward functions), not both")
  if fns and a.reward not in ("", "python"):
    raise ConfigError(f"algorithm.reward: {a.reward!r} and {key}={fns!r} both choose the reward; "
                      "leave algorithm.reward '' (the functions imply 'python'), or list the "
                      "built-in 'math' in algorithm.reward_fns")
  if a.reward == "python" and not fns:
    raise ConfigError("algorithm.reward: 'python' needs the functions: set algorithm.reward_fn "
                      "('file.py:fn' or 'module:fn') or algorithm.reward_fns")
  if fns or a.reward == "math":
    python_rewards.load_reward_fns(cfg)  # a bad reference fails here, naming the key


def _validate_majority(cfg: ml_collections.ConfigDict) -> None:
  """The majority-vote reward's knobs need that reward, and a vote needs two voters."""
  a = cfg.algorithm
  if a.reward != "majority":
    for key, off in (("majority_threshold", 0.0), ("majority_soft", False)):
      if a[key] != off:
        raise ConfigError(f"algorithm.{key}: {a[key]!r} sets the majority-vote reward, and this "
                          f"run's algorithm.reward is {a.reward!r}; set algorithm.reward=majority "
                          f"or leave it {off!r}")
  elif cfg.sampling.n < 2:
    raise ConfigError(f"sampling.n: algorithm.reward=majority votes among a prompt's samples; "
                      f"with {cfg.sampling.n} every valid answer is its own majority (use >= 2)")


def _require_verifier(cfg: ml_collections.ConfigDict, why: str) -> None:
  """Refuses any reward but the task verifier, naming the key that chose it (`why`: the reason)."""
  from selfplay_jax import setup  # pylint: disable=import-outside-toplevel
  kind = setup.reward_kind(cfg)
  if kind != "verifier":
    key = {"custom": "algorithm.scorer", "python": "algorithm.reward_fn(s)"}.get(
        kind, "algorithm.reward")
    raise ConfigError(f"{key}: {why}; leave the reward keys empty")


def _validate_score(cfg: ml_collections.ConfigDict) -> None:
  """SCoRe's episodes: two verified attempts of one model, at a temperature that varies them."""
  a = cfg.algorithm
  _require_verifier(cfg, f"{a.name} rewards both attempts with the task verifier (its deltas "
                    "compare the two verdicts)")
  if cfg.sampling.temperature == 0:
    raise ConfigError(f"sampling.temperature: 0 (greedy) makes a problem's {cfg.sampling.n} "
                      f"episodes identical, so {a.name}'s leave-one-out advantages are all 0; "
                      "use a temperature > 0")
  if cfg.population.size > 1:
    raise ConfigError(f"population.size: {cfg.population.size} members with {a.name}: the "
                      "two-attempt episodes and their held-out metrics are single-model; use 1")


# rest_mcts's own keys and their defaults (configs/default.py): set for another algorithm, refused.
SEARCH_DEFAULTS = {"search_width": 2, "search_depth": 3, "search_bonus": 0.5,
                   "search_token_budget": 0, "search_value_weight": 0.0,
                   "search_verified_only": False, "search_value_warmup": False,
                   "search_separator": ""}


def _validate_rest_mcts(cfg: ml_collections.ConfigDict) -> None:
  """ReST-MCTS*'s search: verified rollouts of one model, at a temperature that varies them."""
  a = cfg.algorithm
  _require_verifier(cfg, "rest_mcts values steps by the fraction of rollouts the task verifier "
                    "accepts")
  if cfg.sampling.temperature == 0:
    raise ConfigError("sampling.temperature: 0 (greedy) makes a node's sampling.n rollouts "
                      "identical, so the search has one child per node; use a temperature > 0")
  if cfg.sampling.auto_temperature:
    raise ConfigError("sampling.auto_temperature: rest_mcts samples inside its tree search, "
                      "which keeps one temperature; leave it ''")
  if cfg.population.size > 1:
    raise ConfigError(f"population.size: {cfg.population.size} members with rest_mcts: the "
                      "search is single-model; use 1")
  if a.search_value_warmup and not cfg.warmup.rounds:
    raise ConfigError("algorithm.search_value_warmup: True trains the value head in the SFT "
                      "warm-up, and warmup.rounds is 0; set warm-up rounds or leave it False")
  if a.reward_threshold != 1.0:
    raise ConfigError(f"algorithm.reward_threshold: {a.reward_threshold}: rest_mcts keeps the "
                      "responses the verifier accepts (reward 1); leave it 1.0")
  if 0 < a.search_token_budget < cfg.sampling.max_new_tokens:
    raise ConfigError(f"algorithm.search_token_budget: {a.search_token_budget} is below one "
                      f"rollout's sampling.max_new_tokens={cfg.sampling.max_new_tokens}, so a "
                      "long first rollout would end the search; give at least that (0 = no limit)")


def _validate_balance(cfg: ml_collections.ConfigDict, entry: registry.Algorithm | None) -> None:
  """B-STaR's per-round grids (`sampling.auto_temperature`, `algorithm.auto_threshold`)."""
  a = cfg.algorithm
  temps = registry.parse_floats("sampling.auto_temperature", cfg.sampling.auto_temperature)
  taus = registry.parse_floats("algorithm.auto_threshold", a.auto_threshold)
  for key, grid in (("sampling.auto_temperature", temps), ("algorithm.auto_threshold", taus)):
    if len(grid) == 1:
      raise ConfigError(f"{key}: one value ({grid[0]}) leaves nothing to choose; give two or more "
                        "comma-separated values, or leave it '' and set the value itself")
    if len(set(grid)) != len(grid):
      raise ConfigError(f"{key}: {config_lib.get_key(cfg, key)!r} lists a value twice")
  if temps:
    if any(t <= 0 for t in temps):
      raise ConfigError(f"sampling.auto_temperature: every temperature must be > 0, got "
                        f"{cfg.sampling.auto_temperature!r}")
    if cfg.sampling.temperature == 0:
      raise ConfigError("sampling.auto_temperature: sampling.temperature is 0 (greedy), and a "
                        "temperature grid samples; set sampling.temperature > 0")
    if entry is not None and not entry.samples:
      raise ConfigError(f"sampling.auto_temperature: {a.name} does not sample; leave it ''")
    spec = registry.build_spec(cfg)
    if getattr(spec, "temperature", None) is not None:
      raise ConfigError(f"sampling.auto_temperature: {a.name} trains log-probs at the sampling "
                        "temperature (logits / T), so a temperature chosen each round would make "
                        "its ratios off-policy; use it with rest_em, SFT-style or preference "
                        "algorithms")
  if taus:
    if a.name != "rest_em":
      raise ConfigError(f"algorithm.auto_threshold: {a.name} keeps no samples by a threshold "
                        "(only rest_em does); leave it ''")
    if a.reward_threshold != 1.0:
      raise ConfigError(f"algorithm.reward_threshold: {a.reward_threshold} is replaced each round "
                        f"by the choice from algorithm.auto_threshold={a.auto_threshold!r}; leave "
                        "reward_threshold 1.0")


def _validate_combinations(cfg: ml_collections.ConfigDict, model: ModelConfig) -> None:
  """Settings that are fine alone but impossible together."""
  a = cfg.algorithm
  entry = registry.entry_of(cfg)  # None for your own spec; an unknown name fails here
  for key in ("algorithm.spec", "algorithm.scorer"):
    if config_lib.get_key(cfg, key):
      config_lib.import_object(config_lib.get_key(cfg, key), key)  # a bad reference fails here, naming the key
  if a.scorer and a.reward:
    raise ConfigError("algorithm.scorer: set either algorithm.scorer (your own) or "
                      f"algorithm.reward={a.reward!r} (built-in), not both")
  _validate_reward_fns(cfg)
  _validate_majority(cfg)
  if entry is not None:  # own specs: rows are checked when the round is traced
    rows, what = entry.train_rows(cfg)
    if rows % a.num_minibatches:
      raise ConfigError(f"algorithm.num_minibatches: {a.num_minibatches} must divide {what} = {rows}")
    if a.loss_type and a.loss_type not in entry.loss_types:
      takes = f"one of {entry.loss_types}" if entry.loss_types else "no loss_type (leave it '')"
      raise ConfigError(f"algorithm.loss_type: {a.name} takes {takes}, got {a.loss_type!r}")
    if (a.reward in registry.SCORED_REWARDS or a.reward_fn or a.reward_fns) \
        and not entry.samples:
      raise ConfigError(f"algorithm.reward: {a.name} does not sample, so nothing is scored; "
                        "leave algorithm.reward empty")
    chosen = a.reward in registry.SCORED_REWARDS or a.reward_fn or a.reward_fns
    if chosen and entry.samples and not entry.uses_rewards:
      key = ("algorithm.reward_fn" if a.reward_fn else "algorithm.reward_fns" if a.reward_fns
             else "algorithm.reward")
      raise ConfigError(f"{key}: {a.name} pairs its samples with the gold responses and reads no "
                        "reward, so the reward would be ignored; leave it empty")
    if cfg.sampling.n < entry.min_samples:
      raise ConfigError(f"sampling.n: {a.name} needs >= {entry.min_samples} samples per prompt "
                        "(group-relative advantages / best-vs-worst pairs)")
    _validate_preference(cfg, entry)
    spec = entry.make_spec(cfg) if entry.loss_types == losses.PG_LOSS_TYPES else None
    if isinstance(spec, PolicyGradient):
      _validate_policy_gradient(cfg, spec)
  if a.overlong_buffer >= cfg.sampling.max_new_tokens:
    raise ConfigError(f"algorithm.overlong_buffer: {a.overlong_buffer} must be below "
                      f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} (the penalty ramps "
                      "over the last overlong_buffer tokens before the cap)")
  if cfg.debug.nan_to_round and cfg.debug.nan_to_round < cfg.debug.nan_from_round:
    raise ConfigError(f"debug.nan_to_round: {cfg.debug.nan_to_round} is before "
                      f"debug.nan_from_round={cfg.debug.nan_from_round}")
  judge.check_score_range(cfg.judge.score_min, cfg.judge.score_max)
  if cfg.judge.temperature == 0 and cfg.judge.num_samples > 1:
    raise ConfigError(f"judge.temperature: 0 (greedy) makes the judge.num_samples="
                      f"{cfg.judge.num_samples} judgements identical; use num_samples=1 or a "
                      "temperature > 0")
  from selfplay_jax import setup  # pylint: disable=import-outside-toplevel
  if cfg.eval.search_examples != 64 and (a.name != "rest_mcts" or a.spec):
    raise ConfigError(f"eval.search_examples: {cfg.eval.search_examples} sets the held-out "
                      f"meter of rest_mcts's tree search, and this run is {a.spec or a.name}; "
                      "leave it 64")
  if cfg.eval.judge_samples > 0 and not setup.uses_judge(cfg):
    raise ConfigError(f"eval.judge_samples: {cfg.eval.judge_samples} measures the policy as its "
                      "own judge, and this run has none (algorithm.reward=judge); use 0 or -1")
  if cfg.judge.model == "reference":
    if not setup.uses_judge(cfg):
      raise ConfigError("judge.model: 'reference' chooses who judges, and this run has no judge "
                        "(algorithm.reward=judge); leave it 'policy'")
    if registry.build_spec(cfg).reference == "none":
      raise ConfigError(f"judge.model: 'reference' needs reference params, and {a.name} keeps "
                        "none; leave it 'policy'")
  if cfg.judge.hard_negatives and not (setup.uses_judge(cfg) and cfg.judge.train_in_warmup):
    raise ConfigError("judge.hard_negatives: True adds rows to the warm-up's judge training, and "
                      "this run trains no judge (algorithm.reward=judge, judge.train_in_warmup)")
  if cfg.warmup.judge_rounds > cfg.warmup.rounds:
    raise ConfigError(f"warmup.judge_rounds: {cfg.warmup.judge_rounds} exceeds warmup.rounds="
                      f"{cfg.warmup.rounds} (the judge trains in the last judge_rounds of them)")
  task_cls = tasks.TASKS.get(cfg.data.task)  # None: JSONL data or your own factory
  if cfg.data.max_value and (cfg.data.task.endswith(".jsonl") or
                             (task_cls is not None and task_cls.value_range_field is None)):
    ranged = sorted(name for name, c in tasks.TASKS.items() if c.value_range_field)
    raise ConfigError(f"data.max_value: {cfg.data.task} has no value range to set (only "
                      f"{', '.join(ranged)} have; leave it 0)")
  if cfg.judge.hard_negatives and (cfg.data.task.endswith(".jsonl") or (
      task_cls is not None and task_cls.make_corrupt_fn is tasks.Task.make_corrupt_fn)):
    makers = sorted(n for n, c in tasks.TASKS.items()
                    if c.make_corrupt_fn is not tasks.Task.make_corrupt_fn)
    raise ConfigError(f"judge.hard_negatives: data.task={cfg.data.task!r} cannot make wrong "
                      f"responses from gold ones (Task.make_corrupt_fn; {', '.join(makers)} can)")
  _validate_balance(cfg, entry)
  if a.name in ("score", "score_sft") and not a.spec:
    _validate_score(cfg)
  if a.name == "rest_mcts" and not a.spec:
    _validate_rest_mcts(cfg)
  elif a.spec or a.name != "rest_mcts":
    for key, default in SEARCH_DEFAULTS.items():
      if a[key] != default:
        raise ConfigError(f"algorithm.{key}: {a[key]!r} sets rest_mcts's tree search, and this "
                          f"run is {a.spec or a.name}; leave it {default!r}")
  if cfg.algorithm.reward_threshold != 1.0:
    if entry is not None and not entry.samples:
      raise ConfigError(f"algorithm.reward_threshold: {a.name} does not sample, so nothing is "
                        "selected by a threshold (rest_em keeps, and the B-STaR monitor counts, "
                        "samples with reward >= it); leave it 1.0")
    if cfg.algorithm.reward_threshold > 1.0 and setup.reward_kind(cfg) == "verifier":
      raise ConfigError(f"algorithm.reward_threshold: {cfg.algorithm.reward_threshold} is above "
                        "the verifier's reward of 1, so no sample would be kept")
  if cfg.data.prompt_format == "chat" and not cfg.data.task.endswith(".jsonl"):
    raise ConfigError(f"data.prompt_format: 'chat' renders JSONL prompts with the tokenizer's chat "
                      f"template, and data.task={cfg.data.task!r} is not a .jsonl file (a task "
                      "writes its own prompts for its own tokenizer); use 'raw'")
  if cfg.data.system_prompt and cfg.data.prompt_format != "chat":
    raise ConfigError("data.system_prompt: a system message needs data.prompt_format=chat (raw "
                      "prompts are fed as they are); set it or leave data.system_prompt ''")
  if cfg.data.batch_size % cfg.warmup.num_minibatches:
    raise ConfigError(f"warmup.num_minibatches: {cfg.warmup.num_minibatches} must divide "
                      f"data.batch_size = {cfg.data.batch_size}")
  if cfg.sampling.top_k > model.vocab_size:
    raise ConfigError(f"sampling.top_k: {cfg.sampling.top_k} exceeds model.vocab_size="
                      f"{model.vocab_size}")
  _, total, what = registry.sampler_shape(cfg)
  if total > model.max_position_embeddings:
    raise ConfigError(f"sampling.max_new_tokens: {what} = {total} exceeds "
                      f"model.max_position_embeddings={model.max_position_embeddings}")
