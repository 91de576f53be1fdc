"""PEFT adapter folders of mixture-of-experts models (dpo_jax/interop/hf/peft.py): attention and dense-layer MLP
adapters under their dense names, the experts' per-expert adapters as PEFT's `target_parameters` on transformers
5's fused `mlp.experts.gate_up_proj` / `down_proj`. PEFT's model computes the same logits as ours, the folder reads
back bit for bit, and adapters PEFT writes itself read in exactly."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import lora, model as model_lib
from dpo_jax.interop import hf
from dpo_jax.interop.hf import peft as peft_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# transformers' Mixtral: rope_theta 1e6, rms eps 1e-5; norm_topk_prob always.
MIXTRAL = model_lib.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_layers=2, num_heads=4,
                                num_kv_heads=2, num_experts=4, num_experts_per_tok=2, rope_theta=1e6,
                                rms_norm_eps=1e-5, matmul_precision="highest")
# Qwen3-MoE with mlp_only_layers=[1]: layer 1 keeps a dense MLP of width 24, layer 0 has experts of width 8.
QWEN3_MOE = dataclasses.replace(MIXTRAL, intermediate_size=24, moe_intermediate_size=8, dense_layers=(1,),
                                qk_norm=True, rms_norm_eps=1e-6)
EXPERTS_QV = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj") + lora.EXPERT_TARGETS)


def _hf_config(cfg):
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, num_experts_per_tok=2,
                rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                max_position_embeddings=64)
  if not cfg.qk_norm:
    return transformers.MixtralConfig(intermediate_size=cfg.intermediate_size, num_local_experts=cfg.num_experts,
                                      **common)
  return transformers.Qwen3MoeConfig(intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts,
                                     moe_intermediate_size=cfg.moe_intermediate_size, head_dim=4, norm_topk_prob=True,
                                     mlp_only_layers=list(cfg.dense_layers), decoder_sparse_step=1, **common)


def _hf_state_dict(params, cfg):
  """transformers 5's tensors of our params (Mixtral / Qwen3-MoE; the HF export of MoE models is not used here)."""
  d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  sd = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["final_norm"]["scale"],
        "lm_head.weight": params["lm_head"].T}
  for i in range(cfg.num_layers):
    p, pre = params[f"layers_{i}"], f"model.layers.{i}."
    sd[pre + "input_layernorm.weight"] = p["attn_norm"]["scale"]
    sd[pre + "post_attention_layernorm.weight"] = p["mlp_norm"]["scale"]
    for name, heads in (("q", h), ("k", k), ("v", k)):
      sd[pre + f"self_attn.{name}_proj.weight"] = p["attn"][name]["kernel"].reshape(d, heads * dh).T
    sd[pre + "self_attn.o_proj.weight"] = p["attn"]["o"]["kernel"].reshape(h * dh, d).T
    if cfg.qk_norm:
      for name in ("q", "k"):
        sd[pre + f"self_attn.{name}_norm.weight"] = p["attn"][f"{name}_norm"]["scale"]
    mlp = p["mlp"]
    if "router" in mlp:  # [E, D, F] kernels; gate_up_proj [E, 2F, D] with the gate's rows first
      sd[pre + "mlp.gate.weight"] = mlp["router"].T
      sd[pre + "mlp.experts.gate_up_proj"] = np.concatenate([mlp["gate"], mlp["up"]], axis=2).transpose(0, 2, 1)
      sd[pre + "mlp.experts.down_proj"] = mlp["down"].transpose(0, 2, 1)
    else:
      for name in ("gate", "up", "down"):
        sd[pre + f"mlp.{name}_proj.weight"] = mlp[name]["kernel"].T
  return {name: torch.from_numpy(np.array(x)) for name, x in sd.items()}


def _torch_model(params, cfg):
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(cfg), dtype=torch.float32)
  missing, unexpected = model.load_state_dict(_hf_state_dict(jax.device_get(params), cfg), strict=False)
  assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
  return model.eval()


def _perturbed(adapters, seed=1, scale=0.3):
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
  return jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), adapters)


def _tokens(b=3, t=10):
  ids = np.asarray(jax.random.randint(jax.random.key(7), (b, t), 0, 64), np.int32)
  return ids, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)), np.ones((b, t), np.int32)


