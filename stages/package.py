"""package: the compressed model into the BentoML model store, a bento, and a bento file.

Saves `models/compressed` with the schema, the reference profile and metadata (git
commit, params hash, metrics) as a BentoML model, builds the bento from bentofile.yaml
pinned to that model, and exports it to `dist/<service_name>.bento` (+ `dist/bento.json`).
Serve it with `make serve`, or `bentoml import dist/<name>.bento && bentoml serve <tag>`.
"""

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import bentoml
from omegaconf import DictConfig

from stages.common import PARAMS, ROOT, StageError, atomic_dir, read_json, run, write_json

log = logging.getLogger("stages.package")
MODEL_DIR = Path("models/compressed")
SCHEMA = Path("data/curated/schema.json")
REFERENCE_PROFILE = Path("reports/profile/train.bin")
METRICS = (Path("metrics/eval.json"), Path("metrics/compress.json"))
OUT_DIR = Path("dist")


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def build_metadata(params_file: Path, metrics_files: tuple[Path, ...]) -> dict[str, Any]:
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


def package(
    files: dict[str, Path], metadata: dict[str, Any], serve_cfg: DictConfig, out_dir: Path
) -> dict[str, str]:
    """Store the model files, build the bento pinned to them and export it into `out_dir`.

    Args:
        files: name in the BentoML model -> source file.
        metadata: attached to the BentoML model and shown by GET /metadata.
        serve_cfg: the `serve` config (model and service names).
        out_dir: receives `<service_name>.bento` and `bento.json`.
    """
    for path in files.values():
        if not Path(path).is_file():
            raise StageError(f"{path}: not found (run the stages before package)")
    with bentoml.models.create(serve_cfg.model_name, metadata=metadata) as model:
        for name, path in files.items():
            shutil.copyfile(path, model.path_of(name))
    log.info("saved BentoML model %s", model.tag)
    bento = bentoml.bentos.build_bentofile(
        str(ROOT / "bentofile.yaml"),
        build_ctx=str(ROOT),
        args={"model_tag": str(model.tag)},
        labels={"git_commit": metadata["git_commit"][:63]},
    )
    log.info("built bento %s", bento.tag)
    with atomic_dir(out_dir) as tmp:
        archive = tmp.resolve() / f"{serve_cfg.service_name}.bento"
        bentoml.export_bento(bento.tag, str(archive))
        info = {"bento_tag": str(bento.tag), "model_tag": str(model.tag), "file": archive.name}
        write_json(tmp / "bento.json", info)
    log.info("exported %s", out_dir / info["file"])
    return info


def main(cfg: DictConfig) -> None:
    files = {
        "model.pt2": MODEL_DIR / "model.pt2",
        "model.json": MODEL_DIR / "model.json",
        "schema.json": SCHEMA,
        "reference_profile.bin": REFERENCE_PROFILE,
    }
    if (MODEL_DIR / "fp32.pt2").exists():  # compress.fp32_fallback: served at small batches
        files["fp32.pt2"] = MODEL_DIR / "fp32.pt2"
    package(files, build_metadata(PARAMS, METRICS), cfg.serve, OUT_DIR)


if __name__ == "__main__":
    run(main)
