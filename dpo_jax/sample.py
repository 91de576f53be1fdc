"""Ancestral sampling with a KV cache: prefill the prompts in one call, then one token per step.

Prompts come LEFT-padded (`prompt_mask` 0 on the padding) so every row's next token lands in the same
cache slot; positions count real tokens only, so a padded row sees exactly what it would alone (padding
has segment id 0 and is never attended by real tokens, see `model.py`). The whole loop is one `jax.jit`. In use::

    tokens_BxN = generate(cfg, params, prompt_ids_BxP, prompt_mask_BxP, rng=key, max_new_tokens=N,
                          eos_id=eos, pad_id=pad)
    batch = completions_to_batch(prompt_ids_BxP, prompt_mask_BxP, tokens_BxN, pad_id=pad, eos_id=eos,
                                 max_length=P + N)
    kl_B = sequence_logps(model, policy, batch).logps - sequence_logps(model, reference, batch).logps
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import model as model_lib


def prompt_positions(prompt_mask_BxP: jax.Array) -> jax.Array:
  """`[B, P]` int32: 0, 1, ... over each row's real (right-aligned) tokens; 0 on the left padding."""
  return jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=1) - 1, 0).astype(jnp.int32)


def _check_left_padded(prompt_mask_BxP) -> None:
  """Raise unless every row is `0 ... 0 1 ... 1` with at least one 1 (skipped under a trace)."""
  if isinstance(prompt_mask_BxP, jax.core.Tracer):
    return
  mask = np.asarray(prompt_mask_BxP) > 0
  # Left padding puts every row's last token in the last column, so the first sampled token of every row
  # reads the logits there and lands in the same cache slot; an empty row has no token to condition on.
  if not mask[:, -1].all():
    raise ValueError(f"generate: rows {np.flatnonzero(~mask[:, -1]).tolist()} are empty or right-padded; "
                     "prompts must be LEFT-padded with at least one real token.")
  if (mask[:, :-1] & ~mask[:, 1:]).any():
    raise ValueError("generate: prompt_mask has padding between real tokens; prompts must be LEFT-padded.")


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits with every token outside the top-k / nucleus (top-p) set to -inf; unchanged for (0, 1.0).

  top-p keeps the smallest set of most likely tokens whose probability reaches p (the most likely always kept).
  Either makes samples come from a distribution other than pi: fine for evaluation, biased for RL
  (`rollout.check_unbiased_sampling`).
  """
  if top_k > 0 and top_k < logits_BxV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV.astype(jnp.float32), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the tokens ranked above
    # The cut-off logit: the smallest one whose higher-ranked tokens hold less than p.
    cutoff_B1 = jnp.min(jnp.where(mass_before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, -jnp.inf, logits_BxV)
  return logits_BxV


def _sample_token(key, logits_BxV, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """`[B]` int32 draw from softmax(filtered logits / temperature); argmax when temperature is 0."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def sample_tokens(params, prompt_ids_BxP, prompt_mask_BxP, rng, *, cfg, max_new_tokens, eos_id, pad_id, temperature,
                  top_k=0, top_p=1.0):
  """The traceable sampling loop (`generate` jits it; `rollout` traces it inside its own jit).

  -> tokens `[B, N]` int32, log pi(token) `[B, N]` fp32 (0 after EOS)."""
  b, p = prompt_ids_BxP.shape
  model = model_lib.make_model(cfg, decode=True)
  cache = model_lib.init_cache(cfg, b, p + max_new_tokens)
  positions_BxP = prompt_positions(prompt_mask_BxP)
  logits_BxPxV, mutated = model_lib.apply_params(model, params, prompt_ids_BxP, positions_BxP, prompt_mask_BxP,
                                                 variables={"cache": cache}, mutable=["cache"])
  segment_Bx1 = jnp.ones((b, 1), jnp.int32)  # new tokens join the prompt's segment (real tokens are 1)

  def step(carry, key):
    cache, logits_BxV, next_pos_B, done_B = carry
    token_B = _sample_token(key, logits_BxV, temperature, top_k, top_p)
    # The model's own log-prob (temperature 1), the quantity `logprobs.sequence_logps` scores.
    token_logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), token_B[:, None], axis=-1)[:, 0]
    token_B = jnp.where(done_B, pad_id, token_B)
    token_logp_B = jnp.where(done_B, 0.0, token_logp_B)
    # Finished rows keep running (static shapes); their pad tokens only feed their own, ignored, logits.
    logits_Bx1xV, mutated = model_lib.apply_params(model, params, token_B[:, None], next_pos_B[:, None],
                                                   segment_Bx1, variables={"cache": cache}, mutable=["cache"])
    carry = (mutated["cache"], logits_Bx1xV[:, 0], next_pos_B + 1, done_B | (token_B == eos_id))
    return carry, (token_B, token_logp_B)

  init = (mutated["cache"], logits_BxPxV[:, -1], positions_BxP[:, -1] + 1, jnp.zeros((b,), bool))
  # The last step's forward is never read: one wasted step keeps the loop body uniform.
  _, (tokens_NxB, logps_NxB) = jax.lax.scan(step, init, jax.random.split(rng, max_new_tokens))
  return tokens_NxB.T, logps_NxB.T


