"""The `accelerator` docs section from `bench.accelerator`'s results (results/accelerator.json).

Every part may hold `{"error": ...}` or `{"skipped": ...}` instead of numbers; it then renders as
one line saying so. On a CPU the numbers are labelled a harness check, not targets.
"""

from __future__ import annotations

from bench.render import fmt_si, ms

NAME = "accelerator"


def _missing(part) -> str | None:
  if part is None:
    return "not run"
  if "error" in part:
    return f"failed: `{part['error']}`"
  if "skipped" in part:
    return f"skipped: {part['skipped']}"
  return None


def _target(value: float | None, target: float, on_accelerator: bool, fmt: str = ".0%") -> str:
  if value is None:
    return "-"
  if not on_accelerator:
    return f">= {target:{fmt}} (CPU: not judged)"
  return f">= {target:{fmt}} ({'met' if value >= target else '**missed**'})"


def header(res: dict) -> list[str]:
  mach, dev, model = res["machine"], res["machine"]["device"], res.get("model", {})
  accel = dev["platform"] != "cpu"
  cfg, m = res["config"], res["config"]["model"]
  title = (f"## Accelerator: one chip ({dev['device_kind']})" if accel else
           "## Accelerator suite: harness check on CPU (quick sizes, not targets)")
  lines = [title, "",
           f"`python -m bench --suite accelerator{'' if accel else ' --quick'}` on "
           f"{dev['device_kind']} ({dev['platform']}, {dev['device_count']} device(s); host "
           f"{mach['cpu_model']}), {mach['date']}; jax {mach['jax']}, torch {mach['torch']}, "
           f"transformers {mach['transformers']}, trl {mach['trl']}; {res['wall_s']:.0f} s in all "
           f"(budget {cfg['budget_s']:.0f} s).",
           f"Model: random Llama, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, MLP "
           f"{m['intermediate_size']}, {m['num_attention_heads']} heads / "
           f"{m['num_key_value_heads']} KV heads, vocab {m['vocab_size']}"
           + (f" ({model['params'] / 1e6:,.{0 if model['params'] >= 1e8 else 2}f}M params, from "
              f"{model['from']}, scan_layers {res['config']['scan_layers']} outside the sampler)" if "params" in model
              else "")
           + f"; compute {cfg['dtype']}, params and Adam moments float32, sampler and HF weights "
           f"{cfg['dtype']}. {cfg['prompt_len']}-token prompts."]
  if not accel:
    lines += ["", "**CPU, quick sizes: these numbers prove the harness runs end to end; they are "
              "not measurements of the targets.**"]
  return lines


def probes_line(res: dict) -> list[str]:
  pr = res.get("probes")
  why = _missing(pr)
  if why:
    return [f"- **Probes:** {why}"]
  return [f"- **Probes (this process, this chip):** {pr['matmul_dtype']} matmul peak "
          f"{fmt_si(pr['matmul_peak_flops'], 'FLOP/s')} ([{pr['matmul_n']}]^2; float32 "
          f"{fmt_si(pr['matmul_peak_flops_f32'], 'FLOP/s')}); read bandwidth "
          f"{fmt_si(pr['read_bytes_s'], 'B/s')} (jitted sum), copy bandwidth "
          f"{fmt_si(pr['copy_bytes_s'], 'B/s')} (x + 1, read + write); the bound used is the larger, "
          f"{fmt_si(pr['bandwidth_bytes_s'], 'B/s')}."]


def sampler_section(res: dict, accel: bool) -> list[str]:
  sp, cfg = res.get("sampler"), res["config"]
  lines = ["### Sampler (greedy, exactly "
           f"{cfg['new_tokens']} new tokens per row)", ""]
  why = _missing(sp)
  if why:
    return lines + [f"Sampler: {why}"]
  lines += ["| batch | ours tok/s | HF generate tok/s | ours / HF | greedy rows identical |",
            "|---:|---:|---:|---:|---:|"]
  for r in sp["rows"]:
    hf = r.get("hf_tok_s")
    lines.append(f"| {r['batch']} | {r['ours_tok_s']:,.0f} | "
                 + (f"{hf:,.0f} | {r['ratio_vs_hf']:.2f}x | {r['greedy_rows_identical']:.0%} |"
                    if hf else "- | - | - |"))
  lines.append("")
  lines.append(f"HF `generate`: {sp['hf']}" + (f" (on {sp['hf_device']})." if sp.get("hf_device")
                                                else "."))
  b1 = sp.get("batch1")
  if b1:
    lines.append(
        f"- **Decode vs HBM bandwidth (batch 1):** {ms(b1['step_s'])} per step (call "
        f"{ms(b1['call_s'])} minus prefill + first step {ms(b1['prefill_s'])}, over "
        f"{cfg['new_tokens'] - 1} steps), {b1['bytes_per_step'] / 2**20:,.1f} MiB per step -> "
        f"{fmt_si(b1['achieved_bytes_s'], 'B/s')} = **{b1['fraction_of_bandwidth']:.0%}** of "
        f"{fmt_si(b1['bandwidth_bytes_s'], 'B/s')}; target "
        f"{_target(b1['fraction_of_bandwidth'], 0.70, accel)}. {b1['formula']}.")
  rel = next((r["decode_loop_relayouts"] for r in sp["rows"] if "decode_loop_relayouts" in r), None)
  if rel:
    big = ", ".join(f"{x['op']} {x['shape']}" for x in rel["largest"][:3]) or "none"
    lines.append(f"- **Copies / transposes left in the compiled batch-1 decode loop:** "
                 f"{rel['count']}, {rel['bytes_per_step'] / 2**10:,.1f} KiB per step (largest: "
                 f"{big}).")
  return lines


