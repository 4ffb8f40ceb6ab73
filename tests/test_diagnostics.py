"""Redundancy diagnostics: exact routed-token statistics C and N, the substitution errors built on them,
and a verdict that tells a model with redundant experts from one with near-orthogonal experts."""

import json
import random

import numpy as np
import pytest
import torch

from sere_dist.calibration.capture import expert_outputs, moe_blocks, routing, tokenize_texts
from sere_dist.calibration.corpus import split_corpus, stdlib_documents
from sere_dist.calibration.diagnostics import (DIAGNOSTICS_JSON, ROUTED_STATS, diagnose, diagnostics,
                                               load_routed_stats, row_values, spearman)
from sere_dist.calibration.pipeline import (CalibrationJob, CaptureStage, ExpertGramStage, _reduce,
                                            calibrate_in_process, prepare)
from sere_dist.core.model import model_fingerprint
from sere_dist.core.similarity import RoutedAccumulator, scaled_substitution_error, substitution_error
from sere_dist.models.tiny import TinySpec, build_model, write_checkpoint

SPEC = TinySpec(num_experts=16, top_k=4, num_clusters=4)


@pytest.fixture(scope="module")
def texts():
    return split_corpus(stdlib_documents())[0]


def naive_stats(y, ids, weights):
    """Per-slot Python loop: C[e][p], N[e][p] for q = 1 and q = router weight."""
    e = y.shape[0]
    c = {w: [[0.0] * e for _ in range(e)] for w in ("count", "router")}
    n = {w: [[0.0] * e for _ in range(e)] for w in ("count", "router")}
    yd = y.double()
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            r = int(ids[t, j])
            for p in range(e):
                dot = float(yd[r, t] @ yd[p, t])
                sq = float(yd[p, t] @ yd[p, t])
                for w, q in (("count", 1.0), ("router", float(weights[t, j]))):
                    c[w][r][p] += q * dot
                    n[w][r][p] += q * sq
    return c, n


def random_routing(seed, e=5, n=23, h=3, k=2):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(e, n, h, generator=g)
    ids = torch.randint(0, e, (n, k), generator=g)      # repeats inside a token count once per slot
    w = torch.rand(n, k, generator=g)
    return y, ids, w


