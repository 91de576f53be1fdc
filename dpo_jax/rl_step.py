"""The RL updates on one rollout batch, each a pure function `(state, batch, rng) -> (state, metrics)`:

  ppo_step     PPO with a learned value model (Schulman et al. 2017; Ziegler et al. 2019's RLHF recipe as TRL's
               PPO trainer and the 'N+ implementation details' paper run it): per-token KL-shaped rewards, GAE,
               whitened advantages, the clipped policy and value losses, one optimizer over policy and value.
  group_step   critic-free GRPO or RLOO: the sequence reward score - kl_coef * KL, advantages relative to the
               other samples of the same prompt (`rl.ADVANTAGES`), the same clipped policy loss.

Both run `epochs` passes over the batch in `num_minibatches` shuffled minibatches as nested `lax.scan`s (purejaxrl's
shape), so one call is one compiled program. The batch is a `rollout.Rollout`'s fields plus `scores` `[B]` (the
reward of each response, already normalised and penalised as the run wants) and `kl_coef` `[]` (an array, so the
adaptive controller changes it without a recompile). The rollout's `logps` are pi_old's: the update's first
minibatch sees ratio 1 exactly, because both come from the same teacher-forced forward (`rollout`).

Value (and reward) models are params `{"backbone": decoder params, "head": {"kernel": [D], "bias": []}}`: a
decoder whose LM head is replaced by a scalar read-out (`train/reward_model.py` trains one of these).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax import logprobs, model as model_lib, rl, rollout as rollout_lib, sharding as sharding_lib, step

ROLLOUT_KEYS = ("input_ids", "positions", "attention_mask", "response_mask", "logps", "ref_logps")


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """The static settings of an update (hashable: they are compiled in). Defaults: TRL's PPO trainer / N+ paper."""
  epochs: int = 4  # passes over each rollout batch
  num_minibatches: int = 8  # minibatches per pass (the batch must divide by it)
  clip: float = 0.2  # PPO ratio clip eps
  value_clip: float = 0.2  # value clip around the rollout's values
  vf_coef: float = 0.1  # weight of the value loss in PPO's single loss
  gamma: float = 1.0  # discount
  lam: float = 0.95  # GAE lambda
  whiten_advantages: bool = True  # PPO: (A - mean) / std over the batch's real tokens
  kl_estimator: str = "k1"  # per-token KL in the reward: 'k1' (unbiased for the sequence KL) or 'k3'
  kl_in_loss: bool = False  # True: no KL in the reward; kl_coef * mean k3(pi, pi_ref) added to the loss instead
  advantage: str = "grpo"  # group_step: 'grpo' or 'rloo'
  group_size: int = 8  # group_step: consecutive samples of one prompt

  def __post_init__(self):
    if self.kl_estimator not in rl.KL_ESTIMATORS:
      raise ValueError(f"RLSettings.kl_estimator={self.kl_estimator!r}; use one of {rl.KL_ESTIMATORS}.")
    if self.advantage not in rl.ADVANTAGES:
      raise ValueError(f"RLSettings.advantage={self.advantage!r}; use one of {tuple(rl.ADVANTAGES)}.")
    if self.epochs < 1 or self.num_minibatches < 1:
      raise ValueError(f"RLSettings: epochs={self.epochs} and num_minibatches={self.num_minibatches} must be >= 1.")


# ---- scalar-head models: the value model and the reward model ----

def scalar_head_model(backbone: Any, hidden_size: int) -> dict:
  """A value / reward model from decoder params (copied) and a zero head: every output starts at 0."""
  return {"backbone": jax.tree.map(jnp.array, backbone),
          "head": {"kernel": jnp.zeros((hidden_size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}}


def _read_out(params: Mapping[str, Any], hidden_BxNxD: jax.Array) -> jax.Array:
  return hidden_BxNxD.astype(jnp.float32) @ params["head"]["kernel"] + params["head"]["bias"]


def values(model: Any, params: Mapping[str, Any], seq: Any, num_new_tokens: int) -> jax.Array:
  """V(s_j) `[B, N]` fp32: the value of the state before response token j (the column that scores token j)."""
  return _read_out(params, rollout_lib.response_hidden(model, params["backbone"], seq, num_new_tokens))


def scores_at(model: Any, params: Mapping[str, Any], seq: Mapping[str, jax.Array], column_B: jax.Array) -> jax.Array:
  """A scalar-head model's output `[B]` fp32 read at column `column_B[b]` of row b (`input_ids`, `positions`,
  `attention_mask` `[B, T]`)."""
  hidden_BxTxD = model_lib.apply_params(model, params["backbone"], seq["input_ids"], seq["positions"],
                                        seq["attention_mask"], method="hidden")
  return _read_out(params, jnp.take_along_axis(hidden_BxTxD, column_B[:, None, None], axis=1))[:, 0]


def sequence_scores(model: Any, params: Mapping[str, Any], seq: Mapping[str, jax.Array]) -> jax.Array:
  """A reward model's score of each response `[B]` fp32, read at its last real token (the EOS when it has one)."""
  p = seq["input_ids"].shape[1] - seq["response_mask"].shape[1]
  return scores_at(model, params, seq, p - 1 + jnp.sum(seq["response_mask"] > 0, axis=1).astype(jnp.int32))


# ---- the update loop shared by both steps ----

def _minibatch_epochs(state: step.TrainState, data: Mapping[str, jax.Array], rng: jax.Array, loss_fn, *,
                      optimizer: optax.GradientTransformation, settings: RLSettings,
                      shard: sharding_lib.ShardingContext | None) -> tuple[step.TrainState, dict]:
  """`settings.epochs` shuffled passes of `settings.num_minibatches` updates; metrics averaged over the updates."""
  b = data["input_ids"].shape[0]
  if b % settings.num_minibatches:
    raise ValueError(f"rl_step: the rollout batch has {b} samples, not divisible by num_minibatches="
                     f"{settings.num_minibatches}.")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def minibatch(state, rows_M):
    mb = {k: sharding_lib.constrain(v[rows_M], ("batch",) + (None,) * (v.ndim - 1), shard) for k, v in data.items()}
    (_, metrics), grads = grad_fn(state.params, mb)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return step.apply_gradients(state, grads, optimizer), metrics

  def epoch(state, key):
    rows = jax.random.permutation(key, b).reshape(settings.num_minibatches, -1)
    return jax.lax.scan(minibatch, state, rows)

  state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, settings.epochs))
  return state, jax.tree.map(jnp.mean, metrics)


