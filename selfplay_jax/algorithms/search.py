"""ReST-MCTS* (Zhang et al. 2024): the spec that trains on a tree search's results (docs/algorithms.md,
"Tree search with process values"). The search itself, which calls the sampler inside the round,
is `selfplay_jax/tree_search.py`; `SearchConfig` (its shape and rules) is here, part of the spec.

`RestMCTS`: SFT on the search's distinct verified solutions and the process value head (PPO's
`value_head`, `ppo.py`: the one spec module this one reads) on the children's Monte-Carlo values.
`ValueSFT`: the warm-up that also trains the value head on gold and broken step prefixes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from selfplay_jax.algorithms import losses, ppo
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.models.config import ModelConfig
from selfplay_jax.rows import Rows, gold_rows, token_key

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """The search's shape and rules (hashable: part of the spec, a static argument)."""

  width: int = 2  # W: beam nodes per problem kept at each level
  depth: int = 3  # D: levels (steps searched; the last level's rollouts finish the responses)
  bonus: float = 0.5  # c of the exploration bonus c * sqrt(ln N / n); 0 = by value alone
  token_budget: int = 0  # sampled tokens per problem the search may use; 0 = no limit
  value_weight: float = 0.0  # lambda: score = (1 - lambda) * rollout value + lambda * value head
  separator: tuple[int, ...] = ()  # token ids that end a step (countdown: the space)
  # extend only children some rollout through them verified; other slots sample the problem anew
  verified_only: bool = False


def value_rows(prompt_tokens, prompt_mask, tokens, mask, pad_id: int = 0) -> Rows:
  """Rows whose completion is each child's steps then one free slot: the value head's estimate
  of a child is read at that slot (`value_pos`), the state after the child's last token (the
  position that would predict the next step's first token)."""
  lengths = jnp.sum(mask, axis=1)
  pos = jnp.arange(tokens.shape[1])[None] == lengths[:, None]
  return {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask,
          "tokens": jnp.where(mask, tokens, pad_id), "value_pos": pos}


def sft_and_value_loss(out: tuple[Array, Array], rows: Rows, vf_coef: float):
  """Token-mean NLL of the rows' `mask` plus `vf_coef` x half the value head's squared error at
  each row's `value_pos`, weighted by `value_weight` (mean over the weighted rows)."""
  logp, values = out
  nll = losses.nll_loss(logp, rows["mask"], "token")
  v = jnp.sum(jnp.where(rows["value_pos"], values, 0.0), axis=1)
  w = rows["value_weight"]
  err = jnp.sum(w * jnp.square(v - rows["value_target"])) / jnp.maximum(jnp.sum(w), 1.0)
  return nll + vf_coef * 0.5 * err, {"nll": nll, "value_mse": err}


@dataclasses.dataclass(frozen=True)
class RestMCTS:
  """ReST-MCTS*: SFT on the search's distinct verified solutions (at most `max_per_prompt` per
  problem, 0 = all) plus `vf_coef` x the process value head's squared error on the children's
  Monte-Carlo values. The round runs `tree_search` (option `search`) instead of plain sampling."""

  name: str = "rest_mcts"
  search: SearchConfig = SearchConfig()
  max_per_prompt: int = 0
  vf_coef: float = 1.0
  pad_id: int = 0
  samples: bool = True
  reference: str = "none"
  restart_from_base: bool = False

  def init_params(self, params: dict) -> dict:
    return ppo.with_value_head(params)

  def forward(self, model_config: ModelConfig, params, rows: Rows) -> tuple[Array, Array]:
    return ppo.policy_and_values(model_config, params, rows)

  def value_fn(self, model_config: ModelConfig):
    """`params, tokens, mask, prompt_tokens, prompt_mask -> value [R]` at each row's free slot."""

    def fn(params, tokens, mask, prompt_tokens, prompt_mask):
      rows = value_rows(prompt_tokens, prompt_mask, tokens, mask, self.pad_id)
      rows["mask"] = mask
      _, values = self.forward(model_config, params, rows)
      return jnp.sum(jnp.where(rows["value_pos"], values, 0.0), axis=1)

    return fn

  def build(self, batch: Rows, found, rewards, logp: LogProbs) -> Rows:
    """`found`: the round's `tree_search.SearchOut`."""
    t = found.traces
    keep = found.solution
    if self.max_per_prompt:
      per = keep.reshape(batch["prompt_tokens"].shape[0], -1)
      keep = (per & (jnp.cumsum(per, axis=1) <= self.max_per_prompt)).reshape(-1)
    sft = {"prompt_tokens": t.prompt_tokens, "prompt_mask": t.prompt_mask, "tokens": t.tokens,
           "mask": t.mask & keep[:, None], "value_pos": jnp.zeros(t.mask.shape, bool),
           "value_target": jnp.zeros(keep.shape, jnp.float32),
           "value_weight": jnp.zeros(keep.shape, jnp.float32)}
    nodes = value_rows(t.prompt_tokens, t.prompt_mask, found.node_tokens, found.node_mask,
                       self.pad_id)
    nodes.update(mask=jnp.zeros(t.mask.shape, bool), value_target=found.node_value,
                 value_weight=found.node_weight)
    return jax.tree.map(lambda a, c: jnp.concatenate([a, c], axis=0), sft, nodes)

  def loss(self, out: tuple[Array, Array], rows: Rows):
    return sft_and_value_loss(out, rows, self.vf_coef)


