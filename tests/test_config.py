"""Tests for configs/default.py and selfplay_jax.config_lib (no absl flags involved)."""

import dataclasses
import json
from pathlib import Path

import pytest
from ml_collections import config_dict

from selfplay_jax import config_validation
from selfplay_jax import config_lib
from selfplay_jax import setup
from selfplay_jax.models.config import PRESETS, ConfigError, ModelConfig

DEFAULT = str(Path(__file__).resolve().parent.parent / "configs" / "default.py")


def load(*overrides: str, arg: str = ""):
  return config_lib.load_config(DEFAULT + (f":{arg}" if arg else ""), list(overrides))


def test_default_loads_and_validates():
  cfg = load()
  config_validation.validate(cfg)
  assert cfg.model.preset == "tiny"
  assert cfg.model.hf_path == "" and cfg.model.tokenizer_path == ""
  # The demo its docstring describes: 110 warm-up SFT rounds, then 200 GRPO rounds (validate
  # already requires rounds >= 1, so the values themselves are what can be checked here).
  assert (cfg.warmup.rounds, cfg.rounds) == (110, 200)
  assert cfg.algorithm.name == "grpo" and cfg.data.task == "arithmetic"
  for group in ("sampling", "optimizer", "algorithm", "data", "checkpoint", "mesh"):
    assert group in cfg


def test_every_model_config_field_present_with_preset_value():
  cfg = load()
  for field in dataclasses.fields(ModelConfig):
    assert field.name in cfg.model, field.name
    assert cfg.model[field.name] == getattr(PRESETS["tiny"], field.name)
  assert config_lib.model_config(cfg.model) == PRESETS["tiny"]


def test_optional_fields_are_typed_placeholders():
  cfg = load()
  ref = cfg.model._fields["sliding_window"]  # pylint: disable=protected-access
  assert isinstance(ref, config_dict.FieldReference) and ref.get_type() is int
  assert isinstance(cfg.model.layer_types, tuple) and isinstance(cfg.model.eos_token_ids, tuple)


@pytest.mark.parametrize("override, key, expected", [
    ("model.num_layers=4", "model.num_layers", 4),
    ("optimizer.learning_rate=3e-4", "optimizer.learning_rate", 3e-4),
    ("sampling.temperature=0", "sampling.temperature", 0.0),
    ("model.tie_embeddings=true", "model.tie_embeddings", True),
    ("model.tie_embeddings=1", "model.tie_embeddings", True),
    ("model.mlp_bias=False", "model.mlp_bias", False),
    ("data.task=copy", "data.task", "copy"),
    ("optimizer.name='sgd'", "optimizer.name", "sgd"),
    ("model.eos_token_ids=(1,2)", "model.eos_token_ids", (1, 2)),
    ("model.eos_token_ids=3,4", "model.eos_token_ids", (3, 4)),
    ("model.eos_token_ids=[5]", "model.eos_token_ids", (5,)),
    ("model.sliding_window=8", "model.sliding_window", 8),
    ("model.bos_token_id=None", "model.bos_token_id", None),
    ("model.attn_logit_softcap=50", "model.attn_logit_softcap", 50.0),
])
def test_overrides_parse_by_field_type(override, key, expected):
  cfg = load(override)
  group, leaf = key.split(".")
  value = cfg[group][leaf]
  assert value == expected and type(value) is type(expected)
  config_validation.validate(cfg)


def test_tuple_of_strings_and_placeholder_roundtrip():
  cfg = load("model.num_layers=2", "model.sliding_window=4", "model.layer_types=(sliding, full)")
  assert cfg.model.layer_types == ("sliding", "full")
  model = config_lib.model_config(cfg.model)
  assert model.sliding_window == 4 and model.resolved_layer_types == ("sliding", "full")
  cfg = config_lib.apply_overrides(cfg, ["model.sliding_window=None", "model.layer_types=()"])
  assert cfg.model.sliding_window is None and cfg.model.layer_types == ()
  config_validation.validate(cfg)


def test_overrides_do_not_mutate_input():
  cfg = load()
  config_lib.apply_overrides(cfg, ["rounds=3"])
  assert cfg.rounds == load().rounds