@pytest.mark.parametrize("seed", range(3))
def test_routed_statistics_equal_a_naive_per_slot_loop(seed):
    y, ids, w = random_routing(seed)
    acc = RoutedAccumulator(5)
    acc.update(y, ids, w)
    c, n = naive_stats(y, ids, w)
    for name in ("count", "router"):
        got_c, got_n = acc.stats(name)
        torch.testing.assert_close(got_c, torch.tensor(c[name], dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_n, torch.tensor(n[name], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert acc.count.tolist() == [float((ids == i).sum()) for i in range(5)]
    torch.testing.assert_close(acc.weight, torch.stack([w[ids == i].double().sum() for i in range(5)]))
    assert acc.tokens == 23


def test_streamed_batches_and_merged_shards_equal_one_pass():
    y, ids, w = random_routing(7, n=301)
    whole = RoutedAccumulator(5)
    whole.update(y, ids, w)
    streamed, merged = RoutedAccumulator(5), RoutedAccumulator(5)
    for s in range(0, 301, 37):                                    # uneven batches
        streamed.update(y[:, s:s + 37], ids[s:s + 37], w[s:s + 37])
    for s in reversed(range(0, 301, 50)):                          # shards reduced in another order
        part = RoutedAccumulator(5)
        part.update(y[:, s:s + 50], ids[s:s + 50], w[s:s + 50])
        merged.merge(RoutedAccumulator.from_tensors(part.tensors()))
    for acc in (streamed, merged):
        for k, v in whole.tensors().items():
            torch.testing.assert_close(acc.tensors()[k], v, rtol=1e-12, atol=1e-10)


def test_substitution_errors_have_their_closed_form():
    # per token: f1 = 0.5 f0 (same direction), f2 = 3 * f0 rotated by 90 degrees (orthogonal)
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = torch.stack([f0, 0.5 * f0, 3.0 * torch.stack([-f0[:, 1], f0[:, 0]], 1)])
    ids = torch.randint(0, 3, (40, 2), generator=g)
    acc = RoutedAccumulator(3)
    acc.update(y, ids, torch.rand(40, 2, generator=g))
    for weighting in ("count", "router"):
        r = substitution_error(*acc.stats(weighting))
        ls = scaled_substitution_error(*acc.stats(weighting))
        expect_r = torch.tensor([[0, 0.25, 10], [1, 0, 1 + 36], [1 + 1 / 9, 1 + 1 / 36, 0]], dtype=torch.float64)
        expect_ls = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float64)
        torch.testing.assert_close(r, expect_r, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ls, expect_ls, rtol=0, atol=1e-9)
        c, n = acc.stats(weighting)
        assert float(c[0, 1] / n[0, 1]) == pytest.approx(2.0)       # least-squares scale a(0, 1) = 1 / 0.5


def test_an_expert_with_no_routed_tokens_has_no_row():
    y, _, _ = random_routing(1, e=3)
    acc = RoutedAccumulator(3)
    acc.update(y, torch.zeros(23, 1, dtype=torch.long))            # every token to expert 0
    r = substitution_error(*acc.stats())
    assert torch.isfinite(r[0]).all() and torch.isnan(r[1:]).all()
    v = row_values(torch.eye(3), torch.eye(3), *acc.stats())
    assert v["expert"].tolist() == [0]


def test_spearman_uses_average_ranks_for_ties():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ranks (1.5, 1.5, 3) vs (1, 2, 3): Pearson of the ranks = sqrt(3) / 2
    assert spearman(torch.tensor([5.0, 5.0, 7.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(3 ** 0.5 / 2)


def test_bad_routed_input_is_a_named_error():
    acc = RoutedAccumulator(4)
    y = torch.zeros(4, 3, 2)
    with pytest.raises(ValueError, match=r"ids must be \[n=3, k\]"):
        acc.update(y, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        acc.update(y, torch.full((3, 1), 4))
    with pytest.raises(ValueError, match=r"outputs must be \[E=4, n, H\]"):
        acc.update(torch.zeros(3, 3, 2), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown routed-token weighting 'gate'"):
        acc.stats("gate")


# ------------------------------------------------------------------ on tiny models

def test_router_access_gives_the_routing_the_block_uses():
    model, _ = build_model(TinySpec(num_experts=8, top_k=2), "random")
    blk = moe_blocks(model)[0]
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(0))
    ids, w = routing(blk, x)
    y = expert_outputs(blk.experts, x)                              # [E, 7, H]
    mixed = (w[..., None] * y[ids, torch.arange(7)[:, None]]).sum(1)
    torch.testing.assert_close(mixed, blk(x[None])[0], atol=1e-5, rtol=1e-5)


def test_shards_reduced_in_any_order_give_the_same_statistics(texts):
    """What the Ray Data job does: per-(layer, shard) rows from the two stages, arriving in any order."""
    model, tok = build_model(TinySpec(num_experts=8, top_k=2), "random")
    toks = tokenize_texts(tok, texts, 16, 6)
    cap, grams = CaptureStage(model, "float32"), ExpertGramStage(model, "float32", "frobenius", 20, None)
    rows = []
    for s in range(0, 6, 2):
        shards = cap({"row": np.arange(s, s + 2), "ids": toks[s:s + 2].numpy()})
        rows += [grams({k: v[i:i + 1] for k, v in shards.items()}) for i in range(len(shards["layer"]))]
    random.Random(0).shuffle(rows)
    fp = model_fingerprint(model.config)
    shuffled = _reduce(rows, fp, 96, "frobenius", None)
    single = calibrate_in_process(model, toks, batch_size=2, token_chunk=20)   # the same shards, in order
    for i in fp.moe_layers:
        for k, v in single.routed[i].tensors().items():
            torch.testing.assert_close(shuffled.routed[i].tensors()[k], v, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(shuffled.grams[i], single.grams[i], rtol=1e-9, atol=1e-9)


def test_planted_model_is_redundant_and_its_best_matches_stay_in_the_cluster(texts):
    model, tok = build_model(SPEC, "planted")
    d = diagnose(model, tokenize_texts(tok, texts, 32, 8))
    assert d["label"] == "helps" and d["verdict"].startswith("re-routing should help: experts are redundant")
    for row in d["layers"]:
        labels = model._sere_clusters[row["layer"]]
        assert row["routed_experts"] == 16
        assert all(labels[b] == labels[e] for e, b in enumerate(row["best_match"]))
        assert row["beats_drop_share"] == 1.0 and row["r_best_median"] < 0.1
        assert row["ls_min_median"] <= row["r_min_median"] + 1e-12       # scaling never hurts
        assert row["spearman"] > 0.5


def test_random_model_is_not_redundant_and_the_verdict_says_drop(texts):
    model, tok = build_model(SPEC, "random")
    d = diagnose(model, tokenize_texts(tok, texts, 32, 8))
    assert d["label"] == "hurts"
    assert d["verdict"].startswith("re-routing is unlikely to help") and "prefer dropping secondaries" in d["verdict"]
    assert abs(d["pooled"]["median_cosine"]) < 0.1
    assert d["pooled"]["r_best_median"] > 1 and d["pooled"]["beats_drop_share"] < 0.25


def test_calibrate_writes_diagnostics_and_routed_statistics_and_prints_the_verdict(tmp_path, capsys):
    from sere_dist.cli import main

    model = write_checkpoint(tmp_path / "m", TinySpec(num_experts=8, top_k=2, num_clusters=2), kind="planted")
    out = tmp_path / "sim"
    assert main(["calibrate", "--model", str(model), "--out", str(out), "--num-samples", "4",
                 "--seq-len", "32", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / DIAGNOSTICS_JSON).read_text())
    assert f"verdict: {doc['verdict']}" in printed and doc["label"] == "helps"
    assert [r["layer"] for r in doc["layers"]] == [0, 1] and doc["tokens"] == 128
    md = (out / "stats.md").read_text()
    assert md.startswith("| layer | mean | std | min | max |")
    assert "## Redundancy diagnostics" in md and f"verdict: {doc['verdict']}" in md
    assert json.loads((out / "calibration.json").read_text())["verdict"] == doc["verdict"]
    # the file the error-aware rule will read equals an in-process run on the same tokens
    routed = load_routed_stats(out)
    prep = prepare(CalibrationJob(model=str(model), out=str(tmp_path / "unused"), num_samples=4, seq_len=32))
    from sere_dist.calibration.capture import load_model
    ref = calibrate_in_process(load_model(model)[0], prep.tokens, batch_size=2)
    for i in (0, 1):
        for k, v in ref.routed[i].tensors().items():
            torch.testing.assert_close(routed[i].tensors()[k], v, rtol=1e-9, atol=1e-9)
    again = diagnostics(ref.grams, ref.matrices, ref.routed, metric="frobenius")
    assert again["verdict"] == doc["verdict"]


def test_missing_routed_statistics_file_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match=f"routed statistics not found: .*{ROUTED_STATS}"):
        load_routed_stats(tmp_path)
    (tmp_path / ROUTED_STATS).write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read routed statistics"):
        load_routed_stats(tmp_path)


def test_diagnose_refuses_an_unknown_weighting():
    model, _ = build_model(TinySpec(num_experts=8, top_k=2), "random")
    with pytest.raises(ValueError, match="unknown routed-token weighting 'gate'; use one of count, router"):
        diagnose(model, torch.zeros(1, 4, dtype=torch.long), weighting="gate")
