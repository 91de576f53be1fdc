"""The frontier's baselines against hand computations: token-level unlikelihood, the Bradley-Terry reward
model (seed eq. 2) and best-of-N selection."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import logprobs, model as model_lib, optim, step
from dpo_jax.experiments import baselines
from dpo_jax.train import reward_model
from dpo_jax.data import preference
from tests.batches import random_dpo_batch

VOCAB = 11
CFG = model_lib.ModelConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                            num_kv_heads=1)


class FixedLogits:
  """A stand-in model whose `apply` returns the same logits `[N, T, V]` whatever the params."""

  def __init__(self, logits):
    self.logits = jnp.asarray(logits, jnp.float32)

  def apply(self, variables, ids, positions, mask):
    return self.logits * variables["params"]["scale"]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logps_sum_to_the_sequence_logps():
  batch = random_dpo_batch(0, 3, 12, VOCAB)
  logits = np.random.default_rng(1).normal(size=(6, 12, VOCAB)).astype(np.float32)
  tokens = np.asarray(logprobs.token_logps(logits, batch["input_ids"], batch["loss_mask"]))
  ref = _log_softmax(logits[:, :-1].astype(np.float64))
  expected = np.take_along_axis(ref, batch["input_ids"][:, 1:, None], -1)[..., 0] * batch["loss_mask"][:, 1:]
  np.testing.assert_allclose(tokens, expected, atol=1e-5)
  np.testing.assert_allclose(tokens.sum(-1), logprobs.logps_from_logits(logits, batch["input_ids"],
                                                                         batch["loss_mask"]).logps, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_unlikelihood_loss_matches_a_hand_computation(alpha):
  batch = random_dpo_batch(2, 4, 12, VOCAB)
  batch["pair_mask"][3] = 0  # a padding pair scores nothing
  batch["loss_mask"][6:8] = 0
  logits = np.random.default_rng(3).normal(size=(8, 12, VOCAB)).astype(np.float32) * 3
  lp = _log_softmax(logits[:, :-1].astype(np.float64))
  nll, nll_n, ul, ul_n = 0.0, 0, 0.0, 0
  for n in range(8):
    for t in range(11):
      if batch["loss_mask"][n, t + 1]:
        logp = lp[n, t, batch["input_ids"][n, t + 1]]
        if n % 2 == 0:
          nll, nll_n = nll - logp, nll_n + 1
        else:
          ul, ul_n = ul - math.log(1.0 - math.exp(logp)), ul_n + 1
  value, sums = baselines.unlikelihood_loss({"scale": 1.0}, batch, model=FixedLogits(logits), alpha=alpha)
  np.testing.assert_allclose(float(value), nll / nll_n + alpha * ul / ul_n, rtol=1e-5)
  np.testing.assert_allclose([float(sums["chosen_tokens"]), float(sums["rejected_tokens"])], [nll_n, ul_n])


def test_unlikelihood_is_finite_when_a_rejected_token_is_certain():
  batch = random_dpo_batch(4, 2, 10, VOCAB)
  logits = np.zeros((4, 10, VOCAB), np.float32)
  logits[1, np.arange(9), batch["input_ids"][1, 1:]] = 200.0  # p(y_l token) = 1 in fp32 everywhere on row 1
  value, grads = jax.value_and_grad(lambda p: baselines.unlikelihood_loss(p, batch, model=FixedLogits(logits),
                                                                          alpha=1.0)[0])({"scale": 1.0})
  assert np.isfinite(float(value)) and np.isfinite(float(grads["scale"]))
  assert float(value) > 10.0  # log(1 - p) at the clamp: -log(1e-6) ~ 13.8 per certain token, averaged


def test_unlikelihood_step_pushes_rejected_tokens_down_and_chosen_up():
  params = model_lib.init_params(CFG, jax.random.key(0))
  model = model_lib.make_model(CFG)
  batch = {k: jnp.asarray(v) for k, v in random_dpo_batch(5, 4, 12, VOCAB).items() if k != "row_ids"}
  optimizer, schedule = optim.make_optimizer(dict(learning_rate=1e-2, schedule="constant", warmup_steps=0,
                                                  total_steps=10, end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
                                                  weight_decay=0.0, max_grad_norm=0.0))
  state = step.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  update = jax.jit(lambda s: baselines.unlikelihood_train_step(s, batch, model=model, optimizer=optimizer,
                                                              schedule=schedule, alpha=1.0))
  first = None
  for _ in range(10):
    state, m = update(state)
    first = first or {k: float(v) for k, v in m.items()}
  assert float(m["chosen_nll"]) < first["chosen_nll"] and float(m["unlikelihood"]) < first["unlikelihood"]


# ---- reward model ----

def _rm_params(seed=0):
  params = reward_model.init(model_lib.init_params(CFG, jax.random.key(seed)), CFG.hidden_size)
  params["head"] = {"kernel": jax.random.normal(jax.random.key(seed + 1), (CFG.hidden_size,)),
                    "bias": jnp.float32(0.25)}
  return params


def test_reward_is_read_at_the_last_real_token():
  model = model_lib.make_model(CFG)
  params = _rm_params()
  batch = random_dpo_batch(6, 3, 12, VOCAB)
  r = np.asarray(reward_model.rewards(model, params, batch))
  hidden = np.asarray(model.apply({"params": params["backbone"]}, batch["input_ids"], batch["positions"],
                                  batch["attention_mask"], method="hidden"))
  last = batch["attention_mask"].sum(-1) - 1
  expected = hidden[np.arange(6), last] @ np.asarray(params["head"]["kernel"]) + 0.25
  np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-6)
  padded = dict(batch, input_ids=np.where(batch["attention_mask"] > 0, batch["input_ids"], 7))
  np.testing.assert_allclose(reward_model.rewards(model, params, padded), r, rtol=1e-6)  # padding ids: no effect


def test_reward_model_loss_is_bradley_terry_over_real_pairs():
  model = model_lib.make_model(CFG)
  params = _rm_params(3)
  batch = random_dpo_batch(7, 4, 12, VOCAB)
  batch["pair_mask"][2] = 0
  r = np.asarray(reward_model.rewards(model, params, batch), np.float64).reshape(-1, 2)
  keep = batch["pair_mask"] > 0
  expected = np.mean(np.log1p(np.exp(-(r[keep, 0] - r[keep, 1]))))
  value, sums = reward_model.loss(params, batch, model=model)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  assert float(sums["pairs"]) == 3 and float(sums["correct"]) == np.sum(r[keep, 0] > r[keep, 1])


def _marker_pairs(n, seed):
  """Pairs whose chosen response holds token 3 and rejected token 4 somewhere: a learnable preference."""
  rng = np.random.default_rng(seed)
  prompts, chosen, rejected = [], [], []
  for _ in range(n):
    prompts.append(rng.integers(5, VOCAB, size=3).astype(np.int32))
    base = rng.integers(5, VOCAB, size=4).astype(np.int32)
    c, r = base.copy(), base.copy()
    k = rng.integers(0, 4)
    c[k], r[k] = 3, 4
    chosen.append(np.append(c, 1).astype(np.int32))
    rejected.append(np.append(r, 1).astype(np.int32))
  return preference.TokenizedPairs(tuple(prompts), tuple(chosen), tuple(rejected), np.arange(n, dtype=np.int32),
                                   max_length=10, pad_id=0, eos_id=1)


def test_reward_model_learns_a_separable_preference():
  model = model_lib.make_model(CFG)
  optimizer, _ = optim.make_optimizer(dict(learning_rate=3e-3, schedule="constant", warmup_steps=0, total_steps=60,
                                           end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                           max_grad_norm=1.0))
  start = reward_model.init(model_lib.init_params(CFG, jax.random.key(1)), CFG.hidden_size)
  untrained = reward_model.evaluate(jax.jit(lambda p, b: reward_model.loss(p, b, model=model)[1]), start,
                                    _marker_pairs(64, 1), batch_size=16)
  assert untrained["loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # the zero head scores every response 0
  _, held_out = reward_model.train(model, start, _marker_pairs(256, 0), _marker_pairs(64, 1), optimizer=optimizer,
                                   steps=60, batch_size=16, seed=0, eval_batch_size=16)
  assert held_out["accuracy"] >= 0.95 and held_out["loss"] < 0.3 and held_out["pairs"] == 64


def test_best_of_n_picks_the_top_scored_sample_of_each_group():
  rng = np.random.default_rng(0)
  true_r, scores = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
  for n in (1, 2, 3, 4, 5, 12):
    picks = [true_r[p, g * n + np.argmax(scores[p, g * n:(g + 1) * n])] for p in range(5) for g in range(12 // n)]
    mean, stderr = reward_model.best_of_n(true_r, scores, n)
    assert mean == pytest.approx(np.mean(picks)) and stderr == pytest.approx(np.std(picks) / np.sqrt(len(picks)))
  assert reward_model.best_of_n(true_r, scores, 1)[0] == pytest.approx(true_r.mean())
  assert reward_model.best_of_n(true_r, true_r, 12)[0] == pytest.approx(true_r.max(1).mean())  # an oracle scorer
  with pytest.raises(ValueError, match="n=13"):
    reward_model.best_of_n(true_r, scores, 13)


def test_best_of_n_kl():
  assert reward_model.best_of_n_kl(1) == 0.0
  assert reward_model.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
  assert reward_model.best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
