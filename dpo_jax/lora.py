"""LoRA: low-rank adapters on the policy; the frozen base with the adapters off is pi_ref.

Every targeted projection `y = x W (+ b)` of the policy becomes (Hu et al., 2021, eq. 3; PEFT's `lora.Linear`)

    y = x W (+ b) + (alpha / r) * dropout(x) A B          A `[in, r]`, B `[r, out]`

with W frozen. A starts as PEFT's kaiming-uniform draw, U(-1/sqrt(in), 1/sqrt(in)), and B at zero, so at step 0
the policy IS the base model and DPO's loss is exactly log 2. In DPO the reference is then the base with the
adapters off (TRL's DPOTrainer with a `peft_config`): one copy of the base weights serves both forwards, only the
adapters are differentiated and only they get optimizer moments.

    adapters = init_adapters(model, spec, rng)           # the 'lora' variable collection: {.., 'q_lora': {a, b}}
    policy = LoraParams(base, adapters, spec)           # what every forward (`model.apply_params`) accepts
    logits = model_lib.apply_params(model, policy, ids, positions, segment_ids)
    logits_ref = model_lib.apply_params(model, base, ids, positions, segment_ids)   # adapters off

Projections are named as in PEFT's `target_modules` for Llama-family models: q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj. Adapters keep the logical axes of the kernel they adapt on their outer side
('embed', 'heads', 'mlp', ...) and replicate the rank axis, so they shard with their projection on any mesh.
Mixture-of-experts layers (moe.py) take one adapter per expert under the names experts.gate_proj, experts.up_proj
and experts.down_proj; `merge` and `mix_adapters` treat each expert's A_e B_e on its own.

PEFT adapter folders in and out: dpo_jax/interop/hf/peft.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax import moe

# PEFT target name -> (our module, our projection) inside one decoder layer.
TARGETS = {
    "q_proj": ("attn", "q"), "k_proj": ("attn", "k"), "v_proj": ("attn", "v"), "o_proj": ("attn", "o"),
    "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"), "down_proj": ("mlp", "down"),
    # Mixture-of-experts layers (moe.py): one adapter per expert (A `[E, in, r]`, B `[E, r, out]`). PEFT's
    # 'all-linear' does not reach them (transformers keeps the experts as 3-D parameters, not Linear modules), so
    # they are opt-in by name; the dense names above adapt only dense MLPs.
    "experts.gate_proj": ("experts", "gate"), "experts.up_proj": ("experts", "up"),
    "experts.down_proj": ("experts", "down"),
}
EXPERT_TARGETS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
# PEFT's default `target_modules` for llama, mistral, qwen2/3 and gemma
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every projection of every layer (not the LM head)
# How A starts (B is always 0): PEFT's `init_lora_weights=True` ('peft': kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in)))
# or 'gaussian' (N(0, 1/r), PEFT's init_lora_weights='gaussian').
INITS = ("peft", "gaussian")



@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Rank, scale, dropout and targets of the adapters (config.lora; fields documented in configs/default.py)."""
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = PEFT_DEFAULT_TARGETS
  init: str = "peft"  # one of INITS

  def __post_init__(self):
    targets = tuple(self.targets)
    if targets == (ALL_LINEAR,):
      targets = tuple(t for t in TARGETS if t not in EXPERT_TARGETS)
    object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # one canonical order
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
      raise ValueError(f"config.lora.targets={list(targets)}: {'unknown ' + str(unknown) if unknown else 'empty'}; "
                       f"choose from {list(TARGETS)} (PEFT's names) or ['{ALL_LINEAR}'].")
    if self.rank < 1:
      raise ValueError(f"config.lora.rank={self.rank} must be >= 1 (0 turns LoRA off: full fine-tuning).")
    if not self.alpha > 0:
      raise ValueError(f"config.lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / rank).")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.lora.dropout={self.dropout} must be in [0, 1).")
    if self.init not in INITS:
      raise ValueError(f"config.lora.init={self.init!r}; choose one of {list(INITS)}.")

  @property
  def scale(self) -> float:
    """alpha / r, PEFT's `scaling` (without rsLoRA)."""
    return self.alpha / self.rank

  def adapts(self, module: str, projection: str) -> bool:
    return any(TARGETS[t] == (module, projection) for t in self.targets)


def spec_from_config(lora_cfg: Mapping[str, Any] | None) -> LoraSpec | None:
  """`config.lora` -> LoraSpec, or None when absent or rank 0 (full fine-tuning)."""
  if lora_cfg is None or not lora_cfg["rank"]:
    return None
  return LoraSpec(rank=int(lora_cfg["rank"]), alpha=float(lora_cfg["alpha"]), dropout=float(lora_cfg["dropout"]),
                  targets=tuple(lora_cfg["targets"]), init=str(lora_cfg.get("init", "peft")))