_generate = jax.jit(sample_tokens, static_argnames=("cfg", "max_new_tokens", "eos_id", "pad_id", "temperature",
                                                    "top_k", "top_p"))


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0.0:
    raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 is greedy).")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"generate: top_k={top_k} must be an integer >= 0 (0 keeps every token).")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p={top_p} must be in (0, 1] (1 keeps every token).")


def generate(cfg: model_lib.ModelConfig, params, prompt_ids_BxP, prompt_mask_BxP, *, rng: jax.Array,
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, return_logps: bool = False):
  """Sample `[B, max_new_tokens]` int32 tokens from softmax(logits / temperature), temperature 0 greedy; `top_k`
  > 0 / `top_p` < 1 restrict each draw to the k most likely tokens / the nucleus (`filter_logits`).

  prompt_ids_BxP, prompt_mask_BxP: `[B, P]`, LEFT-padded (mask 0 on the padding, 1 on tokens).
  A row's EOS is kept and followed by `pad_id`. The same `rng` gives the same tokens. With `return_logps`
  also returns `[B, N]` fp32 log pi(token | context) under the model itself (temperature 1, whatever the
  sampling temperature; 0 after EOS): summed, it is what `logprobs.sequence_logps` gives the sample.
  Compiles once per (cfg, shapes, max_new_tokens, eos_id, pad_id, temperature).
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1.")
  if np.shape(prompt_ids_BxP) != np.shape(prompt_mask_BxP) or len(np.shape(prompt_ids_BxP)) != 2:
    raise ValueError(f"generate: prompt_ids {np.shape(prompt_ids_BxP)} and prompt_mask {np.shape(prompt_mask_BxP)} "
                     "must be the same [B, P] shape.")
  check_sampling(temperature, top_k, top_p)
  _check_left_padded(prompt_mask_BxP)
  tokens, logps = _generate(params, jnp.asarray(prompt_ids_BxP, jnp.int32),
                            (jnp.asarray(prompt_mask_BxP) > 0).astype(jnp.int32), rng, cfg=cfg,
                            max_new_tokens=int(max_new_tokens), eos_id=int(eos_id), pad_id=int(pad_id),
                            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  return (tokens, logps) if return_logps else tokens


def completions_to_batch(prompt_ids_BxP: np.ndarray, prompt_mask_BxP: np.ndarray, tokens_BxN: np.ndarray, *,
                         pad_id: int, eos_id: int, max_length: int) -> dict[str, np.ndarray]:
  """A right-padded scoring batch in `logprobs` format, `[B, max_length]` int32 arrays.

  Row i is prompt i's real tokens + its sampled tokens through the first EOS (all N if none): `input_ids`,
  `attention_mask` (1 on the row), `positions` (0, 1, ...), `loss_mask` (1 on the sampled tokens, EOS
  included), so `logprobs.sequence_logps` gives log pi(y | x) of each sample.
  """
  prompt_ids_BxP, prompt_mask_BxP, tokens_BxN = map(np.asarray, (prompt_ids_BxP, prompt_mask_BxP, tokens_BxN))
  b = prompt_ids_BxP.shape[0]
  batch = {k: np.zeros((b, max_length), np.int32) for k in ("input_ids", "attention_mask", "positions", "loss_mask")}
  batch["input_ids"][:] = pad_id
  for i in range(b):
    prompt = prompt_ids_BxP[i][prompt_mask_BxP[i] > 0]
    eos = np.flatnonzero(tokens_BxN[i] == eos_id)
    response = tokens_BxN[i][:eos[0] + 1] if eos.size else tokens_BxN[i]
    n = len(prompt) + len(response)
    if n > max_length:
      raise ValueError(f"completions_to_batch: row {i} has {n} tokens > max_length={max_length}.")
    batch["input_ids"][i, :n] = np.concatenate([prompt, response])
    batch["attention_mask"][i, :n] = 1
    batch["positions"][i, :n] = np.arange(n)
    batch["loss_mask"][i, len(prompt):n] = 1
  return batch
