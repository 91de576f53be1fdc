"""PEFT adapter folders: our LoRA adapters (dpo_jax/lora.py) in and out of PEFT's format.

A folder holds `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `[r, in]`; `lora_B`, `[out, r]`), which
`peft.PeftModel.from_pretrained(base, folder)` loads.

Mixture-of-experts models (transformers 5 Mixtral, Qwen3-MoE): attention adapters are written as for dense models;
the MLP adapters of the dense layers of a model that mixes both (Qwen3-MoE's `mlp_only_layers`) have the dense
tensor names but are targeted by their weights (`peft_config`). transformers keeps each layer's experts fused in
two 3-D parameters of `mlp.experts`, `gate_up_proj` `[E, 2F, D]` (the gate's rows first) and `down_proj`
`[E, D, F]`, which PEFT (>= 0.17) adapts per expert through `target_parameters` (`lora.ParamWrapper`): `lora_A`
`[E r, in]` (row `e r + j` is expert e's row j) and `lora_B` `[out, r E]` (column `j E + e`), delta_e =
(alpha / r) B_e A_e. Our separate gate and up adapters become one `gate_up_proj` adapter exactly: A stacked
`[A_gate; A_up]`, B block-diagonal, so of rank 2r (`rank_pattern` / `alpha_pattern` 2r / 2 alpha keep the scale
alpha / r; PEFT's own conversion of transformers-4 expert adapters fuses them the same way); with one of the two
targeted it is rank r with the other half of B zero. PEFT refuses dropout on such adapters, so the folder says
lora_dropout=0 (dropout only acts in training). Tested with PEFT 0.21 and transformers 5.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from dpo_jax import lora as lora_lib, moe
from dpo_jax.interop.hf import layouts

_PEFT_PREFIX = "base_model.model.model.layers.{i}."
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The experts' fused parameters (module docstring), in their order inside `mlp.experts`.
_EXPERTS, _GATE_UP, _DOWN = "mlp.experts", "gate_up_proj", "down_proj"
_EXPERT_PARAM = {"experts.gate_proj": _GATE_UP, "experts.up_proj": _GATE_UP, "experts.down_proj": _DOWN}
_GATE_UP_HALVES = ("gate", "up")  # the row halves of gate_up_proj, gate first (transformers' `.chunk(2)`)


def _expert_params(targets: tuple[str, ...]) -> tuple[str, ...]:
  """The fused expert parameters `targets` adapt, in module order (gate_up_proj before down_proj)."""
  return tuple(p for p in (_GATE_UP, _DOWN) if any(_EXPERT_PARAM.get(t) == p for t in targets))


def _expert_prefix(param: str, params: tuple[str, ...]) -> str:
  """PEFT's tensor prefix of one adapted expert parameter: PEFT nests one ParamWrapper per parameter, the first in
  module order innermost, so its tensors sit one `base_layer.` deeper per wrapper around it."""
  return f"{_EXPERTS}." + "base_layer." * (len(params) - 1 - params.index(param))


def _gate_up_halves(spec: lora_lib.LoraSpec) -> tuple[str, ...]:
  return tuple(h for h in _GATE_UP_HALVES if spec.adapts("experts", h))


def _expert_tensors(mlp: Mapping[str, Any], spec: lora_lib.LoraSpec, cfg: Any) -> dict[str, np.ndarray]:
  """One MoE layer's expert adapters (`mlp`: {gate,up,down}_lora with A `[E, in, r]`, B `[E, r, out]`) as PEFT's
  ParamWrapper tensors (module docstring), keyed by the name after the layer prefix."""
  params, r, e = _expert_params(spec.targets), spec.rank, cfg.num_experts
  d, f = cfg.hidden_size, cfg.resolved_moe_intermediate_size
  out = {}
  if _GATE_UP in params:
    halves = _gate_up_halves(spec)
    r2 = r * len(halves)
    dtype = np.asarray(mlp[f"{halves[0]}_lora"]["a"]).dtype
    a_ExRxD, b_ExOxR = np.zeros((e, r2, d), dtype), np.zeros((e, 2 * f, r2), dtype)
    for n, half in enumerate(halves):
      ad = mlp[f"{half}_lora"]
      rows = slice(0, f) if half == "gate" else slice(f, 2 * f)
      a_ExRxD[:, n * r:(n + 1) * r] = np.swapaxes(np.asarray(ad["a"]), 1, 2)
      b_ExOxR[:, rows, n * r:(n + 1) * r] = np.swapaxes(np.asarray(ad["b"]), 1, 2)
    out.update(_peft_pair(_expert_prefix(_GATE_UP, params), a_ExRxD, b_ExOxR))
  if _DOWN in params:
    ad = mlp["down_lora"]
    out.update(_peft_pair(_expert_prefix(_DOWN, params), np.swapaxes(np.asarray(ad["a"]), 1, 2),
                          np.swapaxes(np.asarray(ad["b"]), 1, 2)))
  return out


def _peft_pair(prefix: str, a_ExRxI: np.ndarray, b_ExOxR: np.ndarray) -> dict[str, np.ndarray]:
  """Per-expert A_e `[r, in]`, B_e `[out, r]` -> ParamWrapper's lora_A `[E r, in]`, lora_B `[out, r E]`."""
  e, r, n_in = a_ExRxI.shape
  return {f"{prefix}lora_A.weight": np.ascontiguousarray(a_ExRxI.reshape(e * r, n_in)),
          f"{prefix}lora_B.weight": np.ascontiguousarray(b_ExOxR.transpose(1, 2, 0).reshape(-1, r * e))}


