"""Pages the site builds from the code, so they cannot fall behind it (written to docs/generated/, not committed).

- `config_reference.md`: every field of configs/default.py and the `frontier` block of configs/frontier.py, from
  the comment next to each default (scripts/config_table.py reads them; a field without one fails its test).
- `loss_table.md`: one row per `dpo_jax.losses.LOSSES` key: the equation and source from the module docstring's
  variant list, whether it reads pi_ref, length normalisation, label smoothing and its options with defaults. A
  registered loss without a docstring line stops the build.
- `sharding_rules.md`: `dpo_jax.sharding.DEFAULT_RULES`, logical axis -> mesh axes.
- `notebooks/loss_ablation.ipynb`: the committed notebook with its stored outputs, rendered by myst-nb.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "generated"


def _config_table_module():
  spec = importlib.util.spec_from_file_location("_dpo_jax_config_table", ROOT / "scripts" / "config_table.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def loss_rows() -> list[dict[str, str]]:
  """One dict per `LOSSES` key, in registry order: name, source, equation, reference, length, eps, options."""
  from dpo_jax import losses

  doc = losses.__doc__.split("Variants (", 1)[1].split("Combinations", 1)[0]
  lines = {}
  for line in doc.splitlines():
    if m := re.match(r"^  (\w+)\s+(.+?)\s{2,}(.+)$", line):
      lines[m.group(1)] = (m.group(2), m.group(3))
  missing = [name for name in losses.LOSSES if name not in lines]
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
  return rows


def loss_table() -> str:
  header = ("| `loss.type` | source | loss per pair | pi_ref | per-token lengths | `label_smoothing` | options "
            "(`loss.options.*`, default) |\n|---|---|---|---|---|---|---|")
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


def _cell(text: str) -> str:
  """Text for a Markdown table cell: a pipe would end the cell, and `<workdir>` would read as an HTML tag."""
  return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


GROUPS = {"": "Run, batch and logging", "data": "Data", "model": "Model", "hf": "Hugging Face checkpoints",
          "lora": "LoRA", "mesh": "Mesh", "sharding": "Sharding", "loss": "Loss", "ref_update": "Reference updates",
          "optim": "Optimizer", "sft": "SFT stage", "eval": "Evaluation", "perf": "Performance accounting",
          "dry_run": "Dry run", "frontier": "Frontier experiment"}


def config_reference(rows: list[tuple[str, str, str]]) -> str:
  """One table per config block (`data.*`, `model.*`, ...; top-level fields first), each under its own heading."""
  groups: dict[str, list[str]] = {}
  for name, default, meaning in rows:
    block = name.split(".", 1)[0] if "." in name else ""
    groups.setdefault(block, []).append(f"| `{name}` | `{_cell(default)}` | {_cell(meaning)} |")
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(f"docs/_ext/generated.py: config blocks {unknown} have no title in GROUPS; add one.")
  out = []
  for block in sorted(groups, key=lambda b: b != ""):  # top-level fields first, then the blocks in source order
    out += [f"### {GROUPS[block]}" + (f" (`{block}.*`)" if block else ""), "",
            "| field | default | meaning |", "|---|---|---|"] + groups[block] + [""]
  return "\n".join(out)


def generate(app=None) -> None:
  table = _config_table_module()
  _write(OUT / "config_reference.md", config_reference(table.rows()))
  _write(OUT / "frontier_config.md", config_reference(table.rows(table.FRONTIER_SOURCE.read_text())))
  _write(OUT / "loss_table.md", loss_table())
  _write(OUT / "sharding_rules.md", sharding_rules_table())
  notebook = OUT / "notebooks" / "loss_ablation.ipynb"
  source = ROOT / "notebooks" / "loss_ablation.ipynb"
  if not notebook.exists() or notebook.read_bytes() != source.read_bytes():
    notebook.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, notebook)


def setup(app):
  app.connect("builder-inited", generate)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