def _ours(cfg, params):
  ids, pos, seg = _tokens()
  return np.asarray(jax.jit(lambda p: model_lib.apply_params(model_lib.make_model(cfg), p, ids, pos, seg))(params))


def _theirs(model):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(_tokens()[0], dtype=torch.long)).logits.numpy()


def _round_trip(tmp_path, cfg, spec, seed=0):
  """Export, PEFT's logits against ours (1e-5 of the largest), and back in bit for bit; returns the folder."""
  base = model_lib.init_params(cfg, jax.random.key(seed))
  model = model_lib.make_model(cfg)
  adapters = _perturbed(lora.init_adapters(model, spec, jax.random.key(seed + 1)))
  folder = peft_io.save_peft_adapter(str(tmp_path / "adapter"), adapters, spec, cfg)
  torch_model = _torch_model(base, cfg)
  np.testing.assert_allclose(_theirs(torch_model), _ours(cfg, base), rtol=0, atol=2e-5)  # the bases agree
  peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
  ours = _ours(cfg, lora.LoraParams(base, adapters, spec))
  theirs = _theirs(peft_model)
  assert np.abs(ours - _ours(cfg, base)).max() > 0.05 * np.abs(ours).max()  # the adapters matter
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * np.abs(ours).max())
  loaded_spec, loaded = peft_io.load_peft_adapter(folder, model, cfg, expect=spec)
  assert loaded_spec == spec
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, adapters))
  return folder, base, adapters, peft_model


def test_mixtral_attention_adapters_are_the_dense_names(tmp_path):
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
  folder = _round_trip(tmp_path, MIXTRAL, spec)[0]
  config = json.load(open(os.path.join(folder, "adapter_config.json")))
  assert config["target_modules"] == list(spec.targets) and "target_parameters" not in config


def test_mixtral_expert_adapters_as_peft_target_parameters(tmp_path):
  folder, base, adapters, peft_model = _round_trip(tmp_path, MIXTRAL, EXPERTS_QV)
  config = json.load(open(os.path.join(folder, "adapter_config.json")))
  assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
  assert config["rank_pattern"] == {"mlp.experts.gate_up_proj": 4} and config["lora_dropout"] == 0.0
  # PEFT's own merge writes what lora.merge writes, expert by expert
  merged = lora.merge(base, adapters, EXPERTS_QV, MIXTRAL)
  theirs = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
  ours = _hf_state_dict(jax.device_get(merged), MIXTRAL)
  for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
               "model.layers.0.self_attn.q_proj.weight"):
    np.testing.assert_allclose(theirs[name], ours[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("targets", [("experts.gate_proj",), ("experts.up_proj", "experts.down_proj")])
def test_one_half_of_gate_up_is_rank_r_with_the_other_half_zero(tmp_path, targets):
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=targets)
  folder = _round_trip(tmp_path, MIXTRAL, spec)[0]
  config = json.load(open(os.path.join(folder, "adapter_config.json")))
  assert config["target_modules"] == [] and config["rank_pattern"] == {}
  # without the run's targets the folder names only gate_up_proj: both halves come back, the other one zero
  both, adapters = peft_io.load_peft_adapter(folder, model_lib.make_model(MIXTRAL), MIXTRAL)
  assert {"experts.gate_proj", "experts.up_proj"} <= set(both.targets)
  other = "up" if targets[0] == "experts.gate_proj" else "gate"
  assert not np.asarray(adapters["layers_0"]["mlp"][f"{other}_lora"]["b"]).any()


@pytest.mark.slow
def test_qwen3_moe_dense_layer_mlp_and_expert_adapters(tmp_path):
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "gate_proj", "down_proj", "experts.gate_proj",
                                                   "experts.up_proj"))
  folder = _round_trip(tmp_path, QWEN3_MOE, spec)[0]
  config = json.load(open(os.path.join(folder, "adapter_config.json")))
  # PEFT on transformers 5 reads module names gate_proj / down_proj of a Qwen3-MoE as its experts: the dense
  # layer's MLP is named by its weights instead (the same tensors)
  assert config["target_modules"] == ["q_proj"]
  assert sorted(config["target_parameters"]) == ["mlp.down_proj.weight", "mlp.experts.gate_up_proj",
                                                 "mlp.gate_proj.weight"]
  from safetensors.numpy import load_file
  names = sorted(load_file(os.path.join(folder, "adapter_model.safetensors")))
  assert [n for n in names if ".mlp." in n] == [
      "base_model.model.model.layers.0.mlp.experts.lora_A.weight",
      "base_model.model.model.layers.0.mlp.experts.lora_B.weight",
      "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
      "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
      "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight",
      "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"]


