"""Sweeps in one compiled program: S configurations trained at once on the same batches.

    sweep_step(stacked_state, reference_params, batch) -> (stacked_state, metrics)   # every leaf [S, ...]

The S policies (and their optimizer states) are stacked along a leading sweep axis and `jax.vmap` runs
`step.train_step` over it. What the S members share is computed once per batch, outside the vmap:
the data batch and the frozen reference forward (its log-probs enter the vmapped step as the precomputed
`ref_chosen_logps` / `ref_rejected_logps` fields, the path `step.reference_logps` already has for
`data.reference_logps=True`). The policy forward and backward are batched over S: one [S]-batched matmul
instead of S small ones.

Sweep axes (each an `[S]` array, traced):
  beta           every pair loss (`losses.LOSSES`) only does arithmetic on beta; the concrete values are checked
                 by `losses.validate_loss_config` here, before tracing.
  learning rate  `learning_rates` (peak rates): the optimizer's update is scaled by lr_s / optim.learning_rate.
                 Exact for `optim.make_optimizer` (clipping, then AdamW, whose update -- decoupled weight decay
                 included -- is the schedule's rate times a direction that does not depend on it).
Not sweepable here: label_smoothing and the loss type (they select code paths and are checked as Python
numbers), and ranked (Plackett-Luce) batches, whose K reference log-probs have no precomputed batch field.
Run one sweep per loss type / label_smoothing instead.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import losses, sharding as sharding_lib, step


def _scaled(optimizer: optax.GradientTransformation, scale_: jax.Array) -> optax.GradientTransformation:
  """`optimizer` with its updates multiplied by the scalar `scale_` (same state: the rate is not stored in it)."""
  def update(grads, opt_state, params=None):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return jax.tree.map(lambda u: (u * scale_).astype(u.dtype), updates), opt_state
  return optax.GradientTransformation(optimizer.init, update)


def make_sweep_step(model: Any, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_cfg: Mapping[str, Any], betas: Sequence[float], *,
                    learning_rates: Sequence[float] | None = None, base_learning_rate: float | None = None,
                    grad_accum_steps: int = 1, shard: sharding_lib.ShardingContext | None = None) -> Callable:
  """The S-way train step, S = len(betas); jit it with `jit_sweep_step`.

  betas: `[S]` KL strengths, one per member (`loss_cfg.beta` is ignored).
  learning_rates: None (all members use `schedule`), or `[S]` peak learning rates; then `base_learning_rate`
    is the peak rate `optimizer` and `schedule` were built with (config.optim.learning_rate), and member s
    trains with the same schedule shape scaled by learning_rates[s] / base_learning_rate.
  Returns `sweep_step(stacked_state, reference_params, batch) -> (stacked_state, metrics)`: the state's
  leaves are `[S, ...]` (`stack_states`), the metrics `[S]` (member s's `step.train_step` metrics).
  `reference_params` may be None when the batch carries `ref_chosen_logps` / `ref_rejected_logps`.
  """
  betas_S = np.asarray(betas, np.float32)
  num = len(betas_S)
  if betas_S.ndim != 1 or num < 1:
    raise ValueError(f"sweep betas={betas!r}: give a non-empty sequence of numbers.")
  loss_type, options = losses.from_config(loss_cfg)
  if loss_type == losses.RANKING_LOSS:
    raise ValueError(f"config.loss.type={losses.RANKING_LOSS!r} (ranked data) cannot be swept: its K reference "
                     f"log-probs are not a batch field. Train one run per beta.")
  for beta in betas:  # the traced values are not checked inside the loss: check the concrete ones now
    losses.validate_loss_config(loss_type, beta=float(beta), label_smoothing=loss_cfg["label_smoothing"], **options)
  if learning_rates is None:
    scales_S = np.ones((num,), np.float32)
  else:
    if len(learning_rates) != num or not base_learning_rate or base_learning_rate <= 0:
      raise ValueError(f"sweep learning_rates={learning_rates!r}: need one per beta ({num}) and the optimizer's own "
                       f"peak rate base_learning_rate > 0 (got {base_learning_rate!r}).")
    if any(not lr > 0 for lr in learning_rates):
      raise ValueError(f"sweep learning_rates={learning_rates!r} must all be > 0.")
    scales_S = np.asarray(learning_rates, np.float32) / np.float32(base_learning_rate)
  needed = losses.needs_reference(loss_type)

  def member(state: step.TrainState, batch: Mapping[str, jax.Array], beta: jax.Array, scale_: jax.Array):
    cfg = dict(loss_cfg)
    cfg["beta"] = beta
    new_state, metrics = step.train_step(
        state, None, batch, model=model, optimizer=_scaled(optimizer, scale_), schedule=schedule, loss_cfg=cfg,
        grad_accum_steps=grad_accum_steps, shard=shard)
    metrics["learning_rate"] = metrics["learning_rate"] * scale_  # the rate this member's update used
    return new_state, metrics

  def sweep_step(stacked: step.TrainState, reference_params: Any | None, batch: Mapping[str, jax.Array]):
    if "response_mask" in batch:
      raise ValueError("ranked batches (response_mask) cannot be swept; train one run per configuration.")
    if needed and reference_params is not None:  # the one reference forward of this batch, shared by all S
      ref_BxK = step.reference_logps(model, reference_params, batch)
      batch = dict(batch, ref_chosen_logps=ref_BxK[:, 0], ref_rejected_logps=ref_BxK[:, 1])
    return jax.vmap(member, in_axes=(0, None, 0, 0))(stacked, batch, jnp.asarray(betas_S), jnp.asarray(scales_S))

  return sweep_step


def stacked_shardings(tree_shardings: Any, mesh: Mesh) -> Any:
  """Each NamedSharding with a leading sweep axis, replicated: every device holds its usual shard of all S
  members. (Splitting S over a mesh axis would fight the model's activation constraints, which vmap leaves
  unsharded along S; not offered.)"""
  return jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(None, *s.spec)), tree_shardings)


def stack_states(state: step.TrainState, num: int, shardings: Any | None = None) -> step.TrainState:
  """S = `num` copies of `state` along a new leading axis (fresh buffers; `state` is left as it is)."""
  copies = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + x.shape), tree)
  return jax.jit(copies, out_shardings=shardings)(state)


def unstack(stacked: Any, index: int) -> Any:
  """Member `index` of a stacked state or of `[S]` metrics."""
  return jax.tree.map(lambda x: x[index], stacked)


def jit_sweep_step(sweep_step_fn: Callable, *, state_shardings: step.TrainState, reference_shardings: Any,
                   batch_shardings: Any, mesh: Mesh):
  """jit with explicit shardings, as `step.jit_train_step`: `state_shardings` are the UNSTACKED state's (from
  `step.state_shardings`); the stacked state is donated, the reference is not."""
  return step.jit_train_step(sweep_step_fn, state_shardings=stacked_shardings(state_shardings, mesh),
                             reference_shardings=reference_shardings, batch_shardings=batch_shardings, mesh=mesh)

