"""Judges for online DPO: who scores the policy's samples. One interface, four kinds.

    judge = judges.make(config, rt, tokenizer)
    scores_BxN = judge(prompts, responses)           # prompts [B] str, responses [B][n] str -> [B, n] float64
    scores_BxN = judge(prompts, responses, rollout)  # the same, given the samples' tokens (`rollout.Rollout`)

- 'synthetic': r*(x, y) of the embedded task (`data.synthetic.reward`), the ground truth the frontier scores by.
- 'reward_model': a Bradley-Terry reward model trained by `--config.stage=reward_model`
  (dpo_jax/train/reward_model.py), loaded from its folder onto the run's mesh. It shares the policy's tokenizer, so
  it scores the sampled tokens as they are (`rl_step.sequence_scores`, at each response's last real token).
- 'hf': an HF `*ForSequenceClassification` checkpoint (Llama, Mistral, Qwen2, Qwen3) with its own tokenizer:
  each `prompt + response` text is tokenized by it and scored as transformers scores it (the `score` head at the
  last token that is not the pad token; dpo_jax/interop/hf/reward_models.py).
- 'callable': a Python function `module:function` (or `path/to/file.py:function`) for rule-based rewards,
  called as `fn(prompts, completions)` on flat lists of strings (prompt i repeated once per sample), returning
  one number per completion, as TRL's reward functions are.

Prompts and responses are the decoded texts (special tokens skipped; a response without its EOS). A judge must
be deterministic for exact resume: a resumed round is judged again.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import evaluate, model as model_lib, rl_step, rollout as rollout_lib
from dpo_jax.data import preference, synthetic
from dpo_jax.train import reward_model

KINDS = ("synthetic", "reward_model", "hf", "callable")


@dataclasses.dataclass
class Judge:
  """`score(prompts [M], completions [M], rollout or None) -> [M]` behind the `[B, n]` interface."""
  name: str
  score: Callable[[list[str], list[str], Any], Any]

  def __call__(self, prompts: Sequence[str], responses: Sequence[Sequence[str]],
               rollout: rollout_lib.Rollout | None = None) -> np.ndarray:
    """Scores `[B, n]` float64 of responses[i][j] to prompts[i]; `rollout`: the same B * n samples, prompt-major."""
    n = len(responses[0]) if len(responses) else 0
    if len(prompts) != len(responses) or any(len(r) != n for r in responses):
      raise ValueError(f"judge {self.name}: {len(prompts)} prompts need as many lists of n responses each.")
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat = [r for rs in responses for r in rs]
    scores = np.asarray(self.score(flat_prompts, flat, rollout), np.float64).reshape(-1)
    if scores.shape != (len(flat),):
      raise ValueError(f"judge {self.name}: returned {scores.size} scores for {len(flat)} completions; return one "
                       "number per completion.")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
      k = int(bad[0])
      raise ValueError(f"judge {self.name}: score {scores[k]} for response {k % n} of prompt {k // n} "
                       f"({flat[k][:60]!r}); a judge must return finite numbers.")
    return scores.reshape(len(prompts), n)


def host_array(x: Any) -> np.ndarray:
  """A (possibly multi-host, batch-sharded) array in full on this host: every host judges every sample."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def synthetic_judge() -> Judge:
  return Judge("synthetic", lambda prompts, completions, rollout: synthetic.rewards(prompts, completions))


def _batched(fn: Callable[[dict], jax.Array], rows: dict, batch_size: int) -> np.ndarray:
  """fn over `rows` (arrays `[M, ...]`) in batches of `batch_size`, the last padded with row 0 (one compile)."""
  m = next(iter(rows.values())).shape[0]
  size = min(batch_size, m)
  out = []
  for start in range(0, m, size):
    idx = np.arange(start, start + size)
    idx[idx >= m] = 0
    out.append(np.asarray(jax.device_get(fn({k: v[idx] for k, v in rows.items()}))))
  return np.concatenate(out)[:m]


def tokens_of(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
  """Rollout-layout rows (`rollout.layout`) of text pairs in `tokenizer`'s ids: each prompt left-padded, each
  completion then its EOS, tokenized separately as the training data is."""
  pad_id, eos_id = preference.special_ids(tokenizer)
  encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
  prompt_ids, prompt_mask = evaluate.left_pad_prompts([np.asarray(encode(p) or [eos_id]) for p in prompts], pad_id)
  responses = [encode(c) + [eos_id] for c in completions]
  tokens = np.full((len(responses), max(len(r) for r in responses)), pad_id, np.int32)
  for i, r in enumerate(responses):
    tokens[i, :len(r)] = r
  return {k: np.asarray(v) for k, v in rollout_lib.layout(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask),
                                                            jnp.asarray(tokens), eos_id=eos_id).items()}


