"""Held-out evaluation: greedy accuracy, pass@k and, for a run with a judge, the judge meter
(`judge_meter`: how well the policy picks among its own samples); `selfplay-jax eval --workdir=W`
on a finished run.

The run is rebuilt by the composition root (`setup.py`), so evaluation restores exactly the state
layout training saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from selfplay_jax import checkpoint, run_config, sampling, setup, sharding
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.spec import option
from selfplay_jax.data import pipeline
from selfplay_jax.errors import CheckpointNotFoundError, ConfigError
from selfplay_jax.models import lora
from selfplay_jax.scoring import judge as judge_lib
from selfplay_jax.scoring import label_free, verifiers
from selfplay_jax import tree_search as search_lib


# ---- metrics -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _solved(mc, params, batch, verify, rng, sc: sampling.SamplingConfig):
  """(examples with at least one verified sample, valid examples) of one batch, as global sums."""
  out = sampling.sample(mc, params, batch["prompt_tokens"], batch["prompt_mask"], rng, sc)
  rep = lambda x: jnp.repeat(x, sc.n, axis=0)
  r = verify(out.tokens, out.mask, rep(batch["answer_tokens"]), rep(batch["answer_mask"]))
  any_ok = (r.reshape(-1, sc.n) >= 1.0).any(axis=1)
  valid = batch["valid"].astype(jnp.float32)
  return {"solved": jnp.sum(any_ok * valid), "total": jnp.sum(valid)}


def pass_rates(mc, params, batches, verify, sc: sampling.SamplingConfig, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, rules=None) -> float:
  """Fraction of examples with at least one of `sc.n` samples verified correct (pass@n); with
  `temperature=0, n=1` this is greedy accuracy. Each example counts once (`valid` masks padding).

  With a `mesh`, `batches` hold this process's rows (`pipeline.eval_batches` shards them) and
  are sampled sharded over the mesh's batch axes; the counts are summed over all processes."""
  sums = _batch_sums(lambda b, rng: _solved(mc, params, b, verify, rng, sc), batches, seed,
                     mesh, rules)
  return sums["solved"] / max(sums["total"], 1.0)


def _batch_sums(step, batches, seed: int, mesh, rules) -> dict[str, float]:
  """`step(batch, rng) -> {name: global scalar}` over the held-out batches (batch i gets
  `fold_in(key(seed), i)`), summed on the host; with a `mesh`, each batch holds this process's
  rows and is placed on the mesh first."""
  total: dict[str, float] = {}
  context = (sharding.activation_rules(mesh, rules or sharding.DEFAULT_RULES) if mesh is not None
             else contextlib.nullcontext())
  with context:
    for i, b in enumerate(batches):
      b = sharding.global_batch(b, mesh) if mesh is not None else b
      for k, v in step(b, jax.random.fold_in(jax.random.key(seed), i)).items():
        total[k] = total.get(k, 0.0) + float(v)
  return total


def sampled_config(cfg, tok, n: int) -> sampling.SamplingConfig:
  """`n` samples per prompt at the run's `sampling.*` settings, temperature 1 where the run's is
  0 (pass@k and the judge meter need different samples)."""
  sc = setup.sampling_config(cfg, tok, n=n)
  return dataclasses.replace(sc, temperature=sc.temperature or 1.0)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 7))
def _judged(mc, params, judge_params, batch, verify, judge, rng, sc: sampling.SamplingConfig):
  """Sums over one batch's valid examples for `judge_meter`: sample `sc.n` responses per prompt
  with `params`, score each with `judge` on `judge_params`, read the verifier (for the metrics
  only)."""
  sample_rng, judge_rng = jax.random.split(rng)
  out = sampling.sample(mc, params, batch["prompt_tokens"], batch["prompt_mask"], sample_rng, sc)
  rep = lambda x: jnp.repeat(x, sc.n, axis=0)
  verified = verify(out.tokens, out.mask, rep(batch["answer_tokens"]), rep(batch["answer_mask"]))
  scores = judge.score(mc, judge_params, rep(batch["prompt_tokens"]), rep(batch["prompt_mask"]),
                       out.tokens, out.mask, judge_rng)
  valid = batch["valid"].astype(bool)
  top, mean, counted = judge_lib.pick_accuracy(scores, verified, sc.n)
  counted = counted & valid
  wins, pairs = judge_lib.pair_wins(scores, verified, sc.n)
  midpoint = (judge.score_min + judge.score_max) / 2
  scored = rep(valid) & ~jnp.isnan(scores)
  right = (scores > midpoint) == (verified >= 1.0)
  f32 = lambda x: jnp.sum(x.astype(jnp.float32))
  return {"groups": f32(counted), "pick": f32(jnp.where(counted, top, 0.0)),
          "mean": f32(jnp.where(counted, mean, 0.0)), "wins": f32(jnp.where(valid, wins, 0.0)),
          "pairs": f32(jnp.where(valid, pairs, 0.0)), "scored": f32(scored),
          "right": f32(scored & right), "samples": f32(rep(valid))}


