"""One command for one accelerator chip (GPU or TPU): decode bandwidth, training MFU, the GRPO round
(fused vs split, vs TRL) and the round's known waste, each next to a probe of the same chip.

  python -m bench --suite accelerator [--wheels DIR]   # full run (< 8 min on one H100):
                                                       #   results/accelerator.json + docs section
  python -m bench --suite accelerator --quick          # tiny sizes on CPU: a harness check only,
                                                       #   results/accelerator_quick.json

One random Llama-shaped model (about 1B parameters in the full run; tiny with --quick) is written
with transformers' `save_pretrained` and loaded by every side (ours through
`models.hf.load_pretrained`, HF `generate` and TRL from the same files; without torch and
transformers our side initialises the same shapes itself and the HF / TRL parts are skipped).
Compute is `Spec.dtype` (bfloat16 in the full run), parameters and Adam moments float32 (the
real-model recipes' setting); the sampler and HF `generate` read bfloat16 copies of the weights.

Parts, in order; each fails soft (its error or skip reason is recorded and the run goes on) and a
global time budget (`Spec.budget_s`) skips what no longer fits:
  probes     bf16 matmul peak ([n, n] @ [n, n]), read bandwidth (a jitted sum) and copy bandwidth
             (x + 1: read + write) of the device, taken in this process
  sampler    greedy tokens/s at each batch size (exactly `new_tokens` per row), ours and HF
             `generate` on the same device; at batch 1 the decode step against the bandwidth
             bound (bytes per step: weights + one embedding row + the K/V cache attended over)
             and the copies / transposes XLA left inside the compiled decode loop
  train      one `round.update_step` (GRPO loss, forward + backward + Adam) on rows x seq tokens:
             MFU = model FLOPs / step time / the matmul probe
  round      the GRPO round fused vs split (`bench.round.fused_vs_split`: phase split, same work
             checked), samples/s
  waste      before / after of the round's known waste: the old-log-prob forward at one update
             per round (`build_round_fn(reuse_old_logp=...)`) and the Self-Rewarding judge pass
             over all rows at once vs in chunks (memory XLA plans for it, and time)
  trl        the same one-update round in TRL's GRPOTrainer (same weights, data and reward)
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# JAX must not take the whole GPU: torch (HF generate, TRL) shares it in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, wheels  # noqa: E402
from bench.common import Log  # noqa: E402
from bench.render import accelerator as render  # noqa: E402
from bench.timing import median_of, timed  # noqa: E402

NAME = "accelerator"
SEED = 0
TARGETS = {"decode_fraction_of_bandwidth": 0.70, "train_mfu": 0.45, "round_vs_trl": 5.0,
           "fused_vs_split": 1.3}  # issue 24, judged on an accelerator only
BYTES_FORMULA = ("bytes/step = bytes(param dtype) * (N_nonembed + hidden) [weights + one embedding "
                 "row] + bytes(cache dtype) * 2 * layers * cache_len * kv_heads * head_dim * batch "
                 "[the whole K/V cache, attended over every step]")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything a run depends on (recorded in the JSON)."""

  model: dict  # LlamaConfig kwargs
  dtype: str  # compute dtype (and the sampler's / HF's weight dtype)
  prompt_len: int
  new_tokens: int  # decoded per row by the sampler part (exactly)
  batches: tuple[int, ...]
  reps: int
  hf_reps: int
  matmul_n: int
  probe_reps: int
  bandwidth_mb: int
  train_rows: int
  train_len: int  # completion tokens per training row (seq = prompt_len + train_len - 1)
  train_reps: int
  round_prompts: int
  round_n: int
  round_len: int
  round_minibatches: int  # fused vs split: updates per round
  round_reps: int
  judge_chunks: int
  scan_layers: bool  # train / round / waste parts (the real recipes' layout: compile time does
  #                    not grow with depth); the sampler part always runs the unrolled layers
  budget_s: float  # the whole run; parts that no longer fit are skipped


FULL = Spec(
    model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
               rope_theta=500000.0),
    dtype="bfloat16", prompt_len=64, new_tokens=128, batches=(1, 32, 256), reps=5, hf_reps=2,
    matmul_n=8192, probe_reps=10, bandwidth_mb=2048, train_rows=8, train_len=449, train_reps=5,
    round_prompts=8, round_n=8, round_len=128, round_minibatches=2, round_reps=3, judge_chunks=4,
    scan_layers=True, budget_s=400.0)

