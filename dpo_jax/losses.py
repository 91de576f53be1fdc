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

Combinations: `weighted_preference_loss` (sum_i w_i L_i, as TRL's loss_type list + loss_weights).
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


class Pair(NamedTuple):
  """A batch of preference pairs as every variant sees it: all `[B]` fp32.

  Log-probs are sums over response tokens (nats); the reference fields are None for reference-free calls and
  the token counts (clamped to >= 1, as TRL clamps its masks) are None when the caller gave none.
  """
  policy_chosen: jax.Array
  policy_rejected: jax.Array
  reference_chosen: jax.Array | None
  reference_rejected: jax.Array | None
  chosen_tokens: jax.Array | None
  rejected_tokens: jax.Array | None


def _logratios(p: Pair) -> tuple[jax.Array, jax.Array]:
  """(chosen, rejected) log pi - log pi_ref, `[B]` nats."""
  return p.policy_chosen - p.reference_chosen, p.policy_rejected - p.reference_rejected


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
  TRL keeps delta as a running mean of beta * (logratios) over training; a pure function cannot, so `delta`
  (nats) is an option (default 0.0) and keeping it current is the trainer's job.
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
    if loss_type_or_types not in LOSSES:
      raise ValueError(f"config.loss.type={loss_type_or_types!r} is unknown; choose one of {sorted(LOSSES)}.")
    return (loss_type_or_types,)
  types = tuple(loss_type_or_types)
  if not types:
    raise ValueError("config.loss.type=() is empty; give one loss type or a tuple of them.")
  for t in types:
    if not isinstance(t, str) or t not in LOSSES:
      raise ValueError(f"config.loss.type={types!r}: {t!r} is unknown; choose from {sorted(LOSSES)}.")
  return types


def from_config(loss_cfg: Mapping[str, Any]) -> tuple[str | tuple[str, ...], dict[str, Any]]:
  """`(loss_type, keyword options)` for `preference_loss` from a `config.loss` block.

  `loss.types` (non-empty) is a weighted combination with `loss.weights` (() = all 1.0) and takes precedence
  over `loss.type`. `loss.options` fields left at None take the variant's default and are not passed.
  """
  options = {k: v for k, v in dict(loss_cfg.get("options", None) or {}).items() if v is not None}
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
  if loss_type_or_types == RANKING_LOSS:
    return True
  return any(LOSSES[t].uses_reference for t in _as_types(loss_type_or_types))


def validate_loss_config(loss_type: str | Sequence[str], *, beta: float, label_smoothing: float,
                         weights: Sequence[float] | None = None, **options) -> dict[str, Any]:
  """Raise a clear error for a bad loss configuration (called before any compile); return the resolved options.

  Args:
    loss_type: one `LOSSES` key, or a tuple of them for a weighted combination (then `weights`, one finite number
      per type; None means all 1.0, TRL's default loss_weights). Options are shared by the types of a
      combination; a name no type uses is an error, as is a nonzero label_smoothing when no type uses it.

  Returns:
    A dict, option name -> value, with every used option's default filled in.
  """
  if loss_type == RANKING_LOSS:  # ranked data: plackett_luce_loss, which has beta alone
    _need(_traced(beta) or (_is_number(beta) and beta > 0), "beta", beta, "must be a finite number > 0.")
    _need(label_smoothing == 0 and weights is None and not options, "label_smoothing/options",
          (label_smoothing, weights, options), f"are not used by {RANKING_LOSS!r}; leave them unset.")
    return {}
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
  unused = sorted(set(options) - set(known))
  if unused:
    raise ValueError(f"config.loss.options {unused} are not used by loss type {label!r}; its options are "
                     f"{sorted(known) or 'none'}. Remove them (config.loss.options.<name>).")
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


def _pair(types: tuple[str, ...], pc, pr, rc, rr, nc, nr) -> Pair:
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
  return Pair(f32(pc), f32(pr), f32(rc), f32(rr), tokens(nc), tokens(nr))


def _rewards(loss_type: str, p: Pair, beta: float) -> tuple[jax.Array, jax.Array]:
  """Logged (chosen, rejected) rewards `[B]` (nats), no gradient: beta * (pi - ref) for reference-based types;
  beta * average policy log-prob for reference-free ones (TRL's CPOTrainer simpo / ORPOTrainer)."""
  if LOSSES[loss_type].uses_reference:
    cr, rr = _logratios(p)
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
  options and ignores label_smoothing unless it uses it). weights None = all 1.0. Rewards come from the first
  reference-based type, or the first type if none is.
  """
  types = _as_types(tuple(loss_types))
  weights = (1.0,) * len(types) if weights is None else tuple(weights)
  resolved = validate_loss_config(types, beta=beta, label_smoothing=label_smoothing, weights=weights, **options)
  p = _pair(types, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            chosen_num_tokens, rejected_num_tokens)
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
    options: the type's own options (`LossSpec.options`).

  Returns:
    `(losses_B, chosen_rewards_B, rejected_rewards_B)`. The rewards are `beta * (pi - ref)` (reference-free
    types: beta * average log-prob) for logging and carry no gradient (the loss alone is differentiated).
  """
  if not isinstance(loss_type, str):
    weights = options.pop("weights", None)
    return weighted_preference_loss(loss_type, weights, policy_chosen_logps, policy_rejected_logps,
                                    reference_chosen_logps, reference_rejected_logps, beta=beta,
                                    label_smoothing=label_smoothing, chosen_num_tokens=chosen_num_tokens,
                                    rejected_num_tokens=rejected_num_tokens, **options)
  resolved = validate_loss_config(loss_type, beta=beta, label_smoothing=label_smoothing, **options)
  p = _pair((loss_type,), policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps, chosen_num_tokens, rejected_num_tokens)
  return (_call(loss_type, p, beta, label_smoothing, resolved), *_rewards(loss_type, p, beta))


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
