"""docs/bring-your-own.md runs end to end: its code blocks, in order, in an empty directory (the
repository's `configs/` linked in), as a reader would paste them. Then what the page claims is
checked on what the run left: the Python reward's and the math reward's metrics, chat-rendered
prompts in the sample dumps, LoRA adapters in the checkpoint, and an export that `transformers`
loads with the tokenizer's chat template."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "bring-your-own.md"


def _blocks(text: str) -> list[tuple[str, str]]:
  """(language, code) of the page's fenced blocks, in order."""
  return [(m.group(1), m.group(2)) for m in
          re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)]


def test_the_page_has_the_walkthrough_blocks():
  kinds = [lang for lang, _ in _blocks(PAGE.read_text())]
  assert kinds == ["python", "python", "bash", "bash", "bash", "python"], kinds


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
  root = tmp_path_factory.mktemp("byo")
  (root / "configs").symlink_to(REPO / "configs")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
  outputs = []
  for i, (lang, code) in enumerate(_blocks(PAGE.read_text())):
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    res = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"block {i} ({lang}) failed:\n{code}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    outputs.append(res.stdout)
  return root, outputs


@pytest.mark.slow
def test_the_run_scored_with_both_rewards_and_chat_prompts(walked):
  root, _ = walked
  run = root / "byo" / "run"
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [m["round"] for m in lines] == [1, 2, 3, 4]
  rl = [m for m in lines if m["phase"] != "warmup"]
  assert len(rl) == 2
  reward_keys = {k for m in rl for k in m if k.startswith("reward/")}
  assert any("math" in k for k in reward_keys) and any("concise" in k for k in reward_keys), reward_keys
  # The sample dumps hold the chat-rendered prompt, as transformers renders it.
  import transformers  # pylint: disable=import-outside-toplevel
  tok = transformers.AutoTokenizer.from_pretrained(root / "byo" / "model")
  rows = [json.loads(l) for l in (root / "byo" / "gsm8k.jsonl").read_text().splitlines()]
  rendered = {tok.apply_chat_template(
      [{"role": "system", "content": "Answer with #### and the number."},
       {"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True)
      for r in rows}
  dumps = sorted((run / "samples").glob("*.jsonl"))
  assert dumps
  for f in dumps:
    for s in map(json.loads, f.read_text().splitlines()):
      assert s["prompt"] in rendered, s["prompt"]


@pytest.mark.slow
def test_the_export_loads_in_transformers_and_generates(walked):
  root, outputs = walked
  out = root / "byo" / "exported"
  assert list(out.glob("*.safetensors"))
  # `selfplay-jax generate --chat` (block 5: the rendered prompt, then the completion) and
  # transformers' greedy `generate` on apply_chat_template's ids (block 6) write the same text.
  ours, theirs = outputs[4].rstrip("\n"), outputs[5].rstrip("\n")
  assert ours.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>"), ours
  assert ours.endswith(theirs), (ours, theirs)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
