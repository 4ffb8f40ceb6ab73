"""Calibration as a Ray Data job: same matrices as one process, spread over nodes, atomic output,
clear errors before any Ray work, and a real `ray job submit` against a `ray start` head."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sere_dist.core.artifact import ArtifactError, SimilarityArtifact
from sere_dist.calibration.pipeline import ActorStartError, CalibrationJob, cka_positions, prepare, run
from sere_dist.calibration.report import HEATMAP_PNG, STATS_CSV, STATS_MD, stats_rows
from sere_dist.calibration.capture import load_model
from sere_dist.calibration.pipeline import calibrate, calibrate_in_process
from sere_dist.calibration.diagnostics import DIAGNOSTICS_JSON, diagnostics, load_routed_stats
from sere_dist.calibration.corpus import split_corpus, stdlib_documents, write_jsonl
from sere_dist.models.tiny import TinySpec, planted_clusters, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PLANTED = TinySpec(family="qwen3_moe", num_experts=16, top_k=4, num_clusters=4)
SHARED = TinySpec(family="qwen2_moe", num_experts=8, top_k=2)       # has a shared expert


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"planted": str(write_checkpoint(root / "planted", PLANTED, kind="planted")),
            "shared": str(write_checkpoint(root / "shared", SHARED, kind="random"))}


def _ray_address_file():
    p = Path("/tmp/ray/ray_current_cluster")
    return p, (p.read_text() if p.exists() else None)


@pytest.fixture(scope="module")
def cluster_runs(models, tmp_path_factory):
    """Every Ray Data run of this module, on one `ray.cluster_utils.Cluster`: a head with no CPUs and
    two simulated worker nodes, so all the work lands on the worker nodes. Shut down before the
    `ray job submit` test starts its own head."""
    import ray
    from ray.cluster_utils import Cluster

    out = tmp_path_factory.mktemp("runs")
    addr_file, addr = _ray_address_file()    # Cluster overwrites it; others' CLIs may read it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 150 * 1024**2})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2) for _ in range(2)]
    cluster.wait_for_nodes()
    if addr is not None:
        addr_file.write_text(addr)
    ray.init(address=cluster.address)
    runs = {"worker_nodes": {w.node_id for w in workers}}
    try:
        runs["planted"] = run(prepare(CalibrationJob(model=models["planted"], out=str(out / "planted"),
                                                     num_samples=16, seq_len=64, batch_size=4, num_workers=2)))
        runs["cka"] = run(prepare(CalibrationJob(model=models["shared"], out=str(out / "cka"), metric="cka_linear",
                                                 num_samples=4, seq_len=32, batch_size=2, num_workers=1,
                                                 cka_tokens=512)))
        # a run that fails half way: the weights are unreadable once the workers load them
        broken = Path(shutil.copytree(models["planted"], out / "broken-model"))
        prep = prepare(CalibrationJob(model=str(broken), out=str(out / "broken"), num_samples=4, seq_len=32,
                                      batch_size=2, num_workers=1))
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        try:
            run(prep)
            runs["broken"] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
            runs["broken"] = exc
        runs["broken_dir"] = out
        # actors that fit no node (2 CPUs each, nodes of 1): a clear error after the start timeout, no output
        try:
            run(prepare(CalibrationJob(model=models["planted"], out=str(out / "too-big"), num_samples=4, seq_len=32,
                                       batch_size=2, num_workers=1, cpus_per_worker=2, actor_start_timeout_s=3)))
            runs["too_big"] = None
        except Exception as exc:  # noqa: BLE001
            runs["too_big"] = exc
    finally:
        ray.shutdown()
        cluster.shutdown()
        if addr is not None:
            addr_file.write_text(addr)
    return runs


def _single_process(model_dir, metric, num_samples, seq_len, cka_tokens=512):
    from sere_dist.calibration.capture import tokenize_texts
    model, tok = load_model(model_dir)
    toks = tokenize_texts(tok, split_corpus(stdlib_documents())[0], seq_len, num_samples)
    return calibrate(model, toks, metric=metric, cka_tokens=cka_tokens)


def test_ray_job_matrices_equal_the_single_process_calibration(cluster_runs, models):
    res = cluster_runs["planted"]
    ref = _single_process(models["planted"], "frobenius", 16, 64)
    loaded = SimilarityArtifact.load(res.out)
    assert sorted(loaded.matrices) == [0, 1]
    assert loaded.tokens == ref.tokens == 16 * 64 and loaded.data_digest == ref.data_digest
    for layer, m in ref.matrices.items():
        torch.testing.assert_close(loaded.matrices[layer], m, atol=1e-5, rtol=0)


def test_ray_job_routed_statistics_and_diagnostics_equal_the_single_process_ones(cluster_runs, models):
    from sere_dist.calibration.capture import tokenize_texts
    res = cluster_runs["planted"]
    model, tok = load_model(models["planted"])
    toks = tokenize_texts(tok, split_corpus(stdlib_documents())[0], 64, 16)
    # the job's shards in one process; one thread like the actors (Ray sets OMP_NUM_THREADS=1 for fractional
    # CPUs), since the thread count changes the float32 rounding of the forward pass, not the statistics' sums
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = calibrate_in_process(model, toks, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    routed = load_routed_stats(res.out)
    assert sorted(routed) == [0, 1]
    for layer, acc in ref.routed.items():
        for k, v in acc.tensors().items():
            torch.testing.assert_close(routed[layer].tensors()[k], v, rtol=1e-9, atol=1e-9)
    art = SimilarityArtifact.load(res.out)            # the artifact carries C, N too (format 2)
    assert art.format == "sere-similarity/2" and sorted(art.routed) == [0, 1]
    for layer, acc in ref.routed.items():
        for w in ("count", "router"):
            for got, want in zip(art.routed[layer][w], acc.stats(w)):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    doc = json.loads((res.out / DIAGNOSTICS_JSON).read_text())
    want = diagnostics(ref.grams, ref.matrices, ref.routed, metric="frobenius")
    assert doc["verdict"] == want["verdict"] == res.diagnostics["verdict"] and doc["label"] == "helps"
    for got, exp in zip(doc["layers"], want["layers"]):
        assert got["best_match"] == exp["best_match"]
        assert got["r_best_median"] == pytest.approx(exp["r_best_median"], rel=1e-6)


def test_ray_job_actors_run_on_both_simulated_worker_nodes(cluster_runs):
    assert set(cluster_runs["planted"].report["nodes"]) == cluster_runs["worker_nodes"]


def test_ray_job_recovers_the_planted_expert_clusters(cluster_runs, models):
    labels_by_layer = planted_clusters(models["planted"])
    for layer, m in cluster_runs["planted"].artifact.matrices.items():
        labels = torch.tensor(labels_by_layer[layer])
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(16, dtype=torch.bool)
        assert m[same & ~eye].min() > m[~same].max()


def test_ray_job_writes_stats_table_heatmap_and_report_inside_the_artifact(cluster_runs):
    res = cluster_runs["planted"]
    csv = (res.out / STATS_CSV).read_text().splitlines()
    assert csv[0] == "layer,mean,std,min,max" and len(csv) == 3
    row = dict(zip(csv[0].split(","), map(float, csv[1].split(","))))
    assert row["mean"] == pytest.approx(stats_rows(res.artifact.matrices)[0]["mean"], abs=1e-6)
    md = (res.out / STATS_MD).read_text()
    assert md.startswith("| layer | mean | std | min | max |") and "## Redundancy diagnostics" in md
    assert f"verdict: {res.diagnostics['verdict']}" in md
    assert (res.out / HEATMAP_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((res.out / "calibration.json").read_text())
    assert report["tokens"] == 1024 and report["layers"] == 2 and report["wall_s"] > 0


def test_ray_job_cka_equals_single_process_when_the_sample_holds_every_token(cluster_runs, models):
    res = cluster_runs["cka"]
    ref = _single_process(models["shared"], "cka_linear", 4, 32)
    for layer, m in ref.matrices.items():
        assert res.artifact.matrices[layer].shape == (8, 8)     # routed experts only, no shared expert
        torch.testing.assert_close(res.artifact.matrices[layer], m, atol=1e-4, rtol=0)


def test_a_job_that_fails_half_way_leaves_no_artifact_behind(cluster_runs):
    assert cluster_runs["broken"] is not None
    left = [p.name for p in cluster_runs["broken_dir"].iterdir() if p.name.startswith((".broken", "broken"))]
    assert left == ["broken-model"]


def test_actors_that_fit_no_node_fail_after_the_start_timeout_naming_the_options(cluster_runs):
    exc = cluster_runs["too_big"]
    assert isinstance(exc, ActorStartError), repr(exc)
    assert "did not all start within 3 s" in str(exc) and "--cpus-per-worker" in str(exc)
    assert not (cluster_runs["broken_dir"] / "too-big").exists()


def test_cka_sample_positions_are_seeded_per_layer_and_bounded():
    a, b = cka_positions(10_000, 64, seed=3, layer=1), cka_positions(10_000, 64, seed=3, layer=2)
    assert len(a) == 64 and len(set(a.tolist())) == 64 and (a[1:] > a[:-1]).all()
    assert (a == cka_positions(10_000, 64, seed=3, layer=1)).all() and not (a == b).all()
    assert cka_positions(50, 64, seed=0, layer=0).tolist() == list(range(50))


# ------------------------------------------------------------------ bad input: refused before Ray work

def _job(models, tmp_path, **kw):
    return CalibrationJob(**{"model": models["planted"], "out": str(tmp_path / "out"), "num_samples": 2,
                             "seq_len": 32, **kw})


def test_missing_text_column_is_refused_naming_the_column(models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "x " * 200}) + "\n")
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['content'\]\)"):
        prepare(_job(models, tmp_path, data=str(data)))


def test_too_few_qualifying_texts_is_refused(models, tmp_path):
    data = write_jsonl(["word " * 100, "short text"], tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="only 1 calibration texts qualify"):
        prepare(_job(models, tmp_path, data=str(data), num_samples=2))


def test_a_dense_checkpoint_is_refused_as_not_moe(models, tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                                                   "num_hidden_layers": 2, "hidden_size": 64}))
    with pytest.raises(ArtifactError, match="not a Mixture-of-Experts model"):
        prepare(_job(models, tmp_path, model=str(dense)))


def test_non_positive_actor_start_timeout_is_refused(models, tmp_path):
    with pytest.raises(ValueError, match=r"--actor-start-timeout-s must be > 0, got 0"):
        prepare(_job(models, tmp_path, actor_start_timeout_s=0))


def test_unknown_metric_is_refused_naming_the_choices(models, tmp_path):
    with pytest.raises(ValueError, match="--metric 'l2' is not a similarity metric; use one of frobenius"):
        prepare(_job(models, tmp_path, metric="l2"))


def test_existing_output_is_refused_unless_overwrite(models, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="exists; pass --overwrite"):
        prepare(_job(models, tmp_path))
    assert prepare(_job(models, tmp_path, overwrite=True)).tokens.shape == (2, 32)


def test_parquet_jsonl_and_datasets_directory_give_the_same_tokens(models, tmp_path):
    import datasets
    texts = ["alpha beta gamma " * 40, "delta epsilon " * 60, "too short"]
    ds = datasets.Dataset.from_dict({"text": texts, "id": [1, 2, 3]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    write_jsonl(texts, tmp_path / "d.jsonl")
    toks = [prepare(_job(models, tmp_path, data=str(tmp_path / name))).tokens
            for name in ("d.parquet", "d.jsonl", "dsdir")]
    assert toks[0].shape == (2, 32) and torch.equal(toks[0], toks[1]) and torch.equal(toks[0], toks[2])


# ------------------------------------------------------------------ the real `ray job submit` CLI

def test_ray_job_submit_cli_against_a_ray_start_head_writes_the_artifact(models, tmp_path):
    # as the README says: Ray 2.60's default token auth, the CLI told to send the token. `ray start` does not
    # make a token (it refuses to start without one), so the head and the CLI share one of this test's own
    # through RAY_AUTH_TOKEN_PATH, as Ray's generator makes them, leaving ~/.ray/auth_token alone
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    temp = Path("/tmp/cal_ray")
    # worker ports must not cover the client port; the agent's HTTP port is random (52365 may be taken)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--port", "6391", "--dashboard-port", "8271",
         "--ray-client-server-port", "10011", "--min-worker-port", "0", "--max-worker-port", "0",
         "--dashboard-agent-listen-port", "0", "--num-cpus", "2", "--temp-dir", str(temp),
         "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--include-dashboard", "true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "submitted"
    try:
        cmd = ["ray", "job", "submit", "--address", "http://127.0.0.1:8271", "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "*.egg-info", "benchmarks/results",
                                                              "sere_dist/data/tiny-trained", "cuda_ext"]}),
               "--", "python", "calibration_jobs/calibrate.py", "--model", models["planted"], "--out", str(out),
               "--num-samples", "8", "--seq-len", "32", "--batch-size", "4", "--num-workers", "1"]
        deadline = time.time() + 420
        while True:   # the dashboard and its job agent come up some seconds after the head
            assert head.poll() is None, "ray start --head exited; see /tmp/cal_ray/session_latest/logs"
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
            not_up = "No available agent" in r.stderr or "Failed to connect to Ray" in r.stderr
            if not not_up or time.time() > deadline:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "calibrated 2 MoE layers x 16 experts on 256 tokens" in r.stdout
        art = SimilarityArtifact.load(out)
        assert art.tokens == 256 and (out / HEATMAP_PNG).exists()
    finally:
        _stop_head(head, temp)


def _stop_head(head, temp):
    """Take down the processes this test started (`ray start --block`'s group, and any worker that
    left it), found by their own pid and temp dir; never `ray stop`, which would hit everyone's Ray."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=10)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if str(temp).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
