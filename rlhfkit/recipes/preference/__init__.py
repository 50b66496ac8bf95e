"""Preference data sets (HH-RLHF, user JSONL comparison files)."""
