"""Causal attention behind one call, with the kernel chosen by backend and shapes.

    out_BxTxHxD = causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, cfg, shard, prefix)

Every kernel computes the same attention (model.py's module docstring): token t attends token s iff s <= t and
both have the same segment id (0/1 padding masks, packed segments 1, 2, ...), and with a shared-prompt
`prefix` every query also sees the prompt's real tokens. Query head h reads key/value head h // (H / K).
`cfg.attention_impl` names the kernel (`ATTENTION_IMPLS`)::

  'cudnn'        `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN's fused flash attention (GPU,
                 bf16 / fp16, head_dim <= 128 and a multiple of 8). The causal triangle is cuDNN's own mask; the
                 segment mask (and a prefix's visibility) enter as a boolean mask, which jax passes as an additive
                 bias broadcast over heads.
  'splash'       Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, TPU): a causal
                 mask (offset by the prefix length for shared prompts) with segment ids, query and key lengths
                 multiples of 128, `shard_map`ped over the mesh (batch over 'batch', heads over 'heads' /
                 'kv_heads'). On a CPU it runs in Pallas interpret mode: slow, for tests.
  'xla'          the masked softmax attention written in jnp (one `[T, S]` score block per head): any backend.
  'cpu_blocked'  `blocked_attention`: query blocks of `ATTENTION_QUERY_BLOCK` that skip the key blocks above the
                 diagonal; the fastest on XLA:CPU (README benchmark), and only used there by 'auto'.
  'auto'         cudnn on GPU, splash on TPU, cpu_blocked on CPU (`choose`); where the kernel cannot serve the
                 dtype or shapes it falls back to 'xla' with a one-line warning saying why. A kernel chosen
                 explicitly that cannot serve them is an error naming the field and the fix.

The platform is `cfg.platform` (or this process's backend: `platforms.resolve`), so a program lowered for a TPU
or GPU on a CPU host takes that platform's kernel. Scores and softmax are fp32 in 'xla' and 'cpu_blocked' (the
fused kernels keep their own fp32 accumulators); the output is in the compute dtype. The KV-cached decode step
(`sample.py`) always uses `attend`: one query row per step over a cache, where a flash kernel saves nothing.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax import platforms
from dpo_jax.sharding import ShardingContext, logical_to_spec

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "cpu_blocked")

# What 'auto' prefers per backend (`choose`).
PREFERRED = {"gpu": "cudnn", "tpu": "splash", "cpu": "cpu_blocked"}

# Splash tile sizes tried, largest first: the first dividing both sequence lengths is used (TPU lanes are 128 wide,
# so 128 is the smallest it takes; MaxText's default query / key blocks are 512).
SPLASH_BLOCKS = (512, 256, 128)

def attention_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, 1, T, S] boolean: causal and same-segment (model.py's module docstring)."""
  t = segment_ids_BxT.shape[1]
  causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (causal_TxS[None] & same_BxTxS)[:, None, None]


# Query positions per block of `blocked_attention`. Measured on a 2-core CPU (scripts/attention_speed.py, fwd+bwd
# of one attention of the tiny / small benchmark configs, T = 256 / 512): 25 / 220 ms at 64 against 33 / 248 at
# 128 and 42 / 397 for one block of all queries (torch SDPA: 28 / 239); 32 is no faster than 64.
ATTENTION_QUERY_BLOCK = 64

# `blocked_attention` under `jax.checkpoint` per query block: the backward recomputes a block's scores and softmax
# from q, k, v (kept anyway) instead of storing its `[B, K, G x C, S]` fp32 probabilities, as a flash kernel keeps
# only what it needs. On the smollm2-135m shape (benchmarks/dpo_step.py, 2 pairs x 512 tokens, 2-core AMD EPYC, both
# in one interleaved run) it saved 532 MiB of the step's 6647 MiB at no measurable cost in time (13.4-14.3 s against
# 13.5-16.2 s); on tiny 0.860 s against 0.891 s. `--variants attnstore` times the stored probabilities.
ATTENTION_BLOCK_RECOMPUTE = True


def attend(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_Bx1x1xTxS: jax.Array,
           cfg: Any) -> jax.Array:
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


class Prefix(NamedTuple):
  """Keys every query of `causal_attention` may see besides its own causal past: a shared prompt's."""
  k_BxPxKxD: jax.Array
  v_BxPxKxD: jax.Array
  visible_BxP: jax.Array  # bool: the real (non-padding) prefix tokens


