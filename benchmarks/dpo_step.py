"""One DPO train step, dpo_jax vs PyTorch, timed in one run on the same weights and the same token batches.

    PYTHONPATH=. python benchmarks/dpo_step.py [--configs tiny,small] [--repeats 5] [--dtype fp32|bf16]
        [--remat none|full|dots_saveable] [--full_attention] [--xla_weight_grad] [--skip torch,trl] [--breakdown]
        [--config 1b] [--cpu_devices 2] [--profile] [--host_malloc auto|keep|system] [--baseline_malloc system]
        [--no-isolate]

Each implementation runs in a spawned process of its own (`--isolate`, the default), as its own training program
would: its own glibc heap, thread pools and memory. In one shared process they interfere: torch's idle threads
spin beside XLA's, and one heap serves both, so buffers one frees are fragmented by the other's. The parent asks
each process for one step at a time, so the repeats still interleave. Every process holds its own state: on the
small config, 24 GB of RAM fits two (e.g. `--skip jax-rows,jax-preref,trl`).

Implementations (each timed after warm-up; the repeats interleave them so a noisy, shared machine slows all alike):
  jax          `step.train_step` jitted by `step.jit_train_step` on a 1-device mesh, as `train.run_dpo` runs it:
               policy forward + backward, frozen reference forward, sigmoid DPO loss (beta 0.1), clip + AdamW, on
               the batch layout the trainer picks for these pairs (`data.prompt_sharing='auto'`): each pair's
               prompt held once, `[B, P]`, and the two responses `[2B, R]` (`preference.shared_prompt_rows`).
  jax-rows     the same step on the `[2B, T]` rows prompt + response (`data.prompt_sharing='off'`), the layout
               the baselines use: every prompt computed twice and the LM head run on prompt positions too.
  jax-dpN      (`--cpu_devices N`, N > 1) the `jax` step on an N-device `data` mesh: the batch split over
               N emulated CPU devices, e.g. one per core.
  jax-preref   the `jax` step with `reference_params=None` and precomputed `ref_chosen_logps` /
               `ref_rejected_logps` in the batch (no reference forward): the saving of `stage=precompute`.
  torch        a plain PyTorch DPO step: HF `LlamaForCausalLM` with the same weights, one concatenated forward
               over chosen and rejected, the reference under `torch.no_grad`, log_softmax + gather, sigmoid loss,
               `clip_grad_norm_` + `torch.optim.AdamW`.
  trl          TRL's `DPOTrainer.training_step` (its `_compute_loss`: policy forward with TRL's fused LM-head
               log-probs, reference forward under no_grad, sigmoid loss, backward) followed by the trainer's
               own optimizer step (clip + AdamW) and `zero_grad`; only when `trl` is importable.
All of them compute the same loss on the same pairs (the first step's loss, log 2, is printed for each).

Mixture-of-experts configs (`--config moe`: configs/default.py's `:moe` model, Mixtral-shaped: 8 SwiGLU experts of
width 88 per layer, top-2, renormalised) time four rows by default (`--skip torch` drops the last):
  jax          the `jax` step with `model.moe_impl='auto'`: dropless, 'tiled' on CPU (the sorted tokens in
               fixed-size tiles, one batched matmul), 'ragged' on GPU / TPU
  jax-ragged   the same with `moe_impl='ragged'` (`jax.lax.ragged_dot`; the `ragged` entry of VARIANTS)
  jax-dense    the same with `moe_impl='dense'` (every expert on every token, one-hot combine: E / k times the
               experts' FLOPs); the `dense` entry of VARIANTS
  torch        the torch step on transformers' `MixtralForCausalLM` with the same weights (`_fused_experts`; its
               default experts_implementation, printed), the policy forward with `output_router_logits=True`
All four add router_aux_coef x the load-balancing loss of the policy's forward (transformers'
`load_balancing_loss_func`) to the DPO loss, with one coefficient (`step.router_coefs`: LOSS's `router_aux_coef`,
None = the config's `router_aux_loss_coef`, 0.001); the first-step aux loss of each row is printed. The jax rows
count the router over the shared-prompt layout's tokens (each prompt once), torch over its `[2B, T]` rows. jax-rows,
jax-preref and TRL are not run for MoE configs. FLOPs and MFU count the router and the k routed experts
(`flops.layer_matmul_params`: model FLOPs, also for jax-dense, which executes E experts; see its XLA cost line).

Columns: median step time (s) and the spread of the repeats (each repeat's `torch / this` ratio is printed too:
adjacent measurements, so a machine that slows down mid-run moves it less); tokens/s = 2B * T tokens of the pairs
per step (the same count for every implementation, whatever its layout); `x torch` / `x trl` = baseline time / this
time (> 1: this is faster); MFU = the FLOPs this implementation computes / median step time / peak, where peak is
the best matmul FLOP/s measured in this run (a 4096^3 fp32 or bf16 matmul in JAX and in torch, before every config
and at the end, the max of all taken: a measurement in a busy moment would understate it); peak memory: JAX = the
compiled step's arguments + temporaries + non-aliased outputs (`compiled.memory_analysis()`); torch = bytes of the
policy and reference params + the peak rise of the process RSS during the first (warm-up) step, sampled every
millisecond after `malloc_trim`, which holds AdamW's new moments, the gradients and the activations.

`--full_attention` adds `jax-fullattn`: the jax step with attention as one block per head (the program
before `attention.blocked_attention` split queries into blocks). `--xla_weight_grad` adds `jax-xlawgrad`: the jax
step with `model.weight_grad_gemm='xla'` (XLA's own layout for the projections' weight gradients; on CPU the
default is 'row_major'). `--breakdown` times pieces of the jax step instead;
`--profile` traces it (`jax.profiler`) and prints the XLA op time summed by op kind instead.
`--host_malloc` sets glibc's allocator of the jax processes: 'auto' (the default, as `python -m dpo_jax.train`
does) keeps freed memory for reuse on CPU (`dpo_jax/train/host_memory.py`), 'system' leaves glibc's defaults, under
which every XLA:CPU step faults its large buffers in again. `--baseline_malloc` sets it for torch and TRL:
'system' by default, what a PyTorch program runs with (on the small config torch's step also ran faster with
'keep' here: compare both). With `--no-isolate` the one process gets --host_malloc.

FLOPs counted per step: policy forward + backward = 3 forwards, plus 1 reference forward (0 for jax-preref). One
forward over N rows of T tokens is 2 * (matmul params) * N * T + 4 * layers * N * T^2 * (heads * head_dim) (QK^T
and PV over the full causal square, as the baselines compute it; dpo_jax's query-blocked attention skips the key
blocks above the diagonal, so it does fewer: see the XLA cost-analysis line); the shared-prompt layout computes
B * P + 2B * R tokens, the LM head on the 2B * R scored positions only, and attention over P x P (prompts) and
R x (P + R) (responses). Embedding lookups, norms, softmax and the optimizer are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

if __name__ == "__main__" and "--cpu_devices" in sys.argv:  # XLA reads this once, when jax is first imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                             + sys.argv[sys.argv.index("--cpu_devices") + 1]).strip()

from dpo_jax.train import host_memory  # noqa: E402  (imports no jax)


def _host_malloc_flag(argv: list[str]) -> str:
  """--host_malloc's value, read before argparse: the allocator is set before jax starts its threads."""
  for i, arg in enumerate(argv):
    if arg.startswith("--host_malloc="):
      return arg.split("=", 1)[1]
    if arg == "--host_malloc" and i + 1 < len(argv):
      return argv[i + 1]
  return "auto"


