"""One prepared check for the GPU machine: numerics on the accelerator, then the DPO step's speed against torch.

    python benchmarks/device_check.py [--out DIR] [--budget_s 420] [--smoke] [--pairs 4] [--layers N]
        [--repeats 5] [--shape llama-3.2-1b]

Writes DIR/tables.md (markdown) and DIR/results.json after every section and speed row, so a run cut short
still leaves what it measured; DIR defaults to $OUT when set, else ./device_check_out. The tables are printed
too. The script puts the repo root on sys.path itself (dpo_jax is not pip-installed there) and imports nothing
that needs ml_collections, datasets or tensorboardX (not dpo_jax.train, configs/*.py or dpo_jax.train.metrics).

1. Correctness, on the tiny model (configs/default.py's `tiny` shape, written out here) and a shared-prompt batch:
   - fp32, accelerator vs this process's CPU backend (`jax.devices('cpu')[0]`), each with its own platform's
     kernels (`model.platform`: '' there, 'cpu' here), same params and batch, `matmul_precision='highest'` (GPU
     fp32 matmuls are TF32 by default): the policy and reference sequence log-probs, the DPO loss and its
     gradient (`step.dpo_loss`, what one train step differentiates). Relative errors, target `FP32_RTOL`.
   - bf16 compute (fp32 params) vs fp32, both on the accelerator: the largest relative error of a sequence
     log-prob against `logprobs.BF16_LOGPS_RTOL`, and the fraction of pairs whose DPO margin
     (pi - ref on chosen minus on rejected) keeps its sign, the policy being the reference plus a perturbation.
   - mixture of experts, fp32 on the accelerator: the `moe` model of benchmarks/dpo_step.py (configs/default.py's
     `:moe`: 8 experts, top-2; 2 layers, `MOE_CHECK`) with `moe_impl='ragged'` (dropless grouped matmuls,
     `jax.lax.ragged_dot`) against `'dense'` (every expert on every token, one-hot combine), same params and
     batch: sequence log-probs and the gradient of the DPO loss + router aux loss. The same routing, so only the
     summation order differs: target `FP32_RTOL`.
   With no accelerator (a CPU-only run, e.g. --smoke here) the accelerator is the CPU: the first comparison is
   then CPU against CPU, trivial, but the code path still runs; the table says so.
2. Speed: a released model's shape (`--shape`, from benchmarks/dpo_step.py's CONFIGS: llama-3.2-1b by default,
   tied embeddings; smollm2-135m, qwen2.5-0.5b, or TinyLlama's `1b`) in bf16 compute, fp32 params and AdamW, scanned
   layers, `logits_chunk_size='auto'`, `--pairs` pairs x 2048 tokens; the DPO step as the trainer runs it (`step.train_step` jitted by
   `step.jit_train_step`, shared-prompt layout: benchmarks/dpo_step.py's `JaxStep`). Rows (labelled with the
   attention kernel `attention.choose` picks: cudnn on a GPU, cpu_blocked on a CPU):
     jax           model.attention_impl='auto'
     jax-remat     the same with model.remat='full'
     jax-preref    precomputed reference log-probs in the batch: no reference forward in the step
     jax-xla       model.attention_impl='xla' (masked softmax in jnp)
     torch         the HF model of the shape's family (Llama, Qwen2) with the same weights (tied where it ties), SDPA attention, fp32 weights under bf16 autocast,
                   a plain DPO step on `[2B, T]` rows (benchmarks/dpo_step.py's `TorchStep`) on cuda when the GPU
                   is there
   Columns: median step time of --repeats after one warm-up, tokens/s (2B x T per step, the same for every row),
   MFU (`flops.train_step_flops` of the row's own layout / time / `flops.peak_flops`), device peak (jax: the
   process's `peak_bytes_in_use` so far, which jax cannot reset: rows run in the order of `RUN_ORDER`, which is
   the order of their expected memory; torch: `torch.cuda.max_memory_allocated` of its row), compiled = the
   step's arguments + temporaries + outputs - aliased (`compiled.memory_analysis()`), x torch = torch's time /
   this row's. Torch runs first and hands its cached memory back before the jax rows, as jax never does.
2b. MoE speed (after section 2, under the same budget): the DPO step of a Mixtral-shaped MoE (`Sizes.moe_model`:
   section 2's `small` shape of benchmarks/dpo_step.py with 8 experts of width 2816 per layer, top-2; --smoke a toy)
   in bf16 compute, the same pairs and layout, `MOE_ROWS`: moe-ragged (`moe_impl='ragged'`, the default) and
   moe-dense (`'dense'`: E / k = 4x the experts' FLOPs), the router aux loss in the objective. Columns as section
   2's, with x dense = the dense row's time / this row's instead of x torch; MFU counts the k routed experts
   (`flops.train_step_flops`: model FLOPs, also for moe-dense); device peak is the process's so far (after
   section 2's rows), so compiled is the per-row figure.
3. Rollouts: benchmarks/rollout_throughput.py in this process (its own table, also written to DIR/rollout/): the
   jitted KV-cache sampler and a whole RL rollout against transformers' `generate` on the same weights and prompts,
   torch on cuda. Run when at least `ROLLOUT_MIN_S` of the budget is left (always with --smoke, at its smoke size).
4. Budget: before each speed row the time it needs is estimated (the slowest jax row so far, else a prior), and
   a row that would end after --budget_s is skipped with a note, so the run always ends and writes its tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform as platform_lib
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the GPU image has no pip-installed dpo_jax
  sys.path.insert(0, ROOT)

# Before jax is imported. Without preallocation jax takes device memory as it needs it, so the torch row (run
# first) finds the GPU free; jax then keeps what it took until the process ends.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

from dpo_jax.train import host_memory  # noqa: E402  (imports no jax)

host_memory.configure_at_startup()  # as the trainer's entry point: glibc keeps freed memory on CPU-only runs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import dpo_step as bench  # noqa: E402
from benchmarks import rollout_throughput  # noqa: E402

ROLLOUT_MIN_S = 90.0  # budget left for the rollout section (two sizes x two batches, each with HF generate)
from dpo_jax import attention, flops, logprobs, model as model_lib, step  # noqa: E402

# configs/default.py's `tiny` model, written out (configs/*.py need ml_collections).
TINY_MODEL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_embeddings=True)
LOSS = bench.LOSS  # sigmoid DPO, beta 0.1
FP32_RTOL = 1e-5  # accelerator vs CPU in fp32: only summation order differs
MARGIN_SIGN_MIN = 0.9  # bf16: the fraction of pairs whose DPO margin keeps its fp32 sign
PERTURBATION = 1.0  # policy = reference + PERTURBATION * initializer_range * N(0, 1), per parameter

RUN_ORDER = ("torch", "jax-remat", "jax", "jax-preref", "jax-xla")  # torch first: it frees its memory, jax never
TABLE_ORDER = ("jax", "jax-remat", "jax-preref", "jax-xla", "torch")
JAX_ROWS = {"jax": {}, "jax-remat": {"remat": "full"}, "jax-preref": {}, "jax-xla": {"attention_impl": "xla"}}
# Section 2b, in run and table order (the dense one-hot path holds E / k times the expert activations: last).
MOE_ROWS = {"moe-ragged": {"moe_impl": "ragged"}, "moe-dense": {"moe_impl": "dense"}}
ROW_SUFFIX = {"jax-remat": " remat", "jax-preref": " preref", "moe-ragged": " MoE ragged",
              "moe-dense": " MoE dense one-hot"}
# Expert fields added to a dense shape: Mixtral's 8 experts, top-2, and configs/default.py's `:moe` aux coefficient.
MOE_FIELDS = dict(num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001)
MOE_CHECK = dict(num_layers=2, moe_impl="ragged")  # the correctness rows' `moe` model: 2 of its 4 layers (compiles)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything --smoke shrinks."""
  check_pairs: int  # pairs in the correctness batch
  check_length: int  # tokens per prompt + response in it
  speed_model: dict  # ModelConfig fields of the speed model
  moe_model: dict  # ModelConfig fields of section 2b's MoE model
  speed_pairs: int
  speed_length: int  # tokens per prompt + response (a quarter prompt, `bench.make_batch`)
  logits_chunk: int | str  # model.logits_chunk_size
  repeats: int  # timed steps per row
  prior_row_s: float  # budget estimate of a row before any row has been timed, seconds
  hf_type: str = "llama"  # the torch row's transformers family (benchmarks/dpo_step.py's HF_TYPES)