def _module_targets(spec: lora_lib.LoraSpec, is_moe: bool) -> tuple[str, ...]:
  """The targets that are torch Linear modules in a layer: attention always, the dense MLP's only in dense layers."""
  return tuple(t for t in spec.targets
               if t not in lora_lib.EXPERT_TARGETS and not (is_moe and lora_lib.TARGETS[t][0] == "mlp"))


def peft_state_dict(adapters: Mapping[str, Any], spec: lora_lib.LoraSpec, cfg: Any) -> dict[str, np.ndarray]:
  """PEFT `adapter_model.safetensors` tensors from our adapters: lora_A `[r, in]`, lora_B `[out, r]` per layer and
  target, `in` / `out` flattened as torch's Linear sees them (heads-major, as `hf.py` lays out q/k/v/o); an MoE
  layer's expert adapters as PEFT's ParamWrapper tensors of `mlp.experts` (module docstring)."""
  out = {}
  for i in range(cfg.num_layers):
    layer, _ = layouts.layer_params(adapters, cfg, i)  # layer i's subtree in either layout
    is_moe = moe.is_moe_layer(cfg, i)
    if is_moe and _expert_params(spec.targets):
      out.update({_PEFT_PREFIX.format(i=i) + k: v for k, v in _expert_tensors(layer["mlp"], spec, cfg).items()})
    for target in _module_targets(spec, is_moe):
      module, proj = lora_lib.TARGETS[target]
      ad = layer[module][f"{proj}_lora"]
      a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
      name = _PEFT_PREFIX.format(i=i) + f"{_HF_MODULE[module]}.{target}"
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.rank).T)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(spec.rank, -1).T)
  return out


