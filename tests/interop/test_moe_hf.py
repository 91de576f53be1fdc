"""HF interop of mixture-of-experts models (Mixtral, Qwen3-MoE): configs both ways, the per-expert tensor layout,
logits / router logits / load-balancing loss against transformers' torch models, export round trips, refusals.

Every model is a tiny random fp32 one built here; nothing is downloaded.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dpo_jax import moe  # noqa: E402
from dpo_jax.interop import compare_torch, hf  # noqa: E402
from dpo_jax.interop.hf import families, layouts  # noqa: E402
from dpo_jax.model import ModelConfig, init_params, make_model  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, router_aux_loss_coef=0.02, attn_implementation="eager")

# name -> (model_type, HF config class, extra kwargs). Mixtral: every layer MoE, experts intermediate_size wide.
# Qwen3-MoE: layer 1 dense by mlp_only_layers (renormalised top-k); or every second layer MoE by
# decoder_sparse_step=2 (raw top-k probabilities, tied head).
FAMILIES = {
    "mixtral": ("mixtral", transformers.MixtralConfig, dict(num_local_experts=4)),
    "qwen3_moe_dense_layer": ("qwen3_moe", transformers.Qwen3MoeConfig,
                              dict(num_experts=4, moe_intermediate_size=8, decoder_sparse_step=1, mlp_only_layers=[1],
                                   norm_topk_prob=True)),
    "qwen3_moe_step2": ("qwen3_moe", transformers.Qwen3MoeConfig,
                        dict(num_experts=4, moe_intermediate_size=8, decoder_sparse_step=2, norm_topk_prob=False,
                             tie_word_embeddings=True)),
}

B, T = 3, 7  # rows 1 and 2 are left-padded by 2 and 4 tokens


def torch_model(name, seed=0):
  """A random fp32 model whose routers are far from ties: unit-scale router weights (Qwen3-MoE initialises them to
  zero, where top-k would pick experts 0 and 1 everywhere), 1/sqrt(fan_in) projections, randomised norms."""
  _, cls, extra = FAMILIES[name]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, **extra)).float().eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif n.endswith("gate.weight"):  # the routers
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  return model


def padded_batch():
  ids = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, :2] = 0
  mask[2, :4] = 0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)  # 0 at each row's first real token
  return ids, positions, mask


def torch_forward(model, ids, positions, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                 position_ids=torch.from_numpy(positions).long(), output_router_logits=True)


def rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (torch model, its save_pretrained folder)."""
  out = {}
  for name in FAMILIES:
    model = torch_model(name)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (model, path)
  return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_router_logits_and_aux_loss_match_torch(saved, name):
  model, path = saved[name]
  cfg, params = hf.load_hf_checkpoint(path)
  layers = moe.moe_layers(cfg)
  assert layers == {"mixtral": (0, 1, 2), "qwen3_moe_dense_layer": (0, 2), "qwen3_moe_step2": (1,)}[name]
  ids, positions, mask = padded_batch()
  theirs = torch_forward(model, ids, positions, mask)
  logits, collections = jax.jit(lambda p: make_model(cfg).apply(
      {"params": p}, ids, positions, mask, mutable=[moe.ROUTER_LOGITS, moe.ROUTER]))(params)
  # Compared on real tokens: what a model computes at a padding position is unused, and differs (at a left-padding
  # position every key of torch's attention is masked).
  real = mask.astype(bool)
  logits_err = rel_err(np.asarray(logits)[real], theirs.logits.numpy()[real])
  # torch's router_logits: one [B*T, E] per MoE layer, in layer order.
  assert len(theirs.router_logits) == len(layers)
  router_err = max(
      rel_err(np.asarray(collections[moe.ROUTER_LOGITS][f"layers_{i}"]["mlp"]["logits"][0]).reshape(B * T, -1)[
          real.reshape(-1)], theirs.router_logits[j].numpy()[real.reshape(-1)]) for j, i in enumerate(layers))
  aux = float(moe.load_balancing_loss(moe.stack_router_sums(collections[moe.ROUTER])))
  aux_err = abs(aux - float(theirs.aux_loss)) / abs(float(theirs.aux_loss))
  print(f"\n{name}: logits rel {logits_err:.2e}, router logits rel {router_err:.2e}, aux {aux:.6f} vs "
        f"{float(theirs.aux_loss):.6f} (rel {aux_err:.1e})")
  assert logits_err <= 1e-5
  assert router_err <= 1e-5
  assert aux_err <= 1e-5
  assert aux > cfg.num_experts_per_tok * 1.01  # k is its minimum (uniform routing): these routers are not uniform


