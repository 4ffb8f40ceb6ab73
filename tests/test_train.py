"""The trainer: the load-balancing coefficient reaches the model, upcycling preserves the dense function,
recipes are checked, and a short run writes a loadable checkpoint with its record."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from sere_dist.calibration.capture import load_model, moe_blocks
from sere_dist.models.tiny import TinySpec, build_model, load_tokenizer
from sere_dist.models.train import Recipe, dense_model, train, upcycle

SMALL = TinySpec(family="qwen3_moe", hidden_size=64, num_layers=1, num_heads=2, num_experts=8, top_k=2,
                 expert_intermediate=32, seed=0)


def test_the_aux_coefficient_is_in_the_model_at_construction():
    model, _ = build_model(replace(SMALL, router_aux_loss_coef=0.02), "random")
    assert model.router_aux_loss_coef == 0.02           # what the loss uses, read when the model is built
    default, _ = build_model(SMALL, "random")
    assert default.router_aux_loss_coef == 0.001        # None keeps the family's default


@torch.no_grad()
def _same_function(dense, moe, tok):
    x = torch.randint(4, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    return dense(x).logits, moe(x).logits


def test_copy_upcycling_without_noise_reproduces_the_dense_model():
    tok = load_tokenizer()
    dense = dense_model(SMALL, SMALL.expert_intermediate, tok)
    moe, _ = build_model(SMALL, "random")
    upcycle(dense, moe, Recipe(upcycle="copy", upcycle_noise=0.0))
    a, b = _same_function(dense, moe, tok)
    assert torch.allclose(a, b, atol=1e-4)              # every expert is the FFN and the weights sum to 1


def test_split_upcycling_with_uniform_routing_reproduces_the_dense_model():
    spec = replace(SMALL, num_experts=4, top_k=4)        # 4 slices, every token takes all 4 with weight 1/4
    tok = load_tokenizer()
    dense = dense_model(spec, 4 * spec.expert_intermediate, tok)
    moe, _ = build_model(spec, "random")
    upcycle(dense, moe, Recipe(upcycle="split", upcycle_noise=0.0))
    with torch.no_grad():
        for blk in moe_blocks(moe).values():
            blk.gate.weight.zero_()
    a, b = _same_function(dense, moe, tok)
    assert torch.allclose(a, b, atol=1e-4)


def test_upcycled_experts_differ_by_the_requested_noise_only():
    tok = load_tokenizer()
    dense = dense_model(SMALL, SMALL.expert_intermediate, tok)
    moe, _ = build_model(SMALL, "random")
    upcycle(dense, moe, Recipe(upcycle="copy", upcycle_noise=0.01))
    w = moe_blocks(moe)[0].experts.down_proj
    rel = (w - w.mean(0, keepdim=True)).norm() / w.norm()
    assert 0.001 < rel < 0.05


@pytest.mark.parametrize("recipe, field", [(Recipe(steps=0), "--steps"), (Recipe(aux_coef=-1), "--aux-coef"),
                                           (Recipe(router_init_scale=0), "--router-init-scale"),
                                           (Recipe(upcycle="split", split_copies=3), "--split-copies")])
def test_bad_recipes_name_the_option(recipe, field):
    with pytest.raises(ValueError, match=field):
        recipe.check(SMALL)


def test_a_short_upcycled_run_writes_both_checkpoints_and_the_record(tmp_path):
    torch.set_num_threads(1)
    rec = Recipe(steps=2, dense_steps=2, batch_size=2, seq_len=32, upcycle="copy")
    res = train(tmp_path / "moe", SMALL, rec, dense_out=tmp_path / "dense")
    saved = json.loads((tmp_path / "moe" / "training.json").read_text())
    assert saved["recipe"]["upcycle"] == "copy" and saved["spec"]["router_aux_loss_coef"] == 0.01
    assert res["dense_heldout_ppl"] > 1 and res["heldout_ppl"] > 1
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["router_aux_loss_coef"] == 0.01 and cfg["num_local_experts"] == 8
    model, _ = load_model(tmp_path / "moe")
    assert len(moe_blocks(model)) == 1
    assert (tmp_path / "dense" / "config.json").exists()


def test_the_cli_refuses_a_bad_option_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sere_dist.cli", "train-tiny", "--out", str(tmp_path / "x"),
                        "--top-k", "9", "--experts", "8"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["sere train-tiny: error: --top-k must be in 1..--experts (8), got 9"]
    assert not (tmp_path / "x").exists()
