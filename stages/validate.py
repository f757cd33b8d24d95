"""validate: the release gate for the bento that package built.

Serves `dist/<service>.bento` as a real server (`bentoml serve` on a free loopback port,
with an empty model store: the bento carries its model), checks that its answers on the
test split equal the compressed model's predictions in process, then sends one-record
/predict requests at `serve.slo.concurrency` for `serve.slo.duration_s`. Writes p50/p99
latency, throughput and error rate to `metrics/validate.json`; fails, writing nothing,
when an SLO in `conf/serve/` is missed or an answer differs.
"""

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from stages.common import StageError, read_json, run, write_json
from stages.export import load_program
from stages.ingest import load_split
from stages.model import decode, encode_split, predict_logits

log = logging.getLogger("stages.validate")
BENTO_DIR = Path("dist")
MODEL_FILE = Path("models/compressed/model.pt2")
METRICS = Path("metrics/validate.json")
TOKEN_ENV = "FULLSTACK_ML_API_TOKEN"  # sent as a bearer token when set (see service.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(NamedTuple):
    url: str
    port: int
    proc: subprocess.Popen


@contextmanager
def serve_bento(
    bento_file: Path, env: dict[str, str] | None = None, ready_timeout_s: float = 180
) -> Iterator[Server]:
    """`bentoml serve` of an exported bento file on a free port, with `env` added to the
    environment; stopped (SIGTERM, a graceful shutdown) on exit."""
    with tempfile.TemporaryDirectory(prefix="validate-") as tmp:
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
            yield Server(f"http://127.0.0.1:{port}", port, proc)
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
        time.sleep(0.5)
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
    """Rows as JSON-ready records of raw feature values, missing values as None."""
    part = df[features].astype(object)
    return part.where(part.notna(), None).to_dict("records")


def check_answers(port: int, test: pd.DataFrame, model_file: Path, batch: int = 64) -> int:
    """Served answers on every test row (raw values in) equal the compressed model's in
    process (eager): the same label, or for regression the same value to 1e-3 relative (the
    service may run the program compiled by Inductor, whose INT8 kernels round differently
    from eager's by about 1e-4 relative)."""
    meta = json.loads(model_file.with_name("model.json").read_text())
    x, _ = encode_split(test, meta)
    expected = decode(predict_logits(load_program(model_file), x), meta)
    classify = meta["task"] == "classification"
    records = raw_records(test, meta["features"])
    for start in range(0, len(records), batch):
        body = json.dumps({"records": records[start : start + batch]}).encode()
        status, answer = request(port, "POST", "/predict", body)
        if status != 200:
            raise StageError(f"/predict answered {status} on test rows {start}+: {answer[:200]!r}")
        want = expected[start : start + batch]
        for i, (got, exp) in enumerate(zip(json.loads(answer), want, strict=True)):
            exp = meta["classes"][exp] if classify else float(exp)
            same = (
                got["label"] == exp
                if classify
                else abs(got["value"] - exp) <= 1e-3 * max(1, abs(exp))
            )
            if not same:
                raise StageError(f"served {got} != in-process {exp!r} on test row {start + i}")
    return len(records)


def load(port: int, bodies: list[bytes], concurrency: int, duration_s: float) -> dict[str, float]:
    """`concurrency` clients, each on one kept-alive connection, POST /predict with `bodies`
    in turn for `duration_s`: requests/s, p50/p99 latency (ms) and error rate."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client(offset: int) -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        done, failed, i = [], 0, offset
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                status = request(port, "POST", "/predict", bodies[i % len(bodies)], conn)[0]
            except OSError:
                status = 0
                conn.close()
            done.append(time.perf_counter() - start)
            failed += not 200 <= status < 300
            i += concurrency
        with lock:
            latencies.extend(done)
            errors += failed

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms),
        "rps": len(ms) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "error_rate": errors / max(len(ms), 1),
        "concurrency": concurrency,
    }


def missed_slos(result: dict[str, float], slo: DictConfig) -> list[str]:
    checks = [
        (result["p99_ms"] <= slo.p99_ms, f"p99 {result['p99_ms']:.1f} ms > {slo.p99_ms}"),
        (result["rps"] >= slo.min_rps, f"throughput {result['rps']:.1f}/s < {slo.min_rps}"),
        (
            result["error_rate"] <= slo.max_error_rate,
            f"error rate {result['error_rate']:.4f} > {slo.max_error_rate}",
        ),
    ]
    return [f"serve.slo: {msg}" for ok, msg in checks if not ok]


def validate(
    bento_file: Path, test: pd.DataFrame, model_file: Path, slo: DictConfig
) -> dict[str, Any]:
    """Serve `bento_file`, check its answers on `test`, load it; raises StageError on a
    wrong answer or a missed SLO."""
    if not bento_file.is_file():
        raise StageError(f"{bento_file}: not found (run the package stage first)")
    with serve_bento(bento_file) as server:
        port = server.port
        checked = check_answers(port, test, model_file)
        log.info("served answers equal the in-process model on %d test rows", checked)
        features = json.loads(model_file.with_name("model.json").read_text())["features"]
        bodies = [json.dumps({"records": r}).encode() for r in raw_records(test, features)]
        load(port, bodies, slo.concurrency, 1.0)  # warm-up
        result = load(port, bodies, slo.concurrency, slo.duration_s)
    result["answers_checked"] = checked
    log.info(
        "load at concurrency %d: %.0f requests/s, p50 %.1f ms, p99 %.1f ms, error rate %.4f",
        slo.concurrency,
        result["rps"],
        result["p50_ms"],
        result["p99_ms"],
        result["error_rate"],
    )
    if missed := missed_slos(result, slo):
        raise StageError("; ".join(missed))
    return result


def main(cfg: DictConfig) -> None:
    info = read_json(BENTO_DIR / "bento.json")
    result = validate(BENTO_DIR / info["file"], load_split("test"), MODEL_FILE, cfg.serve.slo)
    write_json(METRICS, {"bento_tag": info["bento_tag"], **result})
    log.info("wrote %s", METRICS)


if __name__ == "__main__":
    run(main)
