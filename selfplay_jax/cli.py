"""`selfplay-jax <command> [flags]`: the command-line entry point (logic lives in `config_lib`).

  selfplay-jax train --config=configs/default.py --config.model.num_layers=4 --workdir=/tmp/x

`--config=file.py[:arg]` is an `ml_collections` config-file flag; `--config.a.b=value` overrides are
parsed and checked by `config_lib.apply_overrides`, so the CLI and `config_lib.load_config` agree.
Config errors print one line, `error: <dotted key>: <problem>`, and exit with status 2; so does any
other bad input (data file, model directory, checkpoint, workdir). `train` exits with 3 when the run
diverged (`optimizer.max_bad_updates` consecutive non-finite updates) and with 128 + N after signal N
(SIGTERM / SIGINT: the round in flight was finished and saved).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from selfplay_jax import config_lib, config_validation
from selfplay_jax.errors import (CheckpointError, CheckpointFormatError, ConfigError, DataError,
                                 EncodingError, RewardFunctionError, TokenizerError)

COMMANDS = {
    "train": "run self-improvement rounds from a config (checkpoints and metrics in --workdir)",
    "eval": "held-out accuracy and pass@k of a run's checkpoint (writes eval_round_NNNN.json)",
    "export": "write a checkpoint as a Hugging Face model directory",
    "generate": "sample completions from a Hugging Face model directory (--model)",
    "report": "write a self-contained HTML report of a run (summary, plots, rounds, samples)",
    "plan": "print parameter count, memory and sharding for a config without allocating",
}
# Bad input (config, files, checkpoints, workdir) -> one `error:` line, never a traceback.
_INPUT_ERRORS = (ConfigError, OSError, CheckpointError, CheckpointFormatError, TokenizerError)
_FLAGS = flags.FLAGS


def usage() -> str:
  lines = ["usage: selfplay-jax <command> [--config=configs/default.py] [--config.KEY=VALUE ...]",
           "", "commands:"]
  lines += [f"  {name:<10}{text}" for name, text in COMMANDS.items()]
  lines += ["", "Run `selfplay-jax <command> --helpfull` for all flags."]
  return "\n".join(lines)


def _fail(message: object, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _no_positional_args(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")


def _root_cause(error: BaseException) -> BaseException:
  """The innermost ConfigError behind a flag-parsing error (absl/ml_collections re-wrap it)."""
  found, seen = error, error
  while seen is not None:
    if isinstance(seen, ConfigError):
      found = seen
    seen = seen.__cause__ or seen.__context__
  return found


def _define_flags(argv: Sequence[str]) -> flags.FlagHolder:
  flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, resolved config); "
                      "train: default runs/default under the current directory")
  return config_flags.DEFINE_config_file(
      "config", default=str(config_lib.default_config_path()), sys_argv=list(argv),
      help_string="config file, optionally with a `:key=value,...` argument for get_config()")


def _config_file(argv: Sequence[str]) -> str | None:
  """The `--config` file that flag parsing loads (None for commands without one)."""
  if "config" not in _FLAGS:
    return None
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  return (given[-1] if given else str(config_lib.default_config_path())).partition(":")[0]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports failures as one `error:` line instead of a traceback; so is
  an error in the config file's own code (SyntaxError, NameError, ImportError, no get_config),
  with the file and line."""
  try:
    return _FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    cause = _root_cause(e)
    path = _config_file(argv)
    if not isinstance(cause, ConfigError) and path is not None:
      cause = config_lib.config_file_error(path, e) or cause
    if not isinstance(cause, ConfigError) and not isinstance(
        e, (flags.Error, ValueError, TypeError, OSError)):
      raise
    message = [l.strip() for l in str(cause).strip().splitlines() if l.strip()]
    if message and message[0].endswith("Error whilst parsing config file:"):  # ml_collections
      message = [f"config: {path}: {message[-1]}"]
    _fail(message[0] if message else type(e).__name__)


def _quiet_absl() -> None:
  """Keeps Orbax's per-save / per-restore INFO lines out of the output unless --verbosity is given."""
  if not _FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def _train(cfg, workdir: str | None) -> int:
  from selfplay_jax import runtime, train  # pylint: disable=import-outside-toplevel

  workdir = workdir or "runs/default"
  _quiet_absl()  # keep Orbax's per-save INFO lines out of the demo's output
  model_cfg = config_lib.model_config(cfg.model)
  print(f"selfplay-jax train: {cfg.algorithm.name} on {cfg.data.task}, model {model_cfg.family} "
        f"({cfg.model.hf_path or 'preset ' + cfg.model.preset}), workdir {workdir}")
  try:
    history = train.train_and_evaluate(cfg, workdir)
  except runtime.Preempted as e:
    print(f"selfplay-jax train: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell convention for "terminated by signal N"
  except train.Diverged as e:
    _fail(e, code=3)
  except _INPUT_ERRORS + (DataError, EncodingError, RewardFunctionError) as e:
    _fail(e)
  if "eval/accuracy_after_warmup" in history:
    print(f"held-out accuracy after warm-up: {history['eval/accuracy_after_warmup']:.1%}")
  if "eval/accuracy" in history:
    vote = (f" (members' mean); the population's vote: {history['eval/accuracy_vote']:.1%}"
            if "eval/accuracy_vote" in history else "")
    print(f"held-out accuracy after round {history['round']}: {history['eval/accuracy']:.1%}{vote}")
  print(f"metrics: {Path(workdir) / 'metrics.jsonl'}; checkpoints: {Path(workdir) / 'checkpoints'}")
  return 0


def _define_distributed_flags() -> None:
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "jax.distributed.initialize(): auto = when --coordinator_address or "
                    "JAX_COORDINATOR_ADDRESS is given or a multi-process SLURM step / TPU slice is "
                    "detected")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator")
  flags.DEFINE_integer("num_processes", None, "number of JAX processes")
  flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1")


