"""The RL math of dpo_jax/rl.py against independent computations: numpy loops written here, numbers worked out by
hand in comments, and the forms TRL's PPO/GRPO/RLOO trainers document (Bessel variance, 0.5 value loss, ...)."""

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import rl

RTOL, ATOL = 1e-5, 1e-6
N = 7
LENGTHS = (N, 1, 3, 5)  # a full-length row, a length-1 row and two ragged ones


def ragged_mask(lengths=LENGTHS, n=N):
  """`[B, N]` float32 right-padded mask: row b has lengths[b] real tokens."""
  return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def rand(rng, *shape, scale=1.0):
  return (scale * rng.normal(size=shape)).astype(np.float32)


def log_softmax_np(logits):
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --- masked statistics -------------------------------------------------------------------------------------------


def test_masked_mean_is_sum_over_real_tokens_divided_by_their_count():
  rng = np.random.default_rng(0)
  x, mask = rand(rng, 4, N), ragged_mask()
  expected_all = sum(float(x[b, t]) for b in range(4) for t in range(LENGTHS[b])) / sum(LENGTHS)
  np.testing.assert_allclose(rl.masked_mean(x, mask), expected_all, rtol=RTOL, atol=ATOL,
                             err_msg="masked_mean over the whole array should average only the real tokens")
  expected_rows = [np.mean(x[b, :LENGTHS[b]], dtype=np.float64) for b in range(4)]
  np.testing.assert_allclose(rl.masked_mean(x, mask, axis=-1), expected_rows, rtol=RTOL, atol=ATOL,
                             err_msg="masked_mean(axis=-1) should average each row over its own real tokens")


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
  x = np.full((2, 3), 5.0, np.float32)
  mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
  np.testing.assert_allclose(rl.masked_mean(x, mask, axis=-1), [5.0, 0.0],
                             err_msg="a row with no real tokens should average to 0, not NaN")
  assert float(rl.masked_mean(x, np.zeros_like(mask))) == 0.0


def test_masked_whiten_hand_case_uses_bessel_variance():
  # x = [1, 2, 3, 4 | pad 100]: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5;
  # unbiased var = 5 / 3 = 1.666667, std = 1.290994 -> (x - 2.5) / std = [-1.161895, -0.387298, 0.387298, 1.161895].
  # (The biased var 5 / 4 would give std 1.118034 and -1.341641 at the first token.)
  x = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  expected = [[-1.161895, -0.387298, 0.387298, 1.161895, 0.0]]
  np.testing.assert_allclose(rl.masked_whiten(x, mask), expected, rtol=RTOL, atol=ATOL,
                             err_msg="masked_whiten should divide by the unbiased (n - 1) std as TRL/torch.var "
                                     "does, ignore the padding value 100 and return 0 on padding")
  # shift_mean=False scales only: (x - 2.5) / std + 2.5.
  np.testing.assert_allclose(rl.masked_whiten(x, mask, shift_mean=False),
                             [[1.338105, 2.112702, 2.887298, 3.661895, 0.0]], rtol=RTOL, atol=ATOL,
                             err_msg="masked_whiten(shift_mean=False) should add the mean back (TRL) and zero padding")


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_numpy_ddof1_over_all_real_tokens(shift_mean):
  rng = np.random.default_rng(1)
  x, mask = rand(rng, 4, N, scale=3.0) + 1.5, ragged_mask()
  real = x[mask > 0].astype(np.float64)
  mean, std = real.mean(), real.std(ddof=1)
  expected = (x - mean) / np.sqrt(std ** 2 + 1e-8) + (0.0 if shift_mean else mean)
  expected = np.where(mask > 0, expected, 0.0)
  out = np.asarray(rl.masked_whiten(x, mask, shift_mean=shift_mean))
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
  assert np.all(out[mask == 0] == 0.0), "masked_whiten must return exactly 0 on padding"
  if shift_mean:
    whitened = out[mask > 0].astype(np.float64)
    assert abs(whitened.mean()) < 1e-5 and abs(whitened.std(ddof=1) - 1.0) < 1e-5, (
        "whitened real tokens should have mean 0 and unbiased std 1")


def test_masked_whiten_of_a_constant_is_zero_not_nan():
  out = rl.masked_whiten(np.full((2, 4), 3.0, np.float32), ragged_mask((4, 2), 4))
  np.testing.assert_array_equal(np.asarray(out), 0.0, err_msg="zero variance: eps should keep the result finite (0)")


