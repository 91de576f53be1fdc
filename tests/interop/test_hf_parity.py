"""HF checkpoint conversion (`dpo_jax.interop.hf`): logits parity with transformers' torch models, layouts, round trip.

Every model is a tiny random fp32 one built locally; nothing is downloaded.
"""

import os

# Before transformers is imported: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch_models import random_hf_model  # noqa: E402

from dpo_jax.interop import hf  # noqa: E402
from dpo_jax.model import ModelConfig, abstract_params, make_model, rope_inv_freq  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# name -> (HF config class, extra config kwargs). Together they cover every tensor kind the converter maps.
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    "llama_rope500k_biases": (transformers.LlamaConfig,
                              dict(rope_theta=500000.0, attention_bias=True, mlp_bias=True)),
    # head_dim != hidden / heads; no sliding window (as in Mistral v0.2+), see test_sliding_window_warns.
    "mistral_head_dim32": (transformers.MistralConfig, dict(head_dim=32, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, rope_theta=1e6)),  # per-head q/k norms
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),  # GeGLU, sqrt(D) embeddings, (1 + w) norms
}

B, T, PAD = 2, 8, 3  # row 1 ends in PAD padding tokens


def _hf_config(family: str):
  cls, extra = FAMILIES[family]
  return cls(**TINY, **extra, attn_implementation="eager")


def _torch_model(family: str, seed: int = 0, dtype=torch.float32):
  return random_hf_model(_hf_config(family), seed, dtype)


def _batch():
  ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, T - PAD:] = 0  # right padding
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  return ids, positions, mask


def _torch_logits(model, ids, positions, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(np.ascontiguousarray(positions)).long())
  return out.logits.float().numpy()


def _jax_logits(params, cfg, ids, positions, mask) -> np.ndarray:
  return np.asarray(make_model(cfg).apply({"params": params}, ids, positions, mask))


def _assert_close_on_real_tokens(ours, theirs, mask, label):
  real = mask.astype(bool)
  a, b = ours[real], theirs[real]  # [n_real, V]
  max_abs = float(np.max(np.abs(a - b)))
  max_rel = max_abs / float(np.max(np.abs(b)))
  print(f"\n{label}: max|diff|={max_abs:.3e}  max|diff|/max|torch|={max_rel:.3e}")
  assert max_rel <= 1e-4, f"{label}: relative logit error {max_rel:.3e}"
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=label)