def _main(argv: list[str], overrides: list[str], config: flags.FlagHolder) -> int:
  from selfplay_jax import runtime  # pylint: disable=import-outside-toplevel

  _no_positional_args(argv)
  try:
    cfg = config_lib.apply_overrides(config.value, overrides)
    config_validation.validate(cfg)
    runtime.initialize_distributed(_FLAGS.distributed, _FLAGS.coordinator_address,
                                 _FLAGS.num_processes, _FLAGS.process_id)
  except (ConfigError, OSError) as e:
    _fail(e)
  return _train(cfg, _FLAGS.workdir)


def _define_generate_flags() -> None:
  flags.DEFINE_string("model", None, "Hugging Face model directory (config.json + *.safetensors)")
  flags.DEFINE_multi_string("prompt", [], "prompt text; repeat the flag for a batch")
  flags.DEFINE_string("tokenizer", None, "tokenizer.json / tokenizer.model (default: in --model)")
  flags.DEFINE_integer("max_new_tokens", 64, "completion length cap (tokens)")
  flags.DEFINE_float("temperature", 0.0, "softmax temperature; 0 = greedy")
  flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens; 0 = off")
  flags.DEFINE_float("top_p", 1.0, "nucleus mass in (0, 1]; 1 = off")
  flags.DEFINE_integer("n", 1, "completions per prompt")
  flags.DEFINE_integer("seed", 0, "sampling PRNG seed")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and parameter dtype")
  flags.DEFINE_bool("chat", False, "render each prompt as a user message with the checkpoint's "
                    "chat template (as transformers' apply_chat_template, generation prompt added)")
  flags.DEFINE_string("system", "", "with --chat: a system message before each prompt")


def _generate(argv: list[str]) -> int:
  from selfplay_jax import generate, sampling  # pylint: disable=import-outside-toplevel

  _no_positional_args(argv)
  if not _FLAGS.model:
    _fail("--model: a Hugging Face model directory is required")
  if not _FLAGS.prompt:
    _fail("--prompt: give at least one prompt")
  sc = sampling.SamplingConfig(max_new_tokens=_FLAGS.max_new_tokens, temperature=_FLAGS.temperature,
                               top_k=_FLAGS.top_k, top_p=_FLAGS.top_p, n=_FLAGS.n)
  try:
    sc.validate(prefix="")
    results = generate.generate_text(_FLAGS.model, _FLAGS.prompt, sc, tokenizer_path=_FLAGS.tokenizer,
                                     seed=_FLAGS.seed, dtype=_FLAGS.dtype, chat=_FLAGS.chat,
                                     system_prompt=_FLAGS.system)
  except (ConfigError, ValueError, OSError) as e:
    _fail(e)
  for result in results:
    for i, text in enumerate(result.completions):
      label = f"[{i}] " if len(result.completions) > 1 else ""
      print(f"{result.prompt}{label}{text}")
  total = sum(len(t) for r in results for t in r.tokens)
  print(f"({total} tokens in {results[0].seconds:.2f}s including compilation)", file=sys.stderr)
  return 0


def _define_eval_flags() -> None:
  flags.DEFINE_string("workdir", None, "training workdir (config.json + checkpoints/)")
  flags.DEFINE_integer("round", None, "checkpoint round to evaluate (default: the newest)")
  flags.DEFINE_integer("k", 8, "samples per problem for pass@k (0 = greedy accuracy only)")
  flags.DEFINE_integer("num_examples", None, "held-out examples (default: the run's eval.num_examples)")


