"""dpo_jax: Direct Preference Optimization in JAX/Flax, sharded from the first line.

Modules (imports flow one way, top to bottom):
  train -> step, data, checkpoint, evaluate -> logprobs, losses, optim -> model -> sharding
"""

__version__ = "0.1.0"
