"""Supervised fine-tuning: datasets of chat conversations, the training loop, NLL evaluation."""
