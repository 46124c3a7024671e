"""TRL's side of `bench.trl_compare`, and what both sides share about tokens and rewards.

The tokenizer maps id i to the word "t<i>" (specials <pad> <s> </s> are 0, 1, 2), so TRL's text path
sees exactly our token ids; the reward is the fraction of completion tokens whose id lies in the
prompt's target range [lo, lo + vocab / 8), here in Python for TRL (`bench.trl_compare` has the
jitted one). TRL's trainers are stepped the way transformers' `Trainer` loop runs one optimizer step.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
  from bench.trl_compare import Shared, Spec

SEED = 0
TORCH_THREADS = 2  # the headline TRL setting (= the machine's cores); 1 thread is measured too
PAD, BOS, EOS = 0, 1, 2  # special ids of the benchmark tokenizer (every other id is "t<id>")
# Where TRL's trainers run: the CPU in fp32 (bench.trl_compare); bench.accelerator sets
# USE_CPU = False (the GPU) and BF16 = True (bf16 autocast on fp32 weights, like our rounds).
USE_CPU, BF16 = True, False


def tokenizer(vocab_size: int):
  """A word-level tokenizer whose token for id i is "t<i>" (specials <pad> <s> </s> are 0, 1, 2),
  so token ids and text map one-to-one and TRL's text path sees exactly our token ids."""
  import tokenizers
  import transformers
  from tokenizers import models, pre_tokenizers
  vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab_size)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              bos_token="<s>", eos_token="</s>", unk_token="<pad>")


def hf_model(shared: Shared):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(shared.path, dtype=torch.float32)


def text(ids) -> str:
  return " ".join(f"t{int(i)}" if i > EOS else ("<pad>", "<s>", "</s>")[int(i)] for i in ids)


def reward_width(vocab: int) -> int:
  return vocab // 8


def trl_reward(vocab: int):
  width = reward_width(vocab)

  def target_range_reward(completion_ids, target_lo, **kwargs):
    return [sum(lo <= t < lo + width for t in ids) / max(len(ids), 1)
            for ids, lo in zip(completion_ids, target_lo)]
  return target_range_reward


def set_threads(n: int) -> None:
  import torch
  torch.set_num_threads(n)


def with_threads(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
  def run():
    set_threads(n)
    try:
      return fn()
    finally:
      set_threads(TORCH_THREADS)
  return run


# ----------------------------------------------------------------------------------------------
# The trainers


def _trl_args(cls, spec: Spec, out_dir: str, batch_size: int, **extra):
  return cls(output_dir=out_dir, per_device_train_batch_size=batch_size,
             learning_rate=spec.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
             max_grad_norm=1.0, bf16=BF16, gradient_checkpointing=False, use_cpu=USE_CPU,
             report_to="none", save_strategy="no", logging_steps=10**9, seed=SEED, **extra)


def _trl_stepper(trainer, inputs_fn: Callable[[], Any], steps: int = 10**4) -> Callable[[], float]:
  """What transformers' Trainer loop does for one optimizer step (no gradient accumulation)."""
  trainer.create_optimizer_and_scheduler(num_training_steps=steps)
  trainer.current_gradient_accumulation_steps = 1
  model = trainer.model

  def run() -> float:
    loss = trainer.training_step(model, inputs_fn(), None)
    trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return float(loss)
  return run


def trl_dpo(shared: Shared, spec: Spec, data: dict, out_dir: str) -> tuple[Callable[[], float], Any]:
  import datasets
  from trl import DPOConfig, DPOTrainer
  rows = {"prompt": [text(r) for r in data["prompt_tokens"]],
          "chosen": [" " + text(r) for r in data["chosen_tokens"]],
          "rejected": [" " + text(r) for r in data["rejected_tokens"]]}
  trainer = DPOTrainer(model=hf_model(shared), processing_class=shared.tokenizer,
                       train_dataset=datasets.Dataset.from_dict(rows),
                       args=_trl_args(DPOConfig, spec, out_dir, spec.dpo_pairs, beta=spec.beta,
                                      loss_type=["sigmoid"], max_length=None))
  examples = [trainer.train_dataset[i] for i in range(spec.dpo_pairs)]
  for i, ex in enumerate(examples):  # TRL's tokenization must give exactly our token ids
    for key in ("prompt", "chosen", "rejected"):
      if ex[f"{key}_ids"] != data[f"{key}_tokens"][i].tolist():
        raise RuntimeError(f"TRL tokenized pair {i} {key} differently from our ids")
  batch = trainer.data_collator(examples)  # collated once: no data loading inside the timing
  return _trl_stepper(trainer, lambda: batch), batch


def _grpo_trainer(shared: Shared, spec: Spec, data: dict, out_dir: str, num_iterations: int):
  import datasets
  from trl import GRPOConfig, GRPOTrainer
  rows = {"prompt": [text(r) for r in data["prompt_tokens"]],
          "target_lo": [int(x) for x in data["answer_tokens"][:, 0]]}
  n = spec.group_size
  args = _trl_args(GRPOConfig, spec, out_dir, spec.grpo_prompts * n, num_generations=n,
                   max_completion_length=spec.completion_len, temperature=1.0, top_p=1.0, top_k=0,
                   generation_kwargs={"min_new_tokens": spec.completion_len}, beta=0.0,
                   loss_type="dapo", scale_rewards="group", epsilon=0.2,
                   num_iterations=num_iterations, steps_per_generation=1)
  trainer = GRPOTrainer(model=hf_model(shared), reward_funcs=[trl_reward(shared.config.vocab_size)],
                        args=args, train_dataset=datasets.Dataset.from_dict(rows),
                        processing_class=shared.tokenizer)
  # One generation batch as TRL's RepeatSampler yields it: each prompt n times, in a row.
  inputs = [{"prompt": rows["prompt"][i], "target_lo": rows["target_lo"][i]}
            for i in range(spec.grpo_prompts) for _ in range(n)]
  return trainer, inputs


def _time_generation(trainer) -> list[float]:
  """Wraps the trainer's `_generate` (tokenize, model.generate, decode); returns its call times."""
  times: list[float] = []
  generate = trainer._generate

  def timed_generate(*args, **kwargs):
    start = time.perf_counter()
    out = generate(*args, **kwargs)
    times.append(time.perf_counter() - start)
    return out
  trainer._generate = timed_generate
  return times


def trl_grpo_round(shared: Shared, spec: Spec, data: dict, out_dir: str):
  """A fresh generation batch every step (num_iterations=1, steps_per_generation=1)."""
  trainer, inputs = _grpo_trainer(shared, spec, data, out_dir, num_iterations=1)
  gen_times = _time_generation(trainer)
  return _trl_stepper(trainer, lambda: inputs), gen_times, trainer


def trl_grpo_update(shared: Shared, spec: Spec, data: dict, out_dir: str):
  """num_iterations huge: TRL generates once (in the warm-up call) and every later
  training_step re-uses the buffered batch, so the timed steps are pure updates (the returned
  generation log proves it: one entry)."""
  trainer, inputs = _grpo_trainer(shared, spec, data, out_dir, num_iterations=10**6)
  gen_times = _time_generation(trainer)
  return _trl_stepper(trainer, lambda: inputs), gen_times
