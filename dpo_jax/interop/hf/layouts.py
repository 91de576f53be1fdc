"""Weight layouts: each HF tensor's name, shape and path in our params, and the exact maps both ways.

    params = params_from_hf_state_dict(hf_model.state_dict(), cfg)
    state_dict = hf_state_dict_from_params(params, cfg)     # the inverse, numpy arrays

The five dense families share one tensor naming (`model.layers.{i}.self_attn.q_proj`, ...), so one layout
(`_LAYOUTS['llama']`) serves them. No permutation is needed: `model.py` follows HF's rotate-half RoPE and its
query-head -> kv-head grouping, so every tensor maps by transposes (torch `Linear.weight` is `[out, in]`, ours
`[in, out]`) and head reshapes. Tensors go through numpy; torch is never imported here.

Mixture-of-experts layers (`moe.is_moe_layer`; the others keep Llama's dense MLP names) map E per-expert HF tensors
onto one stacked param (`_ExpertRule`), under the names `save_pretrained` writes::

    mixtral    model.layers.{i}.block_sparse_moe.gate.weight [E, D]        -> layers_{i}/mlp/router [D, E]
               model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight [F, D]  -> layers_{i}/mlp/gate [E, D, F]
               ... .experts.{e}.w3.weight [F, D], .experts.{e}.w2.weight [D, F]  -> mlp/up [E, D, F], mlp/down [E, F, D]
    qwen3_moe  model.layers.{i}.mlp.gate.weight, model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight

transformers 5 keeps the experts fused in memory (`hf_model.state_dict()`: `mlp.gate.weight`,
`mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first), `mlp.experts.down_proj` [E, D, F]) and converts to and from
the per-expert names when loading and saving; loaders here accept either (`tensor_sources`), exports write the
per-expert names, which every transformers version loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dpo_jax import moe
from dpo_jax.model import ModelConfig
from dpo_jax.interop.hf import families


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One tensor: its HF name and shape, its path in our params, and the two (exact) layout maps."""
  hf_name: str  # per-layer rules: with a `{i}` for the layer index
  path: tuple[str, ...]  # inside a layer for per-layer rules, else from the params root
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  def names(self, i: int = 0) -> tuple[str, ...]:
    """The HF tensors of this param in layer i (global rules: i is unused)."""
    return (self.hf_name.format(i=i),)

  def ours_shape(self) -> tuple[int, ...]:
    return self.to_ours(np.empty(self.hf_shape, np.int8)).shape  # views only: free

  def read(self, get: Callable[[str], Any], i: int, dtype: np.dtype) -> np.ndarray:
    """Our param of layer i from `get(hf_name)` (any array-like), in `dtype`."""
    name = self.names(i)[0]
    return convert_in(self, name, get(name), dtype)

  def write(self, x: np.ndarray) -> list[np.ndarray]:
    """The HF tensors (in `names` order) of our param `x`."""
    return [self.to_hf(x)]


@dataclasses.dataclass(frozen=True)
class _ExpertRule:
  """E per-expert HF tensors (`hf_names[e]`, each `hf_shape`) <-> one stacked param `[E, ...]`, expert e mapped by
  `to_ours` / `to_hf` as a `_Rule` maps its tensor."""
  hf_names: tuple[str, ...]  # with a `{i}` for the layer index
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]  # of one expert's tensor
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  def names(self, i: int = 0) -> tuple[str, ...]:
    return tuple(name.format(i=i) for name in self.hf_names)

  def ours_shape(self) -> tuple[int, ...]:
    return (len(self.hf_names),) + self.to_ours(np.empty(self.hf_shape, np.int8)).shape

  def read(self, get: Callable[[str], Any], i: int, dtype: np.dtype) -> np.ndarray:
    out = np.empty(self.ours_shape(), dtype)  # the one host buffer of the stacked param
    for e, name in enumerate(self.names(i)):
      out[e] = convert_in(self, name, get(name), dtype)
    return out

  def write(self, x: np.ndarray) -> list[np.ndarray]:
    return [self.to_hf(x[e]) for e in range(x.shape[0])]


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


@dataclasses.dataclass(frozen=True)
class _ExpertNames:
  """A family's names of an MoE layer's tensors, relative to `model.layers.{i}.`."""
  block: str  # the MoE block: 'block_sparse_moe' (Mixtral), 'mlp' (Qwen3-MoE)
  projections: tuple[str, str, str]  # the experts' (gate, up, down) modules


_MIXTRAL_EXPERTS = _ExpertNames("block_sparse_moe", ("w1", "w3", "w2"))
_QWEN3_MOE_EXPERTS = _ExpertNames("mlp", ("gate_proj", "up_proj", "down_proj"))


