"""The DPO train and eval steps: pure functions, jitted by the caller with explicit shardings.

    train_step(state, reference_params, batch) -> (state, metrics)

`reference_params` is a separate pytree, sharded like the policy, never donated, never in the optimizer
state and never differentiated: the reference forward runs outside `jax.value_and_grad`, on
`stop_gradient(reference_params)`. Pass `reference_params=None` with `ref_chosen_logps` /
`ref_rejected_logps` (`[B]`) in the batch to use precomputed reference log-probs instead.

LoRA (`lora=spec`, dpo_jax/lora.py): `state.params` are the adapters alone and `reference_params` the frozen base.
The policy is `LoraParams(base, adapters)` and pi_ref the base with the adapters off, so one copy of the base
serves both forwards; only the adapters are differentiated, updated and hold optimizer moments. Precomputed
`ref_*_logps` in the batch replace the reference forward here too.

Batches (see `logprobs`): `input_ids`, `attention_mask`, `positions`, `loss_mask` `[2B, T]` with pairs
interleaved, optional `pair_mask` `[B]` (0 = padding pair, ignored in loss and metrics). Metric names follow
TRL's DPOTrainer so dashboards compare directly. Packed batches (dpo_jax/data/packing.py: `[R, L]` rows of up
to P pairs, `pack_slots` `[R, P]`, per-pair fields `[R * P]`) go through the same functions: log-probs come
back per pair in the unpacked order, and a packed row is the unit micro-batches and shards are cut in.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import logprobs, losses, lora as lora_lib, model as model_lib, moe, sharding as sharding_lib

PAIR_KEYS = ("pair_mask", "row_ids", "ref_chosen_logps", "ref_rejected_logps")  # [B] per-pair fields


class TrainState(NamedTuple):
  step: jax.Array  # [] int32, optimizer updates applied so far
  params: Any  # policy params
  opt_state: Any


# Per-batch sums from which every metric is a ratio; summing them across micro-batches or eval batches
# and then dividing gives exact means over all pairs. `count/*` are the units each side's means are over: the
# pairs, or (unpaired KTO / BCO rows) the desirable and the undesirable rows.
SUM_KEYS = ("pairs", "loss", "count/chosen", "count/rejected", "rewards/chosen", "rewards/rejected",
            "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
            "tokens/chosen", "tokens/rejected", "num_tokens", "entropy", "tokens/entropy", "top1", "tokens/top1")
UNPAIRED_SUM_KEYS = SUM_KEYS + ("kl",)  # KTO's reference point, summed as kl * rows per batch


def sum_keys(batch: Mapping[str, jax.Array], model_cfg: Any = None) -> tuple[str, ...]:
  """The metric sums `dpo_loss` returns for `batch` (unpaired batches carry `desirable` and add "kl"; an MoE
  `model_cfg` adds `router_sum_keys`)."""
  return (UNPAIRED_SUM_KEYS if "desirable" in batch else SUM_KEYS) + router_sum_keys(model_cfg)


def router_sum_keys(model_cfg: Any) -> tuple[str, ...]:
  """The router sums of an MoE model (each times the pairs of its micro-batch): the load-balancing loss, the
  z-loss, the dropped fraction of assignments and, per MoE layer i, `router/load/layer_i` (max over mean
  assignments per expert; 1 = balanced). Empty for a dense model."""
  if not getattr(model_cfg, "num_experts", 0):
    return ()
  layers = tuple(f"router/load/layer_{i}" for i in moe.moe_layers(model_cfg))
  return ("router/aux", "router/z", "router/dropped") + layers


def router_coefs(loss_cfg: Mapping[str, Any], model_cfg: Any) -> tuple[float, float]:
  """(load-balancing, z-loss) coefficients of an MoE policy's router terms: `config.loss.router_aux_coef` (None:
  the checkpoint's `model.router_aux_loss_coef`, as TRL's DPOTrainer reads `router_aux_loss_coef`) and
  `config.loss.router_z_coef`."""
  aux = loss_cfg.get("router_aux_coef")
  aux = getattr(model_cfg, "router_aux_loss_coef", 0.0) if aux is None else aux
  return float(aux), float(loss_cfg.get("router_z_coef") or 0.0)


def _router_terms(router: Mapping[str, jax.Array] | None, weight: jax.Array, loss_cfg: Mapping[str, Any],
                  model_cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(the router terms of the objective, times `weight`, and their metric sums) from one forward's router sums
  (`moe.stack_router_sums`). The load-balancing loss is transformers' `load_balancing_loss_func` over the policy's
  forward with padding masked (TRL adds it to DPO's loss with `router_aux_loss_coef`), the z-loss ST-MoE's."""
  if router is None:
    return jnp.zeros((), jnp.float32), {}
  aux, z = moe.load_balancing_loss(router), moe.router_z_loss(router)
  aux_coef, z_coef = router_coefs(loss_cfg, model_cfg)
  load = moe.load_metrics(router)
  sums = {"router/aux": jax.lax.stop_gradient(aux) * weight, "router/z": jax.lax.stop_gradient(z) * weight,
          "router/dropped": load["dropped"].mean() * weight}
  for j, i in enumerate(moe.moe_layers(model_cfg)):
    sums[f"router/load/layer_{i}"] = load["max_over_mean"][j] * weight
  return (aux_coef * aux + z_coef * z) * weight, sums


