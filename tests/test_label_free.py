"""Label-free rewards (scoring/label_free.py, scoring/__init__.py): the majority vote (TTRL / SRT)
and self-certainty (INTUITOR), each against a NumPy re-derivation on hand-built inputs; answer
extraction; the consensus-collapse warning; config checks; and a jitted GRPO round rewarded by the
majority vote of its own samples."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax import config_lib, config_validation, models, sampling, scoring, setup, train
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.grpo import PolicyGradient
from selfplay_jax.algorithms.sft import SFT
from selfplay_jax.data import pipeline, tasks
from selfplay_jax.errors import ConfigError
from selfplay_jax.models import decoder
from selfplay_jax.models.logprobs import completion_self_certainty
from selfplay_jax.scoring import label_free
from selfplay_jax.scoring.verifiers import PAD_ANSWER, extract_answers
from tests.test_train import OVERRIDES

MARKER, EOS, PAD = 9, 2, 0


# ---- NumPy references ------------------------------------------------------------------------


def np_vote(answers, n):
  """Per group of `n`: rewards (hard), shares, majority share, winner (None: no valid answer).
  `answers`: hashable per sample, None = invalid. Ties: the first voter among the largest."""
  hard, soft, top, win = [], [], [], []
  for g in range(len(answers) // n):
    grp = answers[g * n:(g + 1) * n]
    counts = [0 if a is None else sum(b == a for b in grp) for a in grp]
    best = max(counts)
    w = counts.index(best) if best > 0 else None
    soft += [c / n for c in counts]
    hard += [float(w is not None and a is not None and a == grp[w]) for a in grp]
    top.append(best / n)
    win.append(w)
  return np.array(hard, np.float32), np.array(soft, np.float32), np.array(top, np.float32), win


def np_answer(tokens, mask, marker=MARKER, eos=(EOS,)):
  """The answer tuple after the first marker before the first stop token, None if incomplete."""
  tokens = [t for t, m in zip(tokens, mask) if m] if all(mask[:sum(mask)]) else None
  if tokens is None:
    return None
  stops = [i for i, t in enumerate(tokens) if t in eos]
  if not stops:
    return None
  body = tokens[:stops[0]]
  if marker not in body:
    return None
  ans = tuple(body[body.index(marker) + 1:])
  return ans or None


# ---- the vote ------------------------------------------------------------------------------------

# Groups of 4 answers (None = invalid): a clear majority, a 2-2 tie, unparsable answers, all
# equal, all invalid, all distinct (a 1-1-1-1 tie), a tie broken by who comes first.
GROUPS = [
    [(1,), (1,), (2,), (1,)],
    [(3,), (4,), (4,), (3,)],
    [None, (5,), None, (5, 6)],
    [(7, 7), (7, 7), (7, 7), (7, 7)],
    [None, None, None, None],
    [(1,), (2,), (3,), (4,)],
    [None, (8,), (9,), (9,)],
]


def _encode(groups, width=3):
  flat = [a for g in groups for a in g]
  rows = np.full((len(flat), width), PAD_ANSWER, np.int32)
  for i, a in enumerate(flat):
    if a is not None:
      rows[i, :len(a)] = a
  valid = np.array([a is not None for a in flat])
  return flat, rows, valid


def test_majority_vote_and_rewards_match_numpy():
  flat, rows, valid = _encode(GROUPS)
  n = 4
  vote = label_free.majority_vote(label_free.group(jnp.asarray(rows), n),
                                  label_free.group(jnp.asarray(valid), n))
  hard, soft, top, win = np_vote(flat, n)
  np.testing.assert_array_equal(np.asarray(label_free.majority_rewards(vote)).reshape(-1), hard)
  np.testing.assert_allclose(
      np.asarray(label_free.majority_rewards(vote, soft=True)).reshape(-1), soft)
  np.testing.assert_allclose(np.asarray(vote["top_share"]), top)
  np.testing.assert_array_equal(np.asarray(label_free.winners(vote)),
                                [-1 if w is None else w for w in win])
  # The hand-checked cases: the 2-2 tie goes to the first voter's answer (3), the all-distinct
  # group to voter 0, the all-invalid group has no winner and rewards nothing.
  np.testing.assert_array_equal(hard.reshape(-1, 4)[1], [1, 0, 0, 1])
  np.testing.assert_array_equal(hard.reshape(-1, 4)[5], [1, 0, 0, 0])
  np.testing.assert_array_equal(hard.reshape(-1, 4)[4], [0, 0, 0, 0])
  np.testing.assert_array_equal(hard.reshape(-1, 4)[6], [0, 0, 1, 1])
  assert top[3] == 1.0 and top[4] == 0.0 and top[2] == 0.25


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("soft", [False, True])
def test_majority_threshold_makes_weak_votes_unscorable(threshold, soft):
  flat, rows, valid = _encode(GROUPS)
  vote = label_free.majority_vote(label_free.group(jnp.asarray(rows), 4),
                                  label_free.group(jnp.asarray(valid), 4))
  got = np.asarray(label_free.majority_rewards(vote, soft=soft, threshold=threshold))
  hard, shares, top, _ = np_vote(flat, 4)
  want = (shares if soft else hard).reshape(-1, 4).copy()
  want[top < threshold] = np.nan
  np.testing.assert_array_equal(got, want)  # NaN positions equal too


def test_label_accuracy_counts_groups_without_a_valid_answer_as_wrong():
  winner = jnp.asarray([0, 2, -1, 1], jnp.int32)
  verified = jnp.asarray([1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1], jnp.float32)
  # Groups of n = 3: [1,0,0] winner 0: right; [0,1,1] winner 2: right; [1,1,1] no valid answer:
  # wrong (whatever the verifier says); [0,0,1] winner 1: wrong.
  assert float(label_free.label_accuracy(winner, verified, 3)) == pytest.approx(0.5)


# ---- answer extraction ---------------------------------------------------------------------------


def test_extract_answers_on_hand_built_rows():
  rows = [
      ([5, MARKER, 3, 4, EOS, PAD], 5),         # "...####34<eos>": answer (3, 4)
      ([MARKER, 7, EOS, PAD, PAD, PAD], 3),     # answer (7,)
      ([5, 6, 7, EOS, PAD, PAD], 4),            # no marker
      ([5, MARKER, 3, 4, 4, 4], 6),             # no stop token (cut at the budget)
      ([MARKER, EOS, PAD, PAD, PAD, PAD], 2),   # empty answer
      ([MARKER, 3, 4, 5, 6, EOS], 6),           # longer than the width (3)
      ([MARKER, 3, MARKER, 4, EOS, PAD], 5),    # a second marker belongs to the answer
      ([EOS, MARKER, 1, EOS, PAD, PAD], 4),     # the marker comes after the stop token
      ([MARKER, 1, EOS, PAD, PAD, PAD], 2),     # the stop token is outside the mask
  ]
  tokens = np.array([r for r, _ in rows], np.int32)
  mask = np.arange(6)[None] < np.array([k for _, k in rows])[:, None]
  answers, valid = extract_answers(jnp.asarray(tokens), jnp.asarray(mask), MARKER, [EOS], 3)
  want = [np_answer(list(t), list(m)) for t, m in zip(tokens, mask)]
  want = [a if a is not None and len(a) <= 3 else None for a in want]
  np.testing.assert_array_equal(np.asarray(valid), [a is not None for a in want])
  for got, a in zip(np.asarray(answers), want):
    expect = np.full(3, PAD_ANSWER)
    if a is not None:
      expect[:len(a)] = a
    np.testing.assert_array_equal(got, expect)
  assert list(np.asarray(valid)) == [True, True, False, False, False, False, True, False, False]
  np.testing.assert_array_equal(np.asarray(answers)[6], [3, MARKER, 4])


def test_majority_scorer_reads_only_the_rollout():
  """The scorer votes on the rollout's answers; the batch (gold answers) is not read."""
  groups = [[[MARKER, 3, EOS], [MARKER, 3, EOS], [MARKER, 4, EOS], [5, 3, EOS]],
            [[MARKER, 1, EOS], [MARKER, 2, 2], [MARKER, 2, EOS], [MARKER, 1, EOS]]]
  tokens = jnp.asarray([r for g in groups for r in g], jnp.int32)
  rollout = types.SimpleNamespace(tokens=tokens, mask=jnp.ones(tokens.shape, bool))
  scorer = scoring.majority_scorer(MARKER, [EOS], 4, 3)
  rewards, metrics = scorer(None, None, None, rollout, None)
  np.testing.assert_array_equal(np.asarray(rewards), [1, 1, 0, 0, 1, 0, 0, 1])
  assert float(metrics["train/majority_ratio"]) == pytest.approx((0.5 + 0.5) / 2)
  np.testing.assert_array_equal(np.asarray(metrics[label_free.WINNER_KEY]), [0, 0])


