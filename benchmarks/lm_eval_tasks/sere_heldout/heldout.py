"""The `sere_heldout` task's dataset and metrics (lm_eval imports this module through the YAML's `!function`).

Metrics per row (the task reports their means, with lm_eval's standard error of the mean):
    exact_match: 1.0 when the generation, trailing whitespace dropped, equals the target
    char_sim:    normalized edit similarity, 1 - levenshtein(pred, target) / max(len(pred), len(target))
                 (1.0 for identical strings, 0.0 when nothing lines up; characters, not tokens)
    chrf:        sentence chrF (sacrebleu, character 6-grams, beta 2), scaled to [0, 1]
"""

from __future__ import annotations

import json
from pathlib import Path

ROWS = Path(__file__).resolve().parent / "heldout_lines.jsonl"


def load_rows(path: str | Path = ROWS) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_dataset(**_metadata) -> dict:
    """lm_eval's `custom_dataset`: {"test": datasets.Dataset} read from the JSON Lines file next to this module."""
    import datasets

    return {"test": datasets.Dataset.from_list(load_rows())}


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]


def doc_to_target(doc: dict) -> str:
    return doc["target"]


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_similarity(pred: str, target: str) -> float:
    """1 - levenshtein / max length, in [0, 1]; two empty strings are identical (1.0)."""
    longest = max(len(pred), len(target))
    return 1.0 if longest == 0 else 1.0 - levenshtein(pred, target) / longest


def chrf(pred: str, target: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(pred, [target]).score / 100.0


def score(pred: str, target: str) -> dict[str, float]:
    pred = pred.rstrip()
    return {"exact_match": float(pred == target), "char_sim": char_similarity(pred, target),
            "chrf": chrf(pred, target)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm_eval's per-document hook: results[0] is the generation (already cut at the first newline)."""
    return score(results[0], doc["target"])
