"""The trainer with a 'sequence' mesh axis (context parallelism) on 8 emulated devices: the same steps as without
it, checkpoints that restore under another sequence degree, and bad configs refused before compiling."""

import os
import shutil

import jax
import numpy as np
import pytest

from dpo_jax import sharding, step
from dpo_jax.train import pipeline
from test_multihost import read_checkpoint
from trainer_runs import read_metrics, tiny

STEPS = 10
# DPO from the random init (no SFT) at full learning rate from step 1, metrics and a checkpoint every 5 steps.
BASE = {"sft.steps": 0, "optim.total_steps": STEPS, "optim.warmup_steps": 0, "log_every_steps": 1,
        "eval.every_steps": 0, "checkpoint_every_steps": 5, "max_checkpoints": 3}


def losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir, "dpo")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Ten DPO steps with sequence=1 (8-way data parallel) and with sequence=4 x data=2."""
  root = tmp_path_factory.mktemp("cp")
  out = {}
  for name, mesh in (("seq1", {}), ("seq4", {"mesh.data": 2, "mesh.sequence": 4})):
    out[name] = str(root / name)
    pipeline.run(tiny(**BASE, **mesh), out[name])
  return out


@pytest.mark.slow
def test_ten_steps_with_sequence_4_match_sequence_1(runs):
  one, four = losses(runs["seq1"]), losses(runs["seq4"])
  assert [s for s, _ in one] == [s for s, _ in four] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l in four], [l for _, l in one], rtol=1e-5,
                             err_msg=f"per-step DPO losses (step, loss): seq1 {one} seq4 {four}")
  assert one[-1][1] != one[0][1], "DPO never moved, so the comparison proves little"
  a, b = read_checkpoint(runs["seq1"], "dpo"), read_checkpoint(runs["seq4"], "dpo")
  diffs = [float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]))]
  assert max(diffs) < 1e-4, f"params after {STEPS} steps differ by {max(diffs)}"  # Adam: see test_multihost
  print("context parallel: losses (step, seq1, seq4)", [(s, round(x, 7), round(y, 7)) for (s, x), (_, y)
                                                           in zip(one, four)], f"max |params diff| {max(diffs):.3g}")


@pytest.mark.slow
def test_a_checkpoint_restores_under_another_sequence_degree(runs, tmp_path):
  """The sequence=4 run's step-5 checkpoint, resumed with sequence=2 x data=4, ends like the sequence=4 run."""
  workdir = str(tmp_path / "resumed")
  shutil.copytree(runs["seq4"], workdir)
  checkpoints = os.path.join(workdir, "dpo", "checkpoints")
  for d in os.listdir(checkpoints):
    if d.isdigit() and int(d) > 5:
      shutil.rmtree(os.path.join(checkpoints, d))
  pipeline.run(tiny(**BASE, **{"mesh.data": 4, "mesh.sequence": 2}), workdir)
  resumed, four = losses(workdir), losses(runs["seq4"])
  assert [s for s, _ in resumed] == list(range(1, STEPS + 1)), resumed  # steps 6-10 rerun once each
  np.testing.assert_allclose([l for _, l in resumed], [l for _, l in four], rtol=1e-5)


@pytest.mark.parametrize("overrides, match", [
    ({"mesh.sequence": 4, "model.attention_impl": "cpu_blocked", "model.context_parallel": "all_gather"},
     r"config.model.attention_impl='cpu_blocked' with mesh.sequence=4 .* Set --config.model.attention_impl"),
    ({"mesh.sequence": 4, "model.attention_impl": "splash", "model.context_parallel": "all_gather",
      "model.context_load_balance": "striped"}, r"'striped': .* Set --config.model.context_load_balance=zigzag"),
    ({"mesh.sequence": 2, "model.attention_impl": "cudnn"}, r"ring computes its own .*context_parallel=all_gather"),
    ({"mesh.sequence": 2, "model.context_parallel": "ulysses"}, r"config.model.context_parallel='ulysses'"),
    ({"mesh.sequence": 2, "model.context_load_balance": "random"}, r"config.model.context_load_balance='random'"),
    ({"mesh.sequence": 2, "sharding.rules": (("length", None),) + sharding.DEFAULT_RULES},
     r"config.mesh.sequence=2 but config.sharding.rules map .*'length'"),
    ({"mesh.sequence": 3}, r"mesh: .* needs 3 devices|cannot be split"),
])
def test_context_parallel_configs_that_cannot_work_are_refused_before_compiling(tmp_path, monkeypatch, overrides,
                                                                                 match):
  compiled = []
  monkeypatch.setattr(step, "jit_train_step", lambda *a, **k: compiled.append(1))
  with pytest.raises(ValueError, match=match):
    pipeline.run(tiny(**BASE, **overrides), str(tmp_path))
  assert not compiled
