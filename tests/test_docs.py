"""The documentation cannot drift from the code.

1. Every key a run can write to `metrics.jsonl` is documented in docs/metrics.md: the round of every
   registered algorithm, of each reward (verifier, judge, self-likelihood) and of both warm-up kinds
   is traced with `jax.eval_shape` (nothing compiles) and its metric keys collected; the loop's
   own keys come from the string literals of `train.py`.
2. Every flag every `selfplay-jax` command defines is in docs/cli.md.
3. Every `selfplay-jax ...` command shown in README.md, docs/ and launch/README.md (code blocks and
   inline code) is run at tiny sizes, or, where it needs an accelerator slice, a Hugging Face
   checkpoint or a launcher, parsed and validated: its flags are the command's, its config loads
   with its overrides and passes `config_validation.validate`, and a launcher's mesh fits its
   processes x devices. Commands that chain (train -> eval / export / report -> generate on the
   exported model) share one workdir per `--workdir` of the docs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from selfplay_jax import config_lib, config_validation, export, models, setup
from selfplay_jax.algorithms import registry
from selfplay_jax.models import hf

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
             REPO / "launch" / "README.md"]
METRICS_DOC = REPO / "docs" / "metrics.md"
CLI_DOC = REPO / "docs" / "cli.md"


def _rel(path: Path) -> str:
  return str(path.relative_to(REPO))


# ---- 1. metrics.jsonl keys -----------------------------------------------------------------------

# Small enough to build in a second; eval_shape never compiles.
_TRACE = ["warmup.rounds=1", "rounds=1", "data.batch_size=2", "sampling.n=2",
          "sampling.max_new_tokens=4", "data.difficulty=1", "model.hidden_size=16",
          "model.intermediate_size=32", "model.num_layers=1", "model.num_heads=2",
          "model.num_kv_heads=1", "model.head_dim=8", "algorithm.num_minibatches=1", "mesh.data=1",
          "eval.batch_size=2"]
# (overrides, warm-up round?) whose rounds together write every key the code can write.
_NEEDS = {"rest_mcts": ["algorithm.search_separator=+"]}  # arithmetic has no step separator
_ROUND_KINDS = ([([f"algorithm.name={name}", *_NEEDS.get(name, [])], False)
                 for name in registry.names()]
                + [([f"algorithm.reward={r}"], False)
                   for r in ("verifier", "judge", "likelihood", "math", "majority",
                             "self_certainty")]
                + [(["algorithm.name=rloo", "algorithm.kl_coef=0.05"], False),
                   ([], True), (["algorithm.reward=judge"], True)])
_METRIC_PREFIXES = ("train", "eval", "time", "judge")


def _round_metric_keys(overrides, warmup, workdir) -> set[str]:
  cfg = config_lib.load_config(str(config_lib.default_config_path()), _TRACE + overrides)
  config_validation.validate(cfg)
  run = setup.build(cfg, workdir)
  round_fn = run.round_fn(warmup=warmup, num_samples=8, jit=False)
  _, metrics = jax.eval_shape(round_fn, run.abstract_state(), setup.example_batch(cfg))
  return set(metrics)


def _documented(key: str, text: str) -> bool:
  return f"`{key}`" in text


@pytest.mark.slow
def test_every_metric_key_is_documented(tmp_path):
  text = METRICS_DOC.read_text()
  written: dict[str, str] = {}
  for overrides, warmup in _ROUND_KINDS:
    kind = " ".join(overrides) + (" (warm-up)" if warmup else "")
    workdir = tmp_path / ("judge" if "judge" in kind else "w")  # judge runs: another tokenizer
    for key in _round_metric_keys(overrides, warmup, workdir):
      written.setdefault(key, kind)
  assert any(k.startswith("samples/") for k in written)  # the sample dump rides with the metrics
  assert "`samples/*`" in text  # ... and the page says it goes elsewhere
  written = {k: v for k, v in written.items() if not k.startswith("samples/")}
  # The loop's own keys: every "<prefix>/<name>" literal in train.py (metrics it adds, reads or
  # null-fills), and the two non-metric keys every line has.
  source = (REPO / "selfplay_jax" / "train.py").read_text()
  prefixes = "|".join(_METRIC_PREFIXES)
  for key in re.findall(rf'"((?:{prefixes})/[A-Za-z0-9_@]+)"', source):
    written.setdefault(key, "train.py")
  for key in ("round", "phase"):
    assert re.search(rf'\b{key}=|"{key}"', source), key
    written.setdefault(key, "train.py")
  assert {"time/round_s", "eval/accuracy", "eval/accuracy_after_warmup",
          "train/reward_mean"} <= set(written)
  missing = {k: v for k, v in sorted(written.items()) if not _documented(k, text)}
  assert not missing, f"docs/metrics.md does not document {missing} (key: where it is written)"


def test_metrics_page_lists_no_key_the_code_does_not_write():
  """A documented `train/...` / `judge/...` key must exist somewhere in the package's code
  (spec aux dicts log as train/<name>) or its examples, so a renamed metric does not linger."""
  text = METRICS_DOC.read_text()
  code = "\n".join(p.read_text() for d in ("selfplay_jax", "examples")
                   for p in (REPO / d).rglob("*.py"))
  for key in sorted(set(re.findall(r"`((?:train|judge|eval|time)/[a-z_]+)`", text))):
    name = key.split("/", 1)[1]
    assert f'"{key}"' in code or f'"{name}"' in code, f"docs/metrics.md: {key} is not in the code"


# ---- 2. CLI flags --------------------------------------------------------------------------------

_DUMP_FLAGS = r"""
import json
from absl import flags
from selfplay_jax import cli
F = flags.FLAGS
def collect(*defines):
  before = set(F)
  for define in defines:
    define()
  new = [n for n in F if n not in before]
  for n in new:
    delattr(F, n)
  return new
