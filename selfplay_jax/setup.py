"""The composition root: from a config, everything a run is made of, built in one place.

  run = setup.build(cfg, workdir)            # task, tokenizer, model config, specs, scorer, ...
  state = run.initial_state(shardings)       # or run.abstract_state() as a restore target
  round_fn = run.round_fn(mesh=..., rules=..., state_shardings=...)

`train`, `eval`, `export`, `plan` and the benchmarks build their runs here, so a checkpoint is
always restored into exactly the layout training saved. The functions below are the same pieces
for callers that have only part of a run (`plan` has no tokenizer: `abstract_state` from a
model config alone).

Dependencies point down: this module knows the algorithm registry, the scorers, the data and the
round engine; none of them knows it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfplay_jax import config_lib, models, sampling, scoring, sharding, tokenizers
from selfplay_jax import round as rnd
from selfplay_jax.algorithms import registry
from selfplay_jax.algorithms.preference import JudgeSFT
from selfplay_jax.algorithms.score import EpisodeSFT
from selfplay_jax.algorithms.search import ValueSFT
from selfplay_jax.algorithms.sft import SFT
from selfplay_jax.algorithms.spec import Spec, option
from selfplay_jax.data import pipeline, tasks
from selfplay_jax.errors import ConfigError
from selfplay_jax.models import hf
from selfplay_jax.models import lora
from selfplay_jax import optim
from selfplay_jax.scoring import judge as judge_lib
from selfplay_jax.scoring import bstar, math_reward, python_rewards

__all__ = ["Run", "build", "data_seed", "population_size", "reward_kind", "uses_judge",
           "is_jsonl_data", "uses_pair_data",
           "build_spec", "build_warmup_spec", "build_judge", "build_trace", "build_scorer",
           "answer_marker_id", "build_optimizer", "sampling_config", "task_and_tokenizer",
           "model_config", "data_lengths", "example_batch", "initial_state", "abstract_state",
           "with_shardings"]

build_spec = registry.build_spec


def build_optimizer(cfg) -> optax.GradientTransformation:
  """The run's optimizer (`optim.build_optimizer`), inside the algorithm entry's own gate when it
  has one (`wrap_optimizer`: PPO's value warm-up). Every caller that builds a state or a restore
  target builds it here, so the optimizer state always has the layout training saved."""
  optimizer = optim.build_optimizer(cfg)
  entry = registry.entry_of(cfg)
  if entry is not None and entry.wrap_optimizer is not None:
    optimizer = entry.wrap_optimizer(cfg, optimizer)
  return optimizer


# ---- what the config asks for ---------------------------------------------------------------------


def reward_kind(cfg) -> str:
  """What scores the samples: "custom" (`algorithm.scorer`), "python" (`algorithm.reward_fn` /
  `reward_fns`), `algorithm.reward`, or the algorithm's own default (the registry entry's
  `default_reward`)."""
  if cfg.algorithm.scorer:
    return "custom"
  if cfg.algorithm.reward_fn or cfg.algorithm.reward_fns:
    return "python"
  if cfg.algorithm.reward:
    return cfg.algorithm.reward
  entry = registry.entry_of(cfg)
  return entry.default_reward if entry else "verifier"


def uses_judge(cfg) -> bool:
  return reward_kind(cfg) == "judge"


def is_jsonl_data(cfg) -> bool:
  """User rows from a JSONL file (else a task object, built-in or the user's, generates them)."""
  return cfg.data.task.endswith(".jsonl")


def uses_pair_data(cfg) -> bool:
  """Do the data batches carry chosen / rejected responses (offline DPO)?"""
  entry = registry.entry_of(cfg)
  return bool(entry and entry.pair_data)


def data_seed(cfg) -> int:
  """The seed of the training data's order (and of synthesised rows): `data.seed`, or `seed` when
  it is -1. A population's members share it, so they see the same batches."""
  return cfg.data.seed if cfg.data.seed >= 0 else cfg.seed


def population_size(cfg) -> int:
  """Members K trained side by side (`population.size`); 1 = a single model, unstacked state."""
  return cfg.population.size


def data_lengths(cfg) -> dict[str, int]:
  d = cfg.data
  return dict(max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
              max_answer_len=d.max_answer_len)


def sampling_config(cfg, tok=None, n: int | None = None) -> sampling.SamplingConfig:
  """`cfg.sampling` as a SamplingConfig (`n` overrides `sampling.n`); stop tokens from `tok`
  (None: no stop tokens, for shapes only)."""
  s = cfg.sampling
  return sampling.SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                 top_k=s.top_k, top_p=s.top_p, n=s.n if n is None else n,
                                 eos_ids=tuple(tok.eos_ids) if tok is not None else ())


