"""The trainer: the seed's pipeline (SFT on preferred answers -> DPO -> evaluate), thin over pure steps.

    python -m dpo_jax.train                                   # the embedded default, no downloads
    python -m dpo_jax.train --config configs/default.py:tiny --config.loss.beta=0.05 --workdir runs/b005
    python -m dpo_jax.train --config.stage=sft                # one stage alone

Everything lands in the workdir: `<stage>/checkpoints` (orbax: state + data position), `metrics.jsonl`,
`tensorboard/`, and `summary.json` with the before/after table. Rerunning the same command resumes each
stage from its newest checkpoint (a finished stage is not retrained).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import numpy as np

from dpo_jax import evaluate, flops, lora as lora_lib, losses, model as model_lib, step
from dpo_jax.data import packing, preference, synthetic
from dpo_jax.interop import hf
from dpo_jax.interop.hf import peft as peft_io
from dpo_jax.train import checkpoint, compile_cache, config_checks, judges, loop, online, reference_update, reward_model
from dpo_jax.train import reference_cache, runtime, startup
from dpo_jax.train import workdir as workdir_lib


def export_hf(rt: runtime.Runtime, params: Any, tokenizer: Any) -> str:
  """The policy as an HF folder in <workdir>/hf_export, in the family (and config) of `hf.model_path`.

  A LoRA policy (`lora.LoraParams`) per config.lora.export: 'adapter', a PEFT folder in hf_export (with its base
  written to <workdir>/hf_base unless the base is hf.model_path itself); 'merged', base + (alpha / r) B A as an HF
  folder in hf_export; 'both', the PEFT folder in hf_export and the merged model in hf_merged."""
  hf_config = None
  if rt.config.hf.model_path:
    from transformers import AutoConfig
    hf_config = AutoConfig.from_pretrained(rt.config.hf.model_path, trust_remote_code=rt.config.hf.trust_remote_code)
  path = os.path.join(rt.workdir, "hf_export")
  save = functools.partial(hf.save_hf_checkpoint, cfg=rt.model_cfg, tokenizer=tokenizer, hf_config=hf_config)
  if not isinstance(params, lora_lib.LoraParams):
    save(params, path=path)
    print(f"exported the policy to {path} (AutoModelForCausalLM.from_pretrained loads it)")
    return path
  mode, spec = rt.config.lora.export, params.spec
  if mode in ("merged", "both"):
    merged_path = path if mode == "merged" else os.path.join(rt.workdir, "hf_merged")
    save(jax.device_get(lora_lib.merge(jax.device_get(params.base), jax.device_get(params.adapters), spec,
                                       rt.model_cfg)), path=merged_path)
    print(f"exported the merged policy (base + alpha/r * B A) to {merged_path} (AutoModelForCausalLM loads it)")
    if mode == "merged":
      return path
  base_path = rt.config.hf.model_path if base_is_hf_model(rt) else ""
  if not base_path:  # the base (an SFT result or a random init) exists nowhere as an HF folder yet
    base_path = os.path.join(rt.workdir, "hf_base")
    save(params.base, path=base_path)
  peft_io.save_peft_adapter(path, params.adapters, spec, rt.model_cfg,
                             base_model_name_or_path=os.path.abspath(base_path))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  print(f"exported the LoRA adapter to {path} (PEFT folder; base {base_path}): "
        f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_path!r}), {path!r})")
  return path


def base_is_hf_model(rt: runtime.Runtime) -> bool:
  """True when DPO started from hf.model_path's weights as they are (no SFT stage ran in this workdir)."""
  return bool(rt.config.hf.model_path) and not os.path.isdir(os.path.join(rt.workdir, "sft", "checkpoints"))


