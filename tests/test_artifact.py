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


# ---------------------------------------------------------------- format 2: routed-token statistics

def _routed(e=4, layers=(0, 1)):
    f = torch.randn(e, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c, n = f @ f.t(), (f * f).sum(1).expand(e, -1).clone()
    return {i: {"count": (c, n), "router": (0.5 * c, 0.5 * n)} for i in layers}


def test_format_2_round_trip_keeps_the_routed_statistics_exactly(tmp_path):
    a = make()
    a.routed = _routed()
    out = a.save(tmp_path / "sim")
    back = SimilarityArtifact.load(out)
    assert back.format == art_mod.FORMAT == "sere-similarity/2"
    assert json.loads((out / "metadata.json").read_text())["format"] == "sere-similarity/2"
    for i in (0, 1):
        for w in ("count", "router"):
            assert all(torch.equal(x, y) for x, y in zip(back.routed[i][w], a.routed[i][w]))
    scale, gain = back.error_aware_tables(1, "count")
    assert scale.shape == gain.shape == (4, 4) and float(gain.max()) <= 1.0


def test_format_1_artifact_still_loads_and_error_aware_mode_on_it_names_the_mode_and_the_fix(tmp_path, monkeypatch):
    from sere_dist.core.artifact import artifact_for_model
    from sere_dist.core.config import SereConfig
    out = make().save(tmp_path / "old")                                   # no routed statistics
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == "sere-similarity/1"
    assert SimilarityArtifact.load(out).matrices                          # the paper's rule still works
    artifact_for_model(SereConfig(artifact=str(out)), FP)
    with pytest.raises(ArtifactError, match=r"sere.mode=error_aware needs .* sere-similarity/1 .* recalibrate"):
        artifact_for_model(SereConfig(artifact=str(out), mode="error_aware"), FP)
    with pytest.raises(ArtifactError, match=r"sere.mode=error_aware_rank_aware needs"):
        artifact_for_model(SereConfig(artifact=str(out), mode="error_aware_rank_aware"), FP)


def test_unknown_format_and_bad_routed_statistics_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    a = make()
    a.routed = _routed()
    out = a.save(tmp_path / "sim")
    f = out / "similarity.safetensors"
    with safe_open(str(f), framework="pt") as h:
        meta = json.loads(h.metadata()["sere"])
    tensors = load_file(str(f))

    def rewrite(name, tensors=tensors, meta=meta):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "similarity.safetensors"), metadata={"sere": json.dumps(meta)})
        return d

    with pytest.raises(ArtifactError, match=r"format 'sere-similarity/9' is not one .* reads"):
        SimilarityArtifact.load(rewrite("future", meta={**meta, "format": "sere-similarity/9"}))
    nan = dict(tensors)
    nan["routed.1.c.count"] = nan["routed.1.c.count"].clone()
    nan["routed.1.c.count"][0, 1] = float("nan")
    with pytest.raises(ArtifactError, match=r"layer 1 routed C \(count\) contains NaN"):
        SimilarityArtifact.load(rewrite("nan", tensors=nan))
    lone = {k: v for k, v in tensors.items() if k != "routed.0.n.router"}
    with pytest.raises(ArtifactError, match=r"layer 0 has routed statistic \['c'\] without its pair"):
        SimilarityArtifact.load(rewrite("lone", tensors=lone))
    none = {k: v for k, v in tensors.items() if not k.startswith("routed.0.")}
    with pytest.raises(ArtifactError, match=r"no routed-token statistics for MoE layer\(s\) \[0\]"):
        SimilarityArtifact.load(rewrite("missing", tensors=none))
    neg = dict(tensors)
    neg["routed.0.n.count"] = -neg["routed.0.n.count"]
    with pytest.raises(ArtifactError, match=r"negative energy"):
        SimilarityArtifact.load(rewrite("neg", tensors=neg))
    wrong = dict(tensors)
    wrong["routed.0.c.count"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ArtifactError, match=r"layer 0 routed C \(count\) has shape \(3, 3\), expected \(4, 4\)"):
        SimilarityArtifact.load(rewrite("shape", tensors=wrong))


def test_calibration_writes_a_format_2_artifact_whose_statistics_match_the_reduction():
    from sere_dist.calibration.pipeline import calibrate, calibrate_in_process
    from sere_dist.models.tiny import TinySpec, build_model
    torch.manual_seed(0)
    model, _ = build_model(TinySpec(num_layers=2, num_experts=8, top_k=2), "planted")
    x = torch.randint(4, 200, (4, 12))
    art = calibrate(model, x, batch_size=4)
    red = calibrate_in_process(model, x, batch_size=4)
    assert art.format == "sere-similarity/2" and sorted(art.routed) == [0, 1]
    for i in (0, 1):
        assert torch.equal(art.routed[i]["router"][0], red.routed[i].stats("router")[0])
