"""Preference data: load prompt/chosen/rejected rows, tokenize each pair, cut deterministic host batches.

Pipeline:  load_rows(source) -> tokenize_pairs(rows, tokenizer) -> iterate_batches / eval_batches -> dict

Batch contract (the model side, dpo_jax/logprobs.py, relies on it). A DPO batch of B pairs is a dict of
numpy int32 arrays whose rows INTERLEAVE pairs, so one forward pass serves chosen and rejected:

  input_ids       [2B, T]  row 2i = pair i's prompt + chosen + EOS, row 2i + 1 = prompt + rejected + EOS,
                           right-padded with the pad id to T = max_length
  attention_mask  [2B, T]  1 on real tokens (prompt, response, EOS), 0 on padding
  positions       [2B, T]  0 .. len - 1 over the real tokens, 0 on padding
  loss_mask       [2B, T]  1 on response tokens (EOS included), 0 on prompt and padding
  row_ids         [B]      the pair's row index in the source (-1 for a padding pair)
  pair_mask       [B]      1 for real pairs, 0 for padding pairs (only eval_batches pads)

A shared-prompt DPO batch (kind="dpo_shared") holds each pair's prompt once, so the model runs it once for
both responses (dpo_jax/logprobs.py); the same pairs, the same log-probs, fewer tokens:

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

An SFT batch (fitting pi_ref on prompt + chosen) has the same keys as a DPO batch without interleaving:
`[B, T]` chosen rows, `row_ids` and `pair_mask` `[B]`.

Token t is scored by the logits at t - 1, so a prompt must be non-empty (the first response token needs a
context): an empty prompt is an error, never silently dropped, and loss_mask[:, 0] is always 0.

Bad rows (a null or non-string field, chosen == rejected, an empty prompt, a malformed JSON line, ...) are a
ValueError naming the source, row, JSON line and field, or with on_bad_row='skip' dropped and counted by reason
in the tokenizers' stats["skipped"] (BadRow, BadRows). Whole-file problems (invalid UTF-8, a missing column)
are always errors.

Data position = global step. Epoch e's order is a permutation seeded by (seed, e); global batch s of an
epoch is the contiguous block s of that order, and each host materialises only its contiguous slice of
it. So `iterate_batches(start_step=k)` replays exactly what an uninterrupted run yields from step k, and a
checkpoint only needs the step.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
FILE_TYPES = (".json", ".jsonl", ".parquet")
KINDS = ("dpo", "dpo_shared", "sft")
SHARED = "dpo_shared"  # the kind of shared-prompt DPO batches
ON_BAD_ROW = ("error", "skip")  # config.data.on_bad_row: what a row that cannot be trained on does


# ------------------------------------------------------------------------------------------------ bad rows

class BadRow(ValueError):
  """One row that cannot be trained on (wrong type, null, bad role, empty prompt, chosen == rejected, ...).

  The message names the source, row and field and says the fix; `reason` is the short key the row is counted
  under in stats["skipped"] when config.data.on_bad_row='skip'. Errors about a whole file or column (a missing
  column, an unreadable file, a bad config) stay plain ValueErrors: skipping every row would hide them.
  """

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


class Rows(list):
  """Records read from a JSON-lines file: a list of dicts that also knows where each came from.

  lines[i] is the 1-based line of row i (blank lines make them differ from i + 1); skipped counts malformed
  lines dropped by on_bad_row='skip', by reason.
  """
  lines: tuple[int, ...] = ()
  skipped: dict[str, int] = {}


class BadRows:
  """What to do with each BadRow: raise it (on_bad_row='error') or count it by reason and go on ('skip').

  Raised errors get the row's line number appended when the rows came from a JSON-lines file, so the user can
  open the file at the right place.
  """

  def __init__(self, on_bad_row: str, rows: Any = ()):
    check_on_bad_row(on_bad_row)
    self.skip = on_bad_row == "skip"
    self.lines = getattr(rows, "lines", ())
    self.counts: collections.Counter = collections.Counter(getattr(rows, "skipped", {}))

  def locate(self, error: BadRow, i: int) -> BadRow:
    """`error` with "(row i is line n of the file)" appended when the line is known."""
    if i >= len(self.lines):
      return error
    return BadRow(f"{error} (row {i} is line {self.lines[i]} of the file)", error.reason)

  def handle(self, error: BadRow, i: int) -> None:
    """Count row i as skipped for error.reason, or raise `error` (located) when not skipping."""
    if not self.skip:
      raise self.locate(error, i) from None
    self.counts[error.reason] += 1

  def stats(self) -> dict[str, int]:
    return dict(sorted(self.counts.items()))


def check_on_bad_row(on_bad_row: str) -> None:
  if on_bad_row not in ON_BAD_ROW:
    raise ValueError(f"config.data.on_bad_row={on_bad_row!r}; choose 'error' (stop at the first bad row, naming it) "
                     "or 'skip' (drop bad rows, counted per reason in the data report).")


# Columns of the public preference schemas that sit beside prompt/chosen/rejected: never a misspelling of them.
KNOWN_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "responses", "ranking", "scores", "messages", "prompt_id",
                 "score_chosen", "score_rejected", "chosen_rating", "rejected_rating", "chosen_model", "rejected_model",
                 "chosen_reward", "rejected_reward", "system", "id", "source")


def misspelling(field: str, present: Any) -> str:
  """" 'choosen' looks like a misspelling of 'chosen': rename it." when a present field is close to the
  missing `field`, else ''. Known columns (`KNOWN_COLUMNS`) and `<required field>_<suffix>` columns such as
  `rejected_reward` are real columns of their own, never suggested."""
  def candidate(name: str) -> bool:
    return (name not in REQUIRED_FIELDS and name not in KNOWN_COLUMNS
            and not any(name.startswith(f + "_") for f in REQUIRED_FIELDS))
  match = difflib.get_close_matches(field, [str(n) for n in present if candidate(str(n))], n=1, cutoff=0.6)
  return f" '{match[0]}' looks like a misspelling of '{field}': rename it." if match else ""


# ------------------------------------------------------------------------------------------------ loading

def load_rows(source: str, split: str = "train", on_bad_row: str = "error") -> Any:
  """Rows with `prompt`, `chosen`, `rejected` string fields, validated -> list[dict] or datasets.Dataset.

  `source` is chosen by what it names:
    a .json / .jsonl / .parquet file   read directly (list of dicts; row i = i-th record, blank lines skipped)
    a folder                           `datasets.load_from_disk`, else `datasets.load_dataset(folder)`
    anything else that is not a path   `datasets.load_dataset(source, split=split)` (a hub name; needs network)
  A .json file may hold a list of records, {split: [records]}, a mapping of column lists, or JSON lines.
  Raises FileNotFoundError for a missing path and ValueError naming the source, row and field for a
  missing column or a non-string value. on_bad_row='skip' drops malformed JSON lines (counted in
  rows.skipped) and leaves bad rows for tokenize_pairs to skip.
  """
  path = Path(source).expanduser()
  if path.is_file():
    rows = _read_file(path, split, on_bad_row)
  elif path.is_dir():
    rows = _read_folder(path, split)
  elif _looks_like_path(source):
    raise FileNotFoundError(
        f"{source}: no such file or folder. Pass an existing .json/.jsonl/.parquet file, a folder written by "
        f"datasets' save_to_disk or readable by load_dataset, or a hub dataset name like 'owner/name'.")
  else:
    rows = _read_hub(source, split)
  check_rows(rows, source, on_bad_row)
  return rows


def check_rows(rows: Any, source: str = "rows", on_bad_row: str = "error") -> None:
  """ValueError naming the source (and row, field) unless every row has string prompt/chosen/rejected.

  With on_bad_row='skip' rows are not checked here: tokenize_pairs skips the bad ones, counting them (row 0
  may be one of them, so its fields are not taken as the columns either).
  """
  if len(rows) == 0:
    raise ValueError(f"{source}: no rows; check the file or the split name.")
  if on_bad_row == "skip":
    return
  try:
    found = _column_names(rows)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None
  missing = [f for f in REQUIRED_FIELDS if f not in found]
  if missing:
    hints = "".join(misspelling(f, found) for f in missing)
    raise ValueError(
        f"{source}: missing column(s) {missing}; found {sorted(found)}.{hints} Each row needs string fields "
        f"{list(REQUIRED_FIELDS)}: rename your columns (e.g. dataset.rename_column('response_a', 'chosen')) or "
        f"write rows as {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}.")
  bad = BadRows(on_bad_row, rows)
  for i, row in enumerate(_records(rows)):
    try:
      pair_texts(row, i, source)
    except BadRow as e:
      bad.handle(e, i)


def _records(rows: Any) -> list:
  """rows (a list of dicts or a datasets.Dataset) as a list; a Dataset is read with_format(None) so a numpy /
  torch format cannot turn strings into arrays."""
  return rows if isinstance(rows, (list, tuple)) else list(rows.with_format(None))


def pair_texts(row: Any, i: int, source: str = "rows") -> tuple[str, str, str]:
  """(prompt, chosen, rejected) of an explicit row; BadRow naming the source, row and field when a field is
  missing, null or not a string, or when chosen == rejected (the pair then has no preference to learn)."""
  if not isinstance(row, dict):
    raise BadRow(f"{source}: row {i} is a {type(row).__name__}, not an object with fields "
                 f"{list(REQUIRED_FIELDS)}; fix that record.", "not_an_object")
  texts = []
  for field in REQUIRED_FIELDS:
    if field not in row:
      raise BadRow(f"{source}: row {i} has no field '{field}' (it has {sorted(row)}).{misspelling(field, row)} Add it "
                   "or drop the row.", "missing_field")
    value = row[field]
    if not isinstance(value, str):
      raise BadRow(f"{source}: row {i}, field '{field}': expected a string, got {_describe(value)}. "
                   f"{_fix_for(value)}", "null_value" if value is None else "not_a_string")
    texts.append(value)
  check_distinct(texts[1], texts[2], i, source)
  return texts[0], texts[1], texts[2]


def check_distinct(chosen: Any, rejected: Any, i: int, source: str = "rows") -> None:
  """BadRow when a pair's chosen and rejected responses are identical: its DPO margin is 0 whatever the params,
  so it adds no gradient and counts as a wrong answer in the accuracy (a tie or a dataset bug)."""
  if chosen == rejected:
    raise BadRow(f"{source}: row {i}, fields 'chosen' and 'rejected' are identical ({str(chosen)[:60]!r}); the pair "
                 "has no preference to learn. Drop the row, or set --config.data.on_bad_row=skip to skip such rows "
                 "(counted).", "chosen_equals_rejected")


REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


def reference_pair(row: Any, i: int, source: str = "rows") -> tuple[float, float]:
  """(ref_chosen_logps, ref_rejected_logps) of a row; BadRow naming the row and field for a missing,
  non-numeric, NaN or infinite value (precomputed reference log-probs must be finite nats)."""
  values = []
  for field in REFERENCE_FIELDS:
    if field not in row:
      raise BadRow(f"{source}: row {i} has no field '{field}'. Write it with "
                   "`python -m dpo_jax.train --config.stage=precompute`, or set config.data.reference_logps=False.",
                   "missing_reference_logps")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
      raise BadRow(f"{source}: row {i}, field '{field}': expected a finite number (log-prob in nats), got "
                   f"{_describe(value)}. Recompute the reference log-probs for that row or drop it.",
                   "bad_reference_logps")
    values.append(float(value))
  return values[0], values[1]


def _describe(value: Any) -> str:
  return "null (a missing value)" if value is None else f"{type(value).__name__} {str(value)[:60]!r}"


def _fix_for(value: Any) -> str:
  if value is None:
    return "Fill in or drop that row."
  if isinstance(value, (list, dict)):
    return ("This loader takes plain text, not chat messages: render them first, e.g. "
            "tokenizer.apply_chat_template(messages, tokenize=False), and store the string.")
  return "Store the field as text."


def _column_names(rows: Any) -> set[str]:
  """Columns of a Dataset, or the fields of the first record of a list."""
  if isinstance(rows, (list, tuple)):
    if not isinstance(rows[0], dict):
      raise ValueError(f"row 0 is a {type(rows[0]).__name__}, not an object with fields {list(REQUIRED_FIELDS)}; "
                       "write one JSON object per record.")
    return set(rows[0])
  return set(rows.column_names)


def _looks_like_path(source: str) -> bool:
  """A hub name is 'name' or 'owner/name'; anything with a path's marks is taken as a local path."""
  return (source.startswith((".", "/", "~")) or "\\" in source or source.count("/") >= 2
          or Path(source).suffix.lower() in FILE_TYPES + (".csv", ".arrow", ".txt"))


