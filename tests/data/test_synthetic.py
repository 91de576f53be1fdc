"""The embedded synthetic task: reward, committed data files, tokenizer, deterministic regeneration."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dpo_jax.data import preference, synthetic

from dpo_jax.data import rows as rows_lib
from paths import REPO_ROOT

REPO = Path(REPO_ROOT)


def read_jsonl(path):
  return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def train_rows():
  return read_jsonl(synthetic.train_path())


@pytest.fixture(scope="module")
def test_rows():
  return read_jsonl(synthetic.test_path())


@pytest.fixture(scope="module")
def tokenizer():
  return synthetic.load_tokenizer()


# ------------------------------------------------------------------------------------------------ reward

def test_reward_orders_sentiment():
  x = "my review of the diner :"
  glowing = "the food was superb and i loved the service ."
  mild = "the food was good and i liked the service ."
  neutral = "the food was typical and i noticed the service ."
  scathing = "the food was awful and i hated the service ."
  scores = [synthetic.reward(x, y) for y in (glowing, mild, neutral, scathing)]
  assert scores[0] > scores[1] > scores[2] == 0.0 > scores[3]
  assert synthetic.reward(x, glowing) == scores[0]  # deterministic
  assert synthetic.reward(x, "The food was SUPERB, and I LOVED the service!") == scores[0]  # case/punctuation
  np.testing.assert_allclose(synthetic.rewards([x] * 4, [glowing, mild, neutral, scathing]), scores)


@pytest.mark.parametrize("response",
                         ["", "   ", "<eos> <pad>", "zorblax qq 123 !!! ::", "élan ñ 日本語", "good" * 50])
def test_reward_accepts_any_string(response):
  assert np.isfinite(synthetic.reward("anything", response))
  assert synthetic.reward("", response) == synthetic.reward("x", response)  # r* reads only the response


def test_reward_rejects_non_strings_with_a_fix():
  with pytest.raises(TypeError, match="decode"):
    synthetic.reward("x", [1, 2, 3])


def test_bayes_accuracy_matches_the_bradley_terry_definition():
  # |d| = 0 is a coin flip; |d| = log(3) labels agree w.p. 3/4; huge |d| always agree.
  np.testing.assert_allclose(synthetic.bayes_accuracy(np.array([0.0, np.log(3.0), -np.log(3.0), 50.0])),
                             (0.5 + 0.75 + 0.75 + 1.0) / 4)


# ---------------------------------------------------------------------------------------- the language

def test_base_responses_stay_in_the_language_and_domain():
  rng = np.random.default_rng(0)
  vocab = set(synthetic.vocabulary())
  hotel_aspects = set(synthetic.DOMAINS["hotel"][1])
  other_aspects = {a for d, (_, asp) in synthetic.DOMAINS.items() if d != "hotel" for a in asp} - hotel_aspects
  for _ in range(200):
    y = synthetic.sample_response(rng, "thoughts on the beach hotel :")
    tokens = y.split()
    assert synthetic.MIN_RESPONSE_TOKENS <= len(tokens) <= synthetic.MAX_RESPONSE_TOKENS
    assert set(tokens) <= vocab and y == " ".join(tokens)
    assert not set(tokens) & other_aspects


def test_generation_is_seeded():
  prompts = synthetic.all_prompts()[:5]
  a, b = synthetic.make_pairs(prompts, 30, seed=3), synthetic.make_pairs(prompts, 30, seed=3)
  assert a == b
  assert a != synthetic.make_pairs(prompts, 30, seed=4)
  assert all(p["chosen"] != p["rejected"] for p in a)


def test_script_regenerates_byte_identical_files(tmp_path):
  spec = importlib.util.spec_from_file_location("make_synthetic_data", REPO / "scripts" / "make_synthetic_data.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  args = ["--seed", "0", "--num-train", "40", "--num-test", "10"]
  script.main(args + ["--out", str(tmp_path / "a")])
  script.main(args + ["--out", str(tmp_path / "b")])
  files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
  assert {str(f) for f in files} == {"train.jsonl", "test.jsonl", "tokenizer/tokenizer.json",
                                     "tokenizer/tokenizer_config.json"}
  for f in files:
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
  # The committed artefacts are what the script writes at seed 0: a 40-pair run is the prefix of the
  # committed 4000-pair file (pairs are drawn one after another), and the tokenizer is identical.
  committed = synthetic.train_path().read_text(encoding="utf-8").splitlines()
  assert (tmp_path / "a" / "train.jsonl").read_text(encoding="utf-8").splitlines() == committed[:40]
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "a" / "tokenizer" / name).read_bytes() == (synthetic.TOKENIZER_DIR / name).read_bytes()


# ------------------------------------------------------------------------------------- committed files

def test_committed_files_have_the_schema(train_rows, test_rows):
  assert 4000 <= len(train_rows) <= 8000 and 400 <= len(test_rows) <= 600
  for row in train_rows + test_rows:
    assert set(row) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    assert all(isinstance(row[k], str) and row[k] for k in ("prompt", "chosen", "rejected"))
  # Held-out prompts really are held out.
  assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in test_rows}
  # Recorded rewards are the code's r* (rounded to 1e-4).
  for row in train_rows[:500] + test_rows:
    assert abs(row["chosen_reward"] - synthetic.reward(row["prompt"], row["chosen"])) < 1e-3
    assert abs(row["rejected_reward"] - synthetic.reward(row["prompt"], row["rejected"])) < 1e-3
  total = sum(p.stat().st_size for p in synthetic.DATA_DIR.rglob("*") if p.is_file())
  assert total < 2_000_000, f"committed synthetic data is {total} bytes; keep it small"


def test_labels_are_noisy_but_informative(train_rows, test_rows):
  rows = train_rows + test_rows
  diff = np.array([r["chosen_reward"] - r["rejected_reward"] for r in rows])
  assert 0.85 <= synthetic.bayes_accuracy(diff) <= 0.92
  untied = diff[diff != 0]
  observed = np.mean(untied > 0)  # labels agreeing with sign(r* diff)
  expected = synthetic.bayes_accuracy(untied)  # what Bradley-Terry sampling predicts
  tolerance = 4 * np.sqrt(expected * (1 - expected) / len(untied))
  assert abs(observed - expected) < tolerance, (observed, expected)
  assert 0.8 < observed < 0.95  # informative, yet noisy like human labels


def test_tokenizer_loads_offline_and_round_trips(tokenizer, test_rows):
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
  assert len(tokenizer) == len(synthetic.vocabulary()) + len(synthetic.SPECIAL_TOKENS) < 512  # config vocab
  assert tokenizer("superb")["input_ids"] == tokenizer("superb", add_special_tokens=False)["input_ids"]  # no BOS/EOS
  for row in test_rows:
    for text in (row["prompt"], row["chosen"], row["rejected"]):
      ids = tokenizer(text, add_special_tokens=False)["input_ids"]
      assert tokenizer.unk_token_id not in ids
      assert tokenizer.decode(ids) == text
  # A model sample (ids ending in EOS, padded) decodes to text the reward scores like the original.
  ids = tokenizer(test_rows[0]["chosen"], add_special_tokens=False)["input_ids"] + [1, 0, 0]
  sample = tokenizer.decode(ids, skip_special_tokens=True)
  assert synthetic.reward("", sample) == synthetic.reward("", test_rows[0]["chosen"])
  assert tokenizer.decode(tokenizer("good blorp")["input_ids"]) == "good <unk>"


def test_committed_data_fits_the_tiny_config_untruncated(tokenizer):
  # configs/default.py 'tiny': max_length=32, max_prompt_length=12; nothing may be cut or dropped.
  rows = rows_lib.load_rows(str(synthetic.test_path()))
  _, stats = preference.tokenize_pairs(rows, tokenizer, max_length=32, max_prompt_length=12)
  assert stats["num_pairs"] == len(rows) and stats["num_truncated"] == 0
  assert stats["num_dropped_empty_response"] == 0
