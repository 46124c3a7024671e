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
inside a persistent worker process (this file with `--worker`, run by the Tunix interpreter) that
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
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from bench import common

NAME = "tunix_sampler"
DOCS_SECTION = "tunix"
SEED = 0
TUNIX_REQUIREMENT = "google-tunix==0.1.7"
DEFAULT_TUNIX_VENV = common.REPO_ROOT / "bench" / ".venv-tunix"
TUNIX_ROPE_THETA = 1_000_000.0  # tunix.models.llama3.model.apply_rope's default; its config value is unused
WORKER_TIMEOUT_S = 600.0  # one request (a compile included) may take this long before the worker is killed
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


# ----------------------------------------------------------------------------------------------
# Profiling (used on both sides: the worker runs the same code under its own jax)

OP_KINDS = (  # (label, substrings of XLA:CPU op names), first match wins
    ("matmuls", ("dot", "ynn_fusion")),  # ynn_fusion: dots (+ fused elementwise) run by YNNPACK
    ("copies/transposes", ("copy", "transpose")),
    ("reductions", ("reduce",)),  # argmax, softmax and norm reductions
    ("cache writes", ("dynamic-update-slice",)),
)


def op_kind(name: str) -> str:
  for label, keys in OP_KINDS:
    if any(k in name for k in keys):
      return label
  return "other ops"


def trace_breakdown(fn: Callable[[], Any]) -> dict:
  """Runs `fn` once under `jax.profiler.trace` and sums XLA:CPU op time (ms, over all threads) by
  kind. Tracing slows small ops down, so compare kinds and sides, not the wall time of real runs."""
  import collections
  import gzip
  import jax
  fn()  # warm: nothing to compile inside the trace
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      start = time.perf_counter()
      fn()
      wall = time.perf_counter() - start
    files = list(Path(out).rglob("perfetto_trace.json.gz"))
    if not files:
      return {"error": f"jax.profiler wrote no perfetto_trace.json.gz under {out}"}
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_kind: dict[str, float] = collections.Counter()
  by_op: dict[str, float] = collections.Counter()
  by_module: dict[str, float] = collections.Counter()
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") != "X" or "hlo_op" not in args or args["hlo_op"].startswith("while"):
      continue  # only XLA ops (a `while` op's time is that of the ops in its body)
    op, ms = args["hlo_op"], e["dur"] / 1e3
    op = op.rsplit(".", 1)[0] if op.rsplit(".", 1)[-1].isdigit() else op
    by_kind[op_kind(op)] += ms
    by_op[op] += ms
    by_module[args.get("hlo_module", "?")] += ms
  return {"traced_wall_ms": wall * 1e3, "op_ms_total": sum(by_kind.values()),
          "op_ms_by_module": dict(by_module.most_common(6)),
          "op_ms_by_kind": dict(by_kind.most_common()), "top_ops_ms": dict(by_op.most_common(8))}


# ----------------------------------------------------------------------------------------------
# Tunix side: the worker (runs under the Tunix virtualenv's interpreter; imports only Tunix's stack)


class _IdTokenizer:
  """Token ids in, token ids out: a prompt "text" is its ids separated by spaces. No BOS is added."""

  def __init__(self, eos_id: int, pad_id: int):
    self._eos, self._pad = eos_id, pad_id

  def encode(self, text: str, **_) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids, **_) -> str:
    return " ".join(map(str, ids))

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return self._eos

  def pad_id(self) -> int:
    return self._pad