# The parent by --host_malloc; an `--isolate` worker (spawned: it imports this file as __mp_main__) by the mode
# its parent put in WORKER_MALLOC for it: --host_malloc for the jax rows, --baseline_malloc for torch and TRL.
WORKER_MALLOC = "DPO_BENCH_WORKER_MALLOC"
HOST_MALLOC_KEPT = (host_memory.configure(_host_malloc_flag(sys.argv), source="--host_malloc")
                    if __name__ == "__main__" else
                    host_memory.configure(os.environ[WORKER_MALLOC]) if __name__ == "__mp_main__" else False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import attention, flops as flops_lib, model as model_lib, moe, optim, platforms, sharding  # noqa: E402
from dpo_jax import step  # noqa: E402
from dpo_jax.interop import hf
from dpo_jax.data import preference  # noqa: E402

CONFIGS = {
    # name: (model fields, pairs per batch, tokens per sequence)
    "tiny": (dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                  num_kv_heads=2), 8, 256),
    "small": (dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16,
                   num_kv_heads=4), 4, 512),
    # Released models' shapes (their config.json; random weights): tied embeddings, GQA, Qwen2's q/k/v biases,
    # Llama 3's RoPE scaling, as the real checkpoints have them.
    "smollm2-135m": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True), 2, 512),
    "qwen2.5-0.5b": (dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                          num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True,
                          qkv_bias=True), 2, 512),
    "llama-3.2-1b": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                          num_kv_heads=8, rope_theta=500000.0, rope_scaling_type="llama3", rope_scaling_factor=32.0,
                          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_positions=8192,
                          rms_norm_eps=1e-5, tie_embeddings=True), 2, 512),
    # ~1.1B params (TinyLlama-1.1B's shape), meant for a GPU.
    "1b": (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                num_kv_heads=4), 8, 2048),
    # configs/default.py's `:moe` model (written out: no ml_collections here): Mixtral-shaped, every layer 8 experts
    # of width 88, top-2, tied embeddings; the `tiny` batch. Rows: jax (auto), jax-ragged, jax-dense, torch (Mixtral).
    "moe": (dict(vocab_size=256, hidden_size=128, intermediate_size=88, num_layers=4, num_heads=4, num_kv_heads=2,
                 tie_embeddings=True, num_experts=8, num_experts_per_tok=2, moe_impl="auto",
                 router_aux_loss_coef=0.001), 8, 256),
}
# The transformers family that builds a config's torch side (default 'llama'): Qwen2's q/k/v biases need 'qwen2'.
HF_TYPES = {"qwen2.5-0.5b": "qwen2", "moe": "mixtral"}
# Shapes whose rows do not all fit in 24 GB of RAM at once: their rows run one after another (`--one_at_a_time`).
LARGE = ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "1b")

# `--variants a,b,...`: more jax rows `jax-<name>`, each the `jax` step with one setting changed, measured in the same
# run as the default: (model field overrides, XLA flags of its worker process (XLA reads them once, at start-up),
# dpo_jax.attention constants while the step is traced).
VARIANTS = {
    "nochunk": (dict(logits_chunk_size=0), "", {}),  # the LM head on every position at once
    "chunk128": (dict(logits_chunk_size=128), "", {}),
    "remat": (dict(remat="full"), "", {}),
    "dots": (dict(remat="dots_saveable"), "", {}),
    # XLA:CPU's own op order (for concurrency), which dpo_jax's CPU programs turn off (train/host_memory.py)
    "concsched": ({}, "--xla_cpu_enable_concurrency_optimized_scheduler=true", {}),
    # attention storing each query block's probabilities for the backward instead of recomputing them (as before)
    "attnstore": ({}, "", dict(ATTENTION_BLOCK_RECOMPUTE=False)),
    "qblock128": ({}, "", dict(ATTENTION_QUERY_BLOCK=128)),
    # MoE configs only (run by default there): jax.lax.ragged_dot, and every expert on every token (one-hot combine)
    "ragged": (dict(moe_impl="ragged"), "", {}),
    "dense": (dict(moe_impl="dense"), "", {}),
}
BETA = 0.1
# configs/default.py's `loss` as a plain dict (no ml_collections: benchmarks/device_check.py runs this file's steps
# on a GPU image without it); `losses.from_config` and `step.train_step` read these fields.
LOSS = dict(type="sigmoid", beta=BETA, label_smoothing=0.0, types=(), weights=(), options={}, router_aux_coef=None,
            router_z_coef=0.0)
OPTIM = dict(learning_rate=1e-6, schedule="constant", warmup_steps=0, total_steps=1000, end_lr_ratio=1.0, b1=0.9,
             b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)


def model_config(name: str, dtype: str, remat: str) -> model_lib.ModelConfig:
  fields, _, _ = CONFIGS[name]
  compute = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
  return model_lib.ModelConfig(**fields, compute_dtype=compute, param_dtype="float32", remat=remat)