def blocked_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array,
                     cfg: Any, block: int | None = None, prefix: Prefix | None = None) -> jax.Array:
  """'cpu_blocked': `attend` with the `visibility` mask, computed `block` query positions at a time.

  Queries [i, e) can only see keys [0, e) (causality), so each block scores against that prefix alone: the key
  blocks above the diagonal, all masked, are never computed (for T = 4 blocks, 10 of 16 score tiles), and each
  block's [.., C, e] scores stay small enough for the CPU caches, where one [T, T] array per head did not
  (XLA CPU ran the full-square version at a few GFLOP/s). The skipped scores would have been exp(min - max) = 0
  exactly, so the result equals the full-square softmax up to fp32 summation order.

  The heads are laid out kv-head-major once, `[B, K, G x C, D]` per block: the G query heads that read one
  kv head are one matrix of G x C rows, so each block's scores and outputs are single batched GEMMs over
  (B, K) with no per-block transposes.

  `prefix`: P more keys, placed before the T keys and visible to every query where `visible_BxP` (a shared
  prompt's keys, seen by each of its responses); every query still sees itself, so no softmax row is empty.
  """
  block = block or ATTENTION_QUERY_BLOCK
  b, t, h, d = q_BxTxHxD.shape
  kv = k_BxTxKxD.shape[2]
  g = h // kv  # query head h reads kv head h // G
  q_BxKxGxTxD = q_BxTxHxD.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)
  k_BxKxSxD, v_BxKxSxD = k_BxTxKxD.transpose(0, 2, 1, 3), v_BxTxKxD.transpose(0, 2, 1, 3)
  mask_Bx1xTxS = attention_mask(segment_ids_BxT)[:, :, 0]
  p = 0
  if prefix is not None:
    p = prefix.k_BxPxKxD.shape[1]
    k_BxKxSxD = jnp.concatenate([prefix.k_BxPxKxD.transpose(0, 2, 1, 3), k_BxKxSxD], axis=2)
    v_BxKxSxD = jnp.concatenate([prefix.v_BxPxKxD.transpose(0, 2, 1, 3), v_BxKxSxD], axis=2)
    seen_Bx1xTxP = jnp.broadcast_to(prefix.visible_BxP[:, None, None, :], (b, 1, t, p))
    mask_Bx1xTxS = jnp.concatenate([seen_Bx1xTxP, mask_Bx1xTxS], axis=-1)
  def one_block(q_BxKxMxD, k_BxKxSxD, v_BxKxSxD, visible_Bx1xMxS):
    scores_BxKxMxS = jnp.einsum("bkmd,bksd->bkms", q_BxKxMxD, k_BxKxSxD, precision=cfg.matmul_precision,
                                preferred_element_type=jnp.float32) * (d ** -0.5)
    scores_BxKxMxS = jnp.where(visible_Bx1xMxS, scores_BxKxMxS, jnp.finfo(jnp.float32).min)
    probs_BxKxMxS = jax.nn.softmax(scores_BxKxMxS, axis=-1).astype(cfg.compute_dtype)
    return jnp.einsum("bkms,bksd->bkmd", probs_BxKxMxS, v_BxKxSxD, precision=cfg.matmul_precision)

  if ATTENTION_BLOCK_RECOMPUTE:
    one_block = jax.checkpoint(one_block)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    c, s = end - start, p + end
    q_BxKxMxD = q_BxKxGxTxD[:, :, :, start:end].reshape(b, kv, g * c, d)  # row m = query head g * C + c
    visible_Bx1xMxS = jnp.tile(mask_Bx1xTxS[:, :, start:end, :s], (1, 1, g, 1))
    out_BxKxMxD = one_block(q_BxKxMxD, k_BxKxSxD[:, :, :s], v_BxKxSxD[:, :, :s], visible_Bx1xMxS)
    outs.append(out_BxKxMxD.reshape(b, kv, g, c, d))
  out_BxKxGxTxD = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out_BxKxGxTxD.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def visibility(segment_ids_BxT: jax.Array, prefix: Prefix | None = None) -> jax.Array:
  """`[B, T, P + T]` boolean: which keys each query sees, the prefix's P columns (if any) first."""
  mask_BxTxT = attention_mask(segment_ids_BxT)[:, 0, 0]
  if prefix is None:
    return mask_BxTxT
  b, t = segment_ids_BxT.shape
  seen_BxTxP = jnp.broadcast_to(prefix.visible_BxP[:, None, :], (b, t, prefix.visible_BxP.shape[1]))
  return jnp.concatenate([seen_BxTxP, mask_BxTxT], axis=-1)


def _with_prefix(k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, prefix: Prefix | None) -> tuple[jax.Array, jax.Array]:
  if prefix is None:
    return k_BxTxKxD, v_BxTxKxD
  return (jnp.concatenate([prefix.k_BxPxKxD, k_BxTxKxD], axis=1),
          jnp.concatenate([prefix.v_BxPxKxD, v_BxTxKxD], axis=1))


