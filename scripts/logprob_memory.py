"""Compiled memory of one DPO forward + backward with and without chunked log-probs (prints a table).

    python scripts/logprob_memory.py                       # V = 128k, T = 2048, B = 8 pairs, a small model
    python scripts/logprob_memory.py --chunks 0 128 512 --vocab 32000

Nothing runs: each variant is lowered and compiled for the default backend, and XLA's
`compiled.memory_analysis()` reports the bytes it plans (arguments, outputs, temporaries). The model is small
on purpose (the LM head dominates); only `model.logits_chunk_size` changes between rows.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from dpo_jax import logprobs, model as model_lib


def measure(cfg: model_lib.ModelConfig, pairs: int, length: int, chunk: int) -> dict:
  cfg = dataclasses.replace(cfg, logits_chunk_size=chunk)
  model = model_lib.make_model(cfg)
  rows = 2 * pairs
  batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
           for k in ("input_ids", "attention_mask", "positions", "loss_mask")}

  def loss(params, batch):
    out = logprobs.sequence_logps(model, params, batch)
    chosen, rejected = logprobs.split_pairs(out.logps)
    return -jax.nn.log_sigmoid(0.1 * (chosen - rejected)).mean()

  compiled = jax.jit(jax.value_and_grad(loss)).lower(model_lib.abstract_params(cfg), batch).compile()
  mem = compiled.memory_analysis()
  return {"chunk": chunk, "temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes,
          "out": mem.output_size_in_bytes}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--vocab", type=int, default=128 * 1024)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256, 128])
  args = parser.parse_args(argv)
  cfg = model_lib.ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                              num_layers=args.layers, num_heads=4, num_kv_heads=2, tie_embeddings=False)
  logits_gib = 2 * args.pairs * args.length * args.vocab * 4 / 2**30
  print(f"{jax.devices()[0].platform}: V={args.vocab}, T={args.length}, B={args.pairs} pairs "
        f"({2 * args.pairs} rows), hidden={args.hidden}, {args.layers} layers; one fp32 [2B, T, V] logits array "
        f"is {logits_gib:.2f} GiB")
  print("| logits_chunk_size | temporaries (GiB) | params + batch (GiB) | vs all at once |")
  print("|---|---|---|---|")
  base = None
  for chunk in args.chunks:
    m = measure(cfg, args.pairs, args.length, chunk)
    base = base or m["temp"]
    name = "0 (all at once)" if chunk == 0 else str(chunk)
    print(f"| {name} | {m['temp'] / 2**30:.3f} | {m['args'] / 2**30:.3f} | {m['temp'] / base:.3f}x |")


if __name__ == "__main__":
  main()
