"""The public preference-data schemas: detect which one rows use and turn them into token ids.

  explicit        {"prompt": str, "chosen": str, "rejected": str}            (UltraFeedback-binarized text style)
  conversational  {"chosen": [messages], "rejected": [messages]}, optionally {"prompt": [messages] or str}
                  with messages {"role": "system" | "user" | "assistant", "content": str}  (trl's format)
  implicit        {"chosen": str, "rejected": str}, full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts
                  sharing the prompt as a prefix                                         (Anthropic HH style)
  ranked          {"prompt": str, "responses": [str, ...], "ranking" | "scores": [...]}  (K responses; see rankings)
  unpaired        {"prompt": str, "completion": str, "label": bool}, or "prompt" / "completion" message lists
                  (TRL's unpaired preference format, trl-lib/kto-mix-14k); for the unpaired losses, see unpaired

Pipeline:  load_any_rows(source) -> tokenize_any(rows, tokenizer, ...) -> (preference.TokenizedPairs, stats)
           (tokenize_any calls detect_schema; to_explicit_rows gives text rows instead of ids)

Unpaired rows are detected here and tokenized by unpaired.tokenize_unpaired (which also splits pairs in two, as
TRL's unpair_preference_dataset does, and builds on this module's helpers); tokenize_any refuses them (a pair loss
needs pairs).
explicit and implicit rows go through preference.tokenize_pairs (implicit rows are split into explicit
strings first, by split_transcripts). Conversational rows are rendered with the tokenizer's chat template and
tokenized here, as ids, so the prompt/response boundary is exact (see render_response). Their responses end
with the template's end-of-turn tokens; EOS is appended only when the rendered turn has no EOS token.

numpy only: no jax, no model code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dpo_jax.data import preference, rankings

from dpo_jax.data import rows as rows_lib

SCHEMAS = ("explicit", "conversational", "implicit", "ranked", "unpaired")
ROLES = ("system", "user", "assistant")
ASSISTANT_TAG = "\n\nAssistant:"  # Anthropic HH's turn marker; the prompt ends with the last shared one
PATH_IDS, PATH_TEXT = "ids", "text"  # how a conversational response was cut from its prompt (render_response)


# ----------------------------------------------------------------------------------------------- loading

def load_any_rows(source: str, split: str = "train", on_bad_row: str = "error") -> Any:
  """Rows of any schema from a file, folder or hub name (read as rows_lib.load_rows reads them), checked by
  detect_schema instead of requiring string prompt/chosen/rejected. Explicit rows are checked as load_rows
  checks them. With on_bad_row='skip' malformed JSON lines are dropped (counted) and bad rows are left for
  tokenize_any to skip and count."""
  path = Path(source).expanduser()
  if path.is_file():
    rows = rows_lib._read_file(path, split, on_bad_row)
  elif path.is_dir():
    rows = rows_lib._read_folder(path, split)
  elif rows_lib._looks_like_path(source):
    raise FileNotFoundError(f"{source}: no such file or folder. Pass an existing .json/.jsonl/.parquet file, a "
                            "datasets folder, or a hub dataset name like 'owner/name'.")
  else:
    rows = rows_lib._read_hub(source, split)
  if detect_schema(rows, source, on_bad_row) == "explicit":
    rows_lib.check_rows(rows, source, on_bad_row)
  return rows


# ----------------------------------------------------------------------------------------------- detecting

def records(rows: Any) -> list[dict]:
  """rows (list of dicts or datasets.Dataset) as a list of plain dicts (a Dataset is read without a format)."""
  if isinstance(rows, (list, tuple)):
    return list(rows)
  return list(rows.with_format(None))


def row_schema(row: Any, i: int = 0, source: str = "rows") -> str:
  """The schema of one row; ValueError naming the row and its fields when it fits none."""
  if not isinstance(row, dict):
    raise rows_lib.BadRow(f"{source}: row {i} is a {type(row).__name__}, not an object with 'chosen' and "
                            "'rejected' fields; write one JSON object per record.", "not_an_object")
  if "responses" in row:
    return "ranked"
  if "completion" in row and "chosen" not in row and "rejected" not in row:  # TRL's unpaired preference format
    if "label" not in row:
      raise rows_lib.BadRow(
          f"{source}: row {i} has 'completion' but no 'label' (it has {sorted(row)})."
          f"{rows_lib.misspelling('label', row)} Unpaired preference rows need \"label\": true (desirable) or false "
          "(undesirable); add it or drop the row.", "missing_field")
    return "unpaired"
  for field in ("chosen", "rejected"):
    if field in row and row[field] is None:
      raise rows_lib.BadRow(f"{source}: row {i}, field '{field}': expected a string or a list of messages, got "
                              "null (a missing value). Fill in or drop that row.", "null_value")
  missing = [f for f in ("chosen", "rejected") if f not in row]
  if missing:
    hints = "".join(rows_lib.misspelling(f, row) for f in missing)
    raise rows_lib.BadRow(
        f"{source}: row {i} has no {missing} (it has {sorted(row)}).{hints} Every schema needs 'chosen' and "
        "'rejected': rename your columns or drop the row.", "missing_field")
  chosen, rejected = row["chosen"], row["rejected"]
  if isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple)):
    return "conversational"
  if isinstance(chosen, str) and isinstance(rejected, str):
    if "prompt" not in row and rows_lib.misspelling("prompt", row):  # not HH data with an extra column
      raise rows_lib.BadRow(f"{source}: row {i} has no 'prompt' (it has {sorted(row)})."
                              f"{rows_lib.misspelling('prompt', row)}", "missing_field")
    return "explicit" if "prompt" in row else "implicit"  # a non-string prompt fails explicit's checks
  raise rows_lib.BadRow(
      f"{source}: row {i}: 'chosen' is a {type(chosen).__name__} and 'rejected' a {type(rejected).__name__}; both "
      "must be strings (explicit / implicit-prompt schema) or both lists of {'role', 'content'} messages "
      "(conversational schema). Fix that row.", "not_a_string")


def detect_schema(rows: Any, source: str = "rows", on_bad_row: str = "error") -> str:
  """"explicit" | "conversational" | "implicit" | "ranked" | "unpaired" (module docstring); every row must use the
  same one (unpaired rows, standard or conversational, are one schema; unpaired.tokenize_unpaired checks the form).

  String responses with a `prompt` field are explicit (rows_lib.check_rows then requires it to be a
  string); string responses without one are implicit (HH transcripts); message lists are conversational
  (whatever the `prompt` is). ValueError for no rows,
  a row that fits no schema, or mixed schemas (naming the first row that differs).
  With on_bad_row='skip' the first row that fits a schema decides it, and rows that fit none or another are
  left for the tokenizer to skip (counted); only data where no row fits is an error.
  """
  recs = records(rows)
  if not recs:
    raise ValueError(f"{source}: no rows; check the file or the split name.")
  bad = rows_lib.BadRows(on_bad_row, rows)
  first, first_at, first_error = None, 0, None
  for i, row in enumerate(recs):
    try:
      schema = row_schema(row, i, source)
    except rows_lib.BadRow as e:
      if not bad.skip:
        bad.handle(e, i)
      first_error = first_error or bad.locate(e, i)
      continue
    if first is None:
      first, first_at = schema, i
    elif schema != first and not bad.skip:
      bad.handle(rows_lib.BadRow(
          f"{source}: row {first_at} is {first} but row {i} is {schema} (module dpo_jax.data.schemas lists the "
          "schemas); convert the rows to one schema or split the file.", "other_schema"), i)
  if first is None:
    raise ValueError(f"{source}: no row fits any schema; the first: {first_error}")
  return first


# ------------------------------------------------------------------------------------- implicit (HH) rows

def split_transcripts(chosen: str, rejected: str, i: int = 0, source: str = "rows") -> tuple[str, str, str]:
  """(prompt, chosen_response, rejected_response) of an HH pair.

  The prompt is the longest common prefix of the two transcripts cut at the end of the last "\\n\\nAssistant:"
  in it (the marker included); the responses are the remainders (usually starting with " "). ValueError
  naming the row when the shared prefix holds no "\\n\\nAssistant:".
  """
  common = os.path.commonprefix([chosen, rejected])
  at = common.rfind(ASSISTANT_TAG)
  if at < 0:
    raise rows_lib.BadRow(
        f"{source}: row {i}: 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn marker (shared prefix "
        f"{common[:60]!r}), so the prompt cannot be found. Implicit-prompt rows must be full "
        "'\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts with a common prefix; otherwise add a 'prompt' field "
        "(explicit schema).", "no_shared_prompt")
  end = at + len(ASSISTANT_TAG)
  return chosen[:end], chosen[end:], rejected[end:]


def explicit_texts(row: Any, i: int, source: str = "rows") -> tuple[str, str, str]:
  """rows_lib.pair_texts for data detected as explicit, with a row of another schema named as such."""
  schema = row_schema(row, i, source)
  if schema != "explicit":
    raise rows_lib.BadRow(f"{source}: row {i} is {schema}, but the data is explicit (string 'prompt', 'chosen', "
                            "'rejected'); convert the rows to one schema.", "other_schema")
  return rows_lib.pair_texts(row, i, source)


def implicit_texts(row: Any, i: int, source: str = "rows") -> tuple[str, str, str]:
  """(prompt, chosen, rejected) strings of one HH row (preference.tokenize_pairs' texts_of for implicit data);
  BadRow naming the row for a row of another schema, identical transcripts or no shared prompt."""
  schema = row_schema(row, i, source)
  if schema != "implicit":
    raise rows_lib.BadRow(f"{source}: row {i} is {schema}, but the data is implicit-prompt (HH transcripts in "
                            "'chosen'/'rejected', no 'prompt'); convert the rows to one schema.", "other_schema")
  rows_lib.check_distinct(row["chosen"], row["rejected"], i, source)
  return split_transcripts(row["chosen"], row["rejected"], i, source)


def implicit_to_explicit(rows: Any, source: str = "rows") -> list[dict]:
  """HH rows -> explicit rows {"prompt", "chosen", "rejected"} (other fields kept) via split_transcripts."""
  out = []
  for i, row in enumerate(records(rows)):
    if row_schema(row, i, source) != "implicit":
      raise ValueError(f"{source}: row {i} is not an implicit-prompt row (string 'chosen'/'rejected', no "
                       "'prompt'); call to_explicit_rows, which detects the schema.")
    prompt, c, r = split_transcripts(row["chosen"], row["rejected"], i, source)
    out.append({**row, "prompt": prompt, "chosen": c, "rejected": r})
  return out


# ----------------------------------------------------------------------------------- conversational rows

def check_messages(messages: Any, i: int, field: str, source: str = "rows") -> list[dict]:
  """A validated list of messages (copies); BadRow naming the row, field and message otherwise."""
  if not isinstance(messages, (list, tuple)):
    raise rows_lib.BadRow(
        f"{source}: row {i}, field '{field}': expected a list of {{'role', 'content'}} messages, got "
        f"{type(messages).__name__}; use the same conversational format in every field.", "bad_message")
  out = []
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise rows_lib.BadRow(
          f"{source}: row {i}, field '{field}', message {k}: expected {{'role': ..., 'content': str}}, got "
          f"{str(m)[:80]!r}; fix that message.", "bad_message")
    if m.get("role") not in ROLES:
      raise rows_lib.BadRow(
          f"{source}: row {i}, field '{field}', message {k}: role {m.get('role')!r} is not one of {list(ROLES)}; "
          "rename it (e.g. 'human' -> 'user', 'gpt' -> 'assistant').", "bad_role")
    out.append({key: value for key, value in m.items() if value is not None})
  return out


def split_conversation(row: dict, i: int = 0, source: str = "rows") -> tuple[list[dict], dict, dict]:
  """(prompt_messages, chosen_message, rejected_message) of a conversational row.

  chosen and rejected each end with the final assistant turn; the messages before it must be the same in
  both. The prompt is then: a `prompt` message list + those shared messages (trl's explicit-prompt
  format); or just the shared messages when `prompt` is absent or a string duplicating them (as in
  HuggingFaceH4/ultrafeedback_binarized); a string `prompt` with no shared messages becomes one user turn.
  BadRow naming the row and field for a bad role, a last message that is not the assistant's, differing
  histories, an empty prompt or identical final answers.
  """
  schema = row_schema(row, i, source)
  if schema != "conversational":
    raise rows_lib.BadRow(f"{source}: row {i} is {schema}, but the data is conversational (message lists); "
                            "convert the rows to one schema.", "other_schema")
  chosen = check_messages(row["chosen"], i, "chosen", source)
  rejected = check_messages(row["rejected"], i, "rejected", source)
  for field, messages in (("chosen", chosen), ("rejected", rejected)):
    check_final_assistant(messages, i, field, source)
  if chosen[:-1] != rejected[:-1]:
    raise rows_lib.BadRow(
        f"{source}: row {i}: 'chosen' and 'rejected' differ before their final assistant turn; a pair must share "
        "its history. Move the shared turns into 'prompt' and keep only the final assistant message in each.",
        "histories_differ")
  history = conversation_history(row.get("prompt"), chosen[:-1], i, source)
  rows_lib.check_distinct(chosen[-1]["content"], rejected[-1]["content"], i, source)
  return history, chosen[-1], rejected[-1]


def check_final_assistant(messages: list[dict], i: int, field: str, source: str = "rows") -> None:
  """BadRow naming the row and field unless `messages` ends with the assistant's turn (the scored response)."""
  if not messages or messages[-1]["role"] != "assistant":
    last = messages[-1]["role"] if messages else "nothing (empty list)"
    raise rows_lib.BadRow(
        f"{source}: row {i}, field '{field}': the last message must be the assistant's response, found "
        f"{last!r}. End '{field}' with {{'role': 'assistant', 'content': ...}}; put the conversation so far in "
        "'prompt'.", "bad_role")


def conversation_history(prompt: Any, shared: list[dict], i: int, source: str = "rows") -> list[dict]:
  """The prompt messages before a final assistant turn: a `prompt` message list + the `shared` messages that
  precede that turn in the response field; or just `shared` when `prompt` is absent or a string duplicating them;
  a string `prompt` with no shared messages becomes one user turn. BadRow for an empty history or one that
  ends with the assistant."""
  if isinstance(prompt, (list, tuple)):
    history = check_messages(prompt, i, "prompt", source) + shared
  elif isinstance(prompt, str) and not shared:
    history = [{"role": "user", "content": prompt}]
  elif prompt is None or isinstance(prompt, str):
    history = shared
  else:
    raise rows_lib.BadRow(f"{source}: row {i}, field 'prompt': expected a list of messages or a string, got "
                            f"{type(prompt).__name__}; fix or drop that field.", "bad_message")
  if not history:
    raise rows_lib.BadRow(
        f"{source}: row {i}: no prompt messages before the final assistant turn; the response needs a context. "
        "Add a 'prompt' list (e.g. [{'role': 'user', 'content': ...}]) or drop the row.", "empty_prompt")
  if history[-1]["role"] == "assistant":
    raise rows_lib.BadRow(
        f"{source}: row {i}: the prompt ends with an assistant message, so the final assistant turn does not "
        "answer anything. End the prompt with a user (or system) message.", "bad_role")
  return history


def check_chat_template(tokenizer: Any) -> None:
  """ValueError unless the tokenizer has a chat template (conversational rows are rendered with it)."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template, which "
                     "conversational rows need. Set one (tokenizer.chat_template = '<jinja template>', or load "
                     "an instruct model's tokenizer), or render the messages to text and use the explicit schema.")


def _template_ids(tokenizer: Any, messages: list[dict], **kwargs) -> list[int]:
  """apply_chat_template token ids as a list, whether the installed transformers returns a list or a dict."""
  out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
  if hasattr(out, "keys"):
    out = out["input_ids"]
  return [int(t) for t in out]


def render_prompt(tokenizer: Any, history: list[dict]) -> list[int]:
  """Prompt ids: apply_chat_template(history, tokenize=True, add_generation_prompt=True)."""
  return _template_ids(tokenizer, history, add_generation_prompt=True)


def render_response(tokenizer: Any, history: list[dict], prompt_ids: list[int], message: dict, i: int = 0,
                    field: str = "chosen", source: str = "rows") -> tuple[list[int], str]:
  """(response_ids, path): the tokens the template renders for the final assistant `message` after `history`.

  PATH_IDS: the full conversation ids apply_chat_template(history + [message]) start with `prompt_ids`, so
  the response is the rest (prompt + response == the full rendering, exactly).
  PATH_TEXT (fallback): tokenizing the full text merged tokens across the boundary, so the ids do not start
  with the prompt ids. The full TEXT must start with the prompt text; the response text after it is tokenized
  on its own (add_special_tokens=False). prompt + response then differs from the joint tokenization only at
  the boundary, and the prompt ids stay those of the generation prompt.
  ValueError naming the row when even the text does not start with the prompt's rendering.
  """
  full_ids = _template_ids(tokenizer, history + [message])
  if full_ids[:len(prompt_ids)] == prompt_ids:
    return full_ids[len(prompt_ids):], PATH_IDS
  prompt_text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
  full_text = tokenizer.apply_chat_template(history + [message], tokenize=False)
  if not full_text.startswith(prompt_text):
    raise ValueError(f"{source}: row {i}, field '{field}': the chat template renders the conversation "
                     f"({full_text[:80]!r}...) so that it does not start with the prompt's rendering with the "
                     f"generation prompt ({prompt_text[-80:]!r}); the response cannot be cut from it. Use a "
                     "template whose add_generation_prompt text is a prefix of the rendered assistant turn.")
  return tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"], PATH_TEXT


def conversational_to_explicit(rows: Any, tokenizer: Any, source: str = "rows") -> list[dict]:
  """Conversational rows -> explicit TEXT rows via the chat template (other fields kept).

  prompt = the history rendered with the generation prompt; chosen / rejected = the full text after it
  (end-of-turn included). For inspection or for text-only tools: preference.tokenize_pairs on these rows
  re-tokenizes the texts and appends another EOS; to train, use tokenize_any (exact ids).
  """
  check_chat_template(tokenizer)
  out = []
  for i, row in enumerate(records(rows)):
    history, chosen, rejected = split_conversation(row, i, source)
    prompt_text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    texts = {}
    for field, message in (("chosen", chosen), ("rejected", rejected)):
      full = tokenizer.apply_chat_template(history + [message], tokenize=False)
      if not full.startswith(prompt_text):
        raise ValueError(f"{source}: row {i}, field '{field}': the rendered conversation does not start with the "
                         "rendered prompt; use a template whose generation prompt is a prefix of the assistant turn.")
      texts[field] = full[len(prompt_text):]
    out.append({**row, "prompt": prompt_text, **texts})
  return out


def to_explicit_rows(rows: Any, tokenizer: Any = None, source: str = "rows") -> list[dict]:
  """Rows of any schema -> explicit text rows {"prompt", "chosen", "rejected"} (other fields kept).

  Conversational rows need `tokenizer` (its chat template renders them; see conversational_to_explicit).
  """
  schema = detect_schema(rows, source)
  if schema == "explicit":
    rows_lib.check_rows(rows, source)
    return records(rows)
  if schema == "implicit":
    return implicit_to_explicit(rows, source)
  if tokenizer is None:
    raise ValueError(f"{source}: conversational rows are rendered with a chat template; pass tokenizer= (one "
                     "with a chat_template).")
  return conversational_to_explicit(rows, tokenizer, source)


# ------------------------------------------------------------------------------------------------ tokenizing

def tokenize_conversational(rows: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int,
                            source: str = "rows", reference_logps: bool = False, on_bad_row: str = "error"
                            ) -> tuple[preference.TokenizedPairs, dict]:
  """Conversational rows -> (TokenizedPairs, stats) with ids cut from the chat template's rendering.

  prompt_ids = render_prompt(history); each response = render_response (the final assistant turn through
  the template's end-of-turn), plus EOS only when that has no EOS token. Truncation and drops as in
  preference.tokenize_pairs: the prompt keeps its last max_prompt_length tokens, each response its first
  max_length - prompt_len; a pair whose chosen or rejected content is "" is dropped and counted; bad rows
  (rows_lib.BadRow) raise or, with on_bad_row='skip', are counted in stats["skipped"].
  stats: tokenize_pairs' keys plus num_text_split, the pairs where render_response took the text fallback.
  reference_logps=True keeps the rows' ref_chosen_logps / ref_rejected_logps, as in tokenize_pairs.
  """
  preference.check_lengths(max_length, max_prompt_length)
  check_chat_template(tokenizer)
  pad_id, eos_id = preference.special_ids(tokenizer)
  bad = rows_lib.BadRows(on_bad_row, rows)
  recs = records(rows)
  if not recs:
    raise ValueError(f"{source}: no rows to tokenize.")

  prompts, chosens, rejecteds, row_ids, refs = [], [], [], [], []
  dropped = prompt_cut = response_cut = any_cut = text_split = 0
  for i, row in enumerate(recs):
    try:
      history, chosen, rejected = split_conversation(row, i, source)
      ref = rows_lib.reference_pair(row, i, source) if reference_logps else None
    except rows_lib.BadRow as e:
      bad.handle(e, i)
      continue
    if chosen["content"] == "" or rejected["content"] == "":
      dropped += 1
      continue
    prompt = render_prompt(tokenizer, history)
    if not prompt:
      raise ValueError(f"{source}: row {i}: the chat template renders the prompt as 0 tokens; the first response "
                       "token needs a context. Check the template.")
    responses, paths = [], []
    for field, message in (("chosen", chosen), ("rejected", rejected)):
      ids, path = render_response(tokenizer, history, prompt, message, i, field, source)
      responses.append(ids if eos_id in ids else ids + [eos_id])
      paths.append(path)
    text_split += PATH_TEXT in paths
    kept_prompt = prompt[-max_prompt_length:]
    budget = max_length - len(kept_prompt)
    p_cut = len(prompt) > len(kept_prompt)
    r_cut = any(len(r) > budget for r in responses)
    prompt_cut, response_cut, any_cut = prompt_cut + p_cut, response_cut + r_cut, any_cut + (p_cut or r_cut)
    prompts.append(np.asarray(kept_prompt, np.int32))
    chosens.append(np.asarray(responses[0][:budget], np.int32))
    rejecteds.append(np.asarray(responses[1][:budget], np.int32))
    row_ids.append(i)
    refs.append(ref)

  reference = np.asarray(refs, np.float64).reshape(-1, 2) if reference_logps else None
  tokenized = preference.TokenizedPairs(tuple(prompts), tuple(chosens), tuple(rejecteds),
                                        np.asarray(row_ids, np.int32), max_length=int(max_length),
                                        pad_id=int(pad_id), eos_id=int(eos_id), reference_logps=reference)
  stats = dict(num_rows=len(recs), num_pairs=len(row_ids), num_dropped_empty_response=dropped,
               num_truncated=any_cut, num_prompt_truncated=prompt_cut, num_response_truncated=response_cut,
               skipped=bad.stats(), num_text_split=text_split)
  return tokenized, stats


def tokenize_any(rows: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int, source: str = "rows",
                 reference_logps: bool = False, on_bad_row: str = "error") -> tuple[preference.TokenizedPairs, dict]:
  """Rows of any schema -> (TokenizedPairs, stats), stats["schema"] naming the detected schema.

  explicit: preference.tokenize_pairs as is; implicit: tokenize_pairs with split_transcripts' texts;
  conversational: tokenize_conversational (chat template, exact ids). reference_logps as in tokenize_pairs;
  on_bad_row='skip' drops bad rows, counted by reason in stats["skipped"] (else the first one is an error).
  Unpaired rows are a ValueError: a pair loss has no pairs to compare (unpaired.tokenize_unpaired takes them).
  """
  schema = detect_schema(rows, source, on_bad_row)
  kw = dict(max_length=max_length, max_prompt_length=max_prompt_length, source=source, on_bad_row=on_bad_row)
  if schema == "unpaired":
    raise ValueError(f"{source}: unpaired rows (prompt, completion, label) train only with an unpaired loss "
                     "(--config.loss.type=kto); tokenize them with dpo_jax.data.unpaired.tokenize_unpaired, or "
                     "write the data as (prompt, chosen, rejected) pairs.")
  if schema == "ranked":
    if reference_logps:
      raise ValueError(f"{source}: precomputed reference log-probs are for pair data; ranked data runs pi_ref.")
    tokenized, stats = rankings.tokenize_rankings(rows, tokenizer, **kw)
  elif schema == "conversational":
    tokenized, stats = tokenize_conversational(rows, tokenizer, reference_logps=reference_logps, **kw)
  else:
    texts_of = implicit_texts if schema == "implicit" else explicit_texts
    tokenized, stats = preference.tokenize_pairs(rows, tokenizer, reference_logps=reference_logps,
                                                 texts_of=texts_of, **kw)
  return tokenized, {**stats, "schema": schema}
