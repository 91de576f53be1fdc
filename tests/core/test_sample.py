"""Cached decoding equals the full forward; sampling follows the model; the scoring batch is exact.

References are plain (uncached) forwards, jitted once at a fixed width: right padding never changes the
logits of earlier tokens (causal mask), so one compile serves every sequence length.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, model as model_lib, sample

# initializer_range 0.2 (not 0.02): logits of size ~3, so next-token distributions are far from uniform and
# the equalities below have teeth.
CFG = model_lib.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, initializer_range=0.2)
EOS, PAD = 1, 0
WIDTH = 16  # reference forward width, >= every sequence below


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


def stacked(params):
  """Unrolled `layers_{i}` params -> the scan layout (`layers` with a leading [L] axis)."""
  p = dict(params)
  layers = [p.pop(f"layers_{i}") for i in range(CFG.num_layers)]
  p["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return p


def left_padded(rng, lengths, width):
  """`[B, width]` prompt ids and 0/1 mask, row i holding `lengths[i]` random tokens at the right."""
  ids = np.full((len(lengths), width), PAD, np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for i, n in enumerate(lengths):
    ids[i, width - n:] = rng.integers(2, CFG.vocab_size, size=n)
    mask[i, width - n:] = 1
  return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids_BxT, positions_BxT, segment_ids_BxT):
  return model_lib.make_model(cfg).apply({"params": params}, ids_BxT, positions_BxT, segment_ids_BxT)


def full_logits(params, rows):
  """Uncached logits of each unpadded row (list of 1-D token arrays) -> list of `[len, V]`."""
  ids = np.full((len(rows), WIDTH), PAD, np.int32)
  mask = np.zeros((len(rows), WIDTH), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)], mask[i, :len(row)] = row, 1
  positions = np.broadcast_to(np.arange(WIDTH, dtype=np.int32), ids.shape)
  logits = np.asarray(_forward(CFG, params, ids, positions, mask))
  return [logits[i, :len(row)] for i, row in enumerate(rows)]


@functools.partial(jax.jit, static_argnums=0)
def _cached_forward(cfg, params, cache, ids_BxT, positions_BxT, segment_ids_BxT):
  logits, mutated = model_lib.make_model(cfg, decode=True).apply(
      {"params": params, "cache": cache}, ids_BxT, positions_BxT, segment_ids_BxT, mutable=["cache"])
  return logits, mutated["cache"]


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "none"), (True, "full")])
def test_prefill_then_decode_equals_the_full_forward(params, scan, remat):
  """Left-padded prompts of lengths 3, 6, 1 prefilled in one call, then 4 tokens one at a time: every real
  token's logits equal one full forward over the concatenated sequence, batched and left-padded as well as
  per row with no padding at all."""
  cfg = dataclasses.replace(CFG, scan_layers=scan, remat=remat)
  p = stacked(params) if scan else params
  rng = np.random.default_rng(0)
  lengths, width, k = [3, 6, 1], 6, 4
  ids, mask = left_padded(rng, lengths, width)
  new = rng.integers(2, CFG.vocab_size, size=(3, k)).astype(np.int32)
  positions = np.asarray(sample.prompt_positions(jnp.asarray(mask)))

  cache = model_lib.init_cache(cfg, 3, width + k)
  assert int(jax.tree.leaves(cache)[0].shape[0]) == (cfg.num_layers if scan else 3)  # scan stacks layers
  logits, cache = _cached_forward(cfg, p, cache, ids, positions, mask)
  steps = [np.asarray(logits)]
  for j in range(k):
    logits, cache = _cached_forward(cfg, p, cache, new[:, j:j + 1], positions[:, -1:] + 1 + j, np.ones((3, 1), np.int32))
    steps.append(np.asarray(logits))
  cached = np.concatenate(steps, axis=1)  # [B, P + K, V]

  all_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
  all_positions = np.maximum(np.cumsum(all_mask, axis=1) - 1, 0).astype(np.int32)
  batched = np.asarray(_forward(cfg, p, np.concatenate([ids, new], axis=1), all_positions, all_mask))
  per_row = full_logits(params, [np.concatenate([ids[i][mask[i] > 0], new[i]]) for i in range(3)])
  for i, n in enumerate(lengths):
    real = slice(width - n, None)  # padding rows' logits are meaningless; real tokens must agree
    np.testing.assert_allclose(cached[i, real], batched[i, real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached[i, real], per_row[i], rtol=1e-5, atol=1e-5)


def test_cache_too_small_is_a_clear_error(params):
  cache = model_lib.init_cache(CFG, 2, 3)
  with pytest.raises(ValueError, match="init_cache"):
    _cached_forward(CFG, params, cache, np.ones((2, 4), np.int32), np.zeros((2, 4), np.int32), np.ones((2, 4), np.int32))


def test_greedy_equals_a_naive_argmax_loop(params):
  """Temperature 0 vs re-running the full forward on the growing (unpadded) sequence and taking argmax."""
  ids, mask = left_padded(np.random.default_rng(1), [4, 2, 1], 4)
  n = 8
  tokens = np.asarray(sample.generate(CFG, params, ids, mask, rng=jax.random.key(0), max_new_tokens=n,
                                      eos_id=-1, pad_id=PAD, temperature=0.0))  # eos -1: never stop early
  rows = [list(ids[i][mask[i] > 0]) for i in range(3)]
  for _ in range(n):
    for row, logits in zip(rows, full_logits(params, [np.array(r, np.int32) for r in rows])):
      row.append(int(np.argmax(logits[-1])))
  np.testing.assert_array_equal(tokens, np.array([r[-n:] for r in rows]))


@pytest.mark.parametrize("temperature,other", [(1.0, 0.5), (0.5, 1.0)])
def test_first_token_frequencies_match_the_model(params, temperature, other):
  """4000 rows of one prompt: each token's empirical frequency is within 5 standard errors of
  softmax(logits / temperature), and clearly off softmax(logits / other), so the check can fail."""
  n = 4000
  prompt = np.array([[5, 9, 3]] * n, np.int32)
  tokens = np.asarray(sample.generate(CFG, params, prompt, np.ones_like(prompt), rng=jax.random.key(3),
                                      max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=temperature))
  logits = full_logits(params, [prompt[0]])[0][-1]
  freqs = np.bincount(tokens[:, 0], minlength=CFG.vocab_size) / n

  def within(t):
    probs = np.asarray(jax.nn.softmax(logits / t))
    return np.abs(freqs - probs) < 5 * np.sqrt(probs * (1 - probs) / n) + 1e-3

  assert np.all(within(temperature)), within(temperature)
  assert not np.all(within(other))


@pytest.fixture(scope="module")
def samples(params):
  """64 left-padded prompts (widths 1..5) and 12 sampled tokens each, with their per-token log-probs."""
  ids, mask = left_padded(np.random.default_rng(2), [2, 5, 3, 4, 1, 5, 3, 4] * 8, 5)
  tokens, logps = sample.generate(CFG, params, ids, mask, rng=jax.random.key(7), max_new_tokens=12, eos_id=EOS,
                                  pad_id=PAD, return_logps=True)
  return ids, mask, np.asarray(tokens), np.asarray(logps)


def test_pad_after_eos_and_determinism(params, samples):
  ids, mask, tokens, logps = samples
  assert tokens.dtype == np.int32 and tokens.shape == (64, 12)
  kw = dict(max_new_tokens=12, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(sample.generate(CFG, params, ids, mask, rng=jax.random.key(7), **kw), tokens)
  assert not np.array_equal(sample.generate(CFG, params, ids, mask, rng=jax.random.key(8), **kw), tokens)
  ended = 0
  for row, row_logps in zip(tokens, logps):
    eos = np.flatnonzero(row == EOS)
    if eos.size:
      ended += 1
      assert np.all(row[eos[0] + 1:] == PAD) and np.all(row_logps[eos[0] + 1:] == 0.0)
    assert np.all(row_logps[:eos[0] + 1 if eos.size else None] < 0.0)
  assert 0 < ended < 64  # with 64 rows x 12 tokens over 40 ids, some rows stop and some do not


def test_generate_rejects_right_padded_or_empty_prompts(params):
  kw = dict(rng=jax.random.key(0), max_new_tokens=2, eos_id=EOS, pad_id=PAD)
  with pytest.raises(ValueError, match="LEFT-padded"):
    sample.generate(CFG, params, np.ones((1, 3), np.int32), np.array([[1, 1, 0]]), **kw)
  with pytest.raises(ValueError, match="LEFT-padded"):
    sample.generate(CFG, params, np.ones((1, 3), np.int32), np.array([[1, 0, 1]]), **kw)


def test_scoring_batch_reproduces_the_sampled_logps(params, samples):
  """loss_mask covers exactly the sampled tokens through the first EOS, and `sequence_logps` on the batch
  equals the sum of the generation pass's own per-token log-softmax (temperature 1)."""
  ids, mask, tokens, logps = samples
  width = ids.shape[1] + tokens.shape[1]
  batch = sample.completions_to_batch(ids, mask, tokens, pad_id=PAD, eos_id=EOS, max_length=width)
  slots = np.arange(width)
  for i in range(len(ids)):
    eos = np.flatnonzero(tokens[i] == EOS)
    response = tokens[i][:eos[0] + 1] if eos.size else tokens[i]
    p, r = int(mask[i].sum()), len(response)
    np.testing.assert_array_equal(batch["input_ids"][i, :p + r], np.concatenate([ids[i][mask[i] > 0], response]))
    np.testing.assert_array_equal(batch["input_ids"][i, p + r:], PAD)
    np.testing.assert_array_equal(batch["loss_mask"][i], (slots >= p) & (slots < p + r))
    np.testing.assert_array_equal(batch["attention_mask"][i], slots < p + r)
    np.testing.assert_array_equal(batch["positions"][i, :p + r], np.arange(p + r))
  model = model_lib.make_model(CFG)
  scored = jax.jit(lambda p, b: logprobs.sequence_logps(model, p, b))(params, batch)
  np.testing.assert_allclose(scored.logps, logps.sum(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(scored.num_tokens, batch["loss_mask"].sum(1))