def finalize_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from sums: per pair for the loss and accuracy, per side's units for rewards/logps (rewards/margins =
  their difference, which for pairs is the mean per-pair margin), per response token for `logits/*`, `entropy`
  (TRL's: the policy's mean per-token entropy over the responses, nats) and `mean_token_accuracy` (TRL's: the
  fraction of chosen tokens that are the logits' argmax; all completions for unpaired rows)."""
  pairs = jnp.maximum(sums["pairs"], 1.0)
  out = {k: sums[k] / pairs for k in ("loss", "rewards/accuracies")}
  for side in ("chosen", "rejected"):
    count = jnp.maximum(sums[f"count/{side}"], 1.0)
    for k in ("rewards", "logps"):
      out[f"{k}/{side}"] = sums[f"{k}/{side}"] / count
    out[f"logits/{side}"] = sums[f"logits/{side}"] / jnp.maximum(sums[f"tokens/{side}"], 1.0)
  out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
  out["entropy"] = sums["entropy"] / jnp.maximum(sums["tokens/entropy"], 1.0)
  out["mean_token_accuracy"] = sums["top1"] / jnp.maximum(sums["tokens/top1"], 1.0)
  if "kl" in sums:
    out["kl"] = sums["kl"] / pairs
  out["num_pairs"] = sums["pairs"]
  out["num_tokens"] = sums["num_tokens"]
  out.update({k: v / pairs for k, v in sums.items() if k.startswith("router/")})  # per pair of the micro-batches
  return out


def _unit_weights(batch: Mapping[str, jax.Array], num_units: int) -> jax.Array:
  """`[num_units]` fp32 weights of the pairs (DPO) or rows (SFT): `pair_mask` (0 = padding), else ones."""
  if "pair_mask" in batch:
    return batch["pair_mask"].astype(jnp.float32)
  return jnp.ones((num_units,), jnp.float32)


def responses_per_unit(batch: Mapping[str, jax.Array]) -> int:
  """K: rows per preference unit. 2 for pairs (chosen, rejected); ranked batches carry `response_mask` `[B, K]`."""
  return batch["response_mask"].shape[1] if "response_mask" in batch else 2


def _pair_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
  return _unit_weights(batch, batch["input_ids"].shape[0] // responses_per_unit(batch))


def step_units(batch: Mapping[str, jax.Array]) -> int:
  """Units `microbatches` cuts a DPO batch into, whole: packed rows R (each with its P pairs), else pairs (or
  ranked sets) `[rows / K]`."""
  if "pack_slots" in batch:
    if "response_mask" in batch:
      raise ValueError("packed batches hold pairs; ranked data (response_mask) is not packed. Set "
                       "--config.data.packing=False.")
    return batch["input_ids"].shape[0]
  return batch["input_ids"].shape[0] // responses_per_unit(batch)


def scored_logps(seq: logprobs.SequenceLogps, ld_alpha: float | None) -> jax.Array:
  """The `[N]` sequence log-probs a loss sees: the plain sums, or LD-DPO's front + ld_alpha * tail
  (`losses.ld_logps`; applied to policy and reference alike, as TRL does)."""
  return seq.logps if ld_alpha is None else losses.ld_logps(seq.logps, seq.front_logps, ld_alpha)


def reference_sequence_logps(model: Any, reference_params: Any, batch: Mapping[str, jax.Array], *,
                             ld_alpha: float | None = None) -> jax.Array:
  """pi_ref's `[N]` sequence log-probs (nats) of a batch, as the loss sees them (`scored_logps`): one forward with
  no gradient and none of the metric sums. The reference cache and `stage=precompute` store exactly these."""
  front = None if ld_alpha is None else logprobs.pair_front_lengths(batch)
  seq = logprobs.sequence_logps(model, jax.lax.stop_gradient(reference_params), batch, front_lengths=front,
                                extras=False)
  return scored_logps(seq, ld_alpha)


def reference_logps(model: Any, reference_params: Any | None, batch: Mapping[str, jax.Array], *,
                    needed: bool = True, ld_alpha: float | None = None) -> jax.Array | None:
  """Reference log-probs `[B, K]` (K = 2: chosen, rejected): precomputed in the batch, or one frozen forward.

  `needed=False` (a reference-free loss): None, and no reference forward is traced at all. Precomputed values
  were stored with the run's `ld_alpha` already applied (the reference cache keys on it).
  """
  if not needed:
    return None
  if reference_params is None:
    if "ref_chosen_logps" not in batch:
      raise ValueError("reference_params is None but the batch has no ref_chosen_logps/ref_rejected_logps.")
    return jnp.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]], axis=1).astype(jnp.float32)
  logps = reference_sequence_logps(model, reference_params, batch, ld_alpha=ld_alpha)
  return logprobs.split_units(logps, responses_per_unit(batch))