def make_batch(cfg: model_lib.ModelConfig, pairs: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens `[2B, T]`, pairs interleaved (row 2i chosen, 2i + 1 rejected), every position real; the
  first quarter of each row is a shared prompt, the rest the scored response (`loss_mask`)."""
  rng = np.random.default_rng(seed)
  ids_NxT = rng.integers(1, cfg.vocab_size, size=(2 * pairs, length), dtype=np.int32)
  prompt = length // 4
  ids_NxT[1::2, :prompt] = ids_NxT[0::2, :prompt]
  loss_mask_NxT = np.zeros_like(ids_NxT)
  loss_mask_NxT[:, prompt:] = 1
  return dict(input_ids=ids_NxT, attention_mask=np.ones_like(ids_NxT),
              positions=np.broadcast_to(np.arange(length, dtype=np.int32), ids_NxT.shape).copy(),
              loss_mask=loss_mask_NxT)


def shared_prompt_batch(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """`make_batch`'s pairs in the trainer's shared-prompt layout: prompts `[B, T / 4]`, responses `[2B, 3T / 4]`."""
  prompt = length // 4
  ids_NxT = batch["input_ids"]
  return preference.shared_prompt_rows(list(ids_NxT[0::2, :prompt]), list(ids_NxT[:, prompt:]), prompt_width=prompt,
                                       response_width=length - prompt, pad_id=0)


def matmul_params(cfg: model_lib.ModelConfig) -> int:
  """Parameters that enter a matmul per token (attention projections, MLP, LM head; not the embedding); an MoE
  layer counts its router and the k experts a token is routed to (`flops.layer_matmul_params`)."""
  return flops_lib.layer_matmul_params(cfg) + cfg.hidden_size * cfg.vocab_size


def forward_flops(cfg: model_lib.ModelConfig, rows: int, length: int) -> float:
  dense = 2.0 * matmul_params(cfg) * rows * length
  attention = 4.0 * cfg.num_layers * rows * length ** 2 * cfg.num_heads * cfg.resolved_head_dim
  return dense + attention


def shared_forward_flops(cfg: model_lib.ModelConfig, pairs: int, length: int) -> float:
  """`forward_flops` of the shared-prompt layout of `shared_prompt_batch` (see the module docstring)."""
  p, r = length // 4, length - length // 4
  head = cfg.hidden_size * cfg.vocab_size
  dense = 2.0 * (matmul_params(cfg) - head) * (pairs * p + 2 * pairs * r) + 2.0 * head * 2 * pairs * r
  width = 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim
  return dense + width * (pairs * p * p + 2 * pairs * r * (p + r))


def time_once(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# ---- peak matmul throughput ----

def measure_peak(dtype: str, repeats: int = 5) -> dict[str, float]:
  """Best FLOP/s of an n^3 matmul in JAX and in torch (2 n^3 FLOPs each), fp32 or bf16 inputs.

  n = 4096, except bf16 on a CPU (n = 1024): without bf16 units (AVX2 here) XLA emulates bf16 dots, and a 4096^3
  one ran for more than 10 minutes.
  """
  import torch
  n = 1024 if dtype == "bf16" and jax.default_backend() == "cpu" else 4096
  jdt = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
  tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
  a = jax.random.normal(jax.random.key(0), (n, n), jdt)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  jax_t = min(time_once(lambda: mm(a, a).block_until_ready()) for _ in range(repeats))
  ta = torch.randn(n, n, dtype=tdt)
  ta @ ta
  torch_t = min(time_once(lambda: ta @ ta) for _ in range(repeats))
  flops = 2.0 * n ** 3
  return {"jax": flops / jax_t, "torch": flops / torch_t}


# ---- dpo_jax ----

class JaxStep:
  """The dpo_jax train step as `train.run_dpo` builds it, on a mesh of `devices` local devices (data parallel)."""

  def __init__(self, cfg: model_lib.ModelConfig, params: Any, batch: dict[str, np.ndarray], *,
               precomputed_reference: bool, devices: int = 1):
    mesh = sharding.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:devices])
    rules = sharding.DEFAULT_RULES  # configs/default.py's SHARDING_RULES
    shard = sharding.ShardingContext(mesh, rules)
    model = model_lib.make_model(cfg, shard)
    optimizer, schedule = optim.make_optimizer(OPTIM)
    loss_cfg = dict(LOSS)
    shardings = step.state_shardings(cfg, optimizer, mesh, rules)
    batch = dict(batch)
    reference = None if precomputed_reference else self._reference(params, shardings.params, devices)
    if precomputed_reference:
      from dpo_jax import logprobs
      ref_logps = jax.jit(lambda p, b: logprobs.sequence_logps(model, p, b).logps)(params, batch)
      batch["ref_chosen_logps"] = np.asarray(ref_logps[0::2])
      batch["ref_rejected_logps"] = np.asarray(ref_logps[1::2])
    self.batch = sharding.global_batch(mesh, rules, batch)
    self.fn = step.jit_train_step(
        functools.partial(step.train_step, model=model, optimizer=optimizer, schedule=schedule, loss_cfg=loss_cfg,
                          shard=shard),
        state_shardings=shardings, reference_shardings=None if reference is None else shardings.params,
        batch_shardings=sharding.batch_shardings(mesh, rules, batch), mesh=mesh)
    self.reference = reference
    self.state = step.create_train_state(params, optimizer, shardings)
    self.compiled = self.fn.lower(self.state, reference, self.batch).compile()

  _references: dict = {}

  @classmethod
  def _reference(cls, params: Any, shardings: Any, devices: int) -> Any:
    """One device copy of the frozen reference per mesh, shared by the jax rows (the step never donates it):
    on the small config every copy is 0.6 GB of a 24 GB machine."""
    key = (id(params), devices)
    if key not in cls._references:
      cls._references[key] = jax.device_put(params, shardings)
    return cls._references[key]

  @classmethod
  def clear_references(cls) -> None:
    """Drop the shared reference copies (their device memory is freed once no step holds them)."""
    cls._references.clear()

  def __call__(self) -> float:
    self.state, self.metrics = self.compiled(self.state, self.reference, self.batch)
    return float(self.metrics["loss"])  # blocks until the step is done; the DPO loss, without router terms

  def router_aux(self) -> float:
    """The last step's load-balancing loss of the policy forward (`router/aux`; NaN for a dense model)."""
    return float(self.metrics.get("router/aux", float("nan")))

  def persistent_bytes(self) -> int:
    """The state (params, AdamW moments), pi_ref and the batch: resident before a step, as torch's params are."""
    return sum(x.nbytes for x in jax.tree.leaves((self.state, self.reference, self.batch)))

  def peak_bytes(self) -> int:
    m = self.compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)

  def cost_flops(self) -> float:
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


# ---- PyTorch ----

