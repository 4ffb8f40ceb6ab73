"""The native re-routing kernels give bit-identical ids to the torch reference, and dispatch falls back cleanly.

The reference is `sere_dist.core.reroute.reroute` with the similarity widened to float32 (ARCHITECTURE.md: compared
in float32). Random cases are drawn fresh per seed; coarse similarity levels create ties, and rho values on
those levels create ties with the threshold.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sere_dist.core import native
from sere_dist.core.reroute import reroute
from tests.support import SIM_DTYPES, assert_same, expected, naive_paper, random_case

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small torch ops with an OpenMP team slow down 10-20x when other processes share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def op():
    if os.environ.get("SERE_NATIVE", "1") == "0":
        pytest.skip("SERE_NATIVE=0")
    if not native.load_extension():
        pytest.fail(f"the native extension did not build: {native.extension_error()}")
    return torch.ops.sere_dist


@pytest.mark.parametrize("seed", range(8))
def test_cpu_kernel_matches_reference_on_random_cases(op, seed):
    rng = random.Random(seed * 7919 + 11)
    for _ in range(500):
        case = random_case(rng, max_t=1024 if rng.random() < 0.95 else 4096)
        assert_same(op.reroute(*case), expected(*case), case)


@pytest.mark.parametrize("seed", range(2))
def test_cpu_kernel_in_place_matches_reference(op, seed):
    rng = random.Random(100 + seed)
    for _ in range(300):
        case = random_case(rng, max_t=512)
        ids = case[0].clone()
        op.reroute_(ids, *case[1:])
        assert_same(ids, expected(*case), case)


def test_cpu_kernel_parallel_path_on_large_batches(op):
    # >= 32768 secondary slots with more than one thread takes the full-table, parallel gather path
    rng = random.Random(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in (8192, 20000):
            for _ in range(3):
                case = random_case(rng, max_t=1)
                ids, sim, _, rho, _ = case
                k = rng.randint(6, 16)
                e = sim.shape[0]
                g = torch.Generator().manual_seed(rng.randrange(2**31))
                ids = torch.randint(0, max(e, 1), (t, k), generator=g, dtype=ids.dtype)
                valid = torch.rand(t, generator=g) > 0.2
                case = (ids, sim, rng.randint(1, 3), rho, valid)
                assert_same(op.reroute(*case), expected(*case), case)
                inplace = ids.clone()
                op.reroute_(inplace, *case[1:])
                assert_same(inplace, expected(*case), case)
    finally:
        torch.set_num_threads(threads)


def test_cpu_kernel_matches_naive_loop(op):
    rng = random.Random(3)
    for _ in range(300):
        case = random_case(rng, max_t=48)
        ids, sim, s, rho, valid = case
        want = naive_paper(ids.tolist(), sim.float().tolist(), s, rho, None if valid is None else valid.tolist())
        assert op.reroute(*case).tolist() == want


def test_smallest_case_exact_outcome(op):
    # experts 0..3; token A top-2 = (0, 2), token B = (1, 3). S=1 -> primaries {0, 1}.
    sim = torch.tensor([[1.0, 0.1, 0.8, 0.2],
                        [0.1, 1.0, 0.3, 0.25],
                        [0.8, 0.3, 1.0, 0.0],
                        [0.2, 0.25, 0.0, 1.0]])
    ids = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32)
    assert native.reroute_fast(ids, sim, 1, 0.3).tolist() == [[0, 0], [1, 3]]  # 3 kept: 0.25 < 0.3
    assert native.reroute_fast(ids, sim, 1, 0.0).tolist() == [[0, 0], [1, 1]]  # rho 0 moves all
    assert native.reroute_fast(ids, sim, 1, 0.25).tolist() == [[0, 0], [1, 1]]  # >= rho moves
    assert native.reroute_fast(ids, sim, 2, 0.0).tolist() == [[0, 2], [1, 3]]  # S = k: unchanged
    assert native.reroute_fast(ids, sim, 1, 0.0, torch.tensor([True, False])).tolist() == [[0, 0], [1, 3]]


def test_ties_pick_the_lowest_primary_id(op):
    # primaries {1, 2, 3} all at 0.5 from expert 0
    sim = torch.full((4, 4), 0.5)
    ids = torch.tensor([[3, 0], [2, 0], [1, 0]])
    for dtype in SIM_DTYPES:
        assert op.reroute(ids, sim.to(dtype), 1, 0.5).tolist() == [[3, 1], [2, 1], [1, 1]]


def test_rho_is_compared_in_float32_for_bf16_similarities(op):
    # 0.298828125 is a bf16 value; rho 0.299 rounds to it in bf16 but not in float32: no move.
    sim = torch.tensor([[1.0, 0.298828125], [0.298828125, 1.0]], dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1]])
    assert op.reroute(ids, sim, 1, 0.299).tolist() == [[0, 1]]
    assert native.reroute_fast(ids, sim, 1, 0.299).tolist() == [[0, 1]]
    with native_disabled():
        assert native.reroute_fast(ids, sim, 1, 0.299).tolist() == [[0, 1]]  # torch path widens too


def test_nan_similarity_to_a_primary_keeps_the_expert(op):
    sim = torch.tensor([[1.0, float("nan"), 0.9], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]])
    ids = torch.tensor([[1, 0], [2, 1]])
    want = reroute(ids, sim, 1, 0.1, with_stats=False)[0]
    assert op.reroute(ids, sim, 1, 0.1).tolist() == want.tolist() == [[1, 0], [2, 1]]


def test_edge_shapes(op):
    sim = torch.rand(5, 5)
    empty = torch.empty(0, 3, dtype=torch.int64)
    assert op.reroute(empty, sim, 1, 0.0).shape == (0, 3)
    ids = torch.tensor([[4, 3, 2], [0, 1, 2]])
    none_valid = torch.zeros(2, dtype=torch.bool)
    assert torch.equal(op.reroute(ids, sim, 1, 0.0, none_valid), ids)  # no primaries, nothing moves
    assert torch.equal(op.reroute(ids, sim, 0, 0.0), ids)  # S = 0: no primaries
    assert torch.equal(op.reroute(ids, sim, 7, 0.0), ids)  # S > k acts as S = k
    one = torch.tensor([[0]])
    assert op.reroute(one, torch.ones(1, 1), 1, 0.0).tolist() == [[0]]


def test_out_of_range_ids_pass_through_unchanged(op):
    # no device assert inside CUDA graphs: ids outside [0, E) are neither primaries nor re-routed
    sim = torch.ones(4, 4)
    ids = torch.tensor([[0, -1, 9, 2], [7, 3, 1, 2]])
    assert op.reroute(ids, sim, 1, 0.0).tolist() == [[0, -1, 9, 0], [7, 0, 0, 0]]


def test_non_contiguous_ids_are_accepted(op):
    ids = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]]).t().contiguous().t()
    sim = torch.rand(4, 4)
    assert not ids.is_contiguous()
    assert torch.equal(op.reroute(ids, sim, 1, 0.0), expected(ids, sim, 1, 0.0, None))


@pytest.mark.parametrize("bad, message", [
    (dict(ids=torch.zeros(2, 2, 2, dtype=torch.long)), "must be \\[T, k\\]"),
    (dict(ids=torch.zeros(2, 2)), "int32 or int64"),
    (dict(ids=torch.zeros(2, 17, dtype=torch.long)), "k = 17"),
    (dict(sim=torch.zeros(4, 5)), "must be \\[E, E\\]"),
    (dict(sim=torch.zeros(513, 513)), "E = 513"),
    (dict(sim=torch.zeros(4, 4, dtype=torch.float64)), "float32, bfloat16 or float16"),
    (dict(valid=torch.ones(2, dtype=torch.int32)), "valid must be bool"),
    (dict(valid=torch.ones(3, dtype=torch.bool)), "valid must be \\[T\\]"),
    (dict(s=-1), "select_top_k must be >= 0"),
])
def test_bad_inputs_are_rejected_with_the_field_named(op, bad, message):
    args = dict(ids=torch.zeros(2, 2, dtype=torch.long), sim=torch.zeros(4, 4), s=1, valid=None) | bad
    with pytest.raises(RuntimeError, match=message):
        op.reroute(args["ids"], args["sim"], args["s"], 0.5, args["valid"])


def test_dispatch_reports_its_backend(op):
    assert native.backend("cpu") == "cpp"
    assert native.backend("meta") == "torch"
    if not torch.cuda.is_available():
        assert native.backend("cuda") == "torch" or native._state["cuda"]
    # outside the native limits the dispatch falls back to the reference, with the same answer
    rng = random.Random(9)
    for e, k in ((600, 4), (64, 20)):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        sim = torch.rand(e, e, generator=g)
        ids = torch.rand(32, e, generator=g).topk(k, dim=1).indices
        assert torch.equal(native.reroute_fast(ids, sim, 2, 0.3), expected(ids, sim, 2, 0.3, None))
    ids3 = torch.randint(0, 8, (2, 5, 4))
    sim = torch.rand(8, 8)
    assert torch.equal(native.reroute_fast(ids3, sim, 1, 0.2), reroute(ids3, sim, 1, 0.2, with_stats=False)[0])


def test_reroute_fast_matches_reference_and_leaves_input_alone(op):
    rng = random.Random(21)
    for _ in range(100):
        case = random_case(rng, max_t=256)
        before = case[0].clone()
        assert_same(native.reroute_fast(*case), expected(*case), case)
        assert torch.equal(case[0], before)
        ids = case[0].clone()
        assert native.reroute_fast_(ids, *case[1:]) is ids
        assert_same(ids, expected(*case), case)


def test_dynamo_traces_the_native_op_as_one_node(op):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def route(ids, sim, valid):
        return native.reroute_fast(ids, sim, 2, 0.3, valid) + 0

    torch._dynamo.reset()
    compiled = torch.compile(route, backend=record, fullgraph=True)
    rng = random.Random(4)
    for _ in range(3):
        ids, sim, _, _, _ = random_case(rng, max_t=64)
        if ids.shape[1] < 2 or ids.shape[0] == 0:
            continue
        valid = torch.ones(ids.shape[0], dtype=torch.bool)
        assert torch.equal(compiled(ids, sim, valid), expected(ids, sim, 2, 0.3, valid))
    assert graphs and all("sere_dist.reroute" in g for g in graphs)
    # the fake implementation gives Inductor-style tracing the right metadata
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = torch.ops.sere_dist.reroute(torch.empty(5, 8, dtype=torch.int32), torch.empty(64, 64), 2, 0.3, None)
    assert out.shape == (5, 8) and out.dtype == torch.int32
    torch._dynamo.reset()


class native_disabled:
    """Temporarily route through the torch reference in this process."""

    def __enter__(self):
        self.saved = dict(native._state)
        native._state.update(tried=True, loaded=False, cuda=False, announced=set())

    def __exit__(self, *exc):
        native._state.clear()
        native._state.update(self.saved)


def _run_child(code: str, **env) -> subprocess.CompletedProcess:
    child_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env, capture_output=True, text=True,
                          timeout=300)


CHILD = """
import logging, torch
logging.basicConfig(level=logging.INFO)
from sere_dist.core import native
from sere_dist.core.reroute import reroute
ids = torch.tensor([[0, 2], [1, 3]]); sim = torch.tensor([[1.0, 0.1, 0.8, 0.2], [0.1, 1.0, 0.3, 0.25],
                                                         [0.8, 0.3, 1.0, 0.0], [0.2, 0.25, 0.0, 1.0]])
