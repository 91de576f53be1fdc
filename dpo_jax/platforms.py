"""Which backend a program is built for: the one place 'auto' settings look it up.

`ModelConfig.platform` is '' (this process's `jax.default_backend()`) or a platform named explicitly, so a
program lowered for a TPU or a GPU on a CPU host (`jax.export`, an AOT compile for a target topology) takes the
TPU / GPU choices everywhere: compute dtype, attention kernel, weight-gradient layout.
"""

from __future__ import annotations

import jax

# Accepted names ('' = the process's default backend); 'cuda' and 'rocm' are GPUs.
PLATFORMS = ("", "cpu", "gpu", "cuda", "rocm", "tpu")


def resolve(platform: str = "") -> str:
  """'cpu', 'gpu' or 'tpu' for a `PLATFORMS` name ('' = `jax.default_backend()` of this process)."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; choose one of {list(PLATFORMS)} ('' = this process's backend).")
  platform = platform or jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
