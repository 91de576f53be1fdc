"""Sequence log-probs: response tokens only (EOS included), prompt and padding never count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_sequences
from dpo_jax import logprobs, model as model_lib

CFG = model_lib.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2)


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


def _numpy_logps(logits, ids, loss_mask):
  """Independent reference: an explicit loop over tokens with a float64 log-softmax."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros(ids.shape[0])
  for n in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      if loss_mask[n, t]:
        row = logits[n, t - 1]
        out[n] += row[ids[n, t]] - (np.log(np.exp(row - row.max()).sum()) + row.max())
  return out


def test_matches_an_explicit_loop():
  rng = np.random.default_rng(0)
  b = random_sequences(rng, 5, 12, 30)
  logits = jnp.asarray(rng.normal(size=(5, 12, 30)) * 3, jnp.float32)
  out = logprobs.logps_from_logits(logits, b["input_ids"], b["loss_mask"])
  np.testing.assert_allclose(out.logps, _numpy_logps(logits, b["input_ids"], b["loss_mask"]), rtol=1e-5)
  np.testing.assert_array_equal(out.num_tokens, b["loss_mask"][:, 1:].sum(1))
  expected_logits = [(np.asarray(logits)[n, :-1].mean(-1) * b["loss_mask"][n, 1:]).sum() for n in range(5)]
  np.testing.assert_allclose(out.logits_sum, expected_logits, rtol=1e-5, atol=1e-5)


def test_prompt_targets_and_padding_ids_do_not_count():
  rng = np.random.default_rng(1)
  b = random_sequences(rng, 4, 16, 30)
  logits = jnp.asarray(rng.normal(size=(4, 16, 30)), jnp.float32)
  base = logprobs.logps_from_logits(logits, b["input_ids"], b["loss_mask"])
  ids = b["input_ids"].copy()
  not_scored = b["loss_mask"] == 0  # prompt and padding positions
  ids[not_scored] = rng.integers(2, 30, size=int(not_scored.sum()))
  changed = logprobs.logps_from_logits(logits, ids, b["loss_mask"])
  np.testing.assert_array_equal(changed.logps, base.logps)


def test_eos_is_counted():
  rng = np.random.default_rng(2)
  b = random_sequences(rng, 3, 16, 30)
  logits = jnp.asarray(rng.normal(size=(3, 16, 30)), jnp.float32)
  response_lengths = [int(b["loss_mask"][n].sum()) for n in range(3)]  # includes EOS by construction
  out = logprobs.logps_from_logits(logits, b["input_ids"], b["loss_mask"])
  np.testing.assert_array_equal(out.num_tokens, response_lengths)
  ids = b["input_ids"].copy()
  eos_pos = b["attention_mask"].sum(1) - 1
  ids[np.arange(3), eos_pos] = 7  # a different final token must change the score
  assert np.all(np.asarray(logprobs.logps_from_logits(logits, ids, b["loss_mask"]).logps) != np.asarray(out.logps))


def test_padding_tokens_do_not_change_the_model_result(params):
  rng = np.random.default_rng(3)
  b = random_sequences(rng, 4, 20, CFG.vocab_size)
  model = model_lib.make_model(CFG)
  base = logprobs.sequence_logps(model, params, b)
  pad = b["attention_mask"] == 0
  b2 = dict(b, input_ids=np.where(pad, rng.integers(0, CFG.vocab_size, size=pad.shape), b["input_ids"]).astype(np.int32))
  np.testing.assert_allclose(logprobs.sequence_logps(model, params, b2).logps, base.logps, rtol=1e-6)


