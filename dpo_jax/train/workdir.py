"""The workdir before any compute: writable, not full, and owned by exactly one run.

`claim(workdir)` makes the folder, proves it takes a write (a probe file, fsynced, then removed: a
read-only mount, a permission problem or a full disk fails here, not at the first checkpoint an hour
later), and takes an exclusive `flock` on `<workdir>/.lock`. The kernel drops the lock when the process
ends however it ends (SIGKILL included), so there is no stale lock to clean up after a crash; a second run
on the same workdir while the first is alive is refused with the first one's pid and host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"
PROBE_NAME = ".write_probe"
PROBE_BYTES = 1 << 20  # a checkpoint's smallest file is bigger; a disk without 1 MiB free is full for us

_HELD: dict[str, int] = {}  # workdir -> lock fd, kept open for the life of the process


def why_unwritable(err: OSError) -> str:
  """What an OSError of a write says to the user: 'the disk is full', 'permission denied', ..."""
  if err.errno == errno.ENOSPC:
    return "the disk is full"
  if err.errno == errno.EDQUOT:
    return "the disk quota is exhausted"
  if err.errno == errno.EROFS:
    return "the file system is read-only"
  if err.errno in (errno.EACCES, errno.EPERM):
    return "permission denied"
  return err.strerror or type(err).__name__


def check_writable(workdir: str) -> None:
  """Raise OSError naming the workdir and the cause unless `workdir` can be created and written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, PROBE_NAME)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      os.write(fd, b"\0" * PROBE_BYTES)
      os.fsync(fd)
    finally:
      os.close(fd)
      if os.path.exists(probe):
        os.remove(probe)
  except OSError as err:
    raise OSError(err.errno, f"--workdir {workdir!r} cannot be written: {why_unwritable(err)} ({err}). Checkpoints and "
                             f"metrics go there; free space, fix its permissions or pass another --workdir. Nothing "
                             f"was computed.") from err


def claim(workdir: str) -> None:
  """Check `workdir` is writable and take its lock for this process (idempotent within a process).

  Raises RuntimeError naming the other run's pid and host if another live process holds the lock.
  """
  workdir = os.path.abspath(workdir)
  if workdir in _HELD:
    return
  check_writable(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd)
    os.close(fd)
    raise RuntimeError(
        f"--workdir {workdir!r} is in use by another run (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, started {holder.get('started', '?')}). Two runs on one workdir would overwrite "
        f"each other's checkpoints and metrics: wait for it to finish, stop it, or pass another --workdir.") from None
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
  os.fsync(fd)
  _HELD[workdir] = fd


def release(workdir: str) -> None:
  """Drop this process's lock on `workdir` (the kernel also drops it when the process exits)."""
  fd = _HELD.pop(os.path.abspath(workdir), None)
  if fd is not None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def held(workdir: str, claimant: bool = True):
  """`claim(workdir)` if `claimant` (process 0 of a multi-host job), and `release` on the way out, whatever
  happens inside."""
  if claimant:
    claim(workdir)
  try:
    yield
  finally:
    release(workdir)


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (OSError, ValueError):
    return {}
