"""Sequence packing: several preference pairs per batch row, so short pairs stop paying for padding.

A packed DPO batch has R rows of L tokens; each row holds up to P pairs as segments:

  input_ids       [R, L]    pair j of a row = segment 2j + 1 (prompt + chosen + EOS) then segment 2j + 2
                            (prompt + rejected + EOS), pairs back to back, the row right-padded with the pad id
  attention_mask  [R, L]    segment id: 1 .. 2P on real tokens, 0 on padding. The model attends causally
                            within a segment only (dpo_jax/model.py), so no pair sees another
  positions       [R, L]    0 .. len - 1 within each segment (restart at every segment), 0 on padding
  loss_mask       [R, L]    1 on response tokens (EOS included) of every segment, 0 elsewhere
  pack_slots      [R, P]    1 where slot j of row r holds a pair, 0 for an empty slot. Its presence marks a
                            packed batch and its static shape gives P to the jitted step
  pair_mask       [R * P]   pack_slots flattened: pair slot r * P + j
  row_ids         [R * P]   the pair's source row (-1 for an empty slot)
  ref_chosen_logps, ref_rejected_logps  [R * P]  when the data carries precomputed reference log-probs
  desirable       [R * P]   unpaired data (TokenizedPairs.labels): 1 for a desirable unit, 0 otherwise and on empty
                            slots; its units pack as pairs do (completion as "chosen", KL completion as "rejected")

`logprobs.sequence_logps` reduces a packed batch per segment to `[R * 2P]` in exactly the unpacked order
(chosen of slot k at 2k, rejected at 2k + 1), so losses, metrics and reference log-probs downstream do not
know whether the batch was packed. A pair's two segments share its row: rows are sharded on the batch axis
and split into micro-batches whole, so a pair never straddles two devices.

Which pairs go into a step. Rows per global step R = config.batch_size / P, so a step holds AT MOST
config.batch_size pairs (every pair slot of the global batch may be filled) in R * L tokens. An epoch's pairs
are taken in the same seeded order as unpacked training (`preference.epoch_order`) and placed first-fit, in
that order, into the R rows of the current step (a row takes a pair if it has a free slot and room for the
pair's tokens); the first pair that fits in no row closes the step and opens the next one. So the pairs per
step vary (fewer when long pairs fill the rows); the loss stays a mean over the step's pairs, as unpacked.
Leftover: the epoch's last step is dropped unless it is full (closed by slots or by a pair that did not fit),
as unpacked training drops the remainder of an epoch; those pairs come back in another epoch's order.

Data position = global step still holds: an epoch's packing is a pure function of (seed, epoch, lengths), so
`iterate_packed_batches(start_step=k)` replays exactly what an uninterrupted run yields from step k (it
re-packs the epochs before k to count their steps; that is a pass over the pair lengths per epoch).
Each host materialises its contiguous R / process_count rows of every global step.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from dpo_jax.data import preference

from dpo_jax.data import rows as rows_lib


def row_length(pack_length: int, max_length: int) -> int:
  """Tokens per packed row L: config.data.pack_length, or 2 * max_length (room for any pair) when it is 0."""
  return int(pack_length) or 2 * int(max_length)


def pair_lengths(tokenized: preference.TokenizedPairs) -> np.ndarray:
  """Tokens a pair takes in a packed row `[num_pairs]` int64: its prompt twice plus both responses."""
  return np.asarray([2 * len(p) + len(c) + len(r) for p, c, r in
                     zip(tokenized.prompt_ids, tokenized.chosen_ids, tokenized.rejected_ids)], np.int64)


def check_packing(*, batch_size: int, pairs_per_row: int, row_length: int, process_count: int = 1) -> int:
  """Rows per global step R = batch_size / pairs_per_row; ValueError naming the config field otherwise."""
  if not isinstance(pairs_per_row, (int, np.integer)) or pairs_per_row < 1:
    raise ValueError(f"config.data.pairs_per_row={pairs_per_row!r} must be an int >= 1 (pairs packed in one row).")
  if batch_size % pairs_per_row:
    raise ValueError(f"config.batch_size={batch_size} must be a multiple of config.data.pairs_per_row="
                     f"{pairs_per_row}: a packed step has batch_size / pairs_per_row rows. Change either.")
  rows = batch_size // pairs_per_row
  if rows % process_count:
    raise ValueError(f"config.batch_size / config.data.pairs_per_row = {rows} packed rows must divide over "
                     f"{process_count} hosts; change config.batch_size or config.data.pairs_per_row.")
  if row_length < 4:
    raise ValueError(f"config.data.pack_length={row_length} tokens is too short for a pair; use 0 (2 * max_length).")
  return rows


def check_lengths_fit(lengths_N: np.ndarray, row_length: int) -> None:
  """ValueError naming the longest pair unless every pair fits in one packed row."""
  if len(lengths_N) and lengths_N.max() > row_length:
    k = int(np.argmax(lengths_N))
    raise ValueError(f"pair {k} takes {int(lengths_N[k])} tokens (prompt twice + chosen + rejected) > "
                     f"config.data.pack_length={row_length}. Raise config.data.pack_length (0 = 2 * max_length "
                     f"fits every pair).")


def pack_epoch(lengths_N: np.ndarray, order: np.ndarray, *, rows: int, pairs_per_row: int,
               row_length: int) -> list[np.ndarray]:
  """The steps of one epoch: a list of `[rows, pairs_per_row]` int64 pair indices (-1 = empty slot).

  Pairs in `order`, first-fit into the current step's rows (see the module docstring). A step that ends
  because the epoch ran out is dropped unless every slot is filled.
  """
  steps = []
  slots = np.full((rows, pairs_per_row), -1, np.int64)
  used = np.zeros(rows, np.int64)  # tokens taken per row
  count = np.zeros(rows, np.int64)  # pairs per row
  for k in order:
    n = lengths_N[k]
    fits = np.flatnonzero((count < pairs_per_row) & (used + n <= row_length))
    if len(fits) == 0:  # the step is full for this pair: close it, start the next with this pair
      steps.append(slots)
      slots = np.full((rows, pairs_per_row), -1, np.int64)
      used[:] = 0
      count[:] = 0
      fits = [0]
    r = fits[0]
    slots[r, count[r]] = k
    used[r] += n
    count[r] += 1
  if count.sum() == rows * pairs_per_row:
    steps.append(slots)
  return steps


def make_packed_batch(tokenized: preference.TokenizedPairs, slots_RxP: np.ndarray, *,
                      row_length: int) -> dict[str, np.ndarray]:
  """The packed batch (module docstring) of the pairs `slots_RxP` (indices into `tokenized`, -1 = empty)."""
  _check_pairs(tokenized)
  rows, p = slots_RxP.shape
  input_ids = np.full((rows, row_length), tokenized.pad_id, np.int32)
  segments = np.zeros((rows, row_length), np.int32)
  positions = np.zeros((rows, row_length), np.int32)
  loss_mask = np.zeros((rows, row_length), np.int32)
  for r in range(rows):
    start = 0
    for j in range(p):
      k = slots_RxP[r, j]
      if k < 0:
        continue
      prompt = tokenized.prompt_ids[k]
      for side, response in enumerate((tokenized.chosen_ids[k], tokenized.rejected_ids[k])):
        n = len(prompt) + len(response)
        if start + n > row_length:
          raise ValueError(f"row {r} of a packed batch needs more than config.data.pack_length={row_length} tokens; "
                           "raise config.data.pack_length.")
        input_ids[r, start:start + len(prompt)] = prompt
        input_ids[r, start + len(prompt):start + n] = response
        segments[r, start:start + n] = 2 * j + 1 + side
        positions[r, start:start + n] = np.arange(n)
        loss_mask[r, start + len(prompt):start + n] = 1
        start += n
  flat = slots_RxP.reshape(-1)
  real = flat >= 0
  src = np.where(real, flat, 0)
  batch = dict(input_ids=input_ids, attention_mask=segments, positions=positions, loss_mask=loss_mask,
               pack_slots=(slots_RxP >= 0).astype(np.int32), pair_mask=real.astype(np.int32),
               row_ids=np.where(real, tokenized.row_ids[src], -1).astype(np.int32))
  if tokenized.reference_logps is not None:
    for j, field in enumerate(rows_lib.REFERENCE_FIELDS):  # `[R * P]` fp32; empty slots 0 (no weight)
      batch[field] = np.where(real, tokenized.reference_logps[src, j], 0.0).astype(np.float32)
  if tokenized.labels is not None:  # unpaired data: `[R * P]` int32, as preference.make_batch's `desirable`
    batch["desirable"] = np.where(real, tokenized.labels[src], False).astype(np.int32)
  return batch


def _check_pairs(tokenized) -> None:
  if not isinstance(tokenized, preference.TokenizedPairs):
    raise ValueError("config.data.packing=True packs (prompt, chosen, rejected) pairs; ranked data (K responses "
                     "per prompt) is not packed. Set --config.data.packing=False.")


def iterate_packed_batches(tokenized: preference.TokenizedPairs, *, global_batch: int, pairs_per_row: int,
                           row_length: int, seed: int, start_step: int = 0, process_index: int = 0,
                           process_count: int = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Packed training batches forever: yields (global_step, this host's packed batch) from `start_step` on.

  `global_batch` pairs at most per step in `global_batch / pairs_per_row` rows of `row_length` tokens. Epoch
  e packs `preference.epoch_order(num_pairs, seed, e)`; arguments are checked here, not at the first next().
  """
  rows = check_packing(batch_size=global_batch, pairs_per_row=pairs_per_row, row_length=row_length,
                       process_count=process_count)
  _check_pairs(tokenized)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  lengths = pair_lengths(tokenized)
  check_lengths_fit(lengths, row_length)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0 (the global step a checkpoint stored).")
  per_host = rows // process_count
  host_rows = slice(process_index * per_host, (process_index + 1) * per_host)

  def epoch_steps(epoch):
    order = preference.epoch_order(tokenized.num_pairs, seed, epoch)
    steps = pack_epoch(lengths, order, rows=rows, pairs_per_row=pairs_per_row, row_length=row_length)
    if not steps:
      raise ValueError(f"{tokenized.num_pairs} pairs cannot fill one packed step of {rows} rows x {pairs_per_row} "
                       f"pairs; lower config.batch_size or add data.")
    return steps

  first_steps = epoch_steps(0)  # checked now, so a dataset too small fails before any compile

  def batches():
    epoch, first, steps = 0, 0, first_steps  # global step of the epoch's first step
    while first + len(steps) <= start_step:
      first += len(steps)
      epoch += 1
      steps = epoch_steps(epoch)
    step = start_step
    while True:
      yield step, make_packed_batch(tokenized, steps[step - first][host_rows], row_length=row_length)
      step += 1
      if step - first == len(steps):
        first += len(steps)
        epoch += 1
        steps = epoch_steps(epoch)

  return batches()
