"""Shared fixtures: the real config, shrunk, and small curated splits in tmp_path."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from omegaconf import DictConfig
from servers import postgres_server, s3_server  # noqa: F401  one of each per session

from fullstack_ml.stage import ROOT, compose
from stages.ingest import ingest

if TYPE_CHECKING:
    from fullstack_ml.bento import Server

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

SMALL = ["train.epochs=3", "compress.latency_repeats=3"]  # train: local mode (the default)
# the report's extra pipelines and Inductor compiling: tests/test_compress.py, test_pipeline.py
SMALL += ["~compress.pipelines", "compress.compile=false"]
# the served outlier candidates only: PyOD's (measured, never served) are tests/test_outliers.py's
SMALL += ["outliers.candidates=[mahalanobis,max_softmax,energy]"]
# The session's model; with one worker (not local mode) 40 epochs at about 0.15 s each leave
# time to kill the worker mid-run (tests/test_train.py).
FP32_RUN = [*SMALL, "train.epochs=40", "train.early_stopping.patience=null"]


BASE_IMAGE: list[subprocess.Popen] = []  # the container base build started at collection
# `make test` runs two pytest-xdist workers (`-n 2`), one per half: these files, whose tests
# build in processes of their own (the benchmarks' smokes, `dvc` in temporary repos, a Ray
# cluster), and the rest, which share the session's one Ray, model, bento and server (built
# once: no test of the first half uses them; test_remote.py starts its own moto S3 server).
# Each half is mostly one process at a time, so the suite takes about as long as its longer
# half: the halves are balanced by CPU time. CPU seconds (2026-12-08; each worker in a
# cpuacct cgroup of its own, its processes included): test_bench.py 240, test_pipeline.py
# 168, test_cluster.py 53, test_remote.py 10; the rest about 360, test_pipeline_images.py's
# 69 included (its `dvc exp run` starts with its half: `early_runs`). When that file ran in
# the first half, the first half took 549 s of CPU against 318 s, and all 671 s of a quiet run.
OWN_PROCESSES = {"test_bench.py", "test_cluster.py", "test_pipeline.py", "test_remote.py"}


def half(nodeid: str) -> str:
    """The half of the suite (above) that runs the test `nodeid`."""
    own = nodeid.split("::")[0].rsplit("/", 1)[-1] in OWN_PROCESSES
    return "own-processes" if own else "session"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scheduler by scope, with two scopes: the halves above. (Its
    `--dist loadgroup` marks do nothing under pytest 9.2, whose node ids it cannot edit.)"""
    from xdist.scheduler import LoadScopeScheduling

    class Halves(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return half(nodeid)

    return Halves(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start `deploy/container.sh --base` (debootstrap of the container's base image, about
    a minute here, much of it network and disk) in the background when
    tests/test_container.py will run, so that it overlaps the tests before it (from the
    first worker only); the test's own build waits for it (a lock) and makes the base
    itself, reporting any failure, if this one failed. The container's tests run last (of
    their half): the `bento` fixture starts their image's build in the background too."""
    items.sort(key=lambda item: item.path.name == "test_container.py")  # stable: the rest kept
    wanted = any(item.path.name == "test_container.py" for item in items)
    wanted &= os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0"
    if wanted and shutil.which("podman") and shutil.which("runc") and os.geteuid() == 0:
        env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy/containers.conf")}
        cmd = ["bash", str(ROOT / "deploy/container.sh"), "--base"]
        out = subprocess.DEVNULL
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
        threading.Thread(target=proc.wait, daemon=True).start()  # reaped when done: no zombie
        BASE_IMAGE.append(proc)


def pytest_sessionfinish() -> None:
    for proc in BASE_IMAGE:  # not left running (debootstrap and all) if nothing waited for it
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may end meanwhile
                os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


@pytest.fixture(scope="session")
def images_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.Popen]]:
    """tests/test_pipeline_images.py's `dvc exp run` (a minute of one core, one process at a
    time), started in the background by `early_runs` with the first test of its half, so that
    it fills the cores that half's waits and the other half's end leave idle; its `repo`
    fixture waits for it."""
    from test_pipeline_images import start_run

    repo, proc = start_run(tmp_path_factory)
    yield repo, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


EARLY = {"test_pipeline_images.py": "images_run"}  # test file -> what early_runs starts


@pytest.fixture(autouse=True)
def early_runs(request: pytest.FixtureRequest) -> None:
    """Starts each of EARLY's runs with the first test of the half its file runs in (this
    worker's first test, under `-n 2`), where that file's tests are selected."""
    if not hasattr(request.session, "early_runs"):
        selected = {item.path.name for item in request.session.items}
        request.session.early_runs = {f: name for f, name in EARLY.items() if f in selected}  # type: ignore[attr-defined]
    for file, name in request.session.early_runs.items():  # type: ignore[attr-defined]
        if half(file) == half(request.node.nodeid):
            request.getfixturevalue(name)


