"""Write heldout_lines.jsonl: the rows of the `sere_heldout` lm_eval task (continue a held-out line).

The text is the held-out part of the stdlib corpus (`split_corpus(stdlib_documents())[1]`, never
seen in training or calibration). A row is one line of a held-out document that has at least 16
non-blank characters and at least 2 lines before it in its document:

    prompt: up to --context-lines preceding lines (at most --context-chars characters, whole lines)
            + the start of the line
    target: the rest of the line (trailing whitespace dropped)

The cut is a token boundary of the served model's tokenizer, so the prompt tokenises exactly as the
start of the full text does; the target is the last half of the line's tokens, at most --max-target-tokens.
Rows are drawn and ordered by a seeded shuffle, so `lm_eval --limit N` takes a spread-out sample.

    python benchmarks/lm_eval_tasks/sere_heldout/build_rows.py          (rewrites the committed file)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = HERE / "heldout_lines.jsonl"


def candidate_rows(docs: list[str], tokenizer, *, context_lines: int, context_chars: int,
                   max_target_tokens: int) -> list[dict]:
    """Every eligible (document, line) of `docs` as a row dict, in document order."""
    rows = []
    for d, doc in enumerate(docs):
        lines = [ln.rstrip() for ln in doc.split("\n")]
        for i, line in enumerate(lines):
            content = line.lstrip()
            if i < 2 or len(content) < 16:
                continue
            ctx_lines: list[str] = []
            for prev in reversed(lines[max(0, i - context_lines):i]):
                if sum(len(c) + 1 for c in ctx_lines) + len(prev) + 1 > context_chars:
                    break
                ctx_lines.insert(0, prev)
            if not ctx_lines:
                continue
            context = "".join(c + "\n" for c in ctx_lines)
            text = context + line
            start = len(context) + len(line) - len(content)        # first non-blank character of the line
            offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
            # token starts strictly inside the line's content: the possible cuts
            cuts = [a for a, _ in offsets if start < a < len(text)]
            if not cuts:
                continue
            n_target = min(max(1, (len(cuts) + 1) // 2), max_target_tokens)
            cut = cuts[-n_target]
            rows.append({"doc": d, "line": i, "prompt": text[:cut], "target": text[cut:],
                         "target_tokens": n_target})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-lines", type=int, default=6)
    ap.add_argument("--context-chars", type=int, default=400)
    ap.add_argument("--max-target-tokens", type=int, default=12)
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the shipped trained model)")
    ap.add_argument("--out", type=Path, default=ROWS)
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from sere_dist.calibration.corpus import split_corpus, stdlib_documents
    from sere_dist.models.tiny import DATA_DIR

    tok = AutoTokenizer.from_pretrained(a.tokenizer or str(DATA_DIR / "tiny-trained"))
    held = split_corpus(stdlib_documents())[1]
    rows = candidate_rows(held, tok, context_lines=a.context_lines, context_chars=a.context_chars,
                          max_target_tokens=a.max_target_tokens)
    picked = random.Random(a.seed).sample(rows, min(a.rows, len(rows)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w") as f:
        for k, r in enumerate(picked):
            f.write(json.dumps({"id": k, **r}) + "\n")
    print(f"wrote {len(picked)} of {len(rows)} candidate rows from {len(held)} held-out documents to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
