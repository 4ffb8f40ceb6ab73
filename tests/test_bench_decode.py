"""benchmarks/bench_decode_torch.py, the GPU run's end-to-end decode loop, checked on the CPU: its cached
decode step computes the same logits as a full causal forward, the SERE arm re-routes through the native
op, and the command writes the rows make_results.py reads (a CPU run never writes `tpot_gpu`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_decode_torch as bd  # noqa: E402

HEAD_KEYS = {"experts", "hidden", "batch", "rule", "S", "rho", "plain_ms", "sere_ms", "speedup", "moe_share",
             "distinct_before", "distinct_after", "bound_speedup"}


def tiny_model(layers=2, max_len=16, dtype=torch.float32):
    return bd.DecodeModel(**bd.TINY, layers=layers, max_len=max_len, rho=0.5, device=torch.device("cpu"),
                          dtype=dtype, seed=3)


def test_cached_decode_matches_a_full_forward():
    m = tiny_model()
    b, t = 3, 7
    tokens = bd.prompt_tokens(b, t, m.vocab, "cpu")
    full = m.forward_full(tokens)                               # [B, T, V]
    st = bd.State(m, b, keep_logits=True)
    got = []
    for j in range(t):                                          # teacher forcing, one token per step
        st.tok.copy_(tokens[:, j])
        m.step(st, bd.Arm("plain"))
        got.append(st.logits.clone())
        assert int(st.pos) == j + 1
        assert torch.equal(st.tok, st.logits.argmax(-1))        # greedy next token written back
    got = torch.stack(got, dim=1)
    err = (got - full).abs().max().item() / full.abs().max().item()
    assert err < 1e-5, err
    # a wrong cache position (every step writing slot 0) breaks it: the check can fail
    st2 = bd.State(m, b, keep_logits=True)
    for j in range(t):
        st2.tok.copy_(tokens[:, j])
        st2.pos.zero_()
        m.step(st2, bd.Arm("plain"))
    assert (st2.logits - full[:, -1]).abs().max().item() > 1e-3


def test_grouped_experts_match_the_loop_and_sere_arm_reroutes():
    m = tiny_model(max_len=24)
    assert bd.check_grouped(m) is None
    st = bd.State(m, 8)
    m.prefill(st, bd.prompt_tokens(8, 4, m.vocab, "cpu"))
    assert st.pos0 == 4 and int(st.pos) == 4
    plain = bd.Runner(m, st, bd.Arm("plain"), graphs=False)
    sere = bd.Runner(m, st, bd.Arm("S=2", s=2), graphs=False)
    pb, pa = plain.distinct(6)
    assert pb == pa                                             # plain: the hook never runs
    sb, sa = sere.distinct(6)
    assert sa < sb                                              # S = 2 of k = 4 at rho 0.5 moves slots
    moved = sum(int((bf != af).sum()) for bf, af in zip(st.before, st.after))
    assert moved > 0
    counts = torch.stack(st.counts).sum(0)
    assert int(counts.sum()) > 0                                # the op's counters ran (gate on)
    # the reset point replays the same trajectory
    plain.st.reset()
    plain()
    first = st.tok.clone()
    plain.st.reset()
    plain()
    assert torch.equal(first, st.tok)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode") / "d.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_torch.py"), "--device", "cpu", "--tiny",
                        "--layers", "2", "--batch-sizes", "1,8", "--s-values", "2", "--repeats", "2", "--tokens", "4",
                        "--prompt", "3", "--no-plot", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, json.loads(out.read_text())


def test_cpu_command_writes_rows_and_no_gpu_headline(cpu_run):
    r, d = cpu_run
    assert d["benchmark"] == "tpot_torch_cpu" and "headline" not in d
    assert [(x["batch"], x["S"]) for x in d["rows"]] == [(1, 2), (8, 2)]
    for row in d["rows"]:
        assert HEAD_KEYS <= row.keys()
        assert 0.0 <= row["moe_share"] <= 1.0
        assert row["distinct_after"] <= row["distinct_before"] <= 4 * row["batch"]
        assert row["plain_ms"] > 0 and row["sere_ms"] > 0
    # 2 rounds x 4 arms (plain, S=2, no_moe) per batch size, in ABBA order
    arms = [s["arm"] for s in d["samples"] if s["batch"] == 1]
    assert arms == ["plain", "S=2", "no_moe", "no_moe", "S=2", "plain"]
    assert "| batch | S |" in r.stdout


@pytest.mark.parametrize("argv, needle", [
    (["--repeats", "0"], "--repeats"),
    (["--s-values", "9"], "--s-values"),
    (["--rho", "1.5"], "--rho"),
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--vocab", "3"], "--vocab"),
])
def test_bad_arguments_stop_with_one_line(argv, needle):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_torch.py"), "--device", "cpu", "--tiny",
                        "--out", "/dev/null", *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cpu_run_without_out_is_refused_and_cuda_without_gpu_skips():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_torch.py"), "--device", "cpu", "--tiny"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--out" in r.stderr
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_torch.py")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "no CUDA device" in r.stdout


def test_make_results_renders_the_run_and_takes_its_gpu_rows(cpu_run):
    from make_results import decode_torch_section, headline
    _, d = cpu_run
    text, notes = decode_torch_section(d)
    assert "torch decode loop (CPU)" in text
    body = [ln for ln in text.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 8 |")]
    assert len(body) == 2 and all(ln.count("|") == 12 for ln in body)
    assert len(notes) == 1 and "batch 1" in notes[0]              # batch 1 and 16 are the noted ones
    assert "tpot_gpu" not in headline({"tpot_torch_cpu": d})      # a CPU run never lands in tpot_gpu
    gpu = dict(d, benchmark="tpot_gpu_torch", headline={"tpot_gpu": bd.headline_rows(d["rows"])})
    got = headline({"tpot_gpu_torch": gpu})["tpot_gpu"]
    assert [(x["batch"], x["S"], x["engine"]) for x in got] == [(1, 2, "torch decode loop"), (8, 2, "torch decode loop")]
    assert HEAD_KEYS <= got[0].keys()
    vllm_rows = [{"batch": 1, "S": 2, "engine": "vllm"}]
    both = headline({"tpot_gpu": {"headline": {"tpot_gpu": vllm_rows}}, "tpot_gpu_torch": gpu})
    assert both["tpot_gpu"] == vllm_rows                           # vLLM's rows first where vLLM ran
