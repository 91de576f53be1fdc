"""The optax update: AdamW with warmup + cosine/linear decay and global-norm clipping, built from config.

Numerics match torch.optim.AdamW (decoupled weight decay, eps added to sqrt of the bias-corrected second
moment). As in the HF Trainer that TRL builds on, weight decay skips biases and norm scales (rank < 2).
Gradient accumulation over micro-batches happens inside the train step (`step.py`), so one call of the
optimizer is one optimizer step and the schedule counts optimizer steps.
"""

from __future__ import annotations

import collections
import difflib
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


# configs/default.py's `optim` block (tests/data/test_batch_from_tokens.py checks they agree): what
# make_optimizer(**fields) starts from, so a notebook needs no ml_collections config.
DEFAULTS = dict(learning_rate=1e-3, schedule="cosine", warmup_steps=10, total_steps=400, end_lr_ratio=0.1, b1=0.9,
                b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, grad_accum_steps=1)


def make_optimizer(cfg: Mapping[str, Any] | None = None,
                   **fields: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from `config.optim`; see configs/default.py for every field.

  Keywords override fields of `cfg`, or of `DEFAULTS` when `cfg` is None:
  `make_optimizer(learning_rate=1e-6, schedule="constant", warmup_steps=0)`. An unknown keyword is a ValueError.
  `grad_accum_steps` belongs to the train step (`step.train_step(grad_accum_steps=...)`), so a keyword other
  than 1 is refused here rather than silently ignored.
  """
  unknown = sorted(set(fields) - set(DEFAULTS))
  if unknown:
    hints = ""
    for name in unknown:
      close = difflib.get_close_matches(name, list(DEFAULTS), n=1)
      hints += f" {name!r}: did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"make_optimizer: unknown field(s) {unknown}.{hints} The fields are {sorted(DEFAULTS)}.")
  if fields.get("grad_accum_steps", 1) != 1:
    raise ValueError(f"make_optimizer(grad_accum_steps={fields['grad_accum_steps']}): accumulation happens in the "
                     "train step; pass grad_accum_steps to step.train_step (one optimizer call is one optimizer "
                     "step).")
  if fields:
    cfg = collections.ChainMap(fields, DEFAULTS if cfg is None else cfg)
  elif cfg is None:
    cfg = DEFAULTS
  schedule = learning_rate_schedule(cfg)
  parts = []
  if cfg["max_grad_norm"]:
    parts.append(optax.clip_by_global_norm(float(cfg["max_grad_norm"])))
  parts.append(optax.adamw(
      schedule, b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"]),
      weight_decay=float(cfg["weight_decay"]), mask=weight_decay_mask))
  return optax.chain(*parts), schedule
