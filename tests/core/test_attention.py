"""The attention kernels of dpo_jax/attention.py: every backend computes the same attention, the dispatcher picks
by platform, dtype and shapes, and a program built for a GPU or a TPU holds none of the CPU-only paths.

The GPU and TPU kernels cannot run here. The splash kernel runs on CPU in Pallas interpret mode (the same kernel
code, interpreted), and lowering needs no device: `jax.export` for 'tpu' / 'cuda' shows which custom calls a
step holds (shared/notes/accelerator-lowering-on-cpu.md).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import attention, logprobs, model as model_lib, optim, sharding, step
from configs.default import get_config

CFG = model_lib.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2)


def _qkv(seed, b, t, h, k, d, p=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, h, d))
  kk = jax.random.normal(keys[1], (b, t, k, d))
  v = jax.random.normal(keys[2], (b, t, k, d))
  prefix = None
  if p:
    visible = np.ones((b, p), bool)
    visible[0, :p // 3] = False  # a left-padded prompt
    prefix = attention.Prefix(jax.random.normal(keys[3], (b, p, k, d)), jax.random.normal(keys[4], (b, p, k, d)),
                              jnp.asarray(visible))
  return q, kk, v, prefix


def _segments(kind, b, t):
  """[B, T] segment ids: 'causal' (all real), 'padding' (0/1, right-padded rows), 'packed' (1, 2, 3 + padding)."""
  seg = np.ones((b, t), np.int32)
  if kind == "padding":
    for r in range(b):
      seg[r, t - 1 - 7 * r:] = 0
  elif kind == "packed":
    seg[:, t // 3:] = 2
    seg[:, 2 * t // 3:] = 3
    seg[:, t - 5:] = 0
  return jnp.asarray(seg)


def _out_and_grads(fn, q, k, v, seg, prefix, weight):
  """fn's output and the grads of sum(out * weight) w.r.t. q, k, v (and the prefix keys / values)."""
  def loss(q, k, v, pk, pv):
    pre = None if prefix is None else attention.Prefix(pk, pv, prefix.visible_BxP)
    out = fn(q, k, v, seg, pre)
    return jnp.sum(out * weight), out
  pk, pv = (None, None) if prefix is None else (prefix.k_BxPxKxD, prefix.v_BxPxKxD)
  argnums = (0, 1, 2) if prefix is None else (0, 1, 2, 3, 4)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, pk, pv)
  return out, grads


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _impl(name, **overrides):
  return dataclasses.replace(CFG, attention_impl=name, **overrides)


@pytest.mark.parametrize("kind,heads,kv_heads,prefix_len", [
    ("causal", 4, 4, 0), ("padding", 4, 2, 0), ("packed", 4, 1, 0), ("padding", 4, 2, 24)])
def test_xla_equals_the_cpu_blocked_kernel(kind, heads, kv_heads, prefix_len):
  """'xla' (one score block) equals 'cpu_blocked' (query blocks that skip the masked triangle; ragged last block):
  outputs and grads, fp32, 1e-5."""
  b, t, d = 3, 40, 16
  q, k, v, prefix = _qkv(0, b, t, heads, kv_heads, d, prefix_len)
  seg = _segments(kind, b, t)
  weight = jax.random.normal(jax.random.key(9), q.shape)
  cfg = _impl("xla")
  ref_out, ref_grads = _out_and_grads(lambda *a: attention.xla_attention(*a[:4], cfg, a[4]), q, k, v, seg, prefix,
                                      weight)
  out, grads = _out_and_grads(lambda *a: attention.blocked_attention(*a[:4], cfg, block=16, prefix=a[4]),
                              q, k, v, seg, prefix, weight)
  assert _rel(out, ref_out) < 1e-5
  for g, ref in zip(grads, ref_grads):
    assert _rel(g, ref) < 1e-5


@pytest.mark.parametrize("kind,heads,kv_heads,prefix_len", [
    ("causal", 4, 4, 0), ("causal", 4, 2, 0), ("packed", 4, 2, 0), ("padding", 4, 2, 128)])
