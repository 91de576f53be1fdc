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

PEFT folders (`save_peft_adapter`, `load_peft_adapter`): `adapter_config.json` + `adapter_model.safetensors` with
PEFT's key names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `[r, in]`; `lora_B`,
`[out, r]`), which `peft.PeftModel.from_pretrained(base, folder)` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

_PEFT_PREFIX = "base_model.model.model.layers.{i}."
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def _boxed_abstract(model: Any, spec: LoraSpec) -> Any:
  m = model.clone(shard=None, lora=spec)
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
  m = model.clone(shard=None, lora=spec)
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


# ---- PEFT's format ----

def peft_state_dict(adapters: Mapping[str, Any], spec: LoraSpec, cfg: Any) -> dict[str, np.ndarray]:
  """PEFT `adapter_model.safetensors` tensors from our adapters: lora_A `[r, in]`, lora_B `[out, r]` per layer and
  target, `in` / `out` flattened as torch's Linear sees them (heads-major, as `hf.py` lays out q/k/v/o)."""
  from dpo_jax import hf  # here: hf imports model, which imports this module
  out = {}
  for i in range(cfg.num_layers):
    layer, _ = hf._layer_params(adapters, cfg, i)  # layer i's subtree in either layout
    for target in spec.targets:
      module, proj = TARGETS[target]
      ad = layer[module][f"{proj}_lora"]
      a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
      name = _PEFT_PREFIX.format(i=i) + f"{_HF_MODULE[module]}.{target}"
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.rank).T)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(spec.rank, -1).T)
  return out


def adapters_from_peft(state_dict: Mapping[str, Any], spec: LoraSpec, like: Any, cfg: Any, source: str) -> Any:
  """Our adapters (numpy, shaped as `like`: `abstract_adapters`) from PEFT tensors; raises naming a missing,
  unexpected or misshapen tensor."""
  from dpo_jax import hf  # here: hf imports model, which imports this module
  expected = set()
  per_layer: dict[int, dict] = {}
  for i in range(cfg.num_layers):
    layer_like = like["layers" if cfg.scan_layers else f"layers_{i}"]
    for target in spec.targets:
      module, proj = TARGETS[target]
      leaf_like = layer_like[module][f"{proj}_lora"]
      name = _PEFT_PREFIX.format(i=i) + f"{_HF_MODULE[module]}.{target}"
      values = {}
      for side, key in (("a", "lora_A"), ("b", "lora_B")):
        full = f"{name}.{key}.weight"
        expected.add(full)
        if full not in state_dict:
          raise ValueError(f"{source}: no tensor {full!r}; the adapter does not match config.lora.targets="
                           f"{list(spec.targets)} / this model's {cfg.num_layers} layers.")
        shape = leaf_like[side].shape[1:] if cfg.scan_layers else leaf_like[side].shape
        x = np.asarray(state_dict[full])
        want = (spec.rank, math.prod(shape[:-1])) if side == "a" else (math.prod(shape[1:]), spec.rank)
        if x.shape != want:
          raise ValueError(f"{source}: {full} has shape {x.shape}, expected {want} (config.lora.rank={spec.rank} "
                           f"on this model); set the rank the adapter was trained with.")
        values[side] = x.T.reshape(shape).astype(leaf_like[side].dtype)  # [r, in] -> [*in, r]; [out, r] -> [r, *out]
      per_layer.setdefault(i, {}).setdefault(module, {})[f"{proj}_lora"] = values
  unexpected = sorted(set(state_dict) - expected)
  if unexpected:
    raise ValueError(f"{source}: tensors this model has no adapter for: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                     f"(config.lora.targets={list(spec.targets)}).")
  if cfg.scan_layers:
    return {"layers": hf._stack_layers([per_layer[i] for i in range(cfg.num_layers)])}
  return {f"layers_{i}": per_layer[i] for i in range(cfg.num_layers)}


def peft_config(spec: LoraSpec, base_model_name_or_path: str | None) -> dict[str, Any]:
  """The `adapter_config.json` of these adapters: a plain LoRA (no rsLoRA, DoRA, bias or modules_to_save)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": list(spec.targets),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
      "inference_mode": True, "init_lora_weights": True if spec.init == "peft" else spec.init,
  }


def save_peft_adapter(path: str, adapters: Any, spec: LoraSpec, cfg: Any, *,
                      base_model_name_or_path: str | None = None) -> str:
  """Write `path/adapter_config.json` and `path/adapter_model.safetensors` (PEFT's layout); returns `path`."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  tensors = peft_state_dict(jax.device_get(adapters), spec, cfg)
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
    json.dump(peft_config(spec, base_model_name_or_path), f, indent=2)
  return path


# adapter_config.json fields whose non-default values change the math: what we would otherwise compute wrong.
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "target_parameters": None, "layer_replication": None, "use_qalora": False, "lora_bias": False}


def read_peft_spec(path: str) -> LoraSpec:
  """The LoraSpec of the PEFT adapter folder `path`; raises naming the field of an adapter we cannot compute."""
  config_file = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"config.lora.adapter_path={path!r} is not a PEFT adapter folder (no {ADAPTER_CONFIG}); "
                            "give a folder written by PeftModel.save_pretrained or by this trainer's export.")
  with open(config_file) as f:
    pc = json.load(f)
  if pc.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{config_file}: peft_type={pc.get('peft_type')!r}; only LORA adapters load here.")
  for field, default in _UNSUPPORTED.items():
    value = pc.get(field, default)
    if value not in (default, None) and not (isinstance(default, dict) and not value):
      raise ValueError(f"{config_file}: {field}={value!r} is not supported (only a plain LoRA: {field}={default!r}).")
  targets = pc.get("target_modules") or list(PEFT_DEFAULT_TARGETS)
  if isinstance(targets, str):  # PEFT allows a regex or 'all-linear'
    if targets != ALL_LINEAR:
      raise ValueError(f"{config_file}: target_modules={targets!r} is a regex; list the modules "
                       f"({list(TARGETS)}) instead.")
    targets = [ALL_LINEAR]
  return LoraSpec(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]), dropout=float(pc.get("lora_dropout", 0.0)),
                  targets=tuple(targets))


def load_peft_adapter(path: str, model: Any, cfg: Any, shardings: Any | None = None,
                      expect: LoraSpec | None = None) -> tuple[LoraSpec, Any]:
  """(spec, adapters) from the PEFT folder `path` for `model` (built from `cfg`), placed in `shardings`.

  `expect` (the run's config.lora): rank, alpha and targets must match it, else the error names the field."""
  from safetensors.numpy import load_file
  spec = read_peft_spec(path)
  if expect is not None:
    for field in ("rank", "alpha", "targets"):
      if getattr(spec, field) != getattr(expect, field):
        raise ValueError(f"config.lora.adapter_path={path!r} has {field}={getattr(spec, field)!r} but "
                         f"config.lora.{field}={getattr(expect, field)!r}; set --config.lora.{field} to the adapter's.")
  weights = os.path.join(path, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not read; re-save with "
                            "safe_serialization=True).")
  tensors = {k.replace(".default.", "."): v for k, v in load_file(weights).items()}
  adapters = adapters_from_peft(tensors, spec, abstract_adapters(model, spec), cfg, weights)
  if shardings is not None:
    adapters = jax.device_put(adapters, shardings)
  if expect is not None:  # dropout and how A started are training choices, not part of the adapter
    spec = expect
  return spec, adapters
