"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a softmax router picks k of E SwiGLU experts per token.

For token x (Shazeer et al., 2017; Mixtral, Jiang et al., 2024; transformers' `MixtralSparseMoeBlock`):

    p = softmax(x W_router)                    [E], fp32
    (w, e) = top_k(p)                          the k largest probabilities and their experts
    w = w / sum(w)                             Mixtral always; Qwen3-MoE when `norm_topk_prob`
    y = sum_j w_j * down_e_j( silu(gate_e_j(x)) * up_e_j(x) )

Four ways to run the experts (`cfg.moe_impl`, `resolve_impl`), the same function of the params:

- 'ragged' (dropless, the default on TPU and GPU): the N k (token, expert) assignments sorted by expert and run
  through grouped matmuls (`jax.lax.ragged_dot`), so each expert multiplies exactly its tokens; the outputs are
  un-sorted by a gather and summed over k with the weights.
- 'tiled' (dropless, the default on CPU): the sorted assignments padded per expert to fixed-size tiles, each tile
  multiplied by its expert's weights in one batched matmul (`tiled_experts`).
- 'dense': every expert on every token, combined by a one-hot weight matrix (E times the FLOPs; for tiny tests).
- 'capacity': each expert takes at most C = ceil(moe_capacity_factor * N k / E) assignments in token order (Switch
  Transformer, Fedus et al., 2021); the rest are dropped (their weight is 0, and counted). Static shapes:
  `[E, C, D]` batched matmuls.

Expert parallelism (`mesh.expert > 1`, `expert_parallel`): the experts' weights are split over the 'expert' mesh
axis and each device's tokens are exchanged with `all_to_all` inside a `shard_map`, computed by the local experts,
and sent back.

Router statistics: every MoE layer sows, into the flax collection `ROUTER`, masked sums over the real tokens
(segment id > 0) from which the step computes the load-balancing loss (`load_balancing_loss`, transformers'
`load_balancing_loss_func`), the router z-loss (`router_z_loss`) and the load metrics; with the collection
`ROUTER_LOGITS` mutable it also sows the raw router logits `[B, T, E]` (parity tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dpo_jax import platforms, sharding as sharding_lib

# How the experts run (module docstring); 'auto' resolves by backend in `resolve_impl`.
MOE_IMPLS = ("auto", "ragged", "tiled", "dense", "capacity")

ROUTER = "router"  # flax collection of per-layer router sums (`RouterSums` keys)
ROUTER_LOGITS = "router_logits"  # flax collection of raw router logits, sown only when mutable

# Per-layer router sums over real tokens: `expert_tokens` [E] top-k assignments per expert, `expert_probs` [E]
# summed router probabilities, `tokens` [] real tokens, `z` [] summed logsumexp(logits)^2, `dropped` [] dropped
# assignments (capacity only).
SUM_NAMES = ("expert_tokens", "expert_probs", "tokens", "z", "dropped")


def is_moe_layer(cfg: Any, layer: int) -> bool:
  """Whether decoder layer `layer` (0-based) has the MoE MLP: transformers' Qwen3-MoE rule (`layer not in
  mlp_only_layers and (layer + 1) % decoder_sparse_step == 0`), every layer for Mixtral (step 1, no dense list)."""
  return cfg.num_experts > 0 and layer not in cfg.dense_layers and (layer + 1) % cfg.moe_layer_step == 0


def moe_layers(cfg: Any) -> tuple[int, ...]:
  return tuple(i for i in range(cfg.num_layers) if is_moe_layer(cfg, i))


def resolve_impl(cfg: Any) -> str:
  """The expert kernel for `cfg.moe_impl`. 'auto' is dropless by backend (`cfg.platform`): 'ragged' on TPU and GPU,
  where XLA lowers `ragged_dot` to grouped matmuls, and 'tiled' on CPU, where XLA runs `ragged_dot` as a masked
  product over all E experts (measured, the `:moe` shape's forward and backward on 16 x 256 tokens, 2-core EPYC:
  ragged 1.05 s and 63.8 GFLOP, tiled 0.49 s and 17.3 GFLOP, dense one-hot 1.03 s)."""
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  return "tiled" if platforms.resolve(cfg.platform) == "cpu" else "ragged"


def capacity(cfg: Any, assignments: int) -> int:
  """Assignments one expert takes on the 'capacity' path: ceil(moe_capacity_factor * assignments / E)."""
  return max(1, math.ceil(cfg.moe_capacity_factor * assignments / cfg.num_experts))


def route(logits_NxE: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(probs `[N, E]` fp32, top-k weights `[N, k]` fp32, top-k experts `[N, k]` int32): softmax in fp32, the k
  largest (ties to the lower expert index, as `torch.topk`), renormalised to sum 1 when `normalize`."""
  probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
  weights_NxK, experts_NxK = jax.lax.top_k(probs_NxE, k)
  if normalize:
    weights_NxK = weights_NxK / weights_NxK.sum(-1, keepdims=True)
  return probs_NxE, weights_NxK, experts_NxK.astype(jnp.int32)


def router_sums(logits_NxE: jax.Array, probs_NxE: jax.Array, experts_NxK: jax.Array, real_N: jax.Array,
                dropped_NxK: jax.Array | None = None) -> dict[str, jax.Array]:
  """One layer's `SUM_NAMES` sums over the real tokens (`real_N` 1/0), fp32, no gradient except `expert_probs`
  and `z` (the terms of the auxiliary losses that train the router)."""
  real_N = real_N.astype(jnp.float32)
  e = probs_NxE.shape[-1]
  onehot_NxE = jax.nn.one_hot(experts_NxK, e, dtype=jnp.float32).sum(1)
  lse_N = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
  return {
      "expert_tokens": jax.lax.stop_gradient(real_N @ onehot_NxE),
      "expert_probs": real_N @ probs_NxE,
      "tokens": real_N.sum(),
      "z": jnp.sum(real_N * lse_N ** 2),
      "dropped": (jnp.zeros((), jnp.float32) if dropped_NxK is None
                  else jax.lax.stop_gradient(jnp.sum(dropped_NxK.astype(jnp.float32) * real_N[:, None]))),
  }


def stack_router_sums(collection: Mapping[str, Any]) -> dict[str, jax.Array] | None:
  """The `ROUTER` collection of one forward -> {name: `[L_moe, ...]`} in layer order (None when it is empty).

  Unscanned layers sow under `layers_{i}`; scanned ones under `layers` with a leading layer axis already."""
  found = []

  def walk(tree, path):
    if isinstance(tree, Mapping):
      if "expert_tokens" in tree:
        # A shared-prompt forward sows twice per layer (prompt and response streams): their sums add up.
        found.append((path, {k: (sum(v[1:], v[0]) if isinstance(v, tuple) else v) for k, v in tree.items()}))
        return
      for key in tree:
        walk(tree[key], path + (key,))

  walk(collection, ())
  if not found:
    return None

  def order(item):
    layer = [p for p in item[0] if p.startswith("layers")][0]
    return int(layer.split("_")[1]) if "_" in layer else -1

  found.sort(key=order)
  stacked = [s if s["tokens"].ndim == 1 else jax.tree.map(lambda x: x[None], s) for _, s in found]
  return {k: jnp.concatenate([s[k] for s in stacked]) for k in SUM_NAMES}


def load_balancing_loss(sums: Mapping[str, jax.Array]) -> jax.Array:
  """The Switch / Mixtral load-balancing loss, as transformers' `load_balancing_loss_func` with an attention mask:

      E * sum_e f_e P_e,   f_e = assignments to e / real tokens,   P_e = mean router probability of e,

  both pooled over every MoE layer (HF concatenates the layers' router logits). Minimum k (uniform routing).
  `sums`: `stack_router_sums` output, `[L, E]` / `[L]`."""
  tokens = jnp.maximum(sums["tokens"].sum(), 1.0)
  f_E = sums["expert_tokens"].sum(0) / tokens
  p_E = sums["expert_probs"].sum(0) / tokens
  return f_E.shape[-1] * jnp.sum(f_E * p_E)


def router_z_loss(sums: Mapping[str, jax.Array]) -> jax.Array:
  """ST-MoE's router z-loss (Zoph et al., 2022, eq. 5): mean over real tokens and MoE layers of
  logsumexp(router logits)^2."""
  return sums["z"].sum() / jnp.maximum(sums["tokens"].sum(), 1.0)


def load_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-layer expert load: `max_over_mean` `[L]` (the busiest expert's assignments over the mean; 1 = perfectly
  balanced, E/k = every token to the same k experts), and the dropped fraction of assignments `[L]`."""
  tokens_LxE = sums["expert_tokens"]
  mean_L = jnp.maximum(tokens_LxE.mean(-1), 1e-9)
  assignments_L = jnp.maximum(tokens_LxE.sum(-1), 1.0)
  return {"max_over_mean": tokens_LxE.max(-1) / mean_L, "dropped": sums["dropped"] / assignments_L}


# ---- the expert computations: x [N, D], weights / experts [N, k] -> y [N, D] ----

def _combine(y_NxKxD: jax.Array, weights_NxK: jax.Array, cfg: Any) -> jax.Array:
  """`[N, D]`: each token's k expert outputs `[N, k, D]` summed with its routing weights."""
  return jnp.einsum("nkd,nk->nd", y_NxKxD, weights_NxK.astype(y_NxKxD.dtype), precision=cfg.matmul_precision)


def _sort_assignments(experts_NxK: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(order `[N k]`: assignment indices sorted by expert (stable), inverse `[N k]`, group sizes `[E]`)."""
  flat = experts_NxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  inverse = jnp.argsort(order)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, inverse, sizes


def ragged_experts(x_NxD, weights_NxK, experts_NxK, w, cfg, act, lora=None, dropout_rng=None):
  """Dropless grouped matmuls: `[N k, D]` tokens in expert order through `jax.lax.ragged_dot`. `w`: name ->
  `[E, in, out]`; `lora`: the expert adapters (`ExpertAdapters`), or None. Returns (y `[N, D]`, None)."""
  n, k = experts_NxK.shape
  order, inverse, sizes = _sort_assignments(experts_NxK, cfg.num_experts)
  xs_MxD = x_NxD[order // k]
  dot = lambda h, kernel: jax.lax.ragged_dot(h, kernel.astype(h.dtype), sizes, precision=cfg.matmul_precision)
  proj = lambda name, h: _with_lora(dot(h, w[name]), h, name, lora, dropout_rng, lambda h, a, b: dot(dot(h, a), b))
  h_MxF = act(proj("gate", xs_MxD)) * proj("up", xs_MxD)
  y_MxD = proj("down", h_MxF)
  return _combine(y_MxD[inverse].reshape(n, k, -1), weights_NxK, cfg), None


def dense_experts(x_NxD, weights_NxK, experts_NxK, w, cfg, act, lora=None, dropout_rng=None):
  """Every expert on every token, then the one-hot combine (E / k times the FLOPs of the routed paths)."""
  combine_NxE = (jax.nn.one_hot(experts_NxK, cfg.num_experts, dtype=jnp.float32) * weights_NxK[..., None]).sum(1)
  ein = functools.partial(jnp.einsum, precision=cfg.matmul_precision)
  x_NxExD = jnp.broadcast_to(x_NxD[:, None], (x_NxD.shape[0], cfg.num_experts, x_NxD.shape[1]))
  dot = lambda h, kernel: ein("ned,edf->nef", h, kernel.astype(h.dtype))
  proj = lambda name, h: _with_lora(dot(h, w[name]), h, name, lora, dropout_rng, lambda h, a, b: dot(dot(h, a), b))
  h_NxExF = act(proj("gate", x_NxExD)) * proj("up", x_NxExD)
  y_NxExD = proj("down", h_NxExF)
  return jnp.einsum("ned,ne->nd", y_NxExD, combine_NxE.astype(y_NxExD.dtype), precision=cfg.matmul_precision), None


def tile_rows(assignments: int, num_experts: int) -> int:
  """Rows per tile of the 'tiled' path: a power of two near the balanced share per expert, within [8, 64]."""
  share = max(assignments // num_experts, 1)
  return int(min(64, max(8, 2 ** int(math.log2(share)))))


def tiled_experts(x_NxD, weights_NxK, experts_NxK, w, cfg, act, lora=None, dropout_rng=None):
  """Dropless, as batched matmuls over fixed-size tiles: the assignments sorted by expert, each expert's group
  padded to a multiple of `tile_rows` T, and every tile multiplied by its expert's weights (gathered per tile),
  `[tiles, T, D] x [tiles, D, F]`. At most N k + E T rows are computed (T - 1 padding rows per expert, worst case),
  where XLA:CPU runs `ragged_dot` as a masked product over all E experts; the CPU default. Returns (y, None)."""
  n, k = experts_NxK.shape
  e, m = cfg.num_experts, n * k
  t = tile_rows(m, e)
  tiles = -(-m // t) + e  # sum_e ceil(size_e / T) <= ceil(m / T) + E
  order, inverse, sizes = _sort_assignments(experts_NxK, e)
  padded = -(-sizes // t) * t
  ends = jnp.cumsum(padded)
  sorted_e = experts_NxK.reshape(-1)[order]
  rank = jnp.arange(m) - (jnp.cumsum(sizes) - sizes)[sorted_e]
  row = (ends - padded)[sorted_e] + rank  # each assignment's row in the padded layout, < tiles * T
  xs = jnp.zeros((tiles * t, x_NxD.shape[-1]), x_NxD.dtype).at[row].set(x_NxD[order // k]).reshape(tiles, t, -1)
  tile_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(tiles) * t, side="right"), e - 1)
  dot = lambda h, kernel: jnp.einsum("tmd,tdf->tmf", h, kernel.astype(h.dtype)[tile_expert],
                                     precision=cfg.matmul_precision)
  proj = lambda name, h: _with_lora(dot(h, w[name]), h, name, lora, dropout_rng, lambda h, a, b: dot(dot(h, a), b))
  h = act(proj("gate", xs)) * proj("up", xs)
  y_MxD = proj("down", h).reshape(tiles * t, -1)[row]
  return _combine(y_MxD[inverse].reshape(n, k, -1), weights_NxK, cfg), None


def capacity_experts(x_NxD, weights_NxK, experts_NxK, w, cfg, act, lora=None, dropout_rng=None):
  """At most C assignments per expert (token order); returns (y `[N, D]`, dropped `[N, k]` bool)."""
  n, k = experts_NxK.shape
  e, c = cfg.num_experts, capacity(cfg, n * k)
  flat = experts_NxK.reshape(-1)
  onehot_MxE = jax.nn.one_hot(flat, e, dtype=jnp.int32)
  position_M = jnp.take_along_axis(jnp.cumsum(onehot_MxE, axis=0) - 1, flat[:, None], axis=1)[:, 0]
  kept_M = position_M < c
  slot_M = jnp.where(kept_M, flat * c + position_M, e * c)  # dropped ones to a spare row that is never read back
  buffer = jnp.zeros((e * c + 1, x_NxD.shape[-1]), x_NxD.dtype).at[slot_M].set(x_NxD[jnp.arange(n * k) // k])
  xs_ExCxD = buffer[:-1].reshape(e, c, -1)
  dot = lambda h, kernel: jnp.einsum("ecd,edf->ecf", h, kernel.astype(h.dtype), precision=cfg.matmul_precision)
  proj = lambda name, h: _with_lora(dot(h, w[name]), h, name, lora, dropout_rng, lambda h, a, b: dot(dot(h, a), b))
  h_ExCxF = act(proj("gate", xs_ExCxD)) * proj("up", xs_ExCxD)
  y_ExCxD = proj("down", h_ExCxF)
  y_MxD = jnp.concatenate([y_ExCxD.reshape(e * c, -1), jnp.zeros_like(y_ExCxD[0, :1])])[slot_M]
  y_MxD = y_MxD * kept_M[:, None].astype(y_MxD.dtype)
  return _combine(y_MxD.reshape(n, k, -1), weights_NxK, cfg), ~kept_M.reshape(n, k)


EXPERT_PROJECTIONS = ("gate", "up", "down")


def _with_lora(y, h, name, lora, dropout_rng, low_rank):
  """`y` plus the expert adapter's `scale * low_rank(dropout(h), A, B)` when `lora` has one for `name` (PEFT's
  LoRA update, per expert: A `[E, in, r]`, B `[E, r, out]`)."""
  if lora is None or name not in lora.kernels:
    return y
  a, b = lora.kernels[name]
  if lora.dropout and dropout_rng is not None:
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, EXPERT_PROJECTIONS.index(name)), 1.0 - lora.dropout,
                                h.shape)
    h = jnp.where(keep, h / (1.0 - lora.dropout), 0).astype(h.dtype)
  return y + low_rank(h, a, b) * jnp.asarray(lora.scale, y.dtype)


class ExpertAdapters(NamedTuple):
  """The LoRA adapters of one layer's experts."""
  kernels: dict  # name -> (A `[E, in, r]`, B `[E, r, out]`)
  scale: float  # alpha / r
  dropout: float  # the adapters' input dropout rate


EXPERT_KERNELS = {"ragged": ragged_experts, "tiled": tiled_experts, "dense": dense_experts,
                  "capacity": capacity_experts}


# ---- expert parallelism: the experts split over the 'expert' mesh axis, tokens exchanged all-to-all ----

def expert_parallel_degree(shard: Any) -> int:
  """Size of the 'expert' mesh axis (1 without a mesh)."""
  return 1 if shard is None else int(dict(shard.mesh.shape).get("expert", 1))


def _mesh_axes(shard: Any, logical: str) -> tuple[str, ...]:
  """The mesh axes of size > 1 that the rules map logical axis `logical` to."""
  spec = sharding_lib.logical_to_spec((logical,), shard.rules)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  return tuple(a for a in axes if dict(shard.mesh.shape)[a] > 1)


def expert_parallel(x_BxTxD, weights_BxTxK, experts_BxTxK, w, cfg, act, shard, impl, lora=None, dropout_rng=None):
  """The experts with their weights split over the 'expert' mesh axis (E / ep per device), inside a `shard_map`.

  Each device routes its own tokens: it sorts its N k assignments by expert, which groups them by the device that
  holds the expert, packs them into a `[ep, C, D]` send buffer and exchanges it with `all_to_all` over 'expert';
  the received `[ep C, D]` rows run through the local experts (`ragged_dot`, padding rows last and never computed),
  travel back by a second `all_to_all`, and are un-sorted and combined as on one device. C is N min(k, E / ep)
  (dropless: a token's k experts are distinct, so at most min(k, E / ep) of them are on one peer, and every token
  may pick the same peer) or, with `moe_impl='capacity'`, the per-peer capacity ceil(moe_capacity_factor * N k / ep),
  beyond which assignments are dropped. The buffers are padded: `jax.lax.ragged_all_to_all` would send only the
  rows in use on TPU and GPU, but XLA:CPU does not implement it, so no test here could cover it.

  FSDP shards of the experts' 'embed' dimension are gathered inside (their gradient is the matching
  reduce-scatter); a 'tensor' split of the experts' 'mlp' dimension leaves partial sums that are added over
  'tensor'. Returns (y `[B, T, D]`, dropped `[B, T, K]` bool).
  """
  mesh, ep = shard.mesh, expert_parallel_degree(shard)
  e_local = cfg.num_experts // ep
  batch, length = _mesh_axes(shard, "batch"), _mesh_axes(shard, "length")
  fsdp, tensor = _mesh_axes(shard, "embed"), _mesh_axes(shard, "mlp")
  if "expert" not in batch:
    raise ValueError("sharding: mesh.expert > 1 needs the batch split over 'expert' too (expert parallelism "
                     "exchanges each device's own tokens); map 'batch' to ('data', 'fsdp', 'expert') in "
                     "config.sharding.rules.")
  tok = P(batch or None, length or None, None)
  in_axes = {"gate": (fsdp, tensor), "up": (fsdp, tensor), "down": (tensor, fsdp)}
  kernel_spec = {n: P("expert", a or None, b or None) for n, (a, b) in in_axes.items()}
  names = tuple(w)
  lora_names = () if lora is None else tuple(lora.kernels)
  lora_specs = tuple(s for n in lora_names for s in (P("expert", in_axes[n][0] or None, None),
                                                     P("expert", None, in_axes[n][1] or None)))

  def per_device(x, weights, experts, *leaves):
    kernels = dict(zip(names, leaves[:len(names)]))
    adapters = leaves[len(names):len(names) + 2 * len(lora_names)]
    rng = leaves[-1] if dropout_rng is not None else None
    for axis in batch if rng is not None else ():  # each device's rows draw their own dropout mask
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
    gather = lambda a, axes, axis: jax.lax.all_gather(a, axes, axis=axis, tiled=True) if axes else a
    kernels = {n: gather(kv, fsdp, 1 if n != "down" else 2) for n, kv in kernels.items()}
    local_lora = None
    if lora is not None:
      pairs = {}
      for i, n in enumerate(lora_names):
        a, b = adapters[2 * i], adapters[2 * i + 1]
        pairs[n] = (gather(a, fsdp, 1) if n != "down" else a, gather(b, fsdp, 2) if n == "down" else b)
      local_lora = ExpertAdapters(pairs, lora.scale, lora.dropout)
    b_, t_, d = x.shape
    k = experts.shape[-1]
    n = b_ * t_
    x_NxD, flat = x.reshape(n, d), experts.reshape(-1)
    m = n * k
    # Dropless: a token's k experts are distinct, so at most min(k, E / ep) of them live on one peer.
    c = n * min(k, e_local) if impl != "capacity" else max(1, math.ceil(cfg.moe_capacity_factor * m / ep))
    order, inverse, sizes_E = _sort_assignments(experts, cfg.num_experts)
    sorted_e = flat[order]
    dest = sorted_e // e_local
    per_peer = sizes_E.reshape(ep, e_local).sum(1)  # peer p holds experts p E/ep .. (p + 1) E/ep - 1
    position = jnp.arange(m) - (jnp.cumsum(per_peer) - per_peer)[dest]
    kept = position < c
    slot = jnp.where(kept, dest * c + position, ep * c)
    send_x = jnp.zeros((ep * c + 1, d), x.dtype).at[slot].set(x_NxD[order // k])[:-1].reshape(ep, c, d)
    send_e = jnp.full((ep * c + 1,), e_local, jnp.int32).at[slot].set(sorted_e % e_local)[:-1].reshape(ep, c)
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0).reshape(ep * c, d)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0).reshape(ep * c)
    r_order = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs = recv_x[r_order]
    dot = lambda h, kernel: jax.lax.ragged_dot(h, kernel.astype(h.dtype), sizes, precision=cfg.matmul_precision)
    psum_tensor = lambda a: jax.lax.psum(a, tensor) if tensor else a

    def low_rank(name):
      return lambda h, a, b: dot(psum_tensor(dot(h, a)) if name == "down" else dot(h, a), b)

    # The down adapter's input is split over 'tensor' (gate's and up's are replicated over it): its shards draw
    # their own masks.
    rng_of = lambda name: (jax.random.fold_in(rng, jax.lax.axis_index(tensor)) if rng is not None and tensor
                           and name == "down" else rng)
    proj = lambda name, h: _with_lora(dot(h, kernels[name]), h, name, local_lora, rng_of(name), low_rank(name))
    h = act(proj("gate", xs)) * proj("up", xs)
    # The down product's partial sums are added over 'tensor' before its adapter's update, which is whole already.
    ys = _with_lora(psum_tensor(dot(h, kernels["down"])), h, "down", local_lora, rng_of("down"), low_rank("down"))
    back = jnp.zeros_like(ys).at[r_order].set(ys).reshape(ep, c, d)
    back = jax.lax.all_to_all(back, "expert", 0, 0).reshape(ep * c, d)
    y_sorted = jnp.concatenate([back, jnp.zeros_like(back[:1])])[slot] * kept[:, None].astype(back.dtype)
    y = _combine(y_sorted[inverse].reshape(n, k, d), weights.reshape(n, k), cfg)
    return y.reshape(b_, t_, d), (~kept)[inverse].reshape(b_, t_, k)

  leaves = [w[nm] for nm in names]
  specs = [kernel_spec[nm] for nm in names]
  if lora is not None:
    for nm in lora_names:
      leaves += list(lora.kernels[nm])
    specs += list(lora_specs)
  if dropout_rng is not None:  # replicated in; `per_device` folds in the device's batch (and tensor) index
    leaves.append(dropout_rng)
    specs.append(P())
  return jax.shard_map(per_device, mesh=mesh, in_specs=(tok, tok, tok, *specs), out_specs=(tok, tok),
                       check_vma=False)(x_BxTxD, weights_BxTxK, experts_BxTxK, *leaves)


# ---- the flax module ----

class ExpertAdapter(nn.Module):
  """LoRA A `[E, in, r]`, B `[E, r, out]` of one expert projection (collection 'lora', like `lora.Adapter`), or
  None when the variables hold no 'lora' collection (pi_ref)."""
  spec: Any  # lora.LoraSpec
  shape: tuple[int, int, int]  # (E, in, out)
  axes: tuple[str, str]  # logical names of in and out
  param_dtype: Any

  @nn.compact
  def __call__(self):
    if not (self.has_variable("lora", "a") or self.is_mutable_collection("lora")):
      return None
    e, n_in, n_out = self.shape
    r = self.spec.rank
    if self.spec.init == "gaussian":
      a_draw = nn.initializers.normal(1.0 / r)
    else:  # PEFT's kaiming-uniform over fan_in (lora.py)
      bound = 1.0 / math.sqrt(n_in)
      a_draw = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    a_init = nn.with_logical_partitioning(a_draw, ("expert", self.axes[0], None))
    b_init = nn.with_logical_partitioning(nn.initializers.zeros, ("expert", None, self.axes[1]))
    a = self.variable("lora", "a", lambda: a_init(self.make_rng("params"), (e, n_in, r), self.param_dtype))
    b = self.variable("lora", "b", lambda: b_init(self.make_rng("params"), (e, r, n_out), self.param_dtype))
    return a.value, b.value


class MoeMlp(nn.Module):
  """The MoE MLP of one decoder layer: params `router` `[D, E]`, `gate` / `up` `[E, D, F]`, `down` `[E, F, D]`
  (logical axes 'expert', 'embed', 'mlp'). Called on `x` `[B, T, D]` with the layer's segment ids `[B, T]`
  (0 = padding: excluded from the router sums); returns `[B, T, D]`."""
  cfg: Any  # model.ModelConfig
  shard: Any  # sharding.ShardingContext | None
  act: Any  # the gate activation (model.ACTIVATIONS[cfg.mlp_activation])
  lora: Any = None  # lora.LoraSpec

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT):
    cfg = self.cfg
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.resolved_moe_intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    part = nn.with_logical_partitioning
    router_DxE = self.param("router", part(init, ("embed", None)), (d, e), cfg.param_dtype)
    axes = {"gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
    shapes = {"gate": (e, d, f), "up": (e, d, f), "down": (e, f, d)}
    w = {name: self.param(name, part(init, ("expert",) + axes[name]), shapes[name], cfg.param_dtype)
         for name in EXPERT_PROJECTIONS}
    lora = None
    if self.lora is not None:
      pairs = {}
      for name in EXPERT_PROJECTIONS:
        if self.lora.adapts("experts", name):
          ab = ExpertAdapter(self.lora, shapes[name], axes[name], cfg.param_dtype, name=f"{name}_lora")()
          if ab is not None:
            pairs[name] = tuple(t.astype(cfg.compute_dtype) for t in ab)
      lora = ExpertAdapters(pairs, self.lora.scale, self.lora.dropout) if pairs else None
    dropout_rng = self.make_rng("dropout") if lora is not None and lora.dropout and self.has_rng("dropout") else None
    dtype = cfg.compute_dtype
    x_BxTxD = x_BxTxD.astype(dtype)
    b, t, _ = x_BxTxD.shape
    logits_BxTxE = jnp.matmul(x_BxTxD, router_DxE.astype(dtype), precision=cfg.matmul_precision)
    self.sow(ROUTER_LOGITS, "logits", logits_BxTxE)
    probs_NxE, weights_NxK, experts_NxK = route(logits_BxTxE.reshape(b * t, e), cfg.num_experts_per_tok,
                                                cfg.norm_topk_prob)
    weights_NxK = weights_NxK.astype(dtype)  # HF casts the routing weights to the hidden dtype
    impl = resolve_impl(cfg)
    w = {name: kernel.astype(dtype) for name, kernel in w.items()}
    act = self.act
    k = cfg.num_experts_per_tok
    if expert_parallel_degree(self.shard) > 1:
      y_BxTxD, dropped = expert_parallel(x_BxTxD, weights_NxK.reshape(b, t, k), experts_NxK.reshape(b, t, k), w,
                                         cfg, act, self.shard, impl, lora, dropout_rng)
      dropped_NxK = dropped.reshape(b * t, k) if impl == "capacity" else None
    else:
      y_NxD, dropped_NxK = EXPERT_KERNELS[impl](x_BxTxD.reshape(b * t, d), weights_NxK, experts_NxK, w, cfg, act,
                                                lora, dropout_rng)
      y_BxTxD = y_NxD.reshape(b, t, d)
    sums = router_sums(logits_BxTxE.reshape(b * t, e), probs_NxE, experts_NxK, segment_ids_BxT.reshape(-1) > 0,
                       dropped_NxK)
    for name, value in sums.items():
      self.sow(ROUTER, name, value)
    return sharding_lib.constrain(y_BxTxD.astype(dtype), ("batch", "length", "act_embed"), self.shard)