def _unit_losses(logps_N: jax.Array, policy: logprobs.SequenceLogps, ref_BxK: jax.Array | None,
                 batch: Mapping[str, jax.Array], loss_cfg: Mapping[str, Any], fields: Mapping[str, Any],
                 reward_shift: jax.Array | None = None):
  """(losses `[B]`, rewards of the first / last response `[B]`, index of the last valid response `[B]`).

  Pairs: `losses.preference_loss` of the configured type on `logps_N` (`scored_logps`: LD-DPO applied), times
  WPO's pair weight when `use_weighting`. Ranked batches (`response_mask` `[B, K]`, best first): the seed's
  Plackett-Luce loss; the first and last valid responses then play chosen and rejected in the metrics, so K = 2
  gives exactly the pair metrics. An unpaired type (KTO, BCO) on paired data (held-out pairs) is scored with the
  DPO sigmoid loss: its own loss needs unpaired rows. `fields`: `losses.ablation_fields(loss_cfg)`.
  `reward_shift`: BCO's delta (nats) when the trainer keeps it.
  """
  k = responses_per_unit(batch)
  logps = logprobs.split_units(logps_N, k)
  if "response_mask" not in batch:
    loss_type, options = losses.from_config(loss_cfg)
    if isinstance(loss_type, str) and losses.is_unpaired(loss_type):
      loss_type, options = "sigmoid", {}
    elif reward_shift is not None:
      options = dict(options, delta=reward_shift)
    tokens = logprobs.split_units(policy.num_tokens, k)
    ref_c, ref_r = (None, None) if ref_BxK is None else (ref_BxK[:, 0], ref_BxK[:, 1])
    unit_losses, chosen_rewards, rejected_rewards = losses.preference_loss(
        loss_type, logps[:, 0], logps[:, 1], ref_c, ref_r, beta=loss_cfg["beta"],
        label_smoothing=loss_cfg["label_smoothing"], chosen_num_tokens=tokens[:, 0], rejected_num_tokens=tokens[:, 1],
        **options)
    if fields["use_weighting"]:
      raw = logprobs.split_units(policy.logps, k)
      log_sum_sq = logprobs.split_units(policy.log_sum_sq_sum, k)
      unit_losses = unit_losses * losses.wpo_pair_weights(raw[:, 0], log_sum_sq[:, 0], tokens[:, 0], raw[:, 1],
                                                          log_sum_sq[:, 1], tokens[:, 1])
    return unit_losses, chosen_rewards, rejected_rewards, jnp.ones(logps.shape[:1], jnp.int32)
  if loss_cfg["type"] != losses.RANKING_LOSS or loss_cfg.get("types"):
    raise ValueError(f"ranked data (responses + ranking) trains with config.loss.type={losses.RANKING_LOSS!r}; got "
                     f"{loss_cfg['type']!r}. Set --config.loss.type={losses.RANKING_LOSS}.")
  valid = batch["response_mask"] > 0
  unit_losses = losses.plackett_luce_loss(logps, ref_BxK, beta=loss_cfg["beta"], valid_BxK=valid)
  rewards = jax.lax.stop_gradient(loss_cfg["beta"] * (logps - ref_BxK))
  last = jnp.maximum(valid.sum(-1) - 1, 1)
  worst = jnp.take_along_axis(rewards, last[:, None], axis=1)[:, 0]
  return unit_losses, rewards[:, 0], worst, last


REWARD_SHIFT = "reward_shift"  # dpo_loss's sums: BCO's running reward mean after this batch (not summed)