@pytest.mark.parametrize("name", list(FAMILIES))
def test_config_fields_and_in_memory_state_dict(saved, name):
  """The reader maps each HF field, and transformers 5's fused in-memory experts (`state_dict()`) load to the same
  params, bit for bit, as the per-expert tensors save_pretrained wrote."""
  model, path = saved[name]
  model_type, _, extra = FAMILIES[name]
  cfg, params = hf.load_hf_checkpoint(path)
  expected = dict(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02, intermediate_size=24)
  if model_type == "mixtral":
    expected.update(norm_topk_prob=True, moe_intermediate_size=None, moe_layer_step=1, dense_layers=(), qk_norm=False)
  else:
    expected.update(norm_topk_prob=extra["norm_topk_prob"], moe_intermediate_size=8,
                    moe_layer_step=extra["decoder_sparse_step"], dense_layers=tuple(extra.get("mlp_only_layers", ())),
                    qk_norm=True)
  assert {f: getattr(cfg, f) for f in expected} == expected
  state_dict = model.state_dict()
  assert "model.layers.0.mlp.experts.gate_up_proj" in state_dict or name == "qwen3_moe_step2"
  assert not any(".experts.0." in k for k in state_dict)  # fused in memory (transformers 5)
  from_memory = hf.params_from_hf_state_dict(state_dict, cfg, model_type=model_type)
  assert jax.tree.structure(from_memory) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(from_memory), jax.tree.leaves(params)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  i = moe.moe_layers(cfg)[0]
  mlp = params[f"layers_{i}"]["mlp"]
  f = cfg.resolved_moe_intermediate_size
  assert {k: v.shape for k, v in mlp.items()} == {"router": (16, 4), "gate": (4, 16, f), "up": (4, 16, f),
                                                  "down": (4, f, 16)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_round_trip_bit_for_bit(saved, name, tmp_path):
  """params -> HF state dict -> params is exact; the export has exactly save_pretrained's tensor names and values,
  and transformers loads it into the same model (every in-memory tensor equal)."""
  from safetensors.numpy import load_file

  model, path = saved[name]
  model_type = FAMILIES[name][0]
  cfg, params = hf.load_hf_checkpoint(path)
  state_dict = hf.hf_state_dict_from_params(params, cfg, model_type=model_type)
  written = load_file(os.path.join(path, "model.safetensors"))
  assert set(state_dict) == set(written)
  for k, v in written.items():
    assert np.array_equal(state_dict[k], v), k
  again = hf.params_from_hf_state_dict(state_dict, cfg, model_type=model_type)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    assert np.array_equal(a, b)

  out = str(tmp_path / "export")
  hf.save_hf_checkpoint(params, cfg, out, model_type=model_type)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == model_type and config["architectures"] == [type(model).__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  original = model.state_dict()
  assert set(reloaded.state_dict()) == set(original)
  for k, v in reloaded.state_dict().items():
    assert torch.equal(v, original[k]), k
  # With the source's own config (the trainer's export path), check_hf_config_describes accepts it.
  hf.save_hf_checkpoint(params, cfg, out, hf_config=model.config)
  assert hf.load_hf_checkpoint(out)[0] == cfg


def test_config_round_trip_both_ways():
  for name, (model_type, cls, extra) in FAMILIES.items():
    cfg = hf.model_config_from_hf(cls(**COMMON, **extra))
    back = hf.model_config_from_hf(hf.hf_config_from_model_config(cfg, model_type))
    assert back == dataclasses.replace(cfg, head_dim=cfg.resolved_head_dim), name  # the export writes head_dim
  cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=4, qk_norm=True, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=12,
                    norm_topk_prob=False, moe_layer_step=2, dense_layers=(3,), router_aux_loss_coef=0.5)
  hf_config = hf.hf_config_from_model_config(cfg, "qwen3_moe")
  assert (hf_config.num_experts, hf_config.num_experts_per_tok, hf_config.moe_intermediate_size,
          hf_config.norm_topk_prob, hf_config.decoder_sparse_step, hf_config.mlp_only_layers,
          hf_config.router_aux_loss_coef) == (8, 3, 12, False, 2, [3], 0.5)
  assert hf.model_config_from_hf(hf_config) == cfg
  # moe_intermediate_size=None means intermediate_size: the describes-check compares resolved widths.
  families.check_hf_config_describes(hf.hf_config_from_model_config(cfg, "qwen3_moe"), cfg)
  mixtral = dataclasses.replace(cfg, qk_norm=False, norm_topk_prob=True, moe_layer_step=1, dense_layers=(),
                                moe_intermediate_size=None)
  families.check_hf_config_describes(hf.hf_config_from_model_config(mixtral, "mixtral"),
                                     dataclasses.replace(mixtral, moe_intermediate_size=24))
  with pytest.raises(ValueError, match=r"moe_intermediate_size.*\(24, 12\)"):
    families.check_hf_config_describes(hf.hf_config_from_model_config(mixtral, "mixtral"),
                                       dataclasses.replace(mixtral, moe_intermediate_size=12))


_MOE = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                   num_experts=4)