FULL = Sizes(check_pairs=32, check_length=64, speed_model=dict(bench.CONFIGS["llama-3.2-1b"][0]),
             moe_model=dict(bench.CONFIGS["small"][0], **MOE_FIELDS, moe_intermediate_size=2816),  # ~0.6B params
             speed_pairs=4, speed_length=2048, logits_chunk="auto", repeats=5, prior_row_s=90.0)
SMOKE = Sizes(check_pairs=32, check_length=64,
              speed_model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=2, tie_embeddings=True),  # tied, as the released shapes are
              moe_model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, tie_embeddings=True, **MOE_FIELDS, moe_intermediate_size=32),
              speed_pairs=2, speed_length=128, logits_chunk=32, repeats=2, prior_row_s=20.0)


# ---- numbers ----

def max_rel_error(a: Any, b: Any) -> float:
  """max_i |a_i - b_i| / |b_i| of two same-shape arrays (b the reference; NaN anywhere gives NaN)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def tree_rel_error(a: Any, b: Any) -> float:
  """max over leaves of ||a - b||_2 / ||b||_2 (norm-wise: a gradient entry near 0 has no useful relative error)."""
  def one(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
  return float(max(one(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def check_row(quantity: str, value: float, op: str, tolerance: float, note: str = "") -> dict:
  """A correctness row: passes when `value op tolerance` ('<=' an error bound, '>=' a fraction); NaN fails."""
  passed = bool(value <= tolerance if op == "<=" else value >= tolerance) and math.isfinite(value)
  return dict(quantity=quantity, value=value, op=op, tolerance=tolerance, passed=passed, note=note)


def finite_or_none(x: Any) -> Any:
  """JSON has no NaN / inf: those become null, recursively."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite_or_none(v) for v in x]
  return x


