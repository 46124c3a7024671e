"""The `sampling` docs section from `bench.sampling`'s results (results/sampling.json)."""

from __future__ import annotations

from bench.render import fmt_si, ms, opening, raw_numbers_note

NAME = "sampling"


def batch1_note(prof: dict, row1: dict) -> str:
  """Where a batch-1 call's time goes, against the bandwidth and compute floors of a step."""
  loop, alone = prof["ours_step_in_loop_s"], prof["ours_step_standalone_s"]
  floor = max(prof["step_floor_bandwidth_s"], prof["step_floor_compute_s"])
  if loop <= 2 * floor:
    verdict = ("so the loop already runs near the memory roofline and per-op overhead is not the "
               "bottleneck; only fewer bytes per step (bf16 weights, a cache read only up to its "
               "filled length, no per-step cache transposes) would make batch 1 faster")
  else:
    verdict = ("so per-op overhead of the many tiny XLA:CPU kernels in the loop body, not FLOPs or "
               "bytes, dominates")
  return (
      f"At batch 1 (ours {row1['ratio']:.1f}x HF, {row1['ratio_vs_best_hf']:.1f}x the faster HF setting) "
      f"a {prof['new_tokens']}-token call spends {ms(prof['ours_prefill_s'])} "
      f"({prof['prefill_share_of_call']:.0%}) on prefill plus its first step and {ms(loop)} per decode "
      f"step inside the `while_loop` (HF: {ms(prof['hf_step_s'])} per step, "
      f"{ms(prof['hf_1thread_step_s'])} with 1 thread; one standalone jitted `decoder.decode` call: "
      f"{ms(alone)}, as it copies the un-donated cache). Streaming the weights and the whole cache at "
      f"the measured bandwidth takes ~{ms(floor)} per step, {verdict}.")


def header(res: dict) -> list[str]:
  mach, cfg = res["machine"], res["config"]
  return opening(
      "## Sampling throughput (greedy, CPU)", "sampling", mach,
      f"jax {mach['jax']}, torch {mach['torch']}, transformers {mach['transformers']} "
      f"(HF `generate`, `{cfg['hf_attn_implementation']}` attention, {cfg['torch_threads']} torch threads).") + [
      f"Model: random Llama, {cfg['model']['num_hidden_layers']} layers, hidden "
      f"{cfg['model']['hidden_size']}, MLP {cfg['model']['intermediate_size']}, "
      f"{cfg['model']['num_attention_heads']} heads, vocab {cfg['model']['vocab_size']} "
      f"({cfg['params']['total'] / 1e6:.1f}M params, fp32). {cfg['prompt_len']}-token prompts, exactly "
      f"{cfg['new_tokens']} new tokens per row, median of {cfg['reps']} interleaved reps (compile excluded).",
  ]


def throughput_table(res: dict) -> list[str]:
  lines = ["| batch | ours tok/s | HF tok/s | ours / HF | HF 1-thread tok/s | ours / best HF |",
           "|---:|---:|---:|---:|---:|---:|"]
  for row in res["throughput"]:
    lines.append(f"| {row['batch']} | {row['ours_tok_s']:,.0f} | {row['hf_tok_s']:,.0f} | "
                 f"{row['ratio']:.2f}x | {row['hf_1thread_tok_s']:,.0f} | "
                 f"{row['ratio_vs_best_hf']:.2f}x |")
  return lines


def bounds(res: dict) -> list[str]:
  cfg, cb, bb = res["config"], res["compute_bound"], res["bandwidth_bound"]
  row1 = next((r for r in res["throughput"] if r["batch"] == 1), res["throughput"][0])
  return [
      f"- **Compute bound (batch {cb['batch']}):** {cb['ours_fraction_of_peak']:.1%} of the measured fp32 "
      f"matmul peak ({fmt_si(cb['matmul_peak_flops'], 'FLOP/s')}, best of two "
      f"{cfg['matmul_n']}^2 `jnp.dot` probes); HF: {cb['hf_fraction_of_peak']:.1%}. {cb['formula']} "
      f"(= {cb['flops_per_token'] / 1e6:.1f} MFLOP/token).",
      f"- **Bandwidth bound (batch 1):** {bb['fraction_of_bandwidth']:.0%} of the measured read "
      f"bandwidth ({fmt_si(bb['memory_bandwidth_bytes_s'], 'B/s')}, best of two jitted "
      f"sums over {cfg['bandwidth_mb']} MB) on a {bb['params']['total'] / 1e6:.1f}M-param model "
      f"({bb['model']['num_hidden_layers']} layers, hidden {bb['model']['hidden_size']}, MLP "
      f"{bb['model']['intermediate_size']}; {bb['bytes_per_step'] / 2**20:.0f} MiB read per step, "
      f"{ms(bb['ours_step_in_loop_s'])}/token over {bb['new_tokens']} tokens). {bb['formula']}.",
      f"- **Where batch-1 time goes:** {batch1_note(res['profile_batch1'], row1)}",
  ]


def render(res: dict) -> str:
  mach, cfg = res["machine"], res["config"]
  lines = header(res) + [""] + throughput_table(res) + [
      "",
      f"HF runs with {cfg['torch_threads']} torch threads (the headline column); the 1-thread column is "
      "there because 2 OpenMP threads on 2 shared cores can stall badly when other processes run "
      f"(load average {mach['loadavg']} at start, {res['loadavg_end']} at end).",
      "",
  ] + bounds(res) + ["", raw_numbers_note(NAME)]
  return "\n".join(lines)
