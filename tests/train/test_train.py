"""The trainer end to end on the embedded task (tiny model): SFT, DPO, resume, and clear config errors."""

import json
import math
import os
import re

import numpy as np
import pytest

from configs.default import get_config
from dpo_jax import step
from dpo_jax.train import pipeline as trainer
from dpo_jax.train import metrics
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices
from trainer_runs import read_metrics, tiny


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  config = tiny(**{"sft.steps": 40, "optim.total_steps": 40, "sft.learning_rate": 3e-3, "optim.learning_rate": 2e-3})
  return workdir, trainer.run(config, workdir)


@pytest.mark.slow
def test_sft_lowers_held_out_nll(pipeline):
  _, summary = pipeline
  assert summary["pi_ref"]["nll"] < summary["init"]["nll"] - 0.5, summary


def test_dpo_raises_held_out_preference_accuracy(pipeline):
  workdir, summary = pipeline
  theta = summary["pi_theta"]
  # at step 0 policy == reference: every implicit reward is 0, no pair is ranked right, the loss is log 2
  assert theta["accuracy"] > 0.55 and theta["margin"] > 0 and theta["dpo_loss"] < math.log(2.0), theta
  assert summary["pi_ref"]["dpo_loss"] == pytest.approx(math.log(2.0))
  logged = read_metrics(workdir, "dpo")
  assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30, 35, 40]
  assert all(np.isfinite(r["loss"]) for r in logged)
  for stage in ("sft", "dpo"):  # throughput and MFU (dpo_jax/flops.py) on every log line; on CPU a measured peak
    for key in ("perf/mfu", "perf/step_time", "perf/tokens_per_sec"):
      values = [r.get(key, math.nan) for r in read_metrics(workdir, stage)]
      assert all(np.isfinite(v) and v > 0 for v in values), (stage, key, values)
  assert all(0 < r["perf/mfu"] < 1 for r in logged), [r["perf/mfu"] for r in logged]
  assert os.path.isdir(os.path.join(workdir, "tensorboard"))
  assert json.load(open(os.path.join(workdir, "summary.json")))["pi_theta"]["accuracy"] == theta["accuracy"]


def test_rerun_of_a_finished_run_does_not_retrain(pipeline, capsys):
  workdir, summary = pipeline
  config = tiny(**{"sft.steps": 40, "optim.total_steps": 40, "sft.learning_rate": 3e-3, "optim.learning_rate": 2e-3})
  again = trainer.run(config, workdir)
  out = capsys.readouterr().out
  assert "resuming from step 40" in out
  assert again["pi_theta"]["accuracy"] == summary["pi_theta"]["accuracy"]


@pytest.mark.slow
def test_resuming_with_changed_math_is_refused_unless_asked(pipeline, tmp_path, capsys):
  """A stage resumed under another beta would mix two runs: refused, listing old and new values; logging and eval
  fields are free; config.resume_with_changes=True resumes and says what changed."""
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(pipeline[0], workdir)
  same = {"sft.steps": 40, "optim.total_steps": 40, "sft.learning_rate": 3e-3, "optim.learning_rate": 2e-3}
  with pytest.raises(ValueError, match=r"dpo checkpoint in .* other values .*loss\.beta: 0\.1 -> 0\.5.*"
                                       r"new --workdir.*resume_with_changes=True"):
    trainer.run(tiny(**same, **{"loss.beta": 0.5}), workdir)
  trainer.run(tiny(**same, **{"log_every_steps": 2, "eval.batch_size": 16, "checkpoint_every_steps": 7}), workdir)
  capsys.readouterr()
  trainer.run(tiny(**same, **{"loss.beta": 0.5, "resume_with_changes": True}), workdir)
  assert "WARNING: resuming dpo" in capsys.readouterr().out