@pytest.mark.parametrize("fields, model_type, match", [
    (dict(num_experts=0), "mixtral", r"'mixtral' cannot express cfg's \{'num_experts': 0\}.*num_experts > 0.*"
                                     r"Use model_type='llama'"),
    (dict(num_experts=0, qk_norm=True), "qwen3_moe", r"\{'num_experts': 0\}.*Use model_type='qwen3'"),
    (dict(), "llama", r"'llama' cannot express cfg's \{'num_experts': 4\}.*num_experts == 0.*"
                      r"Use model_type='mixtral'"),
    (dict(qk_norm=True), "qwen3", r"\{'num_experts': 4\}.*Use model_type='qwen3_moe'"),
    (dict(norm_topk_prob=False), "mixtral", r"\{'norm_topk_prob': False\}"),
    (dict(dense_layers=(1,)), "mixtral", r"\{'dense_layers': \(1,\)\}"),
    (dict(moe_layer_step=2), "mixtral", r"\{'moe_layer_step': 2\}"),
    (dict(moe_intermediate_size=8), "mixtral",
     r"\{'moe_intermediate_size': 8, 'intermediate_size': 24\}.*one width"),
    (dict(), "qwen3_moe", r"\{'qk_norm': False\}.*Use model_type='mixtral'"),
])
def test_export_refuses_what_the_family_cannot_express(fields, model_type, match):
  with pytest.raises(ValueError, match=match):
    hf.hf_config_from_model_config(dataclasses.replace(_MOE, **fields), model_type)


def test_warnings_for_what_is_ignored():
  config = transformers.MixtralConfig(**COMMON, num_local_experts=4, sliding_window=4, router_jitter_noise=0.1)
  with pytest.warns(UserWarning) as record:
    hf.model_config_from_hf(config)
  messages = " | ".join(str(w.message) for w in record)
  assert "sliding_window=4 is ignored" in messages and "router_jitter_noise=0.1 is ignored" in messages
  assert all(w.filename == __file__ for w in record)  # attributed to the caller of model_config_from_hf


def test_state_dict_errors_name_the_tensors(saved):
  model, _ = saved["mixtral"]
  cfg = hf.model_config_from_hf(model.config)
  state_dict = dict(model.state_dict())
  with pytest.raises(ValueError, match=r"cfg has num_experts=4 but this model_type has no expert tensors"):
    hf.params_from_hf_state_dict(state_dict, cfg, model_type="llama")
  fused = "model.layers.1.mlp.experts.gate_up_proj"
  bad = {**state_dict, fused: state_dict[fused][:, :40]}  # 2F = 48 rows expected
  with pytest.raises(ValueError, match=r"gate_up_proj has shape \(4, 40, 16\), the config implies \(4, 48, 16\)"):
    hf.params_from_hf_state_dict(bad, cfg, model_type="mixtral")
  del state_dict["model.layers.2.mlp.experts.down_proj"]
  with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.block_sparse_moe.experts.0.w2.weight'"):
    hf.params_from_hf_state_dict(state_dict, cfg, model_type="mixtral")


