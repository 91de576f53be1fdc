"""The jitted, sharded DPO step: frozen reference, 8-device parity, accumulation, eval, precomputed refs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from batches import random_dpo_batch
from configs.default import get_config
from dpo_jax import logprobs, model as model_lib, optim, sharding, step

CONFIG = get_config("tiny")
CONFIG.optim.warmup_steps = 0  # a nonzero learning rate from the first update
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
RULES = CONFIG.sharding.rules
NUM_PAIRS, SEQ = 8, 32
# Params after Adam: each update moves an element by at most ~lr, and for elements whose gradient is ~0
# Adam's m / sqrt(v) amplifies fp32 summation-order noise (another device split, another micro-batch
# order) to a visible fraction of one step. Params are compared to 1% of one step; losses and grad norms,
# which have no such amplification, are compared at 2e-5 relative.
PARAM_ATOL = 0.01 * CONFIG.optim.learning_rate


def build(mesh_sizes, num_devices, *, grad_accum_steps=1, loss_cfg=None):
  """Everything a trainer builds: mesh, sharded reference + state, jitted step and eval, global batch."""
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:num_devices])
  shard = sharding.ShardingContext(mesh, RULES)
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  shardings = step.state_shardings(MODEL_CFG, optimizer, mesh, RULES)
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(0), shardings.params)
  state = step.create_train_state(reference, optimizer, shardings)
  local = random_dpo_batch(0, NUM_PAIRS, SEQ, MODEL_CFG.vocab_size)
  batch = sharding.global_batch(mesh, RULES, local)
  batch_shardings = sharding.batch_shardings(mesh, RULES, local)
  model = model_lib.make_model(MODEL_CFG, shard)
  loss_cfg = loss_cfg or CONFIG.loss
  train = step.jit_train_step(
      functools.partial(step.train_step, model=model, optimizer=optimizer, schedule=schedule, loss_cfg=loss_cfg,
                        grad_accum_steps=grad_accum_steps, shard=shard),
      state_shardings=shardings, reference_shardings=shardings.params, batch_shardings=batch_shardings, mesh=mesh)
  evaluate = step.jit_eval_step(
      functools.partial(step.eval_step, model=model, loss_cfg=loss_cfg), param_shardings=shardings.params,
      reference_shardings=shardings.params, batch_shardings=batch_shardings, mesh=mesh)
  return dict(mesh=mesh, state=state, reference=reference, batch=batch, train=train, eval=evaluate, local=local)


def run(setup, steps):
  state, history = setup["state"], []
  for _ in range(steps):
    state, metrics = setup["train"](state, setup["reference"], setup["batch"])
    history.append(jax.device_get(metrics))
  return state, history


@pytest.fixture(scope="module")
def single():
  setup = build({"data": 1}, 1)
  reference_before = jax.device_get(setup["reference"])
  state, history = run(setup, 4)
  return dict(setup, final=state, history=history, reference_before=reference_before)


def test_first_loss_is_log2_and_metrics_are_trl_named(single):
  first = single["history"][0]
  assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-6)  # policy == reference at step 0
  assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
  for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate"):
    assert name in first and np.isfinite(first[name]), name
  assert first["num_pairs"] == NUM_PAIRS
  assert first["logps/chosen"] < 0 and first["grad_norm"] > 0


def test_training_moves_the_policy_and_the_reference_is_bit_identical(single):
  history, final = single["history"], single["final"]
  assert history[-1]["loss"] < history[0]["loss"]
  assert history[-1]["rewards/margins"] > 0  # the implicit reward learned to prefer the chosen responses
  assert int(final.step) == 4
  before, after = single["reference_before"], jax.device_get(single["reference"])
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert a.tobytes() == b.tobytes(), "the reference params changed: they must never be donated or updated"
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(final.params)))]
  assert all(moved), "every policy param should have been updated"


def test_no_gradient_reaches_the_reference(single):
  setup = single
  model = model_lib.make_model(MODEL_CFG)
  batch = {k: jnp.asarray(v) for k, v in setup["local"].items()}
  policy = jax.device_get(single["final"].params)

  def loss_wrt_reference(reference):
    return step.dpo_loss(policy, step.reference_logps(model, reference, batch), batch, model=model,
                         loss_cfg=CONFIG.loss, total_weight=1.0)[0]

  grads = jax.grad(loss_wrt_reference)(jax.device_get(setup["reference"]))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def assert_same_run(state, history, single):
  """The metrics of every step and the final params equal the 1-device, no-accumulation run's."""
  for h, h1 in zip(history, single["history"], strict=True):
    for k in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logits/chosen"):
      np.testing.assert_allclose(h[k], h1[k], rtol=2e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(single["final"].params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=PARAM_ATOL)


def test_eight_devices_match_one_device_and_params_are_sharded(single):
  setup = build({"data": 2, "fsdp": 2, "tensor": 2}, 8)
  state, history = run(setup, 4)
  assert_same_run(state, history, single)
  up = state.params["layers_0"]["mlp"]["up"]["kernel"]  # [embed, mlp] -> (fsdp, tensor)
  assert up.sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in up.addressable_shards} == {(up.shape[0] // 2, up.shape[1] // 2)}
  mu = state.opt_state[1][0].mu["layers_0"]["mlp"]["up"]["kernel"]
  assert mu.sharding.spec == P("fsdp", "tensor")  # optimizer moments sharded like their params
  assert setup["reference"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")


def test_gradient_accumulation_matches_the_full_batch(single):
  setup = build({"data": 2, "fsdp": 2, "tensor": 2}, 8, grad_accum_steps=2)
  state, history = run(setup, 4)
  assert_same_run(state, history, single)


def test_eval_step_gives_the_train_metrics_without_updating():
  setup = build({"data": 1}, 1)
  params = setup["state"].params
  before = jax.device_get(params)
  metrics = jax.device_get(setup["eval"](params, setup["reference"], setup["batch"]))
  _, train_metrics = setup["train"](setup["state"], setup["reference"], setup["batch"])
  for k, v in metrics.items():
    np.testing.assert_allclose(v, jax.device_get(train_metrics[k]), rtol=1e-6, err_msg=k)
  assert all(a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(params))))


def test_padding_pairs_are_ignored():
  model = model_lib.make_model(MODEL_CFG)
  policy = model_lib.init_params(MODEL_CFG, jax.random.key(1))
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  full = random_dpo_batch(0, NUM_PAIRS, SEQ, MODEL_CFG.vocab_size)
  half = {k: v[: (NUM_PAIRS // 2) * (2 if v.shape[0] == 2 * NUM_PAIRS else 1)] for k, v in full.items()}
  padded = dict(full, pair_mask=np.array([1] * (NUM_PAIRS // 2) + [0] * (NUM_PAIRS // 2), np.int32))
  m_half = step.eval_step(policy, reference, half, model=model, loss_cfg=CONFIG.loss)
  m_pad = step.eval_step(policy, reference, padded, model=model, loss_cfg=CONFIG.loss)
  for k in m_half:
    np.testing.assert_allclose(m_pad[k], m_half[k], rtol=1e-6, err_msg=k)


def test_precomputed_reference_logps_match_the_reference_forward():
  model = model_lib.make_model(MODEL_CFG)
  policy = model_lib.init_params(MODEL_CFG, jax.random.key(1))
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  batch = random_dpo_batch(2, NUM_PAIRS, SEQ, MODEL_CFG.vocab_size)
  ref_c, ref_r = logprobs.split_pairs(logprobs.sequence_logps(model, reference, batch).logps)
  with_refs = dict(batch, ref_chosen_logps=np.asarray(ref_c), ref_rejected_logps=np.asarray(ref_r))
  a = step.eval_step(policy, reference, batch, model=model, loss_cfg=CONFIG.loss)
  b = step.eval_step(policy, None, with_refs, model=model, loss_cfg=CONFIG.loss)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="no ref_chosen_logps"):
    step.eval_step(policy, None, batch, model=model, loss_cfg=CONFIG.loss)


def test_the_donated_state_is_consumed_but_the_reference_is_not():
  setup = build({"data": 1}, 1)
  old = setup["state"]
  new, _ = setup["train"](old, setup["reference"], setup["batch"])
  assert old.params["embed"]["embedding"].is_deleted()
  assert not setup["reference"]["embed"]["embedding"].is_deleted()
  assert not new.params["embed"]["embedding"].is_deleted()
