"""Held-out evaluation: greedy accuracy and pass@k; `selfplay-jax eval --workdir=W` on a finished run.

Also the run set-up shared with `train.py` (task, tokenizer, model config, the TrainState layout),
so that evaluation rebuilds exactly what training saved.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from selfplay_jax import checkpoint, config_lib, models, sampling, scoring, sharding, tokenizers
from selfplay_jax import round as rnd
from selfplay_jax.algorithms import ALGORITHMS
from selfplay_jax.algorithms.spec import REFERENCES
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.algorithms.preference import JudgeSFT, Preference
from selfplay_jax.algorithms.sft import SFT, RestEM
from selfplay_jax.data import pipeline, tasks
from selfplay_jax.models import hf
from selfplay_jax.scoring import judge as judge_lib

PG_DEFAULTS = {"grpo": ("grpo", "grpo"), "dr_grpo": ("dr_grpo", "dr_grpo"), "dapo": ("dapo", "grpo"),
               "rloo": ("grpo", "rloo"), "reinforce_pp": ("grpo", "reinforce_pp"),
               "sharpen_rl": ("grpo", "grpo")}
# Preference algorithms: (pair source, reference, who samples).
PREFERENCE_DEFAULTS = {"dpo": ("data", "frozen", "policy"),
                       "spin": ("gold_vs_sample", "previous", "reference"),
                       "self_rewarding": ("best_vs_worst", "previous", "reference")}
DEFAULT_REWARD = {"self_rewarding": "judge", "sharpen_sft": "likelihood", "sharpen_rl": "likelihood"}


# ---- run set-up (shared with train.py) ---------------------------------------------------------


def reward_kind(cfg) -> str:
  """What scores the samples: "custom" (`algorithm.scorer`), `algorithm.reward`, or the
  algorithm's own default."""
  if cfg.algorithm.scorer:
    return "custom"
  return cfg.algorithm.reward or DEFAULT_REWARD.get(cfg.algorithm.name, "verifier")


def is_jsonl_data(cfg) -> bool:
  """User rows from a JSONL file (else a task object, built-in or the user's, generates them)."""
  return cfg.data.task.endswith(".jsonl")


_SPEC_ATTRIBUTES = ("name", "samples", "reference", "restart_from_base", "build", "loss")


def _custom_spec(cfg):
  """`algorithm.spec`: a class with `from_config(cfg)`, or a function `f(cfg)`, giving a spec."""
  ref = cfg.algorithm.spec
  obj = config_lib.import_object(ref, "algorithm.spec")
  if isinstance(obj, type):
    if not hasattr(obj, "from_config"):
      raise config_lib.ConfigError(f"algorithm.spec: class {ref} needs a from_config(cfg) "
                                   "classmethod (or name a function f(cfg) -> spec)")
    spec = obj.from_config(cfg)
  elif callable(obj):
    spec = obj(cfg)
  else:
    raise config_lib.ConfigError(f"algorithm.spec: {ref} is not a spec class or a function (got "
                                 f"a {type(obj).__name__} object)")
  missing = [a for a in _SPEC_ATTRIBUTES if not hasattr(spec, a)]
  if missing:
    raise config_lib.ConfigError(f"algorithm.spec: {ref} gave a {type(spec).__name__} without "
                                 f"{', '.join(missing)} (see selfplay_jax/algorithms/spec.py)")
  if spec.reference not in REFERENCES:
    raise config_lib.ConfigError(f"algorithm.spec: {ref}.reference must be one of {REFERENCES}, "
                                 f"got {spec.reference!r}")
  return spec


def uses_judge(cfg) -> bool:
  return reward_kind(cfg) == "judge"


def uses_pair_data(cfg) -> bool:
  """Do the data batches carry chosen / rejected responses (offline DPO)?"""
  return PREFERENCE_DEFAULTS.get(cfg.algorithm.name, ("",))[0] == "data"


