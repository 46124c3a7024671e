"""Data: built-in verifiable tasks (`tasks`) and input pipelines."""

from selfplay_jax.data.tasks import (ANSWER_MARKER, SPLITS, TASKS, ArithmeticTask, SortTask, Task,
                                     build_tokenizer, check_tokenizer, encode_examples,
                                     extract_answer, get_task, make_answer_verifier)

__all__ = ["ANSWER_MARKER", "SPLITS", "TASKS", "ArithmeticTask", "SortTask", "Task",
           "build_tokenizer", "check_tokenizer", "encode_examples", "extract_answer", "get_task",
           "make_answer_verifier"]
