"""Update step and whole GRPO round: ours vs TRL's `DPOTrainer` / `GRPOTrainer`, same weights.

  python -m bench.trl_compare           # full run (~1.5 min idle, 3-8 min on a loaded machine):
                                        #   results/trl_compare.json + the docs section
  python -m bench.trl_compare --quick   # tiny harness check (< 60 s): results/trl_compare_quick.json

Needs the `bench` extra (`pip install -e '.[bench]'`: trl, torch==2.13.0). One random Llama is built
with transformers, written with `save_pretrained` and loaded by both sides (ours through
`models.hf.load_pretrained`); fp32 on both sides, same batches, same sequence lengths, same optimizer
(AdamW, global-norm clip 1.0, constant lr, no weight decay). Three measurements:

  dpo          one DPO optimizer step on P pairs (reference log-probs + policy loss + grad + AdamW)
  grpo_update  one GRPO optimizer step on a prepared group batch (policy loss + grad + AdamW)
  grpo_round   one whole GRPO round: sample n completions per prompt, score them with a verifiable
               reward, group advantages, one update

TRL's side is timed the way its `Trainer` loop runs an optimizer step (`training_step`, gradient
clipping, `optimizer.step`, `lr_scheduler.step`, `zero_grad`) on a batch built before the timer
starts (pre-tokenized and collated: tokenization and data loading are outside the timing). Ours is
one call of the jitted round (`round.build_round_fn`) that blocks on its result. First calls (our
compile, torch warm-up) are excluded; reps are interleaved (ours, TRL with 2 torch threads, TRL
with 1 thread) and medians reported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common, timing
from bench.common import Log
from bench.profiling import kernel_profile
from bench.render import trl as render
from bench.timing import interleaved
from bench.trl_side import (BOS, EOS, PAD, SEED, TORCH_THREADS, hf_model, reward_width, set_threads,
                            tokenizer, trl_dpo, trl_grpo_round, trl_grpo_update, with_threads)

NAME = "trl_compare"  # results/<NAME>.json
DOCS_SECTION = "trl"  # docs/benchmarks.md section (`python -m bench --suite trl`)
TARGETS = {"update_step": 1.5, "grpo_round": 5.0}  # issue 10: ours / TRL


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything a run depends on (recorded in the JSON)."""

  model: dict  # LlamaConfig kwargs
  dpo_pairs: int  # preference pairs per DPO step
  prompt_len: int  # tokens per prompt (DPO and GRPO)
  response_len: int  # DPO chosen / rejected length (the last token is EOS)
  grpo_prompts: int  # prompts per GRPO round
  group_size: int  # completions per prompt (TRL num_generations)
  completion_len: int  # new tokens per completion (exactly: EOS can't stop a row early)
  learning_rate: float
  beta: float  # DPO beta
  update_reps: int
  round_reps: int
  warmup: int  # untimed calls before the timed reps (the first one compiles ours)
  matmul_n: int  # size of the fp32 [n, n] @ [n, n] matmul-peak probe


FULL = Spec(
    model=dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
    dpo_pairs=8, prompt_len=16, response_len=48, grpo_prompts=4, group_size=8, completion_len=48,
    learning_rate=1e-6, beta=0.1, update_reps=9, round_reps=7, warmup=2, matmul_n=2048)

QUICK = Spec(
    model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    dpo_pairs=2, prompt_len=4, response_len=8, grpo_prompts=2, group_size=2, completion_len=8,
    learning_rate=1e-6, beta=0.1, update_reps=2, round_reps=2, warmup=1, matmul_n=256)

