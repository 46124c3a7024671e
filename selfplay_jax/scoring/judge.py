"""The policy as its own judge (Self-Rewarding Language Models, Yuan et al. 2024).

A judge template wraps (prompt, response) in token space:

  BOS + enc(text before {prompt}) + prompt + enc(text between) + response + enc(text after)

(the prompt without its BOS, the response without its stop token; the pieces of the template are
encoded separately, the same way for judge training rows and for judging). A template may also
put `{response}` first; the two fields then swap places above. The score is read from the judge's
next-token distribution on the score tokens "0".."5":

  expected (default, `num_samples=0`): one forward pass; `Σ_k p(k) · k`, p renormalised over the
    score tokens.
  sampled (`num_samples=m`): m judgements sampled (temperature, `max_new_tokens`); each one's score
    is the score token right after the last `score_marker` in it (without a marker: its first
    token); the mean of the valid ones, NaN when none is valid.

With a rationale (`rationale=True`, sampled mode) the judge writes something before its score
(the paper's judge writes a justification, then "Score: X"): judge-training rows teach
`rationale + marker + score + EOS`, where the rationale is the gold response to the prompt, i.e.
the judge solves the problem itself, then says whether the response's answer agrees. Judging
then costs a generation per judgement, but the verdict compares two written answers instead of
re-deriving one in a single forward pass. With `judge.trace=verify` the rationale is instead the
task's verification trace of the response (`Task.make_trace_fn`; countdown: each step copied,
then whether its operands were available and its arithmetic right): the judge checks the
response rather than solving the problem. Judging is the same either way: generate, read the
score after the last marker.

Everything is jittable: judging runs inside the round on the round's own samples.

  judge = Judge.from_template(TASK_TEMPLATE, tokenizer)   # "{prompt}{response}<score>"
  scores = judge.score(model_config, params, rollout.prompt_tokens, rollout.prompt_mask,
                       rollout.tokens, rollout.mask, rng)            # float32 [R]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from selfplay_jax import sampling
from selfplay_jax.rows import left_pack, left_pad_to, right_pack  # noqa: F401 (re-exported)
from selfplay_jax.rows import map_chunks
from selfplay_jax.models import decoder
from selfplay_jax.errors import ConfigError
from selfplay_jax.models.config import ModelConfig

# Built-in tasks: one extra symbol of the task tokenizer (see `tasks.build_tokenizer`). Nothing
# precedes the prompt, so up to the end of the response the judge reads exactly what the policy
# read and wrote when it generated it (same tokens, same positions): its own next-token
# predictions along the response are there to compare with. With a "<judge>" prefix instead,
# judge agreement on the tiny arithmetic model was lower (see docs/recipes.md).
JUDGE_SYMBOLS = ("<score>",)
TASK_TEMPLATE = "{prompt}{response}<score>"
# With a rationale: the response first, so that the judge's own solution follows the problem
# exactly as when the policy answers it (same relative positions), then the verdict.
TASK_RATIONALE_TEMPLATE = "{response}<score>{prompt}"
TASK_SCORE_MARKER = "<score>"
# With a verification trace (`judge.trace=verify`): the judge reads the problem and the response,
# then writes the task's trace of the response (`Task.make_trace_fn`: the response re-checked step
# by step), the marker and the score. "<verify>" is one more tokenizer symbol, added only then.
VERIFY_SYMBOLS = ("<verify>",)
TASK_VERIFY_TEMPLATE = "{prompt}{response}<verify>"

# For natural-language tokenizers: the paper's additive 5-point rubric (Yuan et al. 2024, Fig. 2),
# ending where the score is read.
RUBRIC_TEMPLATE = """Review the user's question and the corresponding response using the additive 5-point scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}
<response>{response}</response>

After examining the user's instruction and the response, conclude with the score in the format "Score: <total points>".
Score: """

# The rubric with a rationale: the judge answers the question itself, then scores.
RUBRIC_RATIONALE_TEMPLATE = """Review a response to a user's question. First answer the question yourself, then compare the response with your answer and conclude with the score in the format "Score: <points>", from 0 (wrong) to 5 (correct and complete).