@pytest.fixture(scope="session")
def cfg() -> DictConfig:
    """conf/ composed as DVC does, shrunk for tests."""
    return compose(SMALL)


@pytest.fixture(scope="session")
def curated(cfg: DictConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default data ingested once per session into a temporary folder."""
    out = tmp_path_factory.mktemp("curated")
    ingest(cfg.data, cfg.seed, out)
    return out


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for every test that runs Ray in this process (Ray Data ingest and
    profile, training on Ray Data or on a worker group): `ray_session.session()` joins it
    instead of starting its own (about 5 s a start here)."""
    import ray

    from fullstack_ml import ray_session

    started = ray_session.start()
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def in_repo_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="session")
def fp32_dir(cfg: DictConfig, curated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained once per session by the real train stage (Ray Train local mode)."""
    from stages.train import train

    out = tmp_path_factory.mktemp("models") / "fp32"
    history = train(compose(FP32_RUN), curated, out)
    assert len(history) == 40
    return out


@pytest.fixture(scope="session")
def bento(
    fp32_dir: Path, curated: Path, cfg: DictConfig, tmp_path_factory, request
) -> Iterator[Path]:
    """The session's model compressed and packaged into a bento file (own model store).
    Where tests/test_container.py's tests are selected, its image build (a minute, much of
    it podman's) starts here, in the background: those tests run last and wait for it."""
    import pandas as pd

    from fullstack_ml.model import encode_split, load_fp32
    from fullstack_ml.runtime.drift import profile_frame
    from stages.compress import compress

    work = tmp_path_factory.mktemp("service")
    _, meta = load_fp32(fp32_dir)
    frames = {s: pd.read_parquet(curated / f"{s}.parquet") for s in ("train", "val", "test")}
    train, val, test = frames.values()
    val_x, _ = encode_split(val, meta)
    outliers = (frames, cfg.outliers)
    test_xy = encode_split(test, meta)
    result = compress(fp32_dir, val_x, test_xy, cfg.compress, work / "int8", outliers=outliers)
    (work / "train.bin").write_bytes(profile_frame(train).serialize())
    (work / "serving.json").write_text(json.dumps(result["serving"]))
    (work / "schema.json").write_bytes((curated / "schema.json").read_bytes())
    package_bento(work, work / "dist")
    path = work / "dist/fullstack_ml.bento"
    build = None
    container = any(item.path.name == "test_container.py" for item in request.session.items)
    if container and shutil.which("podman") and shutil.which("runc"):
        from test_container import BUILD, start_build

        build = start_build(path, work / "container.log")
        request.config.stash[BUILD] = build, work / "container.log"
    yield path
    if build is not None and build.poll() is None:  # not waited for (the session failed)
        with contextlib.suppress(ProcessLookupError):  # it may end meanwhile
            os.killpg(build.pid, signal.SIGTERM)
        build.wait()


@pytest.fixture(scope="session")
def server(bento: Path) -> Iterator["Server"]:
    """The session's bento served once, without a token, for every test that needs its
    answers over HTTP (tests/test_service.py, tests/test_predict.py)."""
    from fullstack_ml.bento import serve_bento

    with serve_bento(bento, env={"FULLSTACK_ML_API_TOKEN": ""}) as served:
        yield served


def package_bento(work: Path, out: Path, *more: tuple[Path, dict[str, Path]]) -> list[dict]:
    """The package stage on the files the `bento` fixture made in `work`, in a process of
    its own with `work/store` as the BentoML store: `out` gets the bento. `more`: further
    builds in the same process, each (out, files replacing some of those). Returns the
    bentos' tags (bento.json), one per build."""
    files = {
        "model.pt2": work / "int8/model.pt2",
        "model.json": work / "int8/model.json",
        "schema.json": work / "schema.json",
        "reference_profile.bin": work / "train.bin",
        "serving.json": work / "serving.json",
        "model.onnx": work / "int8/model.onnx",
        "outliers.json": work / "int8/outliers.json",
    }
    builds = [(out, files)] + [(o, files | changed) for o, changed in more]
    script = "from pathlib import Path; from fullstack_ml.stage import compose;"
    script += "from stages.package import package;"
    for dest, used in builds:
        script += (
            f"package({ {k: str(v) for k, v in used.items()} }, {{'git_commit': 'test'}},"
            f" compose([]).serve, Path({str(dest)!r}));"
        )
    env = {**os.environ, "BENTOML_HOME": str(work / "store")}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    return [json.loads((dest / "bento.json").read_text()) for dest, _ in builds]
