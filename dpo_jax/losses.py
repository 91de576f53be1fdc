"""Preference losses: DPO and the equations it is derived from, read against the seed (Rafailov et al. 2023).

Seed equations and where they live::

  (1) Bradley-Terry   p*(y1 > y2 | x) = sigma(r*(x, y1) - r*(x, y2))              `bradley_terry_prob`
  (2) reward modelling  L_R = -E log sigma(r(x, y_w) - r(x, y_l))                  `bradley_terry_loss`
  (3) KL-constrained RL   max E[r] - beta KL(pi || pi_ref)                          `kl_regularized_objective`
  (4) its optimum   pi_r = pi_ref exp(r / beta) / Z(x)                              `optimal_policy_logps`
  (5) reward from policy  r = beta log(pi_r / pi_ref) + beta log Z(x)               `reward_from_policy`
  implicit reward  r_hat = beta log(pi_theta / pi_ref)  (Z cancels in (1))          `implicit_reward`
  (7) DPO   L = -E log sigma(beta log(pi(y_w)/pi_ref(y_w)) - beta log(pi(y_l)/pi_ref(y_l)))  `sigmoid_loss`
  gradient weight  sigma(r_hat(y_l) - r_hat(y_w))                                   `dpo_gradient_weight`
  unweighted ablation  grad of -log pi(y_w) + log pi(y_l), no sigma weight          `unlikelihood`
  Plackett-Luce over K ranked responses                                             `plackett_luce_loss`

All log-probs are sequence log-probs in nats (`logprobs.sequence_logps`); every loss here is per pair,
`[B]`, computed in fp32. Variants share one signature (`preference_loss`) and one registry, `LOSSES`.

Variants (`LOSSES` keys = TRL loss_type names). cl, rl: chosen / rejected log-ratios log pi - log pi_ref
(sums over response tokens); d = cl - rl; n_c, n_r: response token counts; a_c = log pi(y_w) / n_c, a_r
likewise (average log-prob per token); eps = label_smoothing; lsig = log sigmoid::

  sigmoid       DPO, Rafailov 2023 / cDPO      -(1-eps) lsig(beta d) - eps lsig(-beta d)
  hinge         SLiC, Zhao 2023                relu(1 - beta d)
  ipo           IPO, Azar 2023 (eq. 17)        (cl/n_c - rl/n_r - 1/(2 beta))^2
  robust        rDPO, Chowdhury 2024           [-(1-eps) lsig(beta d) + eps lsig(-beta d)] / (1 - 2 eps)
  exo_pair      EXO, Ji 2024 (eq. 16)          KL([s(beta d), s(-beta d)] || [1-eps, eps]), eps = 1e-3 if 0
  nca_pair      NCA, Chen 2024                 -lsig(beta cl) - lsig(-beta cl)/2 - lsig(-beta rl)/2
  bco_pair      BCO, Jung 2024                 -lsig(beta cl - delta) - lsig(-(beta rl - delta))
  sppo_hard     SPPO, Wu 2024 (hard P)         (cl - 1/(2 beta))^2 + (rl + 1/(2 beta))^2
  aot           AOT, Melnyk 2024               cDPO on beta * (sort_B(pi_c - pi_r) - sort_B(ref_c - ref_r))
  aot_pair      AOT unpaired, Melnyk 2024      cDPO on beta * (sort_B(cl) - sort_B(rl))
  apo_zero      APO-zero, D'Oosterlinck 2024   1 - s(beta cl) + s(beta rl)
  apo_down      APO-down, D'Oosterlinck 2024   s(beta cl) + 1 - s(beta d)
  discopop      DiscoPOP, Chris Lu 2024        -lsig(beta d) (1 - s(beta d / tau)) + exp(-beta d) s(beta d / tau)
  sigmoid_norm  length-normalised DPO (TRL)    -lsig(beta (cl/n_c - rl/n_r))
  sft           NLL of the chosen response     -a_c
  rpo           RPO, Pang 2024                 sigmoid + rpo_alpha * (-a_c)
  simpo         SimPO, Meng 2024 (ref-free)    -(1-eps) lsig(beta (a_c - a_r) - gamma) - eps lsig(-(...))
  orpo          ORPO, Hong 2024 (ref-free)     -a_c - lambda lsig(lo(a_c) - lo(a_r)),  lo(a) = a - log(1 - e^a)
  unlikelihood  seed ablation, no weighting    -beta d  (unbounded below, on purpose)

Unpaired variants (`UNPAIRED_LOSSES` keys, TRL KTOTrainer / BCOTrainer loss_type names; `unpaired_loss`): a row
is (prompt, completion y, desirable); lr = log pi(y) - log pi_ref(y); y+ / y- a desirable / undesirable row;
z = the batch KL estimate; w_D, w_U = desirable_weight, undesirable_weight; delta = running mean of beta * lr::

  kto                KTO, Ethayarajh 2024 (eq. 7)  y+: w_D (1 - s(beta (lr - z)));  y-: w_U (1 - s(beta (z - lr)))
  apo_zero_unpaired  APO-zero unpaired, D'Oosterlinck 2024  y+: w_D (1 - s(beta lr));  y-: w_U s(beta lr)
  bco                BCO, Jung 2024                y+: -w_D lsig(beta lr - delta);  y-: -w_U lsig(delta - beta lr)

Combinations: `weighted_preference_loss` (sum_i w_i L_i, as TRL's loss_type list + loss_weights).

Modifiers of the pair losses (TRL DPOConfig fields of the same names; the step applies the last two)::

  f_divergence_type  f-DPO, Wang 2023: cl, rl -> f'(u) - f'(1) of u = pi / pi_ref (`f_divergence_score`); the
                     types in `F_DIVERGENCE_LOSSES` only
  ld_alpha           LD-DPO, Liu 2024: log pi -> front + ld_alpha * (full - front), front = the pair's shared
                     length (`ld_logps`, policy and reference alike)
  use_weighting      WPO, Zhou 2024 (eq. 2): each pair's loss times `wpo_pair_weights` (no gradient)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence

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

  logratios are log pi - log pi_ref per response. beta multiplies the margin once::

      L = -(1 - eps) log sigma(beta * d) - eps log sigma(-beta * d),   d = chosen_logratios - rejected_logratios

  cDPO (Mitchell 2023, "A note on DPO with noisy preferences") treats each label as flipped with
  probability eps; eps = 0 is plain DPO.
  """
  margin = beta * (chosen_logratios - rejected_logratios)
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)


def _cdpo(margin: jax.Array, eps: float) -> jax.Array:
  """cDPO on a ready margin (nats): -(1 - eps) log sigma(m) - eps log sigma(-m); eps = 0 is Bradley-Terry NLL."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(margin) - eps * jax.nn.log_sigmoid(-margin)


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012): expm1 near 0, log1p far from it."""
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# --- f-DPO, LD-DPO and WPO: modifiers of the pair losses (TRL DPOConfig f_divergence_type, ld_alpha, use_weighting) ---

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # TRL's f_divergence_type values
# The types TRL 1.16 lets take a non-reverse f-divergence: those built on the chosen - rejected score difference, in
# which f-DPO's beta log Z(x) cancels (sft ignores the score). rpo is sigmoid + sft, TRL's loss_type=[sigmoid, sft].
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "rpo")
F_ALPHA_DEFAULT = 0.5  # TRL DPOConfig.f_alpha_divergence_coef default
F_ALPHA_EXP_MAX = 80.0  # TRL clamps (a - 1) * logratio here for fp32 / bf16: exp(80) ~ 5.5e34 stays finite in fp32
F_ALPHA_REVERSE_TOL = 1e-6  # |a - 1| below this: the alpha score's limit, log u (reverse KL), as TRL