def test_a_sequence_alone_equals_it_inside_a_padded_batch(params):
  """Alone (no padding), right-padded in a batch, and left-padded (positions from the first real token)."""
  rng = np.random.default_rng(4)
  model = model_lib.make_model(CFG)
  prompt, response = rng.integers(2, 50, size=5), rng.integers(2, 50, size=6)
  seq = np.concatenate([prompt, response, [1]]).astype(np.int32)
  n = len(seq)
  alone = dict(input_ids=seq[None], attention_mask=np.ones((1, n), np.int32),
               positions=np.arange(n, dtype=np.int32)[None],
               loss_mask=np.concatenate([np.zeros(5), np.ones(7)]).astype(np.int32)[None])
  expected = float(logprobs.sequence_logps(model, params, alone).logps[0])

  batch = random_sequences(rng, 3, 24, CFG.vocab_size)
  for key, value in alone.items():  # row 1, right padded to 24
    batch[key][1] = 0
    batch[key][1, :n] = value[0]
  assert float(logprobs.sequence_logps(model, params, batch).logps[1]) == pytest.approx(expected, rel=1e-5)

  left = {k: np.zeros((1, 24), np.int32) for k in alone}
  for key, value in alone.items():
    left[key][0, 24 - n:] = value[0]
  left["input_ids"][0, :24 - n] = 3  # junk in the padding
  assert float(logprobs.sequence_logps(model, params, left).logps[0]) == pytest.approx(expected, rel=1e-5)


def test_split_pairs_reads_interleaved_rows():
  x = jnp.arange(8)
  chosen, rejected = logprobs.split_pairs(x)
  np.testing.assert_array_equal(chosen, [0, 2, 4, 6])
  np.testing.assert_array_equal(rejected, [1, 3, 5, 7])


@pytest.mark.parametrize("tie,chunk,dtype", [(True, 5, "float32"), (False, 4, "float32"), (True, 64, "float32"),
                                             (False, 3, "bfloat16")])
@pytest.mark.slow
def test_chunked_log_probs_equal_the_full_logits_path(tie, chunk, dtype):
  """Chunking over the sequence (C not dividing T - 1, C > T) gives the same values and gradients."""
  import dataclasses
  cfg = dataclasses.replace(CFG, tie_embeddings=tie, compute_dtype=dtype)
  chunked_cfg = dataclasses.replace(cfg, logits_chunk_size=chunk)
  p = model_lib.init_params(cfg, jax.random.key(1))
  b = random_sequences(np.random.default_rng(1), 6, 16, cfg.vocab_size)
  full = lambda params: logprobs.sequence_logps(model_lib.make_model(cfg), params, b)
  chunked = lambda params: logprobs.sequence_logps(model_lib.make_model(chunked_cfg), params, b)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-2, atol=1e-2)
  for field in ("logps", "num_tokens", "logits_sum"):
    np.testing.assert_allclose(getattr(chunked(p), field), getattr(full(p), field), **tol, err_msg=field)
  g_full = jax.grad(lambda q: full(q).logps.sum())(p)
  g_chunked = jax.grad(lambda q: chunked(q).logps.sum())(p)
  for a, b_ in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b_, **tol)


@pytest.mark.slow
def test_chunked_log_probs_do_not_hold_the_full_logits():
  """Compiled memory of value-and-grad: doubling V adds several [N, T, V] arrays of temporaries to the full
  path, and only [N, C, V]-sized blocks to the chunked one."""
  import dataclasses
  b = random_sequences(np.random.default_rng(2), 8, 256, 64)

  def temp_bytes(vocab, chunk):
    cfg = dataclasses.replace(CFG, vocab_size=vocab, tie_embeddings=False, logits_chunk_size=chunk)
    model = model_lib.make_model(cfg)
    fn = jax.jit(jax.value_and_grad(lambda q: logprobs.sequence_logps(model, q, b).logps.sum()))
    return fn.lower(model_lib.abstract_params(cfg)).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 8 * 255 * 4096 * 4  # what one more fp32 [N, T - 1, V] array costs when V grows by 4096
  full_growth = temp_bytes(8192, 0) - temp_bytes(4096, 0)
  chunked_growth = temp_bytes(8192, 16) - temp_bytes(4096, 16)
  assert full_growth >= 2 * logits_bytes, full_growth
  assert chunked_growth <= logits_bytes / 4, chunked_growth


