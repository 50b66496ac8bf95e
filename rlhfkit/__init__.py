"""rlhfkit: the three-stage RLHF pipeline (SFT, preference model, RL) on local hardware."""

__version__ = "0.1.0"