def _eval(argv: list[str]) -> int:
  from selfplay_jax import evaluate  # pylint: disable=import-outside-toplevel

  _no_positional_args(argv)
  if not _FLAGS.workdir:
    _fail("--workdir: the training workdir to evaluate is required")
  if _FLAGS.k < 0:
    _fail(f"--k: must be >= 0, got {_FLAGS.k}")
  if _FLAGS.num_examples is not None and _FLAGS.num_examples < 1:
    _fail(f"--num_examples: must be >= 1, got {_FLAGS.num_examples} (leave it out for the run's "
          "eval.num_examples)")
  if _FLAGS.round is not None and _FLAGS.round < 0:
    _fail(f"--round: must be >= 0, got {_FLAGS.round}")
  _quiet_absl()
  try:
    result = evaluate.evaluate_workdir(_FLAGS.workdir, step=_FLAGS.round, k=_FLAGS.k,
                                       num_examples=_FLAGS.num_examples)
  except _INPUT_ERRORS + (ValueError,) as e:
    _fail(e)
  for key, value in result.items():  # shown first: a workdir that refuses the file loses nothing
    print(f"{key}: {value:.4f}" if key != "round" else f"round: {int(value)}")
  out = Path(_FLAGS.workdir) / f"eval_round_{int(result['round']):04d}.json"
  try:
    out.write_text(json.dumps(result, indent=2))
  except OSError as e:
    _fail(f"cannot write {out}: {e.strerror or e} (the results above were not saved)")
  print(f"written to {out}")
  return 0


def _define_export_flags() -> None:
  flags.DEFINE_string("workdir", None, "training workdir (config.json + checkpoints/)")
  flags.DEFINE_string("out", None, "new directory for the Hugging Face model")
  flags.DEFINE_integer("round", None, "checkpoint round to export (default: the newest)")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "stored dtype (default: as trained)")
  flags.DEFINE_integer("member", 0, "population runs (population.size > 1): the member to export")


def _export(argv: list[str]) -> int:
  from selfplay_jax import export  # pylint: disable=import-outside-toplevel

  _no_positional_args(argv)
  for name in ("workdir", "out"):
    if not _FLAGS[name].value:
      _fail(f"--{name}: required")
  _quiet_absl()
  try:
    out, step = export.export_workdir(_FLAGS.workdir, _FLAGS.out, step=_FLAGS.round, dtype=_FLAGS.dtype,
                                      member=_FLAGS.member)
  except _INPUT_ERRORS + (ValueError,) as e:
    _fail(e)
  print(f"exported round {step} of {_FLAGS.workdir} to {out} (transformers.AutoModelForCausalLM)")
  return 0


def _define_report_flags() -> None:
  flags.DEFINE_string("workdir", None, "training workdir (config.json + metrics.jsonl)")
  flags.DEFINE_string("out", None, "HTML file to write (default: <workdir>/report.html)")


def _report(argv: list[str]) -> int:
  from selfplay_jax import report  # pylint: disable=import-outside-toplevel

  _no_positional_args(argv)
  if not _FLAGS.workdir:
    _fail("--workdir: the training workdir to report on is required")
  try:
    out = report.write_report(_FLAGS.workdir, _FLAGS.out)
  except _INPUT_ERRORS as e:
    _fail(e)
  print(f"report written to {out}")
  return 0


def _define_plan_flags() -> None:
  flags.DEFINE_integer("devices", None, "devices to plan for (default: the config's "
                       "hardware.num_devices, else this host's)")
  flags.DEFINE_float("device_memory_gib", None, "memory per device in GiB (default: the config's "
                     "hardware.device_memory_gib)")
  flags.DEFINE_bool("json", False, "print the plan as JSON")


def _plan(argv: list[str], overrides: list[str], config: flags.FlagHolder) -> int:
  from selfplay_jax import plan  # pylint: disable=import-outside-toplevel

  _no_positional_args(argv)
  _quiet_absl()  # no INFO lines (e.g. absent TPU backends) around the table
  for name in ("devices", "device_memory_gib"):
    if _FLAGS[name].value is not None and _FLAGS[name].value <= 0:
      _fail(f"--{name}: must be > 0, got {_FLAGS[name].value}")
  try:
    cfg = config_lib.apply_overrides(config.value, overrides)
    result = plan.plan(cfg, num_devices=_FLAGS.devices, device_memory_gib=_FLAGS.device_memory_gib)
  except _INPUT_ERRORS as e:
    _fail(e)
  print(plan.to_json(result) if _FLAGS.json else plan.format_plan(result))
  return 0


def run(argv: Sequence[str] | None = None) -> None:
  """Console-script entry: `selfplay-jax <command> [flags]`."""
  argv = list(sys.argv if argv is None else argv)
  positional = [i for i, a in enumerate(argv[1:], 1) if not a.startswith("-")]
  if not positional or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0)
  command = argv.pop(positional[0])
  if command not in COMMANDS:
    _fail(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
  simple = {"generate": (_define_generate_flags, _generate), "eval": (_define_eval_flags, _eval),
            "export": (_define_export_flags, _export), "report": (_define_report_flags, _report)}
  if command in simple:  # flags only, no config file
    define, main = simple[command]
    define()
    app.run(main, argv=argv, flags_parser=_parse_flags)
  # train and plan: a config file plus --config.KEY=VALUE overrides.
  try:
    absl_argv, overrides = config_lib.split_argv(argv)
  except ConfigError as e:
    _fail(e)
  config = _define_flags(absl_argv)
  if command == "plan":
    _define_plan_flags()
    main = functools.partial(_plan, overrides=overrides, config=config)
  else:
    _define_distributed_flags()
    main = functools.partial(_main, overrides=overrides, config=config)
  app.run(main, argv=absl_argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
