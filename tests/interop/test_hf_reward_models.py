"""HF reward models (`dpo_jax.interop.hf.reward_models`): `*ForSequenceClassification` folders loaded as scalar-head
params and scored at parity with transformers' torch classifiers; transformers' column rule; refusals; a mesh load.

Every model is a tiny random fp32 one built locally; nothing is downloaded.
"""

import os

# Before transformers is imported: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch_models import random_hf_model  # noqa: E402

from configs.default import SHARDING_RULES  # noqa: E402
from dpo_jax import sharding, step  # noqa: E402
from dpo_jax.data import synthetic  # noqa: E402
from dpo_jax.interop import hf  # noqa: E402
from dpo_jax.interop.hf import reward_models  # noqa: E402
from dpo_jax.model import make_model  # noqa: E402

EOS = 1  # the synthetic tokenizer's <eos>; the classifiers' pad id too, the common reward-model setup
# vocab >= the synthetic tokenizer's 201 ids; every sharded dimension divides by 2 for the 2x2x2 mesh.
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=EOS, eos_token_id=EOS)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
}
_scores_jit = jax.jit(reward_models.classifier_scores, static_argnums=(0, 4))


def _classifier(cls, seed: int = 0, **kwargs):
  """Random fp32 classifier (`random_hf_model`: norms and biases randomised, the score row of unit scale)."""
  config = cls(**{**TINY, "num_labels": 1, **kwargs}, attn_implementation="eager")
  return random_hf_model(config, seed, auto_class=transformers.AutoModelForSequenceClassification)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """family -> (torch classifier, its save_pretrained folder)."""
  out = {}
  for family, (cls, extra) in FAMILIES.items():
    model = _classifier(cls, **extra)
    path = tmp_path_factory.mktemp(f"rm_{family}")
    model.save_pretrained(path)
    out[family] = (model, str(path))
  return out


def _torch_scores(model, ids, mask=None) -> np.ndarray:
  with torch.no_grad():
    mask = None if mask is None else torch.from_numpy(mask).long()
    return model(torch.from_numpy(np.asarray(ids)).long(), attention_mask=mask).logits[:, 0].numpy()


