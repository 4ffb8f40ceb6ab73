import json

import pytest
import torch

from sere_dist.core import artifact as art_mod
from sere_dist.core.artifact import ArtifactError, SimilarityArtifact, model_fingerprint

FP = {"architecture": "Qwen3MoeForCausalLM", "model_type": "qwen3_moe", "num_experts": 4, "top_k": 2,
      "moe_layers": [0, 1], "hidden_size": 64, "num_hidden_layers": 2}


def make(mats=None, fp=FP):
    mats = mats if mats is not None else {0: torch.eye(4), 1: torch.full((4, 4), 0.5).fill_diagonal_(1)}
    return SimilarityArtifact(matrices=mats, fingerprint=dict(fp), metric="frobenius", tokens=128, data_digest="abc")


def test_round_trip_keeps_matrices_and_metadata(tmp_path):
    out = make().save(tmp_path / "sim")
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "similarity.safetensors"]
    back = SimilarityArtifact.load(out)
    assert torch.equal(back.matrices[1], make().matrices[1])
    assert back.fingerprint == FP and back.metric == "frobenius" and back.tokens == 128
    meta = json.loads((out / "metadata.json").read_text())
    for key in ("fingerprint", "metric", "tokens", "data_digest", "created", "sere_dist_version", "stats"):
        assert key in meta
    assert meta["stats"]["1"]["mean"] == pytest.approx(0.5)
    # the safetensors file alone is enough too
    assert SimilarityArtifact.load(out / "similarity.safetensors").tokens == 128


@pytest.mark.parametrize("key, value", [("num_experts", 8), ("top_k", 4), ("moe_layers", [0]),
                                        ("hidden_size", 128), ("architecture", "MixtralForCausalLM")])
def test_artifact_for_another_model_is_refused_naming_both_sides(key, value):
    other = dict(FP, **{key: value})
    with pytest.raises(ArtifactError, match=f"{key} is .* in the artifact but .*{value!s:.5}"):
        make().check_model(other)


def test_bad_matrices_are_refused_before_writing(tmp_path):
    nan = torch.eye(4); nan[0, 1] = float("nan")
    cases = {"NaN": {0: nan, 1: torch.eye(4)}, "shape": {0: torch.eye(3), 1: torch.eye(4)},
             "no similarity matrix": {0: torch.eye(4)}, r"values in": {0: torch.eye(4) * 2, 1: torch.eye(4)}}
    for msg, mats in cases.items():
        with pytest.raises(ArtifactError, match=msg):
            make(mats).save(tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_existing_output_needs_overwrite(tmp_path):
    make().save(tmp_path / "sim")
    with pytest.raises(ArtifactError, match="--overwrite"):
        make().save(tmp_path / "sim")
    make().save(tmp_path / "sim", overwrite=True)


def test_failure_mid_write_leaves_no_half_written_artifact(tmp_path, monkeypatch):
    make().save(tmp_path / "sim")
    before = (tmp_path / "sim" / "similarity.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(art_mod, "save_file", boom)
    with pytest.raises(OSError):
        make().save(tmp_path / "new")
    with pytest.raises(OSError):
        make().save(tmp_path / "sim", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]          # no temp dirs, no "new"
    assert (tmp_path / "sim" / "similarity.safetensors").read_bytes() == before


def test_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        SimilarityArtifact.load(tmp_path / "nope")
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read"):
        SimilarityArtifact.load(tmp_path / "x.safetensors")


@pytest.mark.parametrize("cfg, layers, e, k", [
    ({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 4, "num_experts": 60,
      "num_experts_per_tok": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3], "hidden_size": 2048}, [1], 60, 4),
    ({"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
      "hidden_size": 64}, [0, 1], 8, 2),
    ({"model_type": "deepseek_v2", "num_hidden_layers": 4, "n_routed_experts": 64, "num_experts_per_tok": 6,
      "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_size": 64}, [1, 2, 3], 64, 6),
])
def test_fingerprint_finds_moe_layers_per_family(cfg, layers, e, k):
    fp = model_fingerprint(cfg)
    assert (fp["moe_layers"], fp["num_experts"], fp["top_k"]) == (layers, e, k)


def test_dense_model_is_not_moe():
    with pytest.raises(ArtifactError, match="not a Mixture-of-Experts"):
        model_fingerprint({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2})
