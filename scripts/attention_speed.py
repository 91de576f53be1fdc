"""Causal attention forward and forward + backward: `attention.blocked_attention` per query block size, and torch SDPA.

    PYTHONPATH=. python scripts/attention_speed.py [--shapes tiny,small] [--blocks 32,64,128,0] [--repeats 15]

One attention of the benchmark configs' shapes (benchmarks/dpo_step.py): tiny = 16 rows x 256 tokens, 4 query
and 2 kv heads of 64; small = 8 rows x 512 tokens, 16 and 4 heads of 64. Block 0 is one block of all T queries
(the full square). The torch row is `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`, the kernel
HF's sdpa attention calls. Times are medians over --repeats after warm-up, the variants interleaved so a busy
machine slows all alike; fp32, random q, k, v and output cotangent.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from dpo_jax import attention, model as model_lib

SHAPES = {"tiny": (16, 256, 4, 2, 64), "small": (8, 512, 16, 4, 64)}  # rows, T, heads, kv heads, head_dim


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default="tiny,small")
  ap.add_argument("--blocks", default="32,64,128,0", help="query block sizes; 0 = one block of all T queries")
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args()
  import torch
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads")
  print(f"{'shape':<6} {'impl':<14} {'fwd ms':>8} {'fwd+bwd ms':>11}")
  for name in args.shapes.split(","):
    b, t, h, k, d = SHAPES[name]
    cfg = model_lib.ModelConfig(vocab_size=8, hidden_size=h * d, intermediate_size=8, num_layers=1, num_heads=h,
                                num_kv_heads=k)
    rng = np.random.default_rng(0)
    q, kk, v, g = (rng.standard_normal(s).astype(np.float32) for s in ((b, t, h, d), (b, t, k, d), (b, t, k, d),
                                                                      (b, t, h, d)))
    segments = np.ones((b, t), np.int32)
    fns = {}
    for block in (int(x) for x in args.blocks.split(",")):
      attn = lambda q, k, v, block=block: attention.blocked_attention(q, k, v, segments, cfg, block=block or t)
      fwd = jax.jit(attn)
      bwd = jax.jit(lambda q, k, v, attn=attn: jax.vjp(attn, q, k, v)[1](g))
      fns[f"block {block or t}"] = (lambda fwd=fwd: jax.block_until_ready(fwd(q, kk, v)),
                                    lambda bwd=bwd: jax.block_until_ready(bwd(q, kk, v)))
    tq, tk, tv, tg = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, kk, v, g))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fwd():
      with torch.no_grad():
        sdpa(tq, tk, tv, is_causal=True, enable_gqa=True)

    def torch_bwd():
      a, b_, c = (x.clone().requires_grad_() for x in (tq, tk, tv))
      sdpa(a, b_, c, is_causal=True, enable_gqa=True).backward(tg)

    fns["torch sdpa"] = (torch_fwd, torch_bwd)
    times = {key: ([], []) for key in fns}
    for pair in fns.values():
      pair[0](), pair[1]()  # compile and warm up
    for _ in range(args.repeats):
      for key, pair in fns.items():
        for i, fn in enumerate(pair):
          start = time.perf_counter()
          fn()
          times[key][i].append(time.perf_counter() - start)
    for key, (fwd_s, bwd_s) in times.items():
      print(f"{name:<6} {key:<14} {1e3 * statistics.median(fwd_s):>8.1f} {1e3 * statistics.median(bwd_s):>11.1f}")


if __name__ == "__main__":
  main()
