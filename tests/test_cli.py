"""The `sere` console script, run as a user would."""

import json
import subprocess
import sys

SERE = [sys.executable, "-m", "sere_dist.cli"]


def run(*args, check=True):
    p = subprocess.run([*SERE, *args], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_demo_prints_the_fidelity_table_for_s_1_2_and_k(tmp_path):
    out = tmp_path / "demo.json"
    p = run("demo", "--cal-samples", "16", "--eval-samples", "8", "--batch", "8", "--json", str(out))
    assert "top-1 agree" in p.stdout
    rows = {r["S"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == [1, 2, 4]
    assert rows[4]["top1_agreement"] == 1.0 and rows[4]["experts"] == rows[4]["ref_experts"]
    assert rows[1]["experts"] < rows[2]["experts"] < rows[4]["experts"]


def test_make_model_then_calibrate_then_refuse_to_overwrite(tmp_path):
    model = tmp_path / "m"
    run("make-model", str(model), "--kind", "planted", "--experts", "8", "--top-k", "2")
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    art = tmp_path / "sim"
    run("calibrate", "--model", str(model), "--out", str(art), "--num-samples", "4", "--seq-len", "32")
    meta = json.loads((art / "metadata.json").read_text())
    assert meta["fingerprint"]["num_experts"] == 8 and meta["layers"] == [0, 1]
    again = run("calibrate", "--model", str(model), "--out", str(art), "--num-samples", "4", "--seq-len", "32",
                check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_calibrate_writes_to_a_filesystem_uri_with_its_report(tmp_path):
    from sere_dist.core.artifact import SimilarityArtifact

    model = tmp_path / "m"
    run("make-model", str(model), "--kind", "planted", "--experts", "8", "--top-k", "2")
    dest = tmp_path / "bucket" / "sim"
    p = run("calibrate", "--model", str(model), "--out", dest.as_uri(), "--num-samples", "4", "--seq-len", "32")
    assert dest.as_uri() in p.stdout
    assert SimilarityArtifact.load(dest).fingerprint["num_experts"] == 8
    assert {f.name for f in dest.iterdir()} >= {"similarity.safetensors", "metadata.json", "stats.csv", "stats.md",
                                                "heatmaps.png"}
    assert [f.name for f in dest.parent.iterdir()] == ["sim"]          # no temporary sibling left behind
    again = run("calibrate", "--model", str(model), "--out", dest.as_uri(), "--num-samples", "4", "--seq-len", "32",
                check=False)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
