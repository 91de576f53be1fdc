"""Shared-prompt batches: each prompt once for its responses; the same log-probs, loss, grads and updates as rows."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from dpo_jax import logprobs, model as model_lib, step
from dpo_jax.train import config_checks, runtime
from dpo_jax.data import preference, rankings
from batches import random_tokenized_pairs
from train_steps import run_steps

CONFIG = get_config("tiny")
CONFIG.optim.warmup_steps = 0
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
RULES = CONFIG.sharding.rules
MAX_LENGTH = 24


def make_pairs(num_pairs, seed=0, *, reference=False):
  """Random TokenizedPairs whose prompts and responses vary in length (so both paddings are exercised)."""
  return random_tokenized_pairs(num_pairs, vocab=MODEL_CFG.vocab_size, max_length=MAX_LENGTH, seed=seed,
                                first_row_id=100, reference=reference)


def both(tokenized, indices):
  """(shared-prompt batch, row batch) of the same pairs."""
  return (preference.make_batch(tokenized, indices, kind=preference.SHARED),
          preference.make_batch(tokenized, indices, kind="dpo"))


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(MODEL_CFG, jax.random.key(0))


def test_layout_holds_each_prompt_once_left_padded():
  tokenized = make_pairs(6)
  shared, rows = both(tokenized, np.array([3, 0, 5, -1]))
  p, r = tokenized.prompt_width, tokenized.response_width
  assert shared["prompt_ids"].shape == (4, p) and shared["input_ids"].shape == (8, r)
  for i, k in enumerate([3, 0, 5, 0]):  # the padding pair repeats pair 0's tokens
    prompt = tokenized.prompt_ids[k]
    np.testing.assert_array_equal(shared["prompt_ids"][i, p - len(prompt):], prompt)
    np.testing.assert_array_equal(shared["prompt_positions"][i, p - len(prompt):], np.arange(len(prompt)))
    assert shared["prompt_mask"][i].sum() == len(prompt) and shared["prompt_mask"][i, -1] == 1
    for side, response in enumerate((tokenized.chosen_ids[k], tokenized.rejected_ids[k])):
      row = 2 * i + side
      np.testing.assert_array_equal(shared["input_ids"][row, :len(response)], response)
      np.testing.assert_array_equal(shared["positions"][row, :len(response)], len(prompt) + np.arange(len(response)))
      np.testing.assert_array_equal(shared["attention_mask"][row], np.arange(r) < len(response))
      if i < 3:  # the row layout scores the same tokens
        np.testing.assert_array_equal(rows["input_ids"][row][rows["loss_mask"][row] > 0], response)
  np.testing.assert_array_equal(shared["loss_mask"][:6], shared["attention_mask"][:6])
  assert shared["loss_mask"][6:].sum() == 0  # the padding pair scores nothing
  for key in ("pair_mask", "row_ids"):
    np.testing.assert_array_equal(shared[key], rows[key])
  assert sum(v.size for k, v in shared.items() if v.ndim == 2) < sum(v.size for v in rows.values() if v.ndim == 2)


@pytest.mark.parametrize("overrides", [{}, dict(logits_chunk_size=5), dict(tie_embeddings=False, qk_norm=True),
                                       dict(scan_layers=True, remat="full"), dict(weight_grad_gemm="xla")])
@pytest.mark.slow
def test_logps_and_grads_equal_the_row_batch(overrides):
  """Per-sequence log-probs, token counts, logits sums and lengths, and the grads of the summed log-probs."""
  cfg = dataclasses.replace(MODEL_CFG, **overrides)
  params = model_lib.init_params(cfg, jax.random.key(1))
  model = model_lib.make_model(cfg)
  shared, rows = both(make_pairs(7, seed=1), np.arange(7))

  @jax.jit
  def run(batch):
    value = lambda p: logprobs.sequence_logps(model, p, batch)
    return value(params), logprobs.sequence_lengths(batch), jax.grad(lambda p: value(p).logps.sum())(params)

  got, got_lengths, got_grads = run(shared)
  want, want_lengths, want_grads = run(rows)
  for field in ("logps", "num_tokens", "logits_sum"):
    np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5, err_msg=field)
  np.testing.assert_array_equal(got_lengths, want_lengths)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
    h = functools.reduce(lambda t, k: t[k.key], path, want_grads)
    np.testing.assert_allclose(g, h, atol=1e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_a_response_sees_its_own_prompt_only(params):
  """Changing one pair's prompt changes that pair's two log-probs and no other sequence's (bit for bit)."""
  tokenized = make_pairs(4, seed=2)
  shared, _ = both(tokenized, np.arange(4))
  model = model_lib.make_model(MODEL_CFG)
  fn = jax.jit(lambda b: logprobs.sequence_logps(model, params, b).logps)
  before = np.asarray(fn(shared))
  changed = dict(shared, prompt_ids=shared["prompt_ids"].copy())
  changed["prompt_ids"][2] = np.where(shared["prompt_mask"][2] > 0, 5, shared["prompt_ids"][2])
  after = np.asarray(fn(changed))
  pair = np.arange(8) // 2
  assert np.all(before[pair == 2] != after[pair == 2])
  np.testing.assert_array_equal(before[pair != 2], after[pair != 2])
  junk = dict(shared, prompt_ids=np.where(shared["prompt_mask"] > 0, shared["prompt_ids"], 9),
              input_ids=np.where(shared["attention_mask"] > 0, shared["input_ids"], 9))
  np.testing.assert_array_equal(np.asarray(fn(junk)), before)  # padding ids are never seen