@jax.tree_util.register_pytree_node_class
class LoraParams:
  """The policy of a LoRA run as one pytree: the frozen `base` params, the `adapters` (collection 'lora') and, in a
  train step, the dropout `rng`. `spec` is static (pytree aux data), so a jitted function retraces on a new one."""

  def __init__(self, base: Any, adapters: Any, spec: LoraSpec, rng: jax.Array | None = None):
    self.base, self.adapters, self.spec, self.rng = base, adapters, spec, rng

  def tree_flatten(self):
    return (self.base, self.adapters, self.rng), self.spec

  @classmethod
  def tree_unflatten(cls, spec, children):
    return cls(*children[:2], spec, children[2])

  def __repr__(self) -> str:
    return f"LoraParams(spec={self.spec}, rng={'set' if self.rng is not None else None})"


class Adapter(nn.Module):
  """The low-rank update `(alpha / r) * dropout(x) A B` of one projection, or None when the variables hold no
  'lora' collection (the base model: pi_ref). `in_shape` are the trailing dims of x the projection contracts, and
  `out_shape` the dims it produces; the axes are their logical names (the kernel's), so A and B shard like it."""
  spec: LoraSpec
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[str | None, ...]
  out_axes: tuple[str | None, ...]
  dtype: Any
  param_dtype: Any
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array | None:
    if not (self.has_variable("lora", "a") or self.is_mutable_collection("lora")):
      return None
    r, n_in = self.spec.rank, len(self.in_shape)
    if self.spec.init == "gaussian":  # PEFT: normal_(std=1 / r)
      a_draw = nn.initializers.normal(1.0 / r)
    else:  # PEFT: kaiming_uniform_(a=sqrt(5)) over fan_in = U(-1/sqrt(in), 1/sqrt(in))
      a_draw = _uniform(1.0 / math.sqrt(math.prod(self.in_shape)))
    a_init = nn.with_logical_partitioning(a_draw, self.in_axes + (None,))
    b_init = nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.out_axes)
    a = self.variable("lora", "a", lambda: a_init(self.make_rng("params"), self.in_shape + (r,), self.param_dtype))
    b = self.variable("lora", "b", lambda: b_init(self.make_rng("params"), (r,) + self.out_shape, self.param_dtype))
    if self.spec.dropout and self.has_rng("dropout"):  # train steps pass an rng; evaluation and sampling do not
      x = nn.Dropout(self.spec.dropout, deterministic=False)(x)
    x = x.astype(self.dtype)
    contract = tuple(range(x.ndim - n_in, x.ndim))
    h = jax.lax.dot_general(x, a.value.astype(self.dtype), ((contract, tuple(range(n_in))), ((), ())),
                            precision=self.precision)
    y = jax.lax.dot_general(h, b.value.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    return (y * jnp.asarray(self.spec.scale, self.dtype)).astype(self.dtype)


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def adapted(projection: Any, adapter: Adapter | None, x: jax.Array) -> jax.Array:
  """`projection(x)`, plus the adapter's update when there is one and its variables are present."""
  y = projection(x)
  delta = None if adapter is None else adapter(x)
  return y if delta is None else y + delta.astype(y.dtype)


# ---- adapter params: init, shapes, shardings ----

def _dummy_inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
  ids = jnp.zeros((1, 2), jnp.int32)
  return ids, ids, jnp.ones((1, 2), jnp.int32)


def _init_model(model: Any, spec: LoraSpec) -> Any:
  """`model` unsharded with `spec`'s adapters and 'xla' attention, for `init` on 2 dummy tokens (the adapters do
  not depend on the kernel, and a TPU's splash takes only multiples of 128 tokens)."""
  return model.clone(shard=None, lora=spec, cfg=dataclasses.replace(model.cfg, attention_impl="xla"))


def _boxed_abstract(model: Any, spec: LoraSpec) -> Any:
  m = _init_model(model, spec)
  return jax.eval_shape(lambda r: m.init(r, *_dummy_inputs())["lora"], jax.random.key(0))


def abstract_adapters(model: Any, spec: LoraSpec) -> Any:
  """ShapeDtypeStructs of the adapters of `model` (a `model.Decoder`) under `spec`."""
  return nn.meta.unbox(_boxed_abstract(model, spec))


def adapter_logical_axes(model: Any, spec: LoraSpec) -> Any:
  """Logical axis names of every adapter leaf (`a`: the kernel's input axes + None; `b`: None + its output axes)."""
  specs = nn.get_partition_spec(_boxed_abstract(model, spec))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_adapters(model: Any, spec: LoraSpec, rng: jax.Array, shardings: Any | None = None) -> Any:
  """Fresh adapters (A uniform, B zero) created in `shardings`; the base params that `init` would also draw are
  dead code in this jit and never computed."""
  m = _init_model(model, spec)
  return jax.jit(lambda r: nn.meta.unbox(m.init(r, *_dummy_inputs())["lora"]), out_shardings=shardings)(rng)


# ---- walking adapters against the base params ----

def merge(base: Mapping[str, Any], adapters: Mapping[str, Any], spec: LoraSpec, cfg: Any) -> dict[str, Any]:
  """Base params with every adapted kernel replaced by `W + (alpha / r) * A B` (PEFT's `merge_and_unload`); the
  merged model computes the adapted policy with no adapters (same numbers up to fp32 summation order).

  Mixture-of-experts layers (`moe.is_moe_layer`): an expert target merges `W_e + (alpha / r) A_e B_e` into each
  expert's slice of the plain `[E, in, out]` array at `mlp/{gate,up,down}` (`[L, E, in, out]` with scan_layers);
  dense-MLP targets skip MoE layers and expert targets skip dense ones (neither has an adapter there)."""
  out = dict(base)  # a new tree along the adapted paths; untouched leaves are shared
  hi = jax.lax.Precision.HIGHEST
  layers = [("layers", moe.is_moe_layer(cfg, 0))] if cfg.scan_layers else [
      (f"layers_{i}", moe.is_moe_layer(cfg, i)) for i in range(cfg.num_layers)]
  for layer_key, is_moe in layers:
    for target in spec.targets:
      module, proj = TARGETS[target]
      if module != "attn" and (module == "experts") != is_moe:  # the other kind of MLP: no adapter in this layer
        continue
      experts = module == "experts"
      module = "mlp" if experts else module
      ad = adapters[layer_key][module][f"{proj}_lora"]
      kernel = base[layer_key][module][proj] if experts else base[layer_key][module][proj]["kernel"]
      a, b = jnp.asarray(ad["a"], jnp.float32), jnp.asarray(ad["b"], jnp.float32)
      if experts:  # A [(L,) E, in, r] @ B [(L,) E, r, out]: one product per (layer,) expert
        delta = jnp.matmul(a, b, precision=hi)
      elif cfg.scan_layers:
        delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)
      else:
        delta = jnp.tensordot(a, b, axes=1)
      merged = (jnp.asarray(kernel, jnp.float32) + spec.scale * delta).astype(kernel.dtype)
      out[layer_key] = dict(out[layer_key])
      out[layer_key][module] = dict(out[layer_key][module])
      out[layer_key][module][proj] = merged if experts else dict(out[layer_key][module][proj], kernel=merged)
  return out