def xla_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array,
                  cfg: Any, prefix: Prefix | None = None) -> jax.Array:
  """'xla': `attend` over all P + T keys with the `visibility` mask (one `[T, P + T]` score block per head)."""
  k_BxSxKxD, v_BxSxKxD = _with_prefix(k_BxTxKxD, v_BxTxKxD, prefix)
  return attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, visibility(segment_ids_BxT, prefix)[:, None, None], cfg)


def cudnn_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array,
                    cfg: Any, prefix: Prefix | None = None) -> jax.Array:
  """'cudnn': cuDNN flash attention through `jax.nn.dot_product_attention` (GQA native, `[B, T, N, D]` layout).

  One stream: cuDNN's causal mask plus the same-segment mask. With a prefix the keys are `[prefix, own]`, whose
  causal triangle is offset by P, so the whole `visibility` mask is passed and cuDNN's own causal mask is off.
  """
  k_BxSxKxD, v_BxSxKxD = _with_prefix(k_BxTxKxD, v_BxTxKxD, prefix)
  if prefix is None:
    mask_Bx1xTxS = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
  else:
    mask_Bx1xTxS = visibility(segment_ids_BxT, prefix)[:, None]
  return jax.nn.dot_product_attention(
      q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask_Bx1xTxS, scale=q_BxTxHxD.shape[-1] ** -0.5,
      is_causal=prefix is None, implementation="cudnn")


def splash_block(length: int) -> int | None:
  """The splash tile for a sequence of `length` tokens: the largest of `SPLASH_BLOCKS` dividing it, else None."""
  return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def _splash_kernel(heads: int, t: int, s: int, offset: int, interpret: bool) -> Any:
  """A splash kernel for `heads` query heads, T queries over S keys, causal with query i at key i + offset.

  Built anew in every trace, not cached: the kernel holds its mask tables as jax arrays, and one made inside a
  trace (under jit) would leak that trace's values into the next."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
  bq, bkv = splash_block(t), splash_block(s)
  sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, s), offset=offset) for _ in range(heads)])
  return kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_rows(q_BxHxTxD: jax.Array, k_BxKxSxD: jax.Array, v_BxKxSxD: jax.Array, q_seg_BxT: jax.Array,
                kv_seg_BxS: jax.Array, offset: int, cfg: Any) -> jax.Array:
  """The splash kernel on one device's rows (vmapped over the batch): query i sees key j iff j <= i + offset
  (static) and their segment ids `[B, T]` / `[B, S]` (int32) are equal. Queries come pre-scaled by 1 / sqrt(D)
  (the kernel applies no scale). Returns `[B, H, T, D]`."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  interpret = platforms.resolve(cfg.platform) == "cpu"  # CPUs run Pallas TPU kernels only in interpret mode
  kernel = _splash_kernel(q_BxHxTxD.shape[1], q_BxHxTxD.shape[2], k_BxKxSxD.shape[2], offset, interpret)
  one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=qs, kv=ks))
  return jax.vmap(one)(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg_BxT, kv_seg_BxS)


def splash_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array,
                     cfg: Any, shard: ShardingContext | None = None, prefix: Prefix | None = None) -> jax.Array:
  """'splash': Pallas splash attention per example (vmapped over the batch), under `shard_map` over the mesh.

  Segment ids carry the mask: queries see keys of their own segment, causally. With a prefix the keys are
  `[prefix, own]` and the causal mask is offset by P; the prefix's real tokens get segment 1 (a shared-prompt
  response is one segment: ids 1 on real tokens, 0 on padding) and its padding -1, which no query has. Only
  padding queries see less than in 'xla' (their own padding, not the prompt): their outputs are never scored.
  Queries are scaled by 1 / sqrt(D) before the kernel, which applies no scale.
  """
  b, t, h, d = q_BxTxHxD.shape
  k_BxSxKxD, v_BxSxKxD = _with_prefix(k_BxTxKxD, v_BxTxKxD, prefix)
  q_seg_BxT = segment_ids_BxT.astype(jnp.int32)
  kv_seg_BxS, offset = q_seg_BxT, 0
  if prefix is not None:
    offset = prefix.visible_BxP.shape[1]
    kv_seg_BxS = jnp.concatenate([jnp.where(prefix.visible_BxP, 1, -1).astype(jnp.int32), q_seg_BxT], axis=1)
  scale = jnp.asarray(d ** -0.5, q_BxTxHxD.dtype)

  def per_shard(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg, kv_seg):
    return splash_rows(q_BxHxTxD, k_BxKxSxD, v_BxKxSxD, q_seg, kv_seg, offset, cfg)

  args = ((q_BxTxHxD * scale).transpose(0, 2, 1, 3), k_BxSxKxD.transpose(0, 2, 1, 3),
          v_BxSxKxD.transpose(0, 2, 1, 3), q_seg_BxT, kv_seg_BxS)
  if shard is None:
    out_BxHxTxD = per_shard(*args)
  else:  # each device runs the kernel on its batch rows and heads; the specs follow the model's logical rules
    heads = logical_to_spec(("batch", "heads", None, None), shard.rules)
    kv_heads = logical_to_spec(("batch", "kv_heads", None, None), shard.rules)
    rows = logical_to_spec(("batch", None), shard.rules)
    out_BxHxTxD = jax.shard_map(per_shard, mesh=shard.mesh, in_specs=(heads, kv_heads, kv_heads, rows, rows),
                                out_specs=heads, check_vma=False)(*args)
  return out_BxHxTxD.transpose(0, 2, 1, 3).astype(q_BxTxHxD.dtype)


