"""Bad input through the real `sere` command: one line naming the file or field and the fix, exit
status 2, no traceback, nothing written; Ctrl-C during calibration leaves nothing half-written."""

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from sere_dist.models.tiny import TinySpec, write_checkpoint
from sere_dist.serve.defaults import prepare_default

SERE = [sys.executable, "-m", "sere_dist.cli"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    model = write_checkpoint(d / "model", TinySpec(family="qwen3_moe", num_experts=8, top_k=2), kind="random")
    _, art = prepare_default()
    tensors = load_file(str(art / "similarity.safetensors"))
    for name, header in [("no-fingerprint", json.dumps({"metric": "frobenius", "tokens": 1})),
                         ("bad-header", "{not json")]:
        (d / name).mkdir()
        save_file(tensors, str(d / name / "similarity.safetensors"), metadata={"sere": header})

    def yaml(name, args):
        (d / name).write_text(json.dumps({"applications": [{"name": "sere", "import_path": "sere_dist.serve:build_app",
                                                             "args": args}]}))
        return str(d / name)

    (d / "broken.yaml").write_text("applications:\n  - args: [1, 2\n")
    (d / "empty.jsonl").write_text("")
    (d / "notjson.jsonl").write_text("plain text, not JSON\n")
    (d / "list.jsonl").write_text(json.dumps(["a", "b"]) + "\n")
    return {"dir": d, "model": str(model), "broken": str(d / "broken.yaml"),
            "enabled_no": yaml("enabled.yaml", {"sere": {"artifact": "default", "enabled": "no"}}),
            "cpus": yaml("cpus.yaml", {"cpus_per_worker": -1}),
            "engine_list": yaml("engine.yaml", {"engine": ["max_model_len", 256]}),
            "unknown": yaml("unknown.yaml", {"replicas": 2}),
            "no_fp": yaml("nofp.yaml", {"sere": {"artifact": str(d / "no-fingerprint")}}),
            "bad_header": yaml("header.yaml", {"sere": {"artifact": str(d / "bad-header")}})}


CASES = [
    ("missing config file", lambda f: ["serve", "--config", str(f["dir"] / "nowhere.yaml")],
     r"nowhere.yaml: no such config file"),
    ("invalid YAML", lambda f: ["serve", "--config", f["broken"]], r"broken.yaml: invalid YAML at line \d+"),
    ("wrong type for a boolean", lambda f: ["serve", "--config", f["enabled_no"]],
     r"sere.enabled='no': .*use true or false"),
    ("negative CPU share", lambda f: ["serve", "--config", f["cpus"]], r"cpus_per_worker must be > 0, got -1"),
    ("a list where a map belongs", lambda f: ["serve", "--config", f["engine_list"]], r"engine=.* is a list"),
    ("unknown key", lambda f: ["serve", "--config", f["unknown"]], r"unknown serving argument\(s\) \['replicas'\]"),
    ("artifact header without its fingerprint", lambda f: ["serve", "--config", f["no_fp"]],
     r"no-fingerprint/similarity.safetensors: the sere metadata in its header lacks \['fingerprint'\]"),
    ("malformed artifact header", lambda f: ["serve", "--config", f["bad_header"]],
     r"bad-header/similarity.safetensors: the sere metadata in its header is not valid JSON"),
    ("missing calibration input", lambda f: ["calibrate", "--model", f["model"], "--out", str(f["dir"] / "o1"),
                                             "--data", str(f["dir"] / "missing.jsonl")],
     r"missing.jsonl: no such file or directory"),
    ("empty calibration input", lambda f: ["calibrate", "--model", f["model"], "--out", str(f["dir"] / "o2"),
                                           "--data", str(f["dir"] / "empty.jsonl")], r"empty.jsonl: the file is empty"),
    ("calibration input not JSON Lines", lambda f: ["calibrate", "--model", f["model"], "--out", str(f["dir"] / "o3"),
                                                    "--data", str(f["dir"] / "notjson.jsonl")],
     r"notjson.jsonl: line 1 is not JSON"),
    ("JSON Lines rows that are not objects", lambda f: ["calibrate", "--model", f["model"], "--out",
                                                        str(f["dir"] / "o4"), "--data", str(f["dir"] / "list.jsonl")],
     r"list.jsonl: line 1 is a JSON list"),
    ("relative --out for a Ray job", lambda f: ["calibrate", "--ray", "--model", f["model"], "--out", "sim-rel"],
     r"--out sim-rel is a relative path: a Ray job runs in a temporary working directory"),
]


@pytest.mark.parametrize("argv, message", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_named_line_and_exit_status_2(files, argv, message):
    args = argv(files)
    p = subprocess.run([*SERE, *args], capture_output=True, text=True, timeout=300, cwd=files["dir"])
    errors = [line for line in p.stderr.splitlines() if line.startswith("sere ")]
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"sere {args[0]}: error: "), p.stderr[-2000:]
    import re
    assert re.search(message, errors[0]), errors[0]
    assert not any(files["dir"].glob("o[0-9]*")) and not (files["dir"] / "sim-rel").exists()


def test_ctrl_c_during_calibration_prints_one_line_and_writes_nothing(files):
    out = files["dir"] / "interrupted"
    # a terminal's Ctrl-C: SIGINT at its default in the child, even when this suite runs in the background
    # of a non-interactive shell (`cmd &`, nohup), which starts it ignored and Python then keeps it so;
    # 900 sequences (of the 973 the corpus has at 128 tokens) take ~9 s, so the signal lands mid-run
    proc = subprocess.Popen([*SERE, "calibrate", "--model", files["model"], "--out", str(out), "--num-samples", "900",
                             "--batch-size", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    for line in proc.stdout:         # the run starts after this line (checks and tokenisation are done)
        if line.startswith("calibrate: ") or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("sere ")] == [
        "sere calibrate: interrupted; nothing was written (outputs appear only when complete)"]
    assert not out.exists() and not list(files["dir"].glob(".interrupted.tmp-*"))