def adapters_from_peft(state_dict: Mapping[str, Any], spec: lora_lib.LoraSpec, like: Any, cfg: Any,
                       source: str, expert_patterns: Mapping[str, tuple[int, float]] | None = None) -> Any:
  """Our adapters (numpy, shaped as `like`: `lora_lib.abstract_adapters`) from PEFT tensors; raises naming a missing,
  unexpected or misshapen tensor. `expert_patterns`: PEFT's (rank, alpha) of `gate_up_proj` where its
  `rank_pattern` / `alpha_pattern` set them (`_read_peft_config`); a scale other than ours is folded into B."""
  expected = set()
  per_layer: dict[int, dict] = {}

  def tensor(full: str, want: tuple[int, ...]) -> np.ndarray:
    expected.add(full)
    if full not in state_dict:
      raise ValueError(f"{source}: no tensor {full!r}; the adapter does not match config.lora.targets="
                       f"{list(spec.targets)} / this model's {cfg.num_layers} layers.")
    x = np.asarray(state_dict[full])
    if x.shape != want:
      raise ValueError(f"{source}: {full} has shape {x.shape}, expected {want} (config.lora.rank={spec.rank} "
                       f"on this model); set the rank the adapter was trained with.")
    return x

  for i in range(cfg.num_layers):
    layer_like = like["layers" if cfg.scan_layers else f"layers_{i}"]
    is_moe = moe.is_moe_layer(cfg, i)
    if is_moe and _expert_params(spec.targets):
      dtypes = {k: v["a"].dtype for k, v in layer_like["mlp"].items()}
      pairs = _experts_from_peft(lambda name, want: tensor(_PEFT_PREFIX.format(i=i) + name, want), spec, cfg,
                                 dict(expert_patterns or {}), dtypes, f"{source}: layer {i}")
      per_layer.setdefault(i, {}).setdefault("mlp", {}).update(pairs)
    for target in _module_targets(spec, is_moe):
      module, proj = lora_lib.TARGETS[target]
      leaf_like = layer_like[module][f"{proj}_lora"]
      name = _PEFT_PREFIX.format(i=i) + f"{_HF_MODULE[module]}.{target}"
      values = {}
      for side, key in (("a", "lora_A"), ("b", "lora_B")):
        shape = leaf_like[side].shape[1:] if cfg.scan_layers else leaf_like[side].shape
        want = (spec.rank, math.prod(shape[:-1])) if side == "a" else (math.prod(shape[1:]), spec.rank)
        x = tensor(f"{name}.{key}.weight", want)
        values[side] = x.T.reshape(shape).astype(leaf_like[side].dtype)  # [r, in] -> [*in, r]; [out, r] -> [r, *out]
      per_layer.setdefault(i, {}).setdefault(module, {})[f"{proj}_lora"] = values
  unexpected = sorted(set(state_dict) - expected)
  if unexpected:
    more = " ..." if len(unexpected) > 5 else ""
    raise ValueError(f"{source}: tensors this model has no adapter for: {unexpected[:5]}{more} "
                     f"(config.lora.targets={list(spec.targets)}).")
  if cfg.scan_layers:
    return {"layers": layouts.stack_layers([per_layer.get(i, {}) for i in range(cfg.num_layers)])}
  return {f"layers_{i}": per_layer.get(i, {}) for i in range(cfg.num_layers)}