print(json.dumps({
    "train": collect(lambda: cli._define_flags([]), cli._define_distributed_flags),
    "plan": collect(lambda: cli._define_flags([]), cli._define_plan_flags),
    "eval": collect(cli._define_eval_flags), "export": collect(cli._define_export_flags),
    "report": collect(cli._define_report_flags), "generate": collect(cli._define_generate_flags),
    "commands": list(cli.COMMANDS), "absl": sorted(F)}))
"""


@pytest.fixture(scope="module")
def cli_flags() -> dict:
  """{command: [flag names it defines]}, "commands": [...], "absl": absl's own flags."""
  out = subprocess.run([sys.executable, "-c", _DUMP_FLAGS], capture_output=True, text=True,
                       check=True, cwd=REPO, timeout=120)
  return json.loads(out.stdout)


def test_every_cli_flag_is_documented(cli_flags):
  text = CLI_DOC.read_text()
  sections = dict(re.findall(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", text,
                            flags=re.MULTILINE | re.DOTALL))
  assert set(sections) == set(cli_flags["commands"]), "docs/cli.md: one section per command"
  for command in cli_flags["commands"]:
    for name in cli_flags[command]:
      assert f"`--{name}" in sections[command], f"docs/cli.md: {command} --{name} is not documented"


# ---- 3. commands shown in the docs ---------------------------------------------------------------


@dataclasses.dataclass
class DocCommand:
  where: str  # file:line
  text: str  # as shown (continuations joined)
  argv: list[str]  # selfplay-jax arguments, command first (a launcher's: what it runs)
  via: str = "selfplay-jax"  # or the launcher: local.sh, tpu_pod.sh, sbatch
  inline: bool = False  # `inline code` in prose rather than a code block

  @property
  def command(self) -> str:
    return self.argv[0] if self.argv else ""


def _logical_lines(block: list[tuple[int, str]]):
  """(line number, text) with backslash continuations joined."""
  out, start, parts = [], None, []
  for number, line in block:
    start = number if start is None else start
    if line.rstrip().endswith("\\"):
      parts.append(line.rstrip()[:-1])
      continue
    parts.append(line)
    out.append((start, " ".join(p.strip() for p in parts)))
    start, parts = None, []
  if parts:
    out.append((start, " ".join(p.strip() for p in parts)))
  return out


