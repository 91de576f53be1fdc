"""The reward-vs-KL frontier experiment: `python -m dpo_jax.experiments.frontier --workdir runs/frontier`.

Every field of configs/default.py applies (model, data, sft, optim, eval; documented there): the DPO runs use
config.optim and config.loss with each beta of frontier.betas, the SFT stage config.sft, and every evaluation
point config.eval (held-out prompts, samples per prompt, length cap, temperature). This file adds `frontier`.

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
  ))
  c.optim.update(learning_rate=3e-4)  # every trained method's peak rate (see the docstring)
  c.eval.update(samples_per_prompt=8)  # per point: 8 samples for each of the 48 held-out prompts
  if arg == "tiny":
    c.frontier.update(betas=(0.1, 0.5), eval_steps=(5, 10), unlikelihood_alphas=(1.0,), reward_model_steps=10,
                      best_of_n=(1, 2, 4))
    c.optim.update(total_steps=10, warmup_steps=2)
    c.eval.update(samples_per_prompt=1)
  return c