# --- KL estimators, exact KL, entropy ----------------------------------------------------------------------------


def test_k1_and_k3_hand_values():
  # logp = -1, ref = -2: k1 = 1; r = pi_ref / pi = e^-1 = 0.367879, k3 = (r - 1) - log r = -0.632121 + 1 = 0.367879.
  # logp = -2, ref = -1: k1 = -1; r = e = 2.718282, k3 = 1.718282 - 1 = 0.718282.
  # logp = ref: both 0.
  logps = np.array([[-1.0, -2.0, -0.5]], np.float32)
  ref = np.array([[-2.0, -1.0, -0.5]], np.float32)
  np.testing.assert_allclose(rl.kl_per_token(logps, ref, "k1"), [[1.0, -1.0, 0.0]], rtol=RTOL, atol=ATOL,
                             err_msg="k1 should be log pi - log pi_ref")
  np.testing.assert_allclose(rl.kl_per_token(logps, ref, "k3"), [[0.367879, 0.718282, 0.0]], rtol=RTOL, atol=ATOL,
                             err_msg="k3 should be (r - 1) - log r with r = pi_ref / pi (not pi / pi_ref)")
  np.testing.assert_array_equal(rl.kl_per_token(logps, ref), rl.kl_per_token(logps, ref, "k1"),
                                err_msg="the default estimator should be k1")


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl():
  """E_{y~p}[k(y)] = sum_y p(y) k(y) = sum_y p log(p / q) for both estimators (exact expectation, no sampling)."""
  rng = np.random.default_rng(2)
  logp, logq = log_softmax_np(rng.normal(size=6)), log_softmax_np(rng.normal(size=6) * 1.5)
  p = np.exp(logp)
  exact_kl = float(np.sum(p * (logp - logq)))
  assert exact_kl > 0.05
  for est in rl.KL_ESTIMATORS:
    k_y = np.asarray(rl.kl_per_token(logp[None].astype(np.float32), logq[None].astype(np.float32), est),
                     np.float64)[0]
    np.testing.assert_allclose(np.sum(p * k_y), exact_kl, rtol=RTOL, atol=ATOL,
                               err_msg=f"the expectation of {est} under p should equal KL(p || q)")
  k1 = np.asarray(rl.kl_per_token(logp[None].astype(np.float32), logq[None].astype(np.float32), "k1"))
  assert np.any(k1 < 0), "this p, q was chosen so that k1 is negative on some outcome (it is unbiased, not >= 0)"


def test_k3_is_never_negative():
  # Log-ratios from -50 to 50 nats and down to 1e-12 in magnitude on either side.
  mags = np.logspace(-12, np.log10(50.0), 500)
  log_ratio = np.concatenate([mags, -mags, [0.0]]).astype(np.float32)
  k3 = np.asarray(rl.kl_per_token(log_ratio[None], np.zeros_like(log_ratio)[None], "k3"))
  assert np.all(np.isfinite(k3)), "k3 should be finite over this range"
  assert np.all(k3 >= 0.0), f"k3 must be >= 0; min {k3.min()} at log-ratio {log_ratio[np.argmin(k3[0])]}"


def test_kl_per_token_rejects_an_unknown_estimator():
  with pytest.raises(ValueError, match="k2"):
    rl.kl_per_token(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "k2")


def test_exact_kl_per_token_matches_numpy_and_is_zero_for_equal_logits():
  rng = np.random.default_rng(3)
  logits, ref_logits = rand(rng, 2, 3, 11, scale=2.0), rand(rng, 2, 3, 11, scale=2.0)
  logp, logq = log_softmax_np(logits), log_softmax_np(ref_logits)
  expected = np.zeros((2, 3))
  for b in range(2):
    for t in range(3):
      expected[b, t] = sum(math.exp(logp[b, t, v]) * (logp[b, t, v] - logq[b, t, v]) for v in range(11))
  out = rl.exact_kl_per_token(jnp.asarray(logits), jnp.asarray(ref_logits))
  assert out.shape == (2, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL,
                             err_msg="exact_kl_per_token should be KL(pi || pi_ref) = sum_v pi log(pi / pi_ref)")
  np.testing.assert_allclose(rl.exact_kl_per_token(logits, logits + 7.0), 0.0, atol=ATOL,
                             err_msg="logits differing by a constant are the same distribution: KL must be 0")
  bf16 = rl.exact_kl_per_token(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(ref_logits, jnp.bfloat16))
  assert bf16.dtype == jnp.float32, "exact_kl_per_token should compute in fp32 whatever the logits' dtype"


