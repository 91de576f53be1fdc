"""The preference pipeline: loading, tokenizing, truncation, the batch contract, resume and host slicing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpo_jax.data import preference, synthetic

from dpo_jax.data import rows as rows_lib
from paths import REPO_ROOT

ROWS = [
    dict(prompt="review of the film :", chosen="the acting was superb .", rejected="the plot was dull ."),
    dict(prompt="thoughts on the diner :", chosen="i loved the food and the service was good .",
         rejected="the staff was awful ."),
    dict(prompt="my review of the inn :", chosen="nice view .", rejected="the bed and the room were bad ."),
    dict(prompt="review of the game :", chosen="fun levels , clever puzzles .", rejected="boring music ."),
    dict(prompt="thoughts on the novel :", chosen="the prose was lovely .", rejected="the ending was weak ."),
]


@pytest.fixture(scope="module")
def tok():
  return synthetic.build_tokenizer()


def ids_of(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def numbered_rows(n):
  """n distinct pairs: row i's prompt and responses differ in length, so every row is recognisable."""
  words = ["good", "bad", "nice", "dull", "fun", "weak", "solid", "poor"]
  return [dict(prompt="review of " + " ".join(["the"] * (1 + i % 5)) + " film :",
               chosen=" ".join(words[: 1 + i % 7]), rejected=" ".join(words[::-1][: 1 + (i * 3) % 8]))
          for i in range(n)]


def test_data_package_imports_neither_jax_nor_model_code():
  # A fresh interpreter: this one already imported jax in conftest.py.
  code = ("import sys; import dpo_jax.data.preference, dpo_jax.data.synthetic; "
          "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax', 'dpo_jax.model'))))")
  repo = Path(REPO_ROOT)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
  assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------- tokenizing

def test_ids_are_prompt_then_response_then_eos(tok):
  tp, stats = preference.tokenize_pairs(ROWS, tok, max_length=32, max_prompt_length=12)
  assert stats == dict(num_rows=5, num_pairs=5, num_dropped_empty_response=0, num_truncated=0,
                       num_prompt_truncated=0, num_response_truncated=0, skipped={})
  batch = preference.make_batch(tp, np.arange(5))
  for i, row in enumerate(ROWS):
    for r, field in ((2 * i, "chosen"), (2 * i + 1, "rejected")):
      expected = ids_of(tok, row["prompt"]) + ids_of(tok, row[field]) + [tok.eos_token_id]
      n = len(expected)
      assert batch["input_ids"][r, :n].tolist() == expected
      assert (batch["input_ids"][r, n:] == tok.pad_token_id).all()


def test_prompt_and_response_are_tokenized_separately():
  # A BPE trained on "goodbye" merges it into one token; prompt "good" + response "bye" must stay apart.
  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.Whitespace()
  bpe.train_from_iterator(["goodbye"] * 20 + ["good", "bye"] * 5,
                          trainers.BpeTrainer(special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False))
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
  separate = ids_of(tok, "good") + ids_of(tok, "bye") + [tok.eos_token_id]
  joined = ids_of(tok, "goodbye") + [tok.eos_token_id]
  assert separate != joined  # the case is a real test
  tp, _ = preference.tokenize_pairs([dict(prompt="good", chosen="bye", rejected="bye bye")], tok,
                                    max_length=16, max_prompt_length=8)
  assert np.concatenate([tp.prompt_ids[0], tp.chosen_ids[0]]).tolist() == separate


def test_long_prompt_keeps_its_end(tok):
  row = dict(prompt="here is what i think of the new thriller :", chosen="good .", rejected="bad .")
  tp, stats = preference.tokenize_pairs([row], tok, max_length=16, max_prompt_length=4)
  assert tp.prompt_ids[0].tolist() == ids_of(tok, "the new thriller :")
  assert stats["num_prompt_truncated"] == 1 and stats["num_truncated"] == 1
  assert stats["num_response_truncated"] == 0


