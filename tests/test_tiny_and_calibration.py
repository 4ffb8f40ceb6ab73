"""Tiny checkpoints load in transformers; calibration recovers planted clusters; SERE beats dropping."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sere_dist.calibration.capture import expert_outputs, moe_blocks, tokenize_texts
from sere_dist.calibration.pipeline import calibrate
from sere_dist.core.config import SereConfig
from sere_dist.calibration.corpus import split_corpus, stdlib_documents
from sere_dist.eval.fidelity import RoutingPatch, active_experts, evaluate, sere_transform
from sere_dist.models.tiny import FAMILIES, TinySpec, build_model, load_tokenizer, planted_clusters, write_checkpoint

SPEC = TinySpec(num_experts=16, top_k=4, num_clusters=4)


@pytest.fixture(scope="module")
def planted():
    model, tok = build_model(SPEC, "planted")
    train, held = split_corpus(stdlib_documents())
    art = calibrate(model, tokenize_texts(tok, train, 64, 24))
    return model, tok, art, tokenize_texts(tok, held, 64, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_of_each_family_loads_in_transformers(tmp_path, family):
    out = write_checkpoint(tmp_path / family, TinySpec(family=family, num_experts=8, top_k=2), kind="random")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(moe_blocks(model)) == 2
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 2048) and torch.isfinite(logits).all()


def test_tokenizer_round_trips_and_has_a_chat_template():
    tok = load_tokenizer()
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_expert_outputs_match_the_model_experts_on_one_hot_routing(planted):
    model = planted[0]
    blk = moe_blocks(model)[0]
    x = torch.randn(5, SPEC.hidden_size)
    y = expert_outputs(blk.experts, x)
    for e in (0, 7, 15):
        ids = torch.full((5, 1), e)
        ref = blk.experts(x, ids, torch.ones(5, 1))
        assert torch.allclose(y[e], ref, atol=1e-5)


def test_calibration_recovers_planted_clusters(planted, tmp_path):
    model, _, art, _ = planted
    for layer, m in art.matrices.items():
        labels = torch.tensor(model._sere_clusters[layer])
        # each expert's most similar other expert is in its own cluster
        off = m.clone().fill_diagonal_(-1)
        assert torch.equal(labels[off.argmax(1)], labels)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(16, dtype=torch.bool)
        assert m[same & ~eye].min() > m[~same].max()
    # and the cluster labels survive the checkpoint round trip
    out = write_checkpoint(tmp_path / "p", SPEC, kind="planted")
    assert planted_clusters(out) == model._sere_clusters


def _block_output_error(model, blk_idx, x, transform):
    blk = moe_blocks(model)[blk_idx]
    with torch.no_grad():
        ref = blk(x)
        with RoutingPatch(model, transform):
            out = blk(x)
    return float((out - ref).norm() / ref.norm())


def test_sere_output_error_is_far_below_dropping_the_same_experts(planted):
    model, _, art, ev = planted
    x = torch.randn(16, 1, SPEC.hidden_size)   # a decode step: 16 sequences, one token each
    sere = sere_transform(art.matrices, SereConfig(select_top_k=1, threshold=0.0))

    def drop(layer, ids, w, valid):  # naive top-S: drop secondaries, renormalise
        nw = torch.zeros_like(w); nw[..., :1] = w[..., :1]
        nw = nw * (w.sum(-1, keepdim=True) / nw.sum(-1, keepdim=True))
        return ids, nw, active_experts(ids, nw, valid, 16)
    for layer in (0, 1):
        e_sere = _block_output_error(model, layer, x, sere)
        e_drop = _block_output_error(model, layer, x, drop)
        assert e_sere < 0.25 * e_drop, (layer, e_sere, e_drop)
    # and end to end: top-1 agreement far higher at the same S
    r = evaluate(model, ev, sere, batch_size=16)
    d = evaluate(model, ev, drop, batch_size=16)
    assert r["experts"] < r["ref_experts"]
    assert r["top1_agreement"] > d["top1_agreement"] + 0.2
    assert r["kl"] < 0.1 * d["kl"]


def test_s_equal_k_leaves_the_model_output_unchanged(planted):
    model, _, art, ev = planted
    r = evaluate(model, ev[:4], sere_transform(art.matrices, SereConfig(select_top_k=4, threshold=0.0)), batch_size=4)
    assert r["top1_agreement"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-9)
    assert r["experts"] == r["ref_experts"]


def test_too_few_qualifying_texts_is_a_clear_error():
    tok = load_tokenizer()
    with pytest.raises(ValueError, match="only 1 calibration texts qualify"):
        tokenize_texts(tok, ["x " * 500, "short"], 64, 5)
