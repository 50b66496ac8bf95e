"""The torch engine: sampling and scoring (sampler.py, with the KV-cache capabilities of capabilities.py) and LoRA
training (trainer.py, losses.py) with torch in the calling process; batching.py plans padded microbatches.
Both backends run it: the local one in this process, the Ray one inside its actors."""
