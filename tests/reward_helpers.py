"""A Python reward function for end-to-end runs (tests/test_multihost.py): deterministic in the
decoded completion and the row's `answer` field, and varied on an untrained model's samples (an
untrained model gets all-zero verifier rewards)."""


def distinct_characters(prompts, completions, answer, **fields):
  """A quarter per distinct character of the completion, plus 1 when it ends with the answer;
  None (unscorable) for an empty completion."""
  del prompts, fields
  return [None if not c else len(set(c)) / 4 + float(c.endswith(a)) for c, a in zip(completions, answer)]
