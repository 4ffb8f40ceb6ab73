"""The CUDA kernels' own device code, executed on the CPU (cuda_ext/emu), gives the reference's ids.

No GPU is needed: cuda_ext/sere_reroute_kernels.cuh is compiled with g++ against a fiber emulation of
CUDA threads (barriers, warp shuffles and votes), with every buffer against a guard page. This checks
the kernels' indexing, block split, warp reductions, tie-breaking, in-place aliasing and argument checks;
it cannot check timing, memory ordering on real hardware or CUDA-graph capture (tests/test_native.py's
`cuda` tests and benchmarks/gpu_check.sh do that on a GPU).

The last tests mutate a copy of the kernel source and show that the emulation notices: an
out-of-bounds read, lanes of a warp that disagree on a shuffle, and a missing barrier.
"""

import random
import shutil

import pytest
import torch

from tests import cuda_emu
from tests.cuda_emu_mutations import try_mutation
from tests.support import SIM_DTYPES, expected, random_case

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler")


@pytest.fixture(autouse=True, scope="module")
def built():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cuda_emu.build()
    yield
    torch.set_num_threads(threads)


def assert_same(got, want, case):
    ids, sim, s, rho, valid = case
    detail = (f"T={ids.shape[0]} k={ids.shape[1]} E={sim.shape[0]} S={s} rho={rho} ids={ids.dtype} "
              f"sim={sim.dtype} valid={'none' if valid is None else int(valid.sum())}")
    assert torch.equal(got, want), detail


@pytest.mark.parametrize("seed", range(4))
def test_cuda_kernel_matches_reference_on_random_cases(seed):
    # decode-sized batches (one block) mostly, and some multi-block ones (257..4096 tokens: 2-16 blocks)
    rng = random.Random(seed * 104729 + 3)
    for i in range(400):
        case = random_case(rng, max_t=4096 if rng.random() < 0.1 else 256)
        got = cuda_emu.reroute(*case, inplace=i % 2 == 1, guard=1 + i % 2)
        assert_same(got, expected(*case), case)


def test_cuda_kernel_with_the_most_blocks_in_place_and_out_of_place():
    # > 64 * 256 tokens: 64 blocks of more than 256 tokens each; in place, blocks must not race
    rng = random.Random(11)
    for t, e, k in ((16384 + 77, 128, 8), (20000, 512, 16), (16385, 60, 4)):
        g = torch.Generator().manual_seed(t)
        ids = (torch.randn(t, e, generator=g) - torch.linspace(0, 4, e)).topk(k, dim=1).indices.int()
        sim = torch.rand(e, e, generator=g).to(rng.choice(SIM_DTYPES))
        valid = torch.rand(t, generator=g) > 0.3
        case = (ids, sim, rng.randint(1, 2), 0.2, valid)
        want = expected(*case)
        assert not torch.equal(want, ids)  # the case re-routes something
        assert_same(cuda_emu.reroute(*case, guard=1), want, case)
        assert_same(cuda_emu.reroute(*case, inplace=True, guard=2), want, case)


@pytest.mark.parametrize("seed", range(2))
def test_paper_shaped_baseline_kernels_match_reference(seed):
    # the benchmark baseline (memset + flag kernel + per-slot scan) must give the same answers it is timed
    # against; its workspace starts as garbage, so a missing memset shows
    rng = random.Random(500 + seed)
    for i in range(300):
        case = random_case(rng, max_t=2048 if rng.random() < 0.1 else 256)
        got = cuda_emu.per_slot_scan_(case[0].clone(), *case[1:], guard=1 + i % 2)
        assert_same(got, expected(*case), case)


