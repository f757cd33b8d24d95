"""package: the compressed model into the BentoML model store, a bento, and a bento file.

Saves `models/compressed` with the schema, the reference profile, the serving plan the
compress stage measured and metadata (git commit, params hash, metrics) as a BentoML model,
with the build report as it stands before the release gate (`card.html`, GET /card),
builds the bento from bentofile.yaml pinned to that model, and exports it to
`dist/<service_name>.bento` (+ `dist/bento.json`). Model and bento are versioned by a hash
of what they are made of (the model's files, the code and params the bento ships), so the
same inputs give the same tags. Serve it with `make serve`, or
`bentoml import dist/<name>.bento && bentoml serve <tag>`.
"""

import contextlib
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import bentoml
import yaml
from bentoml.exceptions import NotFound
from omegaconf import DictConfig

from fullstack_ml.card import gather, render
from fullstack_ml.paths import (
    COMPRESS_DETAILS,
    COMPRESSED_DIR,
    DIST_DIR,
    METRICS,
    PARAMS,
    REFERENCE_PROFILE,
    SCHEMA,
)
from fullstack_ml.runtime.engine import ONNX_FILE, choose_runtime
from fullstack_ml.runtime.outliers import DETECTOR_FILE
from fullstack_ml.stage import ROOT, StageError, atomic_dir, git_commit, read_json, run, write_json

log = logging.getLogger("stages.package")
BENTOFILE = ROOT / "bentofile.yaml"
SERVICE_MODULE = "service"  # bentofile.yaml's `service: "service:Classifier"`
# The packages only one runtime needs: a bento installs its own runtime's, none of the others.
RUNTIME_PACKAGES = {
    "inductor": {"torch", "torchao"},
    "onnxruntime": {"onnxruntime"},
    "openvino": {"openvino"},
}
# Installed in the bento at the release that built the model: Pillow's resize differs across
# releases (10.4 and 13.0 gave pixels 10 grey levels apart on a padded WebP; 3e-4 in its
# probabilities), so the service would answer an image other than validate checked.
PINNED = {"pillow"}


def build_metadata(params_file: Path, metrics_files: list[Path]) -> dict[str, Any]:
    """What the bento tells about its model: git commit, params hash and metrics."""
    metrics = {}
    for path in metrics_files:
        data = read_json(path)
        metrics[path.stem] = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
    return {
        "git_commit": git_commit(),
        "params_sha256": hashlib.sha256(Path(params_file).read_bytes()).hexdigest(),
        "metrics": metrics,
    }


def shipped_files(bentofile: Path = BENTOFILE) -> list[Path]:
    """The project files the bento ships: bentofile.yaml's `include` (anchored paths)."""
    include = yaml.safe_load(Path(bentofile).read_text())["include"]
    return [ROOT / entry.lstrip("/") for entry in include]


def bentofile_for(runtime: str, bentofile: Path = BENTOFILE) -> str:
    """bentofile.yaml for a bento serving on `runtime`: its packages less those of the other
    runtimes (a bento on onnxruntime installs no torch; its image, no compiler: service.py),
    `PINNED` ones at the release installed here."""
    config = yaml.safe_load(Path(bentofile).read_text())
    others = set().union(*(p for r, p in RUNTIME_PACKAGES.items() if r != runtime))
    config["python"]["packages"] = [
        f"{package_name(spec)}=={version(package_name(spec))}"
        if package_name(spec) in PINNED
        else spec
        for spec in config["python"]["packages"]
        if package_name(spec) not in others
    ]
    return yaml.safe_dump(config, sort_keys=False)


def package_name(spec: str) -> str:
    """`torch` of `torch>=2.6,<=2.13.0` (`whylogs` of `whylogs[viz]>=1.6`)."""
    return re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower()


