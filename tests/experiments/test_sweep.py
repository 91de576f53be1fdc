"""Sweeps in one program: an S-way vmapped step equals S separate train steps; the reference forward runs once."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_dpo_batch
from configs.default import get_config
from dpo_jax import model as model_lib, optim, sharding, step
from dpo_jax.experiments import sweep

CONFIG = get_config("tiny")
CONFIG.optim.warmup_steps = 0  # a nonzero learning rate from the first update
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
RULES = CONFIG.sharding.rules
NUM_PAIRS, SEQ, STEPS = 8, 32, 2
BETAS = (0.05, 0.1, 0.5)
RATES = (5e-4, 1e-3, 3e-3)  # peak learning rates, swept together with the betas
# As tests/core/test_step.py: Adam's m / sqrt(v) amplifies fp32 summation-order noise (vmapped matmuls sum in
# another order) for elements whose gradient is ~0, so params are compared to 1% of one step.
PARAM_ATOL = 0.01 * CONFIG.optim.learning_rate


def build(mesh_sizes, num_devices):
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:num_devices])
  shard = sharding.ShardingContext(mesh, RULES)
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  shardings = step.state_shardings(MODEL_CFG, optimizer, mesh, RULES)
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(0), shardings.params)
  local = [random_dpo_batch(i, NUM_PAIRS, SEQ, MODEL_CFG.vocab_size) for i in range(STEPS)]
  batches = [sharding.global_batch(mesh, RULES, b) for b in local]
  model = model_lib.make_model(MODEL_CFG, shard)
  common = dict(state_shardings=shardings, reference_shardings=shardings.params,
                batch_shardings=sharding.batch_shardings(mesh, RULES, local[0]), mesh=mesh)
  return dict(mesh=mesh, shard=shard, optimizer=optimizer, schedule=schedule, shardings=shardings,
              reference=reference, batches=batches, model=model, common=common)


def separate_runs(setup, betas, learning_rates=None):
  """Each configuration trained alone with the plain `step.train_step`: (final params, losses) per member."""
  out = []
  for i, beta in enumerate(betas):
    optimizer, schedule = setup["optimizer"], setup["schedule"]
    if learning_rates is not None:
      optimizer, schedule = optim.make_optimizer(dict(CONFIG.optim, learning_rate=learning_rates[i]))
    loss_cfg = dict(CONFIG.loss, beta=beta)
    train = step.jit_train_step(
        functools.partial(step.train_step, model=setup["model"], optimizer=optimizer, schedule=schedule,
                          loss_cfg=loss_cfg, shard=setup["shard"]), **setup["common"])
    state = step.create_train_state(setup["reference"], optimizer, setup["shardings"])
    history = []
    for batch in setup["batches"]:
      state, m = train(state, setup["reference"], batch)
      history.append(jax.device_get(m))
    out.append((jax.device_get(state.params), history))
  return out


def sweep_run(setup, betas, **kw):
  fn = sweep.make_sweep_step(setup["model"], setup["optimizer"], setup["schedule"], CONFIG.loss, betas,
                             shard=setup["shard"], **kw)
  train = sweep.jit_sweep_step(fn, **setup["common"])
  state = step.create_train_state(setup["reference"], setup["optimizer"], setup["shardings"])
  stacked = sweep.stack_states(state, len(betas), sweep.stacked_shardings(setup["shardings"], setup["mesh"]))
  history = []
  for batch in setup["batches"]:
    stacked, m = train(stacked, setup["reference"], batch)
    history.append(jax.device_get(m))
  return stacked, history


def assert_sweep_matches(stacked, history, separate):
  for i, (params, alone) in enumerate(separate):
    for t, (m_sweep, m_alone) in enumerate(zip(history, alone, strict=True)):
      for k in ("loss", "rewards/margins", "grad_norm", "learning_rate", "logps/chosen"):
        # atol: margins are differences of rewards beta * (log-ratio of ~-40-nat sequence log-probs), whose fp32
        # rounding (~4e-6 nats) another summation order (vmapped or 8-way sharded matmuls) changes
        np.testing.assert_allclose(m_sweep[k][i], m_alone[k], rtol=1e-5, atol=1e-5, err_msg=f"member {i} step {t} {k}")
    member = jax.device_get(sweep.unstack(stacked.params, i))
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(params), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=PARAM_ATOL, err_msg=f"member {i} params")


@pytest.fixture(scope="module")
def one_device():
  """A beta x learning-rate sweep on one device, and the same configurations trained one by one."""
  setup = build({"data": 1}, 1)
  stacked, history = sweep_run(setup, BETAS, learning_rates=RATES, base_learning_rate=CONFIG.optim.learning_rate)
  return dict(setup=setup, stacked=stacked, history=history, separate=separate_runs(setup, BETAS, RATES))


@pytest.mark.slow
def test_sweep_equals_separate_runs(one_device):
  stacked, history = one_device["stacked"], one_device["history"]
  assert int(stacked.step[0]) == STEPS and history[0]["loss"].shape == (len(BETAS),)
  assert_sweep_matches(stacked, history, one_device["separate"])
  assert len(set(np.round(history[-1]["loss"], 6))) == len(BETAS), "the members should differ"


def test_sweep_on_eight_devices_matches_one_device(one_device):
  setup = build({"data": 2, "fsdp": 2, "tensor": 2}, 8)
  stacked, history = sweep_run(setup, BETAS, learning_rates=RATES, base_learning_rate=CONFIG.optim.learning_rate)
  separate = [(jax.device_get(sweep.unstack(one_device["stacked"].params, i)),
               [sweep.unstack(m, i) for m in one_device["history"]]) for i in range(len(BETAS))]
  assert_sweep_matches(stacked, history, separate)
  up = stacked.params["layers_0"]["mlp"]["up"]["kernel"]  # [S, embed, mlp]: sweep axis replicated, the rest as usual
  assert up.shape[0] == len(BETAS)
  assert tuple(up.sharding.spec) == (None,) + tuple(setup["shardings"].params["layers_0"]["mlp"]["up"]["kernel"].spec)


def dot_shapes(jaxpr):
  """Output shapes of every dot_general in a jaxpr, sub-jaxprs (scan, custom_vjp, pjit) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += dot_shapes(sub)
  return out


