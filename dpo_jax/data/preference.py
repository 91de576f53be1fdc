"""Preference data: tokenize each prompt/chosen/rejected pair, cut deterministic host batches (rows.py reads them).

Pipeline:  rows.load_rows(source) -> tokenize_pairs(rows, tokenizer) -> iterate_batches / eval_batches -> dict

Batch contract (the model side, dpo_jax/logprobs.py, relies on it). A DPO batch of B pairs is a dict of
numpy int32 arrays whose rows INTERLEAVE pairs, so one forward pass serves chosen and rejected::

  input_ids       [2B, T]  row 2i = pair i's prompt + chosen + EOS, row 2i + 1 = prompt + rejected + EOS,
                           right-padded with the pad id to T = max_length
  attention_mask  [2B, T]  1 on real tokens (prompt, response, EOS), 0 on padding
  positions       [2B, T]  0 .. len - 1 over the real tokens, 0 on padding
  loss_mask       [2B, T]  1 on response tokens (EOS included), 0 on prompt and padding
  row_ids         [B]      the pair's row index in the source (-1 for a padding pair)
  pair_mask       [B]      1 for real pairs, 0 for padding pairs (only eval_batches pads)

A shared-prompt DPO batch (kind="dpo_shared") holds each pair's prompt once, so the model runs it once for
both responses (dpo_jax/logprobs.py); the same pairs, the same log-probs, fewer tokens::

  prompt_ids        [B, P]   pair i's prompt, LEFT-padded (its last token in column P - 1), P = the longest
                             prompt of the data (`TokenizedPairs.prompt_width`)
  prompt_mask       [B, P]   1 on real prompt tokens
  prompt_positions  [B, P]   0 .. len - 1 over the real prompt tokens, 0 on padding
  input_ids         [2B, R]  row 2i = pair i's chosen + EOS, 2i + 1 = rejected + EOS, right-padded to R = the
                             longest response (`TokenizedPairs.response_width`)
  attention_mask    [2B, R]  1 on real response tokens
  positions         [2B, R]  prompt_len + 0 .. prompt_len + len - 1 (where the token sits in prompt + response)
  loss_mask         [2B, R]  1 on real response tokens of real pairs (every response token is scored)
  row_ids, pair_mask [B]     as above

Unpaired data (TRL's KTO format, dpo_jax/data/unpaired.py; `TokenizedPairs.labels` set) uses the same layouts
with other contents: unit i's "chosen" row is row i's prompt + completion + EOS, its "rejected" row is the same
prompt + its KL completion (another row's completion, fixed per row at tokenize time), and one more field::

  desirable       [B]      int32, 1 when unit i's completion is desirable (label True), 0 when undesirable and
                           on padding pairs (pair_mask 0): the loss reads it with pair_mask, never alone

An SFT batch (fitting pi_ref on prompt + chosen) has the same keys as a DPO batch without interleaving:
`[B, T]` chosen rows, `row_ids` and `pair_mask` `[B]` (and `desirable` `[B]` for unpaired data, whose "chosen"
rows hold undesirable completions too: an SFT loss on them should weight by it).

Token t is scored by the logits at t - 1, so a prompt must be non-empty (the first response token needs a
context): an empty prompt is an error, never silently dropped, and loss_mask[:, 0] is always 0.

Data position = global step. Epoch e's order is a permutation seeded by (seed, e); global batch s of an
epoch is the contiguous block s of that order, and each host materialises only its contiguous slice of
it. So `iterate_batches(start_step=k)` replays exactly what an uninterrupted run yields from step k, and a
checkpoint only needs the step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dpo_jax.data import rows as rows_lib

KINDS = ("dpo", "dpo_shared", "sft")
SHARED = "dpo_shared"  # the kind of shared-prompt DPO batches


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedPairs:
  """Kept pairs in source order; token ids are ragged int32 arrays, one per pair.

  Fields::

    prompt_ids[k]    `[prompt_len]`, left-truncated to max_prompt_length (its end kept), never empty
    chosen_ids[k]    `[response_len]`, response + EOS truncated to max_length - prompt_len (EOS is cut
                     first, so it is present only when the whole response fits), never empty
    rejected_ids[k]  as chosen_ids
    row_ids          `[num_pairs]` int32, the source row index of each kept pair
    labels           `[num_pairs]` bool or None: unpaired data only (dpo_jax/data/unpaired.py), True where unit
                     k's completion (in chosen_ids[k]) is desirable; rejected_ids[k] is then its KL completion
  """
  prompt_ids: tuple[np.ndarray, ...]
  chosen_ids: tuple[np.ndarray, ...]
  rejected_ids: tuple[np.ndarray, ...]
  row_ids: np.ndarray
  max_length: int  # T, tokens per batch row
  pad_id: int
  eos_id: int
  reference_logps: np.ndarray | None = None  # [num_pairs, 2] precomputed log pi_ref (chosen, rejected), nats
  widths: tuple[int, int] | None = None  # (P, R) of shared-prompt batches, fixed (online DPO: every round's pairs
  #                                        one shape, one compile); None = the longest prompt and response here
  labels: np.ndarray | None = None  # [num_pairs] bool, unpaired data only: True = desirable (make_batch's `desirable`)

  @property
  def num_pairs(self) -> int:
    return int(self.row_ids.shape[0])

  @functools.cached_property
  def prompt_width(self) -> int:
    """P of shared-prompt batches: `widths[0]`, else the longest prompt, in tokens."""
    return self.widths[0] if self.widths else max(len(p) for p in self.prompt_ids)

  @functools.cached_property
  def response_width(self) -> int:
    """R of shared-prompt batches: `widths[1]`, else the longest response (EOS included), in tokens."""
    return self.widths[1] if self.widths else max(len(r) for r in self.chosen_ids + self.rejected_ids)


def special_ids(tokenizer: Any) -> tuple[int, int]:
  """(pad_id, eos_id): EOS is required (it ends every response); without a pad token the EOS id pads (padding
  positions are masked out, so any id works; train.load_tokenizer reports the fallback)."""
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; every response "
                     "ends with EOS. Set one, e.g. tokenizer.eos_token = '</s>' (a token in its vocabulary), and "
                     "save_pretrained the tokenizer folder.")
  return (eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id), eos_id


def tokenize_pairs(rows: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int,
                   source: str = "rows", reference_logps: bool = False, on_bad_row: str = "error",
                   texts_of: Callable[[Any, int, str], tuple[str, str, str]] = rows_lib.pair_texts
                   ) -> tuple[TokenizedPairs, dict]:
  """Tokenize prompt, chosen and rejected SEPARATELY and concatenate ids -> (TokenizedPairs, stats).

  Each text is tokenized with `add_special_tokens=False` and never re-tokenized joined, so the prompt's
  ids are identical in both rows of a pair. Texts are used as given: with a whitespace-sensitive (byte-level
  BPE / sentencepiece) tokenizer, put the separating space where your data wants it.
  EOS (tokenizer.eos_token_id, required) ends each response; padding uses tokenizer.pad_token_id, or the
  EOS id when the tokenizer has no pad token (padding positions are masked out either way).
  Truncation: the prompt keeps its last `max_prompt_length` tokens; each response + EOS then keeps its
  first `max_length - prompt_len` >= 1 tokens, so a non-empty response is never emptied by truncation.
  Pairs whose chosen or rejected response has no tokens are dropped (counted in stats). Bad rows (BadRow:
  a missing, null or non-string field, chosen == rejected, an empty prompt, bad reference log-probs) are a
  ValueError naming the row, or, with on_bad_row='skip', dropped and counted by reason in stats["skipped"].
  `source` names the data in error messages; `texts_of(row, i, source)` gives a row's (prompt, chosen,
  rejected) strings (pair_texts; schemas passes its HH transcript splitter).

  stats: num_rows, num_pairs (kept), num_dropped_empty_response, num_truncated (pairs with any truncation),
  num_prompt_truncated, num_response_truncated, skipped ({reason: rows}).
  With `reference_logps=True` the rows' `ref_chosen_logps` / `ref_rejected_logps` columns are kept for each
  pair (checked finite), and DPO batches carry them.
  """
  check_lengths(max_length, max_prompt_length)
  pad_id, eos_id = special_ids(tokenizer)
  bad = rows_lib.BadRows(on_bad_row, rows)
  recs = rows_lib.records(rows)
  if not recs:
    raise ValueError(f"{source}: no rows to tokenize.")
  good, texts, refs = [], [], []
  for i, row in enumerate(recs):
    try:
      text = texts_of(row, i, source)
      ref = rows_lib.reference_pair(row, i, source) if reference_logps else None
    except rows_lib.BadRow as e:
      bad.handle(e, i)
      continue
    good.append(i)
    texts.append(text)
    refs.append(ref)
  ids = [tokenizer([t[k] for t in texts], add_special_tokens=False)["input_ids"] if texts else [] for k in range(3)]

  prompts, chosens, rejecteds, row_ids, kept_refs = [], [], [], [], []
  dropped = prompt_cut = response_cut = any_cut = 0
  for k, i in enumerate(good):
    prompt, chosen, rejected = ids[0][k], ids[1][k], ids[2][k]
    if not prompt:
      bad.handle(rows_lib.BadRow(
          f"{source}: row {i}, field 'prompt' is empty (0 tokens); the first response token needs a context to be "
          "scored. Give the row a prompt (even a fixed one like 'Answer:') or drop it.", "empty_prompt"), i)
      continue
    if not chosen or not rejected:
      dropped += 1
      continue
    kept_prompt = prompt[-max_prompt_length:]
    budget = max_length - len(kept_prompt)
    p_cut = len(prompt) > len(kept_prompt)
    r_cut = len(chosen) + 1 > budget or len(rejected) + 1 > budget
    prompt_cut, response_cut, any_cut = prompt_cut + p_cut, response_cut + r_cut, any_cut + (p_cut or r_cut)
    prompts.append(np.asarray(kept_prompt, np.int32))
    chosens.append(np.asarray((chosen + [eos_id])[:budget], np.int32))
    rejecteds.append(np.asarray((rejected + [eos_id])[:budget], np.int32))
    row_ids.append(i)
    kept_refs.append(refs[k])

  reference = np.asarray(kept_refs, np.float64).reshape(-1, 2) if reference_logps else None
  tokenized = TokenizedPairs(tuple(prompts), tuple(chosens), tuple(rejecteds), np.asarray(row_ids, np.int32),
                             max_length=int(max_length), pad_id=int(pad_id), eos_id=int(eos_id),
                             reference_logps=reference)
  stats = dict(num_rows=len(recs), num_pairs=len(row_ids), num_dropped_empty_response=dropped,
               num_truncated=any_cut, num_prompt_truncated=prompt_cut, num_response_truncated=response_cut,
               skipped=bad.stats())
  return tokenized, stats


def check_lengths(max_length: int, max_prompt_length: int) -> None:
  """ValueError unless 1 <= max_prompt_length < max_length (every row keeps >= 1 response token)."""
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (max_length, max_prompt_length)):
    raise ValueError(f"max_length ({max_length!r}) and max_prompt_length ({max_prompt_length!r}) must be ints.")
  if max_prompt_length < 1:
    raise ValueError(f"max_prompt_length={max_prompt_length} must be >= 1: a prompt token is the context of the "
                     "first response token.")
  if max_prompt_length >= max_length:
    raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length={max_length}: the response "
                     f"needs room. Lower max_prompt_length or raise max_length (e.g. max_length="
                     f"{max_prompt_length * 2}).")


def pack_sequences(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], *, max_length: int,
                   pad_id: int) -> dict[str, np.ndarray]:
  """Rows `prompt + response`, right-padded to `max_length` -> input_ids, attention_mask, positions,
  loss_mask, each int32 `[N, max_length]` (see the module docstring)."""
  n = len(prompts)
  input_ids = np.full((n, max_length), pad_id, np.int32)
  attention_mask = np.zeros((n, max_length), np.int32)
  loss_mask = np.zeros((n, max_length), np.int32)
  for k, (p, r) in enumerate(zip(prompts, responses)):
    length = len(p) + len(r)
    if length > max_length:
      raise ValueError(f"pack_sequences: row {k} has {length} tokens > max_length={max_length}; tokenize with "
                       "the same max_length you batch with.")
    input_ids[k, :len(p)] = p
    input_ids[k, len(p):length] = r
    attention_mask[k, :length] = 1
    loss_mask[k, len(p):length] = 1
  positions = np.maximum(np.cumsum(attention_mask, axis=1, dtype=np.int32) - 1, 0) * attention_mask
  return dict(input_ids=input_ids, attention_mask=attention_mask, positions=positions.astype(np.int32),
              loss_mask=loss_mask)


def _padded(seqs: Sequence[np.ndarray], width: int, pad_id: int, *, left: bool,
            what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, 0/1 mask, positions 0 .. len - 1) `[N, width]` int32 of `seqs`, each left- or right-aligned."""
  ids = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), np.int32)
  positions = np.zeros((len(seqs), width), np.int32)
  for i, seq in enumerate(seqs):
    if not 0 < len(seq) <= width:
      raise ValueError(f"shared_prompt_rows: {what} {i} has {len(seq)} tokens; it needs 1 .. {width}.")
    cols = slice(width - len(seq), width) if left else slice(0, len(seq))
    ids[i, cols], mask[i, cols], positions[i, cols] = seq, 1, np.arange(len(seq))
  return ids, mask, positions


