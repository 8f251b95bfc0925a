#!/usr/bin/env bash
# llama-cpp-python for `xqchat bench speed --compare llama.cpp`, built from source for one CPU
# level into .bench/llama-cpp-<level> (a --target folder the bench puts on the worker's path):
#   avx2     AVX2 + FMA + F16C, as on most laptops (and how this CPU is capped for "as on AVX2")
#   avx512   AVX-512 with VNNI and BF16 where the CPU has them, without AMX (AMX tiles crashed
#            llama.cpp 0.3.36 on prompts of more than one token on this machine's VM)
#   native   whatever -march=native gives (llama.cpp's own default)
# Not part of the test suite: it compiles llama.cpp (about 5 minutes on 2 cores).
set -euo pipefail
level=${1:?usage: install_llama_cpp.sh avx2|avx512|native}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
target=$root/.bench/llama-cpp-$level
version=${LLAMA_CPP_VERSION:-0.3.36}
x86="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
no_amx="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
case $level in
  avx2) flags="$x86 $no_amx" ;;
  avx512) flags="$x86 -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON $no_amx" ;;
  native) flags="-DGGML_NATIVE=ON" ;;
  *) echo "unknown level $level (avx2, avx512 or native)" >&2; exit 2 ;;
esac
if [ -f "$target/llama_cpp/__init__.py" ]; then
  echo "llama-cpp-python ($level) is already in $target"; exit 0
fi
echo "building llama-cpp-python $version for $level into $target (several minutes) …"
rm -rf "$target.partial"
# --no-cache-dir: pip keeps the wheel it built, keyed by the source alone, and would hand a later
# level the first level's build whatever CMAKE_ARGS say (the avx2 and avx512 folders both held the
# -march=native build with its AMX kernels, and crashed as it does).
CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$python" -m pip install --quiet \
  --no-cache-dir --no-deps --no-binary llama-cpp-python --target "$target.partial" \
  "llama-cpp-python==$version" diskcache
if [ "$level" != native ] && grep -qa ggml_backend_amx_mul_mat "$target.partial"/llama_cpp/lib/libggml-cpu.so; then
  echo "the $level build has llama.cpp's AMX kernels: CMAKE_ARGS were not applied" >&2; exit 1
fi
mv "$target.partial" "$target"
echo "done: $target"
