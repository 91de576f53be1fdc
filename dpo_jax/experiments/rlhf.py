"""The RLHF baselines DPO replaces, on the embedded task: PPO, PPO-GT, GRPO and RLOO (seed eq. 3 by RL).

Each run starts from pi_ref and repeats `config.rl.steps` times:

1. Rollout (`rollout.jit_rollout`): `rl.rollout_batch_size` temperature-1 samples of the training prompts (one per
   prompt for PPO, `rl.group_size` per prompt for GRPO / RLOO), cut at EOS, with teacher-forced log-probs under pi
   and pi_ref.
2. Scores: PPO, GRPO and RLOO use the Bradley-Terry reward model r_phi (`reward_model`, trained on the preference
   labels, the seed's eq. 2); PPO-GT uses the ground truth r* (`data.synthetic.reward`) on the decoded responses.
   Scores are shifted so that pi_ref's samples (the first rollout) score 0 on average (`rl.score_norm`; the N+
   details recipe), and a response cut without EOS loses `rl.missing_eos_penalty`.
3. One update (`rl_step.ppo_step` or `rl_step.group_step`) of `rl.epochs` x `rl.num_minibatches` optimizer steps.
   Its metrics (rollout score and KL, approx-KL, clip fraction, entropy, value loss, ...) go to
   <workdir>/metrics.jsonl and TensorBoard as stage `rl_<method>_kl=<kl_coef>`, one record per RL step.

The KL coefficient is each method's knob, swept over `rl.kl_coefs` as DPO sweeps beta. The KL enters every method's
reward as k1 = log pi - log pi_ref (seed eq. 3's penalty, `rl.token_rewards`). The value model of PPO starts from
the reward model (the N+ recipe), or with `rl.value_init='zero'` from pi_ref's backbone with a zero head.
At each of `rl.eval_steps` the policy is measured exactly as every frontier method is (`frontier.Experiment.measure`:
fresh samples of the held-out prompts, r*, sequence KL).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from dpo_jax import evaluate, optim, rl, rl_step, rollout as rollout_lib, step
from dpo_jax.data import preference, synthetic

METHODS = ("PPO", "PPO-GT", "GRPO", "RLOO")
SCORE_NORMS = ("mean", "mean_std", "none")
VALUE_INITS = ("reward_model", "zero")


def check_config(config: Any) -> None:
  """Errors naming the config.rl field, before any compute."""
  r = config.rl
  unknown = [m for m in r.methods if m not in METHODS]
  if unknown:
    raise ValueError(f"config.rl.methods has {unknown}; choose from {METHODS} (() runs none).")
  if not r.methods:
    return
  rollout_lib.check_unbiased_sampling(r.temperature, r.top_k, r.top_p, where="config.rl")
  if not r.kl_coefs or any(not c >= 0 for c in r.kl_coefs):
    raise ValueError(f"config.rl.kl_coefs={tuple(r.kl_coefs)} must be a non-empty tuple of numbers >= 0.")
  if r.steps < 1:
    raise ValueError(f"config.rl.steps={r.steps} must be >= 1.")
  if not r.eval_steps or any(not 0 < s <= r.steps for s in r.eval_steps) or list(r.eval_steps) != sorted(r.eval_steps):
    raise ValueError(f"config.rl.eval_steps={tuple(r.eval_steps)} must be increasing steps in [1, config.rl.steps="
                     f"{r.steps}].")
  if r.epochs < 1 or r.num_minibatches < 1 or r.rollout_batch_size % r.num_minibatches:
    raise ValueError(f"config.rl: epochs={r.epochs} and num_minibatches={r.num_minibatches} must be >= 1, and "
                     f"rollout_batch_size={r.rollout_batch_size} must divide by num_minibatches.")
  if r.rollout_batch_size % max(jax.device_count(), 1):
    raise ValueError(f"config.rl.rollout_batch_size={r.rollout_batch_size} must divide by the {jax.device_count()} "
                     "devices the rollouts are split over.")
  if any(m in ("GRPO", "RLOO") for m in r.methods):
    if r.group_size < 2:
      raise ValueError(f"config.rl.group_size={r.group_size}: GRPO and RLOO compare each sample with the others of "
                       "its prompt; set >= 2 (or drop them from config.rl.methods).")
    if r.rollout_batch_size % r.group_size:
      raise ValueError(f"config.rl.rollout_batch_size={r.rollout_batch_size} must divide by config.rl.group_size="
                       f"{r.group_size} (whole groups per batch).")
  if "PPO" in r.methods and not config.frontier.reward_model_steps:
    raise ValueError("config.rl.methods has 'PPO', which optimises the learned reward model, but "
                     "config.frontier.reward_model_steps=0 trains none; set it > 0 or use 'PPO-GT'.")
  if r.score_norm not in SCORE_NORMS:
    raise ValueError(f"config.rl.score_norm={r.score_norm!r}; use one of {SCORE_NORMS}.")
  if r.value_init not in VALUE_INITS:
    raise ValueError(f"config.rl.value_init={r.value_init!r}; use one of {VALUE_INITS}.")
  if r.value_init == "reward_model" and "PPO-GT" in r.methods and not config.frontier.reward_model_steps:
    raise ValueError("config.rl.value_init='reward_model' needs a reward model (config.frontier.reward_model_steps "
                     "> 0); or set config.rl.value_init='zero'.")
  if r.kl_estimator not in rl.KL_ESTIMATORS:
    raise ValueError(f"config.rl.kl_estimator={r.kl_estimator!r}; use one of {rl.KL_ESTIMATORS}.")
  if r.target_kl < 0 or (r.target_kl and r.kl_horizon <= 0):
    raise ValueError(f"config.rl.target_kl={r.target_kl} must be >= 0 (0: fixed kl_coef) and kl_horizon="
                     f"{r.kl_horizon} > 0.")


def settings(config: Any, method: str) -> rl_step.RLSettings:
  r = config.rl
  return rl_step.RLSettings(epochs=r.epochs, num_minibatches=r.num_minibatches, clip=r.clip, value_clip=r.value_clip,
                            vf_coef=r.vf_coef, gamma=r.gamma, lam=r.lam, whiten_advantages=r.whiten_advantages,
                            kl_estimator=r.kl_estimator, kl_in_loss=r.kl_in_loss,
                            advantage="rloo" if method == "RLOO" else "grpo",
                            group_size=r.group_size if method in ("GRPO", "RLOO") else 1)


def rl_optimizer_config(config: Any) -> dict:
  """config.optim's AdamW with config.rl's learning rate and warmup; the schedule counts minibatch updates."""
  r = config.rl
  total = r.steps * r.epochs * r.num_minibatches
  return dict(config.optim, learning_rate=r.learning_rate, total_steps=total,
              warmup_steps=min(r.warmup_steps * r.epochs * r.num_minibatches, total))


@dataclasses.dataclass
class Scorer:
  """Scores of a rollout's responses `[B]`: the reward model on device, or r* on the decoded text."""
  score: Callable[[rollout_lib.Rollout, list], np.ndarray]
  shift: float = 0.0
  scale: float = 1.0

  def __call__(self, ro: rollout_lib.Rollout, prompt_texts: list) -> np.ndarray:
    return (np.asarray(self.score(ro, prompt_texts), np.float64) - self.shift) / self.scale


