"""Easy-to-hard self-labelling (Lee et al. 2025): gold labels only for short problems, then rounds
in which a population of models labels longer ones by vote and trains on its own labels.

  selfplay-jax train --config=configs/easy_to_hard.py --workdir=runs/e2h

Warm-up (`warmup.rounds`): SFT on gold responses of addition with 1..`curriculum.gold_max_digits`
digits, every member of the population (`population.size` models, member k seeded `seed + k`).
Then each round is ONE jitted program (`label_and_train`):

  1. label   every member answers `data.batch_size` unlabelled problems of the current length
             (`sampling.n` samples each; greedy when `sampling.temperature=0`); the answers of all
             K·n voters are voted (`scoring.label_free.majority_vote`); a problem gets the winning
             completion as its label when at least `population.vote_threshold` of the voters give
             the winning answer and, with `curriculum.length_filter`, the answer passes the task's
             length filter (`AdditionTask.plausible`);
  2. keep    accepted labels go into a ring buffer of `curriculum.replay_size` rows kept in the
             state, so earlier rounds' labels are replayed;
  3. train   `algorithm.num_minibatches` SFT steps per member on rows that mix gold problems of
             1..gold_max_digits digits (`curriculum.gold_fraction` of each step) with rows drawn
             from the buffer;
  4. advance when at least `curriculum.advance_threshold` of the round's problems were accepted,
             the next round labels problems one digit longer, up to `curriculum.max_digits`.

A problem longer than `gold_max_digits` never brings its gold answer into training: its answer is
read only by the monitoring metrics (`curriculum/label_precision`, held-out accuracy), never by
a label, a filter or the advance rule. Every evaluation measures greedy held-out accuracy at every
length: `eval/accuracy@{digits}` (the members' mean) and `eval/accuracy_vote@{digits}` (the
population's vote), drawn as accuracy against length per evaluation in
`plots/accuracy_by_length.png`. The state (members, buffer, current length) is checkpointed every
`checkpoint.every_rounds`; the host's batches are a pure function of (seed, round, length), so a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from selfplay_jax import checkpoint, config_lib, evaluate, sampling, setup
from selfplay_jax import metrics as metrics_lib
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.sft import SFT
from selfplay_jax.data import tasks
from selfplay_jax.data.encoding import encode_examples
from selfplay_jax.models.logprobs import completion_logprobs
from selfplay_jax.rows import Rows, gold_rows
from selfplay_jax.runtime import Preempted, StopOnSignal
from selfplay_jax.scoring import label_free, verifiers

__all__ = ["CurriculumState", "enabled", "label_and_train", "train",
           "gold_batch", "label_batch", "LENGTH_PLOT"]

LENGTH_PLOT = "plots/accuracy_by_length.png"


def enabled(cfg) -> bool:
  """Does `cfg` ask for the easy-to-hard curriculum (`curriculum.max_digits > 0`)?"""
  return bool(cfg.curriculum.max_digits)


@flax.struct.dataclass
class CurriculumState:
  members: rnd.TrainState  # every leaf has a leading population axis [K, ...]
  replay: Rows  # ring buffer of self-labelled SFT rows [C, ...], plus `valid` [C]
  replay_next: jax.Array  # int32: labels ever written (the next slot is replay_next % C)
  digits: jax.Array  # int32: the operand length the next round labels
  level_rounds: jax.Array  # int32: rounds spent labelling the current length


# ---- host-side batches (a pure function of seed, round and length) ------------------------------


# Zero digits written past the longest operand: the top digit of a max_digits operand never sits
# next to the "+" / "=" separator, which at no shorter length it does either.
SPARE_DIGITS = 1


def _width(cfg) -> int:
  return cfg.curriculum.max_digits + SPARE_DIGITS


def _task(cfg, digits: int) -> tasks.AdditionTask:
  """`data.task` (validated to be `addition`) at operand length `digits`."""
  return tasks.get_task(cfg.data.task, num_digits=digits, width=_width(cfg),
                        carries=cfg.data.step_by_step)


def _lengths(cfg) -> dict[str, int]:
  w = _width(cfg)  # BOS + two w-digit operands + "+=", and the answer's w + 1 digits
  return dict(max_prompt_len=2 * w + 3, max_response_len=cfg.sampling.max_new_tokens,
              max_answer_len=w + 1)


def gold_batch(cfg, tok, round_index: int, rows: int, member: int = 0) -> dict[str, np.ndarray]:
  """`rows` gold SFT rows of train problems with 1..gold_max_digits digits (each row's length
  uniform) for member `member` in round `round_index`: the only gold labels the run ever trains
  on. Each member draws its own problems (data seed + member), so the members are trained
  independently, as Lee et al.'s voters are, and their errors are less alike."""
  seed = setup.data_seed(cfg) + member
  rng = np.random.default_rng([seed, round_index, 1])
  lengths = rng.integers(1, cfg.curriculum.gold_max_digits + 1, size=rows)
  examples = [_task(cfg, int(n)).example("train", round_index * rows + i, seed)
              for i, n in enumerate(lengths)]
  return encode_examples(examples, tok, **_lengths(cfg))


