"""Hugging Face `*ForSequenceClassification` reward models (Llama, Mistral, Qwen2, Qwen3) as scalar-head models.

An interop module (wing: interop): it reads a local folder written by `save_pretrained` into the project's
scalar-head format, `{"backbone": decoder params, "head": {"kernel": [D] fp32, "bias": [] fp32}}` (`rl_step`'s
value / reward models), and scores the way transformers does:

    cfg, params, info = load_sequence_classifier("rm_dir", mesh=mesh, rules=rules)
    scores = score_texts(classifier_model(cfg), params, info, AutoTokenizer.from_pretrained("rm_dir"), texts)

transformers' classifier is the decoder, then `score` (a bias-free Linear `[num_labels, D]`) on every position,
read at one column per row (`last_token_index`). Only that column is computed here: the head is a dot product
with `score.weight[0]` after the final norm, so the scores equal transformers' logits[:, 0] up to float rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import rl_step
from dpo_jax.interop.hf import checkpoints, families
from dpo_jax.model import ModelConfig, make_model

#: The families whose classifier is transformers' GenericForSequenceClassification over a decoder we convert.
CLASSIFIER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_SCORE = "score.weight"  # the classifier head: nn.Linear(D, num_labels, bias=False)


@dataclasses.dataclass(frozen=True)
class ClassifierInfo:
  """What the scores need besides the params, read from the checkpoint's config.json."""
  #: The HF family (one of `CLASSIFIER_MODEL_TYPES`).
  model_type: str
  #: The HF class, e.g. ``LlamaForSequenceClassification``.
  architecture: str
  #: Outputs of the head; always 1 for a loaded reward model.
  num_labels: int
  #: The config's pad id, which picks the column transformers reads (`last_token_index`); None when the config has
  #: none (transformers then reads the last column, and refuses batches of more than one row).
  pad_token_id: int | None


def classifier_model(cfg: ModelConfig, shard: Any = None) -> Any:
  """The decoder `classifier_scores` and `score_texts` run: ``make_model(cfg, shard)`` for the loaded config
  (its LM head is never called; the scores read the final hidden states)."""
  return make_model(cfg, shard)


def load_sequence_classifier(path: str, *, mesh: Any = None, rules: Any = None,
                             **config_overrides: Any) -> tuple[ModelConfig, dict[str, Any], ClassifierInfo]:
  """``(ModelConfig, params, info)`` from a local ``*ForSequenceClassification`` folder with one label.

  The decoder tensors (``model.*``) are converted exactly as `load_hf_checkpoint` converts a causal LM's;
  ``score.weight`` `[1, D]` becomes the head ``{"kernel": score.weight[0], "bias": 0.0}``, kernel `[D]` and bias
  `[]` in fp32 (transformers' score has no bias).

  Args:
    path: folder with ``config.json`` and safetensors weights, as written by ``save_pretrained``; read offline.
    mesh, rules: when given (both), the backbone is placed straight into its NamedShardings (as
      `load_hf_checkpoint`) and the head replicated on the mesh. Without them params are host numpy arrays.
    config_overrides: ModelConfig fields (param_dtype, scan_layers, ...), as in `model_config_from_hf`.

  Returns:
    The backbone's ModelConfig (``tie_embeddings=True``: it has no LM head), the scalar-head params
    ``{"backbone": ..., "head": ...}`` and a `ClassifierInfo`.

  Raises:
    FileNotFoundError: no folder, config.json or weights.
    ValueError: the folder is not a ``*ForSequenceClassification`` checkpoint (e.g. a causal LM), its
      ``num_labels`` is not 1, its ``model_type`` is not one of `CLASSIFIER_MODEL_TYPES`, or its tensors do not
      match its config.
  """
  import transformers

  checkpoints.check_folder(path, mesh, rules, caller="load_sequence_classifier")
  hf_config = transformers.AutoConfig.from_pretrained(path)
  info = _classifier_info(path, hf_config)
  if not config_overrides.get("tie_embeddings", True):
    raise ValueError(f"load_sequence_classifier({path!r}): tie_embeddings=False asks for an LM head, which a "
                     "classifier checkpoint does not have; leave tie_embeddings out.")
  # A classifier has no lm_head: tying makes the backbone's config ask for none (the embedding would serve as
  # the head, but the scores read the final hidden states only, so no LM head is ever used).
  cfg = families.model_config_from_hf(hf_config, **{**config_overrides, "tie_embeddings": True})
  files = checkpoints.weight_map(path)
  if _SCORE not in files:
    raise ValueError(f"hf reward model {path}: no {_SCORE} among its tensors, though config.json names "
                     f"{info.architecture}; the weights are not a sequence classifier's. Re-save the model with "
                     "save_pretrained.")
  backbone = checkpoints.read_params(path, cfg, info.model_type, {k: v for k, v in files.items() if k != _SCORE},
                                     mesh=mesh, rules=rules)
  score = checkpoints.read_tensor(files, _SCORE)
  if score.shape != (1, cfg.hidden_size):
    raise ValueError(f"hf reward model {path}: {_SCORE} has shape {score.shape}; a one-label head on "
                     f"hidden_size={cfg.hidden_size} is (1, {cfg.hidden_size}). The weights do not match config.json.")
  head = {"kernel": np.array(score[0], np.float32), "bias": np.zeros((), np.float32)}
  if mesh is not None:
    replicated = NamedSharding(mesh, PartitionSpec())  # [D] is small; rl_step.scalar_head_shardings does the same
    head = jax.tree.map(lambda x: jax.device_put(x, replicated), head)
  return cfg, {"backbone": backbone, "head": head}, info


