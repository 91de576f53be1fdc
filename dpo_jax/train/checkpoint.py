"""Checkpoints with orbax: the train state (sharded arrays) and a small JSON record per step.

    <workdir>/<stage>/checkpoints/<step>/{state, meta}

`meta` holds what a resumed run needs besides arrays: the data position (the global step the batch
iterator restarts from), the seed, and the stage. Restoring goes straight into the target shardings.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from absl import logging as absl_logging

from dpo_jax.train import workdir


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created if missing); saves are synchronous and atomic."""
  os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


class DiskFull(OSError):
  """A checkpoint save that found the disk full (ENOSPC) or the quota spent (EDQUOT); the message is the whole
  report (no `[Errno 28]` prefix): the stage, the step, the filesystem and what a rerun resumes from."""

  def __str__(self) -> str:
    return self.strerror


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Save `step` and wait for it. A full disk is a `DiskFull` (raised on purpose: one line at the command line), not
  orbax's error with a logged traceback per writer thread and dozens more from its closed event loops."""
  with _QuietWriters() as quiet:
    try:
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True)
      mngr.wait_until_finished()
      return
    except Exception as err:  # noqa: BLE001  (re-raised unless the disk is full)
      cause = disk_full_cause(err)
      if cause is None or os.environ.get("DPO_JAX_TRACEBACK") == "1":
        raise  # with what the writer threads reported
      absl_logging.info("checkpoint step %d in %s: the disk is full: %r", step, mngr.directory, err)
    quiet.settle()  # out of the except block: `err` no longer holds orbax's frames, so they can be collected
  code = errno.EDQUOT if cause == os.strerror(errno.EDQUOT) else errno.ENOSPC
  raise DiskFull(code, disk_full_message(mngr, step, meta.get("stage", ""), code))


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


# How a full disk reads when it comes back from TensorStore (orbax's array writer) as text, without an errno.
_DISK_FULL_TEXT = {"No space left on device": os.strerror(errno.ENOSPC), f"os_error_code='{errno.ENOSPC}'":
                   os.strerror(errno.ENOSPC), "Disk quota exceeded": os.strerror(errno.EDQUOT),
                   f"os_error_code='{errno.EDQUOT}'": os.strerror(errno.EDQUOT)}


def disk_full_cause(err: BaseException) -> str | None:
  """'No space left on device' / 'Disk quota exceeded' when `err` or anything in its chain (__cause__,
  __context__, an exception group's members) is ENOSPC / EDQUOT, as an errno or in the text; else None."""
  seen, todo = set(), [err]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return os.strerror(e.errno)
    text = str(e)
    for needle, cause in _DISK_FULL_TEXT.items():
      if needle in text:
        return cause
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return None