def f_divergence_score(logratios: jax.Array, f_type: str, alpha_coef: float) -> jax.Array:
  """The f-DPO score that replaces a log-ratio lr = log(pi / pi_ref) in the margin, `[B]` fp32 (TRL 1.16 DPOTrainer
  `_compute_loss`, chosen_scores / rejected_scores).

  f-DPO (Wang et al. 2023, "Beyond reverse KL: generalizing DPO with diverse divergence constraints", Table 1)
  trains -log s(beta f'(u_w) - beta f'(u_l)), u = pi / pi_ref, for an f-divergence penalty D_f(pi || pi_ref).
  The paper's f'(u): reverse KL log u + 1; forward KL -1/u; Jensen-Shannon log(2u / (1 + u)); alpha-divergence
  (1 - u^-alpha) / alpha. The scores here (as TRL's) are f'(u) - f'(1), which vanish at u = 1; constants cancel
  in a chosen - rejected difference, but not in ipo / sigmoid_norm, which divide each score by its own length::

      reverse_kl        lr
      forward_kl        1 - exp(-lr)
      js_divergence     log 2 + log s(lr)
      alpha_divergence  (exp((a - 1) lr) - 1) / (a - 1),  (a - 1) lr clamped at 80;  lr itself when |a - 1| < 1e-6

  `alpha_coef` = a, TRL 1.16's f_alpha_divergence_coef, is 1 - the paper's alpha (the same at the default 0.5);
  a -> 1 is reverse KL, a = 0 forward KL. TRL before 1.x differed: forward_kl fell through to the reverse-KL
  margin, and alpha_divergence used -exp(-a lr) / a with a as the paper's alpha (its exponent capped too).
  forward_kl is unbounded: lr < -88 overflows exp(-lr) to inf, as in TRL. exp(x) - 1 is computed as expm1(x).

  Args:
    logratios: `[B]` log pi - log pi_ref (nats), any float dtype (computed in fp32).
    f_type: one of `F_DIVERGENCES` (static).
    alpha_coef: a, a Python float (static); read only for alpha_divergence.
  """
  lr = jnp.asarray(logratios, jnp.float32)
  if f_type == "reverse_kl":
    return lr
  if f_type == "forward_kl":
    return -jnp.expm1(-lr)
  if f_type == "js_divergence":
    return math.log(2.0) + jax.nn.log_sigmoid(lr)
  if f_type == "alpha_divergence":
    a1 = float(alpha_coef) - 1.0
    if abs(a1) < F_ALPHA_REVERSE_TOL:
      return lr
    return jnp.expm1(jnp.minimum(a1 * lr, F_ALPHA_EXP_MAX)) / a1
  raise ValueError(f"config.loss.f_divergence_type={f_type!r} is unknown; choose one of {F_DIVERGENCES}.")


def check_ld_alpha(value: Any) -> None:
  """Raise a ValueError naming config.loss.ld_alpha unless it is None (LD-DPO off) or a number in [0, 1]."""
  _need(value is None or (_is_number(value) and 0.0 <= value <= 1.0), "ld_alpha", value,
        "must be None (off) or a number in [0, 1]: the weight of the tokens past the pair's shared length "
        "(1 = plain DPO, 0 = the shared front only; Liu et al. 2024 use 0.3-0.7).")


def ld_logps(full: jax.Array, front: jax.Array, ld_alpha: float | None) -> jax.Array:
  """LD-DPO's length-desensitised sequence log-prob, `[B]` fp32 nats (Liu et al. 2024, "LD-DPO").

  `front + ld_alpha * (full - front)`: `full` sums a response's log-probs over all its tokens, `front` over its
  first L tokens, L = min(chosen tokens, rejected tokens) of its pair; the verbose tail past L is down-weighted.
  TRL 1.16 DPOTrainer (ld_alpha set): shared_logps + ld_alpha * tail_logps, for the policy AND the reference, so
  the logged rewards use it too. ld_alpha = 1 is plain DPO, 0 keeps the front only; None returns `full` (off).
  """
  full = jnp.asarray(full, jnp.float32)
  if ld_alpha is None:
    return full
  if not _traced(ld_alpha):
    check_ld_alpha(ld_alpha)
  front = jnp.asarray(front, jnp.float32)
  return front + ld_alpha * (full - front)


def wpo_pair_weights(chosen_logps: jax.Array, chosen_log_sum_sq: jax.Array, chosen_num_tokens: jax.Array,
                     rejected_logps: jax.Array, rejected_log_sum_sq: jax.Array,
                     rejected_num_tokens: jax.Array) -> jax.Array:
  """WPO's per-pair weight (Zhou et al. 2024, "WPO: enhancing RLHF with weighted preference optimization", eq. 2,
  the length-normalised form with aligned probabilities), `[B]` fp32, no gradient::

      w = exp((logps_c - lss_c) / n_c) * exp((logps_r - lss_r) / n_r)

  logps: the policy's sequence log-prob (nats, sum over response tokens: the full sum, also under LD-DPO, as TRL);
  lss: the sum over the same tokens of log sum_v p_v^2 (TRL's `log_sum_sq_probs`, the log-probability of the
  token the policy would sample itself, in expectation); n: response token counts, clamped to >= 1. A token's
  p_y / sum_v p_v^2 can exceed 1, so can w. TRL 1.16 (use_weighting) multiplies each type's per-pair loss by w
  unclamped; TRL before 1.x clamped w at 1.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  per_token = lambda lp, lss, n: (f32(lp) - f32(lss)) / jnp.maximum(f32(n), 1.0)
  log_w = (per_token(chosen_logps, chosen_log_sum_sq, chosen_num_tokens)
           + per_token(rejected_logps, rejected_log_sum_sq, rejected_num_tokens))
  return jax.lax.stop_gradient(jnp.exp(log_w))


class Pair(NamedTuple):
  """A batch of preference pairs as every variant sees it: all `[B]` fp32.

  Log-probs are sums over response tokens (nats); the reference fields are None for reference-free calls and
  the token counts (clamped to >= 1, as TRL clamps its masks) are None when the caller gave none.
  `f_divergence` (static, not an array): None for reverse KL, else `(f_type, alpha_coef)`, which `_logratios`
  applies (`f_divergence_score`); only `F_DIVERGENCE_LOSSES` types are ever given one.
  """
  policy_chosen: jax.Array
  policy_rejected: jax.Array
  reference_chosen: jax.Array | None
  reference_rejected: jax.Array | None
  chosen_tokens: jax.Array | None
  rejected_tokens: jax.Array | None
  f_divergence: tuple[str, float] | None = None


def _raw_logratios(p: Pair) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) log pi - log pi_ref, `[B]` nats."""
  return p.policy_chosen - p.reference_chosen, p.policy_rejected - p.reference_rejected


def _logratios(p: Pair) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) scores, `[B]`: the log-ratios, or their f-DPO transform when the pair carries one."""
  cl, rl = _raw_logratios(p)
  if p.f_divergence is None:
    return cl, rl
  f_type, alpha_coef = p.f_divergence
  return f_divergence_score(cl, f_type, alpha_coef), f_divergence_score(rl, f_type, alpha_coef)


def _avg_logps(p: Pair) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) policy log-prob per response token, `[B]` nats/token."""
  return p.policy_chosen / p.chosen_tokens, p.policy_rejected / p.rejected_tokens


# --- the variants: fn(pair, *, beta, label_smoothing, **own_options) -> losses [B] (nats) ---------------------------


