"""The trainer: the seed's pipeline (SFT on preferred answers -> DPO -> evaluate), thin over pure steps.

    python -m dpo_jax.train                                   # the embedded default, no downloads
    python -m dpo_jax.train --config configs/default.py:tiny --config.loss.beta=0.05 --workdir runs/b005
    python -m dpo_jax.train --config.stage=sft                # one stage alone

Everything lands in the workdir: `<stage>/checkpoints` (orbax: state + data position), `metrics.jsonl`,
`tensorboard/`, and `summary.json` with the before/after table. Rerunning the same command resumes each
stage from its newest checkpoint (a finished stage is not retrained).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from dpo_jax import checkpoint, evaluate, logprobs as logprobs_lib, losses, metrics as metrics_lib
from dpo_jax import model as model_lib, optim, sharding, step
from dpo_jax.data import preference, schemas, synthetic

STAGES = ("pipeline", "sft", "dpo", "precompute")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# ---- config checks: every one before any compile, naming the field and the fix ----

def validate_config(config: Any, num_devices: int) -> None:
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; choose one of {STAGES}.")
  if config.data.reference_logps and config.stage != "dpo":
    raise ValueError(
        f"config.data.reference_logps=True needs config.stage='dpo' (got {config.stage!r}): the columns must come "
        f"from the reference that stage uses. Run --config.stage=precompute first, then --config.stage=dpo with "
        f"--config.data.train/test pointing at <workdir>/reference_logps/{{train,test}}.jsonl.")
  if config.stage == "precompute" and jax.process_count() > 1:
    raise ValueError("config.stage='precompute' runs on one host; it writes one file per split.")
  preference.check_lengths(config.max_length, config.max_prompt_length)
  losses.validate_loss_config(config.loss.type, beta=config.loss.beta, label_smoothing=config.loss.label_smoothing,
                              **dict(config.loss.options))
  optim.learning_rate_schedule(config.optim)
  shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(config.mesh, num_devices)))
  data_parallel = shape["data"] * shape["fsdp"]
  accum = config.optim.grad_accum_steps
  for field, size in (("batch_size", config.batch_size), ("sft.batch_size", config.sft.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if size < 1 or size % data_parallel:
      raise ValueError(
          f"config.{field}={size} is not divisible by the data-parallel size {data_parallel} (mesh data="
          f"{shape['data']} x fsdp={shape['fsdp']}). Use a multiple of {data_parallel}, or change config.mesh.")
    if field != "eval.batch_size" and (size // data_parallel) % accum:
      raise ValueError(
          f"config.{field}={size} over {data_parallel} data-parallel devices gives {size // data_parallel} per "
          f"device, not divisible by config.optim.grad_accum_steps={accum}. Change either.")
  if jax.process_count() > 1 and config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must divide over {jax.process_count()} hosts.")


# ---- data ----

def load_tokenizer(path: str) -> Any:
  from transformers import AutoTokenizer
  path = path or str(synthetic.TOKENIZER_DIR)
  if not os.path.exists(path) and (path.startswith((".", "/", "~")) or os.sep in path.strip(os.sep)):
    raise FileNotFoundError(f"config.data.tokenizer={path!r} does not exist. Point it at a local tokenizer folder "
                            f"(tokenizer.json + tokenizer_config.json) or leave it '' for the embedded one.")
  return AutoTokenizer.from_pretrained(path)


def load_pairs(config: Any, tokenizer: Any) -> tuple[preference.TokenizedPairs, preference.TokenizedPairs, dict, dict]:
  """(train, test) tokenized pairs, the raw rows {'train', 'test'} (prompts, r*, precompute), and data stats."""
  train_source = config.data.train or str(synthetic.train_path())
  test_source = config.data.test or (str(synthetic.test_path()) if not config.data.train else config.data.train)
  if config.data.train and not config.data.test and os.path.isfile(config.data.train):
    print(f"WARNING: config.data.test is not set, so held-out metrics are computed on the training file "
          f"{config.data.train}. Set --config.data.test=FILE for a real held-out estimate.")
  # Any of the public schemas: explicit prompt, conversational messages (chat template), implicit (HH).
  train_rows = schemas.load_any_rows(train_source, split=config.data.train_split)
  test_rows = schemas.load_any_rows(test_source, split=config.data.test_split)
  kw = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
            reference_logps=config.data.reference_logps)
  train, train_stats = schemas.tokenize_any(train_rows, tokenizer, source=train_source, **kw)
  test, test_stats = schemas.tokenize_any(test_rows, tokenizer, source=test_source, **kw)
  return train, test, {"train": train_rows, "test": test_rows}, {"train": train_stats, "test": test_stats}


def report_data(stats: dict) -> None:
  for split, s in stats.items():
    note = f" ({s['num_dropped_empty_response']} dropped: empty response)" if s["num_dropped_empty_response"] else ""
    print(f"data/{split}: {s['num_pairs']} pairs of {s['num_rows']} rows{note}; {s['num_truncated']} truncated")


# ---- the pieces a stage needs, built once ----

@dataclasses.dataclass
class Runtime:
  config: Any
  workdir: str
  mesh: Any
  rules: Any
  shard: sharding.ShardingContext
  model_cfg: model_lib.ModelConfig
  model: Any  # sharded (activation constraints) model for the steps
  plain_model: Any  # unconstrained, for evaluation helpers that run on whatever sharding params have
  writer: metrics_lib.MetricsWriter
  compiled: dict = dataclasses.field(default_factory=dict)  # eval functions, jitted once per run

  def jitted(self, key: str, make: Callable) -> Callable:
    if key not in self.compiled:
      self.compiled[key] = make()
    return self.compiled[key]

  def to_global(self, local: dict) -> dict:
    return sharding.global_batch(self.mesh, self.rules, local)

  def batch_shardings(self, local: dict) -> dict:
    return sharding.batch_shardings(self.mesh, self.rules, local)


def build_runtime(config: Any, workdir: str, vocab_needed: int) -> Runtime:
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  if model_cfg.vocab_size < vocab_needed:
    raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"{vocab_needed} tokens. Set --config.model.vocab_size={vocab_needed} or more.")
  shard = sharding.ShardingContext(mesh, rules)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  return Runtime(config, workdir, mesh, rules, shard, model_cfg, model_lib.make_model(model_cfg, shard),
                 model_lib.make_model(model_cfg), writer)


def stage_optimizer(config: Any, stage: str):
  cfg = dict(config.optim)
  if stage == "sft":
    cfg.update(learning_rate=config.sft.learning_rate, warmup_steps=min(config.sft.warmup_steps, config.sft.steps),
               total_steps=max(config.sft.steps, 1))
  return optim.make_optimizer(cfg)


# ---- the loop shared by both stages ----

def _check_finite(name: str, step_num: int, values: dict, row_ids: np.ndarray, ckpt_dir: str) -> None:
  if not math.isfinite(values["loss"]):
    raise FloatingPointError(
        f"{name}: loss is {values['loss']} at step {step_num} on batch rows {row_ids.tolist()}. Training stopped; "
        f"the last good checkpoint in {ckpt_dir} is kept. Lower the learning rate or inspect those rows.")


def train_loop(rt: Runtime, *, name: str, step_fn: Callable, state: step.TrainState,
               tokenized: preference.TokenizedPairs, kind: str, num_steps: int, batch_size: int, seed: int,
               mngr: Any, eval_fn: Callable | None = None, eval_every: int = 0) -> step.TrainState:
  """Run `step_fn(state, batch)` from `state.step` to `num_steps`, checkpointing, logging and evaluating.

  Step N is dispatched before step N - 1's metrics are read, so the host never stalls the device on a log.
  """
  config = rt.config
  start = int(jax.device_get(state.step))
  batches = preference.iterate_batches(tokenized, global_batch=batch_size, seed=seed, start_step=start, kind=kind,
                                       process_index=jax.process_index(), process_count=jax.process_count())
  bar = None
  if config.progress_bar and jax.process_index() == 0 and num_steps > start:
    from tqdm import tqdm
    bar = tqdm(total=num_steps, initial=start, desc=name, dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
  pending = None
  window = {"tokens": 0.0, "start": time.perf_counter()}  # throughput over the logging window

  def finish(item):
    step_num, m, row_ids = item
    values = metrics_lib.to_python(m)  # blocks on this step only; the next one is already queued
    _check_finite(name, step_num, values, row_ids, mngr.directory)
    window["tokens"] += values["num_tokens"]
    if bar is not None:
      bar.update(1)
    if (step_num + 1) % config.log_every_steps == 0 or step_num + 1 == num_steps:
      now = time.perf_counter()
      values["tokens_per_sec"] = window["tokens"] / max(now - window["start"], 1e-9)
      window.update(tokens=0.0, start=now)
      rt.writer.write(step_num + 1, values, stage=name)
      line = metrics_lib.format_line(name, step_num + 1, values, ("loss", "rewards/accuracies", "rewards/margins",
                                                                  "grad_norm", "learning_rate", "tokens_per_sec"))
      if bar is not None:
        post = {"loss": f"{values['loss']:.4f}", "tok/s": f"{values['tokens_per_sec']:.0f}"}
        if "rewards/accuracies" in values:
          post["acc"] = f"{values['rewards/accuracies']:.2f}"
        bar.set_postfix(post, refresh=False)
        bar.write(line)  # above the bar, so the bar stays on the last line
      elif jax.process_index() == 0:
        print(line)

  for step_num, local in batches:
    if step_num >= num_steps:
      break
    row_ids = local.pop("row_ids")
    state, m = step_fn(state, rt.to_global(local))
    if pending is not None:
      finish(pending)
    pending = (step_num, m, row_ids)
    done = step_num + 1
    if done % config.checkpoint_every_steps == 0 and done < num_steps:
      finish(pending)
      pending = None
      checkpoint.save(mngr, done, state, {"stage": name, "data_step": done, "seed": seed})
    if eval_fn is not None and eval_every and done % eval_every == 0 and done < num_steps:
      eval_start = time.perf_counter()
      rt.writer.write(done, eval_fn(state), stage=name, split="test")
      window["start"] += time.perf_counter() - eval_start  # tokens/s counts training time only
  if pending is not None:
    finish(pending)
  if bar is not None:
    bar.close()
  final = int(jax.device_get(state.step))
  if mngr.latest_step() != final:
    checkpoint.save(mngr, final, state, {"stage": name, "data_step": final, "seed": seed})
  return state


def _abstract_state(params: Any, optimizer: Any, shardings: step.TrainState) -> step.TrainState:
  """Shapes, dtypes and target shardings of a train state (what a checkpoint restores into)."""
  return checkpoint.abstract_like(jax.eval_shape(lambda: step.create_train_state(params, optimizer, shardings)),
                                  shardings)


def _start_state(rt: Runtime, mngr: Any, params: Any, optimizer: Any, shardings: step.TrainState) -> step.TrainState:
  """The newest checkpoint of this stage if there is one (resume), else a fresh state from `params`."""
  restored = checkpoint.restore_latest(mngr, _abstract_state(params, optimizer, shardings))
  if restored is None:
    return step.create_train_state(params, optimizer, shardings)
  state, meta = restored
  print(f"{meta.get('stage', '?')}: resuming from step {int(jax.device_get(state.step))} (data position "
        f"{meta.get('data_step')}) in {mngr.directory}")
  return state


# ---- stages ----

def run_sft(rt: Runtime, params: Any, train: preference.TokenizedPairs, test: preference.TokenizedPairs) -> Any:
  """Seed's pi_ref = argmax E log pi(y_w | x): maximum likelihood on (prompt, chosen). Returns the params."""
  config = rt.config
  optimizer, schedule = stage_optimizer(config, "sft")
  shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
  example = preference.make_batch(train, np.arange(config.sft.batch_size) % train.num_pairs, kind="sft")
  example.pop("row_ids")
  replicated = jax.sharding.NamedSharding(rt.mesh, jax.sharding.PartitionSpec())
  sft_step = jax.jit(
      functools.partial(step.sft_train_step, model=rt.model, optimizer=optimizer, schedule=schedule,
                        grad_accum_steps=config.optim.grad_accum_steps, shard=rt.shard),
      in_shardings=(shardings, rt.batch_shardings(example)), out_shardings=(shardings, replicated),
      donate_argnums=(0,))
  mngr = checkpoint.manager(os.path.join(rt.workdir, "sft", "checkpoints"), max_to_keep=config.max_checkpoints)
  state = _start_state(rt, mngr, params, optimizer, shardings)
  eval_fn = lambda s: sft_eval(rt, s.params, test)
  state = train_loop(rt, name="sft", step_fn=sft_step, state=state, tokenized=train, kind="sft",
                     num_steps=config.sft.steps, batch_size=config.sft.batch_size, seed=config.seed, mngr=mngr,
                     eval_fn=eval_fn, eval_every=config.eval.every_steps)
  return state.params