def test_scanned_mixtral_load_and_fused_folder(saved, tmp_path):
  """scan_layers=True stacks each leaf to [L, ...] (the experts to [L, E, ...]) and computes the same logits; a
  folder whose safetensors hold transformers 5's fused names loads to the same params."""
  from safetensors.torch import save_file

  model, path = saved["mixtral"]
  cfg, params = hf.load_hf_checkpoint(path, moe_impl="dense")  # a runtime field a checkpoint run may still set
  scfg, scanned = hf.load_hf_checkpoint(path, scan_layers=True, moe_impl="dense")
  assert cfg.moe_impl == "dense" and scanned["layers"]["mlp"]["gate"].shape == (3, 4, 16, 24)
  for i in range(3):
    for a, b in zip(jax.tree.leaves(layouts.layer_params(scanned, scfg, i)[0]), jax.tree.leaves(params[f"layers_{i}"])):
      assert np.array_equal(a, b)
  ids, positions, mask = padded_batch()
  run = lambda c, p: np.asarray(jax.jit(lambda p: make_model(c).apply({"params": p}, ids, positions, mask))(p))
  np.testing.assert_allclose(run(scfg, scanned), run(cfg, params), rtol=1e-6, atol=1e-6)
  assert hf.hf_state_dict_from_params(scanned, scfg, model_type="mixtral").keys() == \
      hf.hf_state_dict_from_params(params, cfg, model_type="mixtral").keys()

  # Sharded as read: the experts split over the 'expert' mesh axis, their 'embed' dimension over 'fsdp'.
  from dpo_jax import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
  _, placed = hf.load_hf_checkpoint(path, mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=True)
  gate = placed["layers"]["mlp"]["gate"]
  assert gate.sharding.shard_shape(gate.shape) == (3, 2, 8, 24)
  for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(scanned)):
    assert np.array_equal(np.asarray(a), b)

  fused_dir = tmp_path / "fused"
  fused_dir.mkdir()
  model.config.save_pretrained(fused_dir)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused_dir / "model.safetensors"),
            metadata={"format": "pt"})
  _, from_fused = hf.load_hf_checkpoint(str(fused_dir), scan_layers=True, moe_impl="dense")
  for a, b in zip(jax.tree.leaves(from_fused), jax.tree.leaves(scanned)):
    assert np.array_equal(a, b)


def _report(out: str) -> dict[str, float]:
  """compare_torch's printed table -> {quantity: max relative difference}."""
  rows = [line.split() for line in out.splitlines()]
  return {r[0]: float(r[2]) for r in rows if len(r) == 3 and not r[0].startswith("quantity")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe_dense_layer"])
def test_compare_torch_on_a_moe_folder(name, tmp_path, capsys):
  """The command-line tool on a saved MoE folder: one DPO step with the load-balancing loss (coefficient 0.02)
  through torch and dpo_jax."""
  from transformers import AutoTokenizer

  from dpo_jax.data import synthetic
  model_type, cls, extra = FAMILIES[name]
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cls(**{**COMMON, "vocab_size": 208}, **extra))
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n.endswith("gate.weight"):
        p.copy_(torch.randn_like(p))
  model.save_pretrained(tmp_path)
  AutoTokenizer.from_pretrained(str(synthetic.TOKENIZER_DIR)).save_pretrained(tmp_path)
  compare_torch.main(["--model", str(tmp_path), "--data", str(synthetic.test_path()), "--pairs", "2",
                      "--max_length", "32", "--max_prompt_length", "12", "--lr", "1e-3"])
  report = _report(capsys.readouterr().out)
  print(name, report)
  groups = {"grads/router", "grads/experts", "params/router", "params/experts", "router_aux"}
  assert groups <= set(report)
  assert ("grads/mlp" in report) == (name == "qwen3_moe_dense_layer")  # its layer 1 is dense
  assert report["logits"] <= 1e-5 and report["loss"] <= 1e-5 and report["router_aux"] <= 1e-5
  for key, rel in report.items():
    if key.startswith("grads/"):
      assert rel <= 1e-4, (key, rel)


def test_a_random_init_moe_exports_as_mixtral(tmp_path):
  """A cfg with no checkpoint behind it (the trainer's `:moe` run with hf.export) picks the family that expresses
  it: 'llama' for a dense cfg, 'mixtral' for a Mixtral-shaped MoE."""
  cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_layers=2, num_heads=4, num_kv_heads=2,
                    num_experts=4)
  assert families.family_for(dataclasses.replace(cfg, num_experts=0)) == "llama"
  assert families.family_for(cfg) == "mixtral"
  params = jax.device_get(init_params(cfg, jax.random.key(0)))
  hf.save_hf_checkpoint(params, cfg, str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["architectures"] == ["MixtralForCausalLM"]