def _sigmoid(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """DPO (seed eq. 7), with cDPO smoothing. TRL v0.1x DPOTrainer.dpo_loss, loss_type='sigmoid'."""
  cl, rl = _logratios(p)
  return sigmoid_loss(cl, rl, beta=beta, label_smoothing=label_smoothing)


def _hinge(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """SLiC (Zhao et al. 2023, "SLiC-HF"): relu(1 - beta d); beta acts as 1/margin.
  TRL v0.1x DPOTrainer.dpo_loss, loss_type='hinge'."""
  del label_smoothing
  cl, rl = _logratios(p)
  return jax.nn.relu(1.0 - beta * (cl - rl))


def _ipo(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """IPO (Azar et al. 2023, eq. 17; beta is their tau): (h - 1/(2 beta))^2 with h the margin of log-ratios
  averaged per response token. The per-token average is TRL's choice (TRL says it matches the IPO authors'
  runs): a squared loss on token sums would scale with response length. TRL v0.1x DPOTrainer.dpo_loss, loss_type='ipo'
  (v0.1x averages the logps in concatenated_forward; later versions divide the log-ratios; same number)."""
  del label_smoothing
  cl, rl = _logratios(p)
  return (cl / p.chosen_tokens - rl / p.rejected_tokens - 1.0 / (2.0 * beta)) ** 2


def _robust(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """Robust DPO (Chowdhury et al. 2024, "Provably robust DPO"): the unbiased loss under label flips with
  probability eps, [-(1-eps) log s(beta d) + eps log s(-beta d)] / (1 - 2 eps). Unlike cDPO it is unbounded
  below as d -> +inf when eps > 0. TRL v0.1x DPOTrainer.dpo_loss, loss_type='robust'."""
  cl, rl = _logratios(p)
  m = beta * (cl - rl)
  eps = label_smoothing
  return (-(1.0 - eps) * jax.nn.log_sigmoid(m) + eps * jax.nn.log_sigmoid(-m)) / (1.0 - 2.0 * eps)


EXO_DEFAULT_EPS = 1e-3  # TRL replaces label_smoothing = 0 by this for exo_pair: log(eps) must be finite.


def _exo_pair(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """EXO-pref (Ji et al. 2024, "Towards efficient exact optimization...", eq. 16, K = 2): reverse KL from
  q = softmax(beta * logratios) over {y_w, y_l} to the smoothed label [1 - eps, eps]:
      s(m) (log s(m) - log(1 - eps)) + s(-m) (log s(-m) - log eps),   m = beta d.
  eps = label_smoothing, or 1e-3 when it is 0 (TRL's default). TRL v0.1x DPOTrainer.dpo_loss, loss_type='exo_pair'."""
  eps = label_smoothing if label_smoothing > 0 else EXO_DEFAULT_EPS
  cl, rl = _logratios(p)
  m = beta * (cl - rl)
  return (jax.nn.sigmoid(m) * (jax.nn.log_sigmoid(m) - math.log1p(-eps))
          + jax.nn.sigmoid(-m) * (jax.nn.log_sigmoid(-m) - math.log(eps)))


def _nca_pair(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """NCA (Chen et al. 2024, "Noise contrastive alignment"): absolute rewards, pushes r_w up and both down a bit:
  -log s(beta cl) - 0.5 log s(-beta cl) - 0.5 log s(-beta rl). TRL v0.1x DPOTrainer.dpo_loss, loss_type='nca_pair'."""
  del label_smoothing
  cl, rl = _logratios(p)
  rc, rr = beta * cl, beta * rl
  return -jax.nn.log_sigmoid(rc) - 0.5 * jax.nn.log_sigmoid(-rc) - 0.5 * jax.nn.log_sigmoid(-rr)


def _bco_pair(p: Pair, *, beta: float, label_smoothing: float, delta: float) -> jax.Array:
  """BCO on pairs (Jung et al. 2024, "Binary classifier optimization"): chosen as class 1, rejected as class 0
  around the reward shift delta: -log s(beta cl - delta) - log s(-(beta rl - delta)).
  `delta` (nats) is a fixed option, default 0.0: TRL 1.16's bco_pair has no shift at all (delta = 0). TRL 0.x
  DPOTrainer kept delta as a running mean updated once per step with that batch's mean reward (the mean of
  beta * [cl, rl]), then used the updated mean; a trainer can do the same with `running_mean_update(state,
  batch_mean[None], jnp.ones(1))` and pass `state.mean` here (a traced delta is accepted).
  TRL v0.1x DPOTrainer.dpo_loss, loss_type='bco_pair'."""
  del label_smoothing
  cl, rl = _logratios(p)
  return -jax.nn.log_sigmoid(beta * cl - delta) - jax.nn.log_sigmoid(-(beta * rl - delta))


def _sppo_hard(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """SPPO with hard win probabilities (Wu et al. 2024, "Self-play preference optimization", Alg. 1 eq. 4.7 with
  P = 1 for y_w and 0 for y_l): (cl - 1/(2 beta))^2 + (rl + 1/(2 beta))^2.
  TRL v0.1x DPOTrainer.dpo_loss, loss_type='sppo_hard'."""
  del label_smoothing
  cl, rl = _logratios(p)
  return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2


def _aot(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """AOT (Melnyk et al. 2024, "Distributional preference alignment via optimal transport"), paired form:
  cDPO on beta * (sort_B(pi_c - pi_r) - sort_B(ref_c - ref_r)), sorting over the batch. Entry i of the result
  belongs to the i-th smallest margin, not to pair i, and every pair in the batch (padding too) takes part.
  TRL v0.1x DPOTrainer.dpo_loss, loss_type='aot'."""
  delta = (jnp.sort(p.policy_chosen - p.policy_rejected) - jnp.sort(p.reference_chosen - p.reference_rejected))
  return _cdpo(beta * delta, label_smoothing)


def _aot_pair(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """AOT, unpaired form (Melnyk et al. 2024): cDPO on beta * (sort_B(cl) - sort_B(rl)); batch-coupled as `aot`.
  TRL v0.1x DPOTrainer.dpo_loss, loss_type='aot_pair' (renamed 'aot_unpaired' in later TRL)."""
  cl, rl = _logratios(p)
  return _cdpo(beta * (jnp.sort(cl) - jnp.sort(rl)), label_smoothing)


def _apo_zero(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """APO-zero (D'Oosterlinck et al. 2024, "Anchored preference optimization", eq. 7): raise the chosen, lower the
  rejected likelihood, each anchored at the reference: 1 - s(beta cl) + s(beta rl).
  TRL v0.1x DPOTrainer.dpo_loss, loss_type='apo_zero'."""
  del label_smoothing
  cl, rl = _logratios(p)
  return 1.0 - jax.nn.sigmoid(beta * cl) + jax.nn.sigmoid(beta * rl)


def _apo_down(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, the rejected more: s(beta cl) + 1 - s(beta d).
  TRL v0.1x DPOTrainer.dpo_loss, loss_type='apo_down'."""
  del label_smoothing
  cl, rl = _logratios(p)
  return jax.nn.sigmoid(beta * cl) + 1.0 - jax.nn.sigmoid(beta * (cl - rl))


def _discopop(p: Pair, *, beta: float, label_smoothing: float, discopop_tau: float) -> jax.Array:
  """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering preference optimization algorithms",
  eq. 5): with x = beta d and m = s(x / tau), L = -log s(x) (1 - m) + exp(-x) m.
  exp(-x) m is evaluated as exp(-x + log s(x / tau)): the literal product is inf * 0 = NaN for x << 0 (TRL's
  form), while the value itself is finite (-> 0) for tau < 1. TRL v0.1x DPOTrainer.dpo_loss, loss_type='discopop'."""
  del label_smoothing
  cl, rl = _logratios(p)
  x = beta * (cl - rl)
  return -jax.nn.log_sigmoid(x) * jax.nn.sigmoid(-x / discopop_tau) + jnp.exp(jax.nn.log_sigmoid(x / discopop_tau) - x)


def _sigmoid_norm(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """Length-normalised DPO: -log s(beta (cl / n_c - rl / n_r)), the reference-based log-ratios averaged per
  response token (SimPO's normalisation, Meng et al. 2024, but keeping pi_ref). TRL main DPOTrainer (2026,
  multi-loss `_compute_loss`), loss_type='sigmoid_norm'; TRL applies no label smoothing here."""
  del label_smoothing
  cl, rl = _logratios(p)
  return -jax.nn.log_sigmoid(beta * (cl / p.chosen_tokens - rl / p.rejected_tokens))


def _sft(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """NLL of the chosen response per token: -log pi(y_w) / n_c (nats/token). TRL main DPOTrainer, loss_type='sft'
  averages over all chosen tokens of the batch (one scalar); per pair it is the per-sequence average, which
  equals TRL's when the chosen lengths are equal."""
  del beta, label_smoothing
  return -p.policy_chosen / p.chosen_tokens


def _rpo(p: Pair, *, beta: float, label_smoothing: float, rpo_alpha: float) -> jax.Array:
  """RPO (Pang et al. 2024, "Iterative reasoning preference optimization"): DPO (with cDPO smoothing) plus
  rpo_alpha * NLL of the chosen response per token. TRL v0.1x DPOTrainer with DPOConfig.rpo_alpha (there the NLL
  is a batch token mean; see `_sft`)."""
  return _sigmoid(p, beta=beta, label_smoothing=label_smoothing) + rpo_alpha * _sft(p, beta=beta, label_smoothing=0.0)


def _simpo(p: Pair, *, beta: float, label_smoothing: float, simpo_gamma: float) -> jax.Array:
  """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin gamma (nats):
  -(1-eps) log s(beta (a_c - a_r) - gamma) - eps log s(-(beta (a_c - a_r) - gamma)).
  `simpo_gamma` is gamma itself, as TRL's CPOConfig.simpo_gamma (default 0.5); the paper's gamma/beta ratio is
  simpo_gamma / beta. TRL v0.1x CPOTrainer.cpo_loss, loss_type='simpo' (cDPO smoothing as TRL)."""
  ac, ar = _avg_logps(p)
  return _cdpo(beta * (ac - ar) - simpo_gamma, label_smoothing)


ORPO_MAX_AVG_LOGP = -1e-6  # avg log-prob is clamped here in the odds: log(1 - p) is -inf at p = 1 (inf - inf = NaN).


def _orpo(p: Pair, *, beta: float, label_smoothing: float, orpo_lambda: float | None) -> jax.Array:
  """ORPO (Hong et al. 2024, "Monolithic preference optimization without reference model", eq. 6-7):
  -a_c + lambda * (-log s(logodds(a_c) - logodds(a_r))),  logodds(a) = a - log(1 - exp(a)), a = avg log-prob.
  TRL's ORPOTrainer (v0.1x, odds_ratio_loss) uses beta as lambda; so does `orpo_lambda=None` (default), a number
  overrides it. log(1 - exp(a)) is `log1mexp`, with a clamped to <= -1e-6 inside the odds only."""
  del label_smoothing
  lam = beta if orpo_lambda is None else orpo_lambda
  ac, ar = _avg_logps(p)
  log_odds = lambda a: a - log1mexp(jnp.minimum(a, ORPO_MAX_AVG_LOGP))
  return -ac - lam * jax.nn.log_sigmoid(log_odds(ac) - log_odds(ar))


def _unlikelihood(p: Pair, *, beta: float, label_smoothing: float) -> jax.Array:
  """The seed's ablation "without the weighting coefficient": -beta cl + beta rl, whose gradient is that of
  -log pi(y_w) + log pi(y_l) scaled by beta with NO sigma(r_l - r_w) weight (dL/dlog pi(y_w) = -beta always).
  It is unbounded below (drive pi(y_l) -> 0 forever) and degenerates; that is the point of the ablation."""
  del label_smoothing
  cl, rl = _logratios(p)
  return -beta * (cl - rl)


# --- registry ------------------------------------------------------------------------------------------------------

LossFn = Callable[..., jax.Array]


def _is_number(x: Any) -> bool:
  """A finite real Python / numpy scalar (not a bool, not a traced array: configuration is static)."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _traced(x: Any) -> bool:
  """A value under a jax transformation: dpo_jax/experiments/sweep.py vmaps over beta after checking its concrete
  values."""
  return isinstance(x, jax.core.Tracer)


def _need(cond: bool, field: str, value: Any, rule: str) -> None:
  if not cond:
    raise ValueError(f"config.loss.{field}={value!r} {rule}")


def _check_unused(options: Mapping[str, Any], known: Mapping[str, Any], what: str) -> None:
  """ValueError naming the config.loss.options fields `what` (e.g. "loss type 'ipo'") does not read."""
  unused = sorted(set(options) - set(known))
  if unused:
    raise ValueError(f"config.loss.options {unused} are not used by {what}; its options are "
                     f"{sorted(known) or 'none'}. Remove them (config.loss.options.<name>).")


def _check_eps(loss_type: str) -> Callable[..., None]:
  def check(opts: Mapping[str, Any], *, beta: float, label_smoothing: float) -> None:
    del opts, beta
    _need(0.0 <= label_smoothing < 0.5, "label_smoothing", label_smoothing,
          f"must be in [0, 0.5) for loss type {loss_type!r}: it is the assumed probability that a preference label "
          f"is flipped (0 = none; at 0.5 the labels carry no information).")
  return check


def _check_exo(opts: Mapping[str, Any], *, beta: float, label_smoothing: float) -> None:
  del opts, beta
  _need(0.0 <= label_smoothing < 0.5, "label_smoothing", label_smoothing,
        f"must be in [0, 0.5) for loss type 'exo_pair' (0 means TRL's default eps = {EXO_DEFAULT_EPS}); "
        f"exo_pair needs eps > 0 since it takes log(eps).")


def _check_rpo(opts: Mapping[str, Any], *, beta: float, label_smoothing: float) -> None:
  _check_eps("rpo")(opts, beta=beta, label_smoothing=label_smoothing)
  _need(opts["rpo_alpha"] >= 0, "options.rpo_alpha", opts["rpo_alpha"],
        "must be >= 0: it weights the chosen-response NLL added to DPO (1.0 in Pang et al. 2024; 0 = plain DPO).")


def _check_discopop(opts: Mapping[str, Any], *, beta: float, label_smoothing: float) -> None:
  del beta, label_smoothing
  _need(opts["discopop_tau"] > 0, "options.discopop_tau", opts["discopop_tau"],
        "must be > 0: it is the temperature of the logistic/exponential blend (0.05 in Lu et al. 2024).")


def _check_simpo(opts: Mapping[str, Any], *, beta: float, label_smoothing: float) -> None:
  _check_eps("simpo")(opts, beta=beta, label_smoothing=label_smoothing)
  _need(opts["simpo_gamma"] >= 0, "options.simpo_gamma", opts["simpo_gamma"],
        "must be >= 0: it is SimPO's target reward margin in nats (TRL default 0.5; gamma/beta = simpo_gamma/beta).")


def _check_orpo(opts: Mapping[str, Any], *, beta: float, label_smoothing: float) -> None:
  del beta, label_smoothing
  lam = opts["orpo_lambda"]
  _need(lam is None or lam > 0, "options.orpo_lambda", lam,
        "must be > 0 (weight of the odds-ratio term), or None to use beta as TRL's ORPOTrainer does.")


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How to call one variant.

  Fields::

    fn: `fn(pair: Pair, *, beta, label_smoothing, **options) -> losses [B]`.
    uses_reference: reads pi_ref log-probs (False: the trainer can skip the reference model; rewards are then
      beta * average policy log-prob, what TRL logs for SimPO / ORPO).
    needs_num_tokens: length-normalised; `chosen_num_tokens` / `rejected_num_tokens` are required.
    options: the variant's own option names (config.loss.options.<name>) and their defaults.
    check: `check(resolved_options, *, beta, label_smoothing)` raising ValueError on a bad value, or None.
    uses_label_smoothing: a nonzero label_smoothing is meaningful (elsewhere it is a configuration error).
  """
  fn: LossFn
  uses_reference: bool = True
  needs_num_tokens: bool = False
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Callable[..., None] | None = None
  uses_label_smoothing: bool = False


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid, check=_check_eps("sigmoid"), uses_label_smoothing=True),
    "hinge": LossSpec(_hinge),
    "ipo": LossSpec(_ipo, needs_num_tokens=True),
    "robust": LossSpec(_robust, check=_check_eps("robust"), uses_label_smoothing=True),
    "exo_pair": LossSpec(_exo_pair, check=_check_exo, uses_label_smoothing=True),
    "nca_pair": LossSpec(_nca_pair),
    "bco_pair": LossSpec(_bco_pair, options={"delta": 0.0}),
    "sppo_hard": LossSpec(_sppo_hard),
    "aot": LossSpec(_aot, check=_check_eps("aot"), uses_label_smoothing=True),
    "aot_pair": LossSpec(_aot_pair, check=_check_eps("aot_pair"), uses_label_smoothing=True),
    "apo_zero": LossSpec(_apo_zero),
    "apo_down": LossSpec(_apo_down),
    "discopop": LossSpec(_discopop, options={"discopop_tau": 0.05}, check=_check_discopop),
    "sigmoid_norm": LossSpec(_sigmoid_norm, needs_num_tokens=True),
    "sft": LossSpec(_sft, uses_reference=False, needs_num_tokens=True),
    "rpo": LossSpec(_rpo, needs_num_tokens=True, options={"rpo_alpha": 1.0}, check=_check_rpo,
                    uses_label_smoothing=True),
    "simpo": LossSpec(_simpo, uses_reference=False, needs_num_tokens=True, options={"simpo_gamma": 0.5},
                      check=_check_simpo, uses_label_smoothing=True),
    "orpo": LossSpec(_orpo, uses_reference=False, needs_num_tokens=True, options={"orpo_lambda": None},
                     check=_check_orpo),
    "unlikelihood": LossSpec(_unlikelihood),
}


def _as_types(loss_type_or_types: str | Sequence[str]) -> tuple[str, ...]:
  """A str or a sequence of str -> a tuple of known loss types (ValueError naming config.loss.type otherwise)."""
  if isinstance(loss_type_or_types, str):
    if is_unpaired(loss_type_or_types):
      raise ValueError(f"config.loss.type={loss_type_or_types!r} is an unpaired loss (rows of prompt, completion, "
                       f"desirable): it goes through `unpaired_loss`, not the pair losses {sorted(LOSSES)}.")
    if loss_type_or_types not in LOSSES:
      raise ValueError(f"config.loss.type={loss_type_or_types!r} is unknown; choose one of {sorted(LOSSES)} (pairs), "
                       f"{sorted(UNPAIRED_LOSSES)} (unpaired rows) or {RANKING_LOSS!r} (ranked responses).")
    return (loss_type_or_types,)
  types = tuple(loss_type_or_types)
  if not types:
    raise ValueError("config.loss.type=() is empty; give one loss type or a tuple of them.")
  for t in types:
    if is_unpaired(t):
      raise ValueError(f"config.loss.types={types!r}: {t!r} is an unpaired loss and trains on other data (rows, not "
                       f"pairs); it cannot be combined with pair losses. Use it alone as config.loss.type.")
    if not isinstance(t, str) or t not in LOSSES:
      raise ValueError(f"config.loss.type={types!r}: {t!r} is unknown; choose from {sorted(LOSSES)}.")
  return types


def from_config(loss_cfg: Mapping[str, Any]) -> tuple[str | tuple[str, ...], dict[str, Any]]:
  """`(loss_type, keyword options)` for `preference_loss` from a `config.loss` block.

  `loss.types` (non-empty) is a weighted combination with `loss.weights` (() = all 1.0) and takes precedence
  over `loss.type`. `loss.options` fields left at None take the variant's default and are not passed.
  `loss.f_divergence_type` and `loss.f_alpha_divergence_coef` join the options when the block has them (older
  configs do not: then reverse KL). The fields the step applies itself are `ablation_fields`, never options.
  """
  options = {k: v for k, v in dict(loss_cfg.get("options", None) or {}).items() if v is not None}
  for name in F_OPTIONS:
    if loss_cfg.get(name, None) is not None:
      options[name] = loss_cfg[name]
  types = tuple(loss_cfg.get("types", None) or ())
  if types:
    weights = tuple(loss_cfg.get("weights", None) or ()) or None
    return types, dict(options, weights=weights)
  if loss_cfg.get("weights", None):
    raise ValueError(f"config.loss.weights={tuple(loss_cfg['weights'])!r} needs config.loss.types (a tuple of loss "
                     f"types to weight); with the single config.loss.type drop the weights.")
  return loss_cfg["type"], options


def needs_reference(loss_type_or_types: str | Sequence[str]) -> bool:
  """Whether any of the loss types reads reference log-probs (False: the trainer need not load pi_ref)."""
  if loss_type_or_types == RANKING_LOSS or is_unpaired(loss_type_or_types):  # all of them read pi_ref
    return True
  return any(LOSSES[t].uses_reference for t in _as_types(loss_type_or_types))


F_OPTIONS = ("f_divergence_type", "f_alpha_divergence_coef")  # config.loss fields `from_config` passes as options
# config.loss fields the step applies itself (`ablation_fields`), with their defaults (TRL's): never loss options.
STEP_FIELDS = {"ld_alpha": None, "use_weighting": False, "desirable_weight": 1.0, "undesirable_weight": 1.0}


def ablation_fields(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`{ld_alpha, use_weighting, desirable_weight, undesirable_weight}` from a `config.loss` block, checked against
  its loss type (ValueError naming the field); a field the block lacks (older configs) takes its default, which
  changes nothing: ld_alpha None (LD-DPO off), use_weighting False (no WPO), both KTO weights 1.0.

  The step applies them: `ld_logps` (policy and reference), `wpo_pair_weights` times the pair losses, and the
  weights as `unpaired_loss(..., desirable_weight=, undesirable_weight=)`.
  """
  fields = {name: loss_cfg.get(name, default) for name, default in STEP_FIELDS.items()}
  fields = {name: STEP_FIELDS[name] if value is None else value for name, value in fields.items()}
  loss_type = from_config(loss_cfg)[0]
  _check_modifiers(loss_type, **fields)
  return fields


def _kind(loss_type: str | Sequence[str]) -> str:
  """'unpaired', 'ranking' or 'pair'."""
  if is_unpaired(loss_type):
    return "unpaired"
  return "ranking" if loss_type == RANKING_LOSS else "pair"


def _check_modifiers(loss_type: str | Sequence[str], *, f_divergence_type: str = "reverse_kl",
                     f_alpha_divergence_coef: float = F_ALPHA_DEFAULT, ld_alpha: float | None = None,
                     use_weighting: bool = False, desirable_weight: float = 1.0,
                     undesirable_weight: float = 1.0) -> None:
  """Check the f-DPO / LD-DPO / WPO / KTO-weight fields against the loss type (ValueError naming the field)."""
  kind = _kind(loss_type)
  if kind == "pair":
    _as_types(loss_type)  # an unknown type is named first
  types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  label = loss_type if isinstance(loss_type, str) else types
  _need(isinstance(f_divergence_type, str) and f_divergence_type in F_DIVERGENCES, "f_divergence_type",
        f_divergence_type, f"must be one of {F_DIVERGENCES} ('reverse_kl' is plain DPO).")
  _need(_is_number(f_alpha_divergence_coef) and f_alpha_divergence_coef > 0, "f_alpha_divergence_coef",
        f_alpha_divergence_coef, f"must be a finite number > 0 (TRL's default {F_ALPHA_DEFAULT}; 1 is reverse KL, "
        f"0 forward KL); it is read only with f_divergence_type='alpha_divergence'.")
  if f_divergence_type != "reverse_kl":
    bad = [t for t in types if kind != "pair" or t not in F_DIVERGENCE_LOSSES]
    if bad:
      raise ValueError(f"config.loss.f_divergence_type={f_divergence_type!r} is not defined for loss type {label!r} "
                       f"({bad}): f-DPO's log Z(x) cancels only in a chosen - rejected score difference. Allowed "
                       f"types: {sorted(F_DIVERGENCE_LOSSES)}; else set config.loss.f_divergence_type='reverse_kl'.")
  check_ld_alpha(ld_alpha)
  if ld_alpha is not None and kind != "pair":
    raise ValueError(f"config.loss.ld_alpha={ld_alpha!r} is for pair losses (it needs a pair's shared length); "
                     f"loss type {label!r} has none. Set it to None.")
  _need(isinstance(use_weighting, (bool, jnp.bool_)), "use_weighting", use_weighting, "must be True or False.")
  if use_weighting and kind != "pair":
    raise ValueError(f"config.loss.use_weighting=True (WPO) weights preference pairs; loss type {label!r} has none. "
                     f"Set it to False.")
  sorted_types = [t for t in types if t in ("aot", "aot_pair")]
  if use_weighting and sorted_types:
    raise ValueError(f"config.loss.use_weighting=True (WPO) with config.loss.type {label!r}: {sorted_types} sort the "
                     f"batch, so entry i is no longer pair i and per-pair weights would be misaligned (TRL refuses "
                     f"it too). Set config.loss.use_weighting=False or drop {sorted_types}.")
  for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
    _need(_traced(value) or (_is_number(value) and value > 0), name, value,
          "must be a finite number > 0 (TRL's KTO recommends desirable_weight * n_desirable / (undesirable_weight * "
          "n_undesirable) in [1, 4/3]).")
    if kind != "unpaired" and not _traced(value) and value != 1.0:
      raise ValueError(f"config.loss.{name}={value!r} weights unpaired rows ({sorted(UNPAIRED_LOSSES)}); loss type "
                       f"{label!r} does not use it. Set it to 1.0.")


def validate_loss_config(loss_type: str | Sequence[str], *, beta: float, label_smoothing: float,
                         weights: Sequence[float] | None = None, f_divergence_type: str = "reverse_kl",
                         f_alpha_divergence_coef: float = F_ALPHA_DEFAULT, ld_alpha: float | None = None,
                         use_weighting: bool = False, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                         **options) -> dict[str, Any]:
  """Raise a clear error for a bad loss configuration (called before any compile); return the resolved options.

  Args:
    loss_type: one `LOSSES` key, or a tuple of them for a weighted combination (then `weights`, one finite number
      per type; None means all 1.0, TRL's default loss_weights). Options are shared by the types of a
      combination; a name no type uses is an error, as is a nonzero label_smoothing when no type uses it.
      Also an `UNPAIRED_LOSSES` key (beta, the two KTO weights, its `UnpairedSpec.options`; no label smoothing),
      or `RANKING_LOSS`.
    f_divergence_type, f_alpha_divergence_coef: f-DPO (`from_config` passes them as options); a non-reverse
      f-divergence only for `F_DIVERGENCE_LOSSES`.
    ld_alpha, use_weighting, desirable_weight, undesirable_weight: the step's fields (`ablation_fields`), checked
      when given: pass `**ablation_fields(config.loss)` to check them with the rest.

  Returns:
    A dict, option name -> value, with every used option's default filled in (the f-DPO fields are not in it).
  """
  _check_modifiers(loss_type, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                   ld_alpha=ld_alpha, use_weighting=use_weighting, desirable_weight=desirable_weight,
                   undesirable_weight=undesirable_weight)
  if loss_type == RANKING_LOSS:  # ranked data: plackett_luce_loss, which has beta alone
    _need(_traced(beta) or (_is_number(beta) and beta > 0), "beta", beta, "must be a finite number > 0.")
    _need(label_smoothing == 0 and weights is None and not options, "label_smoothing/options",
          (label_smoothing, weights, options), f"are not used by {RANKING_LOSS!r}; leave them unset.")
    return {}
  if is_unpaired(loss_type):
    _need(_traced(beta) or (_is_number(beta) and beta > 0), "beta", beta,
          "must be a finite number > 0 (it scales the implicit reward; TRL's KTO default is 0.1).")
    _need(label_smoothing == 0, "label_smoothing", label_smoothing,
          f"is not used by the unpaired loss type {loss_type!r}; set it to 0.0.")
    if weights is not None:
      raise ValueError(f"config.loss.weights={weights!r} is only for a tuple of pair loss types; the unpaired loss "
                       f"type {loss_type!r} takes none. Drop it.")
    known = UNPAIRED_LOSSES[loss_type].options
    _check_unused(options, known, f"the unpaired loss type {loss_type!r}")
    resolved = {**known, **options}
    for name, value in resolved.items():
      _need(_traced(value) or isinstance(value, jax.Array) or _is_number(value), f"options.{name}", value,
            "must be a finite number.")
    return resolved
  types = _as_types(loss_type)
  label = loss_type if isinstance(loss_type, str) else types
  _need(_traced(beta) or (_is_number(beta) and beta > 0), "beta", beta,
        "must be a finite number > 0 (it scales the implicit reward; 0.1 is typical).")
  _need(_is_number(label_smoothing), "label_smoothing", label_smoothing, "must be a finite number.")
  if weights is not None:
    if isinstance(loss_type, str):
      raise ValueError(f"config.loss.weights={weights!r} is only for a tuple of loss types (got the single type "
                       f"{loss_type!r}); drop it or make config.loss.type a tuple.")
    weights = tuple(weights)
    _need(len(weights) == len(types), "weights", weights,
          f"must have one entry per loss type ({len(types)} for {types!r}), got {len(weights)}.")
    for w in weights:
      _need(_is_number(w), "weights", weights, "must all be finite numbers.")
  specs = [LOSSES[t] for t in types]
  if label_smoothing != 0 and not any(s.uses_label_smoothing for s in specs):
    users = sorted(t for t, s in LOSSES.items() if s.uses_label_smoothing)
    raise ValueError(f"config.loss.label_smoothing={label_smoothing} is not used by loss type {label!r}; set it to "
                     f"0.0, or use one of {users}.")
  known = {name: default for s in specs for name, default in s.options.items()}
  _check_unused(options, known, f"loss type {label!r}")
  resolved = {**known, **options}
  for name, value in resolved.items():
    if name == "delta" and isinstance(value, jax.Array):
      continue  # bco_pair's running reward mean may arrive traced from the trainer; it cannot be checked here
    _need(value is None or _is_number(value), f"options.{name}", value, "must be a finite number.")
  for s in specs:
    if s.check is not None:
      s.check(resolved, beta=beta, label_smoothing=label_smoothing)
  if not 0.0 <= label_smoothing < 0.5:  # per-type messages first; this bounds the rest
    raise ValueError(f"config.loss.label_smoothing={label_smoothing} must be in [0, 0.5): it is the assumed "
                     f"probability that a preference label is flipped.")
  return resolved


def _pair(types: tuple[str, ...], pc, pr, rc, rr, nc, nr, f_divergence: tuple[str, float] | None = None) -> Pair:
  """Cast to fp32 and check that the types get the inputs they need (ValueError naming the type otherwise)."""
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  for t in types:
    spec = LOSSES[t]
    if spec.uses_reference and (rc is None or rr is None):
      raise ValueError(
          f"loss type {t!r} needs reference_chosen_logps and reference_rejected_logps, got None; load the reference "
          f"model (or precompute its log-probs), or use a reference-free type "
          f"{sorted(k for k, s in LOSSES.items() if not s.uses_reference)}.")
    if spec.needs_num_tokens and (nc is None or nr is None):
      raise ValueError(f"loss type {t!r} is length-normalised and needs chosen_num_tokens and rejected_num_tokens "
                       f"([B] response token counts), got None.")
  tokens = lambda n: None if n is None else jnp.maximum(f32(n), 1.0)  # an empty response counts as 1 token, as TRL
  return Pair(f32(pc), f32(pr), f32(rc), f32(rr), tokens(nc), tokens(nr), f_divergence)


def _f_divergence(options: Mapping[str, Any]) -> tuple[str, float] | None:
  """Pair.f_divergence from preference_loss's options (after validation), refusing the step's own fields."""
  misplaced = sorted(set(options) & set(STEP_FIELDS))
  if misplaced:
    raise ValueError(f"{misplaced} are applied by the step (ld_logps, wpo_pair_weights, unpaired_loss), not by "
                     f"preference_loss; get them with `ablation_fields(config.loss)`, not as loss options.")
  f_type = options.get("f_divergence_type", "reverse_kl")
  return None if f_type == "reverse_kl" else (f_type, float(options.get("f_alpha_divergence_coef", F_ALPHA_DEFAULT)))


def _rewards(loss_type: str, p: Pair, beta: float) -> tuple[jax.Array, jax.Array]:
  """Logged (chosen, rejected) rewards `[B]` (nats), no gradient: beta * (pi - ref) for reference-based types;
  beta * average policy log-prob for reference-free ones (TRL's CPOTrainer simpo / ORPOTrainer)."""
  if LOSSES[loss_type].uses_reference:
    cr, rr = _raw_logratios(p)  # log-ratios, not f-DPO scores, as TRL logs them
  else:
    cr, rr = _avg_logps(p)
  return jax.lax.stop_gradient(beta * cr), jax.lax.stop_gradient(beta * rr)


def _call(loss_type: str, p: Pair, beta: float, label_smoothing: float, resolved: Mapping[str, Any]) -> jax.Array:
  spec = LOSSES[loss_type]
  own = {name: resolved[name] for name in spec.options}  # options are shared in a combination; pass each its own
  return spec.fn(p, beta=beta, label_smoothing=label_smoothing, **own)


def weighted_preference_loss(loss_types: Sequence[str], weights: Sequence[float] | None,
                             policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                             reference_chosen_logps: jax.Array | None, reference_rejected_logps: jax.Array | None, *,
                             beta: float = 0.1, label_smoothing: float = 0.0,
                             chosen_num_tokens: jax.Array | None = None, rejected_num_tokens: jax.Array | None = None,
                             **options) -> tuple[jax.Array, jax.Array, jax.Array]:
  """sum_i weights[i] * L_{loss_types[i]}, per pair `[B]` (TRL DPOConfig loss_type=[...], loss_weights=[...]).

  Inputs as `preference_loss`. beta, label_smoothing and options are shared by all types (each type reads its own
  options and ignores label_smoothing unless it uses it; the f-DPO score applies to every type, so each must be in
  `F_DIVERGENCE_LOSSES` for a non-reverse one). weights None = all 1.0. Rewards come from the first
  reference-based type, or the first type if none is.
  """
  types = _as_types(tuple(loss_types))
  weights = (1.0,) * len(types) if weights is None else tuple(weights)
  f_divergence = _f_divergence(options)
  resolved = validate_loss_config(types, beta=beta, label_smoothing=label_smoothing, weights=weights, **options)
  p = _pair(types, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            chosen_num_tokens, rejected_num_tokens, f_divergence)
  losses = sum(w * _call(t, p, beta, label_smoothing, resolved) for t, w in zip(types, weights))
  reward_type = next((t for t in types if LOSSES[t].uses_reference), types[0])
  return (losses, *_rewards(reward_type, p, beta))


def preference_loss(loss_type: str | Sequence[str], policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                    reference_chosen_logps: jax.Array | None, reference_rejected_logps: jax.Array | None, *,
                    beta: float = 0.1, label_smoothing: float = 0.0, chosen_num_tokens: jax.Array | None = None,
                    rejected_num_tokens: jax.Array | None = None,
                    **options) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair preference loss and implicit rewards for `LOSSES[loss_type]`.

  Args:
    loss_type: a `LOSSES` key; a tuple of them is a weighted combination, which goes to
      `weighted_preference_loss` with `options['weights']` (default all 1.0).
    policy_chosen_logps: `[B]` sequence log-probs, sums over response tokens (nats), any float dtype (computed
      in fp32); likewise `policy_rejected_logps`, `reference_chosen_logps` and `reference_rejected_logps`. The
      reference ones may be None for reference-free types (simpo, orpo, sft).
    chosen_num_tokens: `[B]` response token counts (and `rejected_num_tokens`), required by length-normalised
      types (ipo, sigmoid_norm, sft, rpo, simpo, orpo).
    options: the type's own options (`LossSpec.options`), and `f_divergence_type` / `f_alpha_divergence_coef`
      (f-DPO: the margin uses `f_divergence_score` of the log-ratios; `F_DIVERGENCE_LOSSES` only).

  Returns:
    `(losses_B, chosen_rewards_B, rejected_rewards_B)`. The rewards are `beta * (pi - ref)` (reference-free
    types: beta * average log-prob; never the f-DPO scores, as TRL logs them) for logging and carry no gradient
    (the loss alone is differentiated).
  """
  if is_unpaired(loss_type):
    raise ValueError(f"loss type {loss_type!r} is unpaired (rows of prompt, completion, desirable): call "
                     f"`unpaired_loss`, not preference_loss.")
  if not isinstance(loss_type, str):
    weights = options.pop("weights", None)
    return weighted_preference_loss(loss_type, weights, policy_chosen_logps, policy_rejected_logps,
                                    reference_chosen_logps, reference_rejected_logps, beta=beta,
                                    label_smoothing=label_smoothing, chosen_num_tokens=chosen_num_tokens,
                                    rejected_num_tokens=rejected_num_tokens, **options)
  f_divergence = _f_divergence(options)
  resolved = validate_loss_config(loss_type, beta=beta, label_smoothing=label_smoothing, **options)
  p = _pair((loss_type,), policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps, chosen_num_tokens, rejected_num_tokens, f_divergence)
  return (_call(loss_type, p, beta, label_smoothing, resolved), *_rewards(loss_type, p, beta))


# --- unpaired losses: rows of (prompt, completion, desirable), TRL KTOTrainer / BCOTrainer -------------------------
# fn(logratios, kl, desirable, *, beta, delta) -> losses [B] before the desirable / undesirable weights.


def _kto(lr: jax.Array, kl: jax.Array, desirable: jax.Array, *, beta: float, delta: Any) -> jax.Array:
  """KTO (Ethayarajh et al. 2024, "KTO: model alignment as prospect theoretic optimization", eq. 7) with TRL's
  value 1 - s(.): desirable 1 - s(beta (lr - z)), undesirable 1 - s(beta (z - lr)), z the batch KL estimate (the
  reference point). TRL 1.16 KTOTrainer `_compute_loss`, loss_type='kto'."""
  del delta
  return jnp.where(desirable, 1.0 - jax.nn.sigmoid(beta * (lr - kl)), 1.0 - jax.nn.sigmoid(beta * (kl - lr)))


def _apo_zero_unpaired(lr: jax.Array, kl: jax.Array, desirable: jax.Array, *, beta: float, delta: Any) -> jax.Array:
  """APO-zero on unpaired rows (D'Oosterlinck et al. 2024, eq. 7 split by label): desirable 1 - s(beta lr),
  undesirable s(beta lr); no KL. TRL 1.16 KTOTrainer, loss_type='apo_zero_unpaired'."""
  del kl, delta
  return jnp.where(desirable, 1.0 - jax.nn.sigmoid(beta * lr), jax.nn.sigmoid(beta * lr))


def _bco(lr: jax.Array, kl: jax.Array, desirable: jax.Array, *, beta: float, delta: Any) -> jax.Array:
  """BCO (Jung et al. 2024, "Binary classifier optimization for LLM alignment"): a logistic classifier with logit
  beta lr - delta, desirable = class 1: -log s(beta lr - delta), undesirable -log s(-(beta lr - delta)); delta is
  the running mean of the rewards (`running_mean_update`, then this batch's update). TRL 0.x BCOTrainer.bco_loss
  without its optional underlying-distribution-matching weights (BCO is not in TRL 1.16)."""
  del kl
  m = beta * lr - delta
  return jnp.where(desirable, -jax.nn.log_sigmoid(m), -jax.nn.log_sigmoid(-m))


class UnpairedSpec(NamedTuple):
  """How to call one unpaired variant: `fn(logratios, kl, desirable, *, beta, delta) -> losses [B]`; `uses_kl`:
  needs the KL completions' log-probs (TRL's calculate_KL); `options`: its config.loss.options and defaults."""
  fn: Callable[..., jax.Array]
  uses_kl: bool
  options: Mapping[str, Any]


UNPAIRED_LOSSES: dict[str, UnpairedSpec] = {
    "kto": UnpairedSpec(_kto, uses_kl=True, options={}),
    "apo_zero_unpaired": UnpairedSpec(_apo_zero_unpaired, uses_kl=False, options={}),
    # delta: a fixed shift, used where no running mean is kept (evaluation); training passes the running mean.
    "bco": UnpairedSpec(_bco, uses_kl=False, options={"delta": 0.0}),
}


def is_unpaired(loss_type: Any) -> bool:
  """Whether `loss_type` is an `UNPAIRED_LOSSES` key (data: rows of prompt, completion, desirable)."""
  return isinstance(loss_type, str) and loss_type in UNPAIRED_LOSSES


def unpaired_kl(policy_kl_logps: jax.Array, reference_kl_logps: jax.Array, weights: jax.Array) -> jax.Array:
  """KTO's reference point z, `[]` fp32 nats, no gradient: max(0, sum(w (pi_kl - ref_kl)) / max(sum(w), 1)).

  The KL completions are mismatched (prompt, another row's completion) pairs. TRL 1.16 takes each process's
  batch mean, averages over processes and clamps at 0; the batch here is global, so the weighted mean (w: the
  row mask, 0 = padding) is that mean over all real rows. Under gradient accumulation it is each micro-batch's.
  """
  w = jnp.asarray(weights, jnp.float32)
  diff = jnp.asarray(policy_kl_logps, jnp.float32) - jnp.asarray(reference_kl_logps, jnp.float32)
  mean = jnp.sum(jnp.where(w > 0, w * diff, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def unpaired_loss(loss_type: str, policy_logps: jax.Array, reference_logps: jax.Array,
                  policy_kl_logps: jax.Array | None, reference_kl_logps: jax.Array | None, desirable: jax.Array,
                  weights: jax.Array, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                  delta: Any = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row unpaired loss (`UNPAIRED_LOSSES[loss_type]`), rewards and the KL estimate.

  Args:
    loss_type: 'kto', 'apo_zero_unpaired' or 'bco'.
    policy_logps: `[B]` sequence log-probs of each row's completion (nats, sum over its tokens), any float dtype
      (fp32 inside); `reference_logps` likewise under pi_ref.
    policy_kl_logps: `[B]` log-probs of each row's KL completion (another row's completion under this prompt),
      and `reference_kl_logps`; read by 'kto' only (None is fine for the others).
    desirable: `[B]` bool (or 0/1), True for a desirable completion.
    weights: `[B]` row mask (0 = padding row); it enters the KL mean only: the losses are not multiplied by it
      (the step's weighted sum is), as `preference_loss`'s are not.
    beta: scale of the implicit reward.
    desirable_weight, undesirable_weight: multiply the desirable / undesirable rows' losses (TRL KTOConfig; TRL's
      BCO has none: leave them at 1.0 for TRL's BCO).
    delta: bco's reward shift (nats), `[]`, may be traced: in training the running mean AFTER this batch's update
      (`running_mean_update(state, rewards, weights).mean`, as TRL's BCOTrainer updates before the loss); else
      config.loss.options.delta (default 0.0).

  Returns:
    `(losses_B, rewards_B, kl)`: losses (kto, apo_zero_unpaired: a weighted probability; bco: nats), rewards
    beta * (log pi - log pi_ref) without gradient, kl `[]` (`unpaired_kl`; 0 for types without it). No gradient
    flows through kl, so d loss / d policy_logps treats the reference point as a constant.
  """
  if not is_unpaired(loss_type):
    raise ValueError(f"config.loss.type={loss_type!r} is not an unpaired loss; choose one of "
                     f"{sorted(UNPAIRED_LOSSES)} (pair losses go through preference_loss).")
  validate_loss_config(loss_type, beta=beta, label_smoothing=0.0, desirable_weight=desirable_weight,
                       undesirable_weight=undesirable_weight)
  spec = UNPAIRED_LOSSES[loss_type]
  lr = jnp.asarray(policy_logps, jnp.float32) - jnp.asarray(reference_logps, jnp.float32)
  if spec.uses_kl:
    if policy_kl_logps is None or reference_kl_logps is None:
      raise ValueError(f"loss type {loss_type!r} needs policy_kl_logps and reference_kl_logps ([B] log-probs of each "
                       f"row's KL completion), got None.")
    kl = unpaired_kl(policy_kl_logps, reference_kl_logps, weights)
  else:
    kl = jnp.zeros((), jnp.float32)
  desirable = jnp.asarray(desirable).astype(bool)
  losses = spec.fn(lr, kl, desirable, beta=beta, delta=delta)
  losses = jnp.where(desirable, desirable_weight, undesirable_weight) * losses
  return losses, jax.lax.stop_gradient(beta * lr), kl


class RunningMean(NamedTuple):
  """A count-weighted running mean, TRL's RunningMoments mean (BCO's reward shift): `count`, `mean`, fp32 `[]`.

  Start from `running_mean_init()`. fp32 counts are exact up to 2^24 rows (weights 0/1); past that the mean
  still moves, with relative error ~1e-7 per update.
  """
  count: jax.Array
  mean: jax.Array


def running_mean_init() -> RunningMean:
  """No values seen yet: count 0, mean 0."""
  return RunningMean(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def running_mean_update(state: RunningMean, values: jax.Array, weights: jax.Array) -> RunningMean:
  """The running mean of every value seen so far, each weighted by its weight (0: ignored, e.g. a padding row).

  mean' = mean + (sum w v - (sum w) mean) / (count + sum w), count' = count + sum w; TRL's RunningMoments.update
  (count-weighted batch means, gathered over processes). No gradient flows into the statistics. An update with
  all weights 0 leaves the state as it was.
  """
  v = jax.lax.stop_gradient(jnp.asarray(values, jnp.float32))
  w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), v.shape)
  total = jnp.sum(w)
  moved = jnp.sum(jnp.where(w > 0, w * v, 0.0)) - total * state.mean
  count = state.count + total
  mean = state.mean + jnp.where(count > 0, moved / jnp.where(count > 0, count, 1.0), 0.0)
  return RunningMean(count, mean)


def bco_running_update(state: RunningMean, policy_logps: jax.Array, reference_logps: jax.Array, weights: jax.Array,
                       *, beta: float) -> RunningMean:
  """BCO's step: the running mean updated with this batch's rewards beta * (log pi - log pi_ref) `[B]` (all rows,
  desirable or not; weights = row mask); pass the result's `.mean` as `unpaired_loss(..., delta=)`."""
  rewards = beta * (jnp.asarray(policy_logps, jnp.float32) - jnp.asarray(reference_logps, jnp.float32))
  return running_mean_update(state, rewards, weights)


RANKING_LOSS = "plackett_luce"  # config.loss.type for ranked data (K responses per prompt); not a pair loss
PL_MASKED = -1e30  # stands in for -inf at padded responses: finite, so logsumexp and its gradient never see inf - inf


def plackett_luce_loss(policy_logps_BxK: jax.Array, reference_logps_BxK: jax.Array, *, beta: float,
                       valid_BxK: jax.Array | None = None) -> jax.Array:
  """The seed's Plackett-Luce generalisation of DPO to K responses ranked best first (index 0 best), `[B]` nats::

      L = -sum_{k=0}^{K-2} log( exp(r_k) / sum_{j>=k} exp(r_j) ),   r = beta (log pi - log pi_ref)  `[B, K]`

  (the k = K-1 term is log 1 = 0). Invalid (padding) responses, valid_BxK False, are dropped from the ranking:
  they neither contribute a term nor appear in any denominator. With K = 2 this is the DPO loss (seed eq. 7).
  """
  r = beta * (jnp.asarray(policy_logps_BxK, jnp.float32) - jnp.asarray(reference_logps_BxK, jnp.float32))
  valid = jnp.ones(r.shape, bool) if valid_BxK is None else jnp.asarray(valid_BxK, bool)
  r = jnp.where(valid, r, PL_MASKED)
  tail = jax.lax.cumlogsumexp(r, axis=r.ndim - 1, reverse=True)  # log sum_{j >= k} exp(r_j)
  return -jnp.sum(jnp.where(valid, r - tail, 0.0), axis=-1)
