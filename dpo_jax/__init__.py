"""dpo_jax: Direct Preference Optimization in JAX/Flax, sharded from the first line.

The modules here are the pure core a notebook imports (model, attention, lora, logprobs, losses, step, optim,
sharding, sample, evaluate, flops); the wings sit around it: data/ (numpy only), interop/, train/, experiments/.
Imports run one way, experiments -> train -> interop -> core and data (.importlinter; README "Layout").
"""

__version__ = "0.1.0"
