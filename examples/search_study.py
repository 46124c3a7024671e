"""Tree search vs best-of-N at equal tokens, on a rest_mcts run's checkpoint (docs/recipes.md,
"Tree search with process values").

  python examples/search_study.py --workdir=runs/rest_mcts --out=runs/search_study.json \
      --variant= --variant=algorithm.search_bonus=0 \
      --variant=algorithm.search_width=1,sampling.n=8

For each variant (comma-separated overrides of the run's `algorithm.search_*` keys and
`sampling.n`; an empty one is the run's own settings) the held-out meter of `selfplay-jax eval`
(`evaluate.search_comparison`) runs on `--examples` held-out problems: the tree search, then
best-of-N sampling at the same tokens per problem. `--step` picks a checkpoint (default: the
newest). Writes one JSON object per variant to `--out` and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from selfplay_jax import checkpoint, config_lib, evaluate, run_config, setup
from selfplay_jax.data import pipeline

ALLOWED = ("algorithm.search_", "sampling.n")


def _variant_run(base, workdir, text: str, examples: int):
  """The run rebuilt with the variant's overrides (search keys and sampling.n only)."""
  overrides = [o for o in text.split(",") if o]
  for item in overrides:
    if not item.partition("=")[0].startswith(ALLOWED):
      raise SystemExit(f"--variant: {item!r} does not set a search key (algorithm.search_* or "
                       "sampling.n)")
  # (values parsed by type; the saved run config itself is not re-validated, as `eval` does not)
  cfg = config_lib.apply_overrides(base, overrides + [f"eval.search_examples={examples}"])
  return setup.build(cfg, workdir)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variant", action="append", default=None)
  parser.add_argument("--examples", type=int, default=256)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  workdir = Path(args.workdir)
  base = run_config.load_run_config(workdir)
  evaluate.require_checkpoint(workdir)
  run = setup.build(base, workdir)
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, _, _, _ = run.restore(ckpt, args.step)
    step = ckpt.restored_step
  batches = pipeline.eval_batches(run.task, "heldout", args.examples, tokenizer=run.tokenizer,
                                  batch_size=base.eval.batch_size, **setup.data_lengths(base))
  results = []
  for text in args.variant or [""]:
    vrun = _variant_run(base, workdir, text, args.examples)
    start = time.time()
    out = evaluate.search_comparison(vrun, state.params, batches, base.seed)
    results.append({"round": step, "variant": text or "(the run's)", "examples": args.examples,
                    **out, "seconds": round(time.time() - start, 1)})
    print(json.dumps(results[-1]), flush=True)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
  return results


if __name__ == "__main__":
  main()
