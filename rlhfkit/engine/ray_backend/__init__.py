"""The Ray backend (EngineSettings.backend="ray"): training clients as groups of data-parallel actors
(training.py, torch.distributed between them), sampling clients served by a pool of inference-engine actors per
base model (sampling.py: the torch engine, or the vLLM engine of vllm_engine/ in the vLLM environment's
Python); backend.py ties them to one settings value, cluster.py joins or starts the cluster. Ray is imported
only when the backend is used."""
