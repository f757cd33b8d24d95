"""The bento as an OCI image: `deploy/container.sh` (what `make container` runs) builds it with
podman, and the container answers POST /predict over HTTP as a non-root user."""

import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from fullstack_ml.bento import free_port
from fullstack_ml.stage import ROOT

pytestmark = pytest.mark.slow
IMAGE = "localhost/fullstack-ml:test"
UNUSABLE = 3  # deploy/container.sh: this machine cannot build or run containers
ENV = {"CONTAINERS_CONF": str(ROOT / "deploy/containers.conf"), **os.environ}  # as container.sh
TOKEN = "container-test-token"  # a throwaway; the service reads FULLSTACK_ML_API_TOKEN


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


# the build started by conftest's `bento` fixture as soon as the bento exists (this file's
# tests run last in their half, so that it overlaps the tests before them): process, log
BUILD = pytest.StashKey[tuple[subprocess.Popen, Path]]()


def start_build(bento: Path, log: Path) -> subprocess.Popen:
    """`deploy/container.sh IMAGE bento` in the background, stdout and stderr to `log`."""
    with log.open("w") as out:
        cmd = ["bash", str(ROOT / "deploy/container.sh"), IMAGE, str(bento)]
        return subprocess.Popen(
            cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="module")
def image(
    bento: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found on PATH (apt-get install podman runc debootstrap)")
    started = request.config.stash.get(BUILD, None)
    if started is None:
        log = tmp_path_factory.mktemp("container") / "build.log"
        started = start_build(bento, log), log
    proc, log = started
    proc.wait()
    output = log.read_text()
    if proc.returncode == UNUSABLE:
        pytest.skip(f"deploy/container.sh: {output.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"deploy/container.sh failed:\n{output[-6000:]}"
    return IMAGE


def log_errors(name: str) -> str:
    """The container log's error lines (the root cause is rarely in a traceback's tail)."""
    lines = podman("logs", name, check=False).stderr.splitlines()
    errors = [line for line in lines if "Error" in line and not line.startswith(" ")]
    return "\n".join(errors[-10:] or lines[-30:])


def wait_ready(name: str, url: str, restarts: int = 0) -> None:
    """Until the container has restarted `restarts` times and its server is ready."""
    for _ in range(180):  # bounded: one try a second while the server starts
        state = podman("inspect", "--format", "{{.State.Status}} {{.RestartCount}}", name)
        status, count = state.stdout.split()
        if int(count) > restarts or (restarts == 0 and status != "running"):
            pytest.fail(f"container {status}, restarted {count} times:\n{log_errors(name)}")
        try:
            if int(count) == restarts and requests.get(f"{url}/readyz", timeout=2).ok:
                return
        except requests.RequestException:  # not listening yet
            pass
        time.sleep(1)
    pytest.fail(f"never ready:\n{log_errors(name)}")


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, str]]:
    """The image run detached on a free loopback port, with a bearer token set and the
    restart policy the README gives; removed after."""
    name, port = f"fullstack-ml-test-{uuid.uuid4().hex[:8]}", free_port()
    podman("run", "-d", "--name", name, "--restart", "on-failure", "-p", f"127.0.0.1:{port}:3000",
           "-e", f"FULLSTACK_ML_API_TOKEN={TOKEN}", image)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(name, url)
        yield name, url
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


def test_runs_as_non_root(image: str, container: tuple[str, str]) -> None:
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert user not in ("", "root", "0")
    assert podman("exec", container[0], "id", "-u").stdout.strip() != "0"


def test_an_image_on_onnxruntime_holds_no_torch_and_no_compiler(
    container: tuple[str, str],
) -> None:
    """The session's bento serves on onnxruntime: its image installs no torch and, off
    BentoML's Debian template, no build-essential (README: "A slim image")."""
    probe = (
        "import importlib.util as u; print([m for m in ('torch', 'onnxruntime') if u.find_spec(m)])"
    )
    found = podman("exec", container[0], "python", "-c", probe).stdout.strip()
    assert found == "['onnxruntime']"
    compilers = podman("exec", container[0], "sh", "-c", "command -v cc gcc g++", check=False)
    assert compilers.returncode != 0 and compilers.stdout.strip() == ""


def test_predict_one_label_per_record(bento: Path, container: tuple[str, str]) -> None:
    with tarfile.open(bento) as tar:
        files = {os.path.normpath(m.name): m for m in tar.getmembers()}
        info = yaml.safe_load(tar.extractfile(files["bento.yaml"]))
        name, version = info["services"][0]["models"][0]["tag"].split(":")
        schema = json.load(tar.extractfile(files[f"models/{name}/{version}/schema.json"]))
    features = [f["name"] for f in schema["features"]]
    body = {"records": [{f: float(i) for f in features} for i in range(3)]}
    url = f"{container[1]}/predict"
    assert requests.post(url, json=body, timeout=60).status_code == 401  # the token got in
    reply = requests.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()) == len(body["records"])
    assert all(p["label"] in schema["classes"] for p in reply.json())


def test_a_killed_worker_is_brought_back_by_the_restart_policy(
    container: tuple[str, str],
) -> None:
    """In a container BentoML does not respawn a dead worker (BENTOML_CONTAINERIZED): the
    server exits 1 and the restart policy (`--restart on-failure`, as the README runs it)
    starts it again (the container's last test)."""
    name, url = container
    top = podman("top", name, "pid", "args").stdout.splitlines()
    worker = next(line.split()[0] for line in top if "_bentoml_impl.worker.service" in line)
    podman("exec", name, "sh", "-c", f"kill -9 {worker}")
    wait_ready(name, url, restarts=1)
    body = {"records": [{}]}  # a 400 naming every missing feature: the service answers again
    reply = requests.post(
        f"{url}/predict", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    )
    assert reply.status_code == 400 and reply.json()["detail"][0]["type"] == "missing"