def test_cuda_kernel_exact_outcomes():
    sim = torch.tensor([[1.0, 0.1, 0.8, 0.2],
                        [0.1, 1.0, 0.3, 0.25],
                        [0.8, 0.3, 1.0, 0.0],
                        [0.2, 0.25, 0.0, 1.0]])
    ids = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32)
    assert cuda_emu.reroute(ids, sim, 1, 0.3).tolist() == [[0, 0], [1, 3]]
    assert cuda_emu.reroute(ids, sim, 1, 0.25).tolist() == [[0, 0], [1, 1]]  # >= rho moves
    assert cuda_emu.reroute(ids, sim, 2, 0.0).tolist() == [[0, 2], [1, 3]]  # S = k
    assert cuda_emu.reroute(ids, sim, 5, 0.0).tolist() == [[0, 2], [1, 3]]  # S > k acts as S = k
    assert cuda_emu.reroute(ids, sim, 0, 0.0).tolist() == [[0, 2], [1, 3]]  # no primaries
    assert cuda_emu.reroute(ids, sim, 1, 0.0, torch.tensor([True, False])).tolist() == [[0, 0], [1, 3]]
    # ties go to the lowest primary id, in every similarity dtype (the warp reduction's tie-break)
    flat = torch.full((40, 40), 0.5)
    tied = torch.tensor([[33, 39], [2, 39], [31, 39], [1, 39]])
    for dtype in SIM_DTYPES:
        assert cuda_emu.reroute(tied, flat.to(dtype), 1, 0.5).tolist() == [[33, 1], [2, 1], [31, 1], [1, 1]]
    # NaN to a primary keeps the expert; out-of-range ids pass through
    nan = torch.tensor([[1.0, float("nan"), 0.9], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]])
    assert cuda_emu.reroute(torch.tensor([[1, 0], [2, 1]]), nan, 1, 0.1).tolist() == [[1, 0], [2, 1]]
    odd = torch.tensor([[0, -1, 9, 2], [7, 3, 1, 2]])
    assert cuda_emu.reroute(odd, torch.ones(4, 4), 1, 0.0).tolist() == [[0, -1, 9, 0], [7, 0, 0, 0]]
    assert cuda_emu.reroute(torch.empty(0, 3, dtype=torch.int64), torch.rand(5, 5), 1, 0.0).shape == (0, 3)


@pytest.mark.parametrize("e, k", [(513, 4), (0, 4), (8, 17), (8, 0)])
def test_launcher_refuses_out_of_contract_shapes_without_touching_memory(e, k):
    ids = torch.zeros(4, max(k, 1), dtype=torch.int32)[:, :k].contiguous()
    sim = torch.rand(max(e, 1), max(e, 1))
    with pytest.raises(cuda_emu.EmulationError) as err:
        cuda_emu.reroute(ids, sim, 1, 0.0, num_experts=e)
    assert err.value.code == cuda_emu.INVALID_VALUE


# ---- the emulation notices broken kernels ---------------------------------------------------------


def test_emulation_reports_an_out_of_bounds_read(tmp_path):
    failure = try_mutation("block end", tmp_path)  # the last block runs past T
    assert failure is not None and "out-of-bounds access to `" in failure[1], failure


def test_emulation_reports_lanes_that_disagree_on_a_shuffle(tmp_path):
    failure = try_mutation("warp divergence", tmp_path)  # one lane skips a row its warp reduces
    assert failure is not None and "divergent barrier" in failure[1] and "__shfl_xor_sync" in failure[1], failure


def test_emulation_notices_a_missing_barrier(tmp_path):
    # without the barrier before the gather, early threads read table rows other warps have not written
    failure = try_mutation("barrier 2", tmp_path)
    assert failure is not None and failure[1] == "wrong ids", failure


def test_portable_ucontext_fibers_give_the_same_ids():
    # the stack switch used off x86-64 (forced here with -DSERE_EMU_UCONTEXT)
    lib = cuda_emu.build(("-DSERE_EMU_UCONTEXT",))
    rng = random.Random(77)
    for i in range(60):
        case = random_case(rng, max_t=2048 if i % 10 == 0 else 128)
        assert_same(cuda_emu.reroute(*case, inplace=i % 2 == 0, lib=lib), expected(*case), case)


# ---------------------------------------------------------------- the whole hook (route kernel)

@pytest.mark.parametrize("seed", range(3))
def test_route_kernel_matches_the_torch_spec_bit_for_bit(seed):
    rng = random.Random(7000 + seed)
    for i in range(120):
        case = cuda_emu.random_route_case(rng)
        want_ids, want_w, want_c = cuda_emu.route_reference(case)
        counts = torch.zeros(5, dtype=torch.int64)
        gate = torch.tensor([True]) if rng.random() < 0.3 else None
        got_ids, got_w = cuda_emu.route(case["ids"], case["weights"], case["sim"], case["s"], case["rho"],
                                        case["valid"], rule=case["rule"], expert_ranks=case["expert_ranks"],
                                        merge_duplicates=case["merge_duplicates"], counts=counts, count_gate=gate,
                                        guard=1 + i % 2)
        label = {k: v for k, v in case.items() if not isinstance(v, torch.Tensor)} | {"T": case["ids"].shape[0]}
        assert torch.equal(got_ids, want_ids), label
        assert cuda_emu.same_bits(got_w, want_w), label
        assert counts.tolist() == want_c.tolist(), label


