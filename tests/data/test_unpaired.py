"""Unpaired preference data (TRL's KTO format): detection, tokenizing in both forms, KL partners (a seeded
derangement, truncated to each prompt's budget), labels as the `desirable` batch field in every layout, pairs split as
TRL's unpair_preference_dataset, bad labels, and the trainer's load_pairs / checks / report for unpaired losses."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from configs.default import get_config
from dpo_jax.data import packing, preference, rows as rows_lib, schemas, unpaired
from dpo_jax.train import runtime
from paths import FIXTURES_DIR

FIXTURES = Path(FIXTURES_DIR)
SPECIAL = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# "<|role|>\ncontent<|end|>\n" per message; <|end|> is the EOS, so a rendered turn ends with EOS already.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def read_jsonl(name):
  return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def texts_of(rows):
  out = []
  for row in rows:
    for value in row.values():
      out += [value] if isinstance(value, str) else [m["content"] for m in value] if isinstance(value, list) else []
  return out


@pytest.fixture(scope="module")
def rows():
  return {name: read_jsonl(f"{name}.jsonl") for name in ("unpaired", "unpaired_standard", "explicit",
                                                         "conversational", "hh")}


@pytest.fixture(scope="module")
def tok(rows):
  """A byte-level BPE trained on the fixtures' texts, with pad, EOS (<|end|>) and a chat template."""
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator([t for r in rows.values() for t in texts_of(r)] * 3, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  out = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|end|>")
  out.chat_template = TEMPLATE
  return out


def ids(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def rendered(tok, messages, **kw):
  return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def lists(arrays):
  return [a.tolist() for a in arrays]


def kto_config(**data):
  config = copy.deepcopy(get_config("tiny"))
  config.loss.type = "kto"
  for k, v in data.items():
    config.data[k] = v
  return config


# ---------------------------------------------------------------------------------------- detecting, tokenizing

def test_fixtures_are_detected_as_unpaired_in_both_forms(rows):
  for name in ("unpaired", "unpaired_standard"):
    assert schemas.detect_schema(schemas.load_any_rows(str(FIXTURES / f"{name}.jsonl"))) == "unpaired"
  # kto-mix-14k's columns: prompt / completion message lists of {content, role}, a boolean label
  assert all(isinstance(r["label"], bool) and r["completion"][-1]["role"] == "assistant" for r in rows["unpaired"])


def test_standard_rows_tokenize_each_text_alone_with_eos(rows, tok):
  std = rows["unpaired_standard"]
  tp, stats = unpaired.tokenize_unpaired(std, tok, max_length=64, max_prompt_length=32, seed=3)
  eos = tok.eos_token_id
  assert lists(tp.prompt_ids) == [ids(tok, r["prompt"]) for r in std]
  assert lists(tp.chosen_ids) == [ids(tok, r["completion"]) + [eos] for r in std]
  assert tp.labels.tolist() == [r["label"] for r in std] == [True, False, True, False, True]
  assert tp.row_ids.tolist() == list(range(5))
  assert stats == dict(num_rows=5, num_pairs=5, num_dropped_empty_response=0, num_truncated=0, num_prompt_truncated=0,
                       num_response_truncated=0, num_kl_truncated=0, num_desirable=3, num_undesirable=2, skipped={},
                       num_text_split=0, conversational=False, schema="unpaired", source_schema="unpaired",
                       num_kl_same_prompt=stats["num_kl_same_prompt"])
  # the KL slot is the partner's completion; rows 0 and 1 share "The sky is", so that count is what it should be
  partners = unpaired.kl_partners(5, 3)
  assert lists(tp.rejected_ids) == [ids(tok, std[p]["completion"]) + [eos] for p in partners]
  assert stats["num_kl_same_prompt"] == sum(std[k]["prompt"] == std[p]["prompt"] for k, p in enumerate(partners))


def test_conversational_rows_are_the_chat_template_rendering(rows, tok):
  conv = rows["unpaired"]
  tp, stats = unpaired.tokenize_unpaired(conv, tok, max_length=256, max_prompt_length=128, seed=0)
  assert stats["conversational"] and stats["num_pairs"] == 6 and stats["num_text_split"] == 0
  partners = unpaired.kl_partners(6, 0)
  for k, row in enumerate(conv):
    prompt = rendered(tok, row["prompt"], add_generation_prompt=True)
    assert tp.prompt_ids[k].tolist() == prompt
    # prompt + completion is exactly the whole conversation's rendering (it ends with <|end|>: no second EOS)
    assert prompt + tp.chosen_ids[k].tolist() == rendered(tok, row["prompt"] + row["completion"])
    partner = conv[partners[k]]
    partner_prompt = rendered(tok, partner["prompt"], add_generation_prompt=True)
    assert tp.rejected_ids[k].tolist() == rendered(tok, partner["prompt"] + partner["completion"])[len(partner_prompt):]
  assert tp.labels.tolist() == [r["label"] for r in conv]


def test_schemas_tokenize_any_refuses_unpaired_rows(rows, tok):
  with pytest.raises(ValueError, match=r"k\.jsonl: unpaired rows .*unpaired\.tokenize_unpaired"):
    schemas.tokenize_any(rows["unpaired_standard"], tok, max_length=64, max_prompt_length=32, source="k.jsonl")


# ------------------------------------------------------------------------------------------------ KL partners

@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_kl_partners_are_a_single_cycle_through_every_row(n):
  for seed in (0, 1, 17):
    partners = unpaired.kl_partners(n, seed)
    assert (partners != np.arange(n)).all()  # never a row's own completion
    assert sorted(partners.tolist()) == list(range(n))  # each completion is one row's KL completion
    seen, k = [], 0
    for _ in range(n):  # following the partners visits every row once before returning: one n-cycle
      seen.append(k)
      k = int(partners[k])
    assert k == 0 and sorted(seen) == list(range(n))
    np.testing.assert_array_equal(partners, unpaired.kl_partners(n, seed))  # a pure function of (n, seed)
  if n >= 7:
    assert len({tuple(unpaired.kl_partners(n, s)) for s in range(5)}) > 1  # the seed matters


def test_kl_partners_need_two_rows():
  with pytest.raises(ValueError, match="at least 2 usable rows"):
    unpaired.kl_partners(1, 0)
  with pytest.raises(ValueError, match="1 unpaired row"):
    unpaired.tokenize_unpaired([dict(prompt="a b", completion=" c", label=True)],
                               PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
                                   {"a": 0, "b": 1, "c": 2, "<e>": 3}, unk_token="<e>")), eos_token="<e>"),
                               max_length=8, max_prompt_length=4)


