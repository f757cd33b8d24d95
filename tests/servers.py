"""Real servers on loopback for the data-source and DVC-remote tests.

tests/conftest.py imports the fixtures, so a session starts one of each, whichever modules
use them (pytest puts tests/ on sys.path). `s3_server` is a moto S3 server that checks
credentials; `postgres_server` is a PostgreSQL cluster in a temporary folder, run as an
unprivileged user.
"""

import contextlib
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str) -> None:
    for _ in range(300):  # a guard against a server that never starts, not a speed check
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not listen on port {port}")


class S3Server(NamedTuple):
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # an existing bucket the credentials may read and write
    key_id: str  # AWS_ACCESS_KEY_ID of an IAM user allowed s3:*
    secret: str  # its AWS_SECRET_ACCESS_KEY


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on a free loopback port that checks signatures and IAM policies.

    moto accepts any credentials until authentication is switched on: the server starts
    open, an IAM user with an s3:* policy and a bucket are created, then a POST to
    /moto-api/reset-auth with 0 (the INITIAL_NO_AUTH_ACTION_COUNT setting) makes every
    later request need that user's keys.
    """
    import boto3
    import requests

    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        anyone = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1", **anyone}
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="tester")
        key = iam.create_access_key(UserName="tester")["AccessKey"]
        policy = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        iam.put_user_policy(
            UserName="tester",
            PolicyName="s3-all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
        )
        boto3.client("s3", **kw).create_bucket(Bucket="data")
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        yield S3Server(endpoint, "data", key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def s3_env(monkeypatch: pytest.MonkeyPatch, server: S3Server, **change: str) -> None:
    """Credentials and endpoint for `server` in the environment only (AWS_* variables)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": server.key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        **change,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries: on PATH or Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = [Path(p).parent.parent.name for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    versions.sort(key=lambda v: int(v) if v.isdigit() else 0)
    return Path(f"/usr/lib/postgresql/{versions[-1]}/bin") if versions else None


class Postgres(NamedTuple):
    host: str  # 127.0.0.1
    port: int
    user: str  # a login role with a password (scram-sha-256 over TCP)
    password: str
    database: str  # holds table `people` (id, name, score, label)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL, without the password (PGPASSWORD carries it)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{self.database}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """A real PostgreSQL server listening on 127.0.0.1 only, stopped at teardown.

    PostgreSQL refuses to run as root, so as root (here and in CI) initdb and pg_ctl run
    as the `postgres` system user (or `nobody`) through runuser, in a folder it owns.
    """
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    import psycopg

    work = Path(tempfile.mkdtemp(prefix="pg-test-"))  # not under pytest's root-only tmp
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        prefix = ["runuser", "-u", user, "--"]
        entry = pwd.getpwnam(user)
        os.chown(work, entry.pw_uid, entry.pw_gid)
    data, port = work / "data", free_port()

    def as_owner(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, cwd=work)
        if proc.returncode:
            pytest.fail(f"{' '.join(cmd[:2])} failed:\n{proc.stdout}\n{proc.stderr}")

    as_owner(
        str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--no-sync",
        "--auth-local=trust", "--auth-host=scram-sha-256",
    )  # fmt: skip
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={work}"
    opts += " -c fsync=off"
    as_owner(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(work / "log"), "-w", "-t", "60",
             "-o", opts, "start")  # fmt: skip
    try:
        admin = {"host": str(work), "port": port, "user": "postgres"}
        with psycopg.connect(**admin, dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE ROLE reader LOGIN PASSWORD 'secret-pw'")
            conn.execute("CREATE DATABASE shop OWNER reader")
        with psycopg.connect(**admin, dbname="shop", autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE people (id integer, name text, score double precision, label text)"
            )
            conn.execute(
                "INSERT INTO people VALUES (1, 'ann', 0.5, 'yes'), (2, 'bob', NULL, 'no'),"
                " (3, 'cy', 2.25, 'yes')"
            )
            conn.execute("ALTER TABLE people OWNER TO reader")
        yield Postgres("127.0.0.1", port, "reader", "secret-pw", "shop")
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            cwd=work,
        )
        shutil.rmtree(work, ignore_errors=True)
