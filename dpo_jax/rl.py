"""The RL math that DPO replaces (seed eq. 3): KL-shaped rewards, GAE, PPO's clipped losses, group advantages.

Seed eq. (3), the KL-constrained objective that RLHF maximises with PPO and DPO solves in closed form::

    max_pi  E_(x ~ D, y ~ pi) [ r(x, y) ]  -  beta KL( pi(y|x) || pi_ref(y|x) )

One equation per function, each pure and jittable, on `[B, N]` per-token arrays of the N sampled tokens
(`mask_BxN` 1 on the response through its EOS, 0 after). Log-probs are nats; rewards in the reward's units.
Forms and defaults follow TRL's PPO trainer and Huang et al. 2024, "The N+ implementation details of RLHF with
PPO" (gamma 1, lambda 0.95, clip 0.2, value clip 0.2, vf_coef 0.1, 4 epochs per rollout batch):

- The KL enters the reward, per token, as k1 = log pi - log pi_ref (Schulman 2020, "Approximating KL
  divergence"): on y ~ pi its sum is an unbiased estimate of the sequence KL, the quantity eq. (3) penalises.
  k3 = (r - 1) - log r with r = pi_ref / pi is unbiased and never negative, the GRPO paper's choice, but as a
  loss term its gradient is not the KL's gradient; it is an option (`kl_penalty`), k1-in-reward the default.
- The score of the whole response is added at its last real token (the EOS when there is one).
- PPO (Schulman et al. 2017) clips the probability ratio; the value head's loss is clipped around the rollout's
  values (TRL's `cliprange_value`).
- GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) need no critic: the advantage of a sample is its
  sequence reward against the other samples of its prompt.
- The adaptive KL controller is Ziegler et al. 2019's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of `x` where `mask` is 1 (0 when the mask is empty)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the real tokens (TRL's `masked_whiten`: unbiased variance); 0 on the padding.

  `shift_mean=False` scales only, keeping the mean (TRL whitens rewards that way).
  """
  mask = mask.astype(jnp.float32)
  mean = masked_mean(x, mask)
  n = jnp.sum(mask)
  var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n - 1.0, 1.0)  # Bessel, as torch.var
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def kl_per_token(logps_BxN: jax.Array, ref_logps_BxN: jax.Array, estimator: str = "k1") -> jax.Array:
  """A per-token estimate of KL(pi || pi_ref) at tokens sampled from pi, nats `[B, N]`.

  k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r, r = pi_ref / pi (unbiased, >= 0).
  """
  log_ratio = logps_BxN - ref_logps_BxN
  if estimator == "k1":
    return log_ratio
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"kl_per_token: estimator={estimator!r}; use one of {KL_ESTIMATORS}.")


def exact_kl_per_token(logits_BxNxV: jax.Array, ref_logits_BxNxV: jax.Array) -> jax.Array:
  """KL(pi(.|s_t) || pi_ref(.|s_t)) summed over the vocabulary at each sampled state, nats `[B, N]` (fp32)."""
  logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  ref_logp = jax.nn.log_softmax(ref_logits_BxNxV.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)


def entropy(logits_BxNxV: jax.Array) -> jax.Array:
  """Entropy of pi(.|s_t) in nats `[B, N]` (fp32), logged to see the policy collapse or not."""
  logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def last_token_onehot(mask_BxN: jax.Array) -> jax.Array:
  """`[B, N]` fp32: 1 at each row's last real token (its EOS, or token N - 1 when it has none)."""
  n = mask_BxN.shape[-1]
  last_B = jnp.sum(mask_BxN > 0, axis=-1) - 1
  return (jnp.arange(n)[None, :] == last_B[:, None]).astype(jnp.float32)


def penalize_missing_eos(scores_B: jax.Array, ended_B: jax.Array, penalty: float) -> jax.Array:
  """Scores minus `penalty` for responses cut at the length cap without an EOS (TRL's `missing_eos_penalty`):
  without it PPO learns that an unfinished response escapes a low score."""
  return scores_B - penalty * (1.0 - ended_B.astype(jnp.float32))


def token_rewards(scores_B: jax.Array, kl_BxN: jax.Array, mask_BxN: jax.Array, kl_coef: float | jax.Array) -> jax.Array:
  """Per-token rewards `[B, N]`: -kl_coef * KL_t at every real token, plus the score at the last one.

  Summed over a response: score - kl_coef * sum_t KL_t, the sample's value of seed eq. (3) with beta = kl_coef.
  """
  mask = mask_BxN.astype(jnp.float32)
  return (-kl_coef * kl_BxN * mask) + scores_B[:, None] * last_token_onehot(mask_BxN)