def _experts_from_peft(tensor: Any, spec: lora_lib.LoraSpec, cfg: Any, patterns: Mapping[str, tuple[int, float]],
                       dtypes: Mapping[str, Any], where: str) -> dict[str, dict[str, np.ndarray]]:
  """One MoE layer's {gate,up,down}_lora (A `[E, in, r]`, B `[E, r, out]`) from PEFT's ParamWrapper tensors
  (`tensor(name, shape)` reads and checks one). A `gate_up_proj` adapter of rank r' splits exactly when it is what
  `_expert_tensors` writes (r' = r per targeted half, B zero outside the halves' blocks) or, with both halves
  targeted, of rank r (a PEFT-trained one: gate and up then share A); anything else is refused."""
  params, r, e = _expert_params(spec.targets), spec.rank, cfg.num_experts
  d, f = cfg.hidden_size, cfg.resolved_moe_intermediate_size
  out = {}

  def read(param: str, n_in: int, n_out: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A `[E, rank, in]`, B `[E, out, rank]`) with B times PEFT's scale over ours."""
    prefix = _expert_prefix(param, params)
    a = tensor(f"{prefix}lora_A.weight", (e * rank, n_in)).reshape(e, rank, n_in)
    b = tensor(f"{prefix}lora_B.weight", (n_out, rank * e)).reshape(n_out, rank, e).transpose(2, 0, 1)
    p_rank, p_alpha = patterns.get(param, (spec.rank, spec.alpha))
    ratio = (p_alpha / p_rank) / spec.scale
    return a, (b if ratio == 1.0 else b * np.asarray(ratio, b.dtype))

  if _GATE_UP in params:
    halves = _gate_up_halves(spec)
    rank = patterns.get(_GATE_UP, (r, spec.alpha))[0]
    if rank not in (r * len(halves), r if len(halves) == 2 else -1):
      raise ValueError(f"{where}: gate_up_proj has rank {rank} (rank_pattern); with config.lora.rank={r} and "
                       f"targets {[f'experts.{h}_proj' for h in halves]} it must be {r * len(halves)}"
                       f"{f' or {r}' if len(halves) == 2 else ''}.")
    a_ExRxD, b_ExOxR = read(_GATE_UP, d, 2 * f, rank)
    rows = {"gate": slice(0, f), "up": slice(f, 2 * f)}
    if rank == r * len(halves):  # our layout: half n in rank columns [n r, (n + 1) r)
      rest = b_ExOxR.copy()
      for n, half in enumerate(halves):
        cols = slice(n * r, (n + 1) * r)
        out[f"{half}_lora"] = {"a": a_ExRxD[:, cols].transpose(0, 2, 1),
                               "b": b_ExOxR[:, rows[half], cols].transpose(0, 2, 1)}
        rest[:, rows[half], cols] = 0
      untargeted = [f"experts.{h}_proj" for h in _GATE_UP_HALVES if h not in halves]
      if rest.any() and untargeted:
        raise ValueError(f"{where}: the gate_up_proj adapter also changes the rows of {untargeted}; add it to "
                         "config.lora.targets.")
      if rest.any():
        raise ValueError(f"{where}: the rank-{rank} gate_up_proj adapter mixes gate and up rows in its B (not "
                         f"block-diagonal), which separate rank-{r} gate and up adapters cannot hold; load its "
                         "merge (PeftModel.merge_and_unload) as the base model instead.")
    else:  # rank r, both halves: a shared A
      for half in halves:
        out[f"{half}_lora"] = {"a": a_ExRxD.transpose(0, 2, 1), "b": b_ExOxR[:, rows[half]].transpose(0, 2, 1)}
  if _DOWN in params:
    a, b = read(_DOWN, f, d, r)
    out["down_lora"] = {"a": a.transpose(0, 2, 1), "b": b.transpose(0, 2, 1)}
  return {k: {side: np.ascontiguousarray(x).astype(dtypes[k]) for side, x in v.items()} for k, v in out.items()}


def peft_config(spec: lora_lib.LoraSpec, base_model_name_or_path: str | None, cfg: Any = None) -> dict[str, Any]:
  """The `adapter_config.json` of these adapters: a plain LoRA (no rsLoRA, DoRA, bias or modules_to_save).

  Expert targets become `target_parameters` (module docstring), with `gate_up_proj` at rank 2r and alpha 2 alpha
  when both gate and up are adapted. On an MoE model (`cfg.num_experts > 0`) the dense-MLP targets are written as
  `target_parameters` too (`mlp.gate_proj.weight`, ...; the same tensors as a module target), and only where some
  layer is dense (Qwen3-MoE's mlp_only_layers): PEFT on transformers 5 reads the module names gate_proj / up_proj /
  down_proj of a Qwen3-MoE model as its experts (peft.utils.transformers_weight_conversion), so the dense layers
  cannot be named that way. With any `target_parameters` lora_dropout is 0 (PEFT refuses dropout there)."""
  moe_model = cfg is not None and cfg.num_experts > 0
  params = [f"{_EXPERTS}.{p}" for p in _expert_params(spec.targets)] if cfg is None or moe_model else []
  dense_mlp = [t for t in spec.targets if lora_lib.TARGETS[t][0] == "mlp"]
  if moe_model and len(moe.moe_layers(cfg)) < cfg.num_layers:
    params += [f"mlp.{t}.weight" for t in dense_mlp]
  both = len(_gate_up_halves(spec)) == 2
  gate_up = f"{_EXPERTS}.{_GATE_UP}"
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0 if params else spec.dropout,
      "target_modules": [t for t in spec.targets
                         if t not in lora_lib.EXPERT_TARGETS and not (moe_model and t in dense_mlp)],
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "layers_to_transform": None,
      "rank_pattern": {gate_up: 2 * spec.rank} if both else {},
      "alpha_pattern": {gate_up: 2 * spec.alpha} if both else {},
      "inference_mode": True, "init_lora_weights": True if spec.init == "peft" else spec.init,
  }
  if params:
    config["target_parameters"] = params
  return config