def _policy_terms(model: Any, policy: Any, mb: Mapping[str, jax.Array], settings: RLSettings,
                  kl_coef: jax.Array) -> tuple[jax.Array, dict]:
  """The clipped policy loss (+ the k3 KL term when it is in the loss) on a minibatch, and its metrics."""
  mask = mb["response_mask"]
  response_ids = mb["input_ids"][:, -mask.shape[1]:]
  logits_BxNxV = rollout_lib.response_logits(model, policy, mb, mask.shape[1])
  logps = logprobs.target_logps(logits_BxNxV, response_ids, mask)
  loss, stats = rl.ppo_policy_loss(logps, mb["logps"], mb["advantages"], mask, clip=settings.clip)
  metrics = {"policy/loss": loss, "policy/clip_frac": stats["clip_frac"], "policy/approx_kl": stats["approx_kl"],
             "policy/entropy": rl.masked_mean(rl.entropy(logits_BxNxV), mask)}
  if settings.kl_in_loss:
    kl_term = rl.masked_mean(rl.kl_per_token(logps, mb["ref_logps"], "k3"), mask)
    loss = loss + kl_coef * kl_term
    metrics["policy/k3_kl"] = kl_term
  return loss, metrics


def _rollout_metrics(batch: Mapping[str, jax.Array], kl_BxN: jax.Array) -> dict:
  mask = batch["response_mask"]
  seq_kl_B = jnp.sum(kl_BxN * mask, axis=1)
  return {"rollout/score": jnp.mean(batch["scores"]), "rollout/kl": jnp.mean(seq_kl_B),
          "rollout/kl_coef": batch["kl_coef"], "rollout/length": jnp.mean(jnp.sum(mask, axis=1)),
          "rollout/non_score_reward": -batch["kl_coef"] * jnp.mean(seq_kl_B)}


def ppo_step(state: step.TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, model: Any,
             optimizer: optax.GradientTransformation, settings: RLSettings,
             shard: sharding_lib.ShardingContext | None = None) -> tuple[step.TrainState, dict]:
  """One PPO update on a rollout batch. `state.params = {"policy": decoder params, "value": scalar-head model}`.

  Rewards: `rl.token_rewards` (score at the last real token, -kl_coef * KL_t per token; no KL when
  `kl_in_loss`); values of the rollout states from the value model before any update; advantages and returns by
  `rl.gae`, advantages whitened. Loss per minibatch: `rl.ppo_policy_loss + vf_coef * rl.value_loss`.
  Metrics: rollout/* (score, KL, kl_coef, length), policy/* (loss, clip_frac, approx_kl, entropy),
  value/* (loss, clip_frac), grad_norm; means over the epochs x minibatches updates.
  """
  mask = batch["response_mask"]
  n = mask.shape[1]
  kl_coef = batch["kl_coef"]
  old_values = values(model, state.params["value"], batch, n) * mask
  kl = rl.kl_per_token(batch["logps"], batch["ref_logps"], settings.kl_estimator)
  rewards = rl.token_rewards(batch["scores"], kl, mask, 0.0 if settings.kl_in_loss else kl_coef)
  advantages, returns = rl.gae(rewards, old_values, mask, gamma=settings.gamma, lam=settings.lam)
  if settings.whiten_advantages:
    advantages = rl.masked_whiten(advantages, mask)
  data = {**{k: batch[k] for k in ROLLOUT_KEYS}, "advantages": advantages, "returns": returns,
          "old_values": old_values}

  def loss_fn(params, mb):
    loss, metrics = _policy_terms(model, params["policy"], mb, settings, kl_coef)
    v = values(model, params["value"], mb, n)
    vf_loss, vf_stats = rl.value_loss(v, mb["old_values"], mb["returns"], mb["response_mask"],
                                      clip=settings.value_clip)
    metrics.update({"value/loss": vf_loss, "value/clip_frac": vf_stats["clip_frac"]})
    return loss + settings.vf_coef * vf_loss, metrics

  state, metrics = _minibatch_epochs(state, data, rng, loss_fn, optimizer=optimizer, settings=settings, shard=shard)
  metrics.update(_rollout_metrics(batch, kl))
  metrics["value/mean"] = rl.masked_mean(old_values, mask)
  metrics["value/returns"] = rl.masked_mean(returns, mask)
  return state, metrics


