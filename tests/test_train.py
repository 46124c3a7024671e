"""The training loop end to end on a tiny config: metrics, checkpoints, and bit-identical resume."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from selfplay_jax import config_validation, run_config
from selfplay_jax import checkpoint, config_lib, models, sampling
from selfplay_jax import round as rnd
from selfplay_jax import setup
from selfplay_jax import train
from selfplay_jax.data import pipeline
from tests.task_helpers import answer_is_right, string_reward

OVERRIDES = ["warmup.rounds=3", "rounds=3", "eval.every_rounds=2", "eval.num_examples=8",
             "eval.batch_size=8", "data.batch_size=4", "sampling.n=2", "sampling.max_new_tokens=8",
             "data.difficulty=1", "model.hidden_size=32", "model.intermediate_size=64",
             "model.num_layers=1", "progress_bar=false", "mesh.data=1",
             "eval.judge_samples=0"]  # the held-out judge meter: test_evaluate.py, test_self_rewarding.py


def _cfg(*extra):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), OVERRIDES + list(extra))
  config_validation.validate(cfg)
  return cfg


def _final_params(cfg, workdir):
  task, tok = setup.task_and_tokenizer(cfg, workdir)
  mc = setup.model_config(cfg, tok)
  spec, opt = setup.build_spec(cfg), setup.build_optimizer(cfg)
  like = rnd.init_state(models.init_params(mc, jax.random.key(0)), opt, spec, jax.random.key(0))
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, _, _, _ = ckpt.restore(abstract_state=like)
  return jax.device_get(state)


@pytest.mark.slow
def test_train_writes_metrics_and_checkpoints(tmp_path):
  history = train.train_and_evaluate(_cfg(), tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["round"] for m in lines] == list(range(1, 7))
  for m in lines:  # the documented keys are on every line (None where a round measures nothing)
    assert {"round", "train/loss", "time/round_s", "train/reward_mean", "eval/accuracy"} <= set(m)
  assert all(m["train/reward_mean"] is None for m in lines[:3])
  for m in lines[3:]:  # the verifier's rewards, re-derived from the round's sample dump
    dump = [json.loads(l) for l in
            (tmp_path / "samples" / f"round_{m['round']:04d}.jsonl").read_text().splitlines()]
    rewards = np.array([s["reward"] for s in dump])
    assert len(dump) == 8 and set(rewards) <= {0.0, 1.0}  # all 4 x 2 rows of the round
    assert all(answer_is_right(s["completion"], s["prompt"]) for s in dump if s["reward"] == 1.0)
    assert m["train/reward_mean"] == pytest.approx(rewards.mean())
    assert m["train/accuracy"] == pytest.approx(rewards.mean())
  assert [m["eval/accuracy"] is not None for m in lines] == [False, True, False, True, False, True]
  assert "eval/accuracy_after_warmup" in lines[3] and "eval/accuracy_after_warmup" in history
  samples = [json.loads(l) for l in (tmp_path / "samples" / "round_0004.jsonl").read_text().splitlines()]
  assert len(samples) == 8 and samples[0]["prompt"].endswith("=")
  assert all(set(s) == {"prompt", "completion", "reward"} for s in samples)
  assert not (tmp_path / "samples" / "round_0003.jsonl").exists()  # warm-up does not sample
  assert json.loads((tmp_path / "config.json").read_text())["rounds"] == 3
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 6


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rest_em", "dpo", "self_rewarding"])
def test_resume_is_bit_identical(tmp_path, algorithm):
  """Stopping after 4 of 6 rounds (inside the self-play phase) and resuming gives the same params,
  optimizer state and RNG, bit for bit, as running 6 rounds straight, and the same metrics.
  (GRPO, the default: test_resume_kill.py resumes it bit-identically after kills at five points.)"""
  full = tmp_path / "full"
  train.train_and_evaluate(_cfg(f"algorithm.name={algorithm}"), full)
  part = tmp_path / "part"
  train.train_and_evaluate(_cfg(f"algorithm.name={algorithm}", "rounds=1"), part)
  train.train_and_evaluate(_cfg(f"algorithm.name={algorithm}"), part)
  a = _final_params(_cfg(f"algorithm.name={algorithm}"), full)
  b = _final_params(_cfg(f"algorithm.name={algorithm}"), part)
  assert int(a.round) == int(b.round) == 6
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))
  # Determinism: the resumed run logged every number (all but wall-clock times) and sampled every
  # completion exactly as the straight run did.
  lines = {}
  for name, run in (("full", full), ("part", part)):
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    lines[name] = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in records]
  assert [m["round"] for m in lines["part"]] == list(range(1, 7))
  assert lines["part"] == lines["full"]
  dumps = sorted((full / "samples").iterdir()) if (full / "samples").exists() else []  # DPO: none
  assert bool(dumps) == (algorithm != "dpo")
  for f in dumps:
    assert f.read_text() == (part / "samples" / f.name).read_text()


def _numpy_pass_at_k(workdir, k):
  """pass@k of the run's last checkpoint re-derived: k samples per held-out prompt, drawn as
  `evaluate.pass_rates` draws them (seed `cfg.seed`, one key per batch), each checked in Python
  against the prompt's gold answer; a prompt counts once, padding rows not at all."""
  cfg = _cfg()
  task, tok = setup.task_and_tokenizer(cfg, workdir)
  mc = setup.model_config(cfg, tok)
  params = _final_params(cfg, workdir).params
  sc = setup.sampling_config(cfg, tok, n=k)
  assert sc.temperature > 0
  batches = pipeline.eval_batches(task, "heldout", cfg.eval.num_examples, tokenizer=tok,
                                  batch_size=cfg.eval.batch_size, **setup.data_lengths(cfg))
  solved = total = 0
  for i, b in enumerate(batches):
    ro = jax.device_get(sampling.sample(mc, params, b["prompt_tokens"], b["prompt_mask"],
                                        jax.random.fold_in(jax.random.key(cfg.seed), i), sc))
    for j in np.flatnonzero(b["valid"]):
      prompt = tok.decode(b["prompt_tokens"][j][b["prompt_mask"][j]])
      solved += max(string_reward(tok, ro.tokens[j * k + s], ro.mask[j * k + s], prompt)
                    for s in range(k))
      total += 1
  assert total == cfg.eval.num_examples
  return solved / total


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", *args], env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_eval_command_matches_training_eval(tmp_path):
  history = train.train_and_evaluate(_cfg(), tmp_path)
  res = _cli("eval", f"--workdir={tmp_path}", "--k=2")
  assert res.returncode == 0, res.stderr
  result = json.loads((tmp_path / "eval_round_0006.json").read_text())
  assert result["round"] == 6
  assert result["eval/accuracy"] == pytest.approx(history["eval/accuracy"])  # same greedy eval
  assert result["eval/pass@2"] == pytest.approx(_numpy_pass_at_k(tmp_path, 2))
  bad = _cli("eval", f"--workdir={tmp_path / 'nope'}")
  assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def _jsonl_dataset(tmp_path, bad_rows=()):
  from selfplay_jax.data import tasks
  task = tasks.get_task("arithmetic", num_digits=1)
  tasks.build_tokenizer(task, tmp_path / "tok")
  model_file = next((tmp_path / "tok").glob("*.model"))
  rows = [json.dumps(e) for e in task.examples("train", seed=0, num=60)]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(rows[:10] + list(bad_rows) + rows[10:]) + "\n")
  return path, model_file


