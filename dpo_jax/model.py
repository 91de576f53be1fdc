"""Llama-family decoder-only transformer (Flax linen): RMSNorm, RoPE, SwiGLU, grouped-query attention.

The forward is a pure function of (params, token ids, positions, attention mask):

    logits_BxTxV = make_model(cfg).apply({'params': params}, ids_BxT, positions_BxT, mask_BxT)

Params are a plain nested dict. Every param carries logical axis names (`param_logical_axes`), which
`sharding.py` maps to mesh axes, so the model code itself never names a mesh axis.

Attention mask semantics: `mask_BxT` holds segment ids. Token t attends token s iff s <= t and
mask[s] == mask[t]. With a 0/1 padding mask this means real tokens never see padding (and padding rows see
only padding, so no softmax row is empty); with packed sequences (ids 1, 2, ...) each segment only sees
itself.

Conventions follow HF `LlamaForCausalLM` so checkpoints convert without permutation: RoPE rotates the two
halves of each head (`rotate_half`), query head h reads key/value head h // (num_heads // num_kv_heads),
RMSNorm is computed in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.sharding import ShardingContext, constrain

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# RoPE frequency scalings (HF `rope_parameters['rope_type']`); 'none' is HF's 'default'. See `rope_inv_freq`.
ROPE_SCALING_TYPES = ("none", "linear", "llama3")

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
  remat: str = "none"  # one of REMAT_POLICIES
  logits_chunk_size: int = 0  # > 0: log-probs from the LM head in sequence chunks (logprobs.py); 0: all at once
  scan_layers: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.")
    if self.logits_chunk_size < 0:
      raise ValueError(f"model: logits_chunk_size={self.logits_chunk_size} must be >= 0 (0 = no chunking).")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model: remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
    if self.resolved_head_dim % 2:
      raise ValueError(f"model: head_dim={self.resolved_head_dim} must be even for RoPE.")
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"model: mlp_activation={self.mlp_activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    _check_rope_scaling(self)

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


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


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


def attention_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, 1, T, S] boolean: causal and same-segment (see the module docstring)."""
  t = segment_ids_BxT.shape[1]
  causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxS[None] & same_BxTxS)[:, None, None]


# Query positions per block of `causal_attention`. Measured on a 2-core CPU (benchmarks/dpo_step.py, attention
# fwd+bwd of the tiny / small configs, T = 256 / 512): 1.6x / 2.9x faster than one [T, T] block.
ATTENTION_QUERY_BLOCK = 128


def attend(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_Bx1x1xTxS: jax.Array,
           cfg: "ModelConfig") -> jax.Array:
  """Grouped-query softmax attention of T queries over S keys where `mask` is set; scores in fp32.

  Query head h reads key/value head h // G (G = heads / kv heads). Every query row must see at least one key
  (the diagonal, in this model), so no softmax row is empty. Returns `[B, T, H, D]` in the compute dtype.
  """
  b, t, h, d = q_BxTxHxD.shape
  k = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, k, h // k, d)  # query head h uses kv head h // G
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, precision=cfg.matmul_precision,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = jnp.where(mask_Bx1x1xTxS, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD, precision=cfg.matmul_precision)
  return out_BxTxKxGxD.reshape(b, t, h, d)


