"""Rollouts: the sampler's tokens, teacher-forced log-probs equal to the training path's, an unbiased KL estimate,
explicit shardings, and the refusal of biased sampling for RL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import evaluate, logprobs, model as model_lib, rl, rollout, sample, sharding, step

# initializer_range 0.3: peaked next-token distributions and a sizeable KL between two inits, so the equalities
# below have teeth; vocab 24 leaves EOS (id 1) likely enough that some rows end early and some do not.
CFG = model_lib.ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, initializer_range=0.3)
EOS, PAD, N = 1, 0, 8


@pytest.fixture(scope="module")
def models():
  return model_lib.init_params(CFG, jax.random.key(0)), model_lib.init_params(CFG, jax.random.key(1))


def prompts(b, seed=0):
  rng = np.random.default_rng(seed)
  return evaluate.left_pad_prompts([rng.integers(3, CFG.vocab_size, size=rng.integers(1, 6)) for _ in range(b)], PAD)


def test_rollout_log_probs_equal_the_training_paths_teacher_forced_log_probs(models):
  policy, reference = models
  ids, mask = prompts(16)
  ro = rollout.rollout(CFG, policy, reference, ids, mask, rng=jax.random.key(3), max_new_tokens=N, eos_id=EOS,
                       pad_id=PAD)
  tokens, sampler_logps = sample.generate(CFG, policy, ids, mask, rng=jax.random.key(3), max_new_tokens=N,
                                          eos_id=EOS, pad_id=PAD, return_logps=True)
  np.testing.assert_array_equal(ro.response_ids, tokens)  # the same draw: the rollout IS the sampler
  ended = np.asarray(ro.ended)
  assert 0 < ended.sum() < len(ended), "the test needs rows that end early and rows cut at N tokens"
  # The independent layout: right-padded rows prompt + response through EOS, scored by logprobs.sequence_logps.
  batch = sample.completions_to_batch(ids, mask, np.asarray(tokens), pad_id=PAD, eos_id=EOS,
                                      max_length=ids.shape[1] + N)
  np.testing.assert_array_equal(np.asarray(ro.response_mask).sum(1), batch["loss_mask"].sum(1))
  model = model_lib.make_model(CFG)
  for params, logps in ((policy, ro.logps), (reference, ro.ref_logps)):
    np.testing.assert_allclose(np.asarray(logps).sum(1), logprobs.sequence_logps(model, params, batch).logps,
                               rtol=1e-5, atol=1e-4)
  # Per token, the teacher-forced log-probs are the sampler's own up to fp32 (same model, cached vs full forward).
  np.testing.assert_allclose(ro.logps, sampler_logps, atol=1e-4)
  assert np.all(np.asarray(ro.logps)[np.asarray(ro.response_mask) == 0] == 0)


def test_response_mask_ends_at_the_first_eos_inclusive_and_covers_rows_without_one():
  tokens = jnp.array([[5, 1, 0, 0], [5, 6, 7, 8], [1, 1, 1, 1]])
  np.testing.assert_array_equal(rollout.response_mask(tokens, 1), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
  seq = rollout.layout(jnp.array([[0, 4], [3, 4], [0, 4]]), jnp.array([[0, 1], [1, 1], [0, 1]]), tokens, eos_id=1)
  np.testing.assert_array_equal(seq["ended"], [True, False, True])
  np.testing.assert_array_equal(seq["positions"][0], [0, 0, 1, 2, 3, 4])  # real tokens counted from 0
  np.testing.assert_array_equal(seq["attention_mask"][0], [0, 1, 1, 1, 0, 0])


def test_sampled_k1_kl_averages_to_the_exact_per_token_kl_over_the_vocabulary(models):
  """Sum_t k1 on y ~ pi and sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) are both unbiased for the sequence KL: their
  sample means over 1024 rollouts agree within 4 standard errors of their paired difference."""
  policy, reference = models
  ids, mask = prompts(1024, seed=1)
  ro = rollout.rollout(CFG, policy, reference, ids, mask, rng=jax.random.key(7), max_new_tokens=N, eos_id=EOS,
                       pad_id=PAD)
  model = model_lib.make_model(CFG)
  exact_BxN = rl.exact_kl_per_token(rollout.response_logits(model, policy, ro, N),
                                    rollout.response_logits(model, reference, ro, N)) * ro.response_mask
  k1_B = np.asarray(jnp.sum(rl.kl_per_token(ro.logps, ro.ref_logps, "k1") * ro.response_mask, axis=1))
  k3_B = np.asarray(jnp.sum(rl.kl_per_token(ro.logps, ro.ref_logps, "k3") * ro.response_mask, axis=1))
  exact_B = np.asarray(jnp.sum(exact_BxN, axis=1))
  assert exact_B.mean() > 1.0, "the two inits should be nats apart for this test to mean something"
  for name, est_B in (("k1", k1_B), ("k3", k3_B)):
    diff = est_B - exact_B
    stderr = diff.std() / np.sqrt(diff.size)
    assert abs(diff.mean()) < 4 * stderr, (f"{name}: sampled {est_B.mean():.3f} vs exact {exact_B.mean():.3f} nats "
                                           f"(stderr {stderr:.3f}): the rollout's log-probs are not pi's")


def test_jit_rollout_with_declared_shardings_matches_the_plain_rollout_and_splits_the_batch(models):
  policy, reference = models
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  ps = step.param_shardings(CFG, mesh, rules)
  fn = rollout.jit_rollout(CFG, model_lib.make_model(CFG, sharding.ShardingContext(mesh, rules)), mesh=mesh,
                           rules=rules, param_shardings=ps, reference_shardings=ps, max_new_tokens=N, eos_id=EOS,
                           pad_id=PAD)
  ids, mask = prompts(16)
  sharded = fn(jax.device_put(policy, ps), jax.device_put(reference, ps), ids, mask, jax.random.key(3))
  plain = rollout.rollout(CFG, policy, reference, ids, mask, rng=jax.random.key(3), max_new_tokens=N, eos_id=EOS,
                          pad_id=PAD)
  np.testing.assert_array_equal(sharded.input_ids, plain.input_ids)
  np.testing.assert_allclose(sharded.logps, plain.logps, atol=1e-5)
  np.testing.assert_allclose(sharded.ref_logps, plain.ref_logps, atol=1e-5)
  assert sharded.logps.sharding.spec[0] == ("data", "fsdp", "expert") and len(sharded.logps.sharding.device_set) == 8


@pytest.mark.parametrize("kwargs, field", [({"temperature": 0.7}, "temperature=0.7"), ({"top_k": 5}, "top_k=5"),
                                           ({"top_p": 0.9}, "top_p=0.9")])
def test_biased_sampling_is_refused_for_rl_naming_the_setting(kwargs, field):
  settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kwargs}
  with pytest.raises(ValueError, match=field):
    rollout.check_unbiased_sampling(**settings, where="config.rl")
  rollout.check_unbiased_sampling(1.0, 0, 1.0)  # pure sampling passes


def test_top_k_and_top_p_keep_the_tokens_they_should():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
  finite = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert finite(sample.filter_logits(logits, top_k=2)) == [True, True, False, False]
  # Nucleus 0.7: 0.5 < 0.7 so the second token joins; 0.75 >= 0.7, so the third does not.
  assert finite(sample.filter_logits(logits, top_p=0.7)) == [True, True, False, False]
  assert finite(sample.filter_logits(logits, top_p=0.76)) == [True, True, True, False]
  assert finite(sample.filter_logits(logits, top_p=0.3)) == [True, False, False, False]  # the top token always
  assert finite(sample.filter_logits(logits)) == [True] * 4


def test_top_k_sampling_draws_only_the_k_most_likely_tokens(models):
  policy, _ = models
  ids, mask = prompts(64)
  tokens = np.asarray(sample.generate(CFG, policy, ids, mask, rng=jax.random.key(0), max_new_tokens=1, eos_id=EOS,
                                      pad_id=PAD, top_k=2))
  logits = model_lib.make_model(CFG).apply({"params": policy}, jnp.asarray(ids), sample.prompt_positions(mask),
                                           jnp.asarray(mask))[:, -1]
  top2 = np.argsort(-np.asarray(logits), axis=-1)[:, :2]
  assert all(t in row for t, row in zip(tokens[:, 0], top2))
