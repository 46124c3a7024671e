"""Why Self-Rewarding does not improve the tiny model: the judge, measured (docs/recipes.md).

  python examples/self_rewarding_study.py --out=runs/self_rewarding_study.json

1. Warm-up M1 as `configs/self_rewarding.py` builds it (SFT on gold responses + judge training).
2. The judge on held-out problems: agreement over all (correct, wrong) sample pairs and over the
   pairs whose scores differ by more than a gap; the quality of best-vs-worst pairs; within-prompt
   correlations of the judge's score with correctness and with the policy's own likelihood.
3. Controls: the same update (best vs worst, DPO) from M1, with the candidates scored by the task
   verifier, by the verifier with each score flipped at random (probability p: agreement 1 - p),
   and by the policy as its own judge. Held-out greedy accuracy after each control.

Everything runs through the package's own round engine; only the flipped-verifier scorer is
defined here. `--warmup_rounds=2 --rounds=2 --eval_examples=16` is the smoke test's size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from selfplay_jax import config_lib, config_validation, models, sampling, scoring
from selfplay_jax import setup
from selfplay_jax import evaluate
from selfplay_jax import round as rnd
from selfplay_jax.data import pipeline


def _config(overrides):
  cfg = config_lib.load_config("configs/self_rewarding.py", overrides)
  config_validation.validate(cfg)
  return cfg


def flipped_verifier(verify, n: int, p: float):
  """Scorer: the verifier's verdict, flipped with probability p per sample (random errors)."""

  def scorer(sample_params, ref_params, batch, rollout, rng):
    del sample_params, ref_params
    rep = lambda x: jnp.repeat(x, n, axis=0)
    v = verify(rollout.tokens, rollout.mask, rep(batch["answer_tokens"]), rep(batch["answer_mask"]))
    return jnp.where(jax.random.uniform(rng, v.shape) < p, 1.0 - v, v), {}

  return scorer


def _within_corr(a, b):
  """Correlation of a and b [prompts, n] after removing each prompt's mean."""
  a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
  denom = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / denom) if denom else float("nan")


