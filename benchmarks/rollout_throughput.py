"""Rollout throughput: `dpo_jax.sample.generate` against HF transformers' `model.generate`, same weights and prompts.

    python benchmarks/rollout_throughput.py [--sizes default,medium] [--batch_sizes 64,256] [--new_tokens 24]
        [--prompt_len 12] [--repeats 3] [--out DIR] [--smoke]

For each model size the params come from `model.init_params(cfg, key(0))`, are written as an HF checkpoint
(`interop.hf.save_hf_checkpoint`, a temp folder) and loaded by `AutoModelForCausalLM.from_pretrained` in fp32: both
sides hold the same weights. For each batch size B the same random prompts (token ids >= 3, the embedded tokenizer's
pad 0 / eos 1 / unk 2 never appear; lengths prompt_len / 2 .. prompt_len, LEFT-padded by `evaluate.left_pad_prompts`)
go to
  ours     `sample.generate` (one jitted prefill + `lax.scan` over N decode steps, KV cache), temperature 1, with an
           EOS id no token has (-1): every row samples all N tokens, as the scan runs N steps whatever it samples.
  rollout  `dpo_jax.rollout.rollout(cfg, params, params, ...)` when that module exists: sampling plus the policy's
           and the reference's teacher-forced log-probs (the same params as both). Left out, with the reason
           printed, when it is missing or fails.
  HF       `model.generate(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, min_new_tokens=N,
           max_new_tokens=N, pad_token_id=0, eos_token_id=1)` with the attention mask, under
           `torch.inference_mode()`: pure temperature-1 sampling, every row exactly N new tokens (min_new_tokens
           masks EOS until then), HF's default dynamic KV cache.
tokens/s = B * N / median wall time of --repeats calls after one warm-up call (prompt tokens are not counted; the
prefill is inside the timed call on both sides). `compile s` = our first call's time minus the median call: the
jit's trace and XLA compile (a persistent compilation cache, if $JAX_COMPILATION_CACHE_DIR is set, shrinks it).
ratio = ours / HF (> 1: ours is faster).

Correctness: for the first rows of each batch, the log-probs our sampler reports for its own tokens (`return_logps`,
the KV-cache decode path) against torch's teacher-forced `log_softmax` over prompt + those tokens (one full forward,
positions counted over real tokens as ours does): max |difference| in nats per token. fp32 on both sides, so it is
rounding only (~1e-6); far above that the two programs compute different models.

Device: ours runs on jax's default backend (a GPU when there is one); torch on cuda when available, else the CPU
with `torch.set_num_threads(os.cpu_count())`. On a GPU, XLA's default fp32 matmul precision may use TF32 while
torch's does not (`torch.backends.cuda.matmul.allow_tf32` is False by default): the log-prob difference then grows.
Both run in this one process; ours is timed before HF at each size, so torch's idle threads are not spinning beside
XLA's while ours is timed. `--smoke`: configs/default.py's `tiny` model, B = 8, N = 4, 1 repeat (for a test).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/rollout_throughput.py` from anywhere: configs/ is not a package
  sys.path.insert(0, ROOT)

# Before jax is imported: on a GPU jax would otherwise take 75% of its memory at start, leaving torch little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; an offline hub lookup hangs

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import evaluate, model as model_lib, sample  # noqa: E402

FIRST_TOKEN = 3  # ids 0..2 are the embedded tokenizer's pad, eos, unk
PAD_ID, EOS_ID = 0, 1
NEVER_EOS = -1  # an EOS id no sampled token equals: our sampler then keeps every row going for all N tokens
CHECK_ROWS = 8  # rows of each batch whose log-probs are compared with torch's
CONTENDED_CORES = 0.25  # other processes' average CPU use above which the report warns
CONTENDED = (" -- WARNING: the cores were shared, the timings are contended; torch's threads suffer far more than "
             "XLA's (HF ran up to 30x slower in such runs), so the ratio overstates ours. Rerun on a quiet machine.")

# Extra sizes beside configs/default.py's model ('default') and its 'tiny' variant: fields over the default's.
SIZES = {
    "medium": dict(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4),
}
COLUMNS = ["size", "params", "batch", "new tokens", "ours tokens/s", "ours rollout tokens/s", "HF generate tokens/s",
           "ratio (ours / HF)", "our compile s", "max abs logp diff (nats)"]


# configs/default.py's model fields that differ from ModelConfig's defaults, written out for machines without
# ml_collections (the GPU image has none); tests/benchmarks/test_rollout_throughput_script.py holds them equal.
DEFAULT_MODEL = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2,
                     tie_embeddings=True, remat="auto")
TINY_MODEL = dict(DEFAULT_MODEL, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def config_model_fields(size: str) -> dict:
  """configs/default.py's `config.model` (its 'tiny' variant for size 'tiny'); `DEFAULT_MODEL` / `TINY_MODEL`
  over ModelConfig's defaults where ml_collections is not installed."""
  try:
    from configs.default import get_config
  except ImportError:  # no ml_collections: the fields written out above
    return dict(TINY_MODEL if size == "tiny" else DEFAULT_MODEL)
  return dict(get_config("tiny" if size == "tiny" else None).model)