@pytest.mark.slow
def test_stage_sft_alone_then_dpo_alone(tmp_path):
  workdir = str(tmp_path)
  sft = trainer.run(tiny(stage="sft", **{"sft.steps": 10}), workdir)
  assert "pi_theta" not in sft and sft["pi_ref"]["nll"] < sft["init"]["nll"]
  dpo = trainer.run(tiny(stage="dpo", **{"sft.steps": 10, "optim.total_steps": 5}), workdir)
  assert dpo["pi_ref"]["nll"] == pytest.approx(sft["pi_ref"]["nll"], rel=1e-6)  # the same reference, reloaded
  with pytest.raises(FileNotFoundError, match="needs a starting point: the SFT result"):
    trainer.run(tiny(stage="dpo"), str(tmp_path / "empty"))


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.mark.parametrize("overrides,error,match", [
    ({"batch_size": 12}, ValueError, r"config.batch_size=12 is not divisible by the data-parallel size 8"),
    ({"loss.type": "dpo++"}, ValueError, r"config.loss.type='dpo\+\+' is unknown"),
    ({"max_prompt_length": 32}, ValueError, r"max_prompt_length"),
    ({"stage": "rl"}, ValueError, r"config.stage='rl'"),
    ({"data.train": "/nonexistent/pairs.jsonl"}, FileNotFoundError, r"/nonexistent/pairs.jsonl"),
    ({"model.vocab_size": 100}, ValueError, r"fewer than the tokenizer's 201 tokens \(config.model.vocab_size=100; set --config.model.vocab_size=201"),
])
def test_config_errors_name_the_field_before_compiling(tmp_path, monkeypatch, overrides, error, match):
  compiled = []
  monkeypatch.setattr(step, "jit_train_step", lambda *a, **k: compiled.append(1))
  with pytest.raises(error, match=match):
    trainer.run(tiny(**overrides), str(tmp_path))
  assert not compiled


def test_missing_column_is_a_clear_error(tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "review of the film :", "chosen": "good"}] * 4)
  with pytest.raises(ValueError, match="rejected"):
    trainer.run(tiny(**{"data.train": path, "data.test": path}), str(tmp_path / "wd"))


@pytest.mark.slow
def test_empty_responses_are_dropped_and_counted(tmp_path, capsys):
  rows = [{"prompt": "review of the film :", "chosen": "it was good .", "rejected": "it was bad ."}] * 16
  rows[3] = dict(rows[3], rejected="")
  path = write_jsonl(tmp_path / "pairs.jsonl", rows)
  summary = trainer.run(tiny(**{"data.train": path, "data.test": path, "sft.steps": 2, "optim.total_steps": 2,
                              "eval.batch_size": 8}), str(tmp_path / "wd"))
  assert summary["data"]["train"]["num_dropped_empty_response"] == 1
  assert "15 pairs of 16 rows (1 dropped: empty response)" in capsys.readouterr().out


def test_a_nan_loss_stops_with_the_step_and_row_ids(tmp_path, monkeypatch):
  real_jit = step.jit_train_step

  def nan_at_step_3(*args, **kwargs):
    jitted = real_jit(*args, **kwargs)
    calls = {"n": 0}

    def wrapped(*a):
      state, metrics = jitted(*a)
      calls["n"] += 1
      if calls["n"] == 4:
        metrics = dict(metrics, loss=float("nan"))
      return state, metrics
    return wrapped

  monkeypatch.setattr(step, "jit_train_step", nan_at_step_3)
  with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 on batch rows \[\d+(, \d+)*\]"):
    trainer.run(tiny(**{"sft.steps": 0, "optim.total_steps": 10}), str(tmp_path))


