"""Unpaired preference data (TRL's KTO format): one completion per row, labelled desirable or undesirable.

  standard        {"prompt": str, "completion": str, "label": bool}
  conversational  {"prompt": [messages], "completion": [messages], "label": bool}  (trl-lib/kto-mix-14k), rendered
                  with the tokenizer's chat template as conversational pairs are (schemas.render_response)

Pipeline:  schemas.load_any_rows(source) -> tokenize_unpaired(rows, tokenizer, ...) -> preference.iterate_batches /
           eval_batches -> dict, exactly as for pairs (schemas.tokenize_any refuses unpaired rows)

Layout. Unpaired data is a `preference.TokenizedPairs`, so every batch layout (interleaved rows, shared prompts,
the sequence axis, packing, LoRA, a reference cache per unit) serves it unchanged. Unit k::

  prompt_ids[k]    row k's prompt (left-truncated to max_prompt_length, as for pairs)
  chosen_ids[k]    row k's completion + EOS, truncated to max_length - prompt_len: the response the label is about
  rejected_ids[k]  row k's KL completion: row kl_partner[k]'s completion + EOS under THIS prompt, truncated to the
                   same max_length - prompt_len
  labels[k]        True = desirable; preference.make_batch emits it as `desirable` `[B]` int32 (0 on padding)
  row_ids[k]       the source row (a pair split in two gives both its units the pair's row)

KL reference point. KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7) compares each reward with
z_0 = KL(pi_theta(y'|x) || pi_ref(y'|x)), estimated from the policy/reference log-ratio of completions y' that were
NOT written for x. TRL's KTOTrainer builds y' by rotating the completions by one within each batch of its sequential
sampler, so a batch's KL completions are that batch's own completions. Here the partner is fixed per row when the
data is tokenized (`kl_partners`, a seeded derangement): the reference's KL log-probs are then a property of the
row, so they can be precomputed or cached like any response's, and any sampler order works. The estimator only
needs mismatched (x, y') pairs, which a derangement guarantees (no row gets its own completion); the price is that a
batch's KL completions are generally other rows' completions, not the batch's own.

Labels. Only booleans (JSON true/false, numpy bool) are labels, as TRL requires (its trainer uses them as boolean
masks); an int 0/1, a string or null is a BadRow ('bad_label') naming the row and field, not guessed at: a 0/1 or
1-10 column may be a class id or a score.

Pairs for an unpaired loss are split as TRL's unpair_preference_dataset does: each pair becomes (prompt, chosen,
True) and (prompt, rejected, False). They are checked as pairs first (chosen == rejected, differing chat histories
and the like are BadRows of the pair), then tokenized as unpaired rows.

numpy only: no jax, no model code.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from dpo_jax.data import preference, rows as rows_lib, schemas

LABEL = "label"
KL_STREAM = (0x4B4C, 1)  # appended to the seed: the KL partners' random stream, apart from epoch_order's (seed, epoch)
WEIGHT_RANGE = (1.0, 4.0 / 3.0)  # KTO paper eq. 8: desirable_weight n_D / (undesirable_weight n_U) in this range


class Example(NamedTuple):
  """One unpaired example before tokenizing: `prompt` a string (standard) or the history's messages
  (conversational); `completion` a string or the final assistant message."""
  prompt: Any
  completion: Any
  label: bool
  conversational: bool


def row_label(row: dict, i: int, source: str = "rows") -> bool:
  """The row's `label` as a bool; BadRow ('bad_label', or 'missing_field') naming the row and field otherwise."""
  if LABEL not in row:
    raise rows_lib.BadRow(f"{source}: row {i} has no field 'label' (it has {sorted(row)}); unpaired rows need "
                          "\"label\": true (desirable) or false (undesirable). Add it or drop the row.",
                          "missing_field")
  value = row[LABEL]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise rows_lib.BadRow(
      f"{source}: row {i}, field 'label': expected true or false (a JSON boolean, as TRL's unpaired format), got "
      f"{'null' if value is None else type(value).__name__ + ' ' + repr(value)[:40]}. Write it as a boolean (pandas: "
      "df['label'] = df['label'] == 1 when 1 marks desirable), or drop the row.", "bad_label")