def _blocks(text: str):
  """Code blocks of a markdown page: fenced (also inside list items) and 4-space indented lines
  that start with a command; yields lists of (line number, line)."""
  fence, block, indented = None, [], []
  for number, line in enumerate(text.splitlines(), 1):
    stripped = line.lstrip()
    if fence is not None:
      if stripped.startswith("```"):
        yield block
        fence, block = None, []
      else:
        block.append((number, line[fence:] if line[:fence].strip() == "" else stripped))
      continue
    if stripped.startswith("```"):
      fence, block = len(line) - len(stripped), []
      continue
    if re.match(r"^ {4,}(selfplay-jax|launch/)", line):
      indented.append((number, stripped))
    elif indented:
      yield indented
      indented = []
  if indented:
    yield indented


_ENV_ASSIGN = re.compile(r"^(?:export\s+)?((?:[A-Z_]+=\S*\s*)+)")


def _env_of(line: str) -> dict[str, str]:
  match = _ENV_ASSIGN.match(line)
  return dict(a.split("=", 1) for a in match.group(1).split()) if match else {}


def _split(segment: str) -> list[str]:
  return shlex.split(segment, comments=True)


def _from_line(where: str, line: str, env: dict) -> DocCommand | None:
  line = re.sub(r"^\$\s+", "", line.strip())
  if "selfplay-jax " in line and not line.startswith(("launch/", "sbatch")):
    segment = re.split(r"\s*(?:&&|;|\|)\s*", line[line.index("selfplay-jax "):])[0]
    return DocCommand(where, line, _split(segment)[1:])
  env = {**env, **_env_of(line)}
  body = _ENV_ASSIGN.sub("", line).strip()
  if body.startswith("launch/local.sh") and " -- " in body:
    args = _split(body.split(" -- ", 1)[1])
    if args and args[0] != "SELFPLAY_JAX_ARGS...":
      return DocCommand(where, line, args, via="local.sh " + body.split(" -- ")[0])
  for launcher, name in (("launch/tpu_pod.sh run", "tpu_pod.sh"),
                         ("sbatch launch/gpu_slurm.sbatch", "sbatch")):
    if body.startswith(launcher):
      args = _split(body[len(launcher):])
      config = env.get("CONFIG", "configs/grpo.py")  # both launchers' default
      return DocCommand(where, line, ["train", f"--config={config}", *args], via=name)
  return None


def doc_commands() -> list[DocCommand]:
  found = []
  for path in DOC_FILES:
    text = path.read_text()
    for block in _blocks(text):
      env: dict[str, str] = {}
      for number, line in _logical_lines(block):
        if line.startswith("export "):
          env.update(_env_of(line))
        command = _from_line(f"{_rel(path)}:{number}", line, env)
        if command is not None:
          found.append(command)
    prose, fenced = [], False  # the page with its fenced blocks blanked out
    for line in text.splitlines():
      fenced ^= line.lstrip().startswith("```")
      prose.append("" if fenced or line.lstrip().startswith("```") else line)
    prose = "\n".join(prose)
    for match in re.finditer(r"`(selfplay-jax [^`]+)`", prose):  # may wrap onto the next line
      span = " ".join(match.group(1).split())
      argv = _split(span)[1:]
      if len(argv) > 1 or argv == ["--help"]:  # not just "the train command"
        number = prose.count("\n", 0, match.start()) + 1
        found.append(DocCommand(f"{_rel(path)}:{number}", span, argv, inline=True))
  return found


COMMANDS = doc_commands()

# Placeholders a reader replaces: synopsis lines are checked for their flag names only.
_PLACEHOLDER = re.compile(r"\.\.\.|<[a-z_]+>|=[A-Z][A-Z_]*\]?$|^\[")
_OPTIONAL_ROUND = "[--round=N]"
# What a command needs that the test machine does not have.
_ACCELERATOR_CONFIGS = ("configs/real_model.py",)
_HF_FLAGS = ("--model", "--tokenizer", "--config.model.hf_path", "--config.model.tokenizer_path")
# Flags whose values the test replaces with its own files (so a placeholder there is fine).
_SUBSTITUTED = _HF_FLAGS + ("--workdir", "--out", "--config.data.task", "--config.data.eval_path")


