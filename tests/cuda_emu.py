"""Runs the CUDA re-routing kernels on the CPU, through cuda_ext/emu (a fiber emulation of CUDA threads).

`build()` compiles cuda_ext/emu/sere_reroute_emu.cpp with the system C++ compiler into the extension
cache (one file per hash of the sources and flags) and loads it with ctypes; `reroute` and
`per_slot_scan_` and `route` (the whole hook) call the same launchers as the GPU build and return what the kernels wrote.
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
    lib.sere_route_emu_launch.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 7
                                          + [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                                             ctypes.c_int])
    lib.sere_route_emu_launch.restype = ctypes.c_int
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


RULES = {"paper": 0, "rank_aware": 1, "top_s": 2}


def route(ids: torch.Tensor, weights: torch.Tensor, sim: torch.Tensor, s: int, rho: float,
          valid: torch.Tensor | None = None, *, rule: str = "paper", expert_ranks: torch.Tensor | None = None,
          merge_duplicates: bool = False, counts: torch.Tensor | None = None, count_gate: torch.Tensor | None = None,
          scale: torch.Tensor | None = None, unmatched: str = "keep", keep_sum: bool = False, guard: int = 1,
          lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA `route` kernel's (ids, weights) for CPU tensors; `counts` ([5] int64) is updated in place;
    `scale` ([E, E] float32), `unmatched` and `keep_sum` select the error-aware rule."""
    from sere_dist.core.reroute import KEEP_SUM_FLAG, UNMATCHED_IDS

    lib = lib or build()
    ids, weights, sim = ids.contiguous(), weights.contiguous(), sim.contiguous()
    scale = None if scale is None else scale.contiguous()
    valid = None if valid is None else valid.contiguous()
    ranks = None if expert_ranks is None else expert_ranks.contiguous()
    out_ids = torch.full_like(ids, -7)
    out_w = torch.full_like(weights, -7.0)
    msg = ctypes.create_string_buffer(512)
    code = lib.sere_route_emu_launch(
        ID_TYPES[ids.dtype], SIM_TYPES[weights.dtype], SIM_TYPES[sim.dtype], _ptr(ids), _ptr(weights), _ptr(out_ids),
        _ptr(out_w), _ptr(sim), _ptr(valid), _ptr(ranks), 0 if ranks is None else ranks.shape[1], ids.shape[0],
        ids.shape[1], s, sim.shape[0], rho, RULES[rule], int(merge_duplicates), _ptr(scale),
        UNMATCHED_IDS[unmatched] | (KEEP_SUM_FLAG if keep_sum else 0),
        _ptr(counts), _ptr(count_gate), guard, msg, 512)
    _check(code, msg)
    return out_ids, out_w


def random_route_case(rng, max_t: int = 700, max_e: int = 200, rules=("paper", "rank_aware", "top_s")) -> dict:
    """One random `route` case (shared by the CPU-op and emulation parity tests): ids with repeats and
    out-of-order, tied or low-precision weights, every rule, merging, padding, coarse similarities
    (ties), and multi-block batch sizes up to max_t tokens."""
    from sere_dist.core.reroute import expert_ranks_for

    e = rng.randint(2, max_e)
    k = rng.randint(1, min(12, e))
    t = rng.choice([0, 1, 2, 5, 16, 64, 300, max_t])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    levels = rng.choice([5, 1000])
    sim = torch.randint(0, levels + 1, (e, e), generator=g).float() / levels
    sim = torch.maximum(sim, sim.t())
    sim.fill_diagonal_(1.0)
    logits = torch.randn(t, e, generator=g) - torch.linspace(0, rng.uniform(0, 6), e)
    ids = logits.topk(k, dim=1).indices if rng.random() < 0.7 else torch.randint(0, e, (t, k), generator=g)
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    if rng.random() < 0.3:
        w = torch.round(w * 4) / 4                                   # ties between slots
    if rng.random() < 0.5:
        w = w.sort(-1, descending=True).values                       # already in order (the fast case)
    rule = rng.choice(list(rules))
    ranks = None
    if rule == "rank_aware":
        ranks = expert_ranks_for(e, rng.randint(1, min(8, e)), rng.choice(["linear", "round_robin"]))
        if rng.random() < 0.3:                                       # replicated experts (EPLB-like)
            ranks = ranks | (torch.rand(ranks.shape, generator=g) < 0.2)
    return dict(ids=ids.to(rng.choice([torch.int32, torch.int64])),
                weights=w.to(rng.choice([torch.float32, torch.bfloat16, torch.float16])),
                sim=sim.to(rng.choice([torch.float32, torch.bfloat16, torch.float16])),
                s=rng.randint(1, k), rho=rng.choice([0.0, 0.3, 0.9, 1.0]),
                valid=(torch.rand(t, generator=g) > 0.3) if rng.random() < 0.5 else None,
                rule=rule, expert_ranks=ranks, merge_duplicates=rng.random() < 0.5)


def random_error_aware_case(rng, max_t: int = 700, max_e: int = 400) -> dict:
    """A `random_route_case` for the error-aware rule: rule paper or rank_aware, `sim` as the gain matrix
    (float32 or bf16, sometimes fp16) with the gain threshold as rho, a float32 `scale` (random signs and
    magnitudes, some exact zeros and ones) and `unmatched` keep / drop / renorm. Thresholds above every
    gain leave secondaries unmatched; `keep_sum` in 30% of the cases."""
    case = random_route_case(rng, max_t=max_t, max_e=max_e, rules=("paper", "rank_aware"))
    e = case["sim"].shape[0]
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    gain = case["sim"].float() * torch.rand(e, e, generator=g)            # a gain in [0, 1), not symmetric
    if rng.random() < 0.3:
        gain = torch.round(gain * 8) / 8                                  # ties
    scale = torch.randn(e, e, generator=g) * rng.choice([0.1, 1.0, 3.0])
    scale[torch.rand(e, e, generator=g) < 0.1] = 0.0
    scale[torch.rand(e, e, generator=g) < 0.1] = 1.0
    case.update(sim=gain.to(rng.choice([torch.float32, torch.bfloat16, torch.bfloat16, torch.float16])),
                rho=rng.choice([0.0, 0.1, 0.3, 0.6, 2.0]), scale=scale,
                unmatched=rng.choice(["keep", "drop", "renorm"]))
    case["keep_sum"] = rng.random() < 0.3
    return case


def route_reference(case: dict):
    """The torch spec's (ids, weights, counts) for a `random_route_case` (or `random_error_aware_case`)."""
    from sere_dist.core.reroute import route as torch_route

    return torch_route(case["ids"], case["weights"], case["sim"].float(), case["s"], case["rho"], case["valid"],
                       rule=case["rule"], expert_ranks=case["expert_ranks"], merge_duplicates=case["merge_duplicates"],
                       scale=case.get("scale"), unmatched=case.get("unmatched", "keep"),
                       keep_sum=case.get("keep_sum", False))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit pattern (weights: NaN == NaN, -0 != +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = torch.int32 if a.element_size() == 4 else torch.int16
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)