def unsupported(impl: str, platform: str, q_shape: tuple[int, ...], kv_length: int, dtype: Any) -> str:
  """Why kernel `impl` cannot serve these inputs on `platform` ('cpu' / 'gpu' / 'tpu'), or '' if it can."""
  _, t, _, d = q_shape
  dtype = jnp.dtype(dtype)
  if impl == "cudnn":
    if platform != "gpu":
      return f"cuDNN attention runs on a GPU; this program is built for {platform}"
    if dtype not in (jnp.bfloat16, jnp.float16):
      return f"cuDNN flash attention takes bfloat16 or float16, not {dtype.name} (set model.compute_dtype='bfloat16')"
    if d % 8 or d > 128:
      return f"cuDNN flash attention takes head_dim <= 128 and a multiple of 8, not {d}"
    if t % 2 or kv_length % 2:
      return f"cuDNN masked attention needs even query and key lengths for training, not {t} and {kv_length}"
  elif impl == "splash":
    if platform == "gpu":
      return "splash attention is a TPU (Pallas Mosaic) kernel; a GPU takes 'cudnn' or 'xla'"
    if splash_block(t) is None or splash_block(kv_length) is None:
      return (f"splash attention takes query and key lengths that are multiples of 128, not {t} and {kv_length} "
              "(pad max_length / the prompt and response widths to multiples of 128)")
  return ""


_WARNED: set[str] = set()


def choose(cfg: Any, q_shape: tuple[int, ...], kv_length: int, dtype: Any) -> str:
  """The kernel `causal_attention` runs for these shapes: `cfg.attention_impl`, or for 'auto' the backend's
  `PREFERRED` kernel, else 'xla' with a one-line warning (once per reason). An explicit kernel that cannot serve
  the inputs raises, naming the field and the fix."""
  platform = platforms.resolve(cfg.platform)
  impl = cfg.attention_impl
  if impl != "auto":
    problem = unsupported(impl, platform, q_shape, kv_length, dtype)
    if problem:
      raise ValueError(f"model.attention_impl={impl!r}: {problem}. Set --config.model.attention_impl=auto (or "
                       "'xla', which serves every backend, dtype and shape).")
    return impl
  preferred = PREFERRED.get(platform, "xla")
  problem = unsupported(preferred, platform, q_shape, kv_length, dtype)
  if not problem:
    return preferred
  message = f"warning: attention_impl='auto' uses 'xla' instead of {preferred!r} on {platform}: {problem}."
  if message not in _WARNED:
    _WARNED.add(message)
    print(message, file=sys.stderr)
  return "xla"


def causal_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array,
                     cfg: Any, shard: ShardingContext | None = None, prefix: Prefix | None = None) -> jax.Array:
  """Causal, same-segment attention (module docstring) of T queries over their own T keys and an optional
  shared-prompt `prefix`, by the kernel `choose` picks. Returns `[B, T, H, D]` in the compute dtype."""
  kv_length = k_BxTxKxD.shape[1] + (0 if prefix is None else prefix.k_BxPxKxD.shape[1])
  impl = choose(cfg, q_BxTxHxD.shape, kv_length, q_BxTxHxD.dtype)
  if impl == "cudnn":
    return cudnn_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, cfg, prefix)
  if impl == "splash":
    return splash_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, cfg, shard, prefix)
  if impl == "cpu_blocked":
    with jax.named_scope(platforms.BLOCKED_ATTENTION):
      return blocked_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, cfg, prefix=prefix)
  return xla_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, cfg, prefix)