def _is_placeholder(arg: str, inline: bool) -> bool:
  if arg == _OPTIONAL_ROUND:
    return False
  name, value = _flag(arg)
  if name in _SUBSTITUTED and value is not None:  # any path will do, but not "..." or "<dir>"
    return "..." in value or "<" in value
  if inline and name.startswith("--") and value is None:  # prose naming a flag: `eval --k`
    return True
  return bool(_PLACEHOLDER.search(arg))

# Tiny sizes, appended to every trained command; a number the command sets itself is kept when it
# is smaller (e.g. warmup.rounds=0, sampling.n=1).
TINY = {"warmup.rounds": 0, "rounds": 1, "eval.every_rounds": 1, "eval.num_examples": 8,
        "eval.batch_size": 8, "data.batch_size": 4, "sampling.n": 2, "sampling.max_new_tokens": 8,
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
        "algorithm.num_minibatches": 1, "mesh.data": 1, "progress_bar": "false",
        "metrics.plot_every_rounds": 0, "warmup.judge_rounds": -1}


def _workdir_of(argv: list[str]) -> str | None:
  return next((v for a in argv for n, v in [_flag(a)] if n == "--workdir"), None)


# Pages whose commands make their own files and run end to end, in order, in their own test.
_OWN_TEST_PAGES = {"docs/bring-your-own.md": "tests/test_bring_your_own.py"}


def _kind(c: DocCommand) -> str:
  """synopsis (flags checked) | validate (config checked) | run."""
  if any(_is_placeholder(a, c.inline) for a in c.argv) or c.where.split(":")[0] in _OWN_TEST_PAGES:
    return "synopsis"
  if c.command in ("eval", "export", "report") and _workdir_of(c.argv) not in _TRAINED_WORKDIRS:
    return "synopsis"  # a run no command of the docs makes here (e.g. on a TPU slice)
  if c.via != "selfplay-jax":
    return "validate"  # a launcher: several processes or a cluster
  if c.command == "train" and _needs_hf(c) and c.where != _FIRST_HF_TRAIN:
    return "validate"  # one Hugging Face training run is enough; the others take the same path
  if c.command == "train" and any(
      a.startswith("--config=") and a.split("=", 1)[1].startswith(_ACCELERATOR_CONFIGS)
      for a in c.argv):
    return "validate"  # sized for 8 GPUs or a TPU slice
  return "run"


def _flag(arg: str) -> tuple[str, str | None]:
  name, eq, value = arg.lstrip("[").rstrip("]").partition("=")
  return name, (value if eq else None)


def _needs_hf(c: DocCommand) -> bool:
  return any(_flag(a)[0] in _HF_FLAGS for a in c.argv)


_TRAINED_WORKDIRS = {_workdir_of(c.argv) for c in COMMANDS
                     if c.command == "train" and c.via == "selfplay-jax"}
_FIRST_HF_TRAIN = next(c.where for c in COMMANDS if c.command == "train" and c.via == "selfplay-jax"
                       and _needs_hf(c) and not any(a.startswith("--config=configs/real_model")
                                                    for a in c.argv))


def test_docs_show_commands():
  assert len(COMMANDS) > 40
  kinds = {_kind(c) for c in COMMANDS}
  assert kinds == {"synopsis", "validate", "run"}, kinds
  for c in COMMANDS:
    assert c.command in ("train", "eval", "export", "report", "plan", "generate", "--help") or (
        _kind(c) == "synopsis" and _PLACEHOLDER.search(c.command)), c


