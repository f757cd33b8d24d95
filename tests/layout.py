"""The project's import graph, from the source (an `ast` walk): which project files a
module's imports reach. Used by tests/test_layout.py."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "fullstack_ml", "service")


def module_file(name: str) -> Path | None:
    """The project file of module `name` (a package's `__init__.py`), or None."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every project module that `path` imports, at module level or inside functions, with
    the packages Python runs on the way (`a.b.c` imports `a` and `a.b` too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in found:
            parts = name.split(".")
            if parts[0] in PACKAGES:
                names |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    return {n for n in names if module_file(n)}


def closure(*modules: str) -> set[Path]:
    """The project files that importing `modules` runs (themselves included)."""
    todo = [m for m in modules]
    for m in modules:  # a package's own parents run first
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    seen: set[Path] = set()
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += imported_modules(path)
    return seen


def stage_closure(stage: str) -> set[Path]:
    """What `python -m stages.<stage>` runs of the project (a folder stage's __main__ too)."""
    entry = [f"stages.{stage}"]
    if module_file(f"stages.{stage}.__main__"):
        entry.append(f"stages.{stage}.__main__")
    return closure(*entry)


def rel(paths: set[Path]) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in paths)


if __name__ == "__main__":
    for stage in (
        "ingest",
        "profile",
        "train",
        "evaluate",
        "distil",
        "compress",
        "package",
        "validate",
    ):
        print(stage, rel(stage_closure(stage)))
    print("service", rel(closure("service")))
