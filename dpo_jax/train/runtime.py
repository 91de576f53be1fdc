"""What the stages share, built once per run: the tokenizer and tokenized pairs, the mesh and models (`Runtime`),
the params a stage starts from (a random init, HF checkpoints, this workdir's SFT result) and each stage's optimizer.

Used by the pipeline and by `--dry_run`, which sizes the same model and optimizer without running a step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax

from dpo_jax import flops, lora as lora_lib, losses, model as model_lib, moe, optim, sharding, step
from dpo_jax.data import preference, schemas, synthetic, unpaired
from dpo_jax.interop import hf
from dpo_jax.interop.hf import peft as peft_io
from dpo_jax.train import checkpoint, host_memory, metrics as metrics_lib, startup


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def lora_spec(config: Any) -> lora_lib.LoraSpec | None:
  """config.lora as a LoraSpec, or None for full fine-tuning (rank 0, or a config without a lora section)."""
  return lora_lib.spec_from_config(config.get("lora"))


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


def uses_unpaired_data(config: Any) -> bool:
  """Whether config.loss (its type, or any of its types) is an unpaired loss (KTO, APO-zero unpaired, BCO), which
  trains on unpaired units (`losses.is_unpaired`)."""
  types = tuple(config.loss.get("types", None) or ()) or (config.loss.type,)
  return any(losses.is_unpaired(t) for t in types)


def _loss_weight(config: Any, name: str) -> tuple[float, str]:
  """(config.loss.<name>, else config.loss.options.<name>, else 1.0; the field's path) of a KTO class weight."""
  value = config.loss.get(name, None)
  if value is not None:
    return float(value), "config.loss"
  options = config.loss.get("options", None)
  value = options.get(name, None) if options is not None else None
  return (1.0, "config.loss") if value is None else (float(value), "config.loss.options")


def load_pairs(config: Any, tokenizer: Any) -> tuple[preference.TokenizedPairs, preference.TokenizedPairs, dict, dict]:
  """(train, test) tokenized pairs, the raw rows {'train', 'test'} (prompts, r*, precompute), and data stats.

  With an unpaired loss (`uses_unpaired_data`: KTO, BCO, ...) the train split is unpaired units with KL partners
  seeded by config.seed (`unpaired.tokenize_unpaired`): unpaired rows as they are, pairs split in two as TRL's
  unpair_preference_dataset. The test split stays pairs when its rows are pairs (held-out preference accuracy is
  measured on pairs) and is unpaired units only when its rows are. The train stats then carry the desirable /
  undesirable counts and the KTO weight balance (`unpaired.weight_balance`, its warning '' when in range).
  Unpaired rows with a pair loss are a ValueError naming config.loss.type.
  """
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
  unpaired_loss = uses_unpaired_data(config)
  is_unpaired = {source: schemas.detect_schema(rows, source, on_bad_row) == "unpaired"  # a second, cheap pass
                 for source, rows in ((train_source, train_rows), (test_source, test_rows))}
  for source, found in is_unpaired.items():
    if found and not unpaired_loss:
      raise ValueError(f"{source} holds unpaired rows (prompt, completion, label) but config.loss.type="
                       f"{config.loss.type!r} compares pairs; set --config.loss.type=kto (or apo_zero_unpaired, "
                       "bco), or give (prompt, chosen, rejected) pairs.")

  def tokenize(rows, source, as_units):
    if as_units:
      return unpaired.tokenize_unpaired(rows, tokenizer, source=source, seed=config.seed, **kw)
    return schemas.tokenize_any(rows, tokenizer, source=source, **kw)

  train, train_stats = tokenize(train_rows, train_source, unpaired_loss)
  test, test_stats = tokenize(test_rows, test_source, unpaired_loss and is_unpaired[test_source])
  if unpaired_loss:
    (d_weight, field), (u_weight, _) = (_loss_weight(config, f"{side}desirable_weight") for side in ("", "un"))
    ratio, warning = unpaired.weight_balance(train_stats["num_desirable"], train_stats["num_undesirable"], d_weight,
                                             u_weight, field)
    train_stats.update(weight_ratio=ratio, weight_warning=warning)
  for source, s in ((train_source, train_stats), (test_source, test_stats)):
    if s["num_pairs"] == 0:
      raise ValueError(f"{source}: no usable pairs in {s['num_rows']} rows (skipped: {s.get('skipped', {})}, "
                       f"dropped for an empty response: {s['num_dropped_empty_response']}); fix the data.")
  return train, test, {"train": train_rows, "test": test_rows}, {"train": train_stats, "test": test_stats}


def check_data_fits_loss(config: Any, stats: dict) -> None:
  """Ranked data (K responses per prompt) trains with Plackett-Luce, and Plackett-Luce needs ranked data; unpaired
  units need an unpaired loss, and are not written out by the precompute stage."""
  unpaired_splits = [split for split, s in stats.items() if s["schema"] == "unpaired"]
  if unpaired_splits and not uses_unpaired_data(config):
    raise ValueError(f"config.data: the {unpaired_splits} split(s) are unpaired (prompt, completion, label) but "
                     f"config.loss.type={config.loss.type!r} compares pairs; set --config.loss.type=kto.")
  if "train" in unpaired_splits and config.stage == "precompute":
    raise ValueError("config.stage='precompute' writes pair columns (ref_chosen_logps, ref_rejected_logps); unpaired "
                     "losses run pi_ref in the step (--config.data.reference_logps=False).")
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
  data.on_bad_row='skip'), and pairs truncated; nothing is dropped without being counted here. Unpaired splits
  say so, with their desirable / undesirable counts, and the KTO weight warning follows on its own line."""
  for split, s in stats.items():
    note = f" ({s['num_dropped_empty_response']} dropped: empty response)" if s["num_dropped_empty_response"] else ""
    skipped = s.get("skipped") or {}
    if skipped:
      note += (f" ({sum(skipped.values())} skipped: "
               + ", ".join(f"{n} {reason}" for reason, n in skipped.items()) + ")")
    if s.get("schema") == "unpaired":
      split_from = "" if s["source_schema"] == "unpaired" else f", split from {s['source_schema']} pairs"
      print(f"data/{split}: {s['num_pairs']} unpaired rows ({s['num_desirable']} desirable, {s['num_undesirable']} "
            f"undesirable{split_from}) of {s['num_rows']} rows{note}; {s['num_truncated']} truncated")
      if s.get("weight_warning"):
        print(s["weight_warning"])
      continue
    print(f"data/{split}: {s['num_pairs']} pairs of {s['num_rows']} rows{note}; {s['num_truncated']} truncated")


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

  def feed(self) -> tuple[int, int]:
    """(block, blocks) of every global batch this process reads (`sharding.batch_feed`)."""
    return sharding.batch_feed(self.mesh, self.rules)

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


# What config.model still decides when the architecture comes from an HF checkpoint.
NUMERICS_FIELDS = ("param_dtype", "compute_dtype", "matmul_precision", "remat", "scan_layers", "logits_chunk_size",
                   "weight_grad_gemm", "attention_impl", "context_parallel", "context_load_balance", "moe_impl",
                   "moe_capacity_factor")


def model_config(config: Any, platform: str = "", devices: int | None = None,
                 device_bytes: float | None = None) -> model_lib.ModelConfig:
  """The model of `config` (`config.model`, or the checkpoint `hf.model_path` with config.model's numerics), built
  for `platform` ('' = where this process runs; 'tpu' for a TPU topology's dry run from a CPU host).

  `model.remat='auto'` is resolved here (`resolve_remat`) for `devices` devices of `device_bytes` each (default:
  this process's devices, `device_memory`)."""
  remat = config.model.get("remat", "none")
  fields = {**config.model, "remat": "none" if remat == "auto" else remat}
  if not config.hf.model_path:
    cfg = model_lib.ModelConfig.from_dict({**fields, "platform": platform})
  else:
    from transformers import AutoConfig
    numerics = {f: fields[f] for f in NUMERICS_FIELDS}
    numerics["platform"] = platform
    cfg = hf.model_config_from_hf(
        AutoConfig.from_pretrained(config.hf.model_path, trust_remote_code=config.hf.trust_remote_code), **numerics)
  if remat == "auto":
    cfg = dataclasses.replace(cfg, remat=resolve_remat(config, cfg, devices, device_bytes)[0])
  return cfg


def device_memory(config: Any) -> tuple[float, str]:
  """(bytes of one device, where the number comes from): config.perf.device_memory_gib when > 0, else the device
  allocator's limit (GPU / TPU), else on CPU the available RAM (/proc/meminfo) shared by the local devices."""
  perf = config.get("perf")
  override = float(perf.get("device_memory_gib", 0.0)) if perf is not None else 0.0
  if override > 0:
    return override * 2 ** 30, "config.perf.device_memory_gib"
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind}'s memory"
  return (host_memory.available_ram() / jax.local_device_count(),
          f"available RAM / {jax.local_device_count()} local device(s)")


def resolve_remat(config: Any, cfg: model_lib.ModelConfig, devices: int | None = None,
                  device_bytes: float | None = None) -> tuple[str, str]:
  """(remat, why) for `model.remat='auto'`: 'none' when the DPO step's saved activations fit in half of what one
  device has left after the params, AdamW's moments, the gradients and pi_ref; else 'full' (each layer's input
  saved, the layer recomputed in the backward: ~1/3 more FLOPs).

  Saved activations are estimated per token and layer as (6 D + 2 K hd + 4 I) values in the compute dtype (the
  norms' inputs and outputs, q / k / v, the attention output, the MLP's gate, up, activation and product), for the
  2 x batch_size x max_length tokens of a step split over the devices that split the batch (and the sequence). An
  MoE layer's MLP instead saves R (3 D + 4 Fe) values per token (`moe_rows_per_token`: the token's R expert rows,
  their input, output and exchange buffers of width D and the gate, up, activation and product of width Fe). The
  experts' weights are split over expert x fsdp x tensor, the other params over fsdp x tensor.
  """
  devices = devices or jax.device_count()
  if device_bytes is None:
    device_bytes, source = device_memory(config)
  else:
    source = "given"
  try:
    shape = sharding.resolve_mesh_shape(config.mesh, devices)
  except ValueError:  # a mesh for other devices (validated where the mesh is built): all of them split the batch
    shape = tuple(devices if a == "data" else 1 for a in sharding.MESH_AXES)
  data, fsdp, expert, sequence, tensor = (shape[sharding.MESH_AXES.index(a)]
                                          for a in ("data", "fsdp", "expert", "sequence", "tensor"))
  compute = 2 if cfg.compute_dtype == "bfloat16" else 4
  tokens = 2 * config.batch_size * config.max_length / max(config.optim.get("grad_accum_steps", 1), 1)
  tokens /= data * fsdp * expert * sequence
  hd = cfg.resolved_head_dim
  moe_layers = len(moe.moe_layers(cfg))
  mlp = ((cfg.num_layers - moe_layers) * 4 * cfg.intermediate_size + moe_layers * moe_rows_per_token(cfg, expert)
         * (3 * cfg.hidden_size + 4 * cfg.resolved_moe_intermediate_size))  # values per token, all layers' MLPs
  per_token = (cfg.num_layers * (6 * cfg.hidden_size + 2 * cfg.num_kv_heads * hd) + mlp) * compute
  activations = tokens * per_token / tensor
  params = model_lib.count_params(model_lib.abstract_params(cfg))
  experts = moe_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.resolved_moe_intermediate_size
  param_bytes = 2 if cfg.param_dtype == "bfloat16" else 4
  # policy, grads, pi_ref + two fp32 moments; expert kernels ('expert', 'embed', 'mlp') also split over 'expert'
  static = (params - experts + experts / expert) * (3 * param_bytes + 8) / (fsdp * tensor)
  left = device_bytes - static
  remat = "none" if activations <= 0.5 * left else "full"
  return remat, (f"'auto': {remat!r} (~{activations / 2 ** 30:.2f} GiB of saved activations per device "
                 f"{'<=' if remat == 'none' else '>'} half of the {left / 2 ** 30:.2f} GiB left of "
                 f"{device_bytes / 2 ** 30:.2f} GiB ({source}) after params, AdamW, grads and pi_ref)")


def moe_rows_per_token(cfg: model_lib.ModelConfig, expert_parallel: int) -> float:
  """Expert rows an MoE layer computes and keeps per token (`moe.py`'s kernels): k for 'ragged' on one device,
  min(k, E / ep) x `expert_parallel` with the dropless exchange over mesh.expert = ep > 1 (every peer's buffer has
  room for N min(k, E / ep) rows, `moe.expert_parallel`: measured, Qwen3-30B-A3B's step on v5p-128 without remat
  needs 451 GiB of temporaries per chip), k x moe_capacity_factor for 'capacity', E for 'dense' (every expert on
  every token)."""
  impl, k = moe.resolve_impl(cfg), cfg.num_experts_per_tok
  if impl == "dense":
    return float(cfg.num_experts)
  if impl == "capacity":
    return k * cfg.moe_capacity_factor
  if expert_parallel > 1:
    return float(min(k, cfg.num_experts // expert_parallel) * expert_parallel)
  return float(k)


@startup.timed("load")
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
  return startup.timed("load")(model_lib.init_params)(rt.model_cfg, jax.random.key(rt.config.seed),
                                                     step.param_shardings(rt.model_cfg, rt.mesh, rt.rules))


def dpo_start(rt: Runtime) -> Any:
  """Where DPO starts: this workdir's SFT result if the SFT stage ran here, else `hf.model_path`, else (the
  pipeline, online_dpo or reward_model stage with sft.steps=0) the seeded random init, regenerated."""
  if os.path.isdir(os.path.join(rt.workdir, "sft", "checkpoints")):
    return load_sft_result(rt)
  if rt.config.hf.model_path:
    return load_hf_params(rt, "hf.model_path")
  if rt.config.stage in ("pipeline", "online_dpo", "reward_model") and not rt.config.sft.steps:
    return initial_params(rt)
  return load_sft_result(rt)  # raises, saying how to make one


def reference_params(rt: Runtime, start: Any | None = None) -> Any:
  """pi_ref: the checkpoint `hf.reference_path` when set, else where DPO starts (`start`, or `dpo_start`)."""
  if rt.config.hf.reference_path:
    return load_hf_params(rt, "hf.reference_path")
  return dpo_start(rt) if start is None else start


def stage_optimizer(config: Any, stage: str):
  """(optimizer, schedule) of 'sft', 'dpo' (config.optim) or 'online_dpo' (over rounds * steps_per_round steps)."""
  cfg = dict(config.optim)
  if stage == "online_dpo":
    total = config.online.rounds * config.online.steps_per_round
    cfg.update(total_steps=total, warmup_steps=min(config.optim.warmup_steps, total))
  if stage == "sft":
    cfg.update(learning_rate=config.sft.learning_rate, warmup_steps=min(config.sft.warmup_steps, config.sft.steps),
               total_steps=max(config.sft.steps, 1))
  return optim.make_optimizer(cfg)


def abstract_state(params: Any, optimizer: Any, shardings: step.TrainState) -> step.TrainState:
  """Shapes, dtypes and target shardings of a train state (what a checkpoint restores into)."""
  return checkpoint.abstract_like(jax.eval_shape(lambda: step.create_train_state(params, optimizer, shardings)),
                                  shardings)


@startup.timed("load")
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
  restored = checkpoint.restore_latest(mngr, abstract_state(params_like, optimizer, shardings))
  if restored is None:
    raise FileNotFoundError(f"no SFT checkpoint in {directory}; run --config.stage=sft first.")
  return restored[0].params


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


def dpo_train_step(rt: Runtime, example: dict, *, with_reference: bool, stage: str = "dpo",
                   moving_lora_reference: bool = False) -> tuple[Callable, Any, step.TrainState, Any]:
  """The DPO stages' jitted step `fn(state, frozen, batch)` for batches shaped like `example`, with its optimizer,
  state shardings and LoRA spec (None: full fine-tuning). `frozen` is pi_ref's params (None when not
  `with_reference`: precomputed reference log-probs or a reference-free loss); with LoRA the state holds the
  adapters and `frozen` is the base, pi_ref, in every step."""
  config = rt.config
  optimizer, schedule = stage_optimizer(config, stage)
  if step.keeps_reward_shift(config.loss):  # BCO's running reward mean rides in the optimizer state
    optimizer = step.with_reward_shift(optimizer)
  spec = lora_spec(config)
  if spec is None:
    shardings = step.state_shardings(rt.model_cfg, optimizer, rt.mesh, rt.rules)
    frozen_shardings = shardings.params if with_reference else None
  else:
    shardings = step.lora_state_shardings(rt.model, spec, optimizer, rt.mesh, rt.rules)
    frozen_shardings = step.param_shardings(rt.model_cfg, rt.mesh, rt.rules)
    if moving_lora_reference:  # TR-DPO with LoRA: `frozen` is LoraParams(base, reference adapters)
      frozen_shardings = lora_lib.LoraParams(frozen_shardings, shardings.params, spec)
  dpo_step = step.jit_train_step(
      functools.partial(step.train_step, model=rt.model, optimizer=optimizer, schedule=schedule, loss_cfg=config.loss,
                        grad_accum_steps=config.optim.grad_accum_steps, shard=rt.shard, lora=spec,
                        seed=config.seed + 2),
      state_shardings=shardings, reference_shardings=frozen_shardings,
      batch_shardings=rt.batch_shardings(example), mesh=rt.mesh)
  return dpo_step, optimizer, shardings, spec


def initial_adapters(rt: Runtime, spec: lora_lib.LoraSpec, shardings: Any) -> Any:
  """Where the adapters start: the PEFT folder config.lora.adapter_path, else fresh (A uniform, B zero)."""
  path = rt.config.lora.adapter_path
  if path:
    _, adapters = peft_io.load_peft_adapter(path, rt.plain_model, rt.model_cfg, shardings, expect=spec)
    print(f"loaded LoRA adapters from config.lora.adapter_path={path} ({model_lib.count_params(adapters):,} params)")
    return adapters
  adapters = lora_lib.init_adapters(rt.plain_model, spec, jax.random.fold_in(jax.random.key(rt.config.seed), 7),
                                    shardings)
  print(f"LoRA: {model_lib.count_params(adapters):,} adapter params (rank {spec.rank}, alpha {spec.alpha}, targets "
        f"{list(spec.targets)}) over {model_lib.count_params(model_lib.abstract_params(rt.model_cfg)):,} frozen")
  return adapters