def shared_prompt_rows(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], *, prompt_width: int,
                       response_width: int, pad_id: int) -> dict[str, np.ndarray]:
  """`[B, P]` left-padded prompts and `[K B, R]` right-padded responses (K per prompt, prompt r // K of row r)
  -> the shared-prompt arrays of the module docstring (loss_mask on every real response token)."""
  prompt_ids, prompt_mask, prompt_positions = _padded(prompts, prompt_width, pad_id, left=True, what="prompt")
  input_ids, attention_mask, positions = _padded(responses, response_width, pad_id, left=False, what="response")
  prompt_len_N = np.repeat(prompt_mask.sum(-1), len(responses) // len(prompts)).astype(np.int32)
  return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, prompt_positions=prompt_positions,
              input_ids=input_ids, attention_mask=attention_mask,
              positions=(positions + prompt_len_N[:, None]) * attention_mask, loss_mask=attention_mask.copy())


def make_batch(tokenized: TokenizedPairs, pair_indices: np.ndarray, *, kind: str = "dpo") -> dict[str, np.ndarray]:
  """The batch of the pairs `pair_indices` (`[B]` indices into `tokenized`; -1 = a padding pair).

  kind="dpo": interleaved `[2B, T]` rows (chosen 2i, rejected 2i + 1); kind="dpo_shared": each prompt once
  `[B, P]` and the responses interleaved `[2B, R]` (module docstring); kind="sft": `[B, T]` chosen rows.
  A padding pair repeats pair 0's tokens with loss_mask all 0, row_ids -1 and pair_mask 0 (and desirable 0 for
  unpaired data): every row then attends to real tokens, so no softmax sees a fully masked row (which would give NaN).
  """
  check_kind(kind)
  if not isinstance(tokenized, TokenizedPairs):  # ranked sets (rankings.TokenizedRankings) lay out their own
    return tokenized.make_batch(pair_indices, kind=kind)
  idx = np.asarray(pair_indices, dtype=np.int64)
  real = idx >= 0
  src = np.where(real, idx, 0)
  if kind == "sft":
    prompts = [tokenized.prompt_ids[j] for j in src]
    responses = [tokenized.chosen_ids[j] for j in src]
    row_real = real
  else:
    prompts = [tokenized.prompt_ids[j] for j in src for _ in range(2)]
    responses = [seq for j in src for seq in (tokenized.chosen_ids[j], tokenized.rejected_ids[j])]
    row_real = np.repeat(real, 2)
  if kind == SHARED:
    batch = shared_prompt_rows(prompts[::2], responses, prompt_width=tokenized.prompt_width,
                               response_width=tokenized.response_width, pad_id=tokenized.pad_id)
  else:
    batch = pack_sequences(prompts, responses, max_length=tokenized.max_length, pad_id=tokenized.pad_id)
  batch["loss_mask"] = batch["loss_mask"] * row_real[:, None].astype(np.int32)
  batch["row_ids"] = np.where(real, tokenized.row_ids[src], -1).astype(np.int32)
  batch["pair_mask"] = real.astype(np.int32)
  if kind != "sft" and tokenized.reference_logps is not None:
    for j, field in enumerate(rows_lib.REFERENCE_FIELDS):  # `[B]` fp32; padding pairs get 0 (they carry no weight)
      batch[field] = np.where(real, tokenized.reference_logps[src, j], 0.0).astype(np.float32)
  if tokenized.labels is not None:  # unpaired data: `[B]` int32, 0 on padding pairs as well as undesirable units
    batch["desirable"] = np.where(real, tokenized.labels[src], False).astype(np.int32)
  return batch