def save_peft_adapter(path: str, adapters: Any, spec: lora_lib.LoraSpec, cfg: Any, *,
                      base_model_name_or_path: str | None = None) -> str:
  """Write `path/adapter_config.json` and `path/adapter_model.safetensors` (PEFT's layout); returns `path`."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  tensors = peft_state_dict(jax.device_get(adapters), spec, cfg)
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
    json.dump(peft_config(spec, base_model_name_or_path, cfg), f, indent=2)
  return path


# adapter_config.json fields whose non-default values change the math: what we would otherwise compute wrong.
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "layer_replication": None,
                "use_qalora": False, "lora_bias": False}
# target_parameters we read: a fused expert parameter (-> its targets) or a dense MLP's weight (-> its target), by
# any dotted suffix PEFT would match.
_PARAM_TARGETS = {name: tuple(t for t, p in _EXPERT_PARAM.items() if p == param) for param in (_GATE_UP, _DOWN)
                  for name in (param, f"experts.{param}", f"{_EXPERTS}.{param}")}
_PARAM_TARGETS.update({name: (t,) for t in ("gate_proj", "up_proj", "down_proj")
                       for name in (f"{t}.weight", f"mlp.{t}.weight")})
_GATE_UP_NAME = f"model.layers.0.{_EXPERTS}.{_GATE_UP}"


def _names_gate_up(key: str) -> bool:
  """Whether a rank_pattern / alpha_pattern key selects gate_up_proj and nothing else, as PEFT matches a key
  (`peft.utils.other.get_pattern_key`: the key as a regex for a dotted suffix of the name; PEFT's own conversion
  of transformers-4 adapters writes `.*` + escaped `.gate_up_proj`)."""
  match = lambda name: re.match(rf"(.*\.)?({key})$", name) is not None
  others = [f"model.layers.0.{_EXPERTS}.{_DOWN}", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj"]
  return match(_GATE_UP_NAME) and not any(match(n) for n in others)


def read_peft_spec(path: str) -> lora_lib.LoraSpec:
  """The LoraSpec of the PEFT adapter folder `path`; raises naming the field of an adapter we cannot compute."""
  return _read_peft_config(path)[0]


def _read_peft_config(path: str) -> tuple[lora_lib.LoraSpec, dict[str, tuple[int, float]]]:
  """(spec, {'gate_up_proj': (rank, alpha)} where rank_pattern / alpha_pattern set them) of the folder `path`."""
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
  targets = pc.get("target_modules") or list(lora_lib.PEFT_DEFAULT_TARGETS)
  if isinstance(targets, str):  # PEFT allows a regex or 'all-linear'
    if targets != lora_lib.ALL_LINEAR:
      raise ValueError(f"{config_file}: target_modules={targets!r} is a regex; list the modules "
                       f"({list(lora_lib.TARGETS)}) instead.")
    targets = [t for t in lora_lib.TARGETS if t not in lora_lib.EXPERT_TARGETS]
  if not pc.get("target_modules") and pc.get("target_parameters"):  # only experts (PEFT then adds no modules)
    targets = []
  from_params = set()
  for name in pc.get("target_parameters") or []:
    if name not in _PARAM_TARGETS:
      raise ValueError(f"{config_file}: target_parameters entry {name!r} is not supported; only the experts' "
                       f"{[f'{_EXPERTS}.{p}' for p in (_GATE_UP, _DOWN)]} and the dense MLP's mlp.*_proj.weight.")
    from_params.update(_PARAM_TARGETS[name])
  targets = list(targets) + sorted(from_params)
  has_gate_up = bool({"experts.gate_proj", "experts.up_proj"} & from_params)
  rank, alpha = int(pc["r"]), float(pc["lora_alpha"])
  patterns = {}
  for field, default, index in (("rank_pattern", rank, 0), ("alpha_pattern", alpha, 1)):
    for key, value in (pc.get(field) or {}).items():
      if not (has_gate_up and _names_gate_up(key)):
        raise ValueError(f"{config_file}: {field}={{{key!r}: {value}}} is not supported (only a plain LoRA, with a "
                         f"pattern for {_EXPERTS}.{_GATE_UP} alone).")
      entry = list(patterns.get(_GATE_UP, (rank, alpha)))
      entry[index] = type(default)(value)
      patterns[_GATE_UP] = tuple(entry)
  spec = lora_lib.LoraSpec(rank=rank, alpha=alpha, dropout=float(pc.get("lora_dropout", 0.0)), targets=tuple(targets))
  return spec, patterns


def load_peft_adapter(path: str, model: Any, cfg: Any, shardings: Any | None = None,
                      expect: lora_lib.LoraSpec | None = None) -> tuple[lora_lib.LoraSpec, Any]:
  """(spec, adapters) from the PEFT folder `path` for `model` (built from `cfg`), placed in `shardings`.

  `expect` (the run's config.lora): rank, alpha and targets must match it, else the error names the field."""
  from safetensors.numpy import load_file
  spec, patterns = _read_peft_config(path)
  if expect is not None:
    spec = _expected_targets(spec, expect, cfg)
    for field in ("rank", "alpha", "targets"):
      if getattr(spec, field) != getattr(expect, field):
        raise ValueError(f"config.lora.adapter_path={path!r} has {field}={getattr(spec, field)!r} but "
                         f"config.lora.{field}={getattr(expect, field)!r}; set --config.lora.{field} to the adapter's.")
  weights = os.path.join(path, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not read; re-save with "
                            "safe_serialization=True).")
  tensors = {k.replace(".default.", "."): v for k, v in load_file(weights).items()}
  adapters = adapters_from_peft(tensors, spec, lora_lib.abstract_adapters(model, spec), cfg, weights, patterns)
  if shardings is not None:
    adapters = jax.device_put(adapters, shardings)
  if expect is not None:  # dropout and how A started are training choices, not part of the adapter
    spec = expect
  return spec, adapters


def _effective(targets: tuple[str, ...], cfg: Any) -> set[str]:
  """The targets that adapt some layer of `cfg`'s model: attention always, dense-MLP names where a layer is dense,
  expert names where one is MoE."""
  moe_layers = len(moe.moe_layers(cfg))
  kind = {"attn": True, "mlp": moe_layers < cfg.num_layers, "experts": moe_layers > 0}
  return {t for t in targets if kind[lora_lib.TARGETS[t][0]]}


def _expected_targets(spec: lora_lib.LoraSpec, expect: lora_lib.LoraSpec, cfg: Any) -> lora_lib.LoraSpec:
  """`spec` with `expect`'s targets where they adapt the same layers of this model: a target that adapts no layer
  is never written (a dense-MLP name on Mixtral), and a folder names only the fused `gate_up_proj`, so which of its
  halves are trained is the run's (an adapter that changes the other half is refused when its tensors are read)."""
  halves = {"experts.gate_proj", "experts.up_proj"}
  ours, theirs = _effective(spec.targets, cfg), _effective(expect.targets, cfg)
  if halves <= ours and theirs & halves:
    ours = (ours - halves) | (theirs & halves)
  return dataclasses.replace(spec, targets=expect.targets) if ours == theirs else spec
