"""Evaluation: held-out preference metrics, held-out NLL, and reward / KL on fresh samples.

- Preference metrics over every held-out pair (`rewards/accuracies` is the implicit reward's preference
  accuracy against the data's labels), with the same sums as the train step.
- SFT NLL: nats per response token of the preferred responses.
- Samples: for held-out prompts, ancestral samples (temperature 1, KV cache) from pi; their mean
  ground-truth reward r*(x, y), and the sequence-level KL(pi || pi_ref) estimated as the sample mean of
  log pi(y|x) - log pi_ref(y|x) over y ~ pi (unbiased; seed eq. (3)'s KL term).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from dpo_jax import logprobs, sample, step
from dpo_jax.data import preference


def _sum_dicts(total: dict | None, new: dict) -> dict:
  new = {k: float(np.asarray(v)) for k, v in new.items()}
  return new if total is None else {k: total[k] + new[k] for k in total}


def _summed(sums_fn: Callable, tokenized: preference.TokenizedPairs, kind: str, *, batch_size: int,
            to_global: Callable) -> dict[str, float]:
  """`sums_fn(batch)` added up over every pair of `tokenized` (the last batch padded, never dropped)."""
  total = None
  for local in preference.eval_batches(tokenized, global_batch=batch_size, process_index=jax.process_index(),
                                       process_count=jax.process_count(), kind=kind):
    local.pop("row_ids")
    total = _sum_dicts(total, sums_fn(to_global(local)))
  return total


def preference_metrics(eval_sums_fn: Callable, params: Any, reference: Any, tokenized: preference.TokenizedPairs, *,
                       batch_size: int, to_global: Callable) -> dict[str, float]:
  """DPO metrics over every pair of `tokenized` (`eval_sums_fn(params, reference, batch)` is jitted)."""
  total = _summed(lambda b: eval_sums_fn(params, reference, b), tokenized, "dpo", batch_size=batch_size,
                  to_global=to_global)
  return {k: float(v) for k, v in step.finalize_metrics(total).items()}


def sft_metrics(sft_sums_fn: Callable, params: Any, tokenized: preference.TokenizedPairs, *, batch_size: int,
                to_global: Callable) -> dict[str, float]:
  """Held-out NLL (nats per token) of the preferred responses."""
  total = _summed(lambda b: sft_sums_fn(params, b), tokenized, "sft", batch_size=batch_size, to_global=to_global)
  return {k: float(v) for k, v in step.finalize_sft_metrics(total).items()}


def left_pad_prompts(prompts: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts `[B, P]` left-padded to the longest, and their 0/1 mask, for `sample.generate`."""
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    mask[i, width - len(p):] = 1
  return ids, mask


def sample_metrics(model_cfg: Any, model: Any, policy: Any, reference: Any, prompt_texts: Sequence[str],
                   prompt_ids: Sequence[np.ndarray], *, tokenizer: Any, reward_fn: Callable[[str, str], float],
                   rng: jax.Array, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
                   samples_per_prompt: int = 1) -> dict[str, float]:
  """Mean r*, KL(pi || pi_ref) and length of fresh samples from `policy` (pass the reference as `policy`
  for pi_ref's own row: its KL is then exactly 0)."""
  eos_id = tokenizer.eos_token_id
  pad_id = eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
  score = jax.jit(lambda p, b: logprobs.sequence_logps(model, p, b).logps)
  rewards, kls, lengths = [], [], []
  prompt_texts = [t for t in prompt_texts for _ in range(samples_per_prompt)]
  prompt_ids = [p for p in prompt_ids for _ in range(samples_per_prompt)]
  for start in range(0, len(prompt_ids), batch_size):
    chunk = list(prompt_ids[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)  # static shapes: fill the last batch, drop the extras
    ids, mask = left_pad_prompts(chunk, pad_id)
    tokens = np.asarray(sample.generate(model_cfg, policy, ids, mask, rng=jax.random.fold_in(rng, start),
                                        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                        temperature=temperature))
    batch = sample.completions_to_batch(ids, mask, tokens, pad_id=pad_id, eos_id=eos_id,
                                        max_length=ids.shape[1] + max_new_tokens)
    kl = np.asarray(score(policy, batch)) - np.asarray(score(reference, batch))
    for i in range(n):
      response = tokens[i]
      cut = np.flatnonzero(response == eos_id)
      response = response[:cut[0]] if cut.size else response
      text = tokenizer.decode(response.tolist(), skip_special_tokens=True)
      rewards.append(reward_fn(prompt_texts[start + i], text))
      lengths.append(len(response))
      kls.append(float(kl[i]))
  return {"reward": float(np.mean(rewards)), "reward_stderr": float(np.std(rewards) / np.sqrt(len(rewards))),
          "kl": float(np.mean(kls)), "kl_stderr": float(np.std(kls) / np.sqrt(len(kls))),
          "length": float(np.mean(lengths)), "num_samples": len(rewards)}