# ---- self-certainty ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
  cfg = models.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=1,
                           eos_token_ids=(EOS,), pad_token_id=PAD).validate()
  return cfg, models.init_params(cfg, jax.random.key(0))


def _np_self_certainty(cfg, params, rows, v):
  """Per completion token, from the model's logits in NumPy: −log V − (1/V) Σ_{j<V} log p_j."""
  tokens = np.concatenate([rows["prompt_tokens"], rows["tokens"]], axis=1)
  segments = np.concatenate([rows["prompt_mask"], np.ones_like(rows["mask"])], axis=1)
  logits = np.asarray(decoder.forward(cfg, params, tokens, segment_ids=segments.astype(np.int32)),
                      np.float64)
  p = rows["prompt_tokens"].shape[1]
  logits = logits[:, p - 1:-1]  # position t scores completion token t
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.log(v) - logp[..., :v].mean(-1)


@pytest.mark.parametrize("vocab", [None, 33])
@pytest.mark.slow
def test_self_certainty_matches_numpy_from_logits(tiny_model, vocab):
  cfg, params = tiny_model
  rng = np.random.default_rng(0)
  r, p, n = 4, 5, 6
  prompt_mask = np.arange(p)[None] >= np.array([0, 2, 1, 3])[:, None]  # left-padded
  rows = {"prompt_tokens": np.where(prompt_mask, rng.integers(3, 33, (r, p)), PAD).astype(np.int32),
          "prompt_mask": prompt_mask,
          "tokens": rng.integers(3, 33, (r, n)).astype(np.int32),
          "mask": np.arange(n)[None] < np.array([6, 3, 1, 4])[:, None]}
  want = _np_self_certainty(cfg, params, rows, vocab or cfg.vocab_size)
  got = completion_self_certainty(cfg, params, rows, vocab)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  assert (want > 0).all()  # a KL from uniform: positive for a non-uniform p
  chunked = completion_self_certainty(cfg, params, rows, vocab, num_chunks=2)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(got), rtol=1e-5, atol=1e-6)
  # The scorer: each sample's mean over its masked completion tokens (stop token included).
  rollout = types.SimpleNamespace(**{k: jnp.asarray(v) for k, v in rows.items()})
  scores, metrics = scoring.self_certainty_scorer(cfg, vocab or cfg.vocab_size, 2)(
      params, None, None, rollout, None)
  per_sample = (want * rows["mask"]).sum(1) / rows["mask"].sum(1)
  np.testing.assert_allclose(np.asarray(scores), per_sample, rtol=1e-4, atol=1e-5)
  assert float(metrics["train/self_certainty"]) == pytest.approx(per_sample.mean(), rel=1e-4)


