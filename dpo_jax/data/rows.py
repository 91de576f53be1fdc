"""Rows in: prompt/chosen/rejected records read from a JSON / JSONL / Parquet file, a `datasets` folder or a
hub dataset, and checked one by one before anything is tokenized.

Bad rows (a null or non-string field, chosen == rejected, an empty prompt, a malformed JSON line, ...) are a
ValueError naming the source, row, JSON line and field, or with on_bad_row='skip' dropped and counted by reason
in the tokenizers' stats["skipped"] (BadRow, BadRows). Whole-file problems (invalid UTF-8, a missing column)
are always errors.

Text files are read as UTF-8 (a byte-order mark is allowed); nothing here imports jax or a tokenizer.
"""

from __future__ import annotations

import collections
import difflib
import json
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


FILE_TYPES = (".json", ".jsonl", ".parquet")


ON_BAD_ROW = ("error", "skip")  # config.data.on_bad_row: what a row that cannot be trained on does


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
  for i, row in enumerate(records(rows)):
    try:
      pair_texts(row, i, source)
    except BadRow as e:
      bad.handle(e, i)


def records(rows: Any) -> list:
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