def test_route_kernel_counts_across_blocks_and_honours_the_gate():
    rng = random.Random(3)
    case = cuda_emu.random_route_case(rng, max_t=5000)
    case.update(ids=torch.randint(0, 64, (5000, 8)), weights=torch.rand(5000, 8), sim=torch.rand(64, 64),
                valid=None, rule="paper", expert_ranks=None, s=2, rho=0.0)
    _, _, want = cuda_emu.route_reference(case)
    args = (case["ids"], case["weights"], case["sim"], 2, 0.0)
    counts = torch.zeros(5, dtype=torch.int64)
    cuda_emu.route(*args, counts=counts)                                   # 20 blocks: workspace + ticket
    assert counts.tolist() == want.tolist()
    cuda_emu.route(*args, counts=counts, count_gate=torch.tensor([False]))  # a step that is not counted
    assert counts.tolist() == want.tolist()
    cuda_emu.route(*args, counts=counts, count_gate=torch.tensor([True]))
    assert counts.tolist() == (2 * want).tolist()


# ---------------------------------------------------------------- the error-aware rule in the route kernel

def _emu_route(case, counts=None, gate=None, guard=1):
    return cuda_emu.route(case["ids"], case["weights"], case["sim"], case["s"], case["rho"], case["valid"],
                          rule=case["rule"], expert_ranks=case["expert_ranks"],
                          merge_duplicates=case["merge_duplicates"], counts=counts, count_gate=gate,
                          scale=case.get("scale"), unmatched=case.get("unmatched", "keep"),
                          keep_sum=case.get("keep_sum", False), guard=guard)


@pytest.mark.parametrize("seed", range(2))
def test_route_kernel_error_aware_matches_the_torch_spec_bit_for_bit(seed):
    # single blocks mostly, every tenth case up to 700 tokens (3 blocks: workspace counting)
    rng = random.Random(7100 + seed)
    for i in range(250):
        case = cuda_emu.random_error_aware_case(rng, max_t=700 if i % 10 == 0 else 64)
        want_ids, want_w, want_c = cuda_emu.route_reference(case)
        counts = torch.zeros(5, dtype=torch.int64)
        gate = (None, torch.tensor([True]), torch.tensor([False]))[i % 3]
        got_ids, got_w = _emu_route(case, counts, gate, guard=1 + i % 2)
        label = ({k: v for k, v in case.items() if not isinstance(v, torch.Tensor)}
                 | {"T": case["ids"].shape[0], "E": case["sim"].shape[0]})
        assert torch.equal(got_ids, want_ids), label
        assert cuda_emu.same_bits(got_w, want_w), label
        assert counts.tolist() == ([0] * 5 if i % 3 == 2 else want_c.tolist()), label


def test_route_kernel_unit_scale_keep_is_the_kernel_without_scale_and_s_equal_k_changes_nothing():
    rng = random.Random(7200)
    for i in range(60):
        case = cuda_emu.random_error_aware_case(rng, max_t=64)
        ones = case | {"scale": torch.ones_like(case["scale"]), "unmatched": "keep", "keep_sum": False}
        plain = {k: v for k, v in case.items() if k not in ("scale", "unmatched", "keep_sum")}
        c1, c2 = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        a, b = _emu_route(ones, c1), _emu_route(plain, c2)
        assert torch.equal(a[0], b[0]) and cuda_emu.same_bits(a[1], b[1]) and torch.equal(c1, c2)
        full = case | {"s": case["ids"].shape[1], "merge_duplicates": False}
        got_ids, got_w = _emu_route(full)
        assert torch.equal(got_ids, case["ids"]) and cuda_emu.same_bits(got_w, case["weights"])


@pytest.mark.parametrize("rule, unmatched", [("top_s", "keep"), ("paper", 3), ("paper", -1)])
def test_route_launcher_refuses_scale_with_top_s_and_unknown_unmatched(rule, unmatched, monkeypatch):
    from sere_dist.core import reroute
    if isinstance(unmatched, int):
        monkeypatch.setitem(reroute.UNMATCHED_IDS, unmatched, unmatched)   # pass a raw code through
    with pytest.raises(cuda_emu.EmulationError) as err:
        cuda_emu.route(torch.zeros(3, 4, dtype=torch.int32), torch.rand(3, 4), torch.rand(8, 8), 1, 0.0, rule=rule,
                       scale=torch.ones(8, 8), unmatched=unmatched)
    assert err.value.code == cuda_emu.INVALID_VALUE


def test_emulation_notices_a_transposed_scale_gather(tmp_path):
    failure = try_mutation("scale gather", tmp_path)  # weight times scale[p, e] instead of scale[e, p]
    assert failure is not None and failure[1] == "wrong weights", failure