def test_kl_completion_is_the_partners_whole_completion_cut_to_this_prompts_budget(tok):
  # prompts of 1 .. 4 words, completions of 6 words: max_length 8 leaves 4 .. 7 tokens, so most responses are cut
  words = ["sky", "rain", "roof", "garden", "blue", "green"]
  data = [dict(prompt=" ".join(words[:k + 1]), completion=" " + " ".join(words[k:] + words[:k]), label=k % 2 == 0)
          for k in range(4)]
  max_length, max_prompt_length = 12, 3
  tp, stats = unpaired.tokenize_unpaired(data, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                                         seed=5)
  eos, partners = tok.eos_token_id, unpaired.kl_partners(4, 5)
  full = [ids(tok, r["completion"]) + [eos] for r in data]
  cut_kl = 0
  for k, row in enumerate(data):
    prompt = ids(tok, row["prompt"])[-max_prompt_length:]
    budget = max_length - len(prompt)
    assert tp.prompt_ids[k].tolist() == prompt
    assert tp.chosen_ids[k].tolist() == full[k][:budget]
    assert tp.rejected_ids[k].tolist() == full[partners[k]][:budget]  # not the partner's own (shorter) cut
    cut_kl += len(full[partners[k]]) > budget
  assert stats["num_kl_truncated"] == cut_kl > 0


# ------------------------------------------------------------------------------------------------------ batches