def sft_eval(rt: Runtime, params: Any, test: preference.TokenizedPairs) -> dict:
  sums_fn = rt.jitted("sft_sums", lambda: jax.jit(functools.partial(step.sft_eval_sums, model=rt.model)))
  return evaluate.sft_metrics(sums_fn, params, test, batch_size=rt.config.eval.batch_size, to_global=rt.to_global)


def dpo_eval(rt: Runtime, params: Any, reference: Any, test: preference.TokenizedPairs) -> dict:
  sums_fn = rt.jitted("dpo_sums", lambda: jax.jit(
      functools.partial(step.eval_sums, model=rt.model, loss_cfg=rt.config.loss)))
  return evaluate.preference_metrics(sums_fn, params, reference, test, batch_size=rt.config.eval.batch_size,
                                     to_global=rt.to_global)


def run_dpo(rt: Runtime, start: Any, train: preference.TokenizedPairs, test: preference.TokenizedPairs, *,
            reference: Any | None) -> Any:
  """DPO from `start` (pi_ref's params: the policy begins as a copy). `reference` is the frozen pi_ref used
  in every step, or None when the batches carry precomputed reference log-probs. Returns the policy."""
  config = rt.config
  optimizer, schedule = stage_optimizer(config, "dpo")
  shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
  example = preference.make_batch(train, np.arange(config.batch_size) % train.num_pairs, kind="dpo")
  example.pop("row_ids")
  dpo_step = step.jit_train_step(
      functools.partial(step.train_step, model=rt.model, optimizer=optimizer, schedule=schedule, loss_cfg=config.loss,
                        grad_accum_steps=config.optim.grad_accum_steps, shard=rt.shard),
      state_shardings=shardings, reference_shardings=None if reference is None else shardings.params,
      batch_shardings=rt.batch_shardings(example), mesh=rt.mesh)
  mngr = checkpoint.manager(os.path.join(rt.workdir, "dpo", "checkpoints"), max_to_keep=config.max_checkpoints)
  state = _start_state(rt, mngr, start, optimizer, shardings)
  del start  # with precomputed reference log-probs, nothing holds pi_ref's params from here on
  state = train_loop(rt, name="dpo", step_fn=lambda s, b: dpo_step(s, reference, b), state=state, tokenized=train,
                     kind="dpo", num_steps=config.optim.total_steps, batch_size=config.batch_size,
                     seed=config.seed + 1, mngr=mngr, eval_fn=lambda s: dpo_eval(rt, s.params, reference, test),
                     eval_every=config.eval.every_steps)
  return state.params


