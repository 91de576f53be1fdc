"""Mixed precision: bf16 compute (`model.compute_dtype`) with fp32 params, Adam state, log-probs and losses.

Every comparison runs the same fp32 params through a float32 and a bfloat16 forward, so the difference is the
compute dtype alone. The model is the `tiny` shape of configs/default.py (vocab 256, hidden 32, intermediate 64,
2 layers, 4 heads, 2 kv heads) on the embedded task's 500 held-out pairs. test_model.py checks the dtypes of
one bf16 forward; this file checks what a researcher reads off a bf16 run: log-probs, margins, the train step.
"""

import dataclasses
import functools
import importlib.util
import json
import math
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from batches import random_dpo_batch
from configs.default import get_config
from dpo_jax import logprobs, model as model_lib, optim, sharding, step
from dpo_jax.data import preference, synthetic
from paths import REPO_ROOT

CONFIG = get_config("tiny")
CONFIG.optim.warmup_steps = 0  # a nonzero learning rate from the first update
ROOT = REPO_ROOT
RTOL = logprobs.BF16_LOGPS_RTOL
SEEDS = (0, 1, 2)
# A random init at the default std 0.02 has near-uniform logits (per-token log-prob ~ -log 256), where bf16
# rounding barely shows (worst relative error ~1e-4). Init std 0.3 gives logits as large as a trained model's:
# its worst bf16 error (7.1e-3, seeds 0-4) matches that of the tiny model after 300-1800 SFT steps on the embedded
# task (6.2e-3), without spending the test's time on training.
FP32 = dataclasses.replace(model_lib.ModelConfig.from_dict(CONFIG.model), initializer_range=0.3)
BF16 = dataclasses.replace(FP32, compute_dtype="bfloat16")
# Policy = reference + this fraction of each weight matrix's std in Gaussian noise: margins |h| of ~7 nats, as
# after some DPO training, on about half the pairs above the bf16 error bound.
PERTURBATION = 0.5


@pytest.fixture(scope="module")
def held_out():
  """The embedded held-out pairs as a row batch `[1000, 32]` and a shared-prompt batch (`[500, P]` + `[1000, R]`)."""
  rows = [json.loads(line) for line in synthetic.test_path().read_text(encoding="utf-8").splitlines()]
  tokenized, _ = preference.tokenize_pairs(rows, synthetic.load_tokenizer(), max_length=CONFIG.max_length,
                                           max_prompt_length=CONFIG.max_prompt_length)
  pairs = np.arange(tokenized.num_pairs)
  return dict(rows=preference.make_batch(tokenized, pairs, kind="dpo"),
              shared=preference.make_batch(tokenized, pairs, kind=preference.SHARED))


@functools.lru_cache(maxsize=None)
def _logps_fn(cfg):
  """jit of `sequence_logps(...).logps` `[2B]` (nats) for `cfg`, compiled once per config and batch layout."""
  model = model_lib.make_model(cfg)
  return jax.jit(lambda params, batch: logprobs.sequence_logps(model, params, batch).logps)


def _logps(cfg, params, batch):
  return np.asarray(_logps_fn(cfg)(params, batch))


# `init_params` under one outer jit: compiled once for every seed (it jits a new closure on each call).
_init = jax.jit(functools.partial(model_lib.init_params, FP32))


@pytest.mark.parametrize("seed", SEEDS)
def test_bf16_sequence_logps_are_within_rtol_of_fp32(held_out, seed):
  """|logp_bf16 - logp_fp32| <= BF16_LOGPS_RTOL |logp_fp32| for every held-out sequence, in both batch layouts
  (the bf16 shared-prompt forward against the fp32 rows: the layouts agree to fp32 rounding, test_shared_prompt)."""
  params = _init(jax.random.key(seed))
  fp32_N = _logps(FP32, params, held_out["rows"])
  for layout in ("rows", "shared"):
    bf16_N = _logps(BF16, params, held_out[layout])
    assert bf16_N.dtype == np.float32, layout
    rel_N = np.abs(bf16_N - fp32_N) / np.abs(fp32_N)
    worst = int(np.argmax(rel_N))
    assert rel_N[worst] <= RTOL, (
        f"{layout}, seed {seed}: bf16 log-prob of sequence {worst} is {bf16_N[worst]:.4f} nats against fp32 "
        f"{fp32_N[worst]:.4f} (relative error {rel_N[worst]:.2e} > BF16_LOGPS_RTOL={RTOL}). Something in the "
        "forward lost precision: check that log-softmax, RMSNorm statistics and attention softmax stay fp32.")
    # bf16 really ran: an fp32 forward under a bf16 config would pass the bound above and prove nothing.
    assert rel_N.max() > 1e-4, f"{layout}: bf16 and fp32 log-probs agree to {rel_N.max():.1e}; was bf16 applied?"


