"""Stage 3: reinforcement learning of a policy against a reward (here a pairwise preference model)."""
