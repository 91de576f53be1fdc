"""Sequence log-probabilities, the one place they are computed (policy and reference alike).

    log pi(y | x) = sum_t log pi(y_t | x, y_<t)      summed over response tokens only (nats)

A batch row is `prompt + response + EOS + padding`; `loss_mask[n, t] = 1` marks the tokens t that are
scored (the response and its EOS). Token t is scored by the logits at t - 1, so prompt tokens and padding
never contribute, whatever their ids. Log-softmax is taken in fp32 whatever the compute dtype.

DPO batches interleave pairs: row 2i is pair i's chosen sequence, row 2i + 1 its rejected one, so one
forward pass over `[2B, T]` serves both and a pair never straddles two devices when the batch is sharded.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp


class SequenceLogps(NamedTuple):
  """Per-sequence results; all `[N]` fp32."""
  logps: jax.Array  # sum over response tokens of log pi(y_t | ...), nats
  num_tokens: jax.Array  # response tokens scored (EOS included)
  logits_sum: jax.Array  # sum over response tokens of the vocab-mean logit (for TRL's `logits/*` metrics)


def logps_from_logits(logits_NxTxV: jax.Array, ids_NxT: jax.Array, loss_mask_NxT: jax.Array) -> SequenceLogps:
  """Score `ids[:, 1:]` under `logits[:, :-1]` where `loss_mask[:, 1:]` is set."""
  logits_NxSxV = logits_NxTxV[:, :-1].astype(jnp.float32)
  targets_NxS = ids_NxT[:, 1:]
  mask_NxS = loss_mask_NxT[:, 1:].astype(jnp.float32)
  # logsumexp + gather rather than log_softmax: no second [N, T, V] array is needed.
  log_z_NxS = jax.nn.logsumexp(logits_NxSxV, axis=-1)
  target_logit_NxS = jnp.take_along_axis(logits_NxSxV, targets_NxS[..., None], axis=-1)[..., 0]
  token_logps_NxS = (target_logit_NxS - log_z_NxS) * mask_NxS
  return SequenceLogps(
      logps=token_logps_NxS.sum(-1),
      num_tokens=mask_NxS.sum(-1),
      logits_sum=(logits_NxSxV.mean(-1) * mask_NxS).sum(-1),
  )


def sequence_logps(model: Any, params: Any, batch: Mapping[str, jax.Array]) -> SequenceLogps:
  """One forward pass of `model` with `params` over `batch` (`[N, T]` arrays) -> per-row `[N]` results.

  With `model.cfg.logits_chunk_size = C > 0` the `[N, T, V]` logits are never materialised (`chunked_logps`).
  """
  chunk = getattr(getattr(model, "cfg", None), "logits_chunk_size", 0)
  if chunk:
    hidden_NxTxD = model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["attention_mask"],
                               method="hidden")
    return chunked_logps(lambda h: model.apply({"params": params}, h, method="logits"), hidden_NxTxD,
                         batch["input_ids"], batch["loss_mask"], chunk)
  logits_NxTxV = model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["attention_mask"])
  return logps_from_logits(logits_NxTxV, batch["input_ids"], batch["loss_mask"])


def chunked_logps(head: Any, hidden_NxTxD: jax.Array, ids_NxT: jax.Array, loss_mask_NxT: jax.Array,
                  chunk: int) -> SequenceLogps:
  """`logps_from_logits(head(hidden), ...)` computed C positions at a time.

  `head` maps hidden `[N, C, D]` to fp32 logits `[N, C, V]`. A `lax.scan` over sequence chunks applies it and
  reduces each chunk to per-row sums at once, under `jax.checkpoint`, so the backward pass recomputes a chunk's
  logits instead of storing them: peak memory holds one `[N, C, V]` block, not `[N, T, V]` (MaxText and
  Liger-Kernel compute their fused / chunked cross-entropy the same way).
  """
  n, t, d = hidden_NxTxD.shape
  s = t - 1  # position t scores token t + 1
  num_chunks = -(-s // chunk)
  pad = num_chunks * chunk - s
  h = jnp.pad(hidden_NxTxD[:, :-1], ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(ids_NxT[:, 1:], ((0, 0), (0, pad)))
  mask = jnp.pad(loss_mask_NxT[:, 1:].astype(jnp.float32), ((0, 0), (0, pad)))  # padding positions score 0
  to_chunks = lambda x: jnp.moveaxis(x.reshape((n, num_chunks, chunk) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one_chunk(h_NxCxD, targets_NxC, mask_NxC):
    logits_NxCxV = head(h_NxCxD).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits_NxCxV, axis=-1)
    target_logit = jnp.take_along_axis(logits_NxCxV, targets_NxC[..., None], axis=-1)[..., 0]
    return ((target_logit - log_z) * mask_NxC).sum(-1), (logits_NxCxV.mean(-1) * mask_NxC).sum(-1)

  def body(carry, xs):
    logps, logits_sum = one_chunk(*xs)
    return (carry[0] + logps, carry[1] + logits_sum), None

  zeros = jnp.zeros((n,), jnp.float32)
  (logps, logits_sum), _ = jax.lax.scan(body, (zeros, zeros), (to_chunks(h), to_chunks(targets), to_chunks(mask)))
  return SequenceLogps(logps=logps, num_tokens=mask.sum(-1), logits_sum=logits_sum)


def split_units(x_N: jax.Array, k: int) -> jax.Array:
  """Rows grouped K per unit (a pair is K = 2; a ranked set keeps its K responses best first) -> `[N / K, K, ...]`."""
  return x_N.reshape((x_N.shape[0] // k, k) + x_N.shape[1:])


def split_pairs(x_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Interleaved `[2B, ...]` (chosen, rejected, chosen, ...) -> chosen `[B, ...]`, rejected `[B, ...]`."""
  pairs = x_2B.reshape((x_2B.shape[0] // 2, 2) + x_2B.shape[1:])
  return pairs[:, 0], pairs[:, 1]