# ---- 1. correctness ----

def tiny_config(**overrides: Any) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(**TINY_MODEL, **{"matmul_precision": "highest", **overrides})


def perturbed(params: Any, scale: float, seed: int) -> Any:
  """`params` (host arrays) + scale * initializer_range * N(0, 1) per entry: a policy near its reference."""
  rng = np.random.default_rng(seed)
  std = model_lib.ModelConfig.initializer_range
  return jax.tree.map(lambda x: (x + scale * std * rng.standard_normal(x.shape)).astype(x.dtype), params)


def dpo_quantities(cfg: model_lib.ModelConfig, policy: Any, reference: Any, batch: dict[str, np.ndarray],
                   device: jax.Device) -> dict[str, Any]:
  """On `device`, in one jitted program of the trainer's functions: the policy's and the reference's sequence
  log-probs `[2B]` (nats, pairs interleaved), the DPO loss `[]` (`step.dpo_loss`, mean over pairs) and its
  gradient in the policy params. Returned as host arrays."""
  model = model_lib.make_model(cfg)
  pairs = batch["input_ids"].shape[0] // 2

  def run(p, r, b):
    ref_Bx2 = step.reference_logps(model, r, b)
    (loss, _), grads = jax.value_and_grad(step.dpo_loss, has_aux=True)(
        p, ref_Bx2, b, model=model, loss_cfg=LOSS, total_weight=jnp.float32(pairs))
    return dict(policy_logps=logprobs.sequence_logps(model, p, b).logps, reference_logps=ref_Bx2.reshape(-1),
                loss=loss, grads=grads)

  return jax.device_get(jax.jit(run)(*jax.device_put((policy, reference, batch), device)))


def margins(q: dict[str, Any]) -> np.ndarray:
  """DPO margins `[B]` (nats): (pi - ref) on chosen minus (pi - ref) on rejected."""
  ratio_2B = np.asarray(q["policy_logps"], np.float64) - np.asarray(q["reference_logps"], np.float64)
  return ratio_2B[0::2] - ratio_2B[1::2]


def kernel_of(cfg: model_lib.ModelConfig, batch: dict[str, Any]) -> str:
  """The attention kernel `attention.choose` picks for the responses of a shared-prompt `batch` under `cfg`."""
  n, r = batch["input_ids"].shape
  p = batch["prompt_ids"].shape[1] if "prompt_ids" in batch else 0
  return attention.choose(cfg, (n, r, cfg.num_heads, cfg.resolved_head_dim), p + r, jnp.dtype(cfg.compute_dtype))


def guarded(rows: list[dict], what: str, compare: Callable[[], list[dict]]) -> None:
  """`rows += compare()`; an exception (a kernel that fails to compile, say) becomes one failed row instead, so
  the other comparisons still run."""
  try:
    rows += compare()
  except Exception as e:
    rows.append(check_row(what, math.nan, "<=", 0.0, f"{type(e).__name__}: {first_line(e)}"))


