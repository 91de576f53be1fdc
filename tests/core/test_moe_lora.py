"""LoRA on mixture-of-experts models (dpo_jax/lora.py, dpo_jax/moe.py): per-expert adapters A `[E, in, r]`,
B `[E, r, out]` on the experts' gate / up / down, attention adapters as for dense models.

At init the policy is the base bit for bit; the adapted forward equals the forward of `lora.merge`d params on every
expert kernel and with scanned layers; a DPO step moves every expert's adapters and never the base; the TR-DPO
mix is truncated per expert; dense-MLP and expert targets each adapt only their kind of layer."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_dpo_batch
from configs.default import get_config
from dpo_jax import lora, model as model_lib
from train_steps import run_steps

CFG = model_lib.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                            num_kv_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                            matmul_precision="highest")
SPEC = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj") + lora.EXPERT_TARGETS)
# Qwen3-MoE's mlp_only_layers: layer 1 keeps a dense MLP (intermediate_size 24), layer 0 has the experts.
MIXED = dataclasses.replace(CFG, dense_layers=(1,))
MIXED_SPEC = lora.LoraSpec(rank=2, alpha=4.0, targets=("gate_proj", "experts.gate_proj"))


def perturbed(adapters, seed=1, scale=0.3):
  """Adapters as after training (B != 0): the adapted policy differs from the base."""
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
  return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


def _inputs(b=3, t=10, seed=2):
  ids = jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)
  return ids, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32).at[0, :3].set(0)


def _logits(cfg, params):
  return np.asarray(jax.jit(functools.partial(model_lib.apply_params, model_lib.make_model(cfg)))(params, *_inputs()))


def test_expert_adapters_have_their_shapes_paths_and_axes():
  model = model_lib.make_model(CFG)
  shapes = jax.tree.map(lambda x: x.shape, lora.abstract_adapters(model, SPEC))
  assert set(shapes) == {"layers_0", "layers_1"}
  layer = shapes["layers_0"]
  assert layer["attn"] == {"q_lora": {"a": (16, 2), "b": (2, 4, 4)}, "v_lora": {"a": (16, 2), "b": (2, 2, 4)}}
  assert layer["mlp"] == {"gate_lora": {"a": (4, 16, 2), "b": (4, 2, 8)}, "up_lora": {"a": (4, 16, 2), "b": (4, 2, 8)},
                          "down_lora": {"a": (4, 8, 2), "b": (4, 2, 16)}}
  axes = lora.adapter_logical_axes(model, SPEC)["layers_0"]["mlp"]
  assert axes["gate_lora"] == {"a": ("expert", "embed", None), "b": ("expert", None, "mlp")}
  assert axes["down_lora"] == {"a": ("expert", "mlp", None), "b": ("expert", None, "embed")}
  # 'all-linear' is PEFT's: it never reaches the experts, and a dense-MLP name adapts no MoE layer
  assert not set(lora.EXPERT_TARGETS) & set(lora.LoraSpec(2, 4.0, targets=("all-linear",)).targets)
  dense_names = jax.tree.map(lambda x: x.shape, lora.abstract_adapters(model, lora.LoraSpec(2, 4.0, targets=(
      "all-linear",))))
  assert set(dense_names["layers_0"]) == {"attn"}
  scanned = dataclasses.replace(CFG, scan_layers=True)
  stacked = jax.tree.map(lambda x: x.shape, lora.abstract_adapters(model_lib.make_model(scanned), SPEC))
  assert stacked["layers"]["mlp"]["up_lora"] == {"a": (2, 4, 16, 2), "b": (2, 4, 2, 8)}


def test_fresh_expert_adapters_are_the_base_bit_for_bit():
  base = model_lib.init_params(CFG, jax.random.key(0))
  adapters = lora.init_adapters(model_lib.make_model(CFG), SPEC, jax.random.key(1))
  a = np.asarray(adapters["layers_1"]["mlp"]["gate_lora"]["a"])  # PEFT's draw per expert: U(+-1/sqrt(in = 16))
  assert 0.8 / 4 < np.abs(a).max() <= 1 / 4 and len({a[e].tobytes() for e in range(4)}) == 4
  assert all(not np.asarray(ad["b"]).any() for ad in jax.tree.leaves(
      adapters, is_leaf=lambda d: isinstance(d, dict) and "b" in d))
  np.testing.assert_array_equal(_logits(CFG, lora.LoraParams(base, adapters, SPEC)), _logits(CFG, base))


def _check_merge(cfg, spec, seed=0):
  """Adapted forward == merged forward (1e-5), and the adapters change the logits by far more than that."""
  model = model_lib.make_model(cfg)
  base = model_lib.init_params(cfg, jax.random.key(seed))
  adapters = perturbed(lora.init_adapters(model, spec, jax.random.key(seed + 1)))
  adapted = _logits(cfg, lora.LoraParams(base, adapters, spec))
  merged = _logits(cfg, lora.merge(base, adapters, spec, cfg))
  scale = np.abs(adapted).max()
  np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-5 * scale)
  assert np.abs(adapted - _logits(cfg, base)).max() > 1e-2 * scale
  return base, adapters


@pytest.mark.parametrize("impl", ["ragged", "dense", "capacity"])
@pytest.mark.parametrize("scan", [False, True])
def test_adapted_forward_equals_the_merged_params(impl, scan):
  # capacity 8: every assignment fits (C = 8 * N k / E >= N k), so nothing is dropped and the paths agree
  cfg = dataclasses.replace(CFG, moe_impl=impl, moe_capacity_factor=8.0, scan_layers=scan)
  base, adapters = _check_merge(cfg, SPEC)
  merged = lora.merge(base, adapters, SPEC, cfg)
  layer = "layers" if scan else "layers_1"
  ad, w = adapters[layer]["mlp"]["down_lora"], np.asarray(base[layer]["mlp"]["down"])  # [(L,) E, F, D]
  expected = w + SPEC.scale * np.einsum("...eir,...ero->...eio", ad["a"], ad["b"])
  np.testing.assert_allclose(merged[layer]["mlp"]["down"], expected, rtol=1e-6, atol=1e-7)
  assert merged[layer]["mlp"]["router"] is base[layer]["mlp"]["router"]  # untouched leaves are shared


def test_dense_and_expert_targets_adapt_only_their_kind_of_layer():
  model = model_lib.make_model(MIXED)
  shapes = jax.tree.map(lambda x: x.shape, lora.abstract_adapters(model, MIXED_SPEC))
  assert shapes == {"layers_0": {"mlp": {"gate_lora": {"a": (4, 16, 2), "b": (4, 2, 8)}}},  # experts [E, D, F]
                    "layers_1": {"mlp": {"gate_lora": {"a": (16, 2), "b": (2, 24)}}}}  # dense [D, F = 24]
  base, adapters = _check_merge(MIXED, MIXED_SPEC)
  merged = lora.merge(base, adapters, MIXED_SPEC, MIXED)
  ad0, ad1 = adapters["layers_0"]["mlp"]["gate_lora"], adapters["layers_1"]["mlp"]["gate_lora"]
  np.testing.assert_allclose(merged["layers_0"]["mlp"]["gate"], np.asarray(base["layers_0"]["mlp"]["gate"])
                             + 2.0 * np.matmul(ad0["a"], ad0["b"]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(merged["layers_1"]["mlp"]["gate"]["kernel"],
                             np.asarray(base["layers_1"]["mlp"]["gate"]["kernel"]) + 2.0 * ad1["a"] @ ad1["b"],
                             rtol=1e-6, atol=1e-7)
  for layer, proj in (("layers_0", "up"), ("layers_1", "up"), ("layers_1", "down")):
    assert merged[layer]["mlp"][proj] is base[layer]["mlp"][proj]
  # a model with no dense layer: the dense name adapts nothing, and merge skips it
  only_dense = lora.LoraSpec(2, 4.0, targets=("q_proj", "gate_proj"))
  assert set(lora.abstract_adapters(model_lib.make_model(CFG), only_dense)["layers_0"]) == {"attn"}
  _check_merge(CFG, only_dense)


@pytest.mark.slow
def test_a_dpo_step_moves_every_expert_adapter_and_never_the_base():
  config = get_config("tiny")
  config.optim.update(learning_rate=1e-2, warmup_steps=0)
  base = model_lib.init_params(CFG, jax.random.key(0))
  adapters = lora.init_adapters(model_lib.make_model(CFG), SPEC, jax.random.key(3))
  batch = random_dpo_batch(0, 8, 24, CFG.vocab_size)
  batch.pop("row_ids")
  before = jax.tree.map(np.array, base)
  new, history = run_steps(base, batch, model_cfg=CFG, config=config, mesh_sizes={"data": 1}, devices=1, steps=3,
                           lora=SPEC, adapters=adapters)
  assert history[0]["loss"] == np.float32(math.log(2.0))  # B = 0: policy == pi_ref, every margin exactly 0
  assert history[-1]["loss"] < history[0]["loss"] - 1e-3
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, base), before)
  for layer in ("layers_0", "layers_1"):
    for proj in ("gate", "up", "down"):
      for side in ("a", "b"):  # B from the first step, A once B != 0; every expert gets tokens here
        moved = np.abs(np.asarray(new[layer]["mlp"][f"{proj}_lora"][side])
                       - np.asarray(adapters[layer]["mlp"][f"{proj}_lora"][side])).max(axis=(1, 2))
        assert moved.shape == (4,) and moved.min() > 0, (layer, proj, side, moved)


def test_gradients_reach_every_expert_adapter_and_match_the_merged_weights():
  """d loss / d B_e = scale * A_e^T (d loss / d W_e): the adapters' gradient is the merged weight's, projected."""
  base = model_lib.init_params(CFG, jax.random.key(0))
  model = model_lib.make_model(CFG)
  adapters = perturbed(lora.init_adapters(model, SPEC, jax.random.key(1)))
  loss = lambda logits: jnp.sum(jax.nn.log_softmax(logits)[..., 3])
  g_ad = jax.jit(jax.grad(lambda ad: loss(model_lib.apply_params(model, lora.LoraParams(base, ad, SPEC),
                                                                  *_inputs()))))(adapters)
  g_w = jax.jit(jax.grad(lambda p: loss(model_lib.apply_params(model, p, *_inputs()))))(
      lora.merge(base, adapters, SPEC, CFG))
  for proj in ("gate", "up", "down"):
    ad, gb = adapters["layers_0"]["mlp"][f"{proj}_lora"], np.asarray(g_ad["layers_0"]["mlp"][f"{proj}_lora"]["b"])
    expected = SPEC.scale * np.einsum("eir,eio->ero", ad["a"], g_w["layers_0"]["mlp"][proj])
    np.testing.assert_allclose(gb, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert np.abs(gb).max(axis=(1, 2)).min() > 0  # every expert has tokens


def _best_rank_r(m, r):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("scan", [False, True])
def test_mix_adapters_truncates_each_expert_on_its_own(scan):
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  model = model_lib.make_model(cfg)
  pol = perturbed(lora.init_adapters(model, SPEC, jax.random.key(1)), seed=2)
  ref = perturbed(lora.init_adapters(model, SPEC, jax.random.key(3)), seed=4)
  mix = jax.jit(lambda r, p, alpha: lora.mix_adapters(r, p, alpha, stacked=scan), static_argnums=2)
  jax.tree.map(np.testing.assert_array_equal, mix(ref, pol, 1.0), pol)  # hard update: a copy
  delta = lambda ad: np.einsum("...ir,...ro->...io", np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64))
  layers = ["layers"] if scan else ["layers_0", "layers_1"]
  # from a zero reference the mix has rank <= r: exact, every expert scaled by alpha
  first = mix(lora.zero_adapters(ref), pol, 0.25)
  for layer in layers:
    for proj in ("gate", "up", "down"):
      key = f"{proj}_lora"
      np.testing.assert_allclose(delta(first[layer]["mlp"][key]), 0.25 * delta(pol[layer]["mlp"][key]),
                                 rtol=1e-5, atol=1e-6)
  mixed = mix(ref, pol, 0.25)
  for layer in layers:
    for proj in ("gate", "up", "down"):
      key = f"{proj}_lora"
      m = 0.25 * delta(pol[layer]["mlp"][key]) + 0.75 * delta(ref[layer]["mlp"][key])  # [(L,) E, in, out]
      got = delta(mixed[layer]["mlp"][key])
      assert mixed[layer]["mlp"][key]["a"].shape == ref[layer]["mlp"][key]["a"].shape
      flat_m, flat_got = m.reshape(-1, *m.shape[-2:]), got.reshape(-1, *got.shape[-2:])
      assert flat_m.shape[0] == (8 if scan else 4)
      for i in range(flat_m.shape[0]):  # each (layer,) expert: its own best rank-2 approximation
        best = _best_rank_r(flat_m[i], 2)
        np.testing.assert_allclose(flat_got[i], best, rtol=0, atol=1e-5 * np.abs(best).max())
        assert np.abs(flat_m[i] - best).max() > 1e-3  # rank 4 > 2: the truncation is real
    # an attention adapter in the same tree keeps the dense rule: one matrix per (layer,) projection
    q = lambda ad: delta({"a": ad["a"], "b": np.asarray(ad["b"]).reshape(*np.shape(ad["b"])[:-2], -1)})
    q_m = 0.25 * q(pol[layer]["attn"]["q_lora"]) + 0.75 * q(ref[layer]["attn"]["q_lora"])  # [(L,) D, H Dh]
    q_got = q(mixed[layer]["attn"]["q_lora"]).reshape(-1, *q_m.shape[-2:])
    for i, m in enumerate(q_m.reshape(-1, *q_m.shape[-2:])):
      np.testing.assert_allclose(q_got[i], _best_rank_r(m, 2), rtol=0, atol=1e-5 * np.abs(m).max())