def unpaired_example(row: Any, i: int, source: str = "rows") -> Example:
  """The Example of one unpaired row; BadRow naming the row and field for another schema, a bad label, a
  non-string standard field, or conversational messages that are not a prompt then a final assistant turn
  (schemas.conversation_history's rules: a missing `prompt` is the completion's messages before that turn)."""
  schema = schemas.row_schema(row, i, source)
  if schema != "unpaired":
    raise rows_lib.BadRow(f"{source}: row {i} is {schema}, but the data is unpaired ('prompt', 'completion', "
                          "'label'); convert the rows to one schema.", "other_schema")
  label = row_label(row, i, source)
  prompt, completion = row.get("prompt"), row["completion"]
  if isinstance(completion, str):
    if not isinstance(prompt, str):
      what = "is missing" if "prompt" not in row else f"is a {type(prompt).__name__}"
      raise rows_lib.BadRow(f"{source}: row {i}, field 'prompt' {what}; a string 'completion' needs a string "
                            "'prompt' (or make both message lists).", "missing_field" if "prompt" not in row
                            else "not_a_string")
    return Example(prompt, completion, label, False)
  if isinstance(completion, (list, tuple)):
    messages = schemas.check_messages(completion, i, "completion", source)
    schemas.check_final_assistant(messages, i, "completion", source)
    history = schemas.conversation_history(prompt, messages[:-1], i, source)
    return Example(history, messages[-1], label, True)
  raise rows_lib.BadRow(f"{source}: row {i}, field 'completion': expected a string or a list of messages, got "
                        f"{'null' if completion is None else type(completion).__name__}. Fix or drop that row.",
                        "null_value" if completion is None else "not_a_string")


def paired_examples(row: Any, i: int, schema: str, source: str = "rows") -> tuple[Example, Example]:
  """A pair of `schema` ('explicit', 'implicit' or 'conversational') split as TRL's unpair_preference_dataset:
  (prompt, chosen, True), (prompt, rejected, False); the pair's own checks apply first (BadRow)."""
  if schema == "conversational":
    history, chosen, rejected = schemas.split_conversation(row, i, source)
    return Example(history, chosen, True, True), Example(history, rejected, False, True)
  texts_of = schemas.implicit_texts if schema == "implicit" else schemas.explicit_texts
  prompt, chosen, rejected = texts_of(row, i, source)
  return Example(prompt, chosen, True, False), Example(prompt, rejected, False, False)


def unpair_rows(rows: Any, source: str = "rows") -> list[dict]:
  """Pairs of any pair schema -> unpaired rows {"prompt", "completion", "label"} (TRL's unpair_preference_dataset:
  pair i gives rows 2i (chosen, True) and 2i + 1 (rejected, False), other columns copied to both). Conversational
  pairs keep message lists (prompt = the history, completion = [the final assistant message]); implicit (HH) rows
  become text split at the last shared "\\n\\nAssistant:". For inspection or export: tokenize_unpaired splits pairs
  itself, naming source rows in its errors."""
  schema = schemas.detect_schema(rows, source)
  if schema in ("ranked", "unpaired"):
    raise ValueError(f"{source}: the rows are {schema}, not pairs; unpair_rows splits (prompt, chosen, rejected) rows.")
  out = []
  for i, row in enumerate(schemas.records(rows)):
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    for ex in paired_examples(row, i, schema, source):
      completion = [ex.completion] if ex.conversational else ex.completion
      out.append({**extra, "prompt": ex.prompt, "completion": completion, LABEL: ex.label})
  return out


def kl_partners(n: int, seed: int) -> np.ndarray:
  """`[n]` int64: unit k's KL completion is unit partner[k]'s completion, partner[k] != k.

  A seeded derangement: a permutation `perm` of range(n) (seed + KL_STREAM), then each unit in it takes the next
  one's completion, cyclically (partner[perm[j]] = perm[j + 1 mod n]). Every completion is some unit's KL
  completion exactly once. A pure function of (n, seed); ValueError for n < 2 (no other row to borrow from).
  """
  if n < 2:
    raise ValueError(f"{n} unpaired row(s): the KL reference point pairs each prompt with another row's completion, "
                     "so at least 2 usable rows are needed; add data.")
  if seed < 0:
    raise ValueError(f"kl_partners: seed={seed} must be >= 0 (config.seed).")
  perm = np.random.default_rng([seed, *KL_STREAM]).permutation(n)
  partners = np.empty(n, np.int64)
  partners[perm] = np.roll(perm, -1)
  return partners


