"""Context parallelism: one sequence's tokens sharded over the 'sequence' mesh axis, and attention across shards.

With `config.mesh.sequence = n > 1` the activations `[batch, length, ...]` are sharded over batch (data, fsdp)
and length ('sequence', the sharding rule of 'length'): each device holds T / n tokens of every row it holds, and
every per-token op (embedding, norms, projections, MLP, LM head) runs on its shard with no communication. Only
attention mixes tokens; `attention` runs it inside a `shard_map` in one of two ways (`model.context_parallel`)::

  'ring'        K/V blocks travel around the axis (`lax.ppermute`, n - 1 hops), each device folding every block
                into its queries' online softmax (running max m, normaliser l, output o: flash attention's
                accumulation); a custom VJP recomputes the tiles and passes the dK/dV accumulators around the
                ring with their blocks (n hops), so no device ever holds more than its own and one visiting
                block. Per device: O(T / n) memory; n - 1 K/V blocks sent forward, n - 1 K/V and n dK/dV blocks
                backward. The tiles are jnp (scores in fp32), on every backend.
  'all_gather'  K/V (and the index and segment of each key) gathered over the axis, then the local T / n
                queries attend all T keys with the backend's kernel (`attention.choose`): cuDNN on GPU and XLA
                with the exact (index, segment) mask; splash on TPU (`_splash_shard`) on key windows cut so
                that each query chunk's mask is a static causal one. The CPU blocked kernel is not offered
                ('auto' takes XLA on CPU). The backward reduce-scatters dK/dV. Per device: O(T) K/V memory.

The mask is the model's (model.py): key s is visible to query t iff s comes no later than t in the original order
and both have the same segment id; a shared prompt's real tokens are visible to all of its response's tokens.
Every token carries its original index (`token_order`) and segment id through the layout, so the mask is exact
whatever order the shards hold the tokens in.

Causal load balance (`model.context_load_balance`): in the original order, shard 0 would attend one block and
shard n - 1 all n. The sequence is reordered before sharding so every shard does the same work::

  'zigzag'   2n chunks; shard i holds chunks i and 2n - 1 - i (the split Llama 3's context parallelism describes:
             2 x CP chunks per sequence). With the ring's tiles split at the chunk boundary, every shard
             computes 2 of 4 quarter tiles per visiting block and 3 for its own: the same on every device,
             ~n / 2 blocks of work instead of n.
  'striped'  shard i holds tokens i, i + n, i + 2n, ... (Striped Attention, Brandon et al. 2023): every tile
             is a near-half triangle. Balanced, but the tiles here skip only fully masked blocks, so striped
             computes all n blocks per device; it is for kernels that skip at finer grain.
  'none'     contiguous blocks; the ring skips fully masked blocks, so shard i computes i + 1 of n.

Log-probs never undo the order: each position's target token and loss-mask bit travel with it (logprobs.py), and a
per-sequence sum does not depend on the order of its terms. RoPE positions and segment ids are inputs per token,
so they travel too. Lengths are padded (ids 0, segment 0, never scored) by `padded_length`.

The KV-cached sampler (`sample.py`) is not sequence-parallel: it decodes with the unsharded model on the data axis.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dpo_jax import attention as attention_lib, platforms
from dpo_jax.sharding import ShardingContext, logical_to_spec

CONTEXT_PARALLEL = ("ring", "all_gather")
LOAD_BALANCE = ("zigzag", "striped", "none")

# Queries and keys per block inside a ring tile: a tile is computed flash-style, one [block, block] score block
# per (query block, key block) at a time (`lax.map` / `lax.scan`), so a device's attention temporaries are
# O(block^2) per head rather than O((T / n)^2). MaxText's and splash's default blocks are 512.
RING_BLOCK = 512


# Kernels the context-parallel forms can run: the ring tiles are its own; all_gather hands the local queries and
# the gathered keys with an arbitrary (index, segment) mask to cuDNN or XLA, and to splash as static causal
# windows (`_splash_shard`; not for 'striped', whose every shard would need its own mask).
_ALL_GATHER_KERNELS = ("auto", "xla", "cudnn", "splash")
_RING_KERNELS = ("auto", "xla")


def sequence_axes(shard: ShardingContext | None) -> tuple[str, ...]:
  """The mesh axes the 'length' logical axis is sharded over (() without a mesh or a rule)."""
  if shard is None:
    return ()
  table = dict(reversed(shard.rules))  # first rule wins
  axes = table.get("length")
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return tuple(a for a in axes if shard.mesh.shape[a] > 1)


def degree(shard: ShardingContext | None) -> int:
  """n: the devices one sequence is split over (1 = no context parallelism)."""
  return math.prod(shard.mesh.shape[a] for a in sequence_axes(shard)) if shard is not None else 1


def length_multiple(n: int, balance: str) -> int:
  """Sequence lengths are padded to a multiple of this: n shards, each of two chunks for 'zigzag'."""
  return 2 * n if balance == "zigzag" and n > 1 else n


def padded_length(length: int, n: int, balance: str, quantum: int = 0) -> int:
  """`length` rounded up to `length_multiple` chunks, each a multiple of `quantum` tokens if given (splash tiles:
  `chunk_quantum`), else split into equal ring blocks of at most `RING_BLOCK` tokens (a chunk of 521 tokens, a
  prime, would otherwise be computed in blocks of 1): at most (blocks - 1) padding tokens per chunk on top of the
  multiple."""
  m = length_multiple(n, balance)
  chunk = -(-length // m)
  if quantum:
    return m * quantum * -(-chunk // quantum)
  blocks = -(-chunk // RING_BLOCK)
  return m * blocks * -(-chunk // blocks)


def _wants_splash(cfg: Any) -> bool:
  """Whether all_gather runs splash: chosen explicitly, or by 'auto' on a TPU (for 'zigzag' / 'none')."""
  if cfg.context_parallel != "all_gather" or cfg.context_load_balance == "striped":
    return False
  return cfg.attention_impl == "splash" or (
      cfg.attention_impl == "auto" and attention_lib.PREFERRED.get(platforms.resolve(cfg.platform)) == "splash")


def chunk_quantum(cfg: Any, n: int) -> int:
  """Tokens each `length_multiple` chunk is padded to a multiple of (`padded_length`): splash's smallest tile
  when all_gather runs splash over n > 1 shards (its query chunks and key windows are chunk multiples), else 0."""
  return attention_lib.SPLASH_BLOCKS[-1] if n > 1 and _wants_splash(cfg) else 0


def token_order(length: int, n: int, balance: str) -> np.ndarray:
  """`[length]` int32: position p of the reordered sequence holds original token `order[p]`; shard i holds
  positions [i L / n, (i + 1) L / n). `length` must be a multiple of `length_multiple(n, balance)`."""
  if balance not in LOAD_BALANCE:
    raise ValueError(f"model.context_load_balance={balance!r}; choose one of {list(LOAD_BALANCE)}.")
  if length % length_multiple(n, balance):
    raise ValueError(f"context parallelism: {length} tokens do not split into {n} shards with "
                     f"context_load_balance={balance!r} (needs a multiple of {length_multiple(n, balance)}).")
  index = np.arange(length, dtype=np.int32)
  if n == 1 or balance == "none":
    return index
  if balance == "striped":
    return index.reshape(length // n, n).T.reshape(-1)
  chunks = index.reshape(2 * n, length // (2 * n))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def validate(cfg: Any, n: int) -> None:
  """Raise, naming the field and the fix, for a model config that cannot run context-parallel over n devices."""
  if cfg.context_parallel not in CONTEXT_PARALLEL:
    raise ValueError(f"model.context_parallel={cfg.context_parallel!r}; choose one of {list(CONTEXT_PARALLEL)}.")
  if cfg.context_load_balance not in LOAD_BALANCE:
    raise ValueError(f"model.context_load_balance={cfg.context_load_balance!r}; choose one of {list(LOAD_BALANCE)}.")
  if n <= 1:
    return
  if cfg.context_parallel == "all_gather" and cfg.attention_impl == "splash" and cfg.context_load_balance == "striped":
    raise ValueError(
        f"model.attention_impl='splash' with mesh.sequence={n}, context_parallel='all_gather' and "
        "context_load_balance='striped': a striped shard's causal mask is different on every device, and splash's "
        "mask is static. Set --config.model.context_load_balance=zigzag (or 'none'), or attention_impl=xla.")
  kernels = _RING_KERNELS if cfg.context_parallel == "ring" else _ALL_GATHER_KERNELS
  if cfg.attention_impl not in kernels:
    why = ("the ring computes its own online-softmax tiles" if cfg.context_parallel == "ring" else
           "the CPU blocked kernel takes one contiguous causal block, which a sequence shard is not")
    raise ValueError(
        f"model.attention_impl={cfg.attention_impl!r} with mesh.sequence={n} and model.context_parallel="
        f"{cfg.context_parallel!r}: {why}. Set --config.model.attention_impl to one of {list(kernels)}"
        + (" (or context_parallel=all_gather for cuDNN / splash)." if cfg.context_parallel == "ring" else "."))


class _Static(NamedTuple):
  """What the ring's tiles are cut by and computed with (hashable: a custom-VJP static argument)."""
  axes: tuple[str, ...]
  n: int
  q_bounds: tuple[int, ...]  # query tiles [q_bounds[a], q_bounds[a + 1])
  k_bounds: tuple[int, ...]  # key tiles of a block
  precision: Any
  compute_dtype: Any
  block: int = RING_BLOCK  # at most this many queries / keys per score block (`_block`)


