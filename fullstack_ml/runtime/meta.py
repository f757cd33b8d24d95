"""`model.json`, what a saved model says of itself: architecture (`model`), `task`,
`features`, `target`, `classes`, the fitted `preprocessing`, and what made it (`train`,
`trained_on`, `distilled_from`, `compression`). Written and read here only: the stages and
the service (inside the bento) share it."""

import json
from pathlib import Path
from typing import Any

FILE = "model.json"
REQUIRED = ("model", "task", "features", "target", "classes", "preprocessing")


def write_meta(model_dir: Path, meta: dict[str, Any]) -> None:
    """Write `model_dir/model.json` (stable key order: the same model, the same bytes)."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"model.json: missing {missing}")
    (Path(model_dir) / FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(model_dir: Path) -> dict[str, Any]:
    """`model_dir/model.json`.

    Raises:
        FileNotFoundError: no model there (naming the file).
        ValueError: not JSON, or a required key missing (naming the file and the key).
    """
    path = Path(model_dir) / FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    return meta
