"""Sequence packing: packed batches give the unpacked batch's log-probs, loss and grads; segments stay apart."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from dpo_jax import logprobs, model as model_lib, step
from dpo_jax.data import packing, preference
from dpo_jax.data import rows as rows_lib
from train_steps import run_steps

CONFIG = get_config("tiny")
CONFIG.optim.warmup_steps = 0
CONFIG.model.num_layers = 1  # one block shows any cross-segment leak; half the compile time
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
RULES = CONFIG.sharding.rules
MAX_LENGTH = 24  # T of the unpacked rows
ROW_LENGTH = 48  # L of the packed rows
PAIRS_PER_ROW = 3


def make_pairs(num_pairs, seed=0, *, long_every=0, reference=False):
  """Random TokenizedPairs: short pairs, and every `long_every`-th one near max_length."""
  rng = np.random.default_rng(seed)
  prompts, chosen, rejected = [], [], []
  for k in range(num_pairs):
    long = long_every and k % long_every == 0
    p = int(rng.integers(2, 6))
    hi = MAX_LENGTH - p if long else 6
    lo = hi - 2 if long else 1
    prompts.append(rng.integers(2, MODEL_CFG.vocab_size, p).astype(np.int32))
    for out in (chosen, rejected):
      r = int(rng.integers(lo, hi + 1))
      out.append(np.append(rng.integers(2, MODEL_CFG.vocab_size, r - 1), 1).astype(np.int32))  # ... + EOS
  refs = rng.normal(-20.0, 5.0, (num_pairs, 2)) if reference else None
  return preference.TokenizedPairs(tuple(prompts), tuple(chosen), tuple(rejected),
                                   np.arange(100, 100 + num_pairs, dtype=np.int32), max_length=MAX_LENGTH, pad_id=0,
                                   eos_id=1, reference_logps=refs)


def batches(tokenized, slots_RxP):
  """(packed batch, the unpacked batch of the same pair slots, in the same order)."""
  packed = packing.make_packed_batch(tokenized, slots_RxP, row_length=ROW_LENGTH)
  unpacked = preference.make_batch(tokenized, slots_RxP.reshape(-1), kind="dpo")
  return packed, unpacked


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(MODEL_CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def slots():
  tokenized = make_pairs(8)
  slots_RxP = np.array([[0, 1, 2], [3, 4, -1], [5, 6, 7], [-1, -1, -1]])  # an empty slot, an empty row
  return tokenized, slots_RxP


def _cfg(chunk):
  return dataclasses.replace(MODEL_CFG, logits_chunk_size=chunk)


def test_segments_never_attend_across(params, slots):
  tokenized, slots_RxP = slots
  packed, _ = batches(tokenized, slots_RxP)
  model = model_lib.make_model(MODEL_CFG)
  fn = jax.jit(lambda b: logprobs.sequence_logps(model, params, b).logps)
  before = np.asarray(fn(packed))
  changed = dict(packed, input_ids=packed["input_ids"].copy())
  seg = changed["attention_mask"][0]
  changed["input_ids"][0, (seg == 3) | (seg == 4)] = 7  # row 0's second pair: both segments
  after = np.asarray(fn(changed))
  pair = np.arange(before.shape[0]) // 2
  assert not np.allclose(before[pair == 1], after[pair == 1])
  np.testing.assert_array_equal(before[pair != 1], after[pair != 1])  # bit-identical: nothing leaks across


def test_chunked_logps_equal_unpacked(params, slots):
  """The chunked LM-head path (`logits_chunk_size` > 0) reduces per segment too; its grads are compared on 8
  devices below."""
  tokenized, slots_RxP = slots
  packed, unpacked = batches(tokenized, slots_RxP)
  model = model_lib.make_model(_cfg(5))
  fn = jax.jit(lambda b: logprobs.sequence_logps(model, params, b))
  got, want = fn(packed), fn(unpacked)
  real_2B = np.repeat(packed["pair_mask"], 2) > 0
  for field in ("logps", "num_tokens", "logits_sum"):
    np.testing.assert_allclose(np.asarray(getattr(got, field))[real_2B], np.asarray(getattr(want, field))[real_2B],
                               rtol=1e-5, atol=1e-5, err_msg=f"chunked {field}: packed differs from unpacked")
  assert np.all(np.asarray(got.num_tokens)[~real_2B] == 0)


def test_logps_loss_and_grads_equal_unpacked(params, slots):
  """Policy and reference log-probs per pair, the DPO loss, its metric sums and its grads."""
  tokenized, slots_RxP = slots
  packed, unpacked = batches(tokenized, slots_RxP)
  model = model_lib.make_model(MODEL_CFG)
  reference = jax.tree.map(lambda x: x * 0.9, params)

  @jax.jit
  def run(batch):
    ref = step.reference_logps(model, reference, batch)
    fn = functools.partial(step.dpo_loss, model=model, loss_cfg=CONFIG.loss, total_weight=jnp.float32(8.0))
    return logprobs.sequence_lengths(batch), ref, jax.value_and_grad(fn, has_aux=True)(params, ref, batch)

  # The reference forward is `sequence_logps`, the policy's function: its per-pair values stand for both; the
  # policy's enter the loss, the metric sums (log-probs, token counts, logits) and the grads compared below.
  lengths_p, ref_p, ((loss_p, sums_p), grads_p) = run(packed)
  lengths_u, ref_u, ((loss_u, sums_u), grads_u) = run(unpacked)
  real_2B = np.repeat(packed["pair_mask"], 2) > 0
  assert ref_p.shape == (slots_RxP.size, 2) and real_2B.sum() == 16
  np.testing.assert_allclose(np.asarray(ref_p).reshape(-1)[real_2B], np.asarray(ref_u).reshape(-1)[real_2B],
                             rtol=1e-5, atol=1e-5, err_msg="per-pair log-probs: packed differs from unpacked")
  assert np.all(np.asarray(ref_p).reshape(-1)[~real_2B] == 0)  # empty slots score nothing
  np.testing.assert_array_equal(np.asarray(lengths_p)[real_2B], np.asarray(lengths_u)[real_2B])
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  for k in sums_u:
    np.testing.assert_allclose(sums_p[k], sums_u[k], rtol=1e-5, atol=1e-5, err_msg=f"metric sum {k}")
  flat_p, flat_u = jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)
  scale = max(float(jnp.abs(g).max()) for g in flat_u)
  for gp, gu in zip(flat_p, flat_u):
    np.testing.assert_allclose(gp, gu, atol=1e-5 * scale, rtol=1e-4)


def test_precomputed_reference_logps_follow_the_slots():
  tokenized = make_pairs(5, reference=True)
  packed, unpacked = batches(tokenized, np.array([[4, 0], [2, -1]]))
  for field in rows_lib.REFERENCE_FIELDS:
    np.testing.assert_array_equal(packed[field], unpacked[field])
  np.testing.assert_array_equal(packed["row_ids"], [104, 100, 102, -1])


def test_pack_epoch_fills_rows_and_is_deterministic():
  tokenized = make_pairs(200, long_every=7)
  lengths = packing.pair_lengths(tokenized)
  order = preference.epoch_order(tokenized.num_pairs, 3, 0)
  steps = packing.pack_epoch(lengths, order, rows=4, pairs_per_row=PAIRS_PER_ROW, row_length=ROW_LENGTH)
  again = packing.pack_epoch(lengths, order, rows=4, pairs_per_row=PAIRS_PER_ROW, row_length=ROW_LENGTH)
  assert all(np.array_equal(a, b) for a, b in zip(steps, again)) and len(steps) == len(again)
  start = 0
  for s in steps:  # each step holds the next contiguous block of the epoch's order
    held = s[s >= 0]
    assert sorted(held.tolist()) == sorted(order[start:start + len(held)].tolist())
    start += len(held)
    row_tokens = np.where(s >= 0, lengths[np.maximum(s, 0)], 0).sum(-1)
    assert row_tokens.max() <= ROW_LENGTH
    assert (s >= 0).sum() >= 1
  assert start > 0.8 * len(order)  # only the last, unfilled step is dropped


def test_iterate_packed_batches_replays_from_any_step():
  tokenized = make_pairs(60, long_every=5)
  kw = dict(global_batch=6, pairs_per_row=PAIRS_PER_ROW, row_length=ROW_LENGTH, seed=1)
  run = packing.iterate_packed_batches(tokenized, **kw)
  full = [next(run) for _ in range(40)]  # crosses several epochs
  resumed = packing.iterate_packed_batches(tokenized, start_step=23, **kw)
  for want in full[23:]:
    got = next(resumed)
    assert got[0] == want[0]
    for k in want[1]:
      np.testing.assert_array_equal(got[1][k], want[1][k])
  host1 = next(packing.iterate_packed_batches(tokenized, start_step=23, process_index=1, process_count=2, **kw))[1]
  np.testing.assert_array_equal(host1["input_ids"], full[23][1]["input_ids"][1:])  # host 1: its contiguous row


def test_errors_name_the_field():
  tokenized = make_pairs(10, long_every=2)
  with pytest.raises(ValueError, match="config.data.pack_length"):
    packing.iterate_packed_batches(tokenized, global_batch=6, pairs_per_row=3, row_length=20, seed=0)
  with pytest.raises(ValueError, match="config.data.pairs_per_row"):
    packing.iterate_packed_batches(tokenized, global_batch=8, pairs_per_row=3, row_length=ROW_LENGTH, seed=0)


def test_packed_train_step_on_8_devices_matches_one_device(params):
  """Rows sharded over (data=2, fsdp=2, tensor=2), 2 micro-batches of packed rows, chunked log-probs: the same
  update as on 1 device."""
  tokenized = make_pairs(64, seed=2, long_every=6)
  _, local = next(packing.iterate_packed_batches(tokenized, global_batch=24, pairs_per_row=PAIRS_PER_ROW,
                                                 row_length=ROW_LENGTH, seed=0))
  local.pop("row_ids")
  out = []
  for mesh_sizes, devices, accum in (({"data": 1}, 1, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 8, 2)):
    new_params, (metrics,) = run_steps(params, local, model_cfg=_cfg(7), config=CONFIG, mesh_sizes=mesh_sizes,
                                       devices=devices, grad_accum_steps=accum)
    out.append((new_params, metrics))
  (p1, m1), (p8, m8) = out
  assert m1["num_pairs"] == local["pair_mask"].sum() > 8
  for k in ("loss", "grad_norm", "rewards/margins", "num_tokens"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
  # Adam turns fp32 summation-order noise on a ~0 gradient into up to one step (lr) per element: compare params to
  # 1% of a step, allowing the odd such element (the loss and grad norm above carry the exact comparison).
  diff = np.concatenate([np.abs(a - b).reshape(-1) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8))])
  lr = CONFIG.optim.learning_rate
  assert diff.max() <= 2.5 * lr and np.mean(diff > 0.01 * lr) < 1e-3, (diff.max(), np.mean(diff > 0.01 * lr))


def test_trainer_checks_packed_rows_against_the_mesh():
  from dpo_jax.train import config_checks
  config = get_config("tiny")  # batch_size 8
  config.data.packing = True
  config.data.pairs_per_row = 4  # 2 packed rows cannot split over 8 data-parallel devices
  with pytest.raises(ValueError, match=r"2 packed rows per step must divide over 8 data-parallel devices"):
    config_checks.validate_config(config, 8)
  config.data.pairs_per_row = 3
  with pytest.raises(ValueError, match=r"config.batch_size=8 must be a multiple of config.data.pairs_per_row=3"):
    config_checks.validate_config(config, 8)
  config.data.pairs_per_row = 1
  config_checks.validate_config(config, 8)
