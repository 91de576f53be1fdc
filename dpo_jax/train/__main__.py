"""`python -m dpo_jax.train`: the trainer's command line (dpo_jax/train/pipeline.py runs the stages).

    python -m dpo_jax.train                                   # the embedded default, no downloads
    python -m dpo_jax.train --config configs/default.py:tiny --config.loss.beta=0.05 --workdir runs/b005
    python -m dpo_jax.train --config.stage=sft                # one stage alone
    python -m dpo_jax.train --dry_run --config.mesh.fsdp=-1   # sizes and shardings, no step run
    python -m dpo_jax.train --dry_run --config.dry_run.topology=v5p-64 --config.mesh.fsdp=-1   # compiled for a TPU
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax and numpy start threads: on CPU glibc keeps freed memory
  from dpo_jax.train import host_memory, topology
  host_memory.configure_at_startup()
  topology.quiet_libtpu_without_tpu()  # libtpu installed on a machine without a TPU: no start-up warnings

import os
import sys

from dpo_jax.train import config_checks, errors, loop, metrics as metrics_lib, pipeline, runtime



def _refuse_topology(name: str) -> None:
  raise ValueError(f"config.dry_run.topology={name!r} is only compiled for, never run on: add --dry_run (or set "
                   "--config.dry_run.topology='' to train on this machine's devices).")


def main(argv=None) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", os.path.join(runtime.CONFIG_DIR, "default.py"),
                                  "Config file[:variant]; fields are overridable as --config.a.b=value.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and the summary go here; rerun to resume. "
                      "Multi-host: a filesystem every host sees (NFS, a gcsfuse mount).")
  # Multi-host (dpo_jax/train/distributed.py): the same command on every host; unset flags fall back to DPO_JAX_*
  # env vars.
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize first (also: DPO_JAX_DISTRIBUTED=1).")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (DPO_JAX_COORDINATOR); '' = auto (TPU, "
                      "SLURM).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (DPO_JAX_NUM_PROCESSES); unset = auto.")
  flags.DEFINE_integer("process_id", None, "This process, 0 .. num_processes - 1 (DPO_JAX_PROCESS_ID); unset = auto.")
  flags.DEFINE_bool("dry_run", False, "Print the param count, every param's sharding and the per-device memory of "
                    "params, optimizer state, pi_ref and the compiled step's activations for this config and mesh, "
                    "then exit without running a step (dpo_jax/train/dry_run.py).")
  flags.DEFINE_string("local_device_ids", "", "Comma-separated devices this process uses, e.g. one GPU per process "
                      "(DPO_JAX_LOCAL_DEVICE_IDS); '' = all visible.")

  def _main(_):
    from dpo_jax.train import distributed
    metrics_lib.quiet_library_logs()
    f = flags.FLAGS
    topology_name = f.config.get("dry_run", {}).get("topology", "")
    if topology_name and not f.dry_run:
      errors.exit_on_purpose_errors(_refuse_topology, topology_name)
    if topology_name:  # before anything touches a backend: libtpu reads its environment when it loads
      from dpo_jax.train import topology
      topology.configure_environment()
    distributed.maybe_initialize(distributed=f.distributed, coordinator_address=f.coordinator_address,
                                 num_processes=f.num_processes, process_id=f.process_id,
                                 local_device_ids=f.local_device_ids)  # before anything touches a device
    if f.dry_run and topology_name:
      from dpo_jax.train import tpu_dry_run
      errors.exit_on_purpose_errors(tpu_dry_run.report, f.config)
      return
    if f.dry_run:
      from dpo_jax.train import dry_run
      errors.exit_on_purpose_errors(dry_run.report, f.config)
      return
    try:
      # bad input: one line
      errors.exit_on_purpose_errors(pipeline.run, f.config, f.workdir, passthrough=(loop.Preempted,))
    except loop.Preempted as done:  # checkpointed: a clean exit, so the scheduler reschedules rather than fails it
      print(done, flush=True)

  config_checks.check_override_flags((sys.argv if argv is None else argv)[1:])  # one line, not a traceback
  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
