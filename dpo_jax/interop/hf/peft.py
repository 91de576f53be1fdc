"""PEFT adapter folders: our LoRA adapters (dpo_jax/lora.py) in and out of PEFT's format.

A folder holds `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `[r, in]`; `lora_B`, `[out, r]`), which
`peft.PeftModel.from_pretrained(base, folder)` loads.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np

from dpo_jax import lora as lora_lib
from dpo_jax.interop.hf import layouts

_PEFT_PREFIX = "base_model.model.model.layers.{i}."
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_state_dict(adapters: Mapping[str, Any], spec: lora_lib.LoraSpec, cfg: Any) -> dict[str, np.ndarray]:
  """PEFT `adapter_model.safetensors` tensors from our adapters: lora_A `[r, in]`, lora_B `[out, r]` per layer and
  target, `in` / `out` flattened as torch's Linear sees them (heads-major, as `hf.py` lays out q/k/v/o)."""
  out = {}
  for i in range(cfg.num_layers):
    layer, _ = layouts.layer_params(adapters, cfg, i)  # layer i's subtree in either layout
    for target in spec.targets:
      module, proj = lora_lib.TARGETS[target]
      ad = layer[module][f"{proj}_lora"]
      a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
      name = _PEFT_PREFIX.format(i=i) + f"{_HF_MODULE[module]}.{target}"
      out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.rank).T)
      out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(spec.rank, -1).T)
  return out


def adapters_from_peft(state_dict: Mapping[str, Any], spec: lora_lib.LoraSpec, like: Any, cfg: Any,
                       source: str) -> Any:
  """Our adapters (numpy, shaped as `like`: `lora_lib.abstract_adapters`) from PEFT tensors; raises naming a missing,
  unexpected or misshapen tensor."""
  expected = set()
  per_layer: dict[int, dict] = {}
  for i in range(cfg.num_layers):
    layer_like = like["layers" if cfg.scan_layers else f"layers_{i}"]
    for target in spec.targets:
      module, proj = lora_lib.TARGETS[target]
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
    return {"layers": layouts.stack_layers([per_layer[i] for i in range(cfg.num_layers)])}
  return {f"layers_{i}": per_layer[i] for i in range(cfg.num_layers)}


def peft_config(spec: lora_lib.LoraSpec, base_model_name_or_path: str | None) -> dict[str, Any]:
  """The `adapter_config.json` of these adapters: a plain LoRA (no rsLoRA, DoRA, bias or modules_to_save)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": list(spec.targets),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
      "inference_mode": True, "init_lora_weights": True if spec.init == "peft" else spec.init,
  }


def save_peft_adapter(path: str, adapters: Any, spec: lora_lib.LoraSpec, cfg: Any, *,
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


def read_peft_spec(path: str) -> lora_lib.LoraSpec:
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
  targets = pc.get("target_modules") or list(lora_lib.PEFT_DEFAULT_TARGETS)
  if isinstance(targets, str):  # PEFT allows a regex or 'all-linear'
    if targets != lora_lib.ALL_LINEAR:
      raise ValueError(f"{config_file}: target_modules={targets!r} is a regex; list the modules "
                       f"({list(lora_lib.TARGETS)}) instead.")
    targets = [lora_lib.ALL_LINEAR]
  return lora_lib.LoraSpec(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]),
                           dropout=float(pc.get("lora_dropout", 0.0)),
                  targets=tuple(targets))


def load_peft_adapter(path: str, model: Any, cfg: Any, shardings: Any | None = None,
                      expect: lora_lib.LoraSpec | None = None) -> tuple[lora_lib.LoraSpec, Any]:
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
  adapters = adapters_from_peft(tensors, spec, lora_lib.abstract_adapters(model, spec), cfg, weights)
  if shardings is not None:
    adapters = jax.device_put(adapters, shardings)
  if expect is not None:  # dropout and how A started are training choices, not part of the adapter
    spec = expect
  return spec, adapters