def load_sft_result(rt: Runtime, params_like: Any) -> Any:
  """The finished SFT stage's params from this workdir (for `--config.stage=dpo`)."""
  optimizer, _ = stage_optimizer(rt.config, "sft")
  shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
  directory = os.path.join(rt.workdir, "sft", "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.stage='dpo' needs the SFT result in {directory}; run --config.stage=sft (or "
                            f"the default pipeline) with this --workdir first.")
  mngr = checkpoint.manager(directory, max_to_keep=rt.config.max_checkpoints)
  restored = checkpoint.restore_latest(mngr, _abstract_state(params_like, optimizer, shardings))
  if restored is None:
    raise FileNotFoundError(f"no SFT checkpoint in {directory}; run --config.stage=sft first.")
  return restored[0].params


# ---- precomputed reference log-probs ----

def reference_logps(rt: Runtime, reference: Any, tokenized: preference.TokenizedPairs) -> np.ndarray:
  """log pi_ref of every pair's (chosen, rejected) responses, `[num_pairs, 2]` nats, in tokenized order."""
  score = rt.jitted("ref_logps", lambda: jax.jit(
      lambda p, b: logprobs_lib.sequence_logps(rt.model, p, b).logps))
  out = []
  for local in preference.eval_batches(tokenized, global_batch=rt.config.eval.batch_size, kind="dpo"):
    mask = local.pop("row_ids") >= 0
    logps = np.asarray(jax.device_get(score(reference, rt.to_global(local)))).reshape(-1, 2)
    out.append(logps[mask])
  return np.concatenate(out).astype(np.float64)