@dataclasses.dataclass(frozen=True)
class ValueSFT:
  """ReST-MCTS*'s warm-up with `algorithm.search_value_warmup`: SFT on the gold responses, and the
  process value head on step prefixes before any round: a gold response cut after a random step
  (target 1: a step of a solution) and the same response made wrong by `corrupt` (the task's hard
  negatives, `Task.make_corrupt_fn`: one operator or one claimed digit changed) cut after the
  changed step (target 0). So the head starts out telling a valid step from a broken one, which
  the rollouts' Monte-Carlo values cannot do for a problem none of its rollouts solved yet.
  Keys per row are drawn from a key hashed from the batch's prompts (`rows.token_key`)."""

  separator: tuple[int, ...]
  corrupt: object
  vf_coef: float = 1.0
  pad_id: int = 0
  name: str = "sft"
  samples: bool = False
  reference: str = "none"
  restart_from_base: bool = False

  forward = RestMCTS.forward  # the log-probs and the value head, one trunk pass

  def prefixes(self, tokens: Array, mask: Array, key) -> tuple[Array, Array, Array, Array, Array]:
    """(gold prefix mask, its weight, corrupted tokens, their prefix mask, their weight)."""
    k_pick, k_corrupt = jax.random.split(key)
    n = tokens.shape[1]
    pos = jnp.arange(n)[None]
    sep = jnp.isin(tokens, jnp.asarray(self.separator, jnp.int32)) & mask
    u = jnp.where(sep, jax.random.uniform(k_pick, sep.shape), -1.0)
    cut = jnp.argmax(u, axis=1)  # a random step end of the gold response
    gold_mask = mask & (pos <= cut[:, None])
    gold_ok = sep.any(axis=1) & (cut < n - 1)
    wrong = self.corrupt(tokens, mask, k_corrupt)
    changed = (wrong != tokens) & mask
    first = jnp.argmax(changed, axis=1)
    after = jnp.isin(wrong, jnp.asarray(self.separator, jnp.int32)) & mask & (pos >= first[:, None])
    wcut = jnp.argmax(after, axis=1)  # the end of the changed step
    wrong_mask = mask & (pos <= wcut[:, None])
    wrong_ok = changed.any(axis=1) & after.any(axis=1) & (wcut < n - 1)
    return gold_mask, gold_ok, wrong, wrong_mask, wrong_ok

  def build(self, batch: Rows, rollout, rewards, logp: LogProbs) -> Rows:
    gold = gold_rows(batch)
    b = gold["tokens"].shape[0]
    gold_mask, gold_ok, wrong, wrong_mask, wrong_ok = self.prefixes(
        gold["tokens"], gold["mask"], token_key(gold["prompt_tokens"]))
    sft = {**gold, "value_pos": jnp.zeros(gold["mask"].shape, bool),
           "value_target": jnp.zeros((b,), jnp.float32),
           "value_weight": jnp.zeros((b,), jnp.float32)}
    rows = [sft]
    for tokens, pmask, ok, target in ((gold["tokens"], gold_mask, gold_ok, 1.0),
                                      (wrong, wrong_mask, wrong_ok, 0.0)):
      v = value_rows(gold["prompt_tokens"], gold["prompt_mask"], tokens, pmask, self.pad_id)
      v.update(mask=jnp.zeros(pmask.shape, bool), value_target=jnp.full((b,), target),
               value_weight=ok.astype(jnp.float32))
      rows.append(v)
    return jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *rows)

  def loss(self, out: tuple[Array, Array], rows: Rows):
    return sft_and_value_loss(out, rows, self.vf_coef)
