"""The one entry point for re-routing a batch: native kernels when available, the torch reference else.

    new_ids = reroute_fast(topk_ids, sim, S, rho, valid)    # [T, k] -> [T, k], same dtype and device
    backend("cuda")                                          # "cuda" | "cpp" | "torch": what runs there

Paths, fastest first: the CUDA kernel (tensors on a GPU, extension built with CUDA), the C++ CPU
kernel (tensors on CPU), `sere_dist.core.reroute.reroute` (anything else: other devices, [G, T, k] ids,
E > 512, k > 16, a failed build, or `SERE_NATIVE=0`). All paths give bit-identical ids, with
similarities compared in float32 (the torch path widens a bf16/fp16 `sim` first).

The extension (`cuda_ext/`) is compiled on first use with `torch.utils.cpp_extension.load` into
`$SERE_EXT_CACHE` (default `~/.cache/sere_dist/ext`), one directory per hash of the sources, flags,
torch and platform, under a file lock so that the several processes vLLM spawns build it once. It
registers the torch custom ops `sere_dist::reroute`, `sere_dist::reroute_` (in place) and
`sere_dist::route` (the whole hook, error-aware rule included), with fake implementations registered
here, so Dynamo traces them as single opaque ops. Nothing is built while
Dynamo traces: call `load_extension()` eagerly first (the vLLM plugin does, at registration), else
the traced graph uses the torch reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from sere_dist.core.reroute import KEEP_SUM_FLAG, RULE_IDS, UNMATCHED_IDS, route, reroute

log = logging.getLogger("sere_dist")

MAX_EXPERTS = 512  # cuda_ext/sere_reroute.h: kMaxExperts, kMaxTopK
MAX_TOP_K = 16
_EXT_NAME = "sere_dist_reroute"
_SOURCES = ("sere_reroute.cpp", "sere_reroute_cuda.cu", "sere_reroute.h")
_HEADERS = ("sere_reroute.h", "sere_reroute_kernels.cuh")  # included, so part of the cache key
_CUDA_ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                    "-gencode=arch=compute_90,code=compute_90")  # PTX: newer GPUs JIT it
_LOCK_TIMEOUT_S = 900.0
_ID_DTYPES = (torch.int32, torch.int64)
_SIM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "cuda": False, "route_op": False, "library": None, "error": None,
                "announced": set()}


def reroute_fast(topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float,
                 valid: torch.Tensor | None = None, *, expert_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Re-route one batch's secondary slots: the paper's rule, or with `expert_ranks` ([E, R] bool
    placement) the rank-aware rule (ARCHITECTURE.md, "Re-routing rules").

    topk_ids: [T, k] int32/int64 expert ids, ordered by router weight. sim: [E, E] float32, bf16 or
    fp16 on the same device. valid: optional [T] bool, False for padding. Returns new [T, k] ids of
    the same dtype (a new tensor; the input is not modified). No host synchronisation on any path.
    The rank-aware rule has no native kernel yet and always runs the torch reference.
    """
    if expert_ranks is not None:
        sim32 = sim if sim.dtype == torch.float32 else sim.float()
        return reroute(topk_ids, sim32, select_top_k, threshold, valid, expert_ranks=expert_ranks,
                       with_stats=False)[0]
    path = _path_for(topk_ids, sim, valid)
    if path == "torch":
        return _torch_reroute(topk_ids, sim, select_top_k, threshold, valid)
    return torch.ops.sere_dist.reroute(topk_ids, sim, int(select_top_k), float(threshold), valid)


