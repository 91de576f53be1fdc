"""The trainer on HF checkpoints: `hf.model_path` starts pi and pi_ref, `hf.reference_path` is a separate frozen
pi_ref, `hf.export` hands the policy back to transformers, and PyTorch agrees with the numbers it reports.

Checkpoints are tiny random Llamas saved here with `save_pretrained` (with the embedded task's tokenizer).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from trainer_runs import HF_BETA as BETA, hf_config, read_metrics, tiny  # noqa: E402
from torch_models import random_hf_model  # noqa: E402

from dpo_jax.train import pipeline, runtime
from dpo_jax.data import preference, synthetic  # noqa: E402
from dpo_jax.data import rows as rows_lib

LLAMA = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=3,
             eos_token_id=2)


def save_checkpoint(path, seed, **overrides):
  config = transformers.LlamaConfig(**{**LLAMA, **overrides})
  model = random_hf_model(config, seed)
  model.save_pretrained(path)
  synthetic.load_tokenizer().save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {"a": save_checkpoint(root / "a", 0), "b": save_checkpoint(root / "b", 1),
          "wide": save_checkpoint(root / "wide", 2, hidden_size=64)}


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "test.jsonl"
  with open(synthetic.test_path()) as f:
    rows = [next(f) for _ in range(48)]
  path.write_text("".join(rows))
  return str(path)


def torch_dpo_loss(policy_path, reference_path, test_file, max_length, max_prompt_length, load_policy=None):
  """Held-out DPO loss, mean over pairs, computed by PyTorch from two HF folders (seed eq. 7); `load_policy(path)`
  loads the policy another way (a PEFT adapter folder on its base)."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(policy_path)
  pairs, _ = preference.tokenize_pairs(rows_lib.load_rows(test_file), tokenizer, max_length=max_length,
                                       max_prompt_length=max_prompt_length)
  batch = preference.make_batch(pairs, np.arange(pairs.num_pairs), kind="dpo")
  ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
  attention = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
  mask = torch.as_tensor(batch["loss_mask"][:, 1:], dtype=torch.float64)

  def logps(path):
    load = load_policy if load_policy is not None and path == policy_path else (
        lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
    model = load(path).eval()
    with torch.no_grad():
      logits = model(input_ids=ids, attention_mask=attention).logits.double()
    return (torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask).sum(-1)

  pi, ref = logps(policy_path), logps(reference_path)
  margin = (pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2])
  return float(-torch.nn.functional.logsigmoid(BETA * margin).mean())


@pytest.mark.slow
def test_lora_dpo_from_a_checkpoint_exports_a_peft_adapter_that_peft_scores_the_same(checkpoints, test_file,
                                                                                      tmp_path):
  """DPO as configs/hf_dpo.py runs it, with --config.lora.rank=16: adapters over hf.model_path (also pi_ref), exported
  as a PEFT folder
  whose base is that checkpoint; PEFT + torch give the held-out DPO loss the trainer reported."""
  from peft import PeftModel
  workdir = str(tmp_path / "run")
  config = hf_config(checkpoints["a"], test_file, **{"hf.export": True, "lora.rank": 16, "lora.alpha": 32.0,
                                                      "optim.learning_rate": 2e-2})
  summary = pipeline.run(config, workdir)
  export = summary["hf_export"]
  assert export == os.path.join(workdir, "hf_export") and not os.path.exists(os.path.join(workdir, "hf_base"))
  adapter_config = json.load(open(os.path.join(export, "adapter_config.json")))
  assert adapter_config["base_model_name_or_path"] == os.path.abspath(checkpoints["a"])
  assert (adapter_config["r"], adapter_config["target_modules"]) == (16, ["q_proj", "v_proj"])
  base = lambda: transformers.AutoModelForCausalLM.from_pretrained(checkpoints["a"], dtype=torch.float32)
  theirs = torch_dpo_loss(export, checkpoints["a"], test_file, config.max_length, config.max_prompt_length,
                          load_policy=lambda path: PeftModel.from_pretrained(base(), path))
  assert abs(summary["pi_theta"]["dpo_loss"] - math.log(2.0)) > 1e-4  # the adapters moved the policy off pi_ref
  assert theirs == pytest.approx(summary["pi_theta"]["dpo_loss"], rel=1e-5)


