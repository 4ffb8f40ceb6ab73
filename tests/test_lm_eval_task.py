"""The lm_eval task `sere_heldout` (benchmarks/lm_eval_tasks): it loads from the include path with
lm_eval's own TaskManager, its rows are what build_rows.py writes, and its metrics score hand-built
generations exactly. No endpoint."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "benchmarks" / "lm_eval_tasks"
TASK_DIR = TASKS / "sere_heldout"


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


heldout = _module("sere_heldout_metrics", TASK_DIR / "heldout.py")


def test_task_loads_from_the_include_path_as_a_newline_stopped_greedy_generation():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    task = tm.load(["sere_heldout"])["tasks"]["sere_heldout"]
    assert task.OUTPUT_TYPE == "generate_until"
    gen = task.config.generation_kwargs
    assert gen["until"] == ["\n"] and gen["temperature"] == 0.0 and gen["do_sample"] is False
    assert [m["metric"] for m in task.config.metric_list] == ["exact_match", "char_sim", "chrf"]
    docs = list(task.test_docs())
    rows = heldout.load_rows()
    assert len(docs) == len(rows) >= 200
    first = rows[0]
    assert task.doc_to_text(docs[0]) == first["prompt"] and task.doc_to_target(docs[0]) == first["target"]
    assert task.process_results(docs[0], [first["target"] + "  "])["exact_match"] == 1.0


def test_every_row_continues_one_line_of_its_prompt():
    for r in heldout.load_rows():
        assert r["target"] and "\n" not in r["target"] and r["target"] == r["target"].rstrip()
        last = r["prompt"].rsplit("\n", 1)[-1]
        assert last.strip(), "the prompt ends inside the line to be continued"
        assert len((last + r["target"]).strip()) >= 16


def test_exact_match_ignores_trailing_whitespace_only():
    assert heldout.score(" getnframes() method \t", " getnframes() method")["exact_match"] == 1.0
    assert heldout.score("getnframes() method", " getnframes() method")["exact_match"] == 0.0
    assert heldout.score(" getnframes()", " getnframes() method")["exact_match"] == 0.0


def test_char_similarity_is_one_minus_edit_distance_over_the_longer_length():
    assert heldout.levenshtein("kitten", "sitting") == 3
    assert heldout.levenshtein("", "abc") == 3
    assert heldout.char_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert heldout.char_similarity("abc", "abc") == 1.0
    assert heldout.char_similarity("", "") == 1.0
    assert heldout.char_similarity("xyz", "abc") == 0.0
    assert heldout.score("self.name = nam", "self.name = name")["char_sim"] == pytest.approx(15 / 16)


def test_chrf_is_one_for_a_perfect_continuation_and_orders_partial_ones():
    target = " is recursive."
    perfect, close, wrong = (heldout.score(p, target)["chrf"] for p in (target, " is recursive", " = None"))
    assert perfect == pytest.approx(1.0)
    assert 0.0 < close < 1.0 and wrong < close


def test_rows_file_is_what_the_generator_writes(tmp_path):
    pytest.importorskip("transformers")
    build = _module("sere_heldout_build", TASK_DIR / "build_rows.py")
    out = tmp_path / "rows.jsonl"
    assert build.main(["--out", str(out)]) == 0
    assert out.read_text() == heldout.ROWS.read_text()