def _peft_trained(tmp_path, cfg, rank, target_parameters, **config):
  """A folder PEFT writes itself for a Mixtral built from random base params: (folder, base, its logits)."""
  base = model_lib.init_params(cfg, jax.random.key(0))
  torch_model = _torch_model(base, cfg)
  peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
      r=rank, lora_alpha=2.0 * rank, target_modules=["q_proj"], target_parameters=target_parameters,
      init_lora_weights=False, **config))  # random A and B
  folder = str(tmp_path / "peft")
  peft_model.save_pretrained(folder)
  return folder, base, _theirs(peft_model.eval())


@pytest.mark.slow
def test_a_peft_trained_gate_up_adapter_of_rank_r_reads_in_exactly(tmp_path):
  """PEFT's rank-r gate_up_proj adapter shares A between gate and up: it becomes our two rank-r adapters."""
  folder, base, theirs = _peft_trained(tmp_path, MIXTRAL, 2, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
  spec, adapters = peft_io.load_peft_adapter(folder, model_lib.make_model(MIXTRAL), MIXTRAL)
  assert spec.targets == ("q_proj",) + lora.EXPERT_TARGETS and spec.rank == 2
  ad = adapters["layers_1"]["mlp"]
  np.testing.assert_array_equal(ad["gate_lora"]["a"], ad["up_lora"]["a"])
  ours = _ours(MIXTRAL, lora.LoraParams(base, jax.tree.map(jnp.asarray, adapters), spec))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(ours).max())
  # a run that adapts only the gate refuses it: the adapter also changes up's rows
  with pytest.raises(ValueError, match="add it to config.lora.targets"):
    peft_io.load_peft_adapter(folder, model_lib.make_model(MIXTRAL), MIXTRAL,
                              expect=lora.LoraSpec(2, 4.0, targets=("q_proj", "experts.gate_proj",
                                                                    "experts.down_proj")))


@pytest.mark.slow
def test_a_rank_2r_gate_up_adapter_that_mixes_gate_and_up_is_refused(tmp_path):
  folder = _peft_trained(tmp_path, MIXTRAL, 2, ["mlp.experts.gate_up_proj"],
                         rank_pattern={"mlp.experts.gate_up_proj": 4})[0]
  with pytest.raises(ValueError, match="mixes gate and up rows"):
    peft_io.load_peft_adapter(folder, model_lib.make_model(MIXTRAL), MIXTRAL)


def test_unsupported_expert_configs_name_the_field(tmp_path):
  def folder(**fields):
    path = tmp_path / str(len(list(tmp_path.iterdir())))
    path.mkdir()
    config = dict(peft_io.peft_config(EXPERTS_QV, None), **fields)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)

  spec = peft_io.read_peft_spec(folder())
  assert spec.targets == EXPERTS_QV.targets and spec.dropout == 0.0
  with pytest.raises(ValueError, match="target_parameters entry 'mlp.router.weight'"):
    peft_io.read_peft_spec(folder(target_parameters=["mlp.router.weight"]))
  with pytest.raises(ValueError, match="rank_pattern"):
    peft_io.read_peft_spec(folder(rank_pattern={"q_proj": 8}))


