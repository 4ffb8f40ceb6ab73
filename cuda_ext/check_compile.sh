#!/usr/bin/env bash
# Compile-only check of the native re-routing kernels, for CI machines with nvcc and no GPU:
#   1. nvcc compiles the CUDA core (sere_reroute_cuda.cu) to an object with real SASS for sm_80 and
#      sm_90 (ptxas runs: not --dryrun, not -cuda), warnings as errors, and ptxas must report both archs;
#   2. g++ compiles sere_reroute.cpp (CPU kernel + torch op registration) to objects twice: the CPU build,
#      and with the guarded CUDA wrapper (SERE_WITH_CUDA) against torch's c10/cuda headers. A CPU torch
#      ships those headers but not the generated cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#      skips (it only holds Windows export macros).
# Nothing is linked (that needs a CUDA torch); `sere_dist.core.native` builds and links on first use.
# Usage: cuda_ext/check_compile.sh   (env: PYTHON, NVCC, CUDA_HOME, CXX, SERE_CHECK_ARCHS="80 90")
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NVCC=${NVCC:-$( [ -n "${CUDA_HOME:-}" ] && echo "$CUDA_HOME/bin/nvcc" || command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  echo "check_compile: FAIL: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi
if [ -z "${CUDA_HOME:-}" ]; then  # nvcc may be a wrapper script: take the first root with the headers
  for c in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [ -f "$c/include/cuda_runtime.h" ]; then CUDA_HOME=$c; break; fi
  done
fi
[ -f "${CUDA_HOME:-}/include/cuda_runtime.h" ] || { echo "check_compile: FAIL: set CUDA_HOME (no cuda_runtime.h)" >&2; exit 1; }
CXX=${CXX:-g++}
ARCHS=${SERE_CHECK_ARCHS:-"80 90"}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
t0=$(date +%s)

gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done

echo "check_compile: $("$NVCC" --version | tail -n 1), archs: $ARCHS"
mapfile -t torch_inc < <("$PY" -c "from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)")
inc=()
for p in "${torch_inc[@]}"; do inc+=(-isystem "$p"); done
cxxflags=(-std=c++20 -O1 -fPIC -fopenmp -Wall -Wextra -Werror)
# the flags torch's JIT build passes to nvcc (e.g. -D__CUDA_NO_HALF_CONVERSIONS__), so the check sees what it sees
mapfile -t torch_nvcc < <("$PY" -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
for f in COMMON_NVCC_FLAGS: print(f)")

# The three compiles run side by side; each writes its log, and every failure is reported.
"$NVCC" -c cuda_ext/sere_reroute_cuda.cu -o "$out/sere_reroute_cuda.o" -std=c++20 -O3 -Xcompiler -fPIC \
  "${torch_nvcc[@]}" "${gencode[@]}" -Werror all-warnings -Xptxas -v >"$out/nvcc.log" 2>&1 &
nvcc_pid=$!
"$CXX" -c cuda_ext/sere_reroute.cpp -o "$out/cpu.o" "${cxxflags[@]}" "${inc[@]}" >"$out/cpu.log" 2>&1 &
cpu_pid=$!
"$CXX" -c cuda_ext/sere_reroute.cpp -o "$out/cuda_wrapper.o" "${cxxflags[@]}" "${inc[@]}" \
  -isystem "$CUDA_HOME/include" -DSERE_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE >"$out/wrapper.log" 2>&1 &
wrapper_pid=$!

fail=0
if wait "$nvcc_pid"; then
  for a in $ARCHS; do
    grep -q "for 'sm_$a'" "$out/nvcc.log" || { echo "check_compile: FAIL: no SASS for sm_$a" >&2; fail=1; }
  done
  if grep "bytes spill" "$out/nvcc.log" | grep -vq " 0 bytes spill stores, 0 bytes spill loads"; then
    echo "check_compile: warning: register spills:" >&2
    grep "bytes spill" "$out/nvcc.log" | sort -u >&2
  fi
  [ -s "$out/sere_reroute_cuda.o" ] || { echo "check_compile: FAIL: nvcc wrote no object" >&2; fail=1; }
  [ $fail = 0 ] && echo "check_compile: CUDA core ok ($(wc -c <"$out/sere_reroute_cuda.o") bytes," \
    "$(grep -c "Compiling entry" "$out/nvcc.log") kernel compilations)"
else
  grep -v "^ptxas info" "$out/nvcc.log" >&2; echo "check_compile: FAIL: nvcc sere_reroute_cuda.cu" >&2; fail=1
fi
if wait "$cpu_pid"; then echo "check_compile: C++ CPU build ok"
else cat "$out/cpu.log" >&2; echo "check_compile: FAIL: g++ sere_reroute.cpp (CPU)" >&2; fail=1; fi
if wait "$wrapper_pid"; then echo "check_compile: C++ build with the CUDA wrapper ok"
else cat "$out/wrapper.log" >&2; echo "check_compile: FAIL: g++ sere_reroute.cpp -DSERE_WITH_CUDA" >&2; fail=1; fi
[ $fail = 0 ] || exit 1
echo "check_compile: OK in $(( $(date +%s) - t0 )) s"
