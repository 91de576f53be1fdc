"""Hugging Face <-> dpo_jax conversion: `ModelConfig` from an HF config, params from/to an HF state dict.

    cfg = model_config_from_hf(hf_model.config, param_dtype="bfloat16")
    params = params_from_hf_state_dict(hf_model.state_dict(), cfg)
    state_dict = hf_state_dict_from_params(params, cfg)     # the inverse, numpy arrays

Supported families, both ways: llama, mistral, qwen2, qwen3 (per-head q/k norms), gemma v1 (GeGLU, sqrt(D)
embedding scale, (1 + w) norms). They share one tensor naming (`model.layers.{i}.self_attn.q_proj`, ...), so one
layout table serves all five; a family with other names adds a config reader to `_CONFIG_READERS` and a layout to
`_LAYOUTS`, and for export an entry in `_HF_CLASSES` and `_FAMILY_FIXED`. RoPE: unscaled, 'linear' and 'llama3'
(Llama 3.1/3.2) scaling; other scalings raise NotImplementedError.

No permutation is needed: `model.py` follows HF's rotate-half RoPE and its query-head -> kv-head grouping, so
every tensor maps by transposes (torch `Linear.weight` is `[out, in]`, ours `[in, out]`) and head reshapes.

This module imports neither torch nor transformers at import time: HF configs are read by attribute, tensors
through numpy. The checkpoint-folder functions import transformers and safetensors when called:

    cfg, params = load_hf_checkpoint("ckpt_dir", mesh=mesh, rules=rules)   # sharded straight onto the mesh
    save_hf_checkpoint(params, cfg, "out_dir", model_type="llama", tokenizer=tok)
"""

from __future__ import annotations

import dataclasses
import types
import glob
import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from dpo_jax import sharding
from dpo_jax.model import ModelConfig, param_logical_axes

# --------------------------------------------------------------------------------------------------------------
# Config


def _rope_dicts(hf_config: Any) -> list[Mapping[str, Any]]:
  """The RoPE dicts an HF config may carry: transformers 5 `rope_parameters`, older `rope_scaling`."""
  return [d for d in (getattr(hf_config, "rope_parameters", None), getattr(hf_config, "rope_scaling", None))
          if isinstance(d, Mapping)]


def _rope_theta(hf_config: Any) -> float:
  theta = getattr(hf_config, "rope_theta", None)  # transformers 4.x; in 5.x inside rope_parameters
  for d in _rope_dicts(hf_config):
    theta = d.get("rope_theta", theta) if theta is None else theta
  if theta is None:
    raise ValueError("hf config: no rope_theta (neither `rope_theta` nor `rope_parameters['rope_theta']`).")
  return float(theta)


def _rope_fields(hf_config: Any) -> dict[str, Any]:
  """ModelConfig RoPE fields; raises NotImplementedError for scalings / partial RoPE that `model.py` lacks.

  'default', 'linear' and 'llama3' map to `rope_scaling_type` 'none', 'linear' and 'llama3' (see
  `model.rope_inv_freq`); the scaling keys are read from `rope_parameters` (transformers 5) or `rope_scaling`.
  """
  fields: dict[str, Any] = dict(rope_theta=_rope_theta(hf_config))
  for d in _rope_dicts(hf_config):
    if d.get("partial_rotary_factor", 1.0) != 1.0:
      raise NotImplementedError(
          f"hf config: partial_rotary_factor={d['partial_rotary_factor']} is not supported (RoPE on all dims).")
    rope_type = d.get("rope_type", d.get("type"))  # 'type' is the pre-4.45 spelling
    if rope_type in (None, "default"):
      continue
    if rope_type not in ("linear", "llama3"):
      raise NotImplementedError(
          f"hf config: rope type {rope_type!r} is not supported (only 'default', 'linear' and 'llama3'); "
          "convert a checkpoint without that RoPE scaling.")
    fields.update(rope_scaling_type=rope_type, rope_scaling_factor=float(d["factor"]))
    if rope_type == "llama3":
      context = d.get("original_max_position_embeddings") or getattr(hf_config, "max_position_embeddings", None)
      if context is None:
        raise ValueError("hf config: llama3 RoPE without original_max_position_embeddings (nor "
                         "max_position_embeddings); add it to the config's rope_parameters.")
      fields.update(rope_low_freq_factor=float(d["low_freq_factor"]),
                    rope_high_freq_factor=float(d["high_freq_factor"]), rope_original_max_positions=int(context))
  return fields


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
  """HF `rope_parameters` describing cfg's RoPE (the inverse of `_rope_fields`)."""
  if cfg.rope_scaling_type == "none":
    return dict(rope_type="default", rope_theta=cfg.rope_theta)
  out = dict(rope_type=cfg.rope_scaling_type, rope_theta=cfg.rope_theta, factor=cfg.rope_scaling_factor)
  if cfg.rope_scaling_type == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_positions)
  return out


