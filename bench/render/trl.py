"""The `trl` docs section from `bench.trl_compare`'s results (results/trl_compare.json)."""

from __future__ import annotations

from bench.render import fmt_si, ms, opening, raw_numbers_note

NAME = "trl_compare"
SIDES = ("ours", "trl", "trl_1thread")


def _ms(seconds: float) -> str:
  return ms(seconds, ",.0f")


def rows(res: dict) -> list[tuple[str, str, str, float]]:
  """(label, results key, unit, target ratio) of the table's rows."""
  t = res["targets"]
  return [("DPO update step", "dpo", "steps/s", t["update_step_ratio"]),
          ("GRPO update step", "grpo_update", "steps/s", t["update_step_ratio"]),
          ("GRPO round", "grpo_round", "samples/s", t["grpo_round_ratio"])]


def where_time_goes(res: dict) -> str:
  r, b = res["grpo_round"], res["grpo_round"]["breakdown"]
  u = res["grpo_update"]
  return (
      f"Our round ({_ms(r['ours_median_s'])}) vs its standalone pieces: sampling "
      f"{_ms(b['ours_sample_s'])}, old-log-prob forward {_ms(b['ours_old_logp_forward_s'])}, update "
      f"{_ms(u['ours_median_s'])} (the grpo_update row); sum {_ms(b['ours_parts_sum_s'])}. "
      f"TRL's round ({_ms(r['trl_median_s'])}, 2 threads) spends {_ms(b['trl_generate_s'])} "
      f"({b['trl_generate_share']:.0%}) in `_generate` (tokenize + `model.generate` + decode); the "
      f"rest (reward, advantages, update) is {_ms(b['trl_rest_s'])} (its update step alone: "
      f"{_ms(u['trl_median_s'])}). Our round also runs an old-log-prob forward that TRL skips at "
      "num_iterations=1 (it uses the detached live log-probs, ratio exactly 1).")


def limits_note(res: dict) -> str:
  lim = res["limits"]
  d, g, r = lim["dpo"], lim["grpo_update"], lim["grpo_round"]
  return (
      f"against the measured fp32 matmul peak ({fmt_si(lim['matmul_peak_flops'], 'FLOP/s')}, "
      f"best of two {res['config']['matmul_n']}^2 `jnp.dot` probes), the DPO step runs at "
      f"{d['ours_fraction_of_peak']:.0%} (TRL {d['trl_fraction_of_peak']:.0%}) and the GRPO update at "
      f"{g['ours_fraction_of_peak']:.0%} (TRL {g['trl_fraction_of_peak']:.0%}); "
      f"{g['flops'] / 1e9:.0f} GFLOP per GRPO update. The round target needs "
      f"{_ms(r['target_round_s'])} per round; even an update at 100% of the peak "
      f"({_ms(g['at_peak_s'])}) plus today's sampling gives {_ms(r['update_at_peak_plus_our_sampling_s'])}, "
      f"at most {r['max_ratio_with_update_at_peak']:.1f}x TRL's samples/s. {lim['formula']}.")


def _short_op(op: str) -> str:
  """jit(f)/transpose(jvp(jit(forward)))/Decoder/layers_*/mlp/jit(silu) -> bwd layers_*/mlp/jit(silu)."""
  if not op:
    return "(no op name)"
  direction = "bwd " if "transpose(" in op else ""
  tail = op.split("/Decoder/")[-1] if "/Decoder/" in op else op.split(")/")[-1]
  return direction + tail


def kernels_note(label: str, prof: dict, step_s: float) -> str:
  """The top kernels of one of our update steps, in words."""
  parts = [f"`{_short_op(t['op'])}` {t['kernel']} {t['shape']} "
           f"{t['ms_per_call']:.0f} ms ({t['share']:.0%})" for t in prof["top"][:4]]
  copies = sum(t["share"] for t in prof["top"] if t["kernel"].startswith("copy"))
  note = (f" The `copy*` kernels ({copies:.0%} of kernel time) are layout changes (transposes) that "
          "XLA:CPU inserts for the backward's weight-gradient dots, fused into the elementwise "
          "backward of the producing op." if copies >= 0.2 else "")
  return (f"{label} ({_ms(step_s)} per step; kernels {prof['kernel_ms_per_call']:.0f} ms, "
          f"all layers summed): " + "; ".join(parts) + "." + note)