def sequence_rewards(scores_B: jax.Array, kl_BxN: jax.Array, mask_BxN: jax.Array,
                     kl_coef: float | jax.Array) -> jax.Array:
  """`[B]`: score - kl_coef * sum_t KL_t, the KL-shaped reward of a whole response (critic-free methods)."""
  return scores_B - kl_coef * jnp.sum(kl_BxN * mask_BxN.astype(jnp.float32), axis=-1)


def gae(rewards_BxN: jax.Array, values_BxN: jax.Array, mask_BxN: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) as a reverse `lax.scan` over the N tokens.

      delta_t = r_t + gamma V_(t+1) - V_t,       A_t = delta_t + gamma lam A_(t+1),     R_t = A_t + V_t

  V after the last real token is 0 (the episode has ended). Returns (advantages, returns), `[B, N]`, 0 on padding.
  """
  mask = mask_BxN.astype(jnp.float32)
  rewards, values = rewards_BxN * mask, values_BxN * mask

  def step(carry, xs):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = xs
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = (delta_B + gamma * lam * next_adv_B) * m_B
    return (v_B, adv_B), adv_B

  zeros_B = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, adv_NxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards.T, values.T, mask.T), reverse=True)
  advantages = adv_NxB.T
  return advantages, (advantages + values) * mask


def ppo_policy_loss(logps_BxN: jax.Array, old_logps_BxN: jax.Array, advantages_BxN: jax.Array, mask_BxN: jax.Array,
                    *, clip: float) -> tuple[jax.Array, dict]:
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), averaged over real tokens.

      L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),     rho_t = pi(y_t) / pi_old(y_t)

  Returns (loss, stats): `clip_frac` (tokens where the clipped term is the larger), `approx_kl`
  (0.5 mean (log rho)^2, the estimate TRL logs), `ratio` (mean rho).
  """
  log_ratio = logps_BxN - old_logps_BxN
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages_BxN * ratio
  clipped = -advantages_BxN * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask_BxN)
  stats = {"clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask_BxN),
           "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask_BxN),
           "ratio": masked_mean(ratio, mask_BxN)}
  return loss, stats


def value_loss(values_BxN: jax.Array, old_values_BxN: jax.Array, returns_BxN: jax.Array, mask_BxN: jax.Array, *,
               clip: float) -> tuple[jax.Array, dict]:
  """The clipped value loss (TRL, N+ details): 0.5 mean_t max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

  Returns (loss, stats): `clip_frac` of tokens where the clipped error is the larger.
  """
  # Clipped directly (TRL's clip_by_value): old + clip(V - old) rounds, and counted unclipped tokens as clipped.
  clipped_values = jnp.clip(values_BxN, old_values_BxN - clip, old_values_BxN + clip)
  err, err_clipped = jnp.square(values_BxN - returns_BxN), jnp.square(clipped_values - returns_BxN)
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask_BxN)
  return loss, {"clip_frac": masked_mean((err_clipped > err).astype(jnp.float32), mask_BxN)}


def grpo_advantages(rewards_B: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
  """GRPO's outcome advantage (Shao et al. 2024, sec. 4.1.2): (R_i - mean_g R) / (std_g R + eps) over the G
  samples of each prompt. `rewards_B` holds B / G groups of G consecutive samples; std is the sample (Bessel)
  one, as TRL's GRPOTrainer computes it."""
  r_GxK = rewards_B.reshape(-1, group_size)
  mean, std = r_GxK.mean(-1, keepdims=True), r_GxK.std(-1, keepdims=True, ddof=1)
  return ((r_GxK - mean) / (std + eps)).reshape(-1)


def rloo_advantages(rewards_B: jax.Array, group_size: int) -> jax.Array:
  """RLOO's advantage (Kool et al. 2019; Ahmadian et al. 2024): R_i - mean_(j != i) R_j over the G samples of
  each prompt, i.e. G / (G - 1) (R_i - mean_g R). Groups as in `grpo_advantages`."""
  r_GxK = rewards_B.reshape(-1, group_size)
  baseline = (r_GxK.sum(-1, keepdims=True) - r_GxK) / (group_size - 1)
  return (r_GxK - baseline).reshape(-1)


ADVANTAGES = {"grpo": grpo_advantages, "rloo": rloo_advantages}


def adaptive_kl_coef(kl_coef: float, observed_kl: float, *, target: float, horizon: float, n_steps: int) -> float:
  """Ziegler et al. 2019's proportional controller (sec. 2.2), TRL's `AdaptiveKLController`:

      e = clip(KL / KL_target - 1, -0.2, 0.2),        beta <- beta (1 + e n_steps / horizon)

  `observed_kl`: the rollout batch's mean sequence KL (nats); `n_steps`: samples in it; `horizon`: samples over
  which the error is halved (10,000 in the paper).
  """
  error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
  return kl_coef * (1.0 + error * n_steps / horizon)