<response>{response}</response>
User: {prompt}
"""
RUBRIC_SCORE_MARKER = "Score: "


def _split_template(template: str) -> tuple[str, str, str, bool]:
  """(before, between, after, response_first) of "...{prompt}...{response}..." or the reverse."""
  for field in ("{prompt}", "{response}"):
    if template.count(field) != 1:
      raise ConfigError(f"judge.template: must contain {field} exactly once, got {template!r}")
  response_first = template.index("{response}") < template.index("{prompt}")
  first, second = ("{response}", "{prompt}") if response_first else ("{prompt}", "{response}")
  before, rest = template.split(first)
  middle, after = rest.split(second)
  return before, middle, after, response_first


def check_score_range(score_min: int, score_max: int) -> None:
  """The judge's scale: single-digit scores, `0 <= score_min < score_max <= 9` (the one check of
  `judge.score_min` / `judge.score_max`, used by validation and by `Judge.from_template`)."""
  if not (isinstance(score_min, int) and isinstance(score_max, int)
          and 0 <= score_min < score_max <= 9):
    raise ConfigError(f"judge.score_max: need 0 <= judge.score_min < judge.score_max <= 9 (single "
                      f"digits), got {score_min!r}..{score_max!r}")


@dataclasses.dataclass(frozen=True)
class Judge:
  """Token-space judge template and score read-out (see the module docstring)."""

  prefix: tuple[int, ...]  # BOS (if the tokenizer has one) + text before the first field
  middle: tuple[int, ...]  # text between the two fields
  suffix: tuple[int, ...]  # text after the second field
  score_ids: tuple[int, ...]  # token id of each score value score_min..score_max
  eos_ids: tuple[int, ...]
  bos_id: int | None = None
  pad_id: int = 0
  score_min: int = 0
  num_samples: int = 0  # 0 = expected score in one forward pass
  temperature: float = 1.0
  max_new_tokens: int = 8
  marker: tuple[int, ...] = ()  # sampled mode: the score follows these tokens
  response_first: bool = False  # the template has {response} before {prompt}
  rationale: bool = False  # judgements are "rationale + marker + score" (sampled mode)

  @classmethod
  def from_template(cls, template: str, tokenizer, *, score_min: int = 0, score_max: int = 5,
                    score_marker: str = "", num_samples: int = 0, temperature: float = 1.0,
                    max_new_tokens: int = 8, rationale: bool = False) -> "Judge":
    """Encodes `template` ("...{prompt}...{response}..." or the reverse order) with `tokenizer`;
    errors name the `judge.*` key at fault."""
    check_score_range(score_min, score_max)
    before, middle, after, response_first = _split_template(template)
    if rationale and not num_samples:
      raise ConfigError("judge.num_samples: a judge with a rationale (judge.rationale=True) writes "
                        "its judgement, so it needs sampled judgements (num_samples >= 1)")
    if rationale and not score_marker:
      raise ConfigError("judge.score_marker: a judge with a rationale needs a marker that "
                        "separates the rationale from the score")
    enc = lambda s: tuple(tokenizer.encode(s)) if s else ()
    score_ids = []
    for value in range(score_min, score_max + 1):
      ids = tokenizer.encode(str(value))
      if len(ids) != 1:
        raise ConfigError(f"judge.score_max: score {value} is {len(ids)} tokens in this tokenizer; "
                          "each score must be a single token")
      score_ids.append(ids[0])
    if tokenizer.eos_id is None:
      raise ConfigError("judge.template: the tokenizer has no EOS token (judgements end with EOS)")
    bos = () if tokenizer.bos_id is None else (tokenizer.bos_id,)
    return cls(prefix=bos + enc(before), middle=enc(middle), suffix=enc(after),
               score_ids=tuple(score_ids), eos_ids=tuple(tokenizer.eos_ids),
               bos_id=tokenizer.bos_id,
               pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
               score_min=score_min, num_samples=num_samples, temperature=temperature,
               max_new_tokens=max_new_tokens, marker=enc(score_marker),
               response_first=response_first, rationale=rationale)

  @property
  def score_max(self) -> int:
    return self.score_min + len(self.score_ids) - 1

  @property
  def values(self) -> jax.Array:
    return jnp.arange(self.score_min, self.score_max + 1, dtype=jnp.float32)

  def prompt_width(self, prompt_len: int, response_len: int) -> int:
    return len(self.prefix) + prompt_len + len(self.middle) + response_len + len(self.suffix)

  # ---- building judge prompts -----------------------------------------------------------------

  def prompts(self, prompt_tokens, prompt_mask, tokens, mask) -> tuple[jax.Array, jax.Array]:
    """Left-padded judge prompts [R, prompt_width] for prompts [R, P] (left-padded, BOS first) and
    responses [R, N] (masked; the stop token is dropped)."""
    r = prompt_tokens.shape[0]
    fixed = lambda ids: (jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (r, len(ids))),
                         jnp.ones((r, len(ids)), bool))
    prompt_keep = prompt_mask.astype(bool)
    if self.bos_id is not None:
      prompt_keep &= prompt_tokens != self.bos_id
    response_keep = mask.astype(bool) & ~jnp.isin(tokens, jnp.asarray(self.eos_ids, jnp.int32))
    first, second = (prompt_tokens, prompt_keep), (tokens, response_keep)
    if self.response_first:
      first, second = second, first
    parts = [fixed(self.prefix), first, fixed(self.middle), second, fixed(self.suffix)]
    all_tokens = jnp.concatenate([p[0].astype(jnp.int32) for p in parts], axis=1)
    all_mask = jnp.concatenate([p[1] for p in parts], axis=1)
    return left_pack(all_tokens, all_mask, self.pad_id)

  def completion_width(self, rationale_len: int = 0) -> int:
    """Width of a judge-training completion: [rationale, marker,] score, EOS."""
    return (rationale_len + len(self.marker) if self.rationale else 0) + 2

  def training_rows(self, prompt_tokens, prompt_mask, tokens, mask, target_scores,
                    prompt_width: int | None = None, completion_width: int = 2,
                    rationale=None) -> dict:
    """Judge-training (EFT) rows: prompt = the judge prompt, completion = [score token, EOS]
    for `target_scores` (rounded, clipped to the scale); with a rationale judge,
    `rationale + marker + score + EOS`, `rationale` = (tokens [R, N], mask) of each row's gold
    response or verification trace (its stop token dropped). `verdict` marks the tokens after the rationale.
    Widths pad to at least the given ones."""
    judge_tokens, judge_mask = self.prompts(prompt_tokens, prompt_mask, tokens, mask)
    if prompt_width is not None and prompt_width > judge_tokens.shape[1]:
      judge_tokens, judge_mask = left_pad_to(judge_tokens, judge_mask, prompt_width, self.pad_id)
    index = jnp.clip(jnp.round(target_scores).astype(jnp.int32) - self.score_min, 0,
                     len(self.score_ids) - 1)
    r = index.shape[0]
    verdict = jnp.stack([jnp.asarray(self.score_ids, jnp.int32)[index],
                         jnp.full((r,), self.eos_ids[0], jnp.int32)], axis=1)
    if self.rationale:
      if rationale is None:
        raise ValueError("a judge with a rationale needs the rationale (gold response) of each row")
      r_tokens, r_mask = rationale
      keep = r_mask.astype(bool) & ~jnp.isin(r_tokens, jnp.asarray(self.eos_ids, jnp.int32))
      marker = jnp.broadcast_to(jnp.asarray(self.marker, jnp.int32), (r, len(self.marker)))
      completion = jnp.concatenate([r_tokens.astype(jnp.int32), marker, verdict], axis=1)
      completion_mask = jnp.concatenate([keep, jnp.ones((r, len(self.marker) + 2), bool)], axis=1)
      completion, completion_mask = right_pack(completion, completion_mask, self.pad_id)
      # The verdict (marker, score, EOS) is the last len(marker) + 2 tokens of each row.
      length = completion_mask.sum(axis=1, keepdims=True)
      position = jnp.arange(completion.shape[1])[None, :]
      is_verdict = completion_mask & (position >= length - len(self.marker) - 2)
    else:
      completion, completion_mask = verdict, jnp.ones((r, 2), bool)
      is_verdict = completion_mask
    extra = max(completion_width - completion.shape[1], 0)
    pad = lambda x, value=0: jnp.pad(x, ((0, 0), (0, extra)), constant_values=value)
    return {"prompt_tokens": judge_tokens, "prompt_mask": judge_mask,
            "tokens": pad(completion, self.pad_id), "mask": pad(completion_mask),
            "verdict": pad(is_verdict)}

  # ---- scoring --------------------------------------------------------------------------------

  def expected_scores(self, config: ModelConfig, params, judge_tokens, judge_mask) -> jax.Array:
    """`Σ_k p(k)·k` over the score tokens at the end of each judge prompt: float32 [R]."""
    logits = decoder.forward(config, params, judge_tokens, segment_ids=judge_mask.astype(jnp.int32))
    last = logits[:, -1, :].astype(jnp.float32)
    probs = jax.nn.softmax(last[:, jnp.asarray(self.score_ids)], axis=-1)
    return probs @ self.values

  def read_scores(self, tokens, mask) -> jax.Array:
    """Score of each generated judgement [R, N]: the score token after the last marker (or the
    first token without a marker); NaN when there is none."""
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
    n = tokens.shape[1]
    score_ids = jnp.asarray(self.score_ids, jnp.int32)
    is_score = (tokens[..., None] == score_ids).any(-1) & mask
    k = len(self.marker)
    if k:
      after_marker = jnp.ones_like(mask)
      for j, marker_id in enumerate(self.marker):  # tokens[i - k + j] == marker[j]
        shift = k - j
        hit = jnp.pad((tokens == marker_id) & mask, ((0, 0), (shift, 0)))[:, :n]
        after_marker &= hit
      candidates = is_score & after_marker
    else:
      candidates = is_score & (jnp.arange(n) == 0)[None]
    last = n - 1 - jnp.argmax(candidates[:, ::-1], axis=1)
    token = jnp.take_along_axis(tokens, last[:, None], axis=1)[:, 0]
    value = jnp.argmax(token[:, None] == score_ids, axis=1).astype(jnp.float32) + self.score_min
    return jnp.where(candidates.any(axis=1), value, jnp.nan)

  def sampled_scores(self, config: ModelConfig, params, judge_tokens, judge_mask, rng) -> jax.Array:
    sc = sampling.SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 n=self.num_samples, eos_ids=self.eos_ids, pad_id=self.pad_id)
    out = sampling.sample(config, params, judge_tokens, judge_mask, rng, sc)
    per_sample = self.read_scores(out.tokens, out.mask).reshape(-1, self.num_samples)
    return jnp.nanmean(per_sample, axis=1)  # NaN where no judgement was valid

  def score(self, config: ModelConfig, params, prompt_tokens, prompt_mask, tokens, mask,
            rng, num_chunks: int = 1) -> jax.Array:
    """Scores of responses [R, N] to prompts [R, P] under `params` as the judge: float32 [R].

    `num_chunks` > 1 (when it divides R): the expected-score forward runs over that many chunks
    of rows in sequence (`rows.map_chunks`, as the round's frozen passes), so only one chunk's
    [rows, judge prompt, vocab] logits exist at a time; the scores are the same. Sampled
    judgements are drawn over all rows at once (the sampler holds one step's logits)."""
    params = jax.lax.stop_gradient(params)
    judge_tokens, judge_mask = self.prompts(prompt_tokens, prompt_mask, tokens, mask)
    if self.num_samples:
      return self.sampled_scores(config, params, judge_tokens, judge_mask, rng)
    return map_chunks(lambda r: self.expected_scores(config, params, r["tokens"], r["mask"]),
                      {"tokens": judge_tokens, "mask": judge_mask}, num_chunks)


def ranking_agreement(scores: jax.Array, verified: jax.Array, group_size: int) -> jax.Array:
  """How often the scores rank a verified-correct sample above a wrong one of the same prompt.

  Over all (correct, wrong) pairs within each group of `group_size` consecutive samples: 1 for a
  higher score, 0.5 for a tie, 0 otherwise (or a NaN score on either side). 0.5 = chance.
  NaN when no group has both a correct and a wrong sample.
  """
  wins, pairs = pair_wins(scores, verified, group_size)
  count = pairs.sum()
  return jnp.where(count > 0, jnp.sum(wins) / jnp.maximum(count, 1), jnp.nan)


def pair_wins(scores: jax.Array, verified: jax.Array, group_size: int):
  """Per group: the summed wins of its (correct, wrong) pairs (1 higher score, 0.5 tie, 0 lower or
  NaN) and the number of such pairs, float32 [G] each; `ranking_agreement` is their ratio."""
  s = scores.reshape(-1, group_size)
  ok = verified.reshape(-1, group_size) >= 1.0
  pair = ok[:, :, None] & ~ok[:, None, :]  # i correct, j wrong
  si, sj = s[:, :, None], s[:, None, :]
  win = jnp.where(si > sj, 1.0, jnp.where(si == sj, 0.5, 0.0))
  return jnp.sum(win * pair, axis=(1, 2)), jnp.sum(pair, axis=(1, 2)).astype(jnp.float32)


# ---- the generation-verification gap meter ------------------------------------------------------
# Read next to `ranking_agreement` in every round with a scorer and a verifier (`judge/*` metrics),
# so a run shows whether self-critique can help before its scores are trusted. The verifier is read
# for these metrics only, never for rewards. Groups are the `group_size` consecutive samples of a
# prompt; a sample is correct when its verifier reward is >= 1 (as for `train/accuracy`).


def gv_gap(scores: jax.Array, verified: jax.Array, group_size: int) -> jax.Array:
  """Generation-verification gap (Song et al. 2024, "Mind the Gap"): the accuracy of the sample the
  scores rank highest in each group minus the mean accuracy of the group's samples, averaged over
  groups. > 0: picking by the scores beats picking at random, i.e. self-critique can help.

  Ties: when several samples share the top score, the top "sample" counts the mean accuracy of the
  tied ones (the expected accuracy of a random pick among them). NaN scores never win (a sample
  without a score still counts in its group's mean accuracy); a group whose scores are all NaN is
  left out of both terms. NaN when no group qualifies. All-correct and all-wrong groups give 0.
  """
  top_accuracy, mean_accuracy, counted = pick_accuracy(scores, verified, group_size)
  gap = top_accuracy - mean_accuracy
  n = jnp.sum(counted)
  return jnp.where(n > 0, jnp.sum(jnp.where(counted, gap, 0.0)) / jnp.maximum(n, 1), jnp.nan)


def pick_accuracy(scores: jax.Array, verified: jax.Array, group_size: int):
  """Per group: the accuracy of the sample the scores rank highest (ties: the mean over the tied
  ones; NaN scores never win), the group's mean accuracy, and whether any score is not NaN (a
  group that counts), [G] each; `gv_gap` averages the first minus the second over counted groups."""
  s = scores.reshape(-1, group_size).astype(jnp.float32)
  correct = (verified.reshape(-1, group_size) >= 1.0).astype(jnp.float32)
  valid = ~jnp.isnan(s)
  top = jnp.max(jnp.where(valid, s, -jnp.inf), axis=1, keepdims=True)
  tied = valid & (s == top)  # NaN != top: NaN scores never win
  top_accuracy = jnp.sum(correct * tied, axis=1) / jnp.maximum(jnp.sum(tied, axis=1), 1)
  return top_accuracy, jnp.mean(correct, axis=1), valid.any(axis=1)


def within_group_corr(x: jax.Array, y: jax.Array, group_size: int) -> jax.Array:
  """Pearson correlation of `x` with `y` within each group, averaged over the groups where both
  vary. Samples where either value is not finite (a NaN score, a -inf log-prob) are left out of
  their group; a group counts when, over the samples left, neither `x` nor `y` is constant (so it
  has at least two of them). NaN when no group counts."""
  x = x.reshape(-1, group_size).astype(jnp.float32)
  y = y.reshape(-1, group_size).astype(jnp.float32)
  valid = jnp.isfinite(x) & jnp.isfinite(y)
  count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)

  def centred(v):
    v = jnp.where(valid, v, 0.0)
    return jnp.where(valid, v - jnp.sum(v, axis=1, keepdims=True) / count, 0.0)

  def varies(v):  # compared exactly: a constant group's float mean need not equal its values
    return (jnp.max(jnp.where(valid, v, -jnp.inf), axis=1)
            > jnp.min(jnp.where(valid, v, jnp.inf), axis=1))

  dx, dy = centred(x), centred(y)
  denom = jnp.sqrt(jnp.sum(dx * dx, axis=1) * jnp.sum(dy * dy, axis=1))
  ok = varies(x) & varies(y) & (denom > 0)
  r = jnp.clip(jnp.sum(dx * dy, axis=1) / jnp.where(ok, denom, 1.0), -1.0, 1.0)
  n = jnp.sum(ok)
  return jnp.where(n > 0, jnp.sum(jnp.where(ok, r, 0.0)) / jnp.maximum(n, 1), jnp.nan)


def gap_meter(scores: jax.Array, verified: jax.Array, self_likelihood: jax.Array,
              group_size: int) -> dict[str, jax.Array]:
  """The round's gap-meter metrics: `judge/gv_gap` (`gv_gap`), `judge/corr_correct` (within-prompt
  correlation of the scores with the verifier's correctness) and `judge/corr_likelihood` (with the
  samples' self-likelihood: the mean token log-prob of each sample under the model that sampled
  it), each NaN when no group qualifies."""
  correct = (verified >= 1.0).astype(jnp.float32)
  return {"judge/gv_gap": gv_gap(scores, verified, group_size),
          "judge/corr_correct": within_group_corr(scores, correct, group_size),
          "judge/corr_likelihood": within_group_corr(scores, self_likelihood, group_size)}