def test_token_log_prob_gradient_is_cross_entropy():
  """The custom VJP of `target_logps` equals autodiff of log_softmax + gather, masked, for any cotangent."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 4.0, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, size=(3, 5)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, size=(3, 5)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  plain = lambda x: jnp.take_along_axis(jax.nn.log_softmax(x, -1), targets[..., None], -1)[..., 0] * mask
  ours = lambda x: logprobs.target_logps(x, targets, mask)
  np.testing.assert_allclose(ours(logits), plain(logits), rtol=1e-6, atol=1e-6)
  grad_ours = jax.vjp(ours, logits)[1](cotangent)[0]
  grad_plain = jax.vjp(plain, logits)[1](cotangent)[0]
  np.testing.assert_allclose(grad_ours, grad_plain, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(grad_ours)[np.asarray(mask) == 0] == 0)  # masked positions get no gradient
  from jax.test_util import check_grads
  check_grads(ours, (logits,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
  # bf16 logits: the cotangent comes back in the logits' dtype.
  assert jax.grad(lambda x: ours(x).sum())(logits.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("vocab", [50, 8192])
def test_the_differentiated_forward_equals_the_plain_one(vocab):
  """pi_theta == pi_ref gives the same log-probs bit for bit although only the policy is differentiated (so the
  step-0 DPO loss is exactly ln 2); tests/interop/test_smollm2.py checks the loss on real weights."""
  import dataclasses
  cfg = dataclasses.replace(CFG, vocab_size=vocab)
  params = model_lib.init_params(cfg, jax.random.key(5))
  b = random_sequences(np.random.default_rng(4), 8, 24, vocab)
  model = model_lib.make_model(cfg)

  def policy_and_reference(p, r):
    ref = logprobs.sequence_logps(model, jax.lax.stop_gradient(r), b).logps
    (_, pol), grads = jax.value_and_grad(lambda q: (lambda s: (jnp.sum(s * ref), s))(
        logprobs.sequence_logps(model, q, b).logps), has_aux=True)(p)
    return pol, ref, grads  # the grads are outputs, so the backward is compiled in

  pol, ref, _ = jax.jit(policy_and_reference)(params, params)
  np.testing.assert_array_equal(pol, ref)


def test_auto_chunking_follows_the_size_of_the_logits(monkeypatch):
  """`logits_chunk_size='auto'` chunks only when one device's fp32 logits exceed AUTO_CHUNK_BYTES, into the fewest
  chunks under it (a multiple of 8 positions), counting the rows each device holds; the values are unchanged."""
  import dataclasses
  from dpo_jax import sharding
  cfg = dataclasses.replace(CFG, logits_chunk_size="auto")
  monkeypatch.setattr(logprobs, "AUTO_CHUNK_BYTES", 2 * 15 * CFG.vocab_size * 4)  # 2 rows x 15 positions
  monkeypatch.setattr(logprobs, "AUTO_CHUNK_BLOCK_BYTES", 2 * 15 * CFG.vocab_size * 4)
  assert logprobs.logits_chunk(cfg, 2, 15)[0] == 0  # fits: all at once
  chunk, why = logprobs.logits_chunk(cfg, 6, 15)  # 3x the block: 3 chunks of 5 positions -> 8
  assert chunk == 8 and "'auto': 8 positions per chunk ([6, 15, 50] fp32 logits per device" in why
  assert logprobs.logits_chunk(dataclasses.replace(cfg, logits_chunk_size=3), 6, 15) == (3, "set")
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  shard = sharding.ShardingContext(mesh, sharding.DEFAULT_RULES)
  assert logprobs.logits_chunk(cfg, 16, 15, shard)[0] == 0  # 16 rows over data x fsdp = 8 devices: 2 each
  b = random_sequences(np.random.default_rng(3), 6, 16, CFG.vocab_size)
  p = model_lib.init_params(CFG, jax.random.key(3))
  auto = logprobs.sequence_logps(model_lib.make_model(cfg), p, b)
  full = logprobs.sequence_logps(model_lib.make_model(dataclasses.replace(cfg, logits_chunk_size=0)), p, b)
  np.testing.assert_allclose(auto.logps, full.logps, rtol=1e-5)


def test_a_chunk_size_from_the_command_line_is_read_as_a_number():
  import dataclasses
  assert dataclasses.replace(CFG, logits_chunk_size="16").logits_chunk_size == 16
  with pytest.raises(ValueError, match="logits_chunk_size='big' must be an int >= 0"):
    dataclasses.replace(CFG, logits_chunk_size="big")