def test_entropy_matches_numpy_and_is_log_vocab_for_uniform_logits():
  rng = np.random.default_rng(4)
  logits = rand(rng, 2, 3, 13, scale=2.0)
  logp = log_softmax_np(logits)
  expected = -np.sum(np.exp(logp) * logp, axis=-1)
  np.testing.assert_allclose(rl.entropy(jnp.asarray(logits)), expected, rtol=RTOL, atol=ATOL,
                             err_msg="entropy should be -sum_v pi log pi in nats")
  np.testing.assert_allclose(rl.entropy(jnp.full((2, 3, 13), 0.3)), math.log(13.0), rtol=RTOL,
                             err_msg="uniform logits over V tokens should have entropy log V")
  one_hot = jnp.where(jnp.arange(13) == 4, 0.0, -1e4)[None, None]
  np.testing.assert_allclose(rl.entropy(one_hot), 0.0, atol=ATOL, err_msg="a point mass should have entropy 0")


# --- rewards -----------------------------------------------------------------------------------------------------


def test_last_token_onehot_marks_each_rows_last_real_token():
  mask = ragged_mask((4, 1, 2), 4)
  expected = np.array([[0, 0, 0, 1],   # full length: the last position
                       [1, 0, 0, 0],   # one token
                       [0, 1, 0, 0]], np.float32)
  out = rl.last_token_onehot(jnp.asarray(mask))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, expected, err_msg="the one-hot should sit at index length - 1 of each row")
  np.testing.assert_array_equal(rl.last_token_onehot(jnp.asarray(mask, jnp.int32)), expected,
                                err_msg="an integer mask should give the same one-hot")


def test_penalize_missing_eos_subtracts_the_penalty_only_from_unfinished_responses():
  # scores [1.0, -0.5, 2.0], ended [True, False, False], penalty 1.5 -> [1.0, -2.0, 0.5]
  out = rl.penalize_missing_eos(jnp.array([1.0, -0.5, 2.0]), jnp.array([True, False, False]), 1.5)
  np.testing.assert_allclose(out, [1.0, -2.0, 0.5], rtol=RTOL, atol=ATOL,
                             err_msg="only responses without an EOS should lose the penalty")


@pytest.mark.parametrize("kl_coef", [0.05, 0.0])
def test_token_rewards_put_the_score_on_the_last_token_and_sum_to_the_shaped_reward(kl_coef):
  rng = np.random.default_rng(5)
  scores, kl, mask = rand(rng, 4, scale=2.0), rand(rng, 4, N), ragged_mask()
  out = np.asarray(rl.token_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), kl_coef))
  expected = np.zeros((4, N))
  for b, length in enumerate(LENGTHS):
    for t in range(length):
      expected[b, t] = -kl_coef * kl[b, t] + (scores[b] if t == length - 1 else 0.0)
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL,
                             err_msg="token rewards: -kl_coef * KL_t on real tokens, + score at the last real one")
  assert np.all(out[mask == 0] == 0.0), "token rewards must be 0 on padding (the padding KL is garbage here)"
  shaped = [scores[b] - kl_coef * np.sum(kl[b, :LENGTHS[b]], dtype=np.float64) for b in range(4)]
  np.testing.assert_allclose(out.sum(-1), shaped, rtol=RTOL, atol=ATOL,
                             err_msg="a row's token rewards should sum to score - kl_coef * sum(KL) (seed eq. 3)")
  np.testing.assert_allclose(rl.sequence_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), kl_coef),
                             shaped, rtol=RTOL, atol=ATOL,
                             err_msg="sequence_rewards should equal score - kl_coef * sum of the real tokens' KL")


def test_sequence_rewards_hand_case():
  # score 2, KL [0.5, 1.0, | pad 9], kl_coef 0.1: 2 - 0.1 * 1.5 = 1.85
  out = rl.sequence_rewards(jnp.array([2.0]), jnp.array([[0.5, 1.0, 9.0]]), jnp.array([[1, 1, 0]]), 0.1)
  np.testing.assert_allclose(out, [1.85], rtol=RTOL, err_msg="the padding KL (9) must not enter the reward")