def test_dpo_from_a_checkpoint_exports_what_pytorch_scores_the_same(checkpoints, test_file, tmp_path):
  workdir = str(tmp_path / "run")
  config = hf_config(checkpoints["a"], test_file, **{"hf.export": True})
  summary = pipeline.run(config, workdir)
  logged = read_metrics(workdir, "dpo")
  # Step 1 runs with pi == pi_ref == the checkpoint: every implicit reward is 0 and the loss is log 2.
  assert logged[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
  assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
  assert logged[-1]["loss"] < math.log(2.0)

  export = summary["hf_export"]
  assert export == os.path.join(workdir, "hf_export")
  exported = json.load(open(os.path.join(export, "config.json")))
  assert (exported["model_type"], exported["bos_token_id"], exported["eos_token_id"]) == ("llama", 3, 2)
  assert os.path.isfile(os.path.join(export, "tokenizer.json"))
  # PyTorch, from the two folders alone, gets the held-out DPO loss the trainer reported for pi_theta.
  theirs = torch_dpo_loss(export, checkpoints["a"], test_file, config.max_length, config.max_prompt_length)
  assert summary["pi_theta"]["dpo_loss"] < math.log(2.0) - 1e-3
  assert theirs == pytest.approx(summary["pi_theta"]["dpo_loss"], rel=1e-5)


def test_a_separate_reference_checkpoint_is_the_frozen_pi_ref(checkpoints, test_file, tmp_path):
  config = hf_config(checkpoints["a"], test_file, **{"hf.reference_path": checkpoints["b"],
                                                     "optim.total_steps": 2})
  summary = pipeline.run(config, str(tmp_path / "run"))
  first = read_metrics(str(tmp_path / "run"), "dpo")[0]
  # pi (checkpoint a) and pi_ref (checkpoint b) differ from step 1: the rewards are not 0.
  assert abs(first["rewards/margins"]) > 1e-3
  assert first["loss"] != pytest.approx(math.log(2.0), abs=1e-4)
  # pi_ref's held-out NLL is checkpoint b's: the same as a run that just starts from b.
  b_alone = pipeline.run(hf_config(checkpoints["b"], test_file, **{"stage": "sft"}), str(tmp_path / "b"))
  assert summary["pi_ref"]["nll"] == pytest.approx(b_alone["pi_ref"]["nll"], rel=1e-6)


def test_pipeline_from_a_checkpoint_starts_at_its_weights(checkpoints, test_file, tmp_path):
  config = hf_config(checkpoints["a"], test_file, **{"stage": "sft", "sft.steps": 4})
  summary = pipeline.run(config, str(tmp_path / "run"))
  a_alone = pipeline.run(hf_config(checkpoints["a"], test_file, **{"stage": "sft"}), str(tmp_path / "a"))
  assert summary["init"]["nll"] == pytest.approx(a_alone["pi_ref"]["nll"], rel=1e-6)
  assert summary["pi_ref"]["nll"] < summary["init"]["nll"]


@pytest.mark.parametrize("field,value,error,match", [
    ("hf.model_path", "/no/such/folder", FileNotFoundError, r"config\.hf\.model_path='/no/such/folder'.*config\.json"),
    ("hf.reference_path", "/no/such/folder", FileNotFoundError, r"config\.hf\.reference_path"),
])
def test_missing_checkpoint_folders_name_the_field(checkpoints, test_file, tmp_path, field, value, error, match):
  config = hf_config(checkpoints["a"], test_file, **{field: value})
  with pytest.raises(error, match=match):
    pipeline.run(config, str(tmp_path))


def test_a_reference_of_another_architecture_is_refused(checkpoints, test_file, tmp_path):
  config = hf_config(checkpoints["a"], test_file, **{"hf.reference_path": checkpoints["wide"]})
  with pytest.raises(ValueError, match=r"config\.hf\.reference_path=.*different architecture.*hidden_size"):
    pipeline.run(config, str(tmp_path))


def test_hf_dpo_config_is_a_complete_config():
  from ml_collections import config_flags  # noqa: F401  (the CLI loads configs by path, as here)
  import importlib.util
  spec = importlib.util.spec_from_file_location("hf_dpo", os.path.join(runtime.CONFIG_DIR, "hf_dpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert (c.stage, c.sft.steps, c.hf.export, c.model.scan_layers) == ("dpo", 0, True, True)
  assert module.get_config("sft").stage == "pipeline"
  assert set(c.keys()) == set(tiny().keys())
