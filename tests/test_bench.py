"""Every benchmark in bench/ runs in its smoke mode and prints its table with finite,
positive ratios: a benchmark nothing runs rots (bench.serve did once the distil stage came).
No timing is asserted: the figures only have to be real numbers."""

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fullstack_ml.stage import ROOT

GUARD_S = 900  # against a hung run, not a speed check
# bench.serve and bench.predict load the server with wrk, a Debian package (.ci/run installs it)
WRK = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk not found on PATH (apt-get install wrk; .ci/run does)"
)


def start(name: str, out: Path) -> subprocess.Popen:
    """`python -m bench.<name> --smoke` from the repo root, its output to `out`.{out,err}."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "BENTOML_DO_NOT_TRACK": "true"}
    with out.with_suffix(".out").open("w") as stdout, out.with_suffix(".err").open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", f"bench.{name}", "--smoke"],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=err,
            text=True,
        )


def finish(name: str, proc: subprocess.Popen, out: Path) -> str:
    """The smoke's stdout once it has exited; fails on a non-zero exit."""
    try:
        proc.wait(timeout=GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    err = out.with_suffix(".err").read_text()
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}:\n{err[-4000:]}"
    return out.with_suffix(".out").read_text()


def smoke(name: str, tmp: Path) -> str:
    """stdout of `python -m bench.<name> --smoke`; fails on a non-zero exit."""
    return finish(name, start(name, tmp / name), tmp / name)


@pytest.fixture(scope="module", autouse=True)
def background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """bench.serve's, bench.predict's and bench.images' smokes (the longest, much of them
    building models, starting servers and waiting) started with the module, where their
    tests are selected, so that they run beside the other smokes: name -> (process, output
    path)."""
    tests = {
        "serve": test_serve_smoke_measures_bentoml_against_fastapi_and_the_model_in_process,
        "predict": test_predict_smoke_compares_batch_scoring_with_the_floor_and_the_service,
        "images": test_images_smoke_measures_each_path_against_its_baseline,
    }
    selected = {i.name for i in request.session.items}
    started = {}
    for name, test in tests.items():
        if test.__name__ in selected and shutil.which("wrk"):
            out = tmp_path_factory.mktemp("bench") / name
            started[name] = (start(name, out), out)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
def test_pipeline_smoke_times_each_stage_against_its_own_work(tmp_path: Path) -> None:
    out = smoke("pipeline", tmp_path)
    (rows,) = tables(out)
    assert [r["stage"] for r in rows] == ["dvc", "ingest", "profile", "total"]
    assert ratio(rows[0]["wall s"]) and rows[0]["work s"] == "-"  # DVC's start: no work
    for r in rows[1:]:
        assert ratio(r["wall s"]) and ratio(r["work s"]) and ratio(r["ratio"])
    assert "no-op dvc repro" in out and "(nothing rerun)" in out


@pytest.mark.slow
def test_ingest_smoke_compares_every_path_with_the_pyarrow_floor(tmp_path: Path) -> None:
    runs = tables(smoke("ingest", tmp_path))[0]
    assert [r["path"] for r in runs] == ["floor", "pandas"]
    assert all(r["rows"] == "2,000" for r in runs)
    assert [ratio(r["time / floor"]) for r in runs][0] == 1.0


@pytest.mark.slow
def test_train_smoke_compares_ray_train_with_a_plain_loop(tmp_path: Path) -> None:
    runs = tables(smoke("train", tmp_path))[0]
    assert [r["run"] for r in runs] == ["torch, 1 thread", "Ray Train, local mode"]
    assert [ratio(r["epoch / torch 1 thread"]) for r in runs][0] == 1.0


@pytest.mark.slow
def test_compress_smoke_measures_each_pipeline_against_fp32(tmp_path: Path) -> None:
    lines = smoke("compress", tmp_path).splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["name"])
    end = next(i for i, line in enumerate(lines) if line.startswith("selected:"))
    rows = {line.split()[0]: line.split()[1:] for line in lines[head + 1 : end]}
    assert set(rows) == {"fp32", "int8_static", "distil_int8", "structured_int8", "woq_int4"}
    for name, cells in rows.items():
        assert len(cells) == 6, name  # size, score, batch 1 and 16 eager and best
        assert all(ratio(c) for c in cells), name
    assert lines[end].startswith("selected: int8_static")


@pytest.mark.slow
def test_gates_smoke_passes_the_build_and_fails_each_planted_regression(tmp_path: Path) -> None:
    latency, accuracy, drift = tables(smoke("gates", tmp_path))
    runs = {r["build"]: r for r in latency}
    assert list(runs) == ["default build", "planted: adaptive batching"]
    assert runs["default build"]["failed"] == "0"
    assert runs["planted: adaptive batching"]["failed"] == "1"  # lone requests ~10x slower
    assert ratio(runs["default build"]["req/s (min)"])
    assert ratio(runs["planted: adaptive batching"]["+ms lower bound (max)"]) > 5
    data = {r["data"]: r for r in accuracy}
    assert list(data) == ["wine", "wine, planted broken layer"]
    # 54 rows cannot resolve a 1-point budget: shipped with a warning (compress.undecided)
    assert data["wine"]["failed"] == "0" and data["wine"]["verdicts"] == "unresolvable 1"
    assert data["wine, planted broken layer"]["failed"] == "1"
    unchanged, shifted = drift
    assert unchanged["runs"] == shifted["runs"] == "2"
    assert unchanged["any column drifted (Holm)"] == "0"
    assert shifted["any column drifted (Holm)"] == "2"