def _moe_rules(cfg: ModelConfig, names: _ExpertNames) -> list[Any]:
  """An MoE layer's router `[E, D]` <-> `[D, E]` and its experts, per-expert `[out, in]` <-> stacked `[E, in, out]`."""
  d, f, e = cfg.hidden_size, cfg.resolved_moe_intermediate_size, cfg.num_experts
  pre = f"model.layers.{{i}}.{names.block}."
  rules: list[Any] = [_linear_rule(pre + "gate.weight", ("mlp", "router"), d, e)]
  for ours, theirs, n_in, n_out in zip(("gate", "up", "down"), names.projections, (d, d, f), (f, f, d)):
    rules.append(_ExpertRule(tuple(pre + f"experts.{x}.{theirs}.weight" for x in range(e)), ("mlp", ours),
                             (n_out, n_in), lambda w: w.T, lambda k: k.T))
  return rules


def _layer_rules(cfg: ModelConfig, i: int, experts: _ExpertNames | None = None) -> list[Any]:
  """Layer i's tensors (`hf_name`s with a `{i}`): Llama's, with the MoE MLP where `moe.is_moe_layer(cfg, i)`."""
  if not moe.is_moe_layer(cfg, i):
    return _llama_layer_rules(cfg)
  if experts is None:
    raise ValueError(f"hf layout: cfg has num_experts={cfg.num_experts} but this model_type has no expert tensors; "
                     f"use model_type 'mixtral' or 'qwen3_moe' (or num_experts=0).")
  return [r for r in _llama_layer_rules(cfg) if r.path[0] != "mlp"] + _moe_rules(cfg, experts)


def _llama_layer_rules(cfg: ModelConfig) -> list[_Rule]:
  """A dense layer's tensors; `hf_name` has a `{i}` for the layer index."""
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
  layer_rules: Callable[[ModelConfig, int], list[Any]]  # (cfg, layer index) -> that layer's `_Rule`s / `_ExpertRule`s
  global_rules: Callable[[ModelConfig], list[_Rule]]
  tied_head: str  # HF name of the LM head, which tied checkpoints may carry as a copy of the embedding
  embedding: str
  ignored_suffixes: tuple[str, ...]  # tensors with no counterpart in our model and no effect on it
  experts: _ExpertNames | None = None  # MoE families: the saved names of the expert tensors


def _layout(experts: _ExpertNames | None = None) -> _Layout:
  return _Layout(
      lambda cfg, i: _layer_rules(cfg, i, experts), _llama_global_rules, tied_head="lm_head.weight",
      embedding="model.embed_tokens.weight",
      # Older checkpoints saved RoPE's inverse frequencies, which we recompute from rope_theta.
      ignored_suffixes=("rotary_emb.inv_freq",), experts=experts)


_LAYOUTS = {"llama": _layout(), "mixtral": _layout(_MIXTRAL_EXPERTS), "qwen3_moe": _layout(_QWEN3_MOE_EXPERTS)}


def _fused_sources(cfg: ModelConfig, layout: _Layout) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
  """Saved per-expert name -> (transformers-5 in-memory name, fn giving the saved tensor from that one), for every
  MoE layer: `mlp.gate.weight` is the router (Mixtral saves it under `block_sparse_moe.`), `mlp.experts.gate_up_proj`
  `[E, 2F, D]` the experts' gate rows then up rows, `mlp.experts.down_proj` `[E, D, F]` the down projections."""
  if layout.experts is None:
    return {}
  d, f, e = cfg.hidden_size, cfg.resolved_moe_intermediate_size, cfg.num_experts
  gate, up, down = layout.experts.projections
  out = {}

  def part(name, shape, index):
    def fn(x):
      if x.shape != shape:  # a wrong width would still slice to the expected per-expert shape
        raise ValueError(f"hf state dict: {name} has shape {x.shape}, the config implies {shape}; the ModelConfig does "
                         "not match this checkpoint (build it with model_config_from_hf).")
      return x[index]
    return name, fn

  for i in moe.moe_layers(cfg):
    saved, fused = f"model.layers.{i}.{layout.experts.block}.", f"model.layers.{i}.mlp."
    if saved != fused:
      out[saved + "gate.weight"] = part(fused + "gate.weight", (e, d), slice(None))
    for x in range(e):
      out[saved + f"experts.{x}.{gate}.weight"] = part(fused + "experts.gate_up_proj", (e, 2 * f, d), (x, slice(0, f)))
      out[saved + f"experts.{x}.{up}.weight"] = part(fused + "experts.gate_up_proj", (e, 2 * f, d), (x, slice(f, None)))
      out[saved + f"experts.{x}.{down}.weight"] = part(fused + "experts.down_proj", (e, d, f), x)
  return out


Source = tuple[str, Callable[[np.ndarray], np.ndarray] | None]


