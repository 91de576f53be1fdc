"""The LM head's per-sequence extras: entropy, argmax accuracy, WPO's log sum p^2 and LD-DPO's front log-probs,
against float64 numpy, and equal in every batch layout (rows, shared prompt, chunked head, sequence-sharded)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_dpo_batch, random_tokenized_pairs
from configs.default import get_config
from dpo_jax import logprobs, model as model_lib, sharding
from dpo_jax.data import preference

CFG = model_lib.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, initializer_range=0.3)
RULES = get_config().sharding.rules
FIELDS = ("logps", "num_tokens", "logits_sum", "entropy_sum", "top1_sum", "log_sum_sq_sum", "front_logps")


def numpy_extras(logits, ids, loss_mask, front_len):
  """Float64 loops: per row (entropy, top1, log sum p^2, front logps) over scored tokens t (logits at t - 1)."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros((ids.shape[0], 4))
  for n in range(ids.shape[0]):
    seen = 0
    for t in range(1, ids.shape[1]):
      if not loss_mask[n, t]:
        continue
      z = logits[n, t - 1]
      p = np.exp(z - z.max())
      p /= p.sum()
      seen += 1
      out[n, 0] += -(p * np.log(p)).sum()
      out[n, 1] += float(np.argmax(z) == ids[n, t])
      out[n, 2] += np.log((p ** 2).sum())
      if seen <= front_len[n]:
        out[n, 3] += np.log(p[ids[n, t]])
  return out


def test_extras_match_float64_loops():
  b = random_dpo_batch(0, 4, 14, 30, response_len=(1, 9))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 14, 30)) * 3, jnp.float32)
  front = logprobs.pair_front_lengths(b)
  tokens = b["loss_mask"].sum(-1).reshape(4, 2)
  np.testing.assert_array_equal(np.asarray(front).reshape(4, 2), np.repeat(tokens.min(-1, keepdims=True), 2, 1))
  out = logprobs.logps_from_logits(logits, b["input_ids"], b["loss_mask"], front_lengths_N=front)
  want = numpy_extras(logits, b["input_ids"], b["loss_mask"], np.asarray(front))
  for i, field in enumerate(("entropy_sum", "top1_sum", "log_sum_sq_sum", "front_logps")):
    np.testing.assert_allclose(getattr(out, field), want[:, i], rtol=1e-5, atol=1e-5, err_msg=field)
  # The shorter response of each pair is whole in its front; without lengths front_logps is logps.
  shorter = np.asarray(tokens.argmin(-1) + 2 * np.arange(4))
  np.testing.assert_allclose(np.asarray(out.front_logps)[shorter], np.asarray(out.logps)[shorter], rtol=1e-6)
  plain = logprobs.logps_from_logits(logits, b["input_ids"], b["loss_mask"])
  np.testing.assert_array_equal(plain.front_logps, plain.logps)
  quiet = logprobs.logps_from_logits(logits, b["input_ids"], b["loss_mask"], extras=False)
  np.testing.assert_array_equal(quiet.logps, plain.logps)
  assert not np.any(np.asarray(quiet.entropy_sum))


def test_only_the_log_probs_carry_gradients():
  b = random_dpo_batch(1, 2, 12, 30)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 12, 30)), jnp.float32)
  front = logprobs.pair_front_lengths(b)
  grad = lambda field: jax.grad(lambda z: getattr(logprobs.logps_from_logits(
      z, b["input_ids"], b["loss_mask"], front_lengths_N=front), field).sum())(logits)
  for field in ("entropy_sum", "top1_sum", "log_sum_sq_sum", "logits_sum"):
    assert not np.any(np.asarray(grad(field))), field
  assert np.any(np.asarray(grad("front_logps")))


def make_pairs(num_pairs=4, seed=0, max_length=23):
  return random_tokenized_pairs(num_pairs, vocab=CFG.vocab_size, max_length=max_length, seed=seed)


def run_layout(params, batch, cfg, mesh_sizes=None):
  shard = None
  if mesh_sizes:
    n = int(np.prod(list(mesh_sizes.values())))
    shard = sharding.ShardingContext(sharding.make_mesh(mesh_sizes, jax.devices()[:n]), RULES)
  model = model_lib.make_model(cfg, shard)
  fn = jax.jit(lambda p, b: logprobs.sequence_logps(model, p, b, front_lengths=logprobs.pair_front_lengths(b)))
  return {f: np.asarray(v) for f, v in fn(params, batch)._asdict().items()}


@pytest.mark.slow
def test_every_layout_gives_the_same_extras():
  """Rows are the reference; the shared-prompt layout, a chunked LM head (C = 5, not dividing T - 1) and a
  sequence-sharded batch (data=2, sequence=4, both layouts) agree on all seven fields."""
  params = model_lib.init_params(CFG, jax.random.key(0))
  tokenized = make_pairs()
  rows = preference.make_batch(tokenized, np.arange(4), kind="dpo")
  shared = preference.make_batch(tokenized, np.arange(4), kind=preference.SHARED)
  want = run_layout(params, rows, CFG)
  chunked = dataclasses.replace(CFG, logits_chunk_size=5)
  cases = {"shared": run_layout(params, shared, CFG), "rows chunked": run_layout(params, rows, chunked),
           "shared chunked": run_layout(params, shared, chunked),
           "rows sequence=4": run_layout(params, rows, chunked, {"data": 2, "sequence": 4}),
           "shared sequence=4": run_layout(params, shared, chunked, {"data": 2, "sequence": 4})}
  assert np.any(want["front_logps"] != want["logps"])  # some pair has a tail
  for name, got in cases.items():
    for field in FIELDS:
      np.testing.assert_allclose(got[field], want[field], rtol=2e-5, atol=2e-4, err_msg=f"{name}: {field}")


def test_packed_batches_refuse_ld_dpo():
  from dpo_jax.data import packing
  tokenized = make_pairs()
  batch = packing.make_packed_batch(tokenized, np.arange(4).reshape(2, -1), row_length=4 * 23 + 1)
  model = model_lib.make_model(CFG)
  params = model_lib.init_params(CFG, jax.random.key(0))
  with pytest.raises(ValueError, match="config.loss.ld_alpha"):
    logprobs.sequence_logps(model, params, batch, front_lengths=jnp.ones((16,)))