# ---- scoring --------------------------------------------------------------------------------------


def _task_fn(cfg, tok, task, method: str):
  """`task.<method>(tok)` (`Task.make_trace_fn`, `Task.make_corrupt_fn`), or None where the task
  has none; `task` None: built from `cfg` (JSONL data has neither)."""
  if task is None and not is_jsonl_data(cfg):
    task = _build_task(cfg)
  make = getattr(task, method, None)
  return make(tok) if make is not None else None


def build_trace(cfg, tok, task=None):
  """The task's verification trace (`Task.make_trace_fn`) a judge with `judge.trace=verify`
  writes, else None. `task` None: built from `cfg` (a JSONL file has no trace)."""
  if cfg.judge.trace != "verify":
    return None
  trace = _task_fn(cfg, tok, task, "make_trace_fn")
  if trace is None:
    raise ConfigError(f"judge.trace: 'verify' needs a task that writes a verification trace of a "
                      f"response (Task.make_trace_fn); data.task={cfg.data.task!r} has none (use "
                      "judge.trace='solve')")
  return trace


def build_corruption(cfg, tok, task=None):
  """The task's hard-negative maker (`Task.make_corrupt_fn`) with `judge.hard_negatives`, else
  None. `task` None: built from `cfg`."""
  if not cfg.judge.hard_negatives:
    return None
  corrupt = _task_fn(cfg, tok, task, "make_corrupt_fn")
  if corrupt is None:
    raise ConfigError(f"judge.hard_negatives: data.task={cfg.data.task!r} cannot make wrong "
                      "responses from gold ones (Task.make_corrupt_fn; countdown can)")
  return corrupt


def build_judge(cfg, tok, task=None) -> scoring.Judge:
  """The self-critique judge of `cfg.judge` (template "" = the built-in task template, or the
  additive 5-point rubric for a natural-language tokenizer; with `judge.rationale` their
  rationale versions, with `judge.trace=verify` the task's verify template, and score_marker
  "" = "<score>" / "Score: ")."""
  j, text = cfg.judge, is_jsonl_data(cfg)
  trace = build_trace(cfg, tok, task)
  if trace is not None and not j.rationale:
    raise ConfigError("judge.trace: 'verify' makes the judge write a verification trace before "
                      "its score, a rationale: set judge.rationale=True (and judge.num_samples)")
  if trace is not None:
    template = j.template or judge_lib.TASK_VERIFY_TEMPLATE
    marker = j.score_marker or judge_lib.TASK_SCORE_MARKER
  elif j.rationale:
    template = j.template or (judge_lib.RUBRIC_RATIONALE_TEMPLATE if text
                              else judge_lib.TASK_RATIONALE_TEMPLATE)
    marker = j.score_marker or (judge_lib.RUBRIC_SCORE_MARKER if text
                                else judge_lib.TASK_SCORE_MARKER)
  else:
    template = j.template or (judge_lib.RUBRIC_TEMPLATE if text else judge_lib.TASK_TEMPLATE)
    marker = j.score_marker
  judge = scoring.Judge.from_template(
      template, tok, score_min=j.score_min, score_max=j.score_max, score_marker=marker,
      num_samples=j.num_samples, temperature=j.temperature, max_new_tokens=j.max_new_tokens,
      rationale=j.rationale)
  if trace is not None:  # room for the longest trace, the marker and the score
    need = trace.width + len(judge.marker) + 2
    if j.max_new_tokens < need:
      raise ConfigError(
          f"judge.max_new_tokens: a judge with judge.trace=verify writes a verification trace "
          f"(up to {trace.width} tokens for this task), the marker ({len(judge.marker)}) and the "
          f"score with EOS (2): needs >= {need}, got {j.max_new_tokens}")
  elif j.rationale:  # the judgement must have room for a whole solution, the marker and the score
    need = cfg.data.max_response_len - 1 + len(judge.marker) + 2
    if j.max_new_tokens < need:
      raise ConfigError(
          f"judge.max_new_tokens: a judge with a rationale writes a solution (up to "
          f"data.max_response_len - 1 = {cfg.data.max_response_len - 1} tokens), the marker "
          f"({len(judge.marker)}) and the score with EOS (2): needs >= {need}, got "
          f"{j.max_new_tokens}")
  return judge


