"""`selfplay-jax export --workdir=W --out=DIR [--round=N]`: a run's policy as a Hugging Face directory.

Writes `config.json`, `generation_config.json` and `model.safetensors` (loadable by
`transformers.AutoModelForCausalLM`) plus the run's tokenizer files and a `tokenizer_config.json`
naming its special tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import safetensors

from selfplay_jax import checkpoint, evaluate, run_config, setup, tokenizers
from selfplay_jax.errors import ConfigError, WorkdirError
from selfplay_jax.models import hf, lora

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(tok: tokenizers.Tokenizer, out: Path) -> None:
  if isinstance(tok, tokenizers.SentencePieceTokenizer):
    shutil.copyfile(tok.path, out / "tokenizer.model")
  else:
    folder = Path(tok.path).parent
    for name in _HF_TOKENIZER_FILES:
      if (folder / name).is_file():
        shutil.copyfile(folder / name, out / name)
  config_file = out / "tokenizer_config.json"
  special = json.loads(config_file.read_text()) if config_file.is_file() else {}
  for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
    if token_id is not None and key not in special:
      special[key] = tok.id_to_piece(token_id)
  config_file.write_text(json.dumps(special, indent=2))
  if tok.chat_template is not None:  # the template the run rendered with (chat.find_template)
    (out / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")


def _io_reason(error: BaseException) -> str:
  """`No space left on device` from an OSError or safetensors' `... I/O error: ... (os error 28)`."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  match = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
  return match.group(1) if match else text


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                   dtype: str | None = None, member: int = 0) -> tuple[Path, int]:
  """Exports the policy of checkpoint `step` (default: the newest). Returns (out dir, step).
  Of a population run (`population.size` > 1), member `member` (`--member`, default 0).

  The model is written into a hidden sibling directory and renamed to `out` when complete; a
  failed write (disk full, ...) removes it, so `out` never holds a half-written model."""
  workdir, out = Path(workdir), Path(out)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out {out} is a file, not a directory; choose a new directory")
  if out.is_dir() and any(out.iterdir()):
    raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory")
  cfg = run_config.load_run_config(workdir)
  size = setup.population_size(cfg)
  if not 0 <= member < size:
    raise ConfigError(f"--member: {member} is not a member of {workdir}'s population "
                      f"(population.size={size}: members 0..{size - 1})")
  evaluate.require_checkpoint(workdir)
  if cfg.curriculum.max_digits:  # easy-to-hard: its own state layout (curriculum.py)
    from selfplay_jax import curriculum  # pylint: disable=import-outside-toplevel
    tok, mc, params, used = curriculum.member_params(cfg, workdir, member, step)
  else:
    run = setup.build(cfg, workdir)
    tok, mc = run.tokenizer, run.model_config
    with checkpoint.Checkpointer(str(workdir)) as ckpt:
      state, _, _, _ = run.restore(ckpt, step)
      used = ckpt.restored_step
    if size > 1:
      state = evaluate.member(state, member)
    # LoRA adapters are merged into the weights they adapt (W + alpha/rank * A @ B).
    params = lora.merged(state.params, mc)
  tmp = out.parent / f".{out.name}.export-{os.getpid()}"
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(lora.base_config(mc), params, tmp, dtype=dtype)
    _copy_tokenizer(tok, tmp)
    os.rename(tmp, out)  # replaces an empty `out` directory
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, (OSError, safetensors.SafetensorError)):
      raise WorkdirError(f"--out {out}: cannot write the model ({_io_reason(e)}); nothing was "
                         "left there") from None
    raise
  return out, used
