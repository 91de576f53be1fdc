"""The reward-vs-KL frontier experiment: `python -m dpo_jax.experiments.frontier --workdir runs/frontier`.

Every field of configs/default.py applies (model, data, sft, optim, eval; documented there): the DPO runs use
config.optim and config.loss with each beta of frontier.betas, the SFT stage config.sft, and every evaluation
point config.eval (held-out prompts, samples per prompt, length cap, temperature). This file adds `frontier`.

The RL baselines (PPO, PPO-GT, GRPO, RLOO; dpo_jax/experiments/rlhf.py) are configured by `rl`: their learning rate
3e-4 and rollout batch 256 come from the sweep `scripts/rl_tuning.py` documented in docs/frontier.md.

Changed from configs/default.py: optim.learning_rate 3e-4 for every trained method (400 steps each; at the
trainer's 1e-3 DPO's KL passes 20 nats within 50 steps, leaving the low-KL region unmeasured), and
eval.samples_per_prompt 8 (384 samples per point from the 48 held-out prompts).

Variant `:tiny` is a seconds-long end-to-end run (the test), not an experiment.
"""

import importlib.util
import os


def _base_config(arg):
  # By path, not `from configs import default`: config files are loaded by path from any working directory.
  spec = importlib.util.spec_from_file_location("_dpo_jax_default_config_for_frontier",
                                                os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  import ml_collections

  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/frontier.py: unknown variant {arg!r}; use one of: tiny.")
  c = _base_config(arg)
  c.frontier = ml_collections.ConfigDict(dict(
      sft_data="both",  # what pi_ref is fit to: 'both' responses of every pair (the distribution the pairs were
      #                   sampled from, as the DPO paper's IMDb pi_ref) or 'chosen' (the seed's SFT on y_w).
      betas=(0.05, 0.1, 0.2, 0.5, 1.0),  # DPO KL strengths, trained at once as one vmapped sweep.
      eval_steps=(10, 25, 50, 100, 200, 300, 400),  # optimizer steps at which every trained method is sampled and scored.
      unlikelihood_alphas=(0.25, 1.0),  # unlikelihood runs: coefficient of the -log(1 - p(y_l token)) term.
      reward_model_steps=400,  # Bradley-Terry reward model updates (batches of config.batch_size pairs).
      reward_model_learning_rate=3e-4,  # its peak learning rate (schedule and AdamW settings from config.optim).
      best_of_n=(1, 2, 4, 8, 16, 32, 64),  # N of the best-of-N points; max(N) samples of pi_ref per held-out prompt.
      online_methods=("Online DPO", "Online DPO-GT", "Iterative DPO", "Iterative DPO-GT"),  # DPO on the policy's
      #                own samples (dpo_jax/train/online.py), judged by the reward model or ('-GT') by r*; () = none.
      online_betas=(0.1, 0.5),  # beta of every online / iterative DPO run, one run each.
      iterative_rounds=4,  # iterative DPO: rounds, optim.total_steps / this DPO steps each (online DPO: one per
      #                      round of batch_size prompts, 2 samples each).
      iterative_samples=8,  # iterative DPO: samples per prompt; the pair is the judge's best against its worst.
      iterative_prompts_per_round=256,  # iterative DPO: prompts sampled per round (the pool grows by <= this).
  ))
  c.rl = ml_collections.ConfigDict(dict(
      methods=("PPO", "PPO-GT", "GRPO", "RLOO"),  # RL baselines run after best-of-N (dpo_jax/experiments/rlhf.py):
      #                                             PPO on the reward model, PPO-GT on r*, GRPO and RLOO (no critic,
      #                                             reward model); () runs none.
      kl_coefs=(0.05, 0.2, 1.0),  # each method's KL knob, one run per value: the beta of seed eq. 3, in reward units.
      steps=30,  # RL steps per run: one rollout batch and its update each.
      eval_steps=(5, 10, 20, 30),  # RL steps at which the policy is sampled and scored like every other method.
      rollout_batch_size=256,  # samples per RL step (PPO: one per prompt; GRPO / RLOO: group_size per prompt).
      group_size=8,  # GRPO / RLOO: samples per prompt, whose rewards are each other's baseline (>= 2).
      epochs=4,  # passes over each rollout batch (TRL's num_ppo_epochs).
      num_minibatches=4,  # optimizer steps per pass (rollout_batch_size must divide by it).
      learning_rate=3e-4,  # peak learning rate (schedule, AdamW and clipping from config.optim).
      warmup_steps=2,  # RL steps of linear warmup.
      clip=0.2,  # PPO ratio clip eps, every method.
      value_clip=0.2,  # PPO: value predictions clipped to the rollout's values +- this.
      vf_coef=0.1,  # PPO: weight of the value loss beside the policy loss (one optimizer over both).
      gamma=1.0,  # PPO: GAE discount.
      lam=0.95,  # PPO: GAE lambda.
      whiten_advantages=True,  # PPO: advantages to mean 0, std 1 over the batch's response tokens.
      value_init="reward_model",  # PPO's value model starts as 'reward_model' (the N+ recipe) or 'zero' (pi_ref's
      #                             backbone, a zero head).
      score_norm="mean",  # scores minus pi_ref's mean score ('mean', N+ details), also / its std ('mean_std'), or
      #                     'none'; measured once per reward on rollout_batch_size samples of pi_ref.
      missing_eos_penalty=1.0,  # subtracted from the score of a response cut at the length cap without EOS.
      kl_estimator="k1",  # per-token KL in the reward: 'k1' log pi - log pi_ref (unbiased), or 'k3'.
      kl_in_loss=False,  # True: no KL in the reward; kl_coef * mean k3 KL is added to the loss (GRPO paper style).
      target_kl=0.0,  # > 0: adapt kl_coef toward this rollout KL (nats per sequence; Ziegler et al. 2019).
      kl_horizon=10000,  # the adaptive controller's horizon, in samples.
      max_new_tokens=0,  # rollout length cap; 0 = eval.max_new_tokens.
      temperature=1.0,  # rollout sampling: anything but 1.0 is refused (the KL estimate would be biased).
      top_k=0,  # rollout sampling: anything but 0 is refused, as temperature.
      top_p=1.0,  # rollout sampling: anything but 1.0 is refused, as temperature.
  ))
  c.optim.update(learning_rate=3e-4)  # every trained method's peak rate (see the docstring)
  c.eval.update(samples_per_prompt=8)  # per point: 8 samples for each of the 48 held-out prompts
  if arg == "tiny":
    c.frontier.update(betas=(0.1, 0.5), eval_steps=(5, 10), unlikelihood_alphas=(1.0,), reward_model_steps=10,
                      best_of_n=(1, 2, 4), online_methods=("Online DPO", "Iterative DPO-GT"), online_betas=(0.5,),
                      iterative_rounds=2, iterative_samples=4, iterative_prompts_per_round=16)  # both judges, shapes
    c.optim.update(total_steps=10, warmup_steps=2)
    c.eval.update(samples_per_prompt=1)
    c.rl.update(kl_coefs=(0.1,), steps=2, eval_steps=(2,), rollout_batch_size=32, group_size=4, epochs=1,
                num_minibatches=2, target_kl=1.0, kl_horizon=100)  # the adaptive controller runs too
  return c