def model_config(size: str) -> model_lib.ModelConfig:
  """configs/default.py's model (`size` 'default', or its variant 'tiny'), or it updated with `SIZES[size]`, as
  `train.runtime.model_config` builds it for a run without `hf.model_path`."""
  fields = config_model_fields(size)
  if size not in ("default", "tiny"):
    if size not in SIZES:
      raise SystemExit(f"error: --sizes: unknown size {size!r}; choose from default, tiny, {', '.join(SIZES)}.")
    fields.update(SIZES[size])
  return model_lib.ModelConfig.from_dict(fields)


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`[B, prompt_len]` int32 ids and 0/1 mask, LEFT-padded; row lengths uniform in prompt_len / 2 .. prompt_len,
  row 0 full length (so the width is prompt_len whatever the draw)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=batch)
  lengths[0] = prompt_len
  prompts = [rng.integers(FIRST_TOKEN, vocab, size=n).astype(np.int32) for n in lengths]
  return evaluate.left_pad_prompts(prompts, PAD_ID)


def timed(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any]) -> tuple[float, list[float], Any]:
  """(first call s, the `repeats` timed calls' s, the first call's output); `sync` waits for a call's work."""
  t0 = time.perf_counter()
  out = sync(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return first, times, out


def torch_logps(hf_model, prompt_ids_BxP: np.ndarray, prompt_mask_BxP: np.ndarray, tokens_BxN: np.ndarray,
                device: str) -> np.ndarray:
  """`[B, N]` fp32 teacher-forced log pi(token_t | prompt, tokens_<t) from one torch forward over prompt + tokens."""
  import torch
  n = tokens_BxN.shape[1]
  ids = np.concatenate([prompt_ids_BxP, tokens_BxN], axis=1)
  mask = np.concatenate([prompt_mask_BxP, np.ones_like(tokens_BxN)], axis=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # over real tokens: the left padding does not count
  with torch.inference_mode():
    logits = hf_model(input_ids=torch.as_tensor(ids, dtype=torch.long, device=device),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long, device=device),
                      position_ids=torch.as_tensor(positions, dtype=torch.long, device=device)).logits.float()
    # The logits at position t predict token t + 1: the last prompt column predicts the first new token.
    logps = torch.log_softmax(logits[:, -n - 1:-1], dim=-1)
    picked = torch.gather(logps, -1, torch.as_tensor(tokens_BxN, dtype=torch.long, device=device)[..., None])[..., 0]
  return picked.cpu().numpy()


def find_rollout() -> tuple[Callable | None, str]:
  """(`dpo_jax.rollout.rollout`, '') when importable, else (None, why not)."""
  if importlib.util.find_spec("dpo_jax.rollout") is None:
    return None, "dpo_jax.rollout does not exist"
  try:
    module = importlib.import_module("dpo_jax.rollout")
  except Exception as e:  # a module mid-edit may not import: the other columns still mean something
    return None, f"importing dpo_jax.rollout failed: {type(e).__name__}: {e}"
  fn = getattr(module, "rollout", None)
  return (fn, "") if callable(fn) else (None, "dpo_jax.rollout has no function rollout")


def busy_cpu_s() -> float | None:
  """CPU seconds all processes have been busy since boot (/proc/stat), None where it cannot be read."""
  try:
    with open("/proc/stat") as f:
      jiffies = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
  return (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already inside user


def own_cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def header() -> dict:
  import torch
  import transformers
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  d = jax.devices()[0]
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), jax=jax.__version__,
              torch=torch.__version__, transformers=transformers.__version__, jax_backend=jax.default_backend(),
              jax_device=f"{d.device_kind} ({d.platform})", torch_device=torch_device,
              torch_device_name=torch.cuda.get_device_name(0) if torch_device == "cuda" else cpu,
              torch_threads=torch.get_num_threads(), cpu=cpu, cpu_count=os.cpu_count(), argv=sys.argv[1:])