def run_sft(rt: runtime.Runtime, params: Any, train: preference.TokenizedPairs, test: preference.TokenizedPairs) -> Any:
  """Seed's pi_ref = argmax E log pi(y_w | x): maximum likelihood on (prompt, chosen). Returns the params."""
  config = rt.config
  optimizer, schedule = runtime.stage_optimizer(config, "sft")
  shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
  example = preference.make_batch(train, np.arange(config.sft.batch_size) % train.num_pairs, kind="sft")
  example.pop("row_ids")
  replicated = jax.sharding.NamedSharding(rt.mesh, jax.sharding.PartitionSpec())
  sft_step = jax.jit(
      functools.partial(step.sft_train_step, model=rt.model, optimizer=optimizer, schedule=schedule,
                        grad_accum_steps=config.optim.grad_accum_steps, shard=rt.shard, loss_cfg=config.loss),
      in_shardings=(shardings, rt.batch_shardings(example)), out_shardings=(shardings, replicated),
      donate_argnums=(0,))
  mngr = checkpoint.manager(os.path.join(rt.workdir, "sft", "checkpoints"), max_to_keep=config.max_checkpoints)
  state = loop.start_state(rt, mngr, params, optimizer, shardings, stage="sft")
  eval_fn = lambda s: sft_eval(rt, s.params, test)
  state = loop.train_loop(rt, name="sft", step_fn=sft_step, state=state, tokenized=train, kind="sft",
                     num_steps=config.sft.steps, batch_size=config.sft.batch_size, seed=config.seed, mngr=mngr,
                     eval_fn=eval_fn, eval_every=config.eval.every_steps,
                     step_flops=flops.train_step_flops(rt.model_cfg, example, reference=False))
  return state.params


def sft_eval(rt: runtime.Runtime, params: Any, test: preference.TokenizedPairs) -> dict:
  sums_fn = rt.jitted("sft_sums", lambda: jax.jit(functools.partial(step.sft_eval_sums, model=rt.model,
                                                                     loss_cfg=rt.config.loss)))
  return evaluate.sft_metrics(sums_fn, params, test, batch_size=rt.config.eval.batch_size, to_global=rt.to_global,
                              feed=rt.feed())


def dpo_eval(rt: runtime.Runtime, params: Any, reference: Any, test: preference.TokenizedPairs) -> dict:
  sums_fn = rt.jitted("dpo_sums", lambda: jax.jit(
      functools.partial(step.eval_sums, model=rt.model, loss_cfg=rt.config.loss)))
  return evaluate.preference_metrics(sums_fn, params, reference, test, batch_size=rt.config.eval.batch_size,
                                     to_global=rt.to_global, kind=runtime.dpo_kind(rt.config, test), feed=rt.feed())