def build_scorer(cfg, mc, tok, task=None):
  """The round's scorer, or None when the task verifier gives the rewards. `algorithm.scorer`
  names your own factory, called as `f(cfg, model_config, tokenizer, task)`."""
  kind = reward_kind(cfg)
  if kind == "custom":
    scorer = config_lib.import_object(cfg.algorithm.scorer, "algorithm.scorer")(cfg, mc, tok, task)
    if not callable(scorer):
      raise ConfigError(f"algorithm.scorer: {cfg.algorithm.scorer} returned a "
                        f"{type(scorer).__name__}, not a scorer function")
    return scorer
  if kind == "judge":
    return scoring.judge_scorer(build_judge(cfg, tok, task), mc, cfg.judge.model,
                                cfg.algorithm.num_minibatches)
  if kind == "likelihood":
    return scoring.likelihood_scorer(mc, cfg.algorithm.likelihood_normalize)
  if kind == "majority":
    if task is None:
      task = _jsonl_data(cfg)[0] if is_jsonl_data(cfg) else _build_task(cfg)
    a = cfg.algorithm
    return scoring.majority_scorer(answer_marker_id(task, tok), tok.eos_ids, cfg.sampling.n,
                                   cfg.sampling.max_new_tokens, soft=a.majority_soft,
                                   threshold=a.majority_threshold)
  if kind == "self_certainty":  # U over the tokenizer's ids, not a padded embedding's extra rows
    return scoring.self_certainty_scorer(mc, tok.vocab_size, cfg.algorithm.num_minibatches)
  if kind in ("python", "math"):  # host-side Python functions (scoring/python_rewards.py)
    if task is None:
      task = _jsonl_data(cfg)[0] if is_jsonl_data(cfg) else _build_task(cfg)
    host = python_rewards.HostRewards(python_rewards.load_reward_fns(cfg), tok,
                                      task.source("train", data_seed(cfg)))
    return python_rewards.python_scorer(host)
  return None


def answer_marker_id(task, tok) -> int:
  """The token after which a response states its answer, as the task's verifier reads it: the
  built-in tasks' `tasks.ANSWER_MARKER`, JSONL data's `data.answer_marker` (one token). The
  majority vote compares what follows it; a task whose responses have no such marker cannot
  vote (ConfigError naming algorithm.reward)."""
  jsonl = isinstance(task, pipeline.JsonlData)
  marker = task.answer_marker if jsonl else tasks.ANSWER_MARKER
  where = "data.answer_marker" if jsonl else "tasks.ANSWER_MARKER"
  ids = tok.encode(marker) if jsonl else [tok.piece_to_id(marker)]
  if len(ids) != 1 or ids[0] is None:
    raise ConfigError(f"algorithm.reward: 'majority' votes on the answer after {where} "
                      f"{marker!r}, which is not one token of this run's tokenizer")
  if jsonl:
    responses = [r["response"] for r in task.train_rows if r.get("response")]
  else:
    responses = [task.example("train", i)["response"] for i in range(8)]
  if responses and not any(marker in r for r in responses):
    raise ConfigError(f"algorithm.reward: 'majority' votes on the answer after {where} "
                      f"{marker!r}, and none of the task's responses holds it (no answer to "
                      "extract); use a reward that reads whole responses")
  return ids[0]


