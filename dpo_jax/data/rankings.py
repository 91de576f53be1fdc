"""Ranked preference data: K responses per prompt, for the seed's Plackett-Luce generalisation of DPO.

  ranked   {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}   ranking = response indices, best first
           or {"prompt": str, "responses": [str, ...], "scores": [float, ...]}  higher is better (ties: list order)

A pair is the K = 2 case (responses [chosen, rejected], ranking [0, 1]), and with it `plackett_luce` is the
DPO loss. Batches keep a unit's K responses in consecutive rows, best first: rows K i .. K i + K - 1 are unit i,
`[B * K, T]` (the `[B, K, T]` layout flattened, so the unit axis shards like pairs), with `response_mask`
`[B, K]` marking real responses (prompts with fewer than K responses are padded; a padded response repeats
the best one with loss_mask 0). numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dpo_jax.data import preference

from dpo_jax.data import rows as rows_lib


@dataclasses.dataclass(frozen=True)
class TokenizedRankings:
  """Kept ranked sets in source order (the interface of `preference.TokenizedPairs` that batching uses).

  prompt_ids[k]     `[prompt_len]`, as for pairs
  response_ids[k]   tuple of `[response_len]` arrays, ranked best first (response + EOS, truncated like pairs)
  row_ids           `[num_pairs]` int32 source row of each kept set
  num_responses     K, the most responses of any set (the batch's second axis)
  """
  prompt_ids: tuple[np.ndarray, ...]
  response_ids: tuple[tuple[np.ndarray, ...], ...]
  row_ids: np.ndarray
  max_length: int
  pad_id: int
  eos_id: int
  num_responses: int
  reference_logps: None = None  # precomputed reference log-probs are a pair-data feature

  @property
  def num_pairs(self) -> int:  # "units" for batching: one ranked set each
    return int(self.row_ids.shape[0])

  def make_batch(self, pair_indices: np.ndarray, *, kind: str = "dpo") -> dict[str, np.ndarray]:
    """`preference.make_batch` of ranked sets: `make_ranking_batch`."""
    return make_ranking_batch(self, pair_indices, kind=kind)

  @property
  def chosen_ids(self) -> tuple[np.ndarray, ...]:  # the best responses: what SFT fits
    return tuple(r[0] for r in self.response_ids)

  @property
  def prompt_width(self) -> int:  # P of shared-prompt batches, as for pairs
    return max(len(p) for p in self.prompt_ids)

  @property
  def response_width(self) -> int:  # R of shared-prompt batches, as for pairs
    return max(len(r) for rs in self.response_ids for r in rs)


def _numbers(values: Any, kind: type) -> list | None:
  """values as a list of `kind` (int or float), or None when it is not a list of numbers."""
  if not isinstance(values, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                  for v in values):
    return None
  return [kind(v) for v in values]


def ranking_of(row: dict, i: int, source: str) -> list[int]:
  """Response indices best first, from `ranking` or `scores`; ValueError naming the row and the fix."""
  k = len(row["responses"])
  if "ranking" in row and row["ranking"] is not None:
    ranking = _numbers(row["ranking"], int)
    if ranking is None or sorted(ranking) != list(range(k)):
      raise rows_lib.BadRow(f"{source}: row {i}, field 'ranking'={row['ranking']!r} must list each of the {k} "
                              f"response indices 0..{k - 1} once, best first.", "bad_ranking")
    return ranking
  if "scores" in row and row["scores"] is not None:
    scores = _numbers(row["scores"], float)
    if scores is None or len(scores) != k or not all(np.isfinite(scores)):
      raise rows_lib.BadRow(f"{source}: row {i}, field 'scores' must hold {k} finite numbers (one per response), "
                              f"got {row['scores']!r}.", "bad_ranking")
    return sorted(range(k), key=lambda j: -scores[j])  # stable: equal scores keep list order
  raise rows_lib.BadRow(f"{source}: row {i} has 'responses' but neither 'ranking' (indices, best first) nor "
                          "'scores'.", "bad_ranking")


def tokenize_rankings(rows: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int,
                      source: str = "rows", on_bad_row: str = "error") -> tuple[TokenizedRankings, dict]:
  """Ranked rows -> (TokenizedRankings, stats), tokenized as `preference.tokenize_pairs` tokenizes pairs.

  Empty responses are dropped from their set; a set left with fewer than 2 responses is dropped (counted).
  Bad rows (rows_lib.BadRow) raise or, with on_bad_row='skip', are counted in stats["skipped"].
  """
  preference.check_lengths(max_length, max_prompt_length)
  pad_id, eos_id = preference.special_ids(tokenizer)
  bad = rows_lib.BadRows(on_bad_row, rows)
  prompts, sets, row_ids = [], [], []
  dropped = truncated = 0
  for i, row in enumerate(rows_lib.records(rows)):
    try:
      order, prompt = _checked_ranking(row, i, source, tokenizer)
    except rows_lib.BadRow as e:
      bad.handle(e, i)
      continue
    kept_prompt = prompt[-max_prompt_length:]
    budget = max_length - len(kept_prompt)
    responses = tokenizer([str(row["responses"][j]) for j in order], add_special_tokens=False)["input_ids"]
    responses = [r for r in responses if r]
    if len(responses) < 2:
      dropped += 1
      continue
    truncated += len(kept_prompt) < len(prompt) or any(len(r) + 1 > budget for r in responses)
    prompts.append(np.asarray(kept_prompt, np.int32))
    sets.append(tuple(np.asarray((r + [eos_id])[:budget], np.int32) for r in responses))
    row_ids.append(i)
  if not sets:
    raise ValueError(f"{source}: no ranked set with at least 2 non-empty responses.")
  tokenized = TokenizedRankings(tuple(prompts), tuple(sets), np.asarray(row_ids, np.int32), max_length=int(max_length),
                                pad_id=int(pad_id), eos_id=int(eos_id), num_responses=max(len(s) for s in sets))
  stats = dict(num_rows=len(rows), num_pairs=len(sets), num_dropped_empty_response=dropped, num_truncated=truncated,
               num_responses=tokenized.num_responses, skipped=bad.stats())
  return tokenized, stats


def _checked_ranking(row: Any, i: int, source: str, tokenizer: Any) -> tuple[list[int], list[int]]:
  """(ranking best first, prompt ids) of a ranked row; BadRow naming the row and field when it is malformed."""
  if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("responses"),
                                                                                           (list, tuple)):
    raise rows_lib.BadRow(f"{source}: row {i}: ranked rows need 'prompt' (a string) and 'responses' (a list of "
                            f"strings); it has {sorted(row) if isinstance(row, dict) else type(row).__name__}.",
                            "bad_ranked_row")
  order = ranking_of(row, i, source)
  prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
  if not prompt:
    raise rows_lib.BadRow(f"{source}: row {i}, field 'prompt' is empty; give every row a prompt.", "empty_prompt")
  return order, prompt


def make_ranking_batch(tokenized: TokenizedRankings, indices: np.ndarray, *, kind: str = "dpo") -> dict:
  """The batch of ranked sets `indices` (`[B]`; -1 = a padding set): `[B * K, T]` rows best first per set and
  `response_mask` `[B, K]` for kind 'dpo' (for 'dpo_shared' each prompt once `[B, P]` and the responses
  `[B * K, R]`, as `preference.shared_prompt_rows` lays them out); for kind 'sft' the best responses as `[B, T]`
  rows (like pairs)."""
  preference.check_kind(kind)
  idx = np.asarray(indices, dtype=np.int64)
  real = idx >= 0
  src = np.where(real, idx, 0)
  if kind == "sft":
    prompts = [tokenized.prompt_ids[j] for j in src]
    responses = [tokenized.response_ids[j][0] for j in src]
    batch = preference.pack_sequences(prompts, responses, max_length=tokenized.max_length, pad_id=tokenized.pad_id)
    batch["loss_mask"] *= real[:, None].astype(np.int32)
  else:
    k = tokenized.num_responses
    present = np.array([[real[b] and r < len(tokenized.response_ids[j]) for r in range(k)]
                        for b, j in enumerate(src)], dtype=bool)
    prompts = [tokenized.prompt_ids[j] for j in src for _ in range(k)]
    responses = [tokenized.response_ids[j][r if r < len(tokenized.response_ids[j]) else 0]
                 for j in src for r in range(k)]
    if kind == preference.SHARED:  # each prompt once, then its K responses
      batch = preference.shared_prompt_rows(prompts[::k], responses, prompt_width=tokenized.prompt_width,
                                            response_width=tokenized.response_width, pad_id=tokenized.pad_id)
    else:
      batch = preference.pack_sequences(prompts, responses, max_length=tokenized.max_length, pad_id=tokenized.pad_id)
    batch["loss_mask"] *= present.reshape(-1)[:, None].astype(np.int32)
    batch["response_mask"] = present.astype(np.int32)
  batch["row_ids"] = np.where(real, tokenized.row_ids[src], -1).astype(np.int32)
  batch["pair_mask"] = real.astype(np.int32)
  return batch