def _unpaired_sums(logps_N: jax.Array, policy: logprobs.SequenceLogps, ref_BxK: jax.Array,
                   batch: Mapping[str, jax.Array], loss_cfg: Mapping[str, Any], fields: Mapping[str, Any],
                   reward_shift: Any):
  """(weighted loss sum, metric sums) of an unpaired batch: unit b holds row b's completion (slot 0) and its KL
  completion (slot 1, another row's completion under this prompt), `desirable` `[B]` its label.

  KTO (Ethayarajh 2024 eq. 7), APO-zero unpaired and BCO (Jung 2024) via `losses.unpaired_loss`; BCO's reward
  shift is the running mean of every reward seen so far, this batch's included (`reward_shift`, a
  `losses.RunningMean`; None keeps config.loss.options.delta fixed, as in evaluation)."""
  loss_type, options = losses.from_config(loss_cfg)
  beta = loss_cfg["beta"]
  w = _pair_weights(batch)
  d = (batch["desirable"] > 0).astype(jnp.float32)
  logps = logprobs.split_units(logps_N, 2)
  rewards = jax.lax.stop_gradient(beta * (logps[:, 0] - ref_BxK[:, 0]))
  new_shift = None
  delta = options.get("delta", 0.0)
  if reward_shift is not None:
    new_shift = losses.bco_running_update(reward_shift, logps[:, 0], ref_BxK[:, 0], w, beta=beta)
    delta = new_shift.mean
  unit_losses, _, kl = losses.unpaired_loss(
      loss_type, logps[:, 0], ref_BxK[:, 0], logps[:, 1], ref_BxK[:, 1], d, w, beta=beta,
      desirable_weight=fields["desirable_weight"], undesirable_weight=fields["undesirable_weight"], delta=delta)
  tokens = logprobs.split_units(policy.num_tokens, 2)[:, 0]
  first = lambda x_N: jax.lax.stop_gradient(logprobs.split_units(x_N, 2)[:, 0])
  wsum = lambda x: jnp.sum(x * w)
  sums = {
      "pairs": jnp.sum(w), "loss": wsum(unit_losses),
      "count/chosen": wsum(d), "count/rejected": wsum(1.0 - d),
      "rewards/chosen": wsum(d * rewards), "rewards/rejected": wsum((1.0 - d) * rewards),
      # The implicit reward's sign agrees with the label (KTO has no pairs to compare).
      "rewards/accuracies": wsum(jnp.where(d > 0, rewards > 0, rewards < 0).astype(jnp.float32)),
      "logps/chosen": wsum(d * first(logps_N)), "logps/rejected": wsum((1.0 - d) * first(logps_N)),
      "logits/chosen": wsum(d * first(policy.logits_sum)), "logits/rejected": wsum((1.0 - d) * first(policy.logits_sum)),
      "tokens/chosen": wsum(d * tokens), "tokens/rejected": wsum((1.0 - d) * tokens),
      "num_tokens": jnp.sum(logprobs.split_units(logprobs.sequence_lengths(batch), 2).sum(-1) * w),
      "entropy": wsum(first(policy.entropy_sum)), "tokens/entropy": wsum(tokens),
      "top1": wsum(first(policy.top1_sum)), "tokens/top1": wsum(tokens),
      "kl": kl * jnp.sum(w),
  }
  return sums, new_shift