def reward_model_scorer(model: Any, rm_params: Any) -> Scorer:
  fn = jax.jit(lambda p, ro: rl_step.sequence_scores(model, p, ro._asdict()))
  return Scorer(lambda ro, texts: np.asarray(fn(rm_params, ro)))


def ground_truth_scorer(tokenizer: Any) -> Scorer:
  def score(ro: rollout_lib.Rollout, prompt_texts: list) -> np.ndarray:
    ids, mask = np.asarray(ro.response_ids), np.asarray(ro.response_mask) > 0
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t, m in zip(row, keep) if m and t != eos], skip_special_tokens=True)
             for row, keep in zip(ids, mask)]
    return synthetic.rewards(prompt_texts, texts)
  return Scorer(score)


def prompt_batches(prompts: list, per_step: int, repeats: int, seed: int, pad_id: int):
  """Endless batches of `per_step` training prompts (shuffled, every prompt once per epoch), each repeated
  `repeats` times in a row: (texts `[B]`, left-padded ids `[B, P]`, mask `[B, P]`) with B = per_step * repeats."""
  rng = np.random.default_rng(seed)
  order = []
  while True:
    while len(order) < per_step:
      order += rng.permutation(len(prompts)).tolist()
    chosen, order = order[:per_step], order[per_step:]
    chosen = [i for i in chosen for _ in range(repeats)]
    ids, mask = evaluate.left_pad_prompts([prompts[i][1] for i in chosen], pad_id)
    yield [prompts[i][0] for i in chosen], ids, mask


def rollout_fn(exp: Any) -> tuple[Callable, int]:
  """(the run's jitted, sharded rollout `fn(policy, reference, ids, mask, rng)`, the pad id its prompts use),
  compiled once per run and shared by every RL run and the score calibration."""
  rt, config = exp.rt, exp.rt.config
  pad_id, eos_id = preference.special_ids(exp.tokenizer)
  shardings = step.param_shardings(rt.model_cfg, rt.mesh, rt.rules)
  new_tokens = config.rl.max_new_tokens or config.eval.max_new_tokens
  return rt.jitted(f"rl_rollout_{new_tokens}", lambda: rollout_lib.jit_rollout(
      rt.model_cfg, rt.model, mesh=rt.mesh, rules=rt.rules, param_shardings=shardings, reference_shardings=shardings,
      max_new_tokens=new_tokens, eos_id=eos_id, pad_id=pad_id)), pad_id