def causal_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array,
                     cfg: "ModelConfig", block: int | None = None) -> jax.Array:
  """`attend` with the causal, same-segment mask of `attention_mask`, computed `block` query positions at a time.

  Queries [i, e) can only see keys [0, e) (causality), so each block scores against that prefix alone: the key
  blocks above the diagonal, all masked, are never computed (for T = 4 blocks, 10 of 16 score tiles), and each
  block's [.., C, e] scores stay small enough for the CPU caches, where one [T, T] array per head did not
  (XLA CPU ran the full-square version at a few GFLOP/s). The skipped scores would have been exp(min - max) = 0
  exactly, so the result equals the full-square softmax up to fp32 summation order.
  """
  block = block or ATTENTION_QUERY_BLOCK
  t = q_BxTxHxD.shape[1]
  mask_Bx1x1xTxS = attention_mask(segment_ids_BxT)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    outs.append(attend(q_BxTxHxD[:, start:end], k_BxTxKxD[:, :end], v_BxTxKxD[:, :end],
                       mask_Bx1x1xTxS[..., start:end, :end], cfg))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


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
      return k_BxTxKxD, v_BxTxKxD, attention_mask(segment_ids_BxT)
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
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    cfg = self.cfg
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    init = nn.initializers.normal(cfg.initializer_range)
    dense = functools.partial(
        nn.DenseGeneral, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
        precision=cfg.matmul_precision)

    def proj(name, heads, heads_axis, bias):
      return dense(
          features=(heads, d), use_bias=bias, name=name,
          kernel_init=_partitioned(init, ("embed", heads_axis, "head_dim")),
          bias_init=_partitioned(nn.initializers.zeros, (heads_axis, "head_dim")))(x_BxTxD)

    q_BxTxHxD = proj("q", h, "heads", cfg.qkv_bias)
    k_BxTxKxD = proj("k", k, "kv_heads", cfg.qkv_bias)
    v_BxTxKxD = proj("v", k, "kv_heads", cfg.qkv_bias)
    if cfg.qk_norm:  # per-head RMSNorm over head_dim, before RoPE (Qwen3)
      head_norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.compute_dtype, cfg.param_dtype, cfg.norm_offset)
      q_BxTxHxD = head_norm(name="q_norm")(q_BxTxHxD)
      k_BxTxKxD = head_norm(name="k_norm")(k_BxTxKxD)
    inv_freq_H2 = rope_inv_freq(cfg)
    q_BxTxHxD = constrain(rope(q_BxTxHxD, positions_BxT, inv_freq_H2), ("batch", "length", "heads", None), self.shard)
    k_BxTxKxD = constrain(rope(k_BxTxKxD, positions_BxT, inv_freq_H2), ("batch", "length", "kv_heads", None),
                          self.shard)
    v_BxTxKxD = constrain(v_BxTxKxD, ("batch", "length", "kv_heads", None), self.shard)

    if self.decode:
      k_BxSxKxD, v_BxSxKxD, mask = self._cached_kv_and_mask(k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)
    else:
      k_BxSxKxD, v_BxSxKxD, mask = k_BxTxKxD, v_BxTxKxD, None
    if mask is None:  # training / scoring: whole sequences, causal, in query blocks
      out_BxTxHxD = causal_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT, cfg)
    else:
      out_BxTxHxD = attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask, cfg)
    out_BxTxHxD = constrain(out_BxTxHxD, ("batch", "length", "heads", None), self.shard)
    return dense(
        features=cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attn_out_bias, name="o",
        kernel_init=_partitioned(init, ("heads", "head_dim", "embed")),
        bias_init=_partitioned(nn.initializers.zeros, ("norm",)))(out_BxTxHxD)


class Mlp(nn.Module):
  cfg: ModelConfig
  shard: ShardingContext | None

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    init = nn.initializers.normal(cfg.initializer_range)
    dense = functools.partial(
        nn.Dense, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, use_bias=cfg.mlp_bias,
        precision=cfg.matmul_precision)
    up_kernel = _partitioned(init, ("embed", "mlp"))
    up_bias = _partitioned(nn.initializers.zeros, ("mlp",))
    gate_BxTxF = dense(cfg.intermediate_size, kernel_init=up_kernel, bias_init=up_bias, name="gate")(x_BxTxD)
    up_BxTxF = dense(cfg.intermediate_size, kernel_init=up_kernel, bias_init=up_bias, name="up")(x_BxTxD)
    hidden_BxTxF = constrain(ACTIVATIONS[cfg.mlp_activation](gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"),
                             self.shard)
    return dense(cfg.hidden_size, kernel_init=_partitioned(init, ("mlp", "embed")),
                 bias_init=_partitioned(nn.initializers.zeros, ("norm",)), name="down")(hidden_BxTxF)


class Block(nn.Module):
  """Pre-norm residual block; (carry, None) in and out so it can be scanned over layers."""
  cfg: ModelConfig
  shard: ShardingContext | None
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.compute_dtype, cfg.param_dtype, cfg.norm_offset)
    x_BxTxD = x_BxTxD + Attention(cfg, self.shard, self.decode, name="attn")(
        norm(name="attn_norm")(x_BxTxD), positions_BxT, segment_ids_BxT)
    x_BxTxD = x_BxTxD + Mlp(cfg, self.shard, name="mlp")(norm(name="mlp_norm")(x_BxTxD))
    return constrain(x_BxTxD, ("batch", "length", "act_embed"), self.shard), None


