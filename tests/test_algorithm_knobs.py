"""Config knobs that reach the algorithm specs: ReST-EM's per-prompt cap and DAPO's soft overlong
penalty, from the config through `build_spec` into the rows the round trains on (NumPy re-derived)."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import config_validation
from selfplay_jax import config_lib
from selfplay_jax import setup
from selfplay_jax.algorithms.spec import LogProbs
from selfplay_jax.models.config import ConfigError


def _rollout(lengths, width=8):
  lengths = np.asarray(lengths)
  mask = np.arange(width)[None] < lengths[:, None]
  n = len(lengths)
  return types.SimpleNamespace(prompt_tokens=jnp.zeros((n, 2), jnp.int32),
                               prompt_mask=jnp.ones((n, 2), bool),
                               tokens=jnp.ones((n, width), jnp.int32), mask=jnp.asarray(mask),
                               lengths=jnp.asarray(lengths, jnp.int32))


def test_rest_em_keeps_at_most_max_per_prompt_correct_samples():
  cfg = config_lib.load_config("configs/rest_em.py", ["sampling.n=4", "algorithm.max_per_prompt=2"])
  config_validation.validate(cfg)
  spec = setup.build_spec(cfg)
  rewards = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0], np.float32)
  rows = spec.build({}, _rollout([3] * 12), jnp.asarray(rewards), None)
  kept = np.asarray(rows["mask"]).any(axis=1)
  # The first two correct samples of each prompt (in sample order), none of the wrong ones.
  np.testing.assert_array_equal(kept, [1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0])


def test_dapo_overlong_penalty_shapes_rewards_before_advantages():
  cfg = config_lib.load_config("configs/dapo.py", ["sampling.n=4", "sampling.max_new_tokens=8",
                                                   "algorithm.overlong_buffer=4"])
  config_validation.validate(cfg)
  spec = setup.build_spec(cfg)
  lengths = np.array([4, 6, 7, 8])
  rows = spec.build({}, _rollout(lengths), jnp.ones(4, jnp.float32),
                    LogProbs(old=lambda r: jnp.zeros(r["mask"].shape), ref=None))
  # R + min(-(|y| - (L_max - L_buf)) / L_buf, 0) with L_max = 8, L_buf = 4: 1, .5, .25, 0.
  shaped = 1.0 + np.minimum(-(lengths - 4) / 4, 0)
  want = (shaped - shaped.mean()) / (shaped.std(ddof=1) + 1e-4)  # GRPO advantages of the group
  got = np.asarray(rows["advantages"])
  got = got[:, 0] if got.ndim == 2 else got
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, text", [
    (["algorithm.max_per_prompt=-1"], "algorithm.max_per_prompt: must be >= 0"),
    (["algorithm.overlong_buffer=32"], "algorithm.overlong_buffer: 32 must be below "
                                       "sampling.max_new_tokens=32"),
])
def test_knob_errors_name_the_key(overrides, text):
  cfg = config_lib.load_config(str(config_lib.default_config_path()), overrides)
  with pytest.raises(ConfigError) as info:
    config_validation.validate(cfg)
  assert text in str(info.value)