def test_response_truncation_cuts_eos_first(tok):
  response = "the acting was superb and the plot was clever ."  # 10 tokens
  r = ids_of(tok, response)
  row = dict(prompt="review of the film :", chosen=response, rejected="good .")  # prompt: 5 tokens
  eos = tok.eos_token_id
  for max_length, expected, cut in ((16, r + [eos], 0), (15, r, 1), (9, r[:4], 1)):
    tp, stats = preference.tokenize_pairs([row], tok, max_length=max_length, max_prompt_length=5)
    assert tp.chosen_ids[0].tolist() == expected, max_length
    assert tp.rejected_ids[0].tolist() == (ids_of(tok, "good .") + [eos])[:max_length - 5]
    assert stats["num_response_truncated"] == cut
    assert len(tp.prompt_ids[0]) + len(tp.chosen_ids[0]) <= max_length


def test_empty_responses_are_dropped_and_counted(tok):
  rows = [ROWS[0], dict(ROWS[1], chosen=""), dict(ROWS[2], rejected="   "), ROWS[3]]
  tp, stats = preference.tokenize_pairs(rows, tok, max_length=32, max_prompt_length=12)
  assert stats["num_rows"] == 4 and stats["num_pairs"] == 2 and stats["num_dropped_empty_response"] == 2
  assert tp.row_ids.tolist() == [0, 3]  # original row indices survive the drop
  assert preference.make_batch(tp, np.array([1]))["row_ids"].tolist() == [3]


def test_empty_prompt_is_an_error_naming_the_row(tok):
  with pytest.raises(ValueError, match=r"row 1, field 'prompt'"):
    preference.tokenize_pairs([ROWS[0], dict(ROWS[1], prompt="")], tok, max_length=32, max_prompt_length=12)


def test_length_settings_are_checked(tok):
  with pytest.raises(ValueError, match=r"max_prompt_length=32 must be < max_length=32"):
    preference.tokenize_pairs(ROWS, tok, max_length=32, max_prompt_length=32)
  with pytest.raises(ValueError, match="max_prompt_length=0"):
    preference.tokenize_pairs(ROWS, tok, max_length=32, max_prompt_length=0)


def test_tokenizer_needs_eos_and_pads_with_eos_when_it_has_no_pad(tok):
  bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, unk_token="<unk>")
  with pytest.raises(ValueError, match="no eos_token"):
    preference.tokenize_pairs(ROWS, bare, max_length=32, max_prompt_length=12)
  no_pad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", unk_token="<unk>")
  tp, _ = preference.tokenize_pairs(ROWS, no_pad, max_length=32, max_prompt_length=12)
  batch = preference.make_batch(tp, np.arange(5))
  assert tp.pad_id == tp.eos_id == no_pad.eos_token_id
  assert (batch["input_ids"][batch["attention_mask"] == 0] == no_pad.eos_token_id).all()


# ----------------------------------------------------------------------------------------------- loading

def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


def as_triples(rows):
  return list(zip(*[rows_lib.pair_texts(r, i) for i, r in enumerate(rows_lib.records(rows))]))


