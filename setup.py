"""Ship the native kernel sources inside the wheel; all metadata lives in pyproject.toml.

The kernels (`cuda_ext/`) are compiled on first use by `sere_dist.core.native`, which looks for
their sources in the repo's `cuda_ext/` (source checkout, editable install) and else in the
installed package's `sere_dist/csrc/`. A regular (non-editable) build copies the sources listed
below from `cuda_ext/` into `<build_lib>/sere_dist/csrc/`, so the wheel carries them; the source
tree never gets a `sere_dist/csrc/`. `cuda_ext/emu/`, `check_compile.sh` and the README are
development tools and stay out. MANIFEST.in puts the same files into an sdist, so a wheel built
from the sdist has them too.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
KERNEL_DIR = "cuda_ext"
# keep in step with sere_dist/core/native.py: _SOURCES + _HEADERS (tests/test_wheel.py checks)
KERNEL_SOURCES = ("sere_reroute.cpp", "sere_reroute_cuda.cu", "sere_reroute.h", "sere_reroute_kernels.cuh")
PACKAGE = "sere_dist"
CSRC = "csrc"


class build_py_with_kernels(build_py):
    """build_py that also copies the kernel sources into the package's csrc/ (not when editable)."""

    def _kernel_outputs(self) -> list[tuple[str, str]]:
        out_dir = os.path.join(self.build_lib, PACKAGE, CSRC)
        return [(os.path.join(out_dir, name), str(HERE / KERNEL_DIR / name)) for name in KERNEL_SOURCES]

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the editable install finds the repo's cuda_ext/ itself
            return
        for target, src in self._kernel_outputs():
            if not os.path.isfile(src):
                raise FileNotFoundError(f"native kernel source missing: {src}")
            self.mkpath(os.path.dirname(target))
            self.copy_file(src, target)
        self._prune_stale()

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs += [target for target, _ in self._kernel_outputs()]
        return outputs

    def _prune_stale(self) -> None:
        """Drop files under <build_lib>/sere_dist that this build did not produce.

        setuptools reuses ./build/lib between builds and never cleans it, and install_lib copies
        the whole tree into the wheel: a module moved or deleted since the last build would
        otherwise still ship in it.
        """
        root = Path(self.build_lib, PACKAGE).resolve()
        if not root.is_dir():
            return
        keep = {Path(p).resolve() for p in self.get_outputs(include_bytecode=True)}
        for path in sorted(root.rglob("*"), reverse=True):  # children before their directories
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.resolve() not in keep:
                path.unlink()


setup(cmdclass={"build_py": build_py_with_kernels})
