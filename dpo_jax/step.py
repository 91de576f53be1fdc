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

from dpo_jax import logprobs, losses, lora as lora_lib, model as model_lib, sharding as sharding_lib

PAIR_KEYS = ("pair_mask", "row_ids", "ref_chosen_logps", "ref_rejected_logps")  # [B] per-pair fields


class TrainState(NamedTuple):
  step: jax.Array  # [] int32, optimizer updates applied so far
  params: Any  # policy params
  opt_state: Any


# Per-batch sums from which every metric is a ratio; summing them across micro-batches or eval batches
# and then dividing gives exact means over all pairs.
SUM_KEYS = ("pairs", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "tokens/chosen",
            "tokens/rejected", "num_tokens")


def finalize_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from sums: per pair for losses/rewards/logps, per response token for `logits/*`."""
  pairs = jnp.maximum(sums["pairs"], 1.0)
  out = {k: sums[k] / pairs for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                      "rewards/margins", "logps/chosen", "logps/rejected")}
  for side in ("chosen", "rejected"):
    out[f"logits/{side}"] = sums[f"logits/{side}"] / jnp.maximum(sums[f"tokens/{side}"], 1.0)
  out["num_pairs"] = sums["pairs"]
  out["num_tokens"] = sums["num_tokens"]
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


def reference_logps(model: Any, reference_params: Any | None, batch: Mapping[str, jax.Array], *,
                    needed: bool = True) -> jax.Array | None:
  """Reference log-probs `[B, K]` (K = 2: chosen, rejected): precomputed in the batch, or one frozen forward.

  `needed=False` (a reference-free loss): None, and no reference forward is traced at all.
  """
  if not needed:
    return None
  if reference_params is None:
    if "ref_chosen_logps" not in batch:
      raise ValueError("reference_params is None but the batch has no ref_chosen_logps/ref_rejected_logps.")
    return jnp.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]], axis=1).astype(jnp.float32)
  ref = logprobs.sequence_logps(model, jax.lax.stop_gradient(reference_params), batch)
  return logprobs.split_units(ref.logps, responses_per_unit(batch))


def _unit_losses(policy: logprobs.SequenceLogps, ref_BxK: jax.Array | None, batch: Mapping[str, jax.Array],
                 loss_cfg: Mapping[str, Any]):
  """(losses `[B]`, rewards of the first / last response `[B]`, index of the last valid response `[B]`).

  Pairs: `losses.preference_loss` of the configured type. Ranked batches (`response_mask` `[B, K]`, best first):
  the seed's Plackett-Luce loss; the first and last valid responses then play chosen and rejected in the
  metrics, so K = 2 gives exactly the pair metrics.
  """
  k = responses_per_unit(batch)
  logps = logprobs.split_units(policy.logps, k)
  if "response_mask" not in batch:
    loss_type, options = losses.from_config(loss_cfg)
    tokens = logprobs.split_units(policy.num_tokens, k)
    ref_c, ref_r = (None, None) if ref_BxK is None else (ref_BxK[:, 0], ref_BxK[:, 1])
    unit_losses, chosen_rewards, rejected_rewards = losses.preference_loss(
        loss_type, logps[:, 0], logps[:, 1], ref_c, ref_r, beta=loss_cfg["beta"],
        label_smoothing=loss_cfg["label_smoothing"], chosen_num_tokens=tokens[:, 0], rejected_num_tokens=tokens[:, 1],
        **options)
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


def dpo_loss(params: Any, ref_BxK: jax.Array | None, batch: Mapping[str, jax.Array], *,
             model: Any, loss_cfg: Mapping[str, Any], total_weight: jax.Array):
  """(sum of weighted unit losses / total_weight, metric sums) for the policy `params` (argument 0).

  `ref_BxK`: `reference_logps(...)` (None for reference-free types). A unit is a pair, or a ranked set of K.
  """
  policy = logprobs.sequence_logps(model, params, batch)
  k = responses_per_unit(batch)
  pair_losses, chosen_rewards, rejected_rewards, last = _unit_losses(policy, ref_BxK, batch, loss_cfg)
  first_and_last = lambda x_N: (logprobs.split_units(x_N, k)[:, 0],
                                jnp.take_along_axis(logprobs.split_units(x_N, k), last[:, None], axis=1)[:, 0])
  pc, pr = first_and_last(policy.logps)
  tokens_c, tokens_r = first_and_last(policy.num_tokens)
  w = _pair_weights(batch)
  logits_c, logits_r = first_and_last(policy.logits_sum)
  seq_len = logprobs.split_units(logprobs.sequence_lengths(batch), k).sum(-1)
  wsum = lambda x: jnp.sum(x * w)
  sums = {
      "pairs": jnp.sum(w),
      "loss": wsum(pair_losses),
      "rewards/chosen": wsum(chosen_rewards),
      "rewards/rejected": wsum(rejected_rewards),
      "rewards/accuracies": wsum((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margins": wsum(chosen_rewards - rejected_rewards),
      "logps/chosen": wsum(jax.lax.stop_gradient(pc)),
      "logps/rejected": wsum(jax.lax.stop_gradient(pr)),
      "logits/chosen": wsum(jax.lax.stop_gradient(logits_c)),
      "logits/rejected": wsum(jax.lax.stop_gradient(logits_r)),
      "tokens/chosen": wsum(tokens_c),
      "tokens/rejected": wsum(tokens_r),
      "num_tokens": wsum(seq_len),  # prompt + response tokens processed, for throughput
  }
  return sums["loss"] / total_weight, sums


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
                           grad_accum_steps: int, shard: sharding_lib.ShardingContext | None):
  """Sum grads and metric sums over micro-batches (a scan), then one optimizer update."""
  if grad_accum_steps == 1:
    grads, sums = grads_and_sums(batch)
  else:
    def body(carry, mb):
      return jax.tree.map(jnp.add, carry, grads_and_sums(mb)), None
    zeros = (jax.tree.map(jnp.zeros_like, state.params), {k: jnp.zeros((), jnp.float32) for k in sum_keys})
    micro = microbatches(batch, grad_accum_steps, num_units, shard)
    micro[MICRO_STEP] = jnp.arange(grad_accum_steps, dtype=jnp.int32)  # e.g. for a fresh dropout key per micro-batch
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
  grad_norm = optax.tree.norm(grads)  # before clipping, as the HF Trainer logs it
  return apply_gradients(state, grads, optimizer), sums, grad_norm


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
  dropout draws from `seed` folded with the step."""
  total_weight = jnp.maximum(jnp.sum(_pair_weights(batch)), 1.0)
  needed = losses.needs_reference(losses.from_config(loss_cfg)[0])
  reference = reference_params
  rng = None
  if lora is not None:
    if reference_params is None:
      raise ValueError("train_step(lora=...): pass the frozen base params as reference_params.")
    if "ref_chosen_logps" in batch:  # precomputed pi_ref log-probs: no reference forward
      reference = None
    if lora.dropout:
      rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss(trainable, ref_BxK, mb):
    mb_rng = None if rng is None else jax.random.fold_in(rng, mb.get(MICRO_STEP, 0))
    return dpo_loss(lora_policy(trainable, reference_params, lora, mb_rng), ref_BxK, mb, model=model,
                    loss_cfg=loss_cfg, total_weight=total_weight)

  loss_and_grad = jax.value_and_grad(loss, has_aux=True)

  def grads_and_sums(mb):
    (_, sums), grads = loss_and_grad(state.params, reference_logps(model, reference, mb, needed=needed), mb)
    return grads, sums

  new_state, sums, grad_norm = _accumulate_and_update(
      state, batch, grads_and_sums, num_units=step_units(batch), sum_keys=SUM_KEYS,
      optimizer=optimizer, grad_accum_steps=grad_accum_steps, shard=shard)
  metrics = finalize_metrics(sums)
  metrics["grad_norm"] = grad_norm
  metrics["learning_rate"] = schedule(state.step)  # the rate this update used
  return new_state, metrics


