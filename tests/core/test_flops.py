"""FLOPs counting, device peaks and MFU (dpo_jax/flops.py): hand counts for every batch layout, the 3x / 4x train
step rule, grad accumulation, XLA's own count, the peak table, the CPU measurement and the MFU arithmetic."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import flops, model, step

# D = 8, F = 16, L = 2 layers, H = 2 query heads, K = 1 kv head, hd = 8 / 2 = 4, V = 32.
CFG = model.ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
# Per token, layers:  2 * L * (D * hd * (2H + 2K) + 3 * D * F) = 2 * 2 * (8 * 4 * 6 + 3 * 8 * 16) = 4 * 576 = 2304
# Per head position:  2 * D * V = 2 * 8 * 32 = 512
# Per attention pair: 4 * L * H * hd = 4 * 2 * 2 * 4 = 64


def shapes(**arrays):
  return {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in arrays.items()}


def test_rows_layout_by_hand():
  # [N, T] = [4, 6]: 24 tokens, the head on all 24 positions, 4 rows * 6 * 7 / 2 = 84 causal pairs.
  # 2304 * 24 + 512 * 24 + 64 * 84 = 55296 + 12288 + 5376 = 72960
  assert flops.forward_flops(CFG, shapes(input_ids=(4, 6))) == 72960


def test_shared_prompt_layout_by_hand():
  # prompts [B, P] = [2, 3], responses [K B, R] = [4, 5]: 6 + 20 = 26 tokens, the head on the 20 response positions.
  # Pairs: prompts 2 * 3 * 4 / 2 = 12; responses 4 * (5 * 3 + 5 * 6 / 2) = 4 * 30 = 120; 132 in all.
  # 2304 * 26 + 512 * 20 + 64 * 132 = 59904 + 10240 + 8448 = 78592
  batch = shapes(prompt_ids=(2, 3), prompt_mask=(2, 3), input_ids=(4, 5), attention_mask=(4, 5))
  assert flops.forward_flops(CFG, batch) == 78592


def test_packed_rows_count_causal_over_the_whole_row():
  # [R, L] = [2, 10] rows of 2 pair slots each: 20 tokens, the head on 20, 2 * 10 * 11 / 2 = 110 pairs.
  # 2304 * 20 + 512 * 20 + 64 * 110 = 46080 + 10240 + 7040 = 63360
  assert flops.forward_flops(CFG, shapes(input_ids=(2, 10), attention_mask=(2, 10), pack_slots=(2, 2))) == 63360


def test_numpy_arrays_count_like_shape_structs():
  batch = {"input_ids": np.zeros((4, 6), np.int32), "loss_mask": np.zeros((4, 6), np.int32)}
  assert flops.forward_flops(CFG, batch) == 72960


@pytest.mark.parametrize("batch", [shapes(input_ids=(4, 6)), shapes(prompt_ids=(2, 3), input_ids=(4, 5))])
def test_a_train_step_is_three_forwards_and_one_more_with_a_reference(batch):
  forward = flops.forward_flops(CFG, batch)
  assert flops.train_step_flops(CFG, batch, reference=False) == 3 * forward
  assert flops.train_step_flops(CFG, batch, reference=True) == 4 * forward


def test_a_lora_step_by_hand():
  # rows [4, 6]: weights (layers + head) 2304 * 24 + 512 * 24 = 67584, attention 64 * 84 = 5376, 24 tokens.
  # Adapters rank 2 on q_proj (8 -> 8) and down_proj (16 -> 8): 2 * L * r * (16 + 24) = 2 * 2 * 2 * 40 = 320 / token.
  # Policy: 2 * 67584 + 3 * 5376 + 3 * 320 * 24 = 135168 + 16128 + 23040 = 174336; pi_ref: 67584 + 5376 = 72960.
  from dpo_jax import lora
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
  batch = shapes(input_ids=(4, 6))
  assert flops.adapter_flops_per_token(CFG, spec) == 320
  assert flops.train_step_flops(CFG, batch, reference=False, lora=spec) == 174336
  assert flops.train_step_flops(CFG, batch, reference=True, lora=spec) == 174336 + 72960


@pytest.mark.parametrize("micro", [2, 4])
@pytest.mark.parametrize("batch", [
    {"input_ids": jnp.zeros((8, 6), jnp.int32), "pair_mask": jnp.ones((4,), jnp.int32)},
    {"prompt_ids": jnp.zeros((4, 3), jnp.int32), "input_ids": jnp.zeros((8, 5), jnp.int32),
     "pair_mask": jnp.ones((4,), jnp.int32)},
])
def test_grad_accumulation_does_not_change_the_flops_of_a_step(batch, micro):
  # The step scans over `step.microbatches`: M micro-batches of the same shapes, each 1 / M of the global batch.
  mbs = step.microbatches(batch, micro, step.step_units(batch), None)
  one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in mbs.items()}
  assert micro * flops.forward_flops(CFG, one) == flops.forward_flops(CFG, batch)


def test_the_count_matches_xla_cost_analysis_of_the_forward():
  # XLA counts every op (norms, softmax, SiLU too: the ~2% left) and the 'xla' kernel's full [T, T] score square.
  cfg = model.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=2, attention_impl="xla", weight_grad_gemm="xla")
  decoder = model.make_model(cfg)
  ids_NxT = jnp.zeros((4, 16), jnp.int32)
  forward = lambda p, ids: decoder.apply({"params": p}, ids, ids, jnp.ones_like(ids))
  cost = jax.jit(forward).lower(model.abstract_params(cfg), ids_NxT).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  square_minus_triangle = 4 * (16 * 16 - 16 * 17 // 2)
  ours = flops.forward_flops(cfg, {"input_ids": ids_NxT}) + flops.attention_flops_per_pair(cfg) * square_minus_triangle
  assert ours == pytest.approx(cost["flops"], rel=0.05), (
      f"flops.forward_flops no longer agrees with XLA's count ({ours:.4g} vs {cost['flops']:.4g}): a layer's "
      "matmuls changed in model.py; update the counting rules in dpo_jax/flops.py")


def fake_device(kind, platform="gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind, platform, tflops", [
    ("NVIDIA H100 80GB HBM3", "gpu", 989),
    ("NVIDIA H100 PCIe", "gpu", 756),
    ("NVIDIA H200", "gpu", 989),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312),
    ("NVIDIA A100 80GB PCIe", "gpu", 312),
    ("TPU v4", "tpu", 275),
    ("TPU v5 lite", "tpu", 197),
    ("TPU v5e", "tpu", 197),
    ("TPU v5", "tpu", 459),
    ("TPU v5p", "tpu", 459),
    ("TPU v6 lite", "tpu", 918),
    ("TPU v6e", "tpu", 918),
])
def test_published_peaks_by_device_kind(kind, platform, tflops):
  peak, source = flops.peak_flops(fake_device(kind, platform))
  assert peak == tflops * 1e12
  assert source.startswith("published: ") and ("NVIDIA" in source or "Google Cloud" in source), source


def test_every_peak_has_a_source():
  assert set(flops.PEAK_BF16_FLOPS) == set(flops.PEAK_SOURCES)


def test_an_unknown_device_kind_gives_nan_and_says_what_to_set():
  peak, source = flops.peak_flops(fake_device("Imaginary X1"))
  assert math.isnan(peak)
  assert "unknown device kind 'Imaginary X1'" in source and "config.perf.peak_flops" in source
  assert math.isnan(flops.mfu(1e12, 0.5, peak, 8))


def test_the_config_override_wins():
  assert flops.peak_flops(fake_device("NVIDIA H100 80GB HBM3"), override=5e14) == (5e14, "config")
  assert flops.peak_flops(fake_device("Imaginary X1"), override=1e12) == (1e12, "config")
  assert flops.peak_flops(fake_device("cpu", "cpu"), override=2e9) == (2e9, "config")


def test_the_cpu_peak_is_measured_once_and_finite():
  peak, source = flops.peak_flops(jax.devices()[0])
  assert math.isfinite(peak) and peak > 1e8, peak  # any CPU of this century does > 0.1 GFLOP/s
  assert source.startswith("measured: ")
  assert flops.peak_flops(fake_device("cpu", "cpu"))[0] == peak  # cached per process: not timed again


def test_mfu_arithmetic():
  # 4e12 FLOPs per step in 2 s = 2e12 FLOP/s, over 4 devices of 1e12 FLOP/s each: 0.5
  assert flops.mfu(4e12, 2.0, 1e12, 4) == pytest.approx(0.5)
  assert math.isnan(flops.mfu(4e12, 0.0, 1e12, 4))
  assert math.isnan(flops.mfu(4e12, 2.0, 0.0, 4))


# Mixture of experts: CFG's dense sizes, E = 4 experts of width Fe = 6, k = 2, layer 1 MoE and layer 0 dense
# (moe_layer_step 2: layer i is MoE iff (i + 1) % 2 == 0).
MOE_CFG = model.ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                            num_kv_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=6,
                            moe_layer_step=2)
# Matmul params a token uses: attention 8 * 4 * (2 * 2 + 2 * 1) = 192 per layer; layer 0's dense MLP 3 * 8 * 16 = 384;
# layer 1's router 8 * 4 = 32 + k experts 2 * 3 * 8 * 6 = 288: 320. 192 * 2 + 384 + 320 = 1088 -> 2176 FLOPs / token.
# All E = 4 experts (moe_impl='dense' executes them): 32 + 4 * 144 = 608, 192 * 2 + 384 + 608 = 1376 -> 2752.


def test_moe_layers_count_the_router_and_k_experts_by_hand():
  assert flops.layer_matmul_params(MOE_CFG) == 1088
  assert flops.dense_flops_per_token(MOE_CFG) == 2176
  # rows [4, 6]: 2176 * 24 + 512 * 24 + 64 * 84 = 52224 + 12288 + 5376 = 69888 (LM head and attention as dense)
  assert flops.forward_flops(MOE_CFG, shapes(input_ids=(4, 6))) == 69888
  assert flops.train_step_flops(MOE_CFG, shapes(input_ids=(4, 6)), reference=True) == 4 * 69888


def test_model_flops_do_not_follow_the_expert_kernel_but_executed_flops_do():
  import dataclasses
  for impl in ("auto", "ragged", "capacity", "dense"):
    assert flops.dense_flops_per_token(dataclasses.replace(MOE_CFG, moe_impl=impl)) == 2176, impl
  assert flops.dense_flops_per_token(dataclasses.replace(MOE_CFG, moe_impl="dense"), executed=True) == 2752
  assert flops.dense_flops_per_token(dataclasses.replace(MOE_CFG, moe_impl="ragged"), executed=True) == 2176


def test_total_and_active_params_by_hand():
  # embedding 32 * 8 = 256, LM head 256 (untied), norms 2 * 2 * 8 + 8 = 40, attention 2 * 192 = 384, layer 0's
  # MLP 384, layer 1's router 32 and experts 4 * 3 * 8 * 6 = 576: 1928. A token skips E - k = 2 experts: 2 * 144.
  assert flops.total_params(MOE_CFG) == 1928
  assert flops.inactive_params(MOE_CFG) == 288
  assert flops.active_params(MOE_CFG) == 1640


def test_dense_models_are_unchanged():
  assert flops.layer_matmul_params(CFG) * 2 == flops.dense_flops_per_token(CFG) == 2304
  assert flops.dense_flops_per_token(CFG, executed=True) == 2304
  assert flops.inactive_params(CFG) == 0
  assert flops.active_params(CFG) == flops.total_params(CFG) == 32 * 8 * 2 + 2 * (192 + 384 + 16) + 8


def test_qwen3_30b_a3b_has_30_5b_params_and_3_3b_active():
  # Qwen3-30B-A3B's model card: 30.5B params, 3.3B activated. Embedding and head 151936 * 2048 each; per layer q, o
  # 2048 * 4096, k, v 2048 * 512, router 2048 * 128, 128 experts of 3 * 2048 * 768; norms (qk_norm: 2 * 128 more).
  cfg = model.ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                          num_kv_heads=4, head_dim=128, qk_norm=True, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, scan_layers=True)
  per_layer = 2 * 2048 * 4096 + 2 * 2048 * 512 + 2048 * 128 + 128 * 3 * 2048 * 768 + 2 * 2048 + 2 * 128
  assert flops.total_params(cfg) == 2 * 151936 * 2048 + 48 * per_layer + 2048 == 30_532_122_624
  assert flops.active_params(cfg) == 30_532_122_624 - 48 * 120 * 3 * 2048 * 768 == 3_353_032_704


def test_a_lora_step_with_expert_adapters_by_hand():
  # rank 2 on q_proj (8 -> 8, both layers: 2 * 16), gate_proj (8 -> 16, the dense layer 0 only: 24) and
  # experts.down_proj (6 -> 8, MoE layer 1, once per routed expert: 2 * 14): 2 * r * (32 + 24 + 28) = 336 / token.
  from dpo_jax import lora
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "gate_proj", "experts.down_proj"))
  assert flops.adapter_flops_per_token(MOE_CFG, spec) == 336


def test_executed_moe_flops_match_xla_cost_analysis_of_the_dense_expert_kernel():
  # moe_impl='dense' multiplies every token by all E experts: XLA's count is the executed count, not the model's.
  cfg = model.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=2, attention_impl="xla", weight_grad_gemm="xla", num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=128, moe_impl="dense")
  decoder = model.make_model(cfg)
  ids_NxT = jnp.zeros((4, 16), jnp.int32)
  forward = lambda p, ids: decoder.apply({"params": p}, ids, ids, jnp.ones_like(ids))
  cost = jax.jit(forward).lower(model.abstract_params(cfg), ids_NxT).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  tokens, square_minus_triangle = 64, 4 * (16 * 16 - 16 * 17 // 2)
  executed = (flops.forward_flops(cfg, {"input_ids": ids_NxT}) + flops.attention_flops_per_pair(cfg) *
              square_minus_triangle + (flops.dense_flops_per_token(cfg, executed=True) -
                                       flops.dense_flops_per_token(cfg)) * tokens)
  assert executed == pytest.approx(cost["flops"], rel=0.05), (executed, cost["flops"])
  assert flops.forward_flops(cfg, {"input_ids": ids_NxT}) < 0.8 * cost["flops"]  # the model count is k of E
