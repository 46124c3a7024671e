"""Greedy sampling throughput: our jitted sampler vs `transformers` `generate`, plus rooflines.

  python -m bench.sampling           # full run (several minutes): results/sampling.json + docs section
  python -m bench.sampling --quick   # tiny harness check (< 60 s): results/sampling_quick.json only

Both sides decode exactly `new_tokens` tokens per row: the stop id is a token whose LM-head row is
zeroed (its logit is always 0, so greedy argmax never picks it), HF also gets `min_new_tokens`,
and every run is checked for full-length completions. Timings interleave ours and HF per rep.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, timing
from bench.render import sampling as render
from bench.timing import median_of, timed

NAME = "sampling"
SEED = 0
FLOPS_FORMULA = ("FLOPs/token = 2 * N_nonembed + 2 * 2 * layers * context * (heads * head_dim); "
                 "N_nonembed = all params except the input embedding table (LM head included); "
                 "context = prompt_len + new_tokens / 2 (mean attended length)")
HF_THREADS = 2  # torch intra-op threads of the headline HF baseline (= the machine's cores)
BYTES_FORMULA = ("bytes/step = 4 * (N_nonembed + hidden) [weights + one embedding row] + "
                 "4 * 2 * layers * cache_len * kv_heads * head_dim [whole K/V cache, which our "
                 "sampler attends over every step]")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything a run depends on (recorded in the JSON)."""

  model: dict  # LlamaConfig kwargs of the throughput model
  big_model: dict  # LlamaConfig kwargs of the bandwidth model (bigger than the CPU caches)
  batches: tuple[int, ...]
  prompt_len: int
  new_tokens: int
  big_new_tokens: int
  reps: int
  probe_reps: int
  matmul_n: int
  bandwidth_mb: int


