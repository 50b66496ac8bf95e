"""The local backend (EngineSettings.backend="local"): clients in this process. Training runs the torch engine on
a worker thread (training.py); sampling runs the torch engine directly, or, with sampler="vllm", a vLLM
worker process of this machine (vllm_client.py)."""
