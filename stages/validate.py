"""validate: the release gate for the bento that package built.

Serves `dist/<service>.bento` as a real server (`bentoml serve` on a free loopback port,
with an empty model store: the bento carries its model), checks that its answers on the
test split equal the compressed model's, computed in process by the compress stage
(`reports/compress_answers.npz`, checked to be of `models/compressed/model.pt2`), then sends
`serve.slo.lone_requests` lone one-record /predict requests (after a few for warm-up), then
requests at `serve.slo.concurrency` for `serve.slo.duration_s`, then a burst at
`serve.slo.burst_concurrency` and, `serve.slo.settle_s` after it, lone requests again: a
server that stays slow after a burst fails. Writes p50/p99 latency, throughput, error rate
and the lone-request p50 before and after the burst, with the confidence bounds the gate
decides on (`fullstack_ml.gates.missed_slos`), to `reports/validate.json`, the headline
figures of it to `metrics/validate.json`; fails, writing nothing, when an SLO in
`conf/serve/` is missed, an answer differs, or more test rows are outliers than
`outliers.target_fpr` allows (`outlier_gate`: a beta-binomial tail at `outliers.confidence`).
"""

import http.client
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fullstack_ml.answers import load_answers
from fullstack_ml.bento import raw_records, request, serve_bento
from fullstack_ml.curated import load_split
from fullstack_ml.gates import (
    exceedances,
    missed_slos,
    quantile_bounds,
    slowdown,
    window_rates,
)
from fullstack_ml.paths import COMPRESS_ANSWERS, COMPRESSED_DIR, DIST_DIR, METRICS, VALIDATE_DETAILS
from fullstack_ml.runtime.meta import read_meta
from fullstack_ml.runtime.outliers import load_detector
from fullstack_ml.stage import StageError, read_json, run, write_json

log = logging.getLogger("stages.validate")
RATE_WINDOW_S = 0.25  # throughput is judged per window of the load (12 in 3 s)


def check_answers(
    port: int, test: pd.DataFrame, meta: dict, expected: np.ndarray, batch: int = 64
) -> tuple[int, int]:
    """The rows checked and the outliers among them. Served answers on every test row (raw
    values in) equal `expected`, the compressed
    model's in process (eager, `fullstack_ml.answers`): the same label, or for regression the
    same value to 1e-2 relative, the compress stage's `runtime_tolerance` (Inductor's INT8
    kernels round differently from eager's by about 1e-4 relative; onnxruntime's requantize
    between layers, which moved digits' probabilities by up to 5e-3)."""
    classify = meta["task"] == "classification"
    records = raw_records(test, meta["features"])
    outliers = 0
    for start in range(0, len(records), batch):
        body = json.dumps({"records": records[start : start + batch]}).encode()
        status, answer = request(port, "POST", "/predict", body)
        if status != 200:
            raise StageError(f"/predict answered {status} on test rows {start}+: {answer[:200]!r}")
        want = expected[start : start + batch]
        for i, (got, exp) in enumerate(zip(json.loads(answer), want, strict=True)):
            outliers += got["outlier"]
            exp = meta["classes"][exp] if classify else float(exp)
            same = (
                got["label"] == exp
                if classify
                else abs(got["value"] - exp) <= 1e-2 * max(1, abs(exp))
            )
            if not same:
                raise StageError(f"served {got} != in-process {exp!r} on test row {start + i}")
    return len(records), outliers


def outlier_gate(outliers: int, rows: int, model_dir: Path, confidence: float) -> dict[str, Any]:
    """The served outlier rate on the test rows against the detector's `target_fpr`: fails
    (StageError) when that many outliers are evidence of a higher rate (`gates.exceedances`,
    at `outliers.confidence`)."""
    detector = load_detector(model_dir)
    verdict = exceedances(outliers, rows, detector.rank, detector.val_rows, confidence)
    if verdict["over"]:
        raise StageError(
            f"outliers: {outliers} of {rows} test rows flagged, {verdict['expected']:.1f}"
            f" expected at outliers.target_fpr={detector.target_fpr} (p = {verdict['pvalue']:.2g}"
            f" < {1 - confidence:.2g}): test is unlike val, or the detector is wrong"
        )
    return {"outliers": outliers, "outlier_rate": outliers / rows, **verdict}


def load(port: int, bodies: list[bytes], concurrency: int, duration_s: float) -> dict[str, Any]:
    """`concurrency` clients, each on one kept-alive connection, POST /predict with `bodies`
    in turn for `duration_s`: requests/s, p50/p99 latency (ms), error rate, and the raw
    samples the gate's bounds need (`latencies_ms`, `finished_s`: each request's completion
    time from the start)."""
    samples: list[tuple[float, float]] = []
    errors = 0
    lock = threading.Lock()
    began = time.perf_counter()
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
            end = time.perf_counter()
            done.append((end - start, end - began))
            failed += not 200 <= status < 300
            i += concurrency
        with lock:
            samples.extend(done)
            errors += failed

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ms = np.array([s[0] for s in samples]) * 1000
    return {
        "requests": len(ms),
        "rps": len(ms) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "error_rate": errors / max(len(ms), 1),
        "concurrency": concurrency,
        "latencies_ms": ms,
        "finished_s": np.array([s[1] for s in samples]),
    }


