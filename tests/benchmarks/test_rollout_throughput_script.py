"""benchmarks/rollout_throughput.py --smoke end to end: the table has its columns, both samplers' throughputs are
positive numbers, and our sampler's log-probs equal torch's teacher-forced ones on the same weights (so the two
columns time the same model)."""

import json
import subprocess
import sys

import pytest
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices

COLUMNS = ["size", "params", "batch", "new tokens", "ours tokens/s", "HF generate tokens/s", "ratio (ours / HF)",
           "our compile s", "max abs logp diff (nats)"]
LOGP_ATOL = 1e-3  # nats per token; fp32 on both sides gives ~1e-6


def table_rows(markdown: str) -> list[dict[str, str]]:
  """The markdown table's rows as {column: cell}."""
  lines = [line for line in markdown.splitlines() if line.startswith("|")]
  assert len(lines) >= 3, f"no markdown table in:\n{markdown}"
  split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
  header = split(lines[0])
  return [dict(zip(header, split(line))) for line in lines[2:]]


def number(cell: str) -> float:
  return float(cell.replace(",", ""))


@pytest.mark.slow  # ~10 s on a 2-core CPU: a subprocess that imports jax, torch and transformers
def test_smoke_run(tmp_path):
  env = without_emulated_devices(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, "benchmarks/rollout_throughput.py", "--smoke", "--out", str(tmp_path)],
                        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  log = proc.stdout[-4000:] + proc.stderr[-4000:]
  assert proc.returncode == 0, f"rollout_throughput.py --smoke failed (rc {proc.returncode}):\n{log}"

  markdown = (tmp_path / "rollout_throughput.md").read_text()
  assert markdown in proc.stdout, "the printed report and rollout_throughput.md differ"
  rows = table_rows(markdown)
  assert len(rows) == 1, rows  # --smoke: one size, one batch size
  row = rows[0]
  assert [c for c in row if c != "ours rollout tokens/s"] == COLUMNS, f"columns changed: {list(row)}"
  assert (row["size"], row["batch"], row["new tokens"]) == ("tiny", "8", "4"), row
  throughputs = ["ours tokens/s", "HF generate tokens/s"] + (["ours rollout tokens/s"] if "ours rollout tokens/s"
                                                             in row else [])
  for column in throughputs + ["ratio (ours / HF)", "params"]:
    assert number(row[column]) > 0, f"{column} = {row[column]!r}:\n{log}"
  assert number(row["our compile s"]) >= 0, row
  assert number(row["max abs logp diff (nats)"]) < LOGP_ATOL, (
      f"our sampler's log-probs differ from torch's teacher-forced ones on the same weights by "
      f"{row['max abs logp diff (nats)']} nats: the checkpoint export or the KV-cache decode computes another model")

  result = json.loads((tmp_path / "rollout_throughput.json").read_text())
  (r,) = result["rows"]
  assert r["ours_tokens_per_s"] == pytest.approx(8 * 4 / r["ours_s"]), r
  assert result["header"]["torch_threads"] >= 1 and result["header"]["cpu"], result["header"]


def test_written_out_model_fields_equal_configs_default():
  """The GPU image has no ml_collections: the script then builds the model from its written-out fields, which must
  be configs/default.py's (default and tiny)."""
  import importlib.util
  import os
  from configs.default import get_config
  from dpo_jax import model as model_lib
  path = os.path.join(REPO_ROOT, "benchmarks", "rollout_throughput.py")
  spec = importlib.util.spec_from_file_location("_rollout_throughput", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  for variant, fields in ((None, bench.DEFAULT_MODEL), ("tiny", bench.TINY_MODEL)):
    assert model_lib.ModelConfig.from_dict(fields) == model_lib.ModelConfig.from_dict(dict(get_config(variant).model)), (
        f"benchmarks/rollout_throughput.py's {variant or 'default'} model fields differ from configs/default.py's")
