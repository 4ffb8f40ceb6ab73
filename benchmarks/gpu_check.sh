#!/usr/bin/env bash
# The one prepared GPU check (issues 3 and 13): at most ~8 minutes on one H100/H200. From anywhere:
#     bash benchmarks/gpu_check.sh
#     SERE_GPU_FULL=1 bash benchmarks/gpu_check.sh        # also the compile-only check and every kernel shape
#     SERE_GPU_BUDGET_S=900 bash benchmarks/gpu_check.sh  # a longer overall time box (default 470 s)
# Steps, each time-boxed with `timeout` inside one overall budget (a step gets at most what is left):
#   environment -> fresh build of the extension (CPU + CUDA) -> [compile-only check, SERE_GPU_FULL]
#   -> tests/test_native.py, CUDA tests required (kernel parity, no host sync, CUDA-graph replay)
#   -> the hook op on the GPU: parity with the torch spec for every rule, inside a CUDA graph with
#      counters and count gate, timings vs the old hook (bench_kernels_gpu.py --parts route)
#   -> the Qwen3-30B-A3B-shaped MoE layer (E=128, k=8, hidden 2048, intermediate 768) with and without
#      re-routing (bench_kernels_gpu.py --parts moe; plus the kernel sweep with SERE_GPU_FULL)
#   -> end-to-end vLLM TPOT A/B, CUDA graphs on, on a 4-layer Qwen3-30B-A3B-shaped random bf16 checkpoint,
#      batch 1, 16, 32, 64 (bench_tpot.py --gpu: `tpot_gpu` rows under "headline")
#   -> the hook op's CPU timings on this host (benchmarks/bench_hook.py, when present)
# Everything lands in $OUT (default benchmarks/results/): gpu_env.txt, build.log, check_compile.log,
# test_native_gpu.log, route_gpu.{log,json}, kernels_gpu.{log,json}, tpot_gpu.{log,json,png}, hook_gpu_host.{log,json}.
# A failed or timed-out step is reported loudly, later steps still run where they can, and the exit
# status is 1 if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SERE_EXT_CACHE=${SERE_EXT_CACHE:-$(mktemp -d)/sere_ext}  # fresh: the build itself is under test
unset SERE_NATIVE
FULL=${SERE_GPU_FULL:-}
DEADLINE=$(( $(date +%s) + ${SERE_GPU_BUDGET_S:-470} ))
failed=()
step() { echo; echo "=== $* ($(( DEADLINE - $(date +%s) )) s left) ==="; }
fail() { echo "!!! FAILED: $*" >&2; failed+=("$*"); }
# tbox WANT: a step's timeout in seconds, WANT capped by what is left of the budget (0 = no time left)
tbox() {
  local want=$1 left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 10 ]; then echo 0; elif [ "$left" -lt "$want" ]; then echo "$left"; else echo "$want"; fi
}
# run_boxed NAME WANT LOG CMD...: CMD under timeout, output teed to LOG; records a failure or a timeout
run_boxed() {
  local name=$1 want=$2 log=$3 t rc
  shift 3
  t=$(tbox "$want")
  if [ "$t" = 0 ]; then fail "$name: skipped, out of time (SERE_GPU_BUDGET_S)"; return 1; fi
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then fail "$name: timed out after $t s"; return 1; fi
  if [ "$rc" != 0 ]; then fail "$name (exit $rc)"; return 1; fi
  return 0
}

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
    "$PY" -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -n 1
  fi
  nproc
  uptime
} 2>&1 | tee "$OUT/gpu_env.txt"
if [ -z "$PY" ]; then
  fail "no Python with a CUDA-enabled torch found (tried: ${PYTHON:-} .venv/bin/python python3 python)"
  echo "gpu_check: FAILED: ${failed[*]}" >&2
  exit 1
fi

step "build the extension into $SERE_EXT_CACHE"
t0=$(date +%s)
run_boxed "extension build" 150 "$OUT/build.log" "$PY" - <<'PY'
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
if [ -n "$FULL" ]; then
  run_boxed "cuda_ext/check_compile.sh" 120 "$OUT/check_compile.log" env PYTHON="$PY" bash cuda_ext/check_compile.sh
else
  echo "skipped: the build above compiled the same sources (SERE_GPU_FULL=1 runs it)" | tee "$OUT/check_compile.log"
fi

step "tests/test_native.py (CUDA tests must run, not skip)"
if "$PY" -c "import pytest" 2>/dev/null; then
  run_boxed "tests/test_native.py" 75 "$OUT/test_native_gpu.log" \
    "$PY" -m pytest -q tests/test_native.py -p no:cacheprovider -rs -o addopts=""
  if grep -qi "skipped" "$OUT/test_native_gpu.log"; then fail "some tests were skipped on a GPU machine"; fi
else
  fail "pytest is not installed for $PY: GPU parity tests not run (the benchmark still checks parity per case)"
fi

step "the hook op on the GPU: parity (every rule), CUDA graph with counters, timings"
run_boxed "bench_kernels_gpu.py --parts route" 45 "$OUT/route_gpu.log" \
  "$PY" benchmarks/bench_kernels_gpu.py --parts route --out "$OUT/route_gpu.json"

step "the Qwen3-30B-A3B-shaped MoE layer with and without re-routing${FULL:+, and the kernel sweep}"
if [ -n "$FULL" ]; then
  run_boxed "bench_kernels_gpu.py" 240 "$OUT/kernels_gpu.log" \
    "$PY" benchmarks/bench_kernels_gpu.py --parts kernels,moe --out "$OUT/kernels_gpu.json"
else
  run_boxed "bench_kernels_gpu.py --quick" 50 "$OUT/kernels_gpu.log" \
    "$PY" benchmarks/bench_kernels_gpu.py --quick --parts moe --out "$OUT/kernels_gpu.json"
fi

step "end-to-end vLLM TPOT, plain vs SERE S=2, CUDA graphs on, batch 1/16/32/64"
if "$PY" -c "import vllm" 2>/dev/null; then
  # random 4-layer Qwen3-30B-A3B-shaped bf16 checkpoint (written once into the workdir, ~5 GB);
  # engines: plain + SERE (full decode graphs), then an eager plain one for the MoE share
  run_boxed "bench_tpot.py --gpu" 210 "$OUT/tpot_gpu.log" \
    "$PY" benchmarks/bench_tpot.py --gpu --batch-sizes 1,16,32,64 --s-values 2 --repeats 5 --tokens 32 \
    --workdir "${SERE_GPU_WORKDIR:-/tmp/sere_gpu_tpot}" --out "$OUT/tpot_gpu.json"
else
  fail "vLLM is not importable by $PY: no end-to-end TPOT (.ci/setup.sh installs vllm where nvidia-smi works)"
fi

step "benchmarks/bench_hook.py (the hook op on this host's CPU, 1 thread)"
if [ -f benchmarks/bench_hook.py ]; then
  run_boxed "bench_hook.py" 40 "$OUT/hook_gpu_host.log" \
    "$PY" benchmarks/bench_hook.py --repeats 3 --calls 200 --out "$OUT/hook_gpu_host.json"
else
  echo "skipped: benchmarks/bench_hook.py is not in this checkout"
fi

echo
uptime
if [ ${#failed[@]} -gt 0 ]; then
  printf 'gpu_check: FAILED:\n' >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "gpu_check: OK; results in $OUT (python benchmarks/make_results.py puts tpot_gpu into headline.json)"