def build_warmup_spec(cfg, tok, task=None) -> Spec:
  """Warm-up SFT; with a judge and `judge.train_in_warmup`, SFT plus judge training (EFT); with
  `judge.trace=verify` its rationales are the task's verification traces (`task` None: built
  from `cfg`)."""
  if uses_judge(cfg) and cfg.judge.train_in_warmup:
    return JudgeSFT(build_judge(cfg, tok, task), judge_weight=cfg.judge.loss_weight,
                    trace=build_trace(cfg, tok, task), balance=cfg.judge.balance,
                    corrupt=build_corruption(cfg, tok, task))
  spec = run_spec(cfg, tok)
  mode = cfg.algorithm.score_warmup_episodes
  if option(spec, "attempts") == 2 and mode != "none" and cfg.warmup.rounds:
    corrupt = _task_fn(cfg, tok, task, "make_corrupt_fn") if mode == "mixed" else None
    if mode == "mixed" and corrupt is None:
      raise ConfigError(f"algorithm.score_warmup_episodes: 'mixed' shows corrupted gold "
                        f"responses, and data.task={cfg.data.task!r} cannot make them "
                        "(Task.make_corrupt_fn; countdown can); use 'copy' or 'none'")
    return EpisodeSFT(correction=spec.correction, repeat_prompt=spec.repeat_prompt,
                      pad_id=spec.pad_id, eos_ids=tuple(tok.eos_ids), mode=mode,
                      corrupt=corrupt)
  search = option(spec, "search")
  if search is not None and cfg.algorithm.search_value_warmup and cfg.warmup.rounds:
    corrupt = _task_fn(cfg, tok, task, "make_corrupt_fn")
    if corrupt is None:
      raise ConfigError(f"algorithm.search_value_warmup: the warm-up shows the value head broken "
                        f"steps, and data.task={cfg.data.task!r} cannot make them "
                        "(Task.make_corrupt_fn; countdown can); leave it False")
    return ValueSFT(separator=search.separator, corrupt=corrupt, vf_coef=cfg.algorithm.vf_coef,
                    pad_id=option(spec, "pad_id"))
  return SFT()


# ---- data and model -----------------------------------------------------------------------------


def task_and_tokenizer(cfg, workdir: str | Path):
  """The run's data (a built-in task, or `JsonlData` when `data.task` is a .jsonl path) and tokenizer."""
  if is_jsonl_data(cfg):
    return _jsonl_data(cfg)
  task = _build_task(cfg)
  extra = judge_lib.JUDGE_SYMBOLS if uses_judge(cfg) else ()
  if uses_judge(cfg) and cfg.judge.trace == "verify":
    extra += judge_lib.VERIFY_SYMBOLS
  return task, tasks.build_tokenizer(task, Path(workdir) / "tokenizer", extra_symbols=extra)


def _build_task(cfg) -> tasks.Task:
  """The task object of `data.task` (built-in or the user's factory), checked to hold out."""
  if ":" in cfg.data.task:  # the user's own task: a factory f(cfg) -> tasks.Task
    task = config_lib.import_object(cfg.data.task, "data.task")(cfg)
    if not isinstance(task, tasks.Task):
      raise ConfigError(f"data.task: {cfg.data.task} returned a {type(task).__name__}, not a "
                        "selfplay_jax.data.tasks.Task")
  elif cfg.data.task in tasks.TASKS:
    kwargs = {"arithmetic": dict(num_digits=cfg.data.difficulty,
                                 step_by_step=cfg.data.step_by_step),
              "sort": dict(length=cfg.data.difficulty),
              "countdown": dict(num_numbers=cfg.data.difficulty),
              "addition": dict(num_digits=cfg.data.difficulty,
                               width=max(cfg.curriculum.max_digits, cfg.data.difficulty),
                               carries=cfg.data.step_by_step),
              }.get(cfg.data.task, {})
    if cfg.data.max_value:  # 0 = the task's own default range
      kwargs[tasks.TASKS[cfg.data.task].value_range_field] = cfg.data.max_value
    try:
      task = tasks.get_task(cfg.data.task, **kwargs)
    except ValueError as e:
      raise ConfigError(f"{_task_keys(cfg)}: {e}") from None
  else:
    raise ConfigError(f"data.task: {cfg.data.task!r} is neither a built-in task "
                      f"({', '.join(sorted(tasks.TASKS))}), a .jsonl file, nor "
                      "'file.py:factory' / 'module:factory'")
  try:  # a problem space too small to hold out a split fails here, not mid-run with a traceback
    for split in tasks.SPLITS:
      task.example(split, 0)
  except ValueError as e:
    raise ConfigError(f"{_task_keys(cfg)}: {e}") from None
  return task


def _task_keys(cfg) -> str:
  """The config key(s) that built the task, for naming them in an error."""
  if ":" in cfg.data.task:
    return "data.task"
  return "data.difficulty / data.max_value" if cfg.data.max_value else "data.difficulty"


