"""A Bradley-Terry reward model (seed eq. 2), trained as its own stage, and best-of-N sampling with it.

    r_phi(x, y) = w . h(x, y)[last] + b          h: the decoder's final normed hidden states, `last` = EOS
    L_R(phi)    = -E_(x, y_w, y_l) log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))                    (seed eq. 2)

As in the RLHF pipeline the seed describes (Ziegler et al. 2019, Stiennon et al. 2020), the backbone starts
from the SFT model pi_ref and a scalar linear head replaces the LM head. The score is read at the last real
token of the row (the response's EOS), which has attended to the whole prompt and response. Bradley-Terry
only sees differences, so the reward's offset is arbitrary; the head starts at zero (every r_phi = 0).

Params are a plain pytree: {"backbone": decoder params, "head": {"kernel": [D], "bias": []}}.

Best-of-N (the DPO paper's baseline, sec. 6): draw N responses from pi_ref, keep the one r_phi scores
highest. Its KL to pi_ref is reported as the usual analytic value log N - (N - 1) / N (Stiennon et al. 2020),
which Beirami et al. 2024 show is an upper bound on the true KL: plotted at it, best-of-N is if anything
drawn to the right of where it is.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax import evaluate as evaluate_lib, losses, rl_step, step
from dpo_jax.data import preference


def init(backbone_params: Any, hidden_size: int) -> dict:
  """Reward-model params from a decoder's params (copied: the caller's pytree is left as it is), head at zero."""
  return rl_step.scalar_head_model(backbone_params, hidden_size)


def last_token_index(attention_mask_NxT: jax.Array) -> jax.Array:
  """`[N]` position of each right-padded row's last real token."""
  return jnp.sum(attention_mask_NxT > 0, axis=-1) - 1


def rewards(model: Any, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
  """r_phi of every row `[N]` (fp32) for a right-padded batch (`input_ids`, `positions`, `attention_mask`)."""
  return rl_step.scores_at(model, params, batch, last_token_index(batch["attention_mask"]))


def loss(params: Mapping[str, Any], batch: Mapping[str, jax.Array], *, model: Any) -> tuple[jax.Array, dict]:
  """Seed eq. (2) averaged over the real pairs of an interleaved DPO batch (`[2B, T]`, chosen rows even).

  Returns (mean loss, sums): sums of the per-pair loss, of correctly ranked pairs and of pairs (padding pairs,
  `pair_mask` 0, count for nothing).
  """
  r_chosen, r_rejected = rewards(model, params, batch).reshape(-1, 2).T
  w = batch["pair_mask"].astype(jnp.float32)
  per_pair = losses.bradley_terry_loss(r_chosen, r_rejected)
  sums = {"loss": jnp.sum(per_pair * w), "correct": jnp.sum((r_chosen > r_rejected) * w), "pairs": jnp.sum(w)}
  return sums["loss"] / jnp.maximum(sums["pairs"], 1.0), sums


def train_step(state: step.TrainState, batch: Mapping[str, jax.Array], *, model: Any,
               optimizer: optax.GradientTransformation) -> tuple[step.TrainState, dict]:
  """One reward-model update; metrics are the batch's mean loss and preference accuracy."""
  (_, sums), grads = jax.value_and_grad(functools.partial(loss, model=model), has_aux=True)(state.params, batch)
  pairs = jnp.maximum(sums["pairs"], 1.0)
  return (step.apply_gradients(state, grads, optimizer),
          {"loss": sums["loss"] / pairs, "accuracy": sums["correct"] / pairs, "grad_norm": optax.tree.norm(grads)})


def evaluate(eval_fn: Callable, params: Any, tokenized: preference.TokenizedPairs, *, batch_size: int,
             to_global: Callable = lambda b: b) -> dict[str, float]:
  """Held-out Bradley-Terry loss (nats per pair) and preference accuracy against the data's labels."""
  total = evaluate_lib.summed(lambda b: eval_fn(params, b), tokenized, "dpo", batch_size=batch_size,
                              to_global=to_global)
  return {"loss": total["loss"] / total["pairs"], "accuracy": total["correct"] / total["pairs"],
          "pairs": int(total["pairs"])}


def train(model: Any, params: Any, train_pairs: preference.TokenizedPairs, test_pairs: preference.TokenizedPairs, *,
          optimizer: optax.GradientTransformation, steps: int, batch_size: int, seed: int, eval_batch_size: int = 64,
          to_global: Callable = lambda b: b, log: Callable[[int, dict], None] = lambda s, m: None) -> tuple[Any, dict]:
  """Fit r_phi to the training labels for `steps` updates of `batch_size` pairs; returns (params, held-out
  metrics of `evaluate`). `log(step, metrics)` gets every 10th step's batch metrics."""
  state = step.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  update = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer), donate_argnums=(0,))
  batches = preference.iterate_batches(train_pairs, global_batch=batch_size, seed=seed, kind="dpo",
                                       process_index=jax.process_index(), process_count=jax.process_count())
  for step_num, local in batches:
    if step_num >= steps:
      break
    local.pop("row_ids")
    state, metrics = update(state, to_global(local))
    if (step_num + 1) % 10 == 0 or step_num + 1 == steps:
      log(step_num + 1, {k: float(v) for k, v in jax.device_get(metrics).items()})
  eval_fn = jax.jit(lambda p, b: loss(p, b, model=model)[1])
  return state.params, evaluate(eval_fn, state.params, test_pairs, batch_size=eval_batch_size, to_global=to_global)


# ---- best-of-N ----

def best_of_n_kl(n: int) -> float:
  """KL(best-of-n || pi_ref) in nats: log n - (n - 1) / n (0 for n = 1)."""
  return math.log(n) - (n - 1) / n


def best_of_n(true_rewards_PxM: np.ndarray, scores_PxM: np.ndarray, n: int) -> tuple[float, float]:
  """Mean (and its standard error) of the true reward of best-of-`n` picks.

  `[P, M]`: M samples from pi_ref for each of P prompts, their true rewards r* and their scores r_phi. The M
  samples of a prompt are split into M // n disjoint groups of n; each group's pick is the sample r_phi scores
  highest. Every group of every prompt is one draw of best-of-n.
  """
  true_rewards_PxM, scores_PxM = np.asarray(true_rewards_PxM), np.asarray(scores_PxM)
  p, m = scores_PxM.shape
  if not 1 <= n <= m:
    raise ValueError(f"best_of_n: n={n} must be in [1, {m}] (the samples drawn per prompt).")
  groups = m // n
  scores = scores_PxM[:, :groups * n].reshape(p, groups, n)
  picked = np.take_along_axis(true_rewards_PxM[:, :groups * n].reshape(p, groups, n),
                              scores.argmax(-1)[..., None], axis=-1)[..., 0].ravel()
  return float(picked.mean()), float(picked.std() / np.sqrt(picked.size))