def _fused_experts(state: dict[str, np.ndarray], cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Mixtral's per-expert tensors (`block_sparse_moe.experts.{e}.w1/w3/w2`, `block_sparse_moe.gate`, as
  `save_pretrained` writes them) as `MixtralForCausalLM`'s in-memory parameters: `mlp.experts.gate_up_proj`
  `[E, 2F, D]` (w1 rows, then w3), `mlp.experts.down_proj` `[E, D, F]`, `mlp.gate.weight`."""
  out = {k: v for k, v in state.items() if ".block_sparse_moe." not in k}
  for i in range(cfg.num_layers):
    pre, new = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
    per = lambda w: np.stack([state[f"{pre}experts.{e}.{w}.weight"] for e in range(cfg.num_experts)])
    out[new + "gate.weight"] = state[pre + "gate.weight"]
    out[new + "experts.gate_up_proj"] = np.concatenate([per("w1"), per("w3")], axis=1)
    out[new + "experts.down_proj"] = per("w2")
  return out


def torch_models(cfg: model_lib.ModelConfig, params: Any, dtype: str, device: str = "cpu", model_type: str = "llama"):
  """(policy, reference) HF causal LMs of `model_type` ('llama', 'qwen2'; 'mixtral' for an MoE `cfg`) with
  `params`' weights (fp32 params; bf16 runs under autocast), on torch `device` ('cpu',
  'cuda'). A tied config ties them on the torch side too: one `embed_tokens` tensor that is also the LM head, as
  the released checkpoint loads."""
  import torch
  import transformers
  hf_config = hf.hf_config_from_model_config(cfg, model_type)
  numpy_state = hf.hf_state_dict_from_params(jax.device_get(params), cfg, model_type=model_type)
  if model_type == "mixtral":  # the per-expert names we export -> transformers 5's fused in-memory experts
    numpy_state = _fused_experts(numpy_state, cfg)
  hf_config.dtype = "float32"
  hf_config._attn_implementation = "sdpa"
  state = {k: torch.from_numpy(np.array(v)) for k, v in numpy_state.items()}
  models = []
  for _ in range(2):
    with torch.device(device):  # built where it runs: a random init of 1B params on the host takes seconds
      m = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float32)
    missing, unexpected = m.load_state_dict(state, strict=False)
    expected_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unexpected or [k for k in missing if "rotary" not in k and k not in expected_missing]:
      raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
      m.tie_weights()
      if m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the torch model did not tie lm_head to embed_tokens")
    models.append(m)
  policy, reference = models
  policy.train()
  reference.eval().requires_grad_(False)
  return policy, reference


def _autocast(dtype: str, device_type: str = "cpu"):
  import contextlib
  import torch
  return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


class TorchStep:
  """Plain PyTorch DPO step (the formula of `dpo_jax.interop.compare_torch.torch_dpo_step`, tensors prepared once) on
  torch `device`: 'cpu', or 'cuda' (bf16 then autocasts on the GPU; each step ends with a synchronize). An MoE
  `cfg` (Mixtral) adds router_aux_coef x the policy forward's `aux_loss` (`output_router_logits=True`: transformers'
  `load_balancing_loss_func`, attention mask applied) to the objective; the reference runs without router logits."""

  def __init__(self, cfg, params, batch, dtype: str, device: str = "cpu", model_type: str = "llama"):
    import torch
    self.device = torch.device(device)
    self.policy, self.reference = torch_models(cfg, params, dtype, device, model_type)
    self.aux_coef = step.router_coefs(LOSS, cfg)[0] if cfg.num_experts else None  # the jax rows' coefficient
    self.aux = float("nan")
    if self.aux_coef is not None:
      print(f"  torch: {type(self.policy).__name__}, experts_implementation "
            f"{self.policy.config._experts_implementation!r}, router aux coefficient {self.aux_coef:g}", flush=True)
    self.ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=self.device)
    self.attention = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=self.device)
    self.mask = torch.as_tensor(batch["loss_mask"][:, 1:], dtype=torch.float32, device=self.device)
    decay = [p for p in self.policy.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.policy.parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=OPTIM["learning_rate"],
                                 betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"])
    self.dtype = dtype

  def _logps(self, logits):
    import torch
    token = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, self.ids[:, 1:, None])[..., 0]
    return (token * self.mask).sum(-1)

  def __call__(self) -> float:
    import torch
    import torch.nn.functional as F
    router = {} if self.aux_coef is None else {"output_router_logits": True}
    with _autocast(self.dtype, self.device.type):
      out = self.policy(input_ids=self.ids, attention_mask=self.attention, use_cache=False, **router)
      logps = self._logps(out.logits)
      with torch.no_grad():
        ref = self._logps(self.reference(input_ids=self.ids, attention_mask=self.attention, use_cache=False).logits)
    margin = (logps[0::2] - ref[0::2]) - (logps[1::2] - ref[1::2])
    loss = -F.logsigmoid(BETA * margin).mean()
    if self.aux_coef is None:
      loss.backward()
    else:  # the returned loss stays the DPO loss, as the jax step's `loss` metric
      self.aux = float(out.aux_loss.detach())
      (loss + self.aux_coef * out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), OPTIM["max_grad_norm"])
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    if self.device.type == "cuda":  # kernels run asynchronously: the step ends when the optimizer's kernels do
      torch.cuda.synchronize(self.device)
    return float(loss.detach())

  def persistent_bytes(self) -> int:
    """Policy + reference params (fp32), resident before the step; AdamW's moments are created during the
    first (warm-up) step, so the RSS rise sampled over it already holds them, with gradients and activations."""
    return 2 * 4 * sum(p.numel() for p in self.policy.parameters())  # tied: the shared tensor counted once

  def router_aux(self) -> float:
    """The last step's load-balancing loss of the policy forward (NaN for a dense model)."""
    return self.aux