def _tile_mask(q_idx_T, q_seg_BxT, k_idx_S, k_seg_BxS, k_seen_BxS):
  """`[B, 1, 1, T, S]` bool: the model's mask between queries and keys given by (original index, segment)."""
  causal = (k_idx_S[None, None, :] <= q_idx_T[None, :, None]) & (k_seg_BxS[:, None, :] == q_seg_BxT[:, :, None])
  return (causal | k_seen_BxS[:, None, :])[:, None, None]


def _may_see(q_idx_T, k_idx_S, k_seen_BxS):
  """False only if no query of a tile can see any of its keys (all keys later, none visible to all): the whole
  tile is skipped without building its mask."""
  return (k_idx_S.min() <= q_idx_T.max()) | k_seen_BxS.any()


def _split(x, bounds, axis):
  return [jax.lax.slice_in_dim(x, lo, hi, axis=axis) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _heads_first(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD):
  b, t, h, d = q_BxTxHxD.shape
  kv = k_BxSxKxD.shape[2]
  q_BxKxGxTxD = q_BxTxHxD.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
  return q_BxKxGxTxD, k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3)


def _scores(q_BxKxGxTxD, k_BxKxSxD, mask, static):
  s = jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxTxD, k_BxKxSxD, precision=static.precision,
                 preferred_element_type=jnp.float32) * (q_BxKxGxTxD.shape[-1] ** -0.5)
  return jnp.where(mask, s, jnp.finfo(jnp.float32).min)


