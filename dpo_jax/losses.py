"""Preference losses: DPO and the equations it is derived from, read against the seed (Rafailov et al. 2023).

Seed equations and where they live:
  (1) Bradley-Terry   p*(y1 > y2 | x) = sigma(r*(x, y1) - r*(x, y2))              `bradley_terry_prob`
  (2) reward modelling  L_R = -E log sigma(r(x, y_w) - r(x, y_l))                  `bradley_terry_loss`
  (3) KL-constrained RL   max E[r] - beta KL(pi || pi_ref)                          `kl_regularized_objective`
  (4) its optimum   pi_r = pi_ref exp(r / beta) / Z(x)                              `optimal_policy_logps`
  (5) reward from policy  r = beta log(pi_r / pi_ref) + beta log Z(x)               `reward_from_policy`
  implicit reward  r_hat = beta log(pi_theta / pi_ref)  (Z cancels in (1))          `implicit_reward`
  (7) DPO   L = -E log sigma(beta log(pi(y_w)/pi_ref(y_w)) - beta log(pi(y_l)/pi_ref(y_l)))  `sigmoid_loss`
  gradient weight  sigma(r_hat(y_l) - r_hat(y_w))                                   `dpo_gradient_weight`

All log-probs are sequence log-probs in nats (`logprobs.sequence_logps`); every loss here is per pair,
`[B]`, computed in fp32. Variants share one signature and one registry, `LOSSES`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def bradley_terry_prob(reward_1: jax.Array, reward_2: jax.Array) -> jax.Array:
  """Seed eq. (1): probability that y1 is preferred to y2 given their rewards."""
  return jax.nn.sigmoid(reward_1 - reward_2)


def bradley_terry_loss(reward_chosen: jax.Array, reward_rejected: jax.Array) -> jax.Array:
  """Seed eq. (2), per pair: negative log-likelihood of the observed preference under Bradley-Terry."""
  return -jax.nn.log_sigmoid(reward_chosen - reward_rejected)


def kl_regularized_objective(rewards: jax.Array, policy_logps: jax.Array, reference_logps: jax.Array,
                             beta: float) -> jax.Array:
  """Seed eq. (3) on samples y ~ pi(.|x): mean r(x, y) - beta * KL(pi || pi_ref).

  With samples from pi, log pi(y|x) - log pi_ref(y|x) is an unbiased single-sample estimate of the
  sequence-level KL, so the objective is the sample mean of r - beta * (log pi - log pi_ref).
  """
  return jnp.mean(rewards - beta * (policy_logps - reference_logps))


def optimal_policy_logps(reference_logps: jax.Array, rewards: jax.Array, beta: float) -> jax.Array:
  """Seed eq. (4) over a finite set of candidate responses (last axis): log pi_r = log pi_ref + r/beta - log Z."""
  unnormalized = reference_logps + rewards / beta
  return unnormalized - jax.nn.logsumexp(unnormalized, axis=-1, keepdims=True)


def reward_from_policy(policy_logps: jax.Array, reference_logps: jax.Array, beta: float,
                       log_partition: jax.Array | float = 0.0) -> jax.Array:
  """Seed eq. (5): r(x, y) = beta log(pi_r(y|x) / pi_ref(y|x)) + beta log Z(x)."""
  return beta * (policy_logps - reference_logps) + beta * log_partition


def implicit_reward(policy_logps: jax.Array, reference_logps: jax.Array, beta: float) -> jax.Array:
  """The reward DPO fits, r_hat = beta log(pi_theta / pi_ref): eq. (5) with log Z dropped (it cancels in (1))."""
  return reward_from_policy(policy_logps, reference_logps, beta)


def dpo_gradient_weight(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
  """The seed's per-pair gradient weight sigma(r_hat(y_l) - r_hat(y_w)): large when the reward is wrong.

  For the sigmoid loss, dL/dlog pi(y_w) = -beta * weight and dL/dlog pi(y_l) = +beta * weight.
  """
  return jax.nn.sigmoid(rejected_rewards - chosen_rewards)


def sigmoid_loss(chosen_logratios: jax.Array, rejected_logratios: jax.Array, *, beta: float,
                 label_smoothing: float) -> jax.Array:
  """Seed eq. (7), the DPO loss; with `label_smoothing = eps > 0` the conservative cDPO loss.

  logratios are log pi - log pi_ref per response. beta multiplies the margin once:
      L = -(1 - eps) log sigma(beta * d) - eps log sigma(-beta * d),   d = chosen_logratios - rejected_logratios
  cDPO (Mitchell 2023, "A note on DPO with noisy preferences") treats each label as flipped with
  probability eps; eps = 0 is plain DPO.
  """
  margin = beta * (chosen_logratios - rejected_logratios)
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)


# loss_type -> fn(chosen_logratios, rejected_logratios, *, beta, label_smoothing, **options) -> losses [B].
LossFn = Callable[..., jax.Array]
LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
}


def validate_loss_config(loss_type: str, *, beta: float, label_smoothing: float, **options) -> None:
  """Raise a clear error for a bad loss configuration (called before any compile)."""
  if loss_type not in LOSSES:
    raise ValueError(f"config.loss.type={loss_type!r} is unknown; choose one of {sorted(LOSSES)}.")
  if not beta > 0:
    raise ValueError(f"config.loss.beta={beta} must be > 0 (it scales the implicit reward; 0.1 is typical).")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(
        f"config.loss.label_smoothing={label_smoothing} must be in [0, 0.5): it is the assumed probability "
        f"that a preference label is flipped.")
  if options:
    raise ValueError(f"config.loss: options {sorted(options)} are not used by loss type {loss_type!r}.")


def preference_loss(loss_type: str, policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                    reference_chosen_logps: jax.Array, reference_rejected_logps: jax.Array, *,
                    beta: float = 0.1, label_smoothing: float = 0.0,
                    **options) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair preference loss and implicit rewards; every input is `[B]` sequence log-probs (nats).

  Returns `(losses_B, chosen_rewards_B, rejected_rewards_B)`. The rewards are `beta * (pi - ref)` for
  logging and carry no gradient (the loss alone is differentiated).
  """
  validate_loss_config(loss_type, beta=beta, label_smoothing=label_smoothing, **options)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chosen_logratios = f32(policy_chosen_logps) - f32(reference_chosen_logps)
  rejected_logratios = f32(policy_rejected_logps) - f32(reference_rejected_logps)
  losses = LOSSES[loss_type](chosen_logratios, rejected_logratios, beta=beta, label_smoothing=label_smoothing,
                             **options)
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
  return losses, chosen_rewards, rejected_rewards
