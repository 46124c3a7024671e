"""Row helpers (rows.py): repeating, concatenating, padding, packing and pairing rows, each
checked against NumPy on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfplay_jax import rows as R
from selfplay_jax import sampling


def _random_rows(rng, r=3, p=4, n=5):
  return {"prompt_tokens": rng.integers(3, 50, (r, p)).astype(np.int32),
          "prompt_mask": rng.random((r, p)) < 0.7,
          "tokens": rng.integers(3, 50, (r, n)).astype(np.int32),
          "mask": rng.random((r, n)) < 0.7}


def _assert_rows_equal(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)


def test_rollout_rows_and_gold_rows_take_the_row_fields():
  rng = np.random.default_rng(0)
  rows = _random_rows(rng)
  ro = sampling.Rollout(prompt_tokens=rows["prompt_tokens"], prompt_mask=rows["prompt_mask"],
                        tokens=rows["tokens"], logprobs=np.zeros((3, 5)),
                        model_logprobs=np.zeros((3, 5)), mask=rows["mask"],
                        lengths=rows["mask"].sum(1))
  _assert_rows_equal(R.rollout_rows(ro), rows)
  batch = {"prompt_tokens": rows["prompt_tokens"], "prompt_mask": rows["prompt_mask"],
           "response_tokens": rows["tokens"], "response_mask": rows["mask"],
           "answer_tokens": np.ones((3, 2), np.int32), "answer_mask": np.ones((3, 2), bool)}
  _assert_rows_equal(R.gold_rows(batch), rows)


def test_repeat_rows_puts_each_rows_copies_next_to_each_other():
  rows = _random_rows(np.random.default_rng(1))
  got = R.repeat_rows(rows, 3)
  _assert_rows_equal(got, {k: np.repeat(v, 3, axis=0) for k, v in rows.items()})
  for i in range(3 * 3):  # row i is a copy of source row i // 3 (the sampler's layout)
    np.testing.assert_array_equal(np.asarray(got["tokens"][i]), rows["tokens"][i // 3])


def test_concat_rows_appends_b_after_a():
  rng = np.random.default_rng(2)
  a, b = _random_rows(rng, r=2), _random_rows(rng, r=3)
  _assert_rows_equal(R.concat_rows(a, b), {k: np.concatenate([a[k], b[k]]) for k in a})


def test_pad_right_and_left_pad_to():
  rng = np.random.default_rng(3)
  rows = _random_rows(rng)
  np.testing.assert_array_equal(np.asarray(R.pad_right(rows["tokens"], 8, value=7)),
                                np.pad(rows["tokens"], ((0, 0), (0, 3)), constant_values=7))
  tokens, mask = R.left_pad_to(rows["prompt_tokens"], rows["prompt_mask"], 7, pad_id=9)
  np.testing.assert_array_equal(np.asarray(tokens),
                                np.concatenate([np.full((3, 3), 9), rows["prompt_tokens"]], 1))
  np.testing.assert_array_equal(np.asarray(mask),
                                np.concatenate([np.zeros((3, 3), bool), rows["prompt_mask"]], 1))
  same = R.left_pad_to(rows["prompt_tokens"], rows["prompt_mask"], 4)  # already that wide
  np.testing.assert_array_equal(np.asarray(same[0]), rows["prompt_tokens"])


def _numpy_pack(tokens, mask, pad_id, left):
  """Each row's masked tokens, in order, moved to the right end (left=True) or the left end."""
  out_t, out_m = np.full_like(tokens, pad_id), np.zeros_like(mask)
  width = tokens.shape[1]
  for i in range(tokens.shape[0]):
    kept = tokens[i][mask[i]]
    sl = slice(width - len(kept), width) if left else slice(0, len(kept))
    out_t[i, sl], out_m[i, sl] = kept, True
  return out_t, out_m


@pytest.mark.parametrize("left", [True, False], ids=["left_pack", "right_pack"])
def test_pack_moves_masked_tokens_to_one_end_in_order(left):
  rng = np.random.default_rng(4)
  tokens = rng.integers(3, 50, (16, 9)).astype(np.int32)
  mask = rng.random((16, 9)) < 0.5
  mask[0], mask[1] = False, True  # an empty row and a full row
  pack = R.left_pack if left else R.right_pack
  want_t, want_m = _numpy_pack(tokens, mask, 1, left)
  for fn in (pack, jax.jit(pack, static_argnums=2)):
    got_t, got_m = fn(jnp.asarray(tokens), jnp.asarray(mask), 1)
    np.testing.assert_array_equal(np.asarray(got_t), want_t)
    np.testing.assert_array_equal(np.asarray(got_m), want_m)


def test_stack_pairs_pads_completions_to_one_width():
  rng = np.random.default_rng(5)
  chosen = _random_rows(rng, r=3, n=4)
  rejected = _random_rows(rng, r=3, n=6)
  rejected["prompt_tokens"] = chosen["prompt_tokens"][::-1].copy()
  pairs = R.stack_pairs(chosen, rejected, jnp.array([1, 0, 1], jnp.int32))
  widen = lambda x: np.pad(x, ((0, 0), (0, 2)))
  want = {"prompt_tokens": np.stack([chosen["prompt_tokens"], rejected["prompt_tokens"]], 1),
          "prompt_mask": np.stack([chosen["prompt_mask"], rejected["prompt_mask"]], 1),
          "tokens": np.stack([widen(chosen["tokens"]), rejected["tokens"]], 1),
          "mask": np.stack([widen(chosen["mask"]), rejected["mask"]], 1),
          "weight": np.array([1.0, 0.0, 1.0], np.float32)}
  _assert_rows_equal(pairs, want)
  assert pairs["tokens"].shape == (3, 2, 6) and pairs["weight"].dtype == jnp.float32
