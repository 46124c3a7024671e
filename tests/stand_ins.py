"""Stand-ins shared by the judge and preference tests."""


class CharTokenizer:
  """A stand-in tokenizer: characters map to ids; digits are single tokens."""
  bos_id, pad_id, eos_id = 1, 0, 2
  eos_ids = (2,)
  vocab = {ch: i + 4 for i, ch in enumerate("0123456789abcdefghijklmnopqrstuvwxyz:<> ")}

  def encode(self, text):
    return [self.vocab[ch] for ch in text]