def group_step(state: step.TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *, model: Any,
               optimizer: optax.GradientTransformation, settings: RLSettings,
               shard: sharding_lib.ShardingContext | None = None) -> tuple[step.TrainState, dict]:
  """One GRPO / RLOO update (`settings.advantage`) on a rollout batch of B / G prompts x G consecutive samples.

  Sequence rewards `rl.sequence_rewards` (score - kl_coef * sum_t KL_t; the score alone when `kl_in_loss`), the
  group advantage of each sample given to all its tokens, the clipped policy loss. `state.params`: the policy.
  """
  mask = batch["response_mask"]
  if settings.group_size < 2 or mask.shape[0] % settings.group_size:
    raise ValueError(f"group_step: group_size={settings.group_size} with {mask.shape[0]} samples: group advantages "
                     "compare each sample with the others of its prompt, so a group needs >= 2 samples and the batch "
                     "whole groups.")
  kl = rl.kl_per_token(batch["logps"], batch["ref_logps"], settings.kl_estimator)
  seq_rewards = rl.sequence_rewards(batch["scores"], kl, mask, 0.0 if settings.kl_in_loss else batch["kl_coef"])
  advantages_B = rl.ADVANTAGES[settings.advantage](seq_rewards, settings.group_size)
  data = {**{k: batch[k] for k in ROLLOUT_KEYS}, "advantages": advantages_B[:, None] * mask}

  def loss_fn(params, mb):
    return _policy_terms(model, params, mb, settings, batch["kl_coef"])

  state, metrics = _minibatch_epochs(state, data, rng, loss_fn, optimizer=optimizer, settings=settings, shard=shard)
  metrics.update(_rollout_metrics(batch, kl))
  metrics["rollout/advantage_abs"] = jnp.mean(jnp.abs(advantages_B))
  return state, metrics


# ---- jitting with declared shardings ----

def batch_shardings(mesh: Mesh, rules: sharding_lib.Rules) -> dict:
  """Every per-sample field split over the batch axes; `kl_coef` replicated."""
  rows = sharding_lib.named_sharding(mesh, rules, ("batch", None))
  out = {k: rows for k in ROLLOUT_KEYS}
  out.update(scores=sharding_lib.named_sharding(mesh, rules, ("batch",)), kl_coef=NamedSharding(mesh, PartitionSpec()))
  return out


def make_batch(ro: rollout_lib.Rollout, scores_B: jax.Array, kl_coef: float) -> dict:
  """The update's batch from a rollout, the responses' scores `[B]` and the KL coefficient."""
  return {**{k: getattr(ro, k) for k in ROLLOUT_KEYS}, "scores": jnp.asarray(scores_B, jnp.float32),
          "kl_coef": jnp.asarray(kl_coef, jnp.float32)}


def scalar_head_shardings(backbone_shardings: Any, mesh: Mesh) -> dict:
  replicated = NamedSharding(mesh, PartitionSpec())
  return {"backbone": backbone_shardings, "head": {"kernel": replicated, "bias": replicated}}


def ppo_state_shardings(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                        rules: sharding_lib.Rules) -> step.TrainState:
  """Shardings of a PPO state: the policy's params as training's, the value model's backbone the same."""
  decoder = step.param_shardings(model_cfg, mesh, rules)
  abstract = model_lib.abstract_params(model_cfg)
  head = jax.ShapeDtypeStruct((model_cfg.hidden_size,), jnp.float32)
  abstract_value = {"backbone": abstract, "head": {"kernel": head, "bias": jax.ShapeDtypeStruct((), jnp.float32)}}
  return step._state_shardings({"policy": decoder, "value": scalar_head_shardings(decoder, mesh)},
                               {"policy": abstract, "value": abstract_value}, optimizer, mesh)


def jit_rl_step(step_fn, *, state_shardings: step.TrainState, mesh: Mesh, rules: sharding_lib.Rules):
  """`step_fn(state, batch, rng)` jitted with explicit shardings; the state is donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings(mesh, rules), replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_ppo_step(model: Any, optimizer: optax.GradientTransformation, settings: RLSettings,
                  shard: sharding_lib.ShardingContext | None = None):
  return functools.partial(ppo_step, model=model, optimizer=optimizer, settings=settings, shard=shard)


def make_group_step(model: Any, optimizer: optax.GradientTransformation, settings: RLSettings,
                    shard: sharding_lib.ShardingContext | None = None):
  return functools.partial(group_step, model=model, optimizer=optimizer, settings=settings, shard=shard)
