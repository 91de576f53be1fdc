"""Time an S-way beta sweep in one compiled program (dpo_jax/experiments/sweep.py) against S runs of the plain jitted step.

    PYTHONPATH=. python scripts/sweep_speed.py                      # default model, S = 4, 10 timed steps
    PYTHONPATH=. python scripts/sweep_speed.py --variant tiny --sweep 8 --steps 20

Both sides train the same S betas on the same fixed batches from the same initial params. Each timed step is
dispatched and waited for (block_until_ready), after `--warmup` untimed steps (compile included there, and
reported apart). The sweep step and the S plain steps of each batch are timed back to back, so a change in the
machine's load hits both sides alike. Prints a markdown table; the speedup is (S plain steps) / (1 sweep step).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from configs.default import get_config
from dpo_jax import model as model_lib, optim, sharding, step
from dpo_jax.experiments import sweep


def random_batch(rng: np.random.Generator, num_pairs: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
  """`num_pairs` pairs as interleaved `[2B, T]` rows: a shared prompt of T/4 tokens, then a response to a random end."""
  rows = 2 * num_pairs
  ids = rng.integers(2, vocab, size=(rows, seq_len)).astype(np.int32)
  prompt = seq_len // 4
  ids[1::2, :prompt] = ids[0::2, :prompt]
  ends = rng.integers(prompt + 2, seq_len + 1, size=rows)
  attention = (np.arange(seq_len)[None, :] < ends[:, None]).astype(np.int32)
  loss_mask = attention * (np.arange(seq_len)[None, :] >= prompt)
  positions = np.where(attention > 0, np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
  return dict(input_ids=ids, attention_mask=attention, positions=positions, loss_mask=loss_mask.astype(np.int32),
              pair_mask=np.ones((num_pairs,), np.int32))


def timed(fn, *args):
  """(result, seconds) of one call, waiting for every output array."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="", help="configs/default.py variant: '' (default model) or 'tiny'")
  parser.add_argument("--sweep", type=int, default=4, help="S, the number of betas")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
  args = parser.parse_args()

  config = get_config(args.variant)
  config.optim.warmup_steps = 0
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  betas = tuple(float(b) for b in np.geomspace(0.02, 0.5, args.sweep))
  mesh = sharding.make_mesh({"data": len(jax.devices())}, jax.devices())
  rules = config.sharding.rules
  shard = sharding.ShardingContext(mesh, rules)
  optimizer, schedule = optim.make_optimizer(config.optim)
  shardings = step.state_shardings(model_cfg, optimizer, mesh, rules)
  reference = model_lib.init_params(model_cfg, jax.random.key(0), shardings.params)
  rng = np.random.default_rng(0)
  local = [random_batch(rng, config.batch_size, config.max_length, model_cfg.vocab_size)
           for _ in range(args.warmup + args.steps)]
  batches = [sharding.global_batch(mesh, rules, b) for b in local]
  model = model_lib.make_model(model_cfg, shard)
  common = dict(state_shardings=shardings, reference_shardings=shardings.params,
                batch_shardings=sharding.batch_shardings(mesh, rules, local[0]), mesh=mesh)

  plain = [step.jit_train_step(functools.partial(step.train_step, model=model, optimizer=optimizer, schedule=schedule,
                                                 loss_cfg=dict(config.loss, beta=beta), shard=shard), **common)
           for beta in betas]
  states = [step.create_train_state(reference, optimizer, shardings) for _ in betas]
  swept = sweep.jit_sweep_step(sweep.make_sweep_step(model, optimizer, schedule, config.loss, betas, shard=shard),
                               **common)
  stacked = sweep.stack_states(step.create_train_state(reference, optimizer, shardings), len(betas),
                               sweep.stacked_shardings(shardings, mesh))

  warm_plain, warm_sweep, times_plain, times_sweep = 0.0, 0.0, [], []
  for t, batch in enumerate(batches):
    (stacked, _), dt_sweep = timed(swept, stacked, reference, batch)
    dts = []
    for i, fn in enumerate(plain):
      (states[i], _), dt = timed(fn, states[i], reference, batch)
      dts.append(dt)
    if t < args.warmup:
      warm_sweep += dt_sweep
      warm_plain += sum(dts)
    else:
      times_sweep.append(dt_sweep)
      times_plain.append(dts)

  s, n = len(betas), args.steps
  per_step_plain = statistics.median(x for row in times_plain for x in row)
  round_plain = statistics.median(sum(row) for row in times_plain)
  total_plain, total_sweep = sum(sum(row) for row in times_plain), sum(times_sweep)
  print(f"\nmodel {args.variant or 'default'} ({model_lib.count_params(model_lib.abstract_params(model_cfg)):,} params), "
        f"batch {config.batch_size} pairs x {config.max_length} tokens, S = {s} betas {tuple(round(b, 3) for b in betas)}, "
        f"{n} timed steps after {args.warmup} warm-up, {len(jax.devices())} {jax.devices()[0].platform} device(s)\n")
  print("| | median step (s) | S configs, one batch (s) | S configs, N steps (s) | warm-up incl. compile (s) |")
  print("|---|---|---|---|---|")
  print(f"| {s} sequential runs, plain step | {per_step_plain:.4f} (one config) | {round_plain:.4f} | {total_plain:.3f} "
        f"| {warm_plain:.1f} |")
  print(f"| {s}-way sweep, one program | {statistics.median(times_sweep):.4f} (all {s}) | "
        f"{statistics.median(times_sweep):.4f} | {total_sweep:.3f} | {warm_sweep:.1f} |")
  print(f"\nspeedup (N-step totals): {total_plain / total_sweep:.2f}x; per batch (medians): "
        f"{round_plain / statistics.median(times_sweep):.2f}x")


if __name__ == "__main__":
  main()
