"""TR-DPO reference updates: the update rule, separate buffers, and the trainer's moving reference (with resume)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.default import get_config
from dpo_jax import model as model_lib
from dpo_jax.train import config_checks, pipeline
from dpo_jax.train import checkpoint, reference_update
from config_overrides import override

MODEL_CFG = model_lib.ModelConfig.from_dict(get_config("tiny").model)


def test_soft_update_is_the_formula_and_hard_is_a_copy():
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  policy = model_lib.init_params(MODEL_CFG, jax.random.key(1))
  alpha = 0.6
  soft = jax.jit(lambda r, p: reference_update.update_reference(r, p, alpha))(reference, policy)
  for s, r, p in zip(jax.tree.leaves(soft), jax.tree.leaves(reference), jax.tree.leaves(policy), strict=True):
    ap, br = np.float32(alpha) * np.asarray(p), np.float32(1.0 - alpha) * np.asarray(r)
    # the formula to fp32 rounding: XLA may fuse it into a multiply-add, rounding once where numpy rounds twice
    assert np.all(np.abs(np.asarray(s) - (ap + br)) <= 2 * np.finfo(np.float32).eps * (np.abs(ap) + np.abs(br)))
  hard = jax.jit(lambda r, p: reference_update.update_reference(r, p, 1.0))(reference, policy)
  for h, p in zip(jax.tree.leaves(hard), jax.tree.leaves(policy), strict=True):
    assert np.asarray(h).tobytes() == np.asarray(p).tobytes()
  assert [reference_update.should_update(k, 2) for k in range(6)] == [False, False, True, False, True, False]


def test_the_updated_reference_has_its_own_buffers():
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  policy = model_lib.init_params(MODEL_CFG, jax.random.key(1))
  policy_before = jax.device_get(policy)
  shardings = jax.tree.map(lambda x: x.sharding, reference)
  for alpha in (1.0, 0.5):
    new = reference_update.jit_update(alpha, shardings)(reference, policy)
    consume = jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p), donate_argnums=(0,))
    donated = jax.tree.map(jnp.copy, policy)
    kept = jax.device_get(new)
    consume(donated)  # a donated policy (as the train step donates its state) leaves the reference intact
    for n, k in zip(jax.tree.leaves(new), jax.tree.leaves(kept)):
      assert not n.is_deleted() and np.asarray(n).tobytes() == k.tobytes()
    assert all(n.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()
               for n, p in zip(jax.tree.leaves(new), jax.tree.leaves(policy)))
  for a, b in zip(jax.tree.leaves(policy_before), jax.tree.leaves(jax.device_get(policy))):
    assert a.tobytes() == b.tobytes()


def tiny(mode, **overrides):
  c = get_config("tiny")
  c.progress_bar = False
  c.eval.num_prompts = 0
  c.eval.every_steps = 0
  c.sft.steps = 0  # pi_ref = the initial params; DPO alone is what changes here
  c.optim.total_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1  # every step's (state, reference) on disk, for the checks below
  c.max_checkpoints = 10
  c.ref_update.update(mode=mode, alpha=0.5, tau=2)
  return override(c, overrides)


def run_capturing_reference(config, workdir, monkeypatch):
  """pipeline.run, recording the frozen pi_ref run_dpo receives, before and after training (host copies)."""
  seen = {}
  run_dpo = pipeline.run_dpo

  def spy(rt, start, train_pairs, test, *, reference):
    seen["before"] = jax.device_get(reference)
    out = run_dpo(rt, start, train_pairs, test, reference=reference)
    seen["after"] = jax.device_get(reference)
    return out

  monkeypatch.setattr(pipeline, "run_dpo", spy)
  summary = pipeline.run(config, workdir)
  return summary, seen


def saved(workdir, step_num):
  path = os.path.join(workdir, "dpo", "checkpoints", str(step_num), "state")
  return ocp.StandardCheckpointer().restore(path)


def losses_by_step(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r["stage"] == "dpo" and r["split"] == "train"}


def leaves_equal(a, b):
  return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def soft_and_off(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  try:
    soft_dir, off_dir = str(tmp_path_factory.mktemp("soft")), str(tmp_path_factory.mktemp("off"))
    soft = run_capturing_reference(tiny("soft"), soft_dir, mp)
    off = run_capturing_reference(tiny("off"), off_dir, mp)
  finally:
    mp.undo()
  return dict(soft_dir=soft_dir, off_dir=off_dir, soft=soft, off=off)


@pytest.mark.slow  # end to end: two 4-step trainer runs on the tiny config (and a resumed one)
def test_the_trainer_moves_the_reference_every_tau_steps(soft_and_off):
  workdir = soft_and_off["soft_dir"]
  _, seen = soft_and_off["soft"]
  pi_ref = seen["before"]
  ckpt = {k: saved(workdir, k) for k in (1, 2, 3, 4)}  # the state AFTER step k: the reference step k + 1 uses
  assert leaves_equal(ckpt[1]["reference"], pi_ref)  # no update after step 1 (tau = 2)
  assert not leaves_equal(ckpt[2]["reference"], pi_ref)  # step 3 trains against a moved reference ...
  for k, previous in ((2, pi_ref), (4, ckpt[3]["reference"])):  # ... = 0.5 policy_k + 0.5 reference_{k-1}
    for r, p, r0 in zip(jax.tree.leaves(ckpt[k]["reference"]), jax.tree.leaves(ckpt[k]["params"]),
                        jax.tree.leaves(previous), strict=True):
      np.testing.assert_allclose(r, np.float32(0.5) * p + np.float32(0.5) * r0, rtol=1e-6, atol=1e-7)
  assert leaves_equal(ckpt[3]["reference"], ckpt[2]["reference"])
  # the frozen pi_ref the trainer holds for evaluation is untouched (the moving one has its own buffers)
  assert leaves_equal(seen["after"], pi_ref)
  # the same data and init: steps 1-2 use the same reference with or without updates, step 3 does not
  soft_losses, off_losses = losses_by_step(workdir), losses_by_step(soft_and_off["off_dir"])
  assert soft_losses[1] == off_losses[1] and soft_losses[2] == off_losses[2]
  assert soft_losses[3] != off_losses[3]


@pytest.mark.slow  # end to end: two 4-step trainer runs on the tiny config (and a resumed one)
def test_off_keeps_the_reference_bit_identical_and_out_of_the_checkpoint(soft_and_off):
  _, seen = soft_and_off["off"]
  assert leaves_equal(seen["after"], seen["before"])
  mngr = checkpoint.manager(os.path.join(soft_and_off["off_dir"], "dpo", "checkpoints"))
  assert not reference_update.holds_reference(checkpoint.stored_arrays(mngr, 4))  # the layout mode 'off' always had


@pytest.mark.slow  # end to end: two 4-step trainer runs on the tiny config (and a resumed one)
def test_resume_continues_with_the_moved_reference(soft_and_off, tmp_path, monkeypatch):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(soft_and_off["soft_dir"], workdir)
  for k in (4, 3):  # as if the run had been killed after checkpointing step 2
    shutil.rmtree(os.path.join(workdir, "dpo", "checkpoints", str(k)))
  run_capturing_reference(tiny("soft"), workdir, monkeypatch)
  final, resumed = saved(soft_and_off["soft_dir"], 4), saved(workdir, 4)
  assert leaves_equal(resumed["reference"], final["reference"]) and leaves_equal(resumed["params"], final["params"])
  with pytest.raises(ValueError, match="config.ref_update.mode='off'"):
    pipeline.run(tiny("off"), workdir)


@pytest.mark.parametrize("overrides,match", [
    ({"ref_update.mode": "sometimes"}, "config.ref_update.mode='sometimes'"),
    ({"ref_update.alpha": 0.0}, "config.ref_update.alpha=0.0"),
    ({"ref_update.tau": 0}, "config.ref_update.tau=0"),
    ({"loss.type": "simpo"}, "config.loss.type='simpo' is reference-free"),
    ({"stage": "dpo", "data.reference_logps": True}, "config.data.reference_logps=True"),
])
def test_ref_update_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_checks.validate_config(tiny("soft", **overrides), 1)
  config_checks.validate_config(tiny("off", **{k: v for k, v in overrides.items() if not k.startswith("ref_update")}), 1)