def _block(length: int, cap: int) -> int:
  """The largest divisor of `length` that is at most `cap` (padded lengths make it `cap` for long tiles)."""
  return next(b for b in range(min(length, cap), 0, -1) if length % b == 0)


def _blocks(x, axis, size):
  """Split `axis` of x into blocks of `size`, the block index moved to the front: [..., L, ...] -> [L / size, ...]."""
  shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, axis):
  """Inverse of `_blocks`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _fold_tile_fwd(static, q, qi, qs, k, v, ki, ks, kse, m, l, o):
  """Online-softmax update of one tile: queries `q` [B, K, G, T, D] (with their running m, l `[B, K, G, T]` and o)
  over keys `k`, `v` [B, K, S, D], one score block at a time; fully masked blocks are skipped."""
  bq, bk = _block(q.shape[3], static.block), _block(k.shape[2], static.block)
  keys = (_blocks(k, 2, bk), _blocks(v, 2, bk), _blocks(ki, 0, bk), _blocks(ks, 1, bk), _blocks(kse, 1, bk))

  def per_query_block(args):
    q, qi, qs, m, l, o = args

    def per_key_block(carry, kargs):
      k, v, ki, ks, kse = kargs
      mask = _tile_mask(qi, qs, ki, ks, kse)

      def update(m, l, o):
        s = _scores(q, k, mask, static)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(static.compute_dtype), v, precision=static.precision,
                        preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(-1), o * corr[..., None] + pv

      return jax.lax.cond(mask.any(), update, lambda *x: x, *carry), None

    return jax.lax.scan(per_key_block, (m, l, o), keys)[0]

  m, l, o = jax.lax.map(per_query_block, (_blocks(q, 3, bq), _blocks(qi, 0, bq), _blocks(qs, 1, bq),
                                          _blocks(m, 3, bq), _blocks(l, 3, bq), _blocks(o, 3, bq)))
  return _unblocks(m, 3), _unblocks(l, 3), _unblocks(o, 3)


def _fold_tile_bwd(static, q, qi, qs, do, lse, delta, k, v, ki, ks, kse, dq, dk, dv):
  """Flash attention's backward over one tile, score block by score block (module `_ring_bwd`): returns the tile's
  dq `[B, K, G, T, D]` and dk, dv `[B, K, S, D]` accumulators (fp32) with its contributions added."""
  bq, bk = _block(q.shape[3], static.block), _block(k.shape[2], static.block)
  scale = q.shape[-1] ** -0.5
  f32 = functools.partial(jnp.einsum, precision=static.precision, preferred_element_type=jnp.float32)
  cd = static.compute_dtype
  keys = (_blocks(k, 2, bk), _blocks(v, 2, bk), _blocks(ki, 0, bk), _blocks(ks, 1, bk), _blocks(kse, 1, bk))

  def per_query_block(key_grads, qargs):
    q, qi, qs, do, lse, delta, dq = qargs

    def per_key_block(dq, kargs):
      k, v, ki, ks, kse, dk, dv = kargs
      mask = _tile_mask(qi, qs, ki, ks, kse)

      def grads(dq, dk, dv):
        p = jnp.where(mask, jnp.exp(_scores(q, k, mask, static) - lse[..., None]), 0.0)
        dv = dv + f32("bkgts,bkgtd->bksd", p.astype(cd), do)
        ds = p * (f32("bkgtd,bksd->bkgts", do, v) - delta[..., None])
        dq = dq + f32("bkgts,bksd->bkgtd", ds.astype(cd), k) * scale
        dk = dk + f32("bkgts,bkgtd->bksd", ds.astype(cd), q) * scale
        return dq, dk, dv

      dq, dk, dv = jax.lax.cond(mask.any(), grads, lambda *x: x, dq, dk, dv)
      return dq, (dk, dv)

    dq, key_grads = jax.lax.scan(per_key_block, dq, keys + key_grads)
    return key_grads, dq

  (dk, dv), dq = jax.lax.scan(per_query_block, (_blocks(dk, 2, bk), _blocks(dv, 2, bk)),
                              (_blocks(q, 3, bq), _blocks(qi, 0, bq), _blocks(qs, 1, bq), _blocks(do, 3, bq),
                               _blocks(lse, 3, bq), _blocks(delta, 3, bq), _blocks(dq, 3, bq)))
  return _unblocks(dq, 3), _unblocks(dk, 2), _unblocks(dv, 2)


def _ring_forward(static, q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen):
  """Per device: (out `[B, T, H, D]`, log-sum-exp `[B, K, G, T]` fp32) of the local queries over all blocks."""
  qh, kh, vh = _heads_first(q, k, v)
  qb = static.q_bounds
  qs, q_idxs, q_segs = _split(qh, qb, 3), _split(q_idx, qb, 0), _split(q_seg, qb, 1)
  lowest = jnp.finfo(jnp.float32).min
  states = [(jnp.full(qa.shape[:-1], lowest), jnp.zeros(qa.shape[:-1], jnp.float32),
             jnp.zeros(qa.shape, jnp.float32)) for qa in qs]

  def fold(states, block):
    kparts = [_split(x, static.k_bounds, ax) for x, ax in zip(block, (2, 2, 0, 1, 1))]
    out = []
    for qa, qi, qsg, state in zip(qs, q_idxs, q_segs, states):
      for kb, vb, ki, ksg, kse in zip(*kparts):
        tile = functools.partial(_fold_tile_fwd, static, qa, qi, qsg, kb, vb, ki, ksg, kse)
        state = jax.lax.cond(_may_see(qi, ki, kse), tile, lambda *x: x, *state)
      out.append(state)
    return out

  block = (kh, vh, k_idx, k_seg, k_seen)
  states = fold(states, block)
  shift = [(i, (i + 1) % static.n) for i in range(static.n)]

  def body(carry, _):
    states, block = carry
    block = jax.lax.ppermute(block, static.axes, shift)
    return (fold(states, block), block), None

  if static.n > 1:
    (states, _), _ = jax.lax.scan(body, (states, block), None, length=static.n - 1)
  o = jnp.concatenate([o / l[..., None] for _, l, o in states], axis=3)
  lse = jnp.concatenate([m + jnp.log(l) for m, l, _ in states], axis=3)
  b, kv, g, t, d = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_attention_shard(static, q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen):
  """One device's part of ring attention (call inside `shard_map` over `static.axes`): local queries
  `[B, T, H, D]` with their original indices `[T]` and segments `[B, T]` over the local key block `[B, S, K, D]`
  (indices `[S]`, segments `[B, S]`, `k_seen` `[B, S]`: visible to every query) and the n - 1 blocks the ring
  brings. Returns `[B, T, H, D]` in q's dtype."""
  return _ring_forward(static, q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen)[0]