def judge_report(cfg, task, tok, mc, params, num_examples: int, n: int = 8, gaps=(0.5, 1.0)):
  """Held-out calibration of the judge M1 (see the module docstring, step 2)."""
  judge, verify = setup.build_judge(cfg, tok), task.make_verifier(tok)
  sc = setup.sampling_config(cfg, tok, n=n)
  scores, verified, likelihood = [], [], []
  batches = pipeline.eval_batches(task, "heldout", num_examples, tokenizer=tok, batch_size=64,
                                  **setup.data_lengths(cfg))
  for i, b in enumerate(batches):
    ro = sampling.sample(mc, params, b["prompt_tokens"], b["prompt_mask"], jax.random.key(100 + i), sc)
    rep = lambda x: np.repeat(x, n, axis=0)
    verified.append(np.asarray(verify(ro.tokens, ro.mask, rep(b["answer_tokens"]),
                                      rep(b["answer_mask"]))))
    scores.append(np.asarray(judge.score(mc, params, ro.prompt_tokens, ro.prompt_mask, ro.tokens,
                                         ro.mask, jax.random.key(i))))
    rows = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask, "tokens": ro.tokens,
            "mask": ro.mask}
    likelihood.append(np.asarray(scoring.self_likelihood(mc, params, rows, "mean")))
  s = np.concatenate(scores).reshape(-1, n)
  v = np.concatenate(verified).reshape(-1, n) >= 1
  lik = np.concatenate(likelihood).reshape(-1, n)
  diffs = np.array([srow[i] - srow[j] for srow, vrow in zip(s, v)
                    for i in np.flatnonzero(vrow) for j in np.flatnonzero(~vrow)])
  report = {"sample_accuracy": float(v.mean()), "correct_wrong_pairs": int(diffs.size),
            "agreement": float(np.mean(np.where(diffs > 0, 1.0, np.where(diffs == 0, 0.5, 0.0))))
            if diffs.size else float("nan"),
            "corr_score_verified": _within_corr(s, v.astype(float)),
            "corr_score_likelihood": _within_corr(s, lik),
            "corr_verified_likelihood": _within_corr(v.astype(float), lik)}
  rows = np.arange(len(s))
  best, worst, spread = s.argmax(1), s.argmin(1), s.max(1) - s.min(1)
  for gap in gaps:
    decisive = np.abs(diffs) > gap
    keep = spread > gap
    report[f"gap>{gap}"] = {
        "pairs": int(decisive.sum()),
        "agreement": float(np.mean(diffs[decisive] > 0)) if decisive.any() else float("nan"),
        "prompts_paired": float(keep.mean()),
        "chosen_correct": float(v[rows, best][keep].mean()) if keep.any() else float("nan"),
        "rejected_correct": float(v[rows, worst][keep].mean()) if keep.any() else float("nan")}
  return report


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--warmup_rounds", type=int, default=500)
  ap.add_argument("--rounds", type=int, default=30)
  ap.add_argument("--eval_examples", type=int, default=512)
  ap.add_argument("--judge_examples", type=int, default=256)
  ap.add_argument("--learning_rate", type=float, default=1e-4)
  ap.add_argument("--flips", default="0.3,0.4,0.5", help="flip probabilities of the noisy verifiers")
  ap.add_argument("--out", default="runs/self_rewarding_study.json")
  args = ap.parse_args(argv)
  t0 = time.time()
  base = [f"warmup.rounds={args.warmup_rounds}", f"optimizer.learning_rate={args.learning_rate}"]
  cfg = _config(base)
  task, tok = setup.task_and_tokenizer(cfg, Path(tempfile.mkdtemp()) / "tok")
  mc, lens = setup.model_config(cfg, tok), setup.data_lengths(cfg)
  verify, opt = task.make_verifier(tok), setup.build_optimizer(cfg)
  warm_spec = setup.build_warmup_spec(cfg, tok)
  state = rnd.init_state(models.init_params(mc, jax.random.key(cfg.seed)), opt, warm_spec,
                         jax.random.key(1))
  warm = rnd.build_round_fn(mc, warm_spec, opt, setup.sampling_config(cfg, tok), verify)
  it = pipeline.make_iterator(task.source("train", cfg.seed), tokenizer=tok,
                              batch_size=cfg.data.batch_size, seed=cfg.seed, **lens)
  for r in range(args.warmup_rounds):
    state, _ = warm(state, next(it))
    if (r + 1) % 50 == 0:
      print(f"warm-up round {r + 1}/{args.warmup_rounds} ({time.time() - t0:.0f} s)", flush=True)
  m1 = jax.device_get((state.params, state.opt_state))
  batches = pipeline.eval_batches(task, "heldout", args.eval_examples, tokenizer=tok, batch_size=128,
                                  **lens)
  accuracy = lambda p: evaluate.greedy_accuracy(mc, p, batches, verify, tok.eos_ids,
                                          cfg.sampling.max_new_tokens)
  result = {"args": vars(args), "warmup_accuracy": accuracy(m1[0]),
            "judge": judge_report(cfg, task, tok, mc, m1[0], args.judge_examples)}
  print(json.dumps(result, indent=1), flush=True)

  controls = [("verifier", ["algorithm.reward=verifier"], None)]
  controls += [(f"verifier flipped p={p}", [], float(p)) for p in args.flips.split(",") if p]
  controls += [("self-judge, min_score_gap=0.5", ["algorithm.min_score_gap=0.5"], None)]
  result["controls"] = []
  for name, extra, flip in controls:
    c = _config(base + extra)
    spec = setup.build_spec(c)
    scorer = flipped_verifier(verify, c.sampling.n, flip) if flip is not None else (
        setup.build_scorer(c, mc, tok))
    round_fn = rnd.build_round_fn(mc, spec, opt, setup.sampling_config(c, tok), verify, scorer=scorer)
    state = rnd.init_state(jax.tree.map(jnp.asarray, m1[0]), opt, spec, jax.random.key(2)).replace(
        opt_state=jax.tree.map(jnp.asarray, m1[1]))
    it = pipeline.make_iterator(task.source("train", 1), tokenizer=tok, batch_size=c.data.batch_size,
                                seed=1, **lens)
    agreement = []
    for _ in range(args.rounds):
      state, metrics = round_fn(state, next(it))
      agreement.append(float(metrics.get("train/judge_agreement", np.nan)))
    row = {"scores": name, "accuracy": accuracy(state.params),
           "judge_agreement_mean": float(np.nanmean(agreement)) if np.isfinite(agreement).any()
           else float("nan")}
    result["controls"].append(row)
    print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
  result["seconds"] = time.time() - t0
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
