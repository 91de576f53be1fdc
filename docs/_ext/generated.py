"""Pages the site builds from the code, so they cannot fall behind it (written to docs/generated/, not committed).

- `config_reference.md`, `frontier_config.md`: every field of configs/default.py and the `frontier` block of
  configs/frontier.py, from the comment next to each default: `scripts/config_table.py`'s tables (a field without
  a comment fails its test).
- `loss_table.md`: one row per `dpo_jax.losses.LOSSES` key, then per `UNPAIRED_LOSSES` key: the equation and
  source from the module docstring's variant lists, whether it reads pi_ref, length normalisation, label smoothing
  and its options with defaults. A registered loss without a docstring line stops the build.
- `sharding_rules.md`: `dpo_jax.sharding.DEFAULT_RULES`, logical axis -> mesh axes.
- `notebooks/loss_ablation.ipynb`, `notebooks/rl_steps.ipynb`: the committed notebooks with their stored outputs,
  rendered by myst-nb.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "generated"
NOTEBOOKS = ("loss_ablation.ipynb", "rl_steps.ipynb")  # notebooks/ -> generated/notebooks/, each a page


def _config_table_module():
  spec = importlib.util.spec_from_file_location("_dpo_jax_config_table", ROOT / "scripts" / "config_table.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def loss_rows() -> list[dict[str, str]]:
  """One dict per `LOSSES` key, then per `UNPAIRED_LOSSES` key, in registry order: name, source, equation,
  reference, length, eps, options."""
  from dpo_jax import losses

  doc = losses.__doc__.split("Variants (", 1)[1].split("Combinations", 1)[0]
  lines = {}
  for line in doc.splitlines():
    if m := re.match(r"^  (\w+)\s+(.+?)\s{2,}(.+)$", line):
      lines[m.group(1)] = (m.group(2), m.group(3))
  missing = [name for name in (*losses.LOSSES, *losses.UNPAIRED_LOSSES) if name not in lines]
  if missing:
    raise ValueError(f"dpo_jax/losses.py: no line for {missing} in the module docstring's variant list "
                     "('  name  source  equation'); add one.")
  rows = []
  for name, spec in losses.LOSSES.items():
    source, equation = lines[name]
    options = ", ".join(f"`{k}={v}`" for k, v in spec.options.items()) or "-"
    rows.append(dict(name=name, source=source, equation=equation, reference="yes" if spec.uses_reference else "no",
                     length="yes" if spec.needs_num_tokens else "-",
                     eps="yes" if spec.uses_label_smoothing else "-", options=options))
  for name, spec in losses.UNPAIRED_LOSSES.items():  # unpaired rows: always pi_ref, no lengths, no smoothing
    source, equation = lines[name]
    options = ", ".join(f"`{k}={v}`" for k, v in spec.options.items()) or "-"
    rows.append(dict(name=name, source=source + " (unpaired rows)", equation=equation, reference="yes", length="-",
                     eps="-", options=options))
  return rows


def loss_table() -> str:
  header = ("| `loss.type` | source | loss per pair (unpaired: per row) | pi_ref | per-token lengths | "
            "`label_smoothing` | options (`loss.options.*`, default) |\n|---|---|---|---|---|---|---|")
  body = [f"| `{r['name']}` | {r['source']} | `{r['equation']}` | {r['reference']} | {r['length']} | {r['eps']} | "
          f"{r['options']} |" for r in loss_rows()]
  return "\n".join([header] + body) + "\n"


def sharding_rules_table() -> str:
  from dpo_jax import sharding

  rows = [f"| `{axis}` | {', '.join(f'`{m}`' for m in ((mesh,) if isinstance(mesh, str) else mesh or ())) or 'replicated'} |"
          for axis, mesh in sharding.DEFAULT_RULES]
  return "\n".join(["| logical axis | mesh axes |", "|---|---|"] + rows) + "\n"


def _write(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists() or path.read_text() != text:  # unchanged files keep their mtime: no needless rebuilds
    path.write_text(text)


def generate(app=None) -> None:
  table = _config_table_module()
  _write(OUT / "config_reference.md", table.table())
  _write(OUT / "frontier_config.md", table.table(table.FRONTIER_SOURCE.read_text()))
  _write(OUT / "loss_table.md", loss_table())
  _write(OUT / "sharding_rules.md", sharding_rules_table())
  for name in NOTEBOOKS:
    notebook, source = OUT / "notebooks" / name, ROOT / "notebooks" / name
    if not notebook.exists() or notebook.read_bytes() != source.read_bytes():
      notebook.parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(source, notebook)


def setup(app):
  app.connect("builder-inited", generate)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
