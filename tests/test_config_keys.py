"""Every config key has an effect: a knob that is validated but ignored is a bug.

Every shipped config (`configs/*.py`, `examples/**/config.py`) goes, tiny and in this process,
through the entry points the CLI calls while `KeyReads` records which dotted keys the code reads:
`train.train_and_evaluate` (then `evaluate.evaluate_workdir` and `export.export_workdir` on the
default config's run) for the configs of TRAIN_RUNS, `plan.plan` for those of PLAN_RUNS. Every
leaf key of every shipped config must be read by at least one run, and every key a recipe changes
from `configs/default.py` by that recipe's own run. About 2 minutes on an idle 2-core CPU, nearly
all of it XLA compiling the eight trained runs.

What counts as a read: `ConfigDict.__getitem__` on a config handed to the code. Attribute access
and `.get` go through it, and a nested group is the very object stored in its parent (no wrapper),
so each group is named by the path it was reached by; FieldReference placeholders (optional model
fields) are resolved inside it. What does not count: reads inside `config_validation.validate` (it
reads every key of its rules table), serialisation (`config_lib.to_json`,
`run_config.resume_differences`, `ConfigDict.to_dict` / `to_json` / printing) and iterating a
group (`items`, `values`), which touch every key at once. A read shows that a key reaches the
code, not that every value changes what it does.

Keys that only matter on a path a plain tiny run does not take get a run that takes it: JSONL data
(`model.tokenizer_path`, `data.eval_path`, ...), W&B on with the module stubbed
(`metrics.wandb_*`), a SIGTERM kill (`debug.kill_point`, `debug.kill_signal`), NaN injection
(`debug.nan_to_round`, `optimizer.max_bad_updates`), plots on (`metrics.plot_min_interval_s`) and
`plan` of real_model.py (`hardware.*`). A key no run can reach goes in ALLOWED_UNREAD, naming the
code that reads it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from selfplay_jax import config_lib, config_validation, evaluate, export, plan, run_config, runtime
from selfplay_jax import train
from selfplay_jax.data import tasks
from tests.test_train import OVERRIDES, _jsonl_dataset

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(str(p.relative_to(REPO)) for p in
                 [*(REPO / "configs").glob("*.py"), *(REPO / "examples").glob("**/config.py")])

# The suite's tiny run (tests/test_train.py): one self-improvement round, no warm-up (it reads no
# key the round does not), no plots (the default config's run puts them back).
TINY = [*OVERRIDES, "warmup.rounds=0", "rounds=1", "metrics.plot_every_rounds=0"]

# Trained: config (path[:arg]) -> overrides on top of TINY. The extra overrides send a run down a
# path that reads keys a plain run does not ({jsonl}, {heldout}, {tokenizer}: files the fixture
# writes).
TRAIN_RUNS = {
    # Plots, W&B (module stubbed) and a SIGTERM right after the round's save: the run stops
    # gracefully (runtime.Preempted); `eval` and `export` then rebuild it from its config.json
    # (LoRA adapters: restored onto the re-initialised base, merged by the export).
    "configs/default.py": ("metrics.plot_every_rounds=1", "metrics.wandb=true",
                           "debug.kill_at_round=1", "debug.kill_point=save",
                           "debug.kill_signal=SIGTERM", "model.lora.rank=2",
                           "model.lora.alpha=4.0", "model.lora.targets=('[qv]_proj',)"),
    # User JSONL data with a held-out file and its tokenizer, scored by Python reward functions
    # (the built-in math reward, and the same function by its module path, weighted); prompts go
    # through the tokenizer's chat template (one the fixture writes: BOS + the user's text).
    "configs/grpo.py": ("data.task={jsonl}", "data.eval_path={heldout}",
                        "model.tokenizer_path={tokenizer}", "data.prompt_format=chat",
                        "algorithm.reward_fns=math,selfplay_jax.scoring.math_reward:math_reward",
                        "algorithm.reward_weights=1,0.5"),
    # NaN losses in round 1: its updates are skipped and checked against optimizer.max_bad_updates.
    "configs/dpo.py": ("debug.nan_from_round=1", "debug.nan_to_round=1"),
    # A population of two (members vmapped in one round, replay slot and all) on data.seed's order.
    "configs/spin.py": ("population.size=2", "data.seed=5"),
    # The easy-to-hard curriculum (its own loop: a population labelling longer additions by vote).
    "configs/easy_to_hard.py": ("warmup.rounds=1", "warmup.num_minibatches=2",
                                "curriculum.gold_max_digits=1", "curriculum.max_digits=2",
                                "sampling.max_new_tokens=9", "algorithm.num_minibatches=2",
                                "curriculum.replay_size=8", "optimizer.final_learning_rate=1e-5",
                                "population.size=2", "data.step_by_step=true"),
    # The label-free majority vote, soft and with a threshold (the verifier read for monitoring).
    "configs/ttrl.py": ("algorithm.majority_threshold=0.5", "algorithm.majority_soft=true"),
    "configs/self_rewarding.py": (),
    "configs/sharpen.py:mode=sft": (),
    "configs/sharpen.py:mode=rl": (),
    # SCoRe's two-attempt episodes (Countdown's widths do not fit TINY; the keys are the same).
    "configs/score.py:task=arithmetic": (),
    # ReST-MCTS*'s tree search at a budget, the value head mixed into the scores (arithmetic has no
    # step separator of its own: "+" stands in; Countdown's widths do not fit TINY).
    "configs/rest_mcts.py:task=arithmetic": ("algorithm.search_separator=+",
                                             "algorithm.search_token_budget=40",
                                             "algorithm.search_value_weight=0.5",
                                             "eval.search_examples=4"),
    "examples/extending/config.py": (),
}
# Planned (`plan.plan(cfg)`, as `selfplay-jax plan` does: no compilation). real_model.py is an 8B
# model, and `plan` is what reads its `hardware.*` (no num_devices argument: it would stand in for
# hardware.num_devices, which is then not read). The other recipes only change values of keys
# default.py has, and the algorithm-specific ones are read by the spec `plan` builds; training each
# would add ~15 s of compilation and no key.
PLAN_RUNS = ("configs/real_model.py", "configs/dapo.py", "configs/dr_grpo.py", "configs/ppo.py",
             "configs/reinforce_pp.py", "configs/rest_em.py", "configs/rloo.py", "configs/sft.py",
             "configs/kto.py")
# Its own settings are the 8B run's training settings (learning rate, checkpoint cadence, ...):
# `plan` does not read them, the trained runs read the same keys.
NOT_ITS_OWN_RUN = ("configs/real_model.py",)

# Keys no run here can reach: key -> (function that reads it, why no run reaches it). Each key's
# last part must appear in that function's source, so an entry cannot outlive the code.
ALLOWED_UNREAD: dict[str, tuple[object, str]] = {}


# ---- the tracker --------------------------------------------------------------------------------

_BULK = ("to_dict", "to_json", "to_json_best_effort", "to_yaml", "__repr__", "__str__", "__eq__",
         "eq_as_configdict", "copy_and_resolve_references", "items", "values", "iteritems",
         "itervalues")
_NOT_READS = ((config_validation, "validate"), (config_lib, "to_json"), (run_config, "to_json"),
              (run_config, "resume_differences"))


class KeyReads:
  """Records the dotted keys read from registered configs, by run label."""

  def __init__(self):
    self.by_run: dict[str, set[str]] = {}
    self._current: set[str] | None = None
    self._paths: dict[int, tuple[ConfigDict, str]] = {}  # id -> (config, "a.b."), kept alive
    self._paused = 0

  def install(self, mp: pytest.MonkeyPatch) -> None:
    getitem = ConfigDict.__getitem__

    def tracked_getitem(cd, key):
      value = getitem(cd, key)  # a dotted key recurses through this function
      entry = self._paths.get(id(cd))
      if entry is not None and isinstance(key, str) and "." not in key:
        name = entry[1] + key
        if isinstance(value, ConfigDict):
          self._paths.setdefault(id(value), (value, name + "."))
        if not self._paused and self._current is not None:
          self._current.add(name)
      return value

    mp.setattr(ConfigDict, "__getitem__", tracked_getitem)
    for name in _BULK:
      mp.setattr(ConfigDict, name, self._not_reading(getattr(ConfigDict, name)))
    for module, name in _NOT_READS:
      mp.setattr(module, name, self._not_reading(getattr(module, name)))
    # eval / export rebuild the run from its saved config.json: that config is read too.
    load = run_config.load_run_config
    mp.setattr(run_config, "load_run_config", lambda *a, **k: self.register(load(*a, **k)))

  def register(self, cfg: ConfigDict) -> ConfigDict:
    self._paths[id(cfg)] = (cfg, "")
    return cfg

  @contextlib.contextmanager
  def run(self, label: str, cfg: ConfigDict | None = None):
    """Reads of `cfg` (and of configs registered meanwhile) count for `label`."""
    if cfg is not None:
      self.register(cfg)
    self._current = self.by_run.setdefault(label, set())
    try:
      yield self._current
    finally:
      self._current = None

  def _not_reading(self, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      self._paused += 1
      try:
        result = fn(*args, **kwargs)
        return iter(list(result)) if isinstance(result, types.GeneratorType) else result
      finally:
        self._paused -= 1
    return wrapper

  @property
  def all(self) -> set[str]:
    return set().union(*self.by_run.values())


def leaf_keys(cfg: ConfigDict) -> set[str]:
  return {k for k in config_lib.flat_keys(cfg)
          if not isinstance(config_lib.get_key(cfg, k), ConfigDict)}


def unread_report(keys_by_config: dict[str, set[str]], read: set[str]) -> str:
  """'' when every key is read; else one line per unread key naming the configs that set it."""
  unread: dict[str, list[str]] = {}
  for config, keys in keys_by_config.items():
    for key in sorted(keys - read - set(ALLOWED_UNREAD)):
      unread.setdefault(key, []).append(config)
  if not unread:
    return ""
  lines = [f"  {key}  (in {', '.join(configs)})" for key, configs in sorted(unread.items())]
  return (f"{len(unread)} config key(s) that nothing reads (a knob that is validated but ignored "
          "is a bug: make it do something or remove it; a key only a path no test run can take "
          "reads goes in ALLOWED_UNREAD):\n" + "\n".join(lines))


def _load(config: str, overrides=()) -> ConfigDict:
  return config_lib.load_config(str(REPO / config), list(overrides))


# ---- the runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
  """Runs every config of TRAIN_RUNS and PLAN_RUNS once; the tracker holds each run's reads."""
  assert threading.current_thread() is threading.main_thread(), (
      "the SIGTERM kill is only caught (train.StopOnSignal) in the main thread")
  data_dir = tmp_path_factory.mktemp("jsonl")
  jsonl, tokenizer = _jsonl_dataset(data_dir)
  (tokenizer.parent / "chat_template.jinja").write_text(
      "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
  heldout = data_dir / "heldout.jsonl"
  task = tasks.get_task("arithmetic", num_digits=1)
  rows = task.examples("heldout", seed=0, num=16)
  heldout.write_text("".join(json.dumps(e) + "\n" for e in rows))
  files = {"jsonl": jsonl, "heldout": heldout, "tokenizer": tokenizer}

  calls = []
  wandb = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(
      log=lambda values, step: None, finish=lambda: None))
  tracker, seconds = KeyReads(), {}
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, "wandb", wandb)
    tracker.install(mp)
    for config, extra in TRAIN_RUNS.items():
      start = time.perf_counter()
      cfg = _load(config, TINY + [o.format(**files) for o in extra])
      config_validation.validate(cfg)  # as the CLI does; its reads do not count
      workdir = tmp_path_factory.mktemp("run")
      with tracker.run(config, cfg):
        if config == "configs/default.py":
          with pytest.raises(runtime.Preempted):
            train.train_and_evaluate(cfg, workdir)
          evaluate.evaluate_workdir(workdir, k=0)  # k > 0 reads the same keys, one compile more
          export.export_workdir(workdir, workdir / "hf")
        else:
          train.train_and_evaluate(cfg, workdir)
      seconds[config] = time.perf_counter() - start
    for config in PLAN_RUNS:
      start = time.perf_counter()
      cfg = _load(config)
      with tracker.run(config, cfg):
        plan.plan(cfg)
      seconds[config] = time.perf_counter() - start
  assert calls and calls[0]["project"] == "selfplay_jax"  # the W&B writer was made
  print("seconds per run: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
  return tracker


# ---- the tests ----------------------------------------------------------------------------------


def test_tracker_sees_nested_reads_but_not_validation_or_serialisation():
  cfg = _load("configs/default.py", OVERRIDES)
  saved = json.loads(config_lib.to_json(cfg))
  tracker = KeyReads()
  with pytest.MonkeyPatch.context() as mp:
    tracker.install(mp)
    with tracker.run("bulk", cfg) as read:
      config_validation.validate(cfg)
      config_lib.to_json(cfg)
      run_config.resume_differences(saved, cfg)
      repr(cfg), str(cfg), cfg.algorithm.items(), list(cfg.model.iteritems()), copy.deepcopy(cfg)
      assert read == {"algorithm", "model"}  # the groups reached, none of their keys
    with tracker.run("reads", cfg) as read:
      cfg.algorithm.kl_coef, cfg.model.num_layers, cfg["data"]["batch_size"], cfg.get("seed")
      cfg["mesh.fsdp"], cfg.model.sliding_window  # a dotted key; a placeholder (FieldReference)
      assert cfg.judge.get("no_such_key", 7) == 7  # a missing key is no read
  assert read == {"algorithm", "algorithm.kl_coef", "model", "model.num_layers", "data",
                  "data.batch_size", "seed", "mesh", "mesh.fsdp", "model.sliding_window", "judge"}
  assert cfg.algorithm.kl_coef == 0.02  # the patch is gone, reads work as before


def test_a_key_nothing_reads_is_reported():
  """A knob added to a copy of the default config passes validation (unknown keys are not
  rejected) and `plan` (a real entry point) never reads it: the report names it."""
  cfg = _load("configs/default.py", OVERRIDES)
  cfg.algorithm.unused_knob = 1
  config_validation.validate(cfg)
  tracker = KeyReads()
  with pytest.MonkeyPatch.context() as mp:
    tracker.install(mp)
    with tracker.run("plan", cfg) as read:
      plan.plan(cfg, num_devices=1)
  assert {"algorithm.kl_coef", "model.num_layers", "data.batch_size"} <= read
  assert "debug.kill_point" not in read  # validate reads it, plan does not
  report = unread_report({"copy of default.py": leaf_keys(cfg)}, read)
  assert "algorithm.unused_knob  (in copy of default.py)" in report
  assert unread_report({"x": {"algorithm.kl_coef"}}, read) == ""


@pytest.mark.slow
def test_every_key_of_every_shipped_config_is_read(reads):
  run = {c.partition(":")[0] for c in (*TRAIN_RUNS, *PLAN_RUNS)}
  assert run == set(SHIPPED), f"shipped configs without a run here: {sorted(set(SHIPPED) - run)}"
  for key, (fn, why) in ALLOWED_UNREAD.items():
    assert why and key.rsplit(".", 1)[-1] in inspect.getsource(fn), (key, fn)
  keys = {config: leaf_keys(_load(config)) for config in (*TRAIN_RUNS, *PLAN_RUNS)}
  report = unread_report(keys, reads.all)
  assert not report, report


@pytest.mark.slow
def test_keys_a_recipe_changes_are_read_by_its_own_run(reads):
  """A recipe's own settings (the keys it adds to or changes from configs/default.py) must matter
  to the algorithm it picks, not only to some other config's run."""
  default = _load("configs/default.py")
  default_keys = leaf_keys(default)
  lines = []
  for config in (c for c in (*TRAIN_RUNS, *PLAN_RUNS) if c not in NOT_ITS_OWN_RUN):
    cfg = _load(config)
    changed = {k for k in leaf_keys(cfg) if k not in default_keys
               or config_lib.get_key(cfg, k) != config_lib.get_key(default, k)}
    for key in sorted(changed - reads.by_run[config] - set(ALLOWED_UNREAD)):
      lines.append(f"  {key} = {config_lib.get_key(cfg, key)!r}  ({config})")
  assert not lines, ("recipe settings their own run never reads (the recipe's algorithm ignores "
                     "them):\n" + "\n".join(lines))