def _assert_bitwise_equal(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    w = w.detach().numpy() if hasattr(w, "detach") else np.asarray(w)
    g = got[name]
    assert g.dtype == w.dtype and g.shape == w.shape, name
    assert g.tobytes() == np.ascontiguousarray(w).tobytes(), name


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_torch(family):
  model = _torch_model(family)
  cfg = hf.model_config_from_hf(model.config)
  params = hf.params_from_hf_state_dict(model.state_dict(), cfg)
  # The converted tree is exactly what the model would create itself.
  assert _shapes(params) == _shapes(abstract_params(cfg))
  batch = _batch()
  _assert_close_on_real_tokens(_jax_logits(params, cfg, *batch), _torch_logits(model, *batch), batch[2], family)


@pytest.mark.parametrize("family", ["qwen2", "llama_rope500k_biases"])
def test_scan_layout_matches_unrolled(family):
  model = _torch_model(family)
  sd = model.state_dict()
  batch = _batch()
  logits = {}
  for scan in (False, True):
    cfg = hf.model_config_from_hf(model.config, scan_layers=scan)
    params = hf.params_from_hf_state_dict(sd, cfg)
    assert _shapes(params) == _shapes(abstract_params(cfg))
    logits[scan] = _jax_logits(params, cfg, *batch)
    _assert_bitwise_equal(hf.hf_state_dict_from_params(params, cfg), sd)
  _assert_close_on_real_tokens(logits[True], _torch_logits(model, *batch), batch[2], f"{family} scan_layers")
  np.testing.assert_allclose(logits[True], logits[False], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bitwise(family):
  model = _torch_model(family)
  sd = model.state_dict()
  cfg = hf.model_config_from_hf(model.config)
  back = hf.hf_state_dict_from_params(hf.params_from_hf_state_dict(sd, cfg), cfg)
  if cfg.tie_embeddings:
    # torch lists the shared head under both names; export writes it once, as save_pretrained does.
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
  _assert_bitwise_equal(back, sd)


def test_bf16_round_trip_is_bitwise():
  model = _torch_model("qwen2", dtype=torch.bfloat16)
  sd = model.state_dict()
  cfg = hf.model_config_from_hf(model.config, param_dtype="bfloat16")
  params = hf.params_from_hf_state_dict(sd, cfg)
  assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}
  back = hf.hf_state_dict_from_params(params, cfg)
  for name, w in sd.items():
    assert back[name].view(np.int16).tobytes() == w.view(torch.int16).numpy().tobytes(), name


def test_config_fields():
  cfg = hf.model_config_from_hf(_hf_config("llama_rope500k_biases"), remat="full")
  assert (cfg.rope_theta, cfg.qkv_bias, cfg.attn_out_bias, cfg.mlp_bias, cfg.remat) == (
      500000.0, True, True, True, "full")
  cfg = hf.model_config_from_hf(_hf_config("qwen2_tied"))
  assert (cfg.qkv_bias, cfg.attn_out_bias, cfg.tie_embeddings, cfg.num_kv_heads) == (True, False, True, 2)
  assert hf.model_config_from_hf(_hf_config("mistral_head_dim32")).resolved_head_dim == 32


def test_rope_theta_from_older_attribute_style():
  # transformers 4.x configs: a plain `rope_theta` attribute, `rope_scaling=None`.
  old = types.SimpleNamespace(
      model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=None, rms_norm_eps=1e-5, rope_theta=123.0, rope_scaling=None)
  cfg = hf.model_config_from_hf(old)
  assert (cfg.rope_theta, cfg.num_kv_heads, cfg.head_dim) == (123.0, 4, None)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling_is_rejected_by_name(rope_type):
  hf_cfg = _hf_config("llama")
  hf_cfg.rope_parameters = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
  with pytest.raises(NotImplementedError, match=f"'{rope_type}' is not supported .*'linear' and 'llama3'"):
    hf.model_config_from_hf(hf_cfg)


# Llama 3.1's scaling with a 32-token original context. head_dim 16 and theta 1e4 put one frequency in each band:
# wavelength 2 pi < 32 / high_freq_factor (kept), 19.9 between 32 / 4 and 32 / 1 (smoothed), 62.8 and up (divided).
ROPE_SCALINGS = {
    "llama3": dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
}
ROPE_T = 64  # positions up to twice the original context: every band's angles differ from unscaled RoPE


def _scaled_llama(kind: str):
  # initializer_range 0.1 (not 0.02): attention scores large enough that positions move the logits.
  config = transformers.LlamaConfig(**TINY, rope_parameters=dict(ROPE_SCALINGS[kind]), initializer_range=0.1,
                                    attn_implementation="eager")
  return random_hf_model(config)


def _long_batch():
  ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(B, ROPE_T)).astype(np.int32)
  mask = np.ones((B, ROPE_T), np.int32)
  mask[1, ROPE_T - PAD:] = 0
  return ids, np.broadcast_to(np.arange(ROPE_T, dtype=np.int32), (B, ROPE_T)), mask


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_scaled_rope_matches_torch(kind):
  model = _scaled_llama(kind)
  cfg = hf.model_config_from_hf(model.config)
  assert (cfg.rope_scaling_type, cfg.rope_scaling_factor) == (kind, ROPE_SCALINGS[kind]["factor"])
  # The frequencies themselves: HF's rotary buffer against ours, to fp32 rounding.
  ours_H2 = np.asarray(rope_inv_freq(cfg))
  np.testing.assert_allclose(ours_H2, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6, atol=0)
  params = hf.params_from_hf_state_dict(model.state_dict(), cfg)
  batch = _long_batch()
  ours = _jax_logits(params, cfg, *batch)
  theirs = _torch_logits(model, *batch)
  real = batch[2].astype(bool)
  max_rel = float(np.max(np.abs(ours - theirs)[real])) / float(np.max(np.abs(theirs[real])))
  print(f"\nrope {kind}: max|diff|={np.max(np.abs(ours - theirs)[real]):.3e}  max|diff|/max|torch|={max_rel:.3e}")
  assert max_rel <= 1e-5, f"rope {kind}: relative logit error {max_rel:.3e}"
  # The test has teeth: the same weights with unscaled RoPE give clearly different logits.
  plain = dataclasses.replace(cfg, rope_scaling_type="none", rope_scaling_factor=1.0)
  plain_rel = float(np.max(np.abs(_jax_logits(params, plain, *batch) - theirs)[real])) / float(np.max(np.abs(theirs)))
  print(f"rope {kind}: unscaled RoPE is off by max|diff|/max|torch|={plain_rel:.3e}")
  assert plain_rel > 0.05