def judge_meter(mc, params, batches, verify, judge, sc: sampling.SamplingConfig, seed: int = 0,
                mesh: jax.sharding.Mesh | None = None, rules=None,
                judge_params=None) -> dict[str, float]:
  """The generation-verification gap on held-out problems: `sc.n` samples per problem, each
  scored by the policy as its own judge (`judge_params`: the judge's weights when they are not
  the policy's, `judge.model=reference`), checked by the verifier (read for these metrics only).

  eval/judge_pick_accuracy: accuracy of the sample the judge ranks highest per problem (ties: the
    mean of the tied ones), i.e. best-of-n with the self-judge;
  eval/sample_accuracy: mean accuracy of the samples (of the same problems);
  eval/gv_gap: the first minus the second (> 0: self-critique can pick better than chance);
  eval/judge_agreement: over (correct, wrong) sample pairs of a problem, how often the judge
    scores the correct one higher (ties 0.5; 0.5 = chance; NaN without such pairs);
  eval/judge_accuracy: share of scored samples whose verdict (score above the scale's midpoint)
    matches the verifier;
  eval/judge_unscored: share of samples the judge gave no valid score.
  Problems whose samples all went unscored are left out of the first three. Sums are global, so
  with a `mesh` each process passes its own rows (as `pass_rates`)."""
  judge_params = params if judge_params is None else judge_params
  total = _batch_sums(lambda b, rng: _judged(mc, params, judge_params, b, verify, judge, rng, sc),
                      batches, seed, mesh, rules)
  ratio = lambda a, b: total[a] / total[b] if total.get(b) else float("nan")
  pick, mean = ratio("pick", "groups"), ratio("mean", "groups")
  return {"eval/judge_pick_accuracy": pick, "eval/sample_accuracy": mean,
          "eval/gv_gap": pick - mean, "eval/judge_agreement": ratio("wins", "pairs"),
          "eval/judge_accuracy": ratio("right", "scored"),
          "eval/judge_unscored": 1.0 - ratio("scored", "samples")}


def judge_meter_config(cfg, tok) -> sampling.SamplingConfig | None:
  """The sampling of the held-out judge meter (`eval.judge_samples` per problem; -1 = sampling.n
  when the run has a judge), or None when it is off."""
  n = cfg.eval.judge_samples
  if n < 0:
    n = cfg.sampling.n if setup.uses_judge(cfg) else 0
  return sampled_config(cfg, tok, n) if n else None


def judge_params_of(cfg, state, round_number: int):
  """The judge's weights at `round_number`: the reference's with `judge.model=reference` after
  the warm-up (it trains the judge in the policy's weights), else None (the policy's own)."""
  if cfg.judge.model == "reference" and round_number > cfg.warmup.rounds:
    return lora.full(state.params, state.ref_params)  # LoRA: the slot holds adapters only
  return None


def greedy_accuracy(mc, params, batches, verify, eos_ids, max_new_tokens: int,
                    mesh: jax.sharding.Mesh | None = None, rules=None) -> float:
  sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=tuple(eos_ids))
  return pass_rates(mc, params, batches, verify, sc, mesh=mesh, rules=rules)


# ---- populations (`population.size` > 1) ----------------------------------------------------------


def member(tree, k: int):
  """Member `k` of a population's stacked tree (a state, its params): every leaf's row `k`."""
  return jax.tree.map(lambda x: x[k], tree)


@functools.partial(jax.jit, static_argnames=("mc", "eos_ids", "max_new_tokens", "spmd_axis_name"))
def population_greedy(mc, params, prompt_tokens, prompt_mask, *, eos_ids: tuple[int, ...],
                      max_new_tokens: int, spmd_axis_name=None):
  """Every member's greedy completions of the same prompts, in one program: `params` stacked
  [K, ...], prompts [B, P] (left-padded) -> (tokens [K, B, N], mask [K, B, N]), member k's rows
  exactly `sampling.sample(mc, member(params, k), ...)` at temperature 0. `spmd_axis_name`: the
  mesh axes the members are sharded over (`sharding.population_axes`), or None."""
  sc = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                               eos_ids=tuple(eos_ids))
  decode = lambda p: sampling.sample(mc, p, prompt_tokens, prompt_mask, jax.random.key(0), sc)
  out = jax.vmap(decode, spmd_axis_name=spmd_axis_name)(params)
  return out.tokens, out.mask


