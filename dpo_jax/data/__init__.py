"""Data side of dpo_jax: numpy only, never jax or model code.

  synthetic   the embedded preference task (word-level reviews, ground-truth reward r*(x, y), tokenizer)
  preference  load prompt/chosen/rejected rows, tokenize them, cut deterministic resumable host batches

Import the submodule you need (`from dpo_jax.data import preference`); nothing is re-exported here so that
importing the package stays cheap.
"""
