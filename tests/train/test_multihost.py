"""Multi-host, proven by emulation: 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo
collectives, each host feeding its slice of every global batch) train exactly like 1 process x 8 devices.

The 2 x 4 run goes through launch/local_multiprocess.sh, so the script the README documents is the one
tested; the 1 x 8 run is `pipeline.run` in this (8-device) pytest process, with no jax.distributed at all.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.default import get_config
from dpo_jax.train import pipeline
from dpo_jax.train import distributed
from config_overrides import override
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices

REPO = REPO_ROOT
STEPS = 3
# A few steps of each stage at full learning rate from step 1 (no warmup, so DPO moves off log 2 at step 2),
# metrics at every step, and the sampled evaluation kept (2 prompts) so that path runs multi-process too.
OVERRIDES = {"sft.steps": STEPS, "sft.warmup_steps": 0, "optim.total_steps": STEPS, "optim.warmup_steps": 0,
             "log_every_steps": 1, "eval.every_steps": 0, "eval.num_prompts": 2, "eval.max_new_tokens": 4,
             "progress_bar": False}


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def read_checkpoint(workdir, stage):
  """The newest checkpoint's train state of `stage`, every leaf a host numpy array (no device layout)."""
  directory = os.path.join(workdir, stage, "checkpoints")
  path = os.path.join(directory, str(max(int(d) for d in os.listdir(directory) if d.isdigit())), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  return checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                              tree))


def run_two_by_four(workdir, timeout_s=900, extra=None):
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(extra or {})}.items()]
  # the script adds 4 devices per process to XLA_FLAGS; conftest's 8 must not leak in
  env = without_emulated_devices(PYTHON=sys.executable, NUM_PROCESSES="2", DEVICES_PER_PROCESS="4",
                                 TIMEOUT_S=str(timeout_s), LOG_DIR=os.path.join(workdir, "logs"))
  cmd = [os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config", "configs/default.py:tiny",
         "--workdir", os.path.join(workdir, "run")]
  proc = subprocess.run(cmd + flags, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s + 60)
  if proc.returncode:
    logs = ""
    for name in sorted(os.listdir(env["LOG_DIR"])):
      with open(os.path.join(env["LOG_DIR"], name)) as f:
        logs += f"\n==== {name} (last 6000 chars) ====\n" + f.read()[-6000:]
    pytest.fail(f"launch/local_multiprocess.sh exited {proc.returncode}.\nstderr: {proc.stderr[-3000:]}{logs}")
  return os.path.join(workdir, "run")


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory):
  """(workdir, summary) of the OVERRIDES run in this process: 1 process x 8 data-parallel devices."""
  single = str(tmp_path_factory.mktemp("1x8"))
  return single, pipeline.run(override(get_config("tiny"), OVERRIDES), single)


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_process_of_eight(tmp_path, one_by_eight):
  multi = run_two_by_four(str(tmp_path / "2x4"))
  single, summary = one_by_eight

  rows = {name: [(r["stage"], r["split"], r["step"], r["loss"]) for r in read_metrics(w)]
          for name, w in (("1x8", single), ("2x4", multi))}
  assert [r[:3] for r in rows["2x4"]] == [r[:3] for r in rows["1x8"]], rows
  assert [r[:3] for r in rows["1x8"] if r[1] == "train"] == [(s, "train", k) for s in ("sft", "dpo")
                                                             for k in range(1, STEPS + 1)]
  np.testing.assert_allclose([r[3] for r in rows["2x4"]], [r[3] for r in rows["1x8"]], rtol=1e-5, atol=1e-6,
                             err_msg=f"per-step losses differ (stage, split, step, loss): {rows}")
  dpo_losses = [r[3] for r in rows["1x8"] if r[:2] == ("dpo", "train")]
  assert dpo_losses[-1] != dpo_losses[0], f"DPO never moved off log 2, so the comparison proves little: {rows}"

  for stage in ("sft", "dpo"):
    one, two = read_checkpoint(single, stage), read_checkpoint(multi, stage)
    assert int(one["step"]) == int(two["step"]) == STEPS
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(one["params"])]
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one["params"]),
                                                           jax.tree.leaves(two["params"]))]
    assert len(diffs) == len(jax.tree.leaves(two["params"])) > 0
    # Measured ~1e-6. Adam divides by sqrt(v): a last-bit gradient difference on a near-zero gradient can move a
    # weight by a fraction of lr (1e-3 here), so allow 1e-4; a wrong batch slice moves them by ~lr per step.
    assert max(diffs) < 1e-4, f"{stage} params differ: max |1x8 - 2x4| = {max(diffs)} at {names[int(np.argmax(diffs))]}"
    print(f"multihost {stage}: max |params 1x8 - 2x4| = {max(diffs):.3g} over {len(diffs)} arrays")
  print("multihost losses (stage, split, step, 1x8, 2x4):",
        [(*x[:3], round(x[3], 7), round(y[3], 7)) for x, y in zip(rows["1x8"], rows["2x4"])])

  with open(os.path.join(multi, "summary.json")) as f:  # written by process 0 only, same numbers
    multi_summary = json.load(f)
  for policy in ("pi_ref", "pi_theta"):
    for key in ("nll", "kl", "reward"):
      assert multi_summary[policy][key] == pytest.approx(summary[policy][key], rel=1e-4, abs=1e-5), (policy, key)
  assert multi_summary["pi_theta"]["accuracy"] == pytest.approx(summary["pi_theta"]["accuracy"])


