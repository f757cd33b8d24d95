"""Every benchmark in bench/ runs in its smoke mode and prints its table with finite,
positive ratios: a benchmark nothing runs rots (bench.serve did once the distil stage came).
No timing is asserted: the figures only have to be real numbers."""

import math
import os
import subprocess
import sys

import pytest

from fullstack_ml.stage import ROOT

GUARD_S = 900  # against a hung run, not a speed check


def smoke(name: str) -> str:
    """stdout of `python -m bench.<name> --smoke` from the repo root; fails on a non-zero exit."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables in `text`: a list of rows (header cell -> cell) per table."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif block:
            head, rows = block[0], [r for r in block[1:] if not set("".join(r)) <= set("-:")]
            found.append([dict(zip(head, row, strict=True)) for row in rows])
            block = []
    return found


def ratio(cell: str) -> float:
    """A printed ratio as a float: finite and positive, or the test fails."""
    value = float(cell.rstrip("x").replace(",", ""))
    assert math.isfinite(value) and value > 0, cell
    return value


def test_tables_parses_rows_and_ratio_rejects_what_is_not_a_figure() -> None:
    text = "title\n| a | b |\n|---|---:|\n| x | 1.5 |\n| y | nan |\n\n| c |\n|---|\n| z |\n"
    assert tables(text) == [[{"a": "x", "b": "1.5"}, {"a": "y", "b": "nan"}], [{"c": "z"}]]
    assert ratio("1.50") == 1.5 and ratio("2.0x") == 2.0
    for bad in ("nan", "inf", "0.00", "-1", "-"):
        with pytest.raises((AssertionError, ValueError)):
            ratio(bad)


@pytest.mark.slow
def test_pipeline_smoke_times_each_stage_against_its_own_work() -> None:
    out = smoke("pipeline")
    (rows,) = tables(out)
    assert [r["stage"] for r in rows] == ["ingest", "profile", "total"]
    for r in rows:
        assert ratio(r["wall s"]) and ratio(r["work s"]) and ratio(r["ratio"])
    assert "no-op dvc repro" in out and "(nothing rerun)" in out


@pytest.mark.slow
def test_ingest_smoke_compares_every_path_with_the_pyarrow_floor() -> None:
    runs = tables(smoke("ingest"))[0]
    assert [r["path"] for r in runs] == ["floor", "pandas"]
    assert all(r["rows"] == "2,000" for r in runs)
    assert [ratio(r["time / floor"]) for r in runs][0] == 1.0


@pytest.mark.slow
def test_train_smoke_compares_ray_train_with_a_plain_loop() -> None:
    runs = tables(smoke("train"))[0]
    assert [r["run"] for r in runs] == [
        "torch, 1 thread",
        "torch, default threads",
        "Ray Train, local mode",
    ]
    assert [ratio(r["epoch / torch 1 thread"]) for r in runs][0] == 1.0


@pytest.mark.slow
def test_compress_smoke_measures_each_pipeline_against_fp32() -> None:
    lines = smoke("compress").splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["name"])
    end = next(i for i, line in enumerate(lines) if line.startswith("selected:"))
    rows = {line.split()[0]: line.split()[1:] for line in lines[head + 1 : end]}
    assert set(rows) == {"fp32", "int8_static", "distil_int8", "structured_int8", "woq_int4"}
    for name, cells in rows.items():
        assert len(cells) == 6, name  # size, score, batch 1 and 16 eager and best
        assert all(ratio(c) for c in cells), name
    assert lines[end].startswith("selected: int8_static")


@pytest.mark.slow
def test_serve_smoke_measures_bentoml_against_fastapi_and_the_model_in_process() -> None:
    results, ratios = tables(smoke("serve"))
    servers = {r["server"] for r in results}
    assert {"(a) bentoml", "(b) fastapi def", "(b) fastapi async def"} <= servers
    assert all(r["non-2xx"] == "0" and r["socket err"] == "0" for r in results if r["concurrency"])
    (row,) = ratios
    assert row["model"] == "default" and row["concurrency"] == "4"
    assert ratio(row["(a)/(b) req/s"]) and ratio(row["(a)/(c)"]) and ratio(row["p99 (a) ms"])