class TrlStep:
  """TRL's DPOTrainer: `training_step` (forward, loss, backward) + the trainer's optimizer step."""

  def __init__(self, cfg, params, batch, dtype: str, workdir: str, model_type: str = "llama"):
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl
    self.policy, self.reference = torch_models(cfg, params, dtype, model_type=model_type)
    # DPOTrainer tokenizes its dataset at construction: a word-level tokenizer over digits keeps it offline.
    vocab = {str(i): i for i in range(cfg.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", eos_token="1",
                                                     unk_token="0")
    dataset = datasets.Dataset.from_dict({"prompt": ["2 3"], "chosen": [" 4 5"], "rejected": [" 6 7"]})
    args = trl.DPOConfig(
        output_dir=workdir, per_device_train_batch_size=batch["input_ids"].shape[0] // 2, beta=BETA,
        loss_type=["sigmoid"], learning_rate=OPTIM["learning_rate"], adam_beta1=OPTIM["b1"], adam_beta2=OPTIM["b2"],
        adam_epsilon=OPTIM["eps"], weight_decay=OPTIM["weight_decay"], max_grad_norm=OPTIM["max_grad_norm"],
        lr_scheduler_type="constant", bf16=dtype == "bf16", use_cpu=True, report_to=[], logging_steps=10 ** 9,
        max_length=None, dataloader_num_workers=0, save_strategy="no")
    self.trainer = trl.DPOTrainer(model=self.policy, ref_model=self.reference, args=args, train_dataset=dataset,
                                  processing_class=tokenizer)
    self.trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    # TRL's batch layout: all chosen rows, then all rejected rows; `completion_mask` marks scored tokens.
    order = np.concatenate([np.arange(0, batch["input_ids"].shape[0], 2), np.arange(1, batch["input_ids"].shape[0], 2)])
    self.inputs = {
        "input_ids": torch.as_tensor(batch["input_ids"][order], dtype=torch.long),
        "attention_mask": torch.as_tensor(batch["attention_mask"][order], dtype=torch.long),
        "completion_mask": torch.as_tensor(batch["loss_mask"][order], dtype=torch.long),
    }
    self.trainer.model.train()
    self.trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s loop, which we bypass

  def __call__(self) -> float:
    import torch
    trainer = self.trainer
    loss = trainer.training_step(trainer.model, dict(self.inputs))
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), OPTIM["max_grad_norm"])
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  def persistent_bytes(self) -> int:
    return 2 * 4 * sum(p.numel() for p in self.policy.parameters())  # as TorchStep.persistent_bytes


class RssPeak:
  """Peak rise of this process's RSS while the `with` block runs (sampled every millisecond)."""

  def __enter__(self):
    import ctypes
    import psutil
    # Hand the heap's freed pages back to the OS first (glibc), else torch reuses pages that JAX steps freed and
    # the RSS does not rise at all.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    self.proc = psutil.Process()
    self.base = self.peak = self.proc.memory_info().rss
    self.done = False
    self.thread = threading.Thread(target=self._sample, daemon=True)
    self.thread.start()
    return self

  def _sample(self):
    while not self.done:
      self.peak = max(self.peak, self.proc.memory_info().rss)
      time.sleep(0.001)

  def __exit__(self, *exc):
    self.done = True
    self.thread.join()
    self.rise = self.peak - self.base


# ---- where the dpo_jax step's time goes ----

def breakdown(cfg: model_lib.ModelConfig, params: Any, batch: dict[str, np.ndarray], repeats: int) -> None:
  """Time jitted pieces of the step (unsharded, the `[2B, T]` rows of `jax-rows`) and print each as ms and as a
  share of the policy forward + backward."""
  from dpo_jax import logprobs
  model = model_lib.make_model(cfg)
  optimizer, _ = optim.make_optimizer(OPTIM)
  opt_state = optimizer.init(params)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  n, t = b["input_ids"].shape
  logits = jax.jit(lambda p: model.apply({"params": p}, b["input_ids"], b["positions"], b["attention_mask"]))(params)
  hidden = jax.jit(lambda p: model.apply({"params": p}, b["input_ids"], b["positions"], b["attention_mask"],
                                         method="hidden"))(params)
  x_NxTxD = jax.random.normal(jax.random.key(1), (n, t, cfg.hidden_size), cfg.compute_dtype)
  block = model_lib.Block(cfg, None)
  block_params = block.init(jax.random.key(2), x_NxTxD, b["positions"], b["attention_mask"])
  attn = model_lib.Attention(cfg, None)
  attn_params = attn.init(jax.random.key(2), x_NxTxD, b["positions"], b["attention_mask"])
  mlp = model_lib.Mlp(cfg, None)
  mlp_params = mlp.init(jax.random.key(2), x_NxTxD)
  grads = jax.tree.map(jnp.ones_like, params)

  def fwd_bwd(f):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a))))

  pieces = {
      "policy forward (logits)": (jax.jit(lambda p: model.apply(
          {"params": p}, b["input_ids"], b["positions"], b["attention_mask"])), (params,)),
      "policy forward (logps)": (jax.jit(lambda p: logprobs.sequence_logps(model, p, b).logps), (params,)),
      "policy fwd+bwd (logps)": (fwd_bwd(lambda p: logprobs.sequence_logps(model, p, b).logps), (params,)),
      "hidden fwd (no LM head)": (jax.jit(lambda p: model.apply(
          {"params": p}, b["input_ids"], b["positions"], b["attention_mask"], method="hidden")), (params,)),
      "LM head + logps fwd": (jax.jit(lambda p, h: logprobs.logps_from_logits(
          model.apply({"params": p}, h, method="logits"), b["input_ids"], b["loss_mask"]).logps), (params, hidden)),
      "LM head + logps fwd+bwd": (fwd_bwd(lambda p, h: logprobs.logps_from_logits(
          model.apply({"params": p}, h, method="logits"), b["input_ids"], b["loss_mask"]).logps), (params, hidden)),
      "logps from logits fwd": (jax.jit(lambda l: logprobs.logps_from_logits(
          l, b["input_ids"], b["loss_mask"]).logps), (logits,)),
      "logps from logits fwd+bwd": (fwd_bwd(lambda l: logprobs.logps_from_logits(
          l, b["input_ids"], b["loss_mask"]).logps), (logits,)),
      "1 block fwd": (jax.jit(lambda p, x: block.apply(p, x, b["positions"], b["attention_mask"])[0]),
                      (block_params, x_NxTxD)),
      "1 block fwd+bwd": (fwd_bwd(lambda p, x: block.apply(p, x, b["positions"], b["attention_mask"])[0]),
                          (block_params, x_NxTxD)),
      "1 attention fwd": (jax.jit(lambda p, x: attn.apply(p, x, b["positions"], b["attention_mask"])),
                          (attn_params, x_NxTxD)),
      "1 attention fwd+bwd": (fwd_bwd(lambda p, x: attn.apply(p, x, b["positions"], b["attention_mask"])),
                              (attn_params, x_NxTxD)),
      "1 MLP fwd": (jax.jit(lambda p, x: mlp.apply(p, x)), (mlp_params, x_NxTxD)),
      "1 MLP fwd+bwd": (fwd_bwd(lambda p, x: mlp.apply(p, x)), (mlp_params, x_NxTxD)),
      "optimizer update": (jax.jit(lambda g, s, p: optimizer.update(g, s, p)), (grads, opt_state, params)),
  }
  for f, a in pieces.values():  # compile + warm
    jax.block_until_ready(f(*a))
  times = {k: [] for k in pieces}
  for _ in range(repeats):
    for k, (f, a) in pieces.items():
      times[k].append(time_once(lambda: jax.block_until_ready(f(*a))))
  full = statistics.median(times["policy fwd+bwd (logps)"])
  print(f"  breakdown (median of {repeats}, ms; % of the policy fwd+bwd):")
  for k, v in times.items():
    m = statistics.median(v)
    print(f"    {k:<28} {1e3 * m:9.1f} ms  {100 * m / full:6.1f}%")