@pytest.mark.slow
def test_train_on_user_jsonl_with_bad_rows(tmp_path):
  path, model_file = _jsonl_dataset(
      tmp_path, ['{"prompt": 5, "response": "####5", "answer": "5"}', '{"response": "x"}', "not json"])
  res = _cli("train", f"--workdir={tmp_path / 'run'}", f"--config.data.task={path}",
             f"--config.model.tokenizer_path={model_file}", *[f"--config.{o}" for o in OVERRIDES])
  assert res.returncode == 0, res.stderr
  assert "skipped 3 (" in res.stderr and str(path) in res.stderr  # per-reason summary, logged once
  for reason in ("wrong_type", "missing_field", "invalid_json"):
    assert reason in res.stderr
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 6 and lines[-1]["eval/accuracy"] is not None

  strict = _cli("train", f"--workdir={tmp_path / 'strict'}", f"--config.data.task={path}",
                f"--config.model.tokenizer_path={model_file}", "--config.data.strict=true",
                *[f"--config.{o}" for o in OVERRIDES])
  assert strict.returncode == 2 and "Traceback" not in strict.stderr
  assert "line 11" in strict.stderr and str(path) in strict.stderr


@pytest.mark.slow
def test_jsonl_without_tokenizer_is_a_config_error(tmp_path):
  path, _ = _jsonl_dataset(tmp_path)
  res = _cli("train", f"--workdir={tmp_path / 'run'}", f"--config.data.task={path}",
             *[f"--config.{o}" for o in OVERRIDES])
  assert res.returncode == 2 and "model.tokenizer_path" in res.stderr


