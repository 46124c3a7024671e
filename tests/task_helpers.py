"""Shared by the task, encoding and verifier tests (and the end-to-end checks that re-derive a
verifier's verdicts): the built-in task variants under test (conftest.py's `task_and_tok` fixture
builds tokenizers for four of them), and independent Python references for the gold answer and
the verifier's reward."""

import re

ARITH_CONFIGS = [dict(num_digits=2, operations="+"),
                 dict(num_digits=3, operations="+-*", step_by_step=True),
                 dict(num_digits=1, operations="-", step_by_step=True)]
TASK_SPECS = [("arithmetic", c) for c in ARITH_CONFIGS] + [("sort", dict(length=5, max_value=9)),
                                                             ("sort", dict(length=3, max_value=20))]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, c in TASK_SPECS]


def gold(prompt: str) -> str:
  """Independent reference: the answer from the prompt by Python int arithmetic / sorted()."""
  if prompt.startswith("sort "):
    return ",".join(map(str, sorted(int(v) for v in prompt[5:-1].split(","))))
  a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", prompt).groups()
  return str({"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(a), int(b)))


def answer_is_right(text: str, prompt: str) -> bool:
  """The text's answer (after its first '####', to the end) is the gold answer of `prompt`."""
  return "####" in text and text.split("####", 1)[1] == gold(prompt)


def string_reward(tok, tokens, mask, prompt) -> float:
  """Independent string check: text before the first EOS, answer after the first '####'."""
  seq = [int(t) for t, m in zip(tokens, mask) if m]
  if tok.eos_id not in seq:
    return 0.0
  return float(answer_is_right(tok.decode(seq[:seq.index(tok.eos_id)]), prompt))


def tiny_arithmetic(tmp_dir, num_prompts: int):
  """A one-layer random model on 1-digit arithmetic's own tokenizer, and a batch of `num_prompts`
  training problems (prompt 8, response 8, answer 4 tokens): (task, tokenizer, model config,
  params, batch of numpy arrays)."""
  import jax  # pylint: disable=import-outside-toplevel
  from selfplay_jax import models  # pylint: disable=import-outside-toplevel
  from selfplay_jax.data import tasks  # pylint: disable=import-outside-toplevel
  task = tasks.get_task("arithmetic", num_digits=1)
  tok = tasks.build_tokenizer(task, tmp_dir)
  cfg = models.ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                           num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                           bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids),
                           pad_token_id=tok.pad_id).validate()
  batch = tasks.encode_examples(task.examples("train", seed=0, num=num_prompts), tok, 8, 8, 4)
  return task, tok, cfg, models.init_params(cfg, jax.random.key(0)), batch

