"""Interop: Hugging Face checkpoints and PEFT adapters in and out, GGUF conversion, and parity checks against
PyTorch."""
