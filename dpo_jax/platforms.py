"""Which backend a program is built for: the one place 'auto' settings look it up.

`ModelConfig.platform` is '' (this process's `jax.default_backend()`) or a platform named explicitly, so a
program lowered for a TPU or a GPU on a CPU host (`jax.export`, an AOT compile for a target topology) takes the
TPU / GPU choices everywhere: compute dtype, attention kernel, weight-gradient layout.
"""

from __future__ import annotations

import platform as platform_lib

import jax

# Accepted names ('' = the process's default backend); 'cuda' and 'rocm' are GPUs.
PLATFORMS = ("", "cpu", "gpu", "cuda", "rocm", "tpu")

# Code paths that only a CPU program takes, each traced under this `jax.named_scope`, so the op names of a compiled
# program say whether it holds one (a TPU or GPU program must not: the TPU dry run and tests check the HLO text).
ROW_MAJOR_WEIGHT_GRAD = "cpu_row_major_weight_grad"  # model.matmul's row-major weight-gradient GEMMs
BLOCKED_ATTENTION = "cpu_blocked_attention"  # attention.blocked_attention's query blocks
CPU_ONLY_SCOPES = (ROW_MAJOR_WEIGHT_GRAD, BLOCKED_ATTENTION)


def resolve(platform: str = "") -> str:
  """'cpu', 'gpu' or 'tpu' for a `PLATFORMS` name ('' = `jax.default_backend()` of this process)."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; choose one of {list(PLATFORMS)} ('' = this process's backend).")
  platform = platform or jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def cpu_description() -> str:
  """The CPU model and its vector / matrix ISA extensions (/proc/cpuinfo), e.g. 'AMD EPYC; avx2 avx512f ... amx_tile':
  XLA:CPU and torch pick kernels by them, so the benchmarks print it beside every CPU timing (EPYC and Xeon differ)."""
  model, flags = platform_lib.processor() or "unknown CPU", []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = [x for x in value.split() if x.startswith(("avx", "amx", "fma"))]
          break
  except OSError:
    pass
  return f"{model}; {' '.join(flags) or 'no AVX/AMX flags found'}"
