"""Errors raised on purpose reach a command-line user as one line and exit code 2; anything else keeps its
traceback (dpo_jax/train/errors.py)."""

import json
import subprocess
import sys

import jax.numpy as jnp
import pytest

from configs.default import get_config
from dpo_jax import sharding
from dpo_jax.train import config_checks
from dpo_jax.train import errors, workdir
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices

ROOT = REPO_ROOT


def caught(fn, *args):
  try:
    fn(*args)
  except Exception as err:  # noqa: BLE001
    return err
  raise AssertionError("no error")


def test_our_raise_statements_are_on_purpose_and_nothing_else_is():
  config = get_config("tiny")
  config.loss.beta = -1.0
  assert errors.raised_on_purpose(caught(config_checks.validate_config, config, 1))  # a config check
  assert not errors.raised_on_purpose(caught(lambda: jnp.ones(2) + jnp.ones(3)))  # inside jax
  assert not errors.raised_on_purpose(caught(sharding.resolve_mesh_shape, {"data": "x"}, 8))  # int('x'): a bug


@pytest.mark.slow
def test_each_kind_of_user_error_is_one_line_and_exit_code_2(tmp_path):
  bad_rows = tmp_path / "bad.jsonl"
  bad_rows.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                      + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
  busy = tmp_path / "busy"
  base = [sys.executable, "-m", "dpo_jax.train", "--config", "configs/default.py:tiny", "--config.progress_bar=False"]
  cases = {  # kind: (extra flags, what the line names)
      "bad data row": ([f"--config.data.train={bad_rows}", f"--workdir={tmp_path / 'a'}"], "row 1"),
      "config out of range": (["--config.loss.beta=-1", f"--workdir={tmp_path / 'b'}"], "config.loss.beta"),
      "missing path": (["--config.hf.model_path=/nonexistent/model", f"--workdir={tmp_path / 'c'}"],
                       "config.hf.model_path"),
      "workdir in use": ([f"--workdir={busy}"], "in use"),
  }
  env = without_emulated_devices()
  with workdir.held(str(busy)):  # another run holds this workdir
    procs = {kind: subprocess.Popen(base + flags, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for kind, (flags, _) in cases.items()}
    outs = {kind: p.communicate(timeout=300) + (p.returncode,) for kind, p in procs.items()}
  for kind, (stdout, stderr, code) in outs.items():
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == errors.EXIT_CODE and "Traceback" not in stderr, (kind, stderr[-2000:])
    assert lines[-1].startswith("error: ") and cases[kind][1] in lines[-1], (kind, lines[-3:])


# A SIGTERM preemption (loop.Preempted, raised on purpose in train_loop) is passed through to the trainer's own
# handler and exits 0: tests/train/test_preemption.py runs it.


def test_the_traceback_is_there_when_asked(monkeypatch):
  monkeypatch.setenv("DPO_JAX_TRACEBACK", "1")
  config = get_config("tiny")
  config.loss.beta = -1.0
  with pytest.raises(ValueError, match="config.loss.beta"):
    errors.exit_on_purpose_errors(config_checks.validate_config, config, 1)
