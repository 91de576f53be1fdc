"""`python -m dpo_jax.train` with faults injected from the environment, for tests/train/test_preemption.py.

    DPO_JAX_TEST_STEP_DELAY=0.05      sleep this many seconds before each batch (host side; numbers unchanged),
                                      so a test can signal the process mid-training
    DPO_JAX_TEST_KILL_IN_SAVE=20      SIGKILL this process inside orbax's commit of step 20's checkpoint: its
                                      files are written to the temporary folder, the rename never happens
    DPO_JAX_TEST_FILL_DISK_AT_SAVE=6:/mnt/small/ballast
                                      just before step 6's checkpoint is saved, write the file /mnt/small/ballast
                                      until its filesystem is full (refused on one bigger than 64 MiB: a tmpfs
                                      the test mounted, never a real disk); deleting the file frees the space
    DPO_JAX_TEST_KILL_AT_ONLINE_STEP=5
                                      SIGKILL this process once online DPO has run its step 5 (and saved that
                                      step's checkpoint, if one is due)
    DPO_JAX_TEST_ENOSPC_IN_SAVE=6     orbax's commit of step 6's checkpoint fails with OSError ENOSPC ("No space
                                      left on device"): a full disk where no small filesystem can be mounted
"""

import errno
import os
import shutil
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _install_faults():
  delay = float(os.environ.get("DPO_JAX_TEST_STEP_DELAY", "0"))
  if delay:
    from dpo_jax.data import preference

    real = preference.iterate_batches

    def slow(*args, **kwargs):
      for item in real(*args, **kwargs):
        time.sleep(delay)
        yield item
    preference.iterate_batches = slow

  kill_step = os.environ.get("DPO_JAX_TEST_KILL_IN_SAVE")
  if kill_step:
    from orbax.checkpoint._src.path import atomicity

    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
      if os.path.basename(str(self.get_final())) == kill_step:
        print(f"fault: SIGKILL while committing checkpoint {kill_step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return await real_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize

  fill = os.environ.get("DPO_JAX_TEST_FILL_DISK_AT_SAVE")
  if fill:
    fill_step, ballast = fill.split(":", 1)
    from dpo_jax.train import checkpoint

    real_save = checkpoint.save

    def save_on_a_full_disk(mngr, step, *args, **kwargs):
      if step == int(fill_step):
        fill_filesystem(ballast)
      return real_save(mngr, step, *args, **kwargs)
    checkpoint.save = save_on_a_full_disk

  online_kill = os.environ.get("DPO_JAX_TEST_KILL_AT_ONLINE_STEP")
  if online_kill:
    from dpo_jax.train import loop

    real_requested = loop.preemption_requested

    def kill_at(step_num):
      if step_num == int(online_kill):
        print(f"fault: SIGKILL after online DPO step {online_kill}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return real_requested(step_num)
    loop.preemption_requested = kill_at

  enospc_step = os.environ.get("DPO_JAX_TEST_ENOSPC_IN_SAVE")
  if enospc_step:
    from orbax.checkpoint._src.path import atomicity

    real_commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def full_disk(self, *args, **kwargs):
      if os.path.basename(str(self.get_final())) == enospc_step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get_final()))
      return await real_commit(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = full_disk


def fill_filesystem(ballast: str, limit: int = 64 << 20) -> None:
  """Write `ballast` until its filesystem has no space left (on a small one only: `limit` bytes at most)."""
  total = shutil.disk_usage(os.path.dirname(ballast)).total
  if total > limit:
    raise RuntimeError(f"fault_trainer: refusing to fill {ballast}'s filesystem of {total} bytes (> {limit})")
  chunk = b"\0" * 4096
  with open(ballast, "ab", buffering=0) as f:
    try:
      while True:
        f.write(chunk)
    except OSError as err:
      if err.errno != errno.ENOSPC:
        raise
  print(f"fault: filled the filesystem of {ballast}", flush=True)


if __name__ == "__main__":
  _install_faults()
  from dpo_jax.train import __main__ as train_main
  train_main.main(sys.argv)
