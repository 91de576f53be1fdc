"""Llama-family decoder-only transformer (Flax linen): RMSNorm, RoPE, SwiGLU, grouped-query attention.

The forward is a pure function of (params, token ids, positions, attention mask):

    logits_BxTxV = make_model(cfg).apply({'params': params}, ids_BxT, positions_BxT, mask_BxT)

Params are a plain nested dict. Every param carries logical axis names (`param_logical_axes`), which
`sharding.py` maps to mesh axes, so the model code itself never names a mesh axis.

Attention mask semantics: `mask_BxT` holds segment ids. Token t attends token s iff s <= t and
mask[s] == mask[t]. With a 0/1 padding mask this means real tokens never see padding (and padding rows see
only padding, so no softmax row is empty); with packed sequences (ids 1, 2, ...) each segment only sees
itself.

Shared prompts (`hidden` with two streams, see `Decoder.hidden`): the prompt stream `[B, P]` is a batch of
left-padded prompts (0/1 mask) under the rule above; the response stream `[K B, R]` holds K responses per
prompt (rows k B .. in prompt order: row r belongs to prompt r // K), and each response token attends every
real token of its prompt plus its own response causally. That is exactly the attention of the row
`prompt + response`, with the prompt computed once for its K responses.

Conventions follow HF `LlamaForCausalLM` so checkpoints convert without permutation: RoPE rotates the two
halves of each head (`rotate_half`), query head h reads key/value head h // (num_heads // num_kv_heads),
RMSNorm is computed in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax import attention, context_parallel, lora as lora_lib, moe, platforms
from dpo_jax.sharding import ShardingContext, constrain

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# RoPE frequency scalings (HF `rope_parameters['rope_type']`); 'none' is HF's 'default'. See `rope_inv_freq`.
ROPE_SCALING_TYPES = ("none", "linear", "llama3")

# How the weight gradient of the MLP and LM-head matmuls is computed (see `matmul`).
WEIGHT_GRAD_GEMMS = ("auto", "xla", "row_major")

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of the decoder. Field meanings are documented in configs/default.py."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling_type: str = "none"  # one of ROPE_SCALING_TYPES
  rope_scaling_factor: float = 1.0  # 'linear' and 'llama3': context extension factor
  rope_low_freq_factor: float = 1.0  # 'llama3' only
  rope_high_freq_factor: float = 4.0  # 'llama3' only
  rope_original_max_positions: int = 8192  # 'llama3' only: pre-training context length
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2-style biases on q, k, v
  attn_out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
  mlp_activation: str = "silu"  # gate activation: 'silu' (SwiGLU) or 'gelu_tanh' (Gemma's GeGLU)
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  norm_offset: float = 0.0  # Gemma: RMSNorm scales by (norm_offset + w), w initialised to 1 - norm_offset
  initializer_range: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  matmul_precision: str = "default"  # 'highest' for true fp32 matmuls on TPU
  # One of REMAT_POLICIES, or 'auto': the trainer picks by memory (train/runtime.resolve_remat); built directly
  # (no device or batch known) 'auto' is 'none'.
  remat: str = "none"
  # > 0: log-probs from the LM head in sequence chunks (logprobs.py); 0: all at once; 'auto': chunk when the logits
  # are large (`logprobs.logits_chunk`).
  logits_chunk_size: int | str = "auto"
  scan_layers: bool = False
  weight_grad_gemm: str = "auto"  # one of WEIGHT_GRAD_GEMMS: 'row_major' on CPU, 'xla' elsewhere when 'auto'
  attention_impl: str = "auto"  # one of attention.ATTENTION_IMPLS; 'auto' picks by platform and shapes
  context_parallel: str = "ring"  # one of context_parallel.CONTEXT_PARALLEL: attention across 'sequence' shards
  context_load_balance: str = "zigzag"  # one of context_parallel.LOAD_BALANCE: the token order over the shards
  # The backend the program is built for: '' = jax.default_backend() where it is traced. Set it ('tpu', 'cuda' /
  # 'gpu', 'cpu') to lower or export for another platform than this process's (jax.export, AOT compiles): every
  # 'auto' choice above (compute dtype, attention kernel, weight-gradient layout) then follows it.
  platform: str = ""
  # Mixture of experts (dpo_jax/moe.py). 0 experts: every layer has the dense MLP.
  num_experts: int = 0  # E experts per MoE layer (Mixtral's num_local_experts, Qwen3-MoE's num_experts)
  num_experts_per_tok: int = 2  # k: experts each token is routed to
  moe_intermediate_size: int | None = None  # each expert's hidden width; None: intermediate_size (Mixtral)
  norm_topk_prob: bool = True  # renormalise the k routing weights to sum 1 (Mixtral always; Qwen3-MoE's flag)
  moe_layer_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 (Qwen3-MoE's decoder_sparse_step)...
  dense_layers: tuple[int, ...] = ()  # ...and i is not listed here (Qwen3-MoE's mlp_only_layers)
  moe_impl: str = "auto"  # one of moe.MOE_IMPLS: 'ragged' (dropless grouped matmuls), 'dense', 'capacity'
  moe_capacity_factor: float = 1.25  # 'capacity' (and the expert-parallel exchange with it): slots per expert
  router_aux_loss_coef: float = 0.0  # the checkpoint's load-balancing coefficient (config.loss.router_aux_coef)

  def __post_init__(self):
    if self.platform not in platforms.PLATFORMS:
      raise ValueError(f"model: platform={self.platform!r}; choose one of {list(platforms.PLATFORMS)} ('' = this "
                       "process's jax.default_backend()).")
    if self.compute_dtype == "auto":  # bf16 where the matrix units are bf16 (GPU tensor cores, TPU MXU)
      object.__setattr__(self, "compute_dtype", "float32" if backend(self) == "cpu" else "bfloat16")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"model: compute_dtype={self.compute_dtype!r}; choose one of {list(COMPUTE_DTYPES)} or 'auto' "
                       "(bfloat16 on GPU/TPU, float32 on CPU).")
    if self.attention_impl not in attention.ATTENTION_IMPLS:
      raise ValueError(f"model: attention_impl={self.attention_impl!r}; choose one of "
                       f"{list(attention.ATTENTION_IMPLS)}.")
    if self.context_parallel not in context_parallel.CONTEXT_PARALLEL:
      raise ValueError(f"model: context_parallel={self.context_parallel!r}; choose one of "
                       f"{list(context_parallel.CONTEXT_PARALLEL)}.")
    if self.context_load_balance not in context_parallel.LOAD_BALANCE:
      raise ValueError(f"model: context_load_balance={self.context_load_balance!r}; choose one of "
                       f"{list(context_parallel.LOAD_BALANCE)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.")
    if isinstance(self.logits_chunk_size, str) and self.logits_chunk_size.isdigit():  # a config flag's string
      object.__setattr__(self, "logits_chunk_size", int(self.logits_chunk_size))
    if self.logits_chunk_size != "auto" and (not isinstance(self.logits_chunk_size, int)
                                             or self.logits_chunk_size < 0):
      raise ValueError(f"model: logits_chunk_size={self.logits_chunk_size!r} must be an int >= 0 (0 = no chunking) "
                       "or 'auto'.")
    if self.remat not in REMAT_POLICIES and self.remat != "auto":
      raise ValueError(f"model: remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)} or 'auto'.")
    if self.resolved_head_dim % 2:
      raise ValueError(f"model: head_dim={self.resolved_head_dim} must be even for RoPE.")
    if self.weight_grad_gemm not in WEIGHT_GRAD_GEMMS:
      raise ValueError(f"model: weight_grad_gemm={self.weight_grad_gemm!r}; choose one of {list(WEIGHT_GRAD_GEMMS)}.")
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"model: mlp_activation={self.mlp_activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    _check_rope_scaling(self)
    _check_moe(self)

  @property
  def resolved_moe_intermediate_size(self) -> int:
    return self.moe_intermediate_size or self.intermediate_size

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def from_dict(cls, d: Any) -> "ModelConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"config.model: unknown fields {sorted(unknown)}.")
    return cls(**d)


def backend(cfg: ModelConfig) -> str:
  """'cpu', 'gpu' or 'tpu': the platform `cfg` is built for (`platforms.resolve`). Every backend-dependent choice
  (compute dtype, attention kernel, weight-gradient layout) reads this, so a program lowered for a TPU on a CPU
  host (`platform='tpu'`) contains none of the CPU-only paths."""
  return platforms.resolve(cfg.platform)


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _row_major_weight_grad(cfg: ModelConfig, shard: ShardingContext | None = None) -> bool:
  if context_parallel.degree(shard) > 1:
    # The row-major path flattens (batch, length) into one token axis, which a layout sharded over length cannot
    # express: the partitioner would gather every device's tokens (measured: the full [N, T, V] logits per device).
    return False
  if cfg.weight_grad_gemm == "auto":
    return backend(cfg) == "cpu"
  return cfg.weight_grad_gemm == "row_major"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_row_major_wgrad(x_NxD, w_DxF, precision, out_dtype):
  return jnp.matmul(x_NxD, w_DxF, precision=precision, preferred_element_type=out_dtype)


def _matmul_fwd(x_NxD, w_DxF, precision, out_dtype):
  return _matmul_row_major_wgrad(x_NxD, w_DxF, precision, out_dtype), (x_NxD, w_DxF)


def _matmul_bwd(precision, out_dtype, residuals, dy_NxF):
  x_NxD, w_DxF = residuals
  dy_NxF = dy_NxF.astype(x_NxD.dtype)
  dx_NxD = jnp.einsum("nf,df->nd", dy_NxF, w_DxF, precision=precision)
  # The narrower of x and dy transposed as its own array, so the weight gradient is a plain row-major GEMM over
  # the token axis (see `matmul`). The barriers stop XLA folding a transpose back into the dot (including the
  # small [F, D] -> [D, F] one of the result, which it would turn into a dot contracting x's token axis).
  barrier = jax.lax.optimization_barrier
  if x_NxD.shape[1] <= dy_NxF.shape[1]:
    dw_DxF = jnp.matmul(barrier(x_NxD.T), dy_NxF, precision=precision)
  else:
    dw_DxF = barrier(jnp.matmul(barrier(dy_NxF.T), x_NxD, precision=precision)).T
  return dx_NxD, dw_DxF.astype(w_DxF.dtype)


_matmul_row_major_wgrad.defvjp(_matmul_fwd, _matmul_bwd)


def _row_major_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for a projection (lhs's trailing dims contracted with rhs's leading ones, no batch dims:
  what `nn.Dense` / `nn.DenseGeneral` emit), as one `[N, D] @ [D, F]` product with the row-major weight
  gradient of `matmul`; any other contraction goes to `lax.dot_general` unchanged."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  n = len(lhs_c)
  if lhs_b or rhs_b or tuple(lhs_c) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rhs_c) != tuple(range(n)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  lead, out = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
  d = math.prod(rhs.shape[:n])
  with jax.named_scope(platforms.ROW_MAJOR_WEIGHT_GRAD):
    y_NxF = _matmul_row_major_wgrad(lhs.reshape(-1, d), rhs.reshape(d, -1), precision, preferred_element_type)
  return y_NxF.reshape(lead + out)


def projection_dot_general(cfg: ModelConfig, shard: ShardingContext | None = None) -> Any:
  """The `dot_general` the model's projections (`nn.Dense`, `nn.DenseGeneral`) use: see `matmul`."""
  return _row_major_dot_general if _row_major_weight_grad(cfg, shard) else None  # None: lax.dot_general


