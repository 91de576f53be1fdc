"""Multi-host start-up: `jax.distributed.initialize`, only when asked, before anything touches a device.

The same command runs on every host (a TPU VM worker, a SLURM task, a local process). Multi-host mode is
asked for by the trainer's `--distributed` flag or the environment variable `DPO_JAX_DISTRIBUTED=1`;
then each process joins the others through a coordinator and `jax.devices()` lists the devices of all
of them (`jax.local_devices()` stays this host's). Where the coordinator comes from:

- Cloud TPU pod slices: nothing to give; JAX reads the slice's metadata on every worker.
- SLURM (`srun`): nothing to give either (JAX reads SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID,
  SLURM_LOCALID), but launch/gpu_slurm.sbatch passes them explicitly so the log shows what was used.
- Anything else (GPU clusters, local processes): an explicit coordinator `host:port` (process 0's
  address, a free port), the number of processes, and this process's id in [0, num_processes).

Every value is a flag (`--coordinator_address`, `--num_processes`, `--process_id`,
`--local_device_ids`) or, when the flag is not given, an environment variable (`DPO_JAX_COORDINATOR`,
`DPO_JAX_NUM_PROCESSES`, `DPO_JAX_PROCESS_ID`, `DPO_JAX_LOCAL_DEVICE_IDS`); what stays unset is left
to JAX's cluster auto-detection. On CPU, cross-process collectives go through gloo (set here before
initialize; without it a multi-process CPU computation has no way to all-reduce).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import jax

ENV_ENABLE = "DPO_JAX_DISTRIBUTED"
ENV_COORDINATOR = "DPO_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DPO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DPO_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "DPO_JAX_LOCAL_DEVICE_IDS"
ENV_TIMEOUT = "DPO_JAX_INIT_TIMEOUT"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `jax.distributed.initialize` is called with; None = left to JAX's cluster auto-detection."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  timeout_s: int = 300


def _env_int(environ: Mapping[str, str], name: str, flag: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer; set it (or --{flag}) to a whole number.") from None


def _device_ids(text: str, source: str) -> tuple[int, ...] | None:
  text = text.strip()
  if not text:
    return None
  try:
    return tuple(int(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"{source}={text!r}: give comma-separated device ids, e.g. 0,1,2,3.") from None


def requested(flag: bool = False, environ: Mapping[str, str] | None = None) -> bool:
  """True when multi-host mode is asked for: the `--distributed` flag or DPO_JAX_DISTRIBUTED=1."""
  environ = os.environ if environ is None else environ
  value = environ.get(ENV_ENABLE, "").strip().lower()
  if value not in _TRUE + _FALSE:
    raise ValueError(f"{ENV_ENABLE}={environ[ENV_ENABLE]!r}; use 1 (multi-host) or 0 / unset (one process).")
  return bool(flag) or value in _TRUE


def settings(*, coordinator_address: str = "", num_processes: int | None = None, process_id: int | None = None,
             local_device_ids: str | Sequence[int] = "", timeout_s: int | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
  """Flags first, then DPO_JAX_* environment variables; checks that the values fit together."""
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(ENV_COORDINATOR, "").strip() or None
  count = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES, "num_processes")
  index = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID, "process_id")
  if isinstance(local_device_ids, str):
    ids = (_device_ids(local_device_ids, "--local_device_ids")
           or _device_ids(environ.get(ENV_LOCAL_DEVICE_IDS, ""), ENV_LOCAL_DEVICE_IDS))
  else:
    ids = tuple(int(i) for i in local_device_ids) or None
  timeout = timeout_s if timeout_s is not None else (_env_int(environ, ENV_TIMEOUT, "init_timeout") or 300)
  if address is not None and ":" not in address:
    raise ValueError(f"coordinator address {address!r} (--coordinator_address / {ENV_COORDINATOR}) needs a port: "
                     f"host:port, e.g. {address}:12355 (any free port on process 0's host).")
  if count is not None and count < 1:
    raise ValueError(f"--num_processes / {ENV_NUM_PROCESSES} = {count}; it must be >= 1.")
  if index is not None and count is not None and not 0 <= index < count:
    raise ValueError(f"--process_id / {ENV_PROCESS_ID} = {index} is outside [0, num_processes={count}); number "
                     f"the processes 0 .. {count - 1}.")
  if address is not None and (count is None) != (index is None):
    raise ValueError(f"with an explicit coordinator ({address}) give both --num_processes and --process_id (or "
                     f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}), or neither to let JAX detect them (TPU, SLURM).")
  return Settings(address, count, index, ids, int(timeout))


def initialize(s: Settings) -> None:
  """`jax.distributed.initialize(...)` with `s`; call it before anything asks JAX for its devices."""
  if jax.distributed.is_initialized():
    return  # a second main() in the same process (tests) joins nothing new
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=s.coordinator_address, num_processes=s.num_processes,
                             process_id=s.process_id,
                             local_device_ids=None if s.local_device_ids is None else list(s.local_device_ids),
                             initialization_timeout=s.timeout_s)
  print(f"distributed: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local "
        f"of {jax.device_count()} {jax.devices()[0].platform} devices (coordinator "
        f"{s.coordinator_address or 'auto-detected'})", flush=True)


def maybe_initialize(*, distributed: bool = False, coordinator_address: str = "", num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: str | Sequence[int] = "",
                     timeout_s: int | None = None, environ: Mapping[str, str] | None = None) -> bool:
  """Join the other processes when multi-host mode is asked for (flag or DPO_JAX_DISTRIBUTED=1).

  Returns whether it initialized. Giving a coordinator, count or id without asking is an error, not a
  silent single-process run that would train on a fraction of the devices with the wrong batch slice.
  """
  environ = os.environ if environ is None else environ
  s = settings(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
               local_device_ids=local_device_ids, timeout_s=timeout_s, environ=environ)
  if not requested(distributed, environ):
    given = [name for name, v in (("coordinator_address", s.coordinator_address),
                                  ("num_processes", s.num_processes), ("process_id", s.process_id)) if v is not None]
    if given:
      raise ValueError(f"{', '.join(given)} given but multi-host mode is off; add --distributed (or set "
                       f"{ENV_ENABLE}=1), or drop them for a single-process run.")
    return False
  initialize(s)
  return True