def test_make_batch_emits_desirable_with_padding_zero(rows, tok):
  tp, _ = unpaired.tokenize_unpaired(rows["unpaired_standard"], tok, max_length=32, max_prompt_length=16, seed=1)
  batch = preference.make_batch(tp, np.array([1, 0, 4, -1]), kind="dpo")
  assert batch["desirable"].dtype == np.int32
  np.testing.assert_array_equal(batch["desirable"], [0, 1, 1, 0])  # labels F, T, T; the padding pair 0
  np.testing.assert_array_equal(batch["pair_mask"], [1, 1, 1, 0])
  # row 2i: prompt + completion, row 2i + 1: prompt + KL completion
  for i, k in enumerate([1, 0, 4]):
    p, c, r = tp.prompt_ids[k], tp.chosen_ids[k], tp.rejected_ids[k]
    assert batch["input_ids"][2 * i][:len(p) + len(c)].tolist() == p.tolist() + c.tolist()
    assert batch["input_ids"][2 * i + 1][:len(p) + len(r)].tolist() == p.tolist() + r.tolist()
  assert batch["loss_mask"][6:].sum() == 0
  np.testing.assert_array_equal(preference.make_batch(tp, np.array([2, -1]), kind="sft")["desirable"], [1, 0])
  last = list(preference.eval_batches(tp, global_batch=4))[-1]  # units 4 and three padding pairs
  np.testing.assert_array_equal(last["desirable"], [1, 0, 0, 0])
  np.testing.assert_array_equal(last["row_ids"], [4, -1, -1, -1])
  pairs, _ = schemas.tokenize_any(rows["explicit"], tok, max_length=64, max_prompt_length=32)
  assert "desirable" not in preference.make_batch(pairs, np.arange(2))  # pairs keep their batch keys


