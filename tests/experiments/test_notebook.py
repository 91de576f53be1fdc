"""notebooks/loss_ablation.ipynb runs headlessly, and `dpo_jax.experiments.ablation.run_ablation` on the tiny config."""

import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from configs.default import get_config
from dpo_jax.train import metrics
from dpo_jax.experiments.ablation import run_ablation
from paths import REPO_ROOT

ROOT = REPO_ROOT
NOTEBOOK = os.path.join(ROOT, "notebooks", "loss_ablation.ipynb")


def _library_records(text):
  """Lines a library logged rather than the project printed: absl-format records, or Python logging's
  `WARNING:absl:` form (no absl handler in a notebook kernel)."""
  return [line for line in text.splitlines() if re.match(metrics.ABSL_RECORD, line) or ":absl:" in line]


@pytest.mark.slow
def test_run_ablation_tiny(tmp_path, capfd):
  config = get_config("tiny")
  config.optim.total_steps, config.sft.steps, config.eval.num_prompts = 4, 4, 8
  before = config.to_dict()
  variants = [{"name": "dpo", "type": "sigmoid", "beta": 0.1}]  # the notebook test runs a reference-free one too
  records = run_ablation(config, str(tmp_path), variants, eval_every=2)
  assert config.to_dict() == before  # the caller's config is not modified
  assert [(r["variant"], r["step"]) for r in records] == [("dpo", s) for s in (0, 2, 4)]
  for r in records:
    assert all(math.isfinite(r[k]) for k in ("accuracy", "reward", "kl", "loss")), r
  for r in records:  # pi = pi_ref at step 0: every margin is 0 (accuracy 0) and the sampled KL is exactly 0
    if r["step"] == 0:
      assert r["accuracy"] == 0.0 and r["kl"] == 0.0, r
  assert records[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # sigmoid at pi = pi_ref
  assert any(r["kl"] != 0.0 for r in records if r["step"] == 4)  # DPO moved the policy
  assert os.path.isdir(tmp_path / "dpo" / "dpo" / "checkpoints") and os.path.isdir(tmp_path / "sft" / "checkpoints")
  out, err = capfd.readouterr()
  assert "resuming from step 2" in out  # each segment resumes the variant's checkpoint ...
  assert not _library_records(out + err), _library_records(out + err)  # ... without orbax's metadata warning


@pytest.mark.slow
def test_notebook_runs(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  stored = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  stored_text = "".join(o.get("text", "") for o in stored)
  # The docs render the stored outputs (scripts/execute_notebook.py writes them): a whole run, its figures as
  # PNG, no library log lines and no execution timestamps.
  assert "final step per variant" in stored_text and "unlikelihood" in stored_text, "run scripts/execute_notebook.py"
  assert sum("image/png" in o.get("data", {}) for o in stored) == 3, "the three figures are stored as PNG"
  # One pass over the data per cache key: the pairs, LD-DPO's weighted sums, KTO / BCO's unpaired rows.
  assert stored_text.count("reference cache miss") == 3, "run scripts/execute_notebook.py"
  assert not _library_records(stored_text) and "libtpu" not in stored_text, _library_records(stored_text)
  assert not any("execution" in c.metadata for c in nb.cells)
  for cell in nb.cells:  # this test runs the sources, shortened
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
  overrides = (f"STEPS = 8\nEVAL_EVERY = 4\nSFT_STEPS = 4\nNUM_PROMPTS = 8\nCONFIG = 'tiny'\n"
               f"WORKDIR = {str(tmp_path / 'ablation')!r}\n"
               f"VARIANTS = VARIANTS[:1] + [v for v in VARIANTS if v['type'] in ('simpo', 'kto')]  # ref-free, unpaired\n")
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
  os.environ["HF_HUB_OFFLINE"] = "1"  # the kernel inherits it
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError naming the cell if any cell errors
  streams = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
  assert "ablation:" in streams and "final step per variant" in streams
  assert not _library_records(streams), _library_records(streams)
  assert "Warning" not in streams, streams  # e.g. tqdm's IProgress warning when ipywidgets is not installed
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "final step per variant" in text and "simpo" in text
  assert os.path.isfile(tmp_path / "ablation" / "loss_ablation.png")
  assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) == 3
  assert "ablation kto: reference cache miss" in streams  # its unpaired rows: their own entry


RL_NOTEBOOK = os.path.join(ROOT, "notebooks", "rl_steps.ipynb")
RL_COLUMNS = ["step", "mean r*", "rollout KL", "approx-KL", "clip frac", "entropy"]
RL_RERUN = "rerun python scripts/execute_notebook.py --notebook notebooks/rl_steps.ipynb --workdir /tmp/rl_steps_nb"


def _rl_tables(text):
  """{method: [[step, mean r*, rollout KL, approx-KL, clip frac, entropy], ...]}: the rows under each
  'METHOD: S steps of ...' line and its header."""
  lines, tables = text.splitlines(), {}
  for i, line in enumerate(lines):
    if m := re.match(r"^(\w+): (\d+) steps of ", line):
      assert re.split(r"\s{2,}", lines[i + 1].strip()) == RL_COLUMNS, lines[i + 1]
      tables[m.group(1)] = [[float(v) for v in row.split()] for row in lines[i + 2:i + 2 + int(m.group(2))]]
  return tables


def test_rl_notebook_stores_its_tables():
  """notebooks/rl_steps.ipynb as the docs render it (myst-nb never executes it): every cell's stored stdout, a PPO
  and a GRPO table of finite numbers, no library log lines and no execution timestamps. Cheap: nothing runs."""
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(RL_NOTEBOOK, as_version=4)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  # stdout only: a warning (stderr) or an error in the stored run would be rendered on the site.
  assert outputs and all(o.get("output_type") == "stream" and o.get("name") == "stdout" for o in outputs), RL_RERUN
  text = "".join(o.get("text", "") for o in outputs)
  tables = _rl_tables(text)
  assert sorted(tables) == ["GRPO", "PPO"], f"{sorted(tables)}: {RL_RERUN}"
  for method, rows in tables.items():
    assert len(rows) >= 2 and [r[0] for r in rows] == list(range(1, len(rows) + 1)), (method, rows)
    assert all(len(r) == len(RL_COLUMNS) and all(math.isfinite(v) for v in r) for r in rows), (method, rows)
    assert rows[0][2] == 0.0, (method, rows[0])  # step 1 samples pi_ref itself: its sequence KL is exactly 0
    assert all(0.0 <= r[4] <= 1.0 and r[5] > 0.0 for r in rows), (method, rows)  # clip fraction, entropy
  assert "held-out r*" in text, RL_RERUN
  assert not _library_records(text) and "libtpu" not in text, _library_records(text)
  assert not any("execution" in c.metadata for c in nb.cells), RL_RERUN
