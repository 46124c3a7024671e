"""The training loop: Python decides when (rounds, eval, checkpoints, logs); XLA runs each round.

  train_and_evaluate(cfg, workdir) -> dict of final metrics

Warm-up SFT rounds first (`warmup.rounds`), then `rounds` self-improvement rounds with the
configured algorithm. Every round is checkpointed (Orbax, async) with the data-iterator state, so
a restart with the same workdir resumes exactly where the last complete checkpoint left off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging

from selfplay_jax import checkpoint, config_lib, models, sampling, tokenizers
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.algorithms.sft import SFT, RestEM
from selfplay_jax.data import pipeline, tasks


def build_spec(cfg):
  a, n = cfg.algorithm, cfg.sampling.n
  if a.name == "sft":
    return SFT()
  if a.name == "rest_em":
    return RestEM(group_size=n, restart_from_base=a.restart_from_base)
  if a.name in ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp"):
    defaults = {"grpo": ("grpo", "grpo"), "dr_grpo": ("dr_grpo", "dr_grpo"), "dapo": ("dapo", "grpo"),
                "rloo": ("grpo", "rloo"), "reinforce_pp": ("grpo", "reinforce_pp")}[a.name]
    return PolicyGradient(name=a.name, group_size=n, loss_type=a.loss_type or defaults[0],
                          advantage=a.advantage or defaults[1], clip_low=a.clip_low,
                          clip_high=a.clip_high, kl_coef=a.kl_coef, dynamic_filter=a.name == "dapo",
                          max_completion_len=cfg.sampling.max_new_tokens)
  raise config_lib.ConfigError(f"algorithm.name: unknown algorithm {a.name!r}")


def build_optimizer(o) -> optax.GradientTransformation:
  schedule = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps) if o.warmup_steps else o.learning_rate
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return optax.chain(*chain)


def _task_and_tokenizer(cfg, workdir: Path):
  task = tasks.get_task(cfg.data.task, **({"num_digits": cfg.data.difficulty}
                                          if cfg.data.task == "arithmetic" else {}))
  tok = tasks.build_tokenizer(task, workdir / "tokenizer")
  return task, tok


def _model_config(cfg, tok) -> models.ModelConfig:
  mc = config_lib.model_config(cfg.model)
  if not cfg.model.hf_path:  # from scratch: the task tokenizer defines the vocabulary
    mc = mc.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                    eos_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id)
  tokenizers.check_vocab(tok, mc.vocab_size)
  return mc.validate()


def evaluate(model_cfg, params, batches, verify, eos_ids, max_new_tokens: int) -> float:
  """Greedy held-out accuracy over fixed batches (each example counted once)."""
  sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=eos_ids)
  correct = total = 0.0
  for b in batches:
    out = sampling.sample(model_cfg, params, b["prompt_tokens"], b["prompt_mask"], jax.random.key(0), sc)
    r = np.asarray(_verify_jit(verify)(out.tokens, out.mask, b["answer_tokens"], b["answer_mask"]))
    correct += float((r * b["valid"]).sum())
    total += float(b["valid"].sum())
  return correct / max(total, 1.0)


_VERIFY_CACHE: dict[Any, Any] = {}


def _verify_jit(verify):
  if verify not in _VERIFY_CACHE:
    _VERIFY_CACHE[verify] = jax.jit(verify)
  return _VERIFY_CACHE[verify]


def train_and_evaluate(cfg, workdir: str | Path) -> dict[str, float]:
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  task, tok = _task_and_tokenizer(cfg, workdir)
  model_cfg = _model_config(cfg, tok)
  d = cfg.data
  lens = dict(max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
              max_answer_len=d.max_answer_len)
  sc = sampling.SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens,
                               temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k,
                               top_p=cfg.sampling.top_p, n=cfg.sampling.n, eos_ids=tuple(tok.eos_ids))
  verify = task.make_verifier(tok)
  spec, optimizer = build_spec(cfg), build_optimizer(cfg.optimizer)
  warm_spec = SFT()
  main_fn = rnd.build_round_fn(model_cfg, spec, optimizer, sc, verify,
                               num_epochs=cfg.algorithm.num_epochs,
                               num_minibatches=cfg.algorithm.num_minibatches)
  warm_fn = rnd.build_round_fn(model_cfg, warm_spec, optimizer, sc, verify,
                               num_minibatches=cfg.warmup.num_minibatches)
  eval_data = pipeline.eval_batches(task, "heldout", cfg.eval.num_examples, tokenizer=tok,
                                    batch_size=cfg.eval.batch_size, **lens)
  data_iter = pipeline.make_iterator(task.source("train", cfg.seed), tokenizer=tok,
                                     batch_size=d.batch_size, seed=cfg.seed, **lens)

  init_rng, state_rng = jax.random.split(jax.random.key(cfg.seed))
  state = rnd.init_state(models.init_params(model_cfg, init_rng), optimizer, spec, state_rng)
  ckpt = checkpoint.Checkpointer(str(workdir), keep=cfg.checkpoint.keep)
  total_rounds = cfg.warmup.rounds + cfg.rounds
  if ckpt.latest_step() is not None:
    state, data_state, _, _ = ckpt.restore(abstract_state=state)
    data_iter.set_state(data_state)
    logging.info("resumed from round %d", ckpt.restored_step)
    print(f"resumed from {workdir}/checkpoints at round {ckpt.restored_step}")
  config_json = config_lib.to_json(cfg)
  (workdir / "config.json").write_text(config_json)

  def eval_now(params):
    return evaluate(model_cfg, params, eval_data, verify, tuple(tok.eos_ids), cfg.sampling.max_new_tokens)

  first = int(state.round)
  history = {}
  metrics_file = open(workdir / "metrics.jsonl", "a")
  bar = tqdm.tqdm(range(first, total_rounds), initial=first, total=total_rounds, desc="rounds",
                  disable=not cfg.progress_bar)
  for r in bar:
    warm = r < cfg.warmup.rounds
    if r == cfg.warmup.rounds and cfg.warmup.rounds:
      history["eval/accuracy_after_warmup"] = eval_now(state.params)
      copy = lambda t: None if t is None else jax.tree.map(jnp.copy, state.params)
      state = state.replace(ref_params=copy(state.ref_params), base_params=copy(state.base_params))
    batch = next(data_iter)
    start = time.perf_counter()
    state, metrics = (warm_fn if warm else main_fn)(state, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics["time/round_s"] = time.perf_counter() - start
    metrics["round"] = r + 1
    metrics["phase"] = "warmup" if warm else cfg.algorithm.name
    if (r + 1) % cfg.eval.every_rounds == 0 or r + 1 == total_rounds:
      metrics["eval/accuracy"] = eval_now(state.params)
    ckpt.save(r + 1, state, data_state=data_iter.get_state(), config_json=config_json,
              metrics={k: v for k, v in metrics.items() if isinstance(v, float)})
    metrics_file.write(json.dumps(metrics) + "\n")
    metrics_file.flush()
    bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in
                     ("train/loss", "train/reward_mean", "eval/accuracy") if k in metrics})
    history.update(metrics)
  metrics_file.close()
  ckpt.wait()
  ckpt.close()
  return history