def lone_ms(port: int, bodies: list[bytes], count: int) -> np.ndarray:
    """Latencies (ms) of `count` back-to-back requests from one client, each alone on the
    server; StageError on a failed one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = np.empty(count)
    for i in range(count):
        start = time.perf_counter()
        status, answer = request(port, "POST", "/predict", bodies[i % len(bodies)], conn)
        out[i] = (time.perf_counter() - start) * 1000
        if status != 200:
            raise StageError(f"serve.slo: a lone request answered {status}: {answer[:200]!r}")
    return out


def load_figures(result: dict[str, Any], slo: DictConfig) -> dict[str, Any]:
    """The load's figures with the bounds the gate decides on: the p99's lower bound (order
    statistics of every request) and the throughput's upper bound (the median of
    `RATE_WINDOW_S` windows, bounded by order statistics), both at `slo.confidence`."""
    ms, finished = result.pop("latencies_ms"), result.pop("finished_s")
    rates = window_rates(finished, RATE_WINDOW_S)
    return result | {
        "p99_low_ms": quantile_bounds(ms, 0.99, slo.confidence)[0],
        "rps_windows": len(rates),
        "rps_high": quantile_bounds(rates, 0.5, slo.confidence)[1],
    }


def burst_recovery(
    port: int, bodies: list[bytes], slo: DictConfig, before: np.ndarray
) -> dict[str, float]:
    """`slo.lone_requests` lone requests `slo.settle_s` after `slo.burst_s` at
    `slo.burst_concurrency`, compared with `before` (the same, measured before the burst):
    the ratio and difference of their medians with lower bounds at `slo.confidence`."""
    burst = load(port, bodies, slo.burst_concurrency, slo.burst_s)
    time.sleep(slo.settle_s)
    after = lone_ms(port, bodies, slo.lone_requests)
    slow = slowdown(before, after, slo.confidence)
    return {
        "lone_p50_ms": float(np.median(before)),
        "after_burst_p50_ms": float(np.median(after)),
        "after_burst_ratio": slow["ratio"],
        "after_burst_ratio_low": slow["ratio_low"],
        "after_burst_diff_ms": slow["diff"],
        "after_burst_diff_low_ms": slow["diff_low"],
        "burst_error_rate": burst["error_rate"],
    }


def validate(
    bento_file: Path,
    test: pd.DataFrame,
    model_file: Path,
    answers_file: Path,
    slo: DictConfig,
    confidence: float = 0.999,
) -> dict[str, Any]:
    """Serve `bento_file`, check its answers on `test` against `answers_file` (those of
    `model_file`) and its outlier rate (`outlier_gate` at `confidence`), load it; raises
    StageError on a wrong answer, too many outliers or a missed SLO."""
    result = release_figures(bento_file, test, model_file, answers_file, slo)
    odd = outlier_gate(result["outliers"], result["answers_checked"], model_file.parent, confidence)
    result["outlier_gate"] = odd
    if missed := missed_slos(result, slo):
        raise StageError("; ".join(missed))
    return result


def release_figures(
    bento_file: Path, test: pd.DataFrame, model_file: Path, answers_file: Path, slo: DictConfig
) -> dict[str, Any]:
    """`validate`'s measurements, before the SLOs judge them (StageError on a wrong answer)."""
    if not bento_file.is_file():
        raise StageError(f"{bento_file}: not found (run the package stage first)")
    try:
        meta = read_meta(model_file.parent)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None
    answers = load_answers(answers_file, model_file, len(test))
    with serve_bento(bento_file) as server:
        port = server.port
        checked, outliers = check_answers(port, test, meta, answers)
        runtime = json.loads(request(port, "GET", "/metadata")[1]).get("runtime", "inductor")
        log.info("served answers (on %s) equal model.pt2's on %d test rows", runtime, checked)
        bodies = [json.dumps({"records": r}).encode() for r in raw_records(test, meta["features"])]
        lone_ms(port, bodies, slo.warmup_requests)  # a fresh worker's first are slower
        before = lone_ms(port, bodies, slo.lone_requests)
        result = load_figures(load(port, bodies, slo.concurrency, slo.duration_s), slo)
        result |= burst_recovery(port, bodies, slo, before)
    result["answers_checked"] = checked
    result["outliers"] = outliers
    result["runtime"] = runtime
    log.info(
        "load at concurrency %d: %.0f requests/s, p50 %.1f ms, p99 %.1f ms, error rate %.4f;"
        " lone requests p50 %.2f ms, %.2f ms after a burst (%.2fx, at least %.2fx and %+.2f ms)",
        slo.concurrency,
        result["rps"],
        result["p50_ms"],
        result["p99_ms"],
        result["error_rate"],
        result["lone_p50_ms"],
        result["after_burst_p50_ms"],
        result["after_burst_ratio"],
        result["after_burst_ratio_low"],
        result["after_burst_diff_low_ms"],
    )
    return result


def main(cfg: DictConfig) -> None:
    info = read_json(DIST_DIR / "bento.json")
    model_file = COMPRESSED_DIR / "model.pt2"
    test = load_split("test")
    result = validate(
        DIST_DIR / info["file"],
        test,
        model_file,
        COMPRESS_ANSWERS,
        cfg.serve.slo,
        cfg.outliers.confidence,
    )
    headline = ["rps", "p99_ms", "error_rate", "after_burst_ratio", "answers_checked", "outliers"]
    write_json(METRICS["validate"], {k: result[k] for k in headline})
    write_json(VALIDATE_DETAILS, {"bento_tag": info["bento_tag"], **result})
    log.info("wrote %s, %s", METRICS["validate"], VALIDATE_DETAILS)


if __name__ == "__main__":
    run(main)
