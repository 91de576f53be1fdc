"""A Bradley-Terry reward model (seed eq. 2), trained as its own stage, saved and loaded, and best-of-N with it.

    python -m dpo_jax.train --config.stage=reward_model --workdir runs/rm   # -> runs/rm/reward_model/

    r_phi(x, y) = w . h(x, y)[last] + b          h: the decoder's final normed hidden states, `last` = EOS
    L_R(phi)    = -E_(x, y_w, y_l) log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))                    (seed eq. 2)

As in the RLHF pipeline the seed describes (Ziegler et al. 2019, Stiennon et al. 2020), the backbone starts
from the SFT model pi_ref and a scalar linear head replaces the LM head. The score is read at the last real
token of the row (the response's EOS), which has attended to the whole prompt and response. Bradley-Terry
only sees differences, so the reward's offset is arbitrary; the head starts at zero (every r_phi = 0).

Params are a plain pytree: {"backbone": decoder params, "head": {"kernel": [D], "bias": []}}.

The trainer's `--config.stage=reward_model` (`run_stage`) trains one from pi_ref (this workdir's SFT result, else
hf.model_path) on the data's preference pairs and saves it with `save` to <workdir>/reward_model/: the params
with orbax and `reward_model.json` (the model config, the held-out accuracy). `load(path)` reads it back onto a
mesh; online DPO's `reward_model` judge (dpo_jax/train/judges.py) scores with it.

Best-of-N (the DPO paper's baseline, sec. 6): draw N responses from pi_ref, keep the one r_phi scores
highest. Its KL to pi_ref is reported as the usual analytic value log N - (N - 1) / N (Stiennon et al. 2020),
which Beirami et al. 2024 show is an upper bound on the true KL: plotted at it, best-of-N is if anything
drawn to the right of where it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax import evaluate as evaluate_lib, losses, model as model_lib, optim, rl_step, step
from dpo_jax.data import preference

META_FILE = "reward_model.json"


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


# ---- the trainer's stage, and the saved folder ----

def save(path: str, params: Any, cfg: model_lib.ModelConfig, meta: Mapping[str, Any]) -> None:
  """Write `params` (orbax, under <path>/params) and <path>/reward_model.json ({"model": cfg's fields, **meta}).
  The JSON is written last: a folder without it is an unfinished save, which `load` refuses."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  if os.path.exists(os.path.join(path, META_FILE)):
    os.remove(os.path.join(path, META_FILE))
  with ocp.StandardCheckpointer() as ckptr:  # leaving the block waits for the (async) write to finish
    ckptr.save(os.path.join(path, "params"), params, force=True)
  if jax.process_index() == 0:
    model = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "platform"}  # the loading host decides it
    with open(os.path.join(path, META_FILE + ".tmp"), "w") as f:
      json.dump({"model": model, **meta}, f, indent=1, default=float)
    os.replace(os.path.join(path, META_FILE + ".tmp"), os.path.join(path, META_FILE))


def load(path: str, *, mesh: Any = None, rules: Any = None) -> tuple[model_lib.ModelConfig, Any, dict]:
  """(ModelConfig, params, meta) of a folder written by `save` (`--config.stage=reward_model`); params restored
  straight into their shardings on `mesh` (decoder as a policy's, head replicated) when mesh and rules are given."""
  import orbax.checkpoint as ocp
  meta_file = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_file):
    raise FileNotFoundError(f"{path!r} is not a finished reward model folder (no {META_FILE}). Train one with "
                            "`python -m dpo_jax.train --config.stage=reward_model --workdir DIR` and pass "
                            "DIR/reward_model, or use an HF *ForSequenceClassification folder with judge='hf'.")
  with open(meta_file) as f:
    meta = json.load(f)
  cfg = model_lib.ModelConfig.from_dict(meta.pop("model"))
  head = {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size,), jnp.float32),
          "bias": jax.ShapeDtypeStruct((), jnp.float32)}
  like = {"backbone": model_lib.abstract_params(cfg), "head": head}  # rl_step.scalar_head_model's shapes
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = {"backbone": step.param_shardings(cfg, mesh, rules), "head": {"kernel": replicated, "bias": replicated}}
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(os.path.abspath(path), "params"), like)
  return cfg, params, meta


def run_stage(rt: Any, start: Any, train_pairs: preference.TokenizedPairs,
              test_pairs: preference.TokenizedPairs) -> dict:
  """`--config.stage=reward_model`: r_phi from pi_ref = `start` (backbone copied, zero head), trained for
  config.reward_model.steps on the training labels, saved to <workdir>/reward_model; returns its held-out metrics
  and path. Not resumed mid-way (a killed run trains again from pi_ref: it is a short stage)."""
  config = rt.config
  r = config.reward_model
  optimizer, _ = optim.make_optimizer(dict(config.optim, learning_rate=r.learning_rate, total_steps=r.steps,
                                           warmup_steps=min(r.warmup_steps, r.steps)))
  log = lambda s, m: print(f"reward_model step {s}: loss {m['loss']:.4f} accuracy {m['accuracy']:.3f}", flush=True)
  params, held_out = train(rt.plain_model, init(start, rt.model_cfg.hidden_size), train_pairs, test_pairs,
                           optimizer=optimizer, steps=r.steps, batch_size=r.batch_size, seed=config.seed + 2,
                           eval_batch_size=config.eval.batch_size, to_global=rt.to_global, log=log)
  path = os.path.join(rt.workdir, "reward_model")
  save(path, params, rt.model_cfg, {"held_out": held_out, "steps": r.steps, "tokenizer": config.data.tokenizer,
                                    "hf_model_path": config.hf.model_path})
  print(f"reward model: held-out accuracy {held_out['accuracy']:.3f} (Bradley-Terry loss {held_out['loss']:.4f}) on "
        f"{held_out['pairs']} pairs; saved to {path} (judge with --config.stage=online_dpo "
        f"--config.online.judge=reward_model --config.online.judge_path={path})", flush=True)
  return {"held_out": held_out, "path": path}


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
