"""Sequence log-probabilities, the one place they are computed (policy and reference alike).

    log pi(y | x) = sum_t log pi(y_t | x, y_<t)      summed over response tokens only (nats)

A batch row is `prompt + response + EOS + padding`; `loss_mask[n, t] = 1` marks the tokens t that are
scored (the response and its EOS). Token t is scored by the logits at t - 1, so prompt tokens and padding
never contribute, whatever their ids. Log-softmax is taken in fp32 whatever the compute dtype.

DPO batches interleave pairs: row 2i is pair i's chosen sequence, row 2i + 1 its rejected one, so one
forward pass over `[2B, T]` serves both and a pair never straddles two devices when the batch is sharded.

Shared-prompt batches (`preference.make_batch(kind="dpo_shared")`: `prompt_ids` `[B, P]` left-padded once per
pair, the responses alone in `input_ids` `[2B, R]`) run the prompt once for both responses
(`model.Decoder.hidden` with two streams). The first response token is scored by the prompt's last position
(column P - 1, the prompt being left-padded), token j > 0 by response position j - 1; the results are the
same `[2B]` per-sequence sums as for the rows `prompt + response`.

Packed batches (dpo_jax/data/packing.py: `[R, L]` rows of up to P pairs, `attention_mask` = segment id,
`pack_slots` `[R, P]`) are reduced per segment instead of per row: results are `[R * 2P]` in the unpacked
order (segment s of row r at r * 2P + s - 1), so everything downstream is unchanged. A token's segment is
that of the token it scores; a segment never starts with a scored token (its prompt is non-empty), so the
logits that score it come from its own segment.

Sequence-sharded batches (`mesh.sequence = n > 1`, dpo_jax/context_parallel.py): every `[N, T]` field is padded to
a multiple of n (2n for zig-zag; `context_parallel.padded_length`: whole ring blocks, or splash tiles) and put in
the load-balanced `token_order`, and each position carries the target it scores (`ids[t + 1]`) and its loss-mask
bit with it. The LM head then runs on each device's tokens, chunk by chunk (`chunked_scores(shards=n)`), and only
the per-sequence sums `[N]` are reduced over 'sequence': no device holds a `[N, T, V]` array or another shard's
hidden states. Nothing is put back in order, because a sum does not depend on the order of its terms (the results
equal the unsharded ones up to fp32 summation order).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax import context_parallel, model as model_lib, moe
from dpo_jax.sharding import constrain, logical_to_spec


# bf16 compute (`model.compute_dtype='bfloat16'`, fp32 params, fp32 log-softmax) against fp32: the largest relative
# error of a sequence log-prob allowed, |logp_bf16 - logp_fp32| <= BF16_LOGPS_RTOL * |logp_fp32|. Measured on the
# `tiny` model (configs/default.py, init std 0.3 so logits are as large as a trained model's) over the 1000
# held-out sequences of the embedded task, seeds 0-4, row and shared-prompt layouts: worst relative error 7.1e-3
# (worst absolute 0.49 nats, mean |logp| 86 nats); after 300-1800 SFT steps (seeds 0-2) 6.2e-3. The bound is ~3x.
# Checked by tests/core/test_mixed_precision.py and on a GPU by benchmarks/device_check.py.
BF16_LOGPS_RTOL = 2e-2


# `model.logits_chunk_size='auto'` (`logits_chunk`): the LM head runs in chunks when one device's fp32 logits for a
# forward would exceed AUTO_CHUNK_BYTES, each chunk then holding at most AUTO_CHUNK_BLOCK_BYTES of them. Chunking
# recomputes the head's forward in the backward pass (one more head matmul), so it pays only where the logits are
# large: on the smollm2-135m shape (benchmarks/dpo_step.py: V = 49,152, 2 pairs x 512 tokens, fp32, 2-core AMD EPYC)
# two chunks of 192 positions saved 272 MiB of a 6.8 GiB step (4%) and cost 9% of its time; the backward holds ~3
# arrays of the logits' size (logits, softmax, their gradient), so past 1 GiB of logits the saving is >= 3 GiB.
AUTO_CHUNK_BYTES = 2 ** 30
AUTO_CHUNK_BLOCK_BYTES = 256 * 2 ** 20


def logits_chunk(cfg: Any, rows: int, positions: int, shard: Any = None) -> tuple[int, str]:
  """(chunk size C, why) of `cfg.logits_chunk_size` for the head's `[rows, positions, V]` fp32 logits per forward.

  An int setting is returned as is. 'auto' chunks when the per-device logits (rows over the mesh axes the 'batch'
  logical axis is sharded over) exceed AUTO_CHUNK_BYTES, into the fewest chunks of <= AUTO_CHUNK_BLOCK_BYTES (C a
  multiple of 8); else C = 0, all at once.
  """
  setting = getattr(cfg, "logits_chunk_size", 0)
  if setting != "auto":
    return setting, "set"
  shards = 1
  if shard is not None:
    axes = logical_to_spec(("batch",), shard.rules)[0]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    shards = max(1, min(rows, math.prod(shard.mesh.shape[a] for a in axes)))
  per_device = -(-rows // shards) * positions * cfg.vocab_size * 4
  need = f"[{-(-rows // shards)}, {positions}, {cfg.vocab_size}] fp32 logits per device = {per_device / 2 ** 20:.0f} MiB"
  if per_device <= AUTO_CHUNK_BYTES:
    return 0, f"'auto': all at once ({need} <= {AUTO_CHUNK_BYTES / 2 ** 20:.0f} MiB)"
  chunks = -(-per_device // AUTO_CHUNK_BLOCK_BYTES)
  chunk = min(-(-positions // chunks // 8) * 8, positions) if positions >= 8 else positions
  return chunk, f"'auto': {chunk} positions per chunk ({need} > {AUTO_CHUNK_BYTES / 2 ** 20:.0f} MiB)"


class SequenceLogps(NamedTuple):
  """Per-sequence results; all `[N]` fp32.

  Only `logps` and `front_logps` carry a gradient; the rest are metrics (and WPO's weight), computed from the
  logits under `stop_gradient` inside the same (chunked) LM head pass, so no `[N, T, V]` array is ever kept for
  them. With `extras=False` (`sequence_logps`; the reference forward) the four metric sums are zeros.
  """
  logps: jax.Array  # sum over response tokens of log pi(y_t | ...), nats
  num_tokens: jax.Array  # response tokens scored (EOS included)
  logits_sum: jax.Array  # sum over response tokens of the vocab-mean logit (for TRL's `logits/*` metrics)
  entropy_sum: jax.Array  # sum over response tokens of the entropy of pi(. | ...), nats (TRL's `entropy`)
  top1_sum: jax.Array  # response tokens whose target is the argmax of the logits (TRL's `mean_token_accuracy`)
  log_sum_sq_sum: jax.Array  # sum over response tokens of log sum_v pi(v | ...)^2, nats (WPO's weight, Zhou 2024)
  front_logps: jax.Array  # sum of log pi over the first L_n response tokens (`front_lengths`; LD-DPO), nats;
  #                         equals `logps` when no lengths are given


def num_segments(batch: Mapping[str, jax.Array]) -> int:
  """Sequences per row, static: 2P for a packed batch (`pack_slots` `[R, P]`), 0 for one sequence per row."""
  return 2 * batch["pack_slots"].shape[1] if "pack_slots" in batch else 0


def segment_onehot(segments_NxS: jax.Array, num_segments: int) -> jax.Array:
  """`[N, S, G]` fp32: 1 where position s belongs to segment g + 1 (segment 0, padding, belongs to none)."""
  return (segments_NxS[..., None] == jnp.arange(1, num_segments + 1, dtype=segments_NxS.dtype)).astype(jnp.float32)


def _per_sequence(x_NxS: jax.Array, onehot_NxSxG: jax.Array | None) -> jax.Array:
  """Sum over positions per row `[N]`, or per segment `[N * G]` (row-major: the unpacked sequence order).

  Multiply-and-sum rather than an einsum: exact fp32 on every backend (a TPU einsum defaults to bf16 passes).
  """
  if onehot_NxSxG is None:
    return x_NxS.sum(-1)
  return (x_NxS[..., None] * onehot_NxSxG).sum(1).reshape(-1)


def shares_prompts(batch: Mapping[str, jax.Array]) -> bool:
  """True for a shared-prompt batch (`prompt_ids` `[B, P]` + responses `[K B, R]`)."""
  return "prompt_ids" in batch


def sequence_lengths(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Real (prompt + response) tokens per sequence, fp32: `[N]` per row, or `[R * 2P]` per segment if packed."""
  g = num_segments(batch)
  real_NxT = (batch["attention_mask"] > 0).astype(jnp.float32)
  if shares_prompts(batch):
    prompt_B = (batch["prompt_mask"] > 0).astype(jnp.float32).sum(-1)
    return jnp.repeat(prompt_B, real_NxT.shape[0] // prompt_B.shape[0]) + real_NxT.sum(-1)
  return _per_sequence(real_NxT, segment_onehot(batch["attention_mask"], g) if g else None)


@jax.custom_vjp
def _token_logps(logits_NxSxV: jax.Array, targets_NxS: jax.Array) -> jax.Array:
  return _token_logps_fwd(logits_NxSxV, targets_NxS)[0]


def _token_logps_fwd(logits_NxSxV, targets_NxS):
  # logsumexp + gather rather than log_softmax: no second [N, S, V] array is needed.
  log_z_NxS = jax.nn.logsumexp(logits_NxSxV, axis=-1)
  target_logit_NxS = jnp.take_along_axis(logits_NxSxV, targets_NxS[..., None], axis=-1)[..., 0]
  return target_logit_NxS - log_z_NxS, (logits_NxSxV, log_z_NxS, targets_NxS)


def _token_logps_bwd(residuals, g_NxS):
  logits_NxSxV, log_z_NxS, targets_NxS = residuals
  is_target_NxSxV = jnp.arange(logits_NxSxV.shape[-1], dtype=targets_NxS.dtype) == targets_NxS[..., None]
  softmax_NxSxV = jnp.exp(logits_NxSxV - log_z_NxS[..., None])
  return g_NxS[..., None] * (is_target_NxSxV.astype(jnp.float32) - softmax_NxSxV), None


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def target_logps(logits_NxSxV: jax.Array, targets_NxS: jax.Array, mask_NxS: jax.Array) -> jax.Array:
  """log softmax(logits[n, s])[targets[n, s]] `[N, S]` fp32 nats, 0 where `mask` is 0 (logits already aligned
  with the tokens they score).

  The gradient is the cross-entropy one, `d/dlogits = g (onehot(target) - softmax)`, by a custom VJP whose
  residuals are the logits and log Z `[N, S]`, so the forward is the same computation whether or not it is
  differentiated: pi_theta's log-probs equal pi_ref's bit for bit when their params do. Under plain autodiff XLA
  kept `exp(logits - max)` `[N, S, V]` for the backward and fused the log Z reduction with that store, which
  summed in another order: on SmolLM2 weights the policy's log-probs differed from the reference forward's by up
  to 7.6e-6 nats at pi == pi_ref, and the step-0 DPO loss was 0.69314712 rather than ln 2
  (tests/interop/test_smollm2.py).
  """
  logits_NxSxV = logits_NxSxV.astype(jnp.float32)
  return _token_logps(logits_NxSxV, targets_NxS) * mask_NxS.astype(jnp.float32)


def token_logps(logits_NxTxV: jax.Array, ids_NxT: jax.Array, loss_mask_NxT: jax.Array) -> jax.Array:
  """Per-token log pi(ids[:, t + 1] | ids[:, :t + 1]) from `logits[:, t]`, `[N, T - 1]` fp32 nats, 0 where
  `loss_mask[:, t + 1]` is 0 (prompt, padding). Their row sums are `logps_from_logits(...).logps`."""
  return target_logps(logits_NxTxV[:, :-1], ids_NxT[:, 1:], loss_mask_NxT[:, 1:])


def token_stats(logits_NxSxV: jax.Array, targets_NxS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-position (entropy, target-is-argmax, log sum_v p_v^2) of softmax(logits), each `[N, S]` fp32, no gradient.

  entropy = log Z - sum_v p_v z_v (nats); log sum_v p_v^2 = logsumexp(2 z) - 2 log Z, the log of the probability
  that two independent draws agree (WPO's per-token normaliser, Zhou et al. 2024 eq. 2, TRL's `log_sum_sq_probs`).
  """
  z_NxSxV = jax.lax.stop_gradient(logits_NxSxV.astype(jnp.float32))
  log_z_NxS = jax.nn.logsumexp(z_NxSxV, axis=-1)
  p_NxSxV = jnp.exp(z_NxSxV - log_z_NxS[..., None])
  entropy_NxS = log_z_NxS - (p_NxSxV * z_NxSxV).sum(-1)
  top1_NxS = (jnp.argmax(z_NxSxV, axis=-1) == targets_NxS).astype(jnp.float32)
  log_sum_sq_NxS = jax.nn.logsumexp(2.0 * z_NxSxV, axis=-1) - 2.0 * log_z_NxS
  return entropy_NxS, top1_NxS, log_sum_sq_NxS


def scored_sums(logits_NxSxV: jax.Array, targets_NxS: jax.Array, mask_NxS: jax.Array,
                onehot_NxSxG: jax.Array | None = None, front_NxS: jax.Array | None = None,
                extras: bool = True) -> SequenceLogps:
  """Per-sequence sums (`SequenceLogps`) of aligned logits: position s scores `targets[:, s]` where `mask`.

  `front_NxS`: 1 on the positions counted in `front_logps` (a subset of `mask`), None = all of them.
  """
  logits_NxSxV = logits_NxSxV.astype(jnp.float32)
  mask_NxS = mask_NxS.astype(jnp.float32)
  per_sequence = lambda x_NxS: _per_sequence(x_NxS, onehot_NxSxG)
  token_logps_NxS = target_logps(logits_NxSxV, targets_NxS, mask_NxS)
  logps = per_sequence(token_logps_NxS)
  front = logps if front_NxS is None else per_sequence(token_logps_NxS * front_NxS.astype(jnp.float32))
  if extras:
    entropy, top1, log_sum_sq = (per_sequence(x * mask_NxS) for x in token_stats(logits_NxSxV, targets_NxS))
  else:
    entropy = top1 = log_sum_sq = jnp.zeros_like(logps)
  return SequenceLogps(
      logps=logps,
      num_tokens=per_sequence(mask_NxS),
      logits_sum=per_sequence(jax.lax.stop_gradient(logits_NxSxV).mean(-1) * mask_NxS),
      entropy_sum=entropy, top1_sum=top1, log_sum_sq_sum=log_sum_sq, front_logps=front,
  )


def logps_from_logits(logits_NxTxV: jax.Array, ids_NxT: jax.Array, loss_mask_NxT: jax.Array,
                      segments_NxT: jax.Array | None = None, num_segments: int = 0,
                      front_lengths_N: jax.Array | None = None, extras: bool = True) -> SequenceLogps:
  """Score `ids[:, 1:]` under `logits[:, :-1]` where `loss_mask[:, 1:]` is set.

  Results are per row `[N]`, or with `num_segments = G > 0` per segment of `segments_NxT` `[N * G]`.
  """
  onehot = segment_onehot(segments_NxT[:, 1:], num_segments) if num_segments else None
  mask = loss_mask_NxT[:, 1:]
  return scored_sums(logits_NxTxV[:, :-1], ids_NxT[:, 1:], mask, onehot, front_mask(mask, front_lengths_N), extras)


def pair_front_lengths(batch: Mapping[str, jax.Array]) -> jax.Array:
  """LD-DPO's shared length per row, `[2B]` fp32: min(chosen tokens, rejected tokens) of the row's pair (Liu et al.
  2024, "LD-DPO"; TRL's `ld_alpha`: the response tokens past it are the "verbose" tail). Rows only (a packed
  batch's sequences are segments: refused by the caller)."""
  tokens_N = (batch["loss_mask"] > 0).astype(jnp.float32).sum(-1)
  shared_B = split_units(tokens_N, 2).min(-1)
  return jnp.repeat(shared_B, 2)


def front_mask(mask_NxS: jax.Array, lengths_N: jax.Array | None) -> jax.Array | None:
  """1 on the first `lengths[n]` scored positions of each row (`mask` counted from the left), `[N, S]` fp32; None
  for None."""
  if lengths_N is None:
    return None
  mask_NxS = mask_NxS.astype(jnp.float32)
  return mask_NxS * (jnp.cumsum(mask_NxS, axis=1) <= lengths_N[:, None]).astype(jnp.float32)


def sequence_logps(model: Any, params: Any, batch: Mapping[str, jax.Array], *,
                   front_lengths: jax.Array | None = None, extras: bool = True, router: bool = False) -> Any:
  """One forward pass of `model` with `params` over `batch` (`[N, T]` arrays) -> per-row `[N]` results.

  With `model.cfg.logits_chunk_size = C > 0` the `[N, T, V]` logits are never materialised (`chunked_logps`).
  A packed batch (`pack_slots` `[R, P]`) gives per-segment results `[R * 2P]` in the unpacked order; a
  shared-prompt batch per response `[K B]` (module docstring).

  front_lengths: `[N]` response tokens per row counted in `front_logps` (LD-DPO, `pair_front_lengths`); not for
    packed batches. extras: compute the metric sums (entropy, argmax accuracy, WPO's log sum p^2); False (the
    reference forward) fills them with zeros.
  router: also return the MoE layers' router sums of this forward (`moe.stack_router_sums`: `[L_moe, E]` /
    `[L_moe]`, None for a dense model), as `(SequenceLogps, sums)`.
  """
  cfg, shard = getattr(model, "cfg", None), getattr(model, "shard", None)
  ids = batch["input_ids"]
  # The head scores T - 1 positions of each row ([N, R] of a shared-prompt batch; per device under 'sequence').
  positions = ids.shape[1] - (0 if shares_prompts(batch) else 1)
  shards = context_parallel.degree(shard)
  chunk, _ = logits_chunk(cfg, ids.shape[0], -(-positions // shards), shard)
  head = lambda h: model_lib.apply_params(model, params, h, method="logits")
  captured = []

  def hidden(*args):
    """The decoder's final hidden states; with `router`, its `moe.ROUTER` sums are kept in `captured`."""
    if not router:
      return model_lib.apply_params(model, params, *args, method="hidden")
    out, collections = model_lib.apply_params(model, params, *args, method="hidden", mutable=[moe.ROUTER])
    captured.append(collections.get(moe.ROUTER, {}))
    return out

  result = _sequence_logps(model, params, batch, head, hidden, chunk, shards, front_lengths, extras)
  if not router:
    return result
  return result, (moe.stack_router_sums(captured[0]) if captured else None)


def _sequence_logps(model: Any, params: Any, batch: Mapping[str, jax.Array], head: Any, hidden: Any, chunk: int,
                    shards: int, front_lengths: jax.Array | None, extras: bool) -> SequenceLogps:
  """`sequence_logps` given the LM `head` and the `hidden`-states forward."""
  g = num_segments(batch)
  if g and front_lengths is not None:
    raise ValueError("config.loss.ld_alpha (LD-DPO) needs each pair's responses in their own rows; packed batches "
                     "hold them as segments. Set --config.data.packing=False, or leave config.loss.ld_alpha unset.")
  if shards > 1:
    return _sequence_sharded_logps(model, params, batch, head, hidden, chunk, shards, front_lengths, extras)
  if shares_prompts(batch):
    return _shared_prompt_logps(batch, head, hidden, chunk, front_lengths, extras)
  segments = batch["attention_mask"] if g else None
  hidden_NxTxD = hidden(batch["input_ids"], batch["positions"], batch["attention_mask"])
  if chunk:
    return chunked_logps(head, hidden_NxTxD, batch["input_ids"], batch["loss_mask"], chunk, segments, g,
                         front_lengths, extras)
  return logps_from_logits(head(hidden_NxTxD), batch["input_ids"], batch["loss_mask"], segments, g, front_lengths,
                           extras)


def _shared_prompt_logps(batch: Mapping[str, jax.Array], head: Any, hidden: Any, chunk: int,
                         front_lengths: jax.Array | None = None, extras: bool = True) -> SequenceLogps:
  """`sequence_logps` of a shared-prompt batch: the LM head runs on response positions only (the scoring
  positions: the prompt's last column for token 0, response position j - 1 for token j)."""
  hidden_BxPxD, hidden_NxRxD = hidden((batch["prompt_ids"], batch["input_ids"]),
                                      (batch["prompt_positions"], batch["positions"]),
                                      (batch["prompt_mask"], batch["attention_mask"]))
  last_NxD = jnp.repeat(hidden_BxPxD[:, -1], hidden_NxRxD.shape[0] // hidden_BxPxD.shape[0], axis=0)
  scoring_NxRxD = jnp.concatenate([last_NxD[:, None], hidden_NxRxD[:, :-1]], axis=1)
  front = front_mask(batch["loss_mask"], front_lengths)
  if chunk:
    return chunked_scores(head, scoring_NxRxD, batch["input_ids"], batch["loss_mask"], chunk, front_NxS=front,
                          extras=extras)
  return scored_sums(head(scoring_NxRxD), batch["input_ids"], batch["loss_mask"], None, front, extras)


def _next_token(x_NxT: jax.Array) -> jax.Array:
  """`x[:, t + 1]` at position t (0 at the last): what the logits at t score, aligned with t."""
  return jnp.pad(x_NxT[:, 1:], ((0, 0), (0, 1)))


def _sequence_sharded_logps(model: Any, params: Any, batch: Mapping[str, jax.Array], head: Any, hidden: Any,
                            chunk: int, shards: int, front_lengths: jax.Array | None = None,
                            extras: bool = True) -> SequenceLogps:
  """`sequence_logps` with the tokens sharded over 'sequence' (module docstring)."""
  balance, shard = model.cfg.context_load_balance, model.shard
  quantum = context_parallel.chunk_quantum(model.cfg, shards)

  def layout(x_NxT: jax.Array) -> jax.Array:  # pad, reorder, shard the tokens
    t = x_NxT.shape[1]
    x_NxT = jnp.pad(x_NxT, ((0, 0), (0, context_parallel.padded_length(t, shards, balance, quantum) - t)))
    return constrain(x_NxT[:, context_parallel.token_order(x_NxT.shape[1], shards, balance)], ("batch", "length"),
                     shard)

  ids, loss_mask = batch["input_ids"], batch["loss_mask"]
  if not shares_prompts(batch):
    g = num_segments(batch)
    segments = batch["attention_mask"]
    hidden_NxTxD = hidden(layout(ids), layout(batch["positions"]), layout(segments))
    front = front_mask(_next_token(loss_mask), front_lengths)  # counted in token order, before the reorder
    return chunked_scores(head, hidden_NxTxD, layout(_next_token(ids)), layout(_next_token(loss_mask)), chunk,
                          layout(_next_token(segments)) if g else None, g, shards=shards, shard=shard,
                          front_NxS=None if front is None else layout(front), extras=extras)
  # Shared prompts: response position j scores token j + 1, and the prompt's last real column (P - 1, the prompts
  # being left-padded) scores token 0, picked out of the sharded prompt stream by a masked sum (exact: the other
  # terms are zeros), whose [B, D] result is all that crosses devices.
  prompt_width = batch["prompt_ids"].shape[1]
  hidden_BxPxD, hidden_NxRxD = hidden((layout(batch["prompt_ids"]), layout(ids)),
                                      (layout(batch["prompt_positions"]), layout(batch["positions"])),
                                      (layout(batch["prompt_mask"]), layout(batch["attention_mask"])))
  order_P = context_parallel.token_order(hidden_BxPxD.shape[1], shards, balance)
  last_BxD = jnp.where(jnp.asarray(order_P == prompt_width - 1)[None, :, None], hidden_BxPxD, 0).sum(1)
  last_NxD = jnp.repeat(last_BxD, ids.shape[0] // last_BxD.shape[0], axis=0)
  unsharded_head = lambda h: model_lib.apply_params(model.clone(shard=None), params, h, method="logits")
  front = front_mask(loss_mask, front_lengths)  # response position j scores token j; counted before the reorder
  first = scored_sums(unsharded_head(last_NxD[:, None]), ids[:, :1], loss_mask[:, :1], None,
                      None if front is None else front[:, :1], extras)
  rest = chunked_scores(head, hidden_NxRxD, layout(_next_token(ids)), layout(_next_token(loss_mask)), chunk,
                        shards=shards, shard=shard,
                        front_NxS=None if front is None else layout(_next_token(front)), extras=extras)
  return SequenceLogps(*(a + b for a, b in zip(first, rest)))


def chunked_logps(head: Any, hidden_NxTxD: jax.Array, ids_NxT: jax.Array, loss_mask_NxT: jax.Array,
                  chunk: int, segments_NxT: jax.Array | None = None, num_segments: int = 0,
                  front_lengths_N: jax.Array | None = None, extras: bool = True) -> SequenceLogps:
  """`logps_from_logits(head(hidden), ..., segments_NxT, num_segments)` computed C positions at a time
  (`chunked_scores` of position t scoring token t + 1)."""
  mask = loss_mask_NxT[:, 1:]
  return chunked_scores(head, hidden_NxTxD[:, :-1], ids_NxT[:, 1:], mask, chunk,
                        None if segments_NxT is None else segments_NxT[:, 1:], num_segments,
                        front_NxS=front_mask(mask, front_lengths_N), extras=extras)


def chunked_scores(head: Any, hidden_NxSxD: jax.Array, targets_NxS: jax.Array, mask_NxS: jax.Array, chunk: int,
                   segments_NxS: jax.Array | None = None, num_segments: int = 0, shards: int = 1,
                   shard: Any = None, front_NxS: jax.Array | None = None, extras: bool = True) -> SequenceLogps:
  """`scored_sums(head(hidden), targets, mask, ...)` computed C positions at a time.

  `head` maps hidden `[N, C, D]` to fp32 logits `[N, C, V]`. A `lax.scan` over sequence chunks applies it and
  reduces each chunk to per-row sums at once, under `jax.checkpoint`, so the backward pass recomputes a chunk's
  logits instead of storing them: peak memory holds one `[N, C, V]` block, not `[N, S, V]` (MaxText and
  Liger-Kernel compute their fused / chunked cross-entropy the same way).

  `shards = n > 1` (positions sharded over 'sequence' in n contiguous blocks): chunk k is the k-th C positions of
  every block, `[N, n C]`, so each device scores its own positions at every step and the sums alone are reduced.
  `chunk = 0`: the head runs on all S positions at once. `front_NxS`, `extras`: as `scored_sums`.
  """
  if not chunk:
    onehot = segment_onehot(segments_NxS, num_segments) if num_segments else None
    return scored_sums(head(hidden_NxSxD), targets_NxS, mask_NxS, onehot, front_NxS, extras)
  n, s, d = hidden_NxSxD.shape
  per_shard = s // shards
  num_chunks = -(-per_shard // chunk)
  pad = num_chunks * chunk - per_shard

  def to_chunks(x, spec):  # [N, S, ...] -> [chunks, N, shards * C, ...]; padding positions score 0
    x = x.reshape((n, shards, per_shard) + x.shape[2:])
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3))
    x = jnp.moveaxis(x.reshape((n, shards, num_chunks, chunk) + x.shape[3:]), 2, 0)
    return constrain(x.reshape((num_chunks, n, shards * chunk) + x.shape[4:]), (None, "batch", "length") + spec,
                     shard if shards > 1 else None)

  h, targets, mask = to_chunks(hidden_NxSxD, ("act_embed",)), to_chunks(targets_NxS, ()), to_chunks(
      mask_NxS.astype(jnp.float32), ())
  # The LD-DPO front mask rides along when given (a plain batch passes none and front_logps = logps).
  front = (to_chunks(front_NxS.astype(jnp.float32), ()),) if front_NxS is not None else ()
  # Packed: each position's segment id (0 on the chunk padding); a plain batch passes none and sums per row.
  segments = (to_chunks(segments_NxS, ()),) if num_segments else ()
  onehot = lambda *seg_NxC: segment_onehot(seg_NxC[0], num_segments) if num_segments else None
  nf = len(front)

  @jax.checkpoint
  def one_chunk(h_NxCxD, targets_NxC, mask_NxC, *rest):
    front_NxC = rest[0] if nf else None
    sums = scored_sums(head(h_NxCxD), targets_NxC, mask_NxC, onehot(*rest[nf:]), front_NxC, extras)
    return sums._replace(num_tokens=jnp.zeros_like(sums.num_tokens))  # counted once, outside the scan

  def body(carry, xs):
    return jax.tree.map(jnp.add, carry, one_chunk(*xs)), None

  zeros = jnp.zeros((n * max(num_segments, 1),), jnp.float32)
  sums, _ = jax.lax.scan(body, SequenceLogps(*(zeros,) * len(SequenceLogps._fields)), (h, targets, mask) + front
                         + segments)
  num_tokens = _per_sequence(mask_NxS.astype(jnp.float32), onehot(segments_NxS) if num_segments else None)
  return sums._replace(num_tokens=num_tokens)


def split_units(x_N: jax.Array, k: int) -> jax.Array:
  """Rows grouped K per unit (a pair is K = 2; a ranked set keeps its K responses best first) -> `[N / K, K, ...]`."""
  return x_N.reshape((x_N.shape[0] // k, k) + x_N.shape[1:])


def split_pairs(x_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Interleaved `[2B, ...]` (chosen, rejected, chosen, ...) -> chosen `[B, ...]`, rejected `[B, ...]`."""
  pairs = x_2B.reshape((x_2B.shape[0] // 2, 2) + x_2B.shape[1:])
  return pairs[:, 0], pairs[:, 1]