@pytest.mark.slow
@pytest.mark.parametrize("cfg, model_type", [(MIXTRAL, "mixtral"), (QWEN3_MOE, "qwen3_moe")])
def test_the_merged_export_and_the_adapter_on_the_exported_base_load_in_transformers(tmp_path, cfg, model_type):
  """`lora.merge` then the HF export (config.lora.export='merged'), and the PEFT folder over the exported base
  (export='adapter'): from the folders alone transformers and PEFT give our adapted logits."""
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "o_proj", "gate_proj") + lora.EXPERT_TARGETS)
  base = model_lib.init_params(cfg, jax.random.key(0))
  adapters = _perturbed(lora.init_adapters(model_lib.make_model(cfg), spec, jax.random.key(1)))
  merged_dir, base_dir, adapter_dir = (str(tmp_path / n) for n in ("merged", "base", "adapter"))
  hf.save_hf_checkpoint(jax.device_get(lora.merge(base, adapters, spec, cfg)), cfg, merged_dir, model_type=model_type)
  hf.save_hf_checkpoint(jax.device_get(base), cfg, base_dir, model_type=model_type)
  peft_io.save_peft_adapter(adapter_dir, adapters, spec, cfg, base_model_name_or_path=base_dir)
  ours = _ours(cfg, lora.LoraParams(base, adapters, spec))
  assert np.abs(ours - _ours(cfg, base)).max() > 0.05 * np.abs(ours).max()
  load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  np.testing.assert_allclose(_theirs(load(merged_dir)), ours, rtol=0, atol=1e-5 * np.abs(ours).max())
  peft_model = peft.PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
  np.testing.assert_allclose(_theirs(peft_model), ours, rtol=0, atol=1e-5 * np.abs(ours).max())


def test_scanned_layers_write_and_read_the_same_tensors(tmp_path):
  scanned = dataclasses.replace(MIXTRAL, scan_layers=True)
  stacked = _perturbed(lora.init_adapters(model_lib.make_model(scanned), EXPERTS_QV, jax.random.key(0)))
  per_layer = {f"layers_{i}": jax.tree.map(lambda x: np.asarray(x)[i], stacked["layers"]) for i in range(2)}
  tensors = peft_io.peft_state_dict(jax.device_get(stacked), EXPERTS_QV, scanned)
  unscanned = peft_io.peft_state_dict(per_layer, EXPERTS_QV, MIXTRAL)
  assert sorted(tensors) == sorted(unscanned) and len(tensors) == 2 * (4 + 4)  # q, v, gate_up, down: A and B
  for name, x in tensors.items():
    np.testing.assert_array_equal(x, unscanned[name], err_msg=name)
  # expert 3's rank row 1 of A is row 3 r + 1 of lora_A; its rank column 1 of B is column 1 E + 3 of lora_B
  a_up = np.asarray(stacked["layers"]["mlp"]["up_lora"]["a"])[1, 3, :, 1]  # layer 1, expert 3, [D], rank col 1
  np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"]
                                [3 * 4 + 2 + 1], a_up)  # up is the second half: rank rows r..2r of the stack
  b_down = np.asarray(stacked["layers"]["mlp"]["down_lora"]["b"])[0, 3, 1]  # layer 0, expert 3, rank row 1: [D]
  np.testing.assert_array_equal(tensors["base_model.model.model.layers.0.mlp.experts.lora_B.weight"][:, 1 * 4 + 3],
                                b_down)
  folder = peft_io.save_peft_adapter(str(tmp_path / "scanned"), stacked, EXPERTS_QV, scanned)
  _, loaded = peft_io.load_peft_adapter(folder, model_lib.make_model(scanned), scanned, expect=EXPERTS_QV)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(stacked))


def test_a_dense_mlp_target_on_an_all_moe_model_adapts_nothing_and_reads_back(tmp_path):
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "gate_proj", "experts.down_proj"))
  adapters = _perturbed(lora.init_adapters(model_lib.make_model(MIXTRAL), spec, jax.random.key(0)))
  assert set(adapters["layers_0"]["mlp"]) == {"down_lora"}
  folder = peft_io.save_peft_adapter(str(tmp_path / "a"), adapters, spec, MIXTRAL)
  config = json.load(open(os.path.join(folder, "adapter_config.json")))
  assert config["target_modules"] == ["q_proj"] and config["target_parameters"] == ["mlp.experts.down_proj"]
  got, loaded = peft_io.load_peft_adapter(folder, model_lib.make_model(MIXTRAL), MIXTRAL, expect=spec)
  assert got == spec
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(adapters))