# ---- a moving reference as adapters (TR-DPO with LoRA) ----

def zero_adapters(adapters: Any) -> Any:
  """Adapters like `adapters` (same structure, dtypes, shardings) with A = B = 0: a zero delta, so
  `LoraParams(base, zero_adapters(a), spec)` computes the base exactly (every update adds 0). In new buffers."""
  return jax.tree.map(jnp.zeros_like, adapters)


def _is_pair(node: Any) -> bool:
  return isinstance(node, Mapping) and set(node) == {"a", "b"}


def _best_rank_r_sum(a_p: jax.Array, b_p: jax.Array, a_r: jax.Array, b_r: jax.Array,
                     alpha: float) -> tuple[jax.Array, jax.Array]:
  """Factors `(A [in, r], B [r, out])` of the best rank-r approximation (Frobenius and spectral norm,
  Eckart-Young) of `M = alpha A_p B_p + (1 - alpha) A_r B_r` (rank <= 2r), in fp32, never forming `[in, out]`.

  `M = L R` with `L = [sqrt(alpha) A_p, sqrt(1 - alpha) A_r]` `[in, 2r]` and `R` the matching `[2r, out]` stack.
  With `L = Q_L T_L` and `R^T = Q_R T_R` (reduced QR), `M = Q_L (T_L T_R^T) Q_R^T`, so the SVD of the small core
  `T_L T_R^T = U S V^T` is M's (its singular values are M's): keep the top r triplets and put `sqrt(S)` on both
  sides. Exact (to fp32 rounding) when rank(M) <= r; a rank below r is padded with zero columns/rows."""
  hi = jax.lax.Precision.HIGHEST  # fp32 matmuls even where the default is TF32 / bf16 passes
  r = a_p.shape[-1]
  left = jnp.concatenate([math.sqrt(alpha) * a_p, math.sqrt(1.0 - alpha) * a_r], axis=1)  # [in, 2r]
  right = jnp.concatenate([math.sqrt(alpha) * b_p, math.sqrt(1.0 - alpha) * b_r], axis=0)  # [2r, out]
  q_l, t_l = jnp.linalg.qr(left)  # [in, k_l], [k_l, 2r]; k_l = min(in, 2r)
  q_r, t_r = jnp.linalg.qr(right.T)  # [out, k_r], [k_r, 2r]
  u, s, vt = jnp.linalg.svd(jnp.matmul(t_l, t_r.T, precision=hi), full_matrices=False)  # descending s
  keep = min(r, s.shape[0])
  root = jnp.sqrt(s[:keep])
  a = jnp.matmul(q_l, u[:, :keep] * root, precision=hi)  # [in, keep]
  b = jnp.matmul(root[:, None] * vt[:keep], q_r.T, precision=hi)  # [keep, out]
  if keep < r:  # in or out < r: M has rank < r anyway
    a, b = jnp.pad(a, ((0, 0), (0, r - keep))), jnp.pad(b, ((0, r - keep), (0, 0)))
  return a, b