def build_spec(cfg):
  a, n = cfg.algorithm, cfg.sampling.n
  if a.spec:
    return _custom_spec(cfg)
  if a.name == "sft":
    return SFT()
  if a.name in ("rest_em", "sharpen_sft"):
    return RestEM(name=a.name, group_size=n, restart_from_base=a.restart_from_base,
                  max_per_prompt=a.max_per_prompt,
                  select="best" if a.name == "sharpen_sft" else "threshold")
  if a.name in PG_DEFAULTS:
    loss_type, advantage = PG_DEFAULTS[a.name]
    # Without a KL term the reference is never read: do not keep a copy (RL-sharpening keeps
    # it: its reward is the likelihood under the frozen base model).
    keep_ref = a.kl_coef > 0 or a.name == "sharpen_rl"
    return PolicyGradient(name=a.name, group_size=n, loss_type=a.loss_type or loss_type,
                          advantage=a.advantage or advantage, clip_low=a.clip_low,
                          clip_high=a.clip_high, kl_coef=a.kl_coef, dynamic_filter=a.name == "dapo",
                          max_completion_len=cfg.sampling.max_new_tokens,
                          overlong_buffer=a.overlong_buffer,
                          reference="frozen" if keep_ref else "none")
  if a.name in PREFERENCE_DEFAULTS:
    pairs, reference, sample_from = PREFERENCE_DEFAULTS[a.name]
    loss_type = a.loss_type or "sigmoid"
    if pairs == "data" and loss_type in ("simpo", "orpo"):
      reference = "none"  # reference-free losses, nothing samples
    return Preference(name=a.name, pairs=pairs, loss_type=loss_type, beta=a.beta,
                      label_smoothing=a.label_smoothing, simpo_gamma=a.simpo_gamma,
                      orpo_lambda=a.orpo_lambda, nll_coef=a.nll_coef, group_size=n,
                      min_score_gap=a.min_score_gap, reference=reference,
                      reference_every=a.iteration_rounds, sample_from=sample_from,
                      replay=a.name == "spin" and a.replay_previous)
  raise config_lib.ConfigError(f"algorithm.name: unknown algorithm {a.name!r}; choose one of {ALGORITHMS}")


def build_judge(cfg, tok) -> scoring.Judge:
  """The self-critique judge of `cfg.judge` (template "" = the built-in task template, or the
  additive 5-point rubric for a natural-language tokenizer; with `judge.rationale` their
  rationale versions, and score_marker "" = "<score>" / "Score: ")."""
  j, text = cfg.judge, is_jsonl_data(cfg)
  if j.rationale:
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
  if j.rationale:  # the judgement must have room for a whole solution, the marker and the score
    need = cfg.data.max_response_len - 1 + len(judge.marker) + 2
    if j.max_new_tokens < need:
      raise config_lib.ConfigError(
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
      raise config_lib.ConfigError(f"algorithm.scorer: {cfg.algorithm.scorer} returned a "
                                   f"{type(scorer).__name__}, not a scorer function")
    return scorer
  if kind == "judge":
    return scoring.judge_scorer(build_judge(cfg, tok), mc)
  if kind == "likelihood":
    return scoring.likelihood_scorer(mc, cfg.algorithm.likelihood_normalize)
  return None


def build_warmup_spec(cfg, tok):
  """Warm-up SFT; with a judge and `judge.train_in_warmup`, SFT plus judge training (EFT)."""
  if uses_judge(cfg) and cfg.judge.train_in_warmup:
    return JudgeSFT(build_judge(cfg, tok), judge_weight=cfg.judge.loss_weight)
  return SFT()


def sampling_config(cfg, tok, n: int | None = None) -> sampling.SamplingConfig:
  s = cfg.sampling
  return sampling.SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                 top_k=s.top_k, top_p=s.top_p, n=s.n if n is None else n,
                                 eos_ids=tuple(tok.eos_ids))


def build_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW over both phases: `warmup.learning_rate` for the warm-up SFT steps, then
  `optimizer.learning_rate` (after `optimizer.warmup_steps` of linear ramp) for self-improvement.
  One optimizer (one state layout) so checkpoints look the same in either phase."""
  o, w = cfg.optimizer, cfg.warmup
  main = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps) if o.warmup_steps else (
      optax.constant_schedule(o.learning_rate))
  warm_steps = w.rounds * w.num_minibatches
  lr = optax.join_schedules([optax.constant_schedule(w.learning_rate), main], [warm_steps])
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return optax.chain(*chain)


def task_and_tokenizer(cfg, workdir: Path):
  """The run's data (a built-in task, or `JsonlData` when `data.task` is a .jsonl path) and tokenizer."""
  if is_jsonl_data(cfg):
    return _jsonl_data(cfg)
  if ":" in cfg.data.task:  # the user's own task: a factory f(cfg) -> tasks.Task
    task = config_lib.import_object(cfg.data.task, "data.task")(cfg)
    if not isinstance(task, tasks.Task):
      raise config_lib.ConfigError(f"data.task: {cfg.data.task} returned a {type(task).__name__}, "
                                   "not a selfplay_jax.data.tasks.Task")
  elif cfg.data.task in tasks.TASKS:
    kwargs = {"arithmetic": dict(num_digits=cfg.data.difficulty,
                                 step_by_step=cfg.data.step_by_step),
              "sort": dict(length=cfg.data.difficulty)}.get(cfg.data.task, {})
    task = tasks.get_task(cfg.data.task, **kwargs)
  else:
    raise config_lib.ConfigError(f"data.task: {cfg.data.task!r} is neither a built-in task "
                                 f"({', '.join(sorted(tasks.TASKS))}), a .jsonl file, nor "
                                 "'file.py:factory' / 'module:factory'")
  try:  # a problem space too small to hold out a split fails here, not mid-run with a traceback
    for split in tasks.SPLITS:
      task.example(split, 0)
  except ValueError as e:
    raise config_lib.ConfigError(f"data.difficulty: {e}") from None
  extra = judge_lib.JUDGE_SYMBOLS if uses_judge(cfg) else ()
  return task, tasks.build_tokenizer(task, Path(workdir) / "tokenizer", extra_symbols=extra)