def population_vote(tokens, mask, marker_id: int, eos_ids, width: int) -> dict[str, jax.Array]:
  """The members' vote on each problem: completions `tokens` / `mask` [K, B, N] (as
  `population_greedy` returns them) -> `label_free.majority_vote` with the B problems as groups
  and the K members as voters (answers: `verifiers.extract_answers` after `marker_id`, at most
  `width` tokens). `winner` [B] is the member whose answer won (ties: the lowest index)."""
  extract = lambda t, m: verifiers.extract_answers(t, m, marker_id, eos_ids, width)
  answers, valid = jax.vmap(extract)(tokens, mask)  # [K, B, width], [K, B]
  return label_free.majority_vote(jnp.swapaxes(answers, 0, 1), valid.T)


def voted_completions(tokens, mask, winner):
  """The winning member's completion of each problem: [K, B, N] and `winner` [B] -> [B, N]
  tokens and mask (e.g. the population's self-labels)."""
  pick = lambda x: jnp.take_along_axis(x, winner[None, :, None], axis=0)[0]
  return pick(tokens), pick(mask)


@functools.partial(jax.jit, static_argnames=("mc", "verify", "eos_ids", "max_new_tokens",
                                             "marker_id", "width", "spmd_axis_name"))
def _population_solved(mc, params, batch, *, verify, eos_ids, max_new_tokens, marker_id, width,
                       spmd_axis_name):
  """Sums over one batch's valid problems: `solved<k>` (member k's greedy answer verified),
  `vote` (the population vote's winning completion verified; only with a `marker_id`), `total`."""
  tokens, mask = population_greedy(mc, params, batch["prompt_tokens"], batch["prompt_mask"],
                                   eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                                   spmd_axis_name=spmd_axis_name)
  check = lambda t, m: verify(t, m, batch["answer_tokens"], batch["answer_mask"])
  right = (jax.vmap(check)(tokens, mask) >= 1.0).astype(jnp.float32)  # [K, B]
  valid = batch["valid"].astype(jnp.float32)
  out = {f"solved{k}": jnp.sum(right[k] * valid) for k in range(right.shape[0])}
  out["total"] = jnp.sum(valid)
  if marker_id is not None:
    winner = population_vote(tokens, mask, marker_id, eos_ids, width)["winner"]
    out["vote"] = jnp.sum(jnp.take_along_axis(right, winner[None], axis=0)[0] * valid)
  return out


def population_accuracy(mc, params, batches, verify, eos_ids, max_new_tokens: int, *,
                        marker_id: int | None = None, width: int = 0,
                        mesh: jax.sharding.Mesh | None = None, rules=None) -> dict[str, float]:
  """Greedy held-out accuracy of a population (`params` stacked [K, ...]):
  `eval/accuracy@member<k>` each member's, `eval/accuracy` their mean, and with a `marker_id`
  `eval/accuracy_vote`: per problem the members' answers are voted on (`population_vote`) and the
  problem counts as solved when the verifier accepts the winning member's completion. With a
  `mesh`, as `pass_rates` (each process passes its own rows; sums are global)."""
  size = jax.tree.leaves(params)[0].shape[0]
  spmd = sharding.population_axes(rules) if mesh is not None else None
  step = lambda b, rng: _population_solved(
      mc, params, b, verify=verify, eos_ids=tuple(eos_ids), max_new_tokens=max_new_tokens,
      marker_id=marker_id, width=width, spmd_axis_name=spmd)
  sums = _batch_sums(step, batches, 0, mesh, rules)
  total = max(sums["total"], 1.0)
  out = {rnd.member_metric("eval/accuracy", k): sums[f"solved{k}"] / total for k in range(size)}
  out["eval/accuracy"] = sum(out.values()) / size
  if "vote" in sums:
    out["eval/accuracy_vote"] = sums["vote"] / total
  return out