INCLUDES = {
    "dpo": {
        "ours": "one jitted round of the DPO spec (pairs from the batch): frozen reference forward "
                "over the 2P sequences, policy forward + backward (LM head over every position), "
                "DPO sigmoid loss, global-norm clip, AdamW update, non-finite guard, metrics",
        "trl": "DPOTrainer.training_step (reference forward under no_grad + policy forward + "
               "backward, TRL's fused LM head over completion tokens) + clip_grad_norm + "
               "optimizer.step (fused AdamW) + lr_scheduler.step + zero_grad; "
               "precompute_ref_log_probs=False (TRL's default: reference forward every step, "
               "like ours)"},
    "grpo_update": {
        "ours": "one jitted round of a spec whose rows (old log-probs, advantages) come prepared "
                "in the batch: policy forward + backward, GRPO clipped-ratio loss (dapo token "
                "normalisation), clip, AdamW update, guard, metrics. No sampling, no frozen pass",
        "trl": "GRPOTrainer.training_step on buffered completions (num_iterations set so the step "
               "reuses one generated batch: policy forward + backward with old log-probs given, "
               "dapo loss) + clip_grad_norm + optimizer.step + lr_scheduler.step + zero_grad"},
    "grpo_round": {
        "ours": "one jitted round (round.build_round_fn, PolicyGradient spec, verifier reward): "
                "prefill each prompt once, sample n completions (while_loop decode), verify, group "
                "advantages, old-log-prob forward (ours always recomputes it), update, metrics",
        "trl": "GRPOTrainer.training_step on a fresh generation batch (prompt tokenization, "
               "model.generate, decode, reward function, advantages, policy forward + backward; "
               "no old-log-prob pass at num_iterations=1) + clip + optimizer.step + "
               "lr_scheduler.step + zero_grad"},
}


# ----------------------------------------------------------------------------------------------
# The shared model, tokenizer and data


@dataclasses.dataclass
class Shared:
  path: str  # save_pretrained directory (model + tokenizer), read by both sides
  config: Any  # our ModelConfig
  params: Any  # our params (device arrays), loaded from `path`
  tokenizer: Any  # transformers PreTrainedTokenizerFast ("t<id>" words <-> ids)