@pytest.mark.parametrize("c", COMMANDS, ids=[f"{c.where}" for c in COMMANDS])
def test_command_flags_exist(c, cli_flags):
  """Every flag a shown command uses (synopsis lines too) is one its command defines, absl's
  own, or a `--config.KEY` override of a key the default config has."""
  if c.command == "--help" or c.command not in cli_flags:  # `selfplay-jax <command> ...`
    assert c.command == "--help" or _PLACEHOLDER.search(c.command), c
    return
  default_keys = set(config_lib.flatten(config_lib.load_config(
      str(config_lib.default_config_path())).to_dict()))
  for arg in c.argv[1:]:
    if not arg.lstrip("[").startswith("--"):
      assert _is_placeholder(arg, c.inline), f"{c.where}: argument {arg!r}"
      continue
    name, _ = _flag(arg)
    name = name[2:]
    if name.startswith("config."):
      key = name[len("config."):]
      assert c.command in ("train", "plan"), f"{c.where}: {c.command} takes no --config.*"
      assert key == "KEY" or key in default_keys, f"{c.where}: unknown config key {key}"
    else:
      assert name in cli_flags[c.command] or name in cli_flags["absl"], (
          f"{c.where}: {c.command} has no flag --{name}")


# ---- running them --------------------------------------------------------------------------------
#
# A train command runs once per distinct run (the same run shown on several pages runs once); the
# eval / export / report commands of the docs that read its --workdir run after it, on its workdir.
# A tiny random model with the task tokenizer, written as `export` writes one, stands in for the
# Hugging Face checkpoints (`generate --model`, `--config.model.hf_path`), small JSONL files for
# the data. A persistent XLA cache in the session's temp dir lets repeated programs (the held-out
# evaluation, `eval`'s) skip compiling.


def _jsonl_rows(n: int, start: int = 0) -> str:
  rows = []
  for i in range(start, start + n):
    a, b = 10 + i % 80, 11 + (7 * i) % 80
    s = str(a + b)
    rows.append({"prompt": f"{a}+{b}=", "response": f"####{s}", "answer": s,
                 "chosen": f"####{s}", "rejected": f"####{int(s) + 1}",
                 "question": f"{a}+{b}="})  # for docs that map data.prompt_field=question
  return "".join(json.dumps(r) + "\n" for r in rows)


