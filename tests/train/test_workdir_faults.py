"""Faults around the workdir, in process: a second run, an unwritable or full disk, a corrupted newest
checkpoint, metrics logged after the last checkpoint. (Killing a real training process: tests/train/test_preemption.py.)"""

import errno
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dpo_jax.train import checkpoint, metrics as metrics_lib, workdir as workdir_lib
from paths import REPO_ROOT

ROOT = REPO_ROOT


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
  workdir_lib.claim(str(tmp_path))
  try:
    code = f"from dpo_jax.train import workdir; workdir.claim({str(tmp_path)!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "is in use by another run" in out.stderr and f"pid {os.getpid()}" in out.stderr, out.stderr
  finally:
    workdir_lib.release(str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr  # free again once the first run let go (or died: the kernel drops flocks)


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
  code = f"import os, signal; from dpo_jax.train import workdir; workdir.claim({str(tmp_path)!r}); os.kill(os.getpid(), 9)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == -9
  workdir_lib.claim(str(tmp_path))
  workdir_lib.release(str(tmp_path))


def test_an_unwritable_workdir_fails_before_any_compute(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(OSError, match=r"--workdir .*a_file/run.* cannot be written.*Nothing was computed"):
    workdir_lib.claim(str(blocker / "run"))


def test_a_full_disk_is_named(tmp_path, monkeypatch):
  real_write = os.write

  def full(fd, data):
    if len(data) == workdir_lib.PROBE_BYTES:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(fd, data)

  monkeypatch.setattr(os, "write", full)
  with pytest.raises(OSError, match="the disk is full"):
    workdir_lib.check_writable(str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / workdir_lib.PROBE_NAME)


def _state(value):
  return {"w": jnp.full((256,), value, jnp.float32)}


def test_a_corrupted_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys):
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=3)
  checkpoint.save(mngr, 10, _state(1.0), {"data_step": 10})
  checkpoint.save(mngr, 20, _state(2.0), {"data_step": 20})
  files = [f for f in glob.glob(str(tmp_path / "ckpt" / "20" / "state" / "**"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  for f in files:  # truncate the array data of the newest step
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 3)
  abstract = {"w": jax.ShapeDtypeStruct((256,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  state, meta = checkpoint.restore_latest(checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=3), abstract)
  assert meta["data_step"] == 10 and float(state["w"][0]) == 1.0
  report = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
  assert len(report) == 1 and "checkpoint step 20" in report[0] and ".corrupt-" in report[0], report  # one line
  aside = [d for d in os.listdir(tmp_path / "ckpt") if d.startswith("20.corrupt-")]
  assert aside, os.listdir(tmp_path / "ckpt")
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), max_to_keep=3)
  assert mngr.latest_step() == 10
  checkpoint.save(mngr, 20, _state(3.0), {"data_step": 20})  # the resumed run can save step 20 again
  assert checkpoint.restore_latest(mngr, abstract)[1]["data_step"] == 20


def test_a_checkpoint_of_another_model_config_names_the_first_param_that_differs(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  checkpoint.save(mngr, 10, {"params": {"embed": jnp.zeros((8, 4)), "head": jnp.zeros((4, 8))}}, {"data_step": 10})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  wider = {"params": {"embed": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=device),
                      "head": jax.ShapeDtypeStruct((6, 8), jnp.float32, sharding=device)}}
  with pytest.raises(ValueError, match=r"checkpoint step 10 .* 'params.embed' has shape \(8, 4\) there and \(8, 6\) in "
                                       r"the config.*another\s+--workdir"):
    checkpoint.restore_latest(mngr, wider)
  assert os.listdir(tmp_path / "ckpt") == ["10"]  # a config mistake is not a corrupt checkpoint: nothing moved


def test_metrics_after_the_resume_point_are_dropped_once(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True)
  for s in (5, 10, 15):
    writer.write(s, {"loss": float(s)}, stage="sft")
  for s in (5, 10, 15, 20):
    writer.write(s, {"loss": float(s)}, stage="dpo")
  writer.write(10, {"loss": 1.0}, stage="dpo", split="test")
  with open(writer.jsonl_path, "a") as f:
    f.write('{"stage": "dpo", "split": "train", "st')  # a line cut short by SIGKILL mid-write
  assert writer.drop_after("dpo", 10) == 3  # dpo 15, dpo 20, the cut line
  rows = [json.loads(line) for line in open(writer.jsonl_path)]
  assert [(r["stage"], r["step"]) for r in rows] == [("sft", 5), ("sft", 10), ("sft", 15), ("dpo", 5), ("dpo", 10),
                                                     ("dpo", 10)]
  assert writer.drop_after("dpo", 10) == 0
  writer.close()