@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_margins_keep_their_sign_in_bf16(held_out, seed):
  """The DPO margin h = (log pi - log pi_ref)(chosen) - (same)(rejected) (nats; the loss reads beta h) has the
  same sign in bf16 as in fp32 wherever |h_fp32| exceeds the bound the log-prob tolerance implies,
  tau = BF16_LOGPS_RTOL (|pi_c| + |pi_r| + |ref_c| + |ref_r|); over all pairs signs agree >= 98% of the time
  (measured 99.2-100% over seeds 0-4; flips only where |h| < 0.4 nats)."""
  reference = _init(jax.random.key(seed))
  # Another init has the same std per matrix, so this adds PERTURBATION std(w) of Gaussian noise to each matrix w.
  policy = jax.tree.map(lambda r, n: r + PERTURBATION * n if r.ndim > 1 else r, reference,
                        _init(jax.random.key(100 + seed)))
  batch = held_out["rows"]

  def margins_and_bound(cfg):
    pol_Bx2 = _logps(cfg, policy, batch).reshape(-1, 2)
    ref_Bx2 = _logps(cfg, reference, batch).reshape(-1, 2)
    ratio_Bx2 = pol_Bx2 - ref_Bx2
    return ratio_Bx2[:, 0] - ratio_Bx2[:, 1], RTOL * (np.abs(pol_Bx2) + np.abs(ref_Bx2)).sum(-1)

  h32_B, tau_B = margins_and_bound(FP32)
  h16_B, _ = margins_and_bound(BF16)
  same_B = np.sign(h16_B) == np.sign(h32_B)
  decided_B = np.abs(h32_B) > tau_B
  assert decided_B.mean() > 0.3, f"only {decided_B.mean():.0%} of margins exceed tau: raise PERTURBATION"
  flipped = np.flatnonzero(decided_B & ~same_B)
  assert flipped.size == 0, (
      f"seed {seed}: {flipped.size} pairs with |h| > tau changed sign in bf16, e.g. pair {flipped[0]}: fp32 "
      f"{h32_B[flipped[0]]:.3f}, bf16 {h16_B[flipped[0]]:.3f}, tau {tau_B[flipped[0]]:.3f} nats")
  assert same_B.mean() >= 0.98, (f"seed {seed}: bf16 margins agree in sign on {same_B.mean():.1%} of pairs; largest "
                                 f"|h| flipped {np.abs(h32_B[~same_B]).max():.3f} nats")


def test_bf16_train_step_keeps_fp32_state_and_first_loss_is_log2():
  """Two jitted DPO steps (built as the trainer builds them, on a 1-device mesh) with bf16 compute: params, gradients
  and Adam moments fp32, metrics fp32, and at step 0 (policy == reference) the loss is log 2 exactly and the rewards
  exactly 0 (measured on CPU): the reference forward is the same bf16 computation as the policy's, so their
  log-probs round identically."""
  cfg = dataclasses.replace(model_lib.ModelConfig.from_dict(CONFIG.model), compute_dtype="bfloat16")
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = CONFIG.sharding.rules
  shard = sharding.ShardingContext(mesh, rules)
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  shardings = step.state_shardings(cfg, optimizer, mesh, rules)
  reference = model_lib.init_params(cfg, jax.random.key(0), shardings.params)
  state = step.create_train_state(reference, optimizer, shardings)
  local = random_dpo_batch(0, 8, 32, cfg.vocab_size)
  model = model_lib.make_model(cfg, shard)
  train = step.jit_train_step(
      functools.partial(step.train_step, model=model, optimizer=optimizer, schedule=schedule, loss_cfg=CONFIG.loss,
                        shard=shard),
      state_shardings=shardings, reference_shardings=shardings.params,
      batch_shardings=sharding.batch_shardings(mesh, rules, local), mesh=mesh)
  batch = sharding.global_batch(mesh, rules, local)

  grads = jax.eval_shape(jax.grad(lambda p: logprobs.sequence_logps(model, p, batch).logps.sum()), reference)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  history = []
  for _ in range(2):
    state, metrics = train(state, reference, batch)
    history.append(jax.device_get(metrics))
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    assert x.dtype == jnp.float32, f"param {jax.tree_util.keystr(path)} is {x.dtype}"
  for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):  # Adam mu, nu fp32; counters int32
    assert x.dtype in (jnp.float32, jnp.int32), f"optimizer state {jax.tree_util.keystr(path)} is {x.dtype}"
  assert sum(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)) >= 2 * len(jax.tree.leaves(reference))
  for name, value in history[0].items():
    assert value.dtype == np.float32, f"metric {name} is {value.dtype}"
  first = history[0]
  assert first["loss"] == np.float32(np.log(2.0)), f"first bf16 loss {first['loss']!r} is not exactly log 2"
  assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
  assert history[1]["loss"] < first["loss"] and first["grad_norm"] > 0
  changed = jax.tree.map(lambda p, r: bool(jnp.any(p != r)), jax.device_get(state.params), jax.device_get(reference))
  assert all(jax.tree.leaves(changed)), "an fp32 param did not move after two bf16 steps"


REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "cumsum", "cumprod",
              "cummax", "cummin", "cumlogsumexp"}


def _reductions(jaxpr):
  """[(primitive, operand dtype, operand shape, terms reduced, name stack)] of every reduction in `jaxpr` and the
  jaxprs nested in it (jit, scan, remat, custom_vjp)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in REDUCTIONS:
      x = eqn.invars[0].aval
      axes = eqn.params["axes"] if "axes" in eqn.params else (eqn.params["axis"],)
      found.append((eqn.primitive.name, x.dtype.name, x.shape, math.prod(x.shape[a] for a in axes),
                    str(eqn.source_info.name_stack)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _reductions(sub)
  return found


@pytest.mark.parametrize("layout,overrides", [
    ("rows", {}), ("rows", dict(logits_chunk_size=5)), ("rows", dict(scan_layers=True, remat="full")),
    ("rows", dict(platform="gpu", attention_impl="xla")), ("shared", {})])
def test_bf16_train_step_reduces_in_fp32(held_out, layout, overrides):
  """In the whole bf16 train step (both forwards, the loss, its gradient, the grad norm, Adam) no sum, max, mean or
  log-sum-exp reduces a bf16 operand: RMSNorm statistics, attention softmax, log-softmax, per-sequence sums, rewards
  and metrics are fp32, and only dots take bf16 inputs (accumulating in fp32 on GPU/TPU). The numeric tests above
  cannot see a bf16 log-softmax (seed 0: worst relative error 6.5e-3 with it, 6.5e-3 without; the matmuls'
  rounding dominates); this check can. Traced only (abstract params, no compile), so 'gpu' builds the GPU program
  (with the 'xla' kernel: cuDNN does not trace without a GPU).

  The one exception: a shared prompt's keys, values and last hidden state are repeated for its K = 2 responses, so
  the backward sums their two bf16 cotangents, one bf16 rounding like that of any bf16 cotangent."""
  cfg = dataclasses.replace(BF16, **overrides)
  model = model_lib.make_model(cfg)
  optimizer, schedule = optim.make_optimizer(CONFIG.optim)
  params = model_lib.abstract_params(cfg)
  state = jax.eval_shape(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
  batch = {k: v[:16] if v.shape[0] == 1000 else v[:8] for k, v in held_out[layout].items()}  # 8 pairs
  train = functools.partial(step.train_step, model=model, optimizer=optimizer, schedule=schedule, loss_cfg=CONFIG.loss)
  found = _reductions(jax.make_jaxpr(train)(state, params, batch).jaxpr)
  # The walk reaches the layers (inside the scan when scanned): their norm and attention statistics are there.
  assert any("attn_norm" in r[-1] for r in found) and any("attn" in r[-1] and r[0] == "reduce_max" for r in found)
  allowed = 2 if layout == "shared" else 1  # terms a bf16 reduction may sum
  bad = [r for r in found if r[1] == "bfloat16" and r[3] > allowed]
  assert not bad, f"bf16 reductions (primitive, dtype, operand shape, terms, where): {bad}; compute them in fp32"


def test_auto_compute_dtype_resolves_per_platform():
  shape = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
  auto = lambda platform: model_lib.ModelConfig(**shape, compute_dtype="auto", platform=platform).compute_dtype
  assert (auto("tpu"), auto("gpu"), auto("cuda"), auto("cpu")) == ("bfloat16", "bfloat16", "bfloat16", "float32")
  assert auto("") == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  assert model_lib.ModelConfig(**shape, compute_dtype="auto", platform="tpu").param_dtype == "float32"
  with pytest.raises(ValueError, match=r"compute_dtype='bf16'"):
    model_lib.ModelConfig(**shape, compute_dtype="bf16")


def _config(name, arg=None):
  """configs/<name>.py loaded by path, as the CLI loads it."""
  spec = importlib.util.spec_from_file_location(f"mixed_precision_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_configs_choose_auto_for_accelerators_and_fp32_by_default():
  for name, arg in (("default", None), ("default", "tiny")):
    assert _config(name, arg).model.compute_dtype == "float32", (name, arg)
  for name, arg in (("default", "1b"), ("hf_dpo", None)):
    model = _config(name, arg).model
    assert (model.compute_dtype, model.param_dtype) == ("auto", "float32"), (name, arg)
  one_b = dict(_config("default", "1b").model)
  assert model_lib.ModelConfig.from_dict(dict(one_b, platform="tpu")).compute_dtype == "bfloat16"
  assert model_lib.ModelConfig.from_dict(dict(one_b, platform="cpu")).compute_dtype == "float32"
