"""On-policy rollouts for RL: sample responses, cut them at EOS, and score every token under pi and pi_ref.

One jitted function (`rollout`, or `jit_rollout` with explicit shardings) does it all:

1. `sample.sample_tokens` draws N new tokens per prompt with the KV cache (a fixed-length scan; a finished row
   keeps emitting padding, so shapes stay static).
2. The response is cut after its first EOS (`response_mask`), and prompt + response are laid out as one
   `[B, P + N]` row: the prompt LEFT-padded as the sampler had it, positions counting real tokens only.
3. The policy and the frozen reference score the row teacher-forced, in fp32 log-softmax, exactly as
   `logprobs.sequence_logps` scores training rows. The sampler's own log-probs are not used: in bf16 on an
   accelerator, or under a different attention kernel, the incremental decode and the full forward differ, and
   PPO's ratio pi / pi_old must start at exactly 1 (its old log-probs must come from the same forward the
   update differentiates).

Sampling is pure temperature 1 by default. Temperature != 1, top-k or top-p sample from a distribution other
than pi, so k1 = log pi - log pi_ref on those samples is no longer an unbiased estimate of KL(pi || pi_ref): on
truncated distributions it is biased low (often negative), a KL penalty PPO then learns to exploit.
`check_unbiased_sampling` refuses them for RL.

Layout of a rollout row (P prompt columns, N response columns)::

    input_ids       pad pad x0 x1 x2 | y0 y1 EOS pad pad      response_mask  1 1 1 0 0
    attention_mask   0   0  1  1  1  |  1  1  1   0   0       logps[:, j]    log pi(y_j | x, y_<j), 0 after EOS
    positions        0   0  0  1  2  |  3  4  5   6   7

Token j of the response is scored by the hidden state at column P - 1 + j.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import logprobs, model as model_lib, sample, sharding as sharding_lib


class Rollout(NamedTuple):
  """A batch of B sampled responses with their per-token log-probs (the N sampled columns)."""
  input_ids: jax.Array  # [B, P + N] int32: left-padded prompt, then the response (pad after its EOS)
  positions: jax.Array  # [B, P + N] int32
  attention_mask: jax.Array  # [B, P + N] int32: 1 on the prompt's tokens and the response through its EOS
  response_mask: jax.Array  # [B, N] fp32: 1 on the response through its EOS
  logps: jax.Array  # [B, N] fp32: log pi(y_j | x, y_<j), teacher-forced, 0 on padding (nats)
  ref_logps: jax.Array  # [B, N] fp32: the same under pi_ref
  ended: jax.Array  # [B] bool: the response has an EOS (else it was cut at N tokens)

  @property
  def num_new_tokens(self) -> int:
    return self.response_mask.shape[1]

  @property
  def prompt_length(self) -> int:
    return self.input_ids.shape[1] - self.response_mask.shape[1]

  @property
  def response_ids(self) -> jax.Array:
    """`[B, N]` the sampled tokens (padding after EOS)."""
    return self.input_ids[:, self.prompt_length:]


def check_unbiased_sampling(temperature: float, top_k: int, top_p: float, where: str = "rollout") -> None:
  """Refuse sampling settings under which k1 on the samples is not an unbiased estimate of KL(pi || pi_ref)."""
  bad = {k: v for k, v, ok in (("temperature", temperature, temperature == 1.0), ("top_k", top_k, top_k == 0),
                               ("top_p", top_p, top_p == 1.0)) if not ok}
  if bad:
    raise ValueError(f"{where}: {', '.join(f'{k}={v}' for k, v in bad.items())}: RL samples must come from pi itself "
                     "(temperature 1, top_k 0, top_p 1.0). Truncated or tempered samples make the KL penalty "
                     "log pi - log pi_ref biased (negative on average), which the policy learns to exploit.")


def response_mask(tokens_BxN: jax.Array, eos_id: int) -> jax.Array:
  """`[B, N]` fp32: 1 on each row's tokens up to and including its first EOS (all N when it has none)."""
  is_eos = (tokens_BxN == eos_id).astype(jnp.int32)
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
  return (eos_before == 0).astype(jnp.float32)


def layout(prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array, tokens_BxN: jax.Array, *,
           eos_id: int) -> dict[str, jax.Array]:
  """The scoring row of each sample (module docstring): `input_ids`, `positions`, `attention_mask` `[B, P + N]`,
  `response_mask` `[B, N]` and `ended` `[B]`."""
  mask_BxN = response_mask(tokens_BxN, eos_id)
  prompt_pos_BxP = sample.prompt_positions(prompt_mask_BxP)
  n = tokens_BxN.shape[1]
  response_pos_BxN = prompt_pos_BxP[:, -1:] + 1 + jnp.arange(n, dtype=jnp.int32)[None, :]
  return {"input_ids": jnp.concatenate([prompt_ids_BxP, tokens_BxN], axis=1).astype(jnp.int32),
          "positions": jnp.concatenate([prompt_pos_BxP, response_pos_BxN], axis=1),
          "attention_mask": jnp.concatenate([prompt_mask_BxP.astype(jnp.int32), mask_BxN.astype(jnp.int32)], axis=1),
          "response_mask": mask_BxN,
          "ended": jnp.any((tokens_BxN == eos_id) & (mask_BxN > 0), axis=1)}