@pytest.mark.slow
def test_checkpoint_every_n_rounds_and_the_last(tmp_path):
  train.train_and_evaluate(_cfg("checkpoint.every_rounds=4", "checkpoint.keep=5"), tmp_path)
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.all_steps() == [4, 6]


@pytest.mark.slow
def test_export_loads_in_transformers_with_equal_logits(tmp_path):
  import torch
  import transformers

  from selfplay_jax import models, tokenizers

  run = tmp_path / "run"
  train.train_and_evaluate(_cfg(), run)
  res = _cli("export", f"--workdir={run}", f"--out={tmp_path / 'hf'}")
  assert res.returncode == 0, res.stderr
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  state = _final_params(_cfg(), run)
  cfg = _cfg()
  tok = setup.task_and_tokenizer(cfg, run)[1]
  exported_tok = tokenizers.load_tokenizer(tmp_path / "hf")
  text = "7+8="
  ids = tok.encode(text, add_bos=True)
  assert exported_tok.encode(text, add_bos=True) == ids
  assert (exported_tok.bos_id, exported_tok.eos_id, exported_tok.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  mc = setup.model_config(cfg, tok)
  ours = np.asarray(models.forward(mc, state.params, np.array([ids])))
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

  again = _cli("export", f"--workdir={run}", f"--out={tmp_path / 'hf'}")
  assert again.returncode == 2 and "not empty" in again.stderr
  older = _cli("export", f"--workdir={run}", f"--out={tmp_path / 'hf5'}", "--round=5")
  assert older.returncode == 0 and "exported round 5" in older.stdout
  missing = _cli("export", f"--workdir={run}", f"--out={tmp_path / 'hf1'}", "--round=1")
  assert missing.returncode == 2 and "Traceback" not in missing.stderr


def _hf_and_pair_jsonl(tmp_path):
  """A tiny random HF Llama (vocab = the task tokenizer's) and JSONL rows with every field."""
  from selfplay_jax.data import tasks
  from selfplay_jax.scoring import judge
  from tests import hf_models
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path / "tok", extra_symbols=judge.JUDGE_SYMBOLS)
  model_file = next((tmp_path / "tok").glob("*.model"))
  hf_dir = tmp_path / "hf"
  hf_models.make_hf_model("llama", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(hf_dir)
  examples = [task.preference_example("train", i) for i in range(60)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(e) + "\n" for e in examples))
  return path, model_file, hf_dir


