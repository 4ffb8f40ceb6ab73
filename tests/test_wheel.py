"""A wheel built from the repo carries the kernel sources, and a non-editable install builds and runs them.

`pip wheel` builds the wheel with the real build backend (setup.py copies cuda_ext/'s sources into
sere_dist/csrc/), a fresh venv gets it installed non-editable, and a subprocess outside the repo
imports sere_dist from that venv, compiles the CPU kernel from the installed csrc/ and checks one
re-route against the torch reference. The fresh venv borrows torch and the other heavy
dependencies from this venv through a .pth path line (a plain path line does not process the .pth
files in that directory, so this venv's editable sere_dist finder stays out).
"""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from sere_dist.core import native

REPO = Path(__file__).resolve().parents[1]
CSRC = "sere_dist/csrc/"
KERNEL_FILES = {"sere_reroute.cpp", "sere_reroute_cuda.cu", "sere_reroute.h", "sere_reroute_kernels.cuh"}

CHECK = textwrap.dedent("""
    import json, sys
    import torch
    import sere_dist
    from sere_dist.core import native
    from sere_dist.core.reroute import reroute

    out = {"file": sere_dist.__file__, "native": native.__file__, "source_dir": str(native.source_dir())}
    out["loaded"] = native.load_extension()
    out["error"] = native.extension_error()
    out["backend"] = native.backend("cpu")
    torch.manual_seed(0)
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    sim = torch.rand(4, 4).fill_diagonal_(1.0)
    got = native.reroute_fast(ids, sim, 1, 0.0)
    want = reroute(ids, sim, 1, 0.0)[0]
    out["got"], out["want"] = got.tolist(), want.tolist()
    out["dtype_ok"] = got.dtype == ids.dtype
    print("RESULT " + json.dumps(out))
""")


def _run(cmd, what, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                                  f"--- stdout tail ---\n{proc.stdout[-3000:]}\n--- stderr tail ---\n{proc.stderr[-3000:]}")
    return proc


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip_supports_python_option() -> bool:
    import pip

    major, minor = (int(x) for x in pip.__version__.split(".")[:2])
    return (major, minor) >= (22, 3)


def test_setup_py_lists_what_native_needs():
    # setup.py hard-codes the file list (it cannot import sere_dist): it must match what native.py requires
    assert set(native._SOURCES + native._HEADERS) == KERNEL_FILES


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_ships_kernel_sources_and_builds_them(tmp_path):
    py = sys.executable

    # 1. the wheel, built from the repo by pip with the real backend. setuptools would reuse (and
    # never clean) the repo's ./build/lib, so a csrc/ left there by an earlier build could hide a
    # broken setup.py: a private HOME whose ~/.pydistutils.cfg points build_base into tmp_path.
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pydistutils.cfg").write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n")
    wheels = tmp_path / "wheels"
    _run([py, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q", "-w", str(wheels),
          str(REPO)], "pip wheel", cwd=tmp_path, env={**os.environ, "HOME": str(home)})
    assert (tmp_path / "build" / "lib" / "sere_dist").is_dir(), "setuptools did not build in the private build_base"
    [wheel] = list(wheels.glob("sere_dist-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    csrc = {n[len(CSRC):] for n in names if n.startswith(CSRC)}
    assert csrc == KERNEL_FILES, f"{wheel.name}: sere_dist/csrc/ holds {sorted(csrc)}, want {sorted(KERNEL_FILES)}"
    extra = [n for n in names if "emu/" in n or "check_compile" in n or n.startswith("cuda_ext/")]
    assert not extra, f"{wheel.name} ships cuda_ext's development tools: {extra}"
    # no stale modules from an old ./build/lib: every module in the wheel exists in the source tree
    stale = [n for n in names if n.endswith(".py") and not (REPO / n).is_file()]
    assert not stale, f"{wheel.name} ships modules the source tree does not have: {stale}"
    assert not (REPO / "sere_dist" / "csrc").exists(), "the build must not create sere_dist/csrc in the source tree"

    # 2. a fresh venv that borrows this venv's dependencies, with the wheel installed non-editable
    venv = tmp_path / "venv"
    _run([py, "-m", "venv", "--without-pip", str(venv)], "python -m venv")
    vpy = _venv_python(venv)
    paths = json.loads(_run([str(vpy), "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"],
                            "fresh venv sysconfig").stdout)
    site = Path(paths["purelib"])
    (site / "_sere_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if _pip_supports_python_option():
        _run([py, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "-q", str(wheel)],
             "pip install of the wheel")
    else:  # pip < 22.3: install straight into the fresh venv's site-packages
        _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
             "pip install --target of the wheel")
    installed = site / "sere_dist"
    assert (installed / "csrc" / "sere_reroute.cpp").is_file(), f"no csrc/ in the installed package {installed}"
    assert not (installed / "__init__.py").is_symlink()

    # 3. outside the repo: import from the fresh venv, build the CPU kernel from csrc/, re-route
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "SERE_EXT_SRC", "SERE_NATIVE", "VIRTUAL_ENV", "PYTHONHOME")}
    env["SERE_EXT_CACHE"] = str(tmp_path / "ext")
    env["PYTHONNOUSERSITE"] = "1"
    work = tmp_path / "work"
    work.mkdir()
    proc = _run([str(vpy), "-c", CHECK], "the installed package's check", cwd=work, env=env, timeout=480)
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    tail = f"\n--- stderr tail ---\n{proc.stderr[-3000:]}"

    venv_r = venv.resolve()
    assert Path(out["file"]).resolve().is_relative_to(venv_r), f"sere_dist imported from {out['file']}, not {venv}{tail}"
    assert not Path(out["file"]).resolve().is_relative_to(REPO), f"sere_dist imported from the repo: {out['file']}{tail}"
    assert Path(out["source_dir"]).resolve() == (installed / "csrc").resolve(), \
        f"kernel sources taken from {out['source_dir']}, not the installed {installed / 'csrc'}{tail}"
    assert out["loaded"] is True, f"the native extension did not build from the wheel: {out['error']}{tail}"
    assert out["backend"] == "cpp", f"backend('cpu') is {out['backend']!r}{tail}"
    assert out["dtype_ok"], f"reroute_fast changed the ids' dtype{tail}"
    assert out["got"] == out["want"], f"native {out['got']} != torch reference {out['want']}{tail}"
    assert list((tmp_path / "ext").glob("sere_dist_reroute-*/sere_dist_reroute.so")), \
        f"no library in $SERE_EXT_CACHE {tmp_path / 'ext'}{tail}"