def label_batch(cfg, tok, round_index: int, digits: int) -> dict[str, np.ndarray]:
  """`data.batch_size` train problems with `digits` digits to label in round `round_index`. Their
  answers travel along for the monitoring metrics only."""
  b = cfg.data.batch_size
  examples = [_task(cfg, digits).example("train", round_index * b + i, setup.data_seed(cfg) + 7919)
              for i in range(b)]
  return encode_examples(examples, tok, **_lengths(cfg))


# ---- the jitted round -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the round needs besides arrays (hashable: a static argument)."""

  model_config: Any
  sampling_config: sampling.SamplingConfig
  marker_id: int
  zero_id: int
  answer_width: int
  max_digits: int
  vote_threshold: float
  advance_threshold: float
  length_filter: bool
  split_labels: bool  # member k replays only the buffer slots s with s % population == k
  rows: int  # SFT rows per round (data.batch_size), split into the round's optimizer steps
  gold_rows: int  # of which gold rows in a labelling round (curriculum.gold_fraction of them)
  steps: int  # optimizer steps per labelling round (algorithm.num_minibatches)
  warm_steps: int  # optimizer steps per warm-up round (warmup.num_minibatches)
  population: int
  width: int  # the task's padded width (max_digits + SPARE_DIGITS)


def _vote(st: _Static, tokens, mask, num_prompts: int):
  """Votes over every voter's answer: tokens/mask [K, U·n, N] -> the winner's completion [U, N],
  its mask, the winning share of the K·n voters [U] and the winner's answer [U, A]."""
  k, n = st.population, st.sampling_config.n
  flat_t = tokens.reshape((k * num_prompts * n,) + tokens.shape[2:])
  flat_m = mask.reshape(flat_t.shape)
  answers, valid = verifiers.extract_answers(flat_t, flat_m, st.marker_id,
                                             st.sampling_config.eos_ids, st.answer_width)
  # the voters of prompt u are every member's n samples of it: [K·U·n, ...] -> [U, K·n, ...]
  voters = lambda x: x.reshape((k, num_prompts, n) + x.shape[1:]).swapaxes(0, 1).reshape(
      (num_prompts, k * n) + x.shape[1:])
  vote = label_free.majority_vote(voters(answers), voters(valid))
  pick = lambda x: jnp.take_along_axis(
      voters(x), vote["winner"].reshape((-1, 1) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  return pick(flat_t), pick(flat_m), vote["top_share"], pick(answers)


def _write_replay(replay: Rows, next_index, rows: Rows, accept):
  """Accepted rows into the ring buffer after the newest ones; rejected rows are dropped (an
  out-of-range slot with mode='drop'), so they never overwrite kept labels."""
  cap = replay["valid"].shape[0]
  rank = jnp.cumsum(accept.astype(jnp.int32)) - 1
  slots = jnp.where(accept, (next_index + rank) % cap, cap)
  new = dict(rows, valid=accept)
  out = {k: replay[k].at[slots].set(new[k].astype(replay[k].dtype), mode="drop") for k in replay}
  return out, next_index + accept.sum().astype(next_index.dtype)


def _replay_sample(replay: Rows, rng, num: int, share: tuple | None = None) -> Rows:
  """`num` rows drawn uniformly (with replacement) from the buffer's valid rows; while it is
  empty, rows with an all-False mask (they add nothing to the loss). `share=(k, K)`: only the
  slots s with s % K == k (member k's share of the labels, `curriculum.split_labels`)."""
  valid = replay["valid"]
  if share is not None:
    valid = valid & (jnp.arange(valid.shape[0]) % share[1] == share[0])
  weights = jnp.where(valid.any(), valid.astype(jnp.float32), 1.0)
  idx = jax.random.choice(rng, valid.shape[0], (num,), p=weights / weights.sum())
  rows = {k: replay[k][idx] for k in ("prompt_tokens", "prompt_mask", "tokens", "mask")}
  rows["mask"] = rows["mask"] & valid[idx][:, None]
  return rows


def _train_members(st: _Static, optimizer, members: rnd.TrainState, gold: Rows,
                   replay: Rows | None, steps: int):
  """`steps` SFT steps per member, vmapped over the population, on `st.rows` rows: its own gold
  rows (`gold` [K, ...]) plus, with a `replay` buffer, `st.rows − st.gold_rows` rows drawn from it (each member
  its own draw; with `st.split_labels`, from its own share of the buffer), shuffled into `steps`
  minibatches."""
  logp_fn = lambda p, rows: completion_logprobs(st.model_config, p, rows)

  def one(member: rnd.TrainState, gold: Rows, index):
    rng, k_replay, k_shuffle = jax.random.split(member.rng, 3)
    rows = gold
    if replay is not None:
      share = (index, st.population) if st.split_labels else None
      drawn = _replay_sample(replay, k_replay, st.rows - st.gold_rows, share)
      rows = jax.tree.map(lambda g, r: jnp.concatenate([g, r]), gold, drawn)
    params, opt_state, bad, metrics = rnd.train_steps(
        SFT(), optimizer, logp_fn, member.params, member.opt_state, member.bad_updates, rows,
        k_shuffle, num_minibatches=steps)
    return member.replace(params=params, opt_state=opt_state, bad_updates=bad,
                          step=member.step + steps, round=member.round + 1, rng=rng), metrics

  return jax.vmap(one)(members, gold, jnp.arange(st.population))


def _mean_metrics(metrics: dict) -> dict:
  """Per-member metrics [K] -> their mean, and the population's worst consecutive-skip count."""
  out = {k: jnp.mean(v) for k, v in metrics.items()}
  out["train/consecutive_skipped"] = jnp.max(metrics["train/consecutive_skipped"])
  return out


def warmup_round(st: _Static, optimizer, state: CurriculumState, gold: Rows):
  """A warm-up round: `warmup.num_minibatches` SFT steps per member on `st.rows` gold rows."""
  members, metrics = _train_members(st, optimizer, state.members, gold_rows(gold), None,
                                    st.warm_steps)
  return state.replace(members=members), _mean_metrics(metrics)


def label_and_train(st: _Static, optimizer, verify, state: CurriculumState, gold: Rows,
                    unlabelled: Rows):
  """One self-labelling round (module docstring, steps 1-4). `unlabelled` holds the prompts of
  the current length; its `answer_*` are read by the monitoring metrics only."""
  members = state.members
  u = unlabelled["prompt_tokens"].shape[0]
  sc = st.sampling_config

  def answer(member: rnd.TrainState):
    rng = jax.random.fold_in(member.rng, 17)
    out = sampling.sample(st.model_config, member.params, unlabelled["prompt_tokens"],
                          unlabelled["prompt_mask"], rng, sc)
    return out.tokens, out.mask

  tokens, mask = jax.vmap(answer)(members)  # [K, U·n, N]
  label, label_mask, share, winner_answer = _vote(st, tokens, mask, u)
  accept = share >= st.vote_threshold
  if st.length_filter:
    plausible = tasks.AdditionTask(num_digits=1, width=st.width).plausible(
        winner_answer, st.zero_id, num_digits=state.digits)
    accept = accept & plausible
  rows = {"prompt_tokens": unlabelled["prompt_tokens"], "prompt_mask": unlabelled["prompt_mask"],
          "tokens": label, "mask": label_mask}
  replay, replay_next = _write_replay(state.replay, state.replay_next, rows, accept)
  members, metrics = _train_members(st, optimizer, members, gold_rows(gold), replay, st.steps)
  metrics = _mean_metrics(metrics)

  accepted = jnp.mean(accept.astype(jnp.float32))
  advance = (accepted >= st.advance_threshold) & (state.digits < st.max_digits)
  # monitoring only: the verifier reads the labels' gold answers here and nowhere else
  correct = verify(label, label_mask, unlabelled["answer_tokens"], unlabelled["answer_mask"]) >= 1
  metrics.update({
      "curriculum/digits": state.digits.astype(jnp.float32),
      "curriculum/accepted": accepted,
      "curriculum/vote_share": jnp.mean(share),
      "curriculum/label_precision": jnp.sum(correct & accept) / jnp.maximum(accept.sum(), 1),
      "curriculum/label_accuracy": jnp.mean(correct.astype(jnp.float32)),
      "curriculum/replay_rows": jnp.minimum(replay_next, replay["valid"].shape[0]).astype(
          jnp.float32)})
  new = state.replace(members=members, replay=replay, replay_next=replay_next,
                      digits=state.digits + advance.astype(jnp.int32),
                      level_rounds=jnp.where(advance, 0, state.level_rounds + 1))
  return new, metrics


# ---- evaluation at every length -----------------------------------------------------------------


def _length_eval(loop: "_Loop", params) -> dict[str, float]:
  """`eval/accuracy@{d}` (mean over members) and `eval/accuracy_vote@{d}` for every length d;
  `eval/accuracy` is the accuracy at `curriculum.max_digits` (what checkpoint retention ranks)."""
  st, out = loop.static, {}
  for d, batches in loop.eval_data.items():
    acc = evaluate.population_accuracy(
        st.model_config, params, batches, loop.main_args[1], st.sampling_config.eos_ids,
        st.sampling_config.max_new_tokens, marker_id=st.marker_id, width=st.answer_width)
    out[f"eval/accuracy@{d}"] = acc["eval/accuracy"]  # the members' mean
    out[f"eval/accuracy_vote@{d}"] = acc["eval/accuracy_vote"]
  out["eval/accuracy"] = out[f"eval/accuracy@{loop.cfg.curriculum.max_digits}"]
  out["eval/accuracy_vote"] = out[f"eval/accuracy_vote@{loop.cfg.curriculum.max_digits}"]
  return out


# ---- the loop -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Loop:
  cfg: Any
  tok: Any
  static: _Static
  warm_fn: Any
  main_fn: Any
  eval_data: dict
  ckpt: checkpoint.Checkpointer
  config_json: str
  main_args: tuple  # (optimizer, verifier): label_and_train's arguments after the static ones


def _static(cfg, tok, mc) -> _Static:
  c = cfg.curriculum
  sc = setup.sampling_config(cfg, tok)
  return _Static(
      model_config=mc, sampling_config=sc, marker_id=tok.piece_to_id(tasks.ANSWER_MARKER),
      zero_id=tok.piece_to_id("0"), answer_width=_width(cfg) + 1, max_digits=c.max_digits,
      vote_threshold=float(cfg.population.vote_threshold),
      advance_threshold=float(c.advance_threshold), length_filter=bool(c.length_filter),
      split_labels=bool(c.split_labels),
      rows=cfg.data.batch_size, gold_rows=int(round(c.gold_fraction * cfg.data.batch_size)),
      steps=cfg.algorithm.num_minibatches, warm_steps=cfg.warmup.num_minibatches, population=setup.population_size(cfg),
      width=_width(cfg))


def _initial_state(cfg, mc, optimizer, st: _Static) -> CurriculumState:
  members = setup.initial_state(cfg, mc, SFT(), optimizer)
  if st.population == 1:  # a population of one still has the leading axis
    members = jax.tree.map(lambda x: x[None], members)
  p, n, cap = 2 * st.width + 3, st.sampling_config.max_new_tokens, cfg.curriculum.replay_size
  replay = {"prompt_tokens": jnp.zeros((cap, p), jnp.int32),
            "prompt_mask": jnp.zeros((cap, p), bool),
            "tokens": jnp.zeros((cap, n), jnp.int32), "mask": jnp.zeros((cap, n), bool),
            "valid": jnp.zeros((cap,), bool)}
  return CurriculumState(members=members, replay=replay, replay_next=jnp.zeros((), jnp.int32),
                         digits=jnp.asarray(cfg.curriculum.gold_max_digits + 1, jnp.int32),
                         level_rounds=jnp.zeros((), jnp.int32))


def _build(cfg, workdir: Path, *, resume: bool = True, step: int | None = None
           ) -> tuple[_Loop, CurriculumState]:
  task = _task(cfg, 1)
  tok = tasks.build_tokenizer(task, workdir / "tokenizer")
  mc = setup.model_config(cfg, tok)
  optimizer = setup.build_optimizer(cfg)
  st = _static(cfg, tok, mc)
  verify = task.make_verifier(tok)
  eval_data = {d: _eval_batches(cfg, tok, d, _lengths(cfg)) for d in range(1, cfg.curriculum.max_digits + 1)}
  loop = _Loop(
      cfg=cfg, tok=tok, static=st,
      warm_fn=jax.jit(functools.partial(warmup_round, st, optimizer), donate_argnums=0),
      main_fn=jax.jit(functools.partial(label_and_train, st, optimizer, verify),
                      donate_argnums=0),
      eval_data=eval_data, ckpt=checkpoint.Checkpointer(str(workdir), keep=cfg.checkpoint.keep),
      config_json=config_lib.to_json(cfg), main_args=(optimizer, verify))
  state = _initial_state(cfg, mc, optimizer, st)
  if loop.ckpt.latest_step() is not None and resume:
    state = restore(loop, state, step)
    metrics_lib.truncate_jsonl(workdir / "metrics.jsonl", loop.ckpt.restored_step)
    print(f"resumed from {workdir}/checkpoints at round {loop.ckpt.restored_step}")
  return loop, state


def restore(loop: _Loop, like: CurriculumState, step: int | None = None) -> CurriculumState:
  """Checkpoint `step` (default: the newest readable one) in `like`'s layout."""
  state, _, _, _ = loop.ckpt.restore(step, abstract_state=jax.eval_shape(lambda: like))
  return state


def evaluate_workdir(cfg, workdir: str | Path, step: int | None = None) -> dict[str, float]:
  """`selfplay-jax eval` of a curriculum run: accuracy at every length, members and vote."""
  loop, state = _build(cfg, Path(workdir), resume=False)
  with loop.ckpt:
    state = restore(loop, state, step)
    return {"round": float(loop.ckpt.restored_step), **_length_eval(loop, state.members.params)}


def member_params(cfg, workdir: str | Path, member: int, step: int | None = None):
  """(tokenizer, model config, member `member`'s params, round) of a curriculum run's
  checkpoint, for `selfplay-jax export --member`."""
  loop, state = _build(cfg, Path(workdir), resume=False)
  with loop.ckpt:
    state = restore(loop, state, step)
    used = loop.ckpt.restored_step
  params = jax.tree.map(lambda x: x[member], state.members.params)
  return loop.tok, loop.static.model_config, params, used


def _eval_batches(cfg, tok, digits: int, lens: dict) -> list:
  from selfplay_jax.data import pipeline  # noqa: PLC0415 (only the loop needs it)
  return pipeline.eval_batches(_task(cfg, digits), "heldout", cfg.eval.num_examples, tokenizer=tok,
                               batch_size=cfg.eval.batch_size, **lens)


def _gold(loop: _Loop, r: int, warm: bool) -> dict:
  st, cfg = loop.static, loop.cfg
  rows = st.rows if warm else st.gold_rows
  each = [gold_batch(cfg, loop.tok, r, rows, k) for k in range(st.population)]
  return {k: np.stack([b[k] for b in each])  # [K, rows, ...]: member k's own gold rows
          for k in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask")}


def write_length_plot(history: list[dict], path: Path) -> None:
  """Held-out accuracy against operand length, one line per evaluation (later ones darker)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  evals = [r for r in history if any(k.startswith("eval/accuracy@") for k in r)]
  fig = Figure(figsize=(5.5, 3.5), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for i, rec in enumerate(evals):
    pts = sorted((int(k.split("@")[1]), v) for k, v in rec.items()
                 if k.startswith("eval/accuracy@") and v is not None)
    shade = str(0.85 - 0.85 * (i + 1) / len(evals))
    ax.plot([d for d, _ in pts], [v for _, v in pts], marker="o", ms=3, lw=1.2, color=shade,
            label=f"round {rec['round']}" if i in (0, len(evals) - 1) else None)
  ax.set_xlabel("operand digits", fontsize=8)
  ax.set_ylabel("held-out greedy accuracy", fontsize=8)
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  if evals:
    ax.legend(fontsize=7)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".png.tmp")
  fig.savefig(tmp, format="png")
  tmp.replace(path)


def train(cfg, workdir: str | Path) -> dict[str, float]:
  """Runs (or resumes) the curriculum in `workdir`; returns the last value of every metric."""
  workdir = Path(workdir)
  loop, state = _build(cfg, workdir)
  (workdir / "config.json").write_text(loop.config_json)
  warmup, total = cfg.warmup.rounds, cfg.warmup.rounds + cfg.rounds
  first = int(state.members.round[0])
  history: dict[str, Any] = {}
  records = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
  writer = metrics_lib.writers_from_config(cfg, workdir)
  bar = tqdm.tqdm(range(first, total), initial=first, total=total, desc="rounds",
                  disable=not cfg.progress_bar)
  with loop.ckpt, writer, StopOnSignal() as stop:
    for r in bar:
      start = time.perf_counter()
      warm = r < warmup
      if warm:
        state, metrics = loop.warm_fn(state, _gold(loop, r, True))
      else:
        b = label_batch(cfg, loop.tok, r, int(state.digits))
        unlabelled = {k: b[k] for k in ("prompt_tokens", "prompt_mask", "answer_tokens",
                                        "answer_mask")}
        state, metrics = loop.main_fn(state, _gold(loop, r, False), unlabelled)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics.update(round=r + 1, phase="warmup" if warm else "self_label",
                     **{"time/round_s": time.perf_counter() - start})
      if (r + 1) % cfg.eval.every_rounds == 0 or r + 1 in (warmup, total):
        metrics.update(_length_eval(loop, state.members.params))
      if metrics.get("train/consecutive_skipped", 0) >= cfg.optimizer.max_bad_updates > 0:
        raise RuntimeError(f"round {r + 1}: {int(metrics['train/consecutive_skipped'])} "
                           "consecutive non-finite updates (optimizer.max_bad_updates)")
      every = cfg.checkpoint.every_rounds
      stopping = stop.requested(r + 1)
      if (every and (r + 1) % every == 0) or r + 1 == total or stopping:
        loop.ckpt.save(r + 1, state, config_json=loop.config_json,
                       metrics={k: v for k, v in metrics.items() if isinstance(v, float)})
      writer.write(metrics)
      records.append(metrics)
      history.update({k: v for k, v in metrics.items() if v is not None})
      if cfg.log_every_round:
        tqdm.tqdm.write(_summary(metrics))
      if "eval/accuracy" in metrics:
        write_length_plot(records, workdir / LENGTH_PLOT)
      if stopping:
        loop.ckpt.wait()
        raise Preempted(stop.signal, r + 1, workdir)
    loop.ckpt.wait()
  logging.info("curriculum finished: %s", json.dumps({k: v for k, v in history.items()
                                                     if k.startswith("eval/")}))
  return history


def _summary(m: dict) -> str:
  parts = [f"loss={m['train/loss']:.4g}"]
  if "curriculum/digits" in m:
    parts += [f"digits={int(m['curriculum/digits'])}", f"accepted={m['curriculum/accepted']:.2f}",
              f"label_precision={m['curriculum/label_precision']:.2f}"]
  if "eval/accuracy" in m:
    parts.append("acc@len=" + ",".join(f"{m[k]:.2f}" for k in sorted(
        (k for k in m if k.startswith("eval/accuracy@")), key=lambda k: int(k.split("@")[1]))))
  return f"round {m['round']} [{m['phase']}] " + " ".join(parts) + f" ({m['time/round_s']:.2f}s)"