def _size(n: float) -> str:
  if n < 1024:
    return f"{n:.0f} bytes"
  for unit in ("KiB", "MiB", "GiB"):
    n /= 1024
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}"


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def disk_full_message(mngr: ocp.CheckpointManager, step: int, stage: str, code: int) -> str:
  """The one line for a save of `step` that found the disk full: which disk, how much is free, how big a checkpoint
  is, and what a rerun resumes from. The save's partial folder is removed first (one process), so the free space
  reported is what the user has to work with. `code`: errno.ENOSPC or errno.EDQUOT."""
  directory = str(mngr.directory)
  if jax.process_count() == 1:  # another host may still be writing into it
    for partial in os.listdir(directory):
      if partial.startswith(f"{step}.orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(directory, partial), ignore_errors=True)
  usage = shutil.disk_usage(directory)
  full = workdir.why_unwritable(OSError(code, os.strerror(code)))  # 'the disk is full', as the workdir check says
  report = (f"{stage + ': ' if stage else ''}{full} ({os.strerror(code)}) while saving checkpoint step {step} to "
            f"{directory}: its filesystem has {_size(usage.free)} free of {_size(usage.total)}")
  name = stage or "the stage"
  try:
    mngr.reload()
    latest = mngr.latest_step()
  except Exception:  # noqa: BLE001  (listing the steps writes nothing, but the report must not fail on it)
    return f"{report}. Free space there and rerun the same command: it resumes {name} from its newest checkpoint."
  if latest is None:
    return (f"{report}. Free space there and rerun the same command: no complete {stage + ' ' if stage else ''}"
            f"checkpoint was saved yet, so {name} starts again from step 0.")
  newest = os.path.join(directory, str(latest))
  return (f"{report}, and one checkpoint takes {_size(_folder_bytes(newest))}. Free more than that there and rerun "
          f"the same command: it resumes {name} from step {latest}, the newest complete checkpoint ({newest}).")


class _QuietWriters(logging.Filter):
  """While a save runs, hold back what orbax's writer threads report when a write fails: their ERROR records (one
  traceback each) and the unraisable 'Event loop is closed' errors of TensorStore writes that finish after orbax
  closed their event loop. On leaving they are replayed as they came, unless `settle` ran (a full disk, which the
  one-line error explains): then they go to the log as one line each (`--verbosity=0` shows it)."""

  def __init__(self):
    super().__init__()
    self._held: list[Any] = []  # LogRecords and unraisable-hook arguments, until `settle`; then their text
    self._settled = False
    self._last = time.monotonic()

  def _hold(self, item: Any) -> None:
    self._held.append(_summary(item) if self._settled else item)
    self._last = time.monotonic()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      self._hold(record)
      return False
    return True

  def _hold_unraisable(self, unraisable: Any) -> None:
    self._hold(_Unraisable(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback, unraisable.err_msg,
                           unraisable.object))

  def __enter__(self):
    self._hook = sys.unraisablehook
    sys.unraisablehook = self._hold_unraisable
    logging.getLogger("absl").addFilter(self)  # orbax logs through absl.logging
    return self

  def __exit__(self, *exc):
    logging.getLogger("absl").removeFilter(self)
    sys.unraisablehook = self._hook
    for item in self._held:
      if isinstance(item, str):
        absl_logging.info("during the failed checkpoint save: %s", item)
      elif isinstance(item, logging.LogRecord):
        logging.getLogger("absl").handle(item)
      else:
        self._hook(item)
    self._held.clear()

  def settle(self, quiet_for: float = 0.3, at_most: float = 3.0) -> None:
    """Collect the failed save's leftovers now, while held back, not at the interpreter's exit (where each pending
    writer coroutine prints a traceback: 'sys.meta_path is None'), and wait until TensorStore's last writes have
    reported (`quiet_for` seconds without news, `at_most` in all). What is held becomes text: tracebacks would keep
    the frames, and with them the event loops and tasks, alive."""
    self._settled = True
    self._held = [_summary(item) for item in self._held]
    asyncio_logger = logging.getLogger("asyncio")
    level = asyncio_logger.level
    asyncio_logger.setLevel(logging.CRITICAL)  # 'Task exception was never retrieved' of the failed writes
    try:
      start = self._last = time.monotonic()
      while True:
        gc.collect()
        now = time.monotonic()
        if now - self._last >= quiet_for or now - start >= at_most:
          return
        time.sleep(0.05)
    finally:
      asyncio_logger.setLevel(level)


class _Unraisable:
  """What `sys.unraisablehook` is called with (`sys.UnraisableHookArgs` cannot be built from Python)."""

  def __init__(self, exc_type, exc_value, exc_traceback, err_msg, object):
    self.exc_type, self.exc_value, self.exc_traceback = exc_type, exc_value, exc_traceback
    self.err_msg, self.object = err_msg, object


def _summary(item: Any) -> str:
  if isinstance(item, str):
    return item
  if isinstance(item, logging.LogRecord):
    return item.getMessage()
  where = f" in {item.object!r}" if item.object is not None else ""
  return f"{item.err_msg or 'unraisable exception'}{where}: {item.exc_type.__name__}: {item.exc_value}"
