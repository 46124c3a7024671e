"""The `round` docs section from `bench.round`'s results (results/round.json)."""

from __future__ import annotations

import statistics

from bench.render import fmt_si, opening

NAME = "round"
FUSED_TARGET = 1.5  # fused round >= 1.5x the split one
MFU_TARGET = 0.6  # training MFU >= 60% of the measured matmul peak


def phases(row: dict) -> list[str]:
  """The split round's phases, in order (sample, score, build, shuffle, update)."""
  return list(row["split_phase_s"])


def mfu_row(res: dict) -> dict:
  return next(r for r in res["fused_vs_split"] if r["label"] == res["config"]["mfu_label"])


def fused_note(rows: list[dict]) -> str:
  parts = []
  for r in rows:
    ph = r["split_phase_s"]
    fused_cpu, split_cpu = statistics.median(r["fused_cpu_s"]), statistics.median(r["split_cpu_s"])
    extra = split_cpu - fused_cpu
    parts.append(f"{r['label']} (width {r['shape']['width']}): the split round costs "
                 f"{extra * 1e3:+.1f} ms of CPU time more per round ({extra / fused_cpu:+.1%}; "
                 f"{extra / r['host_calls_split'] * 1e3:+.2f} ms per host round-trip if all of it were "
                 f"theirs, {r['host_calls_split']} of them); the split round's time goes to "
                 + ", ".join(f"{k} {ph[k] / r['split_s']:.0%}" for k in phases(r)))
  met = all(min(r["ratio"], r["ratio_cpu"]) >= FUSED_TARGET for r in rows)
  head = ("Target (fused >= 1.5x split) met: " if met else
          "Target (fused >= 1.5x split) not met: fused and split run the same computations, and "
          "on the CPU backend a 'device' array already lives in host memory, "
          "so a `device_get` is a memcpy and a jitted call's dispatch costs microseconds; the "
          "round-trips the fused program removes are cheap next to the compute they separate. ")
  return (head + "; ".join(parts) + ". The wall-clock ratios move with the other processes on "
          "these cores; the CPU-time ratios are the steady ones. On an accelerator each "
          "`device_get` drains the device queue and crosses PCIe, and host-side scoring "
          "serialises the pipeline: that is where fusing pays.")


def mfu_note(lim: dict, width: int) -> str:
  head = (f"Target (training MFU >= 60% of the measured matmul peak at width {width}): "
          f"{'met' if lim['mfu_cpu'] >= MFU_TARGET else 'not met'} by CPU time ({lim['mfu_cpu']:.0%}); "
          f"wall clock gives {lim['mfu']:.0%}.")
  why = (f" Where the rest goes: the forward pass alone reaches {lim['forward_mfu_cpu']:.0%} and "
         f"forward+backward {lim['forward_backward_mfu_cpu']:.0%}, while a lone GEMM of the step's "
         f"largest shape {lim['gemm_shape']} reaches {lim['gemm_fraction_of_peak_cpu']:.0%} of the "
         "square probe; the backward GEMMs run on transposed operands, and XLA:CPU runs attention "
         "softmax, RMSNorm, RoPE, SiLU and the log-softmax as memory-bound loops between them. "
         f"Adam's elementwise update is {lim['adam_share']:.0%} of the step.")
  return head + why


def scaling_note(sc: dict) -> str:
  names = {"batch": "prompts", "n": "n", "completion_len": "len", "width": "width"}
  law, cpu, parts = sc["law"], sc["law_cpu"], []
  power = lambda lw: " * ".join(f"{names[k]}^{v:.2f}" for k, v in lw["exponents"].items())
  if law["exponents"]:
    parts.append(f"Rough law (log-log slope along each axis, the others at the base): CPU time ~ "
                 f"{power(cpu)}; wall time ~ {power(law)}.")
  if "linear" in cpu:
    lin = cpu["linear"]
    parts.append(
        f"At width {sc['base']['width']}, CPU seconds ~ {lin['c0_s'] * 1e3:.0f} ms + "
        f"{lin['c_s_per_sampled_token'] * 1e6:.1f} us x prompts x n x len (least squares, max error "
        f"{lin['max_rel_error']:.0%}; wall: {law['linear']['c0_s'] * 1e3:.0f} ms + "
        f"{law['linear']['c_s_per_sampled_token'] * 1e6:.1f} us x prompts x n x len, max error "
        f"{law['linear']['max_rel_error']:.0%}). So the cost is close to linear in the number of "
        "sampled tokens (prompts x n x len: decode, the old-log-prob pass and the updates all scale "
        "with it); exponents below 1 mean fixed per-call and per-decode-step costs still show at "
        "these small sizes. Width enters as FLOPs do (width^2 per token at fixed depth) once the "
        "matrices are big enough to run near the matmul peak; below that, with less.")
  return " ".join(parts)


