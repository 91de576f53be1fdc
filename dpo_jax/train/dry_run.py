"""`python -m dpo_jax.train --dry_run`: what a config costs on a mesh, without running a step.

Prints the parameter count, every param's logical axes, PartitionSpec and per-device shape, and the
per-device memory of the DPO stage: params, optimizer state, reference params (0 when the step runs
without pi_ref: precomputed reference log-probs or a reference-free loss), and the compiled train step's
temporaries (activations, gradients and workspace: XLA's `memory_analysis().temp_size_in_bytes` of the
per-device SPMD program, compiled from abstract shapes, so no array is ever allocated).

A mixture-of-experts model (`model.num_experts > 0`) prints its total and active params (each token uses the
router and k of E experts: the count MFU's model FLOPs rest on, `flops.active_params`) and the experts' share of
the params: their kernels (logical axes ('expert', 'embed', 'mlp')) split over the mesh's expert x fsdp x tensor
devices, the other params over fsdp x tensor.

With LoRA (`config.lora.rank > 0`) it prints both columns, LoRA and full fine-tuning on the same mesh: LoRA holds
the base once (it is pi_ref too), the adapters and their optimizer moments, and compiles its own step.

The mesh is `config.mesh` over the devices this process sees. To plan for a pod from a CPU machine, emulate
its device count: `XLA_FLAGS=--xla_force_host_platform_device_count=256 JAX_PLATFORMS=cpu python -m
dpo_jax.train --dry_run --config.mesh.fsdp=-1 ...`. Static sizes (params, optimizer, reference) are exact
for any backend; the temporaries are those of the backend that compiled them (CPU's layouts and fusion
differ from a TPU's or GPU's, so treat them as an estimate there). For a TPU slice, `config.dry_run.topology` has the
TPU compiler itself compile the steps (`tpu_dry_run.py`): what the TPU would allocate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import flops, logprobs, lora as lora_lib, losses, model as model_lib, moe, sharding, step

GiB = 1024 ** 3


@dataclasses.dataclass
class ParamRow:
  path: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple
  spec: str
  device_shape: tuple[int, ...]
  device_bytes: int


def per_device_bytes(shape: tuple[int, ...], dtype: Any, named_sharding: jax.sharding.Sharding) -> int:
  """Bytes one device holds of an array of `shape` laid out by `named_sharding` (replicas count in full)."""
  return math.prod(named_sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def tree_device_bytes(abstract_tree: Any, sharding_tree: Any) -> int:
  """Per-device bytes of a pytree of ShapeDtypeStructs under a matching pytree of shardings."""
  shapes = jax.tree.leaves(abstract_tree)
  shardings = jax.tree.leaves(sharding_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return sum(per_device_bytes(s.shape, s.dtype, sh) for s, sh in zip(shapes, shardings))


def param_rows(model_cfg: model_lib.ModelConfig, mesh: Any, rules: Any) -> list[ParamRow]:
  abstract = model_lib.abstract_params(model_cfg)
  shardings = step.param_shardings(model_cfg, mesh, rules)
  logical = jax.tree.leaves(model_lib.param_logical_axes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))
  rows = []
  for (path, leaf), axes, sh in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], logical,
                                    jax.tree.leaves(shardings)):
    rows.append(ParamRow(
        path="/".join(str(getattr(k, "key", k)) for k in path), shape=tuple(leaf.shape), dtype=str(leaf.dtype),
        logical_axes=tuple(axes), spec=str(tuple(sh.spec)), device_shape=tuple(sh.shard_shape(tuple(leaf.shape))),
        device_bytes=per_device_bytes(leaf.shape, leaf.dtype, sh)))
  return rows


def abstract_batch(config: Any, mesh: Any, rules: Any, *, precomputed_reference: bool) -> tuple[dict, dict]:
  """ShapeDtypeStructs and shardings of one global DPO batch, as the trainer builds it (`dpo_jax/data`).

  Unpacked: `[2B, T]` int32 rows, the `[B]` pair mask (+ `[B]` reference columns). Packed (`data.packing`): R = B / pairs_per_row rows
  of `pack_length` tokens, `pack_slots` `[R, P]`, and `[R * P]` pair fields. Shared prompts (`data.prompt_sharing`)
  take their shapes from the data, which a dry run does not read; 'auto' picks them only when they hold fewer
  tokens than these rows, so the rows bound the trainer's batch.
  """
  if config.data.packing:
    from dpo_jax.data import packing
    pairs_per_row = config.data.pairs_per_row
    rows, length = config.batch_size // pairs_per_row, packing.row_length(config.data.pack_length, config.max_length)
    batch = {"pack_slots": jax.ShapeDtypeStruct((rows, pairs_per_row), jnp.int32),
             "pair_mask": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  else:
    rows, length = 2 * config.batch_size, config.max_length
    batch = {"pair_mask": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  batch.update({k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
                for k in ("input_ids", "attention_mask", "positions", "loss_mask")})
  if precomputed_reference:
    batch.update({k: jax.ShapeDtypeStruct((config.batch_size,), jnp.float32)
                  for k in ("ref_chosen_logps", "ref_rejected_logps")})
  if losses.is_unpaired(losses.from_config(config.loss)[0]):  # KTO / BCO rows carry their label
    batch["desirable"] = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
  return batch, sharding.batch_shardings(mesh, rules, batch)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (what `jit(...).lower` compiles for)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def dpo_step(config: Any, rt_model: Any, model_cfg: model_lib.ModelConfig, optimizer: Any, schedule: Any,
             mesh: Any, rules: Any, *, with_reference: bool, lora: lora_lib.LoraSpec | None = None) -> tuple:
  """The trainer's jitted DPO train step for `config`'s batch and its abstract arguments: (fn, (state, pi_ref or
  None, batch), batch), each argument a ShapeDtypeStruct tree with its sharding. `lora`: the LoRA step (the state
  holds adapters; the frozen base is passed in pi_ref's place)."""
  shard = sharding.ShardingContext(mesh, rules)
  if lora is None:
    state_sh = step.state_shardings(model_cfg, optimizer, mesh, rules)
    trainable = model_lib.abstract_params(model_cfg)
    frozen_sh = state_sh.params if with_reference else None
  else:
    state_sh = step.lora_state_shardings(rt_model, lora, optimizer, mesh, rules)
    trainable = lora_lib.abstract_adapters(rt_model, lora)
    frozen_sh = step.param_shardings(model_cfg, mesh, rules)
  abstract_state = jax.eval_shape(lambda p: step.create_train_state(p, optimizer, state_sh, donate=True), trainable)
  batch, batch_sh = abstract_batch(config, mesh, rules, precomputed_reference=bool(config.data.reference_logps))
  fn = step.jit_train_step(
      functools.partial(step.train_step, model=rt_model, optimizer=optimizer, schedule=schedule,
                        loss_cfg=config.loss, grad_accum_steps=config.optim.grad_accum_steps, shard=shard,
                        lora=lora),
      state_shardings=state_sh, reference_shardings=frozen_sh, batch_shardings=batch_sh, mesh=mesh)
  frozen = None if frozen_sh is None else with_shardings(model_lib.abstract_params(model_cfg), frozen_sh)
  return fn, (with_shardings(abstract_state, state_sh), frozen, with_shardings(batch, batch_sh)), batch


def step_memory(config: Any, rt_model: Any, model_cfg: model_lib.ModelConfig, optimizer: Any, schedule: Any,
                mesh: Any, rules: Any, *, with_reference: bool, lora: lora_lib.LoraSpec | None = None) -> Any:
  """`memory_analysis()` of the compiled DPO train step for `config`'s batch (`dpo_step`, lowered from abstract
  args)."""
  fn, args, _ = dpo_step(config, rt_model, model_cfg, optimizer, schedule, mesh, rules,
                         with_reference=with_reference, lora=lora)
  return fn.lower(*args).compile().memory_analysis()


def _fmt_bytes(n: float) -> str:
  return f"{n / GiB:.3f} GiB" if n >= GiB / 10 else f"{n / 1024 ** 2:.2f} MiB"


def _table(header: tuple, rows: list[tuple]) -> str:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(config: Any, *, compile_step: bool = True) -> dict:
  """Print the dry-run tables for `config` on the mesh over this process's devices; return the numbers.

  Returned keys (per-device bytes unless noted): num_params and active_params (counts; equal for a dense model),
  params, expert_params (the MoE experts' part of params), optimizer, reference,
  activations (compiled temporaries; None if `compile_step=False`), total, mesh (axis sizes); with LoRA also
  'lora': {num_adapters (count), params (the frozen base), adapters, optimizer, reference (0), activations, total}.
  """
  from dpo_jax.train import config_checks, runtime

  config_checks.validate_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  model_cfg = runtime.model_config(config)
  optimizer, schedule = runtime.stage_optimizer(config, "dpo")
  loss_type = losses.from_config(config.loss)[0]
  with_reference = losses.needs_reference(loss_type) and not config.data.reference_logps

  rows = param_rows(model_cfg, mesh, rules)
  num_params = sum(math.prod(r.shape) for r in rows)
  params_bytes = sum(r.device_bytes for r in rows)
  active = num_params - flops.inactive_params(model_cfg)  # MoE: the k routed experts of E, what MFU counts
  expert_rows = [r for r in rows if "expert" in r.logical_axes]
  expert_bytes = sum(r.device_bytes for r in expert_rows)
  state_sh = step.state_shardings(model_cfg, optimizer, mesh, rules)
  abstract_opt = jax.eval_shape(optimizer.init, model_lib.abstract_params(model_cfg))
  opt_bytes = tree_device_bytes(abstract_opt, state_sh.opt_state)
  moving_reference = with_reference and config.ref_update.mode != "off"  # TR-DPO keeps pi_ref and a moving copy
  ref_bytes = params_bytes * (2 if moving_reference else 1) if with_reference else 0

  moe_note = ""
  if model_cfg.num_experts:
    moe_note = (f", {active:,} active ({model_cfg.num_experts_per_tok} of {model_cfg.num_experts} experts in "
                f"{len(moe.moe_layers(model_cfg))} MoE layers)")
  print(f"dry run: {num_params:,} params{moe_note} ({model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
        f"vocab {model_cfg.vocab_size}); mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); batch {config.batch_size} pairs x {config.max_length} tokens"
        f"{' (packed, ' + str(config.data.pairs_per_row) + ' pairs per row)' if config.data.packing else ''}; loss {loss_type}")
  print(_table(("param", "shape", "dtype", "logical axes", "spec", "per-device shape", "per device"),
               [(r.path, r.shape, r.dtype, r.logical_axes, r.spec, r.device_shape, _fmt_bytes(r.device_bytes))
                for r in rows]))

  chunk, why = logprobs.logits_chunk(model_cfg, 2 * config.batch_size, config.max_length - 1,
                                     sharding.ShardingContext(mesh, rules))
  print(f"LM head: logits_chunk_size={model_cfg.logits_chunk_size!r} -> {chunk} ({why}; a batch of "
        f"{2 * config.batch_size} rows x {config.max_length - 1} scored positions)")
  if config.model.get("remat") == "auto":
    print(f"remat: {runtime.resolve_remat(config, model_cfg)[1]}")
  activations = None
  if compile_step:
    mem = step_memory(config, model_lib.make_model(model_cfg, sharding.ShardingContext(mesh, rules)), model_cfg,
                      optimizer, schedule, mesh, rules, with_reference=with_reference)
    activations = int(mem.temp_size_in_bytes)
  why_ref = ("pi_ref and its moving copy (ref_update)" if moving_reference else
             "pi_ref held beside the policy" if with_reference else
             "none: precomputed reference log-probs" if config.data.reference_logps else "none: reference-free loss")
  memory = [("params", _fmt_bytes(params_bytes), str(model_cfg.param_dtype))]
  if expert_rows:
    split = math.prod(mesh.shape[a] for a in ("expert", "fsdp", "tensor"))
    memory.append(("  of which experts", _fmt_bytes(expert_bytes),
                   f"{sum(math.prod(r.shape) for r in expert_rows):,} params ('expert', 'embed', 'mlp') over "
                   f"expert x fsdp x tensor = {split} devices"))
  memory += [("optimizer state", _fmt_bytes(opt_bytes), "config.optim's moments, sharded like the params"),
             ("reference params", _fmt_bytes(ref_bytes), why_ref)]
  if activations is not None:
    memory.append(("activations + grads (step temporaries)", _fmt_bytes(activations),
                   f"compiled train step (the grads, ~{_fmt_bytes(params_bytes)} like the params, among them), "
                   f"grad_accum_steps={config.optim.grad_accum_steps}, "
                   f"remat={model_cfg.remat}, logits_chunk_size={model_cfg.logits_chunk_size}"))
  total = params_bytes + opt_bytes + ref_bytes + (activations or 0)
  memory.append(("total", _fmt_bytes(total), ""))
  out = {"num_params": num_params, "active_params": active, "params": params_bytes, "expert_params": expert_bytes,
         "optimizer": opt_bytes, "reference": ref_bytes, "activations": activations, "total": total,
         "mesh": dict(mesh.shape)}
  spec = lora_lib.spec_from_config(config.get("lora"))
  # Expert parallelism runs its local experts through ragged_dot whatever moe_impl says (moe.expert_parallel).
  cpu_ragged = model_lib.backend(model_cfg) == "cpu" and (moe.resolve_impl(model_cfg) == "ragged"
                                                          or mesh.shape["expert"] > 1)
  if compile_step and expert_rows and cpu_ragged:
    local = model_cfg.num_experts // mesh.shape["expert"]
    print(f"note: XLA:CPU runs jax.lax.ragged_dot as a masked dense product over all {local} local experts, so the "
          "MoE step temporaries below overstate a TPU's or GPU's (grouped matmuls); compile for a TPU slice with "
          "config.dry_run.topology (docs/moe.md).")
  if spec is None:
    print("\nper-device memory of the DPO stage:")
    print(_table(("what", "per device", "note"), memory))
    if compile_step and mesh.shape["sequence"] > 1:
      out["without_sequence"] = without_sequence_axis(config, model_cfg, optimizer, schedule, mesh, rules,
                                                      with_reference=with_reference, static=total - activations)
    _fit(config, out)
    return out
  out["lora"] = lora = lora_memory(config, spec, model_cfg, optimizer, schedule, mesh, rules, params_bytes,
                                   with_reference=with_reference, compile_step=compile_step)
  print(f"\nper-device memory of the DPO stage: LoRA (rank {spec.rank}, {lora['num_adapters']:,} adapter params on "
        f"{list(spec.targets)}) against full fine-tuning, same mesh:")
  fmt = lambda n: "-" if n is None else _fmt_bytes(n)
  print(_table(("what", "LoRA", "full fine-tuning", "note"), [
      ("params", fmt(lora["params"]), fmt(params_bytes), "LoRA: the frozen base, also pi_ref"),
      ("trainable (adapters)", fmt(lora["adapters"]), "-", "LoRA: A and B of every target, sharded like its kernel"),
      ("optimizer state", fmt(lora["optimizer"]), fmt(opt_bytes), "moments of the trainable params only"),
      ("reference params", fmt(lora["reference"]), fmt(ref_bytes), "LoRA: none beyond the base; full: " + why_ref),
      ("activations + grads (step temporaries)", fmt(lora["activations"]), fmt(activations),
       "compiled train steps"),
      ("total", fmt(lora["total"]), fmt(total), f"LoRA / full = {lora['total'] / max(total, 1):.2f}")]))
  return out


def lora_memory(config: Any, spec: lora_lib.LoraSpec, model_cfg: model_lib.ModelConfig, optimizer: Any,
                schedule: Any, mesh: Any, rules: Any, base_bytes: int, *, with_reference: bool,
                compile_step: bool) -> dict:
  """Per-device bytes of a LoRA DPO stage: the frozen base (which is pi_ref: no second copy), the adapters, their
  optimizer moments and the compiled LoRA step's temporaries."""
  model = model_lib.make_model(model_cfg, sharding.ShardingContext(mesh, rules))
  abstract = lora_lib.abstract_adapters(model, spec)
  state_sh = step.lora_state_shardings(model, spec, optimizer, mesh, rules)
  adapter_bytes = tree_device_bytes(abstract, state_sh.params)
  opt_bytes = tree_device_bytes(jax.eval_shape(optimizer.init, abstract), state_sh.opt_state)
  activations = None
  if compile_step:
    activations = int(step_memory(config, model, model_cfg, optimizer, schedule, mesh, rules,
                                  with_reference=with_reference, lora=spec).temp_size_in_bytes)
  return {"num_adapters": model_lib.count_params(abstract), "params": base_bytes, "adapters": adapter_bytes,
          "optimizer": opt_bytes, "reference": 0, "activations": activations,
          "total": base_bytes + adapter_bytes + opt_bytes + (activations or 0)}


def without_sequence_axis(config: Any, model_cfg: model_lib.ModelConfig, optimizer: Any, schedule: Any, mesh: Any,
                          rules: Any, *, with_reference: bool, static: int) -> dict:
  """The same step on the same mesh with every device holding whole sequences ('length' unsharded, so the
  'sequence' devices repeat each other's work): what context parallelism saves per device."""
  whole = (("length", None),) + tuple(rules)  # the first rule wins
  activations = int(step_memory(config, model_lib.make_model(model_cfg, sharding.ShardingContext(mesh, whole)),
                                model_cfg, optimizer, schedule, mesh, whole,
                                with_reference=with_reference).temp_size_in_bytes)
  n = mesh.shape["sequence"]
  return {"activations": activations, "total": static + activations, "sequence": n}


def _fit(config: Any, out: dict) -> None:
  """Print the context-parallel comparison and, given perf.device_memory_gib, whether each plan fits."""
  perf = config.get("perf")
  capacity = float(perf.get("device_memory_gib", 0.0)) * GiB if perf is not None else 0.0
  without = out.get("without_sequence")
  if without:
    n = without["sequence"]
    print(f"\ncontext parallelism: step temporaries per device {_fmt_bytes(out['activations'])} with the tokens of "
          f"each sequence over mesh.sequence={n} (model.context_parallel={config.model.context_parallel!r}), "
          f"{_fmt_bytes(without['activations'])} with whole sequences per device (same mesh); total "
          f"{_fmt_bytes(out['total'])} against {_fmt_bytes(without['total'])} "
          f"({without['total'] / max(out['total'], 1):.2f}x).")
  if not capacity or out["activations"] is None:
    return
  fits = out["total"] <= capacity
  print(f"fits in {capacity / GiB:g} GiB per device (perf.device_memory_gib): {'yes' if fits else 'NO'} "
        f"({_fmt_bytes(out['total'])})")
  if without:
    out["fits"], out["fits_without_sequence"] = fits, without["total"] <= capacity
    if fits and not out["fits_without_sequence"]:
      print(f"this config only fits with mesh.sequence > 1: whole sequences per device would need "
            f"{_fmt_bytes(without['total'])}.")
