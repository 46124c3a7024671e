"""Greedy sampling throughput: our jitted sampler vs Tunix's native sampler, on the same weights.

  python -m bench.tunix_sampler            # full run (~2 min): results/tunix_sampler.json + docs section
  python -m bench.tunix_sampler --quick    # tiny harness check (< 60 s): results/tunix_sampler_quick.json
  python -m bench.tunix_sampler --make-venv   # creates the Tunix virtualenv below (~1 min, 1.6 GB)

Tunix (`google-tunix`, pinned below) lives in its own virtualenv, `bench/.venv-tunix` by default
(`--tunix-python` points elsewhere), so its dependency pins never touch ours:

  python3 -m venv bench/.venv-tunix && echo '*' > bench/.venv-tunix/.gitignore
  bench/.venv-tunix/bin/pip install google-tunix==0.1.7

Without that interpreter the run still measures our side and records `tunix: unavailable (reason)`.

One random Llama-3-style model (the shape of `bench.sampling`) is saved once with transformers'
`save_pretrained` (safetensors) and loaded by both: ours with `selfplay_jax.models.hf.load_pretrained`,
Tunix with its Llama 3 safetensors loader (`tunix.models.llama3.params.create_model_from_safe_tensors`)
inside a persistent worker process (`bench.tunix_worker`, run by the Tunix interpreter) that
answers one JSON line per request on stdin/stdout. Each rep times one of our calls here and one
native `tunix.generate.sampler.Sampler.__call__` in the worker (alternating which goes first);
compilation is excluded (each side's first call is separate). Both sides decode exactly
`new_tokens` tokens per row: the stop id (also Tunix's pad id) has a zeroed LM-head row, so greedy
argmax never picks it, and every call is checked for full-length completions.
Tunix's Llama 3 applies RoPE with a fixed theta of 1e6 whatever its config says, so the shared model
uses rope_theta = 1e6 (the only departure from `bench.sampling`'s model), else greedy outputs differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Log
from bench.profiling import trace_breakdown
from bench.render import tunix as render
from bench.timing import timed
from bench.tunix_worker import TunixClient, TunixUnavailable

NAME = "tunix_sampler"
DOCS_SECTION = "tunix"
SEED = 0
TUNIX_REQUIREMENT = "google-tunix==0.1.7"
DEFAULT_TUNIX_VENV = common.REPO_ROOT / "bench" / ".venv-tunix"
TUNIX_ROPE_THETA = 1_000_000.0  # tunix.models.llama3.model.apply_rope's default; its config value is unused
TARGETS = {1: 1.5, 32: 3.0}  # issue 10: ours / Tunix tok/s at these batch sizes
SETTLE_S = 0.05  # idle gap before each timed call, so the other process's XLA threads stop spinning


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything a run depends on (recorded in the JSON)."""

  model: dict  # LlamaConfig kwargs of the shared model
  batches: tuple[int, ...]
  prompt_len: int  # tokens per prompt (no padding)
  new_tokens: int  # tokens decoded per row, exactly
  reps: tuple[int, ...]  # timed, interleaved calls per side, per batch (more where calls are short)
  profile_batches: tuple[int, ...]  # batches whose calls are split into phases and traced
  profile_reps: int  # interleaved reps of the per-phase split


def _specs() -> tuple[Spec, Spec]:
  from bench import sampling  # the sampler benchmark's model, batches and lengths
  full, quick = sampling.FULL, sampling.QUICK
  return (Spec(model={**full.model, "rope_theta": TUNIX_ROPE_THETA}, batches=full.batches,
               prompt_len=full.prompt_len, new_tokens=full.new_tokens, reps=(21, 11, 7),
               profile_batches=(min(full.batches), max(full.batches)), profile_reps=7),
          Spec(model={**quick.model, "rope_theta": TUNIX_ROPE_THETA}, batches=quick.batches,
               prompt_len=quick.prompt_len, new_tokens=quick.new_tokens, reps=(1, 1),
               profile_batches=(max(quick.batches),), profile_reps=1))


def make_venv(venv: Path, log: Log) -> float:
  """Creates `venv` and installs Tunix into it; returns the seconds it took."""
  start = time.perf_counter()
  pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
  create = [sys.executable, "-m", "venv", str(venv)]
  log(" ".join(create))
  subprocess.run(create, check=True)
  (venv / ".gitignore").write_text("*\n")  # git never picks up the venv (1.6 GB), wherever it is
  log(" ".join(pip + [TUNIX_REQUIREMENT]))
  subprocess.run(pip + [TUNIX_REQUIREMENT], check=True)
  return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Comparing the two sides' outputs


