"""The `tunix` docs section from `bench.tunix_sampler`'s results (results/tunix_sampler.json)."""

from __future__ import annotations

from bench.profiling import OP_KINDS, OTHER_OPS, op_kind
from bench.render import ms, ran_on, raw_numbers_note

NAME = "tunix_sampler"
KIND_COLUMNS = tuple(label for label, _ in OP_KINDS) + (OTHER_OPS,)
COPIES = "copies/transposes"


def target_ratio(res: dict, batch: int) -> float | None:
  return res["targets"].get(f"batch_{batch}", {}).get("target_ratio")


def profile_table(res: dict) -> list[str]:
  """Markdown rows: per-phase medians and traced op time by kind, per profiled batch and side."""
  lines = ["| batch | side | setup | prefill | decode step | traced op time | "
           + " | ".join(KIND_COLUMNS) + " |", "|---:|---|---:|---:|---:|---:|" + "---:|" * len(KIND_COLUMNS)]
  for p in res["profile"]:
    sides = [("ours", p["ours"], p["ours_trace"])]
    if "tunix" in p:
      sides.append(("Tunix", p["tunix"], p["tunix_trace"]))
    for side, t, trace in sides:
      setup = ms(t["setup_s"]) if "setup_s" in t else "(in jit)"
      prefill = ms(t.get("prefill_s", t.get("prefill_and_first_step_s")))
      kinds = trace.get("op_ms_by_kind", {})
      lines.append(f"| {p['batch']} | {side} | {setup} | {prefill} | {ms(t['step_in_loop_s'])} | "
                   f"{trace.get('op_ms_total', float('nan')):.3g} ms | "
                   + " | ".join(f"{kinds.get(k, 0):.3g}" for k in KIND_COLUMNS) + " |")
  return lines


def profile_note(res: dict, p: dict) -> str:
  """Findings read off one profiled batch: per-step ratio, Tunix's per-call overhead, what bounds
  the batch's target."""
  batch, o, t = p["batch"], p["ours_trace"], p["tunix_trace"]
  tunix = p["tunix"]
  per_call = tunix["setup_s"] / (tunix["setup_s"] + tunix["prefill_s"] + tunix["decode_loop_s"])
  top_copy = next((op for op in t["top_ops_ms"] if op_kind(op) == COPIES), None)
  note = (f"Batch {batch}: a decode step takes {p['step_ratio']:.2f}x as long in Tunix's loop as in "
          f"ours; Tunix's eager per-call setup is {per_call:.0%} of its call. Traced op time: Tunix "
          f"{t['op_ms_total']:.0f} ms, {t['op_ms_by_kind'].get(COPIES, 0) / t['op_ms_total']:.0%} of "
          f"it {COPIES}" + (f" (mostly `{top_copy}`)" if top_copy else "") + f"; ours "
          f"{o['op_ms_total']:.0f} ms, {o['op_ms_by_kind'].get(COPIES, 0) / o['op_ms_total']:.0%}.")
  target = target_ratio(res, batch)
  if target:
    matmul = o["op_ms_by_kind"].get(KIND_COLUMNS[0], 0) / t["op_ms_total"]
    note += (f" A {target}x target needs our call at <= {1 / target:.0%} of Tunix's; our traced "
             f"matmul time alone is {matmul:.0%} of Tunix's traced op time")
    note += (", so no trimming of non-matmul work reaches it: only faster or fewer matmul FLOPs "
             "would." if matmul > 1 / target else ".")
  return note


def where_time_goes(res: dict) -> list[str]:
  """One `profile_note` per batch profiled on both sides (with both traces)."""
  return [profile_note(res, p) for p in res.get("profile", [])
          if "tunix" in p and "error" not in p["ours_trace"] and "error" not in p["tunix_trace"]]


def header(res: dict) -> list[str]:
  mach, cfg, tunix = res["machine"], res["config"], res["tunix"]
  model = cfg["model"]
  lines = ["## Sampler vs Tunix (greedy, CPU)", ""]
  if not tunix["available"]:
    lines += [f"Tunix: unavailable ({tunix['reason']}); our side only.", ""]
  else:
    v = tunix["versions"]
    lines += [
        ran_on("tunix_sampler", mach)
        + f"ours: jax {mach['jax']}, flax {mach['flax']}; Tunix: google-tunix "
        f"{v['google-tunix']} with jax {v['jax']}, flax {v['flax']} in its own virtualenv and process "
        "(native `Sampler.__call__`, greedy, KV cache of exactly prompt + new tokens on both sides).",
    ]
  return lines + [
      f"Model: random Llama, {model['num_hidden_layers']} layers, hidden {model['hidden_size']}, MLP "
      f"{model['intermediate_size']}, {model['num_attention_heads']} heads, vocab {model['vocab_size']}, "
      f"RoPE theta {model['rope_theta']:.0e} ({cfg['params']['total'] / 1e6:.1f}M params, fp32), saved "
      "once with `save_pretrained` and loaded by both (ours: `hf.load_pretrained`; Tunix: its Llama 3 "
      f"safetensors loader). {cfg['prompt_len']}-token prompts, exactly {cfg['new_tokens']} new tokens "
      f"per row, median of {'/'.join(map(str, cfg['reps']))} interleaved reps per side at batch "
      f"{'/'.join(map(str, cfg['batches']))} (compile excluded).",
  ]


def throughput_table(res: dict) -> list[str]:
  if not res["tunix"]["available"]:
    return (["| batch | ours tok/s |", "|---:|---:|"]
            + [f"| {r['batch']} | {r['ours_tok_s']:,.0f} |" for r in res["throughput"]])
  lines = ["| batch | ours tok/s | Tunix tok/s | ours / Tunix | target | best-call ratio | "
           "greedy rows identical |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for row in res["throughput"]:
    want = target_ratio(res, row["batch"])
    met = res["targets"].get(f"batch_{row['batch']}", {}).get("met")
    target = f">= {want}x ({'met' if met else 'missed'})" if want else ""
    lines.append(f"| {row['batch']} | {row['ours_tok_s']:,.0f} | {row['tunix_tok_s']:,.0f} | "
                 f"{row['ratio']:.2f}x | {target} | {row['ratio_of_best']:.2f}x | "
                 f"{row['agreement']['rows_identical']:.0%} |")
  lg = res["logits"]
  return lines + [
      "",
      "The best-call ratio compares each side's fastest rep (least disturbed by other processes). "
      f"Same function: full-sequence logits of one prompt differ by at most {lg['max_abs_diff']:.2g} "
      f"(logits up to {lg['max_abs_logit']:.2g}), and greedy completions agree token for token in "
      "the rows counted in the last column. Tunix's Llama 3 applies RoPE with theta 1e6 whatever its "
      "config says, so this model uses 1e6; with transformers' default 1e4 the two models differ.",
  ]


def render(res: dict) -> str:
  mach, cfg = res["machine"], res["config"]
  lines = header(res) + [""] + throughput_table(res)
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
      + raw_numbers_note(NAME),
  ]
  return "\n".join(lines)