@pytest.mark.slow
def test_dpo_loss_metrics_and_precomputed_references_equal_the_row_batch(params):
  tokenized = make_pairs(6, seed=3, reference=True)
  shared, rows = both(tokenized, np.array([0, 1, 2, 3, 4, 5, -1, -1]))
  model = model_lib.make_model(MODEL_CFG)
  reference = jax.tree.map(lambda x: x * 0.9, params)
  for ref in (reference, None):  # a reference forward, then the batch's precomputed log-probs
    got = step.eval_sums(params, ref, shared, model=model, loss_cfg=CONFIG.loss)
    want = step.eval_sums(params, ref, rows, model=model, loss_cfg=CONFIG.loss)
    assert float(want["pairs"]) == 6
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_ranked_sets_share_their_prompt():
  """K = 3 responses per prompt under the Plackett-Luce loss: the same metric sums as the row layout."""
  rng = np.random.default_rng(4)
  sets = [tuple(np.append(rng.integers(2, 60, int(rng.integers(1, 9))), 1).astype(np.int32) for _ in range(k))
          for k in (3, 2, 3, 3)]
  tokenized = rankings.TokenizedRankings(
      tuple(rng.integers(2, 60, int(rng.integers(1, 6))).astype(np.int32) for _ in sets), tuple(sets),
      np.arange(4, dtype=np.int32), max_length=MAX_LENGTH, pad_id=0, eos_id=1, num_responses=3)
  shared, rows = both(tokenized, np.arange(4))
  assert shared["input_ids"].shape == (12, tokenized.response_width) and shared["prompt_ids"].shape[0] == 4
  np.testing.assert_array_equal(shared["response_mask"], rows["response_mask"])
  cfg = dataclasses.replace(MODEL_CFG, vocab_size=64)
  params = model_lib.init_params(cfg, jax.random.key(2))
  model = model_lib.make_model(cfg)
  loss_cfg = get_config("tiny").loss
  loss_cfg.type = "plackett_luce"
  reference = jax.tree.map(lambda x: x * 0.9, params)
  got = step.eval_sums(params, reference, shared, model=model, loss_cfg=loss_cfg)
  want = step.eval_sums(params, reference, rows, model=model, loss_cfg=loss_cfg)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_train_step_on_8_devices_matches_the_row_batch_on_one(params):
  """Prompts and responses sharded over (data=2, fsdp=2, tensor=2), 2 micro-batches: the update of the row
  layout on 1 device, to the same tolerance as the 8-device step tests."""
  tokenized = make_pairs(16, seed=5)
  shared, rows = both(tokenized, np.arange(16))
  out = []
  for local, mesh_sizes, devices, accum in ((rows, {"data": 1}, 1, 1),
                                            (shared, {"data": 2, "fsdp": 2, "tensor": 2}, 8, 2)):
    local = {k: v for k, v in local.items() if k != "row_ids"}
    out.append(run_steps(params, local, model_cfg=MODEL_CFG, config=CONFIG, mesh_sizes=mesh_sizes, devices=devices,
                         grad_accum_steps=accum, steps=2))
  (p1, h1), (p8, h8) = out
  for a, b in zip(h1, h8):
    for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "num_tokens"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
  lr = CONFIG.optim.learning_rate
  diff = np.concatenate([np.abs(a - b).reshape(-1) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8))])
  assert diff.max() <= 2.5 * lr and np.mean(diff > 0.01 * lr) < 1e-3, (diff.max(), np.mean(diff > 0.01 * lr))


def test_the_trainer_shares_prompts_when_that_is_fewer_tokens():
  config = get_config("tiny")
  tokenized = make_pairs(20)  # longest prompt 7, longest response up to 24: 7 + 2 R against 2 x 24
  config.data.prompt_sharing = "auto"
  expected = preference.SHARED if tokenized.prompt_width + 2 * tokenized.response_width < 48 else "dpo"
  assert runtime.dpo_kind(config, tokenized) == expected
  short = dataclasses.replace(make_pairs(20, seed=7), max_length=4 * MAX_LENGTH)
  assert runtime.dpo_kind(config, short) == preference.SHARED  # rows of 96 tokens: sharing is fewer
  config.data.prompt_sharing = "off"
  assert runtime.dpo_kind(config, short) == "dpo"
  config.data.prompt_sharing = "on"
  assert runtime.dpo_kind(config, tokenized) == preference.SHARED
  config.data.prompt_sharing = "yes"
  with pytest.raises(ValueError, match=r"config.data.prompt_sharing='yes'; choose one of \('auto', 'on', 'off'\)"):
    config_checks.validate_config(config, 1)


def test_shared_prompt_rows_refuses_what_does_not_fit():
  with pytest.raises(ValueError, match="prompt 0 has 4 tokens; it needs 1 .. 3"):
    preference.shared_prompt_rows([np.arange(4)], [np.arange(2), np.arange(2)], prompt_width=3, response_width=4,
                                  pad_id=0)
  with pytest.raises(ValueError, match="response 1 has 0 tokens"):
    preference.shared_prompt_rows([np.arange(2)], [np.arange(2), np.arange(0)], prompt_width=3, response_width=4,
                                  pad_id=0)