# --- GAE ---------------------------------------------------------------------------------------------------------


def gae_loop(rewards, values, lengths, gamma, lam):
  """Reference GAE: an explicit backwards loop per row over its real tokens, V after the last one = 0."""
  adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
  for b, length in enumerate(lengths):
    next_value, next_adv = 0.0, 0.0
    for t in reversed(range(length)):
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      next_adv = delta + gamma * lam * next_adv
      next_value = float(values[b, t])
      adv[b, t], ret[b, t] = next_adv, next_adv + next_value
  return adv, ret


def test_gae_hand_case():
  # r = [0, 0, 1], V = [0.5, 0.2, 0.8], gamma 1, lam 0.5:
  # delta_2 = 1 + 0 - 0.8 = 0.2;  delta_1 = 0 + 0.8 - 0.2 = 0.6;  delta_0 = 0 + 0.2 - 0.5 = -0.3
  # A_2 = 0.2;  A_1 = 0.6 + 0.5 * 0.2 = 0.7;  A_0 = -0.3 + 0.5 * 0.7 = 0.05;  R = A + V = [0.55, 0.9, 1.0]
  rewards = jnp.array([[0.0, 0.0, 1.0, 3.0]])
  values = jnp.array([[0.5, 0.2, 0.8, -4.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
  np.testing.assert_allclose(adv, [[0.05, 0.7, 0.2, 0.0]], rtol=RTOL, atol=ATOL,
                             err_msg="GAE advantages differ from the hand computation (V after the last token = 0)")
  np.testing.assert_allclose(ret, [[0.55, 0.9, 1.0, 0.0]], rtol=RTOL, atol=ATOL,
                             err_msg="GAE returns should be advantages + values on real tokens, 0 on padding")


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.7, 1.0)])
def test_gae_matches_a_backwards_loop_on_ragged_rows(gamma, lam):
  rng = np.random.default_rng(6)
  rewards, values, mask = rand(rng, 4, N), rand(rng, 4, N), ragged_mask()
  rewards[mask == 0], values[mask == 0] = 100.0, -100.0  # garbage on the padding must not leak in
  adv_exp, ret_exp = gae_loop(rewards, values, LENGTHS, gamma, lam)
  adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
  np.testing.assert_allclose(adv, adv_exp, rtol=RTOL, atol=ATOL,
                             err_msg=f"GAE advantages (gamma={gamma}, lam={lam}) differ from the reference loop")
  np.testing.assert_allclose(ret, ret_exp, rtol=RTOL, atol=ATOL,
                             err_msg=f"GAE returns (gamma={gamma}, lam={lam}) differ from the reference loop")


def test_gae_with_gamma_1_lam_1_gives_reward_to_go_returns():
  rng = np.random.default_rng(7)
  rewards, values, mask = rand(rng, 4, N), rand(rng, 4, N), ragged_mask()
  adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=1.0, lam=1.0)
  for b, length in enumerate(LENGTHS):
    for t in range(length):
      to_go = sum(float(rewards[b, s]) for s in range(t, length))
      np.testing.assert_allclose(ret[b, t], to_go, rtol=RTOL, atol=ATOL,
                                 err_msg=f"row {b} token {t}: with gamma = lam = 1 the return is the reward-to-go")
      np.testing.assert_allclose(adv[b, t], to_go - values[b, t], rtol=RTOL, atol=ATOL,
                                 err_msg=f"row {b} token {t}: with gamma = lam = 1, A_t = reward-to-go - V_t")


