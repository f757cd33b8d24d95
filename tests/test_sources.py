"""Data sources read for real: files, globs, partitioned Parquet, S3 (moto), SQLite,
PostgreSQL and the synthetic generator, with their failure messages."""

import gzip
import sqlite3
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from servers import Postgres, S3Server, free_port, s3_env

from fullstack_ml.sources import SOURCES, Table, read_source
from fullstack_ml.stage import StageError, compose

FRAME = pd.DataFrame(
    {
        "id": [1, 2, 3, 4],
        "x": [0.5, np.nan, -1.25, 3.0],
        "color": ["red", "green", None, "blue"],
        "label": ["yes", "no", "yes", "no"],
    }
)


def file_cfg(path: Path | str, **extra: object) -> dict:
    return {"source": "file", "path": str(path), "format": "auto", **extra}


def write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


def fails(cfg: dict, *parts: str) -> str:
    """The StageError message of reading `cfg`, checked to be one line holding `parts`."""
    with pytest.raises(StageError) as err:
        read_source(cfg, 0)
    msg = str(err.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_file_reads_back_what_was_written(tmp_path: Path, suffix: str) -> None:
    path = write(FRAME, tmp_path / f"t{suffix}")
    table = read_source(file_cfg(path), 0)
    assert isinstance(table, Table) and table.name == str(path) and table.bad_rows == 0
    pd.testing.assert_frame_equal(table.frame, FRAME)
    assert table.frame["color"].dtype == object  # strings stay strings


def test_compressed_csv_and_explicit_format(tmp_path: Path) -> None:
    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress(FRAME.to_csv(index=False).encode()))
    pd.testing.assert_frame_equal(read_source(file_cfg(path), 0).frame, FRAME)
    odd = tmp_path / "t.data"
    odd.write_text(FRAME.to_csv(index=False))
    pd.testing.assert_frame_equal(read_source(file_cfg(odd, format="csv"), 0).frame, FRAME)


def test_glob_concatenates_files_in_name_order(tmp_path: Path) -> None:
    write(FRAME.iloc[2:], tmp_path / "b.csv")
    write(FRAME.iloc[:2], tmp_path / "a.csv")
    table = read_source(file_cfg(tmp_path / "*.csv"), 0)
    pd.testing.assert_frame_equal(table.frame, FRAME)
    # same columns in another order are aligned; other columns are an error naming the file
    write(FRAME.iloc[2:, ::-1], tmp_path / "b.csv")
    pd.testing.assert_frame_equal(read_source(file_cfg(tmp_path / "*.csv"), 0).frame, FRAME)
    write(FRAME.rename(columns={"x": "y"}), tmp_path / "c.csv")
    fails(file_cfg(tmp_path / "*.csv"), "c.csv: columns differ from", "a.csv", "'y'")
    fails(file_cfg(tmp_path / "*.tsv"), "no files match")


def test_partitioned_parquet_folder_gives_partition_columns(tmp_path: Path) -> None:
    frame = FRAME.assign(region=["eu", "us", "eu", "apac"], year=[2023, 2024, 2024, 2023])
    pq.write_to_dataset(
        pa.Table.from_pandas(frame, preserve_index=False),
        tmp_path / "sales",
        partition_cols=["region", "year"],
    )
    assert (tmp_path / "sales/region=eu/year=2024").is_dir()
    table = read_source(file_cfg(tmp_path / "sales"), 0)
    got = table.frame.sort_values("id").reset_index(drop=True)
    assert set(got.columns) == set(frame.columns) and got["region"].dtype == object
    pd.testing.assert_frame_equal(got[frame.columns], frame, check_dtype=False)


# -- bad input -------------------------------------------------------------------------------


def test_missing_empty_header_only_and_corrupt_files(tmp_path: Path) -> None:
    fails(file_cfg(tmp_path / "nope.csv"), "nope.csv: not found")
    (tmp_path / "empty.csv").write_text("")
    fails(file_cfg(tmp_path / "empty.csv"), "empty.csv: empty file")
    (tmp_path / "header.csv").write_text("a,b,label\n")
    fails(file_cfg(tmp_path / "header.csv"), "header.csv: no data rows")
    (tmp_path / "bad.parquet").write_bytes(np.random.default_rng(0).bytes(2000))
    fails(file_cfg(tmp_path / "bad.parquet"), "bad.parquet: cannot read as parquet")
    (tmp_path / "t.txt").write_text("a\n1\n")
    fails(file_cfg(tmp_path / "t.txt"), "t.txt: unknown format")
    fails(file_cfg(tmp_path / "t.txt", format="xlsx"), "unknown format 'xlsx'")
    fails({**file_cfg(tmp_path / "t.txt"), "bad_rows": "ignore"}, "data.bad_rows")