def _ring_fwd(static, q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen):
  out, lse = _ring_forward(static, q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen)
  return out, (q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen, out, lse)


def _ring_bwd(static, residuals, d_out):
  q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen, out, lse = residuals
  return _ring_backward(static, q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen, out, lse, d_out) + (None,) * 5


def _ring_backward(static, q, k, v, q_idx, q_seg, k_idx, k_seg, k_seen, out, lse, d_out):
  """Per device: (dq, dk, dv). Flash attention's backward, tile by tile: p = exp(s - lse), dV += p^T dO,
  dS = p (dO V^T - rowsum(dO O)), dQ += dS K / sqrt(D), dK += dS^T Q / sqrt(D). dK/dV accumulate in fp32 and
  travel with their block, so after n hops each is home with every device's contribution."""
  qh, kh, vh = _heads_first(q, k, v)
  doh, oh = _heads_first(d_out, k, v)[0], _heads_first(out, k, v)[0]
  delta = jnp.einsum("bkgtd,bkgtd->bkgt", doh.astype(jnp.float32), oh.astype(jnp.float32))
  qb = static.q_bounds
  qs, q_idxs, q_segs = _split(qh, qb, 3), _split(q_idx, qb, 0), _split(q_seg, qb, 1)
  dos, lses, deltas = _split(doh, qb, 3), _split(lse, qb, 3), _split(delta, qb, 3)

  def fold(dqs, block, dk, dv):
    kparts = [_split(x, static.k_bounds, ax) for x, ax in zip(block, (2, 2, 0, 1, 1))]
    dks, dvs = _split(dk, static.k_bounds, 2), _split(dv, static.k_bounds, 2)
    new_dqs = []
    for qa, qi, qsg, doa, lsea, dla, dq in zip(qs, q_idxs, q_segs, dos, lses, deltas, dqs):
      for j, (kb, vb, ki, ksg, kse) in enumerate(zip(*kparts)):
        tile = functools.partial(_fold_tile_bwd, static, qa, qi, qsg, doa, lsea, dla, kb, vb, ki, ksg, kse)
        dq, dks[j], dvs[j] = jax.lax.cond(_may_see(qi, ki, kse), tile, lambda *x: x, dq, dks[j], dvs[j])
      new_dqs.append(dq)
    return new_dqs, jnp.concatenate(dks, axis=2), jnp.concatenate(dvs, axis=2)

  block = (kh, vh, k_idx, k_seg, k_seen)
  dqs = [jnp.zeros(qa.shape, jnp.float32) for qa in qs]
  dk, dv = jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
  shift = [(i, (i + 1) % static.n) for i in range(static.n)]
  dqs, dk, dv = fold(dqs, block, dk, dv)

  def body(carry, _):
    dqs, block, dk, dv = carry
    block, dk, dv = jax.lax.ppermute((block, dk, dv), static.axes, shift)
    dqs, dk, dv = fold(dqs, block, dk, dv)
    return (dqs, block, dk, dv), None

  if static.n > 1:
    (dqs, _, dk, dv), _ = jax.lax.scan(body, (dqs, block, dk, dv), None, length=static.n - 1)
    dk, dv = jax.lax.ppermute((dk, dv), static.axes, shift)  # the last hop home
  b, t, h, d = q.shape
  dq = jnp.concatenate(dqs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
  back = lambda x_BxKxSxD, like: x_BxKxSxD.transpose(0, 2, 1, 3).astype(like.dtype)
  return dq.astype(q.dtype), back(dk, k), back(dv, v)


ring_attention_shard.defvjp(_ring_fwd, _ring_bwd)


class _Sharded(NamedTuple):
  """The ring's static context over the mesh (hashable: a custom-VJP static argument)."""
  static: _Static
  mesh: Any
  heads: P  # q and the output [B, T, H, D]
  kv_heads: P  # k, v [B, T, K, D] (and a prefix's [B, P, K, D])
  rows: P  # segments [B, T] (and a prefix's visibility [B, P])
  index: P  # the token order [T]
  lse: P  # the log-sum-exp [B, K, G, T]


def _keys(q_idx, q_seg, k, v, prefix):
  """One device's key block: its own keys, after a shared prompt's (index -1, segment -1, visible where real)."""
  if not prefix:
    return k, v, q_idx, q_seg, jnp.zeros(q_seg.shape, bool)
  pk, pv, p_seen = prefix
  return (jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1),
          jnp.concatenate([jnp.full(pk.shape[1:2], -1, jnp.int32), q_idx]),
          jnp.concatenate([jnp.full(p_seen.shape, -1, jnp.int32), q_seg], axis=1),
          jnp.concatenate([p_seen, jnp.zeros(q_seg.shape, bool)], axis=1))


