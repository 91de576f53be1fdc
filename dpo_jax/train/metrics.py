"""Where metrics go: stdout lines, a JSONL file and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def format_line(prefix: str, step: int, metrics: Mapping[str, float], keys: tuple[str, ...] | None = None) -> str:
  keys = keys or tuple(metrics)
  return f"{prefix} step {step:5d} | " + " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


class MetricsWriter:
  """Appends `{"step": s, "stage": ..., **metrics}` lines to `<dir>/metrics.jsonl` and scalars to TensorBoard.

  Only process 0 writes (pass `enabled=False` elsewhere).
  """

  def __init__(self, directory: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(directory, exist_ok=True)
    self.jsonl_path = os.path.join(directory, "metrics.jsonl")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
    except ImportError:  # TensorBoard files are a convenience; the JSONL file is the record
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, float], *, stage: str, split: str = "train") -> None:
    if not self.enabled:
      return
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"stage": stage, "split": split, "step": int(step), **metrics}) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{stage}/{split}/{k}", v, int(step))
      self._tb.flush()

  def drop_after(self, stage: str, step: int) -> int:
    """Remove `stage`'s records with a step after `step` (both splits); returns how many were removed.

    Called when a stage (re)starts from `step`: records a killed run logged after its last checkpoint are
    logged again by the resumed run, so the file never holds a step twice. The rewrite is atomic (a
    temporary file, then a rename), so a kill here loses nothing either.
    """
    if not self.enabled or not os.path.isfile(self.jsonl_path):
      return 0
    with open(self.jsonl_path) as f:
      lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:  # a line cut short by a kill mid-write: nothing to keep
        continue
      if not (record.get("stage") == stage and int(record.get("step", 0)) > step):
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
      with open(self.jsonl_path + ".tmp", "w") as f:
        f.writelines(keep)
      os.replace(self.jsonl_path + ".tmp", self.jsonl_path)
    return len(lines) - len(keep)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


# absl's own record prefix: severity letter, MMDD, time (`I1204 21:39:39.296374 ...`).
ABSL_RECORD = r"^[IWEF]\d{4} \d\d:\d\d:\d\d"


def quiet_library_logs() -> None:
  """Call at an entry point once flags are parsed. Library records below WARNING (absl, orbax, jax, datasets) are
  then dropped unless the command line asked for them (`--verbosity=0`: INFO, `1`: DEBUG). absl's `app.run` raises
  an unset --verbosity to INFO, which buried the progress bar under ~190 orbax lines a run; what a run reports goes
  to stdout, metrics.jsonl and TensorBoard instead. Warnings still show."""
  from absl import flags, logging as absl_logging
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