def test_gae_is_jittable_and_zero_on_padding():
  rng = np.random.default_rng(8)
  rewards, values, mask = rand(rng, 4, N), rand(rng, 4, N), ragged_mask()
  rewards[mask == 0], values[mask == 0] = 5.0, 5.0
  jitted = jax.jit(rl.gae, static_argnames=("gamma", "lam"))
  adv, ret = jitted(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.95, lam=0.9)
  assert np.all(np.asarray(adv)[mask == 0] == 0.0), "advantages must be exactly 0 on padding"
  assert np.all(np.asarray(ret)[mask == 0] == 0.0), "returns must be exactly 0 on padding"
  adv_exp, ret_exp = gae_loop(rewards, values, LENGTHS, 0.95, 0.9)
  np.testing.assert_allclose(adv, adv_exp, rtol=RTOL, atol=ATOL, err_msg="jitted GAE differs from the loop")
  np.testing.assert_allclose(ret, ret_exp, rtol=RTOL, atol=ATOL, err_msg="jitted GAE returns differ from the loop")
  # gamma and lam as traced arguments too (e.g. swept without recompiling).
  adv_t, _ = jax.jit(lambda r, v, m, g, lam: rl.gae(r, v, m, gamma=g, lam=lam))(rewards, values, mask, 0.95, 0.9)
  np.testing.assert_allclose(adv_t, adv_exp, rtol=RTOL, atol=ATOL, err_msg="GAE with traced gamma/lam differs")