def tokenize_unpaired(rows: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int, seed: int = 0,
                      source: str = "rows", on_bad_row: str = "error", reference_logps: bool = False,
                      schema: str | None = None) -> tuple[preference.TokenizedPairs, dict]:
  """Unpaired rows, or pairs split in two, -> (TokenizedPairs with labels and KL completions, stats).

  Standard texts are tokenized separately (add_special_tokens=False) and EOS appended, as preference.tokenize_pairs
  does; conversational examples are cut from the chat template's rendering (schemas.render_prompt /
  render_response; EOS appended only when the turn has none). Every unit's completion + EOS is kept whole until its
  KL partner (`kl_partners(n, seed)`) is known, then both are cut to max_length - prompt_len, so a KL completion is
  its partner's completion as far as this prompt leaves room. `schema` is detect_schema's answer when known.
  All rows must have one form (standard or conversational). A unit with an empty completion is dropped (counted);
  bad rows raise or, with on_bad_row='skip', are counted in stats["skipped"] (a bad pair counts once).

  stats: preference.tokenize_pairs' keys (num_pairs = units kept) plus num_desirable, num_undesirable,
  num_kl_truncated (KL completions cut by the budget), num_kl_same_prompt (units whose KL partner has the same
  prompt tokens: two completions of one prompt, or a pair's two halves; the KL estimate then sees a matched pair),
  num_text_split (conversational: render_response's text fallback), schema='unpaired', source_schema.
  """
  if reference_logps:
    raise ValueError(f"{source}: config.data.reference_logps=True reads per-pair ref_chosen_logps / ref_rejected_logps "
                     "columns; unpaired units need the reference's log-probs of (completion, KL completion), so run "
                     "pi_ref in the step: set --config.data.reference_logps=False.")
  preference.check_lengths(max_length, max_prompt_length)
  pad_id, eos_id = preference.special_ids(tokenizer)
  schema = schema or schemas.detect_schema(rows, source, on_bad_row)
  if schema == "ranked":
    raise ValueError(f"{source}: ranked rows (K responses per prompt) cannot be unpaired; use --config.loss.type="
                     "plackett_luce, or write the data as pairs or as unpaired rows.")
  bad = rows_lib.BadRows(on_bad_row, rows)
  recs = rows_lib.records(rows)
  if not recs:
    raise ValueError(f"{source}: no rows to tokenize.")

  examples, sources = [], []  # one per unit, and the source row it came from
  form = None  # (conversational?, first row of that form)
  for i, row in enumerate(recs):
    try:
      found = (unpaired_example(row, i, source),) if schema == "unpaired" else paired_examples(row, i, schema, source)
      if form is None:
        form = (found[0].conversational, i)
      elif found[0].conversational != form[0]:
        raise rows_lib.BadRow(f"{source}: row {form[1]} is {_form(form[0])} but row {i} is {_form(not form[0])}; "
                              "use message lists in every row or strings in every row.", "other_schema")
    except rows_lib.BadRow as e:
      bad.handle(e, i)
      continue
    examples += found
    sources += [i] * len(found)
  conversational = bool(form and form[0])
  if conversational:
    schemas.check_chat_template(tokenizer)
    prompt_ids, completion_ids, text_split = _render(examples, sources, tokenizer, eos_id, source)
  else:  # a completion whose text gives no tokens is dropped below, as tokenize_pairs drops an empty response
    prompt_ids, text_split = _texts_ids(tokenizer, [ex.prompt for ex in examples]), 0
    completion_ids = [ids + [eos_id] if ids else []
                      for ids in _texts_ids(tokenizer, [ex.completion for ex in examples])]

  keep, dropped, empty_prompt_rows = [], 0, set()
  for k, (i, prompt) in enumerate(zip(sources, prompt_ids)):
    if not prompt:
      if i not in empty_prompt_rows:  # a split pair's two units share the prompt: one BadRow for the row
        empty_prompt_rows.add(i)
        bad.handle(rows_lib.BadRow(
            f"{source}: row {i}, field 'prompt' is empty (0 tokens); the first completion token needs a context to "
            "be scored. Give the row a prompt (even a fixed one like 'Answer:') or drop it.", "empty_prompt"), i)
      continue
    if not completion_ids[k]:
      dropped += 1
      continue
    keep.append(k)

  partners = kl_partners(len(keep), seed) if keep else np.zeros(0, np.int64)
  prompts, chosens, kls = [], [], []
  prompt_cut = response_cut = kl_cut = any_cut = same_prompt = 0
  for j, k in enumerate(keep):
    prompt = prompt_ids[k]
    kept_prompt = prompt[-max_prompt_length:]
    budget = max_length - len(kept_prompt)
    completion, kl = completion_ids[k], completion_ids[keep[partners[j]]]
    p_cut, r_cut, k_cut = len(prompt) > len(kept_prompt), len(completion) > budget, len(kl) > budget
    prompt_cut, response_cut, kl_cut = prompt_cut + p_cut, response_cut + r_cut, kl_cut + k_cut
    any_cut += p_cut or r_cut or k_cut
    same_prompt += prompt_ids[keep[partners[j]]][-max_prompt_length:] == kept_prompt
    prompts.append(np.asarray(kept_prompt, np.int32))
    chosens.append(np.asarray(completion[:budget], np.int32))
    kls.append(np.asarray(kl[:budget], np.int32))

  labels = np.asarray([examples[k].label for k in keep], bool)
  tokenized = preference.TokenizedPairs(tuple(prompts), tuple(chosens), tuple(kls),
                                        np.asarray([sources[k] for k in keep], np.int32), max_length=int(max_length),
                                        pad_id=int(pad_id), eos_id=int(eos_id), labels=labels)
  stats = dict(num_rows=len(recs), num_pairs=len(keep), num_dropped_empty_response=dropped, num_truncated=any_cut,
               num_prompt_truncated=prompt_cut, num_response_truncated=response_cut, num_kl_truncated=kl_cut,
               num_kl_same_prompt=same_prompt, num_desirable=int(labels.sum()),
               num_undesirable=int(len(labels) - labels.sum()), skipped=bad.stats(), num_text_split=text_split,
               conversational=conversational, schema="unpaired", source_schema=schema)
  return tokenized, stats


