"""Weight layouts: each HF tensor's name, shape and path in our params, and the exact maps both ways.

    params = params_from_hf_state_dict(hf_model.state_dict(), cfg)
    state_dict = hf_state_dict_from_params(params, cfg)     # the inverse, numpy arrays

The five families share one tensor naming (`model.layers.{i}.self_attn.q_proj`, ...), so one layout (`_LAYOUTS`)
serves all. No permutation is needed: `model.py` follows HF's rotate-half RoPE and its query-head -> kv-head
grouping, so every tensor maps by transposes (torch `Linear.weight` is `[out, in]`, ours `[in, out]`) and head
reshapes. Tensors go through numpy; torch is never imported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dpo_jax.model import ModelConfig
from dpo_jax.interop.hf import families


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


def layout_of(model_type: str) -> _Layout:
  if model_type not in families.LAYOUT_OF_MODEL_TYPE:
    raise ValueError(f"model_type={model_type!r} is not supported; supported model types: "
                     f"{list(families.SUPPORTED_MODEL_TYPES)}.")
  return _LAYOUTS[families.LAYOUT_OF_MODEL_TYPE[model_type]]


def to_numpy(x: Any) -> np.ndarray:
  """numpy view/copy of a torch tensor, jax array or array-like (torch bf16 has no numpy dtype: via fp32)."""
  if hasattr(x, "detach"):  # torch, duck-typed so this module does not import torch
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()  # exact; the cast to param_dtype below restores bf16 bit-for-bit
    x = x.numpy()
  return np.asarray(x)


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
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


def check_names(names: set[str], cfg: ModelConfig, layout: _Layout) -> None:
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


def convert_in(rule: _Rule, hf_name: str, value: Any, dtype: np.dtype) -> np.ndarray:
  x = to_numpy(value)
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
  layout = layout_of(model_type)
  check_names(set(state_dict), cfg, layout)
  dtype = np.dtype(cfg.param_dtype)  # jax registers 'bfloat16' with numpy (ml_dtypes)
  if cfg.tie_embeddings and layout.tied_head in state_dict:
    if not np.array_equal(to_numpy(state_dict[layout.tied_head]), to_numpy(state_dict[layout.embedding])):
      raise ValueError(
          f"hf state dict: {layout.tied_head} differs from {layout.embedding} but cfg.tie_embeddings=True; "
          "set tie_embeddings=False (the checkpoint's head is untied).")

  params: dict[str, Any] = {}
  for rule in layout.global_rules(cfg):
    set_path(params, rule.path, convert_in(rule, rule.hf_name, state_dict[rule.hf_name], dtype))
  layers = []
  for i in range(cfg.num_layers):
    layer: dict[str, Any] = {}
    for rule in layout.layer_rules(cfg):
      name = rule.hf_name.format(i=i)
      set_path(layer, rule.path, convert_in(rule, name, state_dict[name], dtype))
    layers.append(layer)
  if cfg.scan_layers:
    # nn.scan keeps one subtree whose leaves gain a leading layer axis.
    params["layers"] = stack_layers(layers)
  else:
    params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  return params


def stack_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
  """List of L identical-structure trees -> one tree with leaves stacked on a new axis 0 (`[L, ...]`)."""
  first = layers[0]
  if isinstance(first, Mapping):
    return {key: stack_layers([layer[key] for layer in layers]) for key in first}
  return np.stack(layers)


def layer_params(params: Mapping[str, Any], cfg: ModelConfig, i: int) -> tuple[Mapping[str, Any], str]:
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
  layout = layout_of(model_type)
  out: dict[str, np.ndarray] = {}

  def put(rule: _Rule, name: str, tree: Mapping[str, Any], root: str) -> None:
    x = np.asarray(get_path(tree, rule.path))
    expected = rule.to_ours(np.empty(rule.hf_shape, np.int8)).shape  # views only: free
    if x.shape != expected:
      raise ValueError(f"params: {root}{'/'.join(rule.path)} has shape {x.shape}, expected {expected} for "
                       f"{name}; pass the ModelConfig these params were built with.")
    out[name] = np.ascontiguousarray(rule.to_hf(x))

  _check_param_paths(params, cfg, layout)
  for rule in layout.global_rules(cfg):
    put(rule, rule.hf_name, params, "")
  for i in range(cfg.num_layers):
    layer, root = layer_params(params, cfg, i)
    for rule in layout.layer_rules(cfg):
      put(rule, rule.hf_name.format(i=i), layer, root)
  return out
