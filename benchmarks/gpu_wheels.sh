#!/usr/bin/env bash
# Fetch, on a machine with the package registry, the wheels that benchmarks/gpu_check.sh needs on a GPU
# machine that has no registry: what the lent H200's image lacks (its python3 is CPython 3.12 with torch,
# numpy, safetensors, pytest and pytest-timeout, but no pydantic, which sere_dist.core.config needs).
#     bash benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored), a few MB
# gpu_check.sh installs every wheel in .whl/ into a scratch folder on its PYTHONPATH before it starts, so
# the device run takes the folder along: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
# vLLM cannot travel this way: vLLM 0.32 pins torch 2.13.0 (the image has 2.11.0) and its wheel alone is
# over 300 MiB, past the 64 MiB a device call carries; gpu_check.sh then measures the end-to-end decode
# step with benchmarks/bench_decode_torch.py instead.
# Versions: the ones .ci/setup.sh installs here (pydantic and its own dependencies, pure Python apart from
# pydantic-core); PY_VERSION (default 3.12) is the GPU machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PIP=${PIP:-python3 -m pip}
PKGS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
plats=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  plats+=(--platform "$p")
done
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${plats[@]}" -d "$DEST" "${PKGS[@]}"
n=$(ls "$DEST"/*.whl | wc -l)
if [ "$n" -ne "${#PKGS[@]}" ]; then
  echo "gpu_wheels: expected ${#PKGS[@]} wheels in $DEST, found $n" >&2
  exit 1
fi
du -sh "$DEST"
ls "$DEST"
