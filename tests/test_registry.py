"""The algorithm registry (algorithms/registry.py): every entry builds its spec from the default
config, its `train_rows` are the rows the round really trains on (counted while the round is
traced), and the combinations it refuses are ConfigErrors that name the key."""

import jax
import pytest

from selfplay_jax import config_lib, config_validation, setup
from selfplay_jax import round as rnd
from selfplay_jax.algorithms import losses, registry
from selfplay_jax.algorithms.spec import REFERENCES
from selfplay_jax.errors import ConfigError

NAMES = registry.names()
TINY = ["data.batch_size=2", "sampling.max_new_tokens=4", "data.max_prompt_len=8",
        "data.max_response_len=8", "data.max_answer_len=4", "data.difficulty=1",
        "model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1",
        "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=8",
        "algorithm.num_minibatches=1", "algorithm.overlong_buffer=0"]


def _cfg(name, *overrides, validate=True):
  extra = ["sampling.n=2"] if registry.get(name).min_samples == 2 else []
  cfg = config_lib.load_config(str(config_lib.default_config_path()),
                               [f"algorithm.name={name}", *extra, *overrides])
  if validate:
    config_validation.validate(cfg)
  return cfg


def test_names_are_the_documented_methods_and_unknown_ones_are_refused():
  assert set(NAMES) == {"sft", "rest_em", "sharpen_sft", "grpo", "dr_grpo", "dapo", "rloo",
                        "reinforce_pp", "sharpen_rl", "dpo", "spin", "self_rewarding", "kto",
                        "ppo", "score", "score_sft", "rest_mcts"}
  with pytest.raises(ConfigError, match=r"^algorithm.name: must be one of .*'grpo'.*got 'trpo'"):
    registry.get("trpo")


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_builds_its_spec_from_the_default_config(name):
  entry = registry.get(name)
  spec = registry.build_spec(_cfg(name))
  assert spec.name == name
  assert spec.samples == entry.samples  # the entry says what the round will do
  assert spec.reference in REFERENCES
  assert hash(spec) == hash(registry.build_spec(_cfg(name)))  # small and hashable, as spec.py says


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("registry")  # tokenizers cached here, shared by the cases


# rest_mcts needs a step separator; the default task (arithmetic) has none of its own
_RUN_OVERRIDES = {"rest_mcts": ("algorithm.search_separator=+",)}


@pytest.mark.parametrize("name, overrides", [(n, _RUN_OVERRIDES.get(n, ())) for n in NAMES] + [
    ("spin", ("algorithm.replay_previous=true",)),
    ("rest_em", ("sampling.n=3", "data.batch_size=3")),
], ids=[*NAMES, "spin-replay", "rest_em-n3-b3"])
def test_train_rows_are_the_rows_the_round_trains_on(name, overrides, workdir, monkeypatch):
  """The round is traced (not compiled) with a tiny config; the rows its optimizer steps split
  into minibatches are counted where the round builds them."""
  cfg = _cfg(name, *TINY, *overrides)
  run = setup.build(cfg, workdir)
  seen = []
  real = rnd.minibatches

  def counting(rows, *args, **kwargs):
    seen.append(jax.tree.leaves(rows)[0].shape[0])
    return real(rows, *args, **kwargs)

  monkeypatch.setattr(rnd, "minibatches", counting)
  jax.eval_shape(run.round_fn(), run.abstract_state(), setup.example_batch(cfg))
  rows, what = registry.get(name).train_rows(cfg)
  assert seen == [rows], (name, what)


def _other_loss_type(entry):
  return next(t for t in losses.PG_LOSS_TYPES + losses.PREFERENCE_LOSS_TYPES
              if t not in entry.loss_types)


@pytest.mark.parametrize("name", NAMES)
def test_validation_errors_name_the_key(name):
  entry = registry.get(name)
  small = ["data.batch_size=4", "sampling.n=2"]
  if name == "rest_mcts":  # its rows count the search's 3 levels; 2 keep 3 out of them
    small.append("algorithm.search_depth=2")
  rows, what = entry.train_rows(_cfg(name, *small))
  with pytest.raises(ConfigError) as e:  # 3 divides none of 4, 8, 16 rows
    config_validation.validate(_cfg(name, *small, "algorithm.num_minibatches=3", validate=False))
  assert str(e.value) == f"algorithm.num_minibatches: 3 must divide {what} = {rows}"

  wrong = _other_loss_type(entry)
  with pytest.raises(ConfigError) as e:
    config_validation.validate(_cfg(name, f"algorithm.loss_type={wrong}", validate=False))
  assert str(e.value).startswith(f"algorithm.loss_type: {name} takes ") and repr(wrong) in str(e.value)

  if entry.min_samples > 1:
    with pytest.raises(ConfigError) as e:
      config_validation.validate(_cfg(name, f"sampling.n={entry.min_samples - 1}", validate=False))
    assert str(e.value).startswith(f"sampling.n: {name} needs >= {entry.min_samples} samples")
  else:  # one sample per prompt is enough
    config_validation.validate(_cfg(name, "sampling.n=1"))