def matmul(x_NxD: jax.Array, w_DxF: jax.Array, cfg: ModelConfig, out_dtype: Any = None,
           shard: ShardingContext | None = None) -> jax.Array:
  """`x [..., D] @ w [D, F] -> [..., F]`, as every projection (attention, MLP, LM head) computes it.

  The weight gradient `dW = x^T dy` contracts the token axis of both operands. On CPU, XLA keeps its YNNPACK
  GEMMs row-major by copying an operand to a transposed layout, and it picked the wide `dy` of the MLP
  (`[N, 688]` in the tiny benchmark config), fused into the SwiGLU backward as a strided write: the largest
  layout cost of the step (`benchmarks/dpo_step.py --profile`). With `cfg.weight_grad_gemm='row_major'` (the CPU
  default) the backward transposes the narrower of `x` and `dy` as its own array and computes `dW` as a
  row-major GEMM. The values are the same products summed in another order; `'xla'` (the default off CPU, and
  whenever `shard` splits the sequence over devices) leaves the layout to XLA.
  """
  dot_general = projection_dot_general(cfg, shard) or jax.lax.dot_general
  return dot_general(x_NxD, w_DxF, (((x_NxD.ndim - 1,), (0,)), ((), ())), precision=cfg.matmul_precision,
                     preferred_element_type=out_dtype)


