"""TRL 1.16's loss ablations against independent numpy formulas: f-DPO scores, LD-DPO, WPO weights, the unpaired
losses (KTO, APO-zero unpaired, BCO) with their KL estimate and running reward mean, and their config checks.

Every golden value is float64 numpy written from TRL 1.16's DPOTrainer / KTOTrainer `_compute_loss` (and TRL 0.x
BCOTrainer for BCO), re-derived here, never by calling the jax code. Inputs are rounded to fp32 first (the jax
losses compute in fp32) and the reference is evaluated on the rounded values.
"""

import copy
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from dpo_jax import losses

# ---- numpy reference formulas (float64) ----------------------------------------------------------------------------


def logsig(x):
  return -np.logaddexp(0.0, -x)


def sig(x):
  return np.exp(logsig(x))


def np_score(lr, f_type, a):
  """TRL 1.16 chosen_scores from chosen_logratios."""
  if f_type == "reverse_kl":
    return lr
  if f_type == "forward_kl":
    return 1.0 - np.exp(-lr)
  if f_type == "js_divergence":
    return np.log(2.0) + logsig(lr)
  if abs(a - 1.0) < 1e-6:
    return lr
  return (np.exp(np.minimum((a - 1.0) * lr, 80.0)) - 1.0) * (1.0 / (a - 1.0))


def np_pair_loss(t, cs, rs, nc, nr, beta):
  """TRL 1.16 per_sequence_loss on scores cs, rs (sigmoid without label smoothing, as TRL 1.16)."""
  if t == "sigmoid":
    return -logsig(beta * (cs - rs))
  if t == "hinge":
    return np.maximum(0.0, 1.0 - beta * (cs - rs))
  if t == "ipo":
    return (cs / nc - rs / nr - 1.0 / (2.0 * beta)) ** 2
  raise AssertionError(t)


def f32(x):
  return np.asarray(np.asarray(x, np.float32), np.float64)


B = 6
RNG = np.random.default_rng(0)
PC, PR, RC, RR = (f32(-RNG.uniform(1.0, 6.0, B)) for _ in range(4))
NC = np.array([3.0, 7.0, 1.0, 12.0, 5.0, 2.0])
NR = np.array([4.0, 2.0, 9.0, 12.0, 1.0, 6.0])

# ---- f-DPO ---------------------------------------------------------------------------------------------------------

F_CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
           ("alpha_divergence", 0.2), ("alpha_divergence", 1.7)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("f_type,a", F_CASES)
def test_f_divergence_losses_match_trl(loss_type, f_type, a):
  beta = 0.3
  loss, cr, rr = losses.preference_loss(loss_type, PC, PR, RC, RR, beta=beta, chosen_num_tokens=NC,
                                        rejected_num_tokens=NR, f_divergence_type=f_type, f_alpha_divergence_coef=a)
  cl, rl = PC - RC, PR - RR
  expected = np_pair_loss(loss_type, np_score(cl, f_type, a), np_score(rl, f_type, a), NC, NR, beta)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-6,
                             err_msg=f"{loss_type} with f_divergence_type={f_type}, a={a}: check f_divergence_score "
                                     "against TRL 1.16's chosen_scores.")
  # TRL logs beta * log-ratio, never the scores
  np.testing.assert_allclose(np.asarray(cr), beta * cl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rr), beta * rl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("f_type,a", F_CASES)
def test_f_divergence_score_golden_and_zero_at_u_1(f_type, a):
  lr = f32(RNG.normal(0.0, 3.0, 32))
  np.testing.assert_allclose(np.asarray(losses.f_divergence_score(lr, f_type, a)), np_score(lr, f_type, a),
                             rtol=1e-5, atol=1e-6)
  assert float(losses.f_divergence_score(jnp.zeros(()), f_type, a)) == pytest.approx(0.0, abs=1e-7)


