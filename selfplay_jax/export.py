"""`selfplay-jax export --workdir=W --out=DIR [--round=N]`: a run's policy as a Hugging Face directory.

Writes `config.json`, `generation_config.json` and `model.safetensors` (loadable by
`transformers.AutoModelForCausalLM`) plus the run's tokenizer files and a `tokenizer_config.json`
naming its special tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from selfplay_jax import checkpoint, run_config, setup, tokenizers
from selfplay_jax.models import hf

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


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                   dtype: str | None = None) -> tuple[Path, int]:
  """Exports the policy of checkpoint `step` (default: the newest). Returns (out dir, step)."""
  workdir, out = Path(workdir), Path(out)
  cfg = run_config.load_run_config(workdir)
  run = setup.build(cfg, workdir)
  tok, mc, like = run.tokenizer, run.model_config, run.abstract_state()
  with checkpoint.Checkpointer(str(workdir)) as ckpt:
    state, _, _, _ = ckpt.restore(step, abstract_state=like)
    used = ckpt.restored_step
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory")
  hf.save_pretrained(mc, state.params, out, dtype=dtype)
  _copy_tokenizer(tok, out)
  return out, used