def test_shared_prompt_batch_holds_the_same_tokens_as_rows(rows, tok):
  tp, _ = unpaired.tokenize_unpaired(rows["unpaired"], tok, max_length=96, max_prompt_length=48, seed=2)
  idx = np.array([5, 0, 3, -1])
  flat = preference.make_batch(tp, idx, kind="dpo")
  shared = preference.make_batch(tp, idx, kind=preference.SHARED)
  np.testing.assert_array_equal(shared["desirable"], flat["desirable"])
  np.testing.assert_array_equal(shared["desirable"], [tp.labels[5], tp.labels[0], tp.labels[3], 0])
  for n in range(2 * 3):  # every real row: the prompt once, then the response
    prompt = shared["prompt_ids"][n // 2][shared["prompt_mask"][n // 2] > 0]
    response = shared["input_ids"][n][shared["attention_mask"][n] > 0]
    flat_real = flat["input_ids"][n][flat["attention_mask"][n] > 0]
    np.testing.assert_array_equal(np.concatenate([prompt, response]), flat_real)
    np.testing.assert_array_equal(shared["positions"][n][shared["attention_mask"][n] > 0],
                                  flat["positions"][n][flat["loss_mask"][n] > 0])


def test_packed_batches_carry_desirable_in_slot_order(rows, tok):
  tp, _ = unpaired.tokenize_unpaired(rows["unpaired_standard"], tok, max_length=32, max_prompt_length=16, seed=4)
  slots = np.array([[3, 0], [2, -1]])
  batch = packing.make_packed_batch(tp, slots, row_length=64)
  np.testing.assert_array_equal(batch["desirable"], [0, 1, 1, 0])
  np.testing.assert_array_equal(batch["pair_mask"], [1, 1, 1, 0])


# -------------------------------------------------------------------------------------- pairs split in two

@pytest.mark.parametrize("name", ["explicit", "conversational", "hh"])
def test_pairs_split_into_a_desirable_and_an_undesirable_unit(rows, tok, name):
  pairs, _ = schemas.tokenize_any(rows[name], tok, max_length=256, max_prompt_length=128)
  tp, stats = unpaired.tokenize_unpaired(rows[name], tok, max_length=256, max_prompt_length=128, seed=0)
  n = pairs.num_pairs
  assert stats["num_pairs"] == 2 * n and stats["num_desirable"] == stats["num_undesirable"] == n
  assert stats["source_schema"] == schemas.detect_schema(rows[name]) and stats["schema"] == "unpaired"
  assert tp.labels.tolist() == [True, False] * n
  assert tp.row_ids.tolist() == np.repeat(pairs.row_ids, 2).tolist()
  # unit 2i is pair i's (prompt, chosen), 2i + 1 its (prompt, rejected): the same ids as the paired tokenization
  assert lists(tp.prompt_ids) == [p for p in lists(pairs.prompt_ids) for _ in range(2)]
  assert lists(tp.chosen_ids) == [r for c, j in zip(lists(pairs.chosen_ids), lists(pairs.rejected_ids)) for r in (c, j)]
  assert unpaired.weight_balance(n, n) == (1.0, "")


def test_unpair_rows_matches_trl(rows):
  trl_data_utils = pytest.importorskip("trl.data_utils")
  datasets = pytest.importorskip("datasets")
  for name in ("explicit", "conversational"):
    data = [{k: v for k, v in r.items() if k in ("prompt", "chosen", "rejected")} for r in rows[name][:2]]
    if name == "conversational":  # TRL's conversational pairs carry the prompt apart; ours reads it the same way
      data = [r for r in data if isinstance(r.get("prompt"), list)]
    ours = unpaired.unpair_rows(data)
    theirs = trl_data_utils.unpair_preference_dataset(datasets.Dataset.from_list(data)).to_list()
    key = lambda r: json.dumps(r, sort_keys=True)  # TRL orders the chosen block before the rejected block
    assert sorted(map(key, ours)) == sorted(map(key, theirs))
    assert [r["label"] for r in ours] == [True, False] * len(data)
  extra = unpaired.unpair_rows(rows["explicit"][:1])
  assert [r["score_chosen"] for r in extra] == [9.0, 9.0]  # other columns copied to both halves, as TRL does
  with pytest.raises(ValueError, match="not pairs"):
    unpaired.unpair_rows(rows["unpaired_standard"])


# ------------------------------------------------------------------------------------------------- bad rows

@pytest.mark.parametrize("label", [1, 0, "true", None, 1.0])
def test_a_label_that_is_not_a_boolean_names_the_row_and_field(rows, tok, label):
  data = copy.deepcopy(rows["unpaired_standard"])
  data[2]["label"] = label
  with pytest.raises(rows_lib.BadRow, match=r"k\.jsonl: row 2, field 'label': expected true or false"):
    unpaired.tokenize_unpaired(data, tok, max_length=32, max_prompt_length=16, source="k.jsonl")
  tp, stats = unpaired.tokenize_unpaired(data, tok, max_length=32, max_prompt_length=16, on_bad_row="skip")
  assert stats["skipped"] == {"bad_label": 1} and tp.row_ids.tolist() == [0, 1, 3, 4]


def test_bad_label_in_a_file_names_its_line(tmp_path, rows, tok):
  path = tmp_path / "kto.jsonl"
  data = rows["unpaired_standard"][:2] + [dict(prompt="p", completion=" c", label="yes")]
  path.write_text("\n".join(json.dumps(r) for r in data[:2]) + "\n\n" + json.dumps(data[2]) + "\n")
  loaded = schemas.load_any_rows(str(path))
  with pytest.raises(ValueError, match=r"row 2, field 'label'.*got str 'yes'.*\(row 2 is line 4 of the file\)"):
    unpaired.tokenize_unpaired(loaded, tok, max_length=32, max_prompt_length=16, source=str(path))


def test_other_bad_rows_name_the_row(rows, tok):
  kw = dict(max_length=32, max_prompt_length=16)
  good = rows["unpaired_standard"][:2]
  with pytest.raises(ValueError, match=r"row 2 has 'completion' but no 'label'.*'lable' looks like a misspelling"):
    schemas.detect_schema(good + [dict(prompt="p", completion="c", lable=True)])
  with pytest.raises(ValueError, match=r"row 0 is standard \(strings\) but row 2 is conversational"):
    unpaired.tokenize_unpaired(good + rows["unpaired"][:1], tok, **kw)
  with pytest.raises(ValueError, match=r"row 2, field 'prompt' is missing"):
    unpaired.tokenize_unpaired(good + [dict(completion="c", label=True)], tok, **kw)
  with pytest.raises(ValueError, match=r"row 2, field 'prompt' is empty"):
    unpaired.tokenize_unpaired(good + [dict(prompt="", completion="c", label=True)], tok, **kw)
  with pytest.raises(ValueError, match=r"row 1, field 'completion': the last message must be the assistant's"):
    unpaired.tokenize_unpaired(rows["unpaired"][:1] + [dict(prompt=[{"role": "user", "content": "a"}], completion=[
        {"role": "user", "content": "b"}], label=True)], tok, **kw)
  with pytest.raises(ValueError, match=r"row 0, fields 'chosen' and 'rejected' are identical"):  # checked as a pair
    unpaired.tokenize_unpaired([dict(prompt="p", chosen=" a", rejected=" a")] + rows["explicit"], tok, **kw)
  tp, stats = unpaired.tokenize_unpaired(good + [dict(prompt="p", completion="", label=False)], tok, **kw)
  assert stats["num_dropped_empty_response"] == 1 and tp.num_pairs == 2
  with pytest.raises(ValueError, match="config.data.reference_logps=True"):
    unpaired.tokenize_unpaired(good, tok, reference_logps=True, **kw)


# ------------------------------------------------------------------------------------------ weight balance

def test_weight_balance_is_the_kto_papers_range():
  # 3 desirable, 2 undesirable, weights 1: ratio 1.5 > 4/3. desirable_weight in [2/3, 8/9] or undesirable_weight
  # in [1.125, 1.5] brings it back (TRL's bounds: n_U w_U / n_D * (1, 1.33); n_D w_D / n_U / (1.33, 1)).
  ratio, warning = unpaired.weight_balance(3, 2)
  assert ratio == 1.5
  assert "= 1.500, outside the recommended [1, 4/3]" in warning
  assert "config.loss.desirable_weight in [0.667, 0.889]" in warning
  assert "config.loss.undesirable_weight in [1.12, 1.5]" in warning
  assert unpaired.weight_balance(3, 2, desirable_weight=0.8) == (pytest.approx(1.2), "")
  assert unpaired.weight_balance(4, 3) == (pytest.approx(4 / 3), "")  # the upper edge is inside
  assert "= 0.500" in unpaired.weight_balance(1, 2)[1]
  assert unpaired.weight_balance(5, 0)[0] is None and "no undesirable rows" in unpaired.weight_balance(5, 0)[1]


# ------------------------------------------------------------------------------------------------ the trainer

@pytest.fixture(scope="module")
def embedded_tokenizer():
  return runtime.load_tokenizer("")


def test_load_pairs_with_kto_splits_train_and_keeps_test_paired(embedded_tokenizer, capsys):
  config = kto_config()
  train, test, raw, stats = runtime.load_pairs(config, embedded_tokenizer)
  paired, _, _, paired_stats = runtime.load_pairs(get_config("tiny"), embedded_tokenizer)
  n = paired.num_pairs
  assert stats["train"]["schema"] == "unpaired" and stats["train"]["source_schema"] == "explicit"
  assert train.num_pairs == 2 * n and train.labels.tolist() == [True, False] * n
  assert lists(train.chosen_ids[0::2]) == lists(paired.chosen_ids)
  assert lists(train.chosen_ids[1::2]) == lists(paired.rejected_ids)
  assert stats["train"]["weight_ratio"] == 1.0 and stats["train"]["weight_warning"] == ""
  assert test.labels is None and stats["test"] == paired_stats["test"]  # held-out accuracy is measured on pairs
  np.testing.assert_array_equal(train.rejected_ids[7], train.chosen_ids[unpaired.kl_partners(2 * n, config.seed)[7]]
                                [:config.max_length - len(train.prompt_ids[7])])
  runtime.report_data(stats)
  runtime.check_data_fits_loss(config, stats)
  out = capsys.readouterr().out
  assert f"data/train: {2 * n} unpaired rows ({n} desirable, {n} undesirable, split from explicit pairs)" in out
  assert f"data/test: {paired_stats['test']['num_pairs']} pairs" in out and "WARNING" not in out


def test_load_pairs_with_unpaired_files(embedded_tokenizer, capsys):
  path = str(FIXTURES / "unpaired_standard.jsonl")
  config = kto_config(train=path)  # no test file: held-out metrics on the train file, unpaired too
  train, test, _, stats = runtime.load_pairs(config, embedded_tokenizer)
  assert stats["test"]["schema"] == "unpaired" and test.labels.tolist() == train.labels.tolist()
  runtime.report_data(stats)
  out = capsys.readouterr().out
  assert "data/train: 5 unpaired rows (3 desirable, 2 undesirable) of 5 rows" in out
  assert "WARNING: config.loss.desirable_weight * 3 desirable" in out
  with config.unlocked():
    config.loss.desirable_weight = 0.8  # 0.8 * 3 / 2 = 1.2: inside [1, 4/3]
  assert runtime.load_pairs(config, embedded_tokenizer)[3]["train"]["weight_warning"] == ""
  sigmoid = kto_config(train=path)
  sigmoid.loss.type = "sigmoid"
  with pytest.raises(ValueError, match=r"unpaired_standard\.jsonl holds unpaired rows .* config\.loss\.type='sigmoid'"):
    runtime.load_pairs(sigmoid, embedded_tokenizer)
  with pytest.raises(ValueError, match=r"\['train'\] split\(s\) are unpaired .* config\.loss\.type='sigmoid'"):
    runtime.check_data_fits_loss(sigmoid, {"train": stats["train"], "test": {"schema": "explicit"}})
  precompute = kto_config(train=path)
  precompute.stage = "precompute"
  with pytest.raises(ValueError, match="config.stage='precompute'"):
    runtime.check_data_fits_loss(precompute, stats)
