"""Tiny random Hugging Face models of every supported family, built locally with transformers."""

from __future__ import annotations

import numpy as np
import torch
import transformers

# Small enough to compile in seconds, big enough that every feature (GQA, sliding windows shorter
# than the test sequences, soft-capping that actually bends logits, RoPE scaling) is exercised.
_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)

FAMILIES = {
    "llama": (transformers.LlamaConfig, dict()),
    "llama3_scaled_bias": (transformers.LlamaConfig, dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=5,
                                             max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(rope_parameters=dict(rope_type="default",
                                                                  rope_theta=1e6))),
    "gemma": (transformers.GemmaConfig, dict()),
    "gemma2": (transformers.Gemma2Config, dict(sliding_window=5, attn_logit_softcapping=2.0,
                                               final_logit_softcapping=3.0, query_pre_attn_scalar=12)),
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=12, rope_parameters=dict(
            full_attention=dict(rope_type="linear", rope_theta=1e6, factor=4.0),
            sliding_attention=dict(rope_type="default", rope_theta=1e4)))),
}


def make_hf_model(name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  """A randomly initialised HF causal LM with weights large enough to make every op matter."""
  cls, extra = FAMILIES[name]
  config = cls(**{**_COMMON, **extra, **overrides})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      if "norm" in pname:
        base = 0.0 if name.startswith("gemma") else 1.0
        p.copy_(base + 0.2 * noise)
      else:
        p.copy_(0.15 * noise)
  return model.eval()


def padded_batch(vocab: int, seed: int = 0):
  """(tokens, mask, positions) of three rows of length 12: full, right-padded (8 real) and
  left-padded (7 real); positions count real tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(3, 12)).astype(np.int32)
  mask = np.ones((3, 12), bool)
  mask[1, 8:] = False
  mask[2, :5] = False
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
  return tokens, mask, positions


def hf_logits(model, tokens, mask, positions) -> np.ndarray:
  """float32 logits of a transformers model on a `padded_batch`."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()