@pytest.mark.parametrize("override, key", [
    ("model.nmu_layers=3", "model.nmu_layers"),
    ("modl.num_layers=3", "modl.num_layers"),
    ("sampling.top_p.x=1", "sampling.top_p.x"),
    ("roundz=3", "roundz"),
])
def test_unknown_key_names_key_and_close_matches(override, key):
  with pytest.raises(ConfigError) as e:
    load(override)
  assert key in str(e.value) and "unknown config key" in str(e.value)
  if "num_layers" in key:
    assert "model.num_layers" in str(e.value).split("did you mean")[1]


@pytest.mark.parametrize("override, key, type_name", [
    ("model.num_layers=abc", "model.num_layers", "int"),
    ("model.num_layers=2.5", "model.num_layers", "int"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate", "float"),
    ("model.qk_norm=maybe", "model.qk_norm", "bool"),
    ("model.eos_token_ids=(a,b)", "model.eos_token_ids", "tuple of int"),
    ("model.sliding_window=wide", "model.sliding_window", "int"),
    ("model.num_layers=None", "model.num_layers", "int"),
])
def test_wrong_type_names_key_value_and_type(override, key, type_name):
  with pytest.raises(ConfigError) as e:
    load(override)
  message = str(e.value)
  assert key in message and repr(override.split("=", 1)[1]) in message and type_name in message


def test_group_and_malformed_overrides():
  with pytest.raises(ConfigError, match=r"^model: is a group"):
    load("model=3")
  with pytest.raises(ConfigError, match="key=value"):
    load("rounds")


@pytest.mark.parametrize("override, key", [
    ("rounds=0", "rounds"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate"),
    ("sampling.temperature=-1", "sampling.temperature"),
    ("sampling.top_p=0", "sampling.top_p"),
    ("sampling.top_p=1.5", "sampling.top_p"),
    ("sampling.n=0", "sampling.n"),
    ("data.batch_size=0", "data.batch_size"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("model.num_layers=0", "model.num_layers"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),  # 4 heads not divisible by 3 kv heads
    ("model.head_dim=15", "model.head_dim"),
    ("model.activation=relu", "model.activation"),
    ("model.preset=nope", "model.preset"),
    ("algorithm.num_minibatches=3", "algorithm.num_minibatches"),  # 8 * 4 rows
    ("sampling.max_new_tokens=9000", "sampling.max_new_tokens"),
    ("model.hf_path=/does/not/exist", "model.hf_path"),
    ("algorithm.reward=oracle", "algorithm.reward"),
    ("algorithm.loss_type=hingy", "algorithm.loss_type"),
    ("algorithm.label_smoothing=0.5", "algorithm.label_smoothing"),
    ("algorithm.iteration_rounds=0", "algorithm.iteration_rounds"),
    ("judge.score_max=10", "judge.score_max"),
    ("judge.temperature=-0.5", "judge.temperature"),
    ("eval.judge_samples=1", "eval.judge_samples"),  # one sample: nothing to pick among
    ("eval.judge_samples=4", "eval.judge_samples"),  # the default run (GRPO, verifier) has no judge
])
def test_invalid_values_name_dotted_key(override, key):
  with pytest.raises(ConfigError) as e:
    config_validation.validate(load(override))
  assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_validate_catches_programmatic_type_errors():
  cfg = load()
  cfg.rounds = True  # ConfigDict accepts a bool where an int was
  with pytest.raises(ConfigError, match=r"^rounds: expected int"):
    config_validation.validate(cfg)
  cfg = load()
  cfg.model.vocab_size = None
  with pytest.raises(ConfigError, match=r"^model.vocab_size: expected int"):
    config_validation.validate(cfg)


def test_preset_variant_via_config_arg():
  cfg = load("model.num_layers=2", arg="model=llama3_8b,task=copy")
  assert cfg.model.preset == "llama3_8b" and cfg.data.task == "copy"
  for field in dataclasses.fields(ModelConfig):
    if field.name != "num_layers":
      assert cfg.model[field.name] == getattr(PRESETS["llama3_8b"], field.name), field.name
  config_validation.validate(cfg)
  assert config_lib.model_config(cfg.model) == PRESETS["llama3_8b"].replace(num_layers=2)


def test_preset_override_resets_fields_before_field_overrides():
  cfg = load("model.num_layers=3", "model.preset=gemma2_9b", "model.layer_types=()")
  assert cfg.model.family == "gemma2" and cfg.model.num_layers == 3
  assert cfg.model.sliding_window == PRESETS["gemma2_9b"].sliding_window
  config_validation.validate(cfg)


@pytest.mark.parametrize("arg, text", [("model=bogus", "model.preset"), ("modl=tiny", "modl"),
                                       ("llama3_8b", "key=value")])
def test_bad_config_arg(arg, text):
  with pytest.raises(ConfigError, match=text):
    load(arg=arg)


def test_missing_file_and_default_path():
  with pytest.raises(ConfigError, match="config: file not found"):
    config_lib.load_config("no/such/config.py", [])
  assert config_lib.default_config_path().is_file()


def test_default_path_outside_repo(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert Path(config_lib.default_config_path()).resolve() == Path(DEFAULT)
  cfg = config_lib.load_config("configs/default.py:model=tiny", ["rounds=2"])
  assert cfg.rounds == 2


def test_model_config_from_hf_path_applies_only_dtype_overrides(monkeypatch, tmp_path):
  hf_cfg = PRESETS["mistral_7b"].replace(num_layers=1)
  fake = type("FakeHF", (), {"load_config": staticmethod(lambda path: hf_cfg)})
  monkeypatch.setitem(__import__("sys").modules, "selfplay_jax.models.hf", fake)
  import selfplay_jax.models  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(selfplay_jax.models, "hf", fake, raising=False)
  cfg = load(f"model.hf_path={tmp_path}", "model.num_layers=7", "model.dtype=bfloat16",
             "model.remat=full")
  model = config_lib.model_config(cfg.model)
  assert model == hf_cfg.replace(dtype="bfloat16", remat="full")


def test_to_json_roundtrip():
  cfg = load("model.eos_token_ids=(1,2)")
  data = json.loads(config_lib.to_json(cfg))
  assert data["model"]["eos_token_ids"] == [1, 2] and data["model"]["sliding_window"] is None
  assert data["rounds"] == cfg.rounds


def test_split_argv():
  rest, overrides = config_lib.split_argv(
      ["prog", f"--config={DEFAULT}:model=tiny", "--config.a.b=1", "--config.c", "5",
       "--config.d", "--noconfig.e", "--workdir=/x"])
  assert rest == ["prog", f"--config={DEFAULT}:model=tiny", "--workdir=/x"]
  assert overrides == ["a.b=1", "c=5", "d=true", "e=false"]


def test_model_config_from_real_hf_config_json(tmp_path):
  from selfplay_jax.models import hf  # pylint: disable=import-outside-toplevel
  want = PRESETS["tiny"].replace(num_layers=1, hidden_size=32)
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf_dict(want)))
  cfg = load(f"model.hf_path={tmp_path}", "model.param_dtype=bfloat16")
  config_validation.validate(cfg)
  model = config_lib.model_config(cfg.model)
  assert model.num_layers == 1 and model.hidden_size == 32 and model.param_dtype == "bfloat16"


def test_hf_path_without_config_json_names_key(tmp_path):
  with pytest.raises(ConfigError, match=r"^model.hf_path: "):
    config_validation.validate(load(f"model.hf_path={tmp_path}"))


@pytest.mark.parametrize("overrides, key, text", [
    (["algorithm.name=grpo", "algorithm.loss_type=sigmoid"], "algorithm.loss_type", "grpo takes"),
    (["algorithm.name=dpo", "algorithm.loss_type=dapo"], "algorithm.loss_type", "dpo takes"),
    (["algorithm.name=sft", "algorithm.reward=judge"], "algorithm.reward", "does not sample"),
    (["judge.score_min=5", "judge.score_max=5"], "judge.score_max", "judge.score_min < judge.score_max"),
    (["algorithm.name=self_rewarding", "sampling.n=1"], "sampling.n", ">= 2"),
    (["algorithm.name=dpo", "data.batch_size=6", "algorithm.num_minibatches=4"],
     "algorithm.num_minibatches", "one pair per prompt"),
])
def test_preference_settings_that_conflict(overrides, key, text):
  with pytest.raises(ConfigError) as e:
    config_validation.validate(config_lib.load_config(str(config_lib.default_config_path()), overrides))
  assert str(e.value).startswith(f"{key}:") and text in str(e.value), str(e.value)


def test_recipe_config_arg_passes_unknown_keys_through():
  cfg = config_lib.load_config("configs/sharpen.py:mode=rl,task=sort")
  assert cfg.algorithm.name == "sharpen_rl" and cfg.data.task == "sort"
  assert config_lib.load_config("configs/sharpen.py").algorithm.name == "sharpen_sft"
  with pytest.raises(ConfigError, match="mode must be"):
    config_lib.load_config("configs/sharpen.py:mode=dpo")


# ---- fuzzing: any override is accepted or rejected with one ConfigError naming a key ---------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_BASE = load()
_KEYS = config_lib.flat_keys(_BASE)  # pylint: disable=protected-access
_VALUES = st.one_of(
    st.integers(-3, 300).map(str), st.floats(0, 2).map(repr), st.sampled_from(
        ["true", "False", "None", "()", "(1,2)", "('a', 'b')", "[1]", "{}", "-1", "0", "1e400",
         "0x10", "'quoted'", "\"\"", "=", "nan", "inf", "grpo", "dpo", "sigmoid", "bfloat16",
         "mean", "SIGTERM", "round", "sort", "llama", "gemma2"]),
    st.text(max_size=12), st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr))
_LEAVES = [k for k in _KEYS if not isinstance(config_lib.get_key(_BASE, k), config_dict.ConfigDict)]  # pylint: disable=protected-access
_ANY_KEYS = st.one_of(
    st.sampled_from(_KEYS), st.sampled_from(_KEYS).map(lambda k: k + "x"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=20), st.text(max_size=8))
_FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _accepted_or_one_named_error(pairs):
  overrides = [f"{key}={value}" for key, value in pairs]
  try:
    cfg = config_lib.apply_overrides(_BASE, overrides)
    config_validation.validate(cfg)
  except ConfigError as e:
    message = str(e)
    named = message.split(":", 1)[0]
    given_keys = {key.strip().removeprefix("config.") for key, _ in pairs}
    assert "\n" not in message
    assert named in set(_KEYS) | given_keys or message.startswith("override "), message
    return False
  # Accepted: every override is really in the config (no silent drop) and it round-trips to JSON.
  for key, value in pairs:
    assert key.strip().removeprefix("config.") in _KEYS, (key, value)
  assert json.loads(config_lib.to_json(cfg))
  setup.build_spec(cfg), setup.build_optimizer(cfg)  # what validation accepts, the builders take
  return True


@settings(max_examples=400, **_FUZZ)
@given(st.lists(st.tuples(st.sampled_from(_LEAVES), _VALUES), min_size=1, max_size=3))
def test_fuzzed_values_are_valid_or_one_config_error_naming_a_key(pairs):
  _accepted_or_one_named_error(pairs)


@settings(max_examples=150, **_FUZZ)
@given(st.lists(st.tuples(_ANY_KEYS, _VALUES), min_size=1, max_size=2))
def test_fuzzed_keys_are_known_or_one_config_error_naming_them(pairs):
  _accepted_or_one_named_error(pairs)


def test_configuration_reference_is_current():
  """docs/configuration.md is generated from configs/ (`python -m selfplay_jax.config_reference
  docs/configuration.md`); every key of the default config is in it with its comment."""
  from selfplay_jax import config_reference
  text = config_reference.reference_markdown()
  committed = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
  assert committed == text, "regenerate: python -m selfplay_jax.config_reference docs/configuration.md"
  comments = config_reference.default_comments(DEFAULT)
  for key in config_lib.flat_keys(load()):  # pylint: disable=protected-access
    if not isinstance(config_lib.get_key(load(), key), config_dict.ConfigDict):  # pylint: disable=protected-access
      assert f"| `{key}` |" in text, key
      if not key.startswith("model."):
        assert comments.get(key), f"configs/default.py: {key} has no comment"


@pytest.mark.parametrize("name, text, error", [
    ("syntax.py", "def get_config(:\n  pass\n", r"line 1: SyntaxError: invalid syntax"),
    ("name.py", "def get_config():\n  return undefined_name\n",
     r"line 2: NameError: name 'undefined_name' is not defined"),
    ("imports.py", "import no_such_module_xyz\n", r"line 1: ModuleNotFoundError"),
    ("no_get_config.py", "X = 1\n", r"defines no get_config\(\)"),
    ("run.json", "{}\n", r"is not a Python config file"),
])
def test_config_file_errors_name_the_file_and_line(tmp_path, name, text, error):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ConfigError, match=rf"^config: {path}:? ?{error}"):
    config_lib.load_config(str(path), [])


def test_greedy_judge_takes_one_sample():
  cfg = load("judge.temperature=0")
  config_validation.validate(cfg)  # one greedy judgement: fine
  cfg.judge.num_samples = 3
  with pytest.raises(ConfigError, match=r"^judge.temperature: 0 \(greedy\) makes the "
                                        r"judge.num_samples=3 judgements identical"):
    config_validation.validate(cfg)
