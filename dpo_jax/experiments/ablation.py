"""Loss-variant ablation for notebooks: one SFT (pi_ref), then DPO with each loss variant from that same pi_ref.

    from configs.default import get_config
    from dpo_jax.experiments.ablation import run_ablation
    records = run_ablation(get_config("tiny"), "runs/ablation", [{"name": "dpo", "type": "sigmoid", "beta": 0.1},
                                                                 {"name": "ipo", "type": "ipo", "beta": 0.5}],
                           eval_every=10)

Layout: `<workdir>/sft` (the shared pi_ref: `train.run_sft`'s checkpoints) and `<workdir>/<variant name>/dpo`
(each variant's checkpoints). DPO runs in chunks of `eval_every` steps, each a `train.run_dpo` call that resumes
from the previous chunk's checkpoint, with an evaluation at every chunk boundary. Rerunning in the same workdir
reuses the finished SFT but deletes and retrains each variant's `<name>/dpo` (its evaluations need every chunk).

pi_ref's log-probs of every pair come from the reference cache (`dpo_jax/train/reference_cache.py`, unless
`config.reference_cache='off'`): the first variant computes them (or finds them from an earlier run), and every
variant trains and evaluates from them, so pi_ref's forward over the data runs once for the whole grid. One line
per variant says which (`ablation <name>: reference cache hit | miss ...`).

Learning rate: the ablation trains with `optim.schedule='constant'` and `optim.warmup_steps=0`, whatever the
config says. `run_dpo` builds its schedule from `optim.total_steps`, which the chunking sets to each boundary, so
a decaying schedule would differ from the full run's; a constant one is the same in every chunk.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dpo_jax import losses
from dpo_jax.train import config_checks, pipeline, reference_cache, runtime

RECORD_FIELDS = ("variant", "step", "accuracy", "reward", "kl", "loss")
BLOCKS = ("lora", "ref_update")  # variant keys that name a config block rather than a config.loss field


def ablation_config(config: Any) -> Any:
  """An unlocked copy of `config` set up for chunked DPO (constant LR, no in-loop evals, no progress bar)."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.optim.schedule, config.optim.warmup_steps = "constant", 0
  config.eval.every_steps = 0  # the ablation evaluates at chunk boundaries itself
  config.checkpoint_every_steps = 10 ** 9  # run_dpo saves at the end of every call, i.e. at each boundary
  config.progress_bar = False
  config.stage = "pipeline"
  return config


def variant_config(config: Any, variant: dict) -> Any:
  """A copy of (ablation) `config` with `variant`'s `config.loss` overrides (every key but 'name'); the keys
  `lora` and `ref_update` take dicts of those blocks' fields instead (e.g. TR-DPO with LoRA:
  `{"lora": {"rank": 8}, "ref_update": {"mode": "soft", "tau": 30}}`)."""
  config = config.copy_and_resolve_references()
  config.unlock()
  for key, value in variant.items():
    if key == "name":
      continue
    if key == "options":
      config.loss.options.update(value)
    elif key in BLOCKS:
      config[key].update(value)
    else:
      config.loss[key] = value
  return config


def _copy(params: Any) -> Any:
  return jax.tree.map(jnp.copy, params)


