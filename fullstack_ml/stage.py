"""What every stage shares: config loading, the entry point, clear errors and atomic outputs."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fullstack_ml.paths import PARAMS

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"

UMASK = os.umask(0)
os.umask(UMASK)


def git_commit() -> str:
    """The checkout's HEAD commit ("unknown" outside git)."""
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


class StageError(Exception):
    """Bad input or a failed check: reported as one line, exit status 1."""


def compose(overrides: list[str] | None = None) -> DictConfig:
    """`conf/` composed with Hydra overrides, resolved: what DVC writes to params.yaml."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return cfg


def params_yaml(overrides: list[str] | None = None) -> str:
    """The text DVC writes to params.yaml for `overrides`."""
    return OmegaConf.to_yaml(compose(overrides))


def run(task: Callable[[DictConfig], None]) -> None:
    """Entry point of a stage module.

    `python -m stages.X --params` (how dvc.yaml calls it) reads params.yaml, which DVC
    composed from conf/; `python -m stages.X key=value ...` is a Hydra app over conf/.
    """

    def guarded(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except StageError as err:
            sys.exit(f"error: {err}")
        finally:
            # Python's last full collection at exit walks every object torch and its compiler
            # left (0.3-0.9 s a stage here); frozen ones are skipped, still freed by refcount.
            gc.freeze()

    if sys.argv[1:2] == ["--params"]:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
        if len(sys.argv) > 2:
            sys.exit("error: --params takes no overrides; edit conf/ or use `dvc exp run -S`")
        if not PARAMS.exists():
            sys.exit(f"error: {PARAMS} not found; run from the repo root")
        guarded(OmegaConf.load(PARAMS))
        return
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(guarded)()


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final`.

    On failure the temporary directory is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` (or bytes) to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Parsed JSON from `path`; a missing or unreadable file is a StageError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err})") from None


if __name__ == "__main__":
    write_atomic(PARAMS, params_yaml(sys.argv[1:]))
    print(f"wrote {PARAMS} from {CONF_DIR.relative_to(ROOT)}/")
