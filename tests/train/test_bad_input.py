"""Bad input: every case gives an error naming the file, row (and line) and field with the fix, or, with
data.on_bad_row='skip', a counted and reported skip. All before any compile; nothing here touches a device.

Fixtures are tiny files in tmp_path in the public schemas (explicit prompt/chosen/rejected, conversational
message lists, HH implicit-prompt transcripts), tokenized with the embedded word-level tokenizer.
"""

import json
import re
from pathlib import Path

import pytest

from dpo_jax.train import config_checks, runtime
from dpo_jax.train import config_checks
from dpo_jax.data import preference, schemas, synthetic
from dpo_jax.data import rows as rows_lib
from configs import default

GOOD = {"prompt": "the food was", "chosen": "good .", "rejected": "bad ."}
HH = {"chosen": "\n\nHuman: the food was\n\nAssistant: good .",
      "rejected": "\n\nHuman: the food was\n\nAssistant: bad ."}
TEMPLATE = "{% for m in messages %}{{ m['content'] }} . {% endfor %}"
LENGTHS = dict(max_length=16, max_prompt_length=8)


def conv(chosen="good", rejected="bad", role="user"):
  return {"chosen": [{"role": role, "content": "the food was"}, {"role": "assistant", "content": chosen}],
          "rejected": [{"role": role, "content": "the food was"}, {"role": "assistant", "content": rejected}]}


@pytest.fixture(scope="module")
def tok():
  t = synthetic.build_tokenizer()
  t.chat_template = TEMPLATE
  return t


def write(tmp_path, rows, name="data.jsonl"):
  """rows: a list of records (one JSON line each) or raw bytes."""
  path = tmp_path / name
  path.write_bytes(rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode())
  return str(path)


def load_and_tokenize(path, tok, on_bad_row="error", **kw):
  rows = schemas.load_any_rows(path, on_bad_row=on_bad_row)
  return schemas.tokenize_any(rows, tok, source=path, on_bad_row=on_bad_row, **{**LENGTHS, **kw})


