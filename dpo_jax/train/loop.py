"""The step loop both stages run: batches from the data position on, checkpoints, logging, held-out evaluation,
preemption (SIGTERM: save, then stop), and resuming a stage only under the config that wrote its checkpoints.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from dpo_jax import flops, step
from dpo_jax.data import packing, preference
from dpo_jax.train import checkpoint, compile_cache, metrics as metrics_lib, runtime, startup


def _check_finite(name: str, step_num: int, values: dict, row_ids: np.ndarray, ckpt_dir: str) -> None:
  if not math.isfinite(values["loss"]):
    raise FloatingPointError(
        f"{name}: loss is {values['loss']} at step {step_num} on batch rows {row_ids.tolist()}. Training stopped; "
        f"the last good checkpoint in {ckpt_dir} is kept. Lower the learning rate or inspect those rows.")


class Preempted(Exception):
  """Raised after a preemption notice (SIGTERM) once the current step is checkpointed; `main` exits 0."""

  def __init__(self, stage: str, step_num: int, directory: str):
    super().__init__(f"preempted (SIGTERM): saved step {step_num} of stage {stage!r} in {directory}; rerun the same "
                     f"command to resume from it.")
    self.stage, self.step = stage, step_num


_SIGNALS = {"SIGTERM": False}


def _on_sigterm(signum, frame) -> None:
  _SIGNALS["SIGTERM"] = True  # acted on at the next step boundary: the state is consistent there


def install_preemption_handler() -> None:
  """One process: SIGTERM (the preemption notice of TPU VMs, SLURM and Kubernetes) asks the loop to save and
  stop. Several processes: jax.distributed's preemption service already catches it and agrees on a step."""
  import threading
  if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_sigterm)