def _check_rope_scaling(cfg: ModelConfig) -> None:
  """Raise naming the RoPE scaling field that is invalid (called from `ModelConfig.__post_init__`)."""
  kind = cfg.rope_scaling_type
  if kind not in ROPE_SCALING_TYPES:
    raise ValueError(f"model: rope_scaling_type={kind!r}; choose one of {list(ROPE_SCALING_TYPES)} (HF's yarn, "
                     "dynamic and longrope scalings are not implemented).")
  if kind == "none" and cfg.rope_scaling_factor != 1.0:
    raise ValueError(f"model: rope_scaling_factor={cfg.rope_scaling_factor} has no effect with "
                     "rope_scaling_type='none'; set rope_scaling_type='linear' or 'llama3', or the factor to 1.0.")
  if cfg.rope_scaling_factor <= 0:
    raise ValueError(f"model: rope_scaling_factor={cfg.rope_scaling_factor} must be > 0 (1.0 = no scaling).")
  if kind == "llama3":
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    if not 0 < low < high:
      raise ValueError(f"model: rope_low_freq_factor={low}, rope_high_freq_factor={high}; 'llama3' RoPE needs "
                       "0 < low < high (Llama 3.1 uses 1.0 and 4.0).")
    if cfg.rope_original_max_positions <= 0:
      raise ValueError(f"model: rope_original_max_positions={cfg.rope_original_max_positions} must be > 0 "
                       "(the pre-training context length, 8192 for Llama 3.1).")


