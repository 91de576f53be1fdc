"""`--dry_run --config.dry_run.topology=v5p-64`: the run's steps compiled by the TPU compiler for a TPU slice, on a
machine without a TPU.

    python -m dpo_jax.train --dry_run --config configs/default.py:1b --config.dry_run.topology=v5p-64 \\
        --config.mesh.data=1 --config.mesh.fsdp=-1

The mesh of `config.mesh` is laid over the slice's abstract devices (`topology.devices`), the model is built for
platform 'tpu' (bf16 compute for 'auto', splash attention, no CPU-only path), and each step the run would compile
is lowered from `ShapeDtypeStruct`s with their `NamedSharding`s and AOT-compiled with libtpu (MaxText's
`train_compile.py` does the same for its own step). No array is allocated and no TPU is needed. Steps: 'dpo'
(the train step: LoRA's when `lora.rank > 0`, context-parallel over `mesh.sequence > 1`), 'sft' (when the stage
runs SFT), 'eval' (the held-out preference metrics).

Per step and per device it prints:
  memory     the compiled executable's `memory_analysis()`: arguments (params, optimizer state, pi_ref, the
             batch), outputs not aliased to a donated argument, temporaries, generated code; their sum against the
             chip's HBM (`topology.CHIPS`, or `perf.device_memory_gib` when set): fits or not, and the margin.
  FLOPs      the compiler's count (XLA's cost analysis of the TPU program, every loop trip counted: `hlo.cost`),
             plus the attention inside Pallas kernels that XLA cannot see (counted from the kernels' executions,
             `kernel_flops`); the model FLOPs of `flops.py` (what MFU counts) beside them.
  roofline   step time >= max(FLOPs / bf16 peak, bytes accessed / HBM bandwidth, ICI bytes / ICI bandwidth),
             each a lower bound; MFU = model FLOPs / (that time x peak). An estimate for planning: it assumes
             perfect overlap and peak rates, so real steps are slower.
  collectives  by kind: executions and bytes one device sends per step (`hlo.collectives`).
  kernels    the Pallas / Mosaic kernels in the executable (splash attention), and the attention the step ended
             up with; any CPU-only code path found (`platforms.CPU_ONLY_SCOPES`) is reported as a defect.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from dpo_jax import flops as flops_lib, hlo, lora as lora_lib, losses, model as model_lib, platforms, sharding, step
from dpo_jax.train import config_checks, dry_run, runtime, topology

GiB = dry_run.GiB
STEPS = ("dpo", "sft", "eval")


@dataclasses.dataclass
class StepReport:
  """One compiled step on one device of the slice (bytes, FLOPs and seconds per step)."""
  name: str
  compile_s: float
  arguments: int
  outputs: int  # outputs not aliased to a donated argument
  temporaries: int
  code: int
  flops: float | None  # XLA's count of the TPU program, loop trips included (None: cost analysis unavailable)
  kernel_flops: float  # attention inside Pallas kernels, which XLA counts as 0
  bytes_accessed: float | None
  model_flops: float  # flops.py's model FLOPs of the step, per device
  collectives: dict[str, hlo.Collective]
  kernels: dict[str, float]
  attention: str
  cpu_only: list[str]
  refused: str = ""  # the compiler's out-of-memory message when it would not build the step (`refused_step`)

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries + self.code

  def roofline(self, chip: topology.Chip) -> dict[str, float]:
    """Lower bounds on the step time (s) from compute, HBM and ICI, their max, and the MFU at that time."""
    compute = ((self.flops or 0.0) + self.kernel_flops) / chip.peak_bf16_flops
    memory = (self.bytes_accessed or 0.0) / chip.hbm_bytes_per_s
    sent = sum(c.sent for c in self.collectives.values())
    ici = sent / (chip.ici_bytes_per_s / 2) if chip.ici_bytes_per_s else 0.0  # one direction of the links
    step_s = max(compute, memory, ici)
    return {"compute": compute, "memory": memory, "ici": ici, "step": step_s,
            "mfu": self.model_flops / (step_s * chip.peak_bf16_flops) if step_s > 0 else math.nan}


def kernel_flops(kernels: dict[str, float], cfg: model_lib.ModelConfig, batch: dict, num_devices: int) -> float:
  """Attention FLOPs per device run inside splash kernels: each forward-kernel execution is one layer's attention
  forward over the device's rows, each dq + dkv pair its backward (twice the forward), from `flops.py`'s count of
  the batch (the causal triangle, the same for every layer)."""
  fwd = sum(n for k, n in kernels.items() if k.startswith("splash") and "_fwd" in k)
  bwd = sum(n for k, n in kernels.items() if k.startswith("splash") and "_dq" in k)
  if not fwd and not bwd:
    return 0.0
  per_layer = flops_lib.attention_forward_flops(cfg, batch) / cfg.num_layers / num_devices
  return (fwd + 2 * bwd) * per_layer


def _attention_in(kernels: dict[str, float], cfg: model_lib.ModelConfig, mesh: Any) -> str:
  if any(k.startswith("splash") for k in kernels):
    where = " on all-gathered keys" if mesh.shape["sequence"] > 1 else ""
    return f"splash (Pallas TPU){where}"
  if mesh.shape["sequence"] > 1:
    return f"context-parallel {cfg.context_parallel!r} with jnp tiles (XLA)"
  return "xla (masked softmax; splash could not serve these shapes)"


def analyse(name: str, compiled: Any, compile_s: float, *, cfg: model_lib.ModelConfig, batch: dict, mesh: Any,
            model_flops: float) -> StepReport:
  """A `StepReport` of one compiled step: memory, FLOPs (loop trips included), collectives and kernels."""
  text = compiled.as_text()
  module = hlo.parse(text)
  mem = compiled.memory_analysis()
  found = hlo.kernels(module)
  cost = hlo.cost(module) or {}
  n = mesh.devices.size
  return StepReport(
      name=name, compile_s=compile_s, arguments=int(mem.argument_size_in_bytes),
      outputs=int(mem.output_size_in_bytes - mem.alias_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
      code=int(mem.generated_code_size_in_bytes), flops=cost.get("flops"),
      kernel_flops=kernel_flops(found, cfg, batch, n), bytes_accessed=cost.get("bytes accessed"),
      model_flops=model_flops / n, collectives=hlo.collectives(module, default_group=n), kernels=found,
      attention=_attention_in(found, cfg, mesh),
      cpu_only=[s for s in platforms.CPU_ONLY_SCOPES if s in text])


def refused_step(name: str, message: str, args: tuple, compile_s: float, model_flops: float, n: int) -> StepReport:
  """The report of a step libtpu refused to build because its memory exceeds the chip's HBM (it fails the compile
  with RESOURCE_EXHAUSTED, e.g. 'the total memory required for HLO temporaries (24.39G) exceeds available HBM
  (15.75G)'): arguments from the abstract arguments' shardings, temporaries from the message (XLA's G = GiB)."""
  units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  sizes = [float(v) * units.get(u, 1) for v, u in re.findall(r"\(([\d.]+)([KMGT])?i?B?\)", message)]
  shapes = [x for x in jax.tree.leaves(args) if isinstance(x, jax.ShapeDtypeStruct)]
  arguments = sum(dry_run.per_device_bytes(x.shape, x.dtype, x.sharding) for x in shapes)
  temporaries = int(sizes[0]) if "temporaries" in message and sizes else 0
  return StepReport(name=name, compile_s=compile_s, arguments=arguments, outputs=0, temporaries=temporaries, code=0,
                    flops=None, kernel_flops=0.0, bytes_accessed=None, model_flops=model_flops / n, collectives={
                        k: hlo.Collective() for k in hlo.COLLECTIVES}, kernels={}, attention="-", cpu_only=[],
                    refused=" ".join(message.split()))


def rows_batch(rows: int, length: int, pairs: int, mesh: Any, rules: Any) -> tuple[dict, dict]:
  """The abstract `[rows, length]` int32 batch the trainer feeds (and its `[pairs]` pair_mask), with shardings."""
  batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
           for k in ("input_ids", "attention_mask", "positions", "loss_mask")}
  batch["pair_mask"] = jax.ShapeDtypeStruct((pairs,), jnp.int32)
  return batch, sharding.batch_shardings(mesh, rules, batch)


