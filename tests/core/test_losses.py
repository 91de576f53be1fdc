"""The DPO loss against the seed's equations: golden values by hand, the gradient weighting, eq. (1)-(5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses


def softplus(x):
  return math.log1p(math.exp(x))


# (policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing, expected loss)
# expected = (1 - eps) * log(1 + exp(-m)) + eps * log(1 + exp(m)),  m = beta * ((pc - rc) - (pr - rr)),
# worked out by hand; the literals are checked against math below so a typo cannot hide.
GOLDEN = [
    (-1.0, -2.0, -1.5, -1.5, 0.1, 0.0, 0.6443966600735709),  # m = 0.1
    (-10.0, -4.0, -8.0, -5.0, 0.5, 0.0, 1.7014132779827524),  # m = 0.5 * (-2 - 1) = -1.5
    (-3.0, -3.0, -3.0, -3.0, 0.1, 0.0, math.log(2.0)),  # m = 0
    (-1.0, -2.0, -1.5, -1.5, 0.1, 0.2, 0.6643966600735709),  # cDPO: softplus(-m) + eps * m
    (-20.0, -30.0, -25.0, -25.0, 1.0, 0.1, 1.0000453988992168),  # m = 10, eps = 0.1
]


def test_golden_literals_are_the_formula():
  for pc, pr, rc, rr, beta, eps, expected in GOLDEN:
    m = beta * ((pc - rc) - (pr - rr))
    assert expected == pytest.approx((1 - eps) * softplus(-m) + eps * softplus(m), rel=1e-12)


@pytest.mark.parametrize("pc,pr,rc,rr,beta,eps,expected", GOLDEN)
def test_sigmoid_loss_golden(pc, pr, rc, rr, beta, eps, expected):
  loss, chosen_r, rejected_r = losses.preference_loss(
      "sigmoid", jnp.array([pc]), jnp.array([pr]), jnp.array([rc]), jnp.array([rr]),
      beta=beta, label_smoothing=eps)
  assert float(loss[0]) == pytest.approx(expected, rel=1e-6), (
      "DPO sigmoid loss differs from the hand-computed value of seed eq. (7); check that beta multiplies "
      "the log-ratio margin exactly once and label smoothing weights log sigmoid(-margin).")
  assert float(chosen_r[0]) == pytest.approx(beta * (pc - rc), rel=1e-6)
  assert float(rejected_r[0]) == pytest.approx(beta * (pr - rr), rel=1e-6)


def test_loss_is_log2_when_policy_equals_reference():
  logps = jnp.array([-3.0, -100.0, -0.5, -42.0])
  for beta in (0.01, 0.1, 1.0):
    loss, cr, rr = losses.preference_loss("sigmoid", logps, logps[::-1], logps, logps[::-1], beta=beta)
    np.testing.assert_array_equal(np.asarray(loss), np.full(4, np.float32(math.log(2.0))))
    np.testing.assert_array_equal(np.asarray(cr), 0.0)
    np.testing.assert_array_equal(np.asarray(rr), 0.0)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_gradient_follows_the_seed_weighting(eps):
  """dL/dlog pi(y_w) = -beta * sigma(r_l - r_w), dL/dlog pi(y_l) = +beta * sigma(r_l - r_w) (eps = 0);
  with cDPO the weight becomes (1 - eps) * sigma(r_l - r_w) - eps * sigma(r_w - r_l)."""
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 5, size=6), jnp.float32) for _ in range(4))
  beta = 0.3

  def total(pc, pr, rc, rr):
    return losses.preference_loss("sigmoid", pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0].sum()

  g_pc, g_pr, g_rc, g_rr = jax.grad(total, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  r_w, r_l = beta * (pc - rc), beta * (pr - rr)
  weight = (1 - eps) * losses.dpo_gradient_weight(r_w, r_l) - eps * jax.nn.sigmoid(r_w - r_l)
  np.testing.assert_allclose(g_pc, -beta * weight, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_pr, beta * weight, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_rc, beta * weight, rtol=1e-5, atol=1e-7)  # reference enters with a minus sign
  np.testing.assert_allclose(g_rr, -beta * weight, rtol=1e-5, atol=1e-7)
  if eps == 0.0:  # the seed's weight: large exactly when the implicit reward orders the pair wrongly
    np.testing.assert_allclose(weight, 1.0 / (1.0 + np.exp(np.asarray(r_w - r_l))), rtol=1e-5)


def test_rewards_carry_no_gradient():
  def reward_sum(pc):
    return losses.preference_loss("sigmoid", pc, pc - 1, pc, pc, beta=0.1)[1].sum()
  assert float(jnp.abs(jax.grad(reward_sum)(jnp.ones(3))).sum()) == 0.0


def test_dpo_is_bradley_terry_on_implicit_rewards():
  """Eq. (7) is eq. (2) with r = r_hat = beta log(pi / pi_ref), and eq. (2) is -log of eq. (1)."""
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(-10, 3, size=5), jnp.float32) for _ in range(4))
  beta = 0.2
  dpo = losses.preference_loss("sigmoid", pc, pr, rc, rr, beta=beta)[0]
  r_w, r_l = losses.implicit_reward(pc, rc, beta), losses.implicit_reward(pr, rr, beta)
  np.testing.assert_allclose(dpo, losses.bradley_terry_loss(r_w, r_l), rtol=1e-6)
  np.testing.assert_allclose(losses.bradley_terry_loss(r_w, r_l), -np.log(losses.bradley_terry_prob(r_w, r_l)),
                             rtol=1e-5)


def test_optimal_policy_and_reward_reparameterisation():
  """Eq. (4) -> eq. (5) recovers r exactly with log Z; without it, reward differences (all Bradley-Terry
  sees) are still exact: the partition function cancels."""
  rng = np.random.default_rng(2)
  beta = 0.5
  ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(3, 7)), jnp.float32))  # 3 prompts x 7 candidates
  r = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  pi = losses.optimal_policy_logps(ref, r, beta)
  np.testing.assert_allclose(jnp.exp(pi).sum(-1), 1.0, rtol=1e-6)
  log_z = jax.nn.logsumexp(ref + r / beta, axis=-1, keepdims=True)
  np.testing.assert_allclose(losses.reward_from_policy(pi, ref, beta, log_z), r, rtol=1e-5, atol=1e-5)
  implicit = losses.implicit_reward(pi, ref, beta)
  np.testing.assert_allclose(implicit[:, :, None] - implicit[:, None, :], r[:, :, None] - r[:, None, :],
                             rtol=1e-4, atol=1e-5)


def test_kl_regularized_objective_at_the_optimum():
  """Under pi_r of eq. (4), r(y) - beta log(pi_r(y)/pi_ref(y)) = beta log Z for every y, so eq. (3)'s sample
  estimate equals beta log Z whatever the samples, and any other policy scores lower in expectation."""
  rng = np.random.default_rng(3)
  beta = 0.25
  ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=9), jnp.float32))
  r = jnp.asarray(rng.normal(size=9), jnp.float32)
  pi = losses.optimal_policy_logps(ref, r, beta)
  log_z = float(jax.nn.logsumexp(ref + r / beta))
  samples = jnp.asarray(rng.integers(0, 9, size=20))
  value = losses.kl_regularized_objective(r[samples], pi[samples], ref[samples], beta)
  assert float(value) == pytest.approx(beta * log_z, rel=1e-5)
  exact = lambda logp: float(jnp.sum(jnp.exp(logp) * (r - beta * (logp - ref))))
  other = jax.nn.log_softmax(pi + jnp.asarray(rng.normal(size=9) * 0.3, jnp.float32))
  assert exact(pi) == pytest.approx(beta * log_z, rel=1e-5)
  assert exact(other) < exact(pi)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_inputs_stay_finite(dtype):
  pc = jnp.array([0.0, -1e4, -5e3, -50.0], dtype)
  pr = jnp.array([-1e4, 0.0, -5e3, -50.0], dtype)
  ref = jnp.array([-10.0, -10.0, -5e3, -50.0], dtype)
  loss, cr, rr = losses.preference_loss("sigmoid", pc, pr, ref, ref, beta=1.0, label_smoothing=0.1)
  grads = jax.grad(lambda p: losses.preference_loss("sigmoid", p, pr, ref, ref, beta=1.0)[0].sum())(pc)
  assert loss.dtype == jnp.float32
  for x in (loss, cr, rr, grads):
    assert bool(jnp.all(jnp.isfinite(x)))
  # eps * margin dominates (no overflow to inf); the margin is that of the inputs as rounded to `dtype`.
  margin = float(pc[0].astype(jnp.float32) - pr[0].astype(jnp.float32))
  assert float(loss[0]) == pytest.approx(0.1 * margin, rel=1e-5)
  assert float(loss[3]) == pytest.approx(math.log(2.0), rel=1e-6)


def test_bad_config_is_a_clear_error():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="config.loss.type='nope' is unknown"):
    losses.preference_loss("nope", x, x, x, x)
  with pytest.raises(ValueError, match="config.loss.beta"):
    losses.preference_loss("sigmoid", x, x, x, x, beta=0.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.preference_loss("sigmoid", x, x, x, x, label_smoothing=0.5)
  with pytest.raises(ValueError, match="not used by loss type"):
    losses.preference_loss("sigmoid", x, x, x, x, gamma=1.0)