def test_alpha_exponent_is_clamped_at_80_and_alpha_1_is_reverse_kl():
  lr = np.array([-400.0, -160.0, 0.0, 3.0])
  got = np.asarray(losses.f_divergence_score(lr, "alpha_divergence", 0.5))
  np.testing.assert_allclose(got, np_score(lr, "alpha_divergence", 0.5), rtol=1e-5)
  assert got[0] == got[1] and np.isfinite(got).all()  # both exponents (200, 80) clamped at 80
  for a in (1.0, 1.0 + 5e-7):
    np.testing.assert_array_equal(np.asarray(losses.f_divergence_score(lr, "alpha_divergence", a)),
                                  np.asarray(lr, np.float32))
    alpha = losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.2, f_divergence_type="alpha_divergence",
                                   f_alpha_divergence_coef=a)[0]
    reverse = losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.2)[0]
    np.testing.assert_array_equal(np.asarray(alpha), np.asarray(reverse))


def test_f_divergence_applies_to_each_allowed_type_and_combination():
  n = dict(chosen_num_tokens=NC, rejected_num_tokens=NR)
  js = dict(f_divergence_type="js_divergence")
  for t in losses.F_DIVERGENCE_LOSSES:
    eps = 0.1 if losses.LOSSES[t].uses_label_smoothing else 0.0
    out = losses.preference_loss(t, PC, PR, RC, RR, beta=0.2, label_smoothing=eps, **n, **js)[0]
    assert np.isfinite(np.asarray(out)).all(), t
  both = losses.preference_loss(("sigmoid", "sft"), PC, PR, RC, RR, beta=0.2, weights=(1.0, 0.5), **n, **js)[0]
  cs, rs = np_score(PC - RC, "js_divergence", 0.5), np_score(PR - RR, "js_divergence", 0.5)
  np.testing.assert_allclose(np.asarray(both), -logsig(0.2 * (cs - rs)) + 0.5 * (-PC / NC), rtol=1e-5)


def test_f_divergence_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config\.loss\.f_divergence_type='forward_kl'.*'sigmoid'"):
    losses.preference_loss("nca_pair", PC, PR, RC, RR, beta=0.1, f_divergence_type="forward_kl")
  with pytest.raises(ValueError, match=r"config\.loss\.f_divergence_type='js_divergence'.*apo_zero"):
    losses.validate_loss_config(("sigmoid", "apo_zero"), beta=0.1, label_smoothing=0.0,
                                f_divergence_type="js_divergence")
  with pytest.raises(ValueError, match=r"config\.loss\.f_divergence_type='kl'"):
    losses.validate_loss_config("sigmoid", beta=0.1, label_smoothing=0.0, f_divergence_type="kl")
  with pytest.raises(ValueError, match=r"config\.loss\.f_alpha_divergence_coef=0\.0"):
    losses.validate_loss_config("sigmoid", beta=0.1, label_smoothing=0.0, f_alpha_divergence_coef=0.0)
  with pytest.raises(ValueError, match=r"config\.loss\.f_divergence_type='forward_kl'"):
    losses.validate_loss_config("kto", beta=0.1, label_smoothing=0.0, f_divergence_type="forward_kl")
  for t in losses.LOSSES:  # reverse KL is every type's default
    eps = 0.1 if losses.LOSSES[t].uses_label_smoothing else 0.0
    losses.validate_loss_config(t, beta=0.1, label_smoothing=eps, f_divergence_type="reverse_kl")


# ---- LD-DPO --------------------------------------------------------------------------------------------------------


def np_ld(tok_BxT, mask_BxT, shared_B, alpha):
  """TRL 1.16: shared_logps + ld_alpha * tail_logps, positions counted along the response mask."""
  pos = np.cumsum(mask_BxT, axis=1)
  shared = (pos > 0) & (pos <= shared_B[:, None]) & (mask_BxT > 0)
  tail = (pos > shared_B[:, None]) & (mask_BxT > 0)
  return (tok_BxT * shared).sum(1) + alpha * (tok_BxT * tail).sum(1)


