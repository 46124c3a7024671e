"""`generate_text` / `selfplay-jax generate` on a local HF directory with its own tokenizer.json."""

import os
import subprocess
import sys

import pytest
import tokenizers as hf_tokenizers
import torch

from selfplay_jax import generate
from selfplay_jax.sampling import SamplingConfig
from tests.hf_models import make_hf_model

WORDS = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(94)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("gen")
  model = make_hf_model("llama", seed=21, bos_token_id=2, eos_token_id=1, pad_token_id=0)
  model.save_pretrained(path, safe_serialization=True)
  vocab = {w: i for i, w in enumerate(WORDS)}
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = hf_tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(
      '{"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}')
  return path, model


def test_generate_text_matches_transformers(model_dir):
  path, model = model_dir
  prompts = ["w5 w17 w33", "w8 w9 w10 w11 w12 w13"]
  out = generate.generate_text(path, prompts, SamplingConfig(max_new_tokens=12, temperature=0.0))
  for prompt, result in zip(prompts, out):
    ids = [2] + [WORDS.index(w) for w in prompt.split()]
    with torch.no_grad():
      ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=1,
                           pad_token_id=0)[0, len(ids):].tolist()
    if 1 in ref:
      ref = ref[:ref.index(1) + 1]
    assert result.tokens[0] == ref
    expected_text = " ".join(WORDS[i] for i in ref if i > 2)
    assert result.completions[0] == expected_text


def test_generate_n_samples(model_dir):
  path, _ = model_dir
  out = generate.generate_text(path, ["w1 w2"], SamplingConfig(max_new_tokens=6, temperature=1.0, n=3),
                               seed=4)
  assert len(out[0].completions) == 3 and len(out[0].tokens) == 3


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "selfplay_jax.cli", "generate", *args], env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_cli(model_dir):
  path, _ = model_dir
  res = _cli(f"--model={path}", "--prompt=w5 w17 w33", "--max_new_tokens=5")
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith("w5 w17 w33")
  assert "tokens in" in res.stderr


@pytest.mark.parametrize("args, needle", [
    ((), "--model"),
    (("--model=/nonexistent/dir", "--prompt=hi"), "/nonexistent/dir"),
    (("--prompt=w1", "--temperature=-1"), "--temperature"),
])
def test_generate_cli_errors(model_dir, args, needle):
  path, _ = model_dir
  if args and args[0].startswith("--prompt"):
    args = (f"--model={path}",) + args
  res = _cli(*args)
  assert res.returncode == 2
  assert needle in res.stderr and "Traceback" not in res.stderr
