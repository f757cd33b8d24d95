"""device: the compressed model as files a runtime without this project loads (`make
device`): `models/device/` holds `model.onnx` (the INT8 program with QuantizeLinear/
DequantizeLinear, as the compress stage exported and checked it), `preprocess.json` (the
training preprocessing, the classes and the graph's input and output names), `schema.json`
(the curated data's) and `runner.py`, a runner needing only numpy and onnxruntime, and
Pillow for an image model (`pip install onnxruntime numpy pillow==<release>`): it decodes
an image as the service does (`runtime/images.py`), from base64 records or named files.
An image model's `model.onnx` takes what the Preprocessor gives it (compress exported it
on the encoded test split): C x H x W normalised values per image, after any other
feature's; `preprocess.json` holds the schema's image entry (size, mode, resize, mean, std)
and the Pillow release that decodes here: Pillow's bilinear resize changed between releases
(a 29x65 WebP padded to 32x32: pixel sums 106,724 on 10.4.0, 106,714 on 13.0.0, answers
3e-4 apart), so answers equal the service's only on the same release.

ISA: the ONNX file holds operators and weights, no machine code. ONNX Runtime (or OpenVINO)
picks its kernels when it loads the file, by the CPU it runs on (AVX2, AVX-512, VNNI, AMX),
so an artifact built on an AVX-512 host runs on an AVX2 one. Inductor or AOTInductor builds
are compiled for the build host's vector ISA, and nothing optimised for a CPU is saved here
(ONNX Runtime warns that its level-3 optimised graphs are: they are never written).
"""

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from fullstack_ml.paths import COMPRESSED_DIR, DEVICE_DIR, DEVICE_RUNNER, SCHEMA
from fullstack_ml.runtime.engine import ONNX_FILE
from fullstack_ml.runtime.meta import read_meta
from fullstack_ml.stage import ROOT, StageError, atomic_dir, run, write_json

log = logging.getLogger("stages.device")


def device(model_dir: Path, schema: Path, out_dir: Path) -> list[str]:
    """Write the device artifact of the compressed model in `model_dir` into `out_dir`;
    returns the names of the files written.

    Raises:
        StageError: no `model.onnx` (compress.runtimes empty, or the export failed).
    """
    onnx = Path(model_dir) / ONNX_FILE
    if not onnx.is_file():
        raise StageError(
            f"{onnx}: not found (the compress stage exports it when compress.runtimes is set)"
        )
    meta = read_meta(model_dir)
    pre = meta["preprocessing"]
    if pre.get("images"):  # resampling differs between releases: the runner warns on another
        from PIL import __version__ as pillow

        pre = {**pre, "pillow": pillow}
    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(onnx, tmp / ONNX_FILE)
        shutil.copyfile(schema, tmp / "schema.json")
        shutil.copyfile(ROOT / DEVICE_RUNNER, tmp / "runner.py")
        write_json(
            tmp / "preprocess.json",
            {
                "input": "x",
                "output": "logits",
                "task": meta["task"],
                "features": meta["features"],
                "classes": meta["classes"],
                **pre,
            },
        )
        names = sorted(p.name for p in tmp.iterdir())
    return names


def main(cfg: DictConfig) -> None:
    names = device(COMPRESSED_DIR, SCHEMA, DEVICE_DIR)
    log.info("wrote %s: %s", DEVICE_DIR, ", ".join(names))


if __name__ == "__main__":
    run(main)
