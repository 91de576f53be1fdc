"""Random DPO batches in the loader's format (see dpo_jax/logprobs.py), built in numpy for tests."""

import numpy as np


def random_sequences(rng, n, seq_len, vocab, prompt_len=(2, 6), response_len=(1, 8), eos_id=1, pad_id=0):
  """n rows of prompt + response + EOS, right-padded. Returns input_ids, attention_mask, positions, loss_mask."""
  ids = np.full((n, seq_len), pad_id, np.int32)
  attn = np.zeros((n, seq_len), np.int32)
  loss = np.zeros((n, seq_len), np.int32)
  for i in range(n):
    p = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
    r = int(rng.integers(response_len[0], response_len[1] + 1))
    r = min(r, seq_len - p - 1)
    toks = rng.integers(2, vocab, size=p + r)
    ids[i, :p + r] = toks
    ids[i, p + r] = eos_id
    attn[i, :p + r + 1] = 1
    loss[i, p:p + r + 1] = 1  # response tokens and EOS
  positions = np.where(attn > 0, np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
  return dict(input_ids=ids, attention_mask=attn, positions=positions, loss_mask=loss)


def random_dpo_batch(seed, num_pairs, seq_len, vocab, **kw):
  """`num_pairs` pairs, interleaved rows (chosen 2i, rejected 2i+1) sharing each pair's prompt."""
  rng = np.random.default_rng(seed)
  batch = random_sequences(rng, 2 * num_pairs, seq_len, vocab, **kw)
  for i in range(num_pairs):  # the rejected row gets the chosen row's prompt, as real pairs have
    c, r = 2 * i, 2 * i + 1
    pc = int(np.argmax(batch["loss_mask"][c]))
    pr = int(np.argmax(batch["loss_mask"][r]))
    if pr >= pc:
      batch["input_ids"][r, :pc] = batch["input_ids"][c, :pc]
  batch["pair_mask"] = np.ones((num_pairs,), np.int32)
  batch["row_ids"] = np.arange(num_pairs, dtype=np.int32)
  return batch


def random_tokenized_pairs(num_pairs, *, vocab, max_length, seed=0, first_row_id=0, reference=False):
  """`preference.TokenizedPairs` of random pairs whose prompts (1-7 tokens) and responses (EOS-terminated, up to
  max_length - prompt) vary in length, so both paddings and every layout's edge cases are exercised; with
  `reference`, random `reference_logps` `[num_pairs, 2]`."""
  from dpo_jax.data import preference
  rng = np.random.default_rng(seed)
  prompts, chosen, rejected = [], [], []
  for _ in range(num_pairs):
    p = int(rng.integers(1, 8))
    prompts.append(rng.integers(2, vocab, p).astype(np.int32))
    for out in (chosen, rejected):
      r = int(rng.integers(1, max_length - p + 1))
      out.append(np.append(rng.integers(2, vocab, r - 1), 1).astype(np.int32))  # ... + EOS
  refs = rng.normal(-20.0, 5.0, (num_pairs, 2)) if reference else None
  return preference.TokenizedPairs(tuple(prompts), tuple(chosen), tuple(rejected),
                                   np.arange(first_row_id, first_row_id + num_pairs, dtype=np.int32),
                                   max_length=max_length, pad_id=0, eos_id=1, reference_logps=refs)
