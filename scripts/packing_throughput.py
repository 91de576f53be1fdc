"""Throughput of the jitted DPO train step, unpacked vs packed, on a length-skewed preference dataset.

    PYTHONPATH=. python scripts/packing_throughput.py                       # CPU-sized defaults
    PYTHONPATH=. python scripts/packing_throughput.py --max_length 1024 --hidden 512 --layers 8 --batch 64

Most pairs are short, a few (--long_fraction) fill max_length. Both layouts train on the same pairs, in the
same epoch order (`preference.epoch_order`): unpacked as `[2B, T]` rows, packed as `[B / P, L]` rows of up to
P pairs (dpo_jax/data/packing.py, L = 2T). Each timed pass runs every step of the epoch once (warm-up pass
first, compile excluded) and blocks at the end; the layouts' passes alternate. The table reports the median
over --repeats passes of real (non-padding) tokens per second and pairs per second, and packed / unpacked
measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from configs.default import get_config
from dpo_jax import model as model_lib, optim, sharding, step
from dpo_jax.data import packing, preference


def skewed_pairs(num_pairs: int, max_length: int, long_fraction: float, vocab: int,
                 seed: int = 0) -> preference.TokenizedPairs:
  """Pairs with an 8..24-token prompt and 4..32-token responses; `long_fraction` of them have responses that
  fill the row (prompt + response = max_length - 0..7)."""
  rng = np.random.default_rng(seed)
  prompts, chosen, rejected = [], [], []
  for _ in range(num_pairs):
    p = int(rng.integers(8, 25))
    long = rng.random() < long_fraction
    prompts.append(rng.integers(2, vocab, p).astype(np.int32))
    for out in (chosen, rejected):
      r = max_length - p - int(rng.integers(0, 8)) if long else int(rng.integers(4, 33))
      out.append(np.append(rng.integers(2, vocab, r - 1), 1).astype(np.int32))  # ... + EOS
  return preference.TokenizedPairs(tuple(prompts), tuple(chosen), tuple(rejected),
                                   np.arange(num_pairs, dtype=np.int32), max_length=max_length, pad_id=0, eos_id=1)


def epoch_batches(tokenized, order, *, batch: int, pairs_per_row: int, row_length: int, packed: bool) -> list[dict]:
  if packed:
    steps = packing.pack_epoch(packing.pair_lengths(tokenized), order, rows=batch // pairs_per_row,
                               pairs_per_row=pairs_per_row, row_length=row_length)
    out = [packing.make_packed_batch(tokenized, s, row_length=row_length) for s in steps]
  else:
    out = [preference.make_batch(tokenized, order[i:i + batch]) for i in range(0, len(order) - batch + 1, batch)]
  for b in out:
    b.pop("row_ids")
  return out


def build_step(batches: list[dict], *, model_cfg, config, mesh, rules) -> dict:
  """A jitted train step for `batches`' shapes, its fresh state and reference, and the batches on device."""
  shard = sharding.ShardingContext(mesh, rules)
  optimizer, schedule = optim.make_optimizer(config.optim)
  shardings = step.state_shardings(model_cfg, optimizer, mesh, rules)
  reference = model_lib.init_params(model_cfg, jax.random.key(0), shardings.params)
  train = step.jit_train_step(
      functools.partial(step.train_step, model=model_lib.make_model(model_cfg, shard), optimizer=optimizer,
                        schedule=schedule, loss_cfg=config.loss, shard=shard),
      state_shardings=shardings, reference_shardings=shardings.params,
      batch_shardings=sharding.batch_shardings(mesh, rules, batches[0]), mesh=mesh)
  return dict(train=train, reference=reference, state=step.create_train_state(reference, optimizer, shardings),
              device_batches=[sharding.global_batch(mesh, rules, b) for b in batches], seconds=[],
              steps=len(batches), real_tokens=int(sum((b["attention_mask"] > 0).sum() for b in batches)),
              slot_tokens=int(sum(b["input_ids"].size for b in batches)),
              pairs=int(sum(b["pair_mask"].sum() for b in batches)), shape=batches[0]["input_ids"].shape)


def one_pass(r: dict) -> float:
  """Seconds for one train step per batch of the epoch, blocking once at the end."""
  start = time.perf_counter()
  state = r["state"]
  for b in r["device_batches"]:
    state, metrics = r["train"](state, r["reference"], b)
  jax.block_until_ready((state, metrics))
  r["state"] = state
  return time.perf_counter() - start


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--num_pairs", type=int, default=512)
  ap.add_argument("--max_length", type=int, default=256, help="T: tokens per unpacked row")
  ap.add_argument("--long_fraction", type=float, default=0.05, help="share of pairs that fill max_length")
  ap.add_argument("--batch", type=int, default=32, help="B: pairs per step (at most, packed)")
  ap.add_argument("--pairs_per_row", type=int, default=8, help="P: pairs per packed row")
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  config = get_config()
  config.model.update(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_layers=args.layers,
                      num_heads=max(args.hidden // 32, 1), num_kv_heads=max(args.hidden // 64, 1))
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = config.sharding.rules
  tokenized = skewed_pairs(args.num_pairs, args.max_length, args.long_fraction, model_cfg.vocab_size)
  order = preference.epoch_order(tokenized.num_pairs, 0, 0)
  row_length = packing.row_length(0, args.max_length)
  results = {}
  for name, packed in (("unpacked", False), ("packed", True)):
    batches = epoch_batches(tokenized, order, batch=args.batch, pairs_per_row=args.pairs_per_row,
                            row_length=row_length, packed=packed)
    results[name] = build_step(batches, model_cfg=model_cfg, config=config, mesh=mesh, rules=rules)
    one_pass(results[name])  # compile and warm up
  for _ in range(args.repeats):  # alternate the layouts, so a busy machine slows both alike
    for r in results.values():
      r["seconds"].append(one_pass(r))
  for r in results.values():
    r["seconds"] = float(np.median(r["seconds"]))

  lengths = packing.pair_lengths(tokenized)
  print(f"device: {jax.devices()[0].device_kind} | model: {args.layers} layers, hidden {args.hidden}, vocab "
        f"{model_cfg.vocab_size} | {args.num_pairs} pairs, T={args.max_length}, pair tokens mean "
        f"{lengths.mean():.0f} / median {np.median(lengths):.0f} / max {lengths.max()} (long fraction "
        f"{args.long_fraction}) | B={args.batch}, P={args.pairs_per_row}, L={row_length} | median of "
        f"{args.repeats} passes\n")
  print("| layout | rows x length | steps | pairs/step | real tokens / slots | real tokens/s | pairs/s | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  base = results["unpacked"]["real_tokens"] / results["unpacked"]["seconds"]
  for name, r in results.items():
    tps = r["real_tokens"] / r["seconds"]
    print(f"| {name} | {r['shape'][0]} x {r['shape'][1]} | {r['steps']} | {r['pairs'] / r['steps']:.1f} | "
          f"{r['real_tokens'] / r['slot_tokens']:.0%} | {tps:,.0f} | {r['pairs'] / r['seconds']:,.1f} | "
          f"{tps / base:.2f}x |")


if __name__ == "__main__":
  main()