def agreement_stats(ours, tunix) -> dict:
  import numpy as np
  ours, tunix = np.asarray(ours), np.asarray(tunix)
  same = ours == tunix
  first = [int(np.argmin(row)) if not row.all() else None for row in same]
  return {"rows_identical": float(np.mean(same.all(axis=1))), "tokens_identical": float(np.mean(same)),
          "first_divergence": first}


def compare_logits(m, client: TunixClient, prompt) -> dict:
  """Max |ours - Tunix| over the full-sequence logits of one prompt (no cache on either side)."""
  import jax.numpy as jnp
  import numpy as np
  from selfplay_jax.models import decoder
  ours = np.asarray(decoder.forward(m.config, m.params, jnp.asarray(prompt[None], jnp.int32))[0])
  theirs = np.asarray(client.request("logits", prompt=prompt.tolist())["logits"], np.float32)
  return {"max_abs_diff": float(np.max(np.abs(ours - theirs))),
          "max_abs_logit": float(np.max(np.abs(ours))),
          "argmax_identical": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}


# ----------------------------------------------------------------------------------------------
# Measurements


def throughput_row(m, spec: Spec, batch: int, reps: int, client: TunixClient | None) -> dict:
  from bench import sampling
  tokens, mask = sampling.make_prompts(batch, spec.prompt_len, m.stop_id)
  ours = sampling.ours_fn(m, tokens, mask, spec.new_tokens)
  ours_first_s, ours_tokens = timed(ours)  # trace + compile + run
  ours()  # untimed, like Tunix's second call in `prepare`
  row: dict[str, Any] = {"batch": batch, "ours_first_call_s": ours_first_s}
  tunix_times: list[float] = []
  ours_times: list[float] = []
  if client is not None:
    first = client.request("prepare", prompts=tokens.tolist(), new_tokens=spec.new_tokens,
                           stop_id=m.stop_id)
    row["tunix_first_call_s"] = first["first_call_s"]
    row["agreement"] = agreement_stats(ours_tokens, first["tokens"])
  for rep in range(reps):  # interleaved; who goes first alternates
    sides = ["ours", "tunix"] if rep % 2 == 0 else ["tunix", "ours"]
    for side in sides:
      time.sleep(SETTLE_S)
      if side == "ours":
        ours_times.append(timed(ours)[0])
      elif client is not None:
        tunix_times.append(client.request("run", batch=batch)["seconds"])
  tps = lambda times: batch * spec.new_tokens / statistics.median(times)
  row.update(ours_times_s=ours_times, ours_tok_s=tps(ours_times))
  if client is not None:
    row.update(tunix_times_s=tunix_times, tunix_tok_s=tps(tunix_times),
               ratio=row["ours_tok_s"] / tps(tunix_times),
               ratio_of_best=min(tunix_times) / min(ours_times))  # least disturbed call of each
  return row


def profile_row(m, spec: Spec, batch: int, client: TunixClient | None) -> dict:
  """Where a call's time goes, both sides interleaved per rep (medians). Ours is one jitted call:
  a 1-token call (prefill + one step) vs the full call gives the per-step loop time. Tunix's call is
  replayed phase by phase (setup, prefill, decode loop). Then one `jax.profiler`-traced call each."""
  from bench import sampling
  tokens, mask = sampling.make_prompts(batch, spec.prompt_len, m.stop_id)
  short = sampling.ours_fn(m, tokens, mask, 1)
  full = sampling.ours_fn(m, tokens, mask, spec.new_tokens)
  short(), full()  # compile the 1-token call
  times: dict[str, list[float]] = {"ours_prefill_and_first_step_s": [], "ours_call_s": []}
  for _ in range(spec.profile_reps):
    time.sleep(SETTLE_S)
    times["ours_prefill_and_first_step_s"].append(timed(short)[0])
    times["ours_call_s"].append(timed(full)[0])
    if client is not None:
      time.sleep(SETTLE_S)
      for key, value in client.request("phases", batch=batch).items():
        times.setdefault(f"tunix_{key}", []).append(value)
  med = {key: statistics.median(values) for key, values in times.items()}
  steps = spec.new_tokens
  out: dict[str, Any] = {"batch": batch, "reps": spec.profile_reps, "times_s": times, "ours": {
      "prefill_and_first_step_s": med["ours_prefill_and_first_step_s"],
      "call_s": med["ours_call_s"],
      "step_in_loop_s": (med["ours_call_s"] - med["ours_prefill_and_first_step_s"]) / (steps - 1)}}
  out["ours_trace"] = trace_breakdown(full)
  if client is not None:
    # Tunix's loop runs `steps` iterations after its prefill picked the first token.
    out["tunix"] = {"setup_s": med["tunix_setup_s"], "prefill_s": med["tunix_prefill_s"],
                    "decode_loop_s": med["tunix_decode_loop_s"],
                    "step_in_loop_s": med["tunix_decode_loop_s"] / steps}
    out["step_ratio"] = out["tunix"]["step_in_loop_s"] / out["ours"]["step_in_loop_s"]
    out["tunix_trace"] = client.request("trace", batch=batch)
  return out


