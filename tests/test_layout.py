"""The layout keeps the build's promise: a stage's code deps in dvc.yaml are exactly the
project files its imports reach, stages never import each other, the library never imports
a stage, the runtime the bento ships stays small, and every artifact path has one owner."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from layout import ROOT, closure, imported_modules, rel, stage_closure

from fullstack_ml import paths

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
BENTOFILE = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
CODE = ("stages", "fullstack_ml", "service.py", "bentofile.yaml")
RUNTIME_PACKAGES = {
    "numpy",
    "pandas",
    "torch",
    "whylogs",
    "pydantic",
    "onnxruntime",
    "openvino",
    "PIL",
    "pydantic_core",
}
SERVING_STACK = {
    "uvicorn",
    "starlette",
    "prometheus_client",
}  # what BentoML serves on, installed with it
NEVER_IN_RUNTIME = {"hydra", "omegaconf", "ray", "bentoml"}


def dep_names(stage: str) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in DVC[stage].get("deps", [])]


def code_deps(stage: str) -> set[str]:
    """The project files a stage's deps name (a folder stands for its .py files)."""
    files = set()
    for dep in dep_names(stage):
        if not dep.startswith(CODE):
            continue
        path = ROOT / dep
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {str(p.relative_to(ROOT)) for p in found if "__pycache__" not in p.parts}
    return files


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"fullstack_ml", "stages", "service"}


@pytest.mark.parametrize("stage", [s for s in DVC if s != "package"])
def test_each_stage_depends_on_exactly_the_code_its_imports_reach(stage: str) -> None:
    want, have = set(rel(stage_closure(stage))), code_deps(stage)
    assert not want - have, f"dvc.yaml {stage}: deps miss {sorted(want - have)}"
    assert not have - want, f"dvc.yaml {stage}: deps list {sorted(have - want)}, not imported"


def test_the_package_stage_depends_on_its_code_and_on_what_the_bento_ships() -> None:
    shipped = rel(closure("service"))
    want = set(rel(stage_closure("package"))) | set(shipped) | {"bentofile.yaml"}
    have = code_deps("package")
    assert not want - have, f"dvc.yaml package: deps miss {sorted(want - have)}"
    assert not have - want, f"dvc.yaml package: deps list {sorted(have - want)}, not needed"
    include = {entry.lstrip("/") for entry in BENTOFILE["include"]}
    assert include - {"params.yaml"} == set(shipped), "bentofile include != service's imports"


def test_no_stage_imports_another_stage() -> None:
    for path in sorted((ROOT / "stages").rglob("*.py")):
        own = path.relative_to(ROOT / "stages").parts[0].removesuffix(".py")
        others = {
            m for m in imported_modules(path) if m.startswith("stages.") and m.split(".")[1] != own
        }
        assert not others, f"{path.relative_to(ROOT)} imports another stage: {sorted(others)}"


def test_the_library_never_imports_a_stage() -> None:
    for path in sorted((ROOT / "fullstack_ml").rglob("*.py")):
        stages = {m for m in imported_modules(path) if m.split(".")[0] in ("stages", "service")}
        assert not stages, f"{path.relative_to(ROOT)} imports {sorted(stages)}"


def test_the_runtime_imports_only_what_the_bento_installs_and_never_bentoml() -> None:
    """The bento's packages and BentoML's serving stack; never the pipeline's hydra,
    omegaconf or ray, nor bentoml (service.py wires the runtime into BentoML)."""
    for path in sorted((ROOT / "fullstack_ml/runtime").rglob("*.py")):
        imported = third_party_imports(path)
        assert not imported & NEVER_IN_RUNTIME, f"{path.relative_to(ROOT)} imports {imported}"
        extra = imported - RUNTIME_PACKAGES - SERVING_STACK
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"
        project = {m for m in imported_modules(path) if not m.startswith("fullstack_ml.runtime")}
        assert project <= {"fullstack_ml"}, f"{path.relative_to(ROOT)} imports {project}"


def test_whylogs_is_imported_only_after_the_compat_module_has_patched_it() -> None:
    """whylogs 1.6 needs `np.unicode_` on numpy 2 and profiles float columns a value at a
    time; fullstack_ml/runtime/whylogs_compat.py fixes both, so it is imported first."""
    compat = "fullstack_ml.runtime.whylogs_compat"

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        return []

    files = [*ROOT.glob("*.py")] + [
        p for d in ("stages", "fullstack_ml", "tests", "bench") for p in (ROOT / d).rglob("*.py")
    ]
    for path in sorted(set(files) - {ROOT / (compat.replace(".", "/") + ".py")}):
        tree = ast.parse(path.read_text())
        first = min((n.lineno for n in ast.walk(tree) if compat in names(n)), default=None)
        uses = [
            n.lineno for n in ast.walk(tree) if any(m.split(".")[0] == "whylogs" for m in names(n))
        ]
        name = path.relative_to(ROOT)
        assert not uses or (first and first < min(uses)), f"{name}: whylogs before {compat}"


def test_the_service_imports_only_the_runtime_of_the_project() -> None:
    project = imported_modules(ROOT / "service.py") - {"fullstack_ml", "fullstack_ml.runtime"}
    assert project and all(m.startswith("fullstack_ml.runtime.") for m in project), project


def test_the_bento_installs_the_packages_pyproject_declares() -> None:
    """The same names and version ranges; a bento may leave extras out (whylogs' viz)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    without_extras = {re.sub(r"\[[^]]*\]", "", d) for d in declared}
    for requirement in BENTOFILE["python"]["packages"]:
        assert requirement in declared or requirement in without_extras, (
            f"bentofile.yaml: {requirement!r} not in pyproject.toml"
        )


def artifact_paths() -> set[str]:
    """Every path of dvc.yaml that is not code: deps, outs, metrics and plots."""
    found = set()
    for stage in DVC.values():
        for key in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                name = next(iter(entry)) if isinstance(entry, dict) else entry
                if not name.startswith(CODE):
                    found.add(name)
    return found


def test_dvc_yaml_names_the_artifact_paths_of_paths_py() -> None:
    declared = {str(v) for k, v in vars(paths).items() if isinstance(v, Path) and k != "PARAMS"} | {
        str(p) for p in paths.METRICS.values()
    }
    in_dvc = artifact_paths()
    splits = {str(paths.split_file(s)) for s in paths.SPLITS}
    assert in_dvc - declared - splits == set(), "dvc.yaml paths missing from fullstack_ml/paths.py"
    unnamed = {p for p in declared - in_dvc if not any(p.startswith(f"{d}/") for d in in_dvc)}
    assert unnamed == set(), "fullstack_ml/paths.py paths that dvc.yaml never names (or a folder)"


def test_metrics_and_plots_files_are_kept_in_git_not_in_the_cache() -> None:
    """As in DVC's example projects: a fresh clone answers `dvc metrics show` and
    `dvc metrics diff` before anything runs."""
    for name, stage in DVC.items():
        for key in ("metrics", "plots"):
            for entry in stage.get(key, []):
                if not isinstance(entry, dict):
                    entry = {entry: {}}
                path, options = next(iter(entry.items()))
                assert options.get("cache") is False, f"dvc.yaml {name}.{key}: {path} is cached"
                tracked = subprocess.run(
                    ["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True
                )
                assert tracked.returncode == 0, f"{path} is not in git (commit it)"
