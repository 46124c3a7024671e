"""The self-improvement round as ONE jitted program, composed of named pieces.

  round_fn = build_round_fn(model_config, spec, optimizer, sampling_config, verifier, ...)
  state, metrics = round_fn(state, batch)

Inside, in order (each a function here, usable on its own by tests and benchmarks):
  sample_and_score  sample `n` completions per prompt, verify them, score them (rewards)
  build_rows        the spec's training rows (pairs / advantages; old and reference log-probs)
  train_steps       `num_epochs x num_minibatches` guarded optax updates (`update_step`) in a
                    `lax.scan` over `minibatches(rows, ...)`
  then the reference update and the round's metrics; `jit_round` wraps it all in one `jax.jit`
  with the state donated (and the mesh's shardings).
A non-finite loss or gradient skips that update (counted in `train/skipped_fraction`); it is never
written to the state. `state.bad_updates` counts consecutive skipped updates across rounds (reset by
the first good one), so the loop can stop a run that keeps diverging. Python decides when to save
and evaluate; nothing here touches the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from selfplay_jax import sampling, sharding
from selfplay_jax.algorithms import losses
from selfplay_jax.algorithms.score import TwoAttempts, episode_prompts
from selfplay_jax.algorithms.spec import LogProbs, Spec, option
from selfplay_jax.errors import ConfigError
from selfplay_jax.models import lora
from selfplay_jax.models.config import ModelConfig
from selfplay_jax.models.logprobs import completion_logprobs
from selfplay_jax.rows import Rows, concat_rows, map_chunks, repeat_rows
from selfplay_jax.scoring import label_free
from selfplay_jax.scoring import bstar
from selfplay_jax.scoring.judge import gap_meter, ranking_agreement
from selfplay_jax.scoring.verifiers import Verifier
from selfplay_jax.tree_search import tree_search

# scorer(sample_params, ref_params, batch, rollout, rng) -> (scores [R], metrics); see `scoring`.
Scorer = Callable[..., tuple[jax.Array, dict]]
__all__ = ["TrainState", "init_state", "empty_replay", "sample_and_score", "build_rows",
           "minibatches", "update_step", "train_steps", "build_round_fn", "scheduled_beta",
           "synced_reference", "jit_round", "population_round", "population_metrics",
           "member_metric", "PER_MEMBER_METRICS"]


@flax.struct.dataclass
class TrainState:
  params: Any
  ref_params: Any  # reference policy (frozen initial, previous iterate, ...); None if unused
  base_params: Any  # initial parameters, kept only when a spec restarts from them each round
  opt_state: Any
  step: jax.Array  # optimizer steps taken
  round: jax.Array  # rounds completed
  rng: jax.Array
  bad_updates: jax.Array  # consecutive updates skipped for a non-finite loss / gradient
  replay: Any = None  # pairs kept from the previous iteration (SPIN's data mixing); None if unused


def empty_replay(spec: Spec, batch: Rows, sampling_config: sampling.SamplingConfig) -> Rows:
  """An all-zero-weight replay slot shaped like one round's pairs (`spec.pair_rows`), so that the
  state has a fixed structure from round one (and checkpoints look the same every round)."""
  rows_n, width = batch["prompt_tokens"].shape[0] * sampling_config.n, sampling_config.max_new_tokens
  repeat = lambda x: jnp.repeat(jnp.asarray(x), sampling_config.n, axis=0)
  rollout = sampling.Rollout(
      prompt_tokens=repeat(batch["prompt_tokens"]), prompt_mask=repeat(batch["prompt_mask"]),
      tokens=jnp.zeros((rows_n, width), jnp.int32),
      logprobs=jnp.zeros((rows_n, width), jnp.float32),
      model_logprobs=jnp.zeros((rows_n, width), jnp.float32),
      mask=jnp.zeros((rows_n, width), bool), lengths=jnp.zeros((rows_n,), jnp.int32))
  rows = spec.pair_rows(batch, rollout, jnp.zeros((rows_n,), jnp.float32))
  return jax.tree.map(jnp.zeros_like, rows)


def init_state(params, optimizer: optax.GradientTransformation, spec: Spec, rng: jax.Array,
               replay: Rows | None = None) -> TrainState:
  # Copies, so that donating the state never invalidates a caller's arrays or aliases two leaves.
  # With LoRA adapters in `params` (models/lora.py) the optimizer and the reference / restart
  # slots hold the adapters only: the base weights exist once, in `params`.
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  params = copy(params)
  trainable = lora.trainable(params)
  return TrainState(
      params=params,
      ref_params=copy(trainable) if spec.reference != "none" else None,
      base_params=copy(trainable) if spec.restart_from_base else None,
      opt_state=optimizer.init(trainable),
      step=jnp.zeros((), jnp.int32),
      round=jnp.zeros((), jnp.int32),
      rng=rng,
      bad_updates=jnp.zeros((), jnp.int32),
      replay=replay)


def minibatches(rows: Rows, rng, num_epochs: int, num_minibatches: int) -> Rows:
  """[epochs * minibatches, rows / minibatches, ...], rows shuffled per epoch."""
  n = jax.tree.leaves(rows)[0].shape[0]
  if n % num_minibatches:  # static: raised while tracing, before anything runs
    raise ConfigError(f"algorithm.num_minibatches: {num_minibatches} does not divide the {n} "
                      "training rows this round builds")
  keys = jax.random.split(rng, num_epochs)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(keys).reshape(-1)
  return jax.tree.map(
      lambda x: x[perms].reshape((num_epochs * num_minibatches, n // num_minibatches) + x.shape[1:]),
      rows)


def _select(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _tile_batch(batch: Rows, copies: int) -> Rows:
  """The batch's rows `copies` times over, copy after copy (a temperature grid's prompts)."""
  return jax.tree.map(lambda x: jnp.concatenate([x] * copies, axis=0), batch)


def _take_block(tree, index, copies: int):
  """Block `index` of `copies` equal blocks of rows (the leading axis), for every array leaf."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
      x.reshape((copies, x.shape[0] // copies) + x.shape[1:]), index, keepdims=False), tree)


def sample_and_score(model_config: ModelConfig, params, ref_params, batch: Rows, rng,
                     sampling_config: sampling.SamplingConfig, verifier: Verifier | None,
                     scorer: Scorer | None = None, num_samples: int = 0,
                     balance: bstar.Balance | None = None):
  """Samples `sampling_config.n` completions per prompt with `params` and scores them.

  Rewards are the `scorer`'s (judge, self-likelihood, your own) when given, else the verifier's
  (None when there is neither). The verifier also gives `train/accuracy`, the B-STaR monitor
  (`bstar/*`: `scoring.bstar.monitor_metrics`, selection `reward >= balance.threshold`), and with a
  scorer `train/judge_agreement` and the generation-verification gap meter (`judge/gv_gap`,
  `judge/corr_correct`, `judge/corr_likelihood`: `scoring.judge.gap_meter`); with a majority-vote
  scorer, `train/label_accuracy` from its private winner indices (`label_free.WINNER_KEY`: the
  scorer never sees the verifier, the verifier is read for this metric only).

  With `balance.temperatures` (B-STaR's per-round choice) the batch is sampled once at each
  temperature (the prompts tiled, one sampler call) and scored, and the block with the highest
  mean balance score is kept (`bstar.choose`; `bstar/temperature` logs it, the scorer's own
  metrics are over every block); with `balance.thresholds` the threshold τ is chosen with it and
  the rewards handed on are `1[reward >= τ]` (NaN stays NaN: ReST-EM then keeps the selected
  samples). Returns (rollout, rewards [R] or None, metrics); with `num_samples > 0` the metrics
  carry the first rows under `samples/*` (for sample dumps).
  """
  sc = sampling_config
  balance = balance or bstar.Balance()
  copies = max(len(balance.temperatures), 1)
  k_score = jax.random.fold_in(rng, 1)
  metrics: dict[str, jax.Array] = {}
  tiled = batch if copies == 1 else _tile_batch(batch, copies)
  temperature = None if copies == 1 else jnp.repeat(
      jnp.asarray(balance.temperatures, jnp.float32), jax.tree.leaves(batch)[0].shape[0])
  rollout = sampling.sample(model_config, params, tiled["prompt_tokens"], tiled["prompt_mask"],
                            rng, sc, temperature=temperature)
  verified = None
  if verifier is not None:
    answers = repeat_rows({"tokens": tiled["answer_tokens"], "mask": tiled["answer_mask"]}, sc.n)
    verified = verifier(rollout.tokens, rollout.mask, answers["tokens"], answers["mask"])
  rewards, private = verified, {}
  if scorer is not None:
    rewards, score_metrics = scorer(params, ref_params, tiled, rollout, k_score)
    # Keys starting with "_" are the scorer's private outputs: read here, never logged.
    private = {k: score_metrics.pop(k) for k in list(score_metrics) if k.startswith("_")}
    metrics.update(score_metrics)
  threshold = None
  if balance.temperatures or balance.thresholds:  # validation: these need the verifier
    per_block = lambda x: x.reshape((copies, -1) + x.shape[1:])
    index, threshold, _ = bstar.choose(per_block(rewards), per_block(verified),
                                       per_block(rollout.tokens), sc.n, balance)
    if copies > 1:
      rollout, rewards, verified, private = _take_block(
          (rollout, rewards, verified, private), index, copies)
      metrics["bstar/temperature"] = jnp.asarray(balance.temperatures, jnp.float32)[index]
    if balance.thresholds:
      metrics["bstar/threshold"] = threshold
  if verified is not None:
    metrics["train/accuracy"] = jnp.mean((verified >= 1.0).astype(jnp.float32))
    if rewards is not None:
      metrics.update(bstar.monitor_metrics(rewards, verified, rollout.tokens, sc.n, balance,
                                           threshold))
  if scorer is not None:
    winner = private.get(label_free.WINNER_KEY)  # a majority vote's winners (label-free rewards)
    if winner is not None and verified is not None:
      metrics["train/label_accuracy"] = label_free.label_accuracy(winner, verified, sc.n)
    if verified is not None:
      metrics["train/judge_agreement"] = ranking_agreement(rewards, verified, sc.n)
      # The gap meter (verifier read for metrics only): self-likelihood = each sample's mean token
      # log-prob under the model that sampled it, from the sampler's own log-probs.
      self_likelihood = losses.masked_mean(rollout.model_logprobs, rollout.mask, axis=1)
      metrics.update(gap_meter(rewards, verified, self_likelihood, sc.n))
  if rewards is not None:
    metrics["train/reward_mean"] = jnp.nanmean(rewards)
    metrics["train/reward_std"] = jnp.nanstd(rewards)
  metrics["train/completion_len"] = jnp.mean(rollout.lengths.astype(jnp.float32))
  # Mean over completion tokens of the sampler's entropy of softmax(logits / T) (sampling.sample).
  metrics["train/entropy"] = losses.masked_mean(rollout.entropy, rollout.mask)
  if num_samples:
    k = min(num_samples, rollout.num_rows)
    metrics["samples/prompt_tokens"] = rollout.prompt_tokens[:k]
    metrics["samples/prompt_mask"] = rollout.prompt_mask[:k]
    metrics["samples/tokens"] = rollout.tokens[:k]
    metrics["samples/lengths"] = rollout.lengths[:k]
    if rewards is not None:
      metrics["samples/rewards"] = rewards[:k]
  if balance.thresholds:  # what ReST-EM keeps: the chosen selection, as a 0 / 1 reward
    rewards = jnp.where(jnp.isnan(rewards), jnp.nan, (rewards >= threshold).astype(jnp.float32))
  return rollout, rewards, metrics


def correction_prompts(first: sampling.Rollout, correction: tuple[int, ...], eos_ids,
                       pad_id: int = 0, repeat_prompt: bool = False
                       ) -> tuple[jax.Array, jax.Array]:
  """The second attempt's prompts after each first attempt (`score.episode_prompts`)."""
  return episode_prompts(first.prompt_tokens, first.prompt_mask, first.tokens, first.mask,
                         correction, eos_ids, pad_id, repeat_prompt)


def two_attempts(model_config: ModelConfig, params, batch: Rows, rng,
                 sampling_config: sampling.SamplingConfig, verifier: Verifier,
                 correction: tuple[int, ...], pad_id: int = 0, repeat_prompt: bool = False,
                 num_samples: int = 0):
  """SCoRe's episode (`algorithms/score.py`): `sampling_config.n` first attempts per prompt, then
  one second attempt per first, prompted with `correction_prompts`; both verified. Returns
  (`TwoAttempts`, rewards [R, 2], metrics): `train/accuracy@t1`, `train/accuracy@t2`,
  `train/delta_i2c` / `train/delta_c2i` (shares of episodes that go wrong → right / right →
  wrong), and the usual length and entropy means over both attempts; with `num_samples`, the
  first second attempts under `samples/*` (their prompts hold the first attempts)."""
  sc = sampling_config
  k1, k2 = jax.random.split(rng)
  first = sampling.sample(model_config, params, batch["prompt_tokens"], batch["prompt_mask"], k1,
                          sc)
  eos = sc.eos_ids or model_config.eos_token_ids
  prompts, mask = correction_prompts(first, correction, eos, pad_id, repeat_prompt)
  second = sampling.sample(model_config, params, prompts, mask, k2,
                           dataclasses.replace(sc, n=1))
  answers = repeat_rows({"tokens": batch["answer_tokens"], "mask": batch["answer_mask"]}, sc.n)
  verify = lambda out: verifier(out.tokens, out.mask, answers["tokens"], answers["mask"])
  r1, r2 = verify(first), verify(second)
  metrics = attempt_metrics(r1, r2, "train")
  rewards = jnp.stack([r1, r2], axis=1)
  metrics["train/accuracy"] = metrics["train/accuracy@t1"]
  metrics["train/reward_mean"] = jnp.nanmean(rewards)
  metrics["train/reward_std"] = jnp.nanstd(rewards)
  both = lambda f: jnp.concatenate([f(first), f(second)])
  metrics["train/completion_len"] = jnp.mean(both(lambda o: o.lengths).astype(jnp.float32))
  metrics["train/entropy"] = losses.masked_mean(both(lambda o: o.entropy),
                                                both(lambda o: o.mask))
  if num_samples:
    k = min(num_samples, second.num_rows)
    metrics.update({"samples/prompt_tokens": second.prompt_tokens[:k],
                    "samples/prompt_mask": second.prompt_mask[:k],
                    "samples/tokens": second.tokens[:k], "samples/lengths": second.lengths[:k],
                    "samples/rewards": r2[:k]})
  return TwoAttempts(first=first, second=second), rewards, metrics


def attempt_metrics(r1, r2, prefix: str, weight=None) -> dict[str, jax.Array]:
  """`<prefix>/accuracy@t1`, `@t2`, `delta_i2c`, `delta_c2i`: means over episodes (weighted by
  `weight`, e.g. held-out padding 0) of the two verdicts and of their changes."""
  c1, c2 = r1 >= 1.0, r2 >= 1.0
  w = jnp.ones(c1.shape, jnp.float32) if weight is None else weight.astype(jnp.float32)
  mean = lambda x: jnp.sum(x.astype(jnp.float32) * w) / jnp.maximum(jnp.sum(w), 1.0)
  return {f"{prefix}/accuracy@t1": mean(c1), f"{prefix}/accuracy@t2": mean(c2),
          f"{prefix}/delta_i2c": mean(~c1 & c2), f"{prefix}/delta_c2i": mean(c1 & ~c2)}


def build_rows(model_config: ModelConfig, spec: Spec, batch: Rows, rollout, rewards, *,
               sampler_params, ref_params, replay: Rows | None, replay_moves, num_chunks: int = 1):
  """The spec's training rows for this round, and the replay slot to keep.

  `logp.old` / `logp.ref` are frozen (stop-gradient) passes under the sampler's and the
  reference's params, over all of the round's rows in `num_chunks` chunks (so their logits take
  no more memory than one training step's); `logp.old_forward` the same for a spec's own
  `forward` (PPO: old log-probs and values). A spec with a replay slot trains on this round's
  pairs plus the kept ones; the slot takes this round's pairs when `replay_moves`.
  Returns (rows, replay, metrics).
  """
  temperature = option(spec, "temperature")  # the PG family's sampling temperature, else 1
  frozen = lambda params, rows: jax.lax.stop_gradient(completion_logprobs(
      model_config, params, rows, num_chunks=num_chunks, temperature=temperature))
  forward = option(spec, "forward")  # `logp.old_forward`: the spec's own forward, frozen
  old_forward = None if forward is None else lambda rows: jax.lax.stop_gradient(
      map_chunks(lambda chunk: forward(model_config, sampler_params, chunk), rows, num_chunks))
  logp = LogProbs(old=lambda rows: frozen(sampler_params, rows),
                  ref=lambda rows: frozen(ref_params, rows), old_forward=old_forward)
  if replay is not None and option(spec, "replay"):
    fresh = spec.pair_rows(batch, rollout, rewards)
    rows = spec.annotate(concat_rows(fresh, replay), logp)
    replay = _select(replay_moves, fresh, replay)
  else:  # specs without a replay (e.g. the warm-up's SFT) keep the slot as it is
    rows = spec.build(batch, rollout, rewards, logp)
  metrics = {}
  if "ref_logp" in rows and "old_logp" in rows:
    metrics["train/kl_ref"] = losses.masked_mean(
        losses.kl_k3(rows["old_logp"], rows["ref_logp"]), rows["mask"])
  return rows, replay, metrics


def update_step(spec: Spec, optimizer: optax.GradientTransformation, logp_fn, poison=None,
                old_logp_from_current: bool = False):
  """One guarded optimizer step, `step((params, opt_state, bad), minibatch) -> (carry, metrics)`
  (a `lax.scan` body): the spec's loss on `logp_fn(params, minibatch)`, its gradient, one optax
  update. A non-finite loss or gradient keeps the old params and optimizer state and counts one
  more consecutive bad update (`bad`); a good one resets it. `poison` is added to the loss (NaN
  fault injection). `old_logp_from_current`: the minibatch's `old_logp` is the stop-gradient of
  this forward's own log-probs (exact when these params sampled the rows: see `train_steps`)."""

  def step(carry, minibatch):
    params, opt_state, bad = carry

    def loss_fn(p):
      out = logp_fn(p, minibatch)
      rows = minibatch
      if old_logp_from_current:
        rows = {**minibatch, "old_logp": jax.lax.stop_gradient(_logp_of(out))}
      loss, aux = spec.loss(out, rows)
      return (loss if poison is None else loss + poison), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    carry = (_select(ok, new_params, params), _select(ok, new_opt_state, opt_state),
             jnp.where(ok, 0, bad + 1))
    return carry, {"loss": loss, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.float32),
                   **aux}

  return step


def _logp_of(out):
  """The completion log-probs [R, N] in a training forward's output (an array, or a dict with
  `logp`); None for any other output (e.g. PPO's (log-probs, values))."""
  if isinstance(out, dict):
    return out.get("logp")
  return out if hasattr(out, "shape") else None


def train_steps(spec: Spec, optimizer: optax.GradientTransformation, logp_fn, params, opt_state,
                bad_updates, rows: Rows, rng, *, num_epochs: int = 1, num_minibatches: int = 1,
                poison=None, fresh_rows: bool = False):
  """`num_epochs x num_minibatches` `update_step`s over shuffled minibatches of `rows`.
  Returns (params, opt_state, bad_updates, metrics averaged over the steps).

  `fresh_rows`: `params` sampled the rows (this round, no replay, no restart). With one update
  (`num_epochs * num_minibatches == 1`) the importance ratio is then exactly 1, so the update
  takes `old_logp` from its own forward (stop-gradient) instead of the rows: nothing else reading
  the rows' frozen old-log-prob pass, XLA drops that whole forward over the round's rows. The
  loss and gradient are those of the rows' `old_logp` (tests/test_round.py).

  With LoRA adapters in `params`, the steps differentiate and update the adapters only: the base
  weights are a constant of the loss (no gradient is computed for them) and come back unchanged."""
  trainable, frozen = lora.split(params)
  train_logp = logp_fn if frozen is None else (
      lambda adapters, minibatch: logp_fn(lora.join(adapters, frozen), minibatch))
  reuse = (fresh_rows and num_epochs * num_minibatches == 1 and "old_logp" in rows
           and _logp_of(jax.eval_shape(train_logp, trainable, rows)) is not None)
  if reuse:
    rows = {k: v for k, v in rows.items() if k != "old_logp"}
  step = update_step(spec, optimizer, train_logp, poison, old_logp_from_current=reuse)
  (trainable, opt_state, bad_updates), step_metrics = jax.lax.scan(
      step, (trainable, opt_state, bad_updates), minibatches(rows, rng, num_epochs, num_minibatches))
  params = lora.join(trainable, frozen)
  metrics = {"train/loss": jnp.mean(step_metrics.pop("loss")),
             "train/grad_norm": jnp.mean(step_metrics.pop("grad_norm")),
             "train/skipped_fraction": jnp.mean(step_metrics.pop("skipped")),
             "train/consecutive_skipped": bad_updates}
  metrics.update({f"train/{k}": jnp.mean(v) for k, v in step_metrics.items()})
  return params, opt_state, bad_updates, metrics


def _poison(nan_rounds: tuple[int, int] | None, round_number):
  """NaN for every update of rounds `first..last` (1-based, `last=0`: no end), else 0."""
  if nan_rounds is None:
    return None
  first, last = nan_rounds
  return jnp.where((round_number >= first) & ((last == 0) | (round_number <= last)), jnp.nan, 0.0)


def build_round_fn(model_config: ModelConfig, spec: Spec, optimizer: optax.GradientTransformation,
                   sampling_config: sampling.SamplingConfig, verifier: Verifier | None, *,
                   scorer: Scorer | None = None, num_epochs: int = 1, num_minibatches: int = 1,
                   state_shardings=None, batch_shardings=None, num_samples: int = 0,
                   nan_rounds: tuple[int, int] | None = None, mesh=None, rules=None,
                   jit: bool = True, phase_start: int = 0, population: int = 1,
                   population_axis=None, reuse_old_logp: bool = True,
                   balance: bstar.Balance | None = None):
  """Returns `round_fn(state, batch) -> (state, metrics)`, jitted once with the state donated.

  `batch` holds the data pipeline's arrays: prompt_tokens/mask, response_tokens/mask (gold),
  answer_tokens/mask (for the verifier), chosen/rejected_tokens/mask (pair data). The samples'
  rewards are the `scorer`'s scores (judge, self-likelihood) when given, else the verifier's; with
  both, `train/judge_agreement` says how often the scores rank a verified-correct sample above a
  wrong one of the same prompt. With `num_samples > 0`, metrics also carry the first
  `num_samples` rollout rows under `samples/*` (tokens, lengths, rewards, prompt) for sample dumps.

  Spec options read here (with defaults): `sample_from` ("policy" | "reference": who samples and
  is scored), `reference_every` (a "previous" reference moves every N rounds), `beta_schedule`
  (the β of each iteration, written into the rows as `beta`), `ref_sync_every` /
  `ref_sync_alpha` (TR-DPO: a "frozen" reference mixes towards the policy every N rounds),
  `forward` (the training forward whose output `spec.loss` reads; default the completion
  log-probs), and for specs with a replay slot in the state, `pair_rows` / `annotate` (this
  round's pairs + the kept ones).

  `phase_start`: the rounds completed before this phase (the warm-up's, `warmup.rounds`).
  Iterations and reference syncs count this phase's rounds, `state.round + 1 - phase_start`, so
  the first iteration after a warm-up of any length is a whole one (and a resumed run, whose
  `state.round` is checkpointed, moves on the same rounds).

  Sharded: `mesh` and `rules` (see `sharding.py`) make the model's logical activation constraints
  real while the round is traced; `state_shardings` / `batch_shardings` (`sharding.state_shardings`,
  `sharding.batch_shardings`) are the jit's in/out shardings. Without them the round is the
  single-device program.

  `nan_rounds=(first, last)` (fault injection, `debug.nan_*`): every update of rounds `first..last`
  (1-based, `last=0`: no end) gets a NaN loss, to exercise the non-finite guard.

  `reuse_old_logp` (default on): with one update per round on freshly sampled rows, the update
  reads `old_logp` from its own forward and the frozen old-log-prob pass is skipped
  (`train_steps(fresh_rows=...)`); off, it always runs (the benchmarks' before / after).

  `balance`: the B-STaR monitor's n* and selection threshold, and the temperature / threshold
  grids chosen from each round (`sample_and_score`, `scoring.bstar`); None = the monitor only.

  `population` > 1: the state holds that many members stacked on a leading axis, and the round is
  `population_round` of the single-member round (`jax.vmap` over the members, the batch shared,
  `spmd_axis_name=population_axis`: the mesh axes the members are sharded over, or None) inside
  the same jit; metrics are `population_metrics`.
  """
  forward = option(spec, "forward")  # the spec's own training forward, or the log-probs
  if forward is None:
    logp_fn = lambda params, rows: completion_logprobs(model_config, params, rows,
                                                       temperature=option(spec, "temperature"))
  else:
    logp_fn = lambda params, rows: forward(model_config, params, rows)
  sample_from, reference_every = option(spec, "sample_from"), option(spec, "reference_every")
  beta_schedule = tuple(option(spec, "beta_schedule"))
  # Do the updates start from the params that sampled this round's rows (see `train_steps`)?
  fresh_rows = (reuse_old_logp and spec.samples and sample_from == "policy"
                and not spec.restart_from_base and not option(spec, "replay"))

  def round_fn(state: TrainState, batch: Rows):
    rng, k_sample, k_shuffle = jax.random.split(state.rng, 3)
    # The reference / restart models: with LoRA their slots hold adapters on the policy's base.
    reference = lora.full(state.params, state.ref_params)
    sampler = reference if sample_from == "reference" else state.params
    metrics: dict[str, jax.Array] = {}
    rollout, rewards = None, None
    phase_round = state.round + 1 - phase_start  # 1-based round of this phase
    if option(spec, "needs_round"):  # e.g. SCoRe's stage: the phase's round, one per prompt
      batch = {**batch, "phase_round": jnp.full(batch["prompt_tokens"].shape[:1], phase_round)}
    search = option(spec, "search")
    if spec.samples and search is not None:  # ReST-MCTS*'s tree search (tree_search.py)
      value_fn = spec.value_fn(model_config) if search.value_weight > 0 else None
      rollout, metrics = tree_search(model_config, sampler, batch, k_sample, sampling_config,
                                     verifier, search, option(spec, "pad_id"), value_fn, balance,
                                     num_samples)
    elif spec.samples and option(spec, "attempts") == 2:
      rollout, rewards, metrics = two_attempts(
          model_config, sampler, batch, k_sample, sampling_config, verifier,
          option(spec, "correction"), option(spec, "pad_id"), option(spec, "repeat_prompt"),
          num_samples)
    elif spec.samples:
      rollout, rewards, metrics = sample_and_score(
          model_config, sampler, reference, batch, k_sample, sampling_config, verifier,
          scorer, num_samples, balance)
    moves = phase_round % reference_every == 0  # does a "previous" reference move now?
    rows, replay, row_metrics = build_rows(
        model_config, spec, batch, rollout, rewards, sampler_params=sampler,
        ref_params=reference, replay=state.replay, replay_moves=moves,
        num_chunks=num_minibatches)
    metrics.update(row_metrics)
    if beta_schedule:  # this iteration's β, one per row (the loss reads rows["beta"])
      beta = scheduled_beta(beta_schedule, (phase_round - 1) // reference_every)
      rows = {**rows, "beta": jnp.full((jax.tree.leaves(rows)[0].shape[0],), beta)}
      metrics["train/beta"] = beta
    start_params = (state.params if state.base_params is None
                    else lora.full(state.params, state.base_params))
    params, opt_state, bad_updates, step_metrics = train_steps(
        spec, optimizer, logp_fn, start_params, state.opt_state, state.bad_updates, rows,
        k_shuffle, num_epochs=num_epochs, num_minibatches=num_minibatches,
        poison=_poison(nan_rounds, state.round + 1), fresh_rows=fresh_rows)
    metrics.update(step_metrics)
    ref_params = state.ref_params
    if spec.reference == "previous":
      policy = lora.trainable(params)
      ref_params = policy if reference_every == 1 else _select(moves, policy, state.ref_params)
    elif spec.reference == "frozen" and option(spec, "ref_sync_every"):
      ref_params = synced_reference(params, state.ref_params, option(spec, "ref_sync_alpha"),
                                    phase_round % option(spec, "ref_sync_every") == 0)
    new_state = state.replace(params=params, ref_params=ref_params, opt_state=opt_state,
                              step=state.step + num_epochs * num_minibatches,
                              round=state.round + 1, rng=rng, bad_updates=bad_updates,
                              replay=replay)
    return new_state, metrics

  if population > 1:
    round_fn = population_round(round_fn, population, population_axis)
  if not jit:
    if mesh is not None:
      raise ValueError("build_round_fn(mesh=...) needs jit=True (the mesh is set around the jit)")
    return round_fn
  return jit_round(round_fn, mesh=mesh, rules=rules, state_shardings=state_shardings,
                   batch_shardings=batch_shardings)


# Metrics also logged per member of a population, as `<name>@member<k>` (`member_metric`).
PER_MEMBER_METRICS = ("train/loss", "train/reward_mean", "train/accuracy", "train/kl_ref",
                      "train/skipped_fraction")


def member_metric(name: str, k: int) -> str:
  """The name of member `k`'s value of metric `name`, e.g. `train/accuracy@member1`."""
  return f"{name}@member{k}"


def population_round(round_fn, size: int, spmd_axis_name=None):
  """`round_fn` over a population: `jax.vmap` over the state's leading member axis (`size`
  members), every member on the same batch; one program for all. Member k computes what
  `round_fn` computes on its own state (batched matmuls may round differently in the last bits).
  Returns `(state, population_metrics(...))`."""
  vmapped = jax.vmap(round_fn, in_axes=(0, None), spmd_axis_name=spmd_axis_name)

  def round_of_members(state: TrainState, batch: Rows):
    state, per_member = vmapped(state, batch)
    return state, population_metrics(per_member, size)

  return round_of_members


def population_metrics(per_member: dict, size: int) -> dict:
  """One round's metrics of a population from the members' ([K]-shaped) ones: each name holds
  the mean over the members that measured it (NaN-ignoring), except `train/consecutive_skipped`,
  the largest (the loop stops when any member diverges); `samples/*` are member 0's rows; the
  `PER_MEMBER_METRICS` are also kept per member as `<name>@member<k>`."""
  out = {}
  for name, value in per_member.items():
    if name.startswith("samples/"):
      out[name] = value[0]
      continue
    if name == "train/consecutive_skipped":
      out[name] = jnp.max(value)
    else:
      out[name] = jnp.nanmean(value.astype(jnp.float32))
    if name in PER_MEMBER_METRICS:
      out.update({member_metric(name, k): value[k] for k in range(size)})
  return out


def scheduled_beta(schedule: tuple[float, ...], iteration) -> jax.Array:
  """β of (0-based) `iteration`: `schedule[min(iteration, len - 1)]` (the last value repeats)."""
  return jnp.asarray(schedule, jnp.float32)[jnp.clip(iteration, 0, len(schedule) - 1)]


def synced_reference(params, ref_params, alpha: float, sync):
  """TR-DPO's soft update where `sync` holds: `ref ← alpha·params + (1 − alpha)·ref` (in float32,
  cast back to the reference's dtype); else the reference unchanged."""
  mix = lambda p, r: (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)
                      ).astype(r.dtype)
  return _select(sync, jax.tree.map(mix, params, ref_params), ref_params)


def jit_round(round_fn, *, mesh=None, rules=None, state_shardings=None, batch_shardings=None):
  """`round_fn` as one `jax.jit` with the state donated. With `state_shardings` (and a `mesh`),
  the state goes in and out with those shardings and the metrics come back replicated (every
  process can read them); batch shardings None are taken from the global batch arrays passed in.
  With a `mesh`, its logical activation rules are active while the round is traced."""
  shardings = {}
  if state_shardings is not None:
    # Batch shardings None: taken from the (global, sharded) batch arrays passed in. Metrics
    # (including the sample dumps) come back replicated, so every process can read them.
    metrics_sharding = sharding.replicated(mesh) if mesh is not None else None
    shardings = dict(in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, metrics_sharding))
  jitted = jax.jit(round_fn, donate_argnums=0, **shardings)
  if mesh is None:
    return jitted
  rules = rules if rules is not None else sharding.DEFAULT_RULES

  def sharded_round(state: TrainState, batch: Rows):
    with sharding.activation_rules(mesh, rules):  # active while the first call traces
      return jitted(state, batch)

  return sharded_round
