"""Sharing artifacts: real `dvc push` / `dvc pull` in a temporary git repo, to the project's
default local remote (moved to a temporary folder) and to an S3 remote on a moto server."""

import os
import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest
from servers import S3Server
from test_pipeline import BIN, sh

from fullstack_ml.stage import ROOT

pytestmark = pytest.mark.slow
OUTPUTS = ["artifact.bin", "shared/a.txt", "shared/sub/b.bin"]
TARGETS = ["artifact.bin", "shared"]  # the repo's pipeline outputs are not in this cache


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repo holding the project's files (committed or not, as git would see them)
    and two DVC-tracked outputs: a file and a folder."""
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], ROOT, os.environ).stdout
    repo = tmp_path / "repo"
    for name in files.split():
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    rng = np.random.default_rng(0)
    for name in OUTPUTS:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(rng.bytes(50_000))
    return repo


@pytest.fixture
def env() -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def track(repo: Path, env: dict) -> dict[str, bytes]:
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "add", "-q", *TARGETS], repo, env)
    return {name: (repo / name).read_bytes() for name in OUTPUTS}


def forget_and_pull(repo: Path, env: dict, remote: list[str], expected: dict[str, bytes]) -> None:
    """Delete the cache and the outputs, `dvc pull` them, and compare the bytes."""
    shutil.rmtree(repo / ".dvc/cache")
    (repo / "artifact.bin").unlink()
    shutil.rmtree(repo / "shared")
    pulled = sh(["dvc", "pull", *remote, *TARGETS], repo, env)
    for name, data in expected.items():
        assert (repo / name).read_bytes() == data, f"{name} differs after pull:\n{pulled.stdout}"


def test_push_and_pull_through_the_default_local_remote(
    repo: Path, env: dict, tmp_path: Path
) -> None:
    assert sh(["dvc", "remote", "default"], repo, env).stdout.strip() == "local"
    url = sh(["dvc", "config", "remote.local.url"], repo, env).stdout.strip()
    assert url == str(repo.parent / "fullstack-ml-dvc-storage")  # a sibling of the checkout
    expected = track(repo, env)
    storage = tmp_path / "storage"
    sh(["dvc", "remote", "modify", "--local", "local", "url", str(storage)], repo, env)
    pushed = sh(["dvc", "push", *TARGETS], repo, env).stdout
    assert "pushed" in pushed and (storage / "files/md5").is_dir()
    forget_and_pull(repo, env, [], expected)


def test_push_and_pull_through_an_s3_remote(
    repo: Path,
    env: dict,
    s3_server: S3Server,
) -> None:
    expected = track(repo, env)
    url = f"s3://{s3_server.bucket}/dvc-store"
    sh(["dvc", "remote", "add", "s3", url], repo, env)
    sh(["dvc", "remote", "modify", "s3", "endpointurl", s3_server.endpoint], repo, env)
    assert s3_server.secret not in (repo / ".dvc/config").read_text()
    creds = {"AWS_ACCESS_KEY_ID": s3_server.key_id, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    env = {**env, **creds, "AWS_DEFAULT_REGION": "us-east-1"}
    sh(["dvc", "push", "-r", "s3", *TARGETS], repo, env)
    keys = {"aws_access_key_id": s3_server.key_id, "aws_secret_access_key": s3_server.secret}
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1", **keys)
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket)["Contents"]]
    assert sum(k.startswith("dvc-store/files/md5/") for k in stored) >= len(OUTPUTS)
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    denied = sh(["dvc", "push", "-r", "s3", *TARGETS], repo, wrong, check=False)
    assert denied.returncode != 0
    forget_and_pull(repo, env, ["-r", "s3"], expected)