class _TunixWorker:
  """Request handlers; each takes and returns JSON-able dicts."""

  def __init__(self):
    self.model = None
    self.samplers: dict[int, Any] = {}  # cache size -> Sampler
    self.jobs: dict[int, dict] = {}  # batch -> prepared call

  def versions(self, _req=None) -> dict:
    import importlib.metadata as md
    import platform
    import jax
    out = {"python": platform.python_version(), "executable": sys.executable,
           "jax_backend": jax.default_backend()}
    for dist in ("google-tunix", "jax", "jaxlib", "flax", "numpy", "transformers"):
      try:
        out[dist] = md.version(dist)
      except md.PackageNotFoundError:
        out[dist] = None
    return out

  def load(self, req: dict) -> dict:
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params
    hf = json.loads((Path(req["model_dir"]) / "config.json").read_text())
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    self.config = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope["rope_theta"]),
        norm_eps=hf["rms_norm_eps"], weight_tying=bool(hf.get("tie_word_embeddings", False)))
    start = time.perf_counter()
    self.model = llama3_params.create_model_from_safe_tensors(req["model_dir"], self.config)
    load_s = time.perf_counter() - start
    import jax
    from flax import nnx
    params = sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))
    return {"load_s": load_s, "params": int(params),
            "model_config": {k: v for k, v in dataclasses.asdict(self.config).items()
                             if isinstance(v, (int, float, bool, str))}}

  def _sampler(self, cache_size: int, stop_id: int):
    from tunix.generate import sampler as sampler_lib
    if cache_size not in self.samplers:
      c = self.config
      self.samplers[cache_size] = sampler_lib.Sampler(
          self.model, _IdTokenizer(eos_id=stop_id, pad_id=stop_id),
          sampler_lib.CacheConfig(cache_size=cache_size, num_layers=c.num_layers,
                                  num_kv_heads=c.num_kv_heads, head_dim=c.head_dim))
    return self.samplers[cache_size]

  def _call(self, job: dict):
    """One native sampler call; returns (seconds, [batch, new_tokens] token lists)."""
    new_tokens = job["new_tokens"]
    start = time.perf_counter()
    out = job["sampler"](job["texts"], max_generation_steps=new_tokens,
                         max_prompt_length=job["prompt_len"], eos_tokens=[job["stop_id"]],
                         temperature=0.0, echo=False)
    seconds = time.perf_counter() - start  # the call returns host numpy arrays: nothing is pending
    lengths = sorted({len(t) for t in out.tokens})
    if lengths != [new_tokens] or len(out.tokens) != len(job["texts"]):
      raise RuntimeError(f"Tunix returned completion lengths {lengths}, expected {new_tokens}")
    return seconds, [[int(x) for x in t] for t in out.tokens]

  def prepare(self, req: dict) -> dict:
    """Builds the call for one batch and runs it once (compiles prefill and decode loop)."""
    prompts = req["prompts"]
    job = {"texts": [" ".join(map(str, p)) for p in prompts], "prompt_len": len(prompts[0]),
           "new_tokens": req["new_tokens"], "stop_id": req["stop_id"],
           "sampler": self._sampler(len(prompts[0]) + req["new_tokens"], req["stop_id"])}
    self.jobs[len(prompts)] = job
    seconds, tokens = self._call(job)
    self._call(job)  # the second call is still slower than the rest (dispatch caches fill)
    return {"first_call_s": seconds, "tokens": tokens}

  def run(self, req: dict) -> dict:
    return {"seconds": self._call(self.jobs[req["batch"]])[0]}

  def phases(self, req: dict) -> dict:
    """One `Sampler.__call__` replayed phase by phase, blocking after each: seconds of the host-side
    state setup (eager ops), the jitted prefill (+ first token) and the jitted decode `while_loop`."""
    import jax
    job = self.jobs[req["batch"]]
    sampler = job["sampler"]
    ids = jax.numpy.array([[int(t) for t in text.split()] for text in job["texts"]])
    sampler.eos_ids = jax.numpy.array([job["stop_id"]])
    t0 = time.perf_counter()
    state = jax.block_until_ready(sampler.init_sample_state(
        ids, total_sampling_steps=job["prompt_len"] + job["new_tokens"], include_logits=False,
        forbidden_token_ids=None, temperature=0.0, top_p=None, top_k=None,
        seed=jax.random.PRNGKey(0), beam_size=None))
    t1 = time.perf_counter()
    state = jax.block_until_ready(sampler._compiled_prefill_fn(
        sampler._flattened_transformer_state, state, None, echo=False))
    t2 = time.perf_counter()
    jax.block_until_ready(sampler._compiled_decode_fn(sampler._flattened_transformer_state, state))
    t3 = time.perf_counter()
    return {"setup_s": t1 - t0, "prefill_s": t2 - t1, "decode_loop_s": t3 - t2}

  def trace(self, req: dict) -> dict:
    job = self.jobs[req["batch"]]
    return trace_breakdown(lambda: self._call(job))

  def logits(self, req: dict) -> dict:
    """Full-sequence logits of one prompt, no cache (to compare the two models numerically)."""
    import jax.numpy as jnp
    tokens = jnp.asarray([req["prompt"]], jnp.int32)
    t = tokens.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    logits, _ = self.model(tokens, jnp.arange(t)[None], None, mask)
    return {"logits": jnp.asarray(logits[0], jnp.float32).tolist()}


