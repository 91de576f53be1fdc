"""TPU slices as the TPU compiler sees them, on a machine without a TPU: names, chips, abstract devices.

    topo = topology.parse("v5p-64")                  # or 'v5p:2x4x4', 'v6e-256', 'v5e:4x4', 'v4-32'
    devices = topology.devices(topo)                 # abstract TPU devices: a Mesh over them AOT-compiles for it

Names follow Cloud TPU's accelerator types. v4 and v5p count TensorCores (two per chip, one jax device per chip:
megacore), so v5p-64 is 32 chips, 2x4x4; v5e and v6e count chips, so v6e-256 is 256 chips, 16x16. An explicit
`GEN:AxB[xC]` names the chip grid itself. The devices come from libtpu's topology description
(`jax.experimental.topologies.get_topology_desc`), which needs the TPU compiler (`pip install -e '.[tpu]'`) but
no TPU; jax keeps computing on the CPU.

`CHIPS` holds the per-chip figures the dry run plans with, each from Google Cloud's TPU pages (v4, v5e, v5p,
v6e "system architecture" tables, read 2026-12): HBM capacity, HBM bandwidth and bidirectional ICI bandwidth; the
bf16 peak is `flops.PEAK_BF16_FLOPS`'s, the table MFU uses on a real device. v5e's and v6e's HBM is listed as 16 and
32 "GB" and v5p's as 95 GiB; all are used as GiB here.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import sys
from typing import Any


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # 'v4', 'v5e', 'v5p', 'v6e'
  device_kind: str  # jax's Device.device_kind
  hbm_gib: float  # HBM per chip (= per jax device), GiB
  hbm_bytes_per_s: float  # HBM bandwidth per chip, bytes/s
  ici_bytes_per_s: float | None  # bidirectional inter-chip interconnect bandwidth per chip, bytes/s (None: unlisted)
  dims: int  # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
  cores_per_chip_in_name: int  # TensorCores per chip as the accelerator-type name counts them
  chip_config: str  # libtpu chip config: 'megacore' puts a chip's two cores behind one device
  source: str

  @property
  def peak_bf16_flops(self) -> float:
    """Dense bf16 FLOP/s per chip (`flops.PEAK_BF16_FLOPS` of this device kind)."""
    from dpo_jax import flops  # here, not at the top: host_memory imports this module before jax may start
    return flops.published_peak(self.device_kind)[0]


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32, 1200e9, None, 3, 2, "megacore",
               "Cloud TPU v4 page: HBM2 32 GiB at 1200 GB/s (no per-chip ICI figure listed)"),
    "v5e": Chip("v5e", "TPU v5 lite", 16, 819e9, 400e9, 2, 1, "default",
                "Cloud TPU v5e page: HBM2 16 GB at 819 GB/s, ICI 400 GB/s bidirectional"),
    "v5p": Chip("v5p", "TPU v5", 95, 2765e9, 1200e9, 3, 2, "default",
                "Cloud TPU v5p page: HBM2e 95 GiB at 2765 GB/s, ICI 1200 GB/s bidirectional"),
    "v6e": Chip("v6e", "TPU v6 lite", 32, 1638e9, 800e9, 2, 1, "default",
                "Cloud TPU v6e page: HBM 32 GB at 1638 GB/s, ICI 800 GB/s bidirectional"),
}

# The largest slice of each generation (chips), from the same pages.
MAX_CHIPS = {"v4": 4096, "v5e": 256, "v5p": 8960, "v6e": 256}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as the user wrote it
  chip: Chip
  grid: tuple[int, ...]  # chips along each torus dimension
  num_slices: int = 1

  @property
  def chips(self) -> int:
    """Chips (= jax devices) over all slices."""
    return math.prod(self.grid) * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.generation}:{'x'.join(str(d) for d in self.grid)}"

  def describe(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return (f"{self.name} ({self.libtpu_name}{slices}: {self.chips} chips of {self.chip.device_kind}, "
            f"{self.chip.hbm_gib:g} GiB HBM each)")


EXAMPLES = "v5p-64, v5p:4x4x4, v4-32, v5e-16, v5e:4x4, v6e-256, v6e:16x16"


def _grid_for(generation: str, chips: int) -> tuple[int, ...]:
  """Cloud TPU's default chip grid for a slice of `chips` chips: 2D (v5e, v6e) 1x1, 2x2, 2x4, 4x4, 4x8, ...; 3D
  (v4, v5p) 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (doubling the last of the smallest dimensions)."""
  if CHIPS[generation].dims == 2:
    if chips == 1:
      return (1, 1)
    grid = [2, 2]
  else:
    grid = [2, 2, 1]
  while math.prod(grid) < chips:
    if CHIPS[generation].dims == 3 and grid[2] == 1:
      grid[2] = 2
      continue
    smallest = min(grid)
    i = max(j for j, d in enumerate(grid) if d == smallest)
    grid[i] *= 2
    grid.sort()
  return tuple(grid)


def parse(name: str, num_slices: int = 1) -> Topology:
  """A `Topology` from an accelerator type ('v5p-64') or a chip grid ('v5p:2x4x4'); ValueError naming the valid
  forms otherwise."""
  text = name.strip().lower()
  valid = (f"dry_run.topology={name!r} is not a TPU slice; use GEN-N (an accelerator type) or GEN:AxB[xC] (a chip "
           f"grid) with GEN one of {sorted(CHIPS)}, e.g. {EXAMPLES}")
  if num_slices < 1:
    raise ValueError(f"dry_run.num_slices={num_slices} must be >= 1.")
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)[-:](.+)", text)
  if not m:
    raise ValueError(valid + ".")
  generation = "v5e" if m.group(1) == "v5litepod" else m.group(1)
  chip, rest = CHIPS[generation], m.group(2)
  if re.fullmatch(r"\d+(x\d+)+", rest):
    grid = tuple(int(d) for d in rest.split("x"))
    if len(grid) != chip.dims or min(grid) < 1:
      raise ValueError(f"dry_run.topology={name!r}: {generation} slices are {chip.dims}-D grids "
                       f"({'AxBxC' if chip.dims == 3 else 'AxB'}), e.g. {_example(generation)}.")
  elif rest.isdigit():
    count = int(rest)
    chips, leftover = divmod(count, chip.cores_per_chip_in_name)
    if leftover or chips < 1 or chips & (chips - 1) or (chip.dims == 3 and chips < 4):
      cores = " TensorCores (two per chip)" if chip.cores_per_chip_in_name == 2 else " chips"
      raise ValueError(f"dry_run.topology={name!r}: {generation}-N counts{cores}; N must give a power-of-two number "
                       f"of chips{' of at least 4' if chip.dims == 3 else ''}, e.g. {_example(generation)}, or name "
                       f"the grid ({generation}:{'x'.join(['A', 'B', 'C'][:chip.dims])}).")
    grid = _grid_for(generation, chips)
  else:
    raise ValueError(valid + ".")
  if math.prod(grid) > MAX_CHIPS[generation]:
    raise ValueError(f"dry_run.topology={name!r}: {math.prod(grid)} chips is more than one {generation} slice holds "
                     f"({MAX_CHIPS[generation]}); use dry_run.num_slices for several slices.")
  return Topology(name, chip, grid, num_slices)


def _example(generation: str) -> str:
  return {"v4": "v4-32 or v4:2x2x4", "v5p": "v5p-64 or v5p:2x4x4", "v5e": "v5e-16 or v5e:4x4",
          "v6e": "v6e-256 or v6e:16x16"}[generation]


# Environment libtpu reads at start-up. Without a TPU VM's metadata server it would print warnings and wait on
# look-ups; these tell it there is nothing to find. Set only where unset, before libtpu loads.
LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
              "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def configure_environment() -> None:
  """Quiet libtpu on a machine without a TPU, and keep this process's own computing on the CPU (a dry run needs
  no accelerator, and must not take a TPU a training job is using). Call before jax first touches a backend."""
  for key, value in LIBTPU_ENV.items():
    os.environ.setdefault(key, value)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if "jax" in sys.modules:  # jax read JAX_PLATFORMS when it was imported: tell its config (before any backend starts)
    import jax
    if not jax.config.jax_platforms:
      jax.config.update("jax_platforms", "cpu")


def quiet_libtpu_without_tpu() -> None:
  """On a machine with libtpu installed (the test or tpu extra) but no TPU, set `LIBTPU_ENV` where unset, so jax's
  start-up probe of the TPU plugin neither prints libtpu's warnings nor trips on another process's lockfile; jax
  then runs on the CPU (or GPU) as it would have. A TPU VM (/dev/accel*, /dev/vfio) is left alone."""
  if not compiler_available() or tpu_present():
    return
  for key, value in LIBTPU_ENV.items():
    os.environ.setdefault(key, value)


def tpu_present() -> bool:
  """Whether this machine has TPU chips (a TPU VM's /dev/accel* or /dev/vfio devices), judged without jax."""
  return bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio")


def compiler_available() -> bool:
  """True if libtpu (the TPU compiler) is installed."""
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def devices(topo: Topology) -> list[Any]:
  """The abstract TPU devices of `topo` (all slices), for a `Mesh` that `jit(...).lower(...).compile()` targets."""
  if not compiler_available():
    raise ValueError(f"dry_run.topology={topo.name!r} needs the TPU compiler: pip install -e '.[tpu]' (libtpu for "
                     "this jax), or leave dry_run.topology='' for the CPU-mesh dry run.")
  configure_environment()
  from jax.experimental import topologies
  per_host = (2, 2, 1) if math.prod(topo.grid) >= 4 else (1, 1, 1)
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name,
                                      chip_config_name=topo.chip.chip_config, chips_per_host_bounds=per_host,
                                      num_slices=topo.num_slices)
  found = list(desc.devices)
  if len(found) != topo.chips:
    raise RuntimeError(f"libtpu gave {len(found)} devices for {topo.describe()}; expected {topo.chips}.")
  return found