def vote_marker(run) -> int | None:
  """The answer marker token the population vote reads (`setup.answer_marker_id`), or None when
  the run's task has none (then `eval/accuracy_vote` is not measured)."""
  try:
    return setup.answer_marker_id(run.task, run.tokenizer)
  except ConfigError:
    return None


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _two_attempts_solved(mc, params, batch, verify, sc: sampling.SamplingConfig, correction,
                         pad_id, repeat_prompt):
  """Greedy two-attempt counts of one batch (global sums): each verdict and each change."""
  _, rewards, _ = rnd.two_attempts(mc, params, batch, jax.random.key(0), sc, verify, correction,
                                   pad_id, repeat_prompt)
  valid = batch["valid"].astype(jnp.float32)
  means = rnd.attempt_metrics(rewards[:, 0], rewards[:, 1], "eval", valid)
  return {**{k: v * jnp.sum(valid) for k, v in means.items()}, "total": jnp.sum(valid)}


def two_attempt_accuracy(run, params, batches, mesh=None, rules=None) -> dict[str, float]:
  """SCoRe's held-out metrics (greedy, both attempts): `eval/accuracy@t1`, `eval/accuracy@t2`,
  `eval/delta_i2c`, `eval/delta_c2i`; `eval/accuracy` is the first attempt's (one answer, as
  every other method is measured)."""
  sc = sampling.SamplingConfig(max_new_tokens=run.cfg.sampling.max_new_tokens, temperature=0.0,
                               eos_ids=tuple(run.tokenizer.eos_ids))
  episode = tuple(option(run.spec, k) for k in ("correction", "pad_id", "repeat_prompt"))
  sums = _batch_sums(lambda b, rng: _two_attempts_solved(run.model_config, params, b,
                                                         run.verifier, sc, *episode),
                     batches, 0, mesh, rules)
  total = max(sums.pop("total"), 1.0)
  out = {k: v / total for k, v in sums.items()}
  return {"eval/accuracy": out["eval/accuracy@t1"], **out}


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _search_counts(mc, params, batch, verify, sc: sampling.SamplingConfig, spec, rng):
  """One batch's search and best-of-N at the search's own tokens per problem (global sums)."""
  k_search, k_sample = jax.random.split(rng)
  search_config = spec.search
  value_fn = spec.value_fn(mc) if search_config.value_weight > 0 else None
  found, _ = search_lib.tree_search(mc, params, batch, k_search, sc, verify, search_config,
                                    option(spec, "pad_id"), value_fn)
  b = batch["prompt_tokens"].shape[0]
  searched = jnp.sum(found.solution.reshape(b, -1), axis=1)
  rows = found.solution.shape[0] // b
  # the same tokens: what the search used on the problem (at most its budget)
  best = search_lib.sampling_solutions(mc, params, batch, k_sample,
                                       dataclasses.replace(sc, n=2 * rows), verify,
                                       jnp.maximum(found.tokens_used, 1))
  valid = batch["valid"].astype(jnp.float32)
  total = lambda x: jnp.sum(x.astype(jnp.float32) * valid)
  return {"eval/search_solutions": total(searched), "eval/sampling_solutions":
          total(best["solutions"]), "eval/search_solved": total(searched > 0),
          "eval/sampling_solved": total(best["solutions"] > 0),
          "eval/search_tokens": total(found.tokens_used),
          "eval/sampling_tokens": total(best["tokens"]),
          "eval/sampling_exhausted": total(best["exhausted"]), "total": jnp.sum(valid)}


def search_comparison(run, params, batches, seed: int = 0, mesh=None,
                      rules=None) -> dict[str, float]:
  """ReST-MCTS*'s held-out meter, on the first batches holding `eval.search_examples` problems (0 =
  off; whole evaluation batches, so the count rounds up to a multiple of `eval.batch_size`): the
  run's tree search (its sampling settings and search keys, the value head mixed in as in
  training) on each problem, and best-of-N sampling at the same tokens per problem (each
  problem's samples kept while they fit in what the search used there, at most its budget,
  `tree_search.sampling_solutions`; N = twice
  the search's rollouts, `eval/sampling_exhausted` = the share of problems where the budget, not
  N, ran out). Per problem: distinct verified solutions (`eval/search_solutions`,
  `eval/sampling_solutions`), solved (at least one), tokens."""
  sc = run.sampling
  wanted, chosen = run.cfg.eval.search_examples, []
  for b in batches:  # the first batches that hold eval.search_examples problems
    if wanted <= 0:
      break
    chosen.append(b)
    wanted -= b["prompt_tokens"].shape[0]
  if not chosen:
    return {}
  sums = _batch_sums(lambda b, rng: _search_counts(run.model_config, params, b, run.verifier, sc,
                                                   run.spec, rng),
                     chosen, seed, mesh, rules)
  total = max(sums.pop("total"), 1.0)
  return {k: v / total for k, v in sums.items()}