def profile(step_fn: "JaxStep", steps: int = 2, top: int = 15) -> None:
  """Trace `steps` calls of the jitted step with `jax.profiler` and print the XLA op time summed by op kind
  (the fusion name without its number, e.g. `ynn_fusion` = the dots, `copy_bitcast_fusion` = layout copies)."""
  import collections
  import glob
  import gzip
  import json
  import re
  import tempfile
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        step_fn()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  kinds, counts = collections.Counter(), collections.Counter()
  for e in events:  # XLA ops only: not Python frames ($...), executor spans or host transfers
    name = e["name"]
    if name.startswith("$") or "Execute" in name or "(" in name or " " in name:
      continue
    kind = re.sub(r"[._]\d+$", "", name)
    kinds[kind] += e["dur"] / steps
    counts[kind] += 1
  total = sum(kinds.values())
  print(f"  profile: XLA op time {total / 1e3:.1f} ms per step (ops on several threads add up), by kind:")
  for kind, us in kinds.most_common(top):
    print(f"    {kind:<32} {us / 1e3:9.1f} ms  {100 * us / total:5.1f}%  {counts[kind] // steps:5d} ops")


# ---- the run ----

def impl_keys(args: argparse.Namespace, moe_config: bool = False) -> list[str]:
  """The rows this run times, in table order (see the module docstring); an MoE config's: jax, jax-ragged,
  jax-dense, torch."""
  keys = ["jax"] + [k for k in ("jax-rows", "jax-preref") if k not in args.skip and not moe_config]
  if args.cpu_devices > 1:
    keys.append(f"jax-dp{args.cpu_devices}")
  keys += ["jax-fullattn"] * args.full_attention + ["jax-xlawgrad"] * args.xla_weight_grad
  moe_rows = ["ragged", "dense"] if moe_config else []
  keys += [f"jax-{v}" for v in moe_rows + [v for v in args.variants if v not in moe_rows]]
  keys += [k for k in ("torch", "trl") if k not in args.skip and not (moe_config and k == "trl")]
  if "trl" in keys and importlib.util.find_spec("trl") is None:
    print("  trl is not installed: skipping the TRL baseline (pip install -e .[bench])")
    keys.remove("trl")
  return keys


def build_impl(key: str, name: str, cfg: model_lib.ModelConfig, params: Any, batch: dict[str, np.ndarray],
               args: argparse.Namespace) -> Any:
  """The step object of row `key`, compiled / built and ready for its warm-up."""
  length = batch["input_ids"].shape[1]
  shared = shared_prompt_batch(batch, length)
  if key in ("jax", "jax-preref"):
    return JaxStep(cfg, params, shared, precomputed_reference=key == "jax-preref")
  if key == "jax-rows":
    return JaxStep(cfg, params, batch, precomputed_reference=False)
  if key.startswith("jax-dp"):  # e.g. --cpu_devices 2: the batch split over a data axis, one part per core
    return JaxStep(cfg, params, shared, precomputed_reference=False, devices=jax.local_device_count())
  if key == "jax-fullattn":  # the step as it was before query-blocked attention: one block of every query
    block, attention.ATTENTION_QUERY_BLOCK = attention.ATTENTION_QUERY_BLOCK, length
    try:
      return JaxStep(cfg, params, shared, precomputed_reference=False)
    finally:
      attention.ATTENTION_QUERY_BLOCK = block
  if key == "jax-xlawgrad":  # the step before `model.matmul` computed weight gradients as row-major GEMMs
    return JaxStep(dataclasses.replace(cfg, weight_grad_gemm="xla"), params, shared, precomputed_reference=False)
  if key.removeprefix("jax-") in VARIANTS:  # its XLA flags are its worker's (WorkerStep)
    overrides, _, constants = VARIANTS[key.removeprefix("jax-")]
    saved = {name: getattr(attention, name) for name in constants}
    try:
      for name, value in constants.items():
        setattr(attention, name, value)
      return JaxStep(dataclasses.replace(cfg, **overrides), params, shared, precomputed_reference=False)
    finally:
      for name, value in saved.items():
        setattr(attention, name, value)
  if key == "torch":
    return TorchStep(cfg, params, batch, args.dtype, model_type=HF_TYPES.get(name, "llama"))
  if key == "trl":
    return TrlStep(cfg, params, batch, args.dtype, os.path.join(args.workdir, name), HF_TYPES.get(name, "llama"))
  raise ValueError(f"unknown implementation {key!r}")


def warm_up(impl: Any) -> tuple[float, str]:
  """One untimed step -> (its loss, the peak memory column): for every row the bytes resident before the step
  (`persistent_bytes`) + the peak rise of the process RSS during it (`RssPeak`); a jax row adds its compiled
  step's own count in brackets."""
  with RssPeak() as rss:
    loss = impl()
  column = f"{(impl.persistent_bytes() + rss.rise) / 2 ** 20:.0f} MiB"
  if isinstance(impl, JaxStep):
    column += f" ({impl.peak_bytes() / 2 ** 20:.0f} compiled)"
  return loss, column


def router_aux(impl: Any) -> float:
  """The warm-up step's load-balancing loss of row `impl` (NaN for dense models and for rows that do not report it)."""
  return impl.router_aux() if hasattr(impl, "router_aux") else float("nan")


def _worker(conn: Any, name: str, key: str, args: argparse.Namespace) -> None:
  """An isolated implementation (`--isolate`): build, warm up, then time one step per request."""
  cfg = model_config(name, args.dtype, args.remat)
  _, pairs, length = CONFIGS[name]
  params = jax.device_get(model_lib.init_params(cfg, jax.random.key(0)))  # the same weights in every process
  impl = build_impl(key, name, cfg, params, make_batch(cfg, pairs, length), args)
  del params
  loss, memory = warm_up(impl)
  conn.send((loss, memory, impl.cost_flops() if isinstance(impl, JaxStep) else float("nan"), router_aux(impl)))
  while conn.recv() == "step":
    conn.send(time_once(impl))


