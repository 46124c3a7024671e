"""Sample text from a Hugging Face checkpoint directory: the library side of `selfplay-jax generate`.

  completions = generate_text("path/to/hf_dir", ["2+2="], SamplingConfig(max_new_tokens=16))
  replies = generate_text("path/to/instruct_dir", ["What is 2+2?"], sc, chat=True)

With `chat=True` each prompt is one user message rendered with the checkpoint's own chat template
(`Tokenizer.render_chat`, as transformers' `apply_chat_template(..., add_generation_prompt=True)`
renders it) and encoded as is: the template writes its own BOS.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from selfplay_jax import chat as chat_lib
from selfplay_jax import sampling, tokenizers
from selfplay_jax.models import hf


@dataclasses.dataclass
class Generation:
  prompt: str  # the text the model read (with `chat`, the rendered template)
  completions: list[str]  # n decoded completions (special tokens removed)
  tokens: list[list[int]]  # the completion token ids, up to and including the stop token
  seconds: float  # wall time of the sampling call this prompt was part of


def generate_text(model_dir: str | os.PathLike, prompts: Sequence[str],
                  sampling_config: sampling.SamplingConfig, *, tokenizer_path: str | None = None,
                  seed: int = 0, dtype: str = "float32", add_bos: bool = True,
                  chat: bool = False, system_prompt: str = "") -> list[Generation]:
  """Loads the checkpoint and its tokenizer, samples `n` completions for each prompt. With
  `chat`, each prompt is a user message (after `system_prompt`, "" = none) in the tokenizer's chat
  template, and `add_bos` is ignored (the template writes its own BOS)."""
  if not prompts:
    raise ValueError("generate: no prompts given")
  if system_prompt and not chat:
    raise ValueError("generate: a system prompt needs chat=True (--chat)")
  tok = tokenizers.load_tokenizer(tokenizer_path or model_dir)
  if chat:  # before the weights load: a tokenizer without a template fails fast
    prompts = [tok.render_chat(chat_lib.messages_of(p, system_prompt)) for p in prompts]
    add_bos = False
  config, params = hf.load_pretrained(model_dir, dtype=dtype, param_dtype=dtype)
  tokenizers.check_vocab(tok, config.vocab_size)
  eos = sampling_config.eos_ids or tuple(sorted(set(tok.eos_ids) | set(config.eos_token_ids)))
  sc = dataclasses.replace(sampling_config, eos_ids=eos).validate()
  encoded = [tok.encode(p, add_bos=add_bos) for p in prompts]
  width = max(len(e) for e in encoded)
  if width + sc.max_new_tokens > config.max_position_embeddings:
    raise ValueError(f"generate: longest prompt ({width} tokens) + max_new_tokens ({sc.max_new_tokens}) "
                     f"exceeds max_position_embeddings={config.max_position_embeddings}")
  tokens, mask = tok.encode_batch(prompts, width, add_bos=add_bos, pad_left=True)
  start = time.perf_counter()
  out = sampling.sample(config, params, tokens, mask, jax.random.key(seed), sc)
  out = jax.device_get(out)
  seconds = time.perf_counter() - start
  results = []
  for i, prompt in enumerate(prompts):
    rows = range(i * sc.n, (i + 1) * sc.n)
    ids = [np.asarray(out.tokens[r, :out.lengths[r]]).tolist() for r in rows]
    results.append(Generation(prompt, [tok.decode(x, strict=False) for x in ids], ids, seconds))
  return results