def test_llama3_rope_bands():
  """Each band of llama3 scaling does what it says (frequencies per `ROPE_SCALINGS['llama3']`)."""
  model = _scaled_llama("llama3")
  cfg = hf.model_config_from_hf(model.config)
  base_H2 = np.asarray(rope_inv_freq(dataclasses.replace(cfg, rope_scaling_type="none", rope_scaling_factor=1.0)))
  scaled_H2 = np.asarray(rope_inv_freq(cfg))
  assert scaled_H2[0] == base_H2[0]  # wavelength 2 pi: high frequency, kept
  assert base_H2[1] / 8 < scaled_H2[1] < base_H2[1]  # smoothed band
  np.testing.assert_allclose(scaled_H2[2:], base_H2[2:] / 8, rtol=1e-6)  # low frequencies: divided by the factor


def test_rope_scaling_from_older_rope_scaling_attribute():
  # transformers 4.x: `rope_scaling` with the pre-4.45 'type' key, theta as its own attribute.
  old = types.SimpleNamespace(
      model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=64,
      rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32})
  cfg = hf.model_config_from_hf(old)
  assert (cfg.rope_theta, cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
          cfg.rope_high_freq_factor, cfg.rope_original_max_positions) == (5e5, "llama3", 8.0, 1.0, 4.0, 32)
  old.rope_scaling = {"type": "linear", "factor": 2.0}
  cfg = hf.model_config_from_hf(old)
  assert (cfg.rope_scaling_type, cfg.rope_scaling_factor, cfg.rope_original_max_positions) == ("linear", 2.0, 8192)


@pytest.mark.parametrize("fields, pattern", [
    (dict(rope_scaling_type="yarn"), r"rope_scaling_type='yarn'; choose one of \['none', 'linear', 'llama3'\]"),
    (dict(rope_scaling_factor=8.0), r"rope_scaling_factor=8\.0 has no effect with rope_scaling_type='none'"),
    (dict(rope_scaling_type="linear", rope_scaling_factor=0.0), r"rope_scaling_factor=0\.0 must be > 0"),
    (dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=4.0),
     r"rope_low_freq_factor=4\.0, rope_high_freq_factor=4\.0; 'llama3' RoPE needs 0 < low < high"),
])
def test_invalid_rope_scaling_is_named(fields, pattern):
  with pytest.raises(ValueError, match=pattern):
    ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                **fields)


def test_sliding_window_warns():
  with pytest.warns(UserWarning, match="sliding_window=16"):
    hf.model_config_from_hf(transformers.MistralConfig(**TINY, sliding_window=16))


def test_unsupported_model_type_lists_supported():
  with pytest.raises(ValueError, match=r"'gpt2'.*\['gemma', 'llama', 'mistral', 'mixtral', 'qwen2', 'qwen3', 'qwen3_moe'\]"):
    hf.model_config_from_hf(transformers.GPT2Config())


def _small_state_dict(family="llama"):
  model = _torch_model(family)
  return model.state_dict(), hf.model_config_from_hf(model.config)


def test_missing_and_unexpected_tensors_are_named():
  sd, cfg = _small_state_dict()
  del sd["model.layers.1.mlp.up_proj.weight"]
  sd["model.layers.0.extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]"
                                       r".*unexpected tensors \['model\.layers\.0\.extra\.weight'\]"):
    hf.params_from_hf_state_dict(sd, cfg)


def test_wrong_shape_is_named():
  sd, cfg = _small_state_dict()
  sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
  with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(64, 64\).*\(32, 64\)"):
    hf.params_from_hf_state_dict(sd, cfg)


def test_export_rejects_params_that_do_not_match_the_config():
  sd, cfg = _small_state_dict()
  params = hf.params_from_hf_state_dict(sd, cfg)
  with pytest.raises(ValueError, match=r"missing \['layers/attn.*unexpected \['layers_0/attn/k/kernel'"):
    hf.hf_state_dict_from_params(params, dataclasses.replace(cfg, scan_layers=True))
  with pytest.raises(ValueError, match=r"missing \[\].*unexpected \['lm_head'\]"):
    hf.hf_state_dict_from_params(params, dataclasses.replace(cfg, tie_embeddings=True))


def test_tied_head_absent_ok_but_must_equal_embedding_when_present():
  sd, cfg = _small_state_dict("qwen2_tied")
  without_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
  hf.params_from_hf_state_dict(without_head, cfg)
  sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1.0
  with pytest.raises(ValueError, match="tie_embeddings=False"):
    hf.params_from_hf_state_dict(sd, cfg)