def _padded_batch():
  """Right-padded rows of lengths 12, 9, 5, 1 padded with EOS (= pad); row 0 ends in a real EOS (mask 1) and row 2
  has one inside, so transformers' rule reads row 0 at column 10 and row 2 after its inner EOS."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, TINY["vocab_size"], size=(4, 12)).astype(np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate((12, 9, 5, 1)):
    ids[row, n:] = EOS
    mask[row, :n] = 1
  ids[0, -1] = EOS
  ids[2, 2] = EOS
  return ids, mask


def _max_rel_error(ours, theirs) -> float:
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scores_match_torch(saved, family):
  model, path = saved[family]
  cfg, params, info = hf.load_sequence_classifier(path)
  assert (info.model_type, info.num_labels, info.pad_token_id) == (family, 1, EOS)
  assert info.pad_token_id == EOS and info.architecture == model.config.architectures[0]
  assert cfg.tie_embeddings and "lm_head" not in params["backbone"]
  np.testing.assert_array_equal(params["head"]["kernel"], model.score.weight[0].detach().numpy())
  assert params["head"]["bias"].shape == () and params["head"]["bias"] == 0
  ids, mask = _padded_batch()
  ours = np.asarray(_scores_jit(reward_models.classifier_model(cfg), params, ids, mask, info.pad_token_id))
  theirs = _torch_scores(model, ids, mask)
  err = _max_rel_error(ours, theirs)
  print(f"\n{family}: max|ours - torch| / max|torch| = {err:.2e}")  # measured: 2e-7 .. 5e-7
  assert err <= 1e-5, f"{family}: reward differs from transformers' by {err:.2e} (relative)"


def _transformers_columns(ids, pad_token_id) -> np.ndarray:
  """The column transformers' classifier reads in each row: its score layer is hooked to output the column index,
  so `logits[:, 0]` is the index itself. Without a pad id transformers takes one row at a time."""
  model = _classifier(transformers.LlamaConfig, num_hidden_layers=1, pad_token_id=pad_token_id)
  model.score.register_forward_hook(
      lambda module, args, out: torch.arange(out.shape[1], dtype=out.dtype).expand(out.shape[:2])[..., None])
  rows = [ids] if pad_token_id is not None else [row[None] for row in ids]
  return np.concatenate([_torch_scores(model, r) for r in rows]).astype(np.int32)


@pytest.mark.parametrize("pad_token_id", [0, EOS, None])
def test_last_token_index_is_transformers_rule(pad_token_id):
  ids = np.array([[5, 6, 7, 1, 0, 0],    # pad 0: the EOS (1) is a real token, read
                  [5, 6, 7, 1, 1, 1],    # pad == eos: trailing EOS are padding, skipped
                  [5, 1, 7, 1, 1, 1],    # ... but an EOS inside stays real
                  [0, 0, 5, 6, 7, 8],    # left padding
                  [0, 0, 0, 0, 0, 0],    # all pads: column 0
                  [1, 1, 1, 1, 1, 1],
                  [5, 0, 0, 0, 0, 0]], np.int32)  # only column 0 is real: also 0
  want = _transformers_columns(ids, pad_token_id)
  expected = {0: [3, 5, 5, 5, 0, 5, 0], EOS: [5, 2, 2, 5, 5, 0, 5], None: [5] * 7}[pad_token_id]
  np.testing.assert_array_equal(want, expected)  # the rule as documented, so a transformers change shows here
  got = jax.jit(reward_models.last_token_index, static_argnums=1)(ids, pad_token_id)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)


def _texts():
  with open(synthetic.DATA_DIR / "test.jsonl") as f:
    rows = [json.loads(line) for line, _ in zip(f, range(5))]
  texts = [f"{r['prompt']} {r['chosen']}" for r in rows]
  texts[1] += " <eos>"  # pad == eos: transformers skips a trailing EOS, so the score is read before it
  texts[3] += " <eos> <eos>"
  return texts


@pytest.mark.parametrize("pad_token_id,max_length", [(EOS, None), (None, 8)])
def test_score_texts_matches_torch_one_text_at_a_time(saved, pad_token_id, max_length):
  model, path = saved["llama"]
  cfg, params, info = hf.load_sequence_classifier(path)
  model.config.pad_token_id = pad_token_id  # the forward reads it on every call
  info = dataclasses.replace(info, pad_token_id=pad_token_id)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(synthetic.TOKENIZER_DIR))
  texts = _texts()
  assert [tokenizer(t)["input_ids"][-1] for t in texts[:4]] == [4, EOS, 4, EOS]
  try:
    ours = hf.score_texts(make_model(cfg), params, info, tokenizer, texts, batch_size=2, max_length=max_length)
    kwargs = {} if max_length is None else dict(truncation=True, max_length=max_length)
    theirs = np.array([_torch_scores(model, [tokenizer(t, **kwargs)["input_ids"]])[0] for t in texts])
  finally:
    model.config.pad_token_id = EOS
  assert ours.shape == (len(texts),) and ours.dtype == np.float64
  err = _max_rel_error(ours, theirs)
  print(f"\nscore_texts pad={pad_token_id} max_length={max_length}: max rel error {err:.2e}")
  assert err <= 1e-5, f"score_texts differs from transformers' one-text scores by {err:.2e} (relative)"


def test_refuses_what_is_not_a_one_label_classifier(saved, tmp_path):
  small = dict(num_hidden_layers=1)
  _classifier(transformers.LlamaConfig, **small, num_labels=2).save_pretrained(tmp_path / "two")
  with pytest.raises(ValueError, match=r"two: num_labels=2, but a reward model has one score"):
    hf.load_sequence_classifier(str(tmp_path / "two"))
  lm = random_hf_model(transformers.LlamaConfig(**{**TINY, **small}))
  lm.save_pretrained(tmp_path / "lm")
  with pytest.raises(ValueError, match=r"lm: config.json's architectures=\['LlamaForCausalLM'\], not a "
                                       r"\*ForSequenceClassification.*Load a causal LM \(a policy\) with "
                                       r"load_hf_checkpoint"):
    hf.load_sequence_classifier(str(tmp_path / "lm"))
  gemma = transformers.GemmaConfig(**{**TINY, **small}, head_dim=8, num_labels=1)
  transformers.AutoModelForSequenceClassification.from_config(gemma).save_pretrained(tmp_path / "gemma")
  with pytest.raises(ValueError, match=r"model_type='gemma' is not supported; reward models load for \['llama'"):
    hf.load_sequence_classifier(str(tmp_path / "gemma"))
  with pytest.raises(ValueError, match="tie_embeddings=False asks for an LM head"):
    hf.load_sequence_classifier(saved["llama"][1], tie_embeddings=False)


def _leaves(tree):
  return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def test_load_onto_mesh_scores_as_unsharded(saved):
  _, path = saved["qwen2"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg, params, info = hf.load_sequence_classifier(path, mesh=mesh, rules=SHARDING_RULES)
  expected = _leaves(step.param_shardings(cfg, mesh, SHARDING_RULES))
  got = _leaves(params["backbone"])
  assert sorted(got, key=str) == sorted(expected, key=str)
  for key, x in got.items():
    assert x.sharding == expected[key], jax.tree_util.keystr(key)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params["head"]))
  _, host_params, _ = hf.load_sequence_classifier(path)
  ids, mask = _padded_batch()
  sharded = np.asarray(_scores_jit(make_model(cfg), params, ids, mask, info.pad_token_id))
  np.testing.assert_allclose(sharded, _scores_jit(make_model(cfg), host_params, ids, mask, info.pad_token_id),
                             rtol=1e-5, atol=1e-6)
  # score_texts on sharded params (host token rows, placed by jit), as the online judge runs it.
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(synthetic.TOKENIZER_DIR))
  texts = _texts()[:3]
  on_mesh, on_host = (hf.score_texts(make_model(cfg), p, info, tokenizer, texts) for p in (params, host_params))
  np.testing.assert_allclose(on_mesh, on_host, rtol=1e-5, atol=1e-6)


def test_padding_past_the_embedding_table_changes_nothing(saved):
  # Without a config pad id, score_texts pads with the tokenizer's, which may be a [PAD] the model has no row for.
  _, path = saved["llama"]
  cfg, params, _ = hf.load_sequence_classifier(path)
  ids, mask = _padded_batch()
  past = np.where(mask > 0, ids, cfg.vocab_size + 7)
  scores = [np.asarray(_scores_jit(make_model(cfg), params, x, mask, None)) for x in (ids, past)]
  assert np.all(np.isfinite(scores[1]))
  np.testing.assert_array_equal(scores[1], scores[0])


def test_the_online_hf_judge_scores_prompt_plus_response_as_torch_does(saved, tmp_path):
  """judge='hf' (dpo_jax/train/judges.py): the folder's own tokenizer, `prompt + response` texts, `[B, n]` scores."""
  import shutil
  import types
  from dpo_jax.train import judges
  model, path = saved["qwen3"]
  folder = tmp_path / "qwen3_rm"
  shutil.copytree(path, folder)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(synthetic.TOKENIZER_DIR))
  tokenizer.save_pretrained(folder)
  judge = judges.hf_judge(str(folder), types.SimpleNamespace(mesh=None, rules=None), batch_size=3)
  prompts = ["Write a review:", "Your verdict?"]
  responses = [[" a great film", " dull"], [" i loved it", " bad"]]
  ours = judge(prompts, responses)
  theirs = np.array([[_torch_scores(model, [tokenizer(p + r)["input_ids"]])[0] for r in rs]
                     for p, rs in zip(prompts, responses)])
  assert ours.shape == (2, 2) and _max_rel_error(ours, theirs) <= 1e-5