QUICK = Spec(
    model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    dtype="float32", prompt_len=8, new_tokens=16, batches=(1, 4, 16), reps=2, hf_reps=1,
    matmul_n=256, probe_reps=3, bandwidth_mb=16, train_rows=4, train_len=9, train_reps=2,
    round_prompts=2, round_n=2, round_len=4, round_minibatches=2, round_reps=2, judge_chunks=2,
    scan_layers=False, budget_s=240.0)


class Budget:
  """The run's time guard: `left()` seconds until `budget_s` after construction."""

  def __init__(self, seconds: float):
    self.deadline = time.perf_counter() + seconds

  def left(self) -> float:
    return self.deadline - time.perf_counter()


def soft(res: dict, key: str, budget: Budget, need_s: float, log: Log, fn: Callable[[], Any]):
  """`res[key] = fn()`; on an error `{"error": ...}` and on too little time left
  `{"skipped": ...}` instead, so one failing part never loses the others' numbers."""
  if budget.left() < need_s:
    res[key] = {"skipped": f"time budget: {budget.left():.0f} s left, this part needs ~{need_s:.0f} s"}
    log(f"{key}: skipped ({res[key]['skipped']})")
    return None
  log(f"{key} ({budget.left():.0f} s of budget left)")
  start = time.perf_counter()
  try:
    out = fn()
  except Exception as e:  # fail soft: record and go on
    res[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    log(f"{key}: FAILED {res[key]['error']}")
    return None
  out = {**out, "part_s": time.perf_counter() - start}
  res[key] = out
  return out


def has(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


# ----------------------------------------------------------------------------------------------
# Device facts and probes


def device_info() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": getattr(d, "device_kind", str(d)),
          "device_count": jax.device_count(), "devices": [str(x) for x in jax.devices()]}


def _block(x):
  return jax.block_until_ready(x)


def matmul_peak(n: int, dtype: str, reps: int) -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] in `dtype` (median of `reps`, after a warm-up call)."""
  k1, k2 = jax.random.split(jax.random.key(1))
  a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
  b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
  dot = jax.jit(jnp.dot)
  _block(dot(a, b))
  seconds, _ = median_of(lambda: _block(dot(a, b)), reps)
  return 2 * n**3 / seconds


def bandwidths(mbytes: int, reps: int) -> dict:
  """Read bandwidth (a jitted sum over `mbytes` MB) and copy bandwidth (x + 1: bytes read +
  written) of the device, B/s."""
  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  total, bump = jax.jit(jnp.sum), jax.jit(lambda v: v + 1.0)
  _block(total(x))
  _block(bump(x))
  read_s, _ = median_of(lambda: _block(total(x)), reps)
  copy_s, _ = median_of(lambda: _block(bump(x)), reps)
  return {"read_bytes_s": x.nbytes / read_s, "copy_bytes_s": 2 * x.nbytes / copy_s}


def probes(spec: Spec) -> dict:
  out = {"matmul_n": spec.matmul_n, "matmul_dtype": spec.dtype,
         "matmul_peak_flops": matmul_peak(spec.matmul_n, spec.dtype, spec.probe_reps),
         "matmul_peak_flops_f32": matmul_peak(spec.matmul_n, "float32", spec.probe_reps),
         **bandwidths(spec.bandwidth_mb, spec.probe_reps)}
  out["bandwidth_bytes_s"] = max(out["read_bytes_s"], out["copy_bytes_s"])
  return out


# ----------------------------------------------------------------------------------------------
# The model: written once, read by every side


@dataclasses.dataclass
class Model:
  path: str | None  # save_pretrained directory (None without transformers)
  config: Any  # our ModelConfig (compute dtype, float32 params)
  params: Any  # float32 params on the device
  stop_id: int  # never emitted greedily (zeroed LM-head row), so rows decode exactly new_tokens
  stacked: Any = None  # params in the scan_layers layout (`scanned`)


def build_model(spec: Spec, directory: str, log: Log) -> Model:
  from selfplay_jax.models import hf
  stop_id = spec.model["vocab_size"] - 1
  if has("torch") and has("transformers"):
    from bench.sampling import save_random_llama
    save_random_llama(spec.model, directory, SEED)
    config, params = hf.load_pretrained(directory, dtype=spec.dtype, param_dtype="float32")
    return Model(directory, config, jax.device_put(params), stop_id)
  log("torch / transformers missing: our own random init, HF and TRL parts skipped")
  from selfplay_jax import models
  m = spec.model
  config = models.ModelConfig(
      vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
      intermediate_size=m["intermediate_size"], num_layers=m["num_hidden_layers"],
      num_heads=m["num_attention_heads"], num_kv_heads=m["num_key_value_heads"],
      head_dim=m["hidden_size"] // m["num_attention_heads"], rope_theta=m.get("rope_theta", 10000.0),
      bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, dtype=spec.dtype).validate()
  params = models.init_params(config, jax.random.key(SEED))
  params["lm_head"] = params["lm_head"].at[:, stop_id].set(0.0)
  return Model(None, config, params, stop_id)


def scanned(model: Model, spec: Spec):
  """(config, params) in the layout of `spec.scan_layers` (stacked once, then kept)."""
  if not spec.scan_layers or model.config.scan_layers:
    return model.config, model.params
  if model.stacked is None:
    from selfplay_jax.models import decoder
    model.stacked = decoder.stack_layers(model.params, model.config)
  return model.config.replace(scan_layers=True), model.stacked


def non_embedding(config) -> int:
  return config.num_params() - config.vocab_size * config.hidden_size


def prompts(batch: int, prompt_len: int, stop_id: int):
  rng = np.random.default_rng(SEED + batch)
  tokens = rng.integers(3, stop_id, size=(batch, prompt_len)).astype(np.int32)
  return tokens, np.ones_like(tokens, dtype=bool)


# ----------------------------------------------------------------------------------------------
# Sampler vs the bandwidth bound and HF generate


def sampler_fn(config, params, tokens, mask, new_tokens: int, stop_id: int):
  """(blocking call -> completion tokens, the compiled program)."""
  from selfplay_jax.sampling import SamplingConfig, sample
  sc = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, n=1, eos_ids=(stop_id,))
  args = (jax.device_put(tokens), jax.device_put(mask), jax.random.key(SEED))
  compiled = sample.lower(config, params, *args, sc).compile()

  def run():
    out = _block(compiled(params, *args))
    if int(out.lengths.min()) != new_tokens:
      raise RuntimeError(f"our sampler stopped early: lengths {np.asarray(out.lengths)}")
    return np.asarray(out.tokens)
  return run, compiled


def hf_generate_fn(hf_model, tokens: np.ndarray, new_tokens: int, stop_id: int, device: str):
  import torch
  ids = torch.tensor(tokens, dtype=torch.long, device=device)
  attention = torch.ones_like(ids)

  def run():
    with torch.inference_mode():
      out = hf_model.generate(input_ids=ids, attention_mask=attention, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=stop_id, pad_token_id=0, num_beams=1)
    if device != "cpu":
      torch.cuda.synchronize()
    return out[:, tokens.shape[1]:].cpu().numpy()
  return run


def load_hf(model: Model, spec: Spec):
  """The same weights in transformers, on this process's accelerator (or the CPU), in the compute
  dtype; (model, device) or (None, reason)."""
  if model.path is None:
    return None, "no transformers"
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if jax.default_backend() == "gpu" and device == "cpu":
    return None, "torch sees no CUDA device (CPU-only torch wheel?)"
  if jax.default_backend() not in ("gpu", "cpu"):
    return None, f"HF generate runs on CUDA or CPU; this chip is {jax.default_backend()}"
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      model.path, dtype=getattr(torch, spec.dtype)).to(device).eval()
  return hf, device


def cache_bytes(config, batch: int, cache_len: int) -> int:
  return (2 * config.num_layers * cache_len * config.num_kv_heads * config.head_dim * batch
          * jnp.dtype(config.dtype).itemsize)


def bytes_per_step(config, batch: int, cache_len: int) -> float:
  weights = jnp.dtype(config.param_dtype).itemsize * (non_embedding(config) + config.hidden_size)
  return weights + cache_bytes(config, batch, cache_len)


def sampler_part(model: Model, spec: Spec, bandwidth: float, log: Log) -> dict:
  from bench.profiling import loop_relayouts
  cfg = model.config.replace(param_dtype=spec.dtype)  # inference weights in the compute dtype
  params = jax.tree.map(lambda x: x.astype(spec.dtype), model.params)
  hf, device = load_hf(model, spec) if spec.hf_reps else (None, "hf_reps=0")
  rows, calls = [], {}
  for batch in spec.batches:
    tokens, mask = prompts(batch, spec.prompt_len, model.stop_id)
    ours, compiled = sampler_fn(cfg, params, tokens, mask, spec.new_tokens, model.stop_id)
    calls[batch] = ours
    first_s, ours_tokens = timed(ours)
    ours_s, times = median_of(ours, spec.reps)
    row = {"batch": batch, "ours_first_call_s": first_s, "ours_times_s": times, "ours_s": ours_s,
           "ours_tok_s": batch * spec.new_tokens / ours_s}
    if hf is not None:
      gen = hf_generate_fn(hf, tokens, spec.new_tokens, model.stop_id, device)
      hf_first, hf_tokens = timed(gen)
      hf_s, hf_times = median_of(gen, spec.hf_reps)
      row.update(hf_first_call_s=hf_first, hf_times_s=hf_times, hf_s=hf_s,
                 hf_tok_s=batch * spec.new_tokens / hf_s, ratio_vs_hf=hf_s / ours_s,
                 greedy_rows_identical=float(np.mean(np.all(ours_tokens == hf_tokens, axis=1))))
    if batch == 1:
      rel = loop_relayouts(compiled.as_text())
      row["decode_loop_relayouts"] = {
          "count": len(rel), "bytes_per_step": sum(r["bytes"] for r in rel),
          "largest": sorted(rel, key=lambda r: -r["bytes"])[:4]}
    rows.append(row)
    log(f"  batch {batch}: ours {row['ours_tok_s']:,.0f} tok/s"
        + (f", HF {row['hf_tok_s']:,.0f} tok/s" if "hf_tok_s" in row else ""))
  out = {"rows": rows, "hf": "compared" if hf is not None else f"skipped: {device}",
         "hf_device": device if hf is not None else None,
         "hf_dtype": str(hf.dtype) if hf is not None else None}
  # Batch 1: the decode step alone (a 1-token call is prefill + one step), the two calls
  # interleaved so that noise hits both alike.
  tokens, mask = prompts(1, spec.prompt_len, model.stop_id)
  one, _ = sampler_fn(cfg, params, tokens, mask, 1, model.stop_id)
  full = calls.get(1) or sampler_fn(cfg, params, tokens, mask, spec.new_tokens, model.stop_id)[0]
  one(), full()
  pairs = [(timed(one)[0], timed(full)[0]) for _ in range(max(spec.reps, 5))]
  prefill_s, call_s = (statistics.median(p[i] for p in pairs) for i in (0, 1))
  step_s = (call_s - prefill_s) / (spec.new_tokens - 1)
  moved = bytes_per_step(cfg, 1, spec.prompt_len + spec.new_tokens)
  out["batch1"] = {"prefill_s": prefill_s, "call_s": call_s, "step_s": step_s, "pairs_s": pairs,
                   "bytes_per_step": moved, "formula": BYTES_FORMULA,
                   "achieved_bytes_s": moved / step_s, "bandwidth_bytes_s": bandwidth,
                   "fraction_of_bandwidth": moved / step_s / bandwidth, "weight_dtype": spec.dtype}
  del hf
  gc.collect()
  return out


# ----------------------------------------------------------------------------------------------
# Training-step MFU


def pg_spec(group_size: int):
  from selfplay_jax.algorithms.grpo import PolicyGradient
  # TRL's GRPO defaults (dapo loss, group-scaled advantages, no KL, so no reference copy).
  return PolicyGradient(group_size=group_size, loss_type="dapo", advantage="grpo", clip_low=0.2,
                        clip_high=0.2, kl_coef=0.0, reference="none")


def optimizer():
  import optax
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))


def train_part(model: Model, spec: Spec, peak: float) -> dict:
  from bench.round_limits import random_rows, train_flops
  from selfplay_jax import round as rnd
  from selfplay_jax.models.logprobs import completion_logprobs
  (config, params), alg, opt = scanned(model, spec), pg_spec(4), optimizer()
  rows = random_rows(config, spec.train_rows, spec.prompt_len, spec.train_len)
  logp = lambda p, mb: completion_logprobs(config, p, mb)
  step = jax.jit(rnd.update_step(alg, opt, logp), donate_argnums=0)
  params = jax.tree.map(jnp.copy, params)
  holder = {"carry": (params, opt.init(params), jnp.zeros((), jnp.int32))}

  def run():
    holder["carry"], metrics = step(holder["carry"], rows)
    return _block(metrics)
  first_s, _ = timed(run)
  step_s, times = median_of(run, spec.train_reps)
  seq = spec.prompt_len + spec.train_len - 1
  flops = train_flops(config, spec.train_rows, seq)
  holder.clear()
  gc.collect()
  return {"rows": spec.train_rows, "seq": seq, "tokens": spec.train_rows * seq, "flops": flops,
          "first_call_s": first_s, "times_s": times, "step_s": step_s,
          "achieved_flops": flops / step_s, "matmul_peak_flops": peak, "mfu": flops / step_s / peak,
          "dtypes": {"compute": config.dtype, "params": config.param_dtype, "adam": "float32"}}


# ----------------------------------------------------------------------------------------------
# The GRPO round: fused vs split, the waste fixes, TRL


def round_data(spec: Spec, vocab: int) -> dict:
  """Prompts and each prompt's target id range (the reward of `bench.trl_compare`)."""
  from bench.trl_side import reward_width
  rng = np.random.default_rng(SEED + 1)
  p = rng.integers(3, vocab - 1, (spec.round_prompts, spec.prompt_len)).astype(np.int32)
  lo = rng.integers(3, vocab - reward_width(vocab), (spec.round_prompts, 1)).astype(np.int32)
  return {"prompt_tokens": p, "prompt_mask": np.ones_like(p, dtype=bool), "answer_tokens": lo,
          "answer_mask": np.ones_like(lo, dtype=bool)}