def _classifier_info(path: str, hf_config: Any) -> ClassifierInfo:
  """The config's classifier facts, or one ValueError naming the folder, what is wrong and the fix."""
  architectures = list(getattr(hf_config, "architectures", None) or [])
  classifiers = [a for a in architectures if a.endswith("ForSequenceClassification")]
  if not classifiers:
    policy = (" Load a causal LM (a policy) with load_hf_checkpoint, or name it in config.hf.model_path."
              if any(a.endswith("ForCausalLM") for a in architectures) else "")
    raise ValueError(f"hf reward model {path}: config.json's architectures={architectures}, not a "
                     "*ForSequenceClassification; a reward model folder is written by "
                     f"AutoModelForSequenceClassification(..., num_labels=1).save_pretrained.{policy}")
  model_type = getattr(hf_config, "model_type", None)
  if model_type not in CLASSIFIER_MODEL_TYPES:
    raise ValueError(f"hf reward model {path}: model_type={model_type!r} is not supported; reward models load for "
                     f"{list(CLASSIFIER_MODEL_TYPES)}. Use a reward model of one of those families, or score this "
                     f"one with transformers' own {classifiers[0]}.")
  num_labels = int(hf_config.num_labels)
  if num_labels != 1:
    raise ValueError(f"hf reward model {path}: num_labels={num_labels}, but a reward model has one score "
                     "(num_labels=1); this is a multi-class classifier. Use a one-label checkpoint, or re-save this "
                     "one with the one score row you mean.")
  pad = hf_config.get_text_config().pad_token_id  # what transformers' forward reads
  return ClassifierInfo(model_type=model_type, architecture=classifiers[0], num_labels=num_labels,
                        pad_token_id=None if pad is None else int(pad))


def last_token_index(input_ids_BxT: jax.Array, pad_token_id: int | None) -> jax.Array:
  """The column `[B]` int32 that transformers' sequence classifier reads in each row of `input_ids` `[B, T]`.

  transformers 5 (``GenericForSequenceClassification.forward``): with a pad id, the rightmost token that is not
  the pad id, computed as ``argmax(arange(T) * (ids != pad))``. So:

  - left and right padding both work (only the ids matter, never the attention mask);
  - when the pad id is also the EOS id, a trailing EOS counts as padding and is skipped: the row is read at the
    token before it (and so at any run of trailing EOS);
  - a row that is all pads (or whose only non-pad token is column 0) gives column 0, argmax's first maximum.

  With ``pad_token_id=None``, the last column ``T - 1`` for every row (transformers then refuses batches of more
  than one row; padded rows need `classifier_scores`, which reads the attention mask instead).
  """
  b, t = input_ids_BxT.shape
  if pad_token_id is None:
    return jnp.full((b,), t - 1, jnp.int32)
  real_BxT = (input_ids_BxT != pad_token_id).astype(jnp.int32)
  return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * real_BxT, axis=-1).astype(jnp.int32)


