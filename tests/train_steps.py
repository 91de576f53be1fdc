"""DPO train steps built as the trainer builds them (sharded state, frozen reference, jitted with declared
shardings), for tests that compare batch layouts and meshes."""

import functools

import jax

from dpo_jax import model as model_lib, optim, sharding, step


def run_steps(params, local, *, model_cfg, config, mesh_sizes, devices, grad_accum_steps=1, steps=1):
  """`steps` updates from `params` (also the reference) on `local` (a host batch without row_ids) over a mesh of
  the first `devices` devices -> (final params, per-step metrics), on the host."""
  rules = config.sharding.rules
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:devices])
  shard = sharding.ShardingContext(mesh, rules)
  optimizer, schedule = optim.make_optimizer(config.optim)
  shardings = step.state_shardings(model_cfg, optimizer, mesh, rules)
  reference = jax.device_put(params, shardings.params)
  state = step.create_train_state(reference, optimizer, shardings)
  train = step.jit_train_step(
      functools.partial(step.train_step, model=model_lib.make_model(model_cfg, shard), optimizer=optimizer,
                        schedule=schedule, loss_cfg=config.loss, grad_accum_steps=grad_accum_steps, shard=shard),
      state_shardings=shardings, reference_shardings=shardings.params,
      batch_shardings=sharding.batch_shardings(mesh, rules, local), mesh=mesh)
  history = []
  for _ in range(steps):
    state, metrics = train(state, reference, sharding.global_batch(mesh, rules, local))
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history