def first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def correctness(sizes: Sizes) -> dict:
  """Section 1 (module docstring): rows of (quantity, error, tolerance, pass) and notes."""
  acc = jax.devices()[0]
  notes = []
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:
    cpu, notes = None, ["no CPU backend in this process (JAX_PLATFORMS excludes it): fp32 rows not run"]
  fp32_acc, fp32_cpu = tiny_config(), tiny_config(platform="cpu")
  bf16_acc = tiny_config(compute_dtype="bfloat16", matmul_precision="default")
  with jax.default_device(cpu or acc):  # the same host params for every device
    reference = jax.device_get(model_lib.init_params(fp32_acc, jax.random.key(0)))
  policy = perturbed(reference, PERTURBATION, seed=1)
  batch = bench.shared_prompt_batch(bench.make_batch(fp32_acc, sizes.check_pairs, sizes.check_length, seed=2),
                                    sizes.check_length)
  notes.append(f"accelerator: {acc.device_kind} ({acc.platform})"
               + (" -- no accelerator in this run: 'accelerator vs CPU' compares the CPU with itself (trivial; "
                  "it exercises the code path)" if acc.platform == "cpu" else ""))
  notes.append(f"tiny model {TINY_MODEL}, {sizes.check_pairs} pairs of {sizes.check_length} tokens (prompt "
               f"{sizes.check_length // 4}, shared-prompt layout), policy = reference + {PERTURBATION} x "
               f"{model_lib.ModelConfig.initializer_range} x N(0, 1)")
  rows: list[dict] = []
  fp32: dict[str, Any] = {}

  def fp32_rows() -> list[dict]:
    fp32["acc"] = q_acc = dpo_quantities(fp32_acc, policy, reference, batch, acc)
    if cpu is None:
      return []
    q_cpu = dpo_quantities(fp32_cpu, policy, reference, batch, cpu)
    notes.append(f"fp32 attention kernels: {kernel_of(fp32_acc, batch)} on the accelerator, "
                 f"{kernel_of(fp32_cpu, batch)} on the CPU (each backend's own); matmul_precision='highest'")
    logps = lambda q: np.concatenate([q["policy_logps"], q["reference_logps"]])
    return [
        check_row("fp32 sequence log-probs, accelerator vs CPU (max rel)", max_rel_error(logps(q_acc), logps(q_cpu)),
                  "<=", FP32_RTOL),
        check_row("fp32 DPO loss, accelerator vs CPU (rel)", max_rel_error(q_acc["loss"], q_cpu["loss"]), "<=",
                  FP32_RTOL, f"loss {float(q_cpu['loss']):.6f} nats"),
        check_row("fp32 DPO grads, accelerator vs CPU (max over leaves of |d|/|g|)",
                  tree_rel_error(q_acc["grads"], q_cpu["grads"]), "<=", FP32_RTOL),
    ]

  def bf16_rows() -> list[dict]:
    q32 = fp32.get("acc") or dpo_quantities(fp32_acc, policy, reference, batch, acc)
    q16 = dpo_quantities(bf16_acc, policy, reference, batch, acc)
    notes.append(f"bf16 (fp32 params) attention kernel on the accelerator: {kernel_of(bf16_acc, batch)}")
    m32, m16 = margins(q32), margins(q16)
    logps = lambda q: np.concatenate([q["policy_logps"], q["reference_logps"]])
    return [
        check_row("bf16 vs fp32 sequence log-probs, accelerator (max rel)", max_rel_error(logps(q16), logps(q32)),
                  "<=", logprobs.BF16_LOGPS_RTOL),
        check_row("bf16 vs fp32 DPO margin sign kept (fraction of pairs)",
                  float(np.mean(np.sign(m16) == np.sign(m32))), ">=", MARGIN_SIGN_MIN,
                  f"fp32 |margin|: min {np.min(np.abs(m32)):.3g}, median {np.median(np.abs(m32)):.3g} nats; max "
                  f"|bf16 - fp32| {np.max(np.abs(m16 - m32)):.3g}"),
    ]

  def moe_rows() -> list[dict]:
    ragged = model_lib.ModelConfig(**dict(bench.CONFIGS["moe"][0], **MOE_CHECK), matmul_precision="highest")
    with jax.default_device(cpu or acc):
      moe_reference = jax.device_get(model_lib.init_params(ragged, jax.random.key(3)))
    moe_policy = perturbed(moe_reference, PERTURBATION, seed=4)
    moe_batch = bench.shared_prompt_batch(bench.make_batch(ragged, sizes.check_pairs, sizes.check_length, seed=5),
                                          sizes.check_length)
    q_ragged = dpo_quantities(ragged, moe_policy, moe_reference, moe_batch, acc)
    q_dense = dpo_quantities(dataclasses.replace(ragged, moe_impl="dense"), moe_policy, moe_reference, moe_batch, acc)
    notes.append(f"MoE rows: benchmarks/dpo_step.py's `moe` model (configs/default.py's :moe: "
                 f"{ragged.num_experts} experts of width {ragged.resolved_moe_intermediate_size}, "
                 f"top-{ragged.num_experts_per_tok}) with {ragged.num_layers} layers, fp32, "
                 f"matmul_precision='highest', the same pairs' shape; the loss adds "
                 f"{step.router_coefs(LOSS, ragged)[0]:g} x the router aux loss")
    logps = lambda q: np.concatenate([q["policy_logps"], q["reference_logps"]])
    return [
        check_row("MoE fp32 sequence log-probs, ragged vs dense one-hot, accelerator (max rel)",
                  max_rel_error(logps(q_ragged), logps(q_dense)), "<=", FP32_RTOL,
                  f"loss {float(q_dense['loss']):.6f} nats"),
        check_row("MoE fp32 DPO + router aux grads, ragged vs dense one-hot, accelerator (max over leaves of "
                  "|d|/|g|)", tree_rel_error(q_ragged["grads"], q_dense["grads"]), "<=", FP32_RTOL),
    ]

  guarded(rows, "fp32, accelerator vs CPU", fp32_rows)
  guarded(rows, "bf16 vs fp32, accelerator", bf16_rows)
  guarded(rows, "MoE ragged vs dense, accelerator", moe_rows)
  return dict(rows=rows, notes=notes)


