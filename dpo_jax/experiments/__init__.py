"""Experiments on top of the trainer: the seed's reward-vs-KL frontier, one-program sweeps, loss ablations, the SFT /
Preferred-FT / unlikelihood baselines and the Bradley-Terry reward model behind best-of-N."""
