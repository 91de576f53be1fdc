"""Per-family HF configs <-> `ModelConfig`: the readers (`model_config_from_hf`) and, for export, the writer
(`hf_config_from_model_config`), which refuses a cfg the family cannot express.

Supported families, both ways: llama, mistral, qwen2, qwen3 (per-head q/k norms), gemma v1 (GeGLU, sqrt(D)
embedding scale, (1 + w) norms), and the mixtures of experts mixtral (every layer MoE, top-k weights always
renormalised) and qwen3_moe (Qwen3's attention; `decoder_sparse_step` / `mlp_only_layers` pick the MoE layers,
`norm_topk_prob` the renormalisation, `moe_intermediate_size` the experts' width). RoPE: unscaled, 'linear' and
'llama3' (Llama 3.1/3.2) scaling; other scalings raise NotImplementedError. A new family adds a reader to
`_CONFIG_READERS`, a layout name to `LAYOUT_OF_MODEL_TYPE` (layouts.py), and for export an entry in `_HF_CLASSES`
and `_FAMILY_FIXED` (MoE families also in `_MOE_FAMILIES`).
HF configs are read by attribute: nothing here imports transformers until a config is written.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from dpo_jax.model import ModelConfig


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


def _num_experts(hf_config: Any) -> int:
  """E: `num_local_experts` (Mixtral; Qwen3-MoE in transformers 5, which maps `num_experts` onto it) or
  `num_experts` (Qwen3-MoE in transformers 4)."""
  for name in ("num_local_experts", "num_experts"):
    value = getattr(hf_config, name, None)
    if value is not None:
      return int(value)
  raise ValueError(f"hf config: model_type={hf_config.model_type!r} without num_local_experts / num_experts; add the "
                   "expert count to config.json.")


def _moe_fields(hf_config: Any) -> dict[str, Any]:
  """Fields both MoE families spell the same way."""
  return dict(num_experts=_num_experts(hf_config), num_experts_per_tok=int(hf_config.num_experts_per_tok),
              router_aux_loss_coef=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0))


def _mixtral_fields(hf_config: Any) -> dict[str, Any]:
  """Mixtral: Mistral's attention, every layer MoE with `intermediate_size`-wide experts, top-k weights always
  renormalised."""
  _warn_if_windowed(hf_config, getattr(hf_config, "sliding_window", None))
  jitter = getattr(hf_config, "router_jitter_noise", 0.0) or 0.0
  if jitter:
    # HF multiplies the router input by U(1 - j, 1 + j) noise in training mode only; evaluation is unaffected.
    warnings.warn(f"hf config: router_jitter_noise={jitter} is ignored (dpo_jax routes without noise); "
                  "training differs from transformers' train-mode forward, evaluation does not.", stacklevel=3)
  return dict(_common_fields(hf_config), **_moe_fields(hf_config), norm_topk_prob=True)


def _qwen3_moe_fields(hf_config: Any) -> dict[str, Any]:
  """Qwen3-MoE: Qwen3's attention (q/k norms); layer i is MoE unless listed in `mlp_only_layers` or
  (i + 1) % decoder_sparse_step != 0, those keep a dense `intermediate_size` MLP."""
  return dict(_qwen3_fields(hf_config), **_moe_fields(hf_config),
              moe_intermediate_size=int(hf_config.moe_intermediate_size),
              norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
              moe_layer_step=int(getattr(hf_config, "decoder_sparse_step", 1) or 1),
              dense_layers=tuple(int(i) for i in (getattr(hf_config, "mlp_only_layers", None) or ())))


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
    "mixtral": _mixtral_fields,
    "qwen3_moe": _qwen3_moe_fields,
}


# model_type -> name of its tensor layout in `layouts._LAYOUTS` (the dense five share Llama's tensor names; the MoE
# families add their own expert names).
LAYOUT_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
                        "mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}


# The families whose checkpoints hold experts: they need num_experts > 0, the others num_experts == 0.
_MOE_FAMILIES = ("mixtral", "qwen3_moe")


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


# model_type -> (transformers config class name, *ForCausalLM architecture name).
_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


_SWIGLU = dict(qk_norm=False, mlp_activation="silu", embed_scale=False, norm_offset=0.0)


# model_type -> the ModelConfig fields whose value that family's architecture fixes.
_FAMILY_FIXED = {
    "llama": _SWIGLU,
    "mistral": dict(_SWIGLU, qkv_bias=False, attn_out_bias=False, mlp_bias=False),
    "qwen2": dict(_SWIGLU, qkv_bias=True, attn_out_bias=False, mlp_bias=False),
    "qwen3": dict(_SWIGLU, qk_norm=True, mlp_bias=False),
    "gemma": dict(qk_norm=False, mlp_activation="gelu_tanh", embed_scale=True, norm_offset=1.0, mlp_bias=False),
    # Mixtral's config has no field for renormalisation, dense layers or a separate expert width: its router always
    # renormalises, every layer is MoE and `intermediate_size` is the experts' width (checked in _family_mismatch).
    "mixtral": dict(_SWIGLU, qkv_bias=False, attn_out_bias=False, mlp_bias=False, norm_topk_prob=True,
                    moe_layer_step=1, dense_layers=()),
    "qwen3_moe": dict(_SWIGLU, qk_norm=True, mlp_bias=False),
}


# Families whose single `attention_bias` flag covers q, k, v and o alike.
_ONE_ATTENTION_BIAS = ("llama", "qwen3", "gemma", "qwen3_moe")


def _family_mismatch(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  """{field: cfg's value} for every field `model_type` cannot express (empty when it can express cfg)."""
  bad = {f: getattr(cfg, f) for f, v in _FAMILY_FIXED[model_type].items() if getattr(cfg, f) != v}
  if model_type in _ONE_ATTENTION_BIAS and cfg.qkv_bias != cfg.attn_out_bias:
    bad.update(qkv_bias=cfg.qkv_bias, attn_out_bias=cfg.attn_out_bias)
  if (cfg.num_experts > 0) != (model_type in _MOE_FAMILIES):  # experts in a dense family, or none in an MoE one
    bad["num_experts"] = cfg.num_experts
  if model_type == "mixtral" and cfg.resolved_moe_intermediate_size != cfg.intermediate_size:
    bad.update(moe_intermediate_size=cfg.moe_intermediate_size, intermediate_size=cfg.intermediate_size)
  return bad


def family_for(cfg: ModelConfig) -> str:
  """The HF family a cfg built without a checkpoint exports as: 'llama' when it can express cfg, else the first
  family that can (e.g. 'mixtral' for a random-init MoE), else 'llama' (whose export then names the fields)."""
  for model_type in ("llama",) + tuple(_FAMILY_FIXED):
    if not _family_mismatch(cfg, model_type):
      return model_type
  return "llama"


def _family_needs(model_type: str) -> str:
  """What `model_type` requires of a cfg, for the refusal message."""
  needs = f"{_FAMILY_FIXED[model_type]}"
  if model_type in _ONE_ATTENTION_BIAS:
    needs += " and qkv_bias == attn_out_bias (one attention_bias flag)"
  if model_type in _MOE_FAMILIES:
    needs += " and num_experts > 0"
  else:
    needs += " and num_experts == 0 (no experts)"
  if model_type == "mixtral":
    needs += " and moe_intermediate_size None or == intermediate_size (one width)"
  return needs


def _family_fields(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  """The family-specific HF config kwargs; raises naming the fields the family cannot express, and the families
  that can."""
  bad = _family_mismatch(cfg, model_type)
  if bad:
    fits = [t for t in _FAMILY_FIXED if not _family_mismatch(cfg, t)]
    fix = f"Use model_type={fits[0]!r}." if fits else "No supported family expresses this cfg; change those fields."
    raise ValueError(f"hf export: model_type={model_type!r} cannot express cfg's {bad}; that family needs "
                     f"{_family_needs(model_type)}. {fix}")
  act = "gelu_pytorch_tanh" if cfg.mlp_activation == "gelu_tanh" else "silu"
  fields: dict[str, Any] = dict(hidden_act=act)
  if model_type in _ONE_ATTENTION_BIAS:
    fields["attention_bias"] = cfg.qkv_bias
  if model_type == "llama":
    fields["mlp_bias"] = cfg.mlp_bias
  if model_type in ("mistral", "mixtral"):
    fields["sliding_window"] = None  # our attention is full-causal
  if model_type in ("qwen2", "qwen3", "qwen3_moe"):
    fields["use_sliding_window"] = False
  if model_type in _MOE_FAMILIES:
    fields.update(num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.router_aux_loss_coef)
  if model_type == "mixtral":
    fields.update(num_local_experts=cfg.num_experts, router_jitter_noise=0.0)
  if model_type == "qwen3_moe":
    fields.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.resolved_moe_intermediate_size,
                  norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.moe_layer_step,
                  mlp_only_layers=list(cfg.dense_layers))
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


def check_hf_config_describes(hf_config: Any, cfg: ModelConfig) -> None:
  """Raise if a given HF config disagrees with `cfg` (the saved folder would load as a different model)."""
  described = model_config_from_hf(hf_config)
  resolved = ("head_dim", "moe_intermediate_size")  # None means a default: compared resolved, below
  mismatched = {f.name: (getattr(described, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(ModelConfig)
                if f.name in _CONFIG_READERS[hf_config.model_type](hf_config) and f.name not in resolved
                and getattr(described, f.name) != getattr(cfg, f.name)}
  if described.resolved_head_dim != cfg.resolved_head_dim:
    mismatched["head_dim"] = (described.resolved_head_dim, cfg.resolved_head_dim)
  if described.num_experts and described.resolved_moe_intermediate_size != cfg.resolved_moe_intermediate_size:
    mismatched["moe_intermediate_size"] = (described.resolved_moe_intermediate_size,
                                           cfg.resolved_moe_intermediate_size)
  if mismatched:
    raise ValueError(f"save_hf_checkpoint: hf_config disagrees with cfg on {{field: (hf_config, cfg)}} = "
                     f"{mismatched}; pass a matching hf_config or leave it None to build one from cfg.")
