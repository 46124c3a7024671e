"""Populations (`population.size` = K > 1): K members vmapped in one jitted round. Member k equals a
single run with `seed + k` on the same data order (`data.seed`); resume is bit-identical; the
held-out vote matches a NumPy vote over the members' greedy answers; sharding the member axis
changes no number."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import checkpoint, config_lib, config_validation, evaluate, export, plan
from selfplay_jax import round as rnd
from selfplay_jax import run_config, sampling, setup, sharding, train
from selfplay_jax.errors import ConfigError
from selfplay_jax.scoring import label_free

OVERRIDES = ["warmup.rounds=8", "rounds=2", "eval.every_rounds=10", "eval.num_examples=8",
             "eval.batch_size=8", "data.batch_size=4", "sampling.n=2", "sampling.max_new_tokens=8",
             "data.difficulty=1", "model.hidden_size=32", "model.intermediate_size=64",
             "model.num_layers=1", "progress_bar=false", "mesh.data=1", "eval.judge_samples=0",
             "log_every_round=false", "warmup.learning_rate=0.01", "data.seed=7",
             "data.step_by_step=false"]  # "####<answer>": answers fit the 8 new tokens
PER_MEMBER = ("train/loss", "train/reward_mean", "train/accuracy", "eval/accuracy")


def _cfg(*extra):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), OVERRIDES + list(extra))
  config_validation.validate(cfg)
  return cfg


def _lines(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _restored(cfg, workdir):
  run = setup.build(cfg, workdir)
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, _, _, _ = run.restore(ckpt)
  return run, jax.device_get(state)


@pytest.fixture(scope="module")
def population_run(tmp_path_factory):
  """A K=2 run (seed 3, data.seed 7) for 10 rounds (8 of SFT warm-up: the members then write
  answers, so the vote has something to count): its workdir and config."""
  workdir = tmp_path_factory.mktemp("population")
  cfg = _cfg("population.size=2", "seed=3")
  train.train_and_evaluate(cfg, workdir)
  return workdir, cfg


@pytest.mark.slow
def test_members_equal_single_runs(population_run, tmp_path):
  """Member k's metrics and final params are those of a single run with seed 3 + k and the same
  data.seed; the usual metric names hold the members' mean."""
  workdir, cfg = population_run
  pop = _lines(workdir)
  _, pop_state = _restored(cfg, workdir)
  for k in range(2):
    single_dir = tmp_path / f"single{k}"
    single_cfg = _cfg(f"seed={3 + k}")
    train.train_and_evaluate(single_cfg, single_dir)
    single = _lines(single_dir)
    assert len(single) == len(pop) == 10
    for p, s in zip(pop, single):
      for name in PER_MEMBER:
        got, want = p.get(rnd.member_metric(name, k)), s.get(name)
        if want is None:
          assert got is None, (name, p["round"])
        else:
          np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
    _, single_state = _restored(single_cfg, single_dir)
    # vmapped matmuls and reductions may round differently from the unbatched ones in the last
    # bits, and Adam's g / sqrt(v) enlarges that for rarely seen tokens' tiny gradients (one
    # machine: one weight of 640 off by 4.4e-4 after 10 rounds; the metrics above still agree)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-4, atol=1e-3),
                 pop_state.params, single_state.params)
    np.testing.assert_array_equal(pop_state.step[k], single_state.step)
  for p in pop:
    for name in ("train/loss", "train/accuracy"):
      if p.get(name) is not None:
        np.testing.assert_allclose(p[name], np.mean([p[rnd.member_metric(name, k)]
                                                     for k in range(2)]), rtol=1e-6)
  last = pop[-1]
  assert last["eval/accuracy"] == pytest.approx(
      (last["eval/accuracy@member0"] + last["eval/accuracy@member1"]) / 2)


def _numpy_answer(tokens, marker, eos, width):
  """The answer after the first marker up to the stop token (as `verifiers.answer_span`), or None."""
  tokens = list(tokens)
  if marker not in tokens:
    return None
  rest = tokens[tokens.index(marker) + 1:]
  stops = [i for i, t in enumerate(rest) if t in eos]
  if not stops or stops[0] == 0 or stops[0] > width:
    return None
  return tuple(rest[:stops[0]])


