"""Self-Rewarding end to end on the tiny arithmetic model: the warm-up trains the judge (EFT), the
judge then ranks verified-correct answers above wrong ones more often than chance, and in the
self-rewarding rounds every sample's score and the logged judge metrics are re-derived from the
round's own samples. The judge's pieces: test_judge.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_validation
from selfplay_jax import config_lib, evaluate, models, sampling, scoring
from selfplay_jax import setup
from selfplay_jax import round as rnd
from selfplay_jax.data import pipeline
from selfplay_jax.errors import ConfigError
from tests.task_helpers import string_reward

WARMUP_ROUNDS = 150
# judge.balance: the judge rows weigh correct and wrong judged responses equally. Without it the
# one-pass judge ended this warm-up at chance on one machine (agreement 0.49 over 196 pairs; float
# rounding differs between CPUs and 150 rounds amplify it); with it, 0.61 over 237 pairs there.
SMALL = ["data.batch_size=32", "sampling.n=4", "eval.num_examples=128", "judge.balance=true",
         f"warmup.rounds={WARMUP_ROUNDS}"]


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
  cfg = config_lib.load_config("configs/self_rewarding.py", SMALL)
  config_validation.validate(cfg)
  task, tok = setup.task_and_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
  mc, lens = setup.model_config(cfg, tok), setup.data_lengths(cfg)
  verify = task.make_verifier(tok)
  opt, warm_spec = setup.build_optimizer(cfg), setup.build_warmup_spec(cfg, tok)
  assert warm_spec.name == "sft+judge"
  state = rnd.init_state(models.init_params(mc, jax.random.key(0)), opt, warm_spec, jax.random.key(1))
  warm = rnd.build_round_fn(mc, warm_spec, opt, setup.sampling_config(cfg, tok), verify)
  it = pipeline.make_iterator(task.source("train", 0), tokenizer=tok, batch_size=32, seed=0, **lens)
  judge_losses = []
  for _ in range(WARMUP_ROUNDS):
    state, metrics = warm(state, next(it))
    judge_losses.append(float(metrics["train/judge_loss"]))
  return cfg, task, tok, mc, state, it, judge_losses


def _agreement_counts(scores, verified, group):
  """(wins, pairs) over (correct, wrong) pairs of each group: a NumPy re-count of the metric."""
  s, ok = scores.reshape(-1, group), verified.reshape(-1, group) >= 1
  wins = pairs = 0.0
  for srow, orow in zip(s, ok):
    for i in np.flatnonzero(orow):
      for j in np.flatnonzero(~orow):
        pairs += 1
        wins += 1.0 if srow[i] > srow[j] else 0.5 if srow[i] == srow[j] else 0.0
  return wins, pairs


@pytest.mark.slow
def test_warmed_up_judge_ranks_correct_answers_above_wrong_ones(warmed):
  cfg, task, tok, mc, state, _, judge_losses = warmed
  assert np.mean(judge_losses[-10:]) < np.mean(judge_losses[:10])  # the judge learned something
  judge, verify = setup.build_judge(cfg, tok), task.make_verifier(tok)
  sc = setup.sampling_config(cfg, tok, n=8)
  batches = pipeline.eval_batches(task, "heldout", 256, tokenizer=tok, batch_size=64,
                                  **setup.data_lengths(cfg))
  wins = pairs = 0.0
  for i, b in enumerate(batches):
    ro = sampling.sample(mc, state.params, b["prompt_tokens"], b["prompt_mask"],
                         jax.random.key(100 + i), sc)
    rep = lambda x: np.repeat(x, sc.n, axis=0)
    v = np.asarray(verify(ro.tokens, ro.mask, rep(b["answer_tokens"]), rep(b["answer_mask"])))
    s = np.asarray(judge.score(mc, state.params, ro.prompt_tokens, ro.prompt_mask, ro.tokens,
                               ro.mask, jax.random.key(0)))
    w, p = _agreement_counts(s, v, sc.n)
    np.testing.assert_allclose(float(scoring.ranking_agreement(s, v, sc.n)),
                               w / p if p else np.nan, rtol=1e-6)
    wins, pairs = wins + w, pairs + p
  print(f"held-out judge agreement after {WARMUP_ROUNDS} warm-up rounds: {wins / pairs:.3f} "
        f"over {int(pairs)} (correct, wrong) pairs")
  # The pair count follows the warmed-up policy's accuracy, which moves with the machine's float
  # rounding (237 and 170 pairs measured on one machine); 100 pairs still put 0.5 about 5 standard
  # errors (0.05) below a 0.75 agreement and resolve 0.55 from chance at 1 sigma.
  assert pairs >= 100
  assert wins / pairs > 0.5


def _expected_scores(tok, mc, params, ro):
  """NumPy re-derivation of the built-in judge's expected score of each sample: the judge prompt
  built by hand (BOS + prompt + response without its stop token + "<score>", no padding), the
  model's logits at its end, softmax over the tokens "0".."5", and the expectation."""
  score_ids = [tok.piece_to_id(str(k)) for k in range(6)]
  seqs = []
  for pt, pm, t, n in zip(ro["prompt_tokens"], ro["prompt_mask"], ro["tokens"], ro["lengths"]):
    prompt = [int(x) for x in pt[pm] if x != tok.bos_id]
    response = [int(x) for x in t[:n] if x not in tok.eos_ids]
    seqs.append([tok.bos_id] + prompt + response + [tok.piece_to_id("<score>")])
  want = np.zeros(len(seqs))
  for length in sorted({len(q) for q in seqs}):  # one unpadded forward pass per length
    rows = [i for i, q in enumerate(seqs) if len(q) == length]
    logits = np.asarray(models.forward(mc, params, jnp.asarray([seqs[i] for i in rows])))
    last = logits[:, -1, score_ids].astype(np.float64)
    p = np.exp(last - last.max(-1, keepdims=True))
    want[rows] = (p / p.sum(-1, keepdims=True)) @ np.arange(6)
  return want


