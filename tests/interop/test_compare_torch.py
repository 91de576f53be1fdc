"""A dpo_jax DPO step equals a plain PyTorch DPO step (HF model, concatenated forward, no_grad reference,
torch AdamW) on the same weights and batch: logits, log-probs, loss, gradients and updated params."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from batches import random_dpo_batch  # noqa: E402
from dpo_jax.interop import compare_torch  # noqa: E402

LR = 1e-3


def tiny_model(kind, seed):
  torch.manual_seed(seed)
  common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, attn_implementation="eager")
  if kind == "llama":
    config = transformers.LlamaConfig(rope_theta=10000.0, **common)
  elif kind == "qwen2":
    config = transformers.Qwen2Config(rope_theta=1e6, tie_word_embeddings=True, **common)
  elif kind == "qwen3":  # q/k RMSNorm over head_dim, explicit head_dim != hidden / heads
    config = transformers.Qwen3Config(rope_theta=1e6, head_dim=32, tie_word_embeddings=True, **common)
  else:  # gemma: GeGLU, sqrt(hidden) embedding scale, (1 + w) norms, tied head
    config = transformers.GemmaConfig(head_dim=16, hidden_activation="gelu_pytorch_tanh", **common)
  model = transformers.AutoModelForCausalLM.from_config(config).float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # random norms and biases, so a swapped or dropped tensor cannot hide
        p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("kind", ["llama"] + [pytest.param(k, marks=pytest.mark.slow)  # one family in the fast tier
                                              for k in ("qwen2", "qwen3", "gemma")])
def test_dpo_step_matches_pytorch(kind):
  policy, reference = tiny_model(kind, 0), tiny_model(kind, 1)  # pi != pi_ref: a non-trivial loss
  batch = random_dpo_batch(3, 4, 24, 96)
  batch.pop("row_ids")
  report = compare_torch.compare(policy, reference, batch, beta=0.5, lr=LR, weight_decay=0.01, max_grad_norm=1.0)
  print("\n" + kind + "\n" + compare_torch.format_report(report))
  assert report["logits"][1] <= 1e-4
  tokens = batch["loss_mask"][:, 1:].sum(1)
  assert report["logps"][0] <= 1e-4 * tokens.max()  # within 1e-4 nats per scored token
  assert report["loss"][1] <= 1e-5
  grads = {k: v for k, v in report.items() if k.startswith("grads/")}
  assert set(grads) >= {"grads/embed", "grads/attention", "grads/mlp", "grads/norms"}
  for name, (_, rel) in grads.items():
    assert rel <= 1e-4, (name, rel)
  # After one AdamW step each element moves by lr * g / (|g| + eps): for |g| near eps = 1e-8 the step amplifies
  # fp32 summation noise in g (~1e-10 absolute) by up to 1 / (4 eps). So the updated params are compared to 1% of
  # one step where |g| >= 10 eps (`grad_floor`), and to 10% of a step everywhere. Gemma's sqrt(hidden) embedding
  # scale yields many tiny gradients: on an AVX-512 CPU its attention params moved up to 6.3% of a step apart,
  # all of it in elements with |g| < 1e-7 (0.04% of a step above that floor), at HEAD before any change here.
  for name, (max_abs, _) in report.items():
    if name.startswith("params/"):
      assert max_abs <= 0.1 * LR, (name, max_abs)
  policy, reference = tiny_model(kind, 0), tiny_model(kind, 1)
  above_floor = compare_torch.compare(policy, reference, batch, beta=0.5, lr=LR, weight_decay=0.01, max_grad_norm=1.0,
                                      grad_floor=1e-7)
  for name, (max_abs, _) in above_floor.items():
    if name.startswith("params/"):
      assert max_abs <= 0.01 * LR, (name, max_abs)


@pytest.mark.slow
def test_the_command_line_tool(tmp_path, capsys):
  from transformers import AutoTokenizer

  from dpo_jax.data import synthetic
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=208, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
  AutoTokenizer.from_pretrained(str(synthetic.TOKENIZER_DIR)).save_pretrained(tmp_path)
  compare_torch.main(["--model", str(tmp_path), "--data", str(synthetic.test_path()), "--pairs", "2",
                      "--max_length", "32", "--max_prompt_length", "12"])
  out = capsys.readouterr().out
  assert "logits" in out and "grads/attention" in out and "params/mlp" in out