def _jsonl_data(cfg):
  source = cfg.model.tokenizer_path or cfg.model.hf_path
  if not source:
    raise config_lib.ConfigError("model.tokenizer_path: data.task is a JSONL file, so the run needs "
                                 "a tokenizer (set model.tokenizer_path or model.hf_path)")
  tok = tokenizers.load_tokenizer(source)
  name = cfg.algorithm.name
  gold = name in ("sft", "spin") or cfg.warmup.rounds
  required = ("prompt", "response") if gold else ("prompt",)
  if uses_pair_data(cfg):
    required += ("chosen", "rejected")
  # Verifier rewards and judge training need answers; SFT, SPIN and DPO do not (held-out accuracy
  # is then not measured).
  verifier_rewards = (name not in ("sft", "spin") and not uses_pair_data(cfg)
                      and reward_kind(cfg) == "verifier")
  if verifier_rewards or (uses_judge(cfg) and cfg.judge.train_in_warmup and cfg.warmup.rounds):
    required += ("answer",)
  data = pipeline.JsonlData.load(cfg.data.task, tokenizer=tok, eval_path=cfg.data.eval_path,
                                 heldout_fraction=cfg.data.heldout_fraction,
                                 answer_marker=cfg.data.answer_marker, strict=cfg.data.strict,
                                 require=required, **data_lengths(cfg))
  return data, tok


def model_config(cfg, tok) -> models.ModelConfig:
  mc = config_lib.model_config(cfg.model)
  if not cfg.model.hf_path:  # from scratch: the task tokenizer defines the vocabulary
    mc = mc.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                    eos_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id)
  tokenizers.check_vocab(tok, mc.vocab_size)
  return mc.validate()


def data_lengths(cfg) -> dict[str, int]:
  d = cfg.data
  return dict(max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
              max_answer_len=d.max_answer_len)


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
  return out


def initial_state(cfg, mc: models.ModelConfig, spec, optimizer, *, pretrained: bool = True,
                  shardings: Any = None) -> rnd.TrainState:
  """The state a run starts from: the `model.hf_path` checkpoint's weights (when set and
  `pretrained`), else parameters initialised from `cfg.seed`.

  With `shardings` (a TrainState of NamedShardings) the state is made directly in place: random
  init runs as one jitted program with those output shardings, and checkpoint tensors go from the
  host straight to their shards, so no device ever holds the whole model.
  """
  init_rng, state_rng = jax.random.split(jax.random.key(cfg.seed))
  replay = None
  if getattr(spec, "replay", False):
    sc = sampling.SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens, n=cfg.sampling.n)
    replay = rnd.empty_replay(spec, example_batch(cfg), sc)
  build = lambda params: rnd.init_state(params, optimizer, spec, state_rng, replay)
  if cfg.model.hf_path and pretrained:
    loaded, params = hf.load_pretrained(cfg.model.hf_path, dtype=mc.dtype,
                                        param_dtype=mc.param_dtype, scan_layers=mc.scan_layers)
    if loaded.replace(remat=mc.remat) != mc:
      raise models.ConfigError(f"model.hf_path: {cfg.model.hf_path} config.json does not match the "
                               "run's model config")
    if shardings is None:
      return build(jax.tree.map(jnp.asarray, params))
    params = sharding.put(params, shardings.params)
    return jax.jit(build, out_shardings=shardings)(params)
  if shardings is None:
    return build(models.init_params(mc, init_rng))
  return jax.jit(lambda: build(models.init_params(mc, init_rng)), out_shardings=shardings)()


