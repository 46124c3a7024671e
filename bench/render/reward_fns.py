"""The `reward_fns` docs section from `bench.reward_fns`'s results (results/reward_fns.json)."""

from __future__ import annotations

from bench.render import ms, opening, raw_numbers_note

NAME = "reward_fns"
WHAT = {"verifier": "task verifier (jitted, no callback)",
        "python": "trivial Python function (TRL-style length reward)",
        "math": "built-in `math` reward (math-verify)"}


def seconds(x: float) -> str:
  return ms(x) if x < 1 else f"{x:.2f} s"


def render(res: dict) -> str:
  c = res["config"]
  lines = opening(
      "## Python reward functions: the host callback's cost", "reward_fns", res["machine"],
      f"the demo's round (configs/default.py: {c['model']} model, {c['params'] / 1e6:.2f}M "
      f"parameters, {c['prompts']} prompts x {c['n']} samples = {c['rows']} completions of up to "
      f"{c['max_new_tokens']} tokens, {c['task']}) after {c['warmup_rounds']} warm-up SFT rounds; "
      f"median of {c['reps']} rounds per reward, the rewards' rounds interleaved.")
  lines += ["", "| reward | round | callback (host) | callback share of the round | per completion "
            "| round vs verifier |", "|---|---|---|---|---|---|"]
  for r in res["rows"]:
    callback = "-" if r["reward"] == "verifier" else seconds(r["callback_s"])
    share = "-" if r["reward"] == "verifier" else f"{r['callback_share']:.1%}"
    per_row = "-" if r["reward"] == "verifier" else f"{r['callback_per_row_us']:.0f} µs"
    lines.append(f"| {WHAT[r['reward']]} | {seconds(r['round_s'])} | {callback} | {share} | {per_row} "
                 f"| {r['vs_verifier']:.2f}x |")
  math = next(r for r in res["rows"] if r["reward"] == "math")
  met = math["callback_share"] <= res["target_share"]
  lines += ["", (f"Target (the math reward's callback < {res['target_share']:.0%} of a demo-sized "
                 f"round) {'met' if met else 'not met'}: {math['callback_share']:.1%}, measured in "
                 "the same rounds (each round reports its callback's host time, "
                 "`time/reward_fns_s`). The callback covers shipping the completions' tokens and "
                 "row indices to the host, decoding them with the run's tokenizer, looking up each "
                 "row's fields, and the functions themselves; the device waits for it, so it adds "
                 "to the round. The math reward caches math-verify's verdict per (gold, answer) text, "
                 "so an answer repeated across samples and rounds (common after the warm-up, as "
                 "here) is parsed once; free-form completions without a `####` line are keyed by "
                 "their whole text and rarely repeat. The machine was shared (load average "
                 f"{res['machine']['loadavg'][0]:.1f} at the start, {res['loadavg_end'][0]:.1f} at "
                 "the end, on 2 cores), which slows rounds and callbacks alike; the share is the "
                 "number to compare. On an accelerator the same round takes a fraction of this time "
                 "while the callback's host time does not shrink, so there its share is larger: "
                 "carry over the time per completion."),
            "", raw_numbers_note(NAME)]
  return "\n".join(lines)
