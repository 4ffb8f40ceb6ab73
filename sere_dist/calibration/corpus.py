"""Text that exists on every machine: the Python standard library's own source and docstrings.

Used to train the local tokenizer and the trained tiny model, and as the default calibration text.
Deterministic: files are read in sorted order, and a document is one top-level chunk of a module.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterator

# A fixed list keeps the corpus identical across machines with the same Python minor version.
_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections/__init__",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "email/message", "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html/parser", "http/client", "http/server",
    "imaplib", "inspect", "ipaddress", "json/decoder", "json/encoder", "locale", "logging/__init__",
    "mailbox", "mimetypes", "ntpath", "numbers", "opcode", "operator", "optparse", "os", "pathlib",
    "pickle", "pkgutil", "platform", "plistlib", "posixpath", "pprint", "profile", "pydoc", "queue",
    "quopri", "random", "re/_parser", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle",
    "typing", "unittest/case", "urllib/parse", "urllib/request", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "zipfile", "zipimport",
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(min_chars: int = 200, max_chars: int = 4000) -> list[str]:
    """Split the listed stdlib modules into documents of at most max_chars (at blank lines)."""
    docs: list[str] = []
    root = stdlib_dir()
    for name in _MODULES:
        path = root / f"{name}.py"
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(_chunks(text, min_chars, max_chars))
    return docs


def _chunks(text: str, min_chars: int, max_chars: int) -> Iterator[str]:
    buf: list[str] = []
    size = 0
    for block in text.split("\n\n"):
        if size + len(block) > max_chars and size >= min_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
        buf.append(block[:max_chars])
        size += len(block) + 2
    if size >= min_chars:
        yield "\n\n".join(buf)


def split_corpus(docs: list[str], heldout_every: int = 20) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split: every n-th document is held out."""
    train = [d for i, d in enumerate(docs) if i % heldout_every != 0]
    held = [d for i, d in enumerate(docs) if i % heldout_every == 0]
    return train, held


def write_jsonl(docs: list[str], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def digest(items: list[str] | list[list[int]]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it).encode())
    return h.hexdigest()[:16]