def write_reference_logps(rt: Runtime, reference: Any, tokenized: dict, rows: dict) -> dict[str, str]:
  """<workdir>/reference_logps/<split>.jsonl: every kept row with its ref_chosen_logps / ref_rejected_logps."""
  directory = os.path.join(rt.workdir, "reference_logps")
  os.makedirs(directory, exist_ok=True)
  paths = {}
  for split in ("train", "test"):
    logps = reference_logps(rt, reference, tokenized[split])
    paths[split] = os.path.join(directory, f"{split}.jsonl")
    with open(paths[split] + ".tmp", "w") as f:
      for k, row_id in enumerate(tokenized[split].row_ids):
        row = dict(rows[split][int(row_id)])
        row["ref_chosen_logps"], row["ref_rejected_logps"] = float(logps[k, 0]), float(logps[k, 1])
        f.write(json.dumps(row, default=str) + "\n")
    os.replace(paths[split] + ".tmp", paths[split])  # never a half-written file under the final name
    print(f"precompute: {len(logps)} {split} pairs -> {paths[split]}")
  print(f"use them: --config.stage=dpo --config.data.reference_logps=True --config.data.train={paths['train']} "
        f"--config.data.test={paths['test']} --workdir {rt.workdir}")
  return paths


# ---- sampling evaluation and the summary ----