def make_round(model: Model, spec: Spec, data: dict, minibatches: int, reuse_old_logp: bool = True):
  from bench import round as bround
  from bench.trl_compare import jax_verifier
  from selfplay_jax import round as rnd
  from selfplay_jax import sampling
  config, params = scanned(model, spec)
  alg, opt = pg_spec(spec.round_n), optimizer()
  sc = sampling.SamplingConfig(max_new_tokens=spec.round_len, temperature=1.0, n=spec.round_n,
                               eos_ids=(-1,))
  score = jax_verifier(config.vocab_size)
  fused = rnd.build_round_fn(config, alg, opt, sc, score, num_minibatches=minibatches,
                             reuse_old_logp=reuse_old_logp,
                             num_samples=spec.round_prompts * spec.round_n)  # bench.round reads
                                                                          # samples/tokens
  shape = bround.Shape(batch=spec.round_prompts, n=spec.round_n, completion_len=spec.round_len,
                       width=config.hidden_size)
  return bround.Round(shape=shape, config=config, params=params,
                      batch=jax.device_put(data), sampling_config=sc, spec=alg, optimizer=opt,
                      fused=fused, split=bround.Split(config, alg, opt, sc, score, minibatches))


def round_spec(spec: Spec, model: Model):
  """bench.round's Spec with the fields `fused_vs_split` reads."""
  from bench import round as bround
  base = bround.Shape(batch=spec.round_prompts, n=spec.round_n, completion_len=spec.round_len,
                      width=model.config.hidden_size)
  return bround.Spec(layers=model.config.num_layers, prompt_len=spec.prompt_len,
                     minibatches=spec.round_minibatches, fused=(), mfu_label="", scaling_base=base,
                     scaling=(), scaling_reps=1, probe_reps=spec.probe_reps,
                     matmul_n=spec.matmul_n, mfu_reps=1)