def worker_main() -> int:
  """Serves requests: one JSON object per stdin line, one JSON answer per line on the original stdout
  (everything libraries print goes to stderr). The first line sent is a hello with the versions."""
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  worker = _TunixWorker()
  try:
    import importlib
    for module in ("tunix.generate.sampler", "tunix.models.llama3.params"):
      importlib.import_module(module)  # fail here, in the hello, if Tunix is missing or broken
    hello = {"ok": True, "versions": worker.versions()}
  except Exception as e:  # noqa: BLE001  (reported to the harness, which records "unavailable")
    hello = {"ok": False, "error": f"{type(e).__name__}: {e}"}
  proto.write(json.dumps(hello) + "\n")
  if not hello["ok"]:
    return 1
  for line in sys.stdin:
    req = json.loads(line)
    if req["cmd"] == "quit":
      break
    try:
      answer = {"ok": True, **getattr(worker, req["cmd"])(req)}
    except Exception:  # noqa: BLE001  (the harness raises it with the traceback)
      answer = {"ok": False, "error": traceback.format_exc()}
    proto.write(json.dumps(answer) + "\n")
  return 0


# ----------------------------------------------------------------------------------------------
# Harness side: the client of the worker


class TunixUnavailable(RuntimeError):
  """The Tunix interpreter is missing or its worker could not start (the reason is the message)."""