def train_section(res: dict, accel: bool) -> list[str]:
  tr = res.get("train")
  why = _missing(tr)
  if why:
    return [f"- **Training step MFU:** {why}"]
  return [f"- **Training step MFU:** one `round.update_step` (GRPO loss, forward + backward + "
          f"Adam) on {tr['rows']} rows x {tr['seq']} tokens: {ms(tr['step_s'])}, "
          f"{fmt_si(tr['achieved_flops'], 'FLOP/s')} = **{tr['mfu']:.0%}** of the "
          f"{fmt_si(tr['matmul_peak_flops'], 'FLOP/s')} matmul probe; target "
          f"{_target(tr['mfu'], 0.45, accel)} (model FLOPs = 6 N_nonembed tokens + attention, as "
          "in `bench.round`)."]


def round_section(res: dict, accel: bool) -> list[str]:
  rd, cfg = res.get("round"), res["config"]
  shape = (f"{cfg['round_prompts']} prompts x {cfg['round_n']} samples x {cfg['round_len']} "
           "tokens")
  why = _missing(rd)
  if why:
    return [f"- **GRPO round, fused vs split:** {why}"]
  ph = rd["split_phase_s"]
  return [f"- **GRPO round, fused vs split** ({shape}, {cfg['round_minibatches']} updates): fused "
          f"{rd['fused_s']:.3f} s ({rd['samples_per_s_fused']:,.1f} samples/s), split "
          f"{rd['split_s']:.3f} s -> **{rd['ratio']:.2f}x**; target "
          f"{_target(rd['ratio'], 1.3, accel, '.1f')}. Split phases: "
          + ", ".join(f"{k} {v * 1e3:,.0f} ms" for k, v in ph.items())
          + f"; same work both ways: {'yes' if rd['same_work']['equal'] else 'NO'}."]


def trl_section(res: dict, accel: bool) -> list[str]:
  t = res.get("trl")
  why = _missing(t)
  if why:
    return [f"- **GRPO round vs TRL:** {why}"]
  if "ratio" not in t:
    return [f"- **GRPO round vs TRL:** TRL {t['trl_samples_s']:,.1f} samples/s (ours not measured)."]
  return [f"- **GRPO round vs TRL** (one update per round on both sides, TRL on {t['device']}, "
          f"bf16 {t['bf16']}): ours {t['ours_samples_s']:,.1f} samples/s, TRL "
          f"{t['trl_samples_s']:,.1f} -> **{t['ratio']:.2f}x**; target "
          f"{_target(t['ratio'], 5.0, accel, '.0f')}"
          + (f" (TRL's generate: {t['trl_generate_s']:.2f} s of its {t['trl_s']:.2f} s)."
             if t.get("trl_generate_s") else ".")]


def waste_section(res: dict) -> list[str]:
  w = res.get("waste")
  lines = ["### The round's known waste, before / after (same run)", ""]
  why = _missing(w)
  if why:
    return lines + [f"Waste: {why}"]
  o, j = w["old_logp"], w["judge"]
  fl = o["xla_flops"]
  flops = (f"; XLA counts {fl['with_old_logp_pass'] / fl['old_logp_from_update']:.2f}x the FLOPs "
           "with the pass" if fl.get("with_old_logp_pass") and fl.get("old_logp_from_update")
           else "")
  lines.append(
      f"- **Old-log-prob forward at one update per round:** with the frozen pass "
      f"{o['with_old_logp_pass_s']:.3f} s, skipped (`old_logp` = stop-gradient of the update's "
      f"own forward, ratio exactly 1) {o['old_logp_from_update_s']:.3f} s -> "
      f"**{o['speedup']:.2f}x** ({o['samples_per_s_before']:,.1f} -> "
      f"{o['samples_per_s_after']:,.1f} samples/s){flops}.")
  mem = (f"XLA's temporary memory {j['unchunked_temp_bytes'] / 2**20:,.1f} MiB -> "
         f"{j['chunked_temp_bytes'] / 2**20:,.1f} MiB (**{j['temp_bytes_ratio']:.2f}x** less); "
         if j.get("temp_bytes_ratio") else "")
  lines.append(
      f"- **Self-Rewarding judge pass over {j['rows']} rows, all at once vs {j['chunks']} "
      f"chunks:** {mem}time {j['unchunked_s'] * 1e3:,.1f} ms -> {j['chunked_s'] * 1e3:,.1f} ms; "
      f"scores equal (max difference {j['scores_max_abs_diff']:.1e}).")
  return lines


def render(res: dict) -> str:
  accel = res["machine"]["device"]["platform"] != "cpu"
  why = _missing(res.get("model"))
  lines = header(res) + [""] + probes_line(res) + [""]
  if why:
    lines.append(f"Model: {why}")
  else:
    lines += sampler_section(res, accel) + ["", "### Training and the round", ""]
    lines += train_section(res, accel) + round_section(res, accel) + trl_section(res, accel)
    lines += [""] + waste_section(res)
  lines += ["", f"Raw numbers (every repetition, errors and skip reasons): "
            f"`bench/results/{'accelerator' if accel else 'accelerator_quick'}.json`."]
  return "\n".join(lines)