LAYOUTS = ("chosen_then_rejected", "interleaved")  # batch_from_tokens: where pair i's two rows sit among N rows


MAX_TOKEN_ID = np.iinfo(np.int32).max  # batches are int32


def batch_from_tokens(input_ids: Any, attention_mask: Any, completion_mask: Any, *,
                      layout: str = "chosen_then_rejected") -> dict[str, np.ndarray]:
  """The DPO batch (module docstring) of rows tokenized elsewhere, e.g. the tensors TRL's DPOTrainer feeds its
  model, so a run can be reproduced on exactly the tokens another trainer saw.

  Args:
    input_ids: `[N, T]` integer token ids, N = 2B rows of B pairs: a numpy array or nested lists (a torch tensor
      via `.numpy()`). Padding ids are never attended to nor scored, whatever they are.
    attention_mask: `[N, T]` 1 on real tokens (prompt, response, EOS), 0 on padding; right or left padding.
    completion_mask: `[N, T]` 1 on the tokens whose log-probs are summed (the response and its EOS, TRL's
      completion mask), 0 on prompt and padding. Inside attention_mask, at least one token per row, and never a
      row's first real token: token t is scored by the logits at t - 1, so it needs a real token before it.
    layout: 'chosen_then_rejected' (TRL's concatenated forward): rows 0 .. B - 1 are the chosen responses and
      rows B .. 2B - 1 the rejected ones, pair i = rows (i, i + B). 'interleaved': pair i = rows (2i, 2i + 1).

  Returns:
    int32 numpy arrays: `input_ids`, `attention_mask`, `positions` (0, 1, ... over the real tokens only, 0 on
    padding, so left-padded rows get the positions of their unpadded tokens), `loss_mask` (= completion_mask),
    all `[2B, T]` with pairs interleaved (row 2i chosen, 2i + 1 rejected), and `pair_mask` `[B]` of ones.

  Raises ValueError naming the row (as numbered in the input), the field and the fix for anything the train step
  would silently mis-score: mismatched shapes, an odd N, non-integer or out-of-range ids, masks other than 0/1,
  scored padding, a row with no scored token, a scored first token.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"batch_from_tokens: layout={layout!r}; use 'chosen_then_rejected' (the first N/2 rows chosen, "
                     "the last N/2 rejected, as TRL concatenates them) or 'interleaved' (rows 2i, 2i + 1).")
  ids = _token_field(input_ids, "input_ids")
  attention = _token_field(attention_mask, "attention_mask")
  completion = _token_field(completion_mask, "completion_mask")
  for field, x in (("attention_mask", attention), ("completion_mask", completion)):
    if x.shape != ids.shape:
      raise ValueError(f"batch_from_tokens: field '{field}' has shape {list(x.shape)} but 'input_ids' has "
                       f"{list(ids.shape)}; pass the three [N, T] arrays of the same collated batch.")
  n = ids.shape[0]
  if n == 0 or n % 2:
    raise ValueError(f"batch_from_tokens: field 'input_ids' has {n} rows; DPO rows come in (chosen, rejected) "
                     "pairs, so N must be even and > 0. Pass both responses of every pair.")
  if ids.shape[1] < 2:
    raise ValueError(f"batch_from_tokens: field 'input_ids' has {ids.shape[1]} columns; a row needs at least a "
                     "prompt token and a scored token after it (T >= 2).")
  if ids.dtype.kind not in "iu":
    raise ValueError(f"batch_from_tokens: field 'input_ids' has dtype {ids.dtype}; token ids must be integers. "
                     "Pass the tokenizer's ids unconverted (e.g. tensor.numpy(), int64).")
  out_of_range = (ids < 0) | (ids > MAX_TOKEN_ID)
  if out_of_range.any():
    r, t = np.argwhere(out_of_range)[0]
    raise ValueError(f"batch_from_tokens: {_row_name(r, n, layout)}, field 'input_ids': column {t} holds "
                     f"{ids[r, t]}, not a token id in [0, {MAX_TOKEN_ID}]. Pad input_ids with the tokenizer's pad "
                     "id (labels use -100, input_ids never do).")
  masks = {}
  for field, x in (("attention_mask", attention), ("completion_mask", completion)):
    if x.dtype.kind not in "biuf":
      raise ValueError(f"batch_from_tokens: field '{field}' has dtype {x.dtype}; it must be numbers 0 / 1.")
    not_binary = (x != 0) & (x != 1)
    if not_binary.any():
      r, t = np.argwhere(not_binary)[0]
      raise ValueError(f"batch_from_tokens: {_row_name(r, n, layout)}, field '{field}': column {t} holds "
                       f"{x[r, t]}; a mask holds 0 or 1 only. Pass the 0/1 mask itself, not ids or weights.")
    masks[field] = x.astype(np.int32)
  attention, completion = masks["attention_mask"], masks["completion_mask"]
  padding_scored = (completion == 1) & (attention == 0)
  if padding_scored.any():
    r, t = np.argwhere(padding_scored)[0]
    raise ValueError(f"batch_from_tokens: {_row_name(r, n, layout)}, field 'completion_mask': column {t} is 1 but "
                     "attention_mask is 0 there (a padding token would be scored). completion_mask must lie inside "
                     "attention_mask: multiply it by attention_mask, or check the two come from the same batch.")
  unscored = completion.sum(axis=1) == 0
  if unscored.any():
    r = int(np.argmax(unscored))
    raise ValueError(f"batch_from_tokens: {_row_name(r, n, layout)}, field 'completion_mask' is all 0: the row has "
                     "no scored token, so its log-prob would be 0 and its pair's loss meaningless. Mark the "
                     "response tokens (and EOS) with 1, or drop the pair.")
  first_real_N = np.argmax(attention, axis=1)  # every row has a real token: it has a scored one inside attention
  first_scored = completion[np.arange(n), first_real_N] == 1
  if first_scored.any():
    r = int(np.argmax(first_scored))
    t = int(first_real_N[r])
    where = "the first token" if t == 0 else "the row's first real token (left padding before it)"
    raise ValueError(f"batch_from_tokens: {_row_name(r, n, layout)}, field 'completion_mask': column {t}, {where}, "
                     "is marked scored, but token t is scored by the logits at t - 1 and nothing comes before it. "
                     "The prompt must be non-empty: set completion_mask to 0 on the prompt, 1 on the response only.")
  positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0) * attention
  b = n // 2
  if layout == "chosen_then_rejected":
    order = np.stack([np.arange(b), np.arange(b) + b], axis=1).reshape(-1)  # [2B]: i, i + B, ...
  else:
    order = np.arange(n)
  return dict(input_ids=ids[order].astype(np.int32), attention_mask=attention[order],
              positions=positions[order].astype(np.int32), loss_mask=completion[order],
              pair_mask=np.ones((b,), np.int32))


def _token_field(x: Any, field: str) -> np.ndarray:
  """`x` as a 2-D numpy array; ValueError naming `field` for ragged rows or another rank."""
  try:
    array = np.asarray(x)
  except ValueError:  # numpy refuses nested lists of unequal lengths
    raise ValueError(f"batch_from_tokens: field '{field}' has rows of different lengths; pad every row to the same "
                     "length T (a collated [N, T] batch).") from None
  if array.ndim != 2:
    raise ValueError(f"batch_from_tokens: field '{field}' has shape {list(array.shape)}; expected [N, T] (rows, "
                     "tokens): one collated batch; for [S, N, T] arrays call once per step.")
  return array


def _row_name(r: int, n: int, layout: str) -> str:
  """'row 3 (pair 1, rejected)': row r of N input rows in `layout`, with the pair and side it belongs to."""
  b = n // 2
  pair, rejected = (r % b, r >= b) if layout == "chosen_then_rejected" else (r // 2, r % 2 == 1)
  return f"row {r} (pair {pair}, {'rejected' if rejected else 'chosen'})"


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: use 'dpo' (interleaved chosen/rejected rows), 'dpo_shared' (each prompt once, "
                     "then its chosen/rejected responses) or 'sft' (chosen rows only).")


def epoch_order(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
  """The pair order of `epoch`: a permutation of range(num_pairs) `[num_pairs]`, a pure function of its args."""
  if seed < 0 or epoch < 0:
    raise ValueError(f"epoch_order: seed={seed} and epoch={epoch} must be >= 0.")
  return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def num_batches_per_epoch(num_pairs: int, global_batch: int) -> int:
  """Full global batches per training epoch (the remainder of each epoch is dropped)."""
  if global_batch < 1:
    raise ValueError(f"global_batch={global_batch} must be >= 1 (pairs per optimizer step).")
  return num_pairs // global_batch


def num_eval_batches(num_pairs: int, global_batch: int) -> int:
  """Global batches eval_batches yields: every pair once, the last batch padded."""
  if global_batch < 1:
    raise ValueError(f"global_batch={global_batch} must be >= 1 (pairs per eval batch).")
  return -(-num_pairs // global_batch)


def host_pairs(global_batch: int, process_index: int, process_count: int) -> slice:
  """This host's contiguous block of a global batch (in pairs); hosts in process order."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} pairs must be a positive multiple of process_count="
                     f"{process_count}; pick a batch size divisible by the number of hosts.")
  per_host = global_batch // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


