"""Every loss variant through the real step: the config block selects it, the step hands it the sequence
log-probs and response token counts, combinations weight as configured, and reference-free variants never
run (or trace) a reference forward."""

import copy
import functools

import jax
import numpy as np
import pytest

from batches import random_dpo_batch
from configs.default import get_config
from dpo_jax import logprobs, losses, model as model_lib, optim, sharding, step

CONFIG = get_config("tiny")
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
MODEL = model_lib.make_model(MODEL_CFG)


@pytest.fixture(scope="module")
def setup():
  policy = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(1))  # pi != pi_ref: nonzero log-ratios
  batch = random_dpo_batch(0, 6, 24, MODEL_CFG.vocab_size)
  batch.pop("row_ids")
  pi = logprobs.sequence_logps(MODEL, policy, batch)
  ref = logprobs.sequence_logps(MODEL, reference, batch)
  inputs = (*logprobs.split_pairs(pi.logps), *logprobs.split_pairs(ref.logps))
  tokens = logprobs.split_pairs(pi.num_tokens)
  return dict(policy=policy, reference=reference, batch=batch, inputs=inputs, tokens=tokens)


def loss_config(**fields):
  c = copy.deepcopy(CONFIG.loss)
  options = fields.pop("options", {})
  c.update(fields)
  c.options.update(options)
  return c


def eval_loss(setup, loss_cfg, reference="params"):
  ref = setup["reference"] if reference == "params" else None
  fn = jax.jit(functools.partial(step.eval_step, model=MODEL, loss_cfg=loss_cfg))
  return float(fn(setup["policy"], ref, setup["batch"])["loss"])


def direct_loss(setup, loss_type, **kwargs):
  chosen_tokens, rejected_tokens = setup["tokens"]
  out = losses.preference_loss(loss_type, *setup["inputs"], chosen_num_tokens=chosen_tokens,
                               rejected_num_tokens=rejected_tokens, **kwargs)
  return float(np.mean(out[0]))


def test_each_variant_selected_by_the_config_is_what_the_step_computes(setup):
  smoothing = {t: 0.1 if spec.uses_label_smoothing else 0.0 for t, spec in losses.LOSSES.items()}
  configs = {t: loss_config(type=t, beta=0.2, label_smoothing=smoothing[t]) for t in losses.LOSSES}

  @jax.jit  # every variant in one program: one compile, and XLA shares the two forward passes between them
  def all_variants(policy, reference, batch):
    return {t: step.eval_step(policy, reference, batch, model=MODEL, loss_cfg=c)["loss"] for t, c in configs.items()}

  ours = jax.device_get(all_variants(setup["policy"], setup["reference"], setup["batch"]))
  for loss_type, value in ours.items():
    assert np.isfinite(value), loss_type
    expected = direct_loss(setup, loss_type, beta=0.2, label_smoothing=smoothing[loss_type])
    assert float(value) == pytest.approx(expected, rel=1e-5), loss_type


def test_options_and_weighted_combinations_come_from_the_config(setup):
  rpo = eval_loss(setup, loss_config(type="rpo", options={"rpo_alpha": 0.5}))
  sigmoid = eval_loss(setup, loss_config(type="sigmoid"))
  sft = eval_loss(setup, loss_config(type="sft"))
  assert rpo == pytest.approx(sigmoid + 0.5 * sft, rel=1e-5)
  combined = eval_loss(setup, loss_config(types=("sigmoid", "sft"), weights=(1.0, 0.1)))
  assert combined == pytest.approx(sigmoid + 0.1 * sft, rel=1e-5)
  # an option the chosen type does not read is an error, not silently ignored
  with pytest.raises(ValueError, match="rpo_alpha"):
    eval_loss(setup, loss_config(type="sigmoid", options={"rpo_alpha": 0.5}))
  with pytest.raises(ValueError, match=r"config\.loss\.weights.*needs config\.loss\.types"):
    losses.from_config(loss_config(weights=(1.0,)))


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "sft"])
@pytest.mark.slow
def test_reference_free_variants_never_run_a_reference_forward(setup, loss_type, monkeypatch):
  with_params = eval_loss(setup, loss_config(type=loss_type))
  without = eval_loss(setup, loss_config(type=loss_type), reference=None)  # no params, no ref_* columns
  assert with_params == without
  # The train step with reference None: compiled and run with no reference anywhere in the computation.
  calls = []
  real = logprobs.sequence_logps
  monkeypatch.setattr(logprobs, "sequence_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  state = step.create_train_state(setup["policy"], optimizer,
                                  step.state_shardings(MODEL_CFG, optimizer, mesh, CONFIG.sharding.rules))
  train = jax.jit(functools.partial(step.train_step, model=MODEL, optimizer=optimizer, schedule=schedule,
                                    loss_cfg=loss_config(type=loss_type)))
  _, metrics = train(state, None, setup["batch"])
  assert np.isfinite(float(metrics["loss"]))
  assert len(calls) == 1  # the policy's forward only