@pytest.mark.slow
def test_training_starts_from_the_hf_checkpoint_weights(tmp_path):
  """With model.hf_path the run starts from that checkpoint's weights: the frozen reference saved
  after round 1 gives the same logits as `transformers` on the directory."""
  import torch
  import transformers
  path, model_file, hf_dir = _hf_and_pair_jsonl(tmp_path)
  small = [o for o in OVERRIDES if not o.startswith(("model.", "warmup.rounds", "rounds"))]
  run = tmp_path / "run"
  res = _cli("train", f"--workdir={run}", f"--config.data.task={path}",
             f"--config.model.hf_path={hf_dir}", f"--config.model.tokenizer_path={model_file}",
             "--config.warmup.rounds=0", "--config.rounds=1", *[f"--config.{o}" for o in small])
  assert res.returncode == 0, res.stderr[-3000:]
  cfg = run_config.load_run_config(run)
  task, tok = setup.task_and_tokenizer(cfg, run)
  mc = setup.model_config(cfg, tok)
  with checkpoint.Checkpointer(str(run)) as ckpt:
    state = ckpt.restore(abstract_state=setup.abstract_state(cfg, mc, setup.build_spec(cfg),
                                                          setup.build_optimizer(cfg)))[0]
  ids = tok.encode("3+4=", add_bos=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(np.asarray(models.forward(mc, state.ref_params, np.array([ids]))), ref,
                             atol=1e-4, rtol=0)
  assert not np.array_equal(np.asarray(state.params["embedding"]),
                            np.asarray(state.ref_params["embedding"]))  # and it trained


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo.py", "spin.py", "self_rewarding.py", "sharpen.py",
                                    "sharpen.py:mode=rl"])
def test_preference_recipes_run_on_an_hf_checkpoint_and_jsonl(tmp_path, recipe):
  path, model_file, hf_dir = _hf_and_pair_jsonl(tmp_path)
  small = [o for o in OVERRIDES if not o.startswith(("model.", "sampling.n"))]
  res = _cli("train", f"--config=configs/{recipe}", f"--workdir={tmp_path / 'run'}",
             f"--config.data.task={path}", f"--config.model.hf_path={hf_dir}",
             f"--config.model.tokenizer_path={model_file}", "--config.judge.template="
             "{prompt}{response}<score>", "--config.algorithm.num_minibatches=1",
             *[f"--config.{o}" for o in small])
  assert res.returncode == 0, res.stderr[-3000:]
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 6 and lines[-1]["eval/accuracy"] is not None
  main = lines[-1]
  assert main["phase"] == setup.build_spec(config_lib.load_config(f"configs/{recipe}")).name
  assert np.isfinite(main["train/loss"])
  if recipe == "self_rewarding.py":
    assert "judge/score_mean" in main and "train/judge_loss" in lines[0]


@pytest.mark.slow
def test_spin_with_replay_resumes_bit_identically(tmp_path):
  """The replay slot (SPIN's previous-iteration pairs) is part of the checkpointed state."""
  extra = ["algorithm.name=spin", "algorithm.replay_previous=true", "algorithm.iteration_rounds=2",
           "sampling.n=1"]
  full, part = tmp_path / "full", tmp_path / "part"
  train.train_and_evaluate(_cfg(*extra), full)
  train.train_and_evaluate(_cfg(*extra, "rounds=2"), part)
  train.train_and_evaluate(_cfg(*extra), part)
  cfg = _cfg(*extra)
  states = []
  for workdir in (full, part):
    task, tok = setup.task_and_tokenizer(cfg, workdir)
    mc = setup.model_config(cfg, tok)
    like = setup.initial_state(cfg, mc, setup.build_spec(cfg), setup.build_optimizer(cfg))
    with checkpoint.Checkpointer(str(workdir)) as ckpt:
      states.append(jax.device_get(ckpt.restore(abstract_state=like)[0]))
  a, b = states
  assert int(a.round) == 6 and float(np.asarray(a.replay["weight"]).min()) == 1.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_dpo_on_pairs_without_answers_trains_and_skips_heldout_accuracy(tmp_path):
  path, model_file, _ = _hf_and_pair_jsonl(tmp_path)
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                          for r in rows))
  small = [o for o in OVERRIDES if not o.startswith("warmup.rounds")]
  res = _cli("train", "--config=configs/dpo.py", f"--workdir={tmp_path / 'run'}",
             f"--config.data.task={path}", f"--config.model.tokenizer_path={model_file}",
             "--config.warmup.rounds=0", *[f"--config.{o}" for o in small])
  assert res.returncode == 0, res.stderr[-3000:]
  assert "has no answers" in res.stderr
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 3 and all(l["eval/accuracy"] is None for l in lines)
  assert all(l["train/pair_fraction"] == 1.0 and np.isfinite(l["train/loss"]) for l in lines)