def _check_moe(cfg: ModelConfig) -> None:
  """Raise naming the mixture-of-experts field that is invalid (called from `ModelConfig.__post_init__`)."""
  object.__setattr__(cfg, "dense_layers", tuple(int(i) for i in cfg.dense_layers))
  if cfg.num_experts < 0:
    raise ValueError(f"model: num_experts={cfg.num_experts} must be >= 0 (0 = dense MLPs).")
  if not cfg.num_experts:
    return
  if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
    raise ValueError(f"model: num_experts_per_tok={cfg.num_experts_per_tok} must be in [1, num_experts="
                     f"{cfg.num_experts}].")
  if cfg.moe_impl not in moe.MOE_IMPLS:
    raise ValueError(f"model: moe_impl={cfg.moe_impl!r}; choose one of {list(moe.MOE_IMPLS)}.")
  if cfg.moe_layer_step < 1:
    raise ValueError(f"model: moe_layer_step={cfg.moe_layer_step} must be >= 1 (Qwen3-MoE's decoder_sparse_step).")
  if not cfg.moe_capacity_factor > 0:
    raise ValueError(f"model: moe_capacity_factor={cfg.moe_capacity_factor} must be > 0.")
  if cfg.mlp_bias:
    raise ValueError("model: mlp_bias=True with num_experts > 0; the experts have no biases (Mixtral, Qwen3-MoE).")
  kinds = {moe.is_moe_layer(cfg, i) for i in range(cfg.num_layers)}
  if cfg.scan_layers and len(kinds) > 1:
    raise ValueError(f"model: scan_layers=True needs every layer alike, but layers {list(moe.moe_layers(cfg))} are "
                     "MoE and the others dense (moe_layer_step, dense_layers); set scan_layers=False.")


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """RoPE inverse frequencies `[head_dim / 2]` in fp32, scaled per `cfg.rope_scaling_type`.

  'none': theta^(-2i / head_dim). 'linear': those divided by rope_scaling_factor (the same as dividing the
  positions). 'llama3' (Llama 3.1 / 3.2): with L = rope_original_max_positions, s = rope_scaling_factor and
  wavelength w = 2 pi / f, frequencies with w < L / high_freq_factor are kept, those with w > L / low_freq_factor
  are divided by s, and the band between interpolates, f * ((1 - a) / s + a) with
  a = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor).
  Formulas as in transformers' `modeling_rope_utils` (`_compute_default_rope_parameters`,
  `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`), evaluated in fp32 in the same order.
  """
  head_dim = cfg.resolved_head_dim
  inv_freq_H2 = 1.0 / (cfg.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling_type == "linear":
    return inv_freq_H2 / factor
  if cfg.rope_scaling_type != "llama3":
    return inv_freq_H2
  low, high, context = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_positions
  wavelen_H2 = 2 * math.pi / inv_freq_H2
  long_H2 = jnp.where(wavelen_H2 > context / low, inv_freq_H2 / factor, inv_freq_H2)
  smooth_H2 = (context / wavelen_H2 - low) / (high - low)
  smoothed_H2 = (1 - smooth_H2) * long_H2 / factor + smooth_H2 * long_H2
  medium_H2 = (wavelen_H2 >= context / high) & (wavelen_H2 <= context / low)
  return jnp.where(medium_H2, smoothed_H2, long_H2)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_H2: jax.Array) -> jax.Array:
  """Rotary position embedding, rotate-half convention, angles in fp32; `inv_freq_H2` from `rope_inv_freq`."""
  half = x_BxTxNxH.shape[-1] // 2
  angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
  sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
  cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any
  offset: float = 0.0  # the norm multiplies by (offset + scale); Gemma stores scale - 1

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.constant(1.0 - self.offset)
    scale = self.param("scale", _partitioned(init, ("norm",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


class Attention(nn.Module):
  cfg: ModelConfig
  shard: ShardingContext | None
  decode: bool = False
  lora: lora_lib.LoraSpec | None = None  # adapters on the projections it targets (lora.py)

  def _cached_kv_and_mask(self, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT):
    """Write this call's keys/values at slots [index, index + T) of the cache; attend every written slot.

    The cache (collection 'cache') holds keys after RoPE, values, and each slot's segment id, `[B, S, ...]`
    with S fixed when the cache was created (`init_cache`). Causality uses slot indices, so a left-padded
    prompt prefilled in one call and tokens decoded one at a time see exactly what a full forward sees.
    The index is traced, so the caller keeps index + T <= S (`dynamic_update_slice` would clamp silently).
    """
    t = k_BxTxKxD.shape[1]
    cached_k = self.variable("cache", "cached_k", jnp.zeros, k_BxTxKxD.shape, k_BxTxKxD.dtype)
    cached_v = self.variable("cache", "cached_v", jnp.zeros, v_BxTxKxD.shape, v_BxTxKxD.dtype)
    cached_seg = self.variable("cache", "segment_ids", jnp.zeros, segment_ids_BxT.shape, jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if cached_k.value.shape[0] != k_BxTxKxD.shape[0] or cached_k.value.shape[1] < t:
      raise ValueError(f"model: decoding (batch, tokens)={k_BxTxKxD.shape[:2]} into a cache of (batch, slots)="
                       f"{cached_k.value.shape[:2]}; build it with init_cache(cfg, batch_size, max_len).")
    if self.is_initializing():  # shapes only: `init_cache` zeroes what init creates
      return k_BxTxKxD, v_BxTxKxD, attention.attention_mask(segment_ids_BxT)
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxTxKxD, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxTxKxD, (0, i, 0, 0))
    cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids_BxT.astype(jnp.int32), (0, i))
    index.value = i + t
    slots_S = jnp.arange(cached_k.value.shape[1])
    causal_TxS = slots_S[None, :] <= (i + jnp.arange(t))[:, None]
    same_BxTxS = cached_seg.value[:, None, :] == segment_ids_BxT[:, :, None]
    return cached_k.value, cached_v.value, (causal_TxS[None] & same_BxTxS)[:, None, None]

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    """One stream `x_BxTxD` (with `positions_BxT`, `segment_ids_BxT`), or two as tuples: (prompts `[B, P]`,
    responses `[K B, R]`), the responses also attending their prompt (module docstring). Returns the same."""
    cfg = self.cfg
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    init = nn.initializers.normal(cfg.initializer_range)
    dense = functools.partial(
        nn.DenseGeneral, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
        precision=cfg.matmul_precision, dot_general=projection_dot_general(cfg, self.shard))

    def proj(name, heads, heads_axis, bias):
      return dense(
          features=(heads, d), use_bias=bias, name=name,
          kernel_init=_partitioned(init, ("embed", heads_axis, "head_dim")),
          bias_init=_partitioned(nn.initializers.zeros, (heads_axis, "head_dim")))

    q_proj, k_proj, v_proj = proj("q", h, "heads", cfg.qkv_bias), proj("k", k, "kv_heads", cfg.qkv_bias), proj(
        "v", k, "kv_heads", cfg.qkv_bias)
    adapter = functools.partial(_adapter, self.lora, cfg, "attn")
    q_lora, k_lora, v_lora = (adapter(name, (cfg.hidden_size,), (heads, d), ("embed",), (heads_axis, "head_dim"))
                              for name, heads, heads_axis in (("q", h, "heads"), ("k", k, "kv_heads"),
                                                              ("v", k, "kv_heads")))
    o_lora = adapter("o", (h, d), (cfg.hidden_size,), ("heads", "head_dim"), ("embed",))
    if cfg.qk_norm:  # per-head RMSNorm over head_dim, before RoPE (Qwen3)
      head_norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.compute_dtype, cfg.param_dtype, cfg.norm_offset)
      q_norm, k_norm = head_norm(name="q_norm"), head_norm(name="k_norm")
    out_proj = dense(
        features=cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attn_out_bias, name="o",
        kernel_init=_partitioned(init, ("heads", "head_dim", "embed")),
        bias_init=_partitioned(nn.initializers.zeros, ("norm",)))
    inv_freq_H2 = rope_inv_freq(cfg)

    def qkv(x_BxTxD, positions_BxT):
      q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = (lora_lib.adapted(p, a, x_BxTxD) for p, a in
                                         ((q_proj, q_lora), (k_proj, k_lora), (v_proj, v_lora)))
      if cfg.qk_norm:
        q_BxTxHxD, k_BxTxKxD = q_norm(q_BxTxHxD), k_norm(k_BxTxKxD)
      q_BxTxHxD = constrain(rope(q_BxTxHxD, positions_BxT, inv_freq_H2), ("batch", "length", "heads", None),
                            self.shard)
      k_BxTxKxD = constrain(rope(k_BxTxKxD, positions_BxT, inv_freq_H2), ("batch", "length", "kv_heads", None),
                            self.shard)
      return q_BxTxHxD, k_BxTxKxD, constrain(v_BxTxKxD, ("batch", "length", "kv_heads", None), self.shard)

    def out(o_BxTxHxD):
      return lora_lib.adapted(out_proj, o_lora, constrain(o_BxTxHxD, ("batch", "length", "heads", None), self.shard))

    # Sequence-sharded activations (mesh.sequence > 1): attention across the shards, on tokens in the
    # context_parallel.token_order that logprobs.sequence_logps puts them in.
    attend = (context_parallel.attention if context_parallel.degree(self.shard) > 1 and not self.decode
              else attention.causal_attention)
    if isinstance(x, tuple):  # (prompts, responses): each prompt computed once for its K responses
      if self.decode:
        raise ValueError("model: a shared-prompt forward has no KV-cached (decode) mode.")
      (xp_BxPxD, xr_NxRxD), (pos_p, pos_r), (seg_p, seg_r) = x, positions, segment_ids
      qp, kp, vp = qkv(xp_BxPxD, pos_p)
      qr, kr, vr = qkv(xr_NxRxD, pos_r)
      per_prompt = lambda a: jnp.repeat(a, xr_NxRxD.shape[0] // xp_BxPxD.shape[0], axis=0)  # prompt r // K
      prefix = attention.Prefix(per_prompt(kp), per_prompt(vp), per_prompt(seg_p > 0))
      return (out(attend(qp, kp, vp, seg_p, cfg, self.shard)),
              out(attend(qr, kr, vr, seg_r, cfg, self.shard, prefix=prefix)))
    q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = qkv(x, positions)
    if self.decode:
      k_BxSxKxD, v_BxSxKxD, mask = self._cached_kv_and_mask(k_BxTxKxD, v_BxTxKxD, segment_ids)
      return out(attention.attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, cfg))
    return out(attend(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids, cfg, self.shard))


class Mlp(nn.Module):
  cfg: ModelConfig
  shard: ShardingContext | None
  lora: lora_lib.LoraSpec | None = None

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    init = nn.initializers.normal(cfg.initializer_range)
    dense = functools.partial(
        nn.Dense, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, use_bias=cfg.mlp_bias,
        precision=cfg.matmul_precision, dot_general=projection_dot_general(cfg, self.shard))
    up_kernel = _partitioned(init, ("embed", "mlp"))
    up_bias = _partitioned(nn.initializers.zeros, ("mlp",))
    d, f = cfg.hidden_size, cfg.intermediate_size
    adapter = functools.partial(_adapter, self.lora, cfg, "mlp")
    gate_BxTxF = lora_lib.adapted(dense(f, kernel_init=up_kernel, bias_init=up_bias, name="gate"),
                                  adapter("gate", (d,), (f,), ("embed",), ("mlp",)), x_BxTxD)
    up_BxTxF = lora_lib.adapted(dense(f, kernel_init=up_kernel, bias_init=up_bias, name="up"),
                                adapter("up", (d,), (f,), ("embed",), ("mlp",)), x_BxTxD)
    hidden_BxTxF = constrain(ACTIVATIONS[cfg.mlp_activation](gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"),
                             self.shard)
    down = dense(d, kernel_init=_partitioned(init, ("mlp", "embed")),
                 bias_init=_partitioned(nn.initializers.zeros, ("norm",)), name="down")
    return lora_lib.adapted(down, adapter("down", (f,), (d,), ("mlp",), ("embed",)), hidden_BxTxF)


def _adapter(spec: lora_lib.LoraSpec | None, cfg: ModelConfig, module: str, projection: str, in_shape, out_shape,
             in_axes, out_axes) -> lora_lib.Adapter | None:
  """The LoRA adapter of `module`/`projection` (named `<projection>_lora` beside it) if `spec` targets it."""
  if spec is None or not spec.adapts(module, projection):
    return None
  return lora_lib.Adapter(spec, in_shape, out_shape, in_axes, out_axes, cfg.compute_dtype, cfg.param_dtype,
                          cfg.matmul_precision, name=f"{projection}_lora")


class Block(nn.Module):
  """Pre-norm residual block; (carry, None) in and out so it can be scanned over layers. The carry is one
  stream `[B, T, D]` or a (prompts, responses) tuple of two (see `Attention`); norms and MLP act per token."""
  cfg: ModelConfig
  shard: ShardingContext | None
  decode: bool = False
  lora: lora_lib.LoraSpec | None = None
  moe: bool = False  # the MLP is `moe.MoeMlp` (this layer's `moe.is_moe_layer`)

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.compute_dtype, cfg.param_dtype, cfg.norm_offset)
    attn_norm, mlp_norm = norm(name="attn_norm"), norm(name="mlp_norm")
    streams = isinstance(x, tuple)
    if self.moe:  # the router's sums mask padding by the segment ids
      moe_mlp = moe.MoeMlp(cfg, self.shard, ACTIVATIONS[cfg.mlp_activation], self.lora, name="mlp")
      seg = segment_ids if streams else (segment_ids,)
      per_stream = iter(seg)
      mlp = lambda h: moe_mlp(h, next(per_stream))
    else:
      mlp = Mlp(cfg, self.shard, self.lora, name="mlp")
    xs = x if streams else (x,)
    attn_in = tuple(attn_norm(x_BxTxD) for x_BxTxD in xs)
    attn_out = Attention(cfg, self.shard, self.decode, self.lora, name="attn")(attn_in if streams else attn_in[0],
                                                                              positions, segment_ids)
    xs = tuple(x_BxTxD + a_BxTxD for x_BxTxD, a_BxTxD in zip(xs, attn_out if streams else (attn_out,)))
    xs = tuple(constrain(x_BxTxD + mlp(mlp_norm(x_BxTxD)), ("batch", "length", "act_embed"), self.shard)
               for x_BxTxD in xs)
    return (xs if streams else xs[0]), None


class Decoder(nn.Module):
  """Token ids -> logits (fp32) or final hidden states. See the module docstring for the mask."""
  cfg: ModelConfig
  shard: ShardingContext | None = None
  decode: bool = False  # KV-cached incremental calls (collection 'cache'); see `sample.py`
  # LoRA adapters (collection 'lora', lora.py); applied only when the variables hold that collection, so the same
  # module computes the policy (base + adapters) and pi_ref (base alone). `apply_params` sets it from LoraParams.
  lora: lora_lib.LoraSpec | None = None

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
        embedding_init=_partitioned(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")))
    block = Block
    if cfg.remat not in ("none", "auto") and not self.decode:  # decoding keeps no activations for a backward pass
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      scanned = nn.scan(
          block, variable_axes={"params": 0, "cache": 0, "lora": 0, moe.ROUTER: 0, moe.ROUTER_LOGITS: 0},
          split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = scanned(cfg, self.shard, self.decode, self.lora, moe.is_moe_layer(cfg, 0))
    else:
      self.layers = [block(cfg, self.shard, self.decode, self.lora, moe.is_moe_layer(cfg, i), name=f"layers_{i}")
                     for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.param_dtype, cfg.norm_offset)
    if not cfg.tie_embeddings:
      self.lm_head = self.param(
          "lm_head", _partitioned(nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)

  def hidden(self, ids, positions, segment_ids):
    """Final (normed) hidden states `[B, T, hidden]` in the compute dtype.

    Shared prompts: each argument a tuple (prompt stream `[B, P]`, response stream `[K B, R]`, as `Attention`
    takes them), and so is the result: (`[B, P, hidden]`, `[K B, R, hidden]`).
    """
    # FSDP: gather the table's 'embed' shards before the lookup (the batch is split over the same mesh
    # axis); the 'vocab' split stays, and the partitioner masks and sums the lookup over it.
    table_VxD = constrain(self.embed.embedding, ("vocab", None), self.shard)

    def embed(ids_BxT):
      x_BxTxD = jnp.take(table_VxD, ids_BxT, axis=0).astype(self.cfg.compute_dtype)
      if self.cfg.embed_scale:  # Gemma: sqrt(D) rounded to the compute dtype first, as HF does
        x_BxTxD = x_BxTxD * jnp.asarray(self.cfg.hidden_size ** 0.5, self.cfg.compute_dtype)
      return constrain(x_BxTxD, ("batch", "length", "act_embed"), self.shard)

    x = tuple(embed(i) for i in ids) if isinstance(ids, tuple) else embed(ids)
    if self.cfg.scan_layers:
      x, _ = self.layers(x, positions, segment_ids)
    else:
      for layer in self.layers:
        x, _ = layer(x, positions, segment_ids)
    return tuple(self.final_norm(h) for h in x) if isinstance(x, tuple) else self.final_norm(x)

  def logits(self, hidden_BxTxD):
    """LM head with fp32 accumulation: logits `[B, T, vocab]` in fp32 whatever the compute dtype."""
    dtype = self.cfg.compute_dtype
    if self.cfg.tie_embeddings:
      kernel_DxV = self.embed.embedding.astype(dtype).T
    else:
      kernel_DxV = self.lm_head.astype(dtype)
    # FSDP: gather the kernel's 'embed' shards first, as for the embedding table. Left to itself the partitioner
    # may instead contract the fsdp-sharded D and sum [N, T, V] partial logits over fsdp (measured on an 8B model
    # at 32k tokens, mesh fsdp=4 x sequence=8: full-length logits per device, 98 GiB of step temporaries).
    kernel_DxV = constrain(kernel_DxV, (None, "vocab"), self.shard)
    logits = matmul(hidden_BxTxD.astype(dtype), kernel_DxV, self.cfg, out_dtype=jnp.float32, shard=self.shard)
    return constrain(logits, ("batch", "length", "vocab"), self.shard)

  def __call__(self, ids_BxT, positions_BxT, segment_ids_BxT):
    return self.logits(self.hidden(ids_BxT, positions_BxT, segment_ids_BxT))


def make_model(cfg: ModelConfig, shard: ShardingContext | None = None, decode: bool = False) -> Decoder:
  """The decoder; pass `shard` to pin activation shardings on a mesh (None: run unsharded), `decode=True`
  for KV-cached incremental calls (`apply(..., mutable=['cache'])`)."""
  return Decoder(cfg, shard, decode)


def apply_params(model: Decoder, params: Any, *args: Any, variables: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> Any:
  """`model.apply` on `params`: a plain param tree, or `lora.LoraParams` (the frozen base plus adapters, with the
  dropout rng of a train step). Every forward in dpo_jax goes through here, so LoRA needs nothing else.
  `variables`: more collections (the sampler's 'cache')."""
  if isinstance(params, lora_lib.LoraParams):
    rngs = {} if params.rng is None else {"dropout": params.rng}
    return model.clone(lora=params.spec).apply({"params": params.base, "lora": params.adapters, **(variables or {})},
                                               *args, rngs=rngs, **kwargs)
  return model.apply({"params": params, **(variables or {})}, *args, **kwargs)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Any:
  """An empty KV cache for `batch_size` rows of up to `max_len` tokens (prompt + generated)."""
  model = make_model(cfg, decode=True)
  ids = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _dummy_inputs(cfg: ModelConfig):
  ids = jnp.zeros((1, 2), jnp.int32)
  return ids, ids, jnp.ones((1, 2), jnp.int32)


def _init_model(cfg: ModelConfig) -> Decoder:
  """The decoder that `init` traces on 2 dummy tokens: the params do not depend on the attention kernel, so it
  runs 'xla', which takes any shape (a TPU's splash would refuse 2 tokens, or 'auto' warn that it falls back)."""
  return make_model(dataclasses.replace(cfg, attention_impl="xla"))


def _boxed_abstract_params(cfg: ModelConfig) -> Any:
  model = _init_model(cfg)
  return jax.eval_shape(lambda rng: model.init(rng, *_dummy_inputs(cfg))["params"], jax.random.key(0))


def abstract_params(cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the params (no FLOPs, no memory)."""
  return nn.meta.unbox(_boxed_abstract_params(cfg))


def param_logical_axes(cfg: ModelConfig) -> Any:
  """Pytree (same structure as the params) of logical axis-name tuples, e.g. ('embed', 'mlp')."""
  specs = nn.get_partition_spec(_boxed_abstract_params(cfg))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_params(cfg: ModelConfig, rng: jax.Array, shardings: Any | None = None) -> Any:
  """Random params, created directly in their shardings (`jit(init, out_shardings=...)`)."""
  model = _init_model(cfg)
  init = lambda r: nn.meta.unbox(model.init(r, *_dummy_inputs(cfg))["params"])
  return jax.jit(init, out_shardings=shardings)(rng)


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
