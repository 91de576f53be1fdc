"""Ranked data (K responses per prompt) and the seed's Plackett-Luce loss through the real step and trainer:
K = 2 is exactly DPO, K = 3 trains end to end, and mismatched data / loss is an error before compiling."""

import json

import jax
import numpy as np
import pytest

from configs.default import get_config
from dpo_jax import model as model_lib, step
from dpo_jax.train import pipeline
from dpo_jax.data import preference, rankings, schemas, synthetic
from trainer_runs import read_metrics, tiny

CONFIG = get_config("tiny")
MODEL_CFG = model_lib.ModelConfig.from_dict(CONFIG.model)
MODEL = model_lib.make_model(MODEL_CFG)
TOKENIZER = synthetic.load_tokenizer()


def synthetic_rows(n, offset=0):
  with open(synthetic.test_path()) as f:
    return [json.loads(line) for line in f][offset:offset + n]


def test_ranking_and_scores_order_responses_best_first_and_pad_short_sets():
  rows = [{"prompt": "my review of the film :", "responses": ["bad", "brilliant", "good"], "ranking": [1, 2, 0]},
          {"prompt": "my review of the cafe :", "responses": ["awful", "charming"], "scores": [-1.0, 2.0]}]
  tokenized, stats = rankings.tokenize_rankings(rows, TOKENIZER, max_length=16, max_prompt_length=8)
  assert tokenized.num_responses == 3 and stats["num_pairs"] == 2
  decode = lambda ids: TOKENIZER.decode(ids[:-1].tolist())  # without EOS
  assert [decode(r) for r in tokenized.response_ids[0]] == ["brilliant", "good", "bad"]
  assert [decode(r) for r in tokenized.response_ids[1]] == ["charming", "awful"]
  batch = preference.make_batch(tokenized, np.array([0, 1, -1]), kind="dpo")
  assert batch["input_ids"].shape == (9, 16)
  np.testing.assert_array_equal(batch["response_mask"], [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
  assert batch["loss_mask"][5].sum() == 0 and batch["loss_mask"][3].sum() > 0  # the padded 3rd response
  sft = preference.make_batch(tokenized, np.array([0, 1]), kind="sft")
  assert decode(sft["input_ids"][0][sft["loss_mask"][0] > 0]) == "brilliant"


@pytest.mark.parametrize("row,match", [
    ({"prompt": "a", "responses": ["x", "y"], "ranking": [0, 0]}, r"row 0, field 'ranking'"),
    ({"prompt": "a", "responses": ["x", "y"], "scores": [1.0]}, r"row 0, field 'scores'"),
    ({"prompt": "a", "responses": ["x", "y"]}, r"neither 'ranking'"),
])
def test_bad_rankings_name_the_row_and_field(row, match):
  with pytest.raises(ValueError, match=match):
    rankings.tokenize_rankings([row], TOKENIZER, max_length=16, max_prompt_length=8)


@pytest.mark.slow
def test_plackett_luce_on_k2_rankings_is_exactly_dpo():
  pairs = synthetic_rows(6)
  ranked = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "ranking": [0, 1]} for r in pairs]
  kw = dict(max_length=CONFIG.max_length, max_prompt_length=CONFIG.max_prompt_length)
  pair_data, _ = schemas.tokenize_any(pairs, TOKENIZER, **kw)
  ranked_data, stats = schemas.tokenize_any(ranked, TOKENIZER, **kw)
  assert stats["schema"] == "ranked"
  policy = model_lib.init_params(MODEL_CFG, jax.random.key(0))
  reference = model_lib.init_params(MODEL_CFG, jax.random.key(1))
  results = []
  for data, loss_type in ((pair_data, "sigmoid"), (ranked_data, "plackett_luce")):
    batch = preference.make_batch(data, np.arange(6), kind="dpo")
    batch.pop("row_ids")
    loss_cfg = get_config("tiny").loss
    loss_cfg.type = loss_type
    metrics = jax.jit(lambda p, r, b, c=loss_cfg: step.eval_step(p, r, b, model=MODEL, loss_cfg=c))(
        policy, reference, batch)
    grads = jax.grad(lambda p, b=batch, c=loss_cfg: step.dpo_loss(
        p, step.reference_logps(MODEL, reference, b), b, model=MODEL, loss_cfg=c, total_weight=6.0)[0])(policy)
    results.append((jax.device_get(metrics), grads))
  (m_pair, g_pair), (m_ranked, g_ranked) = results
  assert set(m_pair) == set(m_ranked)
  for key in m_pair:
    np.testing.assert_allclose(m_ranked[key], m_pair[key], rtol=1e-6, atol=1e-7, err_msg=key)
  for a, b in zip(jax.tree.leaves(g_ranked), jax.tree.leaves(g_pair)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def write_ranked(path, rows_in, k):
  """K responses per prompt from the embedded task, scored by its ground-truth reward r*."""
  rows = []
  pool = [r["rejected"] for r in rows_in]
  for i, r in enumerate(rows_in):
    responses = [r["chosen"], r["rejected"]] + [pool[(i + j) % len(pool)] for j in range(1, k - 1)]
    rows.append({"prompt": r["prompt"], "responses": responses,
                 "scores": [synthetic.reward(r["prompt"], y) for y in responses]})
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


@pytest.mark.slow
def test_the_trainer_runs_plackett_luce_on_three_ranked_responses(tmp_path):
  train_file = write_ranked(tmp_path / "train.jsonl", synthetic_rows(200, 0), 3)
  test_file = write_ranked(tmp_path / "test.jsonl", synthetic_rows(40, 200), 3)
  config = tiny(**{"data.train": train_file, "data.test": test_file, "loss.type": "plackett_luce",
                   "sft.steps": 10, "optim.total_steps": 12, "eval.every_steps": 0, "log_every_steps": 1})
  summary = pipeline.run(config, str(tmp_path / "run"))
  logged = read_metrics(str(tmp_path / "run"), "dpo")
  assert logged[0]["loss"] == pytest.approx(np.log(6.0), rel=1e-5)  # log 3! at pi = pi_ref
  assert logged[-1]["loss"] < logged[0]["loss"]
  assert 0.0 <= summary["pi_theta"]["accuracy"] <= 1.0


def test_ranked_data_and_pair_losses_do_not_mix(tmp_path):
  train_file = write_ranked(tmp_path / "train.jsonl", synthetic_rows(16), 3)
  with pytest.raises(ValueError, match="config.loss.type=plackett_luce"):
    pipeline.run(tiny(**{"data.train": train_file, "data.test": train_file}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="needs ranked data"):
    pipeline.run(tiny(**{"loss.type": "plackett_luce"}), str(tmp_path / "b"))