def targets(rows: list[dict]) -> dict:
  by_batch = {r["batch"]: r for r in rows}
  out = {}
  for batch, want in TARGETS.items():
    ratio = by_batch.get(batch, {}).get("ratio")
    out[f"batch_{batch}"] = {"target_ratio": want, "ratio": ratio,
                             "met": None if ratio is None else ratio >= want}
  return out


# ----------------------------------------------------------------------------------------------
# Entry point


def start_tunix(python: str | os.PathLike, log: Log,
                client: TunixClient | None = None) -> tuple[TunixClient | None, dict]:
  """A ready worker and its record, or None and `{"available": False, "reason": ...}`."""
  try:
    client = client or TunixClient(python)
    versions = client.wait_ready()
  except TunixUnavailable as e:
    log(f"tunix: unavailable ({e})")
    return None, {"available": False, "reason": str(e), "python": str(python)}
  return client, {"available": True, "python": str(python), "versions": versions}


def run(spec: Spec, tunix_python: str | os.PathLike, log: Log) -> dict:
  from bench import sampling
  res: dict[str, Any] = {"machine": common.machine_info()}
  log(f"starting the Tunix worker ({tunix_python})")
  try:
    client = TunixClient(tunix_python)  # imports Tunix while we build the model
  except TunixUnavailable:
    client = None
  try:
    with tempfile.TemporaryDirectory() as model_dir:
      _, stop_id = sampling.save_random_llama(spec.model, model_dir)
      m = sampling.load_models(model_dir, stop_id)
      client, res["tunix"] = start_tunix(tunix_python, log, client)
      res["config"] = {**dataclasses.asdict(spec), "params": common.param_counts(m.params),
                       "stop_id": stop_id, "tunix_pad_id": stop_id, "seed": SEED, "greedy": True,
                       "settle_s": SETTLE_S,
                       "weights": "transformers save_pretrained (safetensors), fp32"}
      if client is not None:
        loaded = client.request("load", model_dir=model_dir)
        res["tunix"].update(load_s=loaded["load_s"], params=loaded["params"],
                            model_config=loaded["model_config"])
        if loaded["params"] != res["config"]["params"]["total"]:
          raise RuntimeError(f"Tunix loaded {loaded['params']} params, ours "
                             f"{res['config']['params']['total']}")
    if client is not None:
      prompt, _ = sampling.make_prompts(1, spec.prompt_len, stop_id)
      res["logits"] = compare_logits(m, client, prompt[0])
      log(f"logits max |ours - Tunix| = {res['logits']['max_abs_diff']:.3g}")
    rows = []
    for batch, reps in zip(spec.batches, spec.reps, strict=True):
      log(f"throughput, batch {batch} ({reps} reps)")
      rows.append(throughput_row(m, spec, batch, reps, client))
      r = rows[-1]
      log(f"  ours {r['ours_tok_s']:,.0f} tok/s" + (
          f", Tunix {r['tunix_tok_s']:,.0f} tok/s, ratio {r['ratio']:.2f}, rows identical "
          f"{r['agreement']['rows_identical']:.0%}" if client is not None else ""))
    res["throughput"] = rows
    res["targets"] = targets(rows)
    res["profile"] = []
    for batch in spec.profile_batches:
      log(f"per-phase split, batch {batch}")
      res["profile"].append(profile_row(m, spec, batch, client))
  finally:
    if client is not None:
      client.close()
  res["loadavg_end"] = common.loadavg()
  return res


def add_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--tunix-python", default=str(DEFAULT_TUNIX_VENV / "bin" / "python"),
                      help="interpreter of the virtualenv with google-tunix (default %(default)s)")
  parser.add_argument("--make-venv", action="store_true",
                      help=f"create {DEFAULT_TUNIX_VENV} with {TUNIX_REQUIREMENT} and exit")


def venv_only(args: argparse.Namespace, log: Log) -> int | None:
  """--make-venv: create the Tunix virtualenv instead of measuring."""
  if not args.make_venv:
    return None
  log(f"created {DEFAULT_TUNIX_VENV} in {make_venv(DEFAULT_TUNIX_VENV, log):.0f} s")
  return 0


def measure(args: argparse.Namespace, log: Log) -> dict:
  full, quick = _specs()
  return run(quick if args.quick else full, args.tunix_python, log)


BENCHMARK = common.Benchmark(name=NAME, section=DOCS_SECTION, doc=__doc__, measure=measure,
                             render=render.render, flags=add_flags, instead=venv_only)


if __name__ == "__main__":
  sys.exit(common.main(BENCHMARK))
