"""Data side of dpo_jax: numpy only, never jax or model code.

  rows        read prompt/chosen/rejected rows (files, folders, hub) and check each one
  preference  tokenize pairs, cut deterministic resumable host batches (rows or shared prompts)
  schemas     explicit / conversational / HH rows -> pairs;  rankings  K ranked responses per prompt
  packing     several pairs per row;  synthetic  the embedded task (reviews, ground-truth reward r*, tokenizer)

Import the submodule you need (`from dpo_jax.data import preference`); nothing is re-exported here so that
importing the package stays cheap.
"""
