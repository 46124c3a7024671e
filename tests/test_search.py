"""ReST-MCTS*'s tree search (tree_search.py) and spec (algorithms/search.py): step values against
exhaustive enumeration of a tiny model's continuations, the token budget respected exactly, the pieces (budget rule, first
step, values and visits, selection) against NumPy loops, the spec's rows and loss against NumPy,
best-of-N at a budget, the refusals, and a tiny run through the config."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_lib, config_validation, models, sampling, setup, train
from selfplay_jax import tree_search as search_lib
from selfplay_jax.algorithms.search import RestMCTS, SearchConfig
from selfplay_jax.tree_search import SearchOut
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.errors import ConfigError

PAD, EOS, SEP, GOOD = 0, 1, 4, 3  # the toy vocabulary: a step ends on SEP, GOOD makes a solution
VOCAB = 6


# ---- the pieces against loops ---------------------------------------------------------------------


def np_within_budget(costs, budget):
  """Reference: rows in order over several calls, kept while the running total fits; the first
  that does not fit stops the problem for good."""
  kept, spent, closed = [], 0, False
  for cost in costs:
    row = []
    for c in cost:
      ok = not closed and (budget <= 0 or spent + c <= budget)
      closed = closed or not ok
      spent += c if ok else 0
      row.append(ok)
    kept.append(row)
  return kept, spent


@pytest.mark.parametrize("budget", [0, 7, 20, 35])
def test_within_budget_keeps_a_prefix_of_the_sampling_order(budget):
  rng = np.random.default_rng(budget)
  calls = [rng.integers(0, 9, size=(3, 5)) for _ in range(3)]  # 3 problems, 3 levels of 5 rows
  spent, closed = jnp.zeros(3, jnp.int32), jnp.zeros(3, bool)
  got = []
  for cost in calls:
    kept, spent, closed = search_lib.within_budget(jnp.asarray(cost), spent, closed, budget)
    got.append(np.asarray(kept))
  for b in range(3):
    want, want_spent = np_within_budget([c[b] for c in calls], budget)
    assert [g[b].tolist() for g in got] == want
    assert int(spent[b]) == want_spent
    assert budget <= 0 or want_spent <= budget
  # a per-problem budget array
  kept, spent, _ = search_lib.within_budget(jnp.asarray([[5, 5], [5, 5]]), jnp.zeros(2, jnp.int32),
                                            jnp.zeros(2, bool), jnp.asarray([5, 10]))
  assert np.asarray(kept).tolist() == [[True, False], [True, True]]
  assert np.asarray(spent).tolist() == [5, 10]


def test_first_step_ends_on_the_separator_or_the_stop_token():
  tokens = jnp.asarray([[2, SEP, 3, EOS], [3, 3, EOS, PAD], [2, 2, 2, 2], [SEP, EOS, PAD, PAD]])
  mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
  step_len, finished, has_sep = search_lib.first_step(tokens, mask, (SEP,), (EOS,))
  assert np.asarray(step_len).tolist() == [2, 3, 4, 1]
  assert np.asarray(finished).tolist() == [False, True, False, False]  # row 2 was cut off
  assert np.asarray(has_sep).tolist() == [True, False, False, True]


def test_child_values_visits_and_first_of_kind_against_a_loop():
  rng = np.random.default_rng(0)
  b, r = 4, 12
  child = rng.integers(0, 4, size=(b, r))  # child identity; equal ids = the same step prefix
  parent = child // 2  # children 0, 1 share a parent, as 2, 3 do
  kept = rng.random((b, r)) < 0.8
  verified = rng.random((b, r)) < 0.4
  same = jnp.asarray(child[:, :, None] == child[:, None, :])
  same_parent = jnp.asarray(parent[:, :, None] == parent[:, None, :])
  value, visits, parent_visits, first = search_lib.child_values(same, jnp.asarray(kept),
                                                                jnp.asarray(verified), same_parent)
  for i in range(b):
    for j in range(r):
      if not kept[i, j]:
        assert int(visits[i, j]) == 0 and not first[i, j]
        continue
      group = [m for m in range(r) if kept[i, m] and child[i, m] == child[i, j]]
      assert int(visits[i, j]) == len(group)
      assert float(value[i, j]) == pytest.approx(np.mean(verified[i, group]))
      assert int(parent_visits[i, j]) == sum(kept[i, m] and parent[i, m] == parent[i, j]
                                             for m in range(r))
      assert bool(first[i, j]) == (group[0] == j)
  bonus = search_lib.exploration_bonus(visits, parent_visits, 0.7)
  n, big_n = np.asarray(visits), np.asarray(parent_visits)
  want = np.where(n > 0, 0.7 * np.sqrt(np.log(np.maximum(big_n, 1)) / np.maximum(n, 1)), 0.0)
  np.testing.assert_allclose(np.asarray(bonus), want, rtol=1e-6)


def test_select_takes_the_best_eligible_and_breaks_ties_by_order():
  score = jnp.asarray([[0.5, 0.9, 0.9, 0.1, 0.7], [0.2, 0.2, 0.2, 0.2, 0.2],
                       [0.3, 0.6, 0.3, 0.6, 0.3]])
  eligible = jnp.asarray([[1, 0, 1, 1, 1], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1]], bool)
  index, valid = search_lib.select(score, eligible, 3)
  assert np.asarray(index[0]).tolist() == [2, 4, 0]
  assert np.asarray(valid).tolist() == [[True, True, True], [True, False, False],
                                        [True, True, True]]
  assert int(index[1, 0]) == 3
  assert np.asarray(index[2]).tolist() == [1, 3, 0]  # equal scores: the earlier row first


def test_a_step_is_extended_even_when_its_first_rollout_ran_long(monkeypatch):
  """Whether one rollout's response fit in N says nothing about its step: a step whose first
  rollout was too long (but another through it fit) is still extended at the next level."""
  levels = iter([[[2, SEP, 2, EOS, PAD, PAD]] * 2,  # level 1 (the root twice): child 2 SEP
                 [[2, SEP, 5, 5, 5, EOS], [2, SEP, EOS, PAD, PAD, PAD]],  # 2 + 6 > 6: no fit
                 [[GOOD, EOS, PAD, PAD, PAD, PAD]] * 2])

  def fake_sample(config, params, prompts, mask, rng, sc, temperature=None):
    tokens = jnp.asarray(next(levels), jnp.int32)
    m = jnp.cumsum(tokens == EOS, axis=1) - (tokens == EOS) == 0
    m = m & ((tokens != PAD) | (jnp.arange(6)[None] == 0))
    lengths = jnp.sum(m, axis=1)
    zeros = jnp.zeros(tokens.shape, jnp.float32)
    return sampling.Rollout(prompt_tokens=prompts, prompt_mask=mask, tokens=tokens,
                            logprobs=zeros, model_logprobs=zeros, mask=m, lengths=lengths,
                            entropy=zeros, truncated=jnp.zeros(tokens.shape[0], bool))

  monkeypatch.setattr(search_lib.sampling, "sample", fake_sample)
  mc = models.ModelConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=1, num_kv_heads=1, head_dim=8, eos_token_ids=(EOS,),
                          pad_token_id=PAD)
  batch = {"prompt_tokens": jnp.asarray([[5, 2]], jnp.int32), "prompt_mask": jnp.ones((1, 2), bool),
           "answer_tokens": jnp.zeros((1, 1), jnp.int32), "answer_mask": jnp.ones((1, 1), bool)}
  sc = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, eos_ids=(EOS,), pad_id=PAD)
  config = SearchConfig(width=1, depth=3, bonus=0.0, separator=(SEP,))
  found, _ = search_lib.tree_search(mc, None, batch, jax.random.key(0), sc, toy_verifier, config,
                                    PAD)
  assert np.asarray(found.live).tolist() == [True] * 6  # level 3 extends 2 SEP 2 SEP
  traces, tmask = np.asarray(found.traces.tokens), np.asarray(found.traces.mask)
  assert traces[4][tmask[4]].tolist() == [2, SEP, 2, SEP, GOOD, EOS]
  assert np.asarray(found.solution).tolist() == [False] * 4 + [True, False]


# ---- a tiny model and a toy verifier --------------------------------------------------------------


def toy_verifier(tokens, mask, answer_tokens, answer_mask):
  """1 iff the response stops (EOS within the mask) and holds a GOOD token before it."""
  eos = (tokens == EOS) & mask
  has_eos = eos.any(axis=1)
  before = jnp.arange(tokens.shape[1])[None] < jnp.argmax(eos, axis=1)[:, None]
  return (has_eos & ((tokens == GOOD) & mask & before).any(axis=1)).astype(jnp.float32)


@pytest.fixture(scope="module")
def toy():
  mc = models.ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=5,
                          eos_token_ids=(EOS,), pad_token_id=PAD).validate()
  params = models.init_params(mc, jax.random.key(3))
  batch = {"prompt_tokens": jnp.asarray([[5, 2]], jnp.int32),
           "prompt_mask": jnp.ones((1, 2), bool),
           "answer_tokens": jnp.zeros((1, 1), jnp.int32), "answer_mask": jnp.ones((1, 1), bool)}
  return mc, params, batch


def run_search(mc, params, batch, seed, sc, config):
  """`tree_search` jitted (params and batch as arguments: nothing large is folded into it)."""
  return jax.jit(lambda p, b: search_lib.tree_search(mc, p, b, jax.random.key(seed), sc,
                                                     toy_verifier, config, PAD))(params, batch)


def exact_value(mc, params, context, response, remaining):
  """P(a continuation of `response` after `context` stops within `remaining` tokens with a GOOD
  token in the response) under the model at T = 1: every continuation enumerated."""
  if remaining == 0:
    return 0.0
  logits = models.forward(mc, params, jnp.asarray([context + response], jnp.int32))[0, -1]
  probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)), np.float64)
  total = 0.0
  for t in range(VOCAB):
    if t == EOS:
      total += probs[t] * float(GOOD in response)
    else:
      total += probs[t] * exact_value(mc, params, context, response + [t], remaining - 1)
  return total


def test_step_values_match_exhaustive_enumeration(toy):
  """Each child's Monte-Carlo value (the share of the rollouts through it that verify) against
  the exact probability, enumerated over every continuation of its steps, at both levels."""
  mc, params, batch = toy
  n_tok = 4
  sc = sampling.SamplingConfig(max_new_tokens=n_tok, temperature=1.0, n=1024, eos_ids=(EOS,),
                               pad_id=PAD)
  config = SearchConfig(width=2, depth=2, bonus=0.0, separator=(SEP,))
  found, _ = run_search(mc, params, batch, 0, sc, config)
  tokens, mask = np.asarray(found.node_tokens), np.asarray(found.node_mask)
  visits, value = np.asarray(found.node_visits), np.asarray(found.node_value)
  first = np.asarray(found.node_weight) > 0
  rows_per_level = 2 * 1024
  checked = {1: 0, 2: 0}
  for i in np.flatnonzero(first & (visits >= 50)):
    child = tokens[i][mask[i]].tolist()
    if child[-1] == EOS:  # a finished response: its value is its verdict
      want = float(GOOD in child[:-1])
    else:
      want = exact_value(mc, params, [5, 2], child, n_tok - len(child))
    n = visits[i]
    tol = 4.5 * math.sqrt(max(want * (1 - want), 1.0 / n) / n) + 1e-4
    assert abs(value[i] - want) <= tol, (child, value[i], want, n)
    checked[1 + i // rows_per_level] += 1
  assert checked[1] >= 4 and checked[2] >= 2, checked  # both levels have well-visited children


def test_level_two_extends_the_selected_children(toy):
  """The second level's rollouts start from the nodes the first level selected: with bonus 0,
  the highest-valued distinct children that end on a separator and leave room."""
  mc, params, batch = toy
  sc = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0, n=64, eos_ids=(EOS,), pad_id=PAD)
  config = SearchConfig(width=2, depth=2, bonus=0.0, separator=(SEP,))
  found, _ = run_search(mc, params, batch, 1, sc, config)
  r = 2 * 64
  tokens, mask = np.asarray(found.node_tokens), np.asarray(found.node_mask)
  value, first = np.asarray(found.node_value), np.asarray(found.node_weight) > 0
  level1 = [(tokens[i][mask[i]].tolist(), value[i]) for i in range(r) if first[i]]
  eligible = [(c, v) for c, v in level1 if c[-1] == SEP and len(c) < 4]
  best = sorted(eligible, key=lambda cv: -cv[1])[:2]  # stable: ties keep the sampling order
  traces, tmask = np.asarray(found.traces.tokens), np.asarray(found.traces.mask)
  starts = {tuple(traces[i][tmask[i]].tolist()[:len(best[0][0])]) for i in range(r, r + 64)}
  assert starts == {tuple(best[0][0])}
  starts = {tuple(traces[i][tmask[i]].tolist()[:len(best[1][0])]) for i in range(r + 64, 2 * r)}
  assert starts == {tuple(best[1][0])}


def _level_starts(found, r, k, width):
  """The steps each second-level node extends (read off its rollouts' responses: their common
  prefix), one per beam slot."""
  traces, tmask = np.asarray(found.traces.tokens), np.asarray(found.traces.mask)
  starts = []
  for slot in range(width):
    rows = [traces[i][tmask[i]].tolist() for i in range(r + slot * k, r + (slot + 1) * k)]
    common = rows[0]
    for row in rows[1:]:
      n = 0
      while n < min(len(common), len(row)) and common[n] == row[n]:
        n += 1
      common = common[:n]
    starts.append(common)
  return starts


def test_the_value_head_steers_the_selection(toy):
  """With lambda = 1 and no bonus the next beam is the children the value function ranks
  highest (here one that counts GOOD tokens in the child), whatever their rollout values."""
  mc, params, batch = toy
  k = 32
  sc = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0, n=k, eos_ids=(EOS,), pad_id=PAD)
  config = SearchConfig(width=2, depth=2, bonus=0.0, value_weight=1.0, separator=(SEP,))

  def value_fn(p, tokens, mask, prompt_tokens, prompt_mask):
    return jnp.sum((tokens == 2) & mask, axis=1).astype(jnp.float32) - 0.01 * jnp.sum(mask, 1)

  found, _ = jax.jit(lambda p, b: search_lib.tree_search(
      mc, p, b, jax.random.key(6), sc, toy_verifier, config, PAD, value_fn))(params, batch)
  r = 2 * k
  tokens, mask = np.asarray(found.node_tokens), np.asarray(found.node_mask)
  first = np.asarray(found.node_weight) > 0
  kids = [tokens[i][mask[i]].tolist() for i in range(r) if first[i]]
  eligible = [c for c in kids if c[-1] == SEP and len(c) < 4]
  rank = lambda c: c.count(2) - 0.01 * len(c)
  want = sorted(eligible, key=lambda c: -rank(c))[:2]
  got = _level_starts(found, r, k, 2)
  assert [rank(g[:len(w)]) for g, w in zip(got, want)] == [rank(w) for w in want]
  assert all(g[:len(w)] == w for g, w in zip(got, want)), (got, want)


def test_verified_only_sends_unproven_slots_back_to_the_root(toy):
  """`verified_only`: a slot whose best child has no verified rollout samples the problem anew
  (its rollouts start from the bare prompt); a child with one is extended."""
  mc, params, batch = toy
  k = 64
  sc = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0, n=k, eos_ids=(EOS,), pad_id=PAD)
  config = SearchConfig(width=2, depth=2, bonus=0.0, separator=(SEP,), verified_only=True)
  found, _ = run_search(mc, params, batch, 7, sc, config)
  r = 2 * k
  tokens, mask = np.asarray(found.node_tokens), np.asarray(found.node_mask)
  value, first = np.asarray(found.node_value), np.asarray(found.node_weight) > 0
  eligible = sorted([(tokens[i][mask[i]].tolist(), value[i]) for i in range(r)
                     if first[i] and tokens[i][mask[i]][-1] == SEP and mask[i].sum() < 4],
                    key=lambda cv: -cv[1])[:2]
  got = _level_starts(found, r, k, 2)
  assert np.asarray(found.live).all()  # every slot samples
  for (child, v), start in zip(eligible, got):
    if v > 0:
      assert start[:len(child)] == child
    else:  # rollouts from the root: their first steps differ
      assert start[:len(child)] != child or len(start) < len(child)
  assert any(v > 0 for _, v in eligible) and any(v == 0 for _, v in eligible)


@pytest.mark.parametrize("budget", [10, pytest.param(40, marks=pytest.mark.slow)])
def test_the_token_budget_is_respected_exactly(toy, budget):
  mc, params, batch = toy
  batch = jax.tree.map(lambda x: jnp.concatenate([x, x, x]), batch)  # 3 problems
  sc = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, n=4, eos_ids=(EOS,), pad_id=PAD)
  config = SearchConfig(width=2, depth=3, bonus=0.5, token_budget=budget, separator=(SEP,))
  found, _ = run_search(mc, params, batch, 2, sc, config)
  live, kept = np.asarray(found.live).reshape(3, -1), np.asarray(found.kept).reshape(3, -1)
  sampled = np.asarray(found.sampled).reshape(3, -1)
  used = np.asarray(found.tokens_used)
  for b in range(3):
    assert not (kept[b] & ~live[b]).any()
    order = np.flatnonzero(live[b])  # the rows the search sampled for real, in sampling order
    k = kept[b][order]
    assert used[b] == sampled[b][kept[b]].sum()
    assert used[b] <= budget
    assert (k == (np.arange(len(k)) < k.sum())).all()  # a prefix of the sampling order
    if not k.all():  # the first rollout left out would not have fitted
      assert used[b] + sampled[b][order[k.sum()]] > budget
  assert (~kept & live).any()  # the budget bound (at 40 too: 3 levels of 8 rollouts need more)


def test_solutions_are_the_distinct_verified_traces(toy):
  mc, params, batch = toy
  sc = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0, n=16, eos_ids=(EOS,), pad_id=PAD)
  config = SearchConfig(width=2, depth=2, bonus=0.5, separator=(SEP,))
  found, metrics = run_search(mc, params, batch, 4, sc, config)
  traces, tmask = np.asarray(found.traces.tokens), np.asarray(found.traces.mask)
  seen, want = set(), []
  for i in range(traces.shape[0]):
    t = tuple(traces[i][tmask[i]].tolist())
    ok = bool(found.kept[i]) and EOS in t and GOOD in t[:t.index(EOS)] and len(t) <= 4
    want.append(ok and t not in seen)
    if ok:
      seen.add(t)
  assert np.asarray(found.solution).tolist() == want and sum(want) > 0
  assert metrics["search/solutions"] == sum(want)


def test_best_of_n_at_a_budget_counts_distinct_verified_samples(toy):
  mc, params, batch = toy
  batch = jax.tree.map(lambda x: jnp.concatenate([x, x]), batch)
  sc = sampling.SamplingConfig(max_new_tokens=4, temperature=1.0, n=32, eos_ids=(EOS,), pad_id=PAD)
  budget = jnp.asarray([20, 60], jnp.int32)
  got = jax.jit(lambda p, b: search_lib.sampling_solutions(mc, p, b, jax.random.key(5), sc,
                                                           toy_verifier, budget))(params, batch)
  out = sampling.sample(mc, params, batch["prompt_tokens"], batch["prompt_mask"],
                        jax.random.key(5), sc)
  tokens, mask = np.asarray(out.tokens).reshape(2, 32, -1), np.asarray(out.mask).reshape(2, 32, -1)
  for b in range(2):
    spent, seen, closed = 0, set(), False
    for j in range(32):
      t = tuple(tokens[b, j][mask[b, j]].tolist())
      if closed or spent + len(t) > int(budget[b]):
        closed = True
        continue
      spent += len(t)
      if EOS in t and GOOD in t[:t.index(EOS)]:
        seen.add(t)
    assert int(got["tokens"][b]) == spent and int(got["solutions"][b]) == len(seen)
    assert bool(got["exhausted"][b]) == closed


# ---- the spec -------------------------------------------------------------------------------------


def _found(rng, b=2, per=6, p=3, n=5):
  rows = b * per
  mask = np.arange(n)[None] < rng.integers(1, n + 1, size=rows)[:, None]
  node_mask = np.arange(n)[None] < rng.integers(1, n, size=rows)[:, None]
  traces = sampling.Rollout(
      prompt_tokens=jnp.asarray(rng.integers(2, 6, size=(rows, p)), jnp.int32),
      prompt_mask=jnp.ones((rows, p), bool),
      tokens=jnp.asarray(rng.integers(2, 6, size=(rows, n)), jnp.int32),
      logprobs=jnp.zeros((rows, n)), model_logprobs=jnp.zeros((rows, n)),
      mask=jnp.asarray(mask), lengths=jnp.asarray(mask.sum(1)))
  return SearchOut(traces=traces, solution=jnp.asarray(rng.random(rows) < 0.6),
                   node_tokens=jnp.asarray(rng.integers(2, 6, size=(rows, n)), jnp.int32),
                   node_mask=jnp.asarray(node_mask),
                   node_value=jnp.asarray(rng.random(rows), jnp.float32),
                   node_weight=jnp.asarray(rng.random(rows) < 0.7, jnp.float32),
                   node_visits=jnp.ones(rows, jnp.int32), live=jnp.ones(rows, bool),
                   kept=jnp.ones(rows, bool), sampled=jnp.ones(rows, jnp.int32),
                   tokens_used=jnp.zeros(b, jnp.int32))


@pytest.mark.parametrize("max_per_prompt", [0, 2])
def test_rows_and_loss_match_numpy(max_per_prompt):
  rng = np.random.default_rng(max_per_prompt)
  found = _found(rng)
  spec = RestMCTS(max_per_prompt=max_per_prompt, vf_coef=0.3, pad_id=PAD)
  batch = {"prompt_tokens": jnp.zeros((2, 3), jnp.int32)}
  rows = spec.build(batch, found, None, LogProbs(old=None, ref=None))
  r = found.solution.shape[0]
  sol = np.asarray(found.solution).reshape(2, -1)
  keep = sol & (np.cumsum(sol, axis=1) <= max_per_prompt) if max_per_prompt else sol
  want_mask = np.asarray(found.traces.mask) & keep.reshape(-1)[:, None]
  np.testing.assert_array_equal(np.asarray(rows["mask"][:r]), want_mask)
  assert not np.asarray(rows["mask"][r:]).any() and not np.asarray(rows["value_pos"][:r]).any()
  node_len = np.asarray(found.node_mask).sum(1)
  for i in range(r):  # each value row: the child's steps, then the slot the value is read at
    assert np.asarray(rows["tokens"][r + i])[:node_len[i]].tolist() == \
        np.asarray(found.node_tokens[i])[:node_len[i]].tolist()
    assert np.flatnonzero(np.asarray(rows["value_pos"][r + i])).tolist() == [node_len[i]]
  logp = jnp.asarray(-rng.random((2 * r, 5)), jnp.float32)
  values = jnp.asarray(rng.random((2 * r, 5)), jnp.float32)
  loss, aux = spec.loss((logp, values), rows)
  m = np.asarray(rows["mask"])
  nll = -(np.asarray(logp) * m).sum() / max(m.sum(), 1)
  v = np.asarray(values)[np.arange(r, 2 * r), node_len]
  w, target = np.asarray(found.node_weight), np.asarray(found.node_value)
  mse = (w * (v - target) ** 2).sum() / max(w.sum(), 1)
  assert float(aux["nll"]) == pytest.approx(nll, rel=1e-5)
  assert float(aux["value_mse"]) == pytest.approx(mse, rel=1e-5)
  assert float(loss) == pytest.approx(nll + 0.3 * 0.5 * mse, rel=1e-5)


def test_value_fn_reads_the_head_after_the_child(toy):
  """The search's value-head estimate is the head on the state after the child's last token:
  equal to the head on a forward of the prompt and the child alone."""
  mc, params, batch = toy
  spec = RestMCTS(pad_id=PAD)
  params = spec.init_params(params)
  params["value_head"]["kernel"] = jax.random.normal(jax.random.key(0), (32, 1))
  tokens = jnp.asarray([[2, SEP, 3, 0], [3, 0, 0, 0]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  got = spec.value_fn(mc)(params, tokens, mask, jnp.repeat(batch["prompt_tokens"], 2, axis=0),
                          jnp.ones((2, 2), bool))
  for i, n in enumerate([3, 1]):
    seq = jnp.asarray([[5, 2] + tokens[i, :n].tolist()], jnp.int32)
    _, hidden = models.forward(mc, params, seq, return_hidden=True)
    want = hidden[0, -1].astype(jnp.float32) @ params["value_head"]["kernel"][:, 0] \
        + params["value_head"]["bias"][0]
    assert float(got[i]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


# ---- the config -----------------------------------------------------------------------------------

TINY = ["warmup.rounds=2", "rounds=3", "eval.every_rounds=3", "eval.num_examples=8",
        "eval.batch_size=8", "data.batch_size=4", "sampling.n=2", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_layers=1", "progress_bar=false", "mesh.data=1",
        "eval.judge_samples=0", "metrics.plot_every_rounds=0", "checkpoint.every_rounds=0"]


def _no_scorer(*args):  # a scorer reference that imports (validation imports it first)
  raise AssertionError("never called")


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.reward=likelihood"], "algorithm.reward: rest_mcts values steps"),
    (["algorithm.scorer=tests.test_search:_no_scorer"], "algorithm.scorer: rest_mcts"),
    (["sampling.temperature=0"], "sampling.temperature: 0"),
    (["sampling.auto_temperature=0.5,1.0"], "sampling.auto_temperature: rest_mcts"),
    (["population.size=2"], "population.size: 2 members with rest_mcts"),
    (["algorithm.search_token_budget=10"], "algorithm.search_token_budget: 10 is below"),
    (["algorithm.search_value_weight=1.5"], "algorithm.search_value_weight"),
    (["algorithm.search_width=0"], "algorithm.search_width"),
    (["algorithm.search_value_warmup=true", "warmup.rounds=0"],
     "algorithm.search_value_warmup: True trains the value head in the SFT warm-up"),
    (["algorithm.reward_threshold=0.5"], "algorithm.reward_threshold: 0.5: rest_mcts keeps"),
])
def test_rest_mcts_refuses_what_it_would_ignore(overrides, message):
  cfg = config_lib.load_config("configs/rest_mcts.py", TINY + overrides)
  with pytest.raises(ConfigError, match=message):
    config_validation.validate(cfg)


def test_the_separator_comes_from_the_task_or_the_config(tmp_path):
  cfg = config_lib.load_config("configs/rest_mcts.py", TINY)
  run = setup.build(cfg, tmp_path / "cd")
  assert run.spec.search.separator == tuple(run.tokenizer.encode(" "))
  cfg = config_lib.load_config("configs/rest_mcts.py:task=arithmetic", TINY)
  with pytest.raises(ConfigError, match="algorithm.search_separator: data.task='arithmetic'"):
    setup.build(cfg, tmp_path / "ar")
  cfg.algorithm.search_separator = "+"
  run = setup.build(cfg, tmp_path / "ar")
  assert run.spec.search.separator == (run.tokenizer.piece_to_id("+"),)
  cfg.algorithm.search_separator = "+="
  with pytest.raises(ConfigError, match="encodes to 2 tokens"):
    setup.build(cfg, tmp_path / "ar")


@pytest.mark.slow
def test_a_run_searches_trains_the_value_head_and_compares_with_sampling(tmp_path):
  cfg = config_lib.load_config("configs/rest_mcts.py",
                               TINY + ["algorithm.search_token_budget=120",
                                       "algorithm.search_value_weight=0.5",
                                       "algorithm.search_value_warmup=true",
                                       "checkpoint.every_rounds=1"])
  config_validation.validate(cfg)
  train.train_and_evaluate(cfg, tmp_path)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rounds = [m for m in lines if m.get("phase") == "rest_mcts"]
  assert len(rounds) == 3
  for m in rounds:
    assert 0 < m["search/tokens"] <= 120
    assert m["train/value_mse"] >= 0 and np.isfinite(m["train/loss"])
  last = [m for m in lines if "eval/search_solutions" in m][-1]
  assert last["eval/search_tokens"] <= 120 and last["eval/sampling_tokens"] <= 120
  assert 0 <= last["eval/search_solved"] <= 1 and 0 <= last["eval/sampling_solved"] <= 1
  warm = [m for m in lines if m.get("phase") == "warmup"]
  assert all(m["train/value_mse"] >= 0 for m in warm)  # the value head trains in the warm-up
  # examples/search_study.py (the docs' search-vs-sampling tables) on the run's checkpoint
  spec = importlib.util.spec_from_file_location("search_study", "examples/search_study.py")
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  out = tmp_path / "study.json"
  got = study.main([f"--workdir={tmp_path}", "--examples=8", "--variant=",
                    "--variant=algorithm.search_bonus=0,sampling.n=3", f"--out={out}"])
  assert json.loads(out.read_text()) == got and len(got) == 2
  assert got[0]["round"] == 5 and got[1]["variant"] == "algorithm.search_bonus=0,sampling.n=3"
  assert all(g["eval/search_tokens"] <= 120 and g["examples"] == 8 for g in got)
  with pytest.raises(SystemExit, match="does not set a search key"):
    study.main([f"--workdir={tmp_path}", "--variant=model.num_layers=2"])


def test_value_warmup_rows_are_gold_and_broken_step_prefixes(tmp_path):
  """`algorithm.search_value_warmup` (Countdown): each gold response cut after one of its steps
  (target 1), and the same response with one step broken by the task's hard negatives, cut after
  that step (target 0); the gold SFT rows as usual."""
  from selfplay_jax.algorithms.search import ValueSFT
  from selfplay_jax.data import countdown
  from selfplay_jax.data import pipeline
  cfg = config_lib.load_config("configs/rest_mcts.py",
                               TINY + ["algorithm.search_value_warmup=true"])
  run = setup.build(cfg, tmp_path)
  spec = run.warmup_spec
  assert isinstance(spec, ValueSFT) and spec.separator == run.spec.search.separator
  tok = run.tokenizer
  batch = next(iter(pipeline.eval_batches(run.task, "train", 16, tokenizer=tok, batch_size=16,
                                          **setup.data_lengths(cfg))))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  rows = spec.build(batch, None, None, None)
  b = 16
  np.testing.assert_array_equal(np.asarray(rows["mask"][:b]), np.asarray(batch["response_mask"]))
  assert not np.asarray(rows["mask"][b:]).any()
  target, weight = np.asarray(rows["value_target"]), np.asarray(rows["value_weight"])
  assert (target[b:2 * b] == 1).all() and (target[2 * b:] == 0).all() and (weight[:b] == 0).all()
  space = tok.encode(" ")[0]
  for i in range(b):
    numbers, t = (lambda a: (a.split("=")[0].split(","), int(a.split("=")[1])))(
        tok.decode([x for x, m in zip(np.asarray(batch["answer_tokens"][i]),
                                      np.asarray(batch["answer_mask"][i])) if m]))
    gold = [int(x) for x, m in zip(np.asarray(batch["response_tokens"][i]),
                                   np.asarray(batch["response_mask"][i])) if m]
    for j, ok_target in ((b + i, 1), (2 * b + i, 0)):
      if weight[j] == 0:
        continue
      pos = np.flatnonzero(np.asarray(rows["value_pos"][j]))
      assert len(pos) == 1
      prefix = np.asarray(rows["tokens"][j])[:pos[0]].tolist()
      assert prefix[-1] == space  # cut right after a step
      steps = tok.decode(prefix).split()
      if ok_target:  # the gold response's own steps
        assert gold[:len(prefix)] == prefix
      else:  # one of them broken, the last one: the prefix is no valid start of a solution
        assert gold[:len(prefix)] != prefix
        assert gold[:len(prefix) - len(tok.encode(steps[-1])) - 1] == \
            prefix[:len(prefix) - len(tok.encode(steps[-1])) - 1]
        assert not countdown.check_solution([int(n) for n in numbers], t,
                                            " ".join(steps) + f" ####{t}")
  assert weight[b:].sum() >= b  # most rows have a step to cut after
  cfg.data.task = "arithmetic"
  cfg.data.difficulty = 1
  cfg.algorithm.search_separator = "+"
  with pytest.raises(ConfigError, match="algorithm.search_value_warmup"):
    setup.build(cfg, tmp_path / "ar")


def test_search_keys_are_refused_for_other_algorithms():
  cfg = config_lib.load_config("configs/rest_em.py", TINY + ["algorithm.search_width=3"])
  with pytest.raises(ConfigError, match="algorithm.search_width: 3 sets rest_mcts's tree search"):
    config_validation.validate(cfg)
  defaults = config_lib.load_config("configs/default.py").algorithm
  assert {k: defaults[k] for k in config_validation.SEARCH_DEFAULTS} == \
      config_validation.SEARCH_DEFAULTS
