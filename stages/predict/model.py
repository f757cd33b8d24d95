"""The model predict scores with: the pipeline's `models/compressed`, or a bento's."""

import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from fullstack_ml.paths import COMPRESS_DETAILS, COMPRESSED_DIR, REFERENCE_PROFILE, SCHEMA
from fullstack_ml.stage import StageError, read_json


class Model(NamedTuple):
    """What scoring needs, from the pipeline's files or from a bento's model."""

    dir: Path  # model.pt2 and model.json (and fp32.pt2 where shipped)
    schema: dict[str, Any]
    serving: dict[str, Any] | None  # the measured execution plan (None: eager)
    reference: Path  # the training profile, for drift
    name: str  # for messages and metrics


@contextmanager
def open_model(bento: str | None) -> Iterator[Model]:
    """The pipeline's `models/compressed` (`bento` None), or the model inside a bento file,
    unpacked into a temporary folder for the run."""
    if not bento:
        yield Model(
            COMPRESSED_DIR,
            read_json(SCHEMA),
            read_json(COMPRESS_DETAILS).get("serving"),
            REFERENCE_PROFILE,
            str(COMPRESSED_DIR),
        )
        return
    path = Path(bento)
    if not path.is_file():
        raise StageError(f"predict.bento: {bento}: not found")
    with tempfile.TemporaryDirectory(prefix="predict-bento-") as tmp:
        try:
            with tarfile.open(path) as tar:
                wanted = [m for m in tar.getmembers() if m.name.lstrip("./").startswith("models/")]
                tar.extractall(tmp, members=wanted, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise StageError(f"predict.bento: {bento}: not a bento file ({err})") from None
        found = sorted(Path(tmp).glob("models/*/*/model.json"))
        if len(found) != 1:
            raise StageError(f"predict.bento: {bento}: holds {len(found)} models, not one")
        folder = found[0].parent
        serving = folder / "serving.json"
        yield Model(
            folder,
            read_json(folder / "schema.json"),
            read_json(serving) if serving.exists() else None,
            folder / "reference_profile.bin",
            f"{bento} ({folder.parent.name}:{folder.name})",
        )