def route_fast(topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor, select_top_k: int,
               threshold: float, valid: torch.Tensor | None = None, *, rule: str = "paper",
               expert_ranks: torch.Tensor | None = None, merge_duplicates: bool = False,
               counts: torch.Tensor | None = None, count_gate: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, unmatched: str = "keep",
               keep_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The vLLM plugin's whole per-layer hook in one call: `sere_dist.core.reroute.route` (its spec)
    through the native op `sere_dist::route` when it applies, else the torch reference.

    topk_ids [T, k] int32/int64 and topk_weights [T, k] float32/bf16/fp16 in the router's slot order;
    sim [E, E]; valid [T] bool; rule "paper" | "rank_aware" (expert_ranks [E, R] bool) | "top_s".
    counts: optional [5] int64 counters (`reroute.COUNTS` order), incremented in place; count_gate:
    optional [1] bool, counting only when it holds True (read on the device: no host sync).
    scale: optional [E, E] float32, the error-aware rule (`sim` is then its gain matrix and `threshold`
    the gain threshold; rule "paper" or "rank_aware"); unmatched: "keep" | "drop" | "renorm" and keep_sum
    (error-aware only; `route`). The native op takes a float32 scale on the ids' device; any other scale runs the torch
    reference (widened to float32).
    Returns new (ids, weights), same dtypes, in the input's slot order.
    """
    path = _route_path(topk_ids, topk_weights, sim, valid, expert_ranks, counts, count_gate, scale, rule, unmatched)
    if path == "torch":
        sim32 = sim if sim.dtype == torch.float32 else sim.float()
        new_ids, new_w, c = route(topk_ids, topk_weights, sim32, select_top_k, threshold, valid, rule=rule,
                                  expert_ranks=expert_ranks, merge_duplicates=merge_duplicates,
                                  scale=None if scale is None else scale.float(), unmatched=unmatched,
                                  keep_sum=keep_sum)
        if counts is not None:
            counts.add_(c if count_gate is None else c * count_gate.to(torch.int64))
        return new_ids, new_w
    return torch.ops.sere_dist.route(topk_ids, topk_weights, sim, valid, expert_ranks, counts, count_gate,
                                     int(select_top_k), float(threshold), RULE_IDS[rule], bool(merge_duplicates),
                                     scale, UNMATCHED_IDS[unmatched] | (KEEP_SUM_FLAG if keep_sum else 0))


class RoutePlan:
    """`route_fast` bound to one MoE layer's fixed inputs, checked once (`RoutePlan.bind`): for eager calls.

    A layer's similarity, counters, gate, scale, rule and ids/weights dtypes never change between
    forwards, so checking them on every call (`_route_path`) and slicing the token mask to T rows are
    pure overhead; after an experts kernel has flushed the caches they cost about 20 and 12 µs per layer
    on a 2-core EPYC, next to about 25 µs for the op call. The plan calls `sere_dist::route` directly
    with the mask's [:T] views kept per T (views of the one buffer rewritten in place before each
    forward). `fits` is the per-call check: same ids/weights dtypes and k as at binding (2-D ids and the
    devices the op itself checks). Not for traced code: Dynamo traces `route_fast`.
    """

    __slots__ = ("_op", "_ids_dtype", "_w_dtype", "_k", "_rows", "_sim", "_mask", "_views", "_ranks", "_counts",
                 "_gate", "_scale", "_rule", "_flags")

    def __init__(self, ids, weights, sim, mask, rule, expert_ranks, counts, count_gate, scale, unmatched, keep_sum):
        self._op = torch.ops.sere_dist.route.default
        self._ids_dtype, self._w_dtype, self._k = ids.dtype, weights.dtype, int(ids.shape[1])
        self._sim, self._mask, self._rows, self._views = sim, mask, int(mask.shape[0]), {}
        self._ranks, self._counts, self._gate, self._scale = expert_ranks, counts, count_gate, scale
        self._rule = RULE_IDS[rule]
        self._flags = UNMATCHED_IDS[unmatched] | (KEEP_SUM_FLAG if keep_sum else 0)

    @classmethod
    def bind(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor, mask: torch.Tensor, *,
             rule: str = "paper", expert_ranks: torch.Tensor | None = None, counts: torch.Tensor | None = None,
             count_gate: torch.Tensor | None = None, scale: torch.Tensor | None = None, unmatched: str = "keep",
             keep_sum: bool = False) -> RoutePlan | None:
        """A plan for calls like this one (`mask`: the whole [N] bool token mask, N >= every T), or None
        where `route_fast` would run the torch reference for them (the caller keeps calling it)."""
        if (mask.dim() != 1 or mask.shape[0] < topk_ids.shape[0] or not mask.is_contiguous()
                or _route_path(topk_ids, topk_weights, sim, mask[:topk_ids.shape[0]], expert_ranks, counts,
                               count_gate, scale, rule, unmatched) == "torch"):
            return None
        return cls(topk_ids, topk_weights, sim, mask, rule, expert_ranks, counts, count_gate, scale, unmatched,
                   keep_sum)

    def fits(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> bool:
        return (topk_ids.dtype is self._ids_dtype and topk_weights.dtype is self._w_dtype
                and topk_ids.dim() == 2 and topk_ids.shape[1] == self._k and topk_ids.shape[0] <= self._rows)

    def __call__(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, select_top_k: int, threshold: float,
                 merge_duplicates: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t = topk_ids.shape[0]
        valid = self._views.get(t)
        if valid is None:
            valid = self._views[t] = self._mask[:t]
        return self._op(topk_ids, topk_weights, self._sim, valid, self._ranks, self._counts, self._gate,
                        int(select_top_k), float(threshold), self._rule, bool(merge_duplicates), self._scale,
                        self._flags)


def reroute_fast_(topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """In-place `reroute_fast`; returns `topk_ids`. Non-contiguous ids go through a copy."""
    path = _path_for(topk_ids, sim, valid)
    if path == "torch" or not topk_ids.is_contiguous():
        return topk_ids.copy_(_torch_reroute(topk_ids, sim, select_top_k, threshold, valid))
    torch.ops.sere_dist.reroute_(topk_ids, sim, int(select_top_k), float(threshold), valid)
    return topk_ids


def backend(device: str | torch.device = "cpu") -> str:
    """Which path re-routes [T, k] ids on `device`: "cuda", "cpp" or "torch" (builds on first call)."""
    dev = torch.device(device)
    load_extension()
    if dev.type == "cuda" and _state["cuda"]:
        return "cuda"
    if dev.type == "cpu" and _state["loaded"]:
        return "cpp"
    return "torch"


def load_extension() -> bool:
    """Build (once, cached) and load the native kernels; False, with one warning, when impossible."""
    if _state["tried"]:
        return _state["loaded"]
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        if os.environ.get("SERE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _state["error"] = "disabled by SERE_NATIVE=0"
            log.info("sere_dist: native re-routing kernels disabled by SERE_NATIVE=0; using the torch reference")
        else:
            try:
                _state["library"] = _build_and_load()
                _register_fakes()
                _state["cuda"] = bool(torch.ops.sere_dist.built_with_cuda())
                _state["route_op"] = hasattr(torch.ops.sere_dist, "route")
                _state["loaded"] = True
                log.info("sere_dist: native re-routing kernels loaded (CPU%s) from %s",
                         " + CUDA" if _state["cuda"] else "", _state["library"])
            except Exception as exc:  # noqa: BLE001  any build or load failure means: use torch
                _state["error"] = f"{type(exc).__name__}: {exc}"
                log.warning("sere_dist: native re-routing extension unavailable, using the torch reference (%s)",
                            _state["error"].splitlines()[0][:500])
        _state["tried"] = True
    return _state["loaded"]


def extension_error() -> str | None:
    """Why the native kernels are not in use (None when they are, or before the first attempt)."""
    return _state["error"]


def _path_for(topk_ids: torch.Tensor, sim: torch.Tensor, valid: torch.Tensor | None) -> str:
    compiling = torch.compiler.is_compiling()
    if not compiling and not _state["tried"]:
        load_extension()  # never build or do file I/O while Dynamo traces
    dev = topk_ids.device
    kind = dev.type
    path = "torch"
    if _state["loaded"] and (kind == "cpu" or (kind == "cuda" and _state["cuda"])):
        ks, es = topk_ids.shape, sim.shape
        if (len(ks) == 2 and 0 < ks[1] <= MAX_TOP_K and len(es) == 2 and es[0] == es[1] and 0 < es[0] <= MAX_EXPERTS
                and topk_ids.dtype in _ID_DTYPES and sim.dtype in _SIM_DTYPES and sim.device == dev
                and (valid is None or (valid.dtype == torch.bool and valid.device == dev))):
            path = "cuda" if kind == "cuda" else "cpp"
    if not compiling and (kind, path) not in _state["announced"]:
        _state["announced"].add((kind, path))
        log.info("sere_dist: re-routing on %s runs the %s path%s", kind, path, _why_torch(topk_ids, sim, path))
    return path


MAX_RANKS = 64  # cuda_ext/sere_reroute.h: kMaxRanks
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _route_path(topk_ids, topk_weights, sim, valid, expert_ranks, counts, count_gate, scale=None, rule="paper",
                unmatched="keep") -> str:
    """"cuda" / "cpp" when `sere_dist::route` takes these inputs, else "torch" (which also raises the
    ValueError for an unknown rule or unmatched, or scale with rule top_s)."""
    path = _path_for(topk_ids, sim, valid)
    if path == "torch" or not _state["route_op"]:
        return "torch"
    if rule not in RULE_IDS or unmatched not in UNMATCHED_IDS:
        return "torch"
    if scale is not None and (rule == "top_s" or scale.dtype != torch.float32 or scale.shape != sim.shape
                              or scale.device != topk_ids.device):
        return "torch"
    dev = topk_ids.device
    ok = (topk_weights.shape == topk_ids.shape and topk_weights.dtype in _WEIGHT_DTYPES and topk_weights.device == dev
          and (expert_ranks is None or (expert_ranks.dtype == torch.bool and expert_ranks.dim() == 2
                                        and expert_ranks.shape[0] == sim.shape[0]
                                        and 0 < expert_ranks.shape[1] <= MAX_RANKS and expert_ranks.device == dev))
          and (counts is None or (counts.dtype == torch.int64 and counts.shape == (5,) and counts.device == dev
                                  and counts.is_contiguous()))
          and (count_gate is None or (count_gate.dtype == torch.bool and count_gate.numel() == 1
                                      and count_gate.device == dev)))
    return path if ok else "torch"


def _why_torch(topk_ids: torch.Tensor, sim: torch.Tensor, path: str) -> str:
    if path != "torch":
        return ""
    if not _state["loaded"]:
        return f" ({_state['error']})"
    if topk_ids.device.type not in ("cpu", "cuda") or (topk_ids.device.type == "cuda" and not _state["cuda"]):
        return f" (no native kernel for {topk_ids.device.type} in this build)"
    return (f" (unsupported input: ids {tuple(topk_ids.shape)} {topk_ids.dtype}, sim {tuple(sim.shape)} {sim.dtype}"
            f" on {sim.device}; native limits: 2-D ids, E <= {MAX_EXPERTS}, k <= {MAX_TOP_K})")


def _torch_reroute(topk_ids, sim, select_top_k, threshold, valid):
    # float32 comparisons on every path: a bf16 tensor compared with a Python float would round rho
    sim32 = sim if sim.dtype == torch.float32 else sim.float()
    return reroute(topk_ids, sim32, select_top_k, threshold, valid, with_stats=False)[0]


def _register_fakes() -> None:
    @torch.library.register_fake("sere_dist::reroute")
    def _reroute_fake(topk_ids, sim, select_top_k, threshold, valid=None):
        return torch.empty_like(topk_ids, memory_format=torch.contiguous_format)

    @torch.library.register_fake("sere_dist::route")
    def _route_fake(topk_ids, topk_weights, sim, valid, expert_ranks, counts, count_gate, select_top_k, threshold,
                    rule, merge_duplicates, scale=None, unmatched=0):
        return (torch.empty_like(topk_ids, memory_format=torch.contiguous_format),
                torch.empty_like(topk_weights, memory_format=torch.contiguous_format))

    @torch.library.register_fake("sere_dist::reroute_")
    def _reroute_inplace_fake(topk_ids, sim, select_top_k, threshold, valid=None):
        return None


# ---------------------------------------------------------------------------------------------
# Build: locate sources, hash them into a cache directory, compile under a file lock, load.


def source_dir() -> Path:
    """Where the kernel sources are: $SERE_EXT_SRC, the repo's cuda_ext/, or the package's csrc/."""
    if os.environ.get("SERE_EXT_SRC"):
        return Path(os.environ["SERE_EXT_SRC"])
    package = Path(__file__).resolve().parents[1]          # sere_dist/
    # a source checkout (editable install) has the repo's cuda_ext/; a wheel ships a copy in sere_dist/csrc/
    candidates = (package.parent / "cuda_ext", package / "csrc")
    for cand in candidates:
        if all((cand / name).is_file() for name in _SOURCES + _HEADERS):
            return cand
    raise FileNotFoundError(f"kernel sources not found in {candidates[0]} or {candidates[1]}")


def cache_root() -> Path:
    if os.environ.get("SERE_EXT_CACHE"):
        return Path(os.environ["SERE_EXT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sere_dist" / "ext"


def _build_config() -> tuple[list[Path], list[str], list[str], bool]:
    from torch.utils import cpp_extension

    src = source_dir()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if torch.version.cuda is not None and not with_cuda:
        log.warning("sere_dist: torch has CUDA but no CUDA toolkit (nvcc) was found: building the CPU kernel only")
    sources = [src / "sere_reroute.cpp"] + ([src / "sere_reroute_cuda.cu"] if with_cuda else [])
    for path in sources + [src / name for name in _HEADERS]:
        if not path.is_file():
            raise FileNotFoundError(path)
    define = ["-DSERE_WITH_CUDA"] if with_cuda else []
    cflags = ["-O3", "-fopenmp"] + define  # OpenMP symbols resolve to torch's own libgomp
    cuda_cflags = ["-O3", *_CUDA_ARCH_FLAGS] + define
    return sources, cflags, cuda_cflags, with_cuda


def _build_and_load() -> str:
    from torch.utils import cpp_extension

    sources, cflags, cuda_cflags, with_cuda = _build_config()
    h = hashlib.sha256()
    for path in sources + [sources[0].parent / name for name in _HEADERS]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr((cflags, cuda_cflags, with_cuda, torch.__version__, torch.version.cuda, sys.version_info[:2],
                   platform.machine(), platform.system())).encode())
    build_dir = cache_root() / f"{_EXT_NAME}-{h.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{_EXT_NAME}.so"
    done = build_dir / "built.ok"  # written after a complete build: a .so being linked is not loadable
    if not done.is_file():
        with _file_lock(build_dir / "build.lock"):
            if not done.is_file():
                t0 = time.monotonic()
                log.info("sere_dist: building the native re-routing kernels (%s) in %s",
                         "CPU + CUDA" if with_cuda else "CPU", build_dir)
                # torch's own baton file survives a killed build and would block forever; we hold the lock
                (build_dir / "lock").unlink(missing_ok=True)
                with _ninja_on_path():
                    cpp_extension.load(name=_EXT_NAME, sources=[str(p) for p in sources], extra_cflags=cflags,
                                       extra_cuda_cflags=cuda_cflags, build_directory=str(build_dir),
                                       with_cuda=with_cuda, is_python_module=False, verbose=False)
                done.write_text(f"{torch.__version__} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
                log.info("sere_dist: built the native re-routing kernels in %.0f s", time.monotonic() - t0)
                return str(library)
    torch.ops.load_library(str(library))
    return str(library)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An flock (released by the kernel if the holder dies), waited for up to _LOCK_TIMEOUT_S."""
    with open(path, "a+") as fh:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held {path} for {_LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path():
    """cpp_extension runs `ninja` from PATH; a venv's ninja is not on it unless the venv is active."""
    if shutil.which("ninja"):
        yield
        return
    extra = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja  # the `ninja` PyPI package (the dev extra)

        extra.append(ninja.BIN_DIR)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join(extra + [old])
    try:
        yield
    finally:
        os.environ["PATH"] = old