print("backend", native.backend("cpu"))
print("ids", native.reroute_fast(ids, sim, 1, 0.3).tolist())
"""


def test_sere_native_0_forces_the_torch_path():
    proc = _run_child(CHILD, SERE_NATIVE="0")
    assert proc.returncode == 0, proc.stderr
    assert "backend torch" in proc.stdout and "ids [[0, 0], [1, 3]]" in proc.stdout
    assert "disabled by SERE_NATIVE=0" in proc.stderr
    assert "runs the torch path" in proc.stderr


def test_impossible_build_falls_back_with_a_warning(tmp_path):
    empty = tmp_path / "no_sources"
    empty.mkdir()
    proc = _run_child(CHILD, SERE_NATIVE="1", SERE_EXT_SRC=str(empty), SERE_EXT_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert "backend torch" in proc.stdout and "ids [[0, 0], [1, 3]]" in proc.stdout
    assert "WARNING:sere_dist" in proc.stderr and "extension unavailable" in proc.stderr


# --- CUDA: skipped without a GPU ----------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_op(op):
    if not native._state["cuda"]:
        pytest.fail(f"extension built without CUDA on a CUDA machine: {native.extension_error()}")
    assert native.backend("cuda") == "cuda"
    return op


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("seed", range(6))
def test_cuda_kernel_matches_reference_on_random_cases(cuda_op, seed):
    rng = random.Random(50_000 + seed)
    for _ in range(400):
        case = random_case(rng, max_t=1024 if rng.random() < 0.9 else 16384, device="cuda")
        assert_same(cuda_op.reroute(*case), expected(*case), case)
        ids = case[0].clone()
        cuda_op.reroute_(ids, *case[1:])
        assert_same(ids, expected(*case), case)


@pytest.mark.cuda
@cuda
def test_cuda_kernel_never_synchronises_and_uses_the_current_stream(cuda_op):
    rng = random.Random(77)
    case = random_case(rng, max_t=2048, device="cuda")
    want = expected(*case)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            got = native.reroute_fast(*case)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    assert_same(got, want, case)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("t", [1, 64, 256, 1000, 4096])
def test_cuda_kernel_replays_inside_a_cuda_graph(cuda_op, t):
    rng = random.Random(t)
    e, k, s, rho = 128, 8, 2, 0.3
    sim = torch.rand(e, e, device="cuda").to(torch.bfloat16)
    static_ids = torch.zeros(t, k, dtype=torch.int32, device="cuda")
    static_valid = torch.ones(t, dtype=torch.bool, device="cuda")
    static_ids.copy_(torch.rand(t, e, device="cuda").topk(k, dim=1).indices)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture
        native.reroute_fast(static_ids, sim, s, rho, static_valid)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = native.reroute_fast(static_ids, sim, s, rho, static_valid)
        inplace = static_ids.clone()
        native.reroute_fast_(inplace, sim, s, rho, static_valid)
    for _ in range(5):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        static_ids.copy_(torch.rand(t, e, generator=g).topk(k, dim=1).indices)
        static_valid.copy_(torch.rand(t, generator=g) > 0.25)
        graph.replay()
        want = expected(static_ids, sim, s, rho, static_valid)
        assert torch.equal(static_out.cpu(), want)
        assert torch.equal(inplace.cpu(), want)


# ---------------------------------------------------------------- the whole hook: sere_dist::route

from tests.cuda_emu import random_error_aware_case, random_route_case, route_reference, same_bits  # noqa: E402


def _route_op(case, counts=None, gate=None):
    from sere_dist.core.reroute import KEEP_SUM_FLAG, RULE_IDS, UNMATCHED_IDS
    return torch.ops.sere_dist.route(case["ids"], case["weights"], case["sim"], case["valid"], case["expert_ranks"],
                                     counts, gate, case["s"], case["rho"], RULE_IDS[case["rule"]],
                                     case["merge_duplicates"], case.get("scale"),
                                     UNMATCHED_IDS[case.get("unmatched", "keep")]
                                     | (KEEP_SUM_FLAG if case.get("keep_sum") else 0))


@pytest.mark.parametrize("seed", range(4))
def test_route_op_matches_the_torch_spec_bit_for_bit(op, seed):
    rng = random.Random(9000 + seed)
    for _ in range(400):
        case = random_route_case(rng)
        want_ids, want_w, want_c = route_reference(case)
        counts = torch.zeros(5, dtype=torch.int64)
        got_ids, got_w = _route_op(case, counts)
        label = {k: v for k, v in case.items() if not isinstance(v, torch.Tensor)} | {"T": case["ids"].shape[0]}
        assert torch.equal(got_ids, want_ids), label
        assert same_bits(got_w, want_w), label
        assert counts.tolist() == want_c.tolist(), label


def test_route_top_s_and_merge_exact_outcomes(op):
    ids = torch.tensor([[5, 1, 2, 3]], dtype=torch.int32)          # slots out of weight order
    w = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    sim = torch.eye(8)
    case = dict(ids=ids, weights=w, sim=sim, valid=None, expert_ranks=None, s=2, rho=0.0, rule="top_s",
                merge_duplicates=False)
    counts = torch.zeros(5, dtype=torch.int64)
    new_ids, new_w = _route_op(case, counts)
    assert new_ids.tolist() == ids.tolist()
    torch.testing.assert_close(new_w, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))     # rescaled to the sum, 1
    assert counts.tolist() == [4, 2, 2, 1, 1]                      # 4 -> 2 experts, 2 slots dropped
    # paper rule at rho 0 with sim 1 everywhere: the two secondaries move to primary 1 (lowest id), and
    # merging sums them into slot 1 (the first copy in weight order)
    case.update(rule="paper", sim=torch.ones(8, 8), merge_duplicates=True)
    counts.zero_()
    new_ids, new_w = _route_op(case, counts)
    assert new_ids.tolist() == [[1, 1, 1, 3]]
    torch.testing.assert_close(new_w, torch.tensor([[0.0, 0.7, 0.0, 0.3]]))
    assert counts.tolist() == [4, 2, 2, 1, 1]


def test_route_counts_only_when_the_gate_is_open(op):
    case = random_route_case(random.Random(1))
    case.update(ids=torch.randint(0, 16, (9, 4)), weights=torch.rand(9, 4), sim=torch.rand(16, 16), valid=None,
                expert_ranks=None, rule="paper", s=1)
    _, _, want = route_reference(case)
    counts = torch.zeros(5, dtype=torch.int64)
    _route_op(case, counts, torch.tensor([False]))
    assert counts.tolist() == [0] * 5
    _route_op(case, counts, torch.tensor([True]))
    _route_op(case, None)                                           # counters off: nothing to update
    assert counts.tolist() == want.tolist()


def test_route_fast_falls_back_to_the_same_answer(op):
    rng = random.Random(2)
    for _ in range(40):
        case = random_route_case(rng, max_t=64)
        args = (case["ids"], case["weights"], case["sim"], case["s"], case["rho"], case["valid"])
        kw = dict(rule=case["rule"], expert_ranks=case["expert_ranks"], merge_duplicates=case["merge_duplicates"])
        c_native, c_torch = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        got = native.route_fast(*args, **kw, counts=c_native)
        with native_disabled():
            ref = native.route_fast(*args, **kw, counts=c_torch, count_gate=torch.tensor([True]))
        assert torch.equal(got[0], ref[0]) and same_bits(got[1], ref[1]) and torch.equal(c_native, c_torch)


def test_dynamo_traces_the_whole_hook_as_one_node_and_updates_the_counters(op):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    counts = torch.zeros(5, dtype=torch.int64)
    gate = torch.tensor([True])

    def hook(ids, w, sim, valid):
        new_ids, new_w = native.route_fast(ids, w, sim, 2, 0.3, valid, counts=counts, count_gate=gate)
        return new_ids + 0, new_w * 1

    torch._dynamo.reset()
    compiled = torch.compile(hook, backend=record, fullgraph=True)
    want = torch.zeros(5, dtype=torch.int64)
    for t in (3, 17):
        case = dict(ids=torch.randint(0, 32, (t, 8)), weights=torch.rand(t, 8), sim=torch.rand(32, 32),
                    valid=torch.rand(t) > 0.2, expert_ranks=None, s=2, rho=0.3, rule="paper", merge_duplicates=False)
        ids, w, c = route_reference(case)
        got = compiled(case["ids"], case["weights"], case["sim"], case["valid"])
        assert torch.equal(got[0], ids) and torch.equal(got[1], w)
        want += c
    assert counts.tolist() == want.tolist()
    assert graphs and all("sere_dist.route" in g for g in graphs)
    torch._dynamo.reset()


# ---------------------------------------------------------------- the error-aware rule inside sere_dist::route

def _label(case):
    return ({k: v for k, v in case.items() if not isinstance(v, torch.Tensor)}
            | {"T": case["ids"].shape[0], "E": case["sim"].shape[0], "ids": case["ids"].dtype,
               "weights": case["weights"].dtype, "gain": case["sim"].dtype})


@pytest.mark.parametrize("seed", range(4))
def test_route_op_error_aware_matches_the_torch_spec_bit_for_bit(op, seed):
    # 2,000 cases: paper / rank_aware with scale, keep / drop / renorm, merge on and off, int32 / int64 ids,
    # fp32 / bf16 / fp16 weights and gains, padding, S in 1..k, E up to 400, count gate absent, open, closed
    rng = random.Random(9100 + seed)
    for i in range(500):
        case = random_error_aware_case(rng, max_t=700 if i % 10 == 0 else 64)
        want_ids, want_w, want_c = route_reference(case)
        counts = torch.zeros(5, dtype=torch.int64)
        gate = (None, torch.tensor([True]), torch.tensor([False]))[i % 3]
        got_ids, got_w = _route_op(case, counts, gate)
        assert torch.equal(got_ids, want_ids), _label(case)
        assert same_bits(got_w, want_w), _label(case)
        want_counts = [0] * 5 if i % 3 == 2 else want_c.tolist()
        assert counts.tolist() == want_counts, _label(case)


def test_route_op_with_unit_scale_and_keep_is_the_op_without_scale(op):
    rng = random.Random(9200)
    for _ in range(300):
        case = random_error_aware_case(rng, max_t=64)
        case.update(scale=torch.ones_like(case["scale"]), unmatched="keep", keep_sum=False)
        counts, plain_counts = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        got = _route_op(case, counts)
        plain = _route_op({k: v for k, v in case.items() if k not in ("scale", "unmatched", "keep_sum")}, plain_counts)
        assert torch.equal(got[0], plain[0]) and same_bits(got[1], plain[1]), _label(case)
        assert torch.equal(counts, plain_counts), _label(case)


def test_route_op_error_aware_with_s_equal_k_leaves_routing_unchanged(op):
    rng = random.Random(9300)
    for _ in range(200):
        case = random_error_aware_case(rng, max_t=64)
        case.update(s=case["ids"].shape[1] + rng.randint(0, 1), merge_duplicates=False)   # S = k (or S > k)
        counts = torch.zeros(5, dtype=torch.int64)
        got_ids, got_w = _route_op(case, counts)
        assert torch.equal(got_ids, case["ids"]), _label(case)
        assert same_bits(got_w, case["weights"]), _label(case)    # softmax weights: renorm's r is exactly 1
        assert counts[0] == counts[1] and counts[2] == 0, _label(case)


def test_route_op_error_aware_exact_outcomes(op):
    # S = 1, E = 4: primaries {0, 3}; gain[2, 0] = 0.9 passes 0.5, expert 1 matches nothing; -1, 9 and 7 are
    # outside [0, E): never re-routed, scaled or dropped
    ids = torch.tensor([[0, -1, 9, 2], [3, 1, 2, 7]], dtype=torch.int32)
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    gain = torch.zeros(4, 4)
    gain[2, 0] = 0.9
    scale = torch.full((4, 4), 2.0)
    case = dict(ids=ids, weights=w, sim=gain, valid=None, expert_ranks=None, s=1, rho=0.5, rule="paper",
                merge_duplicates=False, scale=scale)
    outcomes = {}
    for unmatched in ("keep", "drop", "renorm"):
        counts = torch.zeros(5, dtype=torch.int64)
        outcomes[unmatched] = (*_route_op(case | {"unmatched": unmatched}, counts), counts.tolist())
    f = torch.float32
    r = torch.tensor(0.4, dtype=f) + 0.3 + 0.2 + 0.1
    r = r / (torch.tensor(0.4, dtype=f) + 0.0 + 0.2 + 0.1)
    assert outcomes["keep"][0].tolist() == [[0, -1, 9, 0], [3, 1, 0, 7]]
    assert torch.equal(outcomes["keep"][1], torch.tensor([[0.4, 0.3, 0.2, 0.1 * 2], [0.4, 0.3, 0.2 * 2, 0.1]]))
    assert outcomes["keep"][2] == [4, 3, 2, 1, 2]                           # 2 moved onto 0
    assert outcomes["drop"][0].tolist() == [[0, -1, 9, 0], [3, 3, 0, 7]]   # 1 dropped onto the top expert 3
    assert torch.equal(outcomes["drop"][1], torch.tensor([[0.4, 0.3, 0.2, 0.1 * 2], [0.4, 0.0, 0.2 * 2, 0.1]]))
    assert outcomes["drop"][2] == [4, 2, 3, 1, 2]                           # a dropped slot counts as changed
    assert outcomes["renorm"][0].tolist() == outcomes["drop"][0].tolist()
    want = torch.tensor([[0.4, 0.3, 0.2, 0.1 * 2], [0.4, 0.0, 0.2 * 2, 0.1]])
    want[1] = torch.where(want[1] == 0, want[1], want[1] * r)               # token 0 dropped nothing: r = 1
    assert torch.equal(outcomes["renorm"][1], want)
    assert outcomes["renorm"][2] == [4, 2, 3, 1, 2]
    # the test of the torch spec (tests/test_error_aware.py), through route_fast's native path
    ids = torch.tensor([[3, 0, 5], [1, 6, 0]])
    w = torch.tensor([[0.3, 0.5, 0.2], [0.6, 0.1, 0.3]])
    gain = torch.zeros(8, 8)
    gain[6, 0] = 0.9
    counts = torch.zeros(5, dtype=torch.int64)
    assert native._route_path(ids, w, gain, None, None, counts, None, torch.ones(8, 8), "paper", "drop") == "cpp"
    new_ids, new_w = native.route_fast(ids, w, gain, 1, 0.5, scale=torch.full((8, 8), 2.0), unmatched="drop",
                                       counts=counts)
    assert new_ids.tolist() == [[0, 0, 0], [1, 0, 0]]
    assert torch.allclose(new_w, torch.tensor([[0.0, 0.5, 0.0], [0.6, 0.2, 0.3]]))
    assert counts.tolist() == [5, 2, 3, 1, 2]


@pytest.mark.parametrize("bad, message", [
    (dict(rule="top_s"), "scale .the error-aware rule. needs rule 0 .paper. or 1 .rank_aware."),
    (dict(unmatched=3), "unmatched must be 0 .keep., 1 .drop. or 2 .renorm., plus 4 for keep_sum"),
    (dict(unmatched=8), "unmatched must be 0 .keep., 1 .drop. or 2 .renorm., plus 4 for keep_sum"),
    (dict(scale=torch.ones(8, 8, dtype=torch.bfloat16)), "scale must be float32 \\[E, E\\]"),
    (dict(scale=torch.ones(8, 7)), "scale must be float32 \\[E, E\\]"),
])
def test_route_op_refuses_bad_error_aware_inputs(op, bad, message):
    from sere_dist.core.reroute import RULE_IDS
    args = dict(scale=torch.ones(8, 8), unmatched=1, rule="paper")
    args.update(bad)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sere_dist.route(torch.zeros(3, 4, dtype=torch.int32), torch.rand(3, 4), torch.rand(8, 8), None,
                                  None, None, None, 1, 0.0, RULE_IDS[args["rule"]], False, args["scale"],
                                  args["unmatched"])


def test_route_fast_error_aware_native_path_and_its_fallbacks(op):
    rng = random.Random(9400)
    for i in range(60):
        case = random_error_aware_case(rng, max_t=64)
        args = (case["ids"], case["weights"], case["sim"], case["s"], case["rho"], case["valid"])
        kw = dict(rule=case["rule"], expert_ranks=case["expert_ranks"], merge_duplicates=case["merge_duplicates"],
                  scale=case["scale"], unmatched=case["unmatched"])
        if i % 2:   # a bf16 scale is not the op's input: the torch reference takes it (widened)
            kw["scale"] = kw["scale"].bfloat16()
        path = native._route_path(*args[:3], case["valid"], case["expert_ranks"], None, None, kw["scale"],
                                  case["rule"], case["unmatched"])
        assert path == ("torch" if i % 2 else "cpp")
        c_native, c_torch = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        got = native.route_fast(*args, **kw, counts=c_native)
        with native_disabled():
            ref = native.route_fast(*args, **kw, counts=c_torch)
        assert torch.equal(got[0], ref[0]) and same_bits(got[1], ref[1]) and torch.equal(c_native, c_torch)
    ids, w = torch.zeros(2, 4, dtype=torch.int32), torch.rand(2, 4)
    with pytest.raises(ValueError, match="unknown unmatched"):
        native.route_fast(ids, w, torch.rand(8, 8), 1, 0.0, scale=torch.ones(8, 8), unmatched="nope")
    with pytest.raises(ValueError, match="needs rule 'paper' or 'rank_aware'"):
        native.route_fast(ids, w, torch.rand(8, 8), 1, 0.0, rule="top_s", scale=torch.ones(8, 8))


def _route_kwargs(case):
    return dict(rule=case["rule"], expert_ranks=case["expert_ranks"], scale=case.get("scale"),
                unmatched=case.get("unmatched", "keep"), keep_sum=case.get("keep_sum", False))


def test_route_plan_is_route_fast_bit_for_bit_across_batches_and_settings(op):
    # the plugin's eager path: one layer's inputs bound once, then batches of other sizes, other token masks,
    # and S / rho / merge_duplicates changed between calls (sere_control), counters and gate included
    rng = random.Random(9500)
    for i in range(60):
        case = random_error_aware_case(rng, max_t=64) if i % 2 else random_route_case(rng, max_t=64)
        e, k = case["sim"].shape[0], case["ids"].shape[1]
        mask = torch.rand(400, generator=torch.Generator().manual_seed(i)) > 0.3   # cases have T <= 300
        c_plan, c_ref = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        gate = torch.tensor([True])
        kw = _route_kwargs(case)
        first = (case["ids"], case["weights"])
        plan = native.RoutePlan.bind(*first, case["sim"], mask, counts=c_plan, count_gate=gate, **kw)
        assert plan is not None, _label(case)
        for j in range(4):
            t = rng.choice([1, 3, 16, 64, 400])
            ids = torch.randint(0, e, (t, k), dtype=case["ids"].dtype)
            w = torch.rand(t, k).to(case["weights"].dtype)
            s, rho, merge = rng.randint(1, k), rng.choice([0.0, 0.3, 0.9]), rng.random() < 0.5
            if j == 2:
                mask[:t] = ~mask[:t]                 # rewritten in place between forwards, as before each step
                gate.fill_(False)
            assert plan.fits(ids, w)
            got = plan(ids, w, s, rho, merge)
            ref = native.route_fast(ids, w, case["sim"], s, rho, mask[:t].clone(), merge_duplicates=merge,
                                    counts=c_ref, count_gate=gate, **kw)
            assert torch.equal(got[0], ref[0]) and same_bits(got[1], ref[1]), _label(case) | {"t": t, "s": s}
            assert torch.equal(c_plan, c_ref), _label(case)
            gate.fill_(True)


def test_route_plan_binds_only_what_the_op_takes_and_fits_only_its_own_inputs(op):
    ids, w, sim = torch.randint(0, 32, (4, 8), dtype=torch.int32), torch.rand(4, 8), torch.rand(32, 32)
    mask = torch.ones(16, dtype=torch.bool)
    plan = native.RoutePlan.bind(ids, w, sim, mask)
    assert plan is not None and plan.fits(ids, w) and plan.fits(ids[:1], w[:1])
    assert not plan.fits(ids.long(), w)                                          # other ids dtype
    assert not plan.fits(ids, w.bfloat16())                                      # other weights dtype
    assert not plan.fits(ids[:, :4], w[:, :4])                                   # other k
    assert not plan.fits(torch.zeros(17, 8, dtype=torch.int32), torch.rand(17, 8))   # more rows than the mask
    # where route_fast would run the torch reference there is no plan (the caller keeps calling route_fast)
    assert native.RoutePlan.bind(ids, w, torch.rand(600, 600), mask) is None               # E > MAX_EXPERTS
    assert native.RoutePlan.bind(ids, w, sim, mask, scale=torch.ones(32, 32).bfloat16()) is None
    assert native.RoutePlan.bind(ids, w, sim, mask[:2]) is None                             # mask shorter than T
    assert native.RoutePlan.bind(ids, w, sim, mask, counts=torch.zeros(4, dtype=torch.int64)) is None
    with native_disabled():
        assert native.RoutePlan.bind(ids, w, sim, mask) is None


def test_dynamo_traces_the_error_aware_hook_as_one_node(op):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    counts = torch.zeros(5, dtype=torch.int64)

    def hook(ids, w, sim, scale):
        new_ids, new_w = native.route_fast(ids, w, sim, 2, 0.3, counts=counts, scale=scale, unmatched="renorm")
        return new_ids + 0, new_w * 1

    torch._dynamo.reset()
    compiled = torch.compile(hook, backend=record, fullgraph=True)
    case = dict(ids=torch.randint(0, 32, (9, 8)), weights=torch.rand(9, 8), sim=torch.rand(32, 32), valid=None,
                expert_ranks=None, s=2, rho=0.3, rule="paper", merge_duplicates=False, scale=torch.randn(32, 32),
                unmatched="renorm")
    ids, w, c = route_reference(case)
    got = compiled(case["ids"], case["weights"], case["sim"], case["scale"])
    assert torch.equal(got[0], ids) and torch.equal(got[1], w) and counts.tolist() == c.tolist()
    assert graphs and all("sere_dist.route" in g for g in graphs)
    torch._dynamo.reset()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("seed", range(2))
def test_cuda_route_op_error_aware_matches_the_torch_spec_without_syncs(cuda_op, seed):
    rng = random.Random(9500 + seed)
    for i in range(200):
        case = random_error_aware_case(rng, max_t=2048 if i % 10 == 0 else 256)
        want_ids, want_w, want_c = route_reference(case)
        g = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        counts = torch.zeros(5, dtype=torch.int64, device="cuda")
        gate = torch.tensor([True], device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            got_ids, got_w = _route_op(g, counts, gate)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(got_ids.cpu(), want_ids), _label(case)
        assert same_bits(got_w.cpu(), want_w), _label(case)
        assert counts.cpu().tolist() == want_c.tolist(), _label(case)
