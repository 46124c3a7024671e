"""Tree-search rollouts with process values (ReST-MCTS*, Zhang et al. 2024), as fixed-shape arrays
inside the jitted round (docs/algorithms.md, "Tree search with process values").

A step-level beam search over partial solutions, level by level (`tree_search`):

  level d:  every beam node (W per problem: a prompt and the steps chosen so far) is extended by
            K = `sampling.n` rollouts to the end (one sampler call for all B * W * K rows; the
            prompt is the problem followed by the node's steps);
            each rollout's first step (up to and including the first separator token, or its
            stop token) makes a child: the node's steps plus that step;
            a child's value is the fraction of the rollouts through it (its siblings that drew the
            same step) that the verifier accepts, with n = how many they are: the Monte-Carlo
            value of the step (`child_values`);
            children are scored by value + c * sqrt(ln N / n), N the parent's rollouts (UCT's
            exploration bonus), optionally mixed with the process value head's estimate; the W
            best distinct children that are not finished become the next beam (`select`).
  level 1:  the root (the bare problem) fills the W slots, so it gets W * K rollouts.

Every rollout is a complete response: the verified ones, distinct across all levels, are the
solutions the search found; the spec (`algorithms/search.py`, `RestMCTS`) trains on them and on
the children's values. This module calls the sampler, so it sits beside the round (as SCoRe's
episode, `round.two_attempts`), not among the specs.

Budget: the tokens the search samples are counted per problem, in sampling order (level by level,
node by node); a rollout whose tokens would take its problem past `token_budget` is dropped with
every rollout after it, in this level and the later ones (`within_budget`): it is never read (no
value, no solution). The fixed-shape
sampler still computes the dropped rows; what the budget bounds is the tokens the search uses,
exactly. Everything runs in the round's jit; nothing runs on the host.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from selfplay_jax import sampling
from selfplay_jax.algorithms.search import SearchConfig
from selfplay_jax.models.config import ModelConfig
from selfplay_jax.rows import Rows, right_pack
from selfplay_jax.scoring import bstar
from selfplay_jax.scoring.verifiers import Verifier

Array = jax.Array


@flax.struct.dataclass
class SearchOut:
  """What one search gives the round (every array has B * L rows, L = D * W * K per problem, in
  problem-major order: problem b's rows are b * L ... b * L + L - 1, level by level)."""

  traces: sampling.Rollout  # the complete responses (prefix steps + rollout), width N
  solution: Array  # bool [B*L]: verified, within the budget, the first of its kind in the problem
  node_tokens: Array  # int32 [B*L, N] each child's steps then one free slot (the value position)
  node_mask: Array  # bool [B*L, N] the child's steps
  node_value: Array  # float32 [B*L] the child's Monte-Carlo value
  node_weight: Array  # float32 [B*L] 1 for a distinct child within the budget with room for the slot
  node_visits: Array  # int32 [B*L] the rollouts through the child (0 if not kept)
  live: Array  # bool [B*L] the rollout's node was a real one (not an empty beam slot)
  kept: Array  # bool [B*L] live, and within the budget
  sampled: Array  # int32 [B*L] the rollout's own sampled tokens (its steps' prefix excluded)
  tokens_used: Array  # int32 [B] tokens the search sampled and read, per problem


def within_budget(cost_BxR: Array, spent_B: Array, closed_B: Array, budget) -> tuple:
  """Which rows fit, in order: row r of problem b is kept iff the problem is still open and
  `spent[b] + cost[b, :r + 1].sum() <= budget[b]`; the first row that does not fit closes the
  problem, so nothing after it (in this call or a later one) is kept: the kept rows are a prefix
  of the sampling order. `budget`: an int or int32 [B]; 0 = no limit. Returns (kept [B, R], new
  spent [B], new closed [B])."""
  cost = cost_BxR.astype(jnp.int32)
  budget = jnp.broadcast_to(jnp.asarray(budget, jnp.int32), spent_B.shape)
  fits = (spent_B[:, None] + jnp.cumsum(cost, axis=1) <= budget[:, None]) | (budget[:, None] <= 0)
  kept = fits & ~closed_B[:, None]
  closed = closed_B | ~jnp.all(fits, axis=1)
  return kept, spent_B + jnp.sum(jnp.where(kept, cost, 0), axis=1), closed


def first_step(tokens_RxN: Array, mask_RxN: Array, separator: tuple[int, ...], eos) -> tuple:
  """(step length [R], ends a response [R], ends with a separator [R]) of each completion's first
  step: the tokens up to and including the first separator; without one, the whole completion
  (which then either stopped on a stop token, a finished response, or was cut off)."""
  sep = jnp.isin(tokens_RxN, jnp.asarray(separator or (-1,), jnp.int32)) & mask_RxN
  has_sep = sep.any(axis=1)
  lengths = jnp.sum(mask_RxN, axis=1).astype(jnp.int32)
  step_len = jnp.where(has_sep, jnp.argmax(sep, axis=1) + 1, lengths)
  last = jnp.take_along_axis(tokens_RxN, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
  finished = ~has_sep & (lengths > 0) & jnp.isin(last, jnp.asarray(eos, jnp.int32))
  return step_len, finished, has_sep


def _same_rows(tokens_BxRxN: Array, mask_BxRxN: Array) -> Array:
  """[B, R, R]: rows i and j of a problem hold the same masked tokens."""
  t = jnp.where(mask_BxRxN, tokens_BxRxN, -1)
  return jnp.all(t[:, :, None] == t[:, None, :], axis=-1)


def child_values(same_BxRxR: Array, kept_BxR: Array, verified_BxR: Array,
                 same_parent_BxRxR: Array) -> tuple[Array, Array, Array, Array]:
  """Per child (one per rollout): (value, visits n, parent visits N, first of its kind), [B, R].

  The child of rollout i is shared by every kept rollout j with the same child prefix
  (`same[i, j]`): value_i = sum_j verified_j / n_i over them, n_i their number; N_i = the kept
  rollouts from i's parent. A child is the first of its kind when no kept j < i has it."""
  kept = kept_BxR.astype(bool)
  same = same_BxRxR & kept[:, :, None] & kept[:, None, :]
  n = jnp.sum(same, axis=2)
  value = jnp.sum(same * verified_BxR[:, None, :].astype(jnp.float32), axis=2) / jnp.maximum(n, 1)
  parent_n = jnp.sum(same_parent_BxRxR & kept[:, None, :], axis=2)
  r = same.shape[1]
  earlier = jnp.arange(r)[None, :] < jnp.arange(r)[:, None]  # [i, j]: j < i
  first = kept & ~jnp.any(same & earlier[None], axis=2)
  return value, n, parent_n, first


def exploration_bonus(visits_BxR: Array, parent_visits_BxR: Array, c: float) -> Array:
  """UCT's c * sqrt(ln N / n) (0 where n = 0)."""
  n = jnp.maximum(visits_BxR, 1).astype(jnp.float32)
  big_n = jnp.maximum(parent_visits_BxR, 1).astype(jnp.float32)
  return jnp.where(visits_BxR > 0, c * jnp.sqrt(jnp.log(big_n) / n), 0.0)


def select(score_BxR: Array, eligible_BxR: Array, width: int) -> tuple[Array, Array]:
  """The `width` highest-scoring eligible children per problem (ties: the earlier row): (row
  indices [B, W], valid [B, W]; a slot with no eligible child left is not valid)."""
  masked = jnp.where(eligible_BxR, score_BxR, -jnp.inf)
  top, index = jax.lax.top_k(masked, width)
  return index, jnp.isfinite(top)


def _concat_pack(a_tokens, a_mask, b_tokens, b_mask, pad_id):
  """Each row's masked tokens of `a`, then of `b`, packed to the left: ([R, A+B], mask)."""
  return right_pack(jnp.concatenate([a_tokens, b_tokens], axis=1),
                    jnp.concatenate([a_mask, b_mask], axis=1), pad_id)


def tree_search(model_config: ModelConfig, params, batch: Rows, rng,
                sampling_config: sampling.SamplingConfig, verifier: Verifier,
                search: SearchConfig, pad_id: int = 0, value_fn=None,
                balance: bstar.Balance | None = None, num_samples: int = 0):
  """The search of the module docstring over the batch's prompts. `sampling_config.n` = K, its
  `max_new_tokens` = N (a response's width: steps and rollout together). `value_fn(params, tokens,
  mask)` -> float32 [R] (the process value head at each row's free slot) is read when
  `search.value_weight` > 0. The B-STaR monitor (`bstar/*`, n* and τ from `balance`) reads the
  first level's rollouts, plain samples of each problem (a dropped one counts as not verified).
  With `num_samples`, the metrics carry the first responses (problem by problem, level by level)
  under `samples/*` for the sample dumps. Returns (`SearchOut`, metrics)."""
  sc = sampling_config
  w, k, n_tok = search.width, sc.n, sc.max_new_tokens
  prompts, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"].astype(bool)
  b = prompts.shape[0]
  r = w * k  # rollouts per problem and level
  eos = sc.eos_ids or model_config.eos_token_ids or (-1,)
  prefix = jnp.full((b, w, n_tok), pad_id, jnp.int32)
  prefix_mask = jnp.zeros((b, w, n_tok), bool)
  valid = jnp.ones((b, w), bool)  # level 1: the root in every slot
  spent, closed = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)
  answers = {key: jnp.repeat(batch[key], r, axis=0) for key in ("answer_tokens", "answer_mask")}
  per_level = []
  for level, key in enumerate(jax.random.split(rng, search.depth)):
    flat_prefix, flat_pmask = prefix.reshape(b * w, n_tok), prefix_mask.reshape(b * w, n_tok)
    q, q_mask = _concat_pack(jnp.repeat(prompts, w, axis=0), jnp.repeat(prompt_mask, w, axis=0),
                             flat_prefix, flat_pmask, pad_id)
    out = sampling.sample(model_config, params, q, q_mask, key, sc)  # [B*W*K] rows
    rep_prefix = jnp.repeat(flat_prefix, k, axis=0)
    rep_pmask = jnp.repeat(flat_pmask, k, axis=0)
    prefix_len = jnp.sum(rep_pmask, axis=1)
    trace, trace_mask = _concat_pack(rep_prefix, rep_pmask, out.tokens, out.mask, pad_id)
    fits = prefix_len + out.lengths <= n_tok
    trace, trace_mask = trace[:, :n_tok], trace_mask[:, :n_tok]
    verified = (verifier(trace, trace_mask, answers["answer_tokens"], answers["answer_mask"])
                >= 1.0) & fits
    row_valid = jnp.repeat(valid.reshape(-1), k).reshape(b, r)
    kept, spent, closed = within_budget(jnp.where(row_valid, out.lengths.reshape(b, r), 0),
                                        spent, closed, search.token_budget)
    kept = kept & row_valid
    step_len, _, has_sep = first_step(out.tokens, out.mask, search.separator, eos)
    step_mask = jnp.arange(n_tok)[None] < step_len[:, None]
    child, child_mask = _concat_pack(rep_prefix, rep_pmask, out.tokens, out.mask & step_mask,
                                     pad_id)
    child, child_mask = child[:, :n_tok], child_mask[:, :n_tok]
    room = prefix_len + step_len < n_tok  # a free slot after the child (more steps, the value)
    shape = lambda x: x.reshape((b, r) + x.shape[1:])
    same = _same_rows(shape(child), shape(child_mask))
    parent = _same_rows(prefix, prefix_mask)  # [B, W, W]
    same_parent = jnp.repeat(jnp.repeat(parent, k, axis=1), k, axis=2)
    value, visits, parent_visits, first = child_values(same, kept, shape(verified), same_parent)
    score = value
    if search.value_weight > 0 and value_fn is not None:
      head = value_fn(params, child, child_mask, jnp.repeat(prompts, r, axis=0),
                      jnp.repeat(prompt_mask, r, axis=0))
      score = (1.0 - search.value_weight) * value + search.value_weight * shape(head)
    score = score + exploration_bonus(visits, parent_visits, search.bonus)
    # (room, not `fits`: whether this one rollout's response fit says nothing about the step)
    eligible = first & shape(has_sep & room)
    per_level.append(dict(
        trace=shape(trace), trace_mask=shape(trace_mask), lengths=shape(out.lengths),
        verified=shape(verified) & kept, kept=kept, child=shape(child),
        child_mask=shape(child_mask), value=value, visits=visits, weight=(first & shape(room)).astype(jnp.float32),
        live=row_valid))
    if level + 1 < search.depth:
      index, valid = select(score, eligible, w)
      take = lambda x: jnp.take_along_axis(x, index[:, :, None], axis=1)
      if search.verified_only:  # a slot without evidence goes back to the root
        valid = valid & (jnp.take_along_axis(value, index, axis=1) > 0)
      prefix = jnp.where(valid[:, :, None], take(shape(child)), pad_id)
      prefix_mask = take(shape(child_mask)) & valid[:, :, None]
      if search.verified_only:
        valid = jnp.ones_like(valid)
  cat = lambda name: jnp.concatenate([lv[name] for lv in per_level], axis=1)
  traces, traces_mask, verified = cat("trace"), cat("trace_mask"), cat("verified")
  total = traces.shape[1]
  # verified responses end on a stop token and have the filler after it: whole rows compare
  solution = bstar.distinct_first(traces.reshape(b * total, n_tok), verified.reshape(-1),
                                  total).reshape(b, total)
  flat = lambda x: x.reshape((b * total,) + x.shape[2:])
  trace_len = jnp.sum(traces_mask, axis=2).astype(jnp.int32)
  rollout = sampling.Rollout(
      prompt_tokens=jnp.repeat(prompts, total, axis=0),
      prompt_mask=jnp.repeat(prompt_mask, total, axis=0), tokens=flat(traces),
      logprobs=jnp.zeros((b * total, n_tok), jnp.float32),
      model_logprobs=jnp.zeros((b * total, n_tok), jnp.float32), mask=flat(traces_mask),
      lengths=flat(trace_len))
  result = SearchOut(traces=rollout, solution=flat(solution), node_tokens=flat(cat("child")),
                     node_mask=flat(cat("child_mask")), node_value=flat(cat("value")),
                     node_weight=flat(cat("weight") * cat("kept")),
                     node_visits=flat(cat("visits")), live=flat(cat("live")), kept=flat(cat("kept")),
                     sampled=flat(cat("lengths")), tokens_used=spent)
  first_kept = per_level[0]["kept"]
  solutions = jnp.sum(solution, axis=1).astype(jnp.float32)
  kept_all = cat("kept")
  metrics = {
      "search/solutions": jnp.mean(solutions),
      "search/solved_fraction": jnp.mean((solutions > 0).astype(jnp.float32)),
      "search/tokens": jnp.mean(spent.astype(jnp.float32)),
      "search/kept_fraction": jnp.mean(kept_all.astype(jnp.float32)),
      "search/value_mean": jnp.sum(cat("value") * cat("weight") * kept_all)
      / jnp.maximum(jnp.sum(cat("weight") * kept_all), 1.0),
      # the first level's rollouts are plain samples from the problem: the sample accuracy
      "train/accuracy": jnp.sum(per_level[0]["verified"]) / jnp.maximum(jnp.sum(first_kept), 1),
      "train/completion_len": jnp.sum(jnp.where(kept_all, cat("lengths"), 0))
      / jnp.maximum(jnp.sum(kept_all), 1),
  }
  if num_samples:
    k_dump = min(num_samples, b * total)
    metrics.update({"samples/prompt_tokens": rollout.prompt_tokens[:k_dump],
                    "samples/prompt_mask": rollout.prompt_mask[:k_dump],
                    "samples/tokens": rollout.tokens[:k_dump],
                    "samples/lengths": rollout.lengths[:k_dump],
                    "samples/rewards": flat(verified).astype(jnp.float32)[:k_dump]})
  level1 = per_level[0]
  v1 = level1["verified"].reshape(-1).astype(jnp.float32)
  metrics.update(bstar.monitor_metrics(v1, v1, level1["trace"].reshape(b * r, n_tok), r,
                                       balance or bstar.Balance()))
  return result, metrics


def sampling_solutions(model_config: ModelConfig, params, batch: Rows, rng,
                       sampling_config: sampling.SamplingConfig, verifier: Verifier,
                       budget_B: Array) -> dict[str, Array]:
  """Best-of-N at a token budget (the search's baseline): `sampling_config.n` independent samples
  per problem, kept in order while their tokens fit in `budget_B` (`within_budget`, the search's
  rule); per problem: distinct verified samples `solutions` [B], tokens used `tokens` [B], and
  `exhausted` [B] (a sample did not fit: the budget, not N, bounded it)."""
  sc = sampling_config
  out = sampling.sample(model_config, params, batch["prompt_tokens"], batch["prompt_mask"], rng,
                        sc)
  rep = lambda x: jnp.repeat(x, sc.n, axis=0)
  verified = verifier(out.tokens, out.mask, rep(batch["answer_tokens"]),
                      rep(batch["answer_mask"])) >= 1.0
  b = batch["prompt_tokens"].shape[0]
  kept, spent, closed = within_budget(out.lengths.reshape(b, sc.n), jnp.zeros((b,), jnp.int32),
                                      jnp.zeros((b,), bool), budget_B)
  ok = verified.reshape(b, sc.n) & kept
  distinct = bstar.distinct_first(out.tokens, ok.reshape(-1), sc.n).reshape(b, sc.n)
  return {"solutions": jnp.sum(distinct, axis=1), "tokens": spent, "exhausted": closed}
