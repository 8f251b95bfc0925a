#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the tests that run CUDA code, then the CUDA figures the README
# quotes, one JSON object per line. Needs a Python where xqchat, a CUDA torch and Triton import
# (PYTHON, default .venv/bin/python) and the default model installed.
#   bash packaging/gpu_check.sh [DATA_DIR (../shared/data)] [OUT (gpu-bench.jsonl)]
set -uo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
out=${2:-gpu-bench.jsonl}
python=${PYTHON:-.venv/bin/python}

"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA GPU')" || exit 1
"$python" -m pytest -q tests/test_kernels.py tests/test_int8.py tests/test_torch_backend.py tests/test_speculative.py
tests=$?

prompts="--prompts $data/mt_bench_questions.jsonl"
text="--text $data/wikitext2_test.txt --windows 8 --chunk 64"
while read -r args; do
  echo "== xqchat bench $args --device cuda"
  # shellcheck disable=SC2086  # $args is a list of options
  "$python" -m xqchat.app.cli bench $args --device cuda --json |
    "$python" -c "import json, sys; d = json.load(sys.stdin); d['args'] = sys.argv[1:]; print(json.dumps(d))" $args |
    tee -a "$out"
done <<EOF
speed $prompts --limit 10 --new-tokens 128 --weights bf16
speed $prompts --limit 10 --new-tokens 128 --weights int8
speed $prompts --limit 10 --new-tokens 128 --weights bf16 --drafter auto
speed $prompts --limit 10 --new-tokens 128 --weights int8 --drafter auto
speed $prompts --limit 3 --new-tokens 64 --context 2048 --weights bf16 --cache kv
speed $prompts --limit 3 --new-tokens 64 --context 2048 --weights bf16 --cache xquant-cl --bits 3
speed $prompts --limit 2 --new-tokens 32 --context 7000 --weights bf16 --cache kv
speed $prompts --limit 2 --new-tokens 32 --context 7000 --weights bf16 --cache xquant-cl --bits 3
ppl $text --weights fp32
ppl $text --weights bf16
ppl $text --weights bf16 --cache xquant-cl --bits 3
ppl $text --weights int8
EOF
exit $tests
