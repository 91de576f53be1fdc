"""Preemption and kills, on a real training subprocess (tests/fault_trainer.py wraps `python -m dpo_jax.train`).

Every interrupted run is rerun with the same command and must end with the uninterrupted run's per-step
losses, bit for bit (same state, same data position), and a metrics file with each step exactly once.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices

pytestmark = pytest.mark.slow

ROOT = REPO_ROOT
STEPS = 30
ARGS = ["--config", "configs/default.py:tiny", "--config.sft.steps=0", f"--config.optim.total_steps={STEPS}",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=10", "--config.eval.every_steps=0",
        "--config.eval.num_prompts=0", "--config.progress_bar=False"]


def _env(**extra):
  # one CPU device, like a user's first run
  return without_emulated_devices(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", **extra)


def _cmd(workdir):
  return [sys.executable, os.path.join(ROOT, "tests", "fault_trainer.py"), *ARGS, "--workdir", str(workdir)]


def _run(workdir, **env):
  out = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=600)
  return out


def _dpo_losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], r["loss"]) for r in rows if r["stage"] == "dpo" and r["split"] == "train"]


def _start_and_wait_for_step(workdir, min_step, **env):
  """Start training in the background; return the process once `min_step` is in its metrics file."""
  proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"training ended before step {min_step}:\n{proc.stdout.read()[-3000:]}\n{proc.stderr.read()[-3000:]}")
    if os.path.exists(path) and any(s >= min_step for s, _ in _dpo_losses(workdir)):
      return proc
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f"no step {min_step} within 300 s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  out = _run(workdir)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  losses = _dpo_losses(workdir)
  assert [s for s, _ in losses] == list(range(1, STEPS + 1))
  return dict(losses)


def _resume_and_compare(workdir, uninterrupted, expect_resume_from):
  out = _run(workdir)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f"resuming from step {expect_resume_from}" in out.stdout, out.stdout[-3000:]
  losses = _dpo_losses(workdir)
  assert [s for s, _ in losses] == list(range(1, STEPS + 1)), "each step exactly once in metrics.jsonl"
  assert dict(losses) == uninterrupted  # bitwise: JSON keeps a float's shortest round-trip repr
  return out


def test_sigterm_saves_the_current_step_and_the_rerun_matches(tmp_path, uninterrupted):
  proc = _start_and_wait_for_step(tmp_path, 13, DPO_JAX_TEST_STEP_DELAY="0.1")
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]  # a clean exit: the scheduler sees no failure
  saved = sorted(int(d) for d in os.listdir(tmp_path / "dpo" / "checkpoints") if d.isdigit())
  assert saved[-1] >= 13 and saved[-1] % 10, saved  # the step it was at, not the last periodic checkpoint
  assert f"preempted (SIGTERM): saved step {saved[-1]}" in stdout, stdout[-3000:]
  _resume_and_compare(tmp_path, uninterrupted, saved[-1])


def test_sigkill_while_committing_a_checkpoint_resumes_from_the_previous_one(tmp_path, uninterrupted):
  out = _run(tmp_path, DPO_JAX_TEST_KILL_IN_SAVE="20")
  assert out.returncode == -signal.SIGKILL and "fault: SIGKILL while committing checkpoint 20" in out.stdout
  _resume_and_compare(tmp_path, uninterrupted, 10)


def test_sigkill_at_a_random_moment_loses_nothing(tmp_path, uninterrupted):
  proc = _start_and_wait_for_step(tmp_path, 3, DPO_JAX_TEST_STEP_DELAY="0.05")
  time.sleep(random.Random(0).uniform(0.0, 1.0))
  proc.kill()
  proc.communicate(timeout=60)
  saved = sorted(int(d) for d in os.listdir(tmp_path / "dpo" / "checkpoints") if d.isdigit()) if os.path.isdir(
      tmp_path / "dpo" / "checkpoints") else []
  out = _run(tmp_path)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  losses = _dpo_losses(tmp_path)
  assert [s for s, _ in losses] == list(range(1, STEPS + 1)), "each step exactly once in metrics.jsonl"
  assert dict(losses) == uninterrupted
  if saved:
    assert f"resuming from step {saved[-1]}" in out.stdout