def _numpy_vote(answers):
  """Index of the first member holding the most common valid answer (0 when none is valid)."""
  counts = [0 if a is None else sum(b == a for b in answers) for a in answers]
  return int(np.argmax(counts))


def _parity_verifier(tokens, mask, answer_tokens, answer_mask):
  """A stand-in verifier that accepts about half of all completions, differently per member and
  problem (the tiny members rarely solve a problem, so the task's verifier would accept none)."""
  del answer_mask
  return ((jnp.sum(jnp.where(mask, tokens, 0), axis=1) + answer_tokens[:, 0]) % 2 == 0
          ).astype(jnp.float32)


@pytest.mark.slow
def test_eval_vote_matches_numpy(population_run):
  """`eval/accuracy_vote` and each member's accuracy re-derived from the members' own greedy
  completions, decoded one member at a time, voted in NumPy, checked by the verifier (the task's,
  as the run logged it, and a stand-in that accepts about half)."""
  workdir, cfg = population_run
  run, state = _restored(cfg, workdir)
  tok, mc = run.tokenizer, run.model_config
  marker = setup.answer_marker_id(run.task, tok)
  batches = list(evaluate.pipeline.eval_batches(run.task, "heldout", cfg.eval.num_examples,
                                                tokenizer=tok, batch_size=cfg.eval.batch_size,
                                                **setup.data_lengths(cfg)))
  sc = sampling.SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0,
                               eos_ids=tuple(tok.eos_ids))
  want = {}
  for name, verify in (("task", run.verifier), ("parity", _parity_verifier)):
    solved, vote_solved, total, valid_answers = np.zeros(2), 0.0, 0.0, 0
    for b in batches:
      outs = [sampling.sample(mc, evaluate.member(state.params, k), b["prompt_tokens"],
                              b["prompt_mask"], jax.random.key(0), sc) for k in range(2)]
      right = np.stack([np.asarray(verify(o.tokens, o.mask, b["answer_tokens"],
                                          b["answer_mask"])) >= 1 for o in outs])
      for i in np.flatnonzero(b["valid"]):
        answers = [_numpy_answer(np.asarray(o.tokens[i])[np.asarray(o.mask[i])], marker,
                                 tok.eos_ids, cfg.data.max_answer_len) for o in outs]
        valid_answers += sum(a is not None for a in answers)
        solved += right[:, i]
        vote_solved += right[_numpy_vote(answers), i]
        total += 1
    assert valid_answers > 0  # the warmed-up members write answers, so the vote counts them
    got = evaluate.population_accuracy(mc, state.params, batches, verify, tok.eos_ids,
                                       cfg.sampling.max_new_tokens, marker_id=marker,
                                       width=cfg.data.max_answer_len)
    for k in range(2):
      assert got[f"eval/accuracy@member{k}"] == pytest.approx(solved[k] / total)
    assert got["eval/accuracy"] == pytest.approx(solved.mean() / total)
    assert got["eval/accuracy_vote"] == pytest.approx(vote_solved / total)
    want[name] = vote_solved / total
  assert 0 < want["parity"] < 1
  assert _lines(workdir)[-1]["eval/accuracy_vote"] == pytest.approx(want["task"])
  assert evaluate.heldout_accuracy(run, state.params, batches)["eval/accuracy_vote"] == (
      pytest.approx(want["task"]))


@pytest.mark.slow
def test_population_resume_is_bit_identical(population_run, tmp_path):
  """K=2: 9 rounds, then resume to 10, gives the uninterrupted run's metrics and state exactly
  (the first part's last round is also evaluated: its eval/* keys are left out)."""
  full, cfg = population_run
  part = tmp_path / "part"
  train.train_and_evaluate(_cfg("population.size=2", "seed=3", "rounds=1"), part)
  train.train_and_evaluate(cfg, part)
  drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "eval/"))}
  part_lines, full_lines = _lines(part), _lines(full)
  assert [drop(m) for m in part_lines] == [drop(m) for m in full_lines]
  assert part_lines[-1] == {**full_lines[-1], "time/round_s": part_lines[-1]["time/round_s"]}
  a, b = _restored(cfg, full)[1], _restored(cfg, part)[1]
  a, b = a.replace(rng=jax.random.key_data(a.rng)), b.replace(rng=jax.random.key_data(b.rng))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_member_export_flag(population_run, tmp_path):
  """`export --member` picks a member; one outside the population is a ConfigError."""
  workdir, _ = population_run
  with pytest.raises(ConfigError, match="--member: 2 .*population.size=2"):
    export.export_workdir(workdir, tmp_path / "out", member=2)
  out, _ = export.export_workdir(workdir, tmp_path / "m1", member=1)
  assert (out / "model.safetensors").is_file()