def _jsonl_data(cfg):
  source = cfg.model.tokenizer_path or cfg.model.hf_path
  if not source:
    raise ConfigError("model.tokenizer_path: data.task is a JSONL file, so the run needs a "
                      "tokenizer (set model.tokenizer_path or model.hf_path)")
  tok = tokenizers.load_tokenizer(source)
  entry = registry.entry_of(cfg)
  gold = (entry is not None and entry.needs_gold) or cfg.warmup.rounds
  required = ("prompt", "response") if gold else ("prompt",)
  algo = f"algorithm.name={cfg.algorithm.name}"
  why = {"response": f"{algo} trains on gold responses" if entry is not None and entry.needs_gold
         else f"the SFT warm-up (warmup.rounds={cfg.warmup.rounds}) trains on gold responses; "
              "warmup.rounds=0 avoids it"}
  if uses_pair_data(cfg):
    required += ("chosen", "rejected")
    why.update(dict.fromkeys(("chosen", "rejected"), f"{algo} trains on preference pairs"))
  # Verifier rewards and judge training need answers; SFT, SPIN and DPO do not (held-out accuracy
  # is then not measured).
  verifier_rewards = (entry is None or entry.uses_rewards) and reward_kind(cfg) == "verifier"
  math_rewards = reward_kind(cfg) == "math"
  if verifier_rewards or math_rewards or (uses_judge(cfg) and cfg.judge.train_in_warmup
                                          and cfg.warmup.rounds):
    required += ("answer",)
    why["answer"] = ("verifier rewards compare each sample with the row's answer" if verifier_rewards
                     else "the math reward compares each sample with the row's answer"
                     if math_rewards else "the judge's warm-up training needs answers")
  if cfg.data.prompt_format == "chat" and tok.chat_template is None:
    raise ConfigError(f"data.prompt_format: 'chat' renders prompts with the tokenizer's chat "
                      f"template, and the tokenizer at {source} has none (no "
                      "chat_template.jinja, no chat_template in its tokenizer_config.json); use "
                      "'raw' or a tokenizer with a template")
  fields = {name: cfg.data[f"{name}_field"] for name in pipeline.FIELDS}
  data = pipeline.JsonlData.load(cfg.data.task, tokenizer=tok, eval_path=cfg.data.eval_path,
                                 heldout_fraction=cfg.data.heldout_fraction,
                                 answer_marker=cfg.data.answer_marker, strict=cfg.data.strict,
                                 require=required, why=why, field_names=fields,
                                 prompt_format=cfg.data.prompt_format,
                                 system_prompt=cfg.data.system_prompt, **data_lengths(cfg))
  return data, tok


def model_config(cfg, tok) -> models.ModelConfig:
  """`cfg.model` as a ModelConfig; from scratch, the tokenizer defines the vocabulary."""
  mc = config_lib.model_config(cfg.model)
  if not cfg.model.hf_path:
    mc = mc.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                    eos_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id)
  tokenizers.check_vocab(tok, mc.vocab_size)
  return mc.validate()


def example_batch(cfg) -> dict[str, np.ndarray]:
  """An all-zero batch with the data pipeline's keys and shapes (for state layouts)."""
  d, b = cfg.data, cfg.data.batch_size
  widths = {"prompt": d.max_prompt_len, "response": d.max_response_len, "answer": d.max_answer_len}
  if uses_pair_data(cfg):
    widths.update(chosen=d.max_response_len, rejected=d.max_response_len)
  out = {}
  for name, width in widths.items():
    out[f"{name}_tokens"] = np.zeros((b, width), np.int32)
    out[f"{name}_mask"] = np.zeros((b, width), bool)
  out["row_index"] = np.zeros((b,), np.int32)  # each row's index in the source (reward fns)
  return out


# ---- the train state ------------------------------------------------------------------------------


def initial_state(cfg, mc: models.ModelConfig, spec: Spec, optimizer: optax.GradientTransformation,
                  *, pretrained: bool = True, shardings: Any = None) -> rnd.TrainState:
  """The state a run starts from: the `model.hf_path` checkpoint's weights (when set and
  `pretrained`), else parameters initialised from `cfg.seed`.

  With `shardings` (a TrainState of NamedShardings) the state is made directly in place: random
  init runs as one jitted program with those output shardings, and checkpoint tensors go from the
  host straight to their shards, so no device ever holds the whole model.
  """
  if population_size(cfg) > 1:
    return _population_state(cfg, mc, spec, optimizer, pretrained=pretrained,
                             shardings=shardings)
  init_rng, state_rng = jax.random.split(jax.random.key(cfg.seed))
  replay = None
  if option(spec, "replay"):
    replay = rnd.empty_replay(spec, example_batch(cfg), sampling_config(cfg))
  extend = option(spec, "init_params") or (lambda params: params)  # e.g. PPO's value head
  make = lambda params: rnd.init_state(extend(params), optimizer, spec, state_rng, replay)
  if cfg.model.hf_path and pretrained:
    params = _pretrained_weights(cfg, mc)
    if lora.enabled(mc):  # fresh adapters (B = 0) on the checkpoint's weights
      params = lora.join(jax.device_get(lora.new_adapters(mc, lora.adapter_rng(init_rng))), params)
    if shardings is None:
      return make(jax.tree.map(jnp.asarray, params))
    params = extend(params)
    params = sharding.put(params, shardings.params)
    return jax.jit(lambda params: rnd.init_state(params, optimizer, spec, state_rng, replay),
                   out_shardings=shardings)(params)
  if shardings is None:
    return make(models.init_params(mc, init_rng))
  return jax.jit(lambda: make(models.init_params(mc, init_rng)), out_shardings=shardings)()


