"""Hugging Face <-> dpo_jax conversion: `ModelConfig` from an HF config, params from/to an HF state dict.

    cfg = model_config_from_hf(hf_model.config, param_dtype="bfloat16")
    params = params_from_hf_state_dict(hf_model.state_dict(), cfg)
    state_dict = hf_state_dict_from_params(params, cfg)     # the inverse, numpy arrays

Supported families: llama, mistral, qwen2. They share one tensor naming (`model.layers.{i}.self_attn.q_proj`,
...), so one layout table serves all three; a family with other names adds a config reader to
`_CONFIG_READERS` and a layout to `_LAYOUTS`.

No permutation is needed: `model.py` follows HF's rotate-half RoPE and its query-head -> kv-head grouping, so
every tensor maps by transposes (torch `Linear.weight` is `[out, in]`, ours `[in, out]`) and head reshapes.

This module imports neither torch nor transformers: HF configs are read by attribute, tensors through numpy.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dpo_jax.model import ModelConfig

# --------------------------------------------------------------------------------------------------------------
# Config


def _rope_dicts(hf_config: Any) -> list[Mapping[str, Any]]:
  """The RoPE dicts an HF config may carry: transformers 5 `rope_parameters`, older `rope_scaling`."""
  return [d for d in (getattr(hf_config, "rope_parameters", None), getattr(hf_config, "rope_scaling", None))
          if isinstance(d, Mapping)]


def _rope_theta(hf_config: Any) -> float:
  """RoPE base; raises NotImplementedError for any scaled / partial RoPE, which `model.rope` does not do."""
  for d in _rope_dicts(hf_config):
    rope_type = d.get("rope_type", d.get("type"))  # 'type' is the pre-4.45 spelling
    if rope_type not in (None, "default"):
      raise NotImplementedError(
          f"hf config: rope type {rope_type!r} is not supported (only unscaled 'default' RoPE); "
          "convert a checkpoint without RoPE scaling.")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
      raise NotImplementedError(
          f"hf config: partial_rotary_factor={d['partial_rotary_factor']} is not supported (RoPE on all dims).")
  theta = getattr(hf_config, "rope_theta", None)
  for d in _rope_dicts(hf_config):
    theta = d.get("rope_theta", theta) if theta is None else theta
  if theta is None:
    raise ValueError("hf config: no rope_theta (neither `rope_theta` nor `rope_parameters['rope_theta']`).")
  return float(theta)


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
      rope_theta=_rope_theta(hf_config),
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


# model_type -> reader of the ModelConfig fields from that family's HF config.
_CONFIG_READERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "llama": _llama_fields,
    "mistral": _mistral_fields,
    "qwen2": _qwen2_fields,
}

# model_type -> name of its tensor layout in `_LAYOUTS`.
_LAYOUT_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "llama"}

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
