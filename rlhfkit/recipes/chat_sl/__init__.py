"""Chat supervised-learning datasets (NoRobots, LIMA, JSONL chats, HH-RLHF chosen transcripts)."""