def _per_layer(x, q_idx, q_seg, prefix):
  """The token indices and segments, made to depend on `x` (this layer's activations) by an optimization barrier.

  They are the same in every layer, so under a `scan` over layers JAX's partial evaluation treats every mask and
  skip decision derived from them as loop-invariant and hoists it out of the loop as a stored residual: all ring
  steps' score-block masks, and with them the `cond` branches' score blocks (measured on an 8B model at 32k tokens
  over sequence=8: 98 GiB of step temporaries instead of 16). Tied to the layer's input they are computed in the
  loop, block by block, as written."""
  q_idx, q_seg, prefix, _ = jax.lax.optimization_barrier((q_idx, q_seg, prefix, x))
  return q_idx, q_seg, prefix


def _in_specs(ctx, prefix):
  return (ctx.heads, ctx.kv_heads, ctx.kv_heads, ctx.index, ctx.rows) + (
      (ctx.kv_heads, ctx.kv_heads, ctx.rows) if prefix else ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sharded_ring(ctx, q, k, v, order, seg, prefix):
  return _sharded_ring_fwd(ctx, q, k, v, order, seg, prefix)[0]


def _sharded_ring_fwd(ctx, q, k, v, order, seg, prefix):
  """The whole `shard_map` sits inside the custom VJP, so autodiff never traces into the ring's loops (under a
  `scan` over layers it otherwise kept every score block of every ring step as a residual)."""
  def per_device(q, k, v, q_idx, q_seg, *prefix):
    q_idx, q_seg, prefix = _per_layer(q, q_idx, q_seg, prefix)
    keys = _keys(q_idx, q_seg, k, v, prefix)
    return _ring_forward(ctx.static, q, keys[0], keys[1], q_idx, q_seg, *keys[2:])

  out, lse = jax.shard_map(per_device, mesh=ctx.mesh, in_specs=_in_specs(ctx, prefix),
                           out_specs=(ctx.heads, ctx.lse), check_vma=False)(q, k, v, order, seg, *prefix)
  return out, (q, k, v, order, seg, prefix, out, lse)


def _sharded_ring_bwd(ctx, residuals, d_out):
  q, k, v, order, seg, prefix, out, lse = residuals

  def per_device(q, k, v, q_idx, q_seg, out, lse, d_out, *prefix):
    q_idx, q_seg, prefix = _per_layer(d_out, q_idx, q_seg, prefix)
    keys = _keys(q_idx, q_seg, k, v, prefix)
    dq, dk, dv = _ring_backward(ctx.static, q, keys[0], keys[1], q_idx, q_seg, *keys[2:], out, lse, d_out)
    p = prefix[0].shape[1] if prefix else 0
    return (dq, dk[:, p:], dv[:, p:]) + ((dk[:, :p], dv[:, :p]) if prefix else ())

  specs = _in_specs(ctx, prefix)
  grads = jax.shard_map(per_device, mesh=ctx.mesh, in_specs=specs[:5] + (ctx.heads, ctx.lse, ctx.heads) + specs[5:],
                        out_specs=(ctx.heads, ctx.kv_heads, ctx.kv_heads) + (ctx.kv_heads,) * (2 * bool(prefix)),
                        check_vma=False)(q, k, v, order, seg, out, lse, d_out, *prefix)
  d_prefix = (grads[3], grads[4], None) if prefix else prefix
  return grads[0], grads[1], grads[2], None, None, d_prefix


_sharded_ring.defvjp(_sharded_ring_fwd, _sharded_ring_bwd)


def _bounds(length: int, parts: int) -> tuple[int, ...]:
  return tuple(length * i // parts for i in range(parts + 1))


def all_gather_kernel(cfg: Any, chunk_q_shape: tuple[int, ...], kv_length: int, dtype: Any) -> str:
  """The kernel all_gather runs ('cudnn', 'splash' or 'xla') for query chunks `chunk_q_shape` `[B, C, H, D]` over
  `kv_length` keys (n C plus a shared prompt's). 'auto' takes what `attention.choose` prefers, except the CPU blocked
  kernel (not offered) and splash under 'striped' (refused when explicit): XLA instead."""
  if cfg.attention_impl == "auto" and not _wants_splash(cfg) and (
      attention_lib.PREFERRED.get(platforms.resolve(cfg.platform)) in ("splash", "cpu_blocked")):
    return "xla"
  impl = attention_lib.choose(cfg, chunk_q_shape, kv_length, dtype)
  return impl if impl in ("cudnn", "splash") else "xla"


def _natural_halves(x, n, chunk, balance):
  """A gathered `[B, T, ...]` (layout order) in the original order, as (first, second) halves for 'zigzag'
  ([chunks 0 .. n-1], [chunks n .. 2n-1]: layout positions 0, 2, .., 2n-2 and 2n-1, .., 3, 1) or (all, None)."""
  if balance != "zigzag":
    return x, None
  pairs = x.reshape(x.shape[:1] + (n, 2, chunk) + x.shape[2:])
  merge = lambda y: y.reshape(y.shape[:1] + (n * chunk,) + y.shape[3:])
  return merge(pairs[:, :, 0]), merge(pairs[:, ::-1, 1])


def _splash_shard(cfg, axes, n, balance, q, k, v, q_idx, q_seg, prefix):
  """One device's all_gather attention with the splash kernel ('zigzag' or 'none'): `[B, T/n, H, D]` out.

  Splash's causal mask is static (the same program on every device), but where a shard's queries sit in the
  sequence is not. So each query chunk (C tokens, one run of the original order starting at token c C) is given a
  key window whose causal mask is the same on every device, cut from the gathered keys in the original order
  with a dynamic slice:
    - a chunk c < n sees keys [0, (c + 1) C): the window is the n C keys ending there, taken from the first half
      after (n - 1) C keys of padding (segment -1, which no query has), with offset (n - 1) C;
    - a chunk c >= n (zig-zag's second chunk) sees the whole first half, then the n C keys of the second half
      ending at (c + 1) C, from the second half after (n - 1) C of padding: 2 n C keys, offset (2n - 1) C.
  A shared prompt's P keys go first in every window (offset + P), segment 1 where real (a shared-prompt response
  is one segment, as in `attention.splash_attention`) and -1 where padding.
  Work per device: (3n - 1) C^2 score entries against the 2n C^2 visible (zig-zag), the same on every device:
  shard i's first window pads (n - 1 - i) chunks and its second i. The mask is exact for every scored query."""
  gather = lambda x, axis: jax.lax.all_gather(x, axes, axis=axis, tiled=True)
  b, tl, h, d = q.shape
  chunk = tl // 2 if balance == "zigzag" else tl
  window = n * chunk
  first, second = zip(*(_natural_halves(gather(x, 1), n, chunk, balance) for x in (k, v, q_seg)))
  pad = lambda x, value: jnp.pad(x, ((0, 0), (window - chunk, 0)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
  cut = lambda xs, start: [jax.lax.dynamic_slice_in_dim(pad(x, value), start, window, axis=1)
                           for x, value in zip(xs, (0, 0, -1))]
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  if prefix:
    pk, pv, p_seen = (gather(x, 1) for x in prefix)
    lead = [pk, pv, jnp.where(p_seen, 1, -1).astype(jnp.int32)]
  else:
    lead = [x[:, :0] for x in first]
  p = lead[0].shape[1]
  q = heads_first(q * jnp.asarray(d ** -0.5, q.dtype))

  def attend(q_chunk, q_seg_chunk, keys, offset):
    keys = [jnp.concatenate([a, x], axis=1) for a, x in zip(lead, keys)]
    return attention_lib.splash_rows(q_chunk, heads_first(keys[0]), heads_first(keys[1]), q_seg_chunk,
                                     keys[2], p + offset, cfg)

  outs = [attend(q[:, :, :chunk], q_seg[:, :chunk], cut(first, q_idx[0]), window - chunk)]
  if balance == "zigzag":  # the second chunk's first token is at c C, c >= n: window start (c - n) C
    keys = [jnp.concatenate([a, x], axis=1) for a, x in zip(first, cut(second, q_idx[chunk] - window))]
    outs.append(attend(q[:, :, chunk:], q_seg[:, chunk:], keys, 2 * window - chunk))
  return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3).astype(q.dtype)


def attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array, cfg: Any,
              shard: ShardingContext, prefix: attention_lib.Prefix | None = None) -> jax.Array:
  """`attention.causal_attention` for sequence-sharded activations (module docstring): T tokens in the
  `token_order` of `cfg.context_load_balance`, sharded over the 'length' rule's mesh axes. Returns `[B, T, H, D]`."""
  axes, n = sequence_axes(shard), degree(shard)
  validate(cfg, n)
  balance = cfg.context_load_balance
  t = q_BxTxHxD.shape[1]
  if t % length_multiple(n, balance):
    raise ValueError(f"context parallelism: a sequence of {t} tokens over mesh.sequence={n} with "
                     f"context_load_balance={balance!r} must have a multiple of {length_multiple(n, balance)} tokens; "
                     "logprobs.sequence_logps pads and reorders batches for you (call the model through it).")
  order_T = jnp.asarray(token_order(t, n, balance))
  heads = logical_to_spec(("batch", "length", "heads", None), shard.rules)
  kv_heads = logical_to_spec(("batch", "length", "kv_heads", None), shard.rules)
  rows = logical_to_spec(("batch", "length"), shard.rules)
  index = P(rows[1])
  tl = t // n
  q_parts = 2 if balance == "zigzag" else 1
  p_local = 0 if prefix is None else prefix.k_BxPxKxD.shape[1] // n
  static = _Static(axes=axes, n=n, q_bounds=_bounds(tl, q_parts),
                   k_bounds=(0,) * (p_local > 0) + tuple(p_local + b for b in _bounds(tl, q_parts)),
                   precision=cfg.matmul_precision, compute_dtype=jnp.dtype(cfg.compute_dtype), block=RING_BLOCK)
  seg_BxT = segment_ids_BxT.astype(jnp.int32)
  prefix_parts = ()
  if prefix is not None:
    if prefix.k_BxPxKxD.shape[1] % n:
      raise ValueError(f"context parallelism: a shared prompt of {prefix.k_BxPxKxD.shape[1]} tokens does not split "
                       f"over mesh.sequence={n}; logprobs.sequence_logps pads prompts for you.")
    prefix_parts = (prefix.k_BxPxKxD, prefix.v_BxPxKxD, prefix.visible_BxP)
  if cfg.context_parallel == "ring":
    ctx = _Sharded(static, shard.mesh, heads, kv_heads, rows, index,
                   logical_to_spec(("batch", "kv_heads", None, "length"), shard.rules))
    return _sharded_ring(ctx, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, order_T, seg_BxT, prefix_parts)

  chunk = tl // q_parts  # a query chunk: one contiguous run of the original order
  kernel = all_gather_kernel(cfg, (q_BxTxHxD.shape[0], chunk) + q_BxTxHxD.shape[2:], n * chunk + n * p_local,
                             q_BxTxHxD.dtype)

  def per_device(q, k, v, q_idx, q_seg, *prefix_parts):
    if kernel == "splash":
      return _splash_shard(cfg, axes, n, balance, q, k, v, q_idx, q_seg, prefix_parts)
    k, v, k_idx, k_seg, k_seen = _keys(q_idx, q_seg, k, v, prefix_parts)
    gather = lambda x, axis: jax.lax.all_gather(x, axes, axis=axis, tiled=True)
    k, v, k_idx, k_seg, k_seen = gather(k, 1), gather(v, 1), gather(k_idx, 0), gather(k_seg, 1), gather(k_seen, 1)
    mask = _tile_mask(q_idx, q_seg, k_idx, k_seg, k_seen)
    if kernel == "cudnn":
      return jax.nn.dot_product_attention(q, k, v, mask=mask[:, 0], scale=q.shape[-1] ** -0.5, is_causal=False,
                                          implementation="cudnn")
    return attention_lib.attend(q, k, v, mask, cfg)

  return jax.shard_map(per_device, mesh=shard.mesh, in_specs=(heads, kv_heads, kv_heads, index, rows) + (
      (kv_heads, kv_heads, rows) if prefix_parts else ()), out_specs=heads, check_vma=False)(
          q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, order_T, seg_BxT, *prefix_parts)
