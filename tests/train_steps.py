"""DPO train steps built as the trainer builds them (sharded state, frozen reference, jitted with declared
shardings), for tests that compare batch layouts and meshes."""

import functools

import jax

from dpo_jax import model as model_lib, optim, sharding, step


def run_steps(params, local, *, model_cfg, config, mesh_sizes, devices, grad_accum_steps=1, steps=1, lora=None,
              adapters=None):
  """`steps` updates from `params` (also the reference) on `local` (a host batch without row_ids) over a mesh of
  the first `devices` devices -> (final params, per-step metrics), on the host.

  `lora` (a LoraSpec) with `adapters`: the state holds the adapters over the frozen base `params` (also pi_ref),
  and the final adapters come back instead."""
  rules = config.sharding.rules
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:devices])
  shard = sharding.ShardingContext(mesh, rules)
  model = model_lib.make_model(model_cfg, shard)
  optimizer, schedule = optim.make_optimizer(config.optim)
  if lora is None:
    shardings = step.state_shardings(model_cfg, optimizer, mesh, rules)
    reference = jax.device_put(params, shardings.params)
    state = step.create_train_state(reference, optimizer, shardings)
  else:
    shardings = step.lora_state_shardings(model, lora, optimizer, mesh, rules)
    reference = jax.device_put(params, step.param_shardings(model_cfg, mesh, rules))
    state = step.create_train_state(jax.device_put(adapters, shardings.params), optimizer, shardings)
  train = step.jit_train_step(
      functools.partial(step.train_step, model=model, optimizer=optimizer, schedule=schedule, loss_cfg=config.loss,
                        grad_accum_steps=grad_accum_steps, shard=shard, lora=lora),
      state_shardings=shardings, reference_shardings=jax.tree.map(lambda x: x.sharding, reference),
      batch_shardings=sharding.batch_shardings(mesh, rules, local), mesh=mesh)
  history = []
  for _ in range(steps):
    state, metrics = train(state, reference, sharding.global_batch(mesh, rules, local))
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history