def mix_adapters(reference: Any, policy: Any, alpha: float, *, stacked: bool) -> Any:
  """TR-DPO's update of a reference kept as adapters, `ref_delta <- alpha * policy_delta + (1 - alpha) * ref_delta`
  (Gorbatovski et al. 2024's soft update on the LoRA deltas: the base is shared, so this IS the soft update of
  the merged weights), truncated to the adapters' rank r. New buffers, reference dtype; jit it.

  Per targeted projection the delta is `(alpha_lora / r) A B` (A `[.., in.., r]`, B `[.., r, out..]`); the LoRA
  scale is common to both terms, so the factors are mixed as `A B` products. The exact mix has rank up to 2r; the
  new reference adapters hold its best rank-r approximation (`_best_rank_r_sum`), so the reference keeps the
  adapters' size. Mixing A and B separately would not do: `(a A_p + (1-a) A_r)(a B_p + (1-a) B_r)` carries the
  cross terms `a (1-a) (A_p B_r + A_r B_p)` and is not the mixed delta.

  `alpha = 1` (hard update) copies the policy's adapters exactly. Any update whose mix has rank <= r (the first one,
  from a zero reference; every hard one) is exact to fp32 rounding. `stacked`: adapters carry a leading layer axis
  (`cfg.scan_layers`), each layer truncated on its own. Expert adapters (A `[E, in, r]`, B `[E, r, out]` under a
  layer's 'mlp', one rank more than a dense MLP's) are truncated per expert: expert e's delta `A_e B_e` is a
  separate matrix."""
  if alpha == 1.0:
    return jax.tree.map(lambda r, p: jnp.array(p, dtype=r.dtype, copy=True), reference, policy)

  def mix(path: tuple[Any, ...], ref: Mapping[str, jax.Array], pol: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    a_shape, b_shape = ref["a"].shape, ref["b"].shape
    in_mlp = any(getattr(key, "key", None) == "mlp" for key in path)
    # Leading batch axes, each mixed on its own: the layer axis when stacked, the expert axis of an expert adapter
    # (a dense MLP adapter's A is `[in, r]`, an expert one's `[E, in, r]`).
    lead = (1 if stacked else 0) + (1 if in_mlp and len(a_shape) - (1 if stacked else 0) == 3 else 0)
    rank, n_in, n_out = a_shape[-1], math.prod(a_shape[lead:-1]), math.prod(b_shape[lead + 1:])
    n_batch = math.prod(a_shape[:lead])
    flat_a = lambda x: x.astype(jnp.float32).reshape(n_batch, n_in, rank)
    flat_b = lambda x: x.astype(jnp.float32).reshape(n_batch, rank, n_out)
    a, b = jax.vmap(lambda *f: _best_rank_r_sum(*f, alpha))(flat_a(pol["a"]), flat_b(pol["b"]), flat_a(ref["a"]),
                                                             flat_b(ref["b"]))
    return {"a": a.reshape(a_shape).astype(ref["a"].dtype), "b": b.reshape(b_shape).astype(ref["b"].dtype)}

  return jax.tree_util.tree_map_with_path(mix, reference, policy, is_leaf=_is_pair)