def _pretrained_weights(cfg, mc: models.ModelConfig):
  """The `model.hf_path` checkpoint's weights (host arrays), checked to match the run's model."""
  loaded, params = hf.load_pretrained(cfg.model.hf_path, dtype=mc.dtype,
                                      param_dtype=mc.param_dtype, scan_layers=mc.scan_layers)
  if loaded.replace(remat=mc.remat) != lora.base_config(mc):
    raise ConfigError(f"model.hf_path: {cfg.model.hf_path} config.json does not match the run's "
                      "model config")
  return params


def _population_state(cfg, mc: models.ModelConfig, spec: Spec,
                      optimizer: optax.GradientTransformation, *, pretrained: bool,
                      shardings: Any) -> rnd.TrainState:
  """`population.size` members stacked on a leading axis of every leaf: member k is the state a
  single run with `seed = cfg.seed + k` starts from (its random init and its sampling key; with
  `model.hf_path`, the same weights). Made by one vmapped program (with `shardings`, in place)."""
  replay = None
  if option(spec, "replay"):
    replay = rnd.empty_replay(spec, example_batch(cfg), sampling_config(cfg))
  extend = option(spec, "init_params") or (lambda params: params)
  seeds = cfg.seed + np.arange(population_size(cfg), dtype=np.int32)

  def member(seed, weights):
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    params = models.init_params(mc, init_rng) if weights is None else weights
    return rnd.init_state(extend(params), optimizer, spec, state_rng, replay)

  weights = None
  if cfg.model.hf_path and pretrained:
    weights = _pretrained_weights(cfg, mc)
  make = lambda seeds, weights: jax.vmap(member, in_axes=(0, None))(seeds, weights)
  if shardings is None:
    return make(jnp.asarray(seeds), weights)
  return jax.jit(make, out_shardings=shardings)(seeds, weights)


