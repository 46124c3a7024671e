"""SFT-family specs (algorithms/sft.py): ReST-EM's best-of-n selection (SFT-sharpening). More of
ReST-EM through the config: test_algorithm_knobs.py; SFT and ReST-EM in the round: test_round.py."""

import jax.numpy as jnp
import numpy as np

from selfplay_jax import sampling
from selfplay_jax.algorithms.sft import RestEM


def test_best_of_n_keeps_its_argmax():
  """select="best": per group of 2, only the highest-scored sample is kept, whole; a NaN score
  never wins (even against a negative one)."""
  rng = np.random.default_rng(0)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  ro = sampling.Rollout(prompt_tokens=jnp.asarray(rng.integers(4, 32, (4, 3)), jnp.int32),
                        prompt_mask=jnp.ones((4, 3), bool),
                        tokens=jnp.asarray(rng.integers(4, 32, (4, 5)), jnp.int32),
                        logprobs=jnp.zeros((4, 5)), model_logprobs=jnp.zeros((4, 5)), mask=mask,
                        lengths=mask.sum(-1))
  scores = jnp.array([0.5, 2.0, np.nan, -1.0])
  kept = RestEM(group_size=2, select="best").build({}, ro, scores, None)
  np.testing.assert_array_equal(kept["mask"].any(1), [False, True, False, True])
  np.testing.assert_array_equal(kept["mask"][1], mask[1])


def test_reward_threshold_sets_what_rest_em_keeps():
  """algorithm.reward_threshold reaches the spec: with a judge's 0-5 scores as rewards and a
  threshold of 5, only the samples every judgement gave full marks are kept (NaN never)."""
  from selfplay_jax import config_lib, config_validation
  from selfplay_jax.algorithms import registry
  cfg = config_lib.load_config("configs/rest_em.py", ["algorithm.reward_threshold=5.0",
                                                      "algorithm.reward=judge"])
  config_validation.validate(cfg)
  spec = registry.build_spec(cfg)
  assert spec.threshold == 5.0 and spec.select == "threshold"
  assert registry.build_spec(config_lib.load_config("configs/rest_em.py")).threshold == 1.0
  rng = np.random.default_rng(1)
  n = spec.group_size * 2
  mask = jnp.ones((n, 4), bool)
  ro = sampling.Rollout(prompt_tokens=jnp.asarray(rng.integers(4, 32, (n, 3)), jnp.int32),
                        prompt_mask=jnp.ones((n, 3), bool),
                        tokens=jnp.asarray(rng.integers(4, 32, (n, 4)), jnp.int32),
                        logprobs=jnp.zeros((n, 4)), model_logprobs=jnp.zeros((n, 4)), mask=mask,
                        lengths=mask.sum(-1))
  scores = rng.choice([0.0, 2.5, 4.375, 5.0, np.nan], size=n)
  scores[0] = 5.0
  kept = spec.build({}, ro, jnp.asarray(scores), None)
  np.testing.assert_array_equal(kept["mask"].any(1), scores >= 5.0)
  # refused where it would be ignored, or would keep nothing
  import pytest
  from selfplay_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"algorithm.reward_threshold: sft does not sample"):
    config_validation.validate(config_lib.load_config("configs/sft.py",
                                                      ["algorithm.reward_threshold=0.5"]))
  # Any sampling algorithm takes it: the B-STaR monitor's selection (test_bstar.py).
  config_validation.validate(config_lib.load_config("configs/grpo.py",
                                                    ["algorithm.reward_threshold=0.5"]))
  with pytest.raises(ConfigError, match=r"algorithm.reward_threshold: 5.0 is above the verifier"):
    config_validation.validate(config_lib.load_config("configs/rest_em.py",
                                                      ["algorithm.reward_threshold=5.0"]))
