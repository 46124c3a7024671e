"""Every recipe config, run on a tiny warmed-up model, raises held-out accuracy above the warm-up.

One SFT warm-up is shared by the module (2-digit step-by-step addition); each recipe then runs its
own rounds through the real round engine with the spec and optimizer its config file builds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfplay_jax import config_validation
from selfplay_jax import config_lib, models, sampling
from selfplay_jax import setup
from selfplay_jax import evaluate
from selfplay_jax import round as rnd
from selfplay_jax.algorithms.sft import SFT
from selfplay_jax.data import pipeline

WARMUP_ROUNDS, RECIPE_ROUNDS = 150, 40
SMALL = ["data.batch_size=32", "sampling.n=8", "algorithm.num_minibatches=1", "eval.num_examples=128",
         f"warmup.rounds={WARMUP_ROUNDS}"]
RECIPES = ["sft", "rest_em", "grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "spin", "dpo"]


def _cfg(recipe: str):
  name, _, arg = recipe.partition(":")
  cfg = config_lib.load_config(f"configs/{name}.py" + (f":{arg}" if arg else ""), SMALL)
  config_validation.validate(cfg)
  return cfg


def _sampling(cfg, tok):
  return sampling.SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens,
                                 temperature=cfg.sampling.temperature, n=cfg.sampling.n,
                                 eos_ids=tuple(tok.eos_ids))


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
  cfg = _cfg("grpo")
  task, tok = setup.task_and_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
  mc = setup.model_config(cfg, tok)
  lens = setup.data_lengths(cfg)
  it = pipeline.make_iterator(task.source("train", 0), tokenizer=tok, batch_size=64, seed=0, **lens)
  # The run's own optimizer (warm-up learning rate, then the recipe's), state carried over, as in
  # `train.py`: a fresh Adam state on a trained model makes lr-sized steps in every coordinate.
  opt, spec = setup.build_optimizer(cfg), SFT()
  state = rnd.init_state(models.init_params(mc, jax.random.key(0)), opt, spec, jax.random.key(1))
  warm = rnd.build_round_fn(mc, spec, opt, _sampling(cfg, tok), None)
  for _ in range(WARMUP_ROUNDS):
    state, _ = warm(state, next(it))
  batches = pipeline.eval_batches(task, "heldout", cfg.eval.num_examples, tokenizer=tok,
                                  batch_size=64, **lens)
  verify = task.make_verifier(tok)
  accuracy = lambda params: evaluate.greedy_accuracy(mc, params, batches, verify, tok.eos_ids,
                                               cfg.sampling.max_new_tokens)
  before = accuracy(state.params)
  assert 0.0 < before < 0.6, before  # room to improve, and some reward signal to start from
  return task, tok, mc, jax.device_get((state.params, state.opt_state)), accuracy, before


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_improves_heldout_accuracy(warmed, recipe):
  task, tok, mc, (params, opt_state), accuracy, before = warmed
  cfg = _cfg(recipe)
  spec = setup.build_spec(cfg)
  assert spec.name == recipe
  opt = setup.build_optimizer(cfg)
  round_fn = rnd.build_round_fn(mc, spec, opt, _sampling(cfg, tok), task.make_verifier(tok),
                                num_minibatches=cfg.algorithm.num_minibatches)
  state = rnd.init_state(params, opt, spec, jax.random.key(2)).replace(opt_state=opt_state)
  source = task.source("train", 1, pairs=recipe == "dpo")  # dpo: gold vs wrong-answer pairs
  it = pipeline.make_iterator(source, tokenizer=tok, batch_size=cfg.data.batch_size, seed=1,
                              **setup.data_lengths(cfg))
  skipped = []
  for _ in range(RECIPE_ROUNDS):
    state, metrics = round_fn(state, next(it))
    skipped.append(float(metrics["train/skipped_fraction"]))
  after = accuracy(state.params)
  print(f"{recipe}: held-out accuracy {before:.3f} after warm-up -> {after:.3f}")
  assert after > before, (recipe, before, after)
  assert not any(skipped)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
@pytest.mark.parametrize("recipe, name", [("sharpen", "sharpen_sft"), ("sharpen:mode=rl", "sharpen_rl")])
def test_sharpening_raises_the_self_likelihood_of_samples(warmed, recipe, name):
  """Sharpening optimises the model's own likelihood of what it samples; no answers are read.
  Held-out accuracy is printed (docs/recipes.md), not asserted: sharpening need not help it."""
  task, tok, mc, (params, opt_state), accuracy, before = warmed
  cfg = _cfg(recipe)
  spec, opt = setup.build_spec(cfg), setup.build_optimizer(cfg)
  assert spec.name == name
  scorer = setup.build_scorer(cfg, mc, tok)
  round_fn = rnd.build_round_fn(mc, spec, opt, _sampling(cfg, tok), None, scorer=scorer,
                                num_minibatches=cfg.algorithm.num_minibatches)
  state = rnd.init_state(params, opt, spec, jax.random.key(2)).replace(opt_state=opt_state)
  it = pipeline.make_iterator(task.source("train", 1), tokenizer=tok, batch_size=cfg.data.batch_size,
                              seed=1, **setup.data_lengths(cfg))
  # The self-likelihood of fresh samples under the *current* policy, measured each round.
  probe = rnd.build_round_fn(mc, setup.build_spec(_cfg("sharpen")), optax.sgd(0.0), _sampling(cfg, tok),
                             None, scorer=setup.build_scorer(_cfg("sharpen"), mc, tok))
  likelihood = []  # probed in the first and the last 5 rounds (the ones the assertion compares)
  for i in range(RECIPE_ROUNDS):
    probe_batch = next(it)
    if i < 5 or i >= RECIPE_ROUNDS - 5:
      p = rnd.init_state(jax.tree.map(jnp.copy, state.params), optax.sgd(0.0),
                         setup.build_spec(_cfg("sharpen")), jax.random.key(i))
      likelihood.append(float(probe(p, probe_batch)[1]["train/self_likelihood"]))
    state, _ = round_fn(state, next(it))
  after = accuracy(state.params)
  print(f"{name}: self-likelihood {np.mean(likelihood[:5]):.3f} -> {np.mean(likelihood[-5:]):.3f}; "
        f"held-out accuracy {before:.3f} -> {after:.3f}")
  assert np.mean(likelihood[-5:]) > np.mean(likelihood[:5])
