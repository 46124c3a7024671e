"""The `lora` docs section from `bench.lora`'s results (results/lora.json)."""

from __future__ import annotations

from bench.render import ms, opening, raw_numbers_note

NAME = "lora"


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


def _time(seconds: float) -> str:
  return f"{seconds:.3g} s" if seconds >= 1 else ms(seconds)


def render(res: dict) -> str:
  c, sizes, times = res["config"], res["sizes"], res["times"]
  run_line = (f"Llama-shaped, width {c['hidden_size']}, {c['num_layers']} layers, MLP "
              f"{c['intermediate_size']}, {c['num_heads']} heads ({c['num_kv_heads']} kv) x "
              f"{c['head_dim']}, vocabulary {c['vocab_size']}: {c['base_params']:,} parameters, "
              f"float32. One training step as the round runs it (`round.train_steps`, GRPO loss, "
              f"{c['rows']} rows x {c['prompt_len']} + {c['completion_len']} tokens, "
              f"{c['optimizer']}), full fine-tuning and LoRA rank {c['rank']} (alpha "
              f"{c['alpha']:g}, all seven projections) interleaved in one process, "
              f"{len(times['full']['times_s'])} timed steps each.")
  lines = opening("## LoRA vs full fine-tuning", NAME, res["machine"], run_line)
  lines += ["", "| | trained params | optimizer state | params held | checkpoint per round | "
                "update step (wall) | update step (CPU) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for name, label in (("full", "full fine-tuning"), ("lora", f"LoRA rank {c['rank']}")):
    s, t = sizes[name], times[name]
    lines.append(f"| {label} | {s['trainable_params']:,} | {_mib(s['optimizer_bytes'])} | "
                 f"{_mib(s['param_bytes'])} | {_mib(s['checkpoint_bytes'])} | "
                 f"{_time(t['median_s'])} | {_time(t['cpu_median_s'])} |")
  lines += ["", f"LoRA holds {res['optimizer_bytes_ratio']:.0f}x less optimizer state and writes "
                f"{res['checkpoint_bytes_ratio']:.0f}x less per checkpoint (full: the params, their "
                "optimizer state and the frozen reference; LoRA: the adapters, their optimizer "
                "state and the reference's adapters, the base being re-read on resume). Its "
                "update step takes "
                f"{res['update_time_ratio']:.2f}x the full step's wall time "
                f"({res['update_cpu_ratio']:.2f}x by CPU time): the backward pass still carries "
                "activation gradients through every frozen weight (the adapters of earlier "
                "layers need them), and skips only the weight gradients and the optimizer "
                "update of the base. The params held grow by the adapters.",
            "", raw_numbers_note(NAME)]
  return "\n".join(lines)