class WorkerStep:
  """Row `key` in a spawned process of its own: its own allocator state, thread pools and memory, as in a
  training program of its own. The parent asks for one step at a time, so the repeats still interleave."""

  def __init__(self, name: str, key: str, args: argparse.Namespace):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_worker, args=(child, name, key, args), daemon=True)
    os.environ[WORKER_MALLOC] = args.baseline_malloc if key in ("torch", "trl") else args.host_malloc
    xla_flags = os.environ.get("XLA_FLAGS")
    if key.removeprefix("jax-") in VARIANTS:  # appended: of two settings of one flag XLA takes the last
      os.environ["XLA_FLAGS"] = f"{xla_flags or ''} {VARIANTS[key.removeprefix('jax-')][1]}".strip()
    try:
      self.process.start()  # the child starts with this environment
    finally:
      del os.environ[WORKER_MALLOC]
      if xla_flags is None:
        os.environ.pop("XLA_FLAGS", None)
      else:
        os.environ["XLA_FLAGS"] = xla_flags
    self.ready = self.conn.recv()  # (first loss, memory column, XLA cost, aux): wait, so compiles never overlap

  def warm_up(self) -> tuple[float, str]:
    return self.ready[0], self.ready[1]

  def cost_flops(self) -> float:
    return self.ready[2]

  def router_aux(self) -> float:
    return self.ready[3]

  def __call__(self) -> float:
    self.conn.send("step")
    return self.conn.recv()

  def close(self) -> None:
    self.conn.send("stop")
    self.process.join()