def run_ablation(config: Any, workdir: str, variants: Sequence[dict], *, eval_every: int) -> list[dict]:
  """Train SFT once, then DPO from it per loss variant, evaluating every `eval_every` steps (and at step 0).

  config: a `configs/default.py` config (not modified); DPO runs `config.optim.total_steps` steps per variant.
  variants: dicts of `config.loss` overrides plus a unique "name", e.g. {"name": "ipo", "type": "ipo", "beta": 0.5}
    (`options` may be a dict of `config.loss.options` fields).
  eval_every: DPO steps between evaluations (>= 1); the last evaluation is at `total_steps`.
  Returns one record per (variant, step), in that order: {variant: name, step: DPO steps done, accuracy: held-out
  preference accuracy (fraction of test pairs with implicit-reward margin > 0; 0 at pi = pi_ref), reward: mean
  ground-truth r* of fresh temperature-1 samples (NaN when `eval.num_prompts` is 0 or data has no r*), kl: mean
  sampled KL(pi || pi_ref) in nats per sequence, loss: the variant's held-out loss}.
  """
  if eval_every < 1:
    raise ValueError(f"eval_every={eval_every} must be >= 1.")
  names = [v.get("name") for v in variants]
  if None in names or len(set(names)) != len(names):
    raise ValueError(f"every variant needs a unique 'name' (its workdir); got {names}.")
  base = ablation_config(config)
  total = base.optim.total_steps
  configs = [variant_config(base, v) for v in variants]
  for c in configs:  # every variant's mistakes before any training
    config_checks.validate_config(c, jax.device_count())

  tokenizer = runtime.load_tokenizer(base.data.tokenizer, base.hf.model_path)
  train, test, _, _ = runtime.load_pairs(base, tokenizer)
  data = {runtime.uses_unpaired_data(base): (train, test)}  # unpaired losses (KTO, BCO) train on unpaired rows
  prompts = pipeline.unique_prompts(test, tokenizer)
  os.makedirs(workdir, exist_ok=True)
  rt = runtime.build_runtime(base, workdir, len(tokenizer))
  init = runtime.initial_params(rt)
  reference = pipeline.run_sft(rt, init, train, test) if base.sft.steps else init  # pi_ref, shared
  rt.writer.close()

  boundaries = list(range(0, total, eval_every)) + [total]
  records = []
  for variant, c in zip(variants, configs):
    vdir = os.path.join(workdir, variant["name"])
    shutil.rmtree(os.path.join(vdir, "dpo"), ignore_errors=True)  # a stale run would skip the early chunks
    vrt = runtime.build_runtime(c, vdir, len(tokenizer))
    uses_reference = losses.needs_reference(losses.from_config(c.loss)[0])
    unpaired = runtime.uses_unpaired_data(c)
    if unpaired not in data:  # the grid's first unpaired variant: its rows (and their own cache entry)
      data[unpaired] = runtime.load_pairs(c, tokenizer)[:2]
    vtrain, vtest = data[unpaired]
    in_step = uses_reference
    if uses_reference:  # pi_ref's log-probs from the cache: the first variant computes them, the others read them
      why = reference_cache.why_off(c, vtrain)
      if why is None:
        vtrain, vtest, info = reference_cache.attach(vrt, reference, vtrain, vtest)
        in_step = False
      else:
        info = f"off: {why}"
    else:
      info = "not needed (a reference-free loss)"
    print(f"ablation {variant['name']}: reference cache {info}")
    policy = reference
    for done in boundaries:
      if done:
        c.optim.total_steps = done  # run_dpo trains (resuming from its checkpoint) up to this step and saves
        # A run without pi_ref in the step donates `start` to the policy: give it a copy so pi_ref survives.
        policy = pipeline.run_dpo(vrt, reference if in_step else _copy(reference), vtrain, vtest,
                                   reference=reference if in_step else None)
      # the held-out margins from the cached log-probs too (no reference forward); sampling's KL still needs pi_ref
      held_out = pipeline.dpo_eval(vrt, policy, None if uses_reference and not in_step else reference, vtest)
      sampled = pipeline.sample_eval(vrt, policy, reference, tokenizer, prompts, 0)
      record = {"variant": variant["name"], "step": done, "accuracy": float(held_out["rewards/accuracies"]),
                "reward": float(sampled.get("reward", math.nan)), "kl": float(sampled.get("kl", math.nan)),
                "loss": float(held_out["loss"])}
      vrt.writer.write(done, {k: record[k] for k in RECORD_FIELDS[2:]}, stage="ablation", split="test")
      records.append(record)
    c.optim.total_steps = total
    vrt.writer.close()
  return records


def format_records(records: Sequence[dict], *, final_only: bool = False) -> str:
  """A fixed-width text table of `run_ablation`'s records (only each variant's last step if `final_only`)."""
  if final_only:
    last = {}
    for r in records:
      last[r["variant"]] = r
    records = list(last.values())
  rows = [RECORD_FIELDS] + [(r["variant"], str(r["step"])) + tuple(f"{r[k]:.3f}" for k in RECORD_FIELDS[2:])
                            for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(RECORD_FIELDS))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
