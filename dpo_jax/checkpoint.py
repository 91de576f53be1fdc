"""Checkpoints with orbax: the train state (sharded arrays) and a small JSON record per step.

    <workdir>/<stage>/checkpoints/<step>/{state, meta}

`meta` holds what a resumed run needs besides arrays: the data position (the global step the batch
iterator restarts from), the seed, and the stage. Restoring goes straight into the target shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created if missing); saves are synchronous and atomic."""
  os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)
  mngr.wait_until_finished()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, so restore lays arrays out directly."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
  """(state, meta) of the newest checkpoint, or None when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"])