def test_ld_logps_is_trl_shared_plus_alpha_tail():
  t = 9
  lens_c, lens_r = np.array([3, 7, 1, 5]), np.array([4, 2, 6, 5])
  prompt = np.array([2, 1, 0, 3])
  mask = lambda lens: np.array([[1.0 if p <= j < p + n else 0.0 for j in range(t)] for p, n in zip(prompt, lens)])
  mc, mr = mask(lens_c), mask(lens_r)
  tc, tr = f32(-RNG.uniform(0.1, 3.0, (4, t))), f32(-RNG.uniform(0.1, 3.0, (4, t)))
  shared = np.minimum(lens_c, lens_r)
  front = lambda tok, m: np.array([tok[b][m[b] > 0][:shared[b]].sum() for b in range(4)])  # first L response tokens
  for alpha in (0.0, 0.35, 1.0):
    for tok, m in ((tc, mc), (tr, mr)):
      got = losses.ld_logps((tok * m).sum(1), front(tok, m), alpha)
      np.testing.assert_allclose(np.asarray(got), np_ld(tok, m, shared, alpha), rtol=1e-5, atol=1e-6)
  full, fr = (tc * mc).sum(1), front(tc, mc)
  np.testing.assert_allclose(np.asarray(losses.ld_logps(full, fr, 1.0)), full, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.ld_logps(full, fr, 0.0)), fr, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(losses.ld_logps(full, fr, None)), np.asarray(full, np.float32))
  # at alpha 1 the loss is plain DPO
  ld = lambda x, f: losses.ld_logps(x, f, 1.0)
  plain = losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1)[0]
  with_ld = losses.preference_loss("sigmoid", ld(PC, PC - 1), ld(PR, PR + 1), ld(RC, RC), ld(RR, RR), beta=0.1)[0]
  np.testing.assert_allclose(np.asarray(with_ld), np.asarray(plain), rtol=1e-6)


def test_ld_alpha_validation_names_the_field():
  losses.check_ld_alpha(None)
  losses.check_ld_alpha(0.0)
  losses.check_ld_alpha(1.0)
  for bad in (1.5, -0.1, float("nan"), "0.5", True):
    with pytest.raises(ValueError, match=r"config\.loss\.ld_alpha=.* must be None \(off\) or a number in \[0, 1\]"):
      losses.check_ld_alpha(bad)
  with pytest.raises(ValueError, match=r"config\.loss\.ld_alpha=1\.5"):
    losses.ld_logps(PC, PC, 1.5)
  with pytest.raises(ValueError, match=r"config\.loss\.ld_alpha=0\.5 is for pair losses"):
    losses.validate_loss_config("kto", beta=0.1, label_smoothing=0.0, ld_alpha=0.5)


# ---- WPO -----------------------------------------------------------------------------------------------------------


def test_wpo_weights_match_trl_and_carry_no_gradient():
  t, v = 6, 11
  logits = RNG.normal(0.0, 2.0, (2, B, t, v))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tokens = RNG.integers(0, v, (2, B, t))
  tok_logp = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  log_sum_sq = np.log((np.exp(logp) ** 2).sum(-1))  # TRL's log_sum_sq_probs
  lens = np.array([[3, 6, 1, 0, 4, 2], [5, 2, 6, 3, 0, 1]])
  mask = (np.arange(t)[None, None, :] < lens[..., None]).astype(np.float64)
  lp, lss = f32((tok_logp * mask).sum(-1)), f32((log_sum_sq * mask).sum(-1))
  n = np.maximum(lens, 1)  # TRL clamp_min(1)
  expected = np.exp((lp[0] - lss[0]) / n[0]) * np.exp((lp[1] - lss[1]) / n[1])  # TRL 1.16: no clamp at 1
  got = losses.wpo_pair_weights(lp[0], lss[0], lens[0], lp[1], lss[1], lens[1])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  assert got.shape == (B,) and got.dtype == jnp.float32
  grads = jax.grad(lambda c, r: losses.wpo_pair_weights(c, lss[0], lens[0], r, lss[1], lens[1]).sum(),
                   argnums=(0, 1))(jnp.asarray(lp[0], jnp.float32), jnp.asarray(lp[1], jnp.float32))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_use_weighting_refused_with_sorting_losses():
  for t in ("aot", "aot_pair"):
    with pytest.raises(ValueError, match=r"config\.loss\.use_weighting=True.*sort"):
      losses.validate_loss_config(t, beta=0.1, label_smoothing=0.0, use_weighting=True)
  with pytest.raises(ValueError, match=r"config\.loss\.use_weighting=True"):
    losses.validate_loss_config(("sigmoid", "aot"), beta=0.1, label_smoothing=0.0, use_weighting=True)
  with pytest.raises(ValueError, match=r"config\.loss\.use_weighting=True"):
    losses.validate_loss_config("bco", beta=0.1, label_smoothing=0.0, use_weighting=True)
  with pytest.raises(ValueError, match=r"config\.loss\.use_weighting=1"):
    losses.validate_loss_config("sigmoid", beta=0.1, label_smoothing=0.0, use_weighting=1)
  losses.validate_loss_config("sigmoid", beta=0.1, label_smoothing=0.0, use_weighting=True)