def header(res: dict) -> list[str]:
  mach, cfg = res["machine"], res["config"]
  return opening(
      "## GRPO round: fused vs split, MFU, scaling (CPU)", "round", mach,
      f"jax {mach['jax']}, flax {mach['flax']}; load average {mach['loadavg']} at start, "
      f"{res['loadavg_end']} at end. One round = `build_round_fn` with GRPO on the arithmetic task: "
      f"sample n per prompt (temperature 1, exactly `len` tokens each), score (exact-answer "
      f"verifier + 0.5 x digit fraction), old log-probs, {cfg['minibatches']} Adam steps. Models: "
      f"random Llama-style, {cfg['layers']} layers, MLP 4x width, vocab {cfg['vocab_size']}, fp32. "
      f"{cfg['prompt_len']}-token prompts. Medians of interleaved reps, compile excluded.")


def fused_section(res: dict) -> list[str]:
  lines = [
      "### Fused vs split",
      "",
      "Split = the same work as separate jitted calls with a `device_get` after each (sample, score, "
      "build rows, shuffle, one call per update step); same RNG keys, so both must give the same "
      "completions, metrics and parameters.",
      "",
      "| model | params | prompts x n x len | fused s | split s | fused speed-up (wall / CPU time) "
      "| same work | split: sample / score / build / shuffle / update |",
      "|---|---:|---|---:|---:|---:|---|---|",
  ]
  for r in res["fused_vs_split"]:
    s, ph = r["shape"], r["split_phase_s"]
    lines.append(
        f"| {r['label']} (width {s['width']}) | {r['params'] / 1e6:.2f}M | "
        f"{s['batch']} x {s['n']} x {s['completion_len']} | {r['fused_s']:.3f} | {r['split_s']:.3f} | "
        f"{r['ratio']:.2f}x / {r['ratio_cpu']:.2f}x | {'yes' if r['same_work']['equal'] else 'NO'} "
        f"(max param diff {r['same_work']['param_max_abs_diff']:.1e}) | "
        + " / ".join(f"{ph[k] * 1e3:.0f}" for k in phases(r)) + " ms |")
  return lines + ["", fused_note(res["fused_vs_split"])]


def limits_table(res: dict) -> list[str]:
  tl, rl, row = res["limits"]["training_step"], res["limits"]["round"], mfu_row(res)
  shp = row["shape"]
  return [
      "### Limits",
      "",
      f"Width-{shp['width']} model ({row['non_embedding_params'] / 1e6:.1f}M non-embedding "
      f"params); training step = one of its round's minibatches, {tl['rows']} rows x {tl['seq']} "
      f"tokens (forward + backward + Adam of the GRPO loss on `completion_logprobs`, "
      f"{tl['median_s']['step']:.2f} s, {fmt_si(tl['achieved_flops'], 'FLOP/s')}); round = "
      f"{shp['batch']} x {shp['n']} x {shp['completion_len']} ({rl['flops']['total'] / 1e12:.2f} "
      f"TFLOP in {row['fused_s']:.2f} s).",
      "",
      "| fraction of the measured matmul peak | by CPU time | by wall clock |",
      "|---|---:|---:|",
      f"| **training step (MFU)** | **{tl['mfu_cpu']:.0%}** | {tl['mfu']:.0%} |",
      f"| forward only | {tl['forward_mfu_cpu']:.0%} | {tl['forward_mfu']:.0%} |",
      f"| forward + backward | {tl['forward_backward_mfu_cpu']:.0%} | "
      f"{tl['forward_backward_mfu']:.0%} |",
      f"| one GEMM {tl['gemm_shape']} (the step's largest) | {tl['gemm_fraction_of_peak_cpu']:.0%} | "
      f"{tl['gemm_fraction_of_peak']:.0%} |",
      f"| **whole round (MFU)** | **{rl['mfu_cpu']:.0%}** | {rl['mfu']:.0%} |",
  ]