def compile_steps(config: Any, mesh: Any, model_cfg: model_lib.ModelConfig, steps: tuple[str, ...]) -> list[StepReport]:
  """AOT-compile `steps` of `config`'s run on `mesh` (whose devices may be a TPU topology's) and analyse each."""
  rules = tuple(tuple(r) for r in config.sharding.rules)
  shard = sharding.ShardingContext(mesh, rules)
  model = model_lib.make_model(model_cfg, shard)
  loss_type = losses.from_config(config.loss)[0]
  with_reference = losses.needs_reference(loss_type) and not config.data.reference_logps
  params_abstract = model_lib.abstract_params(model_cfg)
  params_sh = step.param_shardings(model_cfg, mesh, rules)
  reports = []

  def run(name: str, fn: Any, args: tuple, batch: dict, model_flops: float) -> None:
    t0 = time.perf_counter()
    try:
      compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as err:  # libtpu refuses a program that cannot fit: that is the answer
      if "RESOURCE_EXHAUSTED" not in str(err):
        raise
      reports.append(refused_step(name, str(err), args, time.perf_counter() - t0, model_flops, mesh.devices.size))
      return
    reports.append(analyse(name, compiled, time.perf_counter() - t0, cfg=model_cfg, batch=batch, mesh=mesh,
                           model_flops=model_flops))

  if "dpo" in steps:
    spec = lora_lib.spec_from_config(config.get("lora"))
    optimizer, schedule = runtime.stage_optimizer(config, "dpo")
    fn, args, batch = dry_run.dpo_step(config, model, model_cfg, optimizer, schedule, mesh, rules,
                                       with_reference=with_reference, lora=spec)
    run("dpo" if spec is None else f"dpo (LoRA r={spec.rank})", fn, args, batch,
        flops_lib.train_step_flops(model_cfg, batch, reference=args[1] is not None, lora=spec))
  if "sft" in steps:
    optimizer, schedule = runtime.stage_optimizer(config, "sft")
    state_sh = step.state_shardings(model_cfg, optimizer, mesh, rules)
    state = jax.eval_shape(lambda p: step.create_train_state(p, optimizer, state_sh, donate=True), params_abstract)
    batch, batch_sh = rows_batch(config.sft.batch_size, config.max_length, config.sft.batch_size, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(functools.partial(step.sft_train_step, model=model, optimizer=optimizer, schedule=schedule,
                                   grad_accum_steps=config.optim.grad_accum_steps, shard=shard),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=(0,))
    run("sft", fn, (dry_run.with_shardings(state, state_sh), dry_run.with_shardings(batch, batch_sh)), batch,
        flops_lib.train_step_flops(model_cfg, batch, reference=False))
  if "eval" in steps:
    pairs = config.eval.batch_size
    batch, batch_sh = rows_batch(2 * pairs, config.max_length, pairs, mesh, rules)
    reference = dry_run.with_shardings(params_abstract, params_sh) if losses.needs_reference(loss_type) else None
    fn = step.jit_eval_step(functools.partial(step.eval_sums, model=model, loss_cfg=config.loss),
                            param_shardings=params_sh, reference_shardings=None if reference is None else params_sh,
                            batch_shardings=batch_sh, mesh=mesh)
    run("eval", fn, (dry_run.with_shardings(params_abstract, params_sh), reference, dry_run.with_shardings(batch, batch_sh)), batch,
        flops_lib.forward_flops(model_cfg, batch) * (2 if reference is not None else 1))
  return reports


def stage_steps(config: Any) -> tuple[str, ...]:
  """The steps of `config.dry_run.steps` that its stage compiles."""
  wanted = tuple(config.dry_run.steps)
  unknown = [s for s in wanted if s not in STEPS]
  if unknown:
    raise ValueError(f"config.dry_run.steps={wanted!r}: unknown {unknown}; choose from {STEPS}.")
  runs = {"pipeline": ("dpo", "eval") + (("sft",) if config.sft.steps else ()), "sft": ("sft",),
          "dpo": ("dpo", "eval"), "precompute": ("eval",)}[config.stage]
  return tuple(s for s in wanted if s in runs)


def _gib(n: float) -> str:
  return f"{n / GiB:.3g}"


def report(config: Any) -> dict:
  """Compile and print (module docstring); returns {'topology', 'mesh', 'capacity' (bytes), 'steps': [StepReport],
  'fits' (every step), 'roofline': {step: {...}}}."""
  topo = topology.parse(config.dry_run.topology, int(config.dry_run.num_slices))
  devices = topology.devices(topo)
  config_checks.validate_config(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  perf = config.get("perf")
  override = float(perf.get("device_memory_gib", 0.0)) if perf is not None else 0.0
  capacity = (override or topo.chip.hbm_gib) * GiB
  model_cfg = runtime.model_config(config, platform="tpu", devices=len(devices), device_bytes=capacity)
  steps = stage_steps(config)
  active = (f", {flops_lib.active_params(model_cfg):,} active ({model_cfg.num_experts_per_tok} of "
            f"{model_cfg.num_experts} experts)" if model_cfg.num_experts else "")
  print(f"TPU dry run: {topo.describe()}; mesh {dict(mesh.shape)}; "
        f"{model_lib.count_params(model_lib.abstract_params(model_cfg)):,} params{active} ({model_cfg.num_layers} "
        f"layers, hidden {model_cfg.hidden_size}, vocab {model_cfg.vocab_size}, {model_cfg.compute_dtype} compute, "
        f"remat={model_cfg.remat}, scan_layers={model_cfg.scan_layers}); batch {config.batch_size} pairs x "
        f"{config.max_length} tokens; compiling {', '.join(steps)} with libtpu", flush=True)
  reports = compile_steps(config, mesh, model_cfg, steps)
  hbm = f"{capacity / GiB:g} GiB" + (" (perf.device_memory_gib)" if override else f" ({topo.chip.generation} HBM)")
  rows = []
  for r in reports:
    margin = capacity - r.total
    rows.append((r.name, f"{r.compile_s:.1f}", _gib(r.arguments), _gib(r.outputs), _gib(r.temporaries),
                 _gib(r.code), (">= " if r.refused else "") + _gib(r.total), "yes" if margin >= 0 else "NO",
                 f"{margin / GiB:+.2f} ({100 * margin / capacity:+.0f}%)"))
  print(f"\nper-device memory (GiB) against {hbm}:")
  print(dry_run._table(("step", "compile s", "arguments", "outputs", "temporaries", "code", "total", "fits",
                        "margin GiB"), rows))
  for r in reports:
    if r.refused:
      print(f"{r.name}: the TPU compiler refused it: {r.refused}")
  reports_run = [r for r in reports if not r.refused]
  roofs = {r.name: r.roofline(topo.chip) for r in reports_run}
  ms = lambda s: f"{1e3 * s:.3g}"
  print(f"\nper device per step: FLOPs and a roofline estimate ({topo.chip.peak_bf16_flops / 1e12:g} TFLOP/s bf16, "
        f"{topo.chip.hbm_bytes_per_s / 1e9:g} GB/s HBM"
        + (f", {topo.chip.ici_bytes_per_s / 1e9:g} GB/s ICI" if topo.chip.ici_bytes_per_s else "") + "):")
  tflop = lambda x: "-" if x is None else f"{x / 1e12:.3g}"
  print(dry_run._table(
      ("step", "compiler TFLOP", "+ kernels", "model TFLOP", "HBM GB", "ICI GB", "compute ms", "HBM ms", "ICI ms",
       "est. step ms", "MFU"),
      [(r.name, tflop(r.flops), tflop(r.kernel_flops), tflop(r.model_flops),
        "-" if r.bytes_accessed is None else f"{r.bytes_accessed / 1e9:.3g}",
        f"{sum(c.sent for c in r.collectives.values()) / 1e9:.3g}", ms(roofs[r.name]["compute"]),
        ms(roofs[r.name]["memory"]), ms(roofs[r.name]["ici"]) if topo.chip.ici_bytes_per_s else "-",
        ms(roofs[r.name]["step"]), f"{roofs[r.name]['mfu']:.1%}") for r in reports_run]))
  print("\ncollectives per device per step (executions, GB sent):")
  print(dry_run._table(("step",) + hlo.COLLECTIVES, [
      (r.name,) + tuple(f"{r.collectives[k].count:g}, {r.collectives[k].sent / 1e9:.3g}" for k in hlo.COLLECTIVES)
      for r in reports_run]))
  print()
  for r in reports_run:
    kernels = ", ".join(f"{k} x{n:g}" for k, n in sorted(r.kernels.items())) or "none"
    print(f"{r.name}: attention {r.attention}; kernels: {kernels}; CPU-only paths: {', '.join(r.cpu_only) or 'none'}")
  fits = all(r.total <= capacity and not r.refused for r in reports)
  print(f"\n{'fits' if fits else 'does NOT fit'}: largest step {max(r.total for r in reports) / GiB:.2f} GiB per device "
        f"of {capacity / GiB:g}." + ("" if fits else " Shard more (mesh.fsdp), set model.remat='full', chunk the "
                                     "log-probs (model.logits_chunk_size) or lower batch_size / max_length."))
  return {"topology": topo, "mesh": dict(mesh.shape), "capacity": capacity, "steps": reports, "fits": fits,
          "roofline": roofs}
