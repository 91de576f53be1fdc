"""HF checkpoint folders (`dpo_jax.interop.hf.load_hf_checkpoint` / `save_hf_checkpoint`): safetensors single-file and
sharded loads, loading straight onto a mesh, export that transformers loads back, bf16 checkpoints, errors.

Every model is a tiny random one built locally with torch; nothing is downloaded.
"""

import os

# Before transformers is imported: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch_models import random_hf_model  # noqa: E402

from configs.default import SHARDING_RULES  # noqa: E402
from dpo_jax import sharding, step  # noqa: E402
from dpo_jax.interop import hf
from dpo_jax.model import ModelConfig, abstract_params, make_model  # noqa: E402
from paths import REPO_ROOT  # noqa: E402

TOKENIZER_DIR = pathlib.Path(REPO_ROOT) / "dpo_jax" / "data" / "synthetic" / "tokenizer"

# Every sharded dimension (vocab, hidden, intermediate, heads, kv heads) divides by 2 for the 2x2x2 mesh.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=500000.0, attention_bias=True, mlp_bias=True)),
    "qwen2": (transformers.Qwen2Config, {}),
}
B, T = 2, 8


def _torch_model(family: str, seed: int = 0):
  cls, extra = FAMILIES[family]
  return random_hf_model(cls(**TINY, **extra, attn_implementation="eager"), seed)


def _ids():
  return np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(B, T)).astype(np.int32)


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()


def _jax_logits(params, cfg, ids) -> np.ndarray:
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape)
  return np.asarray(make_model(cfg).apply({"params": params}, ids, positions, np.ones_like(ids)))


def _assert_logits_close(ours, theirs, label):
  max_abs = float(np.max(np.abs(ours - theirs)))
  max_rel = max_abs / float(np.max(np.abs(theirs)))
  print(f"\n{label}: max|diff|={max_abs:.3e}  max|diff|/max|ref|={max_rel:.3e}")
  assert max_rel <= 1e-4, f"{label}: relative logit error {max_rel:.3e}"