def classifier_scores(model: Any, params: Any, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array,
                      pad_token_id: int | None) -> jax.Array:
  """The reward of each row `[B]` fp32, as transformers' ``model(input_ids, attention_mask).logits[:, 0]``.

  Args:
    model: `classifier_model` of the loaded config.
    params: scalar-head params from `load_sequence_classifier`.
    input_ids_BxT: token ids `[B, T]`, right-padded with ``pad_token_id``.
    attention_mask_BxT: 1 on real tokens, 0 on padding `[B, T]`.
    pad_token_id: ``info.pad_token_id``.

  Rows must be right-padded: positions are ``0 .. T-1`` in every row, as transformers uses when given no
  ``position_ids``, so only with padding on the right does a row's first real token sit at position 0 and the row
  score as its text alone would. The column read is `last_token_index` (so the padding must hold the pad id). With
  ``pad_token_id=None`` it is each row's last real token, ``sum(mask) - 1``: transformers' last column for an
  unpadded row, extended to padded batches, which transformers refuses without a pad id.
  """
  if pad_token_id is None:
    column_B = jnp.maximum(jnp.sum(attention_mask_BxT > 0, axis=1) - 1, 0).astype(jnp.int32)
  else:
    column_B = last_token_index(input_ids_BxT, pad_token_id)
  positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1], dtype=jnp.int32), input_ids_BxT.shape)
  # Padding feeds id 0: a pad id past the embedding table (a tokenizer's [PAD] added without resizing the model)
  # looks up NaN, and attention's exact-0 weights on masked values keep a NaN. Real tokens never see padding, so
  # the id there changes no score.
  ids_BxT = jnp.where(attention_mask_BxT > 0, input_ids_BxT, 0)
  seq = {"input_ids": ids_BxT, "positions": positions_BxT, "attention_mask": attention_mask_BxT}
  return rl_step.scores_at(model, params, seq, column_B)


# One compiled program per (model, pad id, batch shape), shared by every score_texts call.
_classifier_scores_jit = jax.jit(classifier_scores, static_argnums=(0, 4))


def _pad_id(info: ClassifierInfo, tokenizer: Any) -> int:
  """The id to pad with. The config's pad id when there is one: the column rule skips exactly those ids, so
  padding never moves the column. Without it the column comes from the mask, and any id would do."""
  if info.pad_token_id is not None:
    return info.pad_token_id
  return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0


def _width(longest: int, max_length: int | None) -> int:
  """Columns of a batch: max_length when given (one program for every batch), else the longest row rounded up to
  a multiple of 8 (a few programs for any mix of lengths)."""
  return max_length if max_length is not None else -(-longest // 8) * 8


def score_texts(model: Any, params: Any, info: ClassifierInfo, tokenizer: Any, texts: Sequence[str], *,
                batch_size: int = 32, max_length: int | None = None) -> np.ndarray:
  """The reward model's score of each text `[len(texts)]` float64, as transformers scores each text alone.

  Each text is tokenized by the reward model's own tokenizer as ``tokenizer(texts)`` does (its special tokens,
  e.g. a BOS, added), cut to ``max_length`` tokens when given (``truncation=True``: the tokenizer's
  ``truncation_side``, right unless it says otherwise, and special tokens kept). Rows are right-padded with
  ``info.pad_token_id`` (else the tokenizer's pad id, else 0) in batches of ``batch_size`` rows and
  ``max_length`` columns (without it, the batch's longest row rounded up to a multiple of 8) and scored by one
  jitted `classifier_scores`; the last batch is filled with empty rows, whose scores are dropped.

  A score equals ``model(ids[None]).logits[0, 0]`` of transformers' classifier on the text's ids alone, including
  its pad rule: when the config's pad id is also a token the text ends with (pad == EOS), that token is skipped.
  Raises ValueError for a text with no tokens (there is no token to read the score at).
  """
  if batch_size < 1:
    raise ValueError(f"score_texts: batch_size={batch_size}; pass a positive number of rows per forward.")
  if max_length is not None and max_length < 1:
    raise ValueError(f"score_texts: max_length={max_length}; pass a positive token count, or None for no cut.")
  texts = list(texts)
  if not texts:
    return np.zeros((0,), np.float64)
  kwargs = {} if max_length is None else dict(truncation=True, max_length=max_length)
  rows = tokenizer(texts, **kwargs)["input_ids"]
  empty = [i for i, r in enumerate(rows) if not r]
  if empty:
    raise ValueError(f"score_texts: texts {empty[:10]} tokenize to no tokens, so there is no token to score; drop "
                     "them or give them content.")
  longest = max(len(r) for r in rows)
  if max_length is not None and longest > max_length:  # the tokenizer could not cut them (special tokens alone)
    raise ValueError(f"score_texts: max_length={max_length}, but the tokenizer returned rows of {longest} tokens "
                     "even when truncating; raise max_length to at least that.")
  pad = _pad_id(info, tokenizer)
  n_rows = min(batch_size, len(rows))
  out = np.empty((len(rows),), np.float64)
  for start in range(0, len(rows), n_rows):
    chunk = rows[start:start + n_rows]
    width = _width(max(len(r) for r in chunk), max_length)
    ids_BxT = np.full((n_rows, width), pad, np.int32)
    mask_BxT = np.zeros((n_rows, width), np.int32)
    for i, r in enumerate(chunk):
      ids_BxT[i, :len(r)] = r
      mask_BxT[i, :len(r)] = 1
    scores_B = _classifier_scores_jit(model, params, ids_BxT, mask_BxT, info.pad_token_id)
    out[start:start + len(chunk)] = np.asarray(scores_B, np.float64)[:len(chunk)]
  return out
