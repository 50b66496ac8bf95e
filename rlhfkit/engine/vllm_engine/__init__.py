"""The vLLM engine: the code that runs in the Python of an environment with vLLM (core.py: the vLLM calls;
cpu_ops.py: its CPU LoRA ops; inference.py: the inference-engine interface a Ray actor serves; worker.py: the
process of the local sampler="vllm" backend, run as `python -m rlhfkit.engine.vllm_engine.worker`) and how it is
started (launch.py). Every module here imports only what that environment has: the standard library, vLLM,
torch, transformers, safetensors, numpy, Ray, and of rlhfkit only engine.types, engine.requests,
engine.settings, paths and this folder (tests/test_layers.py checks)."""
