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

PEFT adapter folders in and out: dpo_jax/interop/hf/peft.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

# PEFT target name -> (our module, our projection) inside one decoder layer.
TARGETS = {
    "q_proj": ("attn", "q"), "k_proj": ("attn", "k"), "v_proj": ("attn", "v"), "o_proj": ("attn", "o"),
    "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"), "down_proj": ("mlp", "down"),
}
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
      targets = tuple(TARGETS)
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
  merged model computes the adapted policy with no adapters (same numbers up to fp32 summation order)."""
  out = dict(base)  # a new tree along the adapted paths; untouched leaves are shared
  for layer_key in ["layers"] if cfg.scan_layers else [f"layers_{i}" for i in range(cfg.num_layers)]:
    for target in spec.targets:
      module, proj = TARGETS[target]
      ad = adapters[layer_key][module][f"{proj}_lora"]
      kernel = base[layer_key][module][proj]["kernel"]
      a, b = jnp.asarray(ad["a"], jnp.float32), jnp.asarray(ad["b"], jnp.float32)
      if cfg.scan_layers:
        delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(a, b)
      else:
        delta = jnp.tensordot(a, b, axes=1)
      merged = (jnp.asarray(kernel, jnp.float32) + spec.scale * delta).astype(kernel.dtype)
      out[layer_key] = dict(out[layer_key])
      out[layer_key][module] = dict(out[layer_key][module])
      out[layer_key][module][proj] = dict(out[layer_key][module][proj], kernel=merged)
  return out
