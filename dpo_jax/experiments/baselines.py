"""The DPO paper's non-RL baselines that train a policy on the preference pairs (sec. 6).

  Preferred-FT   maximum likelihood on the chosen responses only, starting from the SFT model:
                 `step.sft_train_step` on kind="sft" batches (whose rows are the chosen responses).
  Unlikelihood   (Welleck et al. 2019) raise the likelihood of y_w and push down each token of y_l:

      L_UL = -(1/|W|) sum_(t in W) log pi(y_t | .)  -  alpha (1/|L|) sum_(t in L) log(1 - pi(y_t | .))

                 W and L: every scored token of the batch's chosen and rejected responses, alpha in [0, 1]
                 the paper's "optional coefficient on the unlikelihood term". Unlike the seed's unweighted
                 ablation (`losses._unlikelihood`, sequence level and unbounded), log(1 - p) is bounded at
                 p -> 0, so this loss is bounded below by 0.

Best-of-N with a learned reward model is in `reward_model`; the SFT policy is pi_ref itself.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from dpo_jax import logprobs, losses, model as model_lib, step

MAX_TOKEN_LOGP = -1e-6  # log p is clamped here inside log(1 - p): at p = 1 it is -inf (an infinite gradient).


def unlikelihood_loss(params: Any, batch: Mapping[str, jax.Array], *, model: Any,
                      alpha: float) -> tuple[jax.Array, dict]:
  """L_UL over an interleaved DPO batch (`[2B, T]`, chosen rows even, rejected odd), nats per token.

  Returns (loss, sums): the chosen NLL and unlikelihood sums and their token counts.
  """
  logits_NxTxV = model_lib.apply_params(model, params, batch["input_ids"], batch["positions"], batch["attention_mask"])
  token_logps_NxS = logprobs.token_logps(logits_NxTxV, batch["input_ids"], batch["loss_mask"])
  mask_NxS = batch["loss_mask"][:, 1:].astype(jnp.float32)
  chosen_rows_N = (jnp.arange(mask_NxS.shape[0]) % 2 == 0).astype(jnp.float32)[:, None]
  chosen_mask, rejected_mask = mask_NxS * chosen_rows_N, mask_NxS * (1.0 - chosen_rows_N)
  log_one_minus_p = losses.log1mexp(jnp.minimum(token_logps_NxS, MAX_TOKEN_LOGP))
  sums = {"chosen_nll": -jnp.sum(token_logps_NxS * chosen_mask), "chosen_tokens": jnp.sum(chosen_mask),
          "unlikelihood": -jnp.sum(log_one_minus_p * rejected_mask), "rejected_tokens": jnp.sum(rejected_mask)}
  nll = sums["chosen_nll"] / jnp.maximum(sums["chosen_tokens"], 1.0)
  ul = sums["unlikelihood"] / jnp.maximum(sums["rejected_tokens"], 1.0)
  return nll + alpha * ul, sums


def unlikelihood_train_step(state: step.TrainState, batch: Mapping[str, jax.Array], *, model: Any,
                            optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                            alpha: float) -> tuple[step.TrainState, dict]:
  """One update on L_UL; metrics: loss, chosen NLL and unlikelihood per token, grad norm, learning rate."""
  (value, sums), grads = jax.value_and_grad(functools.partial(unlikelihood_loss, model=model, alpha=alpha),
                                            has_aux=True)(state.params, batch)
  metrics = {"loss": value, "chosen_nll": sums["chosen_nll"] / jnp.maximum(sums["chosen_tokens"], 1.0),
             "unlikelihood": sums["unlikelihood"] / jnp.maximum(sums["rejected_tokens"], 1.0),
             "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
  return step.apply_gradients(state, grads, optimizer), metrics
