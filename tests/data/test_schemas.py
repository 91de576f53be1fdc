"""The public preference schemas: detection, HH prompt splitting, chat-template tokenization (exact ids and
the text fallback), errors, truncation and drops."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpo_jax.data import preference, schemas
from paths import FIXTURES_DIR, REPO_ROOT

FIXTURES = Path(FIXTURES_DIR)
SPECIAL = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<eos>"]
# "<|role|>\ncontent<|end|>\n" per message; the end-of-turn token <|end|> is the tokenizer's EOS.
ROLE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# The assistant's content follows "Bot:" with no separator: without a regex pre-tokenizer BPE merges across it.
MERGING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}Bot:{{ m['content'] }}<|end|>"
                    "{% else %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}Bot:{% endif %}")


def read_jsonl(name):
  return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def all_text(rows):
  out = []
  for row in rows:
    for value in row.values():
      if isinstance(value, str):
        out.append(value)
      elif isinstance(value, list):
        out += [m["content"] for m in value]
  return out


def byte_bpe(texts, *, use_regex=True, eos="<|end|>", template=ROLE_TEMPLATE):
  """A byte-level BPE trained on `texts` (every byte encodable), with pad, EOS and a chat template."""
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token=eos)
  tok.chat_template = template
  return tok


@pytest.fixture(scope="module")
def rows():
  return {name: read_jsonl(f"{name}.jsonl") for name in ("explicit", "conversational", "hh")}


@pytest.fixture(scope="module")
def tok(rows):
  return byte_bpe([t for r in rows.values() for t in all_text(r)] * 3)


@pytest.fixture(scope="module")
def merging_tok():
  return byte_bpe(["User: hi\nBot:Sure thing"] * 20, use_regex=False, template=MERGING_TEMPLATE)


def ids_of(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def template_ids(tok, messages, **kw):
  return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def msg(role, content):
  return {"role": role, "content": content}


def conv_row(prompt_text="Hi?", chosen="Yes.", rejected="No."):
  return {"prompt": [msg("user", prompt_text)], "chosen": [msg("assistant", chosen)],
          "rejected": [msg("assistant", rejected)]}


def expected_history(row):
  """The prompt messages the fixture rows mean (spelled out independently of split_conversation)."""
  if isinstance(row.get("prompt"), list):
    return row["prompt"] + row["chosen"][:-1]
  return row["chosen"][:-1]


# ------------------------------------------------------------------------------------------------ detection

def test_schemas_module_imports_neither_jax_nor_model_code():
  code = ("import sys; import dpo_jax.data.schemas; print(sorted(m for m in sys.modules if m == 'jax' or "
          "m.startswith(('jax.', 'flax', 'dpo_jax.model'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(REPO_ROOT))
  assert out.stdout.strip() == "[]"


def test_detect_schema_of_each_fixture(rows):
  assert schemas.detect_schema(rows["explicit"]) == "explicit"
  assert schemas.detect_schema(rows["conversational"]) == "conversational"
  assert schemas.detect_schema(rows["hh"]) == "implicit"
  for name, schema in (("explicit", "explicit"), ("conversational", "conversational"), ("hh", "implicit")):
    assert schemas.detect_schema(schemas.load_any_rows(str(FIXTURES / f"{name}.jsonl"))) == schema


def test_detect_schema_of_a_datasets_dataset(rows):
  datasets = pytest.importorskip("datasets")
  assert schemas.detect_schema(datasets.Dataset.from_list(rows["hh"])) == "implicit"
  assert schemas.detect_schema(datasets.Dataset.from_list(rows["conversational"][:2])) == "conversational"


def test_detect_schema_errors_name_the_row(rows):
  with pytest.raises(ValueError, match=r"row 0 is explicit but row 1 is implicit"):
    schemas.detect_schema([rows["explicit"][0], rows["hh"][0]], "mix.jsonl")
  with pytest.raises(ValueError, match=r"row 1: 'chosen' is a str and 'rejected' a list"):
    schemas.detect_schema([rows["explicit"][0], dict(prompt="p", chosen="a", rejected=[msg("assistant", "b")])])
  with pytest.raises(ValueError, match=r"row 0 has no \['rejected'\]"):
    schemas.detect_schema([dict(prompt="p", chosen="a")])
  # String responses with a message-list prompt are explicit rows, and the explicit checks reject the prompt.
  listed = [dict(prompt=[msg("user", "p")], chosen="a", rejected="b")]
  assert schemas.detect_schema(listed) == "explicit"
  with pytest.raises(ValueError, match=r"row 0, field 'prompt': expected a string.*apply_chat_template"):
    schemas.to_explicit_rows(listed)
  with pytest.raises(ValueError, match="no rows"):
    schemas.detect_schema([])


# ----------------------------------------------------------------------------------------- implicit (HH)

def test_hh_prompt_is_the_common_prefix_through_the_last_shared_assistant_marker(rows):
  for i, row in enumerate(rows["hh"]):
    prompt, chosen, rejected = schemas.split_transcripts(row["chosen"], row["rejected"], i)
    assert prompt.endswith("\n\nAssistant:")
    assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"]
    assert "\n\nAssistant:" not in os.path.commonprefix([chosen, rejected])  # no later shared marker
  multi = rows["hh"][1]
  prompt, chosen, rejected = schemas.split_transcripts(multi["chosen"], multi["rejected"])
  assert prompt == ("\n\nHuman: How do I bake bread?\n\nAssistant: Do you want a simple recipe?\n\nHuman: Yes, "
                    "please.\n\nAssistant:")
  assert (chosen, rejected) == (" Mix flour, water, yeast and salt, let it rise, then bake it at 220 C.",
                                " Buy some at the store.")
  # Shared words after the last marker stay in the responses: the cut is at the marker, not the divergence.
  shared = rows["hh"][3]
  assert schemas.split_transcripts(shared["chosen"], shared["rejected"]) == (
      "\n\nHuman: Is the sun a star?\n\nAssistant:", " Yes, the sun is a star.", " Yes, it is a planet.")


def test_hh_marker_must_be_complete_in_the_shared_prefix():
  # The transcripts diverge in the second human turn: the first (only shared) marker is the cut.
  chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
  rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y"
  assert schemas.split_transcripts(chosen, rejected) == (
      "\n\nHuman: a\n\nAssistant:", " b\n\nHuman: c\n\nAssistant: d", " b\n\nHuman: x\n\nAssistant: y")


def test_hh_without_a_shared_assistant_marker_is_an_error_naming_the_row(rows, tok):
  bad = rows["hh"][:1] + [dict(chosen="\n\nHuman: hi\n\nAssistant: hello", rejected="\n\nHuman: yo")]
  with pytest.raises(ValueError, match=r"hh\.jsonl: row 1: 'chosen' and 'rejected' share no"):
    schemas.tokenize_any(bad, tok, max_length=64, max_prompt_length=32, source="hh.jsonl")


def test_implicit_rows_tokenize_as_their_explicit_split(rows, tok):
  tp, stats = schemas.tokenize_any(rows["hh"], tok, max_length=128, max_prompt_length=64)
  explicit = schemas.to_explicit_rows(rows["hh"])
  assert [r["prompt"] for r in explicit] == [schemas.split_transcripts(r["chosen"], r["rejected"])[0]
                                             for r in rows["hh"]]
  ref, ref_stats = preference.tokenize_pairs(explicit, tok, max_length=128, max_prompt_length=64)
  assert stats == {**ref_stats, "schema": "implicit"} and stats["num_pairs"] == len(rows["hh"])
  for k in range(tp.num_pairs):
    assert tp.prompt_ids[k].tolist() == ref.prompt_ids[k].tolist() == ids_of(tok, explicit[k]["prompt"])
    assert tp.chosen_ids[k].tolist() == ids_of(tok, explicit[k]["chosen"]) + [tok.eos_token_id]
    assert tp.rejected_ids[k].tolist() == ref.rejected_ids[k].tolist()


def test_explicit_rows_go_through_tokenize_pairs_unchanged(rows, tok):
  tp, stats = schemas.tokenize_any(rows["explicit"], tok, max_length=64, max_prompt_length=16)
  ref, ref_stats = preference.tokenize_pairs(rows["explicit"], tok, max_length=64, max_prompt_length=16)
  assert stats == {**ref_stats, "schema": "explicit"}
  for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
    assert [a.tolist() for a in getattr(tp, field)] == [a.tolist() for a in getattr(ref, field)]
  assert schemas.to_explicit_rows(rows["explicit"]) == rows["explicit"]


# --------------------------------------------------------------------------------------- conversational

def test_conversational_ids_are_the_chat_template_rendering(rows, tok):
  conv = rows["conversational"]
  tp, stats = schemas.tokenize_any(conv, tok, max_length=256, max_prompt_length=128, source="conv.jsonl")
  assert stats == dict(num_rows=5, num_pairs=5, num_dropped_empty_response=0, num_truncated=0,
                       num_prompt_truncated=0, num_response_truncated=0, num_text_split=0, skipped={},
                       schema="conversational")
  end = tok.convert_tokens_to_ids("<|end|>")
  assert end == tok.eos_token_id
  for k, row in enumerate(conv):
    history = expected_history(row)
    prompt = template_ids(tok, history, add_generation_prompt=True)
    assert tp.prompt_ids[k].tolist() == prompt
    for field, ids in (("chosen", tp.chosen_ids[k]), ("rejected", tp.rejected_ids[k])):
      final = row[field][-1]
      assert prompt + ids.tolist() == template_ids(tok, history + [final])  # exact, no extra EOS
      assert tok.decode(ids.tolist()) == final["content"] + "<|end|>\n"
      assert ids.tolist().count(end) == 1
  # The string prompt of row 4 duplicates its user turn and is not rendered twice.
  assert tok.decode(tp.prompt_ids[4].tolist()).count("How many legs") == 1


def test_conversational_ids_path_and_batch_contract(rows, tok):
  row = rows["conversational"][1]
  history, chosen, _ = schemas.split_conversation(row, 1)
  assert history == expected_history(row) and chosen == row["chosen"][-1]
  prompt = schemas.render_prompt(tok, history)
  response, path = schemas.render_response(tok, history, prompt, chosen)
  assert path == schemas.PATH_IDS
  tp, _ = schemas.tokenize_any([row], tok, max_length=128, max_prompt_length=96)
  batch = preference.make_batch(tp, np.array([0]))
  n = len(prompt) + len(response)
  assert batch["input_ids"][0, :n].tolist() == template_ids(tok, history + [chosen])
  assert batch["loss_mask"][0].tolist() == [0] * len(prompt) + [1] * len(response) + [0] * (128 - n)


def test_eos_is_appended_only_when_the_turn_has_none(rows):
  tok = byte_bpe(all_text(rows["conversational"]) * 3, eos="<eos>")  # end-of-turn <|end|> is not the EOS
  tp, _ = schemas.tokenize_any([conv_row()], tok, max_length=64, max_prompt_length=32)
  full = template_ids(tok, [msg("user", "Hi?"), msg("assistant", "Yes.")])
  assert tp.prompt_ids[0].tolist() + tp.chosen_ids[0].tolist() == full + [tok.eos_token_id]


def test_boundary_merge_falls_back_to_splitting_the_text(merging_tok):
  tok = merging_tok
  history, final = [msg("user", "hi")], msg("assistant", "Sure thing")
  prompt = template_ids(tok, history, add_generation_prompt=True)
  full = template_ids(tok, history + [final])
  assert full[:len(prompt)] != prompt  # the case is real: BPE merged "Bot:" with the response
  response, path = schemas.render_response(tok, history, prompt, final)
  assert path == schemas.PATH_TEXT
  assert response == ids_of(tok, "Sure thing<|end|>")
  row = {"prompt": history, "chosen": [final], "rejected": [msg("assistant", "Sure")]}
  tp, stats = schemas.tokenize_any([row], tok, max_length=64, max_prompt_length=32)
  assert stats["num_text_split"] == 1 and stats["num_pairs"] == 1
  assert tp.prompt_ids[0].tolist() == prompt
  assert tp.chosen_ids[0].tolist() == response  # ends with <|end|> = EOS: nothing appended
  assert tok.decode(tp.prompt_ids[0].tolist() + tp.chosen_ids[0].tolist()) == tok.apply_chat_template(
      history + [final], tokenize=False)
  assert tok.decode(tp.rejected_ids[0].tolist()) == "Sure<|end|>"


def test_template_whose_turn_does_not_extend_the_prompt_is_an_error(rows):
  tok = byte_bpe(all_text(rows["conversational"]) * 3, template=(
      "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>{% endfor %}"
      "{% if add_generation_prompt %}<|assistant|>{% endif %}"))
  with pytest.raises(ValueError, match=r"c\.jsonl: row 0, field 'chosen': the chat template renders"):
    schemas.tokenize_any([conv_row()], tok, max_length=64, max_prompt_length=32, source="c.jsonl")


@pytest.mark.parametrize("row, pattern", [
    (dict(conv_row(), prompt=[msg("human", "Hi?")]),
     r"row 1, field 'prompt', message 0: role 'human' is not one of .*'human' -> 'user'"),
    (dict(conv_row(), chosen=[msg("assistant", "Yes."), msg("user", "ok")]),
     r"row 1, field 'chosen': the last message must be the assistant's response, found 'user'"),
    (dict(conv_row(), rejected=[]), r"row 1, field 'rejected': the last message must be the assistant's"),
    (dict(conv_row(), rejected=[msg("assistant", 3)]), r"row 1, field 'rejected', message 0: expected"),
    ({"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("user", "z"), msg("assistant", "c")]},
     r"row 1: 'chosen' and 'rejected' differ before their final assistant turn"),
    ({"chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]}, r"row 1: no prompt messages"),
    (dict(conv_row(), prompt=[msg("user", "a"), msg("assistant", "b")]), r"row 1: the prompt ends with an assistant"),
])
def test_bad_conversations_are_errors_naming_row_field_and_fix(tok, row, pattern):
  with pytest.raises(ValueError, match=pattern):
    schemas.tokenize_any([conv_row(), row], tok, max_length=64, max_prompt_length=32)


def test_missing_chat_template_is_a_clear_error(rows, tok):
  bare = byte_bpe(["hello"], template=None)
  with pytest.raises(ValueError, match="has no chat_template"):
    schemas.tokenize_any(rows["conversational"], bare, max_length=64, max_prompt_length=32)
  with pytest.raises(ValueError, match="pass tokenizer="):
    schemas.to_explicit_rows(rows["conversational"])


def test_conversational_to_explicit_text_rows(rows, tok):
  for row, out in zip(rows["conversational"], schemas.to_explicit_rows(rows["conversational"], tok)):
    history = expected_history(row)
    assert out["prompt"] == tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert out["prompt"] + out["chosen"] == tok.apply_chat_template(history + [row["chosen"][-1]], tokenize=False)
    assert out["rejected"] == row["rejected"][-1]["content"] + "<|end|>\n"


def test_conversational_truncation_and_drops_follow_tokenize_pairs(tok):
  long_prompt = "What color is the sky? " * 6
  conv = [conv_row(long_prompt, "It is blue. " * 5, "It is green."),  # prompt and chosen cut
          conv_row("Hi?", "", "No."),                                # empty chosen: dropped
          conv_row("Hi?", "Yes.", "No."),                            # fits
          conv_row("Hi?", "It is blue. " * 8, "No.")]                # response cut only
  max_length, max_prompt_length = 24, 10
  tp, stats = schemas.tokenize_any(conv, tok, max_length=max_length, max_prompt_length=max_prompt_length)
  assert stats == dict(num_rows=4, num_pairs=3, num_dropped_empty_response=1, num_truncated=2,
                       num_prompt_truncated=1, num_response_truncated=2, num_text_split=0, skipped={},
                       schema="conversational")
  assert tp.row_ids.tolist() == [0, 2, 3]
  for k, i in enumerate(tp.row_ids):
    row = conv[i]
    prompt = template_ids(tok, row["prompt"], add_generation_prompt=True)
    kept = prompt[-max_prompt_length:]
    assert tp.prompt_ids[k].tolist() == kept  # the prompt keeps its end
    budget = max_length - len(kept)
    for field, ids in (("chosen", tp.chosen_ids[k]), ("rejected", tp.rejected_ids[k])):
      response = template_ids(tok, row["prompt"] + row[field])[len(prompt):]
      assert ids.tolist() == response[:budget]  # the response keeps its start
      assert ids.dtype == np.int32 and len(kept) + len(ids) <= max_length
  assert len(template_ids(tok, conv[0]["prompt"], add_generation_prompt=True)) > max_prompt_length
  batch = preference.make_batch(tp, np.arange(3))
  assert batch["input_ids"].shape == (6, max_length)


def test_reference_logps_are_kept_for_conversational_rows(tok):
  conv = [dict(conv_row(), ref_chosen_logps=-1.0, ref_rejected_logps=-2.0),
          dict(conv_row("Hi?", "", "No."), ref_chosen_logps=-3.0, ref_rejected_logps=-4.0),
          dict(conv_row(), ref_chosen_logps=-5.0, ref_rejected_logps=-6.0)]
  tp, _ = schemas.tokenize_any(conv, tok, max_length=64, max_prompt_length=32, reference_logps=True)
  assert tp.reference_logps.tolist() == [[-1.0, -2.0], [-5.0, -6.0]]


def test_fixtures_are_what_the_script_writes(tmp_path):
  spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for rows, name in ((module.EXPLICIT, "explicit"), (module.CONVERSATIONAL, "conversational"), (module.HH, "hh")):
    module.write_jsonl(rows, tmp_path / f"{name}.jsonl")
    assert (tmp_path / f"{name}.jsonl").read_bytes() == (FIXTURES / f"{name}.jsonl").read_bytes()
