"""Trainer configs and metric readers shared by the trainer tests of several folders."""

import json
import os

from config_overrides import override
from configs.default import get_config

HF_BETA = 0.1  # the HF trainer tests' beta (test_train_hf.py recomputes their loss in PyTorch with it)


def tiny(**overrides):
  c = get_config("tiny")
  c.progress_bar = False
  c.eval.num_prompts = 0  # sampling is covered by tests/core/test_sample.py and the slow end-to-end test
  return override(c, overrides)


def read_metrics(workdir, stage, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["stage"] == stage and r["split"] == split]


def hf_config(model_path, test_file, **overrides):
  """The HF trainer settings: DPO from an HF folder (no SFT), 8 steps, held-out data `test_file`."""
  return tiny(**{"stage": "dpo", "hf.model_path": model_path, "sft.steps": 0, "optim.total_steps": 8,
                 "optim.learning_rate": 5e-3, "log_every_steps": 1, "loss.beta": HF_BETA, "data.test": test_file,
                 "eval.every_steps": 0, **overrides})