def round_part(model: Model, spec: Spec, data: dict, log: Log) -> dict:
  from bench import round as bround
  r = make_round(model, spec, data, spec.round_minibatches)
  row = bround.fused_vs_split(r, "round", round_spec(spec, model), spec.round_reps, log)
  del r
  gc.collect()
  return row


def interleaved_rounds(rounds: dict, reps: int) -> dict:
  """Median seconds of fused rounds (`bench.round.run_fused` on a fresh state each), sides
  interleaved per rep; first calls (compile) timed apart."""
  from bench import round as bround
  out: dict[str, Any] = {}
  for name, r in rounds.items():
    out[f"{name}_first_call_s"] = bround.timed_round(r, bround.run_fused)[0].wall
  times: dict[str, list[float]] = {name: [] for name in rounds}
  for i in range(reps):
    for name in (list(rounds) if i % 2 == 0 else list(rounds)[::-1]):
      times[name].append(bround.timed_round(rounds[name], bround.run_fused)[0].wall)
  for name, t in times.items():
    out[f"{name}_times_s"], out[f"{name}_s"] = t, statistics.median(t)
  return out


def judge_waste(model: Model, spec: Spec, chunks: int) -> dict:
  """The Self-Rewarding judge's expected-score pass over a round's rows: all at once vs in
  `chunks` chunks (`Judge.score(num_chunks=...)`): XLA's planned temporary memory and time."""
  from selfplay_jax.scoring.judge import Judge
  config, params = scanned(model, spec)
  rows = spec.round_prompts * spec.round_n
  judge = Judge(prefix=(1, 5), middle=(6,), suffix=(7,), score_ids=tuple(range(10, 16)),
                eos_ids=(2,), bos_id=1)
  rng = np.random.default_rng(SEED + 2)
  p = jnp.asarray(rng.integers(3, config.vocab_size - 1, (rows, spec.prompt_len)), jnp.int32)
  t = jnp.asarray(rng.integers(3, config.vocab_size - 1, (rows, spec.round_len)), jnp.int32)
  args = (params, p, p > 0, t, t > 0, jax.random.key(0))
  out, scores = {"rows": rows, "chunks": chunks}, {}
  for name, n in (("unchunked", 1), ("chunked", chunks)):
    fn = jax.jit(lambda *a, n=n: judge.score(config, *a, num_chunks=n))
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    out[f"{name}_temp_bytes"] = getattr(mem, "temp_size_in_bytes", None) if mem else None
    scores[name] = np.asarray(_block(compiled(*args)))
    out[f"{name}_s"], out[f"{name}_times_s"] = median_of(lambda c=compiled: _block(c(*args)),
                                                         spec.round_reps)
  out["scores_max_abs_diff"] = float(np.max(np.abs(scores["chunked"] - scores["unchunked"])))
  if out["unchunked_temp_bytes"] and out["chunked_temp_bytes"]:
    out["temp_bytes_ratio"] = out["unchunked_temp_bytes"] / out["chunked_temp_bytes"]
  out["time_ratio"] = out["unchunked_s"] / out["chunked_s"]
  return out


