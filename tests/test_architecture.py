"""The shape of ``src/neoxt`` (DESIGN.md): data flows one way between stages, no import cycles,
small files and functions. Walks every module with ``ast``; imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "neoxt"

# DESIGN.md's stage order. A module may import its own stage and the ones before it.
STAGES = ("base", "config", "data", "model", "checkpoint", "distributed", "generate", "evaluate", "train", "convert")
STAGE_OF_PREFIX = {
    # base: leaf helpers every stage uses (errors, atomic files, progress display, dtype names, the version).
    "neoxt": "base", "neoxt.errors": "base", "neoxt.io": "base", "neoxt.progress": "base", "neoxt.dtypes": "base",
    "neoxt.config": "config",
    "neoxt.data": "data", "neoxt.tokenizer": "data",
    "neoxt.model": "model",
    "neoxt.checkpoint": "checkpoint",
    "neoxt.distributed": "distributed",
    "neoxt.generate": "generate",
    "neoxt.evaluate": "evaluate",
    "neoxt.train": "train",
    "neoxt.convert": "convert", "neoxt.ops": "convert",
}

# Wiring: may import anything (their imports are the command path, not data flow). Each with its reason.
WIRING = {
    "neoxt.cli": "lists the <area>/commands.py modules",
    "neoxt.generate_commands": "the `generate` command, and load_for_inference shared with `eval`",
    "neoxt.doctor": "`neoxt doctor` checks every layer of the install (a command, not a stage)",
    "neoxt.train.demo": "`neoxt demo` runs data → train → generate end to end (what `make demo` calls)",
    "neoxt": "the public facade: `neoxt.load_model` forwards lazily to neoxt.checkpoint (users' entry point)",
}

# Edges allowed for now, each to be removed by the change named beside it.
TEMPORARY_EDGES = {
}

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# (module path relative to src/neoxt, function qualname or None for the file) → why it may be longer.
SIZE_EXCEPTIONS: dict[tuple[str, str | None], str] = {
}


def is_wiring(mod: str) -> bool:
    return mod in WIRING or mod.endswith(".commands")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def stage_of(mod: str) -> str:
    best = max((p for p in STAGE_OF_PREFIX if mod == p or mod.startswith(p + ".")), key=len)
    return STAGE_OF_PREFIX[best]


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported neoxt module, line) for every import statement, at any depth in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return [(m, line) for m, line in found if m == "neoxt" or m.startswith("neoxt.")]


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = all_modules()
    return {mod: imports_of(mod, path, modules) for mod, path in modules.items()}


def test_every_module_has_a_stage():
    for mod in all_modules():
        assert stage_of(mod) in STAGES, mod


def test_stages_import_only_earlier_stages():
    bad = []
    for mod, edges in import_graph().items():
        if is_wiring(mod):
            continue
        own = STAGES.index(stage_of(mod))
        for target, line in edges:
            if (mod, target) in TEMPORARY_EDGES:
                continue
            if is_wiring(target) and target != "neoxt":
                bad.append(f"{mod}:{line} ({stage_of(mod)}) imports the wiring module {target}")
            elif STAGES.index(stage_of(target)) > own:
                bad.append(f"{mod}:{line} ({stage_of(mod)}) imports {target} ({stage_of(target)})")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, first repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    """Module-level and function-level imports alike: a lazy import hides a cycle, it does not remove it.
    Imports made by wiring modules are left out (they sit at the top of the command path)."""
    graph = {mod: {t for t, _ in edges if t != mod and (mod, t) not in TEMPORARY_EDGES}
             for mod, edges in import_graph().items() if not is_wiring(mod)}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checks_catch_what_they_guard(tmp_path):
    """The walker sees function-level and relative imports; the cycle finder finds a cycle; the
    stage check would flag convert being imported by generate."""
    fake = tmp_path / "hf.py"
    fake.write_text("import os\n\ndef f():\n    from neoxt.train import loop\n    from . import neox\n")
    modules = {"neoxt.train.loop": fake, "neoxt.convert.neox": fake}
    assert [m for m, _ in imports_of("neoxt.convert.hf", fake, modules)] == ["neoxt.train.loop", "neoxt.convert.neox"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert STAGES.index(stage_of("neoxt.convert.hf")) > STAGES.index(stage_of("neoxt.generate"))
    assert stage_of("neoxt.tokenizer") == "data" and is_wiring("neoxt.train.commands")


def function_lengths(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    start = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                    yield name, child.end_lineno - start + 1
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def test_files_and_functions_stay_small():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES and (rel, None) not in SIZE_EXCEPTIONS:
            bad.append(f"{rel}: {lines} lines (limit {MAX_FILE_LINES})")
        for name, n in function_lengths(path):
            if n > MAX_FUNCTION_LINES and (rel, name) not in SIZE_EXCEPTIONS:
                bad.append(f"{rel}: {name}() is {n} lines (limit {MAX_FUNCTION_LINES})")
    assert not bad, "\n".join(bad)
