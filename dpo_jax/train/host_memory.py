"""Host memory allocator settings for the XLA:CPU backend (imports no jax: call it before jax is imported).

XLA:CPU allocates a step's temporaries (activations, gradients, optimizer scratch) with `malloc` afresh every
step and frees them when the step ends. glibc serves allocations above its mmap threshold (at most 32 MiB),
and in a thread's own arena every one above 64 MiB, with their own `mmap` and unmaps them on `free`; it also
trims freed heap memory back to the kernel. Every page of those buffers is then faulted in and zeroed again on
the next step: on this project's 2-core CPU the small benchmark config (`benchmarks/dpo_step.py`) took ~1.8M
minor page faults and ~11 s of system CPU per step that way.

`keep_freed_memory()` sets three glibc options with `mallopt` (the same as
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<max>:glibc.malloc.arena_max=1`): no mmap'd
chunks, no trimming, and one arena for every thread, so memory a step frees is handed to the next step's
allocations instead of back to the kernel. It must run before any other thread allocates (so before jax,
numpy or torch is imported): a thread that already has its own arena keeps it, and there the large buffers
stay mmap'd. The cost: the process keeps its peak resident size until it exits (as XLA's allocator keeps
device memory on an accelerator). It changes nothing off glibc (musl, or an allocator such as tcmalloc put in
with LD_PRELOAD) and nothing for device memory.

The entry points call it first: `python -m dpo_jax.train` and the frontier experiment through
`configure_at_startup()`, `benchmarks/dpo_step.py` through `configure()`. `DPO_JAX_HOST_MALLOC` picks the mode:
'auto' (default) = 'keep' unless an accelerator is in use (`JAX_PLATFORMS` names one, or a TPU / GPU plugin is
installed and `JAX_PLATFORMS` is unset), 'keep', or 'system' (glibc's defaults).
"""

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os

from dpo_jax.train import topology

HOST_MALLOC = ("auto", "keep", "system")
ENV = "DPO_JAX_HOST_MALLOC"

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = -1  # mallopt(3): -1 disables trimming (2**31 - 1, the largest int, still trimmed > 2 GiB tops)


@functools.lru_cache(maxsize=None)
def _glibc():
  """glibc as a ctypes library, or None when the C library is another one."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Make glibc keep freed memory for reuse (module docstring) -> whether all three settings took effect
  (False off glibc). Idempotent; it does not move memory already allocated, nor threads' arenas."""
  libc = _glibc()
  if libc is None:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))


def available_ram() -> int:
  """Bytes of RAM available to a new process (/proc/meminfo's MemAvailable; else all physical memory)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def accelerator_expected() -> bool:
  """Whether JAX will run on a TPU / GPU, judged without importing jax: `JAX_PLATFORMS` when set, else whether
  libtpu is installed on a machine with TPU chips (libtpu alone is the TPU compiler of the dry run, `.[test]` and
  `.[tpu]` install it on CPU machines) or a PJRT plugin (jax's `jax_plugins` namespace or entry points, e.g.
  jax-cuda12-plugin) is installed."""
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return any(p != "cpu" for p in platforms)
  return ((topology.compiler_available() and topology.tpu_present())
          or importlib.util.find_spec("jax_plugins") is not None
          or bool(importlib.metadata.entry_points(group="jax_plugins")))


# XLA:CPU orders a program's ops for concurrency by default, which in a train step's backward keeps many
# rematerialised or finished values live at once: on the smollm2-135m shape (benchmarks/dpo_step.py) remat='full'
# then saved almost nothing. The memory-minimising order is a process-wide XLA flag (a per-compile option does not
# reach the CPU scheduler), so it goes into XLA_FLAGS before jax starts, on CPU only, unless XLA_FLAGS sets it.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def memory_ordered_cpu_steps() -> bool:
  """Put `CPU_SCHEDULER_FLAG=false` into `XLA_FLAGS` (before jax is imported) unless an accelerator is expected
  or XLA_FLAGS already sets the flag -> whether XLA:CPU will order ops to minimise memory."""
  flags = os.environ.get("XLA_FLAGS", "")
  if CPU_SCHEDULER_FLAG in flags:
    return flags.rsplit(CPU_SCHEDULER_FLAG, 1)[1].lstrip("=").split(" ", 1)[0].lower() in ("false", "0")
  if accelerator_expected():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
  return True


def configure(mode: str | None = None, *, source: str = ENV) -> bool:
  """Apply `mode` (default: `$DPO_JAX_HOST_MALLOC`, else 'auto'; see the module docstring) -> whether the keep
  settings are now in effect; on CPU also order XLA:CPU steps to minimise memory (`memory_ordered_cpu_steps`,
  whatever the mode). Call it first thing in a program, before jax / numpy / torch are imported.
  `source` names where a bad mode came from, for the error."""
  mode = os.environ.get(ENV, "auto") if mode is None else mode
  if mode not in HOST_MALLOC:
    raise ValueError(f"{source}={mode!r}; choose one of {list(HOST_MALLOC)}.")
  memory_ordered_cpu_steps()
  if mode == "keep" or (mode == "auto" and not accelerator_expected()):
    return keep_freed_memory()
  return False


def configure_at_startup() -> bool:
  """`configure()` from `$DPO_JAX_HOST_MALLOC` for a program's first lines: a bad value exits with its message
  (one line, no traceback)."""
  try:
    return configure()
  except ValueError as bad:
    raise SystemExit(f"error: {bad}") from None