def host_batch(tokenized: TokenizedPairs, order: np.ndarray, step_in_epoch: int, *, global_batch: int,
               process_index: int = 0, process_count: int = 1, kind: str = "dpo") -> dict[str, np.ndarray]:
  """This host's part of global batch `step_in_epoch` of an epoch with pair order `order`.

  Global batch s = order[s * global_batch : (s + 1) * global_batch]; the host takes its contiguous
  global_batch // process_count pairs of it (rows `[2 * that, T]` for kind="dpo").
  """
  block = host_pairs(global_batch, process_index, process_count)
  n = num_batches_per_epoch(len(order), global_batch)
  if not 0 <= step_in_epoch < n:
    raise ValueError(f"step_in_epoch={step_in_epoch} is outside the {n} full batches of {global_batch} pairs "
                     f"in an epoch of {len(order)} pairs.")
  start = step_in_epoch * global_batch
  return make_batch(tokenized, order[start + block.start:start + block.stop], kind=kind)


def iterate_batches(tokenized: TokenizedPairs, *, global_batch: int, seed: int, start_step: int = 0,
                    process_index: int = 0, process_count: int = 1,
                    kind: str = "dpo") -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Training batches forever: yields (global_step, this host's batch) from `start_step` on.

  Step s is batch s % n of epoch s // n (n = num_batches_per_epoch), so starting at k reproduces exactly
  the batches an uninterrupted run yields from step k. Arguments are checked here, not at the first next().
  """
  n = num_batches_per_epoch(tokenized.num_pairs, global_batch)
  if n == 0:
    raise ValueError(f"{tokenized.num_pairs} pairs cannot fill one global batch of {global_batch}; lower the "
                     "batch size or add data.")
  host_pairs(global_batch, process_index, process_count)
  check_kind(kind)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0 (the global step a checkpoint stored).")

  def batches():
    step, epoch, order = start_step, -1, None
    while True:
      if step // n != epoch:
        epoch = step // n
        order = epoch_order(tokenized.num_pairs, seed, epoch)
      yield step, host_batch(tokenized, order, step % n, global_batch=global_batch, process_index=process_index,
                             process_count=process_count, kind=kind)
      step += 1

  return batches()


def eval_batches(tokenized: TokenizedPairs, *, global_batch: int, process_index: int = 0, process_count: int = 1,
                 kind: str = "dpo") -> Iterator[dict[str, np.ndarray]]:
  """Every pair exactly once, in source order: this host's part of each global batch.

  The last global batch is filled up with padding pairs (pair_mask 0, row_ids -1) so shapes stay static;
  num_eval_batches(tokenized.num_pairs, global_batch) batches in all.
  """
  block = host_pairs(global_batch, process_index, process_count)
  check_kind(kind)
  num = num_eval_batches(tokenized.num_pairs, global_batch)
  order = np.arange(num * global_batch)
  order[order >= tokenized.num_pairs] = -1

  def batches():
    for s in range(num):
      start = s * global_batch
      yield make_batch(tokenized, order[start + block.start:start + block.stop], kind=kind)

  return batches()
