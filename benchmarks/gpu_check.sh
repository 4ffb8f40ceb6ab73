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
#   -> end-to-end decode TPOT A/B, CUDA graphs on, of a 4-layer Qwen3-30B-A3B-shaped random bf16 model,
#      batch 1, 16, 32, 64: in a torch decode loop (bench_decode_torch.py, always), and in vLLM engines
#      (bench_tpot.py --gpu) where vLLM is importable; each writes `tpot_gpu` rows under "headline"
#   -> the hook op's CPU timings on this host (benchmarks/bench_hook.py, when present)
# The lent H200's image has torch but neither pydantic (sere_dist's config) nor vLLM: fetch the small
# wheels here first with `bash benchmarks/gpu_wheels.sh` (-> .whl/, git-ignored) and carry them:
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
# Every wheel in .whl/ is installed into a scratch folder on PYTHONPATH before the first step. vLLM cannot
# travel (it pins torch 2.13.0 against the image's 2.11.0, and its wheel is over 300 MiB).
# A device call brings back at most 8 files from its $OUT, so there pack them into one:
#     run(command="D=$OUT; OUT=/tmp/gc PACK=$D/gpu_check.tgz bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
# then here: tar xzf <files_at>/gpu_check.tgz -C benchmarks/results && python benchmarks/make_results.py
# Everything lands in $OUT (default benchmarks/results/): gpu_env.txt, build.log, check_compile.log,
# test_native_gpu.log, route_gpu.{log,json}, kernels_gpu.{log,json}, tpot_gpu_torch.{log,json,png},
# [tpot_gpu.{log,json,png}], hook_gpu_host.{log,json}.
# A failed or timed-out step is reported loudly, later steps still run where they can, and the exit
# status is 1 if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PACK=${PACK:-}
# PACK=file.tgz: everything in $OUT packed into one file on exit, whatever the outcome
if [ -n "$PACK" ]; then trap 'tar czf "$PACK" -C "$OUT" . && echo "packed $OUT into $PACK"' EXIT; fi
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

# Carried wheels (benchmarks/gpu_wheels.sh) into a scratch folder ahead of everything else on PYTHONPATH.
WHEELS_NOTE="no .whl/ folder carried"
if [ -n "$PY" ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d)/site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE:$PYTHONPATH"
    WHEELS_NOTE="installed into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    fail "installing the carried wheels in .whl/ (pip exit status above)"
    WHEELS_NOTE="install FAILED"
  fi
fi

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
  echo "carried wheels: $WHEELS_NOTE"
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

step "what the steps import"
# sere_dist.core.config needs pydantic; the tests need pytest. Missing modules are named here, once.
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/gpu_env.txt" || fail "imports: a module the steps need is missing (bash benchmarks/gpu_wheels.sh here, then carry .whl)"
import importlib, sys
missing = []
for name in ("pydantic", "safetensors", "numpy", "pytest", "sere_dist.core.config", "tests.support", "vllm"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing.append(name)
        print(f"  cannot import {name}: {type(exc).__name__}: {exc}")
print("imports:", "all present" if not missing else "missing " + ", ".join(missing))
sys.exit(1 if [m for m in missing if m != "vllm"] else 0)
PY

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

step "end-to-end decode TPOT in a torch decode loop, plain vs SERE S=1,2, CUDA graphs, batch 1/16/32/64"
# random 4-layer Qwen3-30B-A3B-shaped bf16 model generated on the GPU (no checkpoint): seconds to start
run_boxed "bench_decode_torch.py" 120 "$OUT/tpot_gpu_torch.log" \
  "$PY" benchmarks/bench_decode_torch.py --batch-sizes 1,16,32,64 --s-values 1,2 --repeats 10 --tokens 32 \
  --out "$OUT/tpot_gpu_torch.json"

step "end-to-end vLLM TPOT, plain vs SERE S=2, CUDA graphs on, batch 1/16/32/64"
if "$PY" -c "import vllm" 2>/dev/null; then
  # random 4-layer Qwen3-30B-A3B-shaped bf16 checkpoint (written once into the workdir, ~5 GB);
  # engines: plain + SERE (full decode graphs), then an eager plain one for the MoE share
  run_boxed "bench_tpot.py --gpu" 210 "$OUT/tpot_gpu.log" \
    "$PY" benchmarks/bench_tpot.py --gpu --batch-sizes 1,16,32,64 --s-values 2 --repeats 5 --tokens 32 \
    --workdir "${SERE_GPU_WORKDIR:-/tmp/sere_gpu_tpot}" --out "$OUT/tpot_gpu.json"
else
  echo "NOT RUN: vLLM is not importable by $PY (the lent H200's image has none, and it cannot be carried);" \
       "the torch decode loop above is this run's end-to-end figure" | tee "$OUT/tpot_gpu.log"
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