def test_splash_kernel_in_interpret_mode_equals_xla(kind, heads, kv_heads, prefix_len):
  """The Pallas TPU splash kernel (interpret mode on CPU) on causal, GQA, packed-segment and shared-prompt masks:
  outputs and grads equal 'xla' at every query that is scored (1e-5, fp32). A shared-prompt padding query sees
  only its own padding under splash (segment ids), the prompt too under 'xla': such outputs are never scored,
  so the weight is 0 there."""
  b, t, d = 2, 128, 32
  q, k, v, prefix = _qkv(1, b, t, heads, kv_heads, d, prefix_len)
  seg = _segments(kind, b, t)
  weight = jax.random.normal(jax.random.key(9), q.shape) * (seg > 0)[:, :, None, None]
  cfg = _impl("splash")
  ref_out, ref_grads = _out_and_grads(lambda *a: attention.xla_attention(*a[:4], cfg, a[4]), q, k, v, seg, prefix,
                                      weight)
  out, grads = _out_and_grads(lambda *a: attention.splash_attention(*a[:4], cfg, prefix=a[4]), q, k, v, seg, prefix,
                              weight)
  scored = (seg > 0)[:, :, None, None]
  assert _rel(out * scored, ref_out * scored) < 1e-5
  for g, ref in zip(grads, ref_grads):
    assert _rel(g, ref) < 1e-5


