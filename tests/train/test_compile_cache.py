"""The trainer's persistent compilation cache (config.perf.compile_cache) and its start-up timing lines."""

import os
import re

import pytest

from dpo_jax.train import compile_cache, pipeline as trainer, startup
from trainer_runs import tiny


@pytest.fixture
def restore_cache():
  yield
  compile_cache.enable("auto")  # back to the session's shared folder (tests/conftest.py) for later tests


def test_the_setting_names_the_folder(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert compile_cache.resolve("auto") == str(tmp_path / "env")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve("auto") == str(tmp_path / "xdg" / "dpo_jax" / "xla")
  assert compile_cache.resolve("") == ""
  assert compile_cache.resolve("~/jit") == os.path.expanduser("~/jit")


@pytest.mark.slow
def test_a_rerun_reads_its_steps_from_the_cache_and_says_so(tmp_path, capsys, restore_cache):
  """Two runs of the same config with a fresh cache folder: the first compiles and writes the SFT and DPO steps, the
  second reads both and compiles neither; each run prints one line per start-up phase."""
  folder = str(tmp_path / "xla")
  config = tiny(**{"sft.steps": 2, "optim.total_steps": 2, "perf.compile_cache": folder})
  lines = {}
  for run in ("cold", "warm"):
    trainer.run(config, str(tmp_path / run))
    out = capsys.readouterr().out
    lines[run] = [line for line in out.splitlines() if "start-up:" in line]
  for run, found in lines.items():
    assert [re.sub(r"[\d.]+ s.*", "", line) for line in found] == [
        "start-up: load ", "start-up: tokenize ", "start-up: evaluate ", "sft start-up: compile ",
        "sft start-up: first step ",
        "dpo start-up: compile ", "dpo start-up: first step "], (run, found)
    assert "from the command to the end of the first dpo step" in found[-1]
  compiles = {run: [line for line in found if "compile" in line] for run, found in lines.items()}
  assert all(f"0 read, 1 compiled and written; {folder}" in line for line in compiles["cold"]), compiles
  assert all(f"1 read, 0 compiled and written; {folder}" in line for line in compiles["warm"]), compiles
  assert any(name.startswith("jit_train_step") for name in os.listdir(folder))


def test_the_cache_can_be_turned_off(tmp_path, capsys, restore_cache):
  trainer.run(tiny(**{"stage": "sft", "sft.steps": 1, "perf.compile_cache": ""}), str(tmp_path))
  assert "sft start-up: compile" in capsys.readouterr().out
  assert compile_cache.folder() == ""


def test_phases_add_up_and_are_named():
  startup.reset()
  with startup.phase("load"):
    pass
  with startup.phase("load"):
    pass
  with pytest.raises(ValueError, match="unknown start-up phase 'compile'"):
    with startup.phase("compile"):
      pass
  lines = startup.first_step_lines("dpo", 1.5, 0.25, hits=0, misses=1, cache_dir="")
  assert lines[0].startswith("start-up: load 0.00 s") and "persistent cache off" in lines[3]
  assert "s in none of these: imports" in lines[4]
  assert startup.first_step_lines("dpo", 1.5, 0.25, 0, 1, "")[0].startswith("dpo start-up: compile 1.50 s")
  assert 0 < startup.seconds_since_start() < 24 * 3600
