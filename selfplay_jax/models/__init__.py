"""Pure-functional Flax decoder LMs with Hugging Face interop."""

from selfplay_jax.models.config import PRESETS, ConfigError, ModelConfig, get_preset
from selfplay_jax.models.decoder import (KVCache, decode, forward, init_cache, init_params,
                                         logical_axes, stack_layers, unstack_layers)

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "get_preset", "KVCache", "decode", "forward",
           "init_cache", "init_params", "logical_axes", "stack_layers", "unstack_layers"]
