"""Checkpoints with orbax: the train state (sharded arrays) and a small JSON record per step.

    <workdir>/<stage>/checkpoints/<step>/{state, meta}

`meta` holds what a resumed run needs besides arrays: the data position (the global step the batch
iterator restarts from), the seed, and the stage. Restoring goes straight into the target shardings.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from absl import logging as absl_logging


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


def _key_name(key: Any) -> str:
  for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_name(path: tuple) -> str:
  """Orbax's name for a leaf: its pytree keys joined with '.', e.g. 'opt_state.0.mu.embed.embedding'."""
  return ".".join(_key_name(k) for k in path)


def stored_arrays(mngr: ocp.CheckpointManager, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf name: (global shape, dtype)} of a step's state, read from its metadata (no array data)."""
  # The handler reads the item folder itself; `StandardCheckpointer().metadata` also looked for a step-level
  # metadata file there (it sits one folder up) and logged a warning at every resume.
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(str(mngr.directory)) / str(step) / "state")
  return {leaf_name(path): (tuple(m.shape), str(m.dtype)) for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_fits(stored: dict[str, tuple[tuple[int, ...], str]], abstract_state: Any, what: str) -> None:
  """ValueError naming the first param whose shape (or presence) differs between a checkpoint and the model."""
  wanted = {leaf_name(path): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  fix = ("Resume with the config it was trained with (see summary.json / the command that made it), or pass another "
         "--workdir for the new config.")
  for name, (shape, _) in wanted.items():
    if name not in stored:
      raise ValueError(f"{what} does not fit the model config: it has no {name!r} (shape {shape} in the config). {fix}")
    if stored[name][0] != shape:
      raise ValueError(f"{what} does not fit the model config: {name!r} has shape {stored[name][0]} there and {shape} "
                       f"in the config (the first of the params that differ). {fix}")
  extra = sorted(set(stored) - set(wanted))
  if extra:
    raise ValueError(f"{what} does not fit the model config: it has {extra[0]!r}, which the config's model does not "
                     f"({len(extra)} such arrays). {fix}")


def _set_aside(mngr: ocp.CheckpointManager, step: int, err: Exception) -> None:
  """Report an unreadable step and move it to `<step>.corrupt-<unix time>`, out of the manager's sight."""
  bad = os.path.join(str(mngr.directory), str(step))
  aside = f"{bad}.corrupt-{int(time.time())}"
  # One line: TensorStore's errors carry a multi-line JSON spec of the array; the whole text goes to the log
  # (python -m dpo_jax.train --verbosity=0 shows it).
  reason = (str(err).strip().splitlines() or [""])[0]
  reason = reason if len(reason) <= 200 else reason[:197] + "..."
  print(f"WARNING: checkpoint step {step} in {mngr.directory} is unreadable ({type(err).__name__}: {reason}); "
        f"moved it to {aside} and trying the previous step.", flush=True)
  absl_logging.info("checkpoint step %d in %s is unreadable: %r", step, mngr.directory, err)
  if jax.process_index() == 0 and os.path.isdir(bad):
    os.replace(bad, aside)
  if jax.process_count() > 1:  # every host sees the step gone before any of them lists the steps again
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
  """(state, meta) of the newest READABLE checkpoint, or None when there is none.

  Orbax commits a step by renaming its temporary folder, so a run killed mid-save leaves no half step behind.
  A committed step that still cannot be read (a truncated or corrupted file, a lost disk block) is reported,
  moved aside to `<step>.corrupt-<unix time>` (kept for inspection, out of the manager's sight, so the step
  can be saved again) and the previous step is tried. A readable step whose arrays do not fit `abstract_state`
  (the config changed) is a ValueError naming the first param that differs; nothing is moved.
  """
  mngr.reload()  # the steps on disk now (another process may have written them)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      stored = stored_arrays(mngr, step)
      if not stored:
        raise ValueError("no arrays listed in the step's metadata")
    except Exception as err:  # unreadable metadata: a damaged step
      _set_aside(mngr, step, err)
      continue
    check_fits(stored, abstract_state, f"checkpoint step {step} in {mngr.directory}")  # a config error: raised
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      return restored["state"], dict(restored["meta"])
    except Exception as err:  # orbax / tensorstore raise many types for a damaged step; all mean "unreadable"
      _set_aside(mngr, step, err)
  return None