def tensor_sources(names: set[str], cfg: ModelConfig, layout: _Layout) -> dict[str, Source]:
  """Every tensor name the layout may read -> (the name present in `names`, None) or, for a per-expert name whose
  transformers-5 fused tensor is present instead, (the fused name, fn slicing the tensor out of it). Names of
  `names` that no fused tensor explains map to themselves, so `check_names` still reports them."""
  out: dict[str, Source] = {}
  used = set()
  for saved, (fused, fn) in _fused_sources(cfg, layout).items():
    if saved not in names and fused in names:
      out[saved] = (fused, fn)
      used.add(fused)
  out.update({n: (n, None) for n in names - used})
  return out


def source_getter(sources: Mapping[str, Source], get: Callable[[str], Any]) -> Callable[[str], Any]:
  """`get` by the layout's names: a fused tensor is read once (the last one is kept) and sliced per expert."""
  last: dict[str, np.ndarray] = {}

  def get_named(name: str) -> Any:
    source, fn = sources[name]
    if fn is None:
      return get(source)
    if source not in last:
      last.clear()
      last[source] = to_numpy(get(source))
    return fn(last[source])
  return get_named


def per_expert_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig, *,
                          model_type: str = "llama") -> dict[str, np.ndarray]:
  """`state_dict` (numpy arrays) under the names `save_pretrained` writes: transformers 5's fused in-memory expert
  tensors split into per-expert ones (views), everything else as is. For comparing tensors by name with
  `hf_state_dict_from_params`' output (e.g. torch's gradients)."""
  sources = tensor_sources(set(state_dict), cfg, layout_of(model_type))
  get = source_getter(sources, lambda name: to_numpy(state_dict[name]))
  return {name: get(name) for name in sources}


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
    names |= {name for r in layout.layer_rules(cfg, i) for name in r.names(i)}
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
    state_dict: HF name -> torch tensor / numpy / jax array, e.g. `hf_model.state_dict()` (MoE: the experts under
      `save_pretrained`'s per-expert names or transformers 5's fused in-memory ones, see the module docstring).
    cfg: the matching config (`model_config_from_hf`); `cfg.scan_layers` picks the layer layout: per-layer
      subtrees `layers_{i}` or one `layers` subtree with every leaf stacked to `[num_layers, ...]`.
    model_type: HF `config.model_type`; selects the tensor naming (the dense types share Llama's).

  With `cfg.tie_embeddings`, `lm_head.weight` may be absent or present, but if present must equal the embedding.
  Raises ValueError naming missing / unexpected / misshapen tensors.
  """
  layout = layout_of(model_type)
  sources = tensor_sources(set(state_dict), cfg, layout)
  check_names(set(sources), cfg, layout)
  get = source_getter(sources, state_dict.__getitem__)
  dtype = np.dtype(cfg.param_dtype)  # jax registers 'bfloat16' with numpy (ml_dtypes)
  if cfg.tie_embeddings and layout.tied_head in state_dict:
    if not np.array_equal(to_numpy(state_dict[layout.tied_head]), to_numpy(state_dict[layout.embedding])):
      raise ValueError(
          f"hf state dict: {layout.tied_head} differs from {layout.embedding} but cfg.tie_embeddings=True; "
          "set tie_embeddings=False (the checkpoint's head is untied).")

  params: dict[str, Any] = {}
  for rule in layout.global_rules(cfg):
    set_path(params, rule.path, rule.read(get, 0, dtype))
  layers = []
  for i in range(cfg.num_layers):
    layer: dict[str, Any] = {}
    for rule in layout.layer_rules(cfg, i):
      set_path(layer, rule.path, rule.read(get, i, dtype))
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
  if cfg.scan_layers:  # every layer alike (`model._check_moe`)
    expected |= {("layers",) + r.path for r in layout.layer_rules(cfg, 0)}
  else:
    expected |= {(f"layers_{i}",) + r.path for i in range(cfg.num_layers) for r in layout.layer_rules(cfg, i)}
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
  written, as HF `save_pretrained` does for tied heads; MoE experts are written per expert, under the names
  `save_pretrained` writes (module docstring). Arrays may share memory with numpy params (no copy is
  made where the layout already matches). Raises ValueError naming missing / unexpected / misshapen params.
  """
  layout = layout_of(model_type)
  out: dict[str, np.ndarray] = {}

  def put(rule: Any, i: int, tree: Mapping[str, Any], root: str) -> None:
    x = np.asarray(get_path(tree, rule.path))
    names = rule.names(i)
    expected = rule.ours_shape()
    if x.shape != expected:
      what = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
      raise ValueError(f"params: {root}{'/'.join(rule.path)} has shape {x.shape}, expected {expected} for "
                       f"{what}; pass the ModelConfig these params were built with.")
    for name, y in zip(names, rule.write(x)):
      out[name] = np.ascontiguousarray(y)

  _check_param_paths(params, cfg, layout)
  for rule in layout.global_rules(cfg):
    put(rule, 0, params, "")
  for i in range(cfg.num_layers):
    layer, root = layer_params(params, cfg, i)
    for rule in layout.layer_rules(cfg, i):
      put(rule, i, layer, root)
  return out
