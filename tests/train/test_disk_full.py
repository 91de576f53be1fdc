"""The disk filling up while a checkpoint is saved: one line on stderr (the stage, the step being saved, the full
disk, the newest complete checkpoint a rerun resumes from), exit code 2, and none of the tracebacks orbax's writer
threads and closed event loops print otherwise; freeing the space and rerunning the same command finishes the stage.

The real thing runs on a tmpfs this test mounts (we run as root in a container), which tests/fault_trainer.py fills
right before the save. Where mount is not permitted that test is skipped; the simulated one (orbax's commit raising
ENOSPC) covers the same path everywhere.
"""

import errno
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from dpo_jax.train import checkpoint, errors
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices

ROOT = REPO_ROOT
ARGS = ["--config", "configs/default.py:tiny", "--config.stage=sft", "--config.sft.steps=4",
        "--config.checkpoint_every_steps=2", "--config.eval.every_steps=0", "--config.eval.num_prompts=0",
        "--config.progress_bar=False"]


def _run(workdir, **faults):
  # one CPU device, like a user's first run
  env = without_emulated_devices(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", **faults)
  return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fault_trainer.py"), *ARGS, "--workdir",
                         str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _assert_one_line_naming_the_resume_point(out, workdir):
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == errors.EXIT_CODE, out.stdout[-2000:] + out.stderr[-4000:]
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-4000:]
  line, directory = lines[0], os.path.join(str(workdir), "sft", "checkpoints")
  for part in ("error: sft: the disk is full (No space left on device)", f"saving checkpoint step 4 to {directory}",
               "free of", f"it resumes sft from step 2, the newest complete checkpoint ({directory}/2)"):
    assert part in line, (part, line)
  return line


def _assert_rerun_finishes(workdir):
  out = _run(workdir)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert "sft: resuming from step 2" in out.stdout, out.stdout[-2000:]
  assert sorted(os.listdir(os.path.join(workdir, "sft", "checkpoints"))) == ["2", "4"]


@pytest.fixture
def small_disk(tmp_path):
  """An 8 MiB tmpfs mounted at tmp_path/disk for this test; skipped where mount is not permitted."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                         text=True)
  if mount.returncode != 0:
    pytest.skip(f"mount -t tmpfs is not permitted here ({mount.stderr.strip() or mount.returncode}); the simulated "
                f"full disk (test_a_simulated_full_disk_...) covers the same path")
  try:
    yield disk
  finally:
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_save_is_one_line_and_a_rerun_after_freeing_it_resumes(small_disk):
  workdir, ballast = small_disk / "run", small_disk / "ballast"
  out = _run(workdir, DPO_JAX_TEST_FILL_DISK_AT_SAVE=f"4:{ballast}")
  line = _assert_one_line_naming_the_resume_point(out, workdir)
  assert "fault: filled the filesystem" in out.stdout and "8.0 MiB" in line, line
  assert os.listdir(os.path.join(workdir, "sft", "checkpoints")) == ["2"], "the partial step 4 is removed"
  ballast.unlink()  # the user frees space
  _assert_rerun_finishes(workdir)


@pytest.mark.slow
def test_a_simulated_full_disk_during_a_save_is_one_line_and_a_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  _assert_one_line_naming_the_resume_point(_run(workdir, DPO_JAX_TEST_ENOSPC_IN_SAVE="4"), workdir)
  _assert_rerun_finishes(workdir)


def test_a_full_disk_is_found_as_an_errno_or_in_the_text_anywhere_in_the_chain():
  tensorstore = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/4.orbax-checkpoint-tmp/_sharding\": "
                           "Failed to write 6668 bytes to file 15: No space left on device [os_error_code='28']")
  assert checkpoint.disk_full_cause(tensorstore) == "No space left on device"
  try:
    try:
      raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    except OSError as inner:
      raise RuntimeError("commit failed") from inner
  except RuntimeError as wrapped:
    assert checkpoint.disk_full_cause(wrapped) == "Disk quota exceeded"
  group = RuntimeError("2 writers failed")
  group.exceptions = (KeyError("x"), OSError(errno.ENOSPC, "x"))  # as an ExceptionGroup (3.11+) holds them
  assert checkpoint.disk_full_cause(group) == "No space left on device"
  assert checkpoint.disk_full_cause(OSError(errno.EACCES, "Permission denied")) is None


def test_a_full_disk_at_the_first_save_says_the_stage_starts_again(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  real = atomicity.AtomicRenameTemporaryPath.finalize
  full = {"on": True}

  async def finalize(self, *args, **kwargs):
    if full["on"]:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get_final()))
    return await real(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  directory = tmp_path / "ckpt"
  mngr = checkpoint.manager(str(directory))
  state = {"w": jnp.ones((64,), jnp.float32)}
  with pytest.raises(checkpoint.DiskFull) as info:
    checkpoint.save(mngr, 10, state, {"stage": "dpo", "data_step": 10})
  message = str(info.value)
  assert errors.raised_on_purpose(info.value) and info.value.errno == errno.ENOSPC
  assert message.startswith(f"dpo: the disk is full (No space left on device) while saving checkpoint step 10 to "
                            f"{directory}: its filesystem has "), message
  assert "no complete dpo checkpoint was saved yet, so dpo starts again from step 0" in message, message
  assert os.listdir(directory) == [], "the partial step is removed"
  full["on"] = False  # space freed: the same manager saves again
  checkpoint.save(mngr, 10, state, {"stage": "dpo", "data_step": 10})
  assert mngr.latest_step() == 10
