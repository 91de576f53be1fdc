"""The optax chain: schedule shape, weight-decay mask, clipping, and parity with torch.optim.AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from dpo_jax import optim


def _cfg(**kw):
  c = dict(get_config().optim)
  c.update(kw)
  return c


def test_warmup_then_cosine_to_the_end_ratio():
  s = optim.learning_rate_schedule(_cfg(learning_rate=1e-3, warmup_steps=10, total_steps=110, end_lr_ratio=0.1))
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # cosine midpoint
  assert float(s(110)) == pytest.approx(1e-4, rel=1e-5)


def test_linear_and_constant_schedules():
  lin = optim.learning_rate_schedule(_cfg(schedule="linear", learning_rate=1.0, warmup_steps=0, total_steps=100, end_lr_ratio=0.0))
  assert float(lin(25)) == pytest.approx(0.75) and float(lin(100)) == pytest.approx(0.0)
  const = optim.learning_rate_schedule(_cfg(schedule="constant", learning_rate=0.5, warmup_steps=4, total_steps=100))
  assert float(const(2)) == pytest.approx(0.25) and float(const(50)) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="config.optim.schedule"):
    optim.learning_rate_schedule(_cfg(schedule="exp"))


def test_weight_decay_skips_biases_and_norms():
  params = {"w": jnp.ones((3, 3)), "scale": jnp.ones(3)}
  opt, _ = optim.make_optimizer(_cfg(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, max_grad_norm=0.0))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)
  np.testing.assert_array_equal(updates["scale"], 0.0)


def test_global_norm_clipping_is_in_the_chain():
  """Clipping at 1.0 then AdamW == unclipped AdamW fed the gradients rescaled to global norm 1."""
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  grads = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "b": jnp.array([0.0, 12.0])}  # global norm 13
  kw = dict(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0)
  clipped_opt, _ = optim.make_optimizer(_cfg(max_grad_norm=1.0, **kw))
  plain_opt, _ = optim.make_optimizer(_cfg(max_grad_norm=0.0, **kw))
  state_c, state_p = clipped_opt.init(params), plain_opt.init(params)
  for _ in range(2):  # the second step shows the moments were built from clipped gradients too
    u_c, state_c = clipped_opt.update(grads, state_c, params)
    u_p, state_p = plain_opt.update(jax.tree.map(lambda g: g / 13.0, grads), state_p, params)
    for a, b in zip(jax.tree.leaves(u_c), jax.tree.leaves(u_p)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_adamw_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 3)).astype(np.float32)
  b0 = rng.normal(size=(3,)).astype(np.float32)
  grads = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)) for _ in range(5)]
  lr, wd = 1e-2, 0.1

  tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
  topt = torch.optim.AdamW([{"params": [tw], "weight_decay": wd}, {"params": [tb], "weight_decay": 0.0}],
                           lr=lr, betas=(0.9, 0.999), eps=1e-8)
  for gw, gb in grads:
    tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
    topt.step()

  opt, _ = optim.make_optimizer(_cfg(learning_rate=lr, warmup_steps=0, schedule="constant", weight_decay=wd, max_grad_norm=0.0))
  params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
  state = opt.init(params)
  for gw, gb in grads:
    updates, state = opt.update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params)
    params = optim.optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(params["b"], tb.detach().numpy(), rtol=1e-5, atol=1e-7)
  assert not math.isclose(float(params["w"][0, 0]), float(w0[0, 0]))