class Decoder(nn.Module):
  """Token ids -> logits (fp32) or final hidden states. See the module docstring for the mask."""
  cfg: ModelConfig
  shard: ShardingContext | None = None
  decode: bool = False  # KV-cached incremental calls (collection 'cache'); see `sample.py`

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
        embedding_init=_partitioned(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")))
    block = Block
    if cfg.remat != "none" and not self.decode:  # decoding keeps no activations for a backward pass
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      scanned = nn.scan(
          block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = scanned(cfg, self.shard, self.decode)
    else:
      self.layers = [block(cfg, self.shard, self.decode, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.param_dtype, cfg.norm_offset)
    if not cfg.tie_embeddings:
      self.lm_head = self.param(
          "lm_head", _partitioned(nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)

  def hidden(self, ids_BxT, positions_BxT, segment_ids_BxT):
    """Final (normed) hidden states `[B, T, hidden]` in the compute dtype."""
    # FSDP: gather the table's 'embed' shards before the lookup (the batch is split over the same mesh
    # axis); the 'vocab' split stays, and the partitioner masks and sums the lookup over it.
    table_VxD = constrain(self.embed.embedding, ("vocab", None), self.shard)
    x_BxTxD = jnp.take(table_VxD, ids_BxT, axis=0).astype(self.cfg.compute_dtype)
    if self.cfg.embed_scale:  # Gemma: sqrt(D) rounded to the compute dtype first, as HF does
      x_BxTxD = x_BxTxD * jnp.asarray(self.cfg.hidden_size ** 0.5, self.cfg.compute_dtype)
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "act_embed"), self.shard)
    if self.cfg.scan_layers:
      x_BxTxD, _ = self.layers(x_BxTxD, positions_BxT, segment_ids_BxT)
    else:
      for layer in self.layers:
        x_BxTxD, _ = layer(x_BxTxD, positions_BxT, segment_ids_BxT)
    return self.final_norm(x_BxTxD)

  def logits(self, hidden_BxTxD):
    """LM head with fp32 accumulation: logits `[B, T, vocab]` in fp32 whatever the compute dtype."""
    dtype = self.cfg.compute_dtype
    if self.cfg.tie_embeddings:
      kernel_DxV = self.embed.embedding.astype(dtype).T
    else:
      kernel_DxV = self.lm_head.astype(dtype)
    logits = jnp.einsum("btd,dv->btv", hidden_BxTxD.astype(dtype), kernel_DxV,
                        precision=self.cfg.matmul_precision, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"), self.shard)

  def __call__(self, ids_BxT, positions_BxT, segment_ids_BxT):
    return self.logits(self.hidden(ids_BxT, positions_BxT, segment_ids_BxT))


def make_model(cfg: ModelConfig, shard: ShardingContext | None = None, decode: bool = False) -> Decoder:
  """The decoder; pass `shard` to pin activation shardings on a mesh (None: run unsharded), `decode=True`
  for KV-cached incremental calls (`apply(..., mutable=['cache'])`)."""
  return Decoder(cfg, shard, decode)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Any:
  """An empty KV cache for `batch_size` rows of up to `max_len` tokens (prompt + generated)."""
  model = make_model(cfg, decode=True)
  ids = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _dummy_inputs(cfg: ModelConfig):
  ids = jnp.zeros((1, 2), jnp.int32)
  return ids, ids, jnp.ones((1, 2), jnp.int32)


def _boxed_abstract_params(cfg: ModelConfig) -> Any:
  model = make_model(cfg)
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
  model = make_model(cfg)
  init = lambda r: nn.meta.unbox(model.init(r, *_dummy_inputs(cfg))["params"])
  return jax.jit(init, out_shardings=shardings)(rng)


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
