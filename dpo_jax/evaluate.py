"""Evaluation: held-out preference metrics, held-out NLL, and reward / KL on fresh samples.

- Preference metrics over every held-out pair (`rewards/accuracies` is the implicit reward's preference
  accuracy against the data's labels), with the same sums as the train step.
- SFT NLL: nats per response token of the preferred responses.
- Samples: for held-out prompts, ancestral samples (temperature 1, KV cache) from pi; their mean
  ground-truth reward r*(x, y), and the sequence-level KL(pi || pi_ref) estimated as the sample mean of
  log pi(y|x) - log pi_ref(y|x) over y ~ pi (unbiased; seed eq. (3)'s KL term).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import numpy as np

from dpo_jax import logprobs, sample, step
from dpo_jax.data import preference


def _sum_dicts(total: dict | None, new: dict) -> dict:
  new = {k: float(np.asarray(v)) for k, v in new.items()}
  return new if total is None else {k: total[k] + new[k] for k in total}


def summed(sums_fn: Callable, tokenized: preference.TokenizedPairs, kind: str, *, batch_size: int,
           to_global: Callable, feed: tuple[int, int] | None = None) -> dict[str, float]:
  """`sums_fn(batch)` added up over every pair of `tokenized` (the last batch padded, never dropped).

  `feed`: (block, blocks) of each batch this process reads (`sharding.batch_feed`); default one per process."""
  total = None
  block, blocks = feed or (jax.process_index(), jax.process_count())
  for local in preference.eval_batches(tokenized, global_batch=batch_size, process_index=block,
                                       process_count=blocks, kind=kind):
    local.pop("row_ids")
    total = _sum_dicts(total, sums_fn(to_global(local)))
  return total


def preference_metrics(eval_sums_fn: Callable, params: Any, reference: Any, tokenized: preference.TokenizedPairs, *,
                       batch_size: int, to_global: Callable, kind: str = "dpo",
                       feed: tuple[int, int] | None = None) -> dict[str, float]:
  """DPO metrics over every pair of `tokenized` (`eval_sums_fn(params, reference, batch)` is jitted) in batches
  of `kind` ('dpo' rows or 'dpo_shared' prompts: the same numbers)."""
  total = summed(lambda b: eval_sums_fn(params, reference, b), tokenized, kind, batch_size=batch_size,
                 to_global=to_global, feed=feed)
  return {k: float(v) for k, v in step.finalize_metrics(total).items()}


def sft_metrics(sft_sums_fn: Callable, params: Any, tokenized: preference.TokenizedPairs, *, batch_size: int,
                to_global: Callable, feed: tuple[int, int] | None = None) -> dict[str, float]:
  """Held-out NLL (nats per token) of the preferred responses."""
  total = summed(lambda b: sft_sums_fn(params, b), tokenized, "sft", batch_size=batch_size, to_global=to_global,
                 feed=feed)
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


class Samples(NamedTuple):
  """One batch of fresh samples: `n` real rows first (the rest repeat row 0 to keep shapes static)."""
  start: int  # index of row 0 in the flat (prompt, sample) list
  n: int  # real rows
  batch: dict  # scoring batch `[B, P + max_new_tokens]` (`sample.completions_to_batch`): log-probs, rewards
  responses: list  # the n responses' token ids, EOS and padding cut off
  texts: list  # the n responses decoded (special tokens skipped)


def draw_samples(model_cfg: Any, policy: Any, prompt_ids: Sequence[np.ndarray], *, tokenizer: Any, rng: jax.Array,
                 max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
                 samples_per_prompt: int = 1) -> Iterator[Samples]:
  """Ancestral samples from `policy` (KV cache), `samples_per_prompt` per prompt, prompt-major order."""
  eos_id = tokenizer.eos_token_id
  pad_id = eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
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
    responses = []
    for i in range(n):
      cut = np.flatnonzero(tokens[i] == eos_id)
      responses.append(tokens[i][:cut[0]] if cut.size else tokens[i])
    texts = [tokenizer.decode(r.tolist(), skip_special_tokens=True) for r in responses]
    yield Samples(start, n, batch, responses, texts)


@functools.lru_cache(maxsize=8)
def _scorer(model: Any) -> Callable:
  """log pi(y|x) of a scoring batch, jitted once per model (flax modules hash by their config)."""
  return jax.jit(lambda p, b: logprobs.sequence_logps(model, p, b).logps)


def sample_metrics(model_cfg: Any, model: Any, policy: Any, reference: Any, prompt_texts: Sequence[str],
                   prompt_ids: Sequence[np.ndarray], *, tokenizer: Any, reward_fn: Callable[[str, str], float],
                   rng: jax.Array, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
                   samples_per_prompt: int = 1) -> dict[str, float]:
  """Mean r*, KL(pi || pi_ref) and length of fresh samples from `policy` (pass the reference as `policy`
  for pi_ref's own row: its KL is then exactly 0)."""
  score = _scorer(model)
  rewards, kls, lengths = [], [], []
  prompt_texts = [t for t in prompt_texts for _ in range(samples_per_prompt)]
  for s in draw_samples(model_cfg, policy, prompt_ids, tokenizer=tokenizer, rng=rng, max_new_tokens=max_new_tokens,
                        temperature=temperature, batch_size=batch_size, samples_per_prompt=samples_per_prompt):
    kl = np.asarray(score(policy, s.batch)) - np.asarray(score(reference, s.batch))
    rewards += [reward_fn(prompt_texts[s.start + i], s.texts[i]) for i in range(s.n)]
    lengths += [len(r) for r in s.responses]
    kls += [float(k) for k in kl[:s.n]]
  return {"reward": float(np.mean(rewards)), "reward_stderr": float(np.std(rewards) / np.sqrt(len(rewards))),
          "kl": float(np.mean(kls)), "kl_stderr": float(np.std(kls) / np.sqrt(len(kls))),
          "length": float(np.mean(lengths)), "num_samples": len(rewards)}
