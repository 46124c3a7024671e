"""A judge that checks instead of solving (`judge.trace=verify`): the countdown verification trace
against hand-written traces and against the verifier (re-derived on the host from the trace
text), the judge-training rows it makes, and a jitted warm-up round and self-rewarding round."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, sampling, setup
from selfplay_jax.data import countdown as C
from selfplay_jax.data import tasks as T
from selfplay_jax.errors import ConfigError
from selfplay_jax.scoring import judge as judge_lib
from tests.test_countdown import (WIDTHS, _attempt, _batch, _problem, _swap_some,
                                  _token_mutation)

OK, NO = C.CHECK_OK, C.CHECK_FAIL


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return T.build_tokenizer(C.CountdownTask(num_numbers=4), tmp_path_factory.mktemp("tok"),
                           extra_symbols=judge_lib.JUDGE_SYMBOLS + judge_lib.VERIFY_SYMBOLS)


def _text(tok, tokens, mask=None) -> str:
  """The masked tokens piece by piece (the space piece as a space)."""
  mask = np.ones(len(tokens), bool) if mask is None else mask
  return "".join(tok.id_to_piece(int(t)) for t, m in zip(tokens, mask) if m).replace(C.SPACE, " ")


def _valid_trace(steps, target) -> str:
  """The trace of a valid solution, written by hand."""
  return ("".join(f"{a}{op}{b}{OK}={c}={c}{OK} " for a, op, b, c in steps)
          + f"####{target}={target}{OK}")


def _encode(tok, rows, n=48, a=16):
  """rows: (numbers, target, response text, ends with EOS) -> padded response / answer arrays."""
  toks, mask = np.zeros((len(rows), n), np.int32), np.zeros((len(rows), n), bool)
  ans, ans_mask = np.zeros((len(rows), a), np.int32), np.zeros((len(rows), a), bool)
  for i, (numbers, target, text, eos) in enumerate(rows):
    ids = tok.encode(text, add_eos=eos)
    toks[i, :len(ids)], mask[i, :len(ids)] = ids, True
    ids = tok.encode(f"{','.join(map(str, numbers))}={target}")
    ans[i, :len(ids)], ans_mask[i, :len(ids)] = ids, True
  return toks, mask, ans, ans_mask


# ---- hand-built traces ---------------------------------------------------------------------------

P = (3, 7, 12), 57  # "cd 3,7,12 t57="
STEP1 = f"12+7{OK}=19=19{OK} "
GOOD = STEP1 + f"19*3{OK}=57=57{OK} "
HAND = [  # (numbers, target, response, ends with EOS, the trace written by hand)
    (*P, "12+7=19 19*3=57 ####57", True, GOOD + f"####57=57{OK}"),  # valid
    (*P, "7+12=19 3*19=57 ####57", True,  # valid, operands the other way round
     f"7+12{OK}=19=19{OK} 3*19{OK}=57=57{OK} ####57=57{OK}"),
    ((12, 12, 9), 16, "12*12=144 144/9=16 ####16", True,  # a copy of 12 each; 3-digit results
     f"12*12{OK}=144=144{OK} 144/9{OK}=16=16{OK} ####16=16{OK}"),
    (*P, "12+8=20 20*3=60 ####60", True, f"12+8{NO}"),  # 8 is not available
    (*P, "3+3=6 6*7=42 ####42", True, f"3+3{NO}"),  # one 3, used twice
    (*P, "12+7=19 12*3=36 ####36", True, STEP1 + f"12*3{NO}"),  # 12 used up
    (*P, "12+7=19 19+19=38 ####38", True, STEP1 + f"19+19{NO}"),  # result reused
    (*P, "12+7=18 18*3=54 ####54", True, f"12+7{OK}=19=18{NO}"),  # wrong arithmetic
    (*P, "12+7=19 19*3=56 ####56", True, STEP1 + f"19*3{OK}=57=56{NO}"),  # ... in step 2
    (*P, "12+7=20 20*3=60 ####60", True, f"12+7{OK}=19=20{NO}"),  # recomputed before the claim
    (*P, "7-12=5 5*3=15 ####15", True, f"7-12{OK}={NO}"),  # negative: no value to write
    ((6, 4, 2), 1, "6/4=1 ####1", True, f"6/4{OK}={NO}"),  # inexact division
    ((6, 6, 2), 2, "6-6=0 2/0=2 ####2", True, f"6-6{OK}=0=0{OK} 2/0{OK}={NO}"),  # by zero
    (*P, "12+7=19 19*3=57 ####58", True, GOOD + f"####58=57{NO}"),  # wrong final answer
    (*P, "12+7=19 ####57", True, STEP1 + f"####57=57{NO}"),  # not the last result
    (*P, "12+7=19 19*3=5", False, STEP1 + f"19*3{NO}"),  # truncated mid-step
    (*P, "12+7=19 19*3=57 ####57", False, GOOD + f"####57{NO}"),  # truncated before EOS
    (*P, "12+7=19 19*3=57 ####57=", True, GOOD + f"####57{NO}"),  # text after the answer
    (*P, "12+7=19  19*3=57 ####57", True, STEP1 + NO),  # extra space
    (*P, "12+07=19 19*3=57 ####57", True, f"12+0{NO}"),  # leading zero
    (*P, "12+7=019 19*3=57 ####57", True, f"12+7{NO}"),  # ... in the claim
    ((12, 10, 11), 120, "12*10=120 120*11=1320 ####1320", True,  # 4 digits
     f"12*10{OK}=120=120{OK} 120*11{NO}"),
    (*P, "12+7=19 19*3=57", True, STEP1 + f"19*3{NO}"),  # no answer (EOS ends the step)
    (*P, "12+7=19 ", True, STEP1 + NO),  # no answer
    (*P, "####57", True, NO),  # no step
    (*P, "cd 3,7", True, NO),  # garbage
    (*P, "", True, NO),  # empty
    ((100, 200, 300), 600, "100+200=300 300+300=600 600+600=999 ####999", True,  # the longest
     f"100+200{OK}=300=300{OK} 300+300{OK}=600=600{OK} 600+600{NO}"),
    ((100, 200, 300), 600, "100+200=300 300+300=600 ####600", True,  # the longest valid one
     f"100+200{OK}=300=300{OK} 300+300{OK}=600=600{OK} ####600=600{OK}"),
]


@pytest.mark.slow
def test_trace_of_hand_built_responses(tok):
  trace = C.CountdownTask(num_numbers=3).make_trace_fn(tok)
  assert trace is C.CountdownTask(num_numbers=3).make_trace_fn(tok)  # one stable object
  assert trace.width == C.trace_width(3) == 45
  assert [C.trace_width(n) for n in (2, 4)] == [27, 63]
  toks, mask, ans, ans_mask = _encode(tok, [h[:4] for h in HAND])
  out, out_mask = jax.jit(trace)(ans, ans_mask, toks, mask)
  assert out.shape == out_mask.shape == (len(HAND), 45)
  verified = np.asarray(jax.jit(C.make_countdown_verifier(tok))(toks, mask, ans, ans_mask))
  for i, (numbers, target, response, eos, want) in enumerate(HAND):
    got = _text(tok, out[i], out_mask[i])
    assert got == want, (response, got)
    assert np.all(out_mask[i, :out_mask[i].sum()])  # right-padded
    assert got.endswith(OK) == (verified[i] == 1.0), response
    assert (verified[i] == 1.0) == (eos and C.check_solution(numbers, target, response)), response
  assert max(out_mask.sum(1)) == 45  # the last row reaches the bound
  # wider responses and answers give the same traces
  wide = lambda x, k: np.pad(x, ((0, 0), (0, k)))
  out2, mask2 = jax.jit(trace)(wide(ans, 3), wide(ans_mask, 3), wide(toks, 20), wide(mask, 20))
  np.testing.assert_array_equal(np.where(mask2, out2, -1), np.where(out_mask, out, -1))


# ---- the trace against the verifier --------------------------------------------------------------

_STEP = re.compile(rf"(\d+)([-+*/])(\d+)({OK}|{NO})(?:=(?:(\d+)=(\d+))?({OK}|{NO}))?( ?)")
_CHECKS = re.compile(rf"({OK}|{NO})(=(\d+=\d+)?({OK}|{NO}))?|=\d+(?={OK}$|{NO}$)")
_NUMBER = r"(?:0|[1-9]\d{0,2})"
_RESPONSE_STEP = re.compile(rf"({_NUMBER})([-+*/])({_NUMBER})=({_NUMBER})$")


def _host_check(trace, response, numbers, target) -> None:
  """Host re-derivation from the trace text alone: stripped of its checks it is the start of the
  response without its steps' claimed results "=c"; a check `<no>` only ever ends it; each
  step's availability (a Counter over the numbers and earlier results), recomputed value (Python
  ints) and copied claim c (the response's k-th space-separated step) are what it says, and its
  last check says whether the two are equal; an answer's check writes the target."""
  assert trace.endswith((OK, NO)) and NO not in trace[:-len(NO)], trace
  copied = _CHECKS.sub("", trace)
  assert re.sub(r"=\d*", "", response).startswith(copied), (trace, response)
  parts = response.split(" ")
  pool = collections.Counter(numbers)
  for k, m in enumerate(_STEP.finditer(trace)):
    a, op, b = int(m[1]), m[2], int(m[3])
    avail = pool[a] >= 1 and pool[b] >= (2 if a == b else 1)
    step = _RESPONSE_STEP.match(parts[k]) if k + 1 < len(parts) else None  # a space follows
    if m[4] == NO:  # unavailable, or the step is not "a op b=c" followed by its space
      assert not (avail and step), (trace, response)
      break
    assert avail and step, trace
    c = int(step[4])
    value = {"+": a + b, "-": a - b, "*": a * b}.get(op, a // b if b and a % b == 0 else -1)
    valid = 0 <= value <= 999
    assert (m[5], m[6]) == ((str(value), str(c)) if valid else (None, None)), trace
    assert (m[7] == OK) == (valid and value == c), trace
    if m[7] == NO:
      break
    assert m[8] == " ", trace  # a passing step is followed by its space
    pool[a] -= 1
    pool[b] -= 1
    pool[c] += 1
  answer = re.search(rf"####(\d+)=(\d+)({OK}|{NO})$", trace)
  if answer:
    assert int(answer[2]) == target, trace


@pytest.mark.slow
def test_trace_verdict_agrees_with_the_verifier(tok):
  rng = np.random.default_rng(1)
  ids = [tok.piece_to_id(s) for s in T.DIGITS + ("####", "+", "-", "*", "/", "=", ",", C.SPACE)]
  rows, texts = [], []
  for n in (2, 3, 4):
    for e in C.CountdownTask(num_numbers=n).examples("train", seed=3, num=40):
      numbers, target = _problem(e)
      sols = C.all_solutions(numbers, target)
      alt = C.render_steps(_swap_some(rng, sols[int(rng.integers(len(sols)))]))
      parts, last = _attempt(rng, numbers)
      attempt = " ".join(parts) + f" ####{last if rng.random() < 0.7 else target}"
      for text in (e["response"], alt, attempt, attempt.replace(" ", "", 1)):
        rows.append((text, None, numbers, target))
        texts.append(text)
      for _ in range(3):
        mutated, mask = _token_mutation(rng, tok.encode(e["response"], add_eos=True),
                                        tok.vocab_size, ids)
        rows.append((mutated, mask, numbers, target))
        texts.append(None)
  assert len(rows) >= 800
  toks, masks, ans, ans_mask = _batch(tok, rows)
  trace = C.CountdownTask(num_numbers=4).make_trace_fn(tok)
  out, out_mask = jax.jit(trace)(ans, ans_mask, toks, masks)
  verified = np.asarray(jax.jit(C.make_countdown_verifier(tok))(toks, masks, ans, ans_mask))
  lengths = out_mask.sum(1)
  passed = []
  for i, (_, _, numbers, target) in enumerate(rows):
    assert lengths[i] <= C.trace_width(len(numbers))
    last = int(out[i, lengths[i] - 1])
    assert (last == tok.piece_to_id(OK)) == (verified[i] == 1.0), (texts[i], _text(tok, out[i],
                                                                                 out_mask[i]))
    if texts[i] is not None:
      _host_check(_text(tok, out[i], out_mask[i]), texts[i], numbers, target)
    passed.append(verified[i] == 1.0)
  assert 0.2 < np.mean(passed) < 0.8  # both verdicts well represented


# ---- the judge a config builds, and its training rows --------------------------------------------

D = 3
PL, RL, AL = WIDTHS[D]
NEED = C.trace_width(D) + 3  # the trace, <score>, the score, EOS: 48 for 3 numbers
VERIFY = ["algorithm.name=self_rewarding", "data.task=countdown", f"data.difficulty={D}",
          f"data.max_prompt_len={PL}", f"data.max_response_len={RL}", f"data.max_answer_len={AL}",
          f"sampling.max_new_tokens={RL}", "judge.rationale=True", "judge.trace=verify",
          "judge.num_samples=1", f"judge.max_new_tokens={NEED}", "data.batch_size=2",
          "sampling.n=2", "warmup.rounds=1", "model.hidden_size=32", "model.intermediate_size=64",
          "model.num_layers=1", "mesh.data=1", "progress_bar=false"]


def _cfg(*extra):
  cfg = config_lib.load_config("configs/self_rewarding.py", VERIFY + list(extra))
  config_validation.validate(cfg)
  return cfg


def test_verify_judge_config_and_errors(tmp_path):
  cfg = _cfg()
  task, tok = setup.task_and_tokenizer(cfg, tmp_path)
  assert len(tok.encode("<verify>")) == 1
  judge = setup.build_judge(cfg, tok, task)
  verify_id, score_id = tok.piece_to_id("<verify>"), tok.piece_to_id("<score>")
  assert judge.rationale and not judge.response_first
  assert (judge.prefix, judge.middle, judge.suffix) == ((tok.bos_id,), (), (verify_id,))
  assert judge.marker == (score_id,) and judge.max_new_tokens == NEED == 48
  assert setup.build_judge(cfg, tok) == judge  # the task built from the config when not given
  with pytest.raises(ConfigError, match=rf"judge.max_new_tokens: .*needs >= {NEED}, got {NEED - 1}"):
    setup.build_judge(_cfg(f"judge.max_new_tokens={NEED - 1}"), tok, task)
  with pytest.raises(ConfigError, match=r"judge.trace: 'verify' .*judge.rationale=True"):
    setup.build_judge(_cfg("judge.rationale=False", "judge.num_samples=0"), tok, task)
  arith = _cfg("data.task=arithmetic", "data.difficulty=2")
  with pytest.raises(ConfigError, match=r"judge.trace: 'verify' needs a task .*'arithmetic'"):
    setup.build_warmup_spec(arith, tok)
  with pytest.raises(ConfigError, match=r"judge.trace: must be 'solve' or 'verify'"):
    _cfg("judge.trace=check")
  solve = _cfg("judge.trace=solve", "judge.max_new_tokens=31")
  assert setup.build_warmup_spec(solve, tok, task).trace is None


@pytest.mark.slow
def test_verify_judge_sft_rows_teach_trace_then_verdict(tmp_path):
  """JudgeSFT rows: prompt = the judge template "{prompt}{response}<verify>", completion = the
  trace of the judged response + <score> + the verifier's score + EOS, the verdict mask on the
  last three tokens; Judge.read_scores reads back the score each row teaches."""
  cfg = _cfg()
  task, tok = setup.task_and_tokenizer(cfg, tmp_path)
  spec = setup.build_warmup_spec(cfg, tok, task)
  assert spec.name == "sft+judge" and spec.trace is task.make_trace_fn(tok)
  judge = spec.judge
  examples = [{"prompt": "cd 3,7,12 t57=", "response": "12+7=19 19*3=57 ####57",
               "answer": "3,7,12=57"},
              {"prompt": "cd 6,4,2 t3=", "response": "6-4=2 2+1=3 ####3", "answer": "6,4,2=3"}]
  examples[1]["response"] = "6/2=3 ####3"  # a gold solution of the second problem
  batch = T.encode_examples(examples, tok, PL, RL, AL)
  samples = [("7+12=19 3*19=57 ####57", True), ("12+8=20 20*3=60 ####60", True),  # prompt 0
             ("6/4=1 ####1", True), ("6/2=3 ####", False)]  # prompt 1 (truncated)
  toks, mask = np.zeros((4, RL), np.int32), np.zeros((4, RL), bool)
  for i, (text, eos) in enumerate(samples):
    ids = tok.encode(text, add_eos=eos)
    toks[i, :len(ids)], mask[i, :len(ids)] = ids, True
  z = jnp.zeros(toks.shape, jnp.float32)
  ro = sampling.Rollout(prompt_tokens=jnp.repeat(batch["prompt_tokens"], 2, 0),
                        prompt_mask=jnp.repeat(batch["prompt_mask"], 2, 0),
                        tokens=jnp.asarray(toks), logprobs=z, model_logprobs=z,
                        mask=jnp.asarray(mask), lengths=jnp.asarray(mask.sum(1)))
  rewards = jax.jit(C.make_countdown_verifier(tok))(
      toks, mask, np.repeat(batch["answer_tokens"], 2, 0), np.repeat(batch["answer_mask"], 2, 0))
  np.testing.assert_array_equal(rewards, [1, 0, 0, 0])
  rows = jax.jit(lambda b, r, w: spec.build(b, r, w, None))(batch, ro, rewards)
  np.testing.assert_array_equal(rows["is_judge"], [0, 0, 1, 1, 1, 1, 1, 1])
  # judged: gold 0, gold 1, then the samples in order
  judged = [(examples[0]["prompt"], examples[0]["response"], _valid_trace(
                C.gold_solution((3, 7, 12), 57), 57), 5),
            (examples[1]["prompt"], examples[1]["response"], f"6/2{OK}=3=3{OK} ####3=3{OK}", 5),
            (examples[0]["prompt"], samples[0][0],
             f"7+12{OK}=19=19{OK} 3*19{OK}=57=57{OK} ####57=57{OK}", 5),
            (examples[0]["prompt"], samples[1][0], f"12+8{NO}", 0),
            (examples[1]["prompt"], samples[2][0], f"6/4{OK}={NO}", 0),
            (examples[1]["prompt"], samples[3][0], f"6/2{OK}=3=3{OK} ####{NO}", 0)]
  assert examples[0]["response"] == C.render_steps(C.gold_solution((3, 7, 12), 57))
  bos = tok.id_to_piece(tok.bos_id)
  for k, (prompt, response, trace, score) in enumerate(judged):
    r = 2 + k
    assert _text(tok, rows["prompt_tokens"][r], rows["prompt_mask"][r]) == \
        f"{bos}{prompt}{response}<verify>"
    assert np.all(rows["prompt_mask"][r, -1:])  # left-padded: the prompt ends at the last column
    completion = [int(t) for t, m in zip(rows["tokens"][r], rows["mask"][r]) if m]
    assert _text(tok, completion) == f"{trace}<score>{score}{tok.id_to_piece(tok.eos_id)}"
    n = len(completion)
    np.testing.assert_array_equal(rows["mask"][r, :n], True)  # right-padded
    np.testing.assert_array_equal(np.flatnonzero(rows["verdict"][r]), [n - 3, n - 2, n - 1])
  assert rows["tokens"].shape[1] >= NEED  # room for the longest trace
  assert not np.asarray(rows["verdict"][:2]).any()  # SFT rows: the gold responses
  assert _text(tok, rows["tokens"][0], rows["mask"][0]) == \
      examples[0]["response"] + tok.id_to_piece(tok.eos_id)
  scores = np.asarray(judge.read_scores(rows["tokens"][2:], rows["mask"][2:]))
  np.testing.assert_array_equal(scores, [j[3] for j in judged])


@pytest.mark.slow
def test_verify_judge_warmup_and_self_rewarding_round_run(tmp_path):
  """setup.build on countdown with the checking judge: a jitted warm-up round (SFT + judge rows
  with traces), then a self-rewarding round whose judgements are sampled and read back."""
  cfg = _cfg()
  run = setup.build(cfg, tmp_path)
  assert run.warmup_spec.trace is run.task.make_trace_fn(run.tokenizer)
  batch = T.encode_examples(run.task.examples("train", num=2), run.tokenizer, PL, RL, AL)
  state = jax.jit(run.initial_state)()  # one compile instead of op-by-op initialisation
  state, metrics = run.round_fn(warmup=True)(state, batch)
  assert np.isfinite(float(metrics["train/judge_loss"]))
  assert np.isfinite(float(metrics["train/sft_loss"]))
  rows = cfg.data.batch_size * cfg.sampling.n
  state, metrics = run.round_fn(num_samples=rows)(state, batch)
  assert np.isfinite(float(metrics["train/loss"]))
  scores = np.asarray(metrics["samples/rewards"])
  assert scores.shape == (rows,)
  assert np.isin(scores[~np.isnan(scores)], np.arange(6)).all()  # one judgement: a whole score
  assert float(metrics["judge/valid_fraction"]) == pytest.approx(np.mean(~np.isnan(scores)))


# ---- hard negatives (judge.hard_negatives) --------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4])
def test_hard_negatives_are_wrong_gold_responses_one_token_apart(tok, n):
  """The corruption of 1500 gold responses: the reference checker rejects every one; exactly one
  token changed, a step's operator (the claim and the target kept) or a digit of a step's claim;
  both kinds about half the time; no leading zero written; the same key gives the same rows."""
  task = C.CountdownTask(num_numbers=n)
  corrupt = jax.jit(task.make_corrupt_fn(tok))
  examples = [task.example("train", i) for i in range(1500)]
  toks, mask, _, _ = _encode(tok, [(*_problem(e), e["response"], True) for e in examples])
  out = np.asarray(corrupt(toks, mask, jax.random.key(7)))
  np.testing.assert_array_equal(out, corrupt(toks, mask, jax.random.key(7)))
  assert (out != np.asarray(corrupt(toks, mask, jax.random.key(8)))).any()
  kinds = collections.Counter()
  for e, row, before, m in zip(examples, out, toks, mask):
    numbers, target = _problem(e)
    changed = np.flatnonzero(row != before)
    assert len(changed) == 1 and m[changed[0]]
    text = _text(tok, row, m & ~np.isin(row, tok.eos_ids))
    assert not C.check_solution(numbers, target, text), (e["response"], text)
    gold_steps, bad_steps = e["response"].split(" ")[:-1], text.split(" ")[:-1]
    assert text.split(" ")[-1] == e["response"].split(" ")[-1]  # "####target" kept
    k = next(i for i, (g, s) in enumerate(zip(gold_steps, bad_steps)) if g != s)
    (ga, gop, gb, gc), (sa, sop, sb, sc) = (re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", s).groups()
                                            for s in (gold_steps[k], bad_steps[k]))
    if gop != sop:
      assert (ga, gb, gc) == (sa, sb, sc)
      kinds["operator"] += 1
    else:
      assert (ga, gop, gb) == (sa, sop, sb) and gc != sc
      assert sc == "0" or not sc.startswith("0")  # no leading zero
      kinds["claim"] += 1
  assert 0.4 < kinds["operator"] / len(examples) < 0.6, kinds


def test_hard_negatives_leave_a_response_without_a_step_alone(tok):
  corrupt = jax.jit(C.CountdownTask(num_numbers=3).make_corrupt_fn(tok))
  rows = [((3, 7, 12), 57, "####57", True), ((3, 7, 12), 57, "12+7=", True),
          ((3, 7, 12), 57, "", False)]
  toks, mask, _, _ = _encode(tok, rows)
  np.testing.assert_array_equal(corrupt(toks, mask, jax.random.key(0)), toks)


def test_hard_negative_judge_rows(tmp_path):
  """With judge.hard_negatives the warm-up rows add, after the gold and sampled judge rows, each
  gold response corrupted (one token changed), taught as wrong: its trace ends <no>, score 0."""
  cfg = _cfg("judge.hard_negatives=True")
  task, tok = setup.task_and_tokenizer(cfg, tmp_path)
  spec = setup.build_warmup_spec(cfg, tok, task)
  assert spec.corrupt is task.make_corrupt_fn(tok) and setup.build_warmup_spec(cfg, tok) == spec
  examples = task.examples("train", num=2)
  batch = T.encode_examples(examples, tok, PL, RL, AL)
  toks = np.repeat(np.asarray(batch["response_tokens"]), 2, 0)
  mask = np.repeat(np.asarray(batch["response_mask"]), 2, 0)
  z = jnp.zeros(toks.shape, jnp.float32)
  ro = sampling.Rollout(prompt_tokens=jnp.repeat(batch["prompt_tokens"], 2, 0),
                        prompt_mask=jnp.repeat(batch["prompt_mask"], 2, 0),
                        tokens=jnp.asarray(toks), logprobs=z, model_logprobs=z,
                        mask=jnp.asarray(mask), lengths=jnp.asarray(mask.sum(1)))
  rows = jax.jit(lambda b, r: spec.build(b, r, jnp.ones((4,)), None))(batch, ro)
  np.testing.assert_array_equal(rows["is_judge"], [0, 0] + [1] * 8)
  np.testing.assert_array_equal(rows["judge_correct"], [0, 0] + [1] * 6 + [0, 0])
  scores = np.asarray(spec.judge.read_scores(rows["tokens"][2:], rows["mask"][2:]))
  np.testing.assert_array_equal(scores, [5] * 6 + [0, 0])
  bos = tok.id_to_piece(tok.bos_id)
  for r, e in zip((8, 9), examples):
    prompt = _text(tok, rows["prompt_tokens"][r], rows["prompt_mask"][r])
    assert prompt.startswith(f"{bos}{e['prompt']}") and prompt.endswith("<verify>")
    response = prompt[len(bos) + len(e["prompt"]):-len("<verify>")]
    assert response != e["response"] and len(tok.encode(response)) == len(tok.encode(e["response"]))
    assert not C.check_solution(*_problem(e), response)
    completion = _text(tok, rows["tokens"][r], rows["mask"][r])
    assert completion.endswith(f"{NO}<score>0{tok.id_to_piece(tok.eos_id)}"), completion
  arith = ["data.task=arithmetic", "data.difficulty=2", "judge.trace=solve",
           "judge.max_new_tokens=31", "judge.hard_negatives=True"]
  with pytest.raises(ConfigError, match=r"judge.hard_negatives: .*'arithmetic' .*countdown can"):
    _cfg(*arith)  # refused by validation, before anything runs
  with pytest.raises(ConfigError, match=r"judge.hard_negatives: .*'arithmetic'"):
    setup.build_warmup_spec(config_lib.load_config("configs/self_rewarding.py", VERIFY + arith), tok)
  with pytest.raises(ConfigError, match=r"judge.hard_negatives: True .*trains no judge"):
    _cfg("judge.hard_negatives=True", "judge.train_in_warmup=False")
