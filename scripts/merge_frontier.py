"""Add one frontier run's methods to another's, after checking the two runs agree on every method they share.

    python scripts/merge_frontier.py --base docs/frontier --add runs/frontier_online --out docs/frontier

A frontier run recomputes every method. This merges the rows of a second run (e.g. one with some methods switched
off, `--config.rl.methods='()'`, and new ones on) into a first, so only the new methods have to be trained
again. It is safe only when both runs had the same pi_ref and the same measurement, so the script refuses unless
every (method, setting, step) row present in both runs has identical values. The output takes the rows of `--add`
and, for each method present only in `--base`, the rows of `--base` (in the order of METHODS). It also takes the
base's `rl` runs and seconds, then redraws the plot from the merged CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from dpo_jax.experiments import frontier  # noqa: E402


def merge(base: list[dict], add: list[dict]) -> list[dict]:
  """`add`'s rows plus the rows of methods only `base` has, ordered by frontier.METHODS; raises if a shared row
  differs (the runs did not start from the same pi_ref, or measured differently)."""
  key = lambda r: (r["method"], r["setting"], r["step"])
  added = {key(r): r for r in add}
  shared = [r for r in base if key(r) in added]
  differ = [(key(r), r, added[key(r)]) for r in shared if r != added[key(r)]]
  if differ or not shared:
    raise SystemExit(f"merge_frontier: the runs disagree on {len(differ)} of {len(shared)} shared rows (first: "
                     f"{differ[:1]}); they did not start from the same pi_ref. Rerun the whole frontier instead.")
  only_base = {r["method"] for r in base} - {r["method"] for r in add}
  rows = add + [r for r in base if r["method"] in only_base]
  order = {m: i for i, m in enumerate(frontier.METHODS)}
  return sorted(rows, key=lambda r: order.get(r["method"], len(order)))  # stable: each method's own order kept


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", required=True, help="folder with frontier.csv / frontier.json of the first run")
  parser.add_argument("--add", required=True, help="folder with frontier.csv / frontier.json of the second run")
  parser.add_argument("--out", required=True)
  a = parser.parse_args()
  base, add = (frontier.read_csv(os.path.join(d, "frontier.csv")) for d in (a.base, a.add))
  rows = merge(base, add)
  with open(os.path.join(a.base, "frontier.json")) as f:
    base_json = json.load(f)
  with open(os.path.join(a.add, "frontier.json")) as f:
    summary = json.load(f)
  kept = sorted({r["method"] for r in rows} - {r["method"] for r in add})
  summary["points"] = rows
  summary["rl"] = {**base_json.get("rl", {}), **summary.get("rl", {})}
  summary["seconds"] = {**{k: v for k, v in base_json["seconds"].items() if k not in summary["seconds"]},
                        **summary["seconds"]}
  summary["merged_from"] = {"base": base_json.get("merged_from", "base run"), "methods_from_base": kept}
  os.makedirs(a.out, exist_ok=True)
  frontier.write_csv(os.path.join(a.out, "frontier.csv"), rows)
  with open(os.path.join(a.out, "frontier.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  frontier.plot(rows, os.path.join(a.out, "frontier.png"))
  n_shared = len({(r["method"], r["setting"], r["step"]) for r in base} & {(r["method"], r["setting"], r["step"])
                                                                              for r in add})
  print(f"merged: {len(rows)} rows; {n_shared} rows shared and identical; from the base run: {kept}")
  print(frontier.format_table(rows))


if __name__ == "__main__":
  main()
