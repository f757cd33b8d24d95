"""End to end: `dvc exp run` in a temporary git repo, then the bento served over HTTP."""

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests

from stages.common import ROOT
from stages.validate import serve_bento

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SHRUNK = ["train.epochs=6", "train.num_workers=2", "compress.latency_repeats=5"]
SHRUNK += ["serve.slo.duration_s=2", "serve.slo.p99_ms=60000", "serve.slo.min_rps=1"]  # see below


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("bentoml")
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "BENTOML_HOME": str(home)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, env: dict) -> Path:
    """A git repo holding the project's files (committed or not, as git would see them),
    with the pipeline run once through `dvc exp run` and shrunk overrides."""
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], ROOT, env).stdout.split()
    repo = tmp_path_factory.mktemp("repo")
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    sh(["git", "init", "-q"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo, env)
    sh(["dvc", "exp", "run", *[a for o in SHRUNK for a in ("-S", o)]], repo, env)
    return repo


def test_pipeline_outputs_metrics_and_experiments(repo: Path, env: dict) -> None:
    for out in [
        "data/curated/train.parquet",
        "reports/profile/train.bin",
        "reports/profile/report.html",
        "models/fp32/model.pt",
        "plots/confusion.csv",
        "models/compressed/model.pt2",
        "dist/bento.json",
    ]:
        assert (repo / out).is_file(), out
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    values = next(iter(metrics.values()))["data"]
    assert values["metrics/eval.json"]["data"]["accuracy"] > 0.85
    assert values["metrics/compress.json"]["data"]["size_ratio"] < 0.3
    # the release gate served the bento and checked every test answer; its latency SLOs are
    # relaxed here (a shared test machine), test_failed_stage... checks that a miss fails
    validate = values["metrics/validate.json"]["data"]
    assert validate["answers_checked"] == 270 and validate["error_rate"] == 0
    exps = sh(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "train.epochs" in exps or '"epochs": 6' in exps
    # nothing changed: nothing reruns
    again = sh(["dvc", "repro"], repo, env)
    assert "Running stage" not in again.stdout
    # a serve key only rebuilds the bento
    rerun = sh(
        [
            "dvc",
            "exp",
            "run",
            *[a for o in SHRUNK for a in ("-S", o)],
            "-S",
            "serve.max_latency_ms=50",
        ],
        repo,
        env,
    ).stdout
    assert "Running stage 'package'" in rerun and "Running stage 'validate'" in rerun
    assert "Running stage 'train'" not in rerun and "Running stage 'ingest'" not in rerun
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], repo, env).stdout)["data"]
    assert {"Loss per epoch", "Accuracy per epoch", "Confusion matrix (test split)"} <= set(plots)
    loss = json.dumps(plots["Loss per epoch"][0]["content"])
    assert loss.count('"val_loss"') >= 6  # one value per epoch


@pytest.mark.parametrize(
    ("stage", "override", "message", "kept"),
    [
        (
            "compress",
            "compress.max_accuracy_drop=-100",
            "compressed accuracy",
            "models/compressed/model.pt2",
        ),
        (
            "profile",
            "profile.constraints.feature_range=[0,8]",
            "profile.constraints failed on the train split",
            "reports/profile/train.bin",
        ),
        (
            "validate",
            "serve.slo.min_rps=1000000",
            "serve.slo: throughput",
            "metrics/validate.json",
        ),
    ],
)
def test_failed_stage_reports_one_line_and_keeps_outputs(
    repo: Path, env: dict, stage: str, override: str, message: str, kept: str
) -> None:
    before = (repo / kept).read_bytes()
    proc = sh([sys.executable, "-m", f"stages.{stage}", override], repo, env, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert (repo / kept).read_bytes() == before


def test_queued_sweep_runs_every_value(repo: Path, env: dict) -> None:
    sweep = ["-S", "experiment=smoke", "-S", "train.lr=0.002,0.02"]
    sh(["dvc", "exp", "run", "--queue", *sweep], repo, env)
    sh(["dvc", "queue", "start"], repo, env)
    for _ in range(600):  # a guard against a hung queue, not a speed check
        status = sh(["dvc", "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status
    exps = json.loads(sh(["dvc", "exp", "show", "--json"], repo, env).stdout)
    runs = {
        exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["lr"]: exp["revs"][0]
        for commit in exps
        for exp in commit.get("experiments") or []
    }
    assert {0.002, 0.02} <= set(runs)
    for lr in (0.002, 0.02):
        assert runs[lr]["data"]["metrics"]["metrics/eval.json"]["data"]["accuracy"] > 0.3


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[str]:
    """`bentoml serve` of the exported bento file, extracted, with an empty model store."""
    info = json.loads((repo / "dist/bento.json").read_text())
    with serve_bento(repo / "dist" / info["file"]) as server:
        yield server.url


def test_served_predictions_match_the_compressed_model(repo: Path, server: str) -> None:
    from stages.export import load_program
    from stages.model import encode_split, predict_logits

    test = pd.read_parquet(repo / "data/curated/test.parquet")
    features = [c for c in test.columns if c != "target"]
    records = test[features].head(20).to_dict("records")
    r = requests.post(f"{server}/predict", json={"records": records}, timeout=30)
    assert r.status_code == 200, r.text
    served = r.json()
    model = load_program(repo / "models/compressed/model.pt2")
    meta = json.loads((repo / "models/compressed/model.json").read_text())
    expected = predict_logits(model, encode_split(test.head(20), meta)[0]).argmax(1)
    assert [p["label"] for p in served] == expected.tolist()
    r = requests.post(f"{server}/predict_proba", json={"records": records}, timeout=30)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in r.json())
    meta = requests.get(f"{server}/metadata", timeout=10).json()
    assert meta["metrics"]["eval"]["accuracy"] > 0.85 and len(meta["git_commit"]) == 40
    assert requests.get(f"{server}/metrics", timeout=10).status_code == 200
