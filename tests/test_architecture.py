"""The package's shape, as ARCHITECTURE.md states it: wings import only wings below them, vLLM is
imported in one wing, private Ray internals in one module, and nothing points outside the repository."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sere_dist"
# bottom to top; a wing may import its own modules and any wing to its left
WINGS = ("core", "calibration", "models", "engine", "serve", "eval", "cli")


def _wing(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    if len(rel) == 1:
        return "cli" if rel[0] == "cli.py" else "core"      # sere_dist/__init__.py holds only the version
    return rel[0]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_every_module_belongs_to_a_wing():
    assert {_wing(p) for p in MODULES} <= set(WINGS)
    assert all(p.parent == PKG or p.parent.parent == PKG for p in MODULES), "wings are one level deep"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_wings_only(path):
    own = WINGS.index(_wing(path))
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "sere_dist" or len(parts) < 2 or parts[1] == "__version__":
            continue
        target = "cli" if parts[1] == "cli" else parts[1]
        assert target in WINGS, f"{path.name} imports {name}, outside every wing"
        assert WINGS.index(target) <= own, f"{path.relative_to(ROOT)} ({WINGS[own]}) imports {name} ({target}), " \
                                           f"a wing above it"


def test_vllm_is_imported_in_the_engine_wing_only():
    users = {str(p.relative_to(PKG)) for p in MODULES if any(n.split(".")[0] == "vllm" for n in _imports(p))}
    assert users and all(u.startswith("engine/") for u in users), users


def test_private_ray_internals_are_touched_in_one_module():
    private = {str(p.relative_to(PKG)) for p in MODULES
               if any(n.split(".")[0] == "ray" and any(seg.startswith("_") for seg in n.split(".")[1:])
                      for n in _imports(p))}
    assert private == {"serve/ray_internals.py"}


def test_ray_and_vllm_stay_out_of_the_core():
    for p in PKG.joinpath("core").glob("*.py"):
        roots = {n.split(".")[0] for n in _imports(p)}
        assert not roots & {"ray", "vllm"}, p.name


def test_nothing_in_the_repository_points_at_documents_outside_it():
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".toml", ".cuh",
                                                                          ".cpp", ".h", ".cu")
               and not any(part in (".venv", ".git", "build", "dist") or part.endswith(".egg-info")
                           for part in p.relative_to(ROOT).parts)]
    outside = ("DESIGN" + ".md", "../" + "shared")      # spelled in two parts so this file does not match
    for p in tracked:
        text = p.read_text(errors="replace")
        assert not any(o in text for o in outside), p
