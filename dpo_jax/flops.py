"""Model FLOPs of a train step, the peak FLOP/s of a device, and model FLOPs utilisation (MFU).

    mfu = train_step_flops(cfg, batch, reference=...) / step_time / (peak_flops(device)[0] * num_devices)

MFU counts the FLOPs the model needs, not what the hardware ran: PaLM's definition (Chowdhery et al. 2022,
"PaLM: Scaling Language Modeling with Pathways", appendix B), where a token costs 6N (N matmul parameters) for a
forward and backward plus the attention term. Rematerialisation (`model.remat`) and chunked log-probs recompute
activations in the backward pass; those FLOPs are real work but not model FLOPs, so remat lowers MFU.

Counting rules, per forward pass over a batch (`forward_flops`), FLOPs = 2 x multiply-adds::

  dense       2 * L * (D * hd * (2H + 2K) + 3 * D * F) per token that goes through the layers: q, k, v, o
              projections (H query heads, K key/value heads of width hd) and the gated MLP (gate, up, down).
              A mixture-of-experts layer (`moe.is_moe_layer`) replaces 3 * D * F by its router and the k experts
              the token is routed to: D * E + k * 3 * D * Fe (E experts of hidden width Fe =
              `resolved_moe_intermediate_size`, k = `num_experts_per_tok`); the other E - k experts cost the token
              nothing. So a token costs 2 x the *active* matmul params (`layer_matmul_params`, `active_params`),
              not the total (`total_params`): Qwen3-30B-A3B has 30.5B params, 3.3B active.
  LM head     2 * D * V per position the head runs on (what logprobs.sequence_logps does):
                rows layout (`input_ids` [N, T], no `prompt_ids`; SFT, DPO, ranked, packed): all N * T positions
                  (the logits of the last column are computed and then dropped);
                shared-prompt layout (`prompt_ids` [B, P] + `input_ids` [K B, R]): the K B * R response-scoring
                  positions only (the prompt's last column for token 0, response position j - 1 for token j);
                  the prompt rows never go through the head.
              With `logits_chunk_size = C` the head runs on the T - 1 (rows) or R (shared) scoring positions padded
              up to a multiple of C; the count stays N * T or K B * R (chunk padding, like remat, is not model FLOPs).
  attention   4 * L * H * hd per (query, visible key) pair: the QK^T scores and the PV product, 2 * hd each per head.
              Causal attention counts half the square, as MaxText does (`maxtext_utils.
              calculate_tflops_training_per_device` halves T^2; here the triangle keeps its diagonal): a row of T
              tokens has T (T + 1) / 2 pairs; shared prompts have P (P + 1) / 2 per prompt row and R * P + R (R + 1) / 2
              per response row (every prompt column, then causal over the response). Packed rows (`[R, L]` with
              `pack_slots`) are counted as causal over the whole row, L (L + 1) / 2, not the smaller sum over
              segments: the kernels skip work above the diagonal only and apply the segment mask inside the triangle.
  not counted embedding lookups, norms, RoPE, softmax, the loss and the optimizer update (all O(D) per token).

Model FLOPs, not executed FLOPs: `moe_impl='dense'` (`moe.dense_experts`, for tiny tests) runs all E experts on
every token, E / k times the experts' FLOPs counted here, and `'capacity'` computes its padding slots; MFU still
counts the k routed experts (a faster kernel does the same model work). `dense_flops_per_token(cfg,
executed=True)` counts E experts per token for `moe_impl='dense'`: what the hardware does (XLA's cost analysis).

Padding tokens count like real ones: the step computes them. A train step (`train_step_flops`) is a policy forward
and its backward (twice the forward: gradients of activations and of weights), 3 forwards, plus one reference
forward when pi_ref runs in the step. Gradient accumulation splits the same global batch into micro-batches by
rows, so the FLOPs of an optimizer step do not change with it.

Peaks (`peak_flops`): `override` (config.perf.peak_flops) when > 0; else on CPU the best rate of a jitted fp32 matmul
measured once per process (the CPU model computes in fp32); else the published dense (no sparsity) bf16 peak of the
device kind in `PEAK_BF16_FLOPS`; else NaN, and the log shows perf/mfu = nan.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dpo_jax import model, moe

# Published dense bf16 peak FLOP/s of one device (NVIDIA lists tensor-core rates with 2:4 sparsity; these are half).
# Keys are matched as case-insensitive substrings of `jax.Device.device_kind`, first match in this order, so a
# specific kind comes before its family ('H100 PCIe' before 'H100', 'TPU v5 lite' before 'TPU v5'). Kinds as jax
# reports them: 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H200', 'NVIDIA GH200 480GB' (matches 'H200':
# its Hopper GPU has the H100 SXM rate), 'NVIDIA A100-SXM4-80GB', 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' (v5p),
# 'TPU v6 lite' (v6e). Not listed: 'TPU v4 lite' (v4i, no Cloud TPU, which would match 'TPU v4'); set
# config.perf.peak_flops for it and for any other kind.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU v4": 275e12,
}

PEAK_SOURCES: dict[str, str] = {
    "H100 PCIe": "NVIDIA H100 datasheet, H100 PCIe: 1513 TFLOP/s bf16 with sparsity",
    "H100 NVL": "NVIDIA H100 datasheet, H100 NVL: 1671 TFLOP/s bf16 with sparsity",
    "H200 NVL": "NVIDIA H200 datasheet, H200 NVL: 1671 TFLOP/s bf16 with sparsity",
    "H100": "NVIDIA H100 datasheet, H100 SXM: 1979 TFLOP/s bf16 with sparsity",
    "H200": "NVIDIA H200 datasheet, H200 SXM: 1979 TFLOP/s bf16 with sparsity",
    "A100": "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense",
    "TPU v5 lite": "Google Cloud TPU system architecture, v5e: 197 TFLOP/s bf16",
    "TPU v5e": "Google Cloud TPU system architecture, v5e: 197 TFLOP/s bf16",
    "TPU v5p": "Google Cloud TPU system architecture, v5p: 459 TFLOP/s bf16",
    "TPU v5": "Google Cloud TPU system architecture, v5p: 459 TFLOP/s bf16",
    "TPU v6 lite": "Google Cloud TPU system architecture, v6e: 918 TFLOP/s bf16",
    "TPU v6e": "Google Cloud TPU system architecture, v6e: 918 TFLOP/s bf16",
    "TPU v4": "Google Cloud TPU system architecture, v4: 275 TFLOP/s bf16",
}

# The CPU peak: an n^3 fp32 matmul, best of MEASURE_REPEATS after one compile-and-warm-up call (~0.1 s on 2 cores).
MEASURE_SIZE = 1024
MEASURE_REPEATS = 4


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(n) for n in x.shape)


def experts_per_token(cfg: model.ModelConfig, *, executed: bool = False) -> int:
  """Experts one token runs through in an MoE layer: k (`num_experts_per_tok`, the model FLOPs), or with `executed`
  and `moe_impl='dense'` all E (that kernel runs every expert on every token)."""
  return cfg.num_experts if executed and moe.resolve_impl(cfg) == "dense" else cfg.num_experts_per_tok


def mlp_matmul_params(cfg: model.ModelConfig, layer: int, *, executed: bool = False) -> int:
  """Weights one token multiplies by in layer `layer`'s MLP: 3 D F (gate, up, down) for a dense MLP; for an MoE
  layer the router D E plus 3 D Fe for each of `experts_per_token` experts (no biases: they are not matmuls)."""
  d = cfg.hidden_size
  if not moe.is_moe_layer(cfg, layer):
    return 3 * d * cfg.intermediate_size
  return d * cfg.num_experts + experts_per_token(cfg, executed=executed) * 3 * d * cfg.resolved_moe_intermediate_size


def layer_matmul_params(cfg: model.ModelConfig, *, executed: bool = False) -> int:
  """Projection weights one token multiplies by, all layers: q, k, v, o and each layer's MLP (`mlp_matmul_params`);
  no embedding, LM head or norms. With MoE layers these are the active ones (k of E experts)."""
  d, hd = cfg.hidden_size, cfg.resolved_head_dim
  attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return sum(attn + mlp_matmul_params(cfg, i, executed=executed) for i in range(cfg.num_layers))


def dense_flops_per_token(cfg: model.ModelConfig, *, executed: bool = False) -> float:
  """FLOPs of the layers' projections and MLPs for one token, all layers (no LM head, no attention scores): 2 x
  `layer_matmul_params`, MoE layers counting their router and k routed experts. `executed`: E experts for
  `moe_impl='dense'` (module docstring; not model FLOPs, so not what MFU counts)."""
  return 2.0 * layer_matmul_params(cfg, executed=executed)


def total_params(cfg: model.ModelConfig) -> int:
  """Every param of the model (`model.count_params` of its abstract params): embedding, layers, all E experts of
  each MoE layer, norms, LM head."""
  return model.count_params(model.abstract_params(cfg))


def inactive_params(cfg: model.ModelConfig) -> int:
  """Params a token never touches: the E - k experts it is not routed to, in every MoE layer (0 for dense models)."""
  unused = cfg.num_experts - cfg.num_experts_per_tok
  return len(moe.moe_layers(cfg)) * unused * 3 * cfg.hidden_size * cfg.resolved_moe_intermediate_size


def active_params(cfg: model.ModelConfig) -> int:
  """Params one token uses in a forward: `total_params` less the E - k unrouted experts of each MoE layer
  (`inactive_params`); equal to `total_params` for a dense model. Qwen3-30B-A3B: 30.5B total, 3.3B active."""
  return total_params(cfg) - inactive_params(cfg)


def head_flops_per_position(cfg: model.ModelConfig) -> float:
  """FLOPs of the LM head at one position: a `[D] @ [D, V]` product."""
  return 2.0 * cfg.hidden_size * cfg.vocab_size


def attention_flops_per_pair(cfg: model.ModelConfig) -> float:
  """FLOPs of QK^T and PV for one (query, visible key) pair, all heads and layers."""
  return 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim


def causal_pairs(length: int) -> int:
  """(query, key) pairs of causal attention over `length` tokens: the triangle with its diagonal."""
  return length * (length + 1) // 2


def forward_flops(cfg: model.ModelConfig, batch: Mapping[str, Any]) -> float:
  """Model FLOPs of one forward pass over `batch` (module docstring); only the arrays' `.shape` is read.

  `batch`: rows (`input_ids` `[N, T]`, packed or not) or shared prompts (`prompt_ids` `[B, P]`, `input_ids`
  `[K B, R]`); values are arrays or `jax.ShapeDtypeStruct` values.
  """
  weights, scores, _ = _forward_parts(cfg, batch)
  return weights + scores


def attention_forward_flops(cfg: model.ModelConfig, batch: Mapping[str, Any]) -> float:
  """The attention term of `forward_flops` alone (QK^T and PV over the visible pairs, all layers): what a fused
  attention kernel computes, and what a compiler's count leaves out when the kernel is a custom call."""
  return _forward_parts(cfg, batch)[1]


