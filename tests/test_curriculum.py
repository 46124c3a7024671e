"""Easy-to-hard self-labelling (selfplay_jax/curriculum.py): the addition task's format and length
filter, the vote and the replay buffer against NumPy, gold labels never longer than
gold_max_digits, answers never reaching training, and bit-identical resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, curriculum
from selfplay_jax.data import tasks
from selfplay_jax.errors import ConfigError
from selfplay_jax.scoring import verifiers

OVERRIDES = ["curriculum.gold_max_digits=2", "curriculum.max_digits=4", "population.size=2",
             "warmup.rounds=2", "warmup.num_minibatches=2", "rounds=3", "data.batch_size=8",
             "algorithm.num_minibatches=2", "curriculum.replay_size=16", "eval.every_rounds=2",
             "eval.num_examples=8", "eval.batch_size=8", "model.hidden_size=32",
             "model.intermediate_size=64", "model.num_layers=1", "progress_bar=false",
             "sampling.max_new_tokens=13", "population.vote_threshold=0.5",
             "curriculum.advance_threshold=0.01", "metrics.plot_every_rounds=0",
             "curriculum.split_labels=true"]


def _cfg(*extra):
  path = config_lib.default_config_path().parent / "easy_to_hard.py"
  cfg = config_lib.load_config(str(path), OVERRIDES + list(extra))
  config_validation.validate(cfg)
  return cfg


def test_addition_format_and_split():
  task = tasks.get_task("addition", num_digits=3, width=6)
  for ex in task.examples("train", num=50) + task.examples("heldout", num=20):
    a, b = (int(x[::-1]) for x in ex["prompt"][:-1].split("+"))
    assert 100 <= a <= 999 and 100 <= b <= 999
    assert len(ex["prompt"]) == 14 and ex["answer"] == f"{a + b:07d}"[::-1]
    assert ex["response"] == "####" + ex["answer"]
  assert tasks.get_task("addition", num_digits=1).example("train", 0)["prompt"][1] == "+"
  keys = lambda split: {e["prompt"] for e in task.examples(split, num=300)}
  assert not keys("train") & keys("heldout")
  with pytest.raises(ValueError, match="width"):
    tasks.get_task("addition", num_digits=4, width=3)


def test_carries_scratchpad_matches_column_addition():
  """data.step_by_step: the carry out of every position, least significant first, then the same
  answer; checked against schoolbook column addition on random problems of every length."""
  for n in range(1, 7):
    task = tasks.get_task("addition", num_digits=n, width=7, carries=True)
    for ex in task.examples("train", num=40):
      a, b = (int(x[::-1]) for x in ex["prompt"][:-1].split("+"))
      carry, want = 0, ""
      for i in range(7):
        carry = (a // 10**i % 10 + b // 10**i % 10 + carry) // 10
        want += str(carry)
      assert ex["response"] == want + "####" + ex["answer"]
      assert ex["answer"] == f"{a + b:08d}"[::-1]
      assert len(ex["response"]) - 3 + 1 == task.response_len  # "####" is one token
  assert tasks.get_task("addition", num_digits=2, width=3).response_len == 1 + 4 + 1


def test_length_filter_matches_numpy():
  task = tasks.AdditionTask(num_digits=2, width=5)  # answers have 6 digits
  zero = 10
  rows = {"ok": [1, 2, 3, 10, 10, 10], "carry": [1, 2, 1, 10, 10, 10], "long": [1, 2, 3, 4, 10, 10],
          "short": [1, 2, 3, 10, 10], "too_long": [1, 2, 3, 10, 10, 10, 10], "none": []}
  answers = np.full((len(rows), 8), verifiers.PAD_ANSWER, np.int32)
  for i, r in enumerate(rows.values()):
    answers[i, :len(r)] = r
  got = np.asarray(task.plausible(jnp.asarray(answers), zero))
  want = [len(r) == 6 and all(t == zero for t in r[3:]) for r in rows.values()]
  assert got.tolist() == want == [True, True, False, False, False, False]
  assert np.asarray(task.plausible(jnp.asarray(answers), zero, num_digits=3)).tolist()[2]


def test_extract_answers_rows():
  marker, eos = 7, 1
  tokens = np.array([[3, 7, 4, 5, 1, 0], [7, 4, 1, 0, 0, 0], [3, 4, 5, 1, 0, 0], [7, 4, 5, 6, 6, 6]])
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6], bool)
  answers, valid = verifiers.extract_answers(tokens, mask, marker, [eos], 3)
  assert np.asarray(valid).tolist() == [True, True, False, False]  # no marker; no EOS
  assert np.asarray(answers).tolist() == [[4, 5, -1], [4, -1, -1], [-1] * 3, [-1] * 3]


def test_replay_ring_buffer_matches_numpy():
  cap, rng = 5, np.random.default_rng(0)
  replay = {"x": jnp.zeros((cap, 2), jnp.int32), "valid": jnp.zeros((cap,), bool)}
  ref_x, ref_valid, nxt, ref_next = np.zeros((cap, 2), np.int32), np.zeros(cap, bool), jnp.int32(0), 0
  for step in range(6):
    rows = {"x": jnp.asarray(rng.integers(1, 99, (4, 2)), jnp.int32)}
    accept = rng.random(4) < 0.6
    replay, nxt = curriculum._write_replay(replay, nxt, rows, jnp.asarray(accept))
    for i in np.nonzero(accept)[0]:  # accepted rows in order, after the newest, wrapping
      ref_x[ref_next % cap] = np.asarray(rows["x"][i])
      ref_valid[ref_next % cap] = True
      ref_next += 1
    assert int(nxt) == ref_next
    np.testing.assert_array_equal(np.asarray(replay["x"]), ref_x)
    np.testing.assert_array_equal(np.asarray(replay["valid"]), ref_valid)


def test_split_labels_draw_only_the_members_share_of_the_buffer():
  """curriculum.split_labels: member k of K replays only slots s with s % K == k (and valid ones);
  without it, every valid slot is drawn."""
  cap, k_of = 12, 3
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0], bool)
  replay = {"prompt_tokens": jnp.arange(cap)[:, None], "prompt_mask": jnp.ones((cap, 1), bool),
            "tokens": jnp.arange(cap)[:, None], "mask": jnp.ones((cap, 1), bool),
            "valid": jnp.asarray(valid)}
  for member in range(k_of):
    rows = curriculum._replay_sample(replay, jax.random.key(member), 400, (member, k_of))
    drawn = set(np.asarray(rows["tokens"][:, 0]).tolist())
    assert drawn == {s for s in range(cap) if valid[s] and s % k_of == member}
    assert np.asarray(rows["mask"]).all()
  rows = curriculum._replay_sample(replay, jax.random.key(9), 400)
  assert set(np.asarray(rows["tokens"][:, 0]).tolist()) == set(np.flatnonzero(valid).tolist())


def test_vote_picks_the_majority_completion():
  st = curriculum._Static(model_config=None, sampling_config=curriculum.sampling.SamplingConfig(
      max_new_tokens=4, n=2, eos_ids=(1,)), marker_id=9, zero_id=0, answer_width=3, max_digits=4,
      vote_threshold=0.5, advance_threshold=0.5, length_filter=True, split_labels=False, rows=2,
      gold_rows=1,
      steps=1, warm_steps=1, population=2, width=4)
  # 2 members x (2 prompts x 2 samples): prompt 0's voters say 5,6 | 6,6 -> 6 (member 0's 2nd
  # sample first); prompt 1's say 7,8 | 8,7 -> a tie, the first voter (7) wins
  ans = {0: [[5, 6], [7, 8]], 1: [[6, 6], [8, 7]]}
  tokens = np.array([[[9, ans[m][u][s], 1, 0] for u in range(2) for s in range(2)]
                     for m in range(2)])
  mask = tokens != 0
  label, label_mask, share, answer = curriculum._vote(st, jnp.asarray(tokens), jnp.asarray(mask), 2)
  assert np.asarray(label).tolist() == [[9, 6, 1, 0], [9, 7, 1, 0]]
  assert np.asarray(share).tolist() == [0.75, 0.5]
  assert np.asarray(answer)[:, 0].tolist() == [6, 7]


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="data.task"):
    _cfg("data.task=arithmetic")
  with pytest.raises(ConfigError, match="curriculum.gold_max_digits"):
    _cfg("curriculum.gold_max_digits=4")
  with pytest.raises(ConfigError, match="algorithm.name"):
    _cfg("algorithm.name=grpo")
  with pytest.raises(ConfigError, match="sampling.max_new_tokens"):
    _cfg("sampling.max_new_tokens=5")
  with pytest.raises(ConfigError, match=r"sampling.max_new_tokens: 12 .*needs 13: 5 carries"):
    _cfg("sampling.max_new_tokens=12", "data.step_by_step=true")  # the carries need room too
  _cfg("sampling.max_new_tokens=8", "data.step_by_step=false")


def test_gold_rows_never_longer_than_gold_max_digits(tmp_path):
  cfg = _cfg()
  tok = tasks.build_tokenizer(curriculum._task(cfg, 1), tmp_path / "tok")
  for r in range(6):
    b = curriculum.gold_batch(cfg, tok, r, 32)
    for row, m in zip(b["prompt_tokens"], b["prompt_mask"]):
      a, c = tok.decode(row[m]).split("=")[0].split("+")
      assert len(a.rstrip("0") or "0") <= 2 and len(c.rstrip("0") or "0") <= 2


@pytest.mark.slow
def test_answers_never_reach_training(tmp_path):
  """The labelling round with the unlabelled problems' answers scrambled trains exactly the same
  parameters: only the monitoring metrics read them."""
  cfg = _cfg()
  loop, state = curriculum._build(cfg, tmp_path)
  b = curriculum.label_batch(cfg, loop.tok, 5, 3)
  gold = curriculum._gold(loop, 5, False)
  keys = ("prompt_tokens", "prompt_mask", "answer_tokens", "answer_mask")
  real = {k: b[k] for k in keys}
  scrambled = dict(real, answer_tokens=np.roll(b["answer_tokens"], 1, axis=0))
  fn = jax.jit(lambda s, g, u: curriculum.label_and_train(loop.static, *loop.main_args, s, g, u))
  out_a, m_a = fn(state, gold, real)
  out_b, m_b = fn(state, gold, scrambled)
  plain = lambda tree: jax.device_get(jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree))
  jax.tree.map(np.testing.assert_array_equal, plain(out_a), plain(out_b))
  assert float(m_a["curriculum/label_accuracy"]) != float(m_b["curriculum/label_accuracy"]) or \
      float(m_a["curriculum/label_accuracy"]) == 0.0


def _lines(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_curriculum_runs_and_resumes_bit_identically(tmp_path):
  from selfplay_jax import train
  straight = tmp_path / "straight"
  history = train.train_and_evaluate(_cfg(), straight)
  lines = _lines(straight)
  assert [l["round"] for l in lines] == [1, 2, 3, 4, 5]
  assert [l["phase"] for l in lines] == ["warmup"] * 2 + ["self_label"] * 3
  evals = [l for l in lines if "eval/accuracy@1" in l]
  assert [l["round"] for l in evals] == [2, 4, 5]
  assert all({f"eval/accuracy@{d}" for d in range(1, 5)} <= set(l) for l in evals)
  assert history["eval/accuracy"] == evals[-1]["eval/accuracy@4"]
  assert lines[2]["curriculum/digits"] == 3  # labels start one digit past the gold lengths
  assert (straight / curriculum.LENGTH_PLOT).is_file()

  # `eval` and `export --member` read the curriculum's checkpoints
  from selfplay_jax import evaluate, export
  again = evaluate.evaluate_workdir(straight)
  assert again["round"] == 5 and all(again[k] == evals[-1][k] for k in evals[-1]
                                     if k.startswith("eval/accuracy"))
  out, step = export.export_workdir(straight, tmp_path / "member1", member=1)
  assert step == 5 and (out / "config.json").is_file()

  resumed = tmp_path / "resumed"
  train.train_and_evaluate(_cfg("rounds=1"), resumed)  # stops after round 3
  train.train_and_evaluate(_cfg(), resumed)
  got = _lines(resumed)  # round 3 ended the first run, so it also carries an evaluation
  assert len(got) == len(lines)
  for g, want in zip(got, lines):
    assert {k: g[k] for k in want if not k.startswith("time/")} == \
        {k: v for k, v in want.items() if not k.startswith("time/")}
  states = []
  for workdir in (straight, resumed):
    loop, like = curriculum._build(_cfg(), workdir, resume=False)
    with loop.ckpt:
      states.append(jax.device_get(jax.tree.map(
          lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
          curriculum.restore(loop, like))))
  jax.tree.map(np.testing.assert_array_equal, *states)