def run_size(size: str, batch_sizes: list[int], args: argparse.Namespace, torch_device: str,
             rollout_fn: Callable | None, notes: list[str]) -> list[dict]:
  """Every batch size's row for one model size (ours, then rollout, then HF, each timed alone)."""
  import torch
  import transformers
  cfg = model_config(size)
  params = model_lib.init_params(cfg, jax.random.key(0))
  num_params = model_lib.count_params(params)
  with tempfile.TemporaryDirectory() as folder:
    from dpo_jax.interop import hf
    hf.save_hf_checkpoint(params, cfg, folder)
    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar would interleave with the table
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(torch_device).eval()
  rows = []
  for b in batch_sizes:
    n = args.new_tokens
    prompt_ids, prompt_mask = random_prompts(b, args.prompt_len, cfg.vocab_size, seed=b)
    row = dict(size=size, params=num_params, batch=b, new_tokens=n, prompt_len=prompt_ids.shape[1])
    print(f"{size} ({num_params:,} params), B={b}, N={n}: ours ...", flush=True)

    def ours():
      return sample.generate(cfg, params, prompt_ids, prompt_mask, rng=jax.random.key(1), max_new_tokens=n,
                             eos_id=NEVER_EOS, pad_id=PAD_ID, return_logps=True)

    first, times, (tokens, logps) = timed(ours, args.repeats, jax.block_until_ready)
    row.update(ours_s=statistics.median(times), ours_times=times)
    row.update(ours_tokens_per_s=b * n / row["ours_s"], compile_s=max(first - row["ours_s"], 0.0))

    if rollout_fn is not None:
      print(f"{size}, B={b}: rollout ...", flush=True)

      def roll():
        return rollout_fn(cfg, params, params, prompt_ids, prompt_mask, rng=jax.random.key(1), max_new_tokens=n,
                          eos_id=NEVER_EOS, pad_id=PAD_ID)

      try:
        _, times, _ = timed(roll, args.repeats, jax.block_until_ready)
        row.update(rollout_s=statistics.median(times), rollout_tokens_per_s=b * n / statistics.median(times))
      except Exception as e:  # the column is optional; say why it is empty and go on
        why = f"rollout ({size}, B={b}) failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(why, flush=True)
        notes.append(why)

    print(f"{size}, B={b}: HF generate ...", flush=True)
    ids_t = torch.as_tensor(prompt_ids, dtype=torch.long, device=torch_device)
    mask_t = torch.as_tensor(prompt_mask, dtype=torch.long, device=torch_device)

    def hf_generate():
      with torch.inference_mode():
        return hf_model.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, min_new_tokens=n, max_new_tokens=n, pad_token_id=PAD_ID,
                                 eos_token_id=EOS_ID)

    def hf_sync(out):
      if torch_device == "cuda":
        torch.cuda.synchronize()
      return out

    torch.manual_seed(0)
    _, times, out = timed(hf_generate, args.repeats, hf_sync)
    if out.shape != (b, prompt_ids.shape[1] + n):  # a short row would inflate HF's tokens/s
      raise RuntimeError(f"HF generate returned {tuple(out.shape)}, expected {(b, prompt_ids.shape[1] + n)}.")
    row.update(hf_s=statistics.median(times), hf_times=times, hf_tokens_per_s=b * n / statistics.median(times))
    row["ratio"] = row["ours_tokens_per_s"] / row["hf_tokens_per_s"]

    k = min(CHECK_ROWS, b)
    ours_logps = np.asarray(logps[:k])
    ref = torch_logps(hf_model, prompt_ids[:k], prompt_mask[:k], np.array(tokens[:k]), torch_device)
    row["max_abs_logp_diff"] = float(np.max(np.abs(ours_logps - ref)))
    row["check_rows"] = k
    rows.append(row)
    print(" | ".join(cells(row)), flush=True)
  return rows