def build_shared(spec: Spec, directory: str) -> Shared:
  """Random Llama via transformers -> save_pretrained(directory) -> our load_pretrained."""
  import torch
  import transformers
  from selfplay_jax.models.hf import load_pretrained
  torch.manual_seed(SEED)
  cfg = transformers.LlamaConfig(**spec.model, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
  tok = tokenizer(spec.model["vocab_size"])
  tok.save_pretrained(directory)
  config, params = load_pretrained(directory)
  return Shared(path=directory, config=config, params=jax.device_put(params), tokenizer=tok)


def dpo_data(spec: Spec, vocab: int) -> dict[str, np.ndarray]:
  """P pairs of full-length prompts and responses; every response ends with EOS (as TRL adds)."""
  rng = np.random.default_rng(SEED)
  p, lp, lr = spec.dpo_pairs, spec.prompt_len, spec.response_len
  out = {"prompt_tokens": rng.integers(3, vocab, (p, lp)),
         "chosen_tokens": rng.integers(3, vocab, (p, lr)),
         "rejected_tokens": rng.integers(3, vocab, (p, lr))}
  out["chosen_tokens"][:, -1] = EOS
  out["rejected_tokens"][:, -1] = EOS
  out = {k: v.astype(np.int32) for k, v in out.items()}
  for k in ("prompt", "chosen", "rejected"):
    out[f"{k}_mask"] = np.ones_like(out[f"{k}_tokens"], dtype=bool)
  return out


def grpo_data(spec: Spec, vocab: int) -> dict[str, np.ndarray]:
  """Prompts and each prompt's target: the low end of its reward id range."""
  rng = np.random.default_rng(SEED + 1)
  prompts = rng.integers(3, vocab, (spec.grpo_prompts, spec.prompt_len)).astype(np.int32)
  width = reward_width(vocab)
  lo = rng.integers(3, vocab - width, (spec.grpo_prompts, 1)).astype(np.int32)
  return {"prompt_tokens": prompts, "prompt_mask": np.ones_like(prompts, dtype=bool),
          "answer_tokens": lo, "answer_mask": np.ones_like(lo, dtype=bool)}


# ----------------------------------------------------------------------------------------------
# The verifiable reward (TRL's is `trl_side.trl_reward`): the fraction of completion tokens whose id
# lies in the prompt's target range [lo, lo + vocab / 8). Graded (not 0/1), so groups have non-zero
# advantages on a random model and the update does real work on both sides.


def jax_verifier(vocab: int):
  width = reward_width(vocab)

  def verify(tokens_BxN, mask_BxN, answer_BxA, answer_mask_BxA):
    lo = answer_BxA[:, :1]
    hit = (tokens_BxN >= lo) & (tokens_BxN < lo + width) & mask_BxN
    return hit.sum(axis=1) / jnp.maximum(mask_BxN.sum(axis=1), 1)
  return verify


# ----------------------------------------------------------------------------------------------
# Our side: each function returns `run() -> loss` that runs one step and blocks on its result.


def optimizer(spec: Spec) -> optax.GradientTransformation:
  """The library's default optimizer shape (setup.build_optimizer) = HF Trainer's defaults."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(spec.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))


def _stepper(round_fn, state, batch) -> Callable[[], float]:
  holder = {"state": state}

  def run() -> float:
    holder["state"], metrics = round_fn(holder["state"], batch)
    return float(jax.block_until_ready(metrics["train/loss"]))
  run.profile = lambda: kernel_profile(round_fn, holder, batch)  # type: ignore[attr-defined]
  return run


def ours_dpo(shared: Shared, spec: Spec, data: dict) -> Callable[[], float]:
  from selfplay_jax import round as rnd
  from selfplay_jax import sampling
  from selfplay_jax.algorithms.preference import Preference
  dpo = Preference(pairs="data", loss_type="sigmoid", beta=spec.beta)
  opt = optimizer(spec)
  round_fn = rnd.build_round_fn(shared.config, dpo, opt,
                                sampling.SamplingConfig(max_new_tokens=spec.response_len), None)
  state = rnd.init_state(shared.params, opt, dpo, jax.random.key(SEED))
  return _stepper(round_fn, state, jax.device_put(data))


@dataclasses.dataclass(frozen=True)
class PreparedRows:
  """A spec whose training rows arrive ready in the batch (old log-probs, advantages): the round
  runs only the update, which is what TRL's training_step does on buffered completions."""

  pg: Any  # PolicyGradient: its loss is used unchanged
  name: str = "grpo_update"
  samples: bool = False
  reference: str = "none"
  restart_from_base: bool = False

  def build(self, batch, rollout, rewards, logp):
    return dict(batch)

  def loss(self, logp_BxT, rows):
    return self.pg.loss(logp_BxT, rows)


def pg_spec(spec: Spec):
  from selfplay_jax.algorithms.grpo import PolicyGradient
  # TRL GRPOConfig defaults: loss_type="dapo", scale_rewards="group" (= our "grpo" advantage),
  # epsilon 0.2, beta 0 (no reference, no KL).
  return PolicyGradient(group_size=spec.group_size, loss_type="dapo", advantage="grpo",
                        clip_low=0.2, clip_high=0.2, kl_coef=0.0)


def sampling_config(spec: Spec):
  from selfplay_jax import sampling
  # eos_ids=(-1,): no id stops a row, so every completion has exactly completion_len tokens
  # (TRL's side gets min_new_tokens = max_new_tokens for the same effect).
  return sampling.SamplingConfig(max_new_tokens=spec.completion_len, temperature=1.0,
                                 n=spec.group_size, eos_ids=(-1,))


def grpo_rows(shared: Shared, spec: Spec, data: dict) -> dict:
  """A prepared GRPO batch from one of our rollouts (built once, outside any timing)."""
  from selfplay_jax import sampling
  from selfplay_jax.algorithms import losses
  from selfplay_jax.models.logprobs import completion_logprobs
  rollout = sampling.sample(shared.config, shared.params, data["prompt_tokens"], data["prompt_mask"],
                            jax.random.key(SEED + 2), sampling_config(spec))
  rep = lambda x: jnp.repeat(x, spec.group_size, axis=0)
  rewards = jax_verifier(shared.config.vocab_size)(rollout.tokens, rollout.mask,
                                                   rep(data["answer_tokens"]), rep(data["answer_mask"]))
  rows = {"prompt_tokens": rollout.prompt_tokens, "prompt_mask": rollout.prompt_mask,
          "tokens": rollout.tokens, "mask": rollout.mask}
  rows["old_logp"] = jax.jit(completion_logprobs, static_argnums=0)(shared.config, shared.params, rows)
  rows["advantages"] = losses.grpo_advantages(rewards, spec.group_size, scale=True)
  return jax.block_until_ready(rows)


def ours_grpo_update(shared: Shared, spec: Spec, rows: dict) -> Callable[[], float]:
  from selfplay_jax import round as rnd
  prepared = PreparedRows(pg_spec(spec))
  opt = optimizer(spec)
  round_fn = rnd.build_round_fn(shared.config, prepared, opt, sampling_config(spec), None)
  state = rnd.init_state(shared.params, opt, prepared, jax.random.key(SEED))
  return _stepper(round_fn, state, rows)


def ours_grpo_round(shared: Shared, spec: Spec, data: dict) -> tuple[Callable[[], float], Callable]:
  """The fused round, plus a getter for its last metrics (reward mean, completion length)."""
  from selfplay_jax import round as rnd
  pg, opt = pg_spec(spec), optimizer(spec)
  round_fn = rnd.build_round_fn(shared.config, pg, opt, sampling_config(spec),
                                jax_verifier(shared.config.vocab_size))
  holder = {"state": rnd.init_state(shared.params, opt, pg, jax.random.key(SEED)), "metrics": None}
  batch = jax.device_put(data)

  def run() -> float:
    holder["state"], holder["metrics"] = round_fn(holder["state"], batch)
    return float(jax.block_until_ready(holder["metrics"]["train/loss"]))
  return run, lambda: {k: float(v) for k, v in holder["metrics"].items()}


def ours_round_parts(shared: Shared, spec: Spec, data: dict, rows: dict) -> dict[str, Callable]:
  """Standalone jitted pieces of our round, to see where its time goes."""
  from selfplay_jax import sampling
  from selfplay_jax.models.logprobs import completion_logprobs
  sc, key = sampling_config(spec), jax.random.key(SEED + 3)
  logp = jax.jit(completion_logprobs, static_argnums=0)
  keys = ("prompt_tokens", "prompt_mask", "tokens", "mask")
  frozen = {k: rows[k] for k in keys}
  return {
      "sample": lambda: jax.block_until_ready(sampling.sample(
          shared.config, shared.params, data["prompt_tokens"], data["prompt_mask"], key, sc).tokens),
      "old_logp_forward": lambda: jax.block_until_ready(logp(shared.config, shared.params, frozen)),
  }


def logp_agreement(shared: Shared, data: dict, trl_batch) -> float:
  """Max |our completion log-prob - HF's| on the DPO batch: same weights, same tokens."""
  import torch
  from selfplay_jax.models.logprobs import completion_logprobs
  rows = {"prompt_tokens": np.concatenate([data["prompt_tokens"]] * 2),
          "prompt_mask": np.concatenate([data["prompt_mask"]] * 2),
          "tokens": np.concatenate([data["chosen_tokens"], data["rejected_tokens"]]),
          "mask": np.concatenate([data["chosen_mask"], data["rejected_mask"]])}
  ours = np.asarray(completion_logprobs(shared.config, shared.params, rows))
  model = hf_model(shared).eval()
  ids = torch.as_tensor(np.concatenate([rows["prompt_tokens"], rows["tokens"]], axis=1).astype(np.int64))
  if not torch.equal(ids, trl_batch["input_ids"]):
    raise RuntimeError("TRL's collated DPO batch differs from ours")
  with torch.no_grad():
    logits = model(input_ids=ids).logits[:, rows["prompt_tokens"].shape[1] - 1:-1].float()
  theirs = torch.log_softmax(logits, -1).gather(-1, ids[:, rows["prompt_tokens"].shape[1]:, None])[..., 0]
  return float(np.max(np.abs(ours - theirs.numpy())))


# ----------------------------------------------------------------------------------------------
# FLOPs: how far each update step is from the machine's matmul peak


FLOPS_FORMULA = ("forward FLOPs = 2 * N_nonembed * T + 4 * layers * T * (L / 2) * (heads * head_dim), "
                 "T = rows * L tokens, L = prompt_len + completion_len - 1 (causal: mean context L / 2); "
                 "an update = 3 forwards (forward + backward), DPO adds 1 reference forward")


def update_flops(shared: Shared, spec: Spec, rows: int, completion_len: int, ref_forward: bool) -> float:
  c = shared.config
  seq = spec.prompt_len + completion_len - 1
  tokens = rows * seq
  forward = (2 * common.param_counts(shared.params)["non_embedding"] * tokens
             + 4 * c.num_layers * tokens * (seq / 2) * c.num_heads * c.head_dim)
  return forward * (4 if ref_forward else 3)


def limits(res: dict, shared: Shared, spec: Spec, peak: float) -> dict:
  """Fraction of the matmul peak per update step, and the best GRPO-round ratio that an update
  at 100% of the peak (plus our measured sampling) would allow."""
  out = {"formula": FLOPS_FORMULA, "matmul_peak_flops": peak}
  for key, rows, length, ref in (("dpo", 2 * spec.dpo_pairs, spec.response_len, True),
                                 ("grpo_update", spec.grpo_prompts * spec.group_size,
                                  spec.completion_len, False)):
    flops, r = update_flops(shared, spec, rows, length, ref), res[key]
    trl_best_s = min(r["trl_median_s"], r["trl_1thread_median_s"])
    out[key] = {"flops": flops, "ours_fraction_of_peak": flops / r["ours_median_s"] / peak,
                "trl_fraction_of_peak": flops / trl_best_s / peak, "at_peak_s": flops / peak}
  rnd = res["grpo_round"]
  trl_round_s = min(rnd["trl_median_s"], rnd["trl_1thread_median_s"])
  floor_s = out["grpo_update"]["at_peak_s"] + rnd["breakdown"]["ours_sample_s"]
  out["grpo_round"] = {
      "trl_best_round_s": trl_round_s, "target_round_s": trl_round_s / TARGETS["grpo_round"],
      "update_at_peak_plus_our_sampling_s": floor_s, "max_ratio_with_update_at_peak": trl_round_s / floor_s}
  return out


def compare(res: dict, per_call: float, unit: str) -> dict:
  """Rates (`per_call` items per call) and ratios from interleaved medians."""
  rate = lambda side: per_call / res[f"{side}_median_s"]
  res[f"ours_{unit}"], res[f"trl_{unit}"], res[f"trl_1thread_{unit}"] = (
      rate("ours"), rate("trl"), rate("trl_1thread"))
  res["ratio"] = res[f"ours_{unit}"] / res[f"trl_{unit}"]
  res["ratio_vs_best_trl"] = res[f"ours_{unit}"] / max(res[f"trl_{unit}"], res[f"trl_1thread_{unit}"])
  for side in ("ours", "trl", "trl_1thread"):
    cores = [c for c in res[f"{side}_other_processes_cores"] if c is not None]
    res[f"{side}_other_processes_cores_median"] = statistics.median(cores) if cores else None
  return res


# ----------------------------------------------------------------------------------------------
# Measurements


def three_sides(ours: Callable[[], Any], trl: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
  """Ours, TRL with 2 torch threads and TRL with 1 (the timed sides of every measurement)."""
  return {"ours": ours, "trl": trl, "trl_1thread": with_threads(trl, 1)}


def log_rates(log: Log, row: dict, unit: str, spec: str = ".2f") -> None:
  rate = lambda side: format(row[f"{side}_{unit}"], spec)
  log(f"  ours {rate('ours')} {unit[:-2]}/s, TRL {rate('trl')} (1 thread {rate('trl_1thread')}), "
      f"ratio {row['ratio']:.2f}")


def measure_dpo(shared: Shared, spec: Spec, tmp: str, log: Log) -> tuple[float, dict]:
  """(max |log-prob difference| of the two sides on the DPO batch, the DPO step's timings)."""
  log("DPO update step")
  data = dpo_data(spec, shared.config.vocab_size)
  trl_step, trl_batch = trl_dpo(shared, spec, data, str(Path(tmp) / "dpo"))
  logp_diff = logp_agreement(shared, data, trl_batch)
  ours_step = ours_dpo(shared, spec, data)
  dpo = compare(interleaved(three_sides(ours_step, trl_step), spec.update_reps, spec.warmup), 1,
                "steps_s")
  dpo["ours_kernels"] = ours_step.profile()
  log_rates(log, dpo, "steps_s")
  return logp_diff, dpo


def measure_grpo_update(shared: Shared, spec: Spec, data: dict, rows: dict, tmp: str, log: Log) -> dict:
  log("GRPO update step")
  trl_update, update_gens = trl_grpo_update(shared, spec, data, str(Path(tmp) / "grpo_update"))
  ours_step = ours_grpo_update(shared, spec, rows)
  upd = compare(interleaved(three_sides(ours_step, trl_update), spec.update_reps, spec.warmup), 1,
                "steps_s")
  upd["ours_kernels"] = ours_step.profile()
  if len(update_gens) != 1:
    raise RuntimeError(f"TRL generated {len(update_gens)} times in the update benchmark, not once")
  log_rates(log, upd, "steps_s")
  return upd


def measure_grpo_round(shared: Shared, spec: Spec, data: dict, rows: dict, update_s: float, tmp: str,
                       log: Log) -> dict:
  """The whole round on both sides, with where its time goes (`update_s`: our update step alone)."""
  log("GRPO round")
  ours_round, ours_metrics = ours_grpo_round(shared, spec, data)
  trl_round, gen_times, trl_trainer = trl_grpo_round(shared, spec, data, str(Path(tmp) / "grpo"))
  parts = ours_round_parts(shared, spec, data, rows)
  sides = {**three_sides(ours_round, trl_round), **{f"ours_part_{k}": fn for k, fn in parts.items()}}
  res = compare(interleaved(sides, spec.round_reps, spec.warmup), spec.grpo_prompts * spec.group_size,
                "samples_s")
  # gen_times holds the warm-up calls too, then per rep one 2-thread and one 1-thread call.
  timed_gen = gen_times[spec.warmup * 2:]
  trl_gen = statistics.median(timed_gen[0::2])
  ours_parts = {k: res[f"ours_part_{k}_median_s"] for k in parts}
  res["breakdown"] = {
      "ours_sample_s": ours_parts["sample"], "ours_old_logp_forward_s": ours_parts["old_logp_forward"],
      "ours_update_s": update_s, "ours_parts_sum_s": sum(ours_parts.values()) + update_s,
      "trl_generate_s": trl_gen, "trl_generate_times_s": timed_gen[0::2],
      "trl_rest_s": res["trl_median_s"] - trl_gen, "trl_generate_share": trl_gen / res["trl_median_s"],
      "trl_1thread_generate_s": statistics.median(timed_gen[1::2])}
  om, trl_metrics = ours_metrics(), trl_trainer._metrics["train"]
  res.update(ours_reward_mean=om["train/reward_mean"], ours_completion_len=om["train/completion_len"],
             trl_reward_mean=float(trl_metrics["reward"][-1]),
             trl_completion_len=float(trl_metrics["completions/mean_length"][-1]))
  for side in ("ours", "trl"):  # both sides must have done the same amount of decoding
    if res[f"{side}_completion_len"] != spec.completion_len:
      raise RuntimeError(f"{side} completions are not all {spec.completion_len} tokens long")
  log_rates(log, res, "samples_s", ".1f")
  return res


def targets(res: dict) -> dict:
  return {"update_step_ratio": TARGETS["update_step"], "grpo_round_ratio": TARGETS["grpo_round"],
          "judged_on": "ratio_vs_best_trl",
          "dpo_update": res["dpo"]["ratio_vs_best_trl"] >= TARGETS["update_step"],
          "grpo_update": res["grpo_update"]["ratio_vs_best_trl"] >= TARGETS["update_step"],
          "grpo_round": res["grpo_round"]["ratio_vs_best_trl"] >= TARGETS["grpo_round"]}


def run(spec: Spec, log: Log) -> dict:
  import trl
  set_threads(TORCH_THREADS)
  res: dict[str, Any] = {"machine": {**common.machine_info(), "trl": trl.__version__}}
  log("probing the matmul peak")
  peaks = [timing.measure_matmul_peak(spec.matmul_n)]
  with tempfile.TemporaryDirectory() as tmp:
    shared = build_shared(spec, str(Path(tmp) / "model"))
    vocab = shared.config.vocab_size
    res["config"] = {**dataclasses.asdict(spec), "params": common.param_counts(shared.params),
                     "torch_threads": TORCH_THREADS, "seed": SEED, "dtype": "float32",
                     "optimizer": "AdamW b1 0.9 b2 0.999 eps 1e-8, clip_by_global_norm 1.0, "
                                  "constant lr, weight decay 0",
                     "reward": f"fraction of completion tokens with id in [lo, lo + {reward_width(vocab)})",
                     "includes": INCLUDES}
    res["same_weights_max_logp_diff"], res["dpo"] = measure_dpo(shared, spec, tmp, log)
    data = grpo_data(spec, vocab)
    rows = grpo_rows(shared, spec, data)
    res["grpo_update"] = measure_grpo_update(shared, spec, data, rows, tmp, log)
    res["grpo_round"] = measure_grpo_round(shared, spec, data, rows,
                                           res["grpo_update"]["ours_median_s"], tmp, log)
    log("re-probing the matmul peak (the best of both probes is the roofline)")
    peaks.append(timing.measure_matmul_peak(spec.matmul_n))
    res["limits"] = {**limits(res, shared, spec, max(peaks)), "matmul_peak_probes_flops": peaks}
  res["targets"] = targets(res)
  res["loadavg_end"] = common.loadavg()
  return res


BENCHMARK = common.Benchmark(
    name=NAME, section=DOCS_SECTION, doc=__doc__, render=render.render,
    measure=lambda args, log: run(QUICK if args.quick else FULL, log),
    missing=lambda: None if importlib.util.find_spec("trl") else "needs TRL: pip install -e '.[bench]'")


if __name__ == "__main__":
  sys.exit(common.main(BENCHMARK))
