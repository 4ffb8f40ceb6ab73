"""How sensitive the CPU emulation of the CUDA kernels is: break the kernel source on purpose, one way at
a time, and report whether random parity cases (as in tests/test_cuda_emu.py) notice and how.

    .venv/bin/python -m tests.cuda_emu_mutations        # a table, about 1 minute (one build per mutation)

Four of these run in the suite (tests/test_cuda_emu.py); this sweep covers more. Exit status 1 if a
mutation goes unnoticed.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from tests import cuda_emu
from tests.support import expected, random_case

# name -> (text in sere_reroute_kernels.cuh, replacement, what it breaks); every occurrence is replaced (the
# re-routing and the whole-hook kernels share their structure), the cases below run the re-routing kernel
MUTATIONS = {
    "block end": ("const int t1 = min(num_tokens, t0 + tokens_per_block);", "const int t1 = t0 + tokens_per_block;",
                  "the last block runs past T"),
    "tie-break": ("(ov == best && op < best_p)", "(ov == best && op > best_p)", "ties go to the highest id"),
    "barrier 1": ("  }\n  __syncthreads();\n\n  // 2.", "  }\n\n  // 2.", "no barrier after the flags"),
    "barrier 2": ("  __syncthreads();\n\n  // 3.", "\n  // 3.", "no barrier before the gather"),
    "warp divergence": ("if (!needed[e] || primary[e]) continue;",
                        "if (!needed[e] || primary[e] || (lane == 3 && e % 2)) continue;",
                        "one lane skips rows its warp reduces"),
    "rho strict": ("!nan && best_p < num_experts && best >= rho", "!nan && best_p < num_experts && best > rho",
                   "> instead of >= rho"),
    "no memset": ("cudaError_t err = cudaMemsetAsync(flags, 0, num_experts, stream);", "cudaError_t err = cudaSuccess;",
                  "baseline workspace not cleared"),
    "short reduction": ("for (int off = 16; off > 0; off >>= 1)", "for (int off = 8; off > 0; off >>= 1)",
                        "warp max over 16 lanes only"),
    "valid ignored": ("if (j >= s && (valid == nullptr || valid[t]) && in_range(e, num_experts))",
                      "if (j >= s && in_range(e, num_experts))", "padding tokens re-routed"),
}
# the same, for the whole-hook kernel's error-aware weights; these run `route` cases with a scale
ROUTE_MUTATIONS = {
    "scale gather": ("scale[static_cast<int64_t>(e) * num_experts + static_cast<int64_t>(sid[j])]",
                     "scale[static_cast<int64_t>(sid[j]) * num_experts + static_cast<int64_t>(e)]",
                     "error-aware weight times scale[p, e] (transposed)"),
}


def mutant(name: str, workdir: Path) -> Path:
    """A copy of cuda_ext/ under `workdir` with mutation `name` applied to the kernel source."""
    old, new, _ = MUTATIONS[name] if name in MUTATIONS else ROUTE_MUTATIONS[name]
    src = Path(shutil.copytree(cuda_emu.SRC, workdir / "cuda_ext"))
    path = src / "sere_reroute_kernels.cuh"
    text = path.read_text()
    if text.count(old) < 1:
        raise SystemExit(f"mutation {name!r}: the kernel source changed; update its text")
    path.write_text(text.replace(old, new))
    return src


def first_failure(lib, cases: int = 400, seed: int = 5) -> tuple[int, str] | None:
    """The first random case (index, what) on which `lib` disagrees with the reference or fails."""
    rng = random.Random(seed)
    for i in range(cases):
        case = random_case(rng, max_t=20000 if i % 20 == 0 else 300)
        want = expected(*case)
        try:
            got = cuda_emu.reroute(*case, inplace=i % 2 == 0, guard=1 + i % 2, lib=lib)
            base = cuda_emu.per_slot_scan_(case[0].clone(), *case[1:], lib=lib)
        except cuda_emu.EmulationError as err:
            return i, str(err)
        if not torch.equal(got, want) or not torch.equal(base, want):
            return i, "wrong ids"
    return None


def first_route_failure(lib, cases: int = 200, seed: int = 5) -> tuple[int, str] | None:
    """As `first_failure`, on error-aware `route` cases (ids, weights and counters)."""
    rng = random.Random(seed)
    for i in range(cases):
        case = cuda_emu.random_error_aware_case(rng, max_t=700 if i % 10 == 0 else 64)
        want_ids, want_w, want_c = cuda_emu.route_reference(case)
        counts = torch.zeros(5, dtype=torch.int64)
        try:
            got_ids, got_w = cuda_emu.route(case["ids"], case["weights"], case["sim"], case["s"], case["rho"],
                                            case["valid"], rule=case["rule"], expert_ranks=case["expert_ranks"],
                                            merge_duplicates=case["merge_duplicates"], counts=counts,
                                            scale=case["scale"], unmatched=case["unmatched"], guard=1 + i % 2,
                                            lib=lib)
        except cuda_emu.EmulationError as err:
            return i, str(err)
        if not torch.equal(got_ids, want_ids):
            return i, "wrong ids"
        if not cuda_emu.same_bits(got_w, want_w):
            return i, "wrong weights"
        if counts.tolist() != want_c.tolist():
            return i, "wrong counts"
    return None


def try_mutation(name: str, workdir: Path) -> tuple[int, str] | None:
    lib = cuda_emu.build(src=mutant(name, workdir))
    return first_route_failure(lib) if name in ROUTE_MUTATIONS else first_failure(lib)


def main() -> int:
    torch.set_num_threads(1)
    rows, missed = [], 0
    for name, (_, _, what) in (MUTATIONS | ROUTE_MUTATIONS).items():
        with tempfile.TemporaryDirectory() as tmp:
            found = try_mutation(name, Path(tmp))
        missed += found is None
        rows.append((name, what, "NOT NOTICED" if found is None else f"case {found[0]}: {found[1][:90]}"))
    width = max(len(r[0]) for r in rows)
    wwidth = max(len(r[1]) for r in rows)
    print(f"{'mutation':<{width}}  {'breaks':<{wwidth}}  first failure")
    for name, what, result in rows:
        print(f"{name:<{width}}  {what:<{wwidth}}  {result}")
    print(f"{len(rows) - missed} of {len(rows)} mutations noticed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