# ---- 2. speed ----

def speed_config(sizes: Sizes, layers: int | None, model: dict | None = None,
                 **overrides: Any) -> model_lib.ModelConfig:
  """The speed model (`model`: other ModelConfig fields, e.g. `sizes.moe_model`) in bf16 compute, fp32 params."""
  fields = dict(model or sizes.speed_model, **({"num_layers": layers} if layers else {}))
  return model_lib.ModelConfig(**fields, compute_dtype="bfloat16", param_dtype="float32", scan_layers=True,
                               logits_chunk_size=sizes.logits_chunk, **overrides)


def device_peak_bytes() -> float:
  """The process's peak device memory so far (jax's allocator), NaN where the backend reports none (CPU)."""
  stats = jax.devices()[0].memory_stats()
  return float(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else math.nan


def torch_device() -> str | None:
  """Where the torch row runs: 'cuda' beside a jax GPU, 'cpu' beside a jax CPU; None = nowhere sensible."""
  import torch
  if jax.default_backend() == "gpu":
    return "cuda" if torch.cuda.is_available() else None
  return "cpu"


def free_memory() -> None:
  """Drop every step's device buffers and compiled programs before the next row."""
  bench.JaxStep.clear_references()
  gc.collect()
  jax.clear_caches()
  import torch
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def timed(impl: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
  """(the warm-up step's loss, `repeats` step times in seconds); each call blocks until its step is done."""
  first_loss = impl()
  return first_loss, [bench.time_once(impl) for _ in range(repeats)]


def run_jax_row(key: str, sizes: Sizes, layers: int | None, params: Any, rows_batch: dict[str, np.ndarray],
                model: dict | None = None) -> dict:
  """Row `key` of `JAX_ROWS` (or of `MOE_ROWS`, on the `model` fields): build + compile `JaxStep`, one warm-up
  step, `sizes.repeats` timed steps."""
  cfg = speed_config(sizes, layers, model, **(JAX_ROWS[key] if key in JAX_ROWS else MOE_ROWS[key]))
  shared = bench.shared_prompt_batch(rows_batch, sizes.speed_length)
  kernel = kernel_of(cfg, shared)
  t0 = time.perf_counter()
  impl = bench.JaxStep(cfg, params, shared, precomputed_reference=key == "jax-preref")
  build_s = time.perf_counter() - t0
  loss, times = timed(impl, sizes.repeats)
  out = dict(label=f"jax {kernel}" + ROW_SUFFIX.get(key, ""),
             attention=kernel, build_s=build_s, first_loss=loss, times=times, device_peak_bytes=device_peak_bytes(),
             compiled_bytes=float(impl.peak_bytes()),
             step_flops=flops.train_step_flops(cfg, shared, reference=key != "jax-preref"))
  del impl
  return out


def run_torch_row(sizes: Sizes, layers: int | None, params: Any, rows_batch: dict[str, np.ndarray]) -> dict:
  """The torch row: HF Llama, SDPA, fp32 weights under bf16 autocast, on `[2B, T]` rows."""
  import torch
  device = torch_device()
  if device is None:
    raise RuntimeError("jax runs on a GPU but torch sees no CUDA device; a 1B torch step on the host is no baseline")
  cfg = speed_config(sizes, layers)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  impl = bench.TorchStep(cfg, params, rows_batch, "bf16", device=device, model_type=sizes.hf_type)
  build_s = time.perf_counter() - t0
  loss, times = timed(impl, sizes.repeats)
  peak = float(torch.cuda.max_memory_allocated()) if device == "cuda" else math.nan
  del impl
  return dict(label=f"torch {sizes.hf_type} ({device}, sdpa, fp32 weights + bf16 autocast)", attention="sdpa", build_s=build_s,
              first_loss=loss, times=times, device_peak_bytes=peak, compiled_bytes=math.nan,
              step_flops=flops.train_step_flops(cfg, rows_batch, reference=True))


def estimate_s(key: str, done: list[dict], sizes: Sizes) -> float:
  """Seconds row `key` is expected to take: 1.2 x the slowest jax row so far (for a jax row), else the prior."""
  jax_s = [r["total_s"] for r in done if r["key"] != "torch" and r["status"] == "ok"]
  return 1.2 * max(jax_s) if key != "torch" and jax_s else sizes.prior_row_s


def new_section(cfg: model_lib.ModelConfig, sizes: Sizes, layout: str, notes: list[str]) -> tuple[Any, dict, dict]:
  """(host params, `[2B, T]` pairs, an empty speed section whose notes describe `cfg`, the batch (`layout`: how
  the rows lay it out), the timing, then `notes`) of a speed section on `cfg`."""
  with jax.default_device(jax.devices("cpu")[0]):  # host params, shared by every row: nothing left on the GPU
    params = jax.device_get(model_lib.init_params(cfg, jax.random.key(0)))
  rows_batch = bench.make_batch(cfg, sizes.speed_pairs, sizes.speed_length)
  peak, peak_source = flops.peak_flops(jax.devices()[0])
  tokens = 2 * sizes.speed_pairs * sizes.speed_length
  n_params = model_lib.count_params(params)
  section = dict(rows=[], notes=[
      f"model: {n_params / 1e6:,.1f}M params ({cfg.num_layers} layers, hidden "
      f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv), bf16 compute, "
      f"fp32 params + AdamW, scan_layers, logits_chunk_size {cfg.logits_chunk_size}",
      f"batch: {sizes.speed_pairs} pairs x {sizes.speed_length} tokens (prompt {sizes.speed_length // 4}; "
      f"{layout}); tokens/s counts {tokens} tokens per step",
      f"step time: median of {sizes.repeats} after 1 warm-up step; MFU against {peak / 1e12:.1f} TFLOP/s "
      f"({peak_source})"] + notes, peak_flops=peak, peak_source=peak_source, tokens_per_step=tokens, params=n_params)
  return params, rows_batch, section


def run_rows(section: dict, keys: tuple[str, ...], run_one: Callable[[str], dict], sizes: Sizes, deadline: float,
             on_row: Callable[[dict], None], finish: Callable[[dict], None]) -> dict:
  """Each of `keys` through `run_one(key)` unless its estimate (`estimate_s`) would end after `deadline`; an error is
  recorded in its row; after every row `finish(section)` and `on_row(section)`, so partial results are written."""
  for key in keys:
    left, need = deadline - time.perf_counter(), estimate_s(key, section["rows"], sizes)
    row = dict(key=key, label=key, status="ok", note="")
    if need > left:
      row.update(status="skipped", note=f"skipped: needs ~{need:.0f} s, {max(left, 0):.0f} s of the budget left")
    else:
      t0 = time.perf_counter()
      try:
        row.update(run_one(key))
      except Exception as e:  # an OOM or a kernel that fails: recorded, and the next row still runs
        row.update(status="error", note=f"{type(e).__name__}: {first_line(e)}")
      free_memory()
      row["total_s"] = time.perf_counter() - t0
    section["rows"].append(row)
    print(f"  {key}: {row['status']} {row['note']} ({row.get('total_s', 0):.0f} s)", flush=True)
    finish(section)
    on_row(section)
  return section


def speed(sizes: Sizes, layers: int | None, deadline: float, on_row: Callable[[dict], None]) -> dict:
  """Section 2 (module docstring); `on_row(section)` after every row, so partial results are written."""
  cfg = speed_config(sizes, layers)
  params, rows_batch, section = new_section(cfg, sizes, "jax: shared-prompt layout, torch: [2B, T] rows", [
      "device peak: jax = the process's peak so far (jax cannot reset it; run order: " + ", ".join(RUN_ORDER)
      + "), torch = its row's max_memory_allocated; compiled = args + temps + outputs - aliased"])
  run_one = lambda key: (run_torch_row(sizes, layers, params, rows_batch) if key == "torch"
                         else run_jax_row(key, sizes, layers, params, rows_batch))
  return run_rows(section, RUN_ORDER, run_one, sizes, deadline, on_row, finish_speed_rows)


def moe_speed(sizes: Sizes, deadline: float, on_row: Callable[[dict], None]) -> dict:
  """Section 2b (module docstring): `MOE_ROWS` on `sizes.moe_model`; `on_row(section)` after every row."""
  cfg = speed_config(sizes, None, sizes.moe_model)
  params, rows_batch, section = new_section(cfg, sizes, "shared-prompt layout", [
      f"experts: {cfg.num_experts} of width {cfg.resolved_moe_intermediate_size} in every layer, top-"
      f"{cfg.num_experts_per_tok} ({flops.active_params(cfg) / 1e6:,.1f}M params active per token); the objective "
      f"adds {step.router_coefs(LOSS, cfg)[0]:g} x the router aux loss; MFU counts the routed experts (model FLOPs)",
      "device peak: the process's peak so far (after section 2's rows); compiled = args + temps + outputs "
      "- aliased"])
  run_one = lambda key: run_jax_row(key, sizes, None, params, rows_batch, sizes.moe_model)
  finish = lambda sec: finish_speed_rows(sec, base="moe-dense", ratio="vs_dense", order=tuple(MOE_ROWS))
  return run_rows(section, tuple(MOE_ROWS), run_one, sizes, deadline, on_row, finish)


def finish_speed_rows(section: dict, base: str = "torch", ratio: str = "vs_torch",
                      order: tuple[str, ...] = TABLE_ORDER) -> None:
  """Derived columns of the timed rows: median, tokens/s, MFU, `ratio` = row `base`'s time / this row's (x torch);
  rows put in `order`."""
  for r in section["rows"]:
    if r["status"] == "ok":
      r["step_s"] = statistics.median(r["times"])
      r["tokens_per_s"] = section["tokens_per_step"] / r["step_s"]
      r["mfu"] = flops.mfu(r["step_flops"], r["step_s"], section["peak_flops"], 1)
  base_s = next((r["step_s"] for r in section["rows"] if r["key"] == base and r["status"] == "ok"), math.nan)
  for r in section["rows"]:
    if r["status"] == "ok":
      r[ratio] = base_s / r["step_s"]
  section["rows"].sort(key=lambda r: order.index(r["key"]))


# ---- output ----

def md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def fmt_bytes(b: float | None) -> str:
  return "n/a" if b is None or not math.isfinite(b) else f"{b / 2 ** 30:.2f} GiB"


def fmt(x: float | None, spec: str) -> str:
  return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def speed_cells(r: dict, ratio: str = "vs_torch") -> list[str]:
  """One speed row of tables.md (`ratio`: the x torch column's key); a skipped or failed row shows its status and
  note only."""
  if r["status"] != "ok":
    return [r["label"], "", r["status"]] + [""] * 7 + [r["note"]]
  return [r["label"], r["attention"], f"{r['step_s']:.4f}", f"{min(r['times']):.4f}-{max(r['times']):.4f}",
          fmt(r["tokens_per_s"], ",.0f"), fmt(100 * r["mfu"], ".1f") + "%", fmt_bytes(r["device_peak_bytes"]),
          fmt_bytes(r["compiled_bytes"]), fmt(r[ratio], ".2f"), f"{r['build_s']:.1f}", r["note"]]


def render(results: dict) -> str:
  """tables.md: the header, then one section per part that has run."""
  h = results["header"]
  out = ["# Device check", "", f"jax {h['jax']} (jaxlib {h['jaxlib']}), torch {h['torch']}, transformers "
         f"{h['transformers']}, python {h['python']}; backend {h['backend']}, {h['device_count']} x "
         f"{h['device_kind']}; {'--smoke' if h['smoke'] else 'full sizes'}, budget {h['budget_s']:.0f} s", ""]
  c = results.get("correctness")
  if c is not None:
    out += ["## 1. Correctness", ""] + [f"- {n}" for n in c["notes"]] + [""]
    out.append(md_table(["quantity", "error / value", "tolerance", "pass", "note"], [
        [r["quantity"], fmt(r["value"], ".3g"), f"{r['op']} {r['tolerance']:g}", "pass" if r["passed"] else "FAIL",
         r["note"]] for r in c["rows"]]))
    out.append("")
  s = results.get("speed")
  if s is not None:
    out += ["## 2. Speed: one DPO train step", ""] + [f"- {n}" for n in s["notes"]] + [""]
    out.append(md_table(["row", "attention", "step s", "min-max s", "tokens/s", "MFU", "device peak", "compiled",
                         "x torch", "build s", "note"], [speed_cells(r) for r in s["rows"]]))
    out.append("")
  m = results.get("moe_speed")
  if m is not None:
    out += ["## 2b. Speed: MoE DPO step, ragged vs dense one-hot", ""] + [f"- {n}" for n in m["notes"]] + [""]
    out.append(md_table(["row", "attention", "step s", "min-max s", "tokens/s", "MFU", "device peak", "compiled",
                         "x dense", "build s", "note"], [speed_cells(r, "vs_dense") for r in m["rows"]]))
    out.append("")
  if results.get("rollout"):  # rollout_throughput.py's report, its title one level down
    out += ["## 3. Rollouts: " + results["rollout"].lstrip("# ")]
  if results.get("errors"):
    out += ["## Errors", ""] + [f"- {e}" for e in results["errors"]] + [""]
  out.append(f"elapsed {results['elapsed_s']:.1f} s{'' if results['complete'] else ' (incomplete)'}")
  return "\n".join(out) + "\n"


def write(out_dir: str, results: dict, start: float) -> str:
  """Write tables.md and results.json (again: each call replaces both) -> the markdown."""
  results["elapsed_s"] = time.perf_counter() - start
  os.makedirs(out_dir, exist_ok=True)
  text = render(results)
  with open(os.path.join(out_dir, "tables.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(finite_or_none(results), f, indent=1)
  return text


def header(args: argparse.Namespace) -> dict:
  import jaxlib
  import torch
  import transformers
  d = jax.devices()[0]
  return dict(jax=jax.__version__, jaxlib=jaxlib.__version__, torch=torch.__version__,
              transformers=transformers.__version__, python=platform_lib.python_version(),
              backend=jax.default_backend(), device_kind=d.device_kind, device_count=jax.device_count(),
              smoke=args.smoke, budget_s=args.budget_s, argv=sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.environ.get("OUT") or "device_check_out",
                      help="folder for tables.md and results.json (default: $OUT, else ./device_check_out)")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="seconds the whole run may take; speed rows that would end later are skipped")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU run in under a minute")
  parser.add_argument("--shape", default="llama-3.2-1b", help="the speed model, one of benchmarks/dpo_step.py's "
                      f"CONFIGS {sorted(bench.CONFIGS)} (full sizes only; --smoke keeps its own)")
  parser.add_argument("--pairs", type=int, default=0, help="speed batch in pairs (0: 4, --smoke 2)")
  parser.add_argument("--layers", type=int, default=0, help="speed model layers (0: the shape's, --smoke 2)")
  parser.add_argument("--repeats", type=int, default=0, help="timed steps per speed row (0: 5, --smoke 2)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  if args.shape not in bench.CONFIGS:
    parser.error(f"--shape {args.shape!r}: choose one of {sorted(bench.CONFIGS)}")
  sizes = SMOKE if args.smoke else dataclasses.replace(FULL, speed_model=dict(bench.CONFIGS[args.shape][0]),
                                                       hf_type=bench.HF_TYPES.get(args.shape, "llama"))
  sizes = dataclasses.replace(sizes, speed_pairs=args.pairs or sizes.speed_pairs,
                              repeats=args.repeats or sizes.repeats)
  results = dict(header=header(args), complete=False, errors=[])
  print(write(args.out, results, start), flush=True)
  try:
    results["correctness"] = correctness(sizes)
  except Exception as e:  # still time the step: a broken comparison says nothing about speed
    results["errors"].append(f"correctness: {type(e).__name__}: {e}")
  print(write(args.out, results, start), flush=True)

  def on_row(section: dict) -> None:
    results["speed"] = section
    write(args.out, results, start)

  try:
    results["speed"] = speed(sizes, args.layers or None, start + args.budget_s, on_row)
  except Exception as e:
    results["errors"].append(f"speed: {type(e).__name__}: {e}")

  def on_moe_row(section: dict) -> None:
    results["moe_speed"] = section
    write(args.out, results, start)

  try:
    results["moe_speed"] = moe_speed(sizes, start + args.budget_s, on_moe_row)
  except Exception as e:
    results["errors"].append(f"moe speed: {type(e).__name__}: {e}")
  left = start + args.budget_s - time.perf_counter()
  if args.smoke or left >= ROLLOUT_MIN_S:
    folder = os.path.join(args.out, "rollout")
    try:
      rollout_throughput.main((["--smoke"] if args.smoke else []) + ["--out", folder])
      with open(os.path.join(folder, "rollout_throughput.md")) as f:
        results["rollout"] = f.read()
    except Exception as e:
      results["errors"].append(f"rollout: {type(e).__name__}: {e}")
  else:
    results["errors"].append(f"rollout: skipped, {left:.0f} s of the budget left (< {ROLLOUT_MIN_S:.0f} s)")
  results["complete"] = True
  print(write(args.out, results, start), flush=True)
  failed = [r["quantity"] for r in results.get("correctness", {}).get("rows", []) if not r["passed"]]
  broken = [r["key"] for section in ("speed", "moe_speed") for r in results.get(section, {}).get("rows", [])
            if r["status"] == "error"]
  return 1 if failed or broken or results["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
