"""bench.outliers' smoke (`python -m bench.outliers --smoke`), serving measured on the
session's served bento: every table printed with its rows and columns, every figure a
number. No value is asserted: no accuracy or wall-clock threshold."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench import GUARD_S, tables

from fullstack_ml.bento import Server
from fullstack_ml.outliers import SERVED
from fullstack_ml.stage import ROOT

CANDIDATES = ["mahalanobis", "ecod", "iforest", "max_softmax", "energy", "knn_penultimate"]
DIGITS = ["noise (far)", "inversion (far)", "iris (far)", "wine (far)", "breast_cancer (far)"]
DIGITS += ["diabetes (far)", "rotation_90 (far)", "rotation_180 (near)"]
WINE = [f"out_of_range_{k} (far)" for k in (1, 2, 3)] + ["swap_2 (far)", "permuted (far)"]


def number(cell: str, low: float = -math.inf, high: float = math.inf) -> float:
    value = float(cell)
    assert math.isfinite(value) and low <= value <= high, cell
    return value


def check_auroc(rows: list[dict[str, str]], shifts: list[str]) -> None:
    assert [r["candidate"] for r in rows] == CANDIDATES
    assert list(rows[0])[4:] == [*shifts, "min far", "far >= 0.95"]
    for r in rows:
        for shift in [*shifts, "min far"]:
            number(r[shift], 0, 1)
        assert r["served"] == ("yes" if r["candidate"] in SERVED else "no")
        assert r["far >= 0.95"] in ("yes", "no")
    (shipped,) = [r for r in rows if r["ships"] == "yes"]
    assert shipped["served"] == "yes"


def check_flagged(rows: list[dict[str, str]], shifts: list[str], shipped: str) -> None:
    (row,) = rows
    assert row["shipped"] == shipped
    assert row["threshold"] == "none" or number(row["threshold"]) is not None  # none: too few rows
    for shift in ["test", *shifts]:
        number(row[shift], 0, 100)


@pytest.mark.slow
def test_outliers_smoke_prints_auroc_fpr_and_serving_overhead(
    server: Server, bento: Path, curated: Path
) -> None:
    cmd = [sys.executable, "-m", "bench.outliers", "--smoke", "--bento", str(bento)]
    cmd += ["--url", server.url, "--split", str(curated / "test.parquet")]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GUARD_S)
    assert proc.returncode == 0, f"bench.outliers exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    digits, digits_flagged, wine, wine_flagged, (fpr,), serving = tables(proc.stdout)

    for auroc, flagged, shifts in ((digits, digits_flagged, DIGITS), (wine, wine_flagged, WINE)):
        check_auroc(auroc, shifts)
        check_flagged(flagged, shifts, next(r["candidate"] for r in auroc if r["ships"]))

    assert fpr["re-splits"] == "2" and fpr["val rows"] == fpr["test rows"] == "270"
    for key in ("conformal expectation %", "mean %", "sd pt", "min %", "max %"):
        number(fpr[key], 0, 100)
    assert fpr["within +-0.5 pt"] in ("yes", "no") and fpr["shipped"]

    assert [r["concurrency"] for r in serving] == ["1", "64"]
    for r in serving:
        for key in ("p50 ms", "req/s", "model calls/s", "records per call", "added us"):
            assert number(r[key]) > 0, key
        for key in ("score+flags us", "observe us (memory)", "observe us (mmap)"):
            number(r[key], 0)
        for key in ("answer fields us", "added / p50 %", "added x calls/s %"):
            number(r[key], 0)
        assert int(r["batch timed"]) >= 1 and r["<= 10%"] in ("yes", "no")