def sample_eval(rt: Runtime, policy: Any, reference: Any, tokenizer: Any, test_prompts: list,
                seed_offset: int) -> dict:
  config = rt.config
  if not config.eval.num_prompts:
    return {}
  reward_fn = synthetic.reward if config.data.reward == "synthetic" else (lambda x, y: float("nan"))
  texts, ids = zip(*test_prompts[:config.eval.num_prompts])
  return evaluate.sample_metrics(
      rt.model_cfg, rt.plain_model, policy, reference, list(texts), list(ids), tokenizer=tokenizer,
      reward_fn=reward_fn, rng=jax.random.fold_in(jax.random.key(config.seed), 1000 + seed_offset),
      max_new_tokens=config.eval.max_new_tokens, temperature=config.eval.temperature,
      batch_size=config.eval.batch_size, samples_per_prompt=config.eval.samples_per_prompt)


def unique_prompts(test: preference.TokenizedPairs, tokenizer: Any) -> list[tuple[str, np.ndarray]]:
  """Distinct held-out prompts (decoded text, token ids), in data order; works for every data schema."""
  seen, out = set(), []
  for ids in test.prompt_ids:
    key = ids.tobytes()
    if key not in seen:
      seen.add(key)
      out.append((tokenizer.decode(ids.tolist(), skip_special_tokens=True), ids))
  return out