_SHARDED = textwrap.dedent("""
  import json, os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  from pathlib import Path
  from selfplay_jax import config_lib, config_validation, train
  overrides = json.loads(sys.argv[1])
  cfg = config_lib.load_config(str(config_lib.default_config_path()), overrides)
  config_validation.validate(cfg)
  train.train_and_evaluate(cfg, Path(sys.argv[2]))
""")


@pytest.mark.slow
def test_sharded_population_matches_replicated(tmp_path):
  """On 8 fake CPU devices (mesh data=2 x fsdp=2), the members split over `data`
  ("population=data") give the replicated population's metrics."""
  base = [o for o in OVERRIDES if o != "mesh.data=1"] + [
      "population.size=2", "warmup.rounds=2", "rounds=1", "mesh.data=2", "mesh.fsdp=2"]
  lines = {}
  for name, rules in (("replicated", "('activation_batch=fsdp',)"),
                      ("sharded", "('population=data', 'activation_batch=fsdp')")):
    workdir = tmp_path / name
    subprocess.run([sys.executable, "-c", _SHARDED, json.dumps(base + [f"mesh.rules={rules}"]),
                    str(workdir)], check=True, cwd=os.getcwd(), capture_output=True)
    lines[name] = _lines(workdir)
  for a, b in zip(lines["replicated"], lines["sharded"], strict=True):
    for key, value in a.items():
      if isinstance(value, float) and not key.startswith("time/"):
        np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
  assert lines["sharded"][-1]["eval/accuracy_vote"] is not None


# ---- fast pieces -------------------------------------------------------------------------------


def test_population_vote_matches_numpy():
  """`population_vote` / `voted_completions` on hand-built completions, against a NumPy vote."""
  marker, eos, width = 5, (1,), 3
  rows = [  # [K=3][B=4] completions
      [[7, 5, 2, 3, 1, 0], [5, 4, 1, 0, 0, 0], [9, 9, 9, 9, 9, 9], [5, 1, 0, 0, 0, 0]],
      [[5, 4, 1, 0, 0, 0], [5, 4, 1, 0, 0, 0], [5, 2, 1, 0, 0, 0], [5, 6, 6, 6, 6, 1]],
      [[5, 4, 1, 0, 0, 0], [5, 8, 1, 0, 0, 0], [5, 3, 1, 0, 0, 0], [5, 2, 2, 1, 0, 0]],
  ]
  tokens = jnp.asarray(rows, jnp.int32)
  mask = jnp.ones_like(tokens, bool)
  vote = evaluate.population_vote(tokens, mask, marker, eos, width)
  want = []
  for b in range(4):
    answers = [_numpy_answer(rows[k][b], marker, eos, width) for k in range(3)]
    want.append(_numpy_vote(answers))
  np.testing.assert_array_equal(vote["winner"], want)
  assert want == [1, 0, 1, 2]  # [2,3] vs [4] vs [4]; [4] twice; all differ (first valid); one valid
  picked, _ = evaluate.voted_completions(tokens, mask, vote["winner"])
  np.testing.assert_array_equal(picked, np.asarray(rows)[want, np.arange(4)])
  np.testing.assert_allclose(vote["top_share"], [2 / 3, 2 / 3, 1 / 3, 1 / 3])
  assert label_free.majority_vote  # the vote is label_free's, not a copy


