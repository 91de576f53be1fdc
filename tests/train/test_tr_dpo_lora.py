"""TR-DPO with LoRA: the moving reference is a second, frozen set of adapters over the shared base.

The update keeps the best rank-r approximation of `alpha * policy_delta + (1 - alpha) * ref_delta` (exact for hard
updates and for mixes of rank <= r; otherwise numpy's truncated SVD of the dense sum); the train step's pi_ref is
base + ref delta, equal to the merged dense reference; the base is never written; a resumed run keeps the
reference adapters."""

import dataclasses
import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from batches import random_dpo_batch
from config_overrides import override
from configs.default import get_config
from dpo_jax import logprobs, lora, model as model_lib, optim, sharding, step
from dpo_jax.train import config_checks, pipeline, reference_update

CONFIG = get_config("tiny")
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=("all-linear",))


def _model(stacked):
  cfg = dataclasses.replace(MODEL_CFG, scan_layers=True) if stacked else MODEL_CFG
  return cfg, model_lib.make_model(cfg)


def random_adapters(stacked, seed, scale=0.3):
  """Adapters with A and B both non-zero (as after training), so each delta A B has rank r."""
  adapters = lora.init_adapters(_model(stacked)[1], SPEC, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(adapters))))
  return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


def pairs_of(adapters):
  """{path: (A [L?, in, r], B [L?, r, out])} as float64 numpy, the in/out dims flattened."""
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda d: isinstance(d, dict) and set(d) == {"a", "b"})
  for path, d in flat[0]:
    a, b = np.asarray(d["a"], np.float64), np.asarray(d["b"], np.float64)
    lead = 1 if path[0].key == "layers" else 0  # scanned layers: a leading layer axis
    r = a.shape[-1]
    out[jax.tree_util.keystr(path)] = (a.reshape(a.shape[:lead] + (-1, r)), b.reshape(b.shape[:lead + 1] + (-1,)))
  return out


def dense(pair):
  """A B `[L?, in, out]` (the delta without the LoRA scale, which both terms share)."""
  return np.matmul(*pair)


def truncated(m, r):
  """numpy's best rank-r approximation of m (per layer) and the norm of what it drops."""
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  return np.matmul(u[..., :r] * s[..., None, :r], vt[..., :r, :]), np.sqrt((s[..., r:] ** 2).sum(-1))


def mix(ref, pol, alpha, stacked):
  return jax.jit(lambda r, p: lora.mix_adapters(r, p, alpha, stacked=stacked))(ref, pol)


@pytest.mark.parametrize("stacked", [False, True])
def test_hard_updates_and_rank_r_mixes_are_exact(stacked):
  policy, other = random_adapters(stacked, 0), random_adapters(stacked, 1)
  hard = mix(other, policy, 1.0, stacked)
  for h, p in zip(jax.tree.leaves(hard), jax.tree.leaves(policy), strict=True):
    assert np.asarray(h).tobytes() == np.asarray(p).tobytes()  # a copy, bit for bit

  alpha = 0.6
  first = mix(lora.zero_adapters(policy), policy, alpha, stacked)  # the first update: from the base (zero delta)
  shared_a = jax.tree.map(lambda o, p: {"a": p["a"], "b": o["b"]}, other, policy,
                          is_leaf=lambda d: isinstance(d, dict) and "a" in d)  # A_p (a B_p + (1-a) B_o): rank r
  second = mix(shared_a, policy, alpha, stacked)
  pol, sha = pairs_of(policy), pairs_of(shared_a)
  for got, want in ((first, {k: alpha * dense(p) for k, p in pol.items()}),
                    (second, {k: alpha * dense(pol[k]) + (1 - alpha) * dense(sha[k]) for k in pol})):
    for k, g in pairs_of(got).items():
      assert g[0].shape == pol[k][0].shape and g[1].shape == pol[k][1].shape  # still rank r
      np.testing.assert_allclose(dense(g), want[k], atol=1e-5 * np.abs(want[k]).max(), rtol=0, err_msg=k)