def run_config(name: str, args: argparse.Namespace, peak_flops: float) -> list[dict]:
  cfg = model_config(name, args.dtype, args.remat)
  _, pairs, length = CONFIGS[name]
  rows, tokens = 2 * pairs, 2 * pairs * length
  fwd = forward_flops(cfg, rows, length)
  n_params = model_lib.count_params(model_lib.abstract_params(cfg))
  print(f"\n{name}: {n_params / 1e6:.1f}M params, {pairs} pairs x {length} tokens, {args.dtype}, "
        f"remat={args.remat}; forward {fwd / 1e9:.1f} GFLOP", flush=True)
  if cfg.num_experts:
    print(f"  MoE: {cfg.num_experts} experts of width {cfg.resolved_moe_intermediate_size} in layers "
          f"{list(moe.moe_layers(cfg))}, top-{cfg.num_experts_per_tok} ({flops_lib.active_params(cfg) / 1e6:.2f}M "
          f"params active per token); rows: jax = moe_impl {moe.resolve_impl(cfg)!r} ('auto'), jax-ragged = "
          f"'ragged', jax-dense = 'dense' (one-hot, "
          f"{cfg.num_experts / cfg.num_experts_per_tok:g}x the experts' FLOPs), torch = transformers' Mixtral; "
          f"router aux coefficient {step.router_coefs(LOSS, cfg)[0]:g} in each", flush=True)
  need, free = 5 * 4 * n_params, host_memory.available_ram()
  if jax.default_backend() == "cpu" and need > free and not (args.breakdown or args.profile):
    print(f"  skipped: fp32 params, AdamW moments, gradients and pi_ref alone are {need / 2 ** 30:.1f} GiB, more than "
          f"this machine's {free / 2 ** 30:.1f} GiB of available RAM (run it on a GPU: benchmarks/device_check.py)")
    return []  # before any params exist: initialising a shape that does not fit would be what fails
  batch = make_batch(cfg, pairs, length)
  in_process = not args.isolate or args.breakdown or args.profile
  params = jax.device_get(model_lib.init_params(cfg, jax.random.key(0))) if in_process else None

  if args.breakdown:
    breakdown(cfg, params, batch, args.repeats)
    return []
  if args.profile:
    jax_step = JaxStep(cfg, params, shared_prompt_batch(batch, length), precomputed_reference=False)
    jax_step()  # warm-up
    profile(jax_step)
    return []
  shared_fwd = shared_forward_flops(cfg, pairs, length)
  keys = impl_keys(args, moe_config=bool(cfg.num_experts))
  flops = {k: (3 if k == "jax-preref" else 4) * (fwd if k in ("jax-rows", "torch", "trl") else shared_fwd)
           for k in keys}
  one_at_a_time = args.isolate and (args.one_at_a_time if args.one_at_a_time is not None else name in LARGE)
  memory: dict[str, str] = {}
  times: dict[str, list[float]] = {k: [] for k in keys}
  costs: dict[str, float] = {}

  def warm(key: str, impl: Any) -> None:  # one untimed warm-up step (done by the worker when isolated)
    loss, memory[key] = impl.warm_up() if isinstance(impl, WorkerStep) else warm_up(impl)
    costs[key] = impl.cost_flops() if isinstance(impl, (WorkerStep, JaxStep)) else float("nan")
    aux = f"; router aux loss {router_aux(impl):.5f}" if cfg.num_experts else ""
    print(f"  warm-up: {key} done, first loss {loss:.7f} (log 2 = {np.log(2):.7f}){aux}; peak memory {memory[key]}",
          flush=True)

  def step_time(impl: Any) -> float:
    return impl() if isinstance(impl, WorkerStep) else time_once(impl)  # a worker times on its own clock

  if one_at_a_time:  # each row alone in memory: its warm-up, its repeats, then its process exits
    print(f"  rows one at a time (--one_at_a_time): {keys}", flush=True)
    for key in keys:
      impl = WorkerStep(name, key, args)
      warm(key, impl)
      for _ in range(args.repeats):
        times[key].append(step_time(impl))
      print(f"  {key}: " + ", ".join(f"{t:.2f}" for t in times[key]) + " s", flush=True)
      impl.close()
  else:
    if args.isolate:  # each implementation in a process of its own, as its own training program would run it
      impls = {k: WorkerStep(name, k, args) for k in keys}  # started one at a time: compiles don't overlap
    else:
      impls = {k: build_impl(k, name, cfg, params, batch, args) for k in keys}
    for key, impl in impls.items():
      warm(key, impl)
    for i in range(args.repeats):  # interleaved: a slow phase of the shared machine hits every implementation
      for key, impl in impls.items():
        times[key].append(step_time(impl))
      print(f"  repeat {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    for impl in impls.values():
      if isinstance(impl, WorkerStep):
        impl.close()
  if "jax" in costs:
    print(f"  XLA cost_analysis of the jax step: {costs['jax'] / 1e9:.1f} GFLOP (counted: {4 * shared_fwd / 1e9:.1f})"
          + (f"; of jax-rows: {costs['jax-rows'] / 1e9:.1f} GFLOP (counted: {4 * fwd / 1e9:.1f})"
             if "jax-rows" in costs else "")
          + (f"; of jax-ragged: {costs['jax-ragged'] / 1e9:.1f} GFLOP" if "jax-ragged" in costs else "")
          + (f"; of jax-dense: {costs['jax-dense'] / 1e9:.1f} GFLOP (all experts on every token)"
             if "jax-dense" in costs else ""), flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}

  if "torch" in times:  # each repeat's torch time over this one's, measured back to back: robust to slow drifts
    print("  per-repeat x torch (median, min-max): " + ", ".join(
        f"{k} {statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"
        for k, r in ((k, [t / s for t, s in zip(times["torch"], v)]) for k, v in times.items() if k != "torch")))
  rows_out = []
  for key in keys:
    rows_out.append(dict(config=name, impl=key, time=med[key], spread=(min(times[key]), max(times[key])),
                         tokens_per_s=tokens / med[key],
                         vs_torch=med["torch"] / med[key] if "torch" in med else float("nan"),
                         vs_trl=med["trl"] / med[key] if "trl" in med else float("nan"),
                         flops=flops[key], mfu=flops[key] / med[key] / peak_flops, memory=memory[key]))
  return rows_out


def print_table(rows: list[dict]) -> None:
  header = (f"{'config':<13} {'impl':<14} {'step s':>8} {'min-max s':>13} {'tokens/s':>9} {'x torch':>8} "
            f"{'x trl':>7} {'MFU':>6}  peak memory")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['config']:<13} {r['impl']:<14} {r['time']:>8.3f} {r['spread'][0]:>6.3f}-{r['spread'][1]:<6.3f} "
          f"{r['tokens_per_s']:>9.0f} {r['vs_torch']:>8.2f} {r['vs_trl']:>7.2f} {100 * r['mfu']:>5.1f}%  "
          f"{r['memory']}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,small", help=f"comma-separated, from {sorted(CONFIGS)}")
  parser.add_argument("--config", default=None, help="one config (overrides --configs), e.g. 1b on a GPU")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median reported)")
  parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                      help="compute dtype; params and optimizer state stay fp32 (torch: autocast)")
  parser.add_argument("--remat", default="none", choices=sorted(model_lib.REMAT_POLICIES))
  parser.add_argument("--skip", default="", help="comma-separated rows to skip: torch,trl,jax-rows,jax-preref "
                      "(each jax row holds its own state: the small config with every row needs > 24 GB of RAM)")
  parser.add_argument("--full_attention", action="store_true",
                      help="also time the jax step with attention in one [T, T] block (attention's query block)")
  parser.add_argument("--xla_weight_grad", action="store_true",
                      help="also time the jax step with model.weight_grad_gemm='xla' (XLA's weight-gradient layout)")
  parser.add_argument("--variants", default="", help=f"comma-separated jax variants to time too, from "
                      f"{sorted(VARIANTS)} (VARIANTS: the jax step with one setting changed)")
  parser.add_argument("--one_at_a_time", action=argparse.BooleanOptionalAction, default=None,
                      help="run the rows one after another (each its warm-up and repeats, then exits) instead of "
                      f"interleaving their repeats; default: on for {list(LARGE)}, whose rows do not all fit in RAM")
  parser.add_argument("--breakdown", action="store_true",
                      help="instead of the comparison: time pieces of the dpo_jax step (forward, logps, one block, ...)")
  parser.add_argument("--workdir", default="/tmp/dpo_bench", help="TRL's output_dir (nothing is saved)")
  parser.add_argument("--profile", action="store_true",
                      help="trace the jax step with jax.profiler and print its op time by op kind, instead")
  parser.add_argument("--host_malloc", default="auto", choices=host_memory.HOST_MALLOC,
                      help="glibc's allocator of the jax processes with --isolate, else of the one process: 'auto' "
                      "(on CPU 'keep', as the trainer does), 'keep' or 'system' (glibc's defaults); "
                      "dpo_jax/train/host_memory.py")
  parser.add_argument("--baseline_malloc", default="system", choices=host_memory.HOST_MALLOC,
                      help="with --isolate: the allocator of the torch and TRL processes ('system': glibc's "
                      "defaults, what a PyTorch program runs with; 'keep' is worth a run too)")
  parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                      help="each implementation in a spawned process of its own (its own allocator state, thread "
                      "pools and memory), its steps still interleaved with the others'; --no-isolate: all in "
                      "this process")
  parser.add_argument("--cpu_devices", type=int, default=1,
                      help="emulated CPU devices (XLA_FLAGS); > 1 adds a `jax-dpN` row: the step data-parallel "
                      "over N devices")
  args = parser.parse_args(argv)
  args.skip = set(filter(None, args.skip.split(",")))
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
  names = [args.config] if args.config else args.configs.split(",")
  for variant in ("ragged", "dense"):
    if variant in args.variants and not all(CONFIGS.get(n, ({},))[0].get("num_experts") for n in names):
      parser.error(f"--variants {variant}: an MoE variant (model.moe_impl); MoE configs (e.g. --config moe) run it "
                   "already")

  import torch
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; host malloc "
        f"{args.host_malloc} ({'freed memory kept' if HOST_MALLOC_KEPT else 'glibc defaults'})")
  print(f"CPU: {platforms.cpu_description()}")
  rows, best_peak = [], 0.0
  for name in names:
    # The peak is re-measured before each config (the best of all measurements is kept): on a shared machine a
    # single measurement taken in a busy moment would understate it and inflate MFU.
    peak = measure_peak(args.dtype)
    best_peak = max(best_peak, *peak.values())
    print(f"matmul peak ({args.dtype}): jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
          f"{peak['torch'] / 1e9:.1f} GFLOP/s")
    rows += run_config(name, args, best_peak)
  if not rows:  # --breakdown / --profile
    return
  peak = measure_peak(args.dtype)
  final_peak = max(best_peak, *peak.values())
  print(f"matmul peak ({args.dtype}): jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
        f"{peak['torch'] / 1e9:.1f} GFLOP/s; best of all: {final_peak / 1e9:.1f} GFLOP/s (MFU is against this)")
  for r in rows:
    r["mfu"] = r["flops"] / r["time"] / final_peak
  print()
  print_table(rows)

if __name__ == "__main__":
  sys.exit(main())