def heldout_accuracy(run, params, batches, mesh=None, rules=None) -> dict[str, float]:
  """`eval/accuracy` of a run's params (greedy): a single model's, or with `population.size` > 1
  the members' (`population_accuracy`: per member, mean, vote). Empty without a verifier."""
  if run.verifier is None:
    return {}
  mc, eos, n_new = run.model_config, run.tokenizer.eos_ids, run.cfg.sampling.max_new_tokens
  if option(run.spec, "attempts") == 2 and setup.population_size(run.cfg) == 1:
    return two_attempt_accuracy(run, params, batches, mesh=mesh, rules=rules)
  if setup.population_size(run.cfg) == 1:
    out = {"eval/accuracy": greedy_accuracy(mc, params, batches, run.verifier, eos, n_new,
                                            mesh=mesh, rules=rules)}
    if option(run.spec, "search") is not None:  # ReST-MCTS*: search vs best-of-N, equal tokens
      out.update(search_comparison(run, params, batches, run.cfg.seed, mesh=mesh, rules=rules))
    return out
  return population_accuracy(mc, params, batches, run.verifier, eos, n_new,
                             marker_id=vote_marker(run), width=run.cfg.data.max_answer_len,
                             mesh=mesh, rules=rules)


# ---- `selfplay-jax eval` -------------------------------------------------------------------------


def require_checkpoint(workdir: Path) -> None:
  """`CheckpointNotFoundError` when `workdir` has no complete checkpoint, before anything (an
  empty `checkpoints/`, Orbax's background threads) is created."""
  if not checkpoint.complete_steps(workdir):
    raise CheckpointNotFoundError(f"no complete checkpoint in {workdir / 'checkpoints'}: the run "
                                  "saved none yet (see checkpoint.every_rounds)")


def evaluate_workdir(workdir: str | Path, *, step: int | None = None, k: int = 8,
                     num_examples: int | None = None) -> dict[str, float]:
  """Greedy held-out accuracy and pass@k of a run's checkpoint (default: the newest). A
  population (`population.size` > 1): each member's greedy accuracy, their mean and the vote
  (`population_accuracy`); pass@k is the members' mean; the judge meter is member 0's."""
  workdir = Path(workdir)
  cfg = run_config.load_run_config(workdir)
  require_checkpoint(workdir)
  if cfg.curriculum.max_digits:  # easy-to-hard: accuracy at every length (curriculum.py)
    from selfplay_jax import curriculum  # pylint: disable=import-outside-toplevel
    return curriculum.evaluate_workdir(cfg, workdir, step)
  run = setup.build(cfg, workdir)
  task, tok, mc = run.task, run.tokenizer, run.model_config
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, _, _, _ = run.restore(ckpt, step)
    used = ckpt.restored_step
  if num_examples is None:
    num_examples = cfg.eval.num_examples
  batches = pipeline.eval_batches(task, "heldout", num_examples, tokenizer=tok,
                                  batch_size=cfg.eval.batch_size, **setup.data_lengths(cfg))
  verify = run.verifier or task.make_verifier(tok)  # math-verify's under the math reward
  n_new = cfg.sampling.max_new_tokens
  size = setup.population_size(cfg)
  members = [member(state, i) for i in range(size)] if size > 1 else [state]
  result = {"round": float(used)}
  if size == 1:
    result["eval/accuracy"] = greedy_accuracy(mc, state.params, batches, verify, tok.eos_ids,
                                              n_new)
  else:
    result.update(population_accuracy(mc, state.params, batches, verify, tok.eos_ids, n_new,
                                      marker_id=vote_marker(run), width=cfg.data.max_answer_len))
  if size == 1 and option(run.spec, "search") is not None:
    result.update(search_comparison(run, state.params, batches, cfg.seed))
  if k > 0:  # member i samples with its own seed, as it trained
    result[f"eval/pass@{k}"] = sum(
        pass_rates(mc, m.params, batches, verify, sampled_config(cfg, tok, k), seed=cfg.seed + i)
        for i, m in enumerate(members)) / size
  meter = judge_meter_config(cfg, tok)
  if meter is not None:
    state = members[0]
    result.update(judge_meter(mc, state.params, batches, verify,
                              setup.build_judge(cfg, tok, task), meter, seed=cfg.seed,
                              judge_params=judge_params_of(cfg, state, used)))
  return result