def update_kernels_note(res: dict) -> str:
  return " ".join(kernels_note(label, res[key]["ours_kernels"], res[key]["ours_median_s"])
                  for label, key in (("DPO step", "dpo"), ("GRPO update", "grpo_update")))


def _others(row: dict) -> str:
  cores = [row.get(f"{side}_other_processes_cores_median") for side in SIDES]
  return " / ".join("?" if c is None else f"{c:.1f}" for c in cores)


def header(res: dict) -> list[str]:
  mach, cfg = res["machine"], res["config"]
  m = cfg["model"]
  return opening(
      "## Update step and GRPO round vs TRL (CPU, fp32)", "trl_compare", mach,
      f"jax {mach['jax']}, trl {mach['trl']}, torch {mach['torch']}, transformers "
      f"{mach['transformers']}. One random Llama ({m['num_hidden_layers']} layers, hidden "
      f"{m['hidden_size']}, MLP {m['intermediate_size']}, {m['num_attention_heads']} heads, vocab "
      f"{m['vocab_size']}; {cfg['params']['total'] / 1e6:.1f}M params) written with `save_pretrained` "
      "and loaded by both sides (max |log-prob difference| on the DPO batch "
      f"{res['same_weights_max_logp_diff']:.1e}). AdamW (clip 1.0, constant lr "
      f"{cfg['learning_rate']:g}, no weight decay) on both; TRL with gradient checkpointing and bf16 "
      "off (its defaults turn both on). Median of interleaved reps "
      f"({cfg['update_reps']} per update row, {cfg['round_reps']} per round row), first calls excluded.") + [
      "",
      f"- DPO: {cfg['dpo_pairs']} pairs of {cfg['prompt_len']}-token prompts + {cfg['response_len']}-token "
      "responses (sigmoid loss, beta "
      f"{cfg['beta']:g}). GRPO: {cfg['grpo_prompts']} prompts x {cfg['group_size']} completions of exactly "
      f"{cfg['completion_len']} tokens (temperature 1), reward = fraction of completion tokens in the "
      "prompt's target id range (a jitted verifier for us, a Python reward function for TRL), dapo loss, "
      "group-scaled advantages, one update per round.",
  ]


def table(res: dict) -> list[str]:
  lines = [
      "| measurement | ours | TRL, 2 threads | TRL, 1 thread | ours / TRL | ours / best TRL | target | "
      "| other processes' cores (ours / TRL 2 / TRL 1) |",
      "|---|---:|---:|---:|---:|---:|---:|---|---|",
  ]
  for label, key, unit, target in rows(res):
    r = res[key]
    u = unit.replace("/", "_")
    met = "met" if r["ratio_vs_best_trl"] >= target else "**missed**"
    lines.append(f"| {label} ({unit}) | {r[f'ours_{u}']:,.2f} | {r[f'trl_{u}']:,.2f} | "
                 f"{r[f'trl_1thread_{u}']:,.2f} | {r['ratio']:.2f}x | {r['ratio_vs_best_trl']:.2f}x | "
                 f">= {target:g}x | {met} | {_others(r)} |")
  return lines


def render(res: dict) -> str:
  mach, cfg = res["machine"], res["config"]
  lines = header(res) + [""] + table(res) + [
      "",
      "Targets (issue 10) are judged on the ratio to the faster TRL setting. 2 OpenMP threads on 2 "
      "shared cores stall badly when another process takes a core (a TRL step can run 10x slower), "
      "which is why the 1-thread column is there; the last column is the median number of cores "
      "other processes kept busy during each side's timed calls (from /proc/stat; 0 = the machine "
      f"was ours). Load average {mach['loadavg']} at start, {res['loadavg_end']} at end.",
      "",
      "What each timed call includes:",
      "",
  ]
  for label, key, _, _ in rows(res):
    inc = cfg["includes"][key]
    lines.append(f"- **{label}** - ours: {inc['ours']}. TRL: {inc['trl']}.")
  lines += [
      "",
      f"**Limits:** {limits_note(res)}",
      "",
      f"**Where the round's time goes:** {where_time_goes(res)}",
      "",
      "**Where our update step's time goes** (top XLA:CPU kernels from a `jax.profiler` trace): "
      f"{update_kernels_note(res)}",
      "",
      raw_numbers_note(NAME),
  ]
  return "\n".join(lines)