def _sample_rows(metrics):
  """The round's rollout rows from its `samples/*` metrics (all rows: num_samples covers them)."""
  return {k.split("/", 1)[1]: np.asarray(v) for k, v in metrics.items() if k.startswith("samples/")}


def _verified(tok, ro):
  """Each sample's verdict by the Python string check against the prompt's gold answer."""
  return np.array([string_reward(tok, t, np.arange(len(t)) < n, tok.decode(pt[pm]))
                   for pt, pm, t, n in zip(ro["prompt_tokens"], ro["prompt_mask"], ro["tokens"],
                                           ro["lengths"])])


@pytest.mark.slow
def test_self_rewarding_rounds_log_judge_agreement(warmed):
  """Three self-rewarding rounds from M1: each sample's reward is the judge's expected score,
  re-derived with NumPy from the logits of its judge prompt under M_t; the judge metrics, the
  fraction of prompts that give a pair, the accuracy and the judge agreement are recomputed from
  the samples."""
  cfg, task, tok, mc, state, it, _ = warmed
  spec, opt = setup.build_spec(cfg), setup.build_optimizer(cfg)
  assert spec.name == "self_rewarding" and spec.pairs == "best_vs_worst"
  sc = setup.sampling_config(cfg, tok)
  round_fn = rnd.build_round_fn(mc, spec, opt, sc, task.make_verifier(tok),
                                scorer=setup.build_scorer(cfg, mc, tok),
                                num_samples=cfg.data.batch_size * sc.n)
  # As train.py does at the end of warm-up: the reference (and sampler / judge) is the warmed-up M1.
  state = rnd.init_state(state.params, opt, spec, jax.random.key(2)).replace(
      opt_state=jax.tree.map(jnp.copy, state.opt_state))
  seen = []
  for _ in range(3):
    judge_params = jax.device_get(state.ref_params)  # M_t samples and judges (state is donated)
    state, metrics = round_fn(state, next(it))
    assert np.isfinite(float(metrics["train/loss"]))
    ro = _sample_rows(metrics)
    assert ro["tokens"].shape[0] == cfg.data.batch_size * sc.n
    scores = ro["rewards"]
    np.testing.assert_allclose(scores, _expected_scores(tok, mc, judge_params, ro), atol=1e-4)
    assert float(metrics["judge/valid_fraction"]) == 1.0  # an expected score is always valid
    assert float(metrics["judge/score_mean"]) == pytest.approx(scores.mean(), rel=1e-5)
    groups = scores.reshape(-1, sc.n)
    has_pair = groups.max(1) - groups.min(1) > cfg.algorithm.min_score_gap  # ties are dropped
    assert float(metrics["train/pair_fraction"]) == pytest.approx(has_pair.mean())
    verified = _verified(tok, ro)
    assert float(metrics["train/accuracy"]) == pytest.approx(verified.mean())
    w, p = _agreement_counts(scores, verified, sc.n)
    np.testing.assert_allclose(float(metrics["train/judge_agreement"]), w / p if p else np.nan,
                               rtol=1e-6)
    seen.append(float(metrics["train/judge_agreement"]))  # NaN only without a mixed group
  assert any(np.isfinite(seen))


