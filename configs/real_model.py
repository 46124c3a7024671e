"""Real-model recipes: Llama-3-8B, Qwen2.5-7B or Gemma-2-9B with GRPO, SPIN or Self-Rewarding.

  selfplay-jax plan --config=configs/real_model.py:model=llama3_8b,algorithm=grpo,hardware=v5e_64
  selfplay-jax train \\
      --config=configs/real_model.py:model=qwen2_5_7b,algorithm=spin,hardware=h100x8 \\
      --config.model.hf_path=/ckpt/Qwen2.5-7B-Instruct \\
      --config.model.tokenizer_path=/ckpt/Qwen2.5-7B-Instruct/tokenizer.json \\
      --config.data.task=my.jsonl --workdir=runs/qwen_spin

The part after `:` picks (defaults first):
  model      llama3_8b | qwen2_5_7b | gemma2_9b (a preset in selfplay_jax.models.config.PRESETS)
  algorithm  grpo | spin | self_rewarding (its defaults come from configs/<algorithm>.py)
  hardware   h100x8 (8 GPUs x 80 GiB: mesh fsdp=8) or
             v5e_64 (64 chips x 16 GiB: mesh fsdp=16 x tensor=4)

Set `model.hf_path` (the checkpoint: config.json + *.safetensors), `model.tokenizer_path` and
`data.task` (your JSONL file; the placeholder path below does not exist). JSONL fields: grpo needs
`prompt` and `answer` (the verifier compares what follows `data.answer_marker`), spin `prompt` and
`response` (the gold response), self_rewarding `prompt` only (the policy judges its own samples with
the 5-point rubric; no SFT / judge-training warm-up: start from an instruction-tuned checkpoint).

Settings: bfloat16 compute, float32 parameters and Adam moments (`selfplay-jax plan` shows they fit
on both meshes), full rematerialisation, prompts up to 512 tokens, completions up to 1024, learning
rates from the papers (GRPO 1e-6 with KL 0.04 to the frozen initial model; SPIN 5e-7; DPO in
Self-Rewarding 1e-6). Batch sizes fill each batch shard (mesh.data x mesh.fsdp) with 32 sequences in
the round's largest pass (16 for Gemma 2: a 256k vocabulary and a 42-layer, 256-dim KV cache), and
each optimizer step takes 4 sequences per shard; see docs/scale-out.md for the numbers.
"""

import ml_collections

from selfplay_jax import config_lib

MODELS = ("llama3_8b", "qwen2_5_7b", "gemma2_9b")
ALGORITHMS = ("grpo", "spin", "self_rewarding")
# Mesh (data, fsdp, tensor): the axes multiply to the device count. v5e-64: tensor=4 is the largest
# split of every model's kv heads (Qwen2.5-7B has 4) and one host's chips, so decoding all-gathers
# each weight over 16 chips instead of 64; fsdp=16 shards the rest (ZeRO-3). 8xH100: plain FSDP over
# NVLink; 80 GiB per GPU holds the fp32 state of an 8B model eight ways with room for the cache.
HARDWARE = {
    "h100x8": dict(num_devices=8, device_memory_gib=80.0, mesh=(1, 8, 1)),
    "v5e_64": dict(num_devices=64, device_memory_gib=16.0, mesh=(1, 16, 4)),
}
SEQUENCES_PER_SHARD = {"gemma2_9b": 16}  # else 32: sequences per batch shard in the largest pass
TRAIN_SEQUENCES_PER_SHARD = 4  # sequences per batch shard in each optimizer step


def _check(name: str, value: str, choices) -> None:
  if value not in choices:
    raise config_lib.ConfigError(f"config arg {name!r}: {value!r} is not one of "
                                 f"{', '.join(choices)}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, model="llama3_8b", algorithm="grpo", hardware="h100x8")
  _check("model", arg.model, MODELS)
  _check("algorithm", arg.algorithm, ALGORITHMS)
  _check("hardware", arg.hardware, HARDWARE)
  cfg = config_lib.load_sibling(__file__, f"{arg.algorithm}.py", f"model={arg.model}")
  hw = HARDWARE[arg.hardware]

  cfg.hardware = ml_collections.ConfigDict()  # read by `selfplay-jax plan`, not by training
  cfg.hardware.name = arg.hardware  # h100x8 | v5e_64 (the `hardware=` arg); read by plan only
  cfg.hardware.num_devices = hw["num_devices"]  # devices plan sizes for (--devices overrides)
  cfg.hardware.device_memory_gib = hw["device_memory_gib"]  # GiB per device plan checks against
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = hw["mesh"]

  cfg.model.dtype = "bfloat16"
  cfg.model.param_dtype = "float32"
  cfg.model.remat = "full"
  cfg.model.scan_layers = True  # one traced layer: compile time independent of depth
  cfg.data.task = "path/to/train.jsonl"  # placeholder: --config.data.task=my.jsonl
  cfg.data.max_prompt_len = 512
  cfg.data.max_response_len = 1024
  cfg.data.max_answer_len = 32
  cfg.sampling.max_new_tokens = 1024
  cfg.warmup.rounds = 0  # start from an instruction-tuned (or SFT) checkpoint
  cfg.eval.every_rounds = 25
  cfg.eval.batch_size = 64
  cfg.checkpoint.every_rounds = 25  # an 8B fp32 state with Adam and a reference is ~128 GB
  cfg.checkpoint.keep = 2

  if arg.algorithm == "grpo":
    cfg.optimizer.learning_rate = 1e-6
    cfg.algorithm.kl_coef = 0.04  # the paper's; 0 (TRL) drops the reference copy
    cfg.sampling.n = 8
    cfg.sampling.temperature = 1.0
  elif arg.algorithm == "spin":
    cfg.optimizer.learning_rate = 5e-7
    cfg.algorithm.iteration_rounds = 100  # ~ prompts per iteration / data.batch_size
    cfg.rounds = 300  # three iterations, as in the paper
  else:  # self_rewarding
    cfg.optimizer.learning_rate = 1e-6
    cfg.sampling.n = 4
    cfg.sampling.temperature = 0.7
    cfg.sampling.top_p = 0.9
    cfg.algorithm.iteration_rounds = 50
    cfg.rounds = 100  # M1 -> M2 -> M3

  # Sequences per prompt in the round's largest pass, and in training.
  n = cfg.sampling.n
  largest, trained = {"grpo": (n, n), "spin": (2 * n, 2 * n), "self_rewarding": (max(n, 2), 2)
                      }[arg.algorithm]
  shards = cfg.mesh.data * cfg.mesh.fsdp
  cfg.data.batch_size = shards * SEQUENCES_PER_SHARD.get(arg.model, 32) // largest
  cfg.algorithm.num_minibatches = (cfg.data.batch_size * trained
                                   // (shards * TRAIN_SEQUENCES_PER_SHARD))
  return cfg