def run_dpo(rt: runtime.Runtime, start: Any, train: preference.TokenizedPairs, test: preference.TokenizedPairs, *,
            reference: Any | None) -> Any:
  """DPO from `start` (pi_ref's params: the policy begins as a copy). `reference` is the frozen pi_ref used
  in every step, or None when the batches carry precomputed reference log-probs or the loss is reference-free;
  then `start` is donated to the policy (no copy) and deleted. Returns the policy."""
  config = rt.config
  if config.data.get("packing", False):  # a batch of the packed shapes: [R, L] rows, [R * P] pair slots
    empty = np.full((config.batch_size // config.data.pairs_per_row, config.data.pairs_per_row), -1)
    example = packing.make_packed_batch(train, empty,
                                        row_length=packing.row_length(config.data.pack_length, config.max_length))
    kind = "dpo"
  else:
    kind = runtime.dpo_kind(config, train)
    example = preference.make_batch(train, np.arange(config.batch_size) % train.num_pairs, kind=kind)
  example.pop("row_ids")
  ref_mode = config.ref_update.mode if "ref_update" in config else "off"
  dpo_step, optimizer, shardings, spec = runtime.dpo_train_step(
      rt, example, with_reference=reference is not None,
      moving_lora_reference=ref_mode != "off" and runtime.lora_spec(config) is not None)
  mngr = checkpoint.manager(os.path.join(rt.workdir, "dpo", "checkpoints"), max_to_keep=config.max_checkpoints)
  reference_update.check_resume(mngr, ref_mode)
  base = start if spec is not None else None  # LoRA keeps the base; otherwise nothing holds it after the state
  if spec is not None and ref_mode == "off":
    state = loop.start_state(rt, mngr, runtime.initial_adapters(rt, spec, shardings.params), optimizer, shardings,
                             donate=True)
    step_fn = lambda s, b: dpo_step(s, base, b)
  elif spec is not None:  # TR-DPO with LoRA: the moving reference is a second, frozen set of adapters on `base`
    adapters = runtime.initial_adapters(rt, spec, shardings.params)
    state = reference_update.start_state(
        mngr, runtime.abstract_state(adapters, optimizer, shardings),
        functools.partial(step.create_train_state, adapters, optimizer, shardings, donate=True),
        reference_update.zero_reference(adapters, shardings.params),  # pi_ref = the base until the first update
        check_meta=lambda meta: loop.check_resume(config, "dpo", meta, str(mngr.directory)))
    del adapters
    update = reference_update.jit_lora_update(reference_update.mixing_weight(config.ref_update),
                                              stacked=rt.model_cfg.scan_layers, adapter_shardings=shardings.params)
    step_fn = reference_update.tracking_step(lambda s, ref, b: dpo_step(s, lora_lib.LoraParams(base, ref, spec), b),
                                             update, config.ref_update.tau)
  elif ref_mode == "off":
    state = loop.start_state(rt, mngr, start, optimizer, shardings, donate=reference is None)
    step_fn = lambda s, b: dpo_step(s, reference, b)
  else:  # TR-DPO: a moving reference, checkpointed with the state; `reference` stays the frozen pi_ref for eval
    state = reference_update.start_state(
        mngr, runtime.abstract_state(start, optimizer, shardings),
        functools.partial(step.create_train_state, start, optimizer, shardings), reference,
        check_meta=lambda meta: loop.check_resume(config, "dpo", meta, str(mngr.directory)))
    step_fn = reference_update.tracking_step(dpo_step, reference_update.jit_update(
        reference_update.mixing_weight(config.ref_update), shardings.params), config.ref_update.tau)
  del start
  policy = lambda s: s.params if spec is None else lora_lib.LoraParams(base, s.params, spec)
  eval_reference = base if spec is not None and reference is None else reference
  state = loop.train_loop(rt, name="dpo", step_fn=step_fn, state=state, tokenized=train,
                     kind=kind, num_steps=config.optim.total_steps, batch_size=config.batch_size,
                     seed=config.seed + 1, mngr=mngr, eval_fn=lambda s: dpo_eval(rt, policy(s), eval_reference, test),
                     eval_every=config.eval.every_steps,
                     step_flops=flops.train_step_flops(rt.model_cfg, example, reference=reference is not None,
                                                       lora=spec))
  return policy(state)


def reference_logps(rt: runtime.Runtime, reference: Any, tokenized: preference.TokenizedPairs) -> np.ndarray:
  """log pi_ref of every pair's (chosen, rejected) responses, `[num_pairs, 2]` nats, in tokenized order."""
  score = rt.jitted("ref_logps", lambda: jax.jit(  # plain sums (LD-DPO refuses precomputed columns)
      lambda p, b: step.reference_sequence_logps(rt.model, p, b)))
  out = []
  for local in preference.eval_batches(tokenized, global_batch=rt.config.eval.batch_size,
                                       kind=runtime.dpo_kind(rt.config, tokenized)):
    mask = local.pop("row_ids") >= 0
    logps = np.asarray(jax.device_get(score(reference, rt.to_global(local)))).reshape(-1, 2)
    out.append(logps[mask])
  return np.concatenate(out).astype(np.float64)


def write_reference_logps(rt: runtime.Runtime, reference: Any, tokenized: dict, rows: dict) -> dict[str, str]:
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


def sample_eval(rt: runtime.Runtime, policy: Any, reference: Any, tokenizer: Any, test_prompts: list,
                seed_offset: int) -> dict:
  config = rt.config
  if not config.eval.num_prompts:
    return {}
  use_synthetic = config.data.reward == "synthetic" or (config.data.reward == "auto" and not config.data.train)
  reward_fn = synthetic.reward if use_synthetic else (lambda x, y: float("nan"))
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
  """The whole program; returns the summary (also written to `<workdir>/summary.json`).

  Raises `Preempted` after SIGTERM, once the current step is checkpointed (rerun to resume).
  """
  config_checks.validate_config(config, jax.device_count())
  compile_cache.enable(config.perf.get("compile_cache", "auto"))  # before the first compile
  startup.reset()
  # Writable, not full, and ours alone, before any data or compute.
  with workdir_lib.held(workdir, claimant=jax.process_index() == 0):
    return _run_stages(config, workdir)


def attach_reference_cache(rt: runtime.Runtime, start: Any, train: preference.TokenizedPairs,
                           test: preference.TokenizedPairs) -> tuple[Any, Any, Any | None]:
  """config.reference_cache for a DPO stage that would run pi_ref in every step: pi_ref's log-probs of every pair
  read from the cache, or computed with pi_ref (`start`, or hf.reference_path) and stored
  (`reference_cache.attach`). Returns (train, test, pi_ref's params), the params None when train and test now
  carry the log-probs: DPO then trains with no reference forward and nothing holds pi_ref (a separate
  hf.reference_path model is loaded once, either way). Prints one line, `reference cache: hit | miss (...) | off`."""
  reference = runtime.reference_params(rt, start)  # `start` itself unless hf.reference_path names another model
  why = reference_cache.why_off(rt.config, train)
  if why is None:
    train, test, info = reference_cache.attach(rt, reference, train, test,
                                               compute_off=reference_cache.why_not_compute(rt.config, train, test))
  else:
    info = f"off: {why}"
  print(f"reference cache: {info}")
  return train, test, None if train.reference_logps is not None else reference


def _run_stages(config: Any, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with startup.phase("load"):
    tokenizer = runtime.load_tokenizer(config.data.tokenizer, config.hf.model_path, config.hf.trust_remote_code)
  with startup.phase("tokenize"):
    train, test, rows, stats = runtime.load_pairs(config, tokenizer)
  runtime.report_data(stats)
  runtime.check_data_fits_loss(config, stats)
  loop.install_preemption_handler()
  rt = runtime.build_runtime(config, workdir, len(tokenizer))
  print(f"mesh {dict(rt.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); model "
        f"{model_lib.count_params(model_lib.abstract_params(rt.model_cfg)):,} params; stage {config.stage}")
  if config.model.get("remat") == "auto" and jax.process_index() == 0:
    print(f"remat: {runtime.resolve_remat(config, rt.model_cfg)[1]}")

  summary: dict = {"config": config.to_dict(), "data": stats}
  prompts = unique_prompts(test, tokenizer)

  # pi_ref is where DPO starts (the SFT result, or the HF checkpoint), unless hf.reference_path names another.
  # Precomputed reference log-probs, or a reference-free loss (SimPO, ORPO, ...), train with no pi_ref in memory:
  # it is loaded again afterwards, only for the evaluation (NLL, sampled KL).
  without_reference = config.data.reference_logps or not losses.needs_reference(losses.from_config(config.loss)[0])
  if config.stage in ("pipeline", "sft"):
    init = runtime.initial_params(rt)
    with startup.phase("evaluate"):
      summary["init"] = {"nll": sft_eval(rt, init, test)["loss"]}
    start = run_sft(rt, init, train, test) if config.sft.steps else init
    del init
    reference = None
    if config.stage == "pipeline" and not without_reference:
      train, test, reference = attach_reference_cache(rt, start, train, test)
      without_reference = reference is None
    if config.stage == "pipeline" and without_reference:
      policy = run_dpo(rt, start, train, test, reference=None)  # donates `start` (LoRA keeps it as the base)
      del start
      reference = policy.base if isinstance(policy, lora_lib.LoraParams) else runtime.reference_params(rt)
    elif reference is None:
      reference = runtime.reference_params(rt, start)
  elif config.stage == "precompute":
    reference = runtime.reference_params(rt)
    summary["files"] = write_reference_logps(rt, reference, {"train": train, "test": test}, rows)
    rt.writer.close()
    return summary
  elif config.stage == "reward_model":
    summary["reward_model"] = reward_model.run_stage(rt, runtime.dpo_start(rt), train, test)
    rt.writer.close()
    return summary
  elif without_reference and config.stage != "online_dpo":
    policy = run_dpo(rt, runtime.dpo_start(rt), train, test, reference=None)
    reference = policy.base if isinstance(policy, lora_lib.LoraParams) else runtime.reference_params(rt)
  else:
    start = runtime.dpo_start(rt)
    reference = None
    if config.stage == "dpo":
      train, test, reference = attach_reference_cache(rt, start, train, test)
      without_reference = reference is None
    if config.stage == "dpo" and without_reference:  # pi_ref's log-probs from the cache: as precomputed ones
      policy = run_dpo(rt, start, train, test, reference=None)  # donates `start` (LoRA keeps it as the base)
      del start
      reference = policy.base if isinstance(policy, lora_lib.LoraParams) else runtime.reference_params(rt)
    elif reference is None:
      reference = runtime.reference_params(rt, start)
  # pi_ref's held-out NLL is computed after training, with pi_theta's: before, it was most of the seconds to the
  # first DPO step of a real model (SmolLM2-135M on CPU: 60 s of 87).
  def pi_ref_nll() -> dict:
    return {"nll": sft_eval(rt, reference, test)["loss"]}

  if config.stage == "online_dpo":
    judge = judges.make(config, rt, tokenizer)
    policy, summary["online"] = online.run(rt, start, reference, unique_prompts(train, tokenizer), tokenizer,
                                           judge=judge, eval_fn=lambda p: dpo_eval(rt, p, reference, test))
    del start
  if config.stage in ("pipeline", "dpo", "online_dpo"):
    if config.stage != "online_dpo" and not without_reference:
      policy = run_dpo(rt, start, train, test, reference=reference)
      del start
    summary["pi_ref"] = pi_ref_nll()
    held_out = dpo_eval(rt, policy, reference, test)
    final_step = summary["online"]["steps"] if config.stage == "online_dpo" else config.optim.total_steps
    rt.writer.write(final_step, held_out, stage="online_dpo" if config.stage == "online_dpo" else "dpo",
                    split="test")
    summary["pi_theta"] = {"accuracy": held_out["rewards/accuracies"], "margin": held_out["rewards/margins"],
                           "dpo_loss": held_out["loss"], "nll": sft_eval(rt, policy, test)["loss"]}
    if config.loss.type == "sigmoid" and not config.loss.types:  # at pi = pi_ref every margin is 0
      summary["pi_ref"].update(dpo_loss=math.log(2.0))
    summary["pi_ref"].update(sample_eval(rt, reference, reference, tokenizer, prompts, 0))
    summary["pi_theta"].update(sample_eval(rt, policy, reference, tokenizer, prompts, 0))
    if config.hf.export:
      summary["hf_export"] = export_hf(rt, policy, tokenizer)
  else:
    summary["pi_ref"] = pi_ref_nll()
    summary["pi_ref"].update(sample_eval(rt, reference, reference, tokenizer, prompts, 0))

  rt.writer.close()
  table = format_summary(summary)
  if jax.process_index() == 0:
    print("\nheld-out evaluation (reward r* and KL on fresh temperature-1 samples for held-out prompts):")
    print(table)
    if "online" in summary:
      o = summary["online"]
      print(f"online DPO: {o['rounds']} rounds, {o['steps']} DPO steps, {o['samples']} samples judged by "
            f"{config.online.judge}, {o['pairs']} pairs ({o['tie_frac']:.1%} of prompts tied); sampling "
            f"{o['sample_seconds']:.1f} s, judging {o['judge_seconds']:.1f} s")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items()}, f, indent=1, default=float)
  return summary