def run_method(exp: Any, method: str, kl_coef: float, train_prompts: list, scorer: Scorer,
               rm_params: Any | None) -> dict:
  """One RL run from pi_ref; measures the policy at `rl.eval_steps` through `exp.measure`. Returns the last
  step's metrics (floats) and the run's seconds."""
  rt, config = exp.rt, exp.rt.config
  r = config.rl
  setting = f"kl={kl_coef:g}"
  s = settings(config, method)
  opt_config = rl_optimizer_config(config)
  optimizer, _ = optim.make_optimizer(opt_config)
  compiled = f"{s}_{sorted(opt_config.items())}"  # a step is compiled once per settings and optimizer
  sample, pad_id = rollout_fn(exp)
  if method.startswith("PPO"):
    shardings = rl_step.ppo_state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
    value = (rm_params if r.value_init == "reward_model"  # copied by create_train_state
             else rl_step.scalar_head_model(exp.reference, rt.model_cfg.hidden_size))
    state = step.create_train_state({"policy": exp.reference, "value": value}, optimizer, shardings)
    update = rt.jitted(f"rl_ppo_{compiled}", lambda: rl_step.jit_rl_step(
        rl_step.make_ppo_step(rt.model, optimizer, s, rt.shard), state_shardings=shardings, mesh=rt.mesh,
        rules=rt.rules))
    policy_of = lambda st: st.params["policy"]
  else:
    shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
    state = step.create_train_state(exp.reference, optimizer, shardings)
    update = rt.jitted(f"rl_group_{compiled}", lambda: rl_step.jit_rl_step(
        rl_step.make_group_step(rt.model, optimizer, s, rt.shard), state_shardings=shardings, mesh=rt.mesh,
        rules=rt.rules))
    policy_of = lambda st: st.params
  repeats = max(s.group_size, 1)
  batches = prompt_batches(train_prompts, r.rollout_batch_size // repeats, repeats, config.seed + 3, pad_id)
  key = jax.random.fold_in(jax.random.key(config.seed), 3000)
  coef, metrics, start = float(kl_coef), {}, time.perf_counter()
  for step_num in range(1, r.steps + 1):
    texts, ids, mask = next(batches)
    ro = sample(policy_of(state), exp.reference, ids, mask, jax.random.fold_in(key, 2 * step_num))
    scores = scorer(ro, texts)
    scores = scores - r.missing_eos_penalty * (1.0 - np.asarray(ro.ended, np.float64))
    state, metrics = update(state, rl_step.make_batch(ro, scores, coef), jax.random.fold_in(key, 2 * step_num + 1))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    rt.writer.write(step_num, metrics, stage=f"rl_{method}_{setting}")  # every update, in metrics.jsonl
    if r.target_kl:
      coef = rl.adaptive_kl_coef(coef, metrics["rollout/kl"], target=r.target_kl, horizon=r.kl_horizon,
                                 n_steps=r.rollout_batch_size)
    if step_num % max(r.steps // 10, 1) == 0 or step_num == r.steps:
      print(f"  {method:<6} {setting:<9} step {step_num:>3}: score {metrics['rollout/score']:6.3f} "
            f"KL {metrics['rollout/kl']:6.2f} approx-KL {metrics['policy/approx_kl']:.4f} clip "
            f"{metrics['policy/clip_frac']:.3f} entropy {metrics['policy/entropy']:.3f}"
            + (f" value loss {metrics['value/loss']:.4f}" if "value/loss" in metrics else ""), flush=True)
    if step_num in r.eval_steps:
      exp.measure(method, setting, step_num, policy_of(state))
  return {**metrics, "seconds": round(time.perf_counter() - start, 1)}


def calibrate(scorer: Scorer, exp: Any, train_prompts: list, norm: str) -> Scorer:
  """Fix the score shift (and scale) from pi_ref's own samples of `rl.rollout_batch_size` training prompts."""
  if norm == "none":
    return scorer
  config = exp.rt.config
  sample, pad_id = rollout_fn(exp)
  texts, ids, mask = next(prompt_batches(train_prompts, config.rl.rollout_batch_size, 1, config.seed + 4, pad_id))
  ro = sample(exp.reference, exp.reference, ids, mask, jax.random.fold_in(jax.random.key(config.seed), 3001))
  raw = np.asarray(scorer.score(ro, texts), np.float64)
  return dataclasses.replace(scorer, shift=float(raw.mean()),
                             scale=float(raw.std()) if norm == "mean_std" and raw.std() > 0 else 1.0)


def run_all(exp: Any, train_prompts: list, rm_params: Any | None) -> dict:
  """Every method of `config.rl.methods` at every `config.rl.kl_coefs`; returns {run: last metrics}."""
  rt, config = exp.rt, exp.rt.config
  r = config.rl
  summary = {}
  scorers = {}
  for method in r.methods:
    kind = "ground_truth" if method == "PPO-GT" else "reward_model"
    if kind not in scorers:
      base = (ground_truth_scorer(exp.tokenizer) if kind == "ground_truth"
              else reward_model_scorer(rt.plain_model, rm_params))
      scorers[kind] = calibrate(base, exp, train_prompts, r.score_norm)
      print(f"  {kind} scores of pi_ref: shift {scorers[kind].shift:.3f}, scale {scorers[kind].scale:.3f}", flush=True)
    for kl_coef in r.kl_coefs:
      name = f"{method} kl={kl_coef:g}"
      summary[name] = exp.timed(f"rl_{method}_{kl_coef:g}", run_method, exp, method, float(kl_coef), train_prompts,
                                scorers[kind], rm_params)
  return summary

