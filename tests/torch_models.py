"""Tiny random HF torch models for parity tests (built locally, nothing downloaded)."""

import torch
import transformers


def random_hf_model(config, seed: int = 0, dtype=torch.float32, auto_class=transformers.AutoModelForCausalLM):
  """Random HF model (a causal LM, or `auto_class`'s); norms and biases are randomised too, so a dropped or swapped
  one changes the outputs, and a classifier's `score` row gets unit scale."""
  torch.manual_seed(seed)
  model = auto_class.from_config(config).to(dtype).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif name == "score.weight":
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
  return model
