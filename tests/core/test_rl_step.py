"""The RL update steps on a tiny model: PPO starts at ratio 1, learns a toy reward and never touches pi_ref; group
advantages of equal rewards leave the policy alone; scores are read at the last real token; 1 device = 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import evaluate, model as model_lib, optim, rl_step, rollout, sample, sharding, step
from dpo_jax.train import reward_model

CFG = model_lib.ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, initializer_range=0.3)
EOS, PAD, N, GOOD = 1, 0, 6, 7  # the toy reward counts token GOOD in the response


def optimizer(lr=3e-3):
  return optim.make_optimizer(dict(learning_rate=lr, schedule="constant", warmup_steps=0, total_steps=1000,
                                   end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                   max_grad_norm=1.0))[0]


@pytest.fixture(scope="module")
def reference():
  return model_lib.init_params(CFG, jax.random.key(0))


def prompts(b, repeats=1, seed=0):
  rng = np.random.default_rng(seed)
  rows = [rng.integers(3, CFG.vocab_size, size=rng.integers(1, 5)) for _ in range(b)]
  return evaluate.left_pad_prompts([r for r in rows for _ in range(repeats)], PAD)


def toy_batch(policy, reference, ids, mask, key, kl_coef=0.05):
  ro = rollout.rollout(CFG, policy, reference, ids, mask, rng=key, max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  scores = jnp.sum((ro.response_ids == GOOD) * ro.response_mask, axis=1)
  return ro, rl_step.make_batch(ro, scores, kl_coef)


def ppo_state(reference, opt):
  return step.create_train_state({"policy": reference, "value": rl_step.scalar_head_model(reference, 32)}, opt)


def one_ppo_update(reference, opt, settings):
  """One unsharded PPO update from pi = pi_ref on 16 toy rollouts -> (batch, state, metrics)."""
  ids, mask = prompts(16)
  _, batch = toy_batch(reference, reference, ids, mask, jax.random.key(0))
  state, metrics = jax.jit(rl_step.make_ppo_step(model_lib.make_model(CFG), opt, settings))(
      ppo_state(reference, opt), batch, jax.random.key(1))
  return batch, state, metrics


def test_ppo_first_update_sees_ratio_one_and_pi_ref_stays_bit_identical(reference):
  """One epoch, one minibatch: the loss is evaluated before the update, where pi = pi_old exactly."""
  before = jax.tree.map(np.array, reference)
  _, state, metrics = one_ppo_update(reference, optimizer(), rl_step.RLSettings(epochs=1, num_minibatches=1))
  assert float(metrics["policy/approx_kl"]) < 1e-10 and float(metrics["policy/clip_frac"]) == 0.0
  assert float(metrics["rollout/kl"]) == 0.0  # pi == pi_ref at the rollout: k1 is 0 token by token
  assert int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, reference))
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params["policy"], reference)
  assert max(jax.tree.leaves(changed)) > 0


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo"])
def test_rl_updates_raise_a_toy_reward(reference, method):
  """Reward: the count of one token in the response. A few updates raise its rate well above pi_ref's."""
  opt = optimizer()
  model = model_lib.make_model(CFG)
  if method == "ppo":
    state, repeats = ppo_state(reference, opt), 1
    update = jax.jit(rl_step.make_ppo_step(model, opt, rl_step.RLSettings(epochs=2, num_minibatches=2)))
    policy_of = lambda s: s.params["policy"]
  else:
    state, repeats = step.create_train_state(reference, opt), 4
    update = jax.jit(rl_step.make_group_step(model, opt, rl_step.RLSettings(
        epochs=2, num_minibatches=2, advantage=method, group_size=4)))
    policy_of = lambda s: s.params
  ids, mask = prompts(64 // repeats, repeats)
  scores = []
  for i in range(8):
    _, batch = toy_batch(policy_of(state), reference, ids, mask, jax.random.key(i), kl_coef=0.01)
    state, metrics = update(state, batch, jax.random.key(100 + i))
    scores.append(float(metrics["rollout/score"]))
  assert np.mean(scores[-2:]) > 2 * np.mean(scores[:2]) + 0.2, f"{method}: toy reward per rollout {scores}"


def test_group_advantages_of_equal_rewards_leave_the_policy_unchanged(reference):
  """Every sample of a group scores the same and kl_coef = 0: every advantage is 0, so is every gradient."""
  opt = optimizer()
  ids, mask = prompts(8, repeats=4)
  ro = rollout.rollout(CFG, reference, reference, ids, mask, rng=jax.random.key(0), max_new_tokens=N, eos_id=EOS,
                       pad_id=PAD)
  scores = jnp.repeat(jnp.arange(8.0), 4)  # equal within each group of 4, different across groups
  for advantage in ("grpo", "rloo"):
    fn = jax.jit(rl_step.make_group_step(model_lib.make_model(CFG), opt, rl_step.RLSettings(
        epochs=1, num_minibatches=2, advantage=advantage, group_size=4)))
    state, metrics = fn(step.create_train_state(reference, opt), rl_step.make_batch(ro, scores, 0.0),
                        jax.random.key(1))
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["rollout/advantage_abs"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, state.params, reference)


def test_group_step_refuses_groups_of_one(reference):
  opt = optimizer()
  ids, mask = prompts(8)
  _, batch = toy_batch(reference, reference, ids, mask, jax.random.key(0))
  fn = rl_step.make_group_step(model_lib.make_model(CFG), opt, rl_step.RLSettings(group_size=1, num_minibatches=1))
  with pytest.raises(ValueError, match="group_size=1"):
    fn(step.create_train_state(reference, opt), batch, jax.random.key(1))


def test_k3_in_the_loss_replaces_the_kl_in_the_reward(reference):
  _, _, metrics = one_ppo_update(reference, optimizer(), rl_step.RLSettings(epochs=1, num_minibatches=1,
                                                                            kl_in_loss=True))
  assert float(metrics["policy/k3_kl"]) == 0.0  # pi == pi_ref before the update


def test_sequence_scores_read_the_last_real_token_like_the_reward_model_on_right_padded_rows(reference):
  """The rollout layout (left-padded prompt, response, padding) and the reward model's right-padded rows give
  the same r_phi."""
  rm = reward_model.init(reference, CFG.hidden_size)
  rm["head"]["kernel"] = jax.random.normal(jax.random.key(5), (CFG.hidden_size,))
  ids, mask = prompts(16)
  ro = rollout.rollout(CFG, reference, reference, ids, mask, rng=jax.random.key(2), max_new_tokens=N, eos_id=EOS,
                       pad_id=PAD)
  model = model_lib.make_model(CFG)
  ours = rl_step.sequence_scores(model, rm, ro._asdict())
  batch = sample.completions_to_batch(ids, mask, np.asarray(ro.response_ids), pad_id=PAD, eos_id=EOS,
                                      max_length=ids.shape[1] + N)
  np.testing.assert_allclose(ours, reward_model.rewards(model, rm, batch), rtol=1e-4, atol=1e-4)
  # Values: the read-out of the column that scores token j (P - 1 + j).
  values = rl_step.values(model, rm, ro, N)
  hidden = model.apply({"params": rm["backbone"]}, ro.input_ids, ro.positions, ro.attention_mask, method="hidden")
  p = ro.prompt_length
  np.testing.assert_allclose(values, hidden[:, p - 1:p - 1 + N] @ rm["head"]["kernel"], rtol=1e-5, atol=1e-5)


def test_ppo_step_on_eight_devices_matches_one_device(reference):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  shard = sharding.ShardingContext(mesh, rules)
  opt = optimizer()
  settings = rl_step.RLSettings(epochs=1, num_minibatches=2)
  batch, single_state, single = one_ppo_update(reference, opt, settings)
  shardings = rl_step.ppo_state_shardings(CFG, opt, mesh, rules)
  fn = rl_step.jit_rl_step(rl_step.make_ppo_step(model_lib.make_model(CFG, shard), opt, settings, shard),
                           state_shardings=shardings, mesh=mesh, rules=rules)
  state = step.create_train_state({"policy": reference, "value": rl_step.scalar_head_model(reference, 32)}, opt,
                                  shardings)
  state, multi = fn(state, batch, jax.random.key(1))
  for k in single:
    np.testing.assert_allclose(multi[k], single[k], rtol=2e-4, atol=2e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), state.params, single_state.params)
  assert optax.tree.norm(state.params) > 0