# --- PPO losses --------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_hand_case_takes_the_clipped_branch_where_it_should():
  # eps = 0.2; four real tokens and one padding token (ratio 5, A 10: must be ignored).
  #   a: rho 1.5 > 1.2, A = +2:  unclipped -A rho = -3.0, clipped -A * 1.2 = -2.4 -> max -2.4 (clipped; counted)
  #   b: rho 0.5 < 0.8, A = -1:  unclipped 0.5, clipped 1 * 0.8 = 0.8             -> max  0.8 (clipped; counted)
  #   c: rho 1.5 > 1.2, A = -1:  unclipped 1.5, clipped 1.2                         -> max  1.5 (unclipped)
  #   d: rho 1.0,       A = +3:  both -3.0                                          -> max -3.0 (a tie: not counted)
  # loss = (-2.4 + 0.8 + 1.5 - 3.0) / 4 = -0.775;  clip_frac = 2 / 4 = 0.5;  mean ratio = 4.5 / 4 = 1.125
  # approx_kl = 0.5 * (log(1.5)^2 + log(0.5)^2 + log(1.5)^2 + 0) / 4
  #           = 0.5 * (0.164402 + 0.480453 + 0.164402) / 4 = 0.101157
  old = np.full((1, 5), -2.0, np.float32)
  logps = old + np.log(np.array([[1.5, 0.5, 1.5, 1.0, 5.0]], np.float32))
  adv = np.array([[2.0, -1.0, -1.0, 3.0, 10.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  loss, stats = rl.ppo_policy_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip=0.2)
  np.testing.assert_allclose(loss, -0.775, rtol=RTOL, atol=ATOL,
                             err_msg="PPO loss should be mean over real tokens of max(-A rho, -A clip(rho))")
  np.testing.assert_allclose(stats["clip_frac"], 0.5, rtol=RTOL, atol=ATOL,
                             err_msg="clip_frac should count the tokens where the clipped term is strictly larger")
  np.testing.assert_allclose(stats["ratio"], 1.125, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(stats["approx_kl"], 0.101157, rtol=RTOL, atol=ATOL,
                             err_msg="approx_kl should be 0.5 * mean((logp - old_logp)^2) over real tokens (TRL)")


def ppo_reference(logps, old, adv, mask, clip):
  """Per-token numpy loop: loss, clip_frac, approx_kl, mean ratio over the real tokens."""
  terms, clipped_count, kls, ratios = [], 0, [], []
  for b in range(logps.shape[0]):
    for t in range(logps.shape[1]):
      if mask[b, t] == 0:
        continue
      rho = math.exp(float(logps[b, t]) - float(old[b, t]))
      unclipped, clipped = -adv[b, t] * rho, -adv[b, t] * min(max(rho, 1 - clip), 1 + clip)
      terms.append(max(unclipped, clipped))
      clipped_count += clipped > unclipped
      kls.append((float(logps[b, t]) - float(old[b, t])) ** 2)
      ratios.append(rho)
  n = len(terms)
  return sum(terms) / n, clipped_count / n, 0.5 * sum(kls) / n, sum(ratios) / n


def test_ppo_policy_loss_matches_a_numpy_loop_on_random_tokens():
  rng = np.random.default_rng(9)
  old, mask = rand(rng, 4, N) - 3.0, ragged_mask()
  logps = old + rand(rng, 4, N, scale=0.4)
  adv = rand(rng, 4, N)
  loss, stats = rl.ppo_policy_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip=0.2)
  exp_loss, exp_clip_frac, exp_kl, exp_ratio = ppo_reference(logps, old, adv, mask, 0.2)
  assert 0.0 < exp_clip_frac < 1.0, "the draw should clip some tokens and not others"
  np.testing.assert_allclose(loss, exp_loss, rtol=RTOL, atol=ATOL, err_msg="PPO loss differs from the numpy loop")
  np.testing.assert_allclose(stats["clip_frac"], exp_clip_frac, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(stats["approx_kl"], exp_kl, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(stats["ratio"], exp_ratio, rtol=RTOL, atol=ATOL)


def test_ppo_policy_gradient_is_zero_on_clipped_tokens_and_minus_a_ratio_over_n_elsewhere():
  # Ratios well away from 1 +- eps so no token sits on a kink; padding tokens carry large values.
  rho = np.array([[1.5, 0.5, 1.5, 0.5, 1.05, 0.9, 3.0],
                  [1.1, 1.3, 0.7, 2.0, 4.0, 4.0, 4.0]], np.float32)
  adv = np.array([[2.0, -1.0, -1.0, 1.0, 0.7, -2.0, 9.0],
                  [-0.5, 1.5, -3.0, -1.0, 9.0, 9.0, 9.0]], np.float32)
  mask = ragged_mask((6, 4), 7)
  old = np.full_like(rho, -1.5)
  logps = old + np.log(rho)
  num_tokens = 10.0
  # Clipped branch taken (gradient 0): [0,0] rho>1.2 & A>0; [0,1] rho<0.8 & A<0; [1,1] rho>1.2 & A>0; [1,2] rho<0.8
  # & A<0. Unclipped although outside the range: [0,2] rho>1.2 & A<0; [0,3] rho<0.8 & A>0; [1,3] rho>1.2 & A<0.
  clipped = np.zeros_like(mask, bool)
  clipped[0, 0] = clipped[0, 1] = clipped[1, 1] = clipped[1, 2] = True
  grad_fn = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, mask, clip=0.2)[0])
  grad = np.asarray(grad_fn(jnp.asarray(logps)))
  expected = np.where(clipped, 0.0, -adv * rho / num_tokens) * mask
  np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL,
                             err_msg="dL/dlogp should be 0 on clipped tokens and padding, -A rho / num_tokens "
                                     "elsewhere")
  assert np.all(grad[clipped] == 0.0), "clipped tokens must carry exactly zero policy gradient"


def test_value_loss_hand_case():
  # eps = 0.2, V_old = 0.5 everywhere; clip(V) = 0.5 + clip(V - 0.5, -0.2, 0.2):
  #   a: V 1.0, R  1.0: clipV 0.7, err 0,    err_clip 0.09 -> 0.09 (clipped; counted)
  #   b: V 0.6, R  2.0: clipV 0.6, err 1.96, err_clip 1.96 -> 1.96 (tie; not counted)
  #   c: V 0.0, R -1.0: clipV 0.3, err 1.0,  err_clip 1.69 -> 1.69 (clipped; counted)
  #   d: V 2.0, R  0.0: clipV 0.7, err 4.0,  err_clip 0.49 -> 4.0  (unclipped)
  #   pad: V 9, R -9 (ignored)
  # loss = 0.5 * (0.09 + 1.96 + 1.69 + 4.0) / 4 = 0.5 * 7.74 / 4 = 0.9675;  clip_frac = 2 / 4 = 0.5
  values = jnp.array([[1.0, 0.6, 0.0, 2.0, 9.0]])
  old = jnp.full((1, 5), 0.5)
  returns = jnp.array([[1.0, 2.0, -1.0, 0.0, -9.0]])
  mask = jnp.array([[1, 1, 1, 1, 0]])
  loss, stats = rl.value_loss(values, old, returns, mask, clip=0.2)
  np.testing.assert_allclose(loss, 0.9675, rtol=RTOL, atol=ATOL,
                             err_msg="value loss should be 0.5 * mean(max((V - R)^2, (clip(V) - R)^2)) (TRL)")
  np.testing.assert_allclose(stats["clip_frac"], 0.5, rtol=RTOL, atol=ATOL,
                             err_msg="value clip_frac should count tokens whose clipped error is strictly larger")


def test_value_loss_matches_a_numpy_loop_on_random_tokens():
  rng = np.random.default_rng(10)
  old, returns, mask = rand(rng, 4, N), rand(rng, 4, N), ragged_mask()
  values = old + rand(rng, 4, N, scale=0.4)
  terms, counted = [], 0
  for b, length in enumerate(LENGTHS):
    for t in range(length):
      v, v_old, ret = float(values[b, t]), float(old[b, t]), float(returns[b, t])
      v_clip = min(max(v, v_old - 0.2), v_old + 0.2)  # TRL's clip_by_value(vpred, old - eps, old + eps), float64
      err, err_clip = (v - ret) ** 2, (v_clip - ret) ** 2
      terms.append(max(err, err_clip))
      counted += err_clip > err
  loss, stats = rl.value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), jnp.asarray(mask), clip=0.2)
  assert 0 < counted < len(terms)
  np.testing.assert_allclose(loss, 0.5 * np.mean(terms), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(stats["clip_frac"], counted / len(terms), rtol=RTOL, atol=ATOL)


def test_value_loss_with_a_huge_clip_is_half_the_masked_mse():
  rng = np.random.default_rng(11)
  values, old, returns, mask = rand(rng, 4, N), rand(rng, 4, N), rand(rng, 4, N), ragged_mask()
  loss, _ = rl.value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), jnp.asarray(mask), clip=1e6)
  sq = [(float(values[b, t]) - float(returns[b, t])) ** 2 for b, length in enumerate(LENGTHS) for t in range(length)]
  np.testing.assert_allclose(loss, 0.5 * sum(sq) / len(sq), rtol=RTOL, atol=ATOL,
                             err_msg="with no effective clipping the value loss is 0.5 * MSE over real tokens")