# Row-level cases: (name, rows, error pattern after "<file>: ", skip reason). Row 0 is always good, so a skip
# keeps exactly one pair; the error names row 1 and its line (2, or 3 where a blank line precedes it).
ROW_CASES = [
    ("null_value", [GOOD, {**GOOD, "prompt": None}],
     r"row 1, field 'prompt': expected a string, got null.*\(row 1 is line 2 of the file\)", "null_value"),
    ("non_string", [GOOD, {**GOOD, "chosen": "ok", "rejected": 3}],
     r"row 1: 'chosen' is a str and 'rejected' a int.*line 2", "not_a_string"),
    ("null_response", [GOOD, {**GOOD, "rejected": None}],
     r"row 1, field 'rejected': expected a string or a list of messages, got null.*line 2", "null_value"),
    ("missing_field_one_row", [GOOD, {"prompt": "a", "chosen": "good ."}],
     r"row 1 has no \['rejected'\].*line 2", "missing_field"),
    ("chosen_equals_rejected", [GOOD, {**GOOD, "chosen": "bad ."}],
     r"row 1, fields 'chosen' and 'rejected' are identical.*on_bad_row=skip.*line 2", "chosen_equals_rejected"),
    ("empty_prompt", [GOOD, {**GOOD, "prompt": ""}],
     r"row 1, field 'prompt' is empty.*line 2", "empty_prompt"),
    ("wrong_role", [conv(), conv(role="human")],
     r"row 1, field 'chosen', message 0: role 'human' is not one of.*'human' -> 'user'.*line 2", "bad_role"),
    ("last_message_not_assistant", [conv(), {**conv(), "rejected": [{"role": "user", "content": "bad"}]}],
     r"row 1, field 'rejected': the last message must be the assistant's.*line 2", "bad_role"),
    ("conversational_identical", [conv(), conv(chosen="bad")],
     r"row 1, fields 'chosen' and 'rejected' are identical.*line 2", "chosen_equals_rejected"),
    ("hh_no_shared_prompt", [HH, {"chosen": "good .", "rejected": "bad ."}],
     r"row 1: 'chosen' and 'rejected' share no .*Assistant:.* turn marker.*line 2", "no_shared_prompt"),
    ("hh_identical", [HH, {"chosen": HH["chosen"], "rejected": HH["chosen"]}],
     r"row 1, fields 'chosen' and 'rejected' are identical.*line 2", "chosen_equals_rejected"),
    ("mixed_schema", [GOOD, conv()], r"row 0 is explicit but row 1 is conversational.*line 2", "other_schema"),
    ("nan_reference_logps", [{**GOOD, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
                             {**GOOD, "ref_chosen_logps": float("nan"), "ref_rejected_logps": -2.0}],
     r"row 1, field 'ref_chosen_logps': expected a finite number.*nan.*line 2", "bad_reference_logps"),
    ("inf_reference_logps", [{**GOOD, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
                             {**GOOD, "ref_chosen_logps": -1.0, "ref_rejected_logps": float("-inf")}],
     r"row 1, field 'ref_rejected_logps': expected a finite number.*inf.*line 2", "bad_reference_logps"),
]


@pytest.mark.parametrize("name, rows, pattern, reason", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_is_an_error_naming_file_row_line_and_field(tmp_path, tok, name, rows, pattern, reason):
  path = write(tmp_path, rows)
  ref = "reference_logps" in name
  with pytest.raises(ValueError, match=re.escape(path) + ": " + pattern):
    load_and_tokenize(path, tok, reference_logps=ref)


@pytest.mark.parametrize("name, rows, pattern, reason", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_is_counted_when_skipping(tmp_path, tok, name, rows, pattern, reason):
  path = write(tmp_path, rows)
  tokenized, stats = load_and_tokenize(path, tok, on_bad_row="skip", reference_logps="reference_logps" in name)
  assert stats["skipped"] == {reason: 1}
  assert tokenized.row_ids.tolist() == [0] and stats["num_rows"] == 2


def test_line_numbers_count_blank_lines(tmp_path, tok):
  path = write(tmp_path, (json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "chosen": None}) + "\n").encode())
  with pytest.raises(ValueError, match=r"row 1, field 'chosen'.*\(row 1 is line 3 of the file\)"):
    load_and_tokenize(path, tok)


def test_skipped_rows_keep_source_row_ids_and_are_reported(tmp_path, tok, capsys):
  rows = [GOOD, {**GOOD, "prompt": None}, GOOD, {**GOOD, "chosen": "bad ."}, {**GOOD, "chosen": ""}, GOOD]
  path = write(tmp_path, rows)
  tokenized, stats = load_and_tokenize(path, tok, on_bad_row="skip")
  assert tokenized.row_ids.tolist() == [0, 2, 5]  # indices into the file's rows, as precompute and NaN reports use
  assert stats["skipped"] == {"chosen_equals_rejected": 1, "null_value": 1}
  assert stats["num_dropped_empty_response"] == 1
  runtime.report_data({"train": stats})
  out = capsys.readouterr().out
  assert "3 pairs of 6 rows (1 dropped: empty response) (2 skipped: 1 chosen_equals_rejected, 1 null_value)" in out


# ------------------------------------------------------------------------------------ file-level cases

def test_malformed_json_line(tmp_path, tok):
  path = write(tmp_path, (json.dumps(GOOD) + "\n{\"prompt\": \"a\",\n" + json.dumps(GOOD) + "\n").encode())
  with pytest.raises(ValueError, match=re.escape(path) + r": line 2 \(row 1\) is not valid JSON.*on_bad_row=skip"):
    load_and_tokenize(path, tok)
  tokenized, stats = load_and_tokenize(path, tok, on_bad_row="skip")
  assert stats["skipped"] == {"malformed_json": 1} and tokenized.num_pairs == 2


@pytest.mark.parametrize("name, text", [
    ("data.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n"),
    ("data.json", json.dumps([GOOD, GOOD])),
    ("lines.json", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n"),  # datasets' to_json: lines under .json
])
def test_a_utf8_byte_order_mark_is_not_row_0(tmp_path, tok, name, text):
  """Windows editors and spreadsheet exports start UTF-8 files with a BOM; every row still loads."""
  path = write(tmp_path, b"\xef\xbb\xbf" + text.encode(), name=name)
  tokenized, stats = load_and_tokenize(path, tok)
  assert tokenized.num_pairs == 2 and not stats.get("skipped"), stats


def test_invalid_utf8_names_the_line(tmp_path, tok):
  path = write(tmp_path, json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
  for mode in ("error", "skip"):  # a wrong encoding is a file problem: never skipped
    with pytest.raises(ValueError, match=re.escape(path) + r": line 2 is not valid UTF-8.*re-save the file as UTF-8"):
      load_and_tokenize(path, tok, on_bad_row=mode)


@pytest.mark.parametrize("rows, pattern", [
    ([{"prompt": "a", "choosen": "b", "rejected": "c"}] * 2,
     r"row 0 has no \['chosen'\].*'choosen' looks like a misspelling of 'chosen'"),
    ([{"promt": "a", "chosen": "b", "rejected": "c"}] * 2,
     r"row 0 has no 'prompt'.*'promt' looks like a misspelling of 'prompt'"),
    ([{"prompt": "a", "chosen": "b", "rejected_reward": 0.5}] * 2,
     r"row 0 has no \['rejected'\] \(it has \['chosen', 'prompt', 'rejected_reward'\]\)(?!.*misspelling)"),
], ids=["choosen", "promt", "rejected_reward is its own column"])
def test_misspelled_column_suggests_the_name(tmp_path, tok, rows, pattern):
  path = write(tmp_path, rows)
  for mode in ("error", "skip"):  # no row fits: an error even when skipping
    with pytest.raises(ValueError, match=re.escape(path) + ".*" + pattern):
      load_and_tokenize(path, tok, on_bad_row=mode)


def test_missing_column_in_a_dataset_suggests_the_name():
  import datasets
  rows = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejectd": "c"}])
  with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\].*'rejectd' looks like a misspelling"):
    rows_lib.check_rows(rows, "ds")


def test_empty_response_is_dropped_and_counted(tmp_path, tok):
  tokenized, stats = load_and_tokenize(write(tmp_path, [GOOD, {**GOOD, "rejected": ""}]), tok)
  assert stats["num_dropped_empty_response"] == 1 and tokenized.row_ids.tolist() == [0]


def test_long_prompt_is_truncated_and_never_empties_the_response(tmp_path, tok):
  long = {**GOOD, "prompt": "the food was good . " * 10}  # 50 tokens > max_length 16
  tokenized, stats = load_and_tokenize(write(tmp_path, [long]), tok)
  assert stats["num_prompt_truncated"] == 1 and stats["num_truncated"] == 1
  assert len(tokenized.prompt_ids[0]) == LENGTHS["max_prompt_length"]
  assert len(tokenized.chosen_ids[0]) >= 1 and len(tokenized.rejected_ids[0]) >= 1
  with pytest.raises(ValueError, match=r"max_prompt_length=16 must be < max_length=16"):  # no room: refused
    load_and_tokenize(write(tmp_path, [GOOD]), tok, max_length=16, max_prompt_length=16)


def test_unknown_on_bad_row_mode(tmp_path, tok):
  with pytest.raises(ValueError, match=r"config.data.on_bad_row='ignore'; choose 'error'.*or 'skip'"):
    load_and_tokenize(write(tmp_path, [GOOD]), tok, on_bad_row="ignore")


def test_nothing_left_after_skipping_is_an_error(tmp_path):
  config = default.get_config("tiny")
  config.data.train = write(tmp_path, [GOOD, {**GOOD, "chosen": "bad ."}], "train.jsonl")
  config.data.test = write(tmp_path, [{**GOOD, "chosen": "bad ."}], "test.jsonl")
  config.data.on_bad_row = "skip"
  with pytest.raises(ValueError, match=r"test\.jsonl: no usable pairs in 1 rows \(skipped: \{'chosen_equals_rej"):
    runtime.load_pairs(config, runtime.load_tokenizer(""))


# ------------------------------------------------------------------------------------------- tokenizer

def test_chat_template_missing_for_conversational_data(tmp_path):
  path = write(tmp_path, [conv()])
  with pytest.raises(ValueError, match=r"has no chat_template, which conversational rows need"):
    schemas.tokenize_any(schemas.load_any_rows(path), synthetic.build_tokenizer(), source=path, **LENGTHS)


def test_tokenizer_without_eos_is_an_error_naming_the_fix(tmp_path):
  tok = synthetic.build_tokenizer()
  tok.eos_token = None
  tok.save_pretrained(tmp_path / "tok")
  with pytest.raises(ValueError, match=r"has no eos_token.*tok.eos_token = '</s>'.*save_pretrained"):
    runtime.load_tokenizer(str(tmp_path / "tok"))
  with pytest.raises(ValueError, match="has no eos_token"):
    preference.tokenize_pairs([GOOD], tok, **LENGTHS)


def test_tokenizer_without_pad_pads_with_eos_and_says_so(tmp_path, capsys):
  tok = synthetic.build_tokenizer()
  tok.pad_token = None
  tok.save_pretrained(tmp_path / "tok")
  loaded = runtime.load_tokenizer(str(tmp_path / "tok"))
  assert "has no pad token; padding with EOS" in capsys.readouterr().out
  tokenized, _ = preference.tokenize_pairs([GOOD], loaded, **LENGTHS)
  assert tokenized.pad_id == tokenized.eos_id == loaded.eos_token_id


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("flag, pattern", [
    ("--config.los.beta=0.1", r"config has no field 'los'\. Did you mean 'loss'\?"),
    ("--config.loss.bta=0.1", r"config.loss has no field 'bta'\. Did you mean 'beta'\?"),
    ("--config.data.on_bad_rows=skip", r"config.data has no field 'on_bad_rows'\. Did you mean 'on_bad_row'\?"),
    ("--noconfig.progres_bar", r"Did you mean 'progress_bar'\?"),
    ("--config.seed.x=1", r"config.seed is a value \(0\), not a group"),
    ("--config.data.batch_size=0", r"config.data has no field 'batch_size'\. Did you mean config\.batch_size "
                                   r"\(or config\.eval\.batch_size, config\.reward_model\.batch_size, "
                                   r"config\.sft\.batch_size\)\?"),
    ("--config.optim.beta=0.5", r"config.optim has no field 'beta'\. Did you mean config\.loss\.beta\?"),
])
def test_unknown_config_field_suggests_the_closest_name(flag, pattern):
  with pytest.raises(SystemExit, match=pattern):
    config_checks.check_override_flags(["--config", "configs/default.py:tiny", flag])


def test_known_config_fields_pass():
  config_checks.check_override_flags(["--config.loss.beta=0.05", "--config.data.on_bad_row=skip", "--workdir=w",
                                      "--noconfig.progress_bar", "--config=configs/default.py:tiny"])


@pytest.mark.parametrize("field, value, pattern", [
    ("loss.beta", 0.0, r"config.loss.beta=0.0 is out of range: it must be a finite number > 0"),
    ("optim.learning_rate", -1e-3, r"config.optim.learning_rate=-0.001 is out of range.*> 0"),
    ("max_length", 1, r"config.max_length=1 is out of range.*>= 2"),
    ("sft.steps", -1, r"config.sft.steps=-1 is out of range.*>= 0"),
    ("optim.total_steps", 0, r"config.optim.total_steps=0 is out of range.*>= 1"),
    ("optim.b2", 1.0, r"config.optim.b2=1.0 is out of range.*in \[0, 1\)"),
    ("eval.temperature", 0.0, r"config.eval.temperature=0.0 is out of range"),
    ("model.num_layers", 0, r"config.model.num_layers=0 is out of range"),
    ("optim.learning_rate", float("nan"), r"config.optim.learning_rate=nan is out of range"),
    ("data.on_bad_row", "drop", r"config.data.on_bad_row='drop'; choose 'error'"),
])
def test_out_of_range_config_values(field, value, pattern):
  config = default.get_config("tiny")
  group, _, name = field.rpartition(".")
  (config[group] if group else config)[name] = value
  with pytest.raises(ValueError, match=pattern):
    config_checks.validate_config(config, 8)


def test_the_default_configs_are_in_range():
  for arg in (None, "tiny", "moe"):
    config_checks.validate_config(default.get_config(arg), 8)


@pytest.mark.parametrize("mesh, pattern", [
    (dict(data=1, expert=8), r"config.mesh.expert=8 must divide config.model.num_experts=6"),
    (dict(data=1, expert=2, fsdp=4), r"config.batch_size=36 is not divisible by the data-parallel size 8 \(mesh "
                                     r"data=1 x fsdp=4 x expert=2\)"),
])
def test_expert_mesh_checks(mesh, pattern):
  config = default.get_config("moe")
  config.model.num_experts = 6
  config.batch_size = 36
  config.mesh.update(mesh)
  with pytest.raises(ValueError, match=pattern):
    config_checks.validate_config(config, 8)


@pytest.mark.parametrize("mesh, pattern", [
    (dict(data=1, fsdp=2, tensor=2), r"mesh: .* needs 4 devices but 8 are available"),
    (dict(data=-1, fsdp=3, tensor=1), r"mesh: 8 devices cannot be split as .* multiply to 3"),
])
def test_mesh_that_does_not_match_the_device_count(mesh, pattern):
  config = default.get_config("tiny")
  config.mesh.update(mesh)
  with pytest.raises(ValueError, match=pattern):
    config_checks.validate_config(config, 8)


# ------------------------------------------------------------------------------------------- no pickle

def test_checkpoints_load_without_executing_code(tmp_path):
  """Only safetensors (HF) and orbax (ours) are read: a pickle-based weights file is refused, never unpickled,
  and no module calls torch.load / pickle or turns trust_remote_code on."""
  import dpo_jax
  from dpo_jax.interop.hf import checkpoints
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match=r"no weights; expected model.safetensors.*pytorch_model.bin"):
    checkpoints.weight_map(str(tmp_path))
  package = Path(dpo_jax.__file__).parent
  for path in package.rglob("*.py"):
    text = path.read_text(encoding="utf-8")
    for banned in ("import pickle", "torch.load(", "trust_remote_code=True", "allow_pickle=True"):
      assert banned not in text, f"{path}: {banned!r} would execute code from a downloaded file"