def preemption_requested(step_num: int) -> bool:
  """True at the step where every process should checkpoint and stop (the same step on every host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step_num)
  return _SIGNALS["SIGTERM"]


def train_loop(rt: runtime.Runtime, *, name: str, step_fn: Callable, state: step.TrainState,
               tokenized: preference.TokenizedPairs, kind: str, num_steps: int, batch_size: int, seed: int,
               mngr: Any, eval_fn: Callable | None = None, eval_every: int = 0,
               step_flops: float | None = None) -> step.TrainState:
  """Run `step_fn(state, batch)` from `state.step` to `num_steps`, checkpointing, logging and evaluating.

  Step N is dispatched before step N - 1's metrics are read, so the host never stalls the device on a log.
  Every log line carries perf/step_time (s per step), perf/tokens_per_sec and, given `step_flops` (model FLOPs of
  one optimizer step, `flops.train_step_flops`), perf/mfu against `device_peak` of all devices; all over the
  logging window, training time only (the first step's compile, evaluations and checkpoint saves are left out).
  """
  config = rt.config
  start = int(jax.device_get(state.step))
  rt.writer.drop_after(name, start)  # what a killed run logged after its last checkpoint is logged again below
  block, blocks = rt.feed()  # this host's rows of each global batch
  if kind == "dpo" and config.data.get("packing", False):  # several pairs per row (dpo_jax/data/packing.py)
    batches = packing.iterate_packed_batches(
        tokenized, global_batch=batch_size, pairs_per_row=config.data.pairs_per_row,
        row_length=packing.row_length(config.data.pack_length, config.max_length), seed=seed, start_step=start,
        process_index=block, process_count=blocks)
  else:
    batches = preference.iterate_batches(tokenized, global_batch=batch_size, seed=seed, start_step=start, kind=kind,
                                         process_index=block, process_count=blocks)
  pending = None
  window = {"tokens": 0.0, "steps": 0, "start": time.perf_counter()}  # throughput over the logging window
  peak = math.nan
  if step_flops is not None and num_steps > start:
    peak, source = runtime.device_peak(rt)
    if jax.process_index() == 0:  # before the bar, so the bar keeps its own line
      print(f"{name}: {step_flops / 1e9:.4g} GFLOP per step (model FLOPs); peak {peak:.3g} FLOP/s per device "
            f"({source}) x {jax.device_count()} device(s)")
  bar = None
  if config.progress_bar and jax.process_index() == 0 and num_steps > start:
    from tqdm import tqdm
    bar = tqdm(total=num_steps, initial=start, desc=name, dynamic_ncols=True, file=sys.stdout, mininterval=1.0)

  def say(line: str) -> None:  # one line above the bar (or plain, without one), from process 0
    if bar is not None:
      bar.write(line)
    elif jax.process_index() == 0:
      print(line, flush=True)

  def finish(item):
    step_num, m, row_ids = item
    values = metrics_lib.to_python(m)  # blocks on this step only; the next one is already queued
    _check_finite(name, step_num, values, row_ids, mngr.directory)
    window["tokens"] += values["num_tokens"]
    window["steps"] += 1
    if bar is not None:
      bar.update(1)
    if (step_num + 1) % config.log_every_steps == 0 or step_num + 1 == num_steps:
      now = time.perf_counter()
      elapsed = max(now - window["start"], 1e-9)
      values["tokens_per_sec"] = values["perf/tokens_per_sec"] = window["tokens"] / elapsed
      values["perf/step_time"] = elapsed / max(window["steps"], 1)
      if step_flops is not None:
        values["perf/mfu"] = flops.mfu(step_flops, values["perf/step_time"], peak, jax.device_count())
      window.update(tokens=0.0, steps=0, start=now)
      rt.writer.write(step_num + 1, values, stage=name)
      line = metrics_lib.format_line(name, step_num + 1, values, ("loss", "rewards/accuracies", "rewards/margins",
                                                                  "grad_norm", "learning_rate", "tokens_per_sec",
                                                                  "perf/mfu"))
      if bar is not None:
        post = {"loss": f"{values['loss']:.4f}", "tok/s": f"{values['tokens_per_sec']:.0f}"}
        if "rewards/accuracies" in values:
          post["acc"] = f"{values['rewards/accuracies']:.2f}"
        bar.set_postfix(post, refresh=False)
      say(line)

  for step_num, local in batches:
    if step_num >= num_steps:
      break
    row_ids = local.pop("row_ids")
    first = step_num == start
    if first:
      counter, t0 = compile_cache.Counter(), time.perf_counter()
    state, m = step_fn(state, rt.to_global(local))
    if first:  # the first call compiled the step (synchronously, before dispatch): not step time
      t1 = time.perf_counter()
      jax.block_until_ready(m)
      for line in startup.first_step_lines(name, t1 - t0, time.perf_counter() - t1, counter.hits, counter.misses,
                                           compile_cache.folder()):
        say(line)
      window["start"] = time.perf_counter()
    if pending is not None:
      finish(pending)
    pending = (step_num, m, row_ids)
    done = step_num + 1
    if done % config.checkpoint_every_steps == 0 and done < num_steps:
      finish(pending)
      pending = None
      save_start = time.perf_counter()
      checkpoint.save(mngr, done, state, checkpoint_meta(config, name, done, seed))
      say(f"{name}: saved step {done} to {mngr.directory}")
      window["start"] += time.perf_counter() - save_start  # a synchronous save: not step time, like eval below
    if preemption_requested(done):
      if pending is not None:
        finish(pending)
      if mngr.latest_step() != done:
        checkpoint.save(mngr, done, state, checkpoint_meta(config, name, done, seed))
      if bar is not None:
        bar.close()
      raise Preempted(name, done, str(mngr.directory))
    if eval_fn is not None and eval_every and done % eval_every == 0 and done < num_steps:
      eval_start = time.perf_counter()
      held_out = eval_fn(state)
      rt.writer.write(done, held_out, stage=name, split="test")
      say(metrics_lib.format_line(f"{name} held-out", done, metrics_lib.to_python(held_out),
                                  ("loss", "rewards/accuracies", "rewards/margins", "perplexity")))
      window["start"] += time.perf_counter() - eval_start  # tokens/s counts training time only
  if pending is not None:
    finish(pending)
  if bar is not None:
    bar.close()
  final = int(jax.device_get(state.step))
  if mngr.latest_step() != final:
    checkpoint.save(mngr, final, state, checkpoint_meta(config, name, final, seed))
  return state


# What a resumed stage must share with the run that wrote its checkpoint: every field that changes the stage's math
# or data order. Logging, evaluation, checkpoint intervals, the mesh, exports and numerics-only model fields (remat,
# chunking, kernels, scan) never do; gradient accumulation changes only the summation order.
_RESUME_COMMON = ("seed", "max_length", "max_prompt_length", "data.train", "data.train_split", "data.tokenizer",
                  "data.on_bad_row", "model", "hf.model_path")


RESUME_FIELDS = {
    "sft": _RESUME_COMMON + ("sft", "optim.b1", "optim.b2", "optim.eps", "optim.weight_decay", "optim.max_grad_norm",
                             "optim.schedule", "optim.end_lr_ratio"),
    "dpo": _RESUME_COMMON + ("batch_size", "loss", "optim", "data.packing", "data.pairs_per_row", "data.pack_length",
                             "data.prompt_sharing", "data.reference_logps", "hf.reference_path", "lora", "ref_update"),
    "online_dpo": _RESUME_COMMON + ("batch_size", "loss", "optim", "data.prompt_sharing", "hf.reference_path", "lora",
                                    "online"),
}


RESUME_SAFE = ("optim.grad_accum_steps", "model.remat", "model.logits_chunk_size", "model.attention_impl",
               "model.weight_grad_gemm", "model.scan_layers", "lora.export", "online.judge_batch_size")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if hasattr(tree, "items"):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}  # tuples -> lists, as stored


def resume_fields(config: Any, stage: str) -> dict[str, Any]:
  """{dotted field: value} of the fields a resumed `stage` must not change (RESUME_FIELDS)."""
  fields = RESUME_FIELDS.get(stage, ())
  # A constant schedule is the same whatever the step count, so a run may be extended (or chunked: ablation.py).
  free = ("optim.total_steps", "sft.steps") if config.optim.schedule == "constant" else ()
  if stage == "online_dpo":  # its schedule spans online.rounds * online.steps_per_round instead
    free += ("optim.total_steps",)
  return {k: v for k, v in _flat(config.to_dict()).items()
          if any(k == f or k.startswith(f + ".") for f in fields) and k not in RESUME_SAFE + free}


def checkpoint_meta(config: Any, stage: str, data_step: int, seed: int) -> dict:
  """What each checkpoint carries besides the state: the stage, the data position and its resume fields."""
  return {"stage": stage, "data_step": data_step, "seed": seed, "config": resume_fields(config, stage)}


def check_resume(config: Any, stage: str, meta: dict, directory: str) -> None:
  """Refuse to resume `stage` from a checkpoint written under other values of fields that change its math or data
  order (the first steps and the rest would be two different runs), unless config.resume_with_changes; then say
  what changed. Checkpoints from before this check carry no config and are not checked."""
  stored = meta.get("config")
  if not stored:
    return
  now = resume_fields(config, stage)
  changed = {k: (stored[k], now[k]) for k in sorted(set(stored) & set(now)) if stored[k] != now[k]}
  if not changed:
    return
  listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
  if config.get("resume_with_changes", False):
    print(f"WARNING: resuming {stage} in {directory} with changed fields ({listing}), as "
          "config.resume_with_changes=True asks; its first steps ran under the old values.")
    return
  raise ValueError(f"the {stage} checkpoint in {directory} was written with other values of fields that change the "
                   f"run ({listing}). Use a new --workdir for the new settings, put the old values back, or set "
                   "--config.resume_with_changes=True to continue anyway.")


def start_state(rt: runtime.Runtime, mngr: Any, params: Any, optimizer: Any, shardings: step.TrainState, *,
                 donate: bool = False, stage: str = "dpo") -> step.TrainState:
  """The newest checkpoint of this stage if there is one (resume), else a fresh state from `params`."""
  restored = checkpoint.restore_latest(mngr, runtime.abstract_state(params, optimizer, shardings))
  if restored is None:
    return step.create_train_state(params, optimizer, shardings, donate=donate)
  state, meta = restored
  check_resume(rt.config, stage, meta, str(mngr.directory))
  print(f"{meta.get('stage', '?')}: resuming from step {int(jax.device_get(state.step))} (data position "
        f"{meta.get('data_step')}) in {mngr.directory}")
  return state