def _leaves(tree):
  return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def _assert_trees_bitwise_equal(got, want):
  got, want = _leaves(got), _leaves(want)
  assert sorted(got, key=str) == sorted(want, key=str)
  for path, w in want.items():
    g, w = np.asarray(got[path]), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
    assert g.tobytes() == w.tobytes(), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """family -> (torch model, {'single': dir, 'sharded': dir}), each saved once with save_pretrained."""
  out = {}
  for family in FAMILIES:
    model = _torch_model(family)
    dirs = {"single": tmp_path_factory.mktemp(f"{family}_single"),
            "sharded": tmp_path_factory.mktemp(f"{family}_sharded")}
    model.save_pretrained(dirs["single"])
    model.save_pretrained(dirs["sharded"], max_shard_size="20KB")
    out[family] = (model, {k: str(v) for k, v in dirs.items()})
  return out


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_equals_state_dict_conversion(saved, family, layout):
  model, dirs = saved[family]
  path = dirs[layout]
  if layout == "sharded":  # the test means what it says: several shards behind an index
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
      assert len(set(json.load(f)["weight_map"].values())) > 1
  else:
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
  cfg, params = hf.load_hf_checkpoint(path)
  assert cfg == hf.model_config_from_hf(model.config)
  _assert_trees_bitwise_equal(params, hf.params_from_hf_state_dict(model.state_dict(), cfg))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))  # no mesh: host arrays
  ids = _ids()
  _assert_logits_close(_jax_logits(params, cfg, ids), _torch_logits(model, ids), f"{family} {layout}")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_load_onto_mesh(saved, scan_layers):
  model, dirs = saved["qwen2"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg, params = hf.load_hf_checkpoint(dirs["sharded"], mesh=mesh, rules=SHARDING_RULES, scan_layers=scan_layers)
  assert cfg.scan_layers == scan_layers
  expected = _leaves(step.param_shardings(cfg, mesh, SHARDING_RULES))
  got = _leaves(params)
  assert sorted(got, key=str) == sorted(expected, key=str)
  for path, x in got.items():
    assert isinstance(x, jax.Array) and x.sharding == expected[path], jax.tree_util.keystr(path)
  # Something is actually split (not everything replicated): the embedding is [vocab/tensor, embed/fsdp].
  embedding = params["embed"]["embedding"]
  assert embedding.addressable_shards[0].data.shape == (TINY["vocab_size"] // 2, TINY["hidden_size"] // 2)
  _assert_trees_bitwise_equal(params, hf.params_from_hf_state_dict(model.state_dict(), cfg))


def _random_params(cfg: ModelConfig, seed: int = 0):
  """Random numpy params of the model's exact tree (shapes from `abstract_params`, no init compile): every
  weight and bias ~ 0.1 N(0, 1), norm scales ~ 1 + 0.2 N(0, 1), so none is trivial."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    is_norm = "norm" in jax.tree_util.keystr(path)
    return ((1.0 if is_norm else 0.0) + (0.2 if is_norm else 0.1) * rng.standard_normal(x.shape)).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


EXPORTS = {
    # name -> (model_type, ModelConfig fields beyond the shared ones, max_shard_bytes)
    "llama_biases_scanned_sharded": ("llama", dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                                                   rope_theta=500000.0, scan_layers=True), 20_000),
    "qwen2_tied": ("qwen2", dict(qkv_bias=True, tie_embeddings=True), None),
    "mistral_head_dim32": ("mistral", dict(head_dim=32), None),
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_loads_in_transformers(tmp_path, name):
  model_type, fields, max_shard_bytes = EXPORTS[name]
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, rms_norm_eps=1e-5, **fields)
  params = _random_params(cfg)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
  hf.save_hf_checkpoint(params, cfg, str(tmp_path), model_type=model_type, tokenizer=tokenizer,
                        max_shard_bytes=max_shard_bytes)
  assert os.path.isfile(tmp_path / ("model.safetensors.index.json" if max_shard_bytes else "model.safetensors"))

  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert theirs.config.model_type == model_type
  want = hf.hf_state_dict_from_params(params, cfg, model_type=model_type)
  got = {k: v.numpy() for k, v in theirs.state_dict().items()}
  if cfg.tie_embeddings:  # torch lists the tied head under both names
    assert np.array_equal(got.pop("lm_head.weight"), got["model.embed_tokens.weight"])
  assert sorted(got) == sorted(want)
  for k, w in want.items():
    assert got[k].dtype == w.dtype and got[k].tobytes() == w.tobytes(), k
  ids = _ids()
  _assert_logits_close(_torch_logits(theirs, ids), _jax_logits(params, cfg, ids), f"export {name}")

  # The folder is also a complete input for our own loader and for AutoTokenizer.
  cfg_back, params_back = hf.load_hf_checkpoint(str(tmp_path), scan_layers=cfg.scan_layers)
  # HF configs always carry head_dim; ours may leave it implied (None).
  assert cfg_back.resolved_head_dim == cfg.resolved_head_dim
  assert dataclasses.replace(cfg_back, head_dim=None) == dataclasses.replace(cfg, head_dim=None)
  _assert_trees_bitwise_equal(params_back, params)
  tok_back = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert tok_back.get_vocab() == tokenizer.get_vocab()


def test_bf16_checkpoint_loads_upcast(tmp_path):
  model = _torch_model("qwen2").to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_hf_checkpoint(str(tmp_path))
  assert cfg.param_dtype == "float32"
  upcast = {k: v.float() for k, v in model.state_dict().items()}
  _assert_trees_bitwise_equal(params, hf.params_from_hf_state_dict(upcast, cfg))
  # Loading as bf16 keeps the stored bits.
  cfg16, params16 = hf.load_hf_checkpoint(str(tmp_path), param_dtype="bfloat16")
  assert {x.dtype.name for x in jax.tree.leaves(params16)} == {"bfloat16"}
  _assert_trees_bitwise_equal(jax.tree.map(lambda x: x.astype(np.float32), params16), params)


def test_missing_folder_is_named(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=r"nope: no such folder.*config\.json"):
    hf.load_hf_checkpoint(str(missing))


def test_folder_without_weights_or_config_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no config\.json"):
    hf.load_hf_checkpoint(str(tmp_path))
  FAMILIES["llama"][0](**TINY).save_pretrained(tmp_path)  # config.json only
  with pytest.raises(FileNotFoundError, match=r"no weights; expected model\.safetensors or "
                                              r"model\.safetensors\.index\.json"):
    hf.load_hf_checkpoint(str(tmp_path))


def test_checkpoint_that_does_not_match_its_config_is_named(saved, tmp_path):
  model, _ = saved["llama"]
  model.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.2\..*"):
    hf.load_hf_checkpoint(str(tmp_path))


def test_save_with_given_hf_config(saved, tmp_path):
  model, dirs = saved["qwen2"]
  cfg, params = hf.load_hf_checkpoint(dirs["single"])
  hf.save_hf_checkpoint(params, cfg, str(tmp_path), hf_config=model.config)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  assert type(theirs).__name__ == "Qwen2ForCausalLM"
  for k, v in model.state_dict().items():
    assert torch.equal(theirs.state_dict()[k], v), k
  with pytest.raises(ValueError, match=r"hf_config disagrees with cfg.*'rms_norm_eps'"):
    hf.save_hf_checkpoint(params, dataclasses.replace(cfg, rms_norm_eps=0.5), str(tmp_path), hf_config=model.config)


# name -> (HF config class, extra kwargs) for the folder round trip; together every family and RoPE scaling.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
ROUND_TRIPS = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=500000.0, attention_bias=True, mlp_bias=True)),
    "llama_rope_llama3": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    "llama_rope_linear": (transformers.LlamaConfig,
                          dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral": (transformers.MistralConfig, dict(head_dim=32, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, attention_bias=True)),  # q/k norms, biases on q/k/v/o
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),  # GeGLU, sqrt(D) embeddings, (1 + w) norms, tied
}
ROUND_TRIP_T = 40  # past the 32-token original context of LLAMA3_ROPE, so the scaled frequencies matter


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_folder_round_trip_reproduces_the_torch_model(tmp_path, name):
  """torch model -> save_pretrained -> load_hf_checkpoint -> save_hf_checkpoint -> from_pretrained: the same
  tensors bit for bit, the same config, the same logits."""
  cls, extra = ROUND_TRIPS[name]
  model = random_hf_model(cls(**TINY, **extra, attn_implementation="eager"), seed=1)
  model.save_pretrained(tmp_path / "in")
  cfg, params = hf.load_hf_checkpoint(str(tmp_path / "in"))
  hf.save_hf_checkpoint(params, cfg, str(tmp_path / "out"), model_type=model.config.model_type)

  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
  assert type(theirs) is type(model)
  cfg_back = hf.load_hf_checkpoint(str(tmp_path / "out"))[0]  # head_dim: always explicit in exported configs
  assert cfg_back.resolved_head_dim == cfg.resolved_head_dim
  assert dataclasses.replace(cfg_back, head_dim=None) == dataclasses.replace(cfg, head_dim=None)
  got, want = theirs.state_dict(), model.state_dict()  # tied heads appear under both names in both
  assert sorted(got) == sorted(want)
  for k, w in want.items():
    assert got[k].dtype == w.dtype and got[k].numpy().tobytes() == w.numpy().tobytes(), k
  ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(B, ROUND_TRIP_T))
  ours, ref = _torch_logits(theirs.eval(), ids), _torch_logits(model, ids)
  max_abs = float(np.max(np.abs(ours - ref)))
  print(f"\nround trip {name}: max|diff|={max_abs:.3e}  max|logit|={float(np.max(np.abs(ref))):.3e}")
  assert max_abs <= 1e-6 * float(np.max(np.abs(ref))), name


def _cfg(**fields) -> ModelConfig:
  return ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, **fields)


GEMMA_LIKE = dict(mlp_activation="gelu_tanh", embed_scale=True, norm_offset=1.0)
INEXPRESSIBLE = [
    # (cfg fields, model_type, error pattern: the offending fields and the fix)
    (GEMMA_LIKE, "llama", r"'llama' cannot express cfg's \{'mlp_activation': 'gelu_tanh', 'embed_scale': True, "
                          r"'norm_offset': 1\.0\}.*Use model_type='gemma'"),
    (dict(qk_norm=True), "qwen2", r"'qwen2' cannot express cfg's \{'qk_norm': True, 'qkv_bias': False\}.*"
                                  r"Use model_type='qwen3'"),
    (dict(), "qwen3", r"'qwen3' cannot express cfg's \{'qk_norm': False\}.*Use model_type='llama'"),
    (dict(GEMMA_LIKE, mlp_bias=True), "gemma", r"\{'mlp_bias': True\}.*No supported family expresses this cfg"),
    (dict(qk_norm=True, qkv_bias=True), "qwen3",
     r"\{'qkv_bias': True, 'attn_out_bias': False\}.*qkv_bias == attn_out_bias .*No supported family expresses"),
    (dict(mlp_bias=True), "mistral", r"'mistral' cannot express cfg's \{'mlp_bias': True\}.*Use model_type='llama'"),
]


@pytest.mark.parametrize("fields, model_type, pattern", INEXPRESSIBLE)
def test_export_refuses_what_the_family_cannot_express(tmp_path, fields, model_type, pattern):
  cfg = _cfg(**fields)
  with pytest.raises(ValueError, match=pattern):
    hf.save_hf_checkpoint(_random_params(cfg), cfg, str(tmp_path), model_type=model_type)
  assert not os.listdir(tmp_path)  # refused before writing anything


def test_bin_only_folder_says_how_to_convert(tmp_path):
  FAMILIES["llama"][0](**TINY).save_pretrained(tmp_path)  # config.json only
  torch.save({}, tmp_path / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match=r"no weights.*\['pytorch_model\.bin'\], which this loader does not "
                                              r"read.*save_pretrained\(new_path\).*safetensors"):
    hf.load_hf_checkpoint(str(tmp_path))