@dataclasses.dataclass
class Sandbox:
  """Stand-ins for the docs' placeholders and the subprocess environment of one session."""

  root: Path
  hf_dir: Path

  def env(self) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(self.root / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    return env

  def substitute(self, c: DocCommand, workdir: Path | None = None, out: Path | None = None
                 ) -> list[str]:
    """The command's argv with its files replaced by the sandbox's."""
    argv = [c.command]
    for arg in c.argv[1:]:
      name, value = _flag(arg)
      if arg == _OPTIONAL_ROUND or value is None:
        argv.append(arg)
        continue
      if name == "--workdir":
        value = str(workdir or self.root / "runs" / re.sub(r"\W+", "_", value))
      elif name == "--out":
        value = str(out or self.root / "out" / re.sub(r"\W+", "_", value))
      elif name in _HF_FLAGS:
        value = str(self.hf_dir)
      elif name == "--config.data.task" and value.endswith(".jsonl"):
        value = str(self.root / "train.jsonl")
      elif name == "--config.data.eval_path":
        value = str(self.root / "heldout.jsonl")
      argv.append(f"{name}={value}")
    return argv


def _tiny_hf_dir(path: Path) -> Path:
  """A Hugging Face directory of a tiny random model with the arithmetic task's tokenizer, as
  `export` writes one (tests/test_train.py checks `export` itself against transformers)."""
  overrides = [f"{k}={v}" for k, v in TINY.items()]
  cfg = config_lib.load_config(str(config_lib.default_config_path()), overrides)
  run = setup.build(cfg, path / "w")
  out = path / "hf"
  hf.save_pretrained(run.model_config, models.init_params(run.model_config, jax.random.key(0)), out)
  export._copy_tokenizer(run.tokenizer, out)  # pylint: disable=protected-access
  # A chat template for `generate --chat` / data.prompt_format=chat: BOS, then the user's text (a
  # system prompt the docs show is dropped: the task tokenizer has no letters for it).
  (out / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages if m.role != "
                                           "'system' %}{{ m['content'] }}{% endfor %}")
  return out


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Sandbox:
  root = tmp_path_factory.mktemp("docs")
  (root / "train.jsonl").write_text(_jsonl_rows(64))
  (root / "heldout.jsonl").write_text(_jsonl_rows(16, start=200))
  return Sandbox(root=root, hf_dir=_tiny_hf_dir(root))


def _with_tiny(argv: list[str]) -> list[str]:
  """TINY appended; a number the command sets itself stays when it is smaller."""
  given = {}
  for i, arg in enumerate(argv):
    name, value = _flag(arg)
    if name.startswith("--config."):
      given[name[len("--config."):]] = (i, value)
  argv = list(argv)
  for key, tiny in TINY.items():
    if key not in given:
      argv.append(f"--config.{key}={tiny}")
      continue
    i, value = given[key]
    try:
      if float(value) > float(tiny):
        argv[i] = f"--config.{key}={tiny}"
    except ValueError:
      pass
  # A preset with per-layer types (e.g. gemma2_9b's 42 alternating layers) keeps its first ones.
  config = next((v for a in argv for n, v in [_flag(a)] if n == "--config"),
                str(config_lib.default_config_path()))
  cfg = config_lib.load_config(config, [a[len("--config."):] for a in argv
                                        if a.startswith("--config.") and "hf_path" not in a])
  if len(cfg.model.layer_types) > cfg.model.num_layers:
    first = cfg.model.layer_types[:cfg.model.num_layers]
    argv.append("--config.model.layer_types=" + ",".join(first))
  if cfg.curriculum.max_digits:  # easy-to-hard: short additions fit the tiny token budget
    argv += [f"--config.{k}={v}" for k, v in CURRICULUM_TINY.items()]
  if cfg.algorithm.search_value_warmup:  # a warm-up knob: one warm-up round keeps it in effect
    argv.append("--config.warmup.rounds=1")
  return argv


CURRICULUM_TINY = {"curriculum.gold_max_digits": 1, "curriculum.max_digits": 2,
                   "sampling.max_new_tokens": 9, "warmup.num_minibatches": 1,
                   "curriculum.replay_size": 8, "population.size": 2}


def _run_key(c: DocCommand) -> tuple:
  """Train commands with the same arguments but the workdir (and placeholder paths) are one run."""
  return tuple(sorted((n if n in _SUBSTITUTED else f"{n}={v}") for a in c.argv
                      for n, v in [_flag(a)] if n != "--workdir"))


def _config_of(c: DocCommand) -> str:
  return next((v for a in c.argv for n, v in [_flag(a)] if n == "--config"), "")


def _train_runs() -> dict[str, tuple[DocCommand, list[DocCommand]]]:
  """{where: (the train command, the commands that then use its workdir)}, one per distinct run.
  A later train command with the same workdir and config file but other overrides continues the
  run there (e.g. more `rounds`)."""
  runs, by_key, by_workdir = {}, {}, {}
  for c in COMMANDS:
    if _kind(c) == "run" and c.command == "train" and not _needs_hf(c):
      key, workdir = _run_key(c), _workdir_of(c.argv)
      if key in by_key:
        by_workdir.setdefault(workdir, by_key[key])
        continue
      first = by_workdir.get(workdir)
      if first is not None and _config_of(runs[first][0]) == _config_of(c):
        by_key[key] = first
        runs[first][1].append(c)
        continue
      by_key[key] = c.where
      runs[c.where] = (c, [])
      by_workdir.setdefault(workdir, c.where)
  seen = set()
  for c in COMMANDS:
    if _kind(c) == "run" and c.command in ("eval", "export", "report"):
      key = (c.command, tuple(c.argv))
      if key not in seen:
        seen.add(key)
        runs[by_workdir[_workdir_of(c.argv)]][1].append(c)
  return runs


TRAIN_RUNS = _train_runs()
_OTHER = {}  # plan, --help, generate, the Hugging Face train: one per distinct argv
for _c in COMMANDS:
  if _kind(_c) == "run" and _c.command in ("plan", "--help", "generate") or (
      _c.where == _FIRST_HF_TRAIN):
    _OTHER.setdefault(tuple(_c.argv), _c)
OTHER_RUNS = list(_OTHER.values())


def _cli(argv: list[str], box: Sandbox, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", *argv], cwd=REPO, check=False,
                        env=box.env(), capture_output=True, text=True, timeout=timeout)


def _ok(c: DocCommand, argv: list[str], result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, (f"{c.where}: `{c.text}`\nran: {' '.join(argv)}\nexit "
                                  f"{result.returncode}: {result.stderr[-2000:]}")


def test_every_shown_command_is_covered():
  """Each command is run (itself or as the same run shown elsewhere), validated or checked."""
  ran = {c.where for c, readers in TRAIN_RUNS.values() for c in [c, *readers]}
  ran |= {c.where for c in OTHER_RUNS}
  keys = {_run_key(c) for c, _ in TRAIN_RUNS.values()}
  argvs = {tuple(c.argv) for c in OTHER_RUNS}
  for c in COMMANDS:
    kind = _kind(c)
    if kind == "run" and c.where not in ran:
      assert (c.command == "train" and _run_key(c) in keys) or tuple(c.argv) in argvs or (
          c.command in ("eval", "export", "report")), c
  assert len(TRAIN_RUNS) >= 15 and any(c.command == "generate" for c in OTHER_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("where", list(TRAIN_RUNS))
def test_shown_train_runs(where, box, tmp_path):
  """The train command at tiny sizes, then the docs' eval / export / report of its workdir."""
  train, readers = TRAIN_RUNS[where]
  workdir = tmp_path / "run"
  argv = _with_tiny(box.substitute(train, workdir=workdir))
  _ok(train, argv, _cli(argv, box))
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert lines and lines[-1]["phase"] != "warmup"
  for i, c in enumerate(readers):
    argv = box.substitute(c, workdir=workdir, out=tmp_path / f"out{i}")
    if _OPTIONAL_ROUND in argv:  # `[--round=N]`: a round the run kept
      argv[argv.index(_OPTIONAL_ROUND)] = f"--round={lines[-1]['round']}"
    if c.command == "train":  # continues the run: one round more than it has
      argv = _with_tiny(argv) + [f"--config.rounds={TINY['rounds'] + 1}"]
    result = _cli(argv, box)
    _ok(c, argv, result)
    if c.command == "train":
      assert "resumed from" in result.stdout, result.stdout
      lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    if c.command == "eval":
      saved = json.loads((workdir / f"eval_round_{lines[-1]['round']:04d}.json").read_text())
      assert 0.0 <= saved["eval/accuracy"] <= 1.0
    if c.command == "export":
      assert (tmp_path / f"out{i}" / "config.json").is_file()
    if c.command == "report":
      assert (workdir / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("c", OTHER_RUNS, ids=[c.where for c in OTHER_RUNS])
def test_shown_commands_run(c, box, tmp_path):
  """plan, --help, generate (on the stand-in model) and one Hugging Face training run."""
  argv = box.substitute(c, workdir=tmp_path / "run")
  if c.command == "train":
    argv = _with_tiny(argv)
  result = _cli(argv, box)
  _ok(c, argv, result)
  if c.command == "plan":
    assert "per device" in result.stdout
  if c.command == "generate":
    assert result.stdout.strip()


@pytest.mark.parametrize("c", [c for c in COMMANDS if _kind(c) == "validate"],
                         ids=[c.where for c in COMMANDS if _kind(c) == "validate"])
def test_shown_commands_that_need_hardware_validate(c, box):
  """Launchers, real-model recipes and the Hugging Face variants of the recipes: the config loads
  with its overrides and validates; a local.sh mesh uses exactly its processes x devices."""
  assert c.command == "train", c
  argv = box.substitute(c)
  config = next((v for a in argv for n, v in [_flag(a)] if n == "--config"),
                str(config_lib.default_config_path()))
  cfg = config_lib.load_config(config, [a[len("--config."):] for a in argv
                                        if a.startswith("--config.")])
  config_validation.validate(cfg)
  registry.build_spec(cfg)
  if c.via.startswith("local.sh"):
    opts = dict(re.findall(r"-([nd]) (\d+)", c.via))
    devices = int(opts.get("n", 2)) * int(opts.get("d", 4))  # local.sh's defaults
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    fixed = abs(sizes[0] * sizes[1] * sizes[2])
    assert (devices % fixed == 0) if -1 in sizes else fixed == devices, (
        f"{c.where}: mesh {sizes} on {devices} devices")