# ---- unpaired: KTO, APO-zero unpaired, BCO -------------------------------------------------------------------------

U = 7
UP, UR = f32(-RNG.uniform(1.0, 6.0, U)), f32(-RNG.uniform(1.0, 6.0, U))
UPK, URK = f32(-RNG.uniform(1.0, 6.0, U)), f32(-RNG.uniform(1.0, 6.0, U))
UPK[-1], URK[-1] = 50.0, -50.0  # padding row: a huge KL term that must be ignored
DESIRABLE = np.array([True, False, True, True, False, False, True])
WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])


def np_unpaired(t, beta, wd, wu, delta):
  lr = UP - UR
  kl = max(0.0, float((WEIGHTS * (UPK - URK)).sum() / max(WEIGHTS.sum(), 1.0))) if t == "kto" else 0.0
  if t == "kto":
    loss = np.where(DESIRABLE, 1.0 - sig(beta * (lr - kl)), 1.0 - sig(beta * (kl - lr)))
  elif t == "apo_zero_unpaired":
    loss = np.where(DESIRABLE, 1.0 - sig(beta * lr), sig(beta * lr))
  else:
    m = beta * lr - delta
    loss = np.where(DESIRABLE, -logsig(m), -logsig(-m))
  return np.where(DESIRABLE, wd, wu) * loss, beta * lr, kl


@pytest.mark.parametrize("t", sorted(losses.UNPAIRED_LOSSES))
@pytest.mark.parametrize("wd,wu", [(1.0, 1.0), (1.3, 0.7)])
def test_unpaired_losses_match_trl(t, wd, wu):
  beta, delta = 0.4, 0.15
  loss, rewards, kl = losses.unpaired_loss(t, UP, UR, UPK, URK, DESIRABLE, WEIGHTS, beta=beta, desirable_weight=wd,
                                           undesirable_weight=wu, delta=delta)
  e_loss, e_rewards, e_kl = np_unpaired(t, beta, wd, wu, delta)
  np.testing.assert_allclose(np.asarray(loss), e_loss, rtol=1e-5, atol=1e-7, err_msg=t)
  np.testing.assert_allclose(np.asarray(rewards), e_rewards, rtol=1e-5, atol=1e-7)
  assert kl.shape == () and float(kl) == pytest.approx(e_kl, rel=1e-5, abs=1e-7)
  if t == "kto":
    assert float(kl) > 0  # the padding row's +100 would dominate if it were counted
    assert float(kl) < 10


def test_kto_kl_is_clamped_at_zero_and_ignores_padding():
  pk, rk = UPK.copy(), URK.copy()
  pk[:-1] = rk[:-1] - 0.5  # every real row: policy below reference -> negative mean -> 0
  kl = losses.unpaired_kl(pk, rk, WEIGHTS)
  assert float(kl) == 0.0
  pk[-1], rk[-1] = np.nan, np.nan  # padding rows may hold anything
  assert float(losses.unpaired_kl(pk, rk, WEIGHTS)) == 0.0
  pk[:-1] = rk[:-1] + np.arange(U - 1)
  assert float(losses.unpaired_kl(pk, rk, WEIGHTS)) == pytest.approx(np.arange(U - 1).mean(), rel=1e-6)
  assert float(losses.unpaired_kl(pk[:0], rk[:0], WEIGHTS[:0])) == 0.0  # empty batch: max(sum w, 1)


