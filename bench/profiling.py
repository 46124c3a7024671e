"""Where a jitted call's time goes, from `jax.profiler` traces (XLA:CPU op / kernel times).

  trace_breakdown(fn) -> dict   # op time by kind (matmuls, copies, ...): bench.tunix_sampler, both
                                #   sides (its Tunix worker runs this under its own jax)
  kernel_profile(jitted, holder, batch) -> dict  # top kernels of a round: bench.trl_compare
  loop_relayouts(hlo_text) -> [dict]  # copies / transposes inside a compiled program's while loop
                                      #   bodies (bench.accelerator, tests/test_sampling.py)

Only the standard library is imported at the top: the Tunix worker imports this module too.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

OP_KINDS = (  # (label, substrings of XLA:CPU op names), first match wins
    ("matmuls", ("dot", "ynn_fusion")),  # ynn_fusion: dots (+ fused elementwise) run by YNNPACK
    ("copies/transposes", ("copy", "transpose")),
    ("reductions", ("reduce",)),  # argmax, softmax and norm reductions
    ("cache writes", ("dynamic-update-slice",)),
)
OTHER_OPS = "other ops"


def op_kind(name: str) -> str:
  for label, keys in OP_KINDS:
    if any(k in name for k in keys):
      return label
  return OTHER_OPS


def trace_events(fn: Callable[[], Any], pattern: str) -> tuple[list[dict] | None, float]:
  """Runs `fn` once under `jax.profiler.trace` (perfetto trace on); returns (the events of the first
  trace file matching `pattern`, None if there is none; the wall seconds of `fn`)."""
  import jax
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      start = time.perf_counter()
      fn()
      wall = time.perf_counter() - start
    files = sorted(Path(out).rglob(pattern))
    if not files:
      return None, wall
    trace = json.loads(gzip.decompress(files[0].read_bytes()))
  return (trace["traceEvents"] if isinstance(trace, dict) else trace), wall


def trace_breakdown(fn: Callable[[], Any]) -> dict:
  """Runs `fn` once under `jax.profiler.trace` and sums XLA:CPU op time (ms, over all threads) by
  kind. Tracing slows small ops down, so compare kinds and sides, not the wall time of real runs."""
  fn()  # warm: nothing to compile inside the trace
  events, wall = trace_events(fn, "perfetto_trace.json.gz")
  if events is None:
    return {"error": "jax.profiler wrote no perfetto_trace.json.gz"}
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


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (result shape, jax op_name) of a compiled program."""
  index = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+)", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      index[m.group(1)] = (m.group(2), op.group(1) if op else "")
  return index


def kernel_profile(round_fn, holder: dict, batch, calls: int = 3, top: int = 6) -> dict:
  """Where a round's time goes: per-kernel time from a `jax.profiler` trace of `calls` steps of
  `round_fn(holder["state"], batch)` (the state is carried in `holder`), kernels of all layers
  summed (`layers_3` -> `layers_*`)."""
  import jax
  compiled = round_fn.lower(holder["state"], batch).compile()
  index = hlo_index(compiled.as_text())

  def steps():
    for _ in range(calls):
      holder["state"], metrics = compiled(holder["state"], batch)
      jax.block_until_ready(metrics)

  events, _ = trace_events(steps, "*.trace.json.gz")
  if events is None:
    raise RuntimeError("jax.profiler wrote no *.trace.json.gz")
  totals: dict[tuple[str, str, str], float] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("name") in index:
      shape, op = index[e["name"]]
      key = (re.sub(r"\.\d+$", "", e["name"]), shape, re.sub(r"layers_\d+", "layers_*", op))
      totals[key] = totals.get(key, 0.0) + e["dur"] / 1e3 / calls
  total = sum(totals.values())
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return {"kernel_ms_per_call": total, "calls": calls,
          "top": [{"kernel": k, "shape": sh, "op": op, "ms_per_call": ms, "share": ms / max(total, 1e-9)}
                  for (k, sh, op), ms in ranked]}


# ----------------------------------------------------------------------------------------------
# Copies and transposes inside while loops (compiled HLO text)

_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                  "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines, from `compiled.as_text()`."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
    if m:
      current = comps.setdefault(m.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  return comps


def _shape_bytes(shape: str) -> int:
  m = re.match(r"(\w+)\[([\d,]*)\]", shape)
  if not m or m.group(1) not in _ELEMENT_BYTES:
    return 0
  n = 1
  for d in filter(None, m.group(2).split(",")):
    n *= int(d)
  return n * _ELEMENT_BYTES[m.group(1)]


def loop_relayouts(hlo_text: str) -> list[dict]:
  """Every `copy` and `transpose` executed inside a while loop's body (and the fusions and other
  computations it calls) of a compiled program: {"op", "shape", "bytes", "name"}. A decode loop
  that re-lays out a weight or its KV cache every step shows up here with that array's size;
  copies of small loop state (a token, a flag) are cheap and expected."""
  comps = _computations(hlo_text)
  bodies = re.findall(r"while\(.*?body=%([\w.\-]+)", hlo_text)
  seen: set[str] = set()
  stack = list(bodies)
  while stack:
    name = stack.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      stack += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
      for group in re.findall(r"(?:called_computations|branch_computations)=\{([^}]*)\}", line):
        stack += re.findall(r"%([\w.\-]+)", group)
  out = []
  for name in sorted(seen):
    for line in comps[name]:
      m = re.search(r"%([\w.\-]+) = (\S+) (copy|transpose)\(", line)
      if m:
        op = re.search(r'op_name="([^"]*)"', line)
        out.append({"op": m.group(3), "shape": m.group(2), "bytes": _shape_bytes(m.group(2)),
                    "name": op.group(1) if op else ""})
  return out