def abstract_state(cfg, mc: models.ModelConfig, spec: Spec,
                   optimizer: optax.GradientTransformation) -> rnd.TrainState:
  """Shapes and dtypes of `initial_state` (a restore target), without reading or making weights."""
  return jax.eval_shape(lambda: initial_state(cfg, mc, spec, optimizer, pretrained=False))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`abstract_state` leaves carrying `shardings` (Orbax restores each array into its shards)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# ---- the run ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything one run is made of (see the module docstring)."""

  cfg: Any
  task: Any  # tasks.Task, or pipeline.JsonlData
  tokenizer: tokenizers.Tokenizer
  model_config: models.ModelConfig
  spec: Spec  # the self-improvement rounds
  warmup_spec: Spec  # the warm-up rounds (SFT, or SFT + judge training)
  optimizer: optax.GradientTransformation
  sampling: sampling.SamplingConfig
  verifier: Any  # jittable verifier, or None when the data has no answers
  scorer: Any  # the rewards' scorer, or None when the verifier gives them

  @property
  def total_rounds(self) -> int:
    return self.cfg.warmup.rounds + self.cfg.rounds

  def abstract_state(self) -> rnd.TrainState:
    return abstract_state(self.cfg, self.model_config, self.spec, self.optimizer)

  def initial_state(self, shardings: Any = None) -> rnd.TrainState:
    return initial_state(self.cfg, self.model_config, self.spec, self.optimizer,
                         shardings=shardings)

  def restore(self, ckpt, step: int | None = None, *, shardings: Any = None):
    """`ckpt.restore(step)` of this run's state (with `shardings`, a TrainState of them):
    (state, data_state, config_json, metrics). With LoRA, checkpoints hold the state without the
    base weights (`lora.saved_state`); they are re-read from `model.hf_path`, or re-initialised
    from `cfg.seed`, exactly as the run started."""
    abstract = self.abstract_state()
    if shardings is not None:
      abstract = with_shardings(abstract, shardings)
    if not lora.enabled(self.model_config):
      return ckpt.restore(step, abstract_state=abstract)
    saved, *rest = ckpt.restore(step, abstract_state=lora.saved_state(abstract))
    return (lora.restored_state(saved, self.initial_state(shardings).params), *rest)

  @property
  def sft_warmup_rounds(self) -> int:
    """Leading warm-up rounds that are plain SFT (the judge trains in the rest of the warm-up)."""
    warmup, judge_rounds = self.cfg.warmup.rounds, self.cfg.warmup.judge_rounds
    if not isinstance(self.warmup_spec, JudgeSFT) or judge_rounds < 0:
      return 0
    return warmup - judge_rounds

  def round_fn(self, *, warmup: bool = False, num_samples: int = 0, sft: bool = False,
               **on_mesh):
    """The jitted round of the warm-up (`sft`: its plain-SFT rounds) or of the self-improvement
    phase (`on_mesh`: `mesh`, `rules`, `state_shardings` as `round.build_round_fn` takes them)."""
    cfg = self.cfg
    nan_rounds = None
    if cfg.debug.nan_from_round:  # fault injection: NaN losses in these rounds
      nan_rounds = (cfg.debug.nan_from_round, cfg.debug.nan_to_round)
    if warmup:  # judge training labels `sampling.n` samples per prompt; SFT does not sample
      return rnd.build_round_fn(self.model_config, SFT() if sft else self.warmup_spec,
                                self.optimizer,
                                self.sampling, self.verifier,
                                num_minibatches=cfg.warmup.num_minibatches,
                                nan_rounds=nan_rounds, balance=balance_config(cfg, grids=False),
                                **self._population(on_mesh))
    if option(self.spec, "attempts") == 2 and self.verifier is None:
      raise ConfigError(f"algorithm.name: {self.spec.name} verifies both attempts, and "
                        f"data.task={cfg.data.task!r} has no answers")
    return rnd.build_round_fn(self.model_config, self.spec, self.optimizer, self.sampling,
                              self.verifier, scorer=self.scorer,
                              num_epochs=cfg.algorithm.num_epochs,
                              num_minibatches=cfg.algorithm.num_minibatches,
                              num_samples=num_samples, nan_rounds=nan_rounds,
                              phase_start=cfg.warmup.rounds, balance=self.balance(),
                              **self._population(on_mesh))

  def balance(self) -> bstar.Balance:
    """The self-improvement rounds' B-STaR monitor and grids (`balance_config`); a grid needs the
    verifier, which counts the correct samples."""
    balance = balance_config(self.cfg)
    if (balance.temperatures or balance.thresholds) and self.verifier is None:
      key = "sampling.auto_temperature" if balance.temperatures else "algorithm.auto_threshold"
      raise ConfigError(f"{key}: choosing by the balance score counts correct samples, and "
                        f"data.task={self.cfg.data.task!r} has no answers to verify them")
    return balance

  def _population(self, on_mesh: dict) -> dict:
    """`on_mesh` plus the population's size and the mesh axes its members are vmapped over
    (`population_axis`: the `population` rule's, None when replicated or without a mesh)."""
    size = population_size(self.cfg)
    if size == 1:
      return on_mesh
    axes = sharding.population_axes(on_mesh.get("rules")) if on_mesh.get("mesh") else None
    return {**on_mesh, "population": size, "population_axis": axes}

  def train_source(self):
    """The training rows' random-access source (built-in tasks synthesise DPO pairs on demand;
    JSONL rows carry their own chosen / rejected)."""
    if uses_pair_data(self.cfg) and not is_jsonl_data(self.cfg):
      return self.task.source("train", data_seed(self.cfg), pairs=True)
    return self.task.source("train", data_seed(self.cfg))


# SCoRe's correction instruction when `algorithm.correction_prompt` is "": JSONL data gets the
# paper's (`registry.SCORE_JSONL_INSTRUCTION`); built-in tasks ask the problem again ("{prompt}"):
# their tiny models know only "problem -> solution", and the first attempt stays in view before it.
PROMPT_FIELD = "{prompt}"