@pytest.mark.slow
@WRK
def test_serve_smoke_measures_bentoml_against_fastapi_and_the_model_in_process(
    background: dict[str, tuple[subprocess.Popen, Path]],
) -> None:  # the smoke was started by the `background` fixture
    results, ratios = tables(finish("serve", *background["serve"]))
    servers = {r["server"] for r in results}
    assert {"(a) bentoml", "(b) fastapi def", "(b) fastapi async def"} <= servers
    assert all(r["non-2xx"] == "0" and r["socket err"] == "0" for r in results if r["concurrency"])
    (row,) = ratios
    assert row["model"] == "default" and row["concurrency"] == "4"
    assert ratio(row["(a)/(b) req/s"]) and ratio(row["(a)/(c)"]) and ratio(row["p99 (a) ms"])


@pytest.mark.slow
@WRK
def test_predict_smoke_compares_batch_scoring_with_the_floor_and_the_service(
    background: dict[str, tuple[subprocess.Popen, Path]],
) -> None:  # the smoke was started by the `background` fixture
    out = finish("predict", *background["predict"])
    (mixed,) = tables(out)  # numbers, categories and missing values
    assert [r["rows"] for r in mixed] == ["20,000", "40,000"]
    for r in mixed:
        assert ratio(r["(a) records/s"]) and ratio(r["(a)/(b)"]) and ratio(r["(a)/(c)"])
        assert ratio(r["(a) loop s"]) and ratio(r["loop/(b)"])
        assert ratio(r["peak PSS GB"]) and r["rows accounted"] == "yes"
    assert "\nmixed: (b) floor" in out and "Targets, engine pandas: (a)/(b) >= 0.5" in out


@pytest.mark.slow
def test_runtime_smoke_compares_each_runtime_with_inductor_and_bentoml_with_its_floor(
    tmp_path: Path,
) -> None:
    latency, answers, serve = tables(smoke("runtime", tmp_path))
    assert [r["batch"] for r in latency] == ["1", "16", "64", "256"]
    for row in latency:
        ratio(row["onnxruntime/inductor"])
        ratio(row["openvino/inductor"])
    assert {r["runtime"]: r["label differences"] for r in answers} == dict.fromkeys(
        ("inductor", "onnxruntime", "openvino"), "0"
    )
    kernels = {r["runtime"]: r["kernels"] for r in answers}
    assert "QGemm" in kernels["onnxruntime"] and "FullyConnected:u8" in kernels["openvino"]
    assert "quantize_per_tensor" in kernels["inductor"]
    servers = {r["server"]: r for r in serve}
    assert list(servers) == ["BentoML hello world", "bento on onnxruntime"]
    for name, row in servers.items():
        ratio(row["ready/hello"])
        if name != "BentoML hello world":
            ratio(row["killed worker back s"])


@pytest.mark.slow
@WRK
def test_images_smoke_measures_each_path_against_its_baseline(
    background: dict[str, tuple[subprocess.Popen, Path]],
) -> None:  # the smoke was started by the `background` fixture (one build, two servers)
    out = finish("images", *background["images"])
    ingest, memory, train, serve, predict, accuracy, int8 = tables(out)
    assert [(r["images"], r["run"]) for r in ingest] == [("300", "floor"), ("300", "stages")]
    assert [ratio(r["ingest / floor"]) for r in ingest][0] == 1.0
    assert ratio(ingest[1]["ingest+profile / floor"]) and ratio(ingest[1]["profile s"])
    assert [r["images"] for r in memory] == ["150", "300"]
    assert all(ratio(r["RSS / fewest"]) and ratio(r["ingest RSS MiB"]) for r in memory)
    assert [r["run"] for r in train] == ["torch, 1 thread", "fit, local mode"]
    assert all(ratio(r["vs torch 1 thread"]) and ratio(r["images/s"]) for r in train)
    servers = {r["server"]: r for r in serve}
    assert list(servers) == ["(a) bentoml", "(b) fastapi def", "(b) fastapi async def"]
    assert all(r["non-2xx"] == "0" and r["socket err"] == "0" for r in serve)
    assert ratio(servers["(a) bentoml"]["(a) / best (b)"])
    (scored,) = predict
    assert ratio(scored["predict / http"]) and ratio(scored["images/s"])
    assert int(scored["predicted"]) + int(scored["rejected"]) == int(scored["images"])
    (digits,) = accuracy
    assert digits["data"] == "digits_images" and ratio(digits["test accuracy"])
    assert [r["model"].split()[0] for r in int8] == ["digits_images"]  # the smoke's one build
    for row in int8:  # eager only in the smoke: the compiled column is not measured
        assert ratio(row["INT8 / FP32 size"]) and ratio(row["b64 INT8 eager ms"])
        assert row["compiled INT8 / FP32 eager"] == "-"
    assert "FAILED" not in out and "\nTargets:\n" in out