@pytest.mark.parametrize("stacked", [False, True])
def test_soft_updates_are_the_optimal_rank_r_truncation(stacked):
  alpha = 0.5
  policy, reference = random_adapters(stacked, 2), random_adapters(stacked, 3)
  got = pairs_of(mix(reference, policy, alpha, stacked))
  pol, ref = pairs_of(policy), pairs_of(reference)
  for k in pol:
    exact = alpha * dense(pol[k]) + (1 - alpha) * dense(ref[k])  # rank 2r
    best, tail = truncated(exact, SPEC.rank)
    assert (tail > 0.05 * np.linalg.norm(exact, axis=(-2, -1))).all(), k  # a real truncation, not a no-op
    scale = np.abs(exact).max()
    np.testing.assert_allclose(dense(got[k]), best, atol=2e-5 * scale, rtol=0, err_msg=k)
    np.testing.assert_allclose(np.linalg.norm(exact - dense(got[k]), axis=(-2, -1)), tail, rtol=1e-4, err_msg=k)


def merged_reference(base, ref_adapters):
  """The dense reference: every adapted kernel W + (alpha / r) A B, in float64 numpy (not lora.merge)."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(base))
  for layer_key, layer in jax.device_get(ref_adapters).items():
    for module, projections in layer.items():
      for name, ad in projections.items():
        kernel = params[layer_key][module][name.removesuffix("_lora")]
        delta = np.tensordot(np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64), axes=1)
        kernel["kernel"] = kernel["kernel"] + SPEC.scale * delta
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def test_train_steps_move_the_reference_adapters_and_never_the_base():
  """tau = 2, soft alpha = 0.5, on a 2-device fsdp mesh (adapters sharded like their kernels)."""
  mesh = sharding.make_mesh({"fsdp": 2, "data": 1}, jax.devices()[:2])
  rules = CONFIG.sharding.rules
  shard = sharding.ShardingContext(mesh, rules)
  model = model_lib.make_model(MODEL_CFG, shard)
  plain = model_lib.make_model(MODEL_CFG)
  optim_cfg = dict(CONFIG.optim, learning_rate=2e-2, warmup_steps=0)
  optimizer, schedule = optim.make_optimizer(optim_cfg)
  shardings = step.lora_state_shardings(model, SPEC, optimizer, mesh, rules)
  base_shardings = step.param_shardings(MODEL_CFG, mesh, rules)
  base = jax.device_put(model_lib.init_params(MODEL_CFG, jax.random.key(0)), base_shardings)
  base_before = jax.device_get(base)
  adapters = lora.init_adapters(model, SPEC, jax.random.key(1), shardings.params)
  local = random_dpo_batch(0, 8, 24, MODEL_CFG.vocab_size)
  local.pop("row_ids")
  batch = sharding.global_batch(mesh, rules, local)
  train_step = functools.partial(step.train_step, model=model, optimizer=optimizer, schedule=schedule,
                                 loss_cfg=CONFIG.loss, lora=SPEC)
  jitted = step.jit_train_step(  # as runtime.dpo_train_step(moving_lora_reference=True) jits it
      train_step, state_shardings=shardings, reference_shardings=lora.LoraParams(base_shardings, shardings.params, SPEC),
      batch_shardings=sharding.batch_shardings(mesh, rules, local), mesh=mesh)
  lora_step = lambda s, base_, ref, b: jitted(s, lora.LoraParams(base_, ref, SPEC), b)
  update = reference_update.jit_lora_update(0.5, stacked=False, adapter_shardings=shardings.params)
  step_fn = reference_update.tracking_step(lambda s, ref, b: lora_step(s, base, ref, b), update, tau=2)
  ref0 = reference_update.zero_reference(adapters, shardings.params)
  tracked = reference_update.TrackedState(*step.create_train_state(adapters, optimizer, shardings, donate=True),
                                          reference=ref0)
  score = jax.jit(lambda params: logprobs.sequence_logps(plain, params, local).logps)
  ref_logps = lambda ref: np.asarray(score(lora.LoraParams(base, ref, SPEC)))
  base_logps = np.asarray(score(base))

  history = []
  for k in (1, 2, 3):
    before = jax.device_get(tracked.params)
    tracked, metrics = step_fn(tracked, batch)
    history.append((before, jax.device_get(tracked.params), jax.device_get(tracked.reference), metrics))
  # step 1: pi_ref (zero delta) is the base bit for bit, and so is the fresh policy (B = 0): every margin is 0
  assert float(history[0][3]["loss"]) == np.float32(math.log(2.0))
  assert not any(np.asarray(x).any() for x in jax.tree.leaves(history[0][2]))
  assert ref_logps(jax.device_put(history[0][2], shardings.params)).tobytes() == base_logps.tobytes()
  # after step 2 (tau): ref = 0.5 * policy_2 (exact: rank r), the merged dense reference gives the same log-probs
  policy_2, ref_2 = history[1][1], history[1][2]
  want = merged_reference(base, jax.tree.map(lambda d: {"a": d["a"], "b": 0.5 * d["b"]}, policy_2,
                                             is_leaf=lambda d: isinstance(d, dict) and "a" in d))
  dense_logps = np.asarray(score(want))
  assert np.abs(dense_logps - base_logps).max() > 1e-3  # the reference moved
  np.testing.assert_allclose(ref_logps(ref_2), dense_logps, rtol=1e-5, atol=1e-4)
  # step 3 trains against that reference: its loss is DPO's of (policy_2, dense reference)
  policy = lora.LoraParams(base, jax.device_put(policy_2, shardings.params), SPEC)
  evaluated = jax.jit(functools.partial(step.eval_step, model=plain, loss_cfg=CONFIG.loss))(policy, want, local)
  np.testing.assert_allclose(history[2][3]["loss"], evaluated["loss"], rtol=1e-5)
  assert jax.tree.leaves(history[2][2]) and all(  # no update after step 3
      np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(jax.tree.leaves(history[2][2]),
                                                                         jax.tree.leaves(ref_2)))
  # the frozen base: never written
  assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
             for a, b in zip(jax.tree.leaves(jax.device_get(base)), jax.tree.leaves(base_before), strict=True))


def tiny(**overrides):
  c = get_config("tiny")
  c.progress_bar = False
  c.eval.num_prompts = 0
  c.eval.every_steps = 0
  c.sft.steps = 0
  c.optim.total_steps = 4
  c.optim.learning_rate = 1e-2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.max_checkpoints = 10
  return override(c, {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": ("all-linear",), "ref_update.mode": "soft",
                      "ref_update.alpha": 0.5, "ref_update.tau": 2, **overrides})


def saved(workdir, k):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "dpo", "checkpoints", str(k), "state"))


def test_config_accepts_lora_with_a_moving_reference():
  config_checks.validate_config(tiny(**{"lora.rank": 8}), 1)
  config_checks.validate_config(tiny(**{"ref_update.mode": "hard"}), 1)
  with pytest.raises(ValueError, match="config.data.reference_logps=True"):
    config_checks.validate_config(tiny(**{"stage": "dpo", "data.reference_logps": True}), 1)


@pytest.mark.slow  # end to end: a 4-step LoRA TR-DPO trainer run, then a resumed one
def test_the_trainer_checkpoints_the_reference_adapters_and_resumes_with_them(tmp_path):
  workdir = str(tmp_path / "run")
  pipeline.run(tiny(), workdir)
  ckpt = {k: saved(workdir, k) for k in (1, 2, 3, 4)}  # after step k: the reference step k + 1 uses
  n_adapter = model_lib.count_params(lora.abstract_adapters(model_lib.make_model(MODEL_CFG), SPEC))
  assert model_lib.count_params(ckpt[4]["reference"]) == n_adapter  # adapters, not a copy of the base
  assert not any(np.asarray(x).any() for x in jax.tree.leaves(ckpt[1]["reference"]))
  assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
             for a, b in zip(jax.tree.leaves(ckpt[3]["reference"]), jax.tree.leaves(ckpt[2]["reference"])))
  for k, previous in ((2, ckpt[1]["reference"]), (4, ckpt[3]["reference"])):
    got, pol, prev = pairs_of(ckpt[k]["reference"]), pairs_of(ckpt[k]["params"]), pairs_of(previous)
    for key in got:
      exact = 0.5 * dense(pol[key]) + 0.5 * dense(prev[key])
      best = truncated(exact, SPEC.rank)[0]  # the first update (k = 2) is exact: prev = 0
      np.testing.assert_allclose(dense(got[key]), best, atol=2e-5 * np.abs(exact).max(), rtol=0, err_msg=key)

  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  for k in (4, 3):  # as if killed after checkpointing step 2
    shutil.rmtree(os.path.join(resumed, "dpo", "checkpoints", str(k)))
  pipeline.run(tiny(), resumed)
  final, again = saved(workdir, 4), saved(resumed, 4)
  for name in ("reference", "params"):
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(jax.tree.leaves(again[name]), jax.tree.leaves(final[name]), strict=True)), name
  with pytest.raises(ValueError, match="config.ref_update.mode='off'"):
    pipeline.run(tiny(**{"ref_update.mode": "off"}), resumed)
