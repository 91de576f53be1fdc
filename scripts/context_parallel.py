"""Context parallelism at a fixed total length: step time, per-device memory and communicated bytes per degree.

    python scripts/context_parallel.py                      # 8 emulated CPU devices, 4096 tokens per sequence
    python scripts/context_parallel.py --length 1024 --smoke

For each sequence degree n (mesh data=1, sequence=n on the first n devices) and each `model.context_parallel`
('ring', 'all_gather'; n = 1 is the plain model), one pair (2 rows of `--length` tokens) runs the DPO loss's
value-and-grad of the policy (`step.dpo_loss`, fixed reference log-probs) and the table prints:

  step ms       median wall time of the jitted step (emulated devices share this machine's cores: see below)
  temp MiB      per-device temporaries of the compiled SPMD program (`memory_analysis().temp_size_in_bytes`)
  sent MiB      bytes one device sends per step, read from the optimized HLO (`dpo_jax.hlo.collectives`): every
                collective-permute (its result), all-gather ((n - 1) / n of the result), reduce-scatter (n - 1
                results) and all-reduce (2 (n - 1) / n of the result, a ring all-reduce), times the trip count of
                each `while` loop around it; split into attention (permutes, all-gathers, reduce-scatters) and the rest
                (all-reduces: the weight gradients, summed over the sequence shards like data parallelism)
  analytic MiB  the attention traffic counted by hand (`analytic_attention_bytes`)

What emulated devices can and cannot show: they are threads of one CPU process, so the collectives are memcpys
and n devices share the same cores; step times therefore do not fall with n and do not say how a pod scales. The
compiled per-device memory and the collective bytes are properties of the SPMD program, the same program a pod
would run (up to the backend's fusion and layouts), so those columns do carry over.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import context_parallel as cp, hlo, model as model_lib, sharding, step  # noqa: E402

MiB = 1024 ** 2


def collective_bytes(text: str, n: int) -> dict[str, float]:
  """Bytes one device sends per execution of the optimized HLO `text`, per collective kind (`dpo_jax.hlo`: each
  collective by its group size, every `while` body counted its trip count times); `n`: the group size of a
  collective that names none."""
  return {kind: c.sent for kind, c in hlo.collectives(text, default_group=n).items()}


def analytic_attention_bytes(mode: str, n: int, rows: int, length: int, cfg: model_lib.ModelConfig) -> float:
  """Attention bytes one device sends per value-and-grad step, by hand: per layer, a K/V block is
  2 rows x (T / n) x kv_heads x head_dim values (+ its int32 index, int32 segments and bool visibility);
  the ring sends n - 1 blocks forward, n - 1 blocks and n fp32 dK/dV blocks backward; all_gather sends its
  block (less the index, a compile-time constant there) to the n - 1 others forward and reduce-scatters dK/dV
  (n - 1 blocks' worth, in the compute dtype) backward."""
  if n == 1:
    return 0.0
  tl = length // n
  values = 2 * rows * tl * cfg.num_kv_heads * cfg.resolved_head_dim
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  block = values * itemsize + tl * 4 + rows * tl * (4 + 1)
  if mode == "ring":
    per_layer = (n - 1) * block + (n - 1) * block + n * values * 4
  else:  # the token index is a constant here, whose gather XLA folds away
    per_layer = (n - 1) * (block - tl * 4) + (n - 1) * values * itemsize
  return per_layer * cfg.num_layers


def one_pair(length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A pair of 2 rows of `length` tokens: a shared prompt of length / 4, responses to the end."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab, (2, length)).astype(np.int32)
  ids[1, :length // 4] = ids[0, :length // 4]
  loss = np.zeros((2, length), np.int32)
  loss[:, length // 4:] = 1
  return dict(input_ids=ids, attention_mask=np.ones((2, length), np.int32),
              positions=np.tile(np.arange(length, dtype=np.int32), (2, 1)), loss_mask=loss,
              pair_mask=np.ones((1,), np.int32))


def measure(cfg: model_lib.ModelConfig, n: int, batch: dict, repeats: int) -> dict:
  mesh = sharding.make_mesh({"data": 1, "sequence": n}, jax.devices()[:n])
  shard = sharding.ShardingContext(mesh, sharding.DEFAULT_RULES)
  model = model_lib.make_model(cfg, shard)
  params = model_lib.init_params(cfg, jax.random.key(0), step.param_shardings(cfg, mesh, sharding.DEFAULT_RULES))
  loss_cfg = {"type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0}
  ref = jnp.full((1, 2), -float(batch["input_ids"].shape[1]))

  def loss(p, b):
    return step.dpo_loss(p, ref, b, model=model, loss_cfg=loss_cfg, total_weight=jnp.float32(1.0))[0]

  batch = jax.device_put(batch, sharding.batch_shardings(mesh, sharding.DEFAULT_RULES, batch))
  fn = jax.jit(jax.value_and_grad(loss))
  compiled = fn.lower(params, batch).compile()
  jax.block_until_ready(compiled(params, batch))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, batch))
    times.append(time.perf_counter() - t)
  sent = collective_bytes(compiled.as_text(), n)
  return {"ms": 1e3 * statistics.median(times), "temp": compiled.memory_analysis().temp_size_in_bytes,
          "attention": sent["collective-permute"] + sent["all-gather"] + sent["reduce-scatter"],
          "other": sent["all-reduce"] + sent["all-to-all"], "value": float(compiled(params, batch)[0])}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=4096, help="tokens per sequence (fixed over the degrees)")
  parser.add_argument("--degrees", default="1,2,4,8")
  parser.add_argument("--modes", default="ring,all_gather")
  parser.add_argument("--balance", default="zigzag", choices=cp.LOAD_BALANCE)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="a quick run: 512 tokens, degrees 1 and 4, 2 repeats")
  args = parser.parse_args(argv)
  if args.smoke:
    args.length, args.degrees, args.repeats = 512, "1,4", 2
  cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                              num_kv_heads=2, attention_impl="xla", context_load_balance=args.balance)
  batch = one_pair(args.length, cfg.vocab_size)
  print(f"context parallelism on {jax.device_count()} {jax.devices()[0].platform} devices: one pair of 2 x "
        f"{args.length} tokens, model hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads / "
        f"{cfg.num_kv_heads} kv heads, fp32, load balance {args.balance!r}; DPO loss value-and-grad per step")
  header = ("mode", "sequence", "step ms", "temp MiB", "attention sent MiB", "analytic MiB", "other sent MiB", "loss")
  rows = []
  for n in (int(d) for d in args.degrees.split(",")):
    for mode in (["-"] if n == 1 else args.modes.split(",")):
      c = dataclasses.replace(cfg, context_parallel="ring" if mode == "-" else mode)
      r = measure(c, n, batch, args.repeats)
      rows.append((mode, n, f"{r['ms']:.1f}", f"{r['temp'] / MiB:.2f}", f"{r['attention'] / MiB:.3f}",
                   f"{analytic_attention_bytes(mode, n, 2, args.length, c) / MiB:.3f}", f"{r['other'] / MiB:.3f}",
                   f"{r['value']:.6f}"))
      print("  ".join(str(x) for x in rows[-1]), flush=True)
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  print()
  for r in [header, ["-" * w for w in widths]] + rows:
    print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
  main()