# ---- SFT: the seed's pi_ref = argmax_pi E log pi(y_w | x), when no SFT model exists ----

SFT_SUM_KEYS = ("rows", "nll", "tokens", "num_tokens")


def sft_loss(params: Any, batch: Mapping[str, jax.Array], *, model: Any, total_tokens: jax.Array):
  """Negative log-likelihood of the response tokens (chosen only), summed / `total_tokens` (nats per token).

  SFT batches are `[B, T]` rows in the same format as DPO rows, with `pair_mask` `[B]` marking padding rows.
  """
  out = logprobs.sequence_logps(model, params, batch)
  w = _unit_weights(batch, batch["input_ids"].shape[0])
  sums = {
      "rows": jnp.sum(w),
      "nll": -jnp.sum(out.logps * w),
      "tokens": jnp.sum(out.num_tokens * w),
      "num_tokens": jnp.sum((batch["attention_mask"] > 0).sum(-1) * w),
  }
  return sums["nll"] / total_tokens, sums


def finalize_sft_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  nll_per_token = sums["nll"] / jnp.maximum(sums["tokens"], 1.0)
  return {"loss": nll_per_token, "nll/sequence": sums["nll"] / jnp.maximum(sums["rows"], 1.0),
          "perplexity": jnp.exp(nll_per_token), "num_rows": sums["rows"], "num_tokens": sums["num_tokens"]}


def _scored_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
  w = _unit_weights(batch, batch["input_ids"].shape[0])
  return jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:].sum(-1) * w), 1.0)


def sft_train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: Any,
                   optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int = 1,
                   shard: sharding_lib.ShardingContext | None = None):
  """One SFT update: maximum likelihood of the preferred responses, token-averaged over the global batch."""
  loss_and_grad = jax.value_and_grad(
      functools.partial(sft_loss, model=model, total_tokens=_scored_tokens(batch)), has_aux=True)

  def grads_and_sums(mb):
    (_, sums), grads = loss_and_grad(state.params, mb)
    return grads, sums

  new_state, sums, grad_norm = _accumulate_and_update(
      state, batch, grads_and_sums, num_units=batch["input_ids"].shape[0], sum_keys=SFT_SUM_KEYS,
      optimizer=optimizer, grad_accum_steps=grad_accum_steps, shard=shard)
  metrics = finalize_sft_metrics(sums)
  metrics["grad_norm"] = grad_norm
  metrics["learning_rate"] = schedule(state.step)
  return new_state, metrics


def sft_eval_sums(params: Any, batch: Mapping[str, jax.Array], *, model: Any) -> dict[str, jax.Array]:
  return sft_loss(params, batch, model=model, total_tokens=jnp.float32(1.0))[1]


def eval_sums(params: Any, reference_params: Any | None, batch: Mapping[str, jax.Array], *, model: Any,
              loss_cfg: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Metric sums for one batch (sum them over batches, then `finalize_metrics`)."""
  needed = losses.needs_reference(losses.from_config(loss_cfg)[0])
  ref = reference_logps(model, reference_params, batch, needed=needed)
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