@pytest.mark.slow
def test_the_command_line_runs_the_pipeline_with_sampling(tmp_path):
  """`python -m dpo_jax.train` as a user runs it (one device, config flags), sampling included."""
  import subprocess
  import sys
  env = without_emulated_devices()
  cmd = [sys.executable, "-m", "dpo_jax.train", "--config", "configs/default.py:tiny", "--workdir", str(tmp_path),
         "--config.progress_bar=False", "--config.eval.num_prompts=16", "--config.loss.beta=0.2",
         "--config.sft.steps=6", "--config.optim.total_steps=6", "--config.eval.every_steps=0"]
  root = REPO_ROOT
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "held-out evaluation" in out.stdout and "pi_theta" in out.stdout
  # a clean console: no absl / orbax / jax record lines unless --verbosity asks for them (issue 18)
  records = lambda text: [line for line in text.splitlines() if re.match(metrics.ABSL_RECORD, line)]
  assert not records(out.stdout + out.stderr), records(out.stdout + out.stderr)[:5]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["config"]["loss"]["beta"] == 0.2
  assert summary["pi_ref"]["kl"] == pytest.approx(0.0, abs=1e-5)  # pi_ref scored against itself
  assert np.isfinite(summary["pi_theta"]["reward"]) and summary["pi_theta"]["num_samples"] == 16
  bad = subprocess.run(cmd + ["--config.loss.bta=0.1"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "bta" in bad.stderr  # a misspelled field is refused (locked config)
  verbose = subprocess.run(cmd[:6] + [str(tmp_path / "verbose"), "--verbosity=0"] + cmd[7:], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)  # --verbosity=0: the library INFO records
  assert verbose.returncode == 0 and any("checkpoint" in line for line in records(verbose.stderr)), verbose.stderr[-2000:]


def test_every_config_field_is_documented():
  import importlib.util
  root = REPO_ROOT
  spec = importlib.util.spec_from_file_location("config_table", os.path.join(root, "scripts", "config_table.py"))
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  documented = {name for name, _, _ in table.rows()}

  def fields(d, prefix=""):
    for k, v in d.items():
      if hasattr(v, "items"):
        yield from fields(v, prefix + k + ".")
      else:
        yield prefix + k

  missing = [f for f in fields(get_config()) if f not in documented]
  assert not missing, f"fields without a '# comment' next to their default in configs/default.py: {missing}"
  spec = importlib.util.spec_from_file_location("frontier_config", os.path.join(root, "configs", "frontier.py"))
  frontier_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(frontier_config)
  frontier_documented = {name for name, _, _ in table.rows(table.FRONTIER_SOURCE.read_text())}
  missing = [f for f in fields(frontier_config.get_config()) if f.startswith(("frontier.", "rl."))
             and f not in frontier_documented]
  assert not missing, f"fields without a '# comment' next to their default in configs/frontier.py: {missing}"


@pytest.mark.slow
def test_precomputed_reference_logps_train_like_the_reference_model(tmp_path, monkeypatch):
  import shutil
  with_model = str(tmp_path / "model_ref")
  trainer.run(tiny(stage="sft", **{"sft.steps": 10}), with_model)
  precomputed = str(tmp_path / "precomputed")
  shutil.copytree(with_model, precomputed)

  summary = trainer.run(tiny(stage="precompute", **{"sft.steps": 10}), precomputed)
  files = summary["files"]
  rows = [json.loads(line) for line in open(files["train"])]
  assert len(rows) == 4000 and all(np.isfinite(r["ref_chosen_logps"]) and r["ref_chosen_logps"] < 0 for r in rows)

  seen_references = []
  real_jit = step.jit_train_step

  def spy(*args, **kwargs):
    jitted = real_jit(*args, **kwargs)
    def wrapped(state, reference, batch):
      seen_references.append(reference)
      return jitted(state, reference, batch)
    return wrapped

  dpo = {"sft.steps": 10, "optim.total_steps": 10, "log_every_steps": 1}
  trainer.run(tiny(stage="dpo", **dpo), with_model)
  monkeypatch.setattr(step, "jit_train_step", spy)
  trainer.run(tiny(stage="dpo", **dpo, **{"data.reference_logps": True, "data.train": files["train"],
                                         "data.test": files["test"]}), precomputed)
  assert len(seen_references) == 10 and all(r is None for r in seen_references)  # no reference params in training
  a, b = read_metrics(with_model, "dpo"), read_metrics(precomputed, "dpo")
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
  for x, y in zip(a, b):
    assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
    assert y["rewards/margins"] == pytest.approx(x["rewards/margins"], rel=1e-4, abs=1e-5)


def test_precomputed_reference_logps_must_be_finite(tmp_path):
  rows = [{"prompt": "review of the film :", "chosen": "it was good .", "rejected": "it was bad .",
           "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0}] * 16
  rows[5] = dict(rows[5], ref_rejected_logps=float("nan"))
  path = write_jsonl(tmp_path / "pairs.jsonl", rows)
  with pytest.raises(ValueError, match=r"row 5, field 'ref_rejected_logps': expected a finite number"):
    trainer.run(tiny(stage="dpo", **{"data.reference_logps": True, "data.train": path, "data.test": path}),
              str(tmp_path / "wd"))
  with pytest.raises(ValueError, match="reference_logps=True needs config.stage='dpo'"):
    trainer.run(tiny(**{"data.reference_logps": True}), str(tmp_path / "wd2"))


@pytest.mark.slow
def test_a_reference_free_loss_trains_with_no_reference_held(tmp_path, monkeypatch):
  seen, real_jit = [], step.jit_train_step

  def recording(*args, **kwargs):
    assert kwargs["reference_shardings"] is None  # the step is compiled without a reference argument
    jitted = real_jit(*args, **kwargs)

    def call(state, reference, batch):
      seen.append(reference)
      return jitted(state, reference, batch)
    return call

  monkeypatch.setattr(step, "jit_train_step", recording)
  config = tiny(**{"sft.steps": 10, "optim.total_steps": 10, "loss.type": "simpo", "eval.every_steps": 0})
  summary = trainer.run(config, str(tmp_path))
  assert len(seen) == 10 and all(r is None for r in seen)
  logged = read_metrics(str(tmp_path), "dpo")
  assert logged[-1]["loss"] < logged[0]["loss"]
  # pi_ref (the SFT result) is reloaded after training for the evaluation only
  assert np.isfinite(summary["pi_ref"]["nll"]) and "dpo_loss" not in summary["pi_ref"]
