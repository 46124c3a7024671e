"""Python reward functions (TRL's convention) through the round's host callback, and the built-in
math reward: the strings and fields a function gets (against the source rows and an independent
decode), the weighted sum (NumPy), named errors, unscorable rows left out of the GRPO baseline,
per-device callbacks on a mesh, config checks, and one jitted round."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfplay_jax import config_lib, config_validation, setup
from selfplay_jax.algorithms import losses
from selfplay_jax.data import pipeline, tasks
from selfplay_jax.errors import ConfigError, RewardFunctionError
from selfplay_jax.sampling import Rollout
from selfplay_jax.scoring import math_reward, python_rewards
from tests.test_train import OVERRIDES

USER_FILE = '''
CALLS = []


def record(prompts, completions, **fields):
  """Records its inputs; reward = completion length mod 3."""
  CALLS.append(dict(prompts=list(prompts), completions=list(completions),
                    fields={k: list(v) for k, v in fields.items()}))
  return [float(len(c) % 3) for c in completions]


def half(prompts, completions, answer, **fields):
  """None (unscorable) for completions of even length, else half the length."""
  return [None if len(c) % 2 == 0 else 0.5 * len(c) for c in completions]


def boom(prompts, completions, **fields):
  for p in prompts:
    if p == BAD_PROMPT:
      raise ValueError("cannot score this one")
  return [0.0] * len(completions)


def short(prompts, completions, **fields):
  return [0.0] * (len(completions) - 1)


def text(prompts, completions, **fields):
  return ["1.0"] * len(completions)


BAD_PROMPT = None
'''


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("user") / "rewards.py"
  path.write_text(textwrap.dedent(USER_FILE))
  return path


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path_factory.mktemp("tok") / "tokenizer")
  return task, tok


def _cfg(*extra):
  cfg = config_lib.load_config(str(config_lib.default_config_path()),
                               OVERRIDES + ["warmup.rounds=0", "rounds=1"] + list(extra))
  config_validation.validate(cfg)
  return cfg


def _fns(user_file, *names, weights=None):
  cfg = _cfg(f"algorithm.reward_fns={','.join(f'{user_file}:{n}' for n in names)}",
             *([f"algorithm.reward_weights={weights}"] if weights else []))
  return python_rewards.load_reward_fns(cfg)


def _inputs(task, tok, rows, completions, n):
  """Callback inputs for source rows `rows` (each repeated n times) and completion texts (one per
  rollout row), encoded as the pipeline and the sampler lay them out (EOS, then padding)."""
  source = task.source("train", 0)
  batch = tasks.encode_examples([source[i] for i in rows], tok, 8, 8, 4)
  ids = [tok.encode(c) + [tok.eos_id] for c in completions]
  width = max(map(len, ids)) + 2
  tokens = np.full((len(ids), width), tok.pad_id, np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
  rep = lambda x: np.repeat(x, n, axis=0)
  return (rep(np.asarray(rows, np.int32)), rep(batch["prompt_tokens"]), rep(batch["prompt_mask"]),
          tokens, np.asarray([len(x) for x in ids], np.int32))


# ---- the host side --------------------------------------------------------------------------------


def test_called_with_decoded_strings_and_fields_and_weighted_sum(user_file, arith):
  task, tok = arith
  source = task.source("train", 0)
  fns = _fns(user_file, "record", "half", weights="1,-2")
  host = python_rewards.HostRewards(fns, tok, source)
  completions = ["1+2=3####3", "####7", "12", "3+4=7####77"]
  total, per_fn, failed, seconds = host.score(*_inputs(task, tok, [5, 2], completions, n=2))
  calls = fns[0].fn.__globals__["CALLS"]
  call = calls[-1]
  # One entry per completion; each prompt repeated for its n samples; no EOS / padding.
  assert call["prompts"] == [source[5]["prompt"]] * 2 + [source[2]["prompt"]] * 2
  assert call["completions"] == completions
  assert set(call["fields"]) == {"response", "answer"}  # the rows' other fields
  assert call["fields"]["answer"] == [source[5]["answer"]] * 2 + [source[2]["answer"]] * 2
  assert call["fields"]["response"] == [source[5]["response"]] * 2 + [source[2]["response"]] * 2
  # The weighted sum over the functions that scored each completion (NumPy).
  a = np.array([len(c) % 3 for c in completions], float)
  b = np.array([np.nan if len(c) % 2 == 0 else 0.5 * len(c) for c in completions])
  want = np.where(np.isnan(b), a, a - 2 * b)
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_allclose(per_fn, np.stack([a, b], 1), rtol=1e-6)
  assert failed.tolist() == [0] and seconds[0] >= 0 and host.error is None


def test_jsonl_rows_give_their_own_fields(user_file, arith, tmp_path):
  """GSM8K- and MATH-style rows: the functions get each row's JSON keys as in the file (TRL's
  columns), plus `answer` when data.answer_field maps it from another key; the math reward reads
  the gold from it."""
  import json
  task, tok = arith
  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text("".join(json.dumps(r) + "\n" for r in [
      {"question": "1+2=", "answer": "1+2=3 #### 3", "level": 1},
      {"question": "4+4=", "answer": "4+4=8 #### 8", "level": 2}]))
  lens = dict(max_prompt_len=8, max_response_len=8, max_answer_len=8)
  rows, _ = pipeline.load_jsonl(gsm, tokenizer=tok, field_names={"prompt": "question"}, **lens)
  [record, maths] = _fns(user_file, "record") + python_rewards.load_reward_fns(
      _cfg("algorithm.reward=math"))
  host = python_rewards.HostRewards([record, maths], tok, rows)
  args = _inputs(task, tok, [0, 1], ["#### 3", "#### 4", "3", "#### 8"], n=2)
  prompts, completions, fields = host.inputs(*args)
  assert fields == {"question": ["1+2="] * 2 + ["4+4="] * 2,
                    "answer": ["1+2=3 #### 3"] * 2 + ["4+4=8 #### 8"] * 2, "level": [1, 1, 2, 2]}
  _, per_fn, failed, _ = host.score(*args)
  assert failed.tolist() == [0] and per_fn[:, 1].tolist() == [1.0, 0.0, 0.0, 1.0]

  maths_file = tmp_path / "math.jsonl"
  maths_file.write_text(json.dumps({"problem": "1+2=", "solution": "so \\boxed{3}"}) + "\n")
  rows, _ = pipeline.load_jsonl(maths_file, tokenizer=tok,
                                field_names={"prompt": "problem", "answer": "solution"},
                                **dict(lens, max_answer_len=32))
  host = python_rewards.HostRewards([maths], tok, rows)
  args = _inputs(task, tok, [0], ["####3", "####2"], n=2)
  assert set(host.inputs(*args)[2]) == {"problem", "solution", "answer"}
  assert host.score(*args)[1][:, 0].tolist() == [1.0, 0.0]


def test_a_completion_no_function_scores_is_nan_and_left_out_of_the_grpo_baseline(user_file, arith):
  task, tok = arith
  host = python_rewards.HostRewards(_fns(user_file, "half"), tok, task.source("train", 0))
  completions = ["12", "123", "1234", "12345", "1", "22"]  # None for even lengths
  rewards, _, _, _ = host.score(*_inputs(task, tok, [0, 1], completions, n=3))
  assert np.isnan(rewards).tolist() == [True, False, True, False, False, True]
  adv = np.asarray(losses.grpo_advantages(jnp.asarray(rewards), 3, scale="group"))
  want = np.zeros(6)
  for g in range(2):  # NumPy: mean / sample std over the scorable rewards of each group only
    r = rewards[3 * g:3 * g + 3].astype(np.float64)
    ok = ~np.isnan(r)
    if ok.sum() > 1:
      want[3 * g:3 * g + 3][ok] = (r[ok] - r[ok].mean()) / (r[ok].std(ddof=1) + 1e-4)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  assert (adv[np.isnan(rewards)] == 0).all()


def test_errors_name_the_function_and_the_row(user_file, arith):
  task, tok = arith
  source = task.source("train", 0)
  [boom] = _fns(user_file, "boom")
  boom.fn.__globals__["BAD_PROMPT"] = source[7]["prompt"]
  host = python_rewards.HostRewards([boom], tok, source)
  rewards, _, failed, _ = host.score(*_inputs(task, tok, [3, 7], ["1", "2", "3", "4"], n=2))
  assert np.isnan(rewards).all() and failed.tolist() == [1]
  assert f"{user_file}:boom raised ValueError: cannot score this one" in host.error
  assert "training row 7" in host.error and repr(source[7]["prompt"]) in host.error
  assert f"{user_file.name}:" in host.error  # the line that raised
  first = host.error  # the first failure is the one kept
  host.score(*_inputs(task, tok, [7, 3], ["1", "2", "3", "4"], n=2))
  assert host.error == first
  for name, what in (("short", "returned 3 values for 4 completions"),
                     ("text", "returned a str ('1.0') for completion 0 of training row 3")):
    host = python_rewards.HostRewards(_fns(user_file, name), tok, source)
    _, _, failed, _ = host.score(*_inputs(task, tok, [3, 7], ["1", "2", "3", "4"], n=2))
    assert failed.tolist() == [1] and f"{user_file}:{name} {what}" in host.error
  # The training loop's check: the flag in the round's metrics raises the recorded message.
  scorer = python_rewards.python_scorer(host)
  metrics = {python_rewards.ERROR_METRIC: np.int32(1), "train/loss": 0.0}
  with pytest.raises(RewardFunctionError, match=f"{name} returned a str"):
    python_rewards.raise_if_failed(scorer, metrics)
  ok = {python_rewards.ERROR_METRIC: np.int32(0)}
  python_rewards.raise_if_failed(scorer, ok)
  assert ok == {}


# ---- the math reward ------------------------------------------------------------------------------


@pytest.mark.parametrize("gold, completion, want", [
    ("0.5", "so the answer is 1/2", 1.0),
    ("1/2", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "It is 0.5.", 1.0),
    ("3", "$3.0$", 1.0),
    ("x^2+2x", "$x(x+2)$", 1.0),
    ("x^2+2x", "$x(x+3)$", 0.0),
    ("72", "\\boxed{73}", 0.0),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "48 + 24 = 72\n#### 72", 1.0),  # GSM8K
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "48 + 24 = 72\n#### 73", 0.0),
    ("We get $\\frac{a}{b}$, so the answer is $\\boxed{\\frac{3}{4}}$.", "0.75", 1.0),  # MATH
    ("The sum is $\\boxed{10}$.", "\\boxed{9}", 0.0),
    ("1,000", "#### 1000", 1.0),
    ("72", "no idea", 0.0),  # unparsable completion: wrong
    ("72", "", 0.0),
    ("no answer here", "72", None),  # unparsable gold: unscorable
])
def test_math_reward(gold, completion, want):
  assert math_reward.math_reward([""], [completion], answer=[gold]) == [want]


def test_math_reward_in_a_host_thread():
  """math-verify's default timeouts use SIGALRM, which only the main thread may set; host callbacks
  run on other threads."""
  import threading
  out = []
  t = threading.Thread(target=lambda: out.append(
      math_reward.math_reward(["q"], ["\\boxed{2/4}"], answer=["0.5"])))
  t.start()
  t.join()
  assert out == [[1.0]]


# ---- config ---------------------------------------------------------------------------------------


def test_config_checks(user_file):
  f = f"{user_file}:record"
  assert setup.reward_kind(_cfg(f"algorithm.reward_fn={f}")) == "python"
  assert setup.reward_kind(_cfg("algorithm.reward=math")) == "math"
  assert python_rewards.reward_fn_specs(_cfg(f"algorithm.reward_fns=math,{f}",
                                             "algorithm.reward_weights=1,0.5")) == (
      ["math", f], [1.0, 0.5])
  bad = [((f"algorithm.reward_fn={f}", f"algorithm.reward_fns={f}"),
          "algorithm.reward_fn: set either"),
         ((f"algorithm.reward_fns=math,{f}", "algorithm.reward_weights=1"),
          "algorithm.reward_weights: 1 weight.* for the 2 function.*algorithm.reward_fns"),
         ((f"algorithm.reward_fn={f}", "algorithm.reward_weights=a"),
          "algorithm.reward_weights: expected comma-separated numbers"),
         (("algorithm.reward_weights=1",), "algorithm.reward_weights: .* none is set"),
         ((f"algorithm.reward_fn={f}", "algorithm.reward=judge"), "algorithm.reward: 'judge' and"),
         (("algorithm.reward=python",), "algorithm.reward: 'python' needs"),
         ((f"algorithm.reward_fn={user_file}:nope",), "algorithm.reward_fn: .* has no 'nope'"),
         (("algorithm.reward_fns=math,,math",), "algorithm.reward_fns: an empty entry"),
         ((f"algorithm.reward_fn={f}", "algorithm.scorer=selfplay_jax.scoring:judge_scorer"),
          "algorithm.scorer: set either"),
         (("algorithm.name=sft", f"algorithm.reward_fn={f}"), "algorithm.reward: sft does not"),
         (("algorithm.name=spin", "algorithm.reward_fns=math", "sampling.n=1"),
          "algorithm.reward_fns: spin pairs its samples with the gold responses and reads no")]
  for overrides, message in bad:
    with pytest.raises(ConfigError, match=message):
      _cfg(*overrides)


# ---- on a mesh: each device scores its own rows ---------------------------------------------------


def test_on_a_mesh_each_device_scores_only_its_rows(user_file, arith):
  task, tok = arith
  [fn] = _fns(user_file, "record")
  host = python_rewards.HostRewards([fn], tok, task.source("train", 0))
  scorer = python_rewards.python_scorer(host)
  completions = [f"{i}+{i}" * (i % 3 + 1) for i in range(16)]
  idx, pt, pm, tokens, lengths = _inputs(task, tok, list(range(8)), completions, n=2)
  batch = {"row_index": np.arange(8, dtype=np.int32)}
  rollout = Rollout(prompt_tokens=pt, prompt_mask=pm, tokens=tokens, logprobs=None,
                    model_logprobs=None, mask=tokens != tok.pad_id, lengths=lengths)
  calls = fn.fn.__globals__["CALLS"]
  del calls[:]
  single, single_metrics = jax.block_until_ready(jax.jit(scorer)(None, None, batch, rollout, None))
  assert [c["completions"] for c in calls] == [completions]
  del calls[:]
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  put = lambda x: jax.device_put(x, rows)
  with jax.set_mesh(mesh):
    sharded, metrics = jax.block_until_ready(jax.jit(scorer)(
        None, None, jax.tree.map(put, batch), jax.tree.map(put, rollout), None))
  assert len(calls) == 8 and all(len(c["completions"]) == 2 for c in calls)  # once per device
  assert sorted(x for c in calls for x in c["completions"]) == sorted(completions)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
  assert float(metrics["reward/record"]) == pytest.approx(float(single_metrics["reward/record"]))
  assert int(metrics[python_rewards.ERROR_METRIC]) == 0


# ---- one jitted round ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def round_run(user_file, tmp_path_factory):
  """A tiny GRPO round scored by record + 2 * half, with every rollout row dumped."""
  cfg = _cfg(f"algorithm.reward_fns={user_file}:record,{user_file}:half",
             "algorithm.reward_weights=1,2")
  run = setup.build(cfg, tmp_path_factory.mktemp("round"))
  rows = cfg.data.batch_size * cfg.sampling.n
  round_fn = run.round_fn(num_samples=rows)
  it = pipeline.make_iterator(run.train_source(), tokenizer=run.tokenizer,
                              batch_size=cfg.data.batch_size, seed=cfg.seed,
                              **setup.data_lengths(cfg))
  batch = next(it)
  calls = run.scorer.host.fns[0].fn.__globals__["CALLS"]
  del calls[:]
  state, metrics = round_fn(run.initial_state(), batch)
  return run, batch, jax.device_get(metrics), list(calls)


@pytest.mark.slow
def test_a_jitted_round_scores_with_python_functions(round_run):
  run, batch, metrics, calls = round_run
  tok, n, source = run.tokenizer, run.cfg.sampling.n, run.train_source()
  assert len(calls) == 1
  call = calls[0]
  # The strings: an independent decode of the dumped rollout, and the source rows' prompts.
  want_completions = []
  for t, length in zip(metrics["samples/tokens"], metrics["samples/lengths"]):
    ids = [int(x) for x in t[:length]]
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    want_completions.append(tok.decode(ids))
  assert call["completions"] == want_completions
  rows = np.repeat(batch["row_index"], n)
  assert call["prompts"] == [source[int(i)]["prompt"] for i in rows]
  assert call["fields"]["answer"] == [source[int(i)]["answer"] for i in rows]
  # The rewards: record + 2 * half (NumPy), None rows scored by record alone.
  a = np.array([len(c) % 3 for c in want_completions], float)
  b = np.array([np.nan if len(c) % 2 == 0 else 0.5 * len(c) for c in want_completions])
  np.testing.assert_allclose(metrics["samples/rewards"], np.where(np.isnan(b), a, a + 2 * b),
                             rtol=1e-6)
  assert metrics["reward/record"] == pytest.approx(a.mean())
  assert metrics["reward/half"] == pytest.approx(np.nanmean(b) if (~np.isnan(b)).any() else np.nan,
                                                 nan_ok=True)
  assert metrics[python_rewards.ERROR_METRIC] == 0 and metrics[python_rewards.TIME_METRIC] >= 0
  assert "train/accuracy" in metrics  # the task verifier still measures accuracy


# ---- the training loop ----------------------------------------------------------------------------


@pytest.mark.slow
def test_an_exception_in_round_two_stops_the_run_keeping_round_one(tmp_path):
  path = tmp_path / "flaky.py"
  path.write_text(textwrap.dedent('''
      CALLS = [0]

      def flaky(prompts, completions, **fields):
        CALLS[0] += 1
        if CALLS[0] == 2:
          raise KeyError("no such field")
        return [1.0] * len(completions)
      '''))
  from selfplay_jax import checkpoint, train  # pylint: disable=import-outside-toplevel
  cfg = _cfg(f"algorithm.reward_fn={path}:flaky", "rounds=2", "metrics.plot_every_rounds=0")
  workdir = tmp_path / "run"
  with pytest.raises(RewardFunctionError) as e:
    train.train_and_evaluate(cfg, workdir)
  message = str(e.value)
  assert message.startswith(f"reward function {path}:flaky raised KeyError: 'no such field' at "
                            f"{path}:")
  # Every row scores on its own when retried (the failure is the call's, not a row's): the
  # round's rows are named.
  assert ", on one of training rows [" in message
  assert checkpoint.complete_steps(workdir) == [1]  # round 1 saved; round 2 never
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1


def test_math_verifier_judges_held_out_answers_as_the_math_reward_does(tmp_path):
  """Under the math reward the held-out verifier is math-verify's (setup.build_verifier): jitted,
  on token arrays, equal to `math_reward` on the decoded texts (1 / 0; an unreadable gold counts
  as wrong), and the same on an 8-device mesh, each device on its own rows."""
  from selfplay_jax import tokenizers  # pylint: disable=import-outside-toplevel
  corpus = ["0123456789 +-*/^()=.#\\{}abcdefghijklmnopqrstuvwxyz$"]
  tok = tokenizers.train_sentencepiece(corpus, 200, tmp_path / "char", model_type="char")
  cases = [("72", "so #### 72"), ("0.5", "\\boxed{1/2}"), ("\\frac{3}{4}", "it is 0.75"),
           ("72", "#### 73"), ("x^2+2x", "\\boxed{x(x+2)}"), ("", "#### 1"), ("7", "junk"), ("9", "#### 9")]
  n, a = 24, 12
  toks, mask = np.zeros((8, n), np.int32), np.zeros((8, n), bool)
  ans, amask = np.zeros((8, a), np.int32), np.zeros((8, a), bool)
  for i, (gold, completion) in enumerate(cases):
    c = tok.encode(completion, add_eos=True) + [7, 8]  # tokens after the stop token are ignored
    toks[i, :len(c)], mask[i, :len(c)] = c, True
    g = tok.encode(gold)
    ans[i, :len(g)], amask[i, :len(g)] = g, True
  want = [1.0 if r == 1.0 else 0.0 for r in math_reward.math_reward(
      [""] * 8, [c for _, c in cases], answer=[g for g, _ in cases])]
  assert want == [1, 1, 1, 0, 1, 0, 0, 1]
  verify = jax.jit(math_reward.make_verifier(tok))
  np.testing.assert_array_equal(np.asarray(verify(toks, mask, ans, amask)), want)
  if jax.device_count() >= 8:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with jax.set_mesh(mesh):
      got = verify(put(toks), put(mask), put(ans), put(amask))
    np.testing.assert_array_equal(np.asarray(got), want)