def response_hidden(model: Any, params: Any, seq: Any, num_new_tokens: int) -> jax.Array:
  """Final hidden states at the N scoring columns P - 1 ... P + N - 2, `[B, N, D]` (compute dtype).

  `seq`: a `Rollout` or a dict with its `input_ids`, `positions`, `attention_mask` (`params` may be a
  reward/value model's `backbone`)."""
  get = (lambda k: getattr(seq, k)) if isinstance(seq, Rollout) else seq.__getitem__
  hidden_BxTxD = model_lib.apply_params(model, params, get("input_ids"), get("positions"), get("attention_mask"),
                                        method="hidden")
  t = hidden_BxTxD.shape[1]
  return hidden_BxTxD[:, t - num_new_tokens - 1:t - 1]


def response_logits(model: Any, params: Any, seq: Any, num_new_tokens: int) -> jax.Array:
  """`[B, N, V]` fp32 logits that score the N response tokens."""
  hidden_BxNxD = response_hidden(model, params, seq, num_new_tokens)
  return model_lib.apply_params(model, params, hidden_BxNxD, method="logits")


def response_logps(model: Any, params: Any, seq: Any, response_ids_BxN: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  """Teacher-forced log pi(y_j | x, y_<j) `[B, N]` fp32 nats, 0 where `mask` is 0 (`logprobs.target_logps`)."""
  logits_BxNxV = response_logits(model, params, seq, response_ids_BxN.shape[1])
  return logprobs.target_logps(logits_BxNxV, response_ids_BxN, mask_BxN)


def _rollout(params: Any, reference_params: Any, prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array,
             rng: jax.Array, *, cfg: model_lib.ModelConfig, model: Any, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float, top_k: int, top_p: float) -> Rollout:
  tokens_BxN, _ = sample.sample_tokens(params, prompt_ids_BxP, prompt_mask_BxP, rng, cfg=cfg,
                                       max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                       temperature=temperature, top_k=top_k, top_p=top_p)
  seq = layout(prompt_ids_BxP, prompt_mask_BxP, tokens_BxN, eos_id=eos_id)
  score = lambda p: response_logps(model, p, seq, tokens_BxN, seq["response_mask"])
  return Rollout(seq["input_ids"], seq["positions"], seq["attention_mask"], seq["response_mask"],
                 score(params), jax.lax.stop_gradient(score(reference_params)), seq["ended"])


_STATIC = ("cfg", "model", "max_new_tokens", "eos_id", "pad_id", "temperature", "top_k", "top_p")


@functools.lru_cache(maxsize=16)
def _jitted(**static) -> Any:
  return jax.jit(functools.partial(_rollout, **static))


def rollout(cfg: model_lib.ModelConfig, params: Any, reference_params: Any, prompt_ids_BxP: Any, prompt_mask_BxP: Any,
            *, rng: jax.Array, max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
            top_k: int = 0, top_p: float = 1.0, model: Any = None) -> Rollout:
  """Sample `max_new_tokens` per LEFT-padded prompt (`[B, P]`) from pi = `params` and score them under pi and
  pi_ref = `reference_params` (module docstring). `model`: the scoring model (default `make_model(cfg)`;
  pass a sharded one to pin activation shardings). Compiles once per static setting and shape."""
  sample.check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 1:
    raise ValueError(f"rollout: max_new_tokens={max_new_tokens} must be >= 1.")
  sample._check_left_padded(prompt_mask_BxP)
  fn = _jitted(cfg=cfg, model=model if model is not None else model_lib.make_model(cfg),
               max_new_tokens=int(max_new_tokens), eos_id=int(eos_id), pad_id=int(pad_id),
               temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  return fn(params, reference_params, jnp.asarray(prompt_ids_BxP, jnp.int32),
            (jnp.asarray(prompt_mask_BxP) > 0).astype(jnp.int32), rng)


def rollout_shardings(mesh: Mesh, rules: sharding_lib.Rules) -> Rollout:
  """Every `Rollout` field split over the batch ('data' and 'fsdp' axes, as training batches are)."""
  rows = sharding_lib.named_sharding(mesh, rules, ("batch", None))
  return Rollout(rows, rows, rows, rows, rows, rows, sharding_lib.named_sharding(mesh, rules, ("batch",)))


def jit_rollout(cfg: model_lib.ModelConfig, model: Any, *, mesh: Mesh, rules: sharding_lib.Rules, param_shardings: Any,
                reference_shardings: Any, max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0):
  """`rollout` jitted with explicit shardings: params as given, prompts `[B, P]` and every output split over the
  batch; `fn(params, reference_params, prompt_ids, prompt_mask, rng) -> Rollout`. B must divide by the batch
  axes' size."""
  sample.check_sampling(temperature, top_k, top_p)
  rows = sharding_lib.named_sharding(mesh, rules, ("batch", None))
  fn = functools.partial(_rollout, cfg=cfg, model=model, max_new_tokens=int(max_new_tokens), eos_id=int(eos_id),
                         pad_id=int(pad_id), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(fn, in_shardings=(param_shardings, reference_shardings, rows, rows, replicated),
                 out_shardings=rollout_shardings(mesh, rules))