def test_splash_shard_map_over_the_mesh_equals_one_device():
  """Splash under `shard_map` on a (data=2, fsdp=2, tensor=2) mesh (batch over data x fsdp, heads over tensor)
  gives the unsharded kernel's output."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  shard = sharding.ShardingContext(mesh, sharding.DEFAULT_RULES)
  q, k, v, _ = _qkv(2, 4, 128, 4, 2, 16)
  seg = _segments("packed", 4, 128)
  cfg = _impl("splash")
  one = jax.jit(lambda *a: attention.splash_attention(*a, cfg))(q, k, v, seg)
  sharded = jax.jit(lambda *a: attention.splash_attention(*a, cfg, shard=shard))(q, k, v, seg)
  assert _rel(sharded, one) < 1e-6


def _dpo_rows(t):
  from tests.batches import random_dpo_batch
  batch = random_dpo_batch(0, 2, t, CFG.vocab_size, prompt_len=(3, 30), response_len=(5, 60))
  batch.pop("row_ids")
  return batch


@pytest.mark.slow
def test_every_kernel_gives_the_models_sequence_logps():
  """The whole model (2 layers, GQA) on a DPO batch: sequence log-probs and their param grads equal across
  'cpu_blocked', 'xla' and 'splash' (interpret), fp32."""
  params = model_lib.init_params(CFG, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in _dpo_rows(128).items()}

  def logps_and_grads(impl):
    model = model_lib.make_model(_impl(impl))
    f = lambda p: logprobs.sequence_logps(model, p, batch).logps
    logps, vjp = jax.vjp(f, params)
    return logps, vjp(jnp.linspace(-1.0, 1.0, logps.shape[0]))[0]

  ref_logps, ref_grads = logps_and_grads("cpu_blocked")
  for impl in ("xla", "splash"):
    logps, grads = logps_and_grads(impl)
    assert _rel(logps, ref_logps) < 1e-5, impl
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert _rel(g, ref) < 1e-4, impl


# ---- the dispatcher ----

@pytest.mark.parametrize("platform,impl,dtype,t,s,d,expected", [
    ("cpu", "auto", "float32", 32, 32, 16, "cpu_blocked"),
    ("cpu", "auto", "bfloat16", 32, 32, 16, "cpu_blocked"),
    ("gpu", "auto", "bfloat16", 2048, 2048, 128, "cudnn"),
    ("cuda", "auto", "float16", 512, 512, 64, "cudnn"),
    ("gpu", "auto", "float32", 2048, 2048, 128, "xla"),  # cuDNN flash: bf16 / fp16 only
    ("gpu", "auto", "bfloat16", 2048, 2048, 160, "xla"),  # head_dim > 128
    ("gpu", "auto", "bfloat16", 2048, 2048, 60, "xla"),  # head_dim not a multiple of 8
    ("gpu", "auto", "bfloat16", 33, 33, 64, "xla"),  # odd lengths
    ("tpu", "auto", "bfloat16", 2048, 2048, 128, "splash"),
    ("tpu", "auto", "float32", 384, 512, 64, "splash"),
    ("tpu", "auto", "bfloat16", 100, 100, 128, "xla"),  # not a multiple of 128
    ("tpu", "xla", "bfloat16", 2048, 2048, 128, "xla"),
    ("cpu", "splash", "float32", 128, 256, 32, "splash"),  # interpret mode
    ("cpu", "xla", "float32", 7, 7, 8, "xla"),
    ("gpu", "cpu_blocked", "bfloat16", 64, 64, 64, "cpu_blocked"),  # explicit: runs anywhere
])
def test_dispatcher_choices(platform, impl, dtype, t, s, d, expected):
  cfg = _impl(impl, platform=platform)
  assert attention.choose(cfg, (2, t, 4, d), s, jnp.dtype(dtype)) == expected


def test_auto_fallback_warns_once_with_the_reason(capsys):
  cfg = _impl("auto", platform="tpu")
  attention._WARNED.clear()
  for _ in range(3):
    assert attention.choose(cfg, (2, 100, 4, 128), 100, jnp.bfloat16) == "xla"
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "'splash'" in err[0] and "multiples of 128" in err[0]


@pytest.mark.parametrize("platform,impl,dtype,t,d,words", [
    ("cpu", "cudnn", "bfloat16", 64, 64, "runs on a GPU"),
    ("gpu", "cudnn", "float32", 64, 64, "compute_dtype='bfloat16'"),
    ("gpu", "cudnn", "bfloat16", 64, 256, "head_dim <= 128"),
    ("gpu", "splash", "bfloat16", 128, 64, "TPU"),
    ("tpu", "splash", "bfloat16", 96, 64, "multiples of 128"),
])
def test_an_explicit_kernel_that_cannot_serve_the_inputs_names_the_field_and_fix(platform, impl, dtype, t, d, words):
  cfg = _impl(impl, platform=platform)
  with pytest.raises(ValueError, match="model.attention_impl") as err:
    attention.choose(cfg, (2, t, 4, d), t, jnp.dtype(dtype))
  assert words in str(err.value) and "attention_impl=auto" in str(err.value)


def test_config_values_are_checked():
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    _impl("flash")
  with pytest.raises(ValueError, match="platform='metal'"):
    _impl("auto", platform="metal")


# ---- what a step built for a GPU / TPU holds (lowered on this CPU) ----

def _train_step_text(platform, dtype="float32", shared=False):
  """StableHLO of the unsharded DPO train step built for `platform`, from abstract shapes (no device needed)."""
  cfg = dataclasses.replace(CFG, platform=platform, compute_dtype=dtype)
  config = get_config()
  optimizer, schedule = optim.make_optimizer(config.optim)
  params = model_lib.abstract_params(cfg)
  state = jax.eval_shape(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
  if shared:
    from dpo_jax.data import preference
    rows = _dpo_rows(256)
    ids = rows["input_ids"]
    local = preference.shared_prompt_rows(list(ids[0::2, :128]), list(ids[:, 128:]), prompt_width=128,
                                          response_width=128, pad_id=0)
    local["pair_mask"] = rows["pair_mask"]
  else:
    local = _dpo_rows(128)
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in local.items()}
  fn = jax.jit(functools.partial(step.train_step, model=model_lib.make_model(cfg), optimizer=optimizer,
                                 schedule=schedule, loss_cfg=config.loss))
  if platform == "cpu":
    return fn.lower(state, params, batch).as_text()
  checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in (
      "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")]
  return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(state, params, batch).mlir_module()


CPU_ONLY_MARK = "optimization_barrier"  # the row-major weight-gradient path (model.matmul) pins layouts with these


def test_the_cpu_step_holds_the_cpu_paths():
  """The detector below works: the CPU step has the row-major weight gradients and no kernel custom calls."""
  text = _train_step_text("cpu")
  assert CPU_ONLY_MARK in text
  assert "custom_call @__cudnn" not in text and "tpu_custom_call" not in text


@pytest.mark.parametrize("shared", [False, True])
def test_a_tpu_step_uses_splash_and_no_cpu_path(shared):
  text = _train_step_text("tpu", "bfloat16", shared=shared)
  kernels = set(re.findall(r"splash_mha_(?:fwd|dq|dkv)_segmented\w*", text))
  assert any("fwd" in k for k in kernels) and any("dkv" in k for k in kernels), kernels
  assert CPU_ONLY_MARK not in text


def test_a_gpu_step_uses_cudnn_and_no_cpu_path(monkeypatch):
  """Lowering cuDNN attention calls a cuDNN version probe that needs a GPU: stubbed here (a private function of
  jax; the test fails loudly if jax moves it, rather than passing without lowering)."""
  from jax._src.cudnn import fused_attention_stablehlo
  assert hasattr(fused_attention_stablehlo, "check_cudnn_version"), (
      "jax moved its cuDNN version probe: update this stub (shared/notes/accelerator-lowering-on-cpu.md)")
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  text = _train_step_text("cuda", "bfloat16")
  calls = set(re.findall(r"custom_call @(__cudnn\$\w+)", text))
  assert {"__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"} <= calls, calls
  assert CPU_ONLY_MARK not in text