def test_csv_rows_with_wrong_field_counts_fail_or_drop(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,b,label\n1,2,x\n3,4\n5,6,y\n7,8,z,9\n10,11,w\n")
    fails(file_cfg(path), f"{path}: line 3: expected 3 fields, found 2", "bad_rows=drop")
    table = read_source(file_cfg(path, bad_rows="drop"), 0)
    assert table.bad_rows == 2
    expected = pd.DataFrame({"a": [1, 5, 10], "b": [2, 6, 11], "label": ["x", "y", "w"]})
    pd.testing.assert_frame_equal(table.frame, expected)


def test_jsonl_lines_that_are_not_objects_fail_or_drop(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1, "label": "x"}\n\n[1, 2]\n{"a": 2, "label": "y"}\n{"a": 3,\n')
    fails(file_cfg(path), f"{path}: line 3: not a JSON object")
    table = read_source(file_cfg(path, bad_rows="drop"), 0)
    assert table.bad_rows == 2
    pd.testing.assert_frame_equal(table.frame, pd.DataFrame({"a": [1, 2], "label": ["x", "y"]}))


def test_unknown_source_and_credentials_in_config_are_refused(tmp_path: Path) -> None:
    fails({"source": "excel"}, "data.source", "'excel'", *SOURCES)
    fails(file_cfg("s3://b/k.csv", storage_options={"secret": "s"}), "data.storage_options")
    fails(file_cfg("ftp://me:pw@host/k.csv"), "data.path: holds credentials")


# -- S3 (a moto server checking credentials) -------------------------------------------------


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The moto bucket holding t.csv and parts/{a,b}.parquet, credentials in the env only."""
    s3_env(monkeypatch, s3_server)
    s3 = boto3.client("s3")  # endpoint and keys from the environment too
    s3.put_object(Bucket=s3_server.bucket, Key="t.csv", Body=FRAME.to_csv(index=False).encode())
    for name, part in (("a", FRAME.iloc[:2]), ("b", FRAME.iloc[2:])):
        body = part.to_parquet(index=False)
        s3.put_object(Bucket=s3_server.bucket, Key=f"parts/{name}.parquet", Body=body)
    return s3_server


def test_s3_csv_and_parquet_glob_with_credentials_from_the_environment(
    bucket: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = read_source(file_cfg("s3://data/t.csv"), 0)
    assert table.name == "s3://data/t.csv"
    pd.testing.assert_frame_equal(table.frame, FRAME)
    for parts in ("s3://data/parts/*.parquet", "s3://data/parts"):  # a glob, a folder
        got = read_source(file_cfg(parts), 0).frame
        pd.testing.assert_frame_equal(got.sort_values("id", ignore_index=True), FRAME)
    # conf/data/s3.yaml: endpoint_url null means AWS_ENDPOINT_URL; set, it replaces it
    cfg = compose(["data=s3", "data.path=s3://data/t.csv"]).data
    pd.testing.assert_frame_equal(read_source(cfg, 0).frame, FRAME)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg.storage_options.client_kwargs.endpoint_url = bucket.endpoint
    pd.testing.assert_frame_equal(read_source(cfg, 0).frame, FRAME)


def test_s3_failures_name_the_url_and_the_problem(
    bucket: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    fails(file_cfg("s3://data/missing.csv"), "s3://data/missing.csv: not found")
    fails(file_cfg("s3://no-such-bucket/t.csv"), "s3://no-such-bucket/t.csv: bucket not found")
    s3_env(monkeypatch, bucket, AWS_SECRET_ACCESS_KEY="wrong")
    msg = fails(file_cfg("s3://data/t.csv"), "s3://data/t.csv: access denied", "AWS_ACCESS_KEY_ID")
    assert "wrong" not in msg
    s3_env(monkeypatch, bucket, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    fails(file_cfg("s3://data/t.csv"), "s3://data/t.csv: cannot reach")


# -- SQL -------------------------------------------------------------------------------------


def test_sqlite_table_query_and_failures(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        FRAME.to_sql("people", conn, index=False)
    url = f"sqlite:///{db}"
    table = read_source({"source": "sql", "url": url, "table": "people"}, 0)
    assert table.name == f"{url} table people"
    pd.testing.assert_frame_equal(table.frame, FRAME)
    query = "SELECT id, label FROM people WHERE x > 0 ORDER BY id"
    got = read_source({"source": "sql", "url": url, "query": query}, 0).frame
    pd.testing.assert_frame_equal(got, pd.DataFrame({"id": [1, 4], "label": ["yes", "no"]}))
    fails({"source": "sql", "url": url, "table": "nope"}, "table nope: table not found")
    fails({"source": "sql", "url": url, "query": "SELEC 1"}, "query: bad query", "syntax error")
    fails({"source": "sql", "url": url, "query": "SELECT * FROM people WHERE id < 0"}, "no data")
    fails({"source": "sql", "url": url}, "exactly one of data.table and data.query")
    fails({"source": "sql", "url": f"sqlite:///{tmp_path}/no.db", "table": "t"}, "not found")


def test_postgres_with_the_password_from_the_environment(
    postgres_server: Postgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg = postgres_server
    url = pg.url
    monkeypatch.setenv("PGPASSWORD", pg.password)
    table = read_source({"source": "sql", "url": url, "table": "people"}, 0)
    expected = pd.DataFrame(
        {"id": [1, 2, 3], "name": ["ann", "bob", "cy"], "score": [0.5, None, 2.25]}
    ).assign(label=["yes", "no", "yes"])
    pd.testing.assert_frame_equal(table.frame.sort_values("id", ignore_index=True), expected)
    query = "SELECT name, score FROM people WHERE label = 'yes' ORDER BY id"
    got = read_source({"source": "sql", "url": url, "query": query}, 0).frame
    pd.testing.assert_frame_equal(
        got, expected.loc[[0, 2], ["name", "score"]].reset_index(drop=True)
    )
    fails({"source": "sql", "url": url, "table": "nope"}, "table not found")
    fails({"source": "sql", "url": url, "query": "SELECT * FROM nope"}, "bad query", '"nope"')
    # the password stays out of params (and of messages)
    with_pw = url.replace(f"{pg.user}@", f"{pg.user}:{pg.password}@")
    msg = fails({"source": "sql", "url": with_pw, "table": "people"}, "data.url: holds a password")
    assert pg.password not in msg
    monkeypatch.setenv("PGPASSWORD", "wrong")
    fails({"source": "sql", "url": url, "table": "people"}, "authentication failed", "PGPASSWORD")
    closed = url.replace(f":{pg.port}/", f":{free_port()}/")
    fails({"source": "sql", "url": closed, "table": "people"}, "cannot reach the database")


# -- synthetic and bundled -------------------------------------------------------------------


def synthetic_cfg(target: str = "label", **params: object) -> dict:
    sizes = {"rows": 4000, "numeric": 6, "categorical": 3, "categories": 4, "classes": 3}
    return {"source": "synthetic", "target": target, "synthetic": {**sizes, **params}}


def test_synthetic_is_seeded_and_shaped_as_asked() -> None:
    cfg = synthetic_cfg(missing_rate=0.1, time=True, groups=7)
    a, b, c = read_source(cfg, 1), read_source(cfg, 1), read_source(cfg, 2)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert not a.frame.equals(c.frame)
    df = a.frame
    nums, cats = [f"num_{i}" for i in range(6)], [f"cat_{i}" for i in range(3)]
    assert list(df.columns) == ["timestamp", "group", *nums, *cats, "label"] and len(df) == 4000
    assert (df[nums].dtypes == np.float32).all() and (df[cats].dtypes == "object").all()
    assert set(df["cat_0"].dropna()) == {"v0", "v1", "v2", "v3"}
    assert 0.08 < df[nums + cats].isna().to_numpy().mean() < 0.12
    assert df["label"].notna().all() and set(df["label"]) == {0, 1, 2}
    assert df["label"].value_counts(normalize=True).min() > 0.15  # no class is rare
    assert df["timestamp"].is_monotonic_increasing and df["timestamp"].dtype == "datetime64[ns]"
    assert set(df["group"]) == set(range(7))


def test_synthetic_label_is_learnable_and_regression_variant() -> None:
    from sklearn.linear_model import LinearRegression, LogisticRegression

    def xy(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        x = pd.get_dummies(df.drop(columns="y"), dtype=float).to_numpy()
        return x, df["y"].to_numpy()

    x, y = xy(read_source(synthetic_cfg("y", classes=4), 0).frame)
    acc = LogisticRegression(max_iter=500).fit(x[:3000], y[:3000]).score(x[3000:], y[3000:])
    assert acc > 0.6  # chance is about 0.25
    frame = read_source(synthetic_cfg("y", classes=0), 0).frame
    assert frame["y"].dtype == np.float64 and frame["y"].nunique() == 4000
    x, y = xy(frame)
    assert LinearRegression().fit(x[:3000], y[:3000]).score(x[3000:], y[3000:]) > 0.8


def test_synthetic_rejects_bad_sizes() -> None:
    fails(synthetic_cfg(rows=0), "data.synthetic.rows")
    fails(synthetic_cfg(classes=1), "data.synthetic.classes")
    fails(synthetic_cfg(missing_rate=1.5), "data.synthetic.missing_rate")
    fails(synthetic_cfg(numeric=0, categorical=0), "data.synthetic")
    fails(synthetic_cfg("num_0"), "data.target", "num_0")


def test_digits_and_every_example_config_composes() -> None:
    table = read_source({"source": "digits"}, 0)
    assert table.frame.shape == (1797, 65) and table.name.startswith("digits")
    for name in ("csv", "parquet", "jsonl", "s3", "sql", "synthetic"):
        data = compose([f"data={name}"]).data
        assert data.source in SOURCES and data.target == "label" and "split" in data, name
    data = compose(["data=synthetic", "data.synthetic.rows=300"]).data
    assert read_source(data, 0).frame.shape == (300, 21)