class TunixClient:
  """A running worker: `request(cmd, **fields)` -> answer dict (raises on a worker error)."""

  def __init__(self, python: str | os.PathLike):
    if not Path(python).is_file():
      raise TunixUnavailable(f"no Tunix interpreter at {python}; create it with "
                             "`python -m bench.tunix_sampler --make-venv`")
    self._stderr = tempfile.TemporaryFile(mode="w+")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(common.REPO_ROOT)}
    self._python = python
    self._proc = subprocess.Popen([str(python), "-m", "bench.tunix_sampler", "--worker"],
                                  cwd=common.REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
    self.versions: dict | None = None

  def wait_ready(self) -> dict:
    """Waits for the worker's hello (it imports Tunix meanwhile); returns its versions."""
    if self.versions is None:
      try:
        hello = self._read(WORKER_TIMEOUT_S)
      except RuntimeError as e:
        self.close()
        raise TunixUnavailable(str(e)) from None
      if not hello.get("ok"):
        self.close()
        raise TunixUnavailable(f"the Tunix worker ({self._python}) failed to start: "
                               f"{hello.get('error')}")
      self.versions = hello["versions"]
    return self.versions

  def _stderr_tail(self, chars: int = 3000) -> str:
    self._stderr.seek(0)
    return self._stderr.read()[-chars:]

  def _read(self, timeout: float) -> dict:
    ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
    line = self._proc.stdout.readline() if ready else ""
    if not line:
      why = "timed out" if not ready else f"exited with {self._proc.poll()}"
      raise RuntimeError(f"Tunix worker {why}; its stderr ends with:\n{self._stderr_tail()}")
    return json.loads(line)

  def request(self, cmd: str, **fields) -> dict:
    self._proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
    self._proc.stdin.flush()
    answer = self._read(WORKER_TIMEOUT_S)
    if not answer.pop("ok"):
      raise RuntimeError(f"Tunix worker request {cmd!r} failed:\n{answer['error']}")
    return answer

  def close(self) -> None:
    if self._stderr.closed:
      return
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self._proc.kill()
        self._proc.wait()
    self._stderr.close()


def make_venv(venv: Path, log: Callable[[str], None]) -> float:
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
# The shared model and our side


def save_model(kwargs: dict, directory: str, seed: int = SEED) -> int:
  """A random Llama saved with `save_pretrained` (safetensors); returns the stop id, whose LM-head
  row is zeroed (its logit is always 0, so greedy argmax never picks it)."""
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
  return stop_id


def load_ours(directory: str, stop_id: int):
  import jax
  from bench import sampling
  from selfplay_jax.models.hf import load_pretrained
  config, params = load_pretrained(directory)
  return sampling.Models(hf=None, config=config, params=jax.device_put(params), stop_id=stop_id)


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
  ours_first_s, ours_tokens = sampling.timed(ours)  # trace + compile + run
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
        ours_times.append(sampling.timed(ours)[0])
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
    times["ours_prefill_and_first_step_s"].append(sampling.timed(short)[0])
    times["ours_call_s"].append(sampling.timed(full)[0])
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
# Reporting


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms"


KIND_COLUMNS = tuple(label for label, _ in OP_KINDS) + ("other ops",)


def profile_table(res: dict) -> list[str]:
  """Markdown rows: per-phase medians and traced op time by kind, per profiled batch and side."""
  lines = ["| batch | side | setup | prefill | decode step | traced op time | "
           + " | ".join(KIND_COLUMNS) + " |", "|---:|---|---:|---:|---:|---:|" + "---:|" * len(KIND_COLUMNS)]
  for p in res["profile"]:
    sides = [("ours", p["ours"], p["ours_trace"])]
    if "tunix" in p:
      sides.append(("Tunix", p["tunix"], p["tunix_trace"]))
    for side, t, trace in sides:
      setup = _ms(t["setup_s"]) if "setup_s" in t else "(in jit)"
      prefill = _ms(t.get("prefill_s", t.get("prefill_and_first_step_s")))
      kinds = trace.get("op_ms_by_kind", {})
      lines.append(f"| {p['batch']} | {side} | {setup} | {prefill} | {_ms(t['step_in_loop_s'])} | "
                   f"{trace.get('op_ms_total', float('nan')):.3g} ms | "
                   + " | ".join(f"{kinds.get(k, 0):.3g}" for k in KIND_COLUMNS) + " |")
  return lines


def where_time_goes(res: dict) -> list[str]:
  """Findings read off the profile: per-step ratio, Tunix's per-call overhead, what bounds a target."""
  notes = []
  for p in res.get("profile", []):
    if "tunix" not in p or "error" in p["ours_trace"] or "error" in p["tunix_trace"]:
      continue
    batch, o, t = p["batch"], p["ours_trace"], p["tunix_trace"]
    tunix = p["tunix"]
    per_call = tunix["setup_s"] / (tunix["setup_s"] + tunix["prefill_s"] + tunix["decode_loop_s"])
    copies = "copies/transposes"
    top_copy = next((op for op in t["top_ops_ms"] if op_kind(op) == copies), None)
    note = (f"Batch {batch}: a decode step takes {p['step_ratio']:.2f}x as long in Tunix's loop as in "
            f"ours; Tunix's eager per-call setup is {per_call:.0%} of its call. Traced op time: Tunix "
            f"{t['op_ms_total']:.0f} ms, {t['op_ms_by_kind'].get(copies, 0) / t['op_ms_total']:.0%} of "
            f"it {copies}" + (f" (mostly `{top_copy}`)" if top_copy else "") + f"; ours "
            f"{o['op_ms_total']:.0f} ms, {o['op_ms_by_kind'].get(copies, 0) / o['op_ms_total']:.0%}.")
    target = TARGETS.get(batch)
    if target:
      matmul = o["op_ms_by_kind"].get(KIND_COLUMNS[0], 0) / t["op_ms_total"]
      note += (f" A {target}x target needs our call at <= {1 / target:.0%} of Tunix's; our traced "
               f"matmul time alone is {matmul:.0%} of Tunix's traced op time")
      note += (", so no trimming of non-matmul work reaches it: only faster or fewer matmul FLOPs "
               "would." if matmul > 1 / target else ".")
    notes.append(note)
  return notes


def render_docs(res: dict) -> str:
  mach, cfg, tunix = res["machine"], res["config"], res["tunix"]
  model = cfg["model"]
  lines = ["## Sampler vs Tunix (greedy, CPU)", ""]
  if not tunix["available"]:
    lines += [f"Tunix: unavailable ({tunix['reason']}); our side only.", ""]
  else:
    v = tunix["versions"]
    lines += [
        f"`python -m bench.tunix_sampler` on {mach['cpu_model']} ({mach['usable_cores']} cores), "
        f"{mach['date']}; ours: jax {mach['jax']}, flax {mach['flax']}; Tunix: google-tunix "
        f"{v['google-tunix']} with jax {v['jax']}, flax {v['flax']} in its own virtualenv and process "
        "(native `Sampler.__call__`, greedy, KV cache of exactly prompt + new tokens on both sides).",
    ]
  lines += [
      f"Model: random Llama, {model['num_hidden_layers']} layers, hidden {model['hidden_size']}, MLP "
      f"{model['intermediate_size']}, {model['num_attention_heads']} heads, vocab {model['vocab_size']}, "
      f"RoPE theta {model['rope_theta']:.0e} ({cfg['params']['total'] / 1e6:.1f}M params, fp32), saved "
      "once with `save_pretrained` and loaded by both (ours: `hf.load_pretrained`; Tunix: its Llama 3 "
      f"safetensors loader). {cfg['prompt_len']}-token prompts, exactly {cfg['new_tokens']} new tokens "
      f"per row, median of {'/'.join(map(str, cfg['reps']))} interleaved reps per side at batch "
      f"{'/'.join(map(str, cfg['batches']))} (compile excluded).",
      "",
  ]
  if not tunix["available"]:
    lines += ["| batch | ours tok/s |", "|---:|---:|"]
    lines += [f"| {r['batch']} | {r['ours_tok_s']:,.0f} |" for r in res["throughput"]]
  else:
    lines += ["| batch | ours tok/s | Tunix tok/s | ours / Tunix | target | best-call ratio | "
              "greedy rows identical |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["throughput"]:
      want = TARGETS.get(row["batch"])
      met = res["targets"].get(f"batch_{row['batch']}", {}).get("met")
      target = f">= {want}x ({'met' if met else 'missed'})" if want else ""
      lines.append(f"| {row['batch']} | {row['ours_tok_s']:,.0f} | {row['tunix_tok_s']:,.0f} | "
                   f"{row['ratio']:.2f}x | {target} | {row['ratio_of_best']:.2f}x | "
                   f"{row['agreement']['rows_identical']:.0%} |")
    lg = res["logits"]
    lines += [
        "",
        "The best-call ratio compares each side's fastest rep (least disturbed by other processes). "
        f"Same function: full-sequence logits of one prompt differ by at most {lg['max_abs_diff']:.2g} "
        f"(logits up to {lg['max_abs_logit']:.2g}), and greedy completions agree token for token in "
        "the rows counted in the last column. Tunix's Llama 3 applies RoPE with theta 1e6 whatever its "
        "config says, so this model uses 1e6; with transformers' default 1e4 the two models differ.",
    ]
  lines += ["", "**Where the time goes.** Setup, prefill (ours: + first step) and decode step: medians "
            f"of {cfg['profile_reps']} interleaved reps. Op time: one `jax.profiler`-traced call per side, "
            "ms summed over XLA:CPU threads by op kind (matmuls = `dot` and YNNPACK `ynn_fusion` ops; "
            "tracing inflates small ops, so compare kinds and sides).", ""]
  lines += profile_table(res)
  notes = where_time_goes(res)
  if notes:
    lines += [""] + [f"- {note}" for note in notes]
  lines += [
      "",
      f"Load average {mach['loadavg']} at start, {res['loadavg_end']} at end. "
      + common.raw_numbers_note(NAME),
  ]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point


def start_tunix(python: str | os.PathLike, log: Callable[[str], None],
                client: TunixClient | None = None) -> tuple[TunixClient | None, dict]:
  """A ready worker and its record, or None and `{"available": False, "reason": ...}`."""
  try:
    client = client or TunixClient(python)
    versions = client.wait_ready()
  except TunixUnavailable as e:
    log(f"tunix: unavailable ({e})")
    return None, {"available": False, "reason": str(e), "python": str(python)}
  return client, {"available": True, "python": str(python), "versions": versions}


def run(spec: Spec, tunix_python: str | os.PathLike, log: Callable[[str], None]) -> dict:
  from bench import sampling
  res: dict[str, Any] = {"machine": common.machine_info()}
  log(f"starting the Tunix worker ({tunix_python})")
  try:
    client = TunixClient(tunix_python)  # imports Tunix while we build the model
  except TunixUnavailable:
    client = None
  try:
    with tempfile.TemporaryDirectory() as model_dir:
      stop_id = save_model(spec.model, model_dir)
      m = load_ours(model_dir, stop_id)
      client, res["tunix"] = start_tunix(tunix_python, log, client)
      res["config"] = {**dataclasses.asdict(spec), "params": sampling.param_counts(m),
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
  res["notes"] = {"where_time_goes": where_time_goes(res),
                  "rope_theta": "Tunix's Llama 3 ignores ModelConfig.rope_theta (apply_rope is called "
                                "with its default 1e6); the shared model uses 1e6 so both compute the "
                                "same function"}
  res["loadavg_end"] = common.loadavg()
  return res


def main(argv: list[str] | None = None) -> int:
  parser = common.arg_parser(__doc__)
  parser.add_argument("--tunix-python", default=str(DEFAULT_TUNIX_VENV / "bin" / "python"),
                      help="interpreter of the virtualenv with google-tunix (default %(default)s)")
  parser.add_argument("--make-venv", action="store_true",
                      help=f"create {DEFAULT_TUNIX_VENV} with {TUNIX_REQUIREMENT} and exit")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker_main()
  log = common.logger(NAME)
  if args.make_venv:
    log(f"created {DEFAULT_TUNIX_VENV} in {make_venv(DEFAULT_TUNIX_VENV, log):.0f} s")
    return 0
  full, quick = _specs()
  res = common.timed_run(lambda: run(quick if args.quick else full, args.tunix_python, log))
  common.publish(NAME, DOCS_SECTION, res, render_docs, args.quick, args.out_dir, log)
  return 0


if __name__ == "__main__":
  sys.exit(main())