def test_every_source_kind_loads_the_same_rows(tmp_path, monkeypatch):
  import datasets

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # keep ~ clean
  rows = [dict(r, extra=i) for i, r in enumerate(ROWS)]  # extra columns are fine
  ds = datasets.Dataset.from_list(rows)
  sources = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
  (tmp_path / "list.json").write_text(json.dumps(rows))
  sources["json list"] = str(tmp_path / "list.json")
  (tmp_path / "split.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
  sources["json split"] = str(tmp_path / "split.json")
  (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
  sources["json columns"] = str(tmp_path / "cols.json")
  ds.to_json(str(tmp_path / "lines.json"))  # JSON lines under a .json name
  sources["json lines"] = str(tmp_path / "lines.json")
  ds.to_parquet(str(tmp_path / "d.parquet"))
  sources["parquet"] = str(tmp_path / "d.parquet")
  ds.save_to_disk(str(tmp_path / "saved"))
  sources["save_to_disk"] = str(tmp_path / "saved")
  datasets.DatasetDict(train=ds, test=ds.select([0])).save_to_disk(str(tmp_path / "saved_dict"))
  sources["save_to_disk dict"] = str(tmp_path / "saved_dict")
  (tmp_path / "folder").mkdir()
  write_jsonl(tmp_path / "folder" / "train.jsonl", rows)
  sources["load_dataset folder"] = str(tmp_path / "folder")
  expected = as_triples(ROWS)
  for kind, source in sources.items():
    assert as_triples(rows_lib.load_rows(source)) == expected, kind
  assert len(rows_lib.load_rows(sources["save_to_disk dict"], split="test")) == 1
  with pytest.raises(ValueError, match=r"no split 'valid'; it has \['test', 'train'\]"):
    rows_lib.load_rows(sources["save_to_disk dict"], split="valid")


def test_missing_path_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "nope" / "train.jsonl")
  with pytest.raises(FileNotFoundError, match="no such file or folder") as e:
    rows_lib.load_rows(missing)
  assert missing in str(e.value)


def test_missing_column_names_the_column_and_what_was_found(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [dict(prompt="a :", chosen="good", response_b="bad")])
  with pytest.raises(ValueError) as e:
    rows_lib.load_rows(path)
  message = str(e.value)
  assert path in message and "['rejected']" in message and "response_b" in message


@pytest.mark.parametrize("value, hint", [(5, "row 2, field 'chosen'"), (None, "missing value"),
                                         ([{"role": "user", "content": "hi"}], "apply_chat_template")])
def test_non_string_value_names_row_and_field(tmp_path, value, hint):
  rows = [dict(r) for r in ROWS]
  rows[2]["chosen"] = value
  path = write_jsonl(tmp_path / "d.jsonl", rows)
  with pytest.raises(ValueError, match="row 2, field 'chosen'") as e:
    rows_lib.load_rows(path)
  assert hint in str(e.value) and path in str(e.value)


def test_bad_json_line_names_the_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
  with pytest.raises(ValueError, match=r"line 3 \(row 1\) is not valid JSON"):
    rows_lib.load_rows(str(path))


# ---------------------------------------------------------------------------------------------- batches

def test_dpo_batch_contract(tok):
  rows = numbered_rows(6)
  tp, _ = preference.tokenize_pairs(rows, tok, max_length=24, max_prompt_length=10)
  batch = preference.make_batch(tp, np.array([4, 1, 3]))
  assert sorted(batch) == ["attention_mask", "input_ids", "loss_mask", "pair_mask", "positions", "row_ids"]
  for k, v in batch.items():
    assert v.dtype == np.int32, k
    assert v.shape == ((3,) if k in ("row_ids", "pair_mask") else (6, 24)), k
  assert batch["row_ids"].tolist() == [4, 1, 3] and batch["pair_mask"].tolist() == [1, 1, 1]
  for i, pair in enumerate([4, 1, 3]):
    p = ids_of(tok, rows[pair]["prompt"])
    for r, field in ((2 * i, "chosen"), (2 * i + 1, "rejected")):  # interleaved: chosen 2i, rejected 2i + 1
      y = ids_of(tok, rows[pair][field]) + [tok.eos_token_id]
      n = len(p) + len(y)
      assert batch["input_ids"][r, :n].tolist() == p + y
      assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (24 - n)
      assert batch["positions"][r].tolist() == list(range(n)) + [0] * (24 - n)
      assert batch["loss_mask"][r].tolist() == [0] * len(p) + [1] * len(y) + [0] * (24 - n)
  assert (batch["loss_mask"][:, 0] == 0).all()

  sft = preference.make_batch(tp, np.array([4, 1, 3]), kind="sft")
  for k in ("input_ids", "attention_mask", "positions", "loss_mask"):
    np.testing.assert_array_equal(sft[k], batch[k][0::2])  # SFT rows are the chosen rows
  assert sft["row_ids"].tolist() == [4, 1, 3]
  with pytest.raises(ValueError, match="kind='ppo'"):
    preference.make_batch(tp, np.array([0]), kind="ppo")


def collect(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_epoch_order_is_a_seeded_permutation():
  a = preference.epoch_order(50, seed=1, epoch=2)
  assert sorted(a.tolist()) == list(range(50))
  np.testing.assert_array_equal(a, preference.epoch_order(50, seed=1, epoch=2))
  assert not np.array_equal(a, preference.epoch_order(50, seed=1, epoch=3))
  assert not np.array_equal(a, preference.epoch_order(50, seed=2, epoch=2))


def test_resume_replays_the_uninterrupted_run_across_epochs(tok):
  tp, _ = preference.tokenize_pairs(numbered_rows(10), tok, max_length=24, max_prompt_length=10)
  # 10 pairs, 4 a batch: 2 batches an epoch (2 pairs dropped), so 7 steps span 4 epochs.
  run = collect(preference.iterate_batches(tp, global_batch=4, seed=7), 7)
  assert [s for s, _ in run] == list(range(7))
  epochs = [np.concatenate([b["row_ids"] for _, b in run[2 * e:2 * e + 2]]).tolist() for e in range(3)]
  assert all(len(set(ids)) == 8 for ids in epochs)  # no pair twice within an epoch
  assert epochs[0] != epochs[1] != epochs[2]  # each epoch reshuffles
  for k in (1, 2, 5):
    resumed = collect(preference.iterate_batches(tp, global_batch=4, seed=7, start_step=k), 7 - k)
    for (s, b), (s_ref, b_ref) in zip(resumed, run[k:]):
      assert s == s_ref
      assert_batches_equal(b, b_ref)
  other_seed = collect(preference.iterate_batches(tp, global_batch=4, seed=8), 2)
  assert any(not np.array_equal(a["row_ids"], b["row_ids"]) for (_, a), (_, b) in zip(other_seed, run))


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_host_slices_concatenate_to_the_global_batch(tok, kind):
  tp, _ = preference.tokenize_pairs(numbered_rows(13), tok, max_length=24, max_prompt_length=10)
  kw = dict(global_batch=4, seed=3, start_step=2, kind=kind)
  whole = collect(preference.iterate_batches(tp, **kw), 5)
  hosts = [collect(preference.iterate_batches(tp, process_index=i, process_count=2, **kw), 5) for i in range(2)]
  for (s, b), (s0, b0), (s1, b1) in zip(whole, *hosts):
    assert s == s0 == s1
    assert b0["row_ids"].shape == (2,)
    assert_batches_equal({k: np.concatenate([b0[k], b1[k]]) for k in b}, b)


def test_eval_batches_cover_every_pair_once(tok):
  rows = numbered_rows(11)
  tp, _ = preference.tokenize_pairs(rows, tok, max_length=24, max_prompt_length=10)
  assert preference.num_eval_batches(tp.num_pairs, 4) == 3
  seen = []
  for i in range(2):
    batches = list(preference.eval_batches(tp, global_batch=4, process_index=i, process_count=2))
    assert len(batches) == 3
    for b in batches:
      seen += b["row_ids"][b["pair_mask"] == 1].tolist()
      pad = np.repeat(b["pair_mask"] == 0, 2)
      assert (b["row_ids"][b["pair_mask"] == 0] == -1).all()
      assert (b["loss_mask"][pad] == 0).all()  # padding pairs score nothing ...
      assert (b["attention_mask"].sum(1) > 0).all()  # ... yet every row attends to something (no NaN)
  assert sorted(seen) == list(range(11))
  sft = list(preference.eval_batches(tp, global_batch=4, kind="sft"))
  assert [b["input_ids"].shape for b in sft] == [(4, 24)] * 3


def test_batching_arguments_are_checked(tok):
  tp, _ = preference.tokenize_pairs(numbered_rows(6), tok, max_length=24, max_prompt_length=10)
  with pytest.raises(ValueError, match="cannot fill one global batch of 8"):
    preference.iterate_batches(tp, global_batch=8, seed=0)
  with pytest.raises(ValueError, match="multiple of process_count=4"):
    preference.iterate_batches(tp, global_batch=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    preference.eval_batches(tp, global_batch=4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="start_step=-1"):
    preference.iterate_batches(tp, global_batch=2, seed=0, start_step=-1)
