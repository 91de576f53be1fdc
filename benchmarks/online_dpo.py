"""Offline DPO against online and iterative DPO at the same number of DPO steps, through the trainer.

    python benchmarks/online_dpo.py --workdir runs/online_bench [--steps 400] [--judge synthetic] [--smoke]

One SFT stage (configs/default.py: the embedded task, the default model) gives pi_ref; each method then starts from
a copy of it in its own workdir and takes `--steps` DPO optimizer steps of config.batch_size (32) pairs, with
configs/default.py's loss (beta 0.1) and optimizer (lr 1e-3, cosine):

  offline    `--config.stage=dpo`: the data's fixed pairs (sampled by another policy, labelled by r*'s Bradley-Terry
             draws).
  online     `--config.stage=online_dpo`, n = 2 samples per prompt, one step per round of 32 prompts (TRL's
             OnlineDPOTrainer's shape): `--steps` rounds.
  iterative  `--config.stage=online_dpo`, n = 8, best against worst, 4 rounds of 256 prompts, pairs kept, `--steps` / 4
             steps per round (Dong et al. 2024's recipe).

The online methods' judge is `--judge` (default r* of the embedded task: what the pairs' labels are drawn from; the
reward model path of the frontier is in docs/frontier.md). Every run is measured by the trainer's own evaluation:
held-out preference accuracy on the test pairs' labels, and mean r* and KL(pi || pi_ref) on fresh temperature-1
samples, 2 for each held-out prompt (config.eval: 200 prompts at most; the task has 48). Wall time is the stage's,
from the command to its summary (compiles included); sample / judge seconds are the online stage's own split.
`--smoke`: the tiny config, a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("offline", "online", "iterative")


def method_args(method: str, steps: int, judge: str, smoke: bool) -> list[str]:
  """The trainer flags of one method (after the shared config and workdir)."""
  if method == "offline":
    return ["--config.stage=dpo", f"--config.optim.total_steps={steps}"]
  rounds, per_round, n, prompts = ((steps, 1, 2, 8 if smoke else 32) if method == "online" else
                                   (2 if smoke else 4, steps // (2 if smoke else 4), 4 if smoke else 8,
                                    16 if smoke else 256))
  return ["--config.stage=online_dpo", f"--config.online.rounds={rounds}",
          f"--config.online.steps_per_round={per_round}",
          f"--config.online.samples_per_prompt={n}", f"--config.online.prompts_per_round={prompts}",
          f"--config.online.keep_pairs={method == 'iterative'}", f"--config.online.judge={judge}",
          "--config.log_every_steps=50"]


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def _train(args: list[str], log: str) -> float:
  start = time.perf_counter()
  with open(log, "w") as f:
    out = subprocess.run([sys.executable, "-m", "dpo_jax.train", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
  if out.returncode:
    raise SystemExit(f"online_dpo benchmark: `python -m dpo_jax.train {' '.join(args)}` failed; see {log}")
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/online_bench")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--judge", default="synthetic")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--smoke", action="store_true")
  a = parser.parse_args()
  steps = 4 if a.smoke else a.steps
  base = ["--config", "configs/default.py" + (":tiny" if a.smoke else ""), "--config.progress_bar=False",
          "--config.eval.every_steps=0"]
  workdir = os.path.abspath(a.workdir)
  os.makedirs(workdir, exist_ok=True)
  sft_dir = os.path.join(workdir, "sft")
  if not os.path.isdir(os.path.join(sft_dir, "sft", "checkpoints")):
    seconds = _train(base + ["--config.stage=sft", "--workdir", sft_dir], sft_dir + ".log")
    print(f"SFT (pi_ref) in {sft_dir}: {seconds:.0f} s", flush=True)
  rows = []
  for method in a.methods.split(","):
    run_dir = os.path.join(workdir, method)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(os.path.join(sft_dir, "sft"), os.path.join(run_dir, "sft"))  # the same pi_ref for every method
    seconds = _train(base + method_args(method, steps, a.judge, a.smoke) + ["--workdir", run_dir], run_dir + ".log")
    with open(os.path.join(run_dir, "summary.json")) as f:
      s = json.load(f)
    o = s.get("online", {})
    rows.append({"method": method, "steps": steps, "samples": o.get("samples", 0), "pairs": o.get("pairs", 4000),
                 "accuracy": s["pi_theta"]["accuracy"], "reward": s["pi_theta"].get("reward", float("nan")),
                 "kl": s["pi_theta"].get("kl", float("nan")), "seconds": seconds,
                 "sample_s": o.get("sample_seconds", 0.0), "judge_s": o.get("judge_seconds", 0.0),
                 "ref_reward": s["pi_ref"].get("reward", float("nan"))})
    print(json.dumps(rows[-1]), flush=True)
  print(f"\n{cpu_model()}, {os.cpu_count()} cores; pi_ref r* = {rows[0]['ref_reward']:.3f}\n")
  print("| method | DPO steps | samples generated | pairs | held-out acc | r* | KL (nats) | wall s | sampling s | "
        "judging s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['steps']} | {r['samples']:,} | {r['pairs']:,} | {r['accuracy']:.3f} | "
          f"{r['reward']:.2f} | {r['kl']:.2f} | {r['seconds']:.0f} | {r['sample_s']:.0f} | {r['judge_s']:.1f} |")
  with open(os.path.join(workdir, "online_dpo_benchmark.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