def fmt(x: Any, spec: str) -> str:
  return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def cells(r: dict) -> list[str]:
  return [r["size"], f"{r['params']:,}", str(r["batch"]), str(r["new_tokens"]), fmt(r["ours_tokens_per_s"], ",.0f"),
          fmt(r.get("rollout_tokens_per_s"), ",.0f"), fmt(r["hf_tokens_per_s"], ",.0f"), fmt(r["ratio"], ".2f"),
          fmt(r["compile_s"], ".2f"), fmt(r["max_abs_logp_diff"], ".2e")]


def render(h: dict, rows: list[dict], notes: list[str], with_rollout: bool, elapsed_s: float) -> str:
  """The markdown report: header lines, the table (without the rollout column when nothing filled it), notes."""
  keep = [i for i, c in enumerate(COLUMNS) if with_rollout or c != "ours rollout tokens/s"]
  out = ["# Rollout throughput: dpo_jax.sample.generate vs HF model.generate", "",
         f"- date: {h['date']}",
         f"- ours: jax {h['jax']} on {h['jax_device']}; HF: torch {h['torch']}, transformers {h['transformers']} on "
         f"{h['torch_device']} ({h['torch_device_name']}), torch threads {h['torch_threads']}",
         f"- CPU: {h['cpu']} ({h['cpu_count']} cores visible); other processes used {fmt(h.get('other_cores'), '.2f')} "
         "cores on average during the run" + (CONTENDED if (h.get("other_cores") or 0.0) > CONTENDED_CORES else ""),
         f"- prompts: random ids >= {FIRST_TOKEN}, left-padded, width {rows[0]['prompt_len'] if rows else '?'}; "
         "temperature-1 sampling, every row exactly N new tokens; tokens/s = B * N / median call "
         f"(argv: {' '.join(h['argv']) or '(defaults)'})",
         f"- logp diff: ours (KV-cache decode) vs torch teacher-forced, first {CHECK_ROWS} rows of each batch", ""]
  out.append("| " + " | ".join(COLUMNS[i] for i in keep) + " |")
  out.append("|" + "|".join("---" for _ in keep) + "|")
  out += ["| " + " | ".join(cells(r)[i] for i in keep) + " |" for r in rows]
  out += [""] + [f"- note: {n}" for n in notes] + [f"elapsed {elapsed_s:.1f} s"]
  return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="default,medium",
                      help=f"comma-separated model sizes: default (configs/default.py), tiny, {', '.join(SIZES)}")
  parser.add_argument("--batch_sizes", default="64,256", help="comma-separated batch sizes B (rows per call)")
  parser.add_argument("--new_tokens", type=int, default=24, help="tokens N sampled per row")
  parser.add_argument("--prompt_len", type=int, default=12, help="prompt width P (rows are P / 2 .. P real tokens)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up; the median is reported")
  parser.add_argument("--out", default="", help="folder for rollout_throughput.md and rollout_throughput.json")
  parser.add_argument("--smoke", action="store_true", help="tiny model, B = 8, N = 4, 1 repeat (for a test)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.sizes, args.batch_sizes, args.new_tokens, args.repeats = "tiny", "8", 4, 1
  start = time.perf_counter()
  busy0, own0 = busy_cpu_s(), own_cpu_s()

  import torch
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)  # every core, as XLA:CPU's thread pool uses them
  h = header()
  notes = []
  rollout_fn, why = find_rollout()
  if rollout_fn is None:
    print(f"no 'ours rollout tokens/s' column: {why}", flush=True)
    notes.append(f"no rollout column: {why}")
  rows = []
  for size in args.sizes.split(","):
    rows += run_size(size.strip(), [int(b) for b in args.batch_sizes.split(",")], args, torch_device, rollout_fn,
                     notes)
  if busy0 is not None:
    # Busy CPU time not spent by this process, per second of the run: a shared machine shows up here.
    h["other_cores"] = max(busy_cpu_s() - busy0 - (own_cpu_s() - own0), 0.0) / (time.perf_counter() - start)
  with_rollout = any("rollout_tokens_per_s" in r for r in rows)
  text = render(h, rows, notes, with_rollout, time.perf_counter() - start)
  print("\n" + text, flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rollout_throughput.md"), "w") as f:
      f.write(text)
    with open(os.path.join(args.out, "rollout_throughput.json"), "w") as f:
      json.dump(dict(header=h, rows=rows, notes=notes, elapsed_s=time.perf_counter() - start), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