def _read_file(path: Path, split: str, on_bad_row: str = "error") -> list[dict]:
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    return _read_jsonl(path, on_bad_row=on_bad_row)
  if suffix == ".json":
    return _read_json(path, split, on_bad_row)
  if suffix == ".parquet":
    import pyarrow.parquet as pq  # installed with datasets; read directly to avoid a cache copy

    try:
      return pq.read_table(str(path)).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
      raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); rewrite it, e.g. "
                       f"pandas df.to_parquet(path).") from e
  raise ValueError(f"{path}: unsupported file type '{suffix}'; use one of {list(FILE_TYPES)} (e.g. pandas "
                   f"df.to_json(path, orient='records', lines=True)) or a folder readable by datasets.")


def _read_text(path: Path) -> str:
  """The file as text; ValueError naming the line and byte of the first invalid UTF-8 sequence. Not skippable:
  a wrong encoding (latin-1, UTF-16) usually garbles far more than the one line where decoding first fails.
  A UTF-8 byte-order mark (Windows editors, Excel exports) is dropped, not read as part of row 0."""
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}: line {line} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}); "
                     "re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8.") from None


def _read_jsonl(path: Path, text: str | None = None, on_bad_row: str = "error") -> Rows:
  """One record per non-blank line, as Rows (with each row's line number); a malformed line is a ValueError
  naming it, or skipped and counted under 'malformed_json' with on_bad_row='skip'."""
  check_on_bad_row(on_bad_row)
  rows, lines, skipped = Rows(), [], 0
  for line_no, line in enumerate((_read_text(path) if text is None else text).splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if on_bad_row == "skip":
        skipped += 1
        continue
      raise ValueError(f"{path}: line {line_no} (row {len(rows)}) is not valid JSON ({e.msg} at column "
                       f"{e.colno}); fix or remove that line, or set --config.data.on_bad_row=skip.") from None
    lines.append(line_no)
  rows.lines = tuple(lines)
  rows.skipped = {"malformed_json": skipped} if skipped else {}
  return rows


def _read_json(path: Path, split: str, on_bad_row: str = "error") -> list[dict]:
  text = _read_text(path)
  try:
    data = json.loads(text)
  except json.JSONDecodeError:
    return _read_jsonl(path, text, on_bad_row)  # datasets' Dataset.to_json writes JSON lines under a .json name
  if isinstance(data, list):
    return data
  if isinstance(data, dict) and isinstance(data.get(split), list):
    return data[split]
  if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
    lengths = {k: len(v) for k, v in data.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"{path}: column lists differ in length {lengths}; make every column the same length.")
    return [dict(zip(data, values)) for values in zip(*data.values())]
  keys = sorted(data) if isinstance(data, dict) else []
  raise ValueError(f"{path}: expected a list of records, {{'{split}': [records]}} or a mapping of column lists; "
                   f"found a {type(data).__name__} with keys {keys[:10]}. Write records, e.g. pandas "
                   f"df.to_json(path, orient='records'), or pass split= one of those keys.")


def _read_folder(path: Path, split: str) -> Any:
  import datasets

  try:
    loaded = datasets.load_from_disk(str(path))
  except FileNotFoundError:  # not a save_to_disk folder: let load_dataset find data files in it
    try:
      return datasets.load_dataset(str(path), split=split)
    except Exception as e:  # datasets raises many types (missing files, bad split, bad schema)
      raise ValueError(f"{path}: neither a save_to_disk folder nor readable by datasets.load_dataset with "
                       f"split='{split}' ({type(e).__name__}: {e}). Put e.g. train.jsonl in it, pass a file "
                       f"path, or pass the right split.") from e
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded:
      raise ValueError(f"{path}: no split '{split}'; it has {sorted(loaded)}. Pass split= one of those.")
    return loaded[split]
  return loaded


def _read_hub(name: str, split: str) -> Any:
  import datasets

  try:
    return datasets.load_dataset(name, split=split)
  except Exception as e:  # offline, unknown name, unknown split: all reported the same way
    raise ValueError(f"{name}: not a local path, and loading it as a hub dataset (split='{split}') failed "
                     f"({type(e).__name__}: {e}). Check the spelling and split; for a local file use a path "
                     f"like ./{name}; for the hub, unset HF_DATASETS_OFFLINE and check the network.") from e


# --------------------------------------------------------------------------------------------- tokenizing

@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedPairs:
  """Kept pairs in source order; token ids are ragged int32 arrays, one per pair.

  prompt_ids[k]    `[prompt_len]`, left-truncated to max_prompt_length (its end kept), never empty
  chosen_ids[k]    `[response_len]`, response + EOS truncated to max_length - prompt_len (EOS is cut
                   first, so it is present only when the whole response fits), never empty
  rejected_ids[k]  as chosen_ids
  row_ids          `[num_pairs]` int32, the source row index of each kept pair
  """
  prompt_ids: tuple[np.ndarray, ...]
  chosen_ids: tuple[np.ndarray, ...]
  rejected_ids: tuple[np.ndarray, ...]
  row_ids: np.ndarray
  max_length: int  # T, tokens per batch row
  pad_id: int
  eos_id: int
  reference_logps: np.ndarray | None = None  # [num_pairs, 2] precomputed log pi_ref (chosen, rejected), nats

  @property
  def num_pairs(self) -> int:
    return int(self.row_ids.shape[0])

  @functools.cached_property
  def prompt_width(self) -> int:
    """P of shared-prompt batches: the longest prompt, in tokens."""
    return max(len(p) for p in self.prompt_ids)

  @functools.cached_property
  def response_width(self) -> int:
    """R of shared-prompt batches: the longest response (EOS included), in tokens."""
    return max(len(r) for r in self.chosen_ids + self.rejected_ids)


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
                   texts_of: Callable[[Any, int, str], tuple[str, str, str]] = pair_texts
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
  bad = BadRows(on_bad_row, rows)
  recs = _records(rows)
  if not recs:
    raise ValueError(f"{source}: no rows to tokenize.")
  good, texts, refs = [], [], []
  for i, row in enumerate(recs):
    try:
      text = texts_of(row, i, source)
      ref = reference_pair(row, i, source) if reference_logps else None
    except BadRow as e:
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
      bad.handle(BadRow(f"{source}: row {i}, field 'prompt' is empty (0 tokens); the first response token needs a "
                        "context to be scored. Give the row a prompt (even a fixed one like 'Answer:') or drop it.",
                        "empty_prompt"), i)
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


# ---------------------------------------------------------------------------------------------- batching

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
  A padding pair repeats pair 0's tokens with loss_mask all 0, row_ids -1 and pair_mask 0: every row then
  attends to real tokens, so no softmax sees a fully masked row (which would give NaN).
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
    for j, field in enumerate(REFERENCE_FIELDS):  # `[B]` fp32; padding pairs get 0 (they carry no weight)
      batch[field] = np.where(real, tokenized.reference_logps[src, j], 0.0).astype(np.float32)
  return batch


# ------------------------------------------------------------------------------------------ batches from tokens

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
