"""Replay a PyTorch / TRL DPO run's exact batches through dpo_jax, one step per saved batch, on one device.

    python examples/reproduce_torch_run.py --model HF_DIR --batches batches.npz [--layout chosen_then_rejected]
        [--beta 0.1] [--lr 1e-6] [--weight_decay 0.0] [--max_grad_norm 1.0] [--steps N]

`HF_DIR` is the starting checkpoint (a save_pretrained folder): the policy starts there and pi_ref stays there.
`batches.npz` holds `input_ids`, `attention_mask`, `completion_mask`, each `[S, N, T]`: the S collated batches the
torch run trained on, in order, each N = 2B rows of B pairs (TRL's concatenated forward puts the B chosen rows
first: `--layout chosen_then_rejected`; `interleaved` for rows 2i, 2i + 1). `completion_mask` is 1 on the tokens
whose log-probs are summed (response + EOS). Every batch goes through `preference.batch_from_tokens`, so a bad
row is an error naming the step, row and field.

Each step is `step.train_step` with the sigmoid DPO loss, a constant learning rate (AdamW, no warmup, global-norm
clipping; weight decay on matrices only, as the HF Trainer), and prints `step k loss <value>`, k = 1 .. S: the
loss of batch k under the params before update k, as a torch loop computes it just before its optimizer step.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from typing import Sequence

import jax
import numpy as np

from dpo_jax import model as model_lib, optim, step
from dpo_jax.train import errors
from dpo_jax.interop import hf
from dpo_jax.data import preference

FIELDS = ("input_ids", "attention_mask", "completion_mask")  # the arrays of batches.npz, each [S, N, T]


class ReplayError(ValueError):
  """A bad batches file, a bad row in it, or a non-finite loss: `main` prints it as one `error: ...` line."""


def load_batches(batches_npz: str, *, layout: str, vocab_size: int,
                 steps: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first `steps` (default: all S) batches of `batches_npz` as DPO batches (`batch_from_tokens`).

  ReplayError (a ValueError) naming the file and the field for a missing array or a bad shape, and the step, row
  and field for a bad row or a token id the model has no embedding for (>= `vocab_size`); steps count from 1.
  """
  if not os.path.isfile(batches_npz):
    raise ReplayError(f"{batches_npz}: no such file; pass the .npz written with np.savez (see the module docstring).")
  with np.load(batches_npz) as npz:
    missing = [f for f in FIELDS if f not in npz.files]
    if missing:
      raise ReplayError(f"{batches_npz}: no array(s) {missing} (it has {sorted(npz.files)}); save "
                       f"np.savez(path, input_ids=..., attention_mask=..., completion_mask=...), each [S, N, T].")
    arrays = {f: npz[f] for f in FIELDS}
  for field, x in arrays.items():
    if x.ndim != 3 or x.shape != arrays["input_ids"].shape:
      raise ReplayError(f"{batches_npz}: field '{field}' has shape {list(x.shape)}; the three arrays must share one "
                       f"shape [S, N, T] (steps, rows, tokens); input_ids has {list(arrays['input_ids'].shape)}.")
  total = arrays["input_ids"].shape[0]
  steps = total if steps is None else steps
  if not 1 <= steps <= total:
    raise ReplayError(f"steps={steps}: {batches_npz} holds {total} batches; pass 1 <= --steps <= {total}.")
  batches = []
  for s in range(steps):
    ids, attention, completion = (arrays[f][s] for f in FIELDS)
    try:
      batch = preference.batch_from_tokens(ids, attention, completion, layout=layout)
    except ValueError as e:
      raise ReplayError(f"{batches_npz}, step {s + 1}: {e}") from None
    too_big = (ids >= vocab_size) & (attention == 1)  # padding ids are never looked up for a real token
    if too_big.any():
      r, t = np.argwhere(too_big)[0]
      raise ReplayError(f"{batches_npz}, step {s + 1}: row {r}, field 'input_ids': column {t} holds {ids[r, t]} >= "
                        f"the model's vocab_size {vocab_size}; tokenize with the checkpoint's own tokenizer.")
    batches.append(batch)
  return batches


def run(model_dir: str, batches_npz: str, *, layout: str = "chosen_then_rejected", beta: float = 0.1,
        lr: float = 1e-6, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
        steps: int | None = None) -> list[float]:
  """Train from `model_dir` on the batches of `batches_npz`; the per-step losses (nats), also printed."""
  cfg, params = hf.load_hf_checkpoint(model_dir)
  batches = load_batches(batches_npz, layout=layout, vocab_size=cfg.vocab_size, steps=steps)
  optimizer, schedule = optim.make_optimizer(learning_rate=lr, schedule="constant", warmup_steps=0,
                                             total_steps=len(batches), weight_decay=weight_decay,
                                             max_grad_norm=max_grad_norm)
  reference = jax.device_put(params, jax.devices()[0])
  state = step.create_train_state(reference, optimizer)  # a copy: the donated state never frees pi_ref
  train = jax.jit(functools.partial(
      step.train_step, model=model_lib.make_model(cfg), optimizer=optimizer, schedule=schedule,
      loss_cfg={"type": "sigmoid", "beta": beta, "label_smoothing": 0.0}), donate_argnums=(0,))
  losses = []
  pending = None
  for k, batch in enumerate(batches, start=1):
    state, metrics = train(state, reference, batch)
    if pending is not None:  # read step k - 1 only once step k is queued, so the device never waits on us
      losses.append(_report(*pending))
    pending = (k, metrics["loss"])
  losses.append(_report(*pending))
  return losses


def _report(k: int, loss: jax.Array) -> float:
  value = float(loss)
  if not math.isfinite(value):
    raise ReplayError(f"step {k}: loss is {value}; check that batch's rows and the checkpoint's dtype (fp16 "
                      "weights can overflow: save them in float32 or bfloat16).")
  print(f"step {k} loss {value:.8g}", flush=True)
  return value


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="HF checkpoint folder the torch run started from")
  parser.add_argument("--batches", required=True, help=".npz of input_ids, attention_mask, completion_mask [S, N, T]")
  parser.add_argument("--layout", default="chosen_then_rejected", choices=preference.LAYOUTS)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lr", type=float, default=1e-6)
  parser.add_argument("--weight_decay", type=float, default=0.0)
  parser.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
  parser.add_argument("--steps", type=int, default=None, help="the first N batches only (default: all)")
  args = parser.parse_args(argv)
  try:  # dpo_jax's own errors (a bad checkpoint folder, ...) as one line too; anything else keeps its traceback
    errors.exit_on_purpose_errors(run, args.model, args.batches, layout=args.layout, beta=args.beta, lr=args.lr,
                                  weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, steps=args.steps)
  except ReplayError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_CODE)


if __name__ == "__main__":
  main()
