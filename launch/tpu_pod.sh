#!/usr/bin/env bash
# dpo_jax on a Cloud TPU VM slice: create the slice (or reuse it), copy this checkout to every worker,
# set up a venv there (idempotent: pip runs only when setup.py or JAX_SPEC changed), then run the same
# `python -m dpo_jax.train` on all workers at once and stream their output here.
#
# Usage: launch/tpu_pod.sh [TRAINER FLAGS...]
#   TPU_NAME=dpo-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-16 WORKDIR=/mnt/shared/runs/dpo \
#     launch/tpu_pod.sh --config configs/default.py --config.batch_size=64
#
# Environment (defaults in brackets):
#   TPU_NAME          slice name [dpo-jax]
#   ZONE              zone [us-central2-b]
#   PROJECT           GCP project [gcloud's default]
#   ACCELERATOR_TYPE  used when creating [v4-16]
#   RUNTIME_VERSION   TPU VM image when creating [tpu-ubuntu2204-base]
#   SPOT              1 = create a spot slice [0]
#   REMOTE_DIR        checkout and venv on each worker [dpo_jax] (relative to the worker's home)
#   JAX_SPEC          pip requirement for JAX [jax[tpu]]
#   WORKDIR           trainer --workdir, relative to REMOTE_DIR; with several workers it must be one folder
#                     all of them see (NFS / Filestore, or a bucket mounted by gcsfuse in MOUNT_CMD) [workdir]
#   MOUNT_CMD         shell command run on every worker before training, e.g.
#                     'mkdir -p ~/gcs && (mountpoint -q ~/gcs || gcsfuse --implicit-dirs BUCKET ~/gcs)' ['']
#   DELETE            1 = delete the slice when the run ends, whether it succeeded or not [0]
#   DRY_RUN           1 = print the gcloud commands instead of running them [0]
# JAX finds the coordinator, process count and id from the TPU metadata: DPO_JAX_DISTRIBUTED=1 is all the
# trainer needs. Each worker also keeps its own log in REMOTE_DIR/logs/.
# Before creating the slice, check that the step compiles and fits it, on any machine (README, dry run for a TPU
# slice): python -m dpo_jax.train --dry_run --config.dry_run.topology=$ACCELERATOR_TYPE [TRAINER FLAGS...]
set -euo pipefail

usage() {
  awk 'NR == 1 { next } /^#SBATCH/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"
}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

TPU_NAME="${TPU_NAME:-dpo-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
REMOTE_DIR="${REMOTE_DIR:-dpo_jax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
WORKDIR="${WORKDIR:-workdir}"
MOUNT_CMD="${MOUNT_CMD:-}"
DELETE="${DELETE:-0}"
DRY_RUN="${DRY_RUN:-0}"

common=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  common+=(--project="$PROJECT")
fi

gcloud_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud'
    printf ' %q' "$@"
    printf '\n'
  else
    gcloud "$@"
  fi
}

on_all_workers() {  # one shell command string, run on every worker of the slice
  gcloud_run compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker=all --command="$1"
}

cd "$(dirname "$0")/.."

# 1. The slice: reuse it if it exists, else create it.
if [[ "$DRY_RUN" != 1 ]] && gcloud compute tpus tpu-vm describe "$TPU_NAME" "${common[@]}" >/dev/null 2>&1; then
  echo "tpu_pod: reusing $TPU_NAME in $ZONE"
else
  create=(compute tpus tpu-vm create "$TPU_NAME" "${common[@]}" --accelerator-type="$ACCELERATOR_TYPE"
    --version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then
    create+=(--spot)
  fi
  echo "tpu_pod: creating $TPU_NAME ($ACCELERATOR_TYPE) in $ZONE"
  gcloud_run "${create[@]}"
fi

if [[ "$DELETE" == 1 ]]; then
  trap 'echo "tpu_pod: deleting $TPU_NAME"; gcloud_run compute tpus tpu-vm delete "$TPU_NAME" "${common[@]}" --quiet' \
    EXIT
fi

# 2. The code: every tracked file of this checkout (uncommitted edits included), as one archive.
archive="$(mktemp -t dpo_jax_src.XXXXXX.tgz)"
git ls-files -z | tar --null -czf "$archive" -T -
gcloud_run compute tpus tpu-vm scp "$archive" "$TPU_NAME:dpo_jax_src.tgz" "${common[@]}" --worker=all
rm -f "$archive"

# 3. The venv, on every worker; pip runs again only when setup.py or JAX_SPEC changed.
printf -v q_dir '%q' "$REMOTE_DIR"
printf -v q_jax '%q' "$JAX_SPEC"
setup="set -euo pipefail
mkdir -p $q_dir/logs && tar -xzf ~/dpo_jax_src.tgz -C $q_dir
cd $q_dir
[ -x venv/bin/python ] || python3 -m venv venv
stamp=\"\$(cat setup.py; echo $q_jax)\"
if [ \"\$(cat venv/.dpo_jax_stamp 2>/dev/null)\" != \"\$stamp\" ]; then
  venv/bin/pip install -q --upgrade pip && venv/bin/pip install -q $q_jax -e .
  printf '%s' \"\$stamp\" > venv/.dpo_jax_stamp
fi"
echo "tpu_pod: copying the code and setting up $REMOTE_DIR/venv on every worker"
on_all_workers "$setup"

# 4. The run: the same command on every worker; gcloud streams each worker's output here.
printf -v q_args ' %q' "$@"
printf -v q_workdir '%q' "$WORKDIR"
run="set -euo pipefail
${MOUNT_CMD}
cd $q_dir
export DPO_JAX_DISTRIBUTED=1
venv/bin/python -u -m dpo_jax.train --workdir $q_workdir${q_args} 2>&1 | tee -a logs/train_\$(hostname).log"
echo "tpu_pod: training on every worker of $TPU_NAME"
on_all_workers "$run"
echo "tpu_pod: done; results in $WORKDIR (relative to $REMOTE_DIR), logs in $REMOTE_DIR/logs on each worker"