def test_kto_gradient_does_not_flow_through_kl():
  beta, wd, wu = 0.5, 1.2, 0.8
  total = lambda p, pk: losses.unpaired_loss("kto", p, UR, pk, URK, DESIRABLE, WEIGHTS, beta=beta,
                                             desirable_weight=wd, undesirable_weight=wu)[0].sum()
  g_p, g_pk = jax.grad(total, argnums=(0, 1))(jnp.asarray(UP, jnp.float32), jnp.asarray(UPK, jnp.float32))
  assert float(jnp.abs(g_pk).max()) == 0.0
  _, _, z = np_unpaired("kto", beta, wd, wu, 0.0)
  lr = UP - UR
  # kl held constant: d/dlr w_D (1 - s(beta (lr - z))) = -w_D beta s'(.), d/dlr w_U (1 - s(beta (z - lr))) = w_U beta s'
  ds = lambda x: sig(x) * (1.0 - sig(x))
  expected = np.where(DESIRABLE, -wd * beta * ds(beta * (lr - z)), wu * beta * ds(beta * (z - lr)))
  np.testing.assert_allclose(np.asarray(g_p), expected, rtol=1e-5, atol=1e-8)


def test_running_mean_is_the_weighted_mean_of_everything_seen():
  state = losses.running_mean_init()
  seen_v, seen_w = [], []
  update = jax.jit(losses.running_mean_update)
  for i in range(5):
    v = f32(RNG.normal(3.0, 2.0, 4 + i))
    w = (RNG.uniform(size=4 + i) > 0.3).astype(np.float64)
    if i == 2:
      w[:] = 0.0  # a batch of padding leaves the state unchanged
      v[0] = np.nan
    before = state
    state = update(state, v, w)
    if i == 2:
      assert float(state.mean) == float(before.mean) and float(state.count) == float(before.count)
    seen_v.append(v)
    seen_w.append(w)
    vv, ww = np.concatenate(seen_v), np.concatenate(seen_w)
    expected = (np.where(ww > 0, vv, 0.0) * ww).sum() / ww.sum()
    assert float(state.mean) == pytest.approx(expected, rel=1e-5), f"after update {i}"
    assert float(state.count) == ww.sum()


def test_bco_delta_is_the_running_mean_after_this_batch():
  beta = 0.5
  old = losses.RunningMean(jnp.asarray(10.0), jnp.asarray(-0.3))
  new = losses.bco_running_update(old, UP, UR, WEIGHTS, beta=beta)
  r = beta * (UP - UR)
  expected_delta = (10 * -0.3 + (WEIGHTS * r).sum()) / (10 + WEIGHTS.sum())
  assert float(new.mean) == pytest.approx(expected_delta, rel=1e-5)
  loss = losses.unpaired_loss("bco", UP, UR, None, None, DESIRABLE, WEIGHTS, beta=beta, delta=new.mean)[0]
  np.testing.assert_allclose(np.asarray(loss), np_unpaired("bco", beta, 1.0, 1.0, expected_delta)[0], rtol=1e-5)