def _warn_if_windowed(hf_config: Any, window: int | None) -> None:
  # Our attention is always full-causal; that equals sliding-window attention only up to the window length, so
  # converting is fine for training on shorter sequences but the user should know.
  if window is not None:
    warnings.warn(
        f"hf config: sliding_window={window} is ignored (dpo_jax uses full causal attention); logits match HF "
        f"only for sequences of at most {window} tokens.", stacklevel=4)  # the caller of model_config_from_hf


def _common_fields(hf_config: Any) -> dict[str, Any]:
  """Fields every Llama-like HF config spells the same way."""
  act = getattr(hf_config, "hidden_act", "silu")
  if act != "silu":
    raise NotImplementedError(f"hf config: hidden_act={act!r}; dpo_jax's MLP is SwiGLU (silu) only.")
  num_heads = hf_config.num_attention_heads
  kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads  # None in old configs: plain MHA
  return dict(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=num_heads,
      num_kv_heads=kv_heads,
      head_dim=getattr(hf_config, "head_dim", None),  # explicit only; None -> hidden // heads
      **_rope_fields(hf_config),
      rms_norm_eps=float(hf_config.rms_norm_eps),
      tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
  )


def _llama_fields(hf_config: Any) -> dict[str, Any]:
  bias = bool(getattr(hf_config, "attention_bias", False))  # one flag for q, k, v and o
  return dict(_common_fields(hf_config), qkv_bias=bias, attn_out_bias=bias,
              mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))


def _mistral_fields(hf_config: Any) -> dict[str, Any]:
  _warn_if_windowed(hf_config, getattr(hf_config, "sliding_window", None))
  return _common_fields(hf_config)  # no biases anywhere


def _qwen2_fields(hf_config: Any) -> dict[str, Any]:
  if getattr(hf_config, "use_sliding_window", False):
    _warn_if_windowed(hf_config, getattr(hf_config, "sliding_window", None))
  return dict(_common_fields(hf_config), qkv_bias=True, attn_out_bias=False)  # Qwen2: biased q, k, v only


def _qwen3_fields(hf_config: Any) -> dict[str, Any]:
  """Qwen3: Qwen2 without the q/k/v biases (attention_bias, usually False), plus per-head q/k RMSNorm."""
  if getattr(hf_config, "use_sliding_window", False):
    _warn_if_windowed(hf_config, getattr(hf_config, "sliding_window", None))
  bias = bool(getattr(hf_config, "attention_bias", False))
  return dict(_common_fields(hf_config), qkv_bias=bias, attn_out_bias=bias, qk_norm=True)


def _gemma_fields(hf_config: Any) -> dict[str, Any]:
  """Gemma (v1): GeGLU (tanh gelu), embeddings times sqrt(hidden), RMSNorm as x * (1 + w), tied head."""
  act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
  if act not in ("gelu_pytorch_tanh", "gelu"):  # HF maps Gemma's legacy 'gelu' to the tanh form too
    raise NotImplementedError(f"hf config: gemma activation {act!r}; dpo_jax implements gelu_pytorch_tanh.")
  plain = types.SimpleNamespace(**{**vars(hf_config), "hidden_act": "silu"})  # reuse the shared fields
  bias = bool(getattr(hf_config, "attention_bias", False))
  return dict(_common_fields(plain), qkv_bias=bias, attn_out_bias=bias, mlp_activation="gelu_tanh",
              embed_scale=True, norm_offset=1.0)


# model_type -> reader of the ModelConfig fields from that family's HF config.
_CONFIG_READERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "llama": _llama_fields,
    "mistral": _mistral_fields,
    "qwen2": _qwen2_fields,
    "qwen3": _qwen3_fields,
    "gemma": _gemma_fields,
}

# model_type -> name of its tensor layout in `_LAYOUTS` (all five share Llama's tensor names).
_LAYOUT_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama"}

SUPPORTED_MODEL_TYPES = tuple(sorted(_CONFIG_READERS))


def model_config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
  """`ModelConfig` for an HF `PretrainedConfig` of a supported `model_type`.

  `overrides` set ModelConfig fields that HF configs do not describe (param_dtype, compute_dtype, remat,
  scan_layers, ...) or replace converted ones.
  """
  model_type = getattr(hf_config, "model_type", None)
  if model_type not in _CONFIG_READERS:
    raise ValueError(
        f"hf config: model_type={model_type!r} is not supported; supported model types: "
        f"{list(SUPPORTED_MODEL_TYPES)}.")
  fields = _CONFIG_READERS[model_type](hf_config)
  return ModelConfig.from_dict({**fields, **overrides})