def abstract_state(cfg, mc: models.ModelConfig, spec, optimizer) -> rnd.TrainState:
  """Shapes and dtypes of `initial_state` (a restore target), without reading or making weights."""
  return jax.eval_shape(lambda: initial_state(cfg, mc, spec, optimizer, pretrained=False))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`abstract_state` leaves carrying `shardings` (Orbax restores each array into its shards)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# ---- metrics -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _solved(mc, params, batch, verify, rng, sc: sampling.SamplingConfig):
  """(examples with at least one verified sample, valid examples) of one batch, as global sums."""
  out = sampling.sample(mc, params, batch["prompt_tokens"], batch["prompt_mask"], rng, sc)
  rep = lambda x: jnp.repeat(x, sc.n, axis=0)
  r = verify(out.tokens, out.mask, rep(batch["answer_tokens"]), rep(batch["answer_mask"]))
  any_ok = (r.reshape(-1, sc.n) >= 1.0).any(axis=1)
  valid = batch["valid"].astype(jnp.float32)
  return jnp.sum(any_ok * valid), jnp.sum(valid)


def pass_rates(mc, params, batches, verify, sc: sampling.SamplingConfig, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, rules=None) -> float:
  """Fraction of examples with at least one of `sc.n` samples verified correct (pass@n); with
  `temperature=0, n=1` this is greedy accuracy. Each example counts once (`valid` masks padding).

  With a `mesh`, `batches` hold this process's rows (`pipeline.eval_batches` shards them) and
  are sampled sharded over the mesh's batch axes; the counts are summed over all processes."""
  solved = total = 0.0
  context = (sharding.activation_rules(mesh, rules or sharding.DEFAULT_RULES) if mesh is not None
             else contextlib.nullcontext())
  with context:
    for i, b in enumerate(batches):
      b = sharding.global_batch(b, mesh) if mesh is not None else b
      s, t = _solved(mc, params, b, verify, jax.random.fold_in(jax.random.key(seed), i), sc)
      solved += float(s)
      total += float(t)
  return solved / max(total, 1.0)


def greedy_accuracy(mc, params, batches, verify, eos_ids, max_new_tokens: int,
                    mesh: jax.sharding.Mesh | None = None, rules=None) -> float:
  sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=tuple(eos_ids))
  return pass_rates(mc, params, batches, verify, sc, mesh=mesh, rules=rules)


# ---- `selfplay-jax eval` -------------------------------------------------------------------------


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
  saved = config_lib.read_run_config(workdir)
  # Keys added to the config since the run was made take their defaults.
  cfg = config_lib.load_config(str(config_lib.default_config_path())).to_dict()

  def merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
      base[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(
          base.get(key), dict) else value
    return base

  return ml_collections.ConfigDict(merge(cfg, saved))


def evaluate_workdir(workdir: str | Path, *, step: int | None = None, k: int = 8,
                     num_examples: int | None = None) -> dict[str, float]:
  """Greedy held-out accuracy and pass@k of a run's checkpoint (default: the newest)."""
  workdir = Path(workdir)
  cfg = load_run_config(workdir)
  task, tok = task_and_tokenizer(cfg, workdir)
  mc = model_config(cfg, tok)
  spec, optimizer = build_spec(cfg), build_optimizer(cfg)
  like = abstract_state(cfg, mc, spec, optimizer)
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, _, _, _ = ckpt.restore(step, abstract_state=like)
    used = ckpt.restored_step
  batches = pipeline.eval_batches(task, "heldout", num_examples or cfg.eval.num_examples, tokenizer=tok,
                                  batch_size=cfg.eval.batch_size, **data_lengths(cfg))
  verify = task.make_verifier(tok)
  n_new = cfg.sampling.max_new_tokens
  result = {"round": float(used),
            "eval/accuracy": greedy_accuracy(mc, state.params, batches, verify, tok.eos_ids, n_new)}
  if k > 0:
    sc = sampling.SamplingConfig(max_new_tokens=n_new, temperature=cfg.sampling.temperature or 1.0,
                                 top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p, n=k,
                                 eos_ids=tuple(tok.eos_ids))
    result[f"eval/pass@{k}"] = pass_rates(mc, state.params, batches, verify, sc, seed=cfg.seed)
  return result