def _form(conversational: bool) -> str:
  return "conversational (message lists)" if conversational else "standard (strings)"


def _texts_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text on its own (add_special_tokens=False), as preference.tokenize_pairs tokenizes."""
  return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def _render(examples: Sequence[Example], sources: Sequence[int], tokenizer: Any, eos_id: int,
            source: str) -> tuple[list[list[int]], list[list[int]], int]:
  """(prompt ids, completion ids + EOS unless the turn has one ([] for an empty content), text-fallback count) of
  conversational examples, cut from the chat template's rendering as schemas.tokenize_conversational cuts pairs."""
  prompts, completions, text_split, history, prompt = [], [], 0, None, []
  for ex, i in zip(examples, sources):
    if ex.prompt is not history:  # a split pair's two units share one history object: rendered once
      history, prompt = ex.prompt, schemas.render_prompt(tokenizer, ex.prompt)
    prompts.append(prompt)
    if ex.completion["content"] == "" or not prompt:
      completions.append([])
      continue
    ids, path = schemas.render_response(tokenizer, ex.prompt, prompt, ex.completion, i, "completion", source)
    text_split += path == schemas.PATH_TEXT
    completions.append(ids if eos_id in ids else ids + [eos_id])
  return prompts, completions, text_split


def weight_balance(num_desirable: int, num_undesirable: int, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0, field: str = "config.loss") -> tuple[float | None, str]:
  """(ratio, warning): ratio = desirable_weight n_D / (undesirable_weight n_U), which the KTO paper (eq. 8) and
  TRL's KTOTrainer recommend keeping in [1, 4/3]; warning is '' inside that range, else one line naming
  `field`.desirable_weight / undesirable_weight and the ranges that would bring it back. A class with no rows
  gives ratio None and a warning saying which."""
  lo, hi = WEIGHT_RANGE
  if num_desirable == 0 or num_undesirable == 0:
    missing = "desirable" if num_desirable == 0 else "undesirable"
    return None, (f"WARNING: no {missing} rows ({num_desirable} desirable, {num_undesirable} undesirable): KTO's "
                   f"{missing} term never fires; add {missing} examples (label {missing == 'desirable'}).")
  ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
  if lo <= ratio <= hi + 1e-12:
    return ratio, ""
  d_lo = undesirable_weight * num_undesirable / num_desirable
  u_hi = desirable_weight * num_desirable / num_undesirable
  return ratio, (f"WARNING: {field}.desirable_weight * {num_desirable} desirable / ({field}.undesirable_weight * "
                 f"{num_undesirable} undesirable) = {desirable_weight:g} * {num_desirable} / ({undesirable_weight:g} "
                 f"* {num_undesirable}) = {ratio:.3f}, outside the recommended [1, 4/3] (KTO paper eq. 8, as TRL "
                 f"checks): set {field}.desirable_weight in [{d_lo:.3g}, {d_lo * hi:.3g}] or "
                 f"{field}.undesirable_weight in [{u_hi / hi:.3g}, {u_hi:.3g}].")