def waste_part(model: Model, spec: Spec, data: dict) -> dict:
  rounds = {"with_old_logp_pass": make_round(model, spec, data, 1, reuse_old_logp=False),
            "old_logp_from_update": make_round(model, spec, data, 1, reuse_old_logp=True)}
  ab = interleaved_rounds(rounds, spec.round_reps)
  flops = {}
  for name, r in rounds.items():
    state = r.fresh_state()
    try:
      cost = r.fused.lower(state, r.batch).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      flops[name] = float(cost["flops"])
    except Exception:  # best effort: not every backend reports FLOPs
      flops[name] = None
  rows = spec.round_prompts * spec.round_n
  old = {**ab, "xla_flops": flops, "rows": rows,
         "speedup": ab["with_old_logp_pass_s"] / ab["old_logp_from_update_s"],
         "samples_per_s_after": rows / ab["old_logp_from_update_s"],
         "samples_per_s_before": rows / ab["with_old_logp_pass_s"]}
  del rounds
  gc.collect()
  return {"old_logp": old, "judge": judge_waste(model, spec, spec.judge_chunks)}


def trl_part(model: Model, spec: Spec, data: dict, ours_round_s: float | None, tmp: str) -> dict:
  """TRL's GRPOTrainer step on a fresh generation batch (one update, like our one-update round),
  same weights, data and reward; on the accelerator with bf16 autocast."""
  import torch
  from bench import trl_compare, trl_side
  accel = jax.default_backend() != "cpu"
  if accel and not torch.cuda.is_available():
    raise RuntimeError("torch sees no CUDA device: TRL would run on the CPU")
  trl_side.USE_CPU, trl_side.BF16 = not accel, accel and spec.dtype == "bfloat16"
  tok = trl_side.tokenizer(model.config.vocab_size)
  shared = trl_compare.Shared(path=model.path, config=model.config, params=model.params,
                              tokenizer=tok)
  tspec = dataclasses.replace(trl_compare.QUICK, model=spec.model, prompt_len=spec.prompt_len,
                              grpo_prompts=spec.round_prompts, group_size=spec.round_n,
                              completion_len=spec.round_len)
  step, gen_times, trainer = trl_side.trl_grpo_round(shared, tspec, data, str(Path(tmp) / "trl"))
  first_s, _ = timed(step)
  trl_s, times = median_of(step, spec.round_reps)
  rows = spec.round_prompts * spec.round_n
  out = {"first_call_s": first_s, "times_s": times, "trl_s": trl_s, "trl_samples_s": rows / trl_s,
         "trl_generate_s": statistics.median(gen_times[1:]) if len(gen_times) > 1 else None,
         "device": str(trainer.model.device), "bf16": trl_side.BF16}
  if ours_round_s:
    out.update(ours_s=ours_round_s, ours_samples_s=rows / ours_round_s,
               ratio=trl_s / ours_round_s)
  del trainer
  gc.collect()
  return out


