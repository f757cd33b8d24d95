"""The train stage on a real two-node Ray cluster started with `ray start` on this machine."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fullstack_ml.model import encode_split, load_fp32, predict_logits
from fullstack_ml.stage import ROOT

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A head node and a second node, 2 CPUs each, sharing a token (Ray 2.60 `ray start`
    clusters require token authentication). Yields the address and the clients' env."""
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus=2", "--disable-usage-stats"]
    head = [RAY, "start", "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"]
    # Each `ray start` in a session of its own: its node's processes (GCS, raylet, agents,
    # workers) stay in that process group, killed as one at the end. (`ray stop --force`
    # kills every Ray on the machine and then waits ~6 s for orphans PID 1 reaps late.)
    groups: list[int] = []
    try:
        # started outside the repo. (On one machine, workers also find the project through
        # the driver's sys.path, which Ray passes on; other machines need the working_dir.)
        for cmd in ([*head, *common], [RAY, "start", f"--address={address}", *common]):
            pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
            proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, **pipe)
            groups.append(proc.pid)
            out = proc.communicate()[0]
            assert proc.returncode == 0, out[-2000:]
        yield address, env
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):  # none left in it
                os.killpg(group, signal.SIGKILL)


def test_train_stage_runs_one_worker_per_node(
    cluster: tuple[str, dict[str, str]], curated: Path, tmp_path: Path
) -> None:
    address, env = cluster
    work = tmp_path / "work"
    shutil.copytree(curated, work / "data/curated")
    for _ in range(100):  # the second node registers with the head within seconds
        status = subprocess.run(
            [RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True
        )
        if status.stdout.count("node_") >= 2:
            break
        time.sleep(0.5)
    overrides = [
        f"cluster.address={address}",
        f"cluster.runtime_env={{working_dir: {ROOT}}}",  # uploaded to the cluster by Ray
        "train.num_workers=2",
        "train.placement_strategy=SPREAD",
        "train.resources_per_worker={CPU: 1}",
        "train.epochs=5",
        "train.precision=bf16",  # autocast on CPU too; the weights stay FP32
    ]
    done = subprocess.run(
        [sys.executable, "-m", "stages.train", *overrides],
        cwd=work,
        env={**env, "PYTHONPATH": str(ROOT)},  # the driver's copy of the project
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model, meta = load_fp32(work / "models/fp32")
    assert meta["trained_on"] == {
        "workers": 2,
        "nodes": 2,
        "device": "CPU",
        "precision": "bf16",
        "restarts": 0,
    }
    # DVCLive's files, written by the rank-0 worker (an actor on one of the two nodes)
    assert json.loads((work / "dvclive/train/metrics.json").read_text())["step"] == 5
    curve = (work / "dvclive/train/plots/metrics/val_loss.tsv").read_text().splitlines()
    assert curve[0] == "step\tval_loss" and [r.split("\t")[0] for r in curve[1:]] == list("12345")
    x, y = encode_split(pd.read_parquet(work / "data/curated/test.parquet"), meta)
    assert (predict_logits(model, x).argmax(1) == y).mean() > 0.9