def test_population_metrics():
  """Means over members, the largest consecutive-skip count, member 0's samples, and the
  per-member names."""
  per = {"train/loss": jnp.asarray([1.0, 3.0]), "train/judge_agreement": jnp.asarray([jnp.nan, 0.5]),
         "train/consecutive_skipped": jnp.asarray([0, 4]), "samples/tokens": jnp.arange(6).reshape(2, 3)}
  out = rnd.population_metrics(per, 2)
  assert float(out["train/loss"]) == 2.0 and float(out["train/judge_agreement"]) == 0.5
  assert int(out["train/consecutive_skipped"]) == 4
  np.testing.assert_array_equal(out["samples/tokens"], [0, 1, 2])
  assert float(out["train/loss@member1"]) == 3.0 and "train/judge_agreement@member0" not in out


def test_state_shardings_population_axis():
  """The member axis leads every leaf's spec: replicated by default, the `population` rule's mesh
  axes when set; a rule sharing that axis, or one that does not divide K, is a ConfigError."""
  cfg = _cfg("population.size=2")
  mc = setup.config_lib.model_config(cfg.model).replace(vocab_size=32)
  spec, opt = setup.build_spec(cfg), setup.build_optimizer(cfg)
  state = setup.abstract_state(cfg, mc, spec, opt)
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(state)) and state.rng.shape == (2,)
  mesh = jax.sharding.AbstractMesh((1, 1, 1), sharding.AXES)
  rules = sharding.logical_rules({"rules": ("population=data", "activation_batch=fsdp")})
  sh = sharding.state_shardings(state, mesh, rules, mc, population=2)
  assert all(s.spec[0] == "data" for s in jax.tree.leaves(sh))
  sh = sharding.state_shardings(state, mesh, sharding.logical_rules({}), mc, population=2)
  assert all(s.spec[:1] in ((), (None,)) for s in jax.tree.leaves(sh))
  with pytest.raises(ConfigError, match="population=data and activation_batch"):
    sharding.state_shardings(state, mesh, sharding.logical_rules({"rules": ("population=data",)}),
                             mc, population=2)
  mesh2 = jax.sharding.AbstractMesh((2, 1, 1), sharding.AXES)
  with pytest.raises(ConfigError, match="does not divide population.size=3"):
    sharding.check_population(mesh2, rules, 3)


def test_plan_counts_every_member():
  """`plan`: the state (params, optimizer) and the KV cache of K members is K times one
  member's; split over 2 devices by the `population` rule, each holds half the KV cache."""
  one = plan.plan(_cfg(), num_devices=1)
  three = plan.plan(_cfg("population.size=3"), num_devices=1)
  for part in ("params", "opt_state", "kv_cache"):
    assert three["global_bytes"][part] == 3 * one["global_bytes"][part]
    assert three["per_device_bytes"][part] == 3 * one["per_device_bytes"][part]
  two = plan.plan(_cfg("population.size=2", "mesh.data=2",
                       "mesh.rules=('population=data', 'activation_batch=fsdp')"), num_devices=2)
  assert two["per_device_bytes"]["params"] == one["per_device_bytes"]["params"]


@pytest.mark.parametrize("extra,key", [
    (["model.lora.rank=2"], "model.lora.rank"),
    (["algorithm.reward_fns=math"], "algorithm.reward_fns"),
    (["algorithm.name=ppo"], "algorithm.name=ppo"),
])
def test_unsupported_combinations(extra, key):
  with pytest.raises(ConfigError, match=f"population.size: 2 members with {key}"):
    _cfg("population.size=2", *extra)


def test_single_model_state_is_unstacked():
  """population.size=1 (the default) keeps today's state: no member axis."""
  cfg = _cfg()
  mc = setup.config_lib.model_config(cfg.model).replace(vocab_size=32)
  state = setup.abstract_state(cfg, mc, setup.build_spec(cfg), setup.build_optimizer(cfg))
  assert state.round.shape == () and state.rng.shape == ()


def test_population_size_is_run_identity():
  """A workdir cannot be resumed with another population size (its checkpoints hold K members);
  a changed data.seed is only logged."""
  saved = json.loads(config_lib.to_json(_cfg("population.size=2")))
  identity, other = run_config.resume_differences(saved, _cfg("population.size=3", "data.seed=1"))
  assert identity == ["population.size: 2 -> 3"] and other == ["data.seed: 7 -> 1"]