def format_summary(summary: dict) -> str:
  rows = [("policy", "held-out acc", "margin", "DPO loss", "NLL/token", "reward r*", "KL(pi||ref)", "len")]
  fmt = lambda v, p=3: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"
  for name in ("init", "pi_ref", "pi_theta"):
    r = summary.get(name)
    if r is None:
      continue
    rows.append((name, fmt(r.get("accuracy")), fmt(r.get("margin")), fmt(r.get("dpo_loss")), fmt(r.get("nll")),
                 fmt(r.get("reward")), fmt(r.get("kl")), fmt(r.get("length"), 1)))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def run(config: Any, workdir: str) -> dict:
  """The whole program; returns the summary (also written to `<workdir>/summary.json`)."""
  validate_config(config, jax.device_count())
  tokenizer = load_tokenizer(config.data.tokenizer)
  train, test, rows, stats = load_pairs(config, tokenizer)
  report_data(stats)
  os.makedirs(workdir, exist_ok=True)
  rt = build_runtime(config, workdir, len(tokenizer))
  print(f"mesh {dict(rt.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); model "
        f"{model_lib.count_params(model_lib.abstract_params(rt.model_cfg)):,} params; stage {config.stage}")

  init = model_lib.init_params(rt.model_cfg, jax.random.key(config.seed),
                               step.param_shardings(rt.model_cfg, rt.mesh, rt.rules))
  summary: dict = {"config": config.to_dict(), "data": stats}
  prompts = unique_prompts(test, tokenizer)

  if config.stage in ("pipeline", "sft"):
    summary["init"] = {"nll": sft_eval(rt, init, test)["loss"]}
    reference = run_sft(rt, init, train, test) if config.sft.steps else init
    summary["pi_ref"] = {"nll": sft_eval(rt, reference, test)["loss"]}
  elif config.stage == "precompute":
    summary["files"] = write_reference_logps(rt, load_sft_result(rt, init), {"train": train, "test": test}, rows)
    rt.writer.close()
    return summary
  elif config.data.reference_logps:  # pi_ref's params are only needed again for the sampled-KL evaluation
    policy = run_dpo(rt, load_sft_result(rt, init), train, test, reference=None)
    reference = load_sft_result(rt, init)
    summary["pi_ref"] = {"nll": sft_eval(rt, reference, test)["loss"]}
  else:
    reference = load_sft_result(rt, init)
    summary["pi_ref"] = {"nll": sft_eval(rt, reference, test)["loss"]}
  del init

  if config.stage in ("pipeline", "dpo"):
    if not config.data.reference_logps:
      policy = run_dpo(rt, reference, train, test, reference=reference)
    held_out = dpo_eval(rt, policy, reference, test)
    rt.writer.write(config.optim.total_steps, held_out, stage="dpo", split="test")
    summary["pi_theta"] = {"accuracy": held_out["rewards/accuracies"], "margin": held_out["rewards/margins"],
                           "dpo_loss": held_out["loss"], "nll": sft_eval(rt, policy, test)["loss"]}
    summary["pi_ref"].update(dpo_loss=math.log(2.0))
    summary["pi_ref"].update(sample_eval(rt, reference, reference, tokenizer, prompts, 0))
    summary["pi_theta"].update(sample_eval(rt, policy, reference, tokenizer, prompts, 0))
  else:
    summary["pi_ref"].update(sample_eval(rt, reference, reference, tokenizer, prompts, 0))

  rt.writer.close()
  table = format_summary(summary)
  if jax.process_index() == 0:
    print("\nheld-out evaluation (reward r* and KL on fresh temperature-1 samples for held-out prompts):")
    print(table)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items()}, f, indent=1, default=float)
  return summary


def main(argv=None) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "default.py"),
                                  "Config file[:variant]; fields are overridable as --config.a.b=value.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the summary go here; rerun to resume.")

  def _main(_):
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