# --------------------------------------------------------------------------------------------------------------
# Tensor layout


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One tensor: its HF name and shape, its path in our params, and the two (exact) layout maps."""
  hf_name: str
  path: tuple[str, ...]  # inside a layer for per-layer rules, else from the params root
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity_rule(hf_name, path, shape) -> _Rule:
  return _Rule(hf_name, path, shape, lambda x: x, lambda x: x)


def _linear_rule(hf_name, path, n_in, n_out) -> _Rule:
  """torch Linear weight `[out, in]` <-> our Dense kernel `[in, out]`."""
  return _Rule(hf_name, path, (n_out, n_in), lambda w: w.T, lambda k: k.T)


def _heads_in_rule(hf_name, path, d, heads, head_dim) -> _Rule:
  """q/k/v weight `[heads*head_dim, D]` <-> kernel `[D, heads, head_dim]` (HF flattens heads major)."""
  return _Rule(hf_name, path, (heads * head_dim, d),
               lambda w: w.T.reshape(d, heads, head_dim),
               lambda k: k.reshape(d, heads * head_dim).T)


def _heads_bias_rule(hf_name, path, heads, head_dim) -> _Rule:
  """q/k/v bias `[heads*head_dim]` <-> `[heads, head_dim]`."""
  return _Rule(hf_name, path, (heads * head_dim,),
               lambda b: b.reshape(heads, head_dim),
               lambda b: b.reshape(heads * head_dim))


def _heads_out_rule(hf_name, path, d, heads, head_dim) -> _Rule:
  """o weight `[D, heads*head_dim]` <-> kernel `[heads, head_dim, D]`."""
  return _Rule(hf_name, path, (d, heads * head_dim),
               lambda w: w.T.reshape(heads, head_dim, d),
               lambda k: k.reshape(heads * head_dim, d).T)


def _llama_layer_rules(cfg: ModelConfig) -> list[_Rule]:
  """Per-layer tensors; `hf_name` has a `{i}` for the layer index."""
  d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
  h, k = cfg.num_heads, cfg.num_kv_heads
  pre = "model.layers.{i}."
  rules = [
      _identity_rule(pre + "input_layernorm.weight", ("attn_norm", "scale"), (d,)),
      _identity_rule(pre + "post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,)),
      _heads_out_rule(pre + "self_attn.o_proj.weight", ("attn", "o", "kernel"), d, h, dh),
  ]
  for name, heads in (("q", h), ("k", k), ("v", k)):
    rules.append(_heads_in_rule(pre + f"self_attn.{name}_proj.weight", ("attn", name, "kernel"), d, heads, dh))
    if cfg.qkv_bias:
      rules.append(_heads_bias_rule(pre + f"self_attn.{name}_proj.bias", ("attn", name, "bias"), heads, dh))
  if cfg.attn_out_bias:
    rules.append(_identity_rule(pre + "self_attn.o_proj.bias", ("attn", "o", "bias"), (d,)))
  if cfg.qk_norm:  # Qwen3
    for name in ("q", "k"):
      rules.append(_identity_rule(pre + f"self_attn.{name}_norm.weight", ("attn", f"{name}_norm", "scale"), (dh,)))
  for name, n_in, n_out in (("gate", d, f), ("up", d, f), ("down", f, d)):
    rules.append(_linear_rule(pre + f"mlp.{name}_proj.weight", ("mlp", name, "kernel"), n_in, n_out))
    if cfg.mlp_bias:
      rules.append(_identity_rule(pre + f"mlp.{name}_proj.bias", ("mlp", name, "bias"), (n_out,)))
  return rules


def _llama_global_rules(cfg: ModelConfig) -> list[_Rule]:
  """Tensors outside the layers. A tied lm_head is not listed: it is `embed_tokens` (see `_TIED_HEAD`)."""
  d, v = cfg.hidden_size, cfg.vocab_size
  rules = [
      _identity_rule("model.embed_tokens.weight", ("embed", "embedding"), (v, d)),
      _identity_rule("model.norm.weight", ("final_norm", "scale"), (d,)),
  ]
  if not cfg.tie_embeddings:
    rules.append(_linear_rule("lm_head.weight", ("lm_head",), d, v))
  return rules


@dataclasses.dataclass(frozen=True)
class _Layout:
  layer_rules: Callable[[ModelConfig], list[_Rule]]
  global_rules: Callable[[ModelConfig], list[_Rule]]
  tied_head: str  # HF name of the LM head, which tied checkpoints may carry as a copy of the embedding
  embedding: str
  ignored_suffixes: tuple[str, ...]  # tensors with no counterpart in our model and no effect on it


_LAYOUTS = {
    "llama": _Layout(
        _llama_layer_rules, _llama_global_rules, tied_head="lm_head.weight",
        embedding="model.embed_tokens.weight",
        # Older checkpoints saved RoPE's inverse frequencies, which we recompute from rope_theta.
        ignored_suffixes=("rotary_emb.inv_freq",)),
}


def _layout(model_type: str) -> _Layout:
  if model_type not in _LAYOUT_OF_MODEL_TYPE:
    raise ValueError(f"model_type={model_type!r} is not supported; supported model types: "
                     f"{list(SUPPORTED_MODEL_TYPES)}.")
  return _LAYOUTS[_LAYOUT_OF_MODEL_TYPE[model_type]]


# --------------------------------------------------------------------------------------------------------------
# Conversion


def _to_numpy(x: Any) -> np.ndarray:
  """numpy view/copy of a torch tensor, jax array or array-like (torch bf16 has no numpy dtype: via fp32)."""
  if hasattr(x, "detach"):  # torch, duck-typed so this module does not import torch
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()  # exact; the cast to param_dtype below restores bf16 bit-for-bit
    x = x.numpy()
  return np.asarray(x)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _expected_names(cfg: ModelConfig, layout: _Layout) -> set[str]:
  names = {r.hf_name for r in layout.global_rules(cfg)}
  for i in range(cfg.num_layers):
    names |= {r.hf_name.format(i=i) for r in layout.layer_rules(cfg)}
  return names


def _listing(names: list[str], limit: int = 20) -> str:
  """Names for an error message; a wrong config can mismatch every tensor, so long lists are cut."""
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return f"{names[:limit]}{more}"


def _check_names(names: set[str], cfg: ModelConfig, layout: _Layout) -> None:
  """Raise naming every missing and unexpected tensor (mismatched configs usually show as both)."""
  expected = _expected_names(cfg, layout)
  optional = {layout.tied_head} if cfg.tie_embeddings else set()
  missing = sorted(expected - names)
  unexpected = sorted(n for n in names - expected - optional if not n.endswith(layout.ignored_suffixes))
  if missing or unexpected:
    raise ValueError(
        f"hf state dict does not match the model config: missing tensors {_listing(missing)}, unexpected "
        f"tensors {_listing(unexpected)}. Build the config with model_config_from_hf(<the checkpoint's config>) "
        "and pass the full *ForCausalLM state dict (names start with 'model.').")


def _convert_in(rule: _Rule, hf_name: str, value: Any, dtype: np.dtype) -> np.ndarray:
  x = _to_numpy(value)
  if x.shape != rule.hf_shape:
    raise ValueError(
        f"hf state dict: {hf_name} has shape {x.shape}, the config implies {rule.hf_shape}; the ModelConfig "
        "does not match this checkpoint (build it with model_config_from_hf).")
  # Always a fresh C-ordered copy: torch's .numpy() shares the module's storage, which training may mutate.
  return rule.to_ours(x).astype(dtype, order="C")


def params_from_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig, *,
                              model_type: str = "llama") -> dict[str, Any]:
  """Our params (nested dict of numpy arrays in `cfg.param_dtype`) from an HF `*ForCausalLM` state dict.

  Args:
    state_dict: HF name -> torch tensor / numpy / jax array, e.g. `hf_model.state_dict()`.
    cfg: the matching config (`model_config_from_hf`); `cfg.scan_layers` picks the layer layout: per-layer
      subtrees `layers_{i}` or one `layers` subtree with every leaf stacked to `[num_layers, ...]`.
    model_type: HF `config.model_type`; selects the tensor naming (all supported types share Llama's).

  With `cfg.tie_embeddings`, `lm_head.weight` may be absent or present, but if present must equal the embedding.
  Raises ValueError naming missing / unexpected / misshapen tensors.
  """
  layout = _layout(model_type)
  _check_names(set(state_dict), cfg, layout)
  dtype = np.dtype(cfg.param_dtype)  # jax registers 'bfloat16' with numpy (ml_dtypes)
  if cfg.tie_embeddings and layout.tied_head in state_dict:
    if not np.array_equal(_to_numpy(state_dict[layout.tied_head]), _to_numpy(state_dict[layout.embedding])):
      raise ValueError(
          f"hf state dict: {layout.tied_head} differs from {layout.embedding} but cfg.tie_embeddings=True; "
          "set tie_embeddings=False (the checkpoint's head is untied).")

  params: dict[str, Any] = {}
  for rule in layout.global_rules(cfg):
    _set(params, rule.path, _convert_in(rule, rule.hf_name, state_dict[rule.hf_name], dtype))
  layers = []
  for i in range(cfg.num_layers):
    layer: dict[str, Any] = {}
    for rule in layout.layer_rules(cfg):
      name = rule.hf_name.format(i=i)
      _set(layer, rule.path, _convert_in(rule, name, state_dict[name], dtype))
    layers.append(layer)
  if cfg.scan_layers:
    # nn.scan keeps one subtree whose leaves gain a leading layer axis.
    params["layers"] = _stack_layers(layers)
  else:
    params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  return params


def _stack_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
  """List of L identical-structure trees -> one tree with leaves stacked on a new axis 0 (`[L, ...]`)."""
  first = layers[0]
  if isinstance(first, Mapping):
    return {key: _stack_layers([layer[key] for layer in layers]) for key in first}
  return np.stack(layers)


def _layer_params(params: Mapping[str, Any], cfg: ModelConfig, i: int) -> tuple[Mapping[str, Any], str]:
  """Layer i's subtree in either layout (leaves as numpy), and its path prefix for error messages."""
  if cfg.scan_layers:
    return _map_leaves(lambda x: np.asarray(x)[i], params["layers"]), f"layers[{i}]/"
  return params[f"layers_{i}"], f"layers_{i}/"


def _map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {key: _map_leaves(fn, sub) for key, sub in tree.items()}
  return fn(tree)


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    return {p: x for key, sub in tree.items() for p, x in _leaf_paths(sub, prefix + (key,)).items()}
  return {prefix: tree}


def _check_param_paths(params: Mapping[str, Any], cfg: ModelConfig, layout: _Layout) -> None:
  """Raise naming missing / unexpected params (an export must not silently drop or invent a tensor)."""
  expected = {r.path for r in layout.global_rules(cfg)}
  layer_paths = {r.path for r in layout.layer_rules(cfg)}
  if cfg.scan_layers:
    expected |= {("layers",) + p for p in layer_paths}
  else:
    expected |= {(f"layers_{i}",) + p for i in range(cfg.num_layers) for p in layer_paths}
  leaves = _leaf_paths(params)
  missing = sorted("/".join(p) for p in expected - set(leaves))
  unexpected = sorted("/".join(p) for p in set(leaves) - expected)
  if missing or unexpected:
    raise ValueError(
        f"params do not match the model config: missing {_listing(missing)}, unexpected {_listing(unexpected)}. "
        "Pass the ModelConfig these params were built with (scan_layers, tie_embeddings and biases included).")
  if cfg.scan_layers:
    for path, x in leaves.items():
      if path[0] == "layers" and np.shape(x)[:1] != (cfg.num_layers,):
        raise ValueError(f"params: {'/'.join(path)} has shape {np.shape(x)}; scanned layer params need a leading "
                         f"[num_layers={cfg.num_layers}] axis.")


def hf_state_dict_from_params(params: Mapping[str, Any], cfg: ModelConfig, *,
                              model_type: str = "llama") -> dict[str, np.ndarray]:
  """HF `*ForCausalLM` state dict (name -> contiguous numpy array in the params' dtype) from our params.

  The inverse of `params_from_hf_state_dict`, bit-for-bit. With `cfg.tie_embeddings` no `lm_head.weight` is
  written, as HF `save_pretrained` does for tied heads. Arrays may share memory with numpy params (no copy is
  made where the layout already matches). Raises ValueError naming missing / unexpected / misshapen params.
  """
  layout = _layout(model_type)
  out: dict[str, np.ndarray] = {}

  def put(rule: _Rule, name: str, tree: Mapping[str, Any], root: str) -> None:
    x = np.asarray(_get(tree, rule.path))
    expected = rule.to_ours(np.empty(rule.hf_shape, np.int8)).shape  # views only: free
    if x.shape != expected:
      raise ValueError(f"params: {root}{'/'.join(rule.path)} has shape {x.shape}, expected {expected} for "
                       f"{name}; pass the ModelConfig these params were built with.")
    out[name] = np.ascontiguousarray(rule.to_hf(x))

  _check_param_paths(params, cfg, layout)
  for rule in layout.global_rules(cfg):
    put(rule, rule.hf_name, params, "")
  for i in range(cfg.num_layers):
    layer, root = _layer_params(params, cfg, i)
    for rule in layout.layer_rules(cfg):
      put(rule, rule.hf_name.format(i=i), layer, root)
  return out


# --------------------------------------------------------------------------------------------------------------
# Checkpoint folders (`save_pretrained` layout): config.json + model.safetensors or a sharded index.

_CONFIG_FILE = "config.json"
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def _weight_map(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file (absolute) of a checkpoint folder; raises FileNotFoundError."""
  from safetensors import safe_open

  index = os.path.join(path, _INDEX_FILE)
  single = os.path.join(path, _SINGLE_FILE)
  if os.path.isfile(index):  # transformers prefers the index too when both exist
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    absent = sorted({f for f in files.values() if not os.path.isfile(f)})
    if absent:
      raise FileNotFoundError(f"hf checkpoint {path}: {_INDEX_FILE} lists shards that do not exist: {absent}. "
                              "Copy the whole checkpoint folder.")
    return files
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  others = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack")))
  hint = (f" It has {others}, which this loader does not read: load it with transformers "
          "(AutoModelForCausalLM.from_pretrained) and re-save it with `save_pretrained(new_path)`, which writes "
          "safetensors (always in transformers 5; pass safe_serialization=True in 4.x)." if others else "")
  raise FileNotFoundError(
      f"hf checkpoint {path}: no weights; expected {_SINGLE_FILE} or {_INDEX_FILE} with its shards.{hint}")


class _TensorReader:
  """Reads one tensor at a time from safetensors files, keeping each file open once.

  numpy has no bfloat16 in safetensors' numpy backend, so BF16 tensors are read through torch (exact: `_to_numpy`
  upcasts to fp32 and the param dtype cast restores bf16 bit-for-bit). safetensors' flax backend would work too,
  but it puts the whole tensor on the default device, the unsharded copy this loader exists to avoid.
  """

  def __init__(self, files: Mapping[str, str]):
    self._files = dict(files)
    self._handles: dict[tuple[str, str], Any] = {}

  def _handle(self, file: str, framework: str) -> Any:
    from safetensors import safe_open
    key = (file, framework)
    if key not in self._handles:
      self._handles[key] = safe_open(file, framework=framework)
    return self._handles[key]

  def get(self, name: str) -> Any:
    file = self._files[name]
    handle = self._handle(file, "numpy")
    if handle.get_slice(name).get_dtype() != "BF16":
      return handle.get_tensor(name)
    try:
      import torch  # noqa: F401
    except ImportError as e:
      raise ImportError(f"hf checkpoint: {name} in {file} is bfloat16, which safetensors reads only through "
                        "torch here; install torch (CPU is enough) or re-save the checkpoint in float32.") from e
    return self._handle(file, "pt").get_tensor(name)


def _place(x: np.ndarray, mesh: Any, rules: Any, logical_axes: tuple[Any, ...], what: str) -> Any:
  """`x` as a jax array in its NamedSharding, each device getting only its shard (no unsharded device copy)."""
  if mesh is None:
    return x
  target = sharding.named_sharding(mesh, rules, logical_axes, x.shape, what=what)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def load_hf_checkpoint(path: str, *, mesh: Any = None, rules: Any = None,
                       **config_overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """`(ModelConfig, params)` from a local HF checkpoint folder, read tensor by tensor.

  Args:
    path: folder with `config.json` and `model.safetensors` or `model.safetensors.index.json` + shards, as
      written by `save_pretrained` (or `save_hf_checkpoint`). Read offline; nothing is downloaded.
    mesh, rules: when given (both), every param is placed straight into its NamedSharding from
      `model.param_logical_axes(cfg)` and `rules` (e.g. `configs.default.SHARDING_RULES`); each device receives
      only its own shard. Without them params are host numpy arrays.
    config_overrides: ModelConfig fields (param_dtype, scan_layers, ...), as in `model_config_from_hf`.

  Host memory peaks at one converted tensor, or with `scan_layers` at one stacked `[num_layers, ...]` leaf
  (the L per-layer tensors are gathered into one host buffer before placing it).
  Raises FileNotFoundError for a missing folder / config / weights, ValueError for tensors that do not match.
  """
  import transformers

  if not os.path.isdir(path):
    raise FileNotFoundError(f"hf checkpoint {path}: no such folder; expected a local folder with {_CONFIG_FILE} "
                            f"and {_SINGLE_FILE} (or {_INDEX_FILE} + shards), as written by save_pretrained.")
  if not os.path.isfile(os.path.join(path, _CONFIG_FILE)):
    raise FileNotFoundError(f"hf checkpoint {path}: no {_CONFIG_FILE}; save the model with save_pretrained, "
                            "which writes it next to the weights.")
  if (mesh is None) != (rules is None):
    raise ValueError("load_hf_checkpoint: pass both mesh and rules (e.g. config.sharding.rules), or neither.")
  hf_config = transformers.AutoConfig.from_pretrained(path)
  cfg = model_config_from_hf(hf_config, **config_overrides)
  layout = _layout(hf_config.model_type)
  files = _weight_map(path)
  try:
    _check_names(set(files), cfg, layout)
  except ValueError as e:
    raise ValueError(f"hf checkpoint {path}: {e}") from None
  reader = _TensorReader(files)
  dtype = np.dtype(cfg.param_dtype)
  if cfg.tie_embeddings and layout.tied_head in files:
    if not np.array_equal(_to_numpy(reader.get(layout.tied_head)), _to_numpy(reader.get(layout.embedding))):
      raise ValueError(f"hf checkpoint {path}: {layout.tied_head} differs from {layout.embedding} but the config "
                       "ties them; pass tie_embeddings=False.")
  axes = _logical_axes(cfg, mesh)

  params: dict[str, Any] = {}
  for rule in layout.global_rules(cfg):
    x = _convert_in(rule, rule.hf_name, reader.get(rule.hf_name), dtype)
    _set(params, rule.path, _place(x, mesh, rules, _axes_at(axes, rule.path), "/".join(rule.path)))
  for rule in layout.layer_rules(cfg):
    names = [rule.hf_name.format(i=i) for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      first = _convert_in(rule, names[0], reader.get(names[0]), dtype)
      stacked = np.empty((cfg.num_layers,) + first.shape, dtype)  # the one host buffer of a scanned leaf
      stacked[0] = first
      for i, name in enumerate(names[1:], start=1):
        stacked[i] = _convert_in(rule, name, reader.get(name), dtype)
      leaf_path = ("layers",) + rule.path
      _set(params, leaf_path, _place(stacked, mesh, rules, _axes_at(axes, leaf_path), "/".join(leaf_path)))
    else:
      for i, name in enumerate(names):
        leaf_path = (f"layers_{i}",) + rule.path
        x = _convert_in(rule, name, reader.get(name), dtype)
        _set(params, leaf_path, _place(x, mesh, rules, _axes_at(axes, leaf_path), "/".join(leaf_path)))
  return cfg, params


def _logical_axes(cfg: ModelConfig, mesh: Any) -> Any:
  """Logical axis names of every param; None for unsharded loads (saves tracing the model's init)."""
  if mesh is None:
    return None
  return param_logical_axes(cfg)


def _axes_at(axes: Any, path: tuple[str, ...]) -> Any:
  return None if axes is None else _get(axes, path)


# model_type -> (transformers config class name, *ForCausalLM architecture name).
_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}

_SWIGLU = dict(qk_norm=False, mlp_activation="silu", embed_scale=False, norm_offset=0.0)
# model_type -> the ModelConfig fields whose value that family's architecture fixes.
_FAMILY_FIXED = {
    "llama": _SWIGLU,
    "mistral": dict(_SWIGLU, qkv_bias=False, attn_out_bias=False, mlp_bias=False),
    "qwen2": dict(_SWIGLU, qkv_bias=True, attn_out_bias=False, mlp_bias=False),
    "qwen3": dict(_SWIGLU, qk_norm=True, mlp_bias=False),
    "gemma": dict(qk_norm=False, mlp_activation="gelu_tanh", embed_scale=True, norm_offset=1.0, mlp_bias=False),
}
# Families whose single `attention_bias` flag covers q, k, v and o alike.
_ONE_ATTENTION_BIAS = ("llama", "qwen3", "gemma")


def _family_mismatch(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  """{field: cfg's value} for every field `model_type` cannot express (empty when it can express cfg)."""
  bad = {f: getattr(cfg, f) for f, v in _FAMILY_FIXED[model_type].items() if getattr(cfg, f) != v}
  if model_type in _ONE_ATTENTION_BIAS and cfg.qkv_bias != cfg.attn_out_bias:
    bad.update(qkv_bias=cfg.qkv_bias, attn_out_bias=cfg.attn_out_bias)
  return bad


def _family_fields(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  """The family-specific HF config kwargs; raises naming the fields the family cannot express, and the families
  that can."""
  bad = _family_mismatch(cfg, model_type)
  if bad:
    fits = [t for t in _FAMILY_FIXED if not _family_mismatch(cfg, t)]
    one_flag = " and qkv_bias == attn_out_bias (one attention_bias flag)" if model_type in _ONE_ATTENTION_BIAS else ""
    fix = f"Use model_type={fits[0]!r}." if fits else "No supported family expresses this cfg; change those fields."
    raise ValueError(f"hf export: model_type={model_type!r} cannot express cfg's {bad}; that family needs "
                     f"{_FAMILY_FIXED[model_type]}{one_flag}. {fix}")
  act = "gelu_pytorch_tanh" if cfg.mlp_activation == "gelu_tanh" else "silu"
  fields: dict[str, Any] = dict(hidden_act=act)
  if model_type in _ONE_ATTENTION_BIAS:
    fields["attention_bias"] = cfg.qkv_bias
  if model_type == "llama":
    fields["mlp_bias"] = cfg.mlp_bias
  if model_type == "mistral":
    fields["sliding_window"] = None  # our attention is full-causal
  if model_type in ("qwen2", "qwen3"):
    fields["use_sliding_window"] = False
  return fields


def _context(cfg: ModelConfig) -> dict[str, Any]:
  """`max_position_embeddings` for llama3 RoPE: factor x original context (cfg has no context length, and the
  class default, 2048 for Llama, is below the original one; servers read this field as the usable context)."""
  if cfg.rope_scaling_type != "llama3":
    return {}
  return dict(max_position_embeddings=int(cfg.rope_scaling_factor * cfg.rope_original_max_positions))


def hf_config_from_model_config(cfg: ModelConfig, model_type: str = "llama") -> Any:
  """A transformers `PretrainedConfig` of `model_type` describing `cfg` (the inverse of `model_config_from_hf`).

  Raises ValueError when the family cannot express cfg (e.g. Gemma's GeGLU as 'llama', q/k norms as 'qwen2').
  """
  import transformers

  if model_type not in _HF_CLASSES:
    raise ValueError(f"model_type={model_type!r} is not supported; supported model types: "
                     f"{list(SUPPORTED_MODEL_TYPES)}.")
  config_class, architecture = _HF_CLASSES[model_type]
  hf_config = getattr(transformers, config_class)(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      rope_parameters=_rope_parameters(cfg), rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.initializer_range,
      architectures=[architecture], dtype=cfg.param_dtype, **_family_fields(cfg, model_type), **_context(cfg))
  # Set after construction: not every family's __init__ takes head_dim (Qwen2), but all read the attribute.
  hf_config.head_dim = cfg.resolved_head_dim
  return hf_config


def _shards(state_dict: Mapping[str, np.ndarray], max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
  """Greedy split in name order into groups of at most `max_shard_bytes` (a bigger tensor gets its own)."""
  if max_shard_bytes is None:
    return [dict(state_dict)]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in state_dict.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  return shards


def _check_hf_config_describes(hf_config: Any, cfg: ModelConfig) -> None:
  """Raise if a given HF config disagrees with `cfg` (the saved folder would load as a different model)."""
  described = model_config_from_hf(hf_config)
  mismatched = {f.name: (getattr(described, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(ModelConfig)
                if f.name in _CONFIG_READERS[hf_config.model_type](hf_config) and f.name != "head_dim"
                and getattr(described, f.name) != getattr(cfg, f.name)}
  if described.resolved_head_dim != cfg.resolved_head_dim:
    mismatched["head_dim"] = (described.resolved_head_dim, cfg.resolved_head_dim)
  if mismatched:
    raise ValueError(f"save_hf_checkpoint: hf_config disagrees with cfg on {{field: (hf_config, cfg)}} = "
                     f"{mismatched}; pass a matching hf_config or leave it None to build one from cfg.")


def save_hf_checkpoint(params: Mapping[str, Any], cfg: ModelConfig, path: str, *, model_type: str = "llama",
                       tokenizer: Any = None, hf_config: Any = None, max_shard_bytes: int | None = None) -> None:
  """Write `params` as an HF checkpoint folder that `AutoModelForCausalLM.from_pretrained(path)` loads.

  Writes `config.json` (`hf_config` if given, else `hf_config_from_model_config(cfg, model_type)`), the weights
  from `hf_state_dict_from_params` in the params' dtype as `model.safetensors`, or, when they exceed
  `max_shard_bytes`, as `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`; and
  `tokenizer.save_pretrained(path)` when a tokenizer is given. Params may be sharded jax arrays (gathered to
  host one tensor at a time by the export). Weight files of an earlier save in `path` are replaced.
  """
  from safetensors.numpy import save_file

  if hf_config is None:
    hf_config = hf_config_from_model_config(cfg, model_type)
  else:
    model_type = getattr(hf_config, "model_type", model_type)
    _check_hf_config_describes(hf_config, cfg)
  state_dict = hf_state_dict_from_params(params, cfg, model_type=model_type)
  os.makedirs(path, exist_ok=True)
  # A stale index or single file left from a save with other sharding would shadow or contradict this one.
  for old in [os.path.join(path, _SINGLE_FILE), os.path.join(path, _INDEX_FILE),
              *glob.glob(os.path.join(path, "model-*-of-*.safetensors"))]:
    if os.path.isfile(old):
      os.remove(old)
  hf_config.save_pretrained(path)
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it
  shards = _shards(state_dict, max_shard_bytes)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, _SINGLE_FILE), metadata=metadata)
  else:
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
      file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, file), metadata=metadata)
      weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(x.nbytes for x in state_dict.values())}, "weight_map": weight_map}
    with open(os.path.join(path, _INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
