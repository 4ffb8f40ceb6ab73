"""Runs the CUDA re-routing kernels on the CPU, through cuda_ext/emu (a fiber emulation of CUDA threads).

`build()` compiles cuda_ext/emu/sere_reroute_emu.cpp with the system C++ compiler into the extension
cache (one file per hash of the sources and flags) and loads it with ctypes; `reroute` and
`per_slot_scan_` call the same launchers as the GPU build and return what the kernels wrote.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sere_dist.core import native

SRC = Path(__file__).resolve().parents[1] / "cuda_ext"
SOURCES = ("emu/sere_reroute_emu.cpp", "emu/cuda_emu.h", "sere_reroute_kernels.cuh", "sere_reroute.h")
FLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
         "-fvisibility=hidden")  # only the two entry points are exported
ID_TYPES = {torch.int32: 0, torch.int64: 1}
SIM_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INVALID_VALUE = 1  # cudaErrorInvalidValue


class EmulationError(RuntimeError):
    """The emulated launch failed: divergent barrier, out-of-bounds access, refused arguments."""

    def __init__(self, code: int, message: str):
        super().__init__(f"cudaError {code}: {message}")
        self.code = code


_libs: dict[tuple[Path, tuple[str, ...]], ctypes.CDLL] = {}


def build(defines: tuple[str, ...] = (), src: Path = SRC) -> ctypes.CDLL:
    """Compile (cached on disk) and load the emulation from the cuda_ext tree `src`; `defines` (e.g.
    "-DSERE_EMU_UCONTEXT") make a variant. One library per (src, defines) per process."""
    key = (src, tuple(defines))
    if key in _libs:
        return _libs[key]
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the CUDA emulation")
    h = hashlib.sha256(repr((FLAGS, defines, cxx, sys.platform)).encode())
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    out_dir = native.cache_root() / "emu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"sere_reroute_emu-{h.hexdigest()[:16]}.so"
    if not lib_path.is_file():
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([cxx, *FLAGS, *defines, str(src / SOURCES[0]), "-o", str(tmp)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib_path)  # atomic: a concurrent builder sees a whole file or none
    lib = ctypes.CDLL(str(lib_path))
    common = [ctypes.c_int, ctypes.c_int]
    tail = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int,
            ctypes.c_char_p, ctypes.c_int]
    lib.sere_reroute_emu_launch.argtypes = common + [ctypes.c_void_p] * 4 + tail
    lib.sere_reroute_emu_launch.restype = ctypes.c_int
    lib.sere_per_slot_emu_launch.argtypes = common + [ctypes.c_void_p] * 3 + tail
    lib.sere_per_slot_emu_launch.restype = ctypes.c_int
    _libs[key] = lib
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(code: int, buf: ctypes.Array) -> None:
    if code != 0:
        raise EmulationError(code, buf.value.decode(errors="replace"))


def reroute(ids: torch.Tensor, sim: torch.Tensor, s: int, rho: float, valid: torch.Tensor | None = None, *,
            inplace: bool = False, guard: int = 1, num_experts: int | None = None,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The CUDA kernel's result for CPU tensors; `guard` 1/2 puts a guard page after/before every buffer."""
    lib = lib or build()
    ids = ids.contiguous()
    sim = sim.contiguous()
    valid = None if valid is None else valid.contiguous()
    out = ids.clone() if inplace else torch.full_like(ids, -7)  # a sentinel: every slot must be written
    msg = ctypes.create_string_buffer(512)
    code = lib.sere_reroute_emu_launch(
        ID_TYPES[ids.dtype], SIM_TYPES[sim.dtype], _ptr(out if inplace else ids), _ptr(out), _ptr(sim), _ptr(valid),
        ids.shape[0], ids.shape[1], s, sim.shape[0] if num_experts is None else num_experts, rho, guard, msg, 512)
    _check(code, msg)
    return out


def per_slot_scan_(ids: torch.Tensor, sim: torch.Tensor, s: int, rho: float, valid: torch.Tensor | None = None, *,
                   guard: int = 1, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The paper-shaped baseline kernels (memset, flags, one thread per secondary slot), in place."""
    lib = lib or build()
    assert ids.is_contiguous()
    sim = sim.contiguous()
    msg = ctypes.create_string_buffer(512)
    code = lib.sere_per_slot_emu_launch(
        ID_TYPES[ids.dtype], SIM_TYPES[sim.dtype], _ptr(ids), _ptr(sim), _ptr(valid), ids.shape[0], ids.shape[1], s,
        sim.shape[0], rho, guard, msg, 512)
    _check(code, msg)
    return ids
