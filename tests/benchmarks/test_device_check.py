"""benchmarks/device_check.py --smoke end to end on the CPU, in a child that cannot import ml_collections, datasets
or tensorboardX and has no pip-installed dpo_jax: the GPU image has none of them, so a passing run here says the
script will start there."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
from paths import REPO_ROOT
from subprocess_env import without_emulated_devices

ROOT = REPO_ROOT
MISSING = ("ml_collections", "datasets", "tensorboardX")

# Put first on sys.path (PYTHONPATH), it hides MISSING as if they were not installed: every meta-path finder answers
# None for them, so `import` raises ModuleNotFoundError and `importlib.util.find_spec` returns None (transformers
# probes optional packages that way: a stub package that raised on import would break its import instead). It also
# drops the editable install's finder: dpo_jax then imports only through the repo root the script puts on sys.path.
SITECUSTOMIZE = textwrap.dedent(f"""\
    import sys
    HIDDEN = {MISSING!r}

    class _Hide:
      def __init__(self, finder):
        self.finder = finder

      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
          return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

      def __getattr__(self, attr):
        return getattr(self.finder, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path
                        if not (getattr(f, "__module__", "") or "").startswith("__editable__")]
""")


def _child_env(tmp_path) -> dict:
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
  # conftest's 8 emulated devices dropped: the check runs on one, as on the GPU machine
  env = without_emulated_devices(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", DPO_JAX_HOST_MALLOC="system",
                                 PYTHONPATH=str(site), PYTHONUNBUFFERED="1")
  return env


def test_hidden_packages_are_unimportable(tmp_path):
  env = _child_env(tmp_path)
  for name in MISSING:
    probe = (f"import importlib.util, sys\nassert importlib.util.find_spec({name!r}) is None\n"
             f"try:\n  import {name}\nexcept ModuleNotFoundError:\n  sys.exit(0)\nsys.exit(1)")
    assert subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT).returncode == 0, (
        f"the sitecustomize in this test no longer hides {name}: test_smoke_run would not prove the script runs "
        "without it")
  outside = subprocess.run([sys.executable, "-c", "import dpo_jax"], env=env, cwd=tmp_path, capture_output=True)
  assert outside.returncode != 0, "dpo_jax still imports from outside the repo: hide its pip install in SITECUSTOMIZE"


@pytest.mark.slow  # 90-300 s on a 2-core CPU shared with other test runs (~130 s of CPU time)
def test_smoke_run(tmp_path):
  out = tmp_path / "out"
  # A budget above the default 420 s and a timeout above the budget: on a machine shared with other runs a row
  # skipped for time, or a run killed before its budget ends, would say nothing about the code paths.
  proc = subprocess.run([sys.executable, "benchmarks/device_check.py", "--smoke", "--out", str(out), "--budget_s",
                         "600"], env=_child_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=660)
  log = proc.stdout[-4000:] + proc.stderr[-4000:]
  assert proc.returncode == 0, f"device_check.py --smoke failed (rc {proc.returncode}):\n{log}"
  results = json.loads((out / "results.json").read_text())
  assert results["complete"] and not results["errors"], log

  checks = results["correctness"]["rows"]
  assert len(checks) == 7, checks
  failed = [r for r in checks if not r["passed"]]
  assert not failed, f"correctness rows failed on the CPU, where both sides are the same backend: {failed}"
  moe_logps, moe_grads = checks[5:]  # ragged vs dense one-hot: the same routing, only the summation order differs
  assert moe_logps["quantity"].startswith("MoE fp32 sequence log-probs, ragged vs dense"), moe_logps
  assert 0 <= moe_logps["value"] <= 1e-5 and 0 <= moe_grads["value"] <= 1e-5, (moe_logps, moe_grads)

  rows = {r["key"]: r for r in results["speed"]["rows"]}
  assert set(rows) == {"jax", "jax-remat", "jax-preref", "jax-xla", "torch"}, rows.keys()
  for key, r in rows.items():
    assert r["status"] == "ok", f"speed row {key}: {r['status']} {r['note']}"
    for column in ("step_s", "tokens_per_s", "mfu"):
      assert r[column] is not None and math.isfinite(r[column]) and r[column] > 0, (key, column, r[column])
  assert rows["jax"]["attention"] == "cpu_blocked" and rows["jax-xla"]["attention"] == "xla"

  moe_rows = {r["key"]: r for r in results["moe_speed"]["rows"]}
  assert list(moe_rows) == ["moe-ragged", "moe-dense"], moe_rows.keys()
  for key, r in moe_rows.items():
    assert r["status"] == "ok", f"MoE speed row {key}: {r['status']} {r['note']}"
    for column in ("step_s", "tokens_per_s", "mfu", "vs_dense"):
      assert r[column] is not None and math.isfinite(r[column]) and r[column] > 0, (key, column, r[column])
  assert moe_rows["moe-dense"]["vs_dense"] == 1.0 and moe_rows["moe-ragged"]["label"].endswith("MoE ragged")
  # the same model FLOPs for both (the k routed experts), whatever the kernel executes
  assert moe_rows["moe-ragged"]["step_flops"] == moe_rows["moe-dense"]["step_flops"]

  tables = (out / "tables.md").read_text()
  for heading in ("# Device check", "## 1. Correctness", "## 2. Speed", "## 2b. Speed: MoE DPO step",
                  "## 3. Rollouts"):
    assert heading in tables, f"{heading!r} missing from tables.md:\n{tables}"
  assert "no accelerator in this run" in tables  # a CPU-only run says its first comparison is trivial
  check_rollout_report(out / "rollout", results["rollout"], log)


ROLLOUT_COLUMNS = ["size", "params", "batch", "new tokens", "ours tokens/s", "ours rollout tokens/s",
                   "HF generate tokens/s", "ratio (ours / HF)", "our compile s", "max abs logp diff (nats)"]
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


def check_rollout_report(folder, markdown: str, log: str) -> None:
  """benchmarks/rollout_throughput.py --smoke, run by the device check without ml_collections (its model fields
  written out): the table has its columns, every throughput is a positive number, and our sampler's log-probs equal
  torch's teacher-forced ones on the same weights (so the columns time the same model)."""
  assert (folder / "rollout_throughput.md").read_text() == markdown
  (row,) = table_rows(markdown)  # --smoke: one size, one batch size
  assert list(row) == ROLLOUT_COLUMNS, f"columns changed: {list(row)}"
  assert (row["size"], row["batch"], row["new tokens"]) == ("tiny", "8", "4"), row
  for column in ("ours tokens/s", "ours rollout tokens/s", "HF generate tokens/s", "ratio (ours / HF)", "params"):
    assert number(row[column]) > 0, f"{column} = {row[column]!r}:\n{log}"
  assert number(row["our compile s"]) >= 0, row
  assert number(row["max abs logp diff (nats)"]) < LOGP_ATOL, (
      f"our sampler's log-probs differ from torch's teacher-forced ones on the same weights by "
      f"{row['max abs logp diff (nats)']} nats: the checkpoint export or the KV-cache decode computes another model")
  result = json.loads((folder / "rollout_throughput.json").read_text())
  (r,) = result["rows"]
  assert r["ours_tokens_per_s"] == pytest.approx(8 * 4 / r["ours_s"]), r
  assert result["header"]["torch_threads"] >= 1 and result["header"]["cpu"], result["header"]