def limits_notes(res: dict) -> list[str]:
  mach, cfg = res["machine"], res["config"]
  tl, rl, row = res["limits"]["training_step"], res["limits"]["round"], mfu_row(res)
  probes, bw = tl["peak_probes_flops"] + row["peak_probes_flops"], res.get("decode_bandwidth")
  share, mfu = rl["phase_share_split"], rl["phase_mfu_split"]
  return [
      f"- **Matmul peak:** a {cfg['matmul_n']}^2 fp32 `jnp.dot` probe right before every timing "
      f"above ({len(probes)} probes): {fmt_si(min(probes), 'FLOP/s')} - "
      f"{fmt_si(max(probes), 'FLOP/s')} by wall clock (median "
      f"{fmt_si(tl['peak_flops'], 'FLOP/s')}); by CPU time {fmt_si(tl['peak_flops_cpu_time'], 'FLOP/s')} "
      f"(FLOP per CPU-second x {mach['usable_cores']} cores). Each fraction is the median over reps of (FLOPs / "
      "seconds) / (the probe's FLOPs / seconds) on the same clock. Other processes time-slice "
      "these cores (see the load average), which stretches wall time of both the probe and the "
      "timed call by whatever happened during each; CPU time counts only the cycles this process "
      "ran, so it is the steadier measure here (an upper estimate for an idle machine if XLA's "
      "threads sleep rather than spin while waiting).",
      f"- {mfu_note(tl, row['shape']['width'])}",
      f"- **Round:** by phase (split run, wall): sampling {share['sample']:.0%} of "
      f"the time at {mfu['sample']:.0%} of the peak (the decode loop is "
      f"bandwidth- and step-bound), old log-probs {share['build']:.0%} at "
      f"{mfu['build']:.0%}, updates {share['update']:.0%} at {mfu['update']:.0%}.",
      f"- **FLOPs:** {tl['formula']}"
      + (f" (XLA's cost analysis of the jitted step counts {tl['xla_cost_analysis_flops'] / tl['flops']:.2f}x "
         "this)." if tl.get("xla_cost_analysis_flops") else ".") + f" {rl['formula']}.",
      ("- **Decode vs the memory-bandwidth bound:** measured by `bench.sampling` (section above): "
       f"{bw['fraction_of_bandwidth']:.0%} of {fmt_si(bw['memory_bandwidth_bytes_s'], 'B/s')} "
       f"at batch 1 on a {bw['params'] / 1e6:.0f}M-param model." if bw else
       "- **Decode vs the memory-bandwidth bound:** see the sampling section (`bench.sampling`)."),
  ]


def scaling_section(res: dict) -> list[str]:
  base = res["scaling"]["base"]
  lines = [
      "### Scaling",
      "",
      f"Fused round time, varying one factor at a time around prompts x n x len = "
      f"{base['batch']} x {base['n']} x {base['completion_len']}, width {base['width']}.",
      "",
      "| varied | prompts | n | len | width | round s | x base | CPU s | samples/s | GFLOP/s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in res["scaling"]["rows"]:
    s = r["shape"]
    lines.append(f"| {r['axis']} | {s['batch']} | {s['n']} | {s['completion_len']} | {s['width']} | "
                 f"{r['round_s']:.3f} | {r['vs_base']:.2f} | {r['round_cpu_s']:.3f} | "
                 f"{r['samples_per_s']:,.0f} | "
                 f"{r['achieved_flops'] / 1e9:.1f} |")
  return lines + ["", scaling_note(res["scaling"])]


def render(res: dict) -> str:
  lines = (header(res) + [""] + fused_section(res) + [""] + limits_table(res) + [""]
           + limits_notes(res) + [""] + scaling_section(res))
  lines += ["", "Raw numbers (every repetition, split phases, metrics of both sides): "
            "`bench/results/round.json`. Timings on this shared 2-core machine swing between runs; "
            "compare ratios, not absolute times."]
  return "\n".join(lines)
