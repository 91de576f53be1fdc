"""Run notebooks/loss_ablation.ipynb with its own parameters and store its outputs in the file, as the docs render
them (myst-nb never executes it while building the site).

    python scripts/execute_notebook.py            # ~2.5 min on 2 CPU cores; the workdir runs/loss_ablation is
                                                  # removed first, so nothing is resumed from an older run

Execution timestamps are dropped from the cell metadata, so a rerun changes only what the outputs say.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--notebook", default=str(ROOT / "notebooks" / "loss_ablation.ipynb"))
  parser.add_argument("--workdir", default=str(ROOT / "runs" / "loss_ablation"),
                      help="the notebook's WORKDIR, removed before the run")
  args = parser.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  nb = nbformat.read(args.notebook, as_version=4)
  start = time.perf_counter()
  env_platforms = os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the stored outputs are a CPU run's
  nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
  nbformat.write(nb, args.notebook)
  print(f"{args.notebook}: executed in {time.perf_counter() - start:.0f} s (JAX_PLATFORMS={env_platforms})")


if __name__ == "__main__":
  main()