def test_the_reference_forward_runs_once_not_once_per_member():
  model = model_lib.make_model(MODEL_CFG)
  params = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  batch = {k: jnp.asarray(v) for k, v in random_dpo_batch(0, NUM_PAIRS, SEQ, MODEL_CFG.vocab_size).items()}
  abstract_state = jax.eval_shape(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
  num = 3
  stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num,) + x.shape, x.dtype), abstract_state)
  fn = sweep.make_sweep_step(model, optimizer, schedule, CONFIG.loss, BETAS)
  dots = dot_shapes(jax.make_jaxpr(fn)(stacked, params, batch).jaxpr)
  # one reference forward alone: its matmuls, unbatched
  forward = dot_shapes(jax.make_jaxpr(lambda p: step.reference_logps(model, p, batch))(params).jaxpr)
  unbatched = [s for s in dots if not s or s[0] != num]
  assert sorted(unbatched) == sorted(forward), "the reference forward should appear exactly once, outside the vmap"
  assert len(dots) > 2 * len(forward)  # the policy's forward and backward, batched over the S members


def test_bad_sweeps_are_clear_errors():
  model = model_lib.make_model(MODEL_CFG)
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  with pytest.raises(ValueError, match="config.loss.beta=-1.0"):
    sweep.make_sweep_step(model, optimizer, schedule, CONFIG.loss, (0.1, -1.0))
  with pytest.raises(ValueError, match="base_learning_rate"):
    sweep.make_sweep_step(model, optimizer, schedule, CONFIG.loss, (0.1, 0.2), learning_rates=(1e-3, 2e-3))