# ----------------------------------------------------------------------------------------------
# Entry point


def run(spec: Spec, log: Log, wheel_dir: str | None = None) -> dict:
  budget = Budget(spec.budget_s)
  res: dict[str, Any] = {"wheels": wheels.activate(wheel_dir)}
  res["machine"] = {**common.machine_info(), "device": device_info(),
                    "trl": common._version("trl")}
  res["config"] = {**dataclasses.asdict(spec), "seed": SEED, "targets": TARGETS}
  pr = soft(res, "probes", budget, 0, log, lambda: probes(spec)) or {}
  peak, bandwidth = pr.get("matmul_peak_flops"), pr.get("bandwidth_bytes_s")
  with tempfile.TemporaryDirectory() as tmp:
    model = soft(res, "model", budget, 0, log,
                 lambda: {"built": build_model(spec, str(Path(tmp) / "model"), log)})
    if model is None:
      return res
    model = model.pop("built")
    res["model"] = {"params": model.config.num_params(), "non_embedding": non_embedding(model.config),
                    "from": "transformers save_pretrained" if model.path else "init_params",
                    "dtype": model.config.dtype, "param_dtype": model.config.param_dtype,
                    "scan_layers": model.config.scan_layers, **res["model"]}
    log(f"model: {res['model']['params'] / 1e6:.1f}M params")
    soft(res, "sampler", budget, 60 if spec is FULL else 0, log,
         lambda: sampler_part(model, spec, bandwidth or float("nan"), log))
    soft(res, "train", budget, 40 if spec is FULL else 0, log,
         lambda: train_part(model, spec, peak or float("nan")))
    data = round_data(spec, model.config.vocab_size)
    soft(res, "round", budget, 90 if spec is FULL else 0, log,
         lambda: round_part(model, spec, data, log))
    waste = soft(res, "waste", budget, 90 if spec is FULL else 0, log,
                 lambda: waste_part(model, spec, data))
    if not has("trl"):
      res["trl"] = {"skipped": "trl does not import (carry its wheel: docs/benchmarks.md)"}
    elif model.path is None:
      res["trl"] = {"skipped": "no transformers model to share"}
    else:
      ours_s = waste["old_logp"]["old_logp_from_update_s"] if waste else None
      soft(res, "trl", budget, 60 if spec is FULL else 0, log,
           lambda: trl_part(model, spec, data, ours_s, tmp))
  res["budget_left_s"] = budget.left()
  res["loadavg_end"] = common.loadavg()
  return res


def flags(parser) -> None:
  parser.add_argument("--wheels", default=None, metavar="DIR",
                      help=f"folder of carried *.whl files (default ${wheels.ENV}); see docs")


BENCHMARK = common.Benchmark(
    name=NAME, section=NAME, doc=__doc__, render=render.render, flags=flags,
    measure=lambda args, log: run(QUICK if args.quick else FULL, log, args.wheels))


if __name__ == "__main__":
  sys.exit(common.main(BENCHMARK))