def correction_tokens(cfg, tok: tokenizers.Tokenizer) -> tuple[tuple[int, ...], bool]:
  """SCoRe's correction instruction (`algorithm.correction_prompt`, or the defaults above): its
  token ids, and whether the prompt follows them (the text ends with `{prompt}`)."""
  text = cfg.algorithm.correction_prompt or (registry.SCORE_JSONL_INSTRUCTION if is_jsonl_data(cfg)
                                             else PROMPT_FIELD)
  repeat = text.endswith(PROMPT_FIELD)
  before = text[:-len(PROMPT_FIELD)] if repeat else text
  if PROMPT_FIELD in before:
    raise ConfigError(f"algorithm.correction_prompt: {text!r} may hold {PROMPT_FIELD} once, at "
                      "its end (the problem asked again after the instruction)")
  ids = tuple(tok.encode(before)) if before else ()
  if not ids and not repeat:
    raise ConfigError(f"algorithm.correction_prompt: {text!r} encodes to no tokens")
  return ids, repeat


def run_spec(cfg, tok: tokenizers.Tokenizer) -> Spec:
  """`build_spec(cfg)` with what needs the tokenizer filled in (SCoRe's correction tokens)."""
  spec = build_spec(cfg)
  if option(spec, "attempts") == 2 and not option(spec, "correction") \
      and not option(spec, "repeat_prompt"):
    ids, repeat = correction_tokens(cfg, tok)
    spec = dataclasses.replace(spec, correction=ids, repeat_prompt=repeat, pad_id=tok.pad_id or 0)
  search = option(spec, "search")
  if search is not None and not search.separator:
    spec = dataclasses.replace(spec, search=dataclasses.replace(
        search, separator=separator_tokens(cfg, tok)), pad_id=tok.pad_id or 0)
  return spec


def separator_tokens(cfg, tok: tokenizers.Tokenizer) -> tuple[int, ...]:
  """ReST-MCTS*'s step separator (`algorithm.search_separator`, or the task's own): the token
  ids a step ends on, each piece the text encodes to (a one-token separator: one id)."""
  text = cfg.algorithm.search_separator
  if not text:
    task_cls = None if is_jsonl_data(cfg) else tasks.TASKS.get(cfg.data.task)
    text = getattr(task_cls, "step_separator", None) or ""
  if not text:
    raise ConfigError(f"algorithm.search_separator: data.task={cfg.data.task!r} has no step "
                      "separator of its own; set the text that ends a solution step (e.g. '\\n')")
  ids = tuple(tok.encode(text))
  if len(ids) != 1:
    raise ConfigError(f"algorithm.search_separator: {text!r} encodes to {len(ids)} tokens "
                      f"{ids}; the search ends a step on one token, so give text that is one")
  return ids


def balance_config(cfg, grids: bool = True) -> bstar.Balance:
  """The B-STaR monitor's n* and selection threshold, and (`grids`: the self-improvement rounds)
  the temperature / threshold grids each round chooses from."""
  a = cfg.algorithm
  if not grids:
    return bstar.Balance(n_star=a.balance_n_star, threshold=a.reward_threshold)
  return bstar.Balance(
      n_star=a.balance_n_star, threshold=a.reward_threshold,
      temperatures=registry.parse_floats("sampling.auto_temperature", cfg.sampling.auto_temperature),
      thresholds=registry.parse_floats("algorithm.auto_threshold", a.auto_threshold))


def build_verifier(cfg, task, tok):
  """The held-out (and in-round monitoring) verifier: None when the data has no answers;
  math-verify's (`math_reward.make_verifier`) when the run's rewards use the built-in `math`
  reward, so held-out accuracy is judged as the rewards are; else the task's own."""
  if not task.has_answers:
    return None
  names = python_rewards.reward_fn_specs(cfg)[0]
  if any(python_rewards.BUILTIN.get(n, n) == python_rewards.BUILTIN["math"] for n in names):
    return math_reward.make_verifier(tok)
  return task.make_verifier(tok)


def build(cfg, workdir: str | Path) -> Run:
  """The run of `cfg` (the task tokenizer is built, or found cached, under `workdir`)."""
  task, tok = task_and_tokenizer(cfg, workdir)
  mc = model_config(cfg, tok)
  return Run(cfg=cfg, task=task, tokenizer=tok, model_config=mc, spec=run_spec(cfg, tok),
             warmup_spec=build_warmup_spec(cfg, tok, task), optimizer=build_optimizer(cfg),
             sampling=sampling_config(cfg, tok),
             verifier=build_verifier(cfg, task, tok),
             scorer=build_scorer(cfg, mc, tok, task))
