"""Issue 33's variants through the real step: LD-DPO, WPO, f-divergences, KTO / BCO on unpaired rows, BCO's running
reward shift in the optimizer state, and the new metrics (entropy, mean token accuracy), each against the same
quantity assembled by hand from `logprobs` and `losses`."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_dpo_batch
from configs.default import get_config
from dpo_jax import logprobs, losses, model as model_lib, optim, step

CONFIG = get_config("tiny")
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
MODEL = model_lib.make_model(MODEL_CFG)
BETA = 0.3


@pytest.fixture(scope="module")
def setup():
  policy = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(1))
  batch = random_dpo_batch(0, 6, 24, MODEL_CFG.vocab_size, response_len=(1, 12))
  batch.pop("row_ids")
  return dict(policy=policy, reference=reference, batch=batch)


def loss_config(**fields):
  c = copy.deepcopy(CONFIG.loss)
  c.unlock()
  options = fields.pop("options", {})
  c.update(dict(beta=BETA, **fields))
  c.options.update(options)
  return c


def metrics(setup, loss_cfg, batch=None):
  fn = jax.jit(functools.partial(step.eval_step, model=MODEL, loss_cfg=loss_cfg))
  return jax.device_get(fn(setup["policy"], setup["reference"], setup["batch"] if batch is None else batch))


def forward(params, batch, front=None):
  return logprobs.sequence_logps(MODEL, params, batch, front_lengths=front)


def test_entropy_and_token_accuracy_metrics(setup):
  m = metrics(setup, loss_config())
  pi = forward(setup["policy"], setup["batch"])
  np.testing.assert_allclose(m["entropy"], np.sum(pi.entropy_sum) / np.sum(pi.num_tokens), rtol=1e-5)
  chosen = lambda x: np.asarray(logprobs.split_pairs(x)[0])
  np.testing.assert_allclose(m["mean_token_accuracy"], chosen(pi.top1_sum).sum() / chosen(pi.num_tokens).sum(),
                             rtol=1e-5)
  assert 0 < m["entropy"] <= np.log(MODEL_CFG.vocab_size) + 1e-4
  np.testing.assert_allclose(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"], rtol=1e-6)


@pytest.mark.parametrize("ld_alpha", [1.0, 0.5, 0.0])
def test_ld_dpo_weighs_the_tail_of_policy_and_reference(setup, ld_alpha):
  batch = setup["batch"]
  front = logprobs.pair_front_lengths(batch)
  pi, ref = forward(setup["policy"], batch, front), forward(setup["reference"], batch, front)
  lp = lambda s: losses.ld_logps(s.logps, s.front_logps, ld_alpha)
  want = losses.preference_loss("sigmoid", *logprobs.split_pairs(lp(pi)), *logprobs.split_pairs(lp(ref)), beta=BETA)
  got = metrics(setup, loss_config(ld_alpha=ld_alpha))
  np.testing.assert_allclose(got["loss"], np.mean(want[0]), rtol=1e-5)
  if ld_alpha == 1.0:
    np.testing.assert_allclose(got["loss"], metrics(setup, loss_config())["loss"], rtol=1e-6)


def test_wpo_multiplies_each_pair_by_its_policy_weight(setup):
  batch = setup["batch"]
  pi, ref = forward(setup["policy"], batch), forward(setup["reference"], batch)
  c, r = logprobs.split_pairs(pi.logps), logprobs.split_pairs(ref.logps)
  lss, n = logprobs.split_pairs(pi.log_sum_sq_sum), logprobs.split_pairs(pi.num_tokens)
  weight = np.exp((np.asarray(c[0]) - lss[0]) / n[0]) * np.exp((np.asarray(c[1]) - lss[1]) / n[1])
  plain = losses.preference_loss("sigmoid", *c, *r, beta=BETA)[0]
  got = metrics(setup, loss_config(use_weighting=True))
  np.testing.assert_allclose(got["loss"], np.mean(weight * np.asarray(plain)), rtol=1e-5)


@pytest.mark.parametrize("f_type", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_reaches_the_loss(setup, f_type):
  batch = setup["batch"]
  pi, ref = forward(setup["policy"], batch), forward(setup["reference"], batch)
  cl = np.asarray(logprobs.split_pairs(pi.logps)[0] - logprobs.split_pairs(ref.logps)[0], np.float64)
  rl = np.asarray(logprobs.split_pairs(pi.logps)[1] - logprobs.split_pairs(ref.logps)[1], np.float64)
  a = 0.3
  score = {"forward_kl": lambda x: 1 - np.exp(-x), "js_divergence": lambda x: np.log(2) - np.logaddexp(0, -x),
           "alpha_divergence": lambda x: (np.exp((a - 1) * x) - 1) / (a - 1)}[f_type]
  want = np.mean(np.logaddexp(0, -BETA * (score(cl) - score(rl))))
  got = metrics(setup, loss_config(f_divergence_type=f_type, f_alpha_divergence_coef=a))
  np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(got["rewards/chosen"], BETA * cl.mean(), rtol=1e-5)  # rewards stay log-ratios


def unpaired_batch(setup):
  batch = dict(setup["batch"])
  batch["desirable"] = np.array([1, 0, 1, 1, 0, 0], np.int32)
  batch["pair_mask"] = np.array([1, 1, 1, 1, 1, 0], np.int32)  # the last row is padding
  return batch


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired", "bco"])
def test_unpaired_losses_and_kl_through_the_step(setup, loss_type):
  batch = unpaired_batch(setup)
  pi, ref = forward(setup["policy"], batch), forward(setup["reference"], batch)
  (pc, pk), (rc, rk) = logprobs.split_pairs(pi.logps), logprobs.split_pairs(ref.logps)
  w = batch["pair_mask"].astype(np.float32)
  d = batch["desirable"].astype(np.float32)
  want, rewards, kl = losses.unpaired_loss(loss_type, pc, rc, pk, rk, d, w, beta=BETA, desirable_weight=1.5,
                                           undesirable_weight=0.5)
  got = metrics(setup, loss_config(type=loss_type, desirable_weight=1.5, undesirable_weight=0.5), batch)
  np.testing.assert_allclose(got["loss"], np.sum(w * np.asarray(want)) / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(got["kl"], kl, rtol=1e-4, atol=1e-5)  # a difference of ~50-nat sums
  np.testing.assert_allclose(got["rewards/chosen"], np.sum(w * d * rewards) / np.sum(w * d), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["rewards/rejected"], np.sum(w * (1 - d) * rewards) / np.sum(w * (1 - d)),
                             rtol=1e-4, atol=1e-5)
  expected_kl = max(0.0, float(np.sum(w * (np.asarray(pk) - np.asarray(rk))) / w.sum()))
  np.testing.assert_allclose(kl if loss_type == "kto" else expected_kl, expected_kl, rtol=1e-4, atol=1e-5)


def test_paired_held_out_data_scores_unpaired_types_with_dpo(setup):
  np.testing.assert_allclose(metrics(setup, loss_config(type="kto"))["loss"], metrics(setup, loss_config())["loss"],
                             rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_bco_running_shift_lives_in_the_optimizer_state(setup, accum):
  """Two steps: the shift after them is the running mean of every reward seen (all rows, both steps); with two
  micro-batches each updates it in turn, which ends at the same mean. Delta enters each loss."""
  cfg = loss_config(type="bco")
  batch = unpaired_batch(setup)
  batch["pair_mask"] = np.ones(6, np.int32)
  optimizer = step.with_reward_shift(optim.make_optimizer(CONFIG.optim)[0])
  state = step.create_train_state(jax.tree.map(jnp.copy, setup["policy"]), optimizer)
  train = jax.jit(functools.partial(step.train_step, model=MODEL, optimizer=optimizer,
                                    schedule=lambda s: 0.0, loss_cfg=cfg, grad_accum_steps=accum))
  seen = []
  for _ in range(2):
    pi, ref = forward(state.params, batch), forward(setup["reference"], batch)
    seen.append(BETA * np.asarray(logprobs.split_pairs(pi.logps)[0] - logprobs.split_pairs(ref.logps)[0]))
    state, m = train(state, setup["reference"], batch)
    np.testing.assert_allclose(m["reward_shift"], np.mean(np.concatenate(seen)), rtol=1e-4, atol=1e-6)
  assert isinstance(state.opt_state, step.ShiftState)
  assert float(state.opt_state.shift.count) == 12.0
  assert step.keeps_reward_shift(cfg) and step.keeps_reward_shift(loss_config(type="bco_pair"))
  assert not step.keeps_reward_shift(loss_config(type="bco_pair", options={"delta": 0.5}))


@pytest.mark.parametrize("fields,match", [
    ({"stage": "online_dpo", "loss.type": "kto"}, r"config.loss.type='kto' trains on unpaired rows"),
    ({"stage": "reward_model", "loss.type": "bco"}, r"config.stage='reward_model' makes pairs"),
    ({"loss.ld_alpha": 0.5, "data.packing": True}, r"config.loss.ld_alpha .* --config.data.packing=False"),
    ({"loss.ld_alpha": 0.5, "stage": "dpo", "data.reference_logps": True}, r"config.data.reference_logps=True"),
    ({"loss.ld_alpha": 1.5}, r"ld_alpha"),
    ({"loss.use_weighting": True, "loss.type": "aot"}, r"use_weighting"),
])
def test_config_checks_name_the_field(fields, match):
  from config_overrides import override
  from dpo_jax.train import config_checks
  config = override(get_config("tiny"), fields)
  with pytest.raises(ValueError, match=match):
    config_checks.validate_config(config, jax.device_count())
