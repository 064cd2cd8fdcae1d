#!/usr/bin/env bash
# One prepared check on one CUDA GPU, under 8 minutes: the GPU-marked tests (LoRA/AdaLoRA/prefix in
# bf16, the Trainer's bf16 and fp16 paths, QLoRA on a bitsandbytes 4-bit base, and the rest of the
# suite's gpu tests), then the QLoRA benchmark and compare.py --vs-peft at a size that fits the time.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with peftkit[test] installed
#
# Output: the pytest summary and both benchmark tables on stdout; JSON under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

python - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

echo "== gpu-marked tests =="
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests

echo "== QLoRA: LoRA on a 4-bit base vs full precision vs peft (bf16 compute) =="
timeout 120 python benchmarks/qlora.py --device cuda --rounds 5

echo "== compare.py --device cuda --vs-peft (the CUDA default model, batch 4 x 1024 tokens) =="
timeout 150 python benchmarks/compare.py --device cuda --vs-peft --rounds 5 --warmup 2 --batch 4 --seq 1024
