"""`python -m dpo_jax.train` with faults injected from the environment, for tests/train/test_preemption.py.

    DPO_JAX_TEST_STEP_DELAY=0.05      sleep this many seconds before each batch (host side; numbers unchanged),
                                      so a test can signal the process mid-training
    DPO_JAX_TEST_KILL_IN_SAVE=20      SIGKILL this process inside orbax's commit of step 20's checkpoint: its
                                      files are written to the temporary folder, the rename never happens
"""

import os
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


if __name__ == "__main__":
  _install_faults()
  from dpo_jax.train import __main__ as train_main
  train_main.main(sys.argv)
