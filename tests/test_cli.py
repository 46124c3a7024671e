"""End-to-end tests of the `selfplay-jax` command line (subprocesses, CPU only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "configs" / "default.py")


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough here
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",)])
def test_help_lists_commands(args):
  result = cli(*args)
  assert result.returncode == 0, result.stderr
  for command in ("train", "eval", "export", "generate", "plan"):
    assert f"  {command} " in result.stdout


def test_unknown_key_is_one_line_error():
  result = cli("train", f"--config={DEFAULT}", "--config.model.nmu_layers=3")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: model.nmu_layers")
  assert "model.num_layers" in lines[0]  # close match suggested


def test_wrong_type_is_one_line_error():
  result = cli("train", "--config.optimizer.learning_rate=fast")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip() == ("error: optimizer.learning_rate: cannot parse 'fast' as float")


@pytest.mark.parametrize("args, key", [
    (("--config.model.num_kv_heads=3",), "model.num_kv_heads"),
    ((f"--config={DEFAULT}:model=bogus",), "model.preset"),
    (("--config=no/such/file.py",), "config"),
])
def test_invalid_config_is_one_line_error(args, key):
  result = cli("train", *args)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().startswith(f"error: {key}")
  assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_command():
  result = cli("fly")
  assert result.returncode == 2 and "error: unknown command 'fly'" in result.stderr


@pytest.mark.slow
def test_train_default_config_outside_repo(tmp_path):
  workdir = tmp_path / "run"  # given relative to the working directory, as a user would
  result = cli("train", "--config.model.num_layers=1", "--config.warmup.rounds=2", "--config.rounds=1",
               "--config.eval.num_examples=8", "--config.data.batch_size=4", "--config.sampling.n=2",
               "--config.sampling.max_new_tokens=4", "--config.data.max_response_len=24",
               "--workdir=run", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "llama" in result.stdout and "held-out accuracy after round 3" in result.stdout
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["num_layers"] == 1 and saved["model"]["preset"] == "tiny"


def test_console_script_installed():
  script = Path(sys.executable).parent / "selfplay-jax"
  if not script.exists():
    pytest.skip("console script not installed in this environment")
  result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.slow
def test_train_reports_too_narrow_token_widths_by_key(tmp_path):
  result = cli("train", "--config.data.max_answer_len=1", "--config.warmup.rounds=1",
               "--config.rounds=1", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "data.max_answer_len" in result.stderr


def test_task_too_small_to_hold_out_is_a_config_error(tmp_path):
  result = cli("train", "--config=configs/default.py:task=sort", "--config.data.difficulty=1",
               f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "error: data.difficulty:" in result.stderr and "heldout" in result.stderr


# ---- a config file whose code fails: one line naming the file and line -----------------------

BROKEN_CONFIGS = {  # file name: (text, the error line after "error: config: <file>")
    "syntax.py": ("def get_config(:\n  pass\n", " line 1: SyntaxError: invalid syntax"),
    "name.py": ("import ml_collections\n\n\ndef get_config():\n  return undefined_name\n",
                " line 5: NameError: name 'undefined_name' is not defined"),
    "imports.py": ("import no_such_module_xyz\n\ndef get_config():\n  pass\n",
                   " line 1: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    "no_get_config.py": ("X = 1\n", " defines no get_config()"),
    "run.json": ('{"rounds": 2}\n', " is not a Python config file; --config takes a .py file that "
                                    "defines get_config(), e.g. configs/default.py"),
}


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
def test_config_file_with_a_python_error_is_one_line_naming_file_and_line(tmp_path, name, command):
  text, error = BROKEN_CONFIGS[name]
  path = tmp_path / name
  path.write_text(text)
  result = cli(command, f"--config={path}", f"--workdir={tmp_path / 'run'}"
               if command == "train" else "--json")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [f"error: config: {path}{error}"]
  assert not (tmp_path / "run").exists()


# ---- JSONL data: messages that name the cause -------------------------------------------------


@pytest.fixture(scope="module")
def jsonl_files(tmp_path_factory):
  """(directory, sentencepiece model file, 60 arithmetic rows) for JSONL runs."""
  from selfplay_jax.data import tasks  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("jsonl")
  task = tasks.get_task("arithmetic", num_digits=1)
  tasks.build_tokenizer(task, root / "tok")
  return root, next((root / "tok").glob("*.model")), task.examples("train", seed=0, num=60)


def _write_rows(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _train_jsonl(tmp_path, model_file, data, *extra):
  return cli("train", f"--workdir={tmp_path / 'run'}", f"--config.data.task={data}",
             f"--config.model.tokenizer_path={model_file}", "--config.progress_bar=false",
             *[f"--config.{o}" for o in extra])


def test_jsonl_without_responses_says_the_warmup_needs_them(tmp_path, jsonl_files):
  _, model_file, rows = jsonl_files
  data = _write_rows(tmp_path / "qa.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                             for r in rows])
  result = _train_jsonl(tmp_path, model_file, data, "warmup.rounds=3")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith(f"error: no valid rows in {data}")
  assert ("missing_field=60 (no 'response' field in 60 row(s): the SFT warm-up (warmup.rounds=3) "
          "trains on gold responses; warmup.rounds=0 avoids it)") in error


def test_jsonl_with_one_repeated_prompt_says_how_many_distinct(tmp_path, jsonl_files):
  _, model_file, rows = jsonl_files
  data = _write_rows(tmp_path / "same.jsonl", [rows[0]] * 50)
  result = _train_jsonl(tmp_path, model_file, data)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: {data}: 50 valid rows with 1 distinct prompt(s) cannot be split 10% held-out")


def test_jsonl_path_that_is_a_directory_is_named_so(tmp_path, jsonl_files):
  _, model_file, _ = jsonl_files
  data = tmp_path / "x.jsonl"
  data.mkdir()
  result = _train_jsonl(tmp_path, model_file, data)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: JSONL file {data} is a directory, not a file")


def test_jsonl_prompts_over_the_limit_are_counted_with_limit_and_lengths(tmp_path, jsonl_files):
  _, model_file, rows = jsonl_files
  data = _write_rows(tmp_path / "long.jsonl", [{**r, "prompt": r["prompt"] * 5} for r in rows])
  result = _train_jsonl(tmp_path, model_file, data, "data.max_prompt_len=8")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  error = result.stderr.strip().splitlines()[-1]
  longest = max(len(r["prompt"]) for r in rows) * 5  # one token per character, plus BOS
  assert f"prompt_too_long=60 (longest {longest + 1} tokens with BOS > data.max_prompt_len=8)" in error


@pytest.mark.slow
def test_eval_path_equal_to_the_training_file_warns_that_held_out_leaks(tmp_path, jsonl_files):
  _, model_file, rows = jsonl_files
  data = _write_rows(tmp_path / "data.jsonl", rows)
  # Killed as round 1 starts: the data is loaded (and checked) by then, nothing compiled.
  result = _train_jsonl(tmp_path, model_file, data, f"data.eval_path={data}", "warmup.rounds=1",
                        "debug.kill_at_round=1", "debug.kill_point=round")
  assert result.returncode == -9, result.stderr[-2000:]
  warnings = [l for l in result.stderr.splitlines() if "held-out set leaks" in l]
  assert len(warnings) == 1
  assert (f"data.eval_path {data} is the training file: 60 of its 60 held-out prompts are also "
          "training prompts") in warnings[0]


# ---- architecture overrides that model.hf_path makes ineffective --------------------------------


@pytest.mark.slow
def test_architecture_overrides_with_hf_path_are_named_once(tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=256).save_pretrained(tmp_path / "hf")
  hf = f"--config.model.hf_path={tmp_path / 'hf'}"
  result = cli("plan", hf, "--config.model.num_layers=4", "--config.model.hidden_size=64",
               "--config.model.dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-2000:]
  warnings = [l for l in result.stderr.splitlines() if "is ignored" in l or "are ignored" in l]
  assert len(warnings) == 1, result.stderr[-2000:]
  assert (f"model.hf_path={tmp_path / 'hf'} sets the architecture (its config.json), so "
          "model.hidden_size=64, model.num_layers=4 are ignored; only model.dtype, "
          "model.param_dtype, model.remat and model.scan_layers apply") in warnings[0]
  assert "3 layers" in result.stdout or "29,472 parameters" in result.stdout  # the HF architecture
  plain = cli("plan", hf, "--config.model.dtype=bfloat16")  # dtype applies: nothing to warn about
  assert plain.returncode == 0 and "ignored" not in plain.stderr