def content_version(files: list[Path]) -> str:
    """A version from the bytes (and names) of `files`: the same inputs, the same tag."""
    digest = hashlib.sha256()
    for path in map(Path, files):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def package(
    files: dict[str, Path],
    metadata: dict[str, Any],
    serve_cfg: DictConfig,
    out_dir: Path,
    card: Callable[[str], str] | None = None,
) -> dict[str, str]:
    """Store the model files, build the bento pinned to them and export it into `out_dir`.

    Args:
        files: name in the BentoML model -> source file.
        metadata: attached to the BentoML model and shown by GET /metadata.
        serve_cfg: the `serve` config (model and service names).
        out_dir: receives `<service_name>.bento` and `bento.json`.
        card: renders the build report for the bento's tag; stored in the model as
            `card.html` (GET /card). Like the metadata, not part of the versions.

    The bento serves on `serve.runtime` (auto: the runtime `serving.json` names), which
    sets its packages (`bentofile_for`; service.py, its image) and is added to `metadata`.
    """
    for path in files.values():
        if not Path(path).is_file():
            raise StageError(f"{path}: not found (run the stages before package)")
    serving = json.loads(Path(files["serving.json"]).read_text())
    shipped = yaml.safe_load((ROOT / PARAMS).read_text())["serve"]["runtime"]
    if shipped != serve_cfg.runtime:  # the service reads the shipped params.yaml
        raise StageError(
            f"serve.runtime: {serve_cfg.runtime!r} here but {shipped!r} in {PARAMS}, which the "
            "bento ships (run `make params`, or override with `dvc exp run -S`)"
        )
    try:
        runtime = choose_runtime(serve_cfg.runtime, serving)
    except ValueError as err:
        raise StageError(str(err)) from None
    if runtime != "inductor" and ONNX_FILE not in files:
        raise StageError(f"serve.runtime: {runtime} needs {ONNX_FILE} (the compress stage's)")
    metadata = {**metadata, "runtime": runtime}
    model_files = [files[name] for name in sorted(files) if name != "serving.json"]
    version = content_version(model_files)  # the measured serving plan is not an input
    model_tag = f"{serve_cfg.model_name}:{version}"
    bentofile = bentofile_for(runtime)
    bento_version = content_version([*model_files, *shipped_files()])
    bento_version = hashlib.sha256(f"{bento_version}{bentofile}".encode()).hexdigest()[:16]
    bento_tag = f"{serve_cfg.service_name}:{bento_version}"
    for delete, tag in ((bentoml.bentos.delete, bento_tag), (bentoml.models.delete, model_tag)):
        with contextlib.suppress(NotFound):  # a rebuild of the same inputs replaces them
            delete(tag)
    with bentoml.models.create(model_tag, metadata=metadata) as model:
        for name, path in files.items():
            shutil.copyfile(path, model.path_of(name))
        if card is not None:
            Path(model.path_of("card.html")).write_text(card(bento_tag))
    log.info("saved BentoML model %s", model.tag)
    with tempfile.TemporaryDirectory(prefix="bento-ctx-") as ctx:
        # BentoML walks its whole build context (every file of .venv/ too, ~70k here) to
        # match `include`: a context of the shipped files alone builds the same bento faster.
        for path in shipped_files():
            copy = Path(ctx) / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
        (Path(ctx) / BENTOFILE.name).write_text(bentofile)
        # BentoML imports service.py once per process and the service pins its model at
        # import (`model_tag`): a second build in this process would pin the first model
        sys.modules.pop(SERVICE_MODULE, None)
        bento = bentoml.bentos.build_bentofile(
            str(Path(ctx) / BENTOFILE.name),
            build_ctx=ctx,
            version=bento_version,
            args={"model_tag": str(model.tag)},
            labels={"git_commit": metadata["git_commit"][:63]},
        )
    log.info("built bento %s (runtime %s)", bento.tag, runtime)
    with atomic_dir(out_dir) as tmp:
        archive = tmp.resolve() / f"{serve_cfg.service_name}.bento"
        bentoml.export_bento(bento.tag, str(archive))
        info = {"bento_tag": str(bento.tag), "model_tag": str(model.tag), "file": archive.name}
        write_json(tmp / "bento.json", info)
    log.info("exported %s", out_dir / info["file"])
    return info


def main(cfg: DictConfig) -> None:
    compressed = read_json(COMPRESS_DETAILS)
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "serving.json"
        plan.write_text(json.dumps(compressed["serving"], indent=2))
        files = {
            "model.pt2": COMPRESSED_DIR / "model.pt2",
            "model.json": COMPRESSED_DIR / "model.json",
            "schema.json": SCHEMA,
            "reference_profile.bin": REFERENCE_PROFILE,
            "serving.json": plan,
            DETECTOR_FILE: COMPRESSED_DIR / DETECTOR_FILE,  # the outlier detector
        }
        if (COMPRESSED_DIR / "fp32.pt2").exists():  # compress.fp32_fallback
            files["fp32.pt2"] = COMPRESSED_DIR / "fp32.pt2"
        if (COMPRESSED_DIR / ONNX_FILE).exists():  # exported (compress.runtimes)
            files[ONNX_FILE] = COMPRESSED_DIR / ONNX_FILE
        metrics = [METRICS["eval"], METRICS["compress"]]
        meta = build_metadata(PARAMS, metrics)
        package(files, meta, cfg.serve, DIST_DIR, lambda tag: render(gather(tag, gate=None)))


if __name__ == "__main__":
    run(main)