# ---- the consensus-collapse warning --------------------------------------------------------------


def test_consensus_collapse_decision():
  first = {"train/majority_ratio": 0.6, "train/label_accuracy": 0.5, "train/entropy": 1.0}
  ok = {"train/majority_ratio": 0.97, "train/label_accuracy": 0.45, "train/entropy": 0.9}
  assert train.consensus_collapse(ok, first) is None  # agreement up, quality within 20%
  acc = {**ok, "train/label_accuracy": 0.3, "round": 9, "phase": "grpo"}
  assert "train/label_accuracy" in train.consensus_collapse(acc, first)
  ent = {**ok, "train/entropy": 0.5}
  assert "train/entropy" in train.consensus_collapse(ent, first)
  assert train.consensus_collapse({**ent, "train/majority_ratio": 0.9}, first) is None
  # No label accuracy measured (no verifier, or None for a round): entropy alone decides.
  assert train.consensus_collapse({**acc, "train/label_accuracy": None}, first) is None
  assert train.consensus_collapse(acc, {**first, "train/label_accuracy": None}) is None
  assert train.consensus_collapse({"train/entropy": 0.1}, first) is None  # no vote at all


def test_consensus_warning_is_logged_once(monkeypatch):
  warnings = []
  monkeypatch.setattr(train.logging, "warning", lambda fmt, *a: warnings.append(fmt % a))
  loop = types.SimpleNamespace(consensus_first=None, consensus_warned=False)
  base = {"phase": "grpo", "train/majority_ratio": 0.5, "train/entropy": 1.0}
  train._watch_consensus(loop, {**base, "phase": "warmup", "train/majority_ratio": 0.1})
  assert loop.consensus_first is None  # warm-up rounds are not the baseline
  train._watch_consensus(loop, base)
  collapsed = {**base, "train/majority_ratio": 0.99, "train/entropy": 0.2, "round": 7}
  for _ in range(3):
    train._watch_consensus(loop, collapsed)
  assert len(warnings) == 1 and "round 7" in warnings[0]


# ---- config checks -------------------------------------------------------------------------------


def _cfg(*extra):
  return config_lib.load_config(str(config_lib.default_config_path()), OVERRIDES + list(extra))


