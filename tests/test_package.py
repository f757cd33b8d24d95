"""The package stage: the bento and its model are versioned by what they are made of."""

import json
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import package_bento

from fullstack_ml.stage import StageError, compose
from stages.package import (
    BENTOFILE,
    bentofile_for,
    content_version,
    package,
    package_name,
    shipped_files,
)


def test_the_same_inputs_give_the_same_tags(bento: Path) -> None:
    """Packaged again into the same store (the tags exist there: replaced, not refused),
    with another serving plan (a measurement, not an input): the same tags."""
    work = bento.parent.parent
    first = json.loads((work / "dist/bento.json").read_text())
    plan = json.loads((work / "serving.json").read_text())
    (work / "serving.json").write_text(json.dumps({**plan, "plan": plan["plan"][:1]}))
    try:
        (again,) = package_bento(work, work / "again")
    finally:
        (work / "serving.json").write_text(json.dumps(plan))
    assert (again["bento_tag"], again["model_tag"]) == (first["bento_tag"], first["model_tag"])
    assert (work / "again" / again["file"]).is_file()


def test_the_version_follows_every_shipped_byte(tmp_path: Path) -> None:
    a, b = tmp_path / "a/model.pt2", tmp_path / "b/model.pt2"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"model")
    assert content_version([a]) == content_version([b])  # content and name, not folder
    b.write_bytes(b"model!")
    assert content_version([a]) != content_version([b])
    shipped = shipped_files()
    assert BENTOFILE.parent / "service.py" in shipped and all(p.is_file() for p in shipped)


def test_two_bentos_built_in_one_process_pin_their_own_models(bento: Path) -> None:
    """BentoML imports service.py once per process and the service pins its model at import:
    package() makes it import the service again, so a second build pins the second model."""
    work = bento.parent.parent
    other = work / "other"
    other.mkdir(exist_ok=True)
    meta = json.loads((work / "int8/model.json").read_text())
    (other / "model.json").write_text(json.dumps({**meta, "note": "another model"}))
    bentos = package_bento(work, work / "one", (work / "two", {"model.json": other / "model.json"}))
    assert bentos[0]["model_tag"] != bentos[1]["model_tag"]
    for info, out in zip(bentos, ("one", "two"), strict=True):
        with tarfile.open(work / out / info["file"]) as tar:
            described = yaml.safe_load(tar.extractfile("./bento.yaml"))
        pinned = [m["tag"] for service in described["services"] for m in service["models"]]
        assert pinned == [info["model_tag"]] and described["args"]["model_tag"] == pinned[0]


def test_a_bento_installs_its_own_runtime_and_no_other() -> None:
    """On onnxruntime: no torch, no openvino; on inductor: torch, no onnxruntime; Pillow at
    this environment's release."""
    from importlib.metadata import version

    for runtime, kept, dropped in [
        ("onnxruntime", {"onnxruntime"}, {"torch", "torchao", "openvino"}),
        ("inductor", {"torch", "torchao"}, {"onnxruntime", "openvino"}),
    ]:
        names = {
            package_name(p) for p in yaml.safe_load(bentofile_for(runtime))["python"]["packages"]
        }
        assert kept <= names and not names & dropped, runtime
        assert {"numpy", "whylogs", "pydantic"} <= names
        packages = yaml.safe_load(bentofile_for(runtime))["python"]["packages"]
        assert f"pillow=={version('pillow')}" in packages  # the resize that built the model


def test_a_runtime_the_shipped_params_do_not_name_is_refused(bento: Path, tmp_path: Path) -> None:
    """The service reads the params.yaml the bento ships: a config saying another runtime
    would build a bento without the packages its service loads."""
    work = bento.parent.parent
    files = {
        "model.pt2": work / "int8/model.pt2",
        "model.json": work / "int8/model.json",
        "model.onnx": work / "int8/model.onnx",
        "schema.json": work / "schema.json",
        "reference_profile.bin": work / "train.bin",
        "serving.json": work / "serving.json",
    }
    serve = compose(["serve.runtime=inductor"]).serve
    with pytest.raises(StageError, match=r"serve.runtime: 'inductor' here but 'auto' in params"):
        package(files, {"git_commit": "test"}, serve, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()
