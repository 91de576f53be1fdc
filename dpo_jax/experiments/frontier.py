"""Expected reward against KL to pi_ref, per method: the DPO paper's figure 2 (left) on the synthetic task.

    python -m dpo_jax.experiments.frontier --workdir runs/frontier             # the README plot, 2 CPU cores
    python -m dpo_jax.experiments.frontier --config configs/frontier.py:tiny --workdir /tmp/frontier

Every method starts from the same pi_ref and is scored the same way, so the curves share their axes:

  SFT           pi_ref itself (config.sft steps of maximum likelihood; `frontier.sft_data` says on what).
  DPO           one run per beta of `frontier.betas`, all trained at once: `sweep.make_sweep_step` vmaps the
                train step over the stacked policies and computes the reference forward once per batch.
  Preferred-FT  maximum likelihood on the chosen responses only, from pi_ref (`step.sft_train_step`).
  Unlikelihood  `baselines.unlikelihood_loss`, one run per alpha of `frontier.unlikelihood_alphas`.
  Best-of-N     a Bradley-Terry reward model (seed eq. 2; `reward_model`) trained from pi_ref on the training
                labels; max(N) samples of pi_ref per prompt, the one it scores highest kept. Its KL to pi_ref is
                plotted at log N - (N - 1) / N, an upper bound (see `reward_model`).
  PPO, PPO-GT   RL on seed eq. 3 (`rlhf`): PPO with a value model on r_phi, and on the ground truth r*; one run
  GRPO, RLOO    per KL coefficient of `rl.kl_coefs`. GRPO and RLOO (no critic) on r_phi, G samples per prompt.
  Online DPO    DPO on the policy's own samples (dpo_jax/train/online.py), one run per beta of
                `frontier.online_betas`: 2 samples per prompt, labelled by r_phi ('-GT': by r*), one step per round
                of config.batch_size prompts. Iterative DPO: `frontier.iterative_rounds` rounds of
                `frontier.iterative_samples` samples per prompt, best against worst, pairs kept, the DPO steps
                spread evenly over the rounds.

The preference-trained methods all take config.optim.total_steps updates of config.batch_size pairs with
config.optim's schedule. At each step of `frontier.eval_steps` the policy draws fresh temperature-1 samples for the
held-out prompts (config.eval), scored by the ground truth: mean r*(x, y) (`data.synthetic.reward`) and mean
log pi(y|x) - log pi_ref(y|x), the sequence-level KL(pi || pi_ref) in nats (seed eq. 3's KL term, estimated
on y ~ pi). Every point uses the same sampling seed. The RL methods are measured the same way at
`rl.eval_steps` (their own steps: one rollout batch and its update each).

Writes <workdir>/frontier.csv (one row per point: method, setting, step, reward, kl, their standard errors,
mean length), frontier.json (the rows plus the reward model's held-out accuracy and each stage's seconds)
and frontier.png (reward against KL, a curve per method and setting).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax and numpy start threads: on CPU glibc keeps freed memory
  from dpo_jax.train import host_memory
  host_memory.configure_at_startup()

import csv
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

from dpo_jax import evaluate, optim, sharding, step
from dpo_jax.train import config_checks, errors, judges, loop, metrics as metrics_lib, online, pipeline, reward_model
from dpo_jax.train import runtime
from dpo_jax.train import workdir as workdir_lib
from dpo_jax.experiments import baselines, rlhf, sweep
from dpo_jax.data import preference, synthetic

FIELDS = ("method", "setting", "step", "reward", "reward_stderr", "kl", "kl_stderr", "length", "num_samples")
ONLINE_METHODS = ("Online DPO", "Online DPO-GT", "Iterative DPO", "Iterative DPO-GT")
METHODS = ("SFT", "DPO", "Preferred-FT", "Unlikelihood", "Best-of-N") + rlhf.METHODS + ONLINE_METHODS
EVAL_SEED = 2000  # folded into config.seed: the sampling key of every evaluation point


def both_responses(pairs: preference.TokenizedPairs) -> preference.TokenizedPairs:
  """Every response of every pair as an SFT row (kind="sft" batches read `chosen_ids`): chosen and rejected
  alike, i.e. samples of the distribution the pairs were drawn from."""
  return dataclasses.replace(pairs, prompt_ids=pairs.prompt_ids * 2, chosen_ids=pairs.chosen_ids + pairs.rejected_ids,
                             rejected_ids=pairs.rejected_ids + pairs.chosen_ids,
                             row_ids=np.concatenate([pairs.row_ids, pairs.row_ids]), reference_logps=None)


def check_config(config: Any) -> None:
  """Errors before any compute: the ground-truth reward must exist, and every schedule must fit."""
  f = config.frontier
  if config.data.train or config.data.reward == "none":
    raise ValueError("the frontier needs the ground-truth reward r* of the embedded synthetic task: leave "
                     f"config.data.train empty (it is {config.data.train!r}) and config.data.reward 'auto' or "
                     "'synthetic'.")
  if config.lora.rank:
    raise ValueError(f"config.lora.rank={config.lora.rank}: the frontier compares full fine-tuning methods (its DPO "
                     "sweep stacks whole policies); set --config.lora.rank=0.")
  if f.sft_data not in ("both", "chosen"):
    raise ValueError(f"config.frontier.sft_data={f.sft_data!r}; use 'both' or 'chosen'.")
  steps = config.optim.total_steps
  if not f.eval_steps or any(not 0 < s <= steps for s in f.eval_steps) or list(f.eval_steps) != sorted(f.eval_steps):
    raise ValueError(f"config.frontier.eval_steps={tuple(f.eval_steps)} must be increasing steps in [1, "
                     f"config.optim.total_steps={steps}].")
  if not f.betas or any(not b > 0 for b in f.betas):
    raise ValueError(f"config.frontier.betas={tuple(f.betas)} must be a non-empty tuple of numbers > 0.")
  if any(not 0 <= a <= 1 for a in f.unlikelihood_alphas):
    raise ValueError(f"config.frontier.unlikelihood_alphas={tuple(f.unlikelihood_alphas)} must be in [0, 1].")
  if not f.best_of_n or any(int(n) != n or n < 1 for n in f.best_of_n):
    raise ValueError(f"config.frontier.best_of_n={tuple(f.best_of_n)} must be integers >= 1.")
  if config.eval.num_prompts < 1:
    raise ValueError("config.eval.num_prompts must be >= 1: every point is measured on fresh samples.")
  rlhf.check_config(config)
  unknown = [m for m in f.online_methods if m not in ONLINE_METHODS]
  if unknown:
    raise ValueError(f"config.frontier.online_methods has {unknown}; choose from {ONLINE_METHODS} (() runs none).")
  if f.online_methods and (not f.online_betas or any(not b > 0 for b in f.online_betas)):
    raise ValueError(f"config.frontier.online_betas={tuple(f.online_betas)} must be a non-empty tuple of numbers > 0.")
  if f.iterative_rounds < 1 or steps % f.iterative_rounds:
    raise ValueError(f"config.frontier.iterative_rounds={f.iterative_rounds} must be >= 1 and divide "
                     f"config.optim.total_steps={steps} (the DPO steps are spread evenly over the rounds).")
  if any(m.endswith("DPO") for m in f.online_methods) and not f.reward_model_steps:
    raise ValueError("config.frontier.online_methods has a method judged by the reward model, but "
                     "config.frontier.reward_model_steps=0 trains none; set it > 0 or keep only the '-GT' methods.")
  shape = sharding.resolve_mesh_shape(config.mesh, jax.device_count())  # (data, fsdp, ...)
  for method in f.online_methods:
    online.check_config(online_config(config, method, f.online_betas[0]), shape[0] * shape[1])
  if importlib.util.find_spec("matplotlib") is None:  # found now, not after the training
    raise ImportError("the frontier plot needs matplotlib: pip install -e '.[experiments]'")


@dataclasses.dataclass
class Experiment:
  """What every stage shares: the runtime, the held-out prompts, pi_ref, and the points measured so far."""
  rt: runtime.Runtime
  tokenizer: Any
  prompts: list  # (text, token ids) of the held-out prompts sampled at every point
  reference: Any = None
  points: list = dataclasses.field(default_factory=list)
  seconds: dict = dataclasses.field(default_factory=dict)

  def measure(self, method: str, setting: str, step_num: int, policy: Any) -> dict:
    """One point: fresh samples of `policy`, their mean r* and KL to pi_ref (same key for every point)."""
    config = self.rt.config
    texts, ids = zip(*self.prompts)
    m = evaluate.sample_metrics(
        self.rt.model_cfg, self.rt.plain_model, policy, self.reference, list(texts), list(ids),
        tokenizer=self.tokenizer, reward_fn=synthetic.reward,
        rng=jax.random.fold_in(jax.random.key(config.seed), EVAL_SEED), max_new_tokens=config.eval.max_new_tokens,
        temperature=config.eval.temperature, batch_size=config.eval.batch_size,
        samples_per_prompt=config.eval.samples_per_prompt)
    return self.add(method, setting, step_num, m)

  def add(self, method: str, setting: str, step_num: int, m: dict) -> dict:
    row = {"method": method, "setting": setting, "step": step_num, **{k: m[k] for k in FIELDS[3:]}}
    self.points.append(row)
    print(f"  {method:<12} {setting:<11} step {step_num:>4}: reward {row['reward']:7.3f} +- {row['reward_stderr']:.3f}"
          f"  KL {row['kl']:7.3f} +- {row['kl_stderr']:.3f}  len {row['length']:.1f}", flush=True)
    return row

  def timed(self, name: str, fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    self.seconds[name] = round(time.perf_counter() - start, 1)
    return out


def _train_batches(exp: Experiment, tokenized: preference.TokenizedPairs, kind: str, seed: int) -> Iterable:
  """config.optim.total_steps global batches (this host's slice, made global), in a seeded order."""
  config = exp.rt.config
  batch_size = config.batch_size
  for step_num, local in preference.iterate_batches(tokenized, global_batch=batch_size, seed=seed, kind=kind,
                                                    process_index=jax.process_index(),
                                                    process_count=jax.process_count()):
    if step_num >= config.optim.total_steps:
      return
    local.pop("row_ids")
    yield step_num, exp.rt.to_global(local)


def _example_batch(tokenized: preference.TokenizedPairs, size: int, kind: str) -> dict:
  example = preference.make_batch(tokenized, np.arange(size) % tokenized.num_pairs, kind=kind)
  example.pop("row_ids")
  return example


def _run(exp: Experiment, step_fn: Callable, state: Any, batches: Iterable,
         at_eval: Callable[[int, Any], None]) -> Any:
  """Apply `step_fn(state, batch)` over `batches`, calling `at_eval(step, state)` at each frontier.eval_steps."""
  eval_steps = set(exp.rt.config.frontier.eval_steps)
  for step_num, batch in batches:
    state, metrics = step_fn(state, batch)
    if step_num + 1 in eval_steps:
      values = jax.device_get(metrics)
      if not np.all(np.isfinite(values["loss"])):
        raise FloatingPointError(f"frontier: non-finite loss {values['loss']} at step {step_num + 1}; lower "
                                 "config.optim.learning_rate.")
      at_eval(step_num + 1, state)
  return state


def run_dpo_sweep(exp: Experiment, train_pairs: preference.TokenizedPairs) -> None:
  """Every beta of frontier.betas at once, one vmapped program; each member is measured at the eval steps."""
  rt, config = exp.rt, exp.rt.config
  betas = tuple(float(b) for b in config.frontier.betas)
  optimizer, schedule = runtime.stage_optimizer(config, "dpo")
  shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
  sweep_step = sweep.jit_sweep_step(
      sweep.make_sweep_step(rt.model, optimizer, schedule, config.loss, betas, shard=rt.shard),
      state_shardings=shardings, reference_shardings=shardings.params,
      batch_shardings=rt.batch_shardings(_example_batch(train_pairs, config.batch_size, "dpo")), mesh=rt.mesh)
  stacked = sweep.stack_states(step.create_train_state(exp.reference, optimizer, shardings), len(betas),
                               sweep.stacked_shardings(shardings, rt.mesh))

  def at_eval(step_num, state):
    for i, beta in enumerate(betas):
      exp.measure("DPO", f"beta={beta:g}", step_num, sweep.unstack(state.params, i))

  _run(exp, lambda s, b: sweep_step(s, exp.reference, b), stacked,
       _train_batches(exp, train_pairs, "dpo", config.seed + 1), at_eval)


def run_policy_baseline(exp: Experiment, train_pairs: preference.TokenizedPairs, method: str, setting: str,
                        make_step: Callable, kind: str) -> None:
  """One baseline trained from pi_ref: `make_step(optimizer, schedule)` is its unjitted train step."""
  rt, config = exp.rt, exp.rt.config
  optimizer, schedule = runtime.stage_optimizer(config, "dpo")
  shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
  example = _example_batch(train_pairs, config.batch_size, kind)
  replicated = jax.sharding.NamedSharding(rt.mesh, jax.sharding.PartitionSpec())
  step_fn = jax.jit(make_step(optimizer, schedule), in_shardings=(shardings, rt.batch_shardings(example)),
                    out_shardings=(shardings, replicated), donate_argnums=(0,))
  state = step.create_train_state(exp.reference, optimizer, shardings)  # a copy: pi_ref keeps its buffers
  _run(exp, step_fn, state, _train_batches(exp, train_pairs, kind, config.seed + 1),
       lambda step_num, s: exp.measure(method, setting, step_num, s.params))


def train_reward_model(exp: Experiment, train_pairs: preference.TokenizedPairs,
                       test_pairs: preference.TokenizedPairs) -> tuple[Any, dict]:
  """r_phi trained from pi_ref on the training labels (seed eq. 2); returns (params, held-out metrics)."""
  rt, config = exp.rt, exp.rt.config
  f = config.frontier
  optimizer, _ = optim.make_optimizer(dict(
      config.optim, learning_rate=f.reward_model_learning_rate, total_steps=max(f.reward_model_steps, 1),
      warmup_steps=min(config.optim.warmup_steps, f.reward_model_steps)))
  log = lambda s, m: print(f"  reward model step {s}: loss {m['loss']:.4f} accuracy {m['accuracy']:.3f}", flush=True)
  rm_params, held_out = exp.timed(
      "reward_model", reward_model.train, rt.plain_model, reward_model.init(exp.reference, rt.model_cfg.hidden_size),
      train_pairs, test_pairs, optimizer=optimizer, steps=f.reward_model_steps, batch_size=config.batch_size,
      seed=config.seed + 2, eval_batch_size=config.eval.batch_size, to_global=rt.to_global,
      log=log if f.reward_model_steps >= 50 else lambda s, m: None)
  print(f"  reward model: held-out accuracy {held_out['accuracy']:.3f} (Bradley-Terry loss {held_out['loss']:.4f}) "
        f"on {held_out['pairs']} pairs", flush=True)
  return rm_params, held_out


def run_best_of_n(exp: Experiment, rm_params: Any) -> None:
  """Sample max(N) responses of pi_ref per held-out prompt, keep r_phi's best of N."""
  rt, config = exp.rt, exp.rt.config
  f = config.frontier
  start = time.perf_counter()
  m = max(int(n) for n in f.best_of_n)
  texts, ids = zip(*exp.prompts)
  score = jax.jit(functools.partial(reward_model.rewards, rt.plain_model))
  true_r, rm_r, lengths = [], [], []
  for s in evaluate.draw_samples(rt.model_cfg, exp.reference, list(ids), tokenizer=exp.tokenizer,
                                 rng=jax.random.fold_in(jax.random.key(config.seed), EVAL_SEED + 1),
                                 max_new_tokens=config.eval.max_new_tokens, temperature=config.eval.temperature,
                                 batch_size=config.eval.batch_size, samples_per_prompt=m):
    rm_r += np.asarray(score(rm_params, s.batch))[:s.n].tolist()
    true_r += [synthetic.reward(texts[(s.start + i) // m], s.texts[i]) for i in range(s.n)]
    lengths += [len(r) for r in s.responses]
  true_PxM, rm_PxM = np.reshape(true_r, (-1, m)), np.reshape(rm_r, (-1, m))
  for n in sorted(int(n) for n in f.best_of_n):
    mean, stderr = reward_model.best_of_n(true_PxM, rm_PxM, n)
    exp.add("Best-of-N", f"N={n}", 0, {"reward": mean, "reward_stderr": stderr, "kl": reward_model.best_of_n_kl(n),
                                       "kl_stderr": 0.0, "length": float(np.mean(lengths)),
                                       "num_samples": true_PxM.size // n})
  exp.seconds["best_of_n_sampling"] = round(time.perf_counter() - start, 1)


def online_config(config: Any, method: str, beta: float) -> Any:
  """config for one online run: `method` of ONLINE_METHODS at `beta` (config.online's sampling fields kept)."""
  f = config.frontier
  c = config.copy_and_resolve_references()
  iterative = method.startswith("Iterative")
  with c.unlocked():
    c.loss.beta = float(beta)
    c.online.update(judge="synthetic" if method.endswith("-GT") else "reward_model", judge_path="",
                    samples_per_prompt=f.iterative_samples if iterative else 2, keep_pairs=iterative,
                    rounds=f.iterative_rounds if iterative else config.optim.total_steps,
                    steps_per_round=config.optim.total_steps // f.iterative_rounds if iterative else 1,
                    prompts_per_round=f.iterative_prompts_per_round if iterative else config.batch_size)
  return c


def run_online(exp: Experiment, train_prompts: list, rm_params: Any | None) -> dict:
  """Every method of frontier.online_methods at every beta of frontier.online_betas, from pi_ref, measured at
  frontier.eval_steps (DPO steps, as the offline methods); returns {run: its online summary and seconds}."""
  rt, config = exp.rt, exp.rt.config
  f = config.frontier
  eval_steps = set(f.eval_steps)
  by_rm = None
  if rm_params is not None:
    scorer = rlhf.reward_model_scorer(rt.plain_model, rm_params)  # r_phi on the sampled tokens
    by_rm = judges.Judge("reward model", lambda prompts, completions, ro: scorer.score(ro, prompts))
  out = {}
  for method in f.online_methods:
    judge = judges.synthetic_judge() if method.endswith("-GT") else by_rm
    for beta in f.online_betas:
      setting = f"beta={float(beta):g}"
      run_rt = dataclasses.replace(rt, config=online_config(config, method, beta))
      measure = lambda step_num, policy, m=method, s=setting: (
          exp.measure(m, s, step_num, policy) if step_num in eval_steps else None)
      start = time.perf_counter()
      _, summary = online.run(run_rt, exp.reference, exp.reference, train_prompts, exp.tokenizer, judge=judge,
                              measure=measure, workdir_state=False, name=f"online_{method}_{setting}")
      out[f"{method} {setting}"] = {**summary, "seconds": round(time.perf_counter() - start, 1)}
      exp.seconds[f"online_{method}_{setting}"] = out[f"{method} {setting}"]["seconds"]
  return out


def write_csv(path: str, points: list[dict]) -> None:
  with open(path + ".tmp", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    for p in points:
      w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in p.items()})
  os.replace(path + ".tmp", path)


def read_csv(path: str) -> list[dict]:
  with open(path) as f:
    return [{k: (v if k in ("method", "setting") else float(v) if k not in ("step", "num_samples") else int(v))
             for k, v in row.items()} for row in csv.DictReader(f)]


COLORS = {"SFT": "black", "DPO": "tab:red", "Preferred-FT": "tab:blue", "Unlikelihood": "tab:green",
          "Best-of-N": "tab:purple", "PPO": "tab:orange", "PPO-GT": "tab:brown", "GRPO": "tab:cyan",
          "RLOO": "tab:olive", "Online DPO": "navy", "Online DPO-GT": "salmon", "Iterative DPO": "darkmagenta",
          "Iterative DPO-GT": "orchid"}
MARKERS = "os^vDPX*h<>"


def pareto_front(points: list[dict]) -> list[dict]:
  """The points no other point beats on both axes (more reward at no more KL), in increasing KL."""
  front = []
  for p in sorted(points, key=lambda p: (p["kl"], -p["reward"])):
    if not front or p["reward"] > front[-1]["reward"]:
      front.append(p)
  return front


ZOOM_KL = 13.0  # nats: the right panel's KL range, where every method but the longest RL runs lies


def plot(points: list[dict], path: str, title: str = "") -> None:
  """Reward against KL. Each method's curve is its Pareto front over all its settings and checkpoints (the
  best reward it reached at each KL budget; trained methods start at pi_ref); every measured point is drawn
  faintly under it, one marker per setting. When some point lies past `ZOOM_KL` nats, a second panel shows
  the KL range below it, where the methods crowd."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  zoom = max((p["kl"] for p in points), default=0.0) > ZOOM_KL
  fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(14, 5.6) if zoom else (8, 5.2), dpi=120, squeeze=False)
  sft = [p for p in points if p["method"] == "SFT"]
  for i, ax in enumerate(axes[0]):
    for method in dict.fromkeys(p["method"] for p in points):
      if method == "SFT":
        continue
      rows = [p for p in points if p["method"] == method]
      color = COLORS.get(method, "gray")
      settings = list(dict.fromkeys(p["setting"] for p in rows))
      for k, setting in enumerate(settings if method != "Best-of-N" else []):
        mine = [p for p in rows if p["setting"] == setting]
        ax.scatter([p["kl"] for p in mine], [p["reward"] for p in mine], s=14, color=color, alpha=0.35,
                   marker=MARKERS[k % len(MARKERS)],
                   label=f"{method} {setting}" if len(settings) > 1 and method in ("DPO", "Unlikelihood") else None)
      front = pareto_front(rows + (sft[:1] if method != "Best-of-N" else []))
      ax.plot([p["kl"] for p in front], [p["reward"] for p in front], color=color, linewidth=2, marker="o",
              markersize=4 if method != "Best-of-N" else 5, label=method, zorder=4)
    if sft:
      ax.plot([0.0], [sft[0]["reward"]], "k*", markersize=13, label="SFT (pi_ref)", zorder=5)
    ax.set_xlabel("KL(pi || pi_ref), nats per sequence (fresh samples; best-of-N: log N - (N-1)/N)")
    ax.grid(alpha=0.3)
    if i == 1:  # the zoom: KL below ZOOM_KL, rewards of the points there
      inside = [p["reward"] for p in points if p["kl"] <= ZOOM_KL]
      ax.set_xlim(-0.3, ZOOM_KL)
      ax.set_ylim(min(inside) - 0.5, max(inside) + 0.5)
      ax.set_title(f"KL below {ZOOM_KL:g} nats")
    else:
      ax.set_ylabel("mean ground-truth reward r*(x, y)")
      ax.set_title(title or "Reward vs KL on the synthetic sentiment task (curve: each method's Pareto front)",
                   fontsize=10 if zoom else None)
      ax.legend(fontsize=7, ncol=2, loc="lower right")
  fig.tight_layout()
  fig.savefig(path + ".tmp.png")
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def run(config: Any, workdir: str) -> dict:
  """The whole experiment; returns the summary also written to <workdir>/frontier.json."""
  check_config(config)
  config_checks.validate_config(config, jax.device_count())
  with workdir_lib.held(workdir, claimant=jax.process_index() == 0):
    return _run_experiment(config, workdir)


def _run_experiment(config: Any, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  tokenizer = runtime.load_tokenizer(config.data.tokenizer)
  train_pairs, test_pairs, _, stats = runtime.load_pairs(config, tokenizer)
  runtime.report_data(stats)
  rt = runtime.build_runtime(config, workdir, len(tokenizer))
  prompts = pipeline.unique_prompts(test_pairs, tokenizer)[:config.eval.num_prompts]
  exp = Experiment(rt, tokenizer, prompts)
  f = config.frontier
  print(f"frontier: {len(prompts)} held-out prompts x {config.eval.samples_per_prompt} samples per point; "
        f"{config.optim.total_steps} steps per trained method, measured at steps {tuple(f.eval_steps)}", flush=True)

  sft_pairs = both_responses(train_pairs) if f.sft_data == "both" else train_pairs
  init = runtime.initial_params(rt)
  exp.reference = exp.timed("sft", pipeline.run_sft, rt, init, sft_pairs, test_pairs) if config.sft.steps else init
  del init
  exp.measure("SFT", "", 0, exp.reference)

  exp.timed("dpo_sweep", run_dpo_sweep, exp, train_pairs)
  model, shard = rt.model, rt.shard
  exp.timed("preferred_ft", run_policy_baseline, exp, train_pairs, "Preferred-FT", "", lambda o, s: functools.partial(
      step.sft_train_step, model=model, optimizer=o, schedule=s, shard=shard), "sft")
  for alpha in f.unlikelihood_alphas:
    exp.timed(f"unlikelihood_{alpha:g}", run_policy_baseline, exp, train_pairs, "Unlikelihood", f"alpha={alpha:g}",
              lambda o, s, a=float(alpha): functools.partial(baselines.unlikelihood_train_step, model=model,
                                                             optimizer=o, schedule=s, alpha=a), "dpo")
  rm_params, held_out = train_reward_model(exp, train_pairs, test_pairs)
  run_best_of_n(exp, rm_params)
  train_prompts = pipeline.unique_prompts(train_pairs, tokenizer)
  rl_runs = rlhf.run_all(exp, train_prompts, rm_params) if config.rl.methods else {}
  online_runs = run_online(exp, train_prompts, rm_params) if f.online_methods else {}

  summary = {"points": exp.points, "reward_model": held_out, "rl": rl_runs, "online": online_runs,
             "seconds": exp.seconds,
             "prompts": len(prompts), "samples_per_point": len(prompts) * config.eval.samples_per_prompt,
             "config": config.to_dict()}
  rt.writer.close()
  if jax.process_index() == 0:
    write_csv(os.path.join(workdir, "frontier.csv"), exp.points)
    with open(os.path.join(workdir, "frontier.json"), "w") as fh:
      json.dump(summary, fh, indent=1, default=float)
    plot(exp.points, os.path.join(workdir, "frontier.png"))
    print(f"\nwrote {workdir}/frontier.csv, frontier.json, frontier.png\n\n{format_table(exp.points)}")
  return summary


def format_table(points: list[dict]) -> str:
  """Each (method, setting)'s last point (its longest-trained / largest-N one), as a markdown table."""
  last: dict[tuple[str, str], dict] = {}
  for p in points:
    last[(p["method"], p["setting"])] = p
  lines = ["| method | setting | step | reward r* | KL (nats) | length |", "|---|---|---|---|---|---|"]
  for (method, setting), p in last.items():
    lines.append(f"| {method} | {setting or '-'} | {p['step']} | {p['reward']:.2f} +- {p['reward_stderr']:.2f} | "
                 f"{p['kl']:.2f} | {p['length']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  default_config = os.path.join(runtime.CONFIG_DIR, "frontier.py")
  config_flags.DEFINE_config_file("config", default_config,
                                  "Config file[:variant]; fields are overridable as --config.a.b=value.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "runs/frontier", "Output directory: frontier.csv / .json / .png, SFT checkpoints.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    metrics_lib.quiet_library_logs()
    try:
      errors.exit_on_purpose_errors(run, flags.FLAGS.config, flags.FLAGS.workdir, passthrough=(loop.Preempted,))
    except loop.Preempted as done:  # checkpointed: a clean exit, as the trainer's
      print(done, flush=True)

  config_checks.check_override_flags((sys.argv if argv is None else argv)[1:], default_config)  # one line
  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
