"""The compressed model's own answers on the test split, computed in process (eager) by the
compress stage, for the validate stage to compare the served answers with. numpy alone: the
release gate imports no torch and computes nothing beside the server it starts (a model run
in its process there held the server's start-up back by 0.7-1 s on 2 cores)."""

import hashlib
import io
from pathlib import Path

import numpy as np

from fullstack_ml.stage import StageError, write_atomic


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_answers(path: Path, answers: np.ndarray, model_file: Path) -> None:
    """`answers` (class indices or regression values, one per test row) and the SHA-256 of
    the program file that gave them, as one `.npz` file."""
    buf = io.BytesIO()
    np.savez(buf, answers=answers, model_sha256=np.array(file_sha256(model_file)))
    write_atomic(path, buf.getvalue())


def load_answers(path: Path, model_file: Path, rows: int) -> np.ndarray:
    """The answers `save_answers` wrote for `model_file`, one for each of `rows` test rows.

    Raises:
        StageError: the file is missing or unreadable, was made for another program file or
            holds another number of rows (naming the file).
    """
    try:
        with np.load(path, allow_pickle=False) as saved:
            answers, made_for = saved["answers"], str(saved["model_sha256"])
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run the compress stage first)") from None
    except (OSError, ValueError, KeyError) as err:
        raise StageError(f"{path}: not the compress stage's answers ({err})") from None
    if made_for != file_sha256(model_file):
        raise StageError(f"{path}: made for another {model_file} (rerun the compress stage)")
    if len(answers) != rows:
        raise StageError(f"{path}: {len(answers)} answers for {rows} test rows (rerun compress)")
    return answers