# The rationale judge the config builds: test_judge.py::test_rationale_judge_config.
RATIONALE = ["judge.rationale=True", "judge.num_samples=2", "judge.max_new_tokens=34",
             "data.batch_size=4", "sampling.n=2", "warmup.rounds=1"]


@pytest.mark.slow
def test_rationale_judge_rounds_run_and_read_scores(tmp_path):
  """Warm-up with rationale rows and a self-rewarding round whose judgements are sampled
  solutions followed by the marker and a score: jitted end to end; the judge metrics and the
  pairs are re-derived from each sample's score (sampled judging itself, against judgements read
  back in Python: test_judge.py)."""
  cfg = config_lib.load_config("configs/self_rewarding.py", RATIONALE)
  task, tok = setup.task_and_tokenizer(cfg, tmp_path)
  mc, lens = setup.model_config(cfg, tok), setup.data_lengths(cfg)
  verify, opt = task.make_verifier(tok), setup.build_optimizer(cfg)
  it = pipeline.make_iterator(task.source("train", 0), tokenizer=tok, batch_size=4, seed=0, **lens)
  warm_spec = setup.build_warmup_spec(cfg, tok)
  state = rnd.init_state(models.init_params(mc, jax.random.key(0)), opt, warm_spec, jax.random.key(1))
  state, metrics = rnd.build_round_fn(mc, warm_spec, opt, setup.sampling_config(cfg, tok), verify)(
      state, next(it))
  assert np.isfinite(float(metrics["train/judge_loss"]))
  spec = setup.build_spec(cfg)
  rows = cfg.data.batch_size * cfg.sampling.n
  round_fn = rnd.build_round_fn(mc, spec, opt, setup.sampling_config(cfg, tok), verify,
                                scorer=setup.build_scorer(cfg, mc, tok), num_samples=rows)
  state = rnd.init_state(state.params, opt, spec, jax.random.key(2))
  state, metrics = round_fn(state, next(it))
  assert np.isfinite(float(metrics["train/loss"]))
  # Each sample's score: the mean of its judge.num_samples = 2 judgements that wrote a score, so
  # a whole or half point of the 0..5 scale; NaN when neither did (an untrained judge rarely
  # writes the marker). The metrics and the pairs are recomputed from these scores.
  scores = _sample_rows(metrics)["rewards"]
  assert scores.shape == (rows,)
  valid = ~np.isnan(scores)
  assert np.isin(scores[valid] * 2, np.arange(11)).all(), scores
  assert float(metrics["judge/valid_fraction"]) == pytest.approx(valid.mean())
  np.testing.assert_allclose(float(metrics["judge/score_mean"]),  # NaN: no valid score at all
                             scores[valid].mean() if valid.any() else np.nan, rtol=1e-6)
  groups, ok = scores.reshape(-1, cfg.sampling.n), valid.reshape(-1, cfg.sampling.n)
  spread = np.where(ok, groups, -np.inf).max(1) - np.where(ok, groups, np.inf).min(1)
  has_pair = (ok.sum(1) >= 2) & (spread > 0)  # two valid scores that differ
  assert float(metrics["train/pair_fraction"]) == pytest.approx(has_pair.mean())