@pytest.mark.slow
def test_a_sequence_axis_across_both_processes_trains_like_one_process(tmp_path, one_by_eight):
  """mesh (data=1, sequence=8) over 2 processes x 4 devices: each sequence's tokens span both hosts, so both feed
  the whole batch (`sharding.batch_feed`) and the ring passes K/V blocks between the processes. The losses and
  params equal one process of 8 data-parallel devices."""
  multi = run_two_by_four(str(tmp_path / "2x4"), extra={"mesh.data": 1, "mesh.sequence": 8})
  single = one_by_eight[0]
  rows = {name: [(r["stage"], r["split"], r["step"], r["loss"]) for r in read_metrics(w)]
          for name, w in (("1x8", single), ("2x4", multi))}
  assert [r[:3] for r in rows["2x4"]] == [r[:3] for r in rows["1x8"]], rows
  np.testing.assert_allclose([r[3] for r in rows["2x4"]], [r[3] for r in rows["1x8"]], rtol=1e-5, atol=1e-6,
                             err_msg=f"per-step losses differ (stage, split, step, loss): {rows}")
  for stage in ("sft", "dpo"):
    one, two = read_checkpoint(single, stage), read_checkpoint(multi, stage)
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one["params"]),
                                                           jax.tree.leaves(two["params"]))]
    assert max(diffs) < 1e-4, f"{stage} params differ: max |1x8 - 2x4 (sequence=8)| = {max(diffs)}"
    print(f"multihost sequence=8 {stage}: max |params 1x8 - 2x4| = {max(diffs):.3g}")


def test_batch_feed_follows_the_batch_axes():
  """One process here: it feeds the whole batch whatever the mesh."""
  from dpo_jax import sharding
  for sizes in ({"data": 8}, {"data": 2, "sequence": 4}, {"data": 1, "sequence": 8}):
    assert sharding.batch_feed(sharding.make_mesh(sizes), sharding.DEFAULT_RULES) == (0, 1)


# ---- dpo_jax.train.distributed: when initialize is called and with what (no processes started) ----

def test_off_unless_asked():
  assert not distributed.maybe_initialize(environ={})
  assert not distributed.maybe_initialize(environ={"DPO_JAX_DISTRIBUTED": "0"})


def test_settings_come_from_flags_then_environment():
  env = {"DPO_JAX_COORDINATOR": "10.0.0.1:1234", "DPO_JAX_NUM_PROCESSES": "4", "DPO_JAX_PROCESS_ID": "3",
         "DPO_JAX_LOCAL_DEVICE_IDS": "0,1"}
  assert distributed.settings(environ=env) == distributed.Settings("10.0.0.1:1234", 4, 3, (0, 1), 300)
  assert distributed.settings(coordinator_address="h:9", num_processes=2, process_id=0, local_device_ids="2",
                              environ=env) == distributed.Settings("h:9", 2, 0, (2,), 300)
  assert distributed.settings(environ={}) == distributed.Settings()  # TPU / SLURM: JAX detects everything


@pytest.mark.parametrize("kwargs, environ, match", [
    ({"coordinator_address": "10.0.0.1"}, {}, "needs a port"),
    ({"num_processes": 2, "process_id": 2}, {}, "outside"),
    ({"coordinator_address": "h:1", "num_processes": 2}, {}, "give both"),
    ({}, {"DPO_JAX_NUM_PROCESSES": "two"}, "not an integer"),
    ({"local_device_ids": "0;1"}, {}, "comma-separated"),
])
def test_bad_settings_name_the_flag(kwargs, environ, match):
  with pytest.raises(ValueError, match=match):
    distributed.settings(environ=environ, **kwargs)


def test_a_coordinator_without_asking_is_an_error():
  with pytest.raises(ValueError, match="--distributed"):
    distributed.maybe_initialize(coordinator_address="h:1", num_processes=2, process_id=0, environ={})
  with pytest.raises(ValueError, match="DPO_JAX_DISTRIBUTED"):
    distributed.maybe_initialize(environ={"DPO_JAX_DISTRIBUTED": "maybe"})


@pytest.mark.slow
def test_online_dpo_across_two_processes_samples_judges_and_trains_like_one_process(tmp_path):
  """stage=online_dpo over 2 processes x 4 devices: each host puts its rows of the round's prompts on the mesh,
  gathers every sample to judge it (`judges.host_array`), and feeds its block of each DPO batch; process 0 writes
  the round files. The rounds' samples, pairs and losses equal one process of 8 devices."""
  extra = {"stage": "online_dpo", "sft.steps": 0, "online.rounds": 2, "online.steps_per_round": 2,
           "online.prompts_per_round": 8, "online.samples_per_prompt": 2, "eval.num_prompts": 0}
  multi = run_two_by_four(str(tmp_path / "2x4"), extra=extra)
  single = str(tmp_path / "1x8")
  pipeline.run(override(get_config("tiny"), {**OVERRIDES, **extra}), single)
  rows = {name: [r for r in read_metrics(w) if r["stage"] == "online_dpo" and r["split"] == "train"]
          for name, w in (("1x8", single), ("2x4", multi))}
  assert [r["step"] for r in rows["2x4"]] == [r["step"] for r in rows["1x8"]] == [1, 2, 3, 4]
  for key in ("online/score", "online/pairs", "online/length", "online/tie_frac"):  # the same samples and judge
    assert [r.get(key) for r in rows["2x4"]] == [r.get(key) for r in rows["1x8"]], key
  np.testing.assert_allclose([r["loss"] for r in rows["2x4"]], [r["loss"] for r in rows["1x8"]], rtol=1e-5)
  assert sorted(os.listdir(os.path.join(multi, "online_dpo", "rounds"))) == ["round_000000.npz", "round_000001.npz"]