def test_unpaired_registry_and_errors():
  assert set(losses.UNPAIRED_LOSSES) == {"kto", "apo_zero_unpaired", "bco"}
  assert all(losses.is_unpaired(t) for t in losses.UNPAIRED_LOSSES)
  assert not any(losses.is_unpaired(t) for t in (*losses.LOSSES, losses.RANKING_LOSS, ("kto",)))
  assert all(losses.needs_reference(t) for t in losses.UNPAIRED_LOSSES)
  assert losses.validate_loss_config("bco", beta=0.1, label_smoothing=0.0) == {"delta": 0.0}
  with pytest.raises(ValueError, match=r"config\.loss\.beta=0"):
    losses.unpaired_loss("kto", UP, UR, UPK, URK, DESIRABLE, WEIGHTS, beta=0)
  for name in ("desirable_weight", "undesirable_weight"):
    with pytest.raises(ValueError, match=rf"config\.loss\.{name}=0\.0 must be a finite number > 0"):
      losses.unpaired_loss("kto", UP, UR, UPK, URK, DESIRABLE, WEIGHTS, beta=0.1, **{name: 0.0})
    with pytest.raises(ValueError, match=rf"config\.loss\.{name}=2\.0 weights unpaired rows"):
      losses.validate_loss_config("sigmoid", beta=0.1, label_smoothing=0.0, **{name: 2.0})
  with pytest.raises(ValueError, match=r"config\.loss\.label_smoothing=0\.1"):
    losses.validate_loss_config("kto", beta=0.1, label_smoothing=0.1)
  with pytest.raises(ValueError, match=r"config\.loss\.options \['delta'\]"):
    losses.validate_loss_config("kto", beta=0.1, label_smoothing=0.0, delta=0.2)
  with pytest.raises(ValueError, match=r"needs policy_kl_logps"):
    losses.unpaired_loss("kto", UP, UR, None, None, DESIRABLE, WEIGHTS, beta=0.1)
  with pytest.raises(ValueError, match=r"unpaired_loss"):
    losses.preference_loss("kto", PC, PR, RC, RR, beta=0.1)
  with pytest.raises(ValueError, match=r"config\.loss\.type='sigmoid' is not an unpaired loss"):
    losses.unpaired_loss("sigmoid", UP, UR, UPK, URK, DESIRABLE, WEIGHTS, beta=0.1)
  with pytest.raises(ValueError, match=r"config\.loss\.types=.*'kto' is an unpaired loss"):
    losses.validate_loss_config(("sigmoid", "kto"), beta=0.1, label_smoothing=0.0)


# ---- config plumbing -----------------------------------------------------------------------------------------------


def test_from_config_and_ablation_fields():
  cfg = copy.deepcopy(get_config().loss)
  loss_type, options = losses.from_config(cfg)
  assert loss_type == "sigmoid"
  assert options == {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}
  assert losses.ablation_fields(cfg) == {"ld_alpha": None, "use_weighting": False, "desirable_weight": 1.0,
                                         "undesirable_weight": 1.0}
  losses.validate_loss_config(loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing, **options,
                              **losses.ablation_fields(cfg))
  losses.preference_loss(loss_type, PC, PR, RC, RR, beta=cfg.beta, **options)  # the step's call accepts them
  old = {"type": "ipo", "beta": 0.1, "label_smoothing": 0.0}  # a block from before these fields
  assert losses.from_config(old) == ("ipo", {})
  assert losses.ablation_fields(old)["ld_alpha"] is None and losses.ablation_fields(old)["desirable_weight"] == 1.0
  cfg.update(type="kto", ld_alpha=None, desirable_weight=1.33, undesirable_weight=1.0)
  assert losses.ablation_fields(cfg)["desirable_weight"] == 1.33
  cfg.update(type="sigmoid", desirable_weight=1.0, ld_alpha=0.5, use_weighting=True, f_divergence_type="forward_kl")
  assert losses.ablation_fields(cfg) == {"ld_alpha": 0.5, "use_weighting": True, "desirable_weight": 1.0,
                                         "undesirable_weight": 1.0}
  assert losses.from_config(cfg)[1]["f_divergence_type"] == "forward_kl"
  cfg.ld_alpha = 1.5
  with pytest.raises(ValueError, match=r"config\.loss\.ld_alpha=1\.5 must be None \(off\) or a number in \[0, 1\]"):
    losses.ablation_fields(cfg)
  cfg.update(ld_alpha=None, type="aot")
  with pytest.raises(ValueError, match=r"config\.loss\.use_weighting=True"):
    losses.ablation_fields(cfg)
  with pytest.raises(ValueError, match=r"applied by the step"):
    losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.1, ld_alpha=0.5)


def test_docs_loss_table_has_a_row_per_registered_loss():
  path = Path(__file__).resolve().parents[2] / "docs" / "_ext" / "generated.py"
  spec = importlib.util.spec_from_file_location("_generated_for_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  names = [row["name"] for row in module.loss_rows()]
  assert names == [*losses.LOSSES, *losses.UNPAIRED_LOSSES]
  assert all(f"| `{name}` |" in module.loss_table() for name in losses.UNPAIRED_LOSSES)