def reward_model_judge(path: str, rt: Any, tokenizer: Any, batch_size: int) -> Judge:
  """The folder of `--config.stage=reward_model`; scores rollout tokens directly (same tokenizer as the policy)."""
  cfg, params, meta = reward_model.load(path, mesh=rt.mesh, rules=rt.rules)
  if cfg.vocab_size < len(tokenizer):
    raise ValueError(f"config.online.judge_path={path!r}: the reward model has {cfg.vocab_size} embedding rows, fewer "
                     f"than the policy tokenizer's {len(tokenizer)}; it was trained with another tokenizer "
                     f"({meta.get('tokenizer') or 'the embedded one'!r}). Use judge='hf' for a model with its own.")
  model = model_lib.make_model(cfg)
  fn = jax.jit(lambda p, rows: rl_step.sequence_scores(model, p, rows))
  fields = ("input_ids", "positions", "attention_mask", "response_mask")

  def score(prompts, completions, rollout):
    if rollout is not None:
      rows = {k: host_array(getattr(rollout, k)) for k in fields}
    else:
      rows = {k: v for k, v in tokens_of(tokenizer, prompts, completions).items() if k in fields}
    return _batched(lambda b: fn(params, b), rows, batch_size)

  held_out = meta.get("held_out", {})
  print(f"judge: reward model {path} (held-out accuracy {held_out.get('accuracy', float('nan')):.3f} when trained)")
  return Judge(f"reward_model {path}", score)


def hf_judge(path: str, rt: Any, batch_size: int) -> Judge:
  """An HF *ForSequenceClassification folder and its tokenizer: `prompt + response` scored as transformers does."""
  from transformers import AutoTokenizer
  from dpo_jax.interop import hf
  from dpo_jax.interop.hf import reward_models
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"config.online.judge_path={path!r} is not an HF checkpoint folder (no config.json); give "
                            "a local folder written by XForSequenceClassification.save_pretrained.")
  cfg, params, info = hf.load_sequence_classifier(path, mesh=rt.mesh, rules=rt.rules)
  tokenizer = AutoTokenizer.from_pretrained(path)
  model = reward_models.classifier_model(cfg)

  def score(prompts, completions, rollout):
    return hf.score_texts(model, params, info, tokenizer, [p + c for p, c in zip(prompts, completions)],
                          batch_size=batch_size)

  print(f"judge: HF sequence classifier {path} ({info.model_type}, pad id {info.pad_token_id})")
  return Judge(f"hf {path}", score)


def load_callable(spec: str) -> Callable:
  """`module:function` or `path/to/file.py:function` -> the function (errors name config.online.judge_path)."""
  where = f"config.online.judge_path={spec!r}"
  module_name, sep, fn_name = spec.rpartition(":")
  if not sep or not module_name or not fn_name:
    raise ValueError(f"{where}: give 'module:function' or 'path/to/file.py:function' for judge='callable'.")
  if module_name.endswith(".py"):
    if not os.path.isfile(module_name):
      raise FileNotFoundError(f"{where}: no file {module_name!r}.")
    loaded = importlib.util.spec_from_file_location(f"_dpo_jax_judge_{abs(hash(module_name))}", module_name)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
  else:
    if os.getcwd() not in sys.path and "" not in sys.path:  # `python -m` puts the working directory first; so do we
      sys.path.insert(0, os.getcwd())
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise ValueError(f"{where}: cannot import {module_name!r} ({e}); put it on PYTHONPATH or give a .py "
                       "path.") from None
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ValueError(f"{where}: {module_name!r} has no function {fn_name!r}.")
  return fn


def callable_judge(spec: str) -> Judge:
  fn = load_callable(spec)
  return Judge(f"callable {spec}", lambda prompts, completions, rollout: fn(list(prompts), list(completions)))


def check_config(online: Any) -> None:
  """The judge fields, before any compute (the folder or function itself is checked when it is loaded)."""
  if online.judge not in KINDS:
    raise ValueError(f"config.online.judge={online.judge!r}; choose one of {KINDS}.")
  if online.judge in ("hf", "callable") and not online.judge_path:
    what = "an HF *ForSequenceClassification folder" if online.judge == "hf" else "'module:function'"
    raise ValueError(f"config.online.judge={online.judge!r} needs config.online.judge_path: {what}.")
  if online.judge == "callable":
    load_callable(online.judge_path)
  if online.judge == "synthetic" and online.judge_path:
    raise ValueError(f"config.online.judge='synthetic' takes no judge_path (got {online.judge_path!r}); set the "
                     "judge kind that reads it ('reward_model', 'hf' or 'callable').")


def make(config: Any, rt: Any, tokenizer: Any) -> Judge:
  """The judge config.online asks for ('reward_model' with judge_path '' reads <workdir>/reward_model)."""
  online = config.online
  check_config(online)
  if online.judge == "synthetic":
    if config.data.train:
      print("WARNING: config.online.judge='synthetic' scores the embedded task's sentiment r*, but config.data.train "
            f"is {config.data.train!r}; pick a judge for that data.")
    return synthetic_judge()
  if online.judge == "reward_model":
    return reward_model_judge(online.judge_path or os.path.join(rt.workdir, "reward_model"), rt, tokenizer,
                              online.judge_batch_size)
  if online.judge == "hf":
    return hf_judge(online.judge_path, rt, online.judge_batch_size)
  return callable_judge(online.judge_path)
