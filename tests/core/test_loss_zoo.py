"""The loss-variant zoo against independent numpy formulas (papers / TRL), Plackett-Luce, combinations, validation.

Every golden value here is written out in float64 numpy from the formula in the paper / TRL, never by calling
the jax code; the jax losses compute in fp32, so inputs are first rounded to the tested dtype and the reference
is evaluated on those rounded values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses

# ---- numpy reference formulas (float64) ----------------------------------------------------------------------------


def logsig(x):
  return -np.logaddexp(0.0, -x)  # log sigma(x) without overflow warnings


def sig(x):
  return np.exp(logsig(x))


def cdpo(m, eps):
  return -(1 - eps) * logsig(m) - eps * logsig(-m)


def np_loss(t, pc, pr, rc, rr, nc, nr, beta, eps, opts):
  """(losses, chosen_rewards, rejected_rewards) in float64 for loss type t."""
  cl, rl = pc - rc, pr - rr
  d = cl - rl
  ac, ar = pc / nc, pr / nr
  if t == "sigmoid":
    loss = cdpo(beta * d, eps)
  elif t == "hinge":
    loss = np.maximum(0.0, 1 - beta * d)
  elif t == "ipo":
    loss = (cl / nc - rl / nr - 1 / (2 * beta)) ** 2
  elif t == "robust":
    loss = (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
  elif t == "exo_pair":
    e = eps if eps > 0 else 1e-3
    m = beta * d
    loss = sig(m) * (logsig(m) - np.log(1 - e)) + sig(-m) * (logsig(-m) - np.log(e))
  elif t == "nca_pair":
    loss = -logsig(beta * cl) - 0.5 * logsig(-beta * cl) - 0.5 * logsig(-beta * rl)
  elif t == "bco_pair":
    delta = opts.get("delta", 0.0)
    loss = -logsig(beta * cl - delta) - logsig(-(beta * rl - delta))
  elif t == "sppo_hard":
    loss = (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
  elif t == "aot":
    loss = cdpo(beta * (np.sort(pc - pr) - np.sort(rc - rr)), eps)
  elif t == "aot_pair":
    loss = cdpo(beta * (np.sort(cl) - np.sort(rl)), eps)
  elif t == "apo_zero":
    loss = 1 - sig(beta * cl) + sig(beta * rl)
  elif t == "apo_down":
    loss = sig(beta * cl) + 1 - sig(beta * d)
  elif t == "discopop":
    tau = opts.get("discopop_tau", 0.05)
    x = beta * d
    # exp(-x) * sigma(x / tau) written in log space: the literal product overflows float64 too at x = -1e3.
    loss = -logsig(x) * (1 - sig(x / tau)) + np.exp(-x + logsig(x / tau))
  elif t == "sigmoid_norm":
    loss = -logsig(beta * (cl / nc - rl / nr))
  elif t == "sft":
    loss = -ac
  elif t == "rpo":
    loss = cdpo(beta * d, eps) + opts.get("rpo_alpha", 1.0) * (-ac)
  elif t == "simpo":
    loss = cdpo(beta * (ac - ar) - opts.get("simpo_gamma", 0.5), eps)
  elif t == "orpo":
    lam = opts.get("orpo_lambda") or beta
    odds = lambda a: a - np.log(-np.expm1(np.minimum(a, -1e-6)))  # log(p / (1 - p)), p = exp(a)
    loss = -ac - lam * logsig(odds(ac) - odds(ar))
  elif t == "unlikelihood":
    loss = -beta * cl + beta * rl
  else:
    raise KeyError(t)
  if t in ("simpo", "orpo", "sft"):
    return loss, beta * ac, beta * ar
  return loss, beta * cl, beta * rl


# rows: ordinary, chosen at -1e4 (logratio margin ~ -1e4), rejected at -1e4 (~ +1e4), all equal, ordinary, equal.
PC = np.array([-10.5, -1e4, 0.0, -5.0, -20.25, -3.0])
PR = np.array([-12.0, 0.0, -1e4, -5.0, -18.5, -3.0])
RC = np.array([-11.0, -10.0, -10.0, -5.0, -21.0, -3.0])
RR = np.array([-11.5, -10.0, -10.0, -5.0, -17.75, -3.0])
NC = np.array([5.0, 3.0, 4.0, 2.0, 9.0, 1.0])
NR = np.array([6.0, 2.0, 4.0, 2.0, 8.0, 1.0])

ALT_OPTIONS = {"bco_pair": {"delta": 0.3}, "discopop": {"discopop_tau": 0.5}, "rpo": {"rpo_alpha": 0.5},
               "simpo": {"simpo_gamma": 1.0}, "orpo": {"orpo_lambda": 0.25}}
TYPES = sorted(losses.LOSSES)
assert set(TYPES) == {"sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                      "aot_pair", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "rpo", "simpo", "orpo",
                      "unlikelihood"}


def cases(t):
  eps = 0.2 if losses.LOSSES[t].uses_label_smoothing else 0.0
  return [(0.1, 0.0, {}), (0.5, eps, ALT_OPTIONS.get(t, {}))]


def rounded(x, dtype):
  return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def call(t, dtype, beta, eps, opts):
  args = [jnp.asarray(x, dtype) for x in (PC, PR, RC, RR)]
  return losses.preference_loss(t, *args, beta=beta, label_smoothing=eps, chosen_num_tokens=jnp.asarray(NC),
                                rejected_num_tokens=jnp.asarray(NR), **opts)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", TYPES)
def test_golden_against_numpy(t, dtype):
  for beta, eps, opts in cases(t):
    got = call(t, dtype, beta, eps, opts)
    want = np_loss(t, *(rounded(x, dtype) for x in (PC, PR, RC, RR)), NC, NR, beta, eps, opts)
    for g, w, what in zip(got, want, ("loss", "chosen reward", "rejected reward")):
      assert g.dtype == jnp.float32 and g.shape == (6,)
      np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6,
                                 err_msg=f"{t} {what} (beta={beta}, eps={eps}, {opts}) differs from the formula")


EQUAL_LOG2 = math.log(2.0)
# policy == reference (d = 0, every log-ratio 0), beta = 0.1: values by hand from each formula.
EQUAL_BY_HAND = {
    "sigmoid": EQUAL_LOG2, "hinge": 1.0, "ipo": 25.0, "robust": EQUAL_LOG2,
    "exo_pair": 0.5 * (-EQUAL_LOG2 - math.log(1 - 1e-3)) + 0.5 * (-EQUAL_LOG2 - math.log(1e-3)),
    "nca_pair": 2 * EQUAL_LOG2, "bco_pair": 2 * EQUAL_LOG2, "sppo_hard": 50.0, "aot": EQUAL_LOG2,
    "aot_pair": EQUAL_LOG2, "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * EQUAL_LOG2 + 0.5,
    "sigmoid_norm": EQUAL_LOG2, "unlikelihood": 0.0,
    # length-normalised NLL terms: log-probs -3 over 2 tokens -> 1.5 nats/token
    "sft": 1.5, "rpo": EQUAL_LOG2 + 1.5, "simpo": -math.log(1 / (1 + math.exp(0.5))), "orpo": 1.5 + 0.1 * EQUAL_LOG2,
}


@pytest.mark.parametrize("t", TYPES)
def test_equal_log_probs_by_hand(t):
  x = jnp.full((3,), -3.0)
  n = jnp.full((3,), 2.0)
  loss, cr, rr = losses.preference_loss(t, x, x, x, x, beta=0.1, chosen_num_tokens=n, rejected_num_tokens=n)
  np.testing.assert_allclose(np.asarray(loss), EQUAL_BY_HAND[t], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(cr), np.asarray(rr))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", TYPES)
def test_huge_margins_finite_loss_and_gradient(t, dtype):
  """+-1e4 nats log-ratio margins (rows 1, 2) and an exp-prone discopop: no NaN / Inf in loss or any gradient."""
  args = [jnp.asarray(x, dtype) for x in (PC, PR, RC, RR)]
  n = dict(chosen_num_tokens=jnp.asarray(NC), rejected_num_tokens=jnp.asarray(NR))
  for beta in (0.1, 1.0):
    out = losses.preference_loss(t, *args, beta=beta, **n)
    total = lambda *a: losses.preference_loss(t, *a, beta=beta, **n)[0].sum()
    grads = jax.grad(total, argnums=(0, 1, 2, 3))(*args)
    for x in (*out, *grads):
      assert bool(jnp.all(jnp.isfinite(x))), f"{t} beta={beta}: non-finite {x}"


# ---- Plackett-Luce -----------------------------------------------------------------------------------------------


def np_plackett_luce(pi, ref, beta):
  r = beta * (pi - ref)
  k = r.shape[-1]
  return -sum(r[:, i] - np.log(np.sum(np.exp(r[:, i:]), axis=-1)) for i in range(k - 1))


def test_plackett_luce_k2_is_sigmoid():
  pi = np.stack([PC, PR], 1)
  ref = np.stack([RC, RR], 1)
  for beta in (0.1, 0.5):
    pl = losses.plackett_luce_loss(jnp.asarray(pi), jnp.asarray(ref), beta=beta)
    dpo = losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=beta)[0]
    np.testing.assert_allclose(np.asarray(pl), np.asarray(dpo), rtol=1e-6, atol=1e-7)


def test_plackett_luce_k3_golden_and_padding():
  rng = np.random.default_rng(0)
  pi = np.round(rng.normal(-20, 4, size=(5, 3)), 2)
  ref = np.round(rng.normal(-20, 4, size=(5, 3)), 2)
  pi32, ref32 = rounded(pi, jnp.float32), rounded(ref, jnp.float32)
  got = losses.plackett_luce_loss(jnp.asarray(pi, jnp.float32), jnp.asarray(ref, jnp.float32), beta=0.3)
  np.testing.assert_allclose(np.asarray(got), np_plackett_luce(pi32, ref32, 0.3), rtol=1e-6)
  # a padded third response (any values, even huge) is dropped: same as K = 2, and it gets no gradient.
  padded = pi.copy()
  padded[:, 2] = 1e4
  valid = np.array([[True, True, False]] * 5)
  masked = lambda p: losses.plackett_luce_loss(p, jnp.asarray(ref), beta=0.3, valid_BxK=jnp.asarray(valid))
  k2 = losses.plackett_luce_loss(jnp.asarray(pi[:, :2]), jnp.asarray(ref[:, :2]), beta=0.3)
  np.testing.assert_allclose(np.asarray(masked(jnp.asarray(padded))), np.asarray(k2), rtol=1e-6)
  g = jax.grad(lambda p: masked(p).sum())(jnp.asarray(padded, jnp.float32))
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[:, 2]).sum()) == 0.0
  # a row with a single valid response has nothing to rank: loss 0.
  one = losses.plackett_luce_loss(jnp.asarray(pi), jnp.asarray(ref), beta=0.3,
                                  valid_BxK=jnp.asarray([[True, False, False]] * 5))
  np.testing.assert_array_equal(np.asarray(one), 0.0)


# ---- gradients: the seed's weighting vs. the unweighted ablation ----------------------------------------------------


def test_gradient_weighting_sigmoid_vs_unlikelihood():
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 5, size=8), jnp.float32) for _ in range(4))
  beta = 0.2
  grad_pc = lambda t: jax.grad(lambda x: losses.preference_loss(t, x, pr, rc, rr, beta=beta)[0].sum())(pc)
  weight = losses.dpo_gradient_weight(beta * (pc - rc), beta * (pr - rr))
  np.testing.assert_allclose(grad_pc("sigmoid"), -beta * weight, rtol=1e-5)
  np.testing.assert_allclose(grad_pc("unlikelihood"), np.full(8, -beta, np.float32), rtol=1e-6)
  # the difference: DPO scales each pair's step by how wrong its implicit reward is; the ablation does not.
  assert float(weight.max() - weight.min()) > 0.1
  assert float(jnp.ptp(grad_pc("unlikelihood"))) == 0.0


# ---- combinations ---------------------------------------------------------------------------------------------------


def test_weighted_combination_is_the_manual_sum():
  kw = dict(beta=0.3, label_smoothing=0.1, chosen_num_tokens=NC, rejected_num_tokens=NR, discopop_tau=0.2)
  types, weights = ("simpo", "sigmoid", "discopop"), (0.5, 2.0, -0.25)
  got, cr, rr = losses.weighted_preference_loss(types, weights, PC, PR, RC, RR, **kw)
  parts = [losses.preference_loss(t, PC, PR, RC, RR, **{k: v for k, v in kw.items()
                                                        if k != "discopop_tau" or t == "discopop"}
                                  | ({} if losses.LOSSES[t].uses_label_smoothing else {"label_smoothing": 0.0}))
           for t in types]
  np.testing.assert_allclose(np.asarray(got), sum(w * np.asarray(p[0]) for w, p in zip(weights, parts)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cr), np.asarray(parts[1][1]), rtol=1e-6)  # first reference-based type
  np.testing.assert_allclose(np.asarray(rr), np.asarray(parts[1][2]), rtol=1e-6)
  # through preference_loss with a tuple of types and options['weights']; weights default to 1.0 each
  via_pl = losses.preference_loss(types, PC, PR, RC, RR, weights=weights, **kw)[0]
  np.testing.assert_allclose(np.asarray(via_pl), np.asarray(got), rtol=1e-6)
  ones = losses.weighted_preference_loss(("hinge", "ipo"), None, PC, PR, RC, RR, beta=0.3, chosen_num_tokens=NC,
                                         rejected_num_tokens=NR)[0]
  each = [losses.preference_loss(t, PC, PR, RC, RR, beta=0.3, chosen_num_tokens=NC, rejected_num_tokens=NR)[0]
          for t in ("hinge", "ipo")]
  np.testing.assert_allclose(np.asarray(ones), np.asarray(each[0] + each[1]), rtol=1e-6)
  # all reference-free: rewards from the first type, and no reference needed
  _, cr, _ = losses.weighted_preference_loss(("orpo", "simpo"), (1.0, 1.0), PC, PR, None, None, beta=0.3,
                                             chosen_num_tokens=NC, rejected_num_tokens=NR)
  np.testing.assert_allclose(np.asarray(cr), 0.3 * PC / NC, rtol=1e-6)


def test_rpo_is_sigmoid_plus_alpha_sft():
  n = dict(chosen_num_tokens=NC, rejected_num_tokens=NR)
  for alpha, eps in ((1.0, 0.0), (0.25, 0.1)):
    rpo = losses.preference_loss("rpo", PC, PR, RC, RR, beta=0.2, label_smoothing=eps, rpo_alpha=alpha, **n)[0]
    dpo = losses.preference_loss("sigmoid", PC, PR, RC, RR, beta=0.2, label_smoothing=eps)[0]
    sft = losses.preference_loss("sft", PC, PR, None, None, beta=0.2, **n)[0]
    np.testing.assert_allclose(np.asarray(rpo), np.asarray(dpo + alpha * sft), rtol=1e-6)


# ---- reference-free variants, needs_reference, inputs ---------------------------------------------------------------


def test_reference_free_and_needs_reference():
  n = dict(chosen_num_tokens=NC, rejected_num_tokens=NR)
  for t in ("simpo", "orpo", "sft"):
    with_ref = losses.preference_loss(t, PC, PR, RC, RR, **n)
    without = losses.preference_loss(t, PC, PR, None, None, **n)
    for a, b in zip(with_ref, without):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  expected = {t: t not in ("simpo", "orpo", "sft") for t in TYPES}
  assert {t: losses.needs_reference(t) for t in TYPES} == expected
  assert losses.needs_reference(("simpo", "orpo")) is False
  assert losses.needs_reference(("simpo", "sigmoid")) is True
  with pytest.raises(ValueError, match="config.loss.type='nope' is unknown"):
    losses.needs_reference("nope")
  with pytest.raises(ValueError, match="loss type 'sigmoid' needs reference_chosen_logps"):
    losses.preference_loss("sigmoid", PC, PR, None, None)
  with pytest.raises(ValueError, match="loss type 'ipo' is length-normalised and needs chosen_num_tokens"):
    losses.preference_loss("ipo", PC, PR, RC, RR)
  with pytest.raises(ValueError, match="loss type 'simpo' is length-normalised"):
    losses.weighted_preference_loss(("sigmoid", "simpo"), None, PC, PR, RC, RR)


def test_token_counts_are_clamped_to_one():
  zero = jnp.zeros(6)
  a = losses.preference_loss("sft", PC, PR, None, None, chosen_num_tokens=zero, rejected_num_tokens=zero)[0]
  np.testing.assert_allclose(np.asarray(a), -PC, rtol=1e-6)


def test_registry_specs():
  for t, spec in losses.LOSSES.items():
    assert isinstance(spec, losses.LossSpec) and callable(spec.fn)
    assert spec.needs_num_tokens == (t in ("ipo", "sigmoid_norm", "sft", "rpo", "simpo", "orpo"))
  assert losses.validate_loss_config("discopop", beta=0.1, label_smoothing=0.0) == {"discopop_tau": 0.05}
  assert losses.validate_loss_config(("bco_pair", "simpo"), beta=0.1, label_smoothing=0.0, delta=0.2) == {
      "delta": 0.2, "simpo_gamma": 0.5}


# ---- validation -----------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(loss_type="nope"), "config.loss.type='nope' is unknown"),
    (dict(loss_type=("sigmoid", "nope")), r"config.loss.type=\('sigmoid', 'nope'\): 'nope' is unknown"),
    (dict(loss_type=()), r"config.loss.type=\(\) is empty"),
    (dict(beta=0.0), "config.loss.beta=0.0 must be"),
    (dict(beta=float("nan")), "config.loss.beta=nan"),
    (dict(beta=-1.0, loss_type="orpo"), "config.loss.beta=-1.0"),
    (dict(loss_type="robust", label_smoothing=0.5), "config.loss.label_smoothing=0.5 must be in .0, 0.5. for loss "
                                                    "type 'robust'"),
    (dict(loss_type="sigmoid", label_smoothing=-0.1), "config.loss.label_smoothing=-0.1"),
    (dict(loss_type="exo_pair", label_smoothing=-0.01),
     "config.loss.label_smoothing=-0.01 .*exo_pair needs eps > 0"),
    (dict(loss_type="hinge", label_smoothing=0.1), "config.loss.label_smoothing=0.1 is not used by loss type 'hinge'"),
    (dict(loss_type="bco_pair", label_smoothing=0.1), "config.loss.label_smoothing=0.1 is not used"),
    (dict(loss_type="discopop", discopop_tau=0.0), "config.loss.options.discopop_tau=0.0 must be > 0"),
    (dict(loss_type="rpo", rpo_alpha=-1.0), "config.loss.options.rpo_alpha=-1.0 must be >= 0"),
    (dict(loss_type="orpo", orpo_lambda=0.0), "config.loss.options.orpo_lambda=0.0 must be > 0"),
    (dict(loss_type="simpo", simpo_gamma=-0.5), "config.loss.options.simpo_gamma=-0.5 must be >= 0"),
    (dict(loss_type="bco_pair", delta=float("inf")), "config.loss.options.delta=inf must be a finite number"),
    (dict(loss_type="sigmoid", simpo_gamma=1.0), r"config.loss.options \['simpo_gamma'\] are not used by loss type"),
    (dict(loss_type=("sigmoid", "hinge"), discopop_tau=0.1), r"options \['discopop_tau'\] are not used by loss type "
                                                            r"\('sigmoid', 'hinge'\)"),
    (dict(loss_type=("sigmoid", "hinge"), weights=(1.0,)), r"config.loss.weights=\(1.0,\) must have one entry per"),
    (dict(loss_type=("sigmoid", "hinge"), weights=(1.0, float("nan"))), "config.loss.weights=.* must all be finite"),
    (dict(loss_type="sigmoid", weights=(1.0,)), "config.loss.weights=.* is only for a tuple of loss types"),
]


@pytest.mark.parametrize("kwargs,match", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_validation_errors_name_the_field(kwargs, match):
  kwargs = dict(kwargs)
  loss_type = kwargs.pop("loss_type", "sigmoid")
  full = dict(beta=0.1, label_smoothing=0.0) | kwargs
  with pytest.raises(ValueError, match=match):
    losses.validate_loss_config(loss_type, **full)
  if "weights" not in kwargs and not isinstance(loss_type, tuple):  # preference_loss validates the same way
    with pytest.raises(ValueError, match=match):
      losses.preference_loss(loss_type, PC, PR, RC, RR, chosen_num_tokens=NC, rejected_num_tokens=NR, **full)


def test_valid_edge_configs_pass():
  losses.validate_loss_config("exo_pair", beta=0.1, label_smoothing=0.0)  # TRL's 1e-3 default applies
  losses.validate_loss_config("robust", beta=0.1, label_smoothing=0.49)
  losses.validate_loss_config("rpo", beta=0.1, label_smoothing=0.0, rpo_alpha=0.0)
  losses.validate_loss_config("simpo", beta=2.0, label_smoothing=0.0, simpo_gamma=0.0)
  losses.validate_loss_config(("sigmoid", "hinge"), beta=0.1, label_smoothing=0.1, weights=[1, 0.5])
  losses.validate_loss_config("bco_pair", beta=0.1, label_smoothing=0.0, delta=jnp.float32(0.3))


# ---- jit ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", TYPES)
def test_jit_gives_the_same_numbers(t):
  beta, eps, opts = cases(t)[1]
  eager = call(t, jnp.float32, beta, eps, opts)

  @jax.jit
  def jitted(pc, pr, rc, rr, nc, nr):
    return losses.preference_loss(t, pc, pr, rc, rr, beta=beta, label_smoothing=eps, chosen_num_tokens=nc,
                                  rejected_num_tokens=nr, **opts)

  got = jitted(*(jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR, NC, NR)))
  for a, b in zip(got, eager):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_bco_delta_can_be_traced():
  f = jax.jit(lambda delta: losses.preference_loss("bco_pair", PC, PR, RC, RR, beta=0.1, delta=delta)[0])
  want = np_loss("bco_pair", PC, PR, RC, RR, NC, NR, 0.1, 0.0, {"delta": 0.3})[0]
  np.testing.assert_allclose(np.asarray(f(jnp.float32(0.3))), want, rtol=1e-6, atol=1e-6)
