"""The trainer: `python -m dpo_jax.train` (__main__.py) runs the seed's pipeline (SFT -> DPO -> evaluate) from a config,
with its checkpoints, metrics, preemption handling, multi-host start-up and `--dry_run`."""