def _forward_parts(cfg: model.ModelConfig, batch: Mapping[str, Any]) -> tuple[float, float, float]:
  """(projections + MLPs + LM head, attention scores) FLOPs of one forward over `batch`, and its token count."""
  n, t = _shape(batch["input_ids"])
  if "prompt_ids" in batch:
    b, p = _shape(batch["prompt_ids"])
    tokens, head_positions = b * p + n * t, n * t
    pairs = b * causal_pairs(p) + n * (t * p + causal_pairs(t))
  else:
    tokens, head_positions, pairs = n * t, n * t, n * causal_pairs(t)
  return (dense_flops_per_token(cfg) * tokens + head_flops_per_position(cfg) * head_positions,
          attention_flops_per_pair(cfg) * pairs, float(tokens))


MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # LoRA targets of the dense MLP (lora.TARGETS)


def adapter_flops_per_token(cfg: model.ModelConfig, spec: Any) -> float:
  """FLOPs of the LoRA updates `x A B` for one token, all layers: 2 r (in + out) per adapted projection. Attention
  targets adapt every layer, the dense MLP's (`MLP_TARGETS`) the dense layers only, the experts' ('experts.gate_proj',
  ...) the MoE layers, once for each of the token's k routed experts."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
  fe = cfg.resolved_moe_intermediate_size
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, f),
          "up_proj": (d, f), "down_proj": (f, d), "experts.gate_proj": (d, fe), "experts.up_proj": (d, fe),
          "experts.down_proj": (fe, d)}
  total = 0
  for layer in range(cfg.num_layers):
    is_moe = moe.is_moe_layer(cfg, layer)
    for t in spec.targets:
      if t.startswith("experts."):
        total += cfg.num_experts_per_tok * sum(dims[t]) if is_moe else 0
      elif t in MLP_TARGETS:
        total += 0 if is_moe else sum(dims[t])
      else:
        total += sum(dims[t])
  return 2.0 * spec.rank * total


def train_step_flops(cfg: model.ModelConfig, batch: Mapping[str, Any], *, reference: bool,
                     lora: Any | None = None) -> float:
  """Model FLOPs of one optimizer step over the global `batch`: policy forward + backward (3 forwards), plus one
  reference forward if `reference` (pi_ref runs in the step; not with precomputed log-probs or reference-free
  losses). The same for any number of gradient-accumulation micro-batches. MoE layers count their router and the k
  routed experts of each token (`active_params`), whatever `moe_impl` executes: these are the FLOPs MFU divides.

  LoRA (`lora`: a `lora.LoraSpec`): the frozen weights get no gradient, so the projections and LM head cost a
  forward and an input gradient (2 forwards, not 3); attention scores still 3 (they hold no weights); the
  adapters 3 times their forward; the reference forward is the base alone."""
  if lora is None:
    return (4.0 if reference else 3.0) * forward_flops(cfg, batch)
  weights, scores, tokens = _forward_parts(cfg, batch)
  policy = 2.0 * weights + 3.0 * scores + 3.0 * adapter_flops_per_token(cfg, lora) * tokens
  return policy + (weights + scores if reference else 0.0)


def published_peak(device_kind: str) -> tuple[float, str] | None:
  """(FLOP/s, source) of the first `PEAK_BF16_FLOPS` key found in `device_kind` (case-insensitive), else None."""
  kind = device_kind.lower()
  for key, peak in PEAK_BF16_FLOPS.items():
    if key.lower() in kind:
      return peak, PEAK_SOURCES[key]
  return None


@functools.cache
def measured_cpu_peak() -> float:
  """Best FLOP/s of a jitted fp32 n^3 matmul (n = `MEASURE_SIZE`) on the default CPU device (2 n^3 FLOPs each), once
  per process: the CPU has no published peak, and its rate depends on cores, SIMD width and the XLA build."""
  n = MEASURE_SIZE
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()  # compile and warm up outside the timing
  best = math.inf
  for _ in range(MEASURE_REPEATS):
    t0 = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / max(best, 1e-9)


def peak_flops(device: Any | None = None, override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where it came from): 'config' for `override` > 0 (config.perf.peak_flops), else
  'measured: ...' on CPU, 'published: <source>' for a kind in `PEAK_BF16_FLOPS`, or (nan, 'unknown device kind ...').

  `device`: a `jax.Device` (anything with `platform` and `device_kind`); None = `jax.devices()[0]`. Never raises
  for an unknown device: MFU is a report, not a reason to stop training.
  """
  if override and override > 0:
    return float(override), "config"
  device = jax.devices()[0] if device is None else device
  platform, kind = getattr(device, "platform", ""), str(getattr(device, "device_kind", ""))
  if platform == "cpu":
    return measured_cpu_peak(), f"measured: best fp32 {MEASURE_SIZE}^3 matmul on {kind or 'cpu'}"
  found = published_peak(kind)
  if found is None:
    return math.nan, (f"unknown device kind {kind!r} on {platform or '?'}; set config.perf.peak_flops to its peak "
                      "FLOP/s per device")
  return found[0], f"published: {found[1]}"


def mfu(step_flops: float, step_time: float, peak_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilisation in [0, 1]: `step_flops` (FLOPs per step, all devices) / `step_time` (s) over the peak
  of `num_devices` devices (FLOP/s each). NaN when the peak is unknown (NaN) or a time or count is not positive."""
  if not (step_time > 0 and num_devices > 0 and peak_per_device > 0):
    return math.nan
  return step_flops / step_time / (peak_per_device * num_devices)