@pytest.mark.slow
def test_study_script_runs_at_smoke_size(tmp_path, monkeypatch):
  """examples/self_rewarding_study.py (the numbers in docs/recipes.md) at tiny sizes: it writes
  the judge report and one row per control, and the flipped-verifier scorer flips at its rate."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("study", "examples/self_rewarding_study.py")
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  out = tmp_path / "study.json"
  calls = []  # (model config, params, eval batches, max_new_tokens) of each accuracy measured
  real_accuracy = evaluate.greedy_accuracy

  def recording(mc, params, batches, verify, eos_ids, max_new_tokens, **kwargs):
    calls.append((mc, params, batches, max_new_tokens))
    return real_accuracy(mc, params, batches, verify, eos_ids, max_new_tokens, **kwargs)

  monkeypatch.setattr(evaluate, "greedy_accuracy", recording)
  result = study.main(["--warmup_rounds=2", "--rounds=1", "--eval_examples=16",
                       "--judge_examples=16", "--flips=0.3", f"--out={out}"])
  assert [c["scores"] for c in result["controls"]] == [
      "verifier", "verifier flipped p=0.3", "self-judge, min_score_gap=0.5"]
  assert out.exists() and json.loads(out.read_text())["warmup_accuracy"] == result["warmup_accuracy"]
  # The warm-up accuracy (the first one measured) re-derived: greedy completions of the 16
  # held-out prompts checked in Python against their gold answers; the batch's padding rows
  # (112 of 128) do not count.
  mc, params, batches, max_new_tokens = calls[0]
  _, tok = setup.task_and_tokenizer(config_lib.load_config("configs/self_rewarding.py"),
                                    tmp_path / "tok")  # the study's (deterministic) tokenizer
  solved = total = 0
  for b in batches:
    ro = sampling.sample(mc, params, b["prompt_tokens"], b["prompt_mask"], jax.random.key(0),
                         sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                                 eos_ids=tuple(tok.eos_ids)))
    ro = jax.device_get(ro)
    for i in np.flatnonzero(b["valid"]):
      prompt = tok.decode(b["prompt_tokens"][i][b["prompt_mask"][i]])
      solved += string_reward(tok, ro.tokens[i], ro.mask[i], prompt)
      total += 1
  assert total == 16
  assert result["warmup_accuracy"] == pytest.approx(solved / total)
  assert {"agreement", "corr_score_likelihood", "gap>0.5"} <= set(result["judge"])
  # The flipped verifier: all-correct verdicts come back flipped at about the rate asked for.
  verify = lambda tokens, mask, answers, answer_mask: jnp.ones(tokens.shape[0])
  scorer = study.flipped_verifier(verify, 4, 0.3)
  rows = 4000
  ro = sampling.Rollout(prompt_tokens=jnp.zeros((rows, 1), jnp.int32),
                        prompt_mask=jnp.ones((rows, 1), bool), tokens=jnp.zeros((rows, 2), jnp.int32),
                        logprobs=jnp.zeros((rows, 2)), model_logprobs=jnp.zeros((rows, 2)),
                        mask=jnp.ones((rows, 2), bool), lengths=jnp.full((rows,), 2))
  batch = {"answer_tokens": jnp.zeros((rows // 4, 1), jnp.int32),
           "answer_mask": jnp.ones((rows // 4, 1), bool)}
  scores, _ = scorer(None, None, batch, ro, jax.random.key(0))
  assert abs(float(jnp.mean(scores == 0.0)) - 0.3) < 0.03


@pytest.mark.slow
def test_judge_trains_only_in_the_last_warmup_judge_rounds(tmp_path):
  """warmup.judge_rounds=1 of warmup.rounds=3: rounds 1-2 are plain SFT (no judge rows, no
  sampling), round 3 also trains the judge; the self-improvement round follows."""
  from selfplay_jax import train  # pylint: disable=import-outside-toplevel
  from tests.test_train import OVERRIDES  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load_config("configs/self_rewarding.py", [
      *OVERRIDES, "rounds=1", "warmup.judge_rounds=1", "metrics.plot_every_rounds=0",
      "checkpoint.every_rounds=0", "eval.judge_samples=-1"])
  config_validation.validate(cfg)
  train.train_and_evaluate(cfg, tmp_path)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["phase"] for m in lines] == ["warmup"] * 3 + ["self_rewarding"]
  assert [m.get("train/judge_loss") is not None for m in lines] == [False, False, True, False]
  assert "train/sft_loss" not in lines[0] and lines[2]["train/sft_loss"] is not None
  # The run has a judge, so its evaluation also runs the held-out judge meter (eval.judge_samples
  # = -1: sampling.n samples per problem); its values: test_evaluate.py.
  meter = ("eval/judge_pick_accuracy", "eval/sample_accuracy", "eval/gv_gap",
           "eval/judge_agreement", "eval/judge_accuracy", "eval/judge_unscored")
  assert "eval/accuracy" in lines[-1] and set(meter) <= set(lines[-1])
  assert 0.0 <= lines[-1]["eval/sample_accuracy"] <= 1.0
  for bad, match in (("warmup.judge_rounds=4", "exceeds warmup.rounds=3"),
                     ("warmup.judge_rounds=-2", "must be >= 0, or -1")):
    with pytest.raises(ConfigError, match=match):
      config_validation.validate(config_lib.load_config("configs/self_rewarding.py",
                                                        [*OVERRIDES, bad]))
