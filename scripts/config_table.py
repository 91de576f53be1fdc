"""Print the tables of config fields from the comments next to each default in configs/default.py and (the
`frontier` block) configs/frontier.py: `python scripts/config_table.py`.

The docs site builds its config reference (docs/configs.md) from `table()` while it builds
(docs/_ext/generated.py), so the published tables are always the code's.
"""

import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "configs" / "default.py"
FRONTIER_SOURCE = SOURCE.parent / "frontier.py"


def rows(source: str = SOURCE.read_text()) -> list[tuple[str, str, str]]:
  body = source.split("def get_config")[1].split('if arg == "tiny"')[0]
  out, section, nested = [], "", ""
  for line in body.splitlines():
    if m := re.match(r"\s*c\.(\w+) = ml_collections\.ConfigDict", line):
      section, nested = m.group(1) + ".", ""
    elif m := re.match(r"\s+(\w+)=ml_collections\.ConfigDict\(dict\(\s+# (.*)", line):  # a block inside a block
      out.append((section + m.group(1), "{...}", m.group(2)))
      nested = m.group(1) + "."
    elif nested and re.match(r"\s+\)\),\s*$", line):
      nested = ""
    elif m := re.match(r"\s*c\.(\w+) = (.+?)\s+# (.*)", line):
      out.append((m.group(1), m.group(2), m.group(3)))
    elif m := re.match(r"\s+(\w+)=(.+?),\s+# (.*)", line):
      default = "None" if m.group(2) == "_option()" else m.group(2)  # a float placeholder, unset
      out.append((section + nested + m.group(1), default, m.group(3)))
    elif (m := re.match(r"\s+#\s+(.*)", line)) and out:  # a comment continued on the next line
      out[-1] = (out[-1][0], out[-1][1], out[-1][2] + " " + m.group(1))
  return out


GROUPS = {"": "Run, batch and logging", "data": "Data", "model": "Model", "hf": "Hugging Face checkpoints",
          "lora": "LoRA", "mesh": "Mesh", "sharding": "Sharding", "loss": "Loss", "ref_update": "Reference updates",
          "optim": "Optimizer", "sft": "SFT stage", "eval": "Evaluation", "perf": "Performance accounting and the compile cache",
          "dry_run": "Dry run", "frontier": "Frontier experiment", "rl": "RL baselines of the frontier",
          "online": "Online and iterative DPO (stage online_dpo)", "reward_model": "Reward model stage"}


def _cell(text: str) -> str:
  """Text for a Markdown table cell: a pipe would end the cell, and `<workdir>` would read as an HTML tag."""
  return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def table(source: str = SOURCE.read_text()) -> str:
  """One Markdown table per config block (`data.*`, `model.*`, ...; top-level fields first), each under its own
  heading."""
  groups: dict[str, list[str]] = {}
  for name, default, meaning in rows(source):
    block = name.split(".", 1)[0] if "." in name else ""
    groups.setdefault(block, []).append(f"| `{name}` | `{_cell(default)}` | {_cell(meaning)} |")
  unknown = sorted(set(groups) - set(GROUPS))
  if unknown:
    raise ValueError(f"scripts/config_table.py: config blocks {unknown} have no title in GROUPS; add one.")
  out = []
  for block in sorted(groups, key=lambda b: b != ""):  # top-level fields first, then the blocks in source order
    out += [f"### {GROUPS[block]}" + (f" (`{block}.*`)" if block else ""), "",
            "| field | default | meaning |", "|---|---|---|"] + groups[block] + [""]
  return "\n".join(out)


if __name__ == "__main__":
  print(table() + "\n" + table(FRONTIER_SOURCE.read_text()))