@pytest.mark.parametrize("extra,key", [
    (("algorithm.name=sft", "algorithm.reward=majority"), "algorithm.reward"),
    (("algorithm.name=dpo", "algorithm.reward=self_certainty"), "algorithm.reward"),
    (("algorithm.name=spin", "algorithm.reward=majority"), "algorithm.reward"),
    (("algorithm.majority_soft=true",), "algorithm.majority_soft"),
    (("algorithm.majority_threshold=0.5",), "algorithm.majority_threshold"),
    (("algorithm.reward=majority", "algorithm.majority_threshold=1.5"),
     "algorithm.majority_threshold"),
    (("algorithm.name=reinforce_pp", "algorithm.reward=majority", "sampling.n=1"), "sampling.n"),
])
def test_bad_label_free_configs_name_the_key(extra, key):
  with pytest.raises(ConfigError, match=key):
    config_validation.validate(_cfg(*extra))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp"])
@pytest.mark.parametrize("reward", ["majority", "self_certainty"])
def test_the_grpo_family_takes_label_free_rewards(name, reward):
  extra = ["algorithm.majority_threshold=0.5"] if reward == "majority" else []
  config_validation.validate(_cfg(f"algorithm.name={name}", f"algorithm.reward={reward}", *extra))


def test_a_task_without_the_answer_marker_cannot_vote(tmp_path):
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path)
  assert setup.answer_marker_id(task, tok) == tok.piece_to_id(tasks.ANSWER_MARKER)
  no_marker = types.SimpleNamespace(example=lambda split, i: {"response": "12"})
  with pytest.raises(ConfigError, match="algorithm.reward"):
    setup.answer_marker_id(no_marker, tok)
  rows = ({"prompt": "1+1=", "response": "2", "answer": "2"},)
  for marker in ("####", "+=+"):  # present in no response / not one token
    with pytest.raises(ConfigError, match="algorithm.reward"):
      setup.answer_marker_id(pipeline.JsonlData(rows, rows, answer_marker=marker), tok)
  marked = ({"prompt": "1+1=", "response": "####2", "answer": "2"},)
  data = pipeline.JsonlData(marked, marked, answer_marker="####")
  assert setup.answer_marker_id(data, tok) == tok.piece_to_id("####")


# ---- a jitted GRPO round rewarded by its own majority --------------------------------------------


@pytest.mark.slow
def test_grpo_round_with_majority_rewards(tmp_path):
  """A briefly SFT-ed tiny model (so that its samples state answers) runs one jitted GRPO round
  with reward = the majority vote: the metrics carry majority_ratio and label_accuracy (and no
  private key), and the rewards equal NumPy's majority of the decoded answers."""
  n, b, width = 4, 8, 8
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_path)
  cfg = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                           pad_token_id=tok.pad_id).validate()
  examples = task.examples("train", seed=0, num=b)
  batch = tasks.encode_examples(examples, tok, 8, 8, 4)
  sc = sampling.SamplingConfig(max_new_tokens=width, temperature=1.0, n=n,
                               eos_ids=tuple(tok.eos_ids))
  opt = optax.adam(3e-2)
  sft = rnd.build_round_fn(cfg, SFT(), opt, sc, None)
  state = rnd.init_state(models.init_params(cfg, jax.random.key(0)), opt, SFT(), jax.random.key(1))
  for _ in range(40):
    state, _ = sft(state, batch)
  spec = PolicyGradient(group_size=n)
  marker = setup.answer_marker_id(task, tok)
  scorer = scoring.majority_scorer(marker, tok.eos_ids, n, width)
  round_fn = rnd.build_round_fn(cfg, spec, opt, sc, task.make_verifier(tok), scorer=scorer,
                                num_samples=b * n)
  _, metrics = round_fn(rnd.init_state(state.params, opt, spec, jax.random.key(2)), batch)
  metrics = jax.device_get(metrics)
  assert not any(k.startswith("_") for k in metrics)
  tokens, lengths = metrics["samples/tokens"], metrics["samples/lengths"]
  decoded = []
  for row, length in zip(tokens, lengths):
    ids = [int(t) for t in row[:length]]
    ok = ids and ids[-1] in tok.eos_ids and marker in ids[:-1]
    text = tok.decode(ids[:-1]) if ok else ""
    answer = tasks.extract_answer(text) if ok else None
    decoded.append(answer or None)
  hard, _, top, win = np_vote(decoded, n)
  assert sum(a is not None for a in decoded) >= b  # the SFT-ed model states answers
  np.testing.assert_array_equal(metrics["samples/rewards"], hard)
  assert float(metrics["train/majority_ratio"]) == pytest.approx(top.mean())
  gold = [e["answer"] for e in examples]
  label = np.mean([w is not None and decoded[g * n + w] == gold[g] for g, w in enumerate(win)])
  assert float(metrics["train/label_accuracy"]) == pytest.approx(label)
  assert float(metrics["train/reward_mean"]) == pytest.approx(hard.mean())
