"""The Tunix side of `bench.tunix_sampler`: a worker process, and the harness's client of it.

  python -m bench.tunix_worker   # run by the Tunix virtualenv's interpreter, never by hand

Tunix lives in its own virtualenv (its dependency pins never touch ours), so its sampler runs in a
persistent worker process: this module, run by that interpreter, answers one JSON line per request
on stdin/stdout (load a saved model, prepare / run / phase-split / trace one native
`tunix.generate.sampler.Sampler.__call__`, full-sequence logits). It imports only the standard
library, `bench.common` and `bench.profiling` at the top, and Tunix's stack inside the handlers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import common
from bench.profiling import trace_breakdown

WORKER_TIMEOUT_S = 600.0  # one request (a compile included) may take this long before the worker is killed


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
    self._proc = subprocess.Popen([str(python), "-m", "bench.tunix_worker"],
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


if __name__ == "__main__":
  sys.exit(worker_main())
