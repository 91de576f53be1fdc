"""The planning table: Llama-3 1B and 8B DPO steps compiled by libtpu for v5p-64 and v6e-256, per device.

    python scripts/tpu_plan.py                       # the README's table (24 compiles, ~20 min on 2 cores)
    python scripts/tpu_plan.py --models 70B --tokens 2048,8192 --remat full   # the 70B rows
    python scripts/tpu_plan.py --smoke               # one small plan, a quick check of the script
    python scripts/tpu_plan.py --cpu                 # also the CPU-mesh dry run of the v5p-64 plans (32 emulated CPUs)

Each plan is the trainer's DPO step (`tpu_dry_run.compile_steps`, the same code as `--dry_run
--config.dry_run.topology=...`): fp32 params and AdamW moments, a frozen fp32 pi_ref, bf16 compute, scanned layers,
log-probs in 1024-token chunks, splash attention, FSDP over the whole slice (mesh data=1, fsdp=-1), one pair per
chip (2k / 8k tokens per sequence, prompts half of it). At 32k tokens each sequence is split over a sequence axis of
8 (fsdp = chips / 8, one pair per fsdp group). Remat off ('none') and on ('full').

Columns: fits (the compiled total against the chip's HBM; 'NO (compiler)' where libtpu refused the program for
memory), total / arguments / temporaries GiB per device, the roofline's three lower bounds on the step time (compiler
FLOPs / bf16 peak, bytes accessed / HBM bandwidth, bytes sent / ICI bandwidth: `StepReport.roofline`), their max
as the estimated step time, the MFU at that time, and the compile time. `--cpu` adds, for the v5p-64 plans, the per-device
memory the CPU-mesh dry run (`dry_run.report` on 32 emulated CPU devices, platform 'cpu') gives for the same plan.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GiB = 1024 ** 3
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Llama 3.2 1B and Llama 3.1 8B (their HF config.json shapes; RoPE scaling does not change the compiled cost).
MODELS = {
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, head_dim=64, tie_embeddings=True, rope_theta=500000.0),
    "8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, tie_embeddings=False, rope_theta=500000.0),
    # Llama 3.1 70B: not in the default --models (python scripts/tpu_plan.py --models 70B --tokens 2048,8192).
    "70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                num_kv_heads=8, head_dim=128, tie_embeddings=False, rope_theta=500000.0),
}
SLICES = ("v5p-64", "v6e-256")
TOKENS = (2048, 8192, 32768)
REMAT = ("none", "full")


def plan_config(model: str, tokens: int, remat: str, chips: int) -> object:
  """The trainer config of one plan (module docstring)."""
  from configs.default import get_config
  c = get_config()
  c.model.update(MODELS[model], compute_dtype="bfloat16", param_dtype="float32", scan_layers=True, remat=remat,
                 logits_chunk_size="1024", attention_impl="auto")
  sequence = 8 if tokens >= 32768 else 1
  c.mesh.update(data=1, fsdp=chips // sequence, sequence=sequence, tensor=1)
  c.batch_size = chips // sequence
  c.max_length, c.max_prompt_length = tokens, tokens // 2
  c.dry_run.steps = ("dpo",)
  c.stage = "dpo"
  return c


def tpu_row(model: str, slice_name: str, tokens: int, remat: str) -> dict:
  from dpo_jax import sharding
  from dpo_jax.train import runtime, topology, tpu_dry_run
  topo = topology.parse(slice_name)
  c = plan_config(model, tokens, remat, topo.chips)
  mesh = sharding.make_mesh(c.mesh, topology.devices(topo))
  (r,) = tpu_dry_run.compile_steps(c, mesh, runtime.model_config(c, platform="tpu"), ("dpo",))
  roof = r.roofline(topo.chip) if not r.refused else None
  capacity = topo.chip.hbm_gib * GiB
  return {"model": model, "slice": slice_name, "mesh": f"fsdp={c.mesh.fsdp}" + (
      f" x seq={c.mesh.sequence}" if c.mesh.sequence > 1 else ""), "tokens": tokens, "pairs": c.batch_size,
          "remat": remat, "fits": "NO (compiler)" if r.refused else ("yes" if r.total <= capacity else "NO"),
          "total": r.total / GiB, "arguments": r.arguments / GiB, "temporaries": r.temporaries / GiB,
          "step_s": roof["step"] if roof else None, "mfu": roof["mfu"] if roof else None,
          "compute_s": roof["compute"] if roof else None, "hbm_s": roof["memory"] if roof else None,
          "ici_s": roof["ici"] if roof else None,
          "compile_s": r.compile_s, "refused": r.refused}


def cpu_row(model: str, tokens: int, remat: str, chips: int) -> dict:
  """The CPU-mesh dry run of the plan on `chips` emulated CPU devices (run in a process whose XLA_FLAGS set them)."""
  import jax
  from dpo_jax.train import dry_run
  assert jax.device_count() == chips, jax.device_count()
  c = plan_config(model, tokens, remat, chips)
  t0 = time.perf_counter()
  out = dry_run.report(c)
  static = out["params"] + out["optimizer"] + out["reference"]
  return {"static": static / GiB, "temporaries": out["activations"] / GiB, "total": out["total"] / GiB,
          "compile_s": time.perf_counter() - t0}


def _cpu_subprocess(model: str, tokens: int, remat: str, chips: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={chips}", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, __file__, "--cpu_row", f"{model},{tokens},{remat},{chips}"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
  if out.returncode:
    return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="1B,8B")
  parser.add_argument("--slices", default=",".join(SLICES))
  parser.add_argument("--tokens", default=",".join(str(t) for t in TOKENS))
  parser.add_argument("--remat", default=",".join(REMAT))
  parser.add_argument("--cpu", action="store_true", help="also the CPU-mesh dry run of the v5p-64 plans")
  parser.add_argument("--cpu_remat", default="full", help="remat settings of the plans the CPU dry run repeats")
  parser.add_argument("--smoke", action="store_true", help="one small plan: 1B, v5p-64, 2k tokens, remat full")
  parser.add_argument("--cpu_row", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.cpu_row:
    model, tokens, remat, chips = args.cpu_row.split(",")
    print(json.dumps(cpu_row(model, int(tokens), remat, int(chips))))
    return
  from dpo_jax.train import topology
  topology.configure_environment()
  if args.smoke:
    args.models, args.slices, args.tokens, args.remat = "1B", "v5p-64", "2048", "full"
  rows = []
  header = ("model", "slice", "mesh", "tokens", "pairs/step", "remat", "fits", "GiB/device", "arguments",
            "temporaries", "compute s", "HBM s", "ICI s", "est. step s", "MFU", "compile s")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
  for model in args.models.split(","):
    for slice_name in args.slices.split(","):
      for tokens in (int(t) for t in args.tokens.split(",")):
        for remat in args.remat.split(","):
          r = tpu_row(model, slice_name, tokens, remat)
          rows.append(r)
          total = (">= " if r["refused"] else "") + f"{r['total']:.1f}"
          print(f"| {model} | {slice_name} | {r['mesh']} | {tokens} | {r['pairs']} | {remat} | {r['fits']} | {total} "
                f"| {r['arguments']:.1f} | {r['temporaries']:.1f} | {_fmt(r['compute_s'], '.3f')} | "
                f"{_fmt(r['hbm_s'], '.3f')} | {_fmt(r['ici_s'], '.3f')} | {_fmt(r['step_s'], '.3f')} | "
                f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {r['compile_s']:.0f} |",
                flush=True)
          gc.collect()
  if not args.cpu:
    return
  print("\n| model | tokens | remat | CPU static GiB | CPU temporaries | CPU total | TPU arguments | TPU temporaries "
        "| TPU total | TPU / CPU |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
  for r in rows:
    if r["slice"] != "v5p-64" or r["tokens"] > 8192 or r["remat"] not in args.cpu_remat.split(","):
      continue
    cpu = _cpu_subprocess(r["model"], r["tokens"], r["remat"], 32)
    if "error" in cpu:
      print(f"| {r['model']} | {r['tokens']} | {r['remat']} | CPU dry run failed: {cpu['error']} |", flush=True)
      continue
    print(f"| {r['model']} | {r['tokens']} | {r['remat']} | {cpu['static']:.1f} | {cpu['temporaries']:.1f} | "
          f"{cpu['total']:.1f} | {r['arguments']:.1f} | {r['temporaries']:.1f} | {r['total']:.1f} | "
          f"{r['total'] / cpu['total']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