def test_value_clip_frac_counts_no_token_that_stayed_inside_the_clip_range():
  # V_old = -0.1, V = 0.05, R = 0, eps = 0.2: |V - V_old| = 0.15 < 0.2, so clip(V) is V and nothing is clipped.
  # Computing clip(V) as V_old + clip(V - V_old) in float32 gives -0.1 + 0.15000000 = 0.050000004 != 0.05, whose
  # squared error is larger by an ulp, and the token is then counted as clipped. TRL clamps V itself
  # (clip_by_value(vpred, old - eps, old + eps)), which returns V exactly inside the range.
  loss, stats = rl.value_loss(jnp.array([[0.05]]), jnp.array([[-0.1]]), jnp.array([[0.0]]), jnp.array([[1.0]]),
                              clip=0.2)
  np.testing.assert_allclose(loss, 0.5 * 0.05 ** 2, rtol=RTOL, atol=ATOL)
  assert float(stats["clip_frac"]) == 0.0, (
      f"value clip_frac is {float(stats['clip_frac'])} for a token 0.15 from V_old with clip 0.2: float32 rounding "
      "in V_old + clip(V - V_old) makes the unclipped value look clipped; clip V itself, "
      "jnp.clip(V, V_old - clip, V_old + clip), as TRL does")
  rng = np.random.default_rng(11)
  values, old, returns, mask = rand(rng, 4, N), rand(rng, 4, N), rand(rng, 4, N), ragged_mask()
  _, stats = rl.value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), jnp.asarray(mask), clip=1e6)
  assert float(stats["clip_frac"]) == 0.0, (
      f"value clip_frac is {float(stats['clip_frac'])} with clip=1e6, where no value can be clipped")


# --- critic-free advantages --------------------------------------------------------------------------------------


def test_grpo_advantages_hand_case_uses_the_sample_std():
  # Group [1, 2, 3]: mean 2, sample std sqrt(((1)^2 + 0 + 1^2) / 2) = 1 -> (-1, 0, 1) / (1 + 1e-4).
  # (The population std sqrt(2 / 3) = 0.816497 would give +-1.224590.)
  out = rl.grpo_advantages(jnp.array([1.0, 2.0, 3.0]), 3)
  np.testing.assert_allclose(out, np.array([-1.0, 0.0, 1.0]) / 1.0001, rtol=RTOL, atol=ATOL,
                             err_msg="GRPO should divide by the ddof=1 std + 1e-4, as TRL's GRPOTrainer does")


