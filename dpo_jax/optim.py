"""The optax update: AdamW with warmup + cosine/linear decay and global-norm clipping, built from config.

Numerics match torch.optim.AdamW (decoupled weight decay, eps added to sqrt of the bias-corrected second
moment). As in the HF Trainer that TRL builds on, weight decay skips biases and norm scales (rank < 2).
Gradient accumulation over micro-batches happens inside the train step (`step.py`), so one call of the
optimizer is one optimizer step and the schedule counts optimizer steps.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(cfg: Mapping[str, Any]) -> optax.Schedule:
  """Linear warmup 0 -> `learning_rate` over `warmup_steps`, then decay to `end_lr_ratio * lr` at `total_steps`."""
  lr, warmup, total = float(cfg["learning_rate"]), int(cfg["warmup_steps"]), int(cfg["total_steps"])
  end = lr * float(cfg["end_lr_ratio"])
  name = cfg["schedule"]
  if name not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={name!r}; choose one of {SCHEDULES}.")
  if warmup < 0 or total < 1 or warmup > total:
    raise ValueError(
        f"config.optim: need 0 <= warmup_steps ({warmup}) <= total_steps ({total}) and total_steps >= 1.")
  warmup_fn = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
  decay_steps = max(total - warmup, 1)
  decay_fn = {
      "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0),
      "linear": lambda: optax.linear_schedule(lr, end, decay_steps),
      "constant": lambda: optax.constant_schedule(lr),
  }[name]()
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for matrices (decayed), False for biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from `config.optim`; see configs/default.py for every field."""
  schedule = learning_rate_schedule(cfg)
  parts = []
  if cfg["max_grad_norm"]:
    parts.append(optax.clip_by_global_norm(float(cfg["max_grad_norm"])))
  parts.append(optax.adamw(
      schedule, b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"]),
      weight_decay=float(cfg["weight_decay"]), mask=weight_decay_mask))
  return optax.chain(*parts), schedule