def dpo_loss(params: Any, ref_BxK: jax.Array | None, batch: Mapping[str, jax.Array], *,
             model: Any, loss_cfg: Mapping[str, Any], total_weight: jax.Array, reward_shift: Any = None):
  """(sum of weighted unit losses / total_weight, metric sums) for the policy `params` (argument 0).

  `ref_BxK`: `reference_logps(...)` (None for reference-free types). A unit is a pair, a ranked set of K, or an
  unpaired row with its KL completion (`desirable` in the batch). `reward_shift`: BCO's running reward mean
  (`losses.RunningMean`) before this batch; the sums then hold the updated one under `REWARD_SHIFT`.
  """
  fields = losses.ablation_fields(loss_cfg)
  ld_alpha = fields["ld_alpha"]
  if ld_alpha is not None and ("response_mask" in batch or "desirable" in batch):
    raise ValueError("config.loss.ld_alpha (LD-DPO) weighs a pair's two responses past the shorter one's length; "
                     "ranked and unpaired data have no such pair. Leave config.loss.ld_alpha unset.")
  front = None if ld_alpha is None else logprobs.pair_front_lengths(batch)
  model_cfg = getattr(model, "cfg", None)
  policy, router = logprobs.sequence_logps(model, params, batch, front_lengths=front, router=True)
  logps_N = scored_logps(policy, ld_alpha)
  if "desirable" in batch:
    sums, new_shift = _unpaired_sums(logps_N, policy, ref_BxK, batch, loss_cfg, fields, reward_shift)
    if new_shift is not None:
      sums[REWARD_SHIFT] = new_shift
    router_loss, router_sums = _router_terms(router, sums["pairs"], loss_cfg, model_cfg)
    sums.update(router_sums)
    return (sums["loss"] + router_loss) / total_weight, sums
  k = responses_per_unit(batch)
  shift, new_shift = None, None
  if reward_shift is not None:  # bco_pair: the running mean over both responses' rewards, this batch's included
    new_shift = losses.bco_running_update(reward_shift, logps_N, ref_BxK.reshape(-1),
                                          jnp.repeat(_pair_weights(batch), k), beta=loss_cfg["beta"])
    shift = new_shift.mean
  pair_losses, chosen_rewards, rejected_rewards, last = _unit_losses(logps_N, policy, ref_BxK, batch, loss_cfg,
                                                                     fields, shift)
  first_and_last = lambda x_N: (logprobs.split_units(x_N, k)[:, 0],
                                jnp.take_along_axis(logprobs.split_units(x_N, k), last[:, None], axis=1)[:, 0])
  pc, pr = first_and_last(logps_N)
  tokens_c, tokens_r = first_and_last(policy.num_tokens)
  w = _pair_weights(batch)
  logits_c, logits_r = first_and_last(policy.logits_sum)
  seq_len = logprobs.split_units(logprobs.sequence_lengths(batch), k).sum(-1)
  valid_BxK = batch["response_mask"] > 0 if "response_mask" in batch else jnp.ones((w.shape[0], k), bool)
  per_unit = lambda x_N: (logprobs.split_units(x_N, k) * valid_BxK).sum(-1)  # every valid response of a unit
  wsum = lambda x: jnp.sum(x * w)
  sums = {
      "pairs": jnp.sum(w),
      "loss": wsum(pair_losses),
      "count/chosen": jnp.sum(w),
      "count/rejected": jnp.sum(w),
      "rewards/chosen": wsum(chosen_rewards),
      "rewards/rejected": wsum(rejected_rewards),
      "rewards/accuracies": wsum((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "logps/chosen": wsum(jax.lax.stop_gradient(pc)),
      "logps/rejected": wsum(jax.lax.stop_gradient(pr)),
      "logits/chosen": wsum(jax.lax.stop_gradient(logits_c)),
      "logits/rejected": wsum(jax.lax.stop_gradient(logits_r)),
      "tokens/chosen": wsum(tokens_c),
      "tokens/rejected": wsum(tokens_r),
      "num_tokens": wsum(seq_len),  # prompt + response tokens processed, for throughput
      "entropy": wsum(per_unit(policy.entropy_sum)),
      "tokens/entropy": wsum(per_unit(policy.num_tokens)),
      "top1": wsum(logprobs.split_units(policy.top1_sum, k)[:, 0]),
      "tokens/top1": wsum(tokens_c),
  }
  if new_shift is not None:
    sums[REWARD_SHIFT] = new_shift
  # MoE: the router's terms (`_router_terms`) join every loss type's objective; sums["loss"] stays the preference
  # loss alone (logged as `loss`, the router terms as `router/*`).
  router_loss, router_sums = _router_terms(router, sums["pairs"], loss_cfg, model_cfg)
  sums.update(router_sums)
  return (sums["loss"] + router_loss) / total_weight, sums


def microbatches(batch: Mapping[str, jax.Array], num_micro: int, num_units: int,
                 shard: sharding_lib.ShardingContext | None) -> dict[str, jax.Array]:
  """Split a batch of `num_units` pairs (DPO), packed rows (packed DPO) or rows (SFT) into
  `[num_micro, num_units / num_micro, ...]`; micro-batch m holds units m, m + A, m + 2A, ...

  Strided units keep every device's share of each micro-batch equal when the unit axis is sharded, and
  never split a (chosen, rejected) pair, nor a packed row from its P pair slots.
  """
  if num_units % num_micro:
    raise ValueError(f"config.optim.grad_accum_steps={num_micro} must divide the batch of {num_units} units (pairs, "
                     f"or packed rows = config.batch_size / config.data.pairs_per_row).")
  out = {}
  for k, x in batch.items():
    rows_per_unit = x.shape[0] // num_units  # 2 for DPO sequence rows, 1 for per-pair fields and SFT rows
    x = x.reshape((num_units // num_micro, num_micro, rows_per_unit) + x.shape[1:]).swapaxes(0, 1)
    x = x.reshape((num_micro, (num_units // num_micro) * rows_per_unit) + x.shape[3:])
    out[k] = sharding_lib.constrain(x, (None, "batch") + (None,) * (x.ndim - 2), shard)
  return out


MICRO_STEP = "micro_step"  # [] int32 in each micro-batch of an accumulated step: its index


def _accumulate_and_update(state: TrainState, batch: Mapping[str, jax.Array], grads_and_sums, *, num_units: int,
                           sum_keys: tuple[str, ...], optimizer: optax.GradientTransformation,
                           grad_accum_steps: int, shard: sharding_lib.ShardingContext | None, carry: Any = ()):
  """Sum grads and metric sums over micro-batches (a scan), then one optimizer update.

  `grads_and_sums(mb, carry) -> (grads, sums, carry)`: `carry` threads state from one micro-batch to the next
  (BCO's running reward mean); returns (state, sums, grad_norm, final carry)."""
  if grad_accum_steps == 1:
    grads, sums, carry = grads_and_sums(batch, carry)
  else:
    def body(acc, mb):
      grads, sums, c = grads_and_sums(mb, acc[2])
      return (*jax.tree.map(jnp.add, acc[:2], (grads, sums)), c), None
    zeros = (jax.tree.map(jnp.zeros_like, state.params), {k: jnp.zeros((), jnp.float32) for k in sum_keys}, carry)
    micro = microbatches(batch, grad_accum_steps, num_units, shard)
    micro[MICRO_STEP] = jnp.arange(grad_accum_steps, dtype=jnp.int32)  # e.g. for a fresh dropout key per micro-batch
    (grads, sums, carry), _ = jax.lax.scan(body, zeros, micro)
  grad_norm = optax.tree.norm(grads)  # before clipping, as the HF Trainer logs it
  return apply_gradients(state, grads, optimizer), sums, grad_norm, carry


class ShiftState(NamedTuple):
  """Optimizer state with BCO's running reward mean beside it (`with_reward_shift`)."""
  inner: Any
  shift: Any  # losses.RunningMean: count and mean (nats) of every reward seen


def with_reward_shift(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` whose state also holds BCO's running reward mean (Jung et al. 2024; TRL's RunningMoments), so
  checkpoints, shardings and resumption carry it with no change to `TrainState`. Its update passes the mean
  through untouched; `train_step` writes the new one after each step."""
  def init(params):
    return ShiftState(optimizer.init(params), losses.running_mean_init())

  def update(updates, state, params=None):
    updates, inner = optimizer.update(updates, state.inner, params)
    return updates, ShiftState(inner, state.shift)

  return optax.GradientTransformation(init, update)


def keeps_reward_shift(loss_cfg: Mapping[str, Any]) -> bool:
  """Whether the DPO step keeps BCO's running reward shift: loss type 'bco' (unpaired), or 'bco_pair' with
  config.loss.options.delta unset (set, it is a fixed shift)."""
  loss_type, options = losses.from_config(loss_cfg)
  return loss_type == "bco" or (loss_type == "bco_pair" and "delta" not in options)


def apply_gradients(state: TrainState, grads: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """One optimizer update of `state` with `grads` (a pytree like its params)."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)


def lora_policy(adapters: Any, base: Any, spec: lora_lib.LoraSpec | None, rng: jax.Array | None = None) -> Any:
  """The policy's params: `adapters` themselves without LoRA (full fine-tuning), else `LoraParams` over the
  frozen base (`stop_gradient`: no gradient is ever taken through it)."""
  if spec is None:
    return adapters
  return lora_lib.LoraParams(jax.lax.stop_gradient(base), adapters, spec, rng)


def train_step(state: TrainState, reference_params: Any | None, batch: Mapping[str, jax.Array], *, model: Any,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, loss_cfg: Mapping[str, Any],
               grad_accum_steps: int = 1, shard: sharding_lib.ShardingContext | None = None,
               lora: lora_lib.LoraSpec | None = None, seed: int = 0):
  """One DPO optimizer update from one global batch (accumulated over `grad_accum_steps` micro-batches).

  `lora`: train adapters (`state.params`) over the frozen base `reference_params` (module docstring); their
  dropout draws from `seed` folded with the step. `reference_params` may also be `LoraParams(base, ref_adapters,
  lora)`: TR-DPO's moving reference as a second, frozen set of adapters (dpo_jax/train/reference_update.py); the
  policy's base is then its `base` and pi_ref's forward applies `ref_adapters` without dropout."""
  total_weight = jnp.maximum(jnp.sum(_pair_weights(batch)), 1.0)
  needed = losses.needs_reference(losses.from_config(loss_cfg)[0])
  reference = base = reference_params
  rng = None
  if lora is not None:
    if reference_params is None:
      raise ValueError("train_step(lora=...): pass the frozen base params as reference_params.")
    if isinstance(reference_params, lora_lib.LoraParams):  # TR-DPO: pi_ref = base + the moving reference adapters
      if reference_params.spec != lora or reference_params.rng is not None:
        raise ValueError("train_step(lora=spec): a LoraParams reference must have the same spec and no dropout rng.")
      base = reference_params.base
    if "ref_chosen_logps" in batch:  # precomputed pi_ref log-probs: no reference forward
      reference = None
    if lora.dropout:
      rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss(trainable, ref_BxK, mb, shift):
    mb_rng = None if rng is None else jax.random.fold_in(rng, mb.get(MICRO_STEP, 0))
    return dpo_loss(lora_policy(trainable, base, lora, mb_rng), ref_BxK, mb, model=model,
                    loss_cfg=loss_cfg, total_weight=total_weight, reward_shift=shift)

  loss_and_grad = jax.value_and_grad(loss, has_aux=True)
  ld_alpha = losses.ablation_fields(loss_cfg)["ld_alpha"]
  # BCO: the running reward mean lives in the optimizer state (`with_reward_shift`) and is threaded through the
  # micro-batches, each updating it before its loss (TRL updates it per forward).
  shift = state.opt_state.shift if isinstance(state.opt_state, ShiftState) else None

  def grads_and_sums(mb, carry):
    ref_BxK = reference_logps(model, reference, mb, needed=needed, ld_alpha=ld_alpha)
    (_, sums), grads = loss_and_grad(state.params, ref_BxK, mb, carry if shift is not None else None)
    sums = dict(sums)
    new = sums.pop(REWARD_SHIFT, None)
    return grads, sums, (carry if new is None else new)

  new_state, sums, grad_norm, shift = _accumulate_and_update(
      state, batch, grads_and_sums, num_units=step_units(batch),
      optimizer=optimizer, grad_accum_steps=grad_accum_steps, shard=shard, carry=() if shift is None else shift,
      sum_keys=sum_keys(batch, getattr(model, "cfg", None)))
  metrics = finalize_metrics(sums)
  if isinstance(new_state.opt_state, ShiftState):
    new_state = new_state._replace(opt_state=ShiftState(new_state.opt_state.inner, shift))
    metrics["reward_shift"] = shift.mean  # BCO's delta after this step (nats)
  metrics["grad_norm"] = grad_norm
  metrics["learning_rate"] = schedule(state.step)  # the rate this update used
  return new_state, metrics


# ---- SFT: the seed's pi_ref = argmax_pi E log pi(y_w | x), when no SFT model exists ----

SFT_SUM_KEYS = ("rows", "nll", "tokens", "num_tokens")


def sft_loss(params: Any, batch: Mapping[str, jax.Array], *, model: Any, total_tokens: jax.Array,
             loss_cfg: Mapping[str, Any] | None = None):
  """Negative log-likelihood of the response tokens (chosen only), summed / `total_tokens` (nats per token).

  SFT batches are `[B, T]` rows in the same format as DPO rows, with `pair_mask` `[B]` marking padding rows.
  Unpaired (KTO) rows train only where `desirable`: the seed's SFT fits the preferred answers. An MoE model adds
  its router terms (`_router_terms`, weighted by this micro-batch's scored tokens; coefficients from `loss_cfg`'s
  router fields, default the checkpoint's), as the HF Trainer does for an MoE model that outputs router logits:
  without them SFT lets the router collapse onto a few experts before DPO starts.
  """
  out, router = logprobs.sequence_logps(model, params, batch, extras=False, router=True)
  w = _sft_weights(batch)
  sums = {
      "rows": jnp.sum(w),
      "nll": -jnp.sum(out.logps * w),
      "tokens": jnp.sum(out.num_tokens * w),
      "num_tokens": jnp.sum((batch["attention_mask"] > 0).sum(-1) * w),
  }
  router_loss, router_sums = _router_terms(router, sums["tokens"], loss_cfg or {}, getattr(model, "cfg", None))
  sums.update(router_sums)
  return (sums["nll"] + router_loss) / total_tokens, sums


def finalize_sft_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  nll_per_token = sums["nll"] / jnp.maximum(sums["tokens"], 1.0)
  out = {"loss": nll_per_token, "nll/sequence": sums["nll"] / jnp.maximum(sums["rows"], 1.0),
         "perplexity": jnp.exp(nll_per_token), "num_rows": sums["rows"], "num_tokens": sums["num_tokens"]}
  out.update({k: v / jnp.maximum(sums["tokens"], 1.0) for k, v in sums.items() if k.startswith("router/")})
  return out


def _sft_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
  """`[B]` fp32 weights of SFT rows: not padding (`pair_mask`) and, for unpaired rows, `desirable`."""
  w = _unit_weights(batch, batch["input_ids"].shape[0])
  return w * (batch["desirable"] > 0).astype(jnp.float32) if "desirable" in batch else w


def _scored_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
  w = _sft_weights(batch)
  return jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:].sum(-1) * w), 1.0)


def sft_train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: Any,
                   optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int = 1,
                   shard: sharding_lib.ShardingContext | None = None, loss_cfg: Mapping[str, Any] | None = None):
  """One SFT update: maximum likelihood of the preferred responses, token-averaged over the global batch
  (`loss_cfg`: config.loss, read only for an MoE model's router coefficients)."""
  loss_and_grad = jax.value_and_grad(
      functools.partial(sft_loss, model=model, total_tokens=_scored_tokens(batch), loss_cfg=loss_cfg), has_aux=True)

  def grads_and_sums(mb, carry):
    (_, sums), grads = loss_and_grad(state.params, mb)
    return grads, sums, carry

  new_state, sums, grad_norm, _ = _accumulate_and_update(
      state, batch, grads_and_sums, num_units=batch["input_ids"].shape[0],
      sum_keys=SFT_SUM_KEYS + router_sum_keys(getattr(model, "cfg", None)),
      optimizer=optimizer, grad_accum_steps=grad_accum_steps, shard=shard)
  metrics = finalize_sft_metrics(sums)
  metrics["grad_norm"] = grad_norm
  metrics["learning_rate"] = schedule(state.step)
  return new_state, metrics


def sft_eval_sums(params: Any, batch: Mapping[str, jax.Array], *, model: Any,
                  loss_cfg: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
  return sft_loss(params, batch, model=model, total_tokens=jnp.float32(1.0), loss_cfg=loss_cfg)[1]


def eval_sums(params: Any, reference_params: Any | None, batch: Mapping[str, jax.Array], *, model: Any,
              loss_cfg: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Metric sums for one batch (sum them over batches, then `finalize_metrics`)."""
  needed = losses.needs_reference(losses.from_config(loss_cfg)[0])
  ref = reference_logps(model, reference_params, batch, needed=needed,
                        ld_alpha=losses.ablation_fields(loss_cfg)["ld_alpha"])
  _, sums = dpo_loss(params, ref, batch, model=model, loss_cfg=loss_cfg, total_weight=jnp.float32(1.0))
  return sums


def eval_step(params: Any, reference_params: Any | None, batch: Mapping[str, jax.Array], *, model: Any,
              loss_cfg: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The train step's metrics (without grad_norm / learning_rate) for `params`, with no update."""
  return finalize_metrics(eval_sums(params, reference_params, batch, model=model, loss_cfg=loss_cfg))


# ---- state creation and jitting with declared shardings ----

def param_shardings(model_cfg: model_lib.ModelConfig, mesh: Mesh, rules: sharding_lib.Rules) -> Any:
  """NamedShardings of the params, from their logical axes and the rules."""
  return sharding_lib.tree_shardings(mesh, rules, model_lib.param_logical_axes(model_cfg),
                                     model_lib.abstract_params(model_cfg))


def state_shardings(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding_lib.Rules) -> TrainState:
  """NamedShardings for every leaf of the TrainState: params by their logical axes, optimizer moments
  like their params, counters replicated."""
  return _state_shardings(param_shardings(model_cfg, mesh, rules), model_lib.abstract_params(model_cfg), optimizer,
                          mesh)


def adapter_shardings(model: Any, spec: lora_lib.LoraSpec, mesh: Mesh, rules: sharding_lib.Rules) -> Any:
  """NamedShardings of LoRA adapters: each follows the logical axes of the kernel it adapts (rank replicated)."""
  return sharding_lib.tree_shardings(mesh, rules, lora_lib.adapter_logical_axes(model, spec),
                                     lora_lib.abstract_adapters(model, spec))


def lora_state_shardings(model: Any, spec: lora_lib.LoraSpec, optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules: sharding_lib.Rules) -> TrainState:
  """`state_shardings` of a LoRA run, whose state holds the adapters (and their moments) only."""
  return _state_shardings(adapter_shardings(model, spec, mesh, rules), lora_lib.abstract_adapters(model, spec),
                          optimizer, mesh)


def _state_shardings(params: Any, abstract_params: Any, optimizer: optax.GradientTransformation,
                     mesh: Mesh) -> TrainState:
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params,
                                    transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt_state)


def create_train_state(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState | None = None, *,
                       donate: bool = False) -> TrainState:
  """A fresh state whose params are a COPY of `params` (the reference keeps its own buffers: the train
  step donates the state, and must never free the reference). `donate=True` hands `params` over instead (no
  copy; the caller's arrays are deleted): for runs that keep no reference (reference-free losses).

  `shardings=None`: every leaf whole on the first device (a 1-device mesh), for a notebook or a single-device
  script that has no mesh; otherwise the state is created straight into `shardings` (`state_shardings`)."""
  def init(p):
    if not donate:
      p = jax.tree.map(lambda x: jnp.array(x, copy=True), p)
    return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))
  if shardings is None:  # one NamedSharding serves as the prefix of every leaf, in and out
    params_shardings = out_shardings = NamedSharding(sharding_lib.make_mesh({"data": 1}, jax.devices()[:1]),
                                                     PartitionSpec())
  else:
    params_shardings, out_shardings = shardings.params, shardings
  return jax.jit(init, in_shardings=(params_shardings,), out_shardings=out_shardings,
                 donate_argnums=(0,) if donate else ())(params)


def jit_train_step(step_fn, *, state_shardings: TrainState, reference_shardings: Any, batch_shardings: Any,
                   mesh: Mesh):
  """jit with explicit in/out shardings; only the state (argument 0) is donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, reference_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_eval_step(eval_fn, *, param_shardings: Any, reference_shardings: Any, batch_shardings: Any, mesh: Mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(eval_fn, in_shardings=(param_shardings, reference_shardings, batch_shardings),
                 out_shardings=replicated)