def test_grpo_advantages_match_a_per_group_loop():
  rng = np.random.default_rng(12)
  group_size, rewards = 4, rand(rng, 12, scale=2.0)
  expected = []
  for g in range(3):
    group = [float(r) for r in rewards[g * group_size:(g + 1) * group_size]]
    mean, std = statistics.mean(group), statistics.stdev(group)  # stdev is the n - 1 one
    expected += [(r - mean) / (std + 1e-4) for r in group]
  out = np.asarray(rl.grpo_advantages(jnp.asarray(rewards), group_size))
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL,
                             err_msg="GRPO advantages differ from (R - mean_g) / (stdev_g + eps) per group of G "
                                     "consecutive samples")
  np.testing.assert_allclose(out.reshape(3, group_size).mean(-1), 0.0, atol=ATOL,
                             err_msg="GRPO advantages should have mean 0 within each group")


def test_rloo_advantages_match_an_explicit_leave_one_out_loop():
  rng = np.random.default_rng(13)
  group_size, rewards = 4, rand(rng, 12, scale=2.0)
  expected = []
  for g in range(3):
    group = [float(r) for r in rewards[g * group_size:(g + 1) * group_size]]
    for i in range(group_size):
      others = [group[j] for j in range(group_size) if j != i]
      expected.append(group[i] - sum(others) / len(others))
  out = np.asarray(rl.rloo_advantages(jnp.asarray(rewards), group_size))
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL,
                             err_msg="RLOO advantage should be R_i minus the mean of the other G - 1 rewards")
  np.testing.assert_allclose(out.reshape(3, group_size).mean(-1), 0.0, atol=ATOL,
                             err_msg="RLOO advantages should have mean 0 within each group")


def test_rloo_hand_case():
  # Group [1, 2, 3, 6]: 1 - (2+3+6)/3 = -2.666667, 2 - 10/3 = -1.333333, 3 - 9/3 = 0, 6 - 6/3 = 4.
  np.testing.assert_allclose(rl.rloo_advantages(jnp.array([1.0, 2.0, 3.0, 6.0]), 4),
                             [-8 / 3, -4 / 3, 0.0, 4.0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(rl.ADVANTAGES))
def test_a_group_of_equal_rewards_gets_zero_advantage(name):
  rewards = jnp.array([0.7, 0.7, 0.7, 0.7, -1.0, 2.0, 0.5, 3.0])  # group 0 equal, group 1 not
  out = np.asarray(rl.ADVANTAGES[name](rewards, 4))
  assert np.all(np.isfinite(out)), f"{name}: equal rewards must not give NaN/inf (zero std)"
  np.testing.assert_allclose(out[:4], 0.0, atol=ATOL, err_msg=f"{name}: equal rewards in a group carry no signal")
  assert np.any(np.abs(out[4:]) > 0.1), f"{name}: the unequal group should get nonzero advantages"


def test_advantage_registry_names_the_two_estimators():
  assert rl.ADVANTAGES == {"grpo": rl.grpo_advantages, "rloo": rl.rloo_advantages}


# --- adaptive KL -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("observed_kl,expected", [
    # target 6, horizon 10000, n_steps 256, coef 0.1:  n / horizon = 0.0256
    (10.0, 0.1 * (1 + 0.2 * 0.0256)),    # 10/6 - 1 = 0.667 -> clipped to +0.2: 0.100512
    (1.0, 0.1 * (1 - 0.2 * 0.0256)),     # 1/6 - 1 = -0.833 -> clipped to -0.2: 0.099488
    (6.6, 0.1 * (1 + 0.1 * 0.0256)),     # 6.6/6 - 1 = 0.1, inside the clip:   0.100256
    (5.4, 0.1 * (1 - 0.1 * 0.0256)),     # 5.4/6 - 1 = -0.1, inside the clip:  0.099744
    (6.0, 0.1),                          # on target: unchanged
])
def test_adaptive_kl_coef_follows_the_clipped_proportional_rule(observed_kl, expected):
  out = rl.adaptive_kl_coef(0.1, observed_kl, target=6.0, horizon=10000.0, n_steps=256)
  assert out == pytest.approx(expected, rel=1e-9), (
      f"KL {observed_kl} vs target 6: expected coef {expected}; the rule is coef * (1 + clip(KL/target - 1, "
      "-0.2, 0.2) * n_steps / horizon)")


def test_adaptive_kl_coef_literals_are_the_formula():
  for kl, expected in [(10.0, 0.100512), (1.0, 0.099488), (6.6, 0.100256), (5.4, 0.099744)]:
    assert 0.1 * (1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * 256 / 10000) == pytest.approx(expected, rel=1e-9)
