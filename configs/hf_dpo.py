"""DPO on a real Hugging Face checkpoint: pi and pi_ref start from `hf.model_path` (an SFT / instruct model).

    python -m dpo_jax.interop.gguf --smollm2 --out checkpoints/smollm2-135m      # a real model, offline (see README)
    python -m dpo_jax.train --config configs/hf_dpo.py --workdir runs/smollm2 \\
        --config.data.train=ultrafeedback_train.jsonl --config.data.test=ultrafeedback_test.jsonl

Every field of configs/default.py applies (documented there); this file only changes defaults to what a run
on a pretrained model needs. Commonly set from the command line:
  --config.hf.model_path=DIR       the policy's starting checkpoint (and pi_ref's, unless hf.reference_path)
  --config.hf.reference_path=DIR   a separate SFT checkpoint as the frozen pi_ref
  --config.data.tokenizer=DIR      a tokenizer other than the checkpoint's own
  --config.data.train / .test      preference data in any supported schema (explicit, conversational, HH)
Variant `:sft` runs the seed's full pipeline instead (SFT on the chosen responses first, for a base model with
no SFT checkpoint: pi_ref is then the SFT result).
"""

import importlib.util
import os


def _default_config():
  # By path, not `from configs import default`: config files are loaded by path from any working directory.
  spec = importlib.util.spec_from_file_location("_dpo_jax_default_config",
                                                os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  c = _default_config()
  c.stage = "dpo"
  c.hf.model_path = "checkpoints/smollm2-135m"
  c.hf.export = True
  # The architecture comes from the checkpoint; these numerics still apply. Scanning the layers keeps the
  # compile time of a deep model flat.
  c.model.scan_layers = True
  c.model.compute_dtype = "auto"  # bf16 compute on GPU/TPU (fp32 params and Adam state), fp32 on CPU
  # Data: the embedded task's pairs (plain text, no chat template) unless data.train is set.
  c.loss.beta = 0.1
  c.optim.update(learning_rate=1e-6, warmup_steps=10, total_steps=200, schedule="linear", end_lr_ratio=0.0)
  c.batch_size = 8
  c.max_length = 64
  c.max_prompt_length = 24
  c.sft.steps = 0
  c.eval.update(every_steps=100, batch_size=16, num_prompts=32, samples_per_prompt=1, max_new_tokens=32)
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  if arg == "sft":
    c.stage = "pipeline"
    c.sft.update(steps=100, batch_size=8, learning_rate=1e-5, warmup_steps=10)
  elif arg not in (None, ""):
    raise ValueError(f"configs/hf_dpo.py: unknown variant {arg!r}; use one of: sft.")
  return c