FULL = Spec(
    model=dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
    big_model=dict(vocab_size=2048, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    batches=(1, 8, 32), prompt_len=16, new_tokens=128, big_new_tokens=32, reps=5, probe_reps=7,
    matmul_n=2048, bandwidth_mb=256)

QUICK = Spec(
    model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    big_model=dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    batches=(1, 2), prompt_len=16, new_tokens=8, big_new_tokens=4, reps=1, probe_reps=3,
    matmul_n=256, bandwidth_mb=16)


# ----------------------------------------------------------------------------------------------
# Models and inputs


@dataclasses.dataclass
class Models:
  hf: Any  # transformers model (None once dropped)
  config: Any  # our ModelConfig
  params: Any  # device arrays
  stop_id: int


def save_random_llama(kwargs: dict, directory: str, seed: int = SEED) -> tuple[Any, int]:
  """A random Llama (transformers, `LlamaConfig(**kwargs)`) saved with `save_pretrained`
  (safetensors) into `directory`; returns (the torch model, the stop id). The stop id's LM-head row
  is zeroed: its logit is always 0, so greedy argmax never picks it."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**kwargs)).eval()
  stop_id = kwargs["vocab_size"] - 1
  with torch.no_grad():
    model.lm_head.weight[stop_id].zero_()
  model.save_pretrained(directory)
  if not list(Path(directory).glob("*.safetensors")):
    raise RuntimeError(f"save_pretrained wrote no safetensors in {directory}")
  return model, stop_id


def load_models(directory: str, stop_id: int, hf: Any = None) -> Models:
  """Our side of a saved model (`models.hf.load_pretrained`, params on the device)."""
  from selfplay_jax.models.hf import load_pretrained
  config, params = load_pretrained(directory)
  return Models(hf=hf, config=config, params=jax.device_put(params), stop_id=stop_id)


def build_models(kwargs: dict, seed: int = SEED, keep_hf: bool = True) -> Models:
  """Random Llama via transformers -> save_pretrained -> our load_pretrained."""
  with tempfile.TemporaryDirectory() as tmp:
    model, stop_id = save_random_llama(kwargs, tmp, seed)
    return load_models(tmp, stop_id, model if keep_hf else None)


def param_counts(m: Models) -> dict[str, int]:
  return common.param_counts(m.params)


def make_prompts(batch: int, prompt_len: int, stop_id: int, seed: int = SEED):
  rng = np.random.default_rng(seed + batch)
  tokens = rng.integers(3, stop_id, size=(batch, prompt_len)).astype(np.int32)
  return tokens, np.ones_like(tokens, dtype=bool)


# ----------------------------------------------------------------------------------------------
# The two generators (each call blocks until its tokens exist and returns them as numpy)


def ours_fn(m: Models, tokens: np.ndarray, mask: np.ndarray, new_tokens: int) -> Callable[[], np.ndarray]:
  from selfplay_jax.sampling import SamplingConfig, sample
  sc = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, n=1, eos_ids=(m.stop_id,))
  tokens_d, mask_d, rng = jax.device_put(tokens), jax.device_put(mask), jax.random.key(SEED)

  def run() -> np.ndarray:
    out = jax.block_until_ready(sample(m.config, m.params, tokens_d, mask_d, rng, sc))
    if int(out.lengths.min()) != new_tokens:
      raise RuntimeError(f"our sampler stopped early: lengths {np.asarray(out.lengths)}")
    return np.asarray(out.tokens)
  return run


def hf_fn(m: Models, tokens: np.ndarray, new_tokens: int, threads: int = HF_THREADS
          ) -> Callable[[], np.ndarray]:
  import torch
  input_ids = torch.tensor(tokens, dtype=torch.long)
  attention_mask = torch.ones_like(input_ids)

  def run() -> np.ndarray:
    torch.set_num_threads(threads)
    with torch.inference_mode():
      out = m.hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=m.stop_id, pad_token_id=0, num_beams=1)
    new = out[:, tokens.shape[1]:].numpy()
    if new.shape[1] != new_tokens:
      raise RuntimeError(f"HF generate returned {new.shape[1]} tokens, expected {new_tokens}")
    return new
  return run


def agreement(a: np.ndarray, b: np.ndarray) -> float:
  """Fraction of rows whose greedy completions agree token for token (float noise may flip ties)."""
  return float(np.mean(np.all(a == b, axis=1)))


# ----------------------------------------------------------------------------------------------
# Measurements


def throughput_row(m: Models, spec: Spec, batch: int) -> dict:
  tokens, mask = make_prompts(batch, spec.prompt_len, m.stop_id)
  ours, hf = ours_fn(m, tokens, mask, spec.new_tokens), hf_fn(m, tokens, spec.new_tokens)
  hf1 = hf_fn(m, tokens, spec.new_tokens, threads=1)
  compile_s, ours_tokens = timed(ours)  # first call: trace + compile + run
  hf_warm_s, hf_tokens = timed(hf)
  hf1()
  ours_times, hf_times, hf1_times = [], [], []
  for _ in range(spec.reps):  # interleaved, so machine noise hits every side alike
    ours_times.append(timed(ours)[0])
    hf_times.append(timed(hf)[0])
    hf1_times.append(timed(hf1)[0])
  tps = lambda times: batch * spec.new_tokens / statistics.median(times)
  ours_tps, hf_tps, hf1_tps = tps(ours_times), tps(hf_times), tps(hf1_times)
  return {"batch": batch, "ours_times_s": ours_times, "hf_times_s": hf_times,
          "hf_1thread_times_s": hf1_times, "ours_first_call_s": compile_s,
          "hf_first_call_s": hf_warm_s, "ours_tok_s": ours_tps, "hf_tok_s": hf_tps,
          "hf_1thread_tok_s": hf1_tps, "ratio": ours_tps / hf_tps,
          "ratio_vs_best_hf": ours_tps / max(hf_tps, hf1_tps),
          "greedy_rows_identical": agreement(ours_tokens, hf_tokens)}


def flops_per_token(m: Models, spec: Spec) -> float:
  c = m.config
  context = spec.prompt_len + spec.new_tokens / 2
  return 2 * param_counts(m)["non_embedding"] + 4 * c.num_layers * context * c.num_heads * c.head_dim


def compute_bound(m: Models, spec: Spec, rows: list[dict], peak: float) -> dict:
  row = max(rows, key=lambda r: r["batch"])
  flops = flops_per_token(m, spec)
  return {"batch": row["batch"], "formula": FLOPS_FORMULA, "flops_per_token": flops,
          "matmul_peak_flops": peak,
          "ours_fraction_of_peak": flops * row["ours_tok_s"] / peak,
          "hf_fraction_of_peak": flops * row["hf_tok_s"] / peak}


def decode_step_fn(m: Models, cache_len: int, fill: int) -> Callable[[], None]:
  """One jitted decoder.decode call for a single token (batch 1) outside any loop."""
  from selfplay_jax.models import decoder
  step = jax.jit(functools.partial(decoder.decode, m.config))
  cache = decoder.init_cache(m.config, 1, cache_len).replace(index=jnp.asarray(fill, jnp.int32))
  token, pos = jnp.full((1, 1), 5, jnp.int32), jnp.full((1, 1), fill, jnp.int32)
  jax.block_until_ready(step(m.params, token, pos, cache))
  return lambda: jax.block_until_ready(step(m.params, token, pos, cache))


def split_prefill_decode(m: Models, spec: Spec, new_tokens: int, reps: int, with_hf: bool) -> dict:
  """Batch 1: a 1-token call (prefill + one step) vs a `new_tokens` call -> per-step decode time."""
  tokens, mask = make_prompts(1, spec.prompt_len, m.stop_id)
  short, full = ours_fn(m, tokens, mask, 1), ours_fn(m, tokens, mask, new_tokens)
  short(), full()  # compile both
  step = decode_step_fn(m, spec.prompt_len + new_tokens, spec.prompt_len + new_tokens // 2)
  out = {"new_tokens": new_tokens}
  out["ours_prefill_s"], out["ours_prefill_times_s"] = median_of(short, reps)
  out["ours_call_s"], out["ours_call_times_s"] = median_of(full, reps)
  out["ours_step_in_loop_s"] = (out["ours_call_s"] - out["ours_prefill_s"]) / (new_tokens - 1)
  out["ours_step_standalone_s"], _ = median_of(step, max(reps, 3) * 4)
  for threads in ((HF_THREADS, 1) if with_hf else ()):
    tag = "hf" if threads == HF_THREADS else f"hf_{threads}thread"
    hf_short, hf_full = hf_fn(m, tokens, 1, threads), hf_fn(m, tokens, new_tokens, threads)
    hf_short(), hf_full()
    out[f"{tag}_prefill_s"], _ = median_of(hf_short, reps)
    out[f"{tag}_call_s"], _ = median_of(hf_full, reps)
    out[f"{tag}_step_s"] = (out[f"{tag}_call_s"] - out[f"{tag}_prefill_s"]) / (new_tokens - 1)
  return out


def bytes_per_step(m: Models, cache_len: int) -> float:
  c = m.config
  weights = 4 * (param_counts(m)["non_embedding"] + c.hidden_size)
  return weights + 4 * 2 * c.num_layers * cache_len * c.num_kv_heads * c.head_dim


def bandwidth_bound(spec: Spec, bandwidth: float, peak: float) -> dict:
  m = build_models(spec.big_model, keep_hf=False)
  split = split_prefill_decode(m, spec, spec.big_new_tokens, max(spec.reps, 3), with_hf=False)
  moved = bytes_per_step(m, spec.prompt_len + spec.big_new_tokens)
  step_s = split["ours_step_in_loop_s"]
  return {"model": spec.big_model, "params": param_counts(m), "formula": BYTES_FORMULA,
          "bytes_per_step": moved, "memory_bandwidth_bytes_s": bandwidth, **split,
          "achieved_bytes_s": moved / step_s, "fraction_of_bandwidth": moved / step_s / bandwidth,
          "standalone_fraction_of_bandwidth": moved / split["ours_step_standalone_s"] / bandwidth,
          "flops_per_step": 2 * param_counts(m)["non_embedding"], "matmul_peak_flops": peak}


def profile_batch1(m: Models, spec: Spec, peak: float, bandwidth: float) -> dict:
  prof = split_prefill_decode(m, spec, spec.new_tokens, spec.reps, with_hf=True)
  prof["step_floor_bandwidth_s"] = bytes_per_step(m, spec.prompt_len + spec.new_tokens) / bandwidth
  prof["step_floor_compute_s"] = flops_per_token(m, spec) / peak
  prof["prefill_share_of_call"] = prof["ours_prefill_s"] / prof["ours_call_s"]
  return prof


# ----------------------------------------------------------------------------------------------
# Entry point


def run(spec: Spec, log: Callable[[str], None]) -> dict:
  import torch
  torch.set_num_threads(HF_THREADS)
  res: dict[str, Any] = {"machine": common.machine_info()}
  log("probing matmul peak and memory bandwidth")
  peak = timing.measure_matmul_peak(spec.matmul_n, spec.probe_reps)
  bandwidth = timing.measure_memory_bandwidth(spec.bandwidth_mb, spec.probe_reps)
  res["probes"] = {"matmul_peak_flops": peak, "memory_bandwidth_bytes_s": bandwidth}
  log(f"  {common.fmt_si(peak, 'FLOP/s')}, {common.fmt_si(bandwidth, 'B/s')}")
  m = build_models(spec.model)
  res["config"] = {**dataclasses.asdict(spec), "params": param_counts(m), "stop_id": m.stop_id,
                   "hf_attn_implementation": m.hf.config._attn_implementation,
                   "torch_threads": HF_THREADS, "seed": SEED, "greedy": True}
  rows = []
  for batch in spec.batches:
    log(f"throughput, batch {batch}")
    rows.append(throughput_row(m, spec, batch))
    log(f"  ours {rows[-1]['ours_tok_s']:,.0f} tok/s, HF {rows[-1]['hf_tok_s']:,.0f} tok/s, "
        f"ratio {rows[-1]['ratio']:.2f}")
  res["throughput"] = rows
  log("re-probing (the best of both probes is the roofline)")
  res["probes"]["matmul_peak_flops_reprobe"] = timing.measure_matmul_peak(spec.matmul_n, spec.probe_reps)
  res["probes"]["memory_bandwidth_bytes_s_reprobe"] = timing.measure_memory_bandwidth(
      spec.bandwidth_mb, spec.probe_reps)
  peak = max(peak, res["probes"]["matmul_peak_flops_reprobe"])
  bandwidth = max(bandwidth, res["probes"]["memory_bandwidth_bytes_s_reprobe"])
  res["probes"].update(matmul_peak_flops_used=peak, memory_bandwidth_bytes_s_used=bandwidth)
  res["compute_bound"] = compute_bound(m, spec, rows, peak)
  log("profiling batch 1")
  res["profile_batch1"] = profile_batch1(m, spec, peak, bandwidth)
  m.hf = None
  log("bandwidth bound (big model, batch 1)")
  res["bandwidth_bound"] = bandwidth_bound(spec, bandwidth, peak)
  res["loadavg_end"] = common.loadavg()
  return res


BENCHMARK = common.Benchmark(
    name=NAME, section=NAME, doc=__doc__, render=render.render,
    measure=lambda args, log: run(QUICK if args.quick else FULL, log))


if __name__ == "__main__":
  sys.exit(common.main(BENCHMARK))
