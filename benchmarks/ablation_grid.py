"""A loss-ablation grid with and without the reference cache, back to back: wall time and pi_ref forwards.

    python benchmarks/ablation_grid.py --model tiny            # the embedded task, configs/default.py's 'tiny'
    python benchmarks/ablation_grid.py --model smollm2-135m    # SmolLM2-135M's shape, random weights, 8 steps
    python benchmarks/ablation_grid.py --smoke                 # a few steps, to check the script

Both arms run `dpo_jax.experiments.ablation.run_ablation` over the same `VARIANTS` (8 of issue 33's ablations: DPO,
IPO, two f-divergences, LD-DPO, WPO, KTO, BCO) from the same pi_ref, each in a fresh process with no persistent
compile cache (each compiles everything it runs) and its own empty reference-cache folder:

  cache     `reference_cache='on'`: pi_ref's log-probs of every train and test unit are computed once per data
            layout (the pairs; KTO and BCO's unpaired rows) and read by every variant: steps and held-out
            evaluations run no reference forward.
  nocache   `reference_cache='off'`: every DPO step and every held-out evaluation runs pi_ref's forward.

The data is the first `--train_pairs` / `--test_pairs` pairs of the embedded task (the cache pays one forward over
the whole split, so its saving grows with variants x steps x batch against the split's size; the table prints
both). Sampled r* / KL are measured for `tiny` only (`--num_prompts`); SmolLM2's random weights would sample noise.
The table gives each arm's wall time (the whole grid: SFT, data, compiles, training, evaluations), the pi_ref
passes over the data the cache made, the units pi_ref scored, and the ratio, with the CPU beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = [
    {"name": "dpo", "type": "sigmoid", "beta": 0.1},
    {"name": "ipo", "type": "ipo", "beta": 0.5},
    {"name": "f-dpo-js", "type": "sigmoid", "beta": 0.1, "f_divergence_type": "js_divergence"},
    {"name": "f-dpo-alpha", "type": "sigmoid", "beta": 0.1, "f_divergence_type": "alpha_divergence"},
    {"name": "ld-dpo", "type": "sigmoid", "beta": 0.1, "ld_alpha": 0.5},
    {"name": "wpo", "type": "sigmoid", "beta": 0.1, "use_weighting": True},
    {"name": "kto", "type": "kto", "beta": 0.1},
    {"name": "bco", "type": "bco", "beta": 0.1},
]

# SmolLM2-135M's config.json (as benchmarks/dpo_step.py's CONFIGS), random weights.
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
               scan_layers=True)  # one layer compiled, not 30: the grid compiles each variant's step

# --model -> (config.model overrides, DPO steps per variant, SFT steps, train pairs, test pairs, batch size)
MODELS = {
    "tiny": ({}, 60, 100, 1024, 128, 16),
    "smollm2-135m": (SMOLLM2, 8, 0, 128, 32, 8),
}


def subset(n_train: int, n_test: int, out_dir: str) -> tuple[str, str]:
  """The first n pairs of the embedded task's train / test files, as JSONL in `out_dir`."""
  from dpo_jax.data import synthetic
  paths = []
  for src, n, name in ((synthetic.train_path(), n_train, "train"), (synthetic.test_path(), n_test, "test")):
    with open(src) as f:
      rows = [line for _, line in zip(range(n), f)]
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w") as f:
      f.writelines(rows)
    paths.append(path)
  return paths[0], paths[1]


def grid_config(args: argparse.Namespace, arm: str, work: str):
  """The config one arm runs (`run_ablation` copies it per variant)."""
  from configs.default import get_config
  overrides, steps, sft_steps, n_train, n_test, batch = MODELS[args.model]
  if args.smoke:
    steps, sft_steps, n_train, n_test, batch = 2, 2, 32, 16, 4
  config = get_config("tiny")
  config.model.update(overrides)
  config.data.train, config.data.test = subset(n_train, n_test, work)
  config.data.reward = "synthetic" if args.model == "tiny" else "none"
  config.batch_size = config.eval.batch_size = batch
  config.sft.steps = sft_steps
  config.optim.total_steps = args.steps or steps
  config.eval.num_prompts = args.num_prompts if args.model == "tiny" else 0
  config.log_every_steps = 10 ** 9
  config.perf.compile_cache = ""  # each arm compiles everything it runs: neither reads the other's programs
  config.reference_cache = "on" if arm == "cache" else "off"
  config.reference_cache_dir = os.path.join(work, "reference_cache")
  return config


def worker(args: argparse.Namespace) -> None:
  """One arm in this process: time the grid, count the reference passes, print one JSON line."""
  import contextlib
  import io

  from dpo_jax.experiments import ablation
  with tempfile.TemporaryDirectory() as work:
    config = grid_config(args, args.worker, work)
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
      records = ablation.run_ablation(config, os.path.join(work, "runs"), VARIANTS, eval_every=config.optim.total_steps)
    wall = time.perf_counter() - start
  lines = out.getvalue().splitlines()
  misses = sum("reference cache miss" in line for line in lines)
  final = {r["variant"]: r for r in records}
  print(json.dumps({"arm": args.worker, "wall_s": wall, "passes": misses, "final": final,
                    "steps": config.optim.total_steps, "batch": config.batch_size}))


def run_arm(args: argparse.Namespace, arm: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, "--model", args.model,
         "--num_prompts", str(args.num_prompts)] + (["--smoke"] if args.smoke else []) + (
             ["--steps", str(args.steps)] if args.steps else [])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode:
    sys.exit(f"{arm} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_units(result: dict, variants: int, n_train: int, n_test: int) -> str:
  """pi_ref's scored units: the cache arm's passes over the data; the other arm's per-step and per-eval units."""
  if result["arm"] == "cache":
    return f"{result['passes']} passes over {n_train}+{n_test} (and {2 * n_train}+{n_test} unpaired)"
  per_variant = result["steps"] * result["batch"] + 2 * n_test  # steps, and the held-out evaluations at 0 and end
  return f"{variants * per_variant} units in steps + evals"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
  parser.add_argument("--steps", type=int, default=0, help="DPO steps per variant; 0 = the model's default")
  parser.add_argument("--num_prompts", type=int, default=16, help="held-out prompts sampled for r* / KL (tiny)")
  parser.add_argument("--smoke", action="store_true", help="a few steps on a few pairs, to check the script")
  parser.add_argument("--worker", choices=("cache", "nocache"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  overrides, steps, sft_steps, n_train, n_test, batch = MODELS[args.model]
  if args.smoke:
    n_train, n_test = 32, 16
  print(f"# ablation grid, {len(VARIANTS)} variants, model {args.model}: {time.strftime('%Y-%m-%d')}")
  from dpo_jax import platforms
  print(f"# CPU: {platforms.cpu_description()}, {os.cpu_count()} cores")
  results = [run_arm(args, arm) for arm in ("nocache", "cache")]  # back to back, in this order
  base = results[0]["wall_s"]
  print("| arm | wall (s) | vs nocache | pi_ref work |")
  print("|---|---|---|---|")
  for r in results:
    print(f"| {r['arm']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | "
          f"{reference_units(r, len(VARIANTS), n_train, n_test)} |")
  print()
  print("| variant | " + " | ".join(f"{r['arm']} acc / r* / KL" for r in results) + " |")
  print("|---|" + "---|" * len(results))
  for v in VARIANTS:
    cells = []
    for r in results:
      f = r["final"][v["name"]]
      cells.append(f"{f['accuracy']:.3f} / {f['reward']:.3f} / {f['kl']:.2f}")
    print(f"| {v['name']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
