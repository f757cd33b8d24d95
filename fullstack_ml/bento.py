"""Serve a built bento on loopback and talk to it: the validate stage, tests and bench."""

import base64
import http.client
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from fullstack_ml.stage import StageError

TOKEN_ENV = "FULLSTACK_ML_API_TOKEN"  # sent as a bearer token when set (see service.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(NamedTuple):
    url: str
    port: int
    proc: subprocess.Popen
    log_file: Path  # the server's stdout and stderr


@contextmanager
def serve_bento(
    bento_file: Path, env: dict[str, str] | None = None, ready_timeout_s: float = 180
) -> Iterator[Server]:
    """`bentoml serve` of an exported bento file on a free port, with `env` added to the
    environment; stopped (SIGTERM, a graceful shutdown) on exit."""
    with tempfile.TemporaryDirectory(prefix="bento-") as tmp:
        bento, home = Path(tmp) / "bento", Path(tmp) / "bentoml"
        with tarfile.open(bento_file) as tar:
            tar.extractall(bento, filter="data")
        port = free_port()
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, **(env or {}), "BENTOML_HOME": str(home)}
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("BENTOML_DO_NOT_TRACK", "true")
        log_file = Path(tmp) / "serve.log"
        with log_file.open("w") as out:
            proc = subprocess.Popen(
                [bin_dir / "bentoml", "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                cwd=tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_ready(port, proc, log_file, ready_timeout_s)
            yield Server(f"http://127.0.0.1:{port}", port, proc, log_file)
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the server's process group (a graceful shutdown), SIGKILL after timeout."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(port: int, proc: subprocess.Popen, log_file: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise StageError(f"bentoml serve exited {proc.returncode}: {tail[0]}")
        try:
            if request(port, "GET", "/readyz")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.1)
    raise StageError(f"bentoml serve not ready after {timeout_s:.0f} s (see its log)")


def request(
    port: int, method: str, path: str, body: bytes | None = None, conn: Any = None
) -> tuple[int, bytes]:
    """One HTTP request on `conn` (kept alive) or a new connection: (status, body)."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if token := os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def raw_records(df: pd.DataFrame, features: list[str]) -> list[dict[str, Any]]:
    """Rows as JSON-ready records of raw feature values, missing values as None; an image
    feature's encoded file (bytes) as base64 text, as the service takes it."""
    part = df[features].astype(object)
    for column in features:
        if len(part) and isinstance(part[column].iloc[0], bytes | bytearray):
            part[column] = [base64.b64encode(v).decode() for v in part[column]]
    return part.where(part.notna(), None).to_dict("records")
