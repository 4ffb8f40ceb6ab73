#!/usr/bin/env bash
# The one prepared GPU check for the native re-routing kernels (issue 3). On a machine with an NVIDIA GPU,
# a CUDA build of torch and nvcc, from anywhere:
#     bash benchmarks/gpu_check.sh            # full run, a few minutes on an H100/H200
#     SERE_GPU_QUICK=1 bash benchmarks/gpu_check.sh
# Steps: environment report -> fresh build of the extension (CPU + CUDA) -> compile-only check ->
# tests/test_native.py with the CUDA tests required to run -> benchmarks/bench_kernels_gpu.py.
# Everything lands in $OUT (default benchmarks/results/): gpu_env.txt, build.log, check_compile.log,
# test_native_gpu.log, kernels_gpu.log, kernels_gpu.json. A failed step is reported loudly, later steps
# still run where they can, and the exit status is 1 if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SERE_EXT_CACHE=${SERE_EXT_CACHE:-$(mktemp -d)/sere_ext}  # fresh: the build itself is under test
unset SERE_NATIVE
failed=()
step() { echo; echo "=== $* ==="; }
fail() { echo "!!! FAILED: $*" >&2; failed+=("$*"); }

# A Python with a CUDA torch: $PYTHON, the repo venv, or python3.
PY=""
for cand in ${PYTHON:-} .venv/bin/python python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=$cand; break
  fi
done

step "environment"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || echo "nvidia-smi failed"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  if [ -n "$PY" ]; then
    "$PY" -c "import torch, sys; p = torch.cuda.get_device_properties(0); print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', p.name, f'sm_{p.major}{p.minor}', p.multi_processor_count, 'SMs')"
  fi
  nproc
} 2>&1 | tee "$OUT/gpu_env.txt"
if [ -z "$PY" ]; then
  fail "no Python with a CUDA-enabled torch found (tried: ${PYTHON:-} .venv/bin/python python3 python)"
  echo "gpu_check: FAILED: ${failed[*]}" >&2
  exit 1
fi

step "build the extension into $SERE_EXT_CACHE"
t0=$(date +%s)
if "$PY" - <<'PY' 2>&1 | tee "$OUT/build.log"; then :; else fail "extension build"; fi
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from sere_dist.core import native
cpu, cuda = native.backend("cpu"), native.backend("cuda")
print(f"backend cpu={cpu} cuda={cuda} library={native._state['library']}")
if (cpu, cuda) != ("cpp", "cuda"):
    print(f"build did not give both kernels: {native.extension_error()}", file=sys.stderr)
    sys.exit(1)
PY
echo "build took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"

step "compile-only check (the CI one)"
PYTHON="$PY" bash cuda_ext/check_compile.sh 2>&1 | tee "$OUT/check_compile.log" || fail "cuda_ext/check_compile.sh"

step "tests/test_native.py (CUDA tests must run, not skip)"
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q tests/test_native.py -p no:cacheprovider -rs -o addopts="" 2>&1 | tee "$OUT/test_native_gpu.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || fail "tests/test_native.py (exit $rc)"
  if grep -qi "skipped" "$OUT/test_native_gpu.log"; then fail "some tests were skipped on a GPU machine"; fi
else
  fail "pytest is not installed for $PY: GPU parity tests not run (the benchmark still checks parity per case)"
fi

step "benchmarks/bench_kernels_gpu.py"
quick=()
[ -n "${SERE_GPU_QUICK:-}" ] && quick=(--quick)
"$PY" benchmarks/bench_kernels_gpu.py "${quick[@]}" --out "$OUT/kernels_gpu.json" 2>&1 | tee "$OUT/kernels_gpu.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || fail "bench_kernels_gpu.py (exit $rc)"

echo
if [ ${#failed[@]} -gt 0 ]; then
  printf 'gpu_check: FAILED:\n' >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "gpu_check: OK; results in $OUT"
