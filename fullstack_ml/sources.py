"""Data sources: the raw table named by `data.source` (or `predict.input.source`), read as is.

`read_source(cfg, seed)` returns a `Table`; the ingest stage types, checks and splits it, the
predict stage scores it.
Every failure is a StageError with one line naming the file, URL, table or key at fault.
Credentials never come from the config (params.yaml is committed): object storage reads
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS endpoint),
databases read their driver's variables (PGPASSWORD or ~/.pgpass for PostgreSQL).
"""

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from fullstack_ml.stage import StageError

SOURCES = ("digits", "file", "sql", "synthetic")
FORMATS = ("csv", "parquet", "jsonl")
SUFFIXES = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
CONNECT_TIMEOUT_S = 5
# s3fs defaults: fail in seconds on an unreachable endpoint, and never reuse a cached
# filesystem built with other credentials
S3_DEFAULTS = {
    "skip_instance_cache": True,
    "config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_S, "retries": {"max_attempts": 1}},
}
# fsspec/s3fs options that would put credentials in params.yaml: refused
SECRET_KEYS = {"key", "secret", "token", "password", "aws_access_key_id"} | {
    "aws_secret_access_key",
    "aws_session_token",
}
S3_ENV = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"


class Table(NamedTuple):
    frame: pd.DataFrame  # raw columns as read (strings stay strings)
    name: str  # the source for messages: path, URL or table/query, never credentials
    bad_rows: int  # rows dropped as unparseable under bad_rows=drop (0 otherwise)


def read_source(cfg: Mapping[str, Any], seed: int, key: str = "data") -> Table:
    """The raw table that the `data` config names.

    Args:
        cfg: the `data` config (DictConfig or dict); `source` picks the reader.
        seed: the run's seed (used by the synthetic source).
        key: where `cfg` is in params.yaml, for messages (`predict.input` reads new rows).
    """
    source = cfg.get("source")
    if source == "digits":
        return Table(load_digits_frame(), "digits (scikit-learn)", 0)
    if source == "file":
        return read_files(
            str(_required(cfg, "path", key)),
            cfg.get("format") or "auto",
            _plain(cfg.get("storage_options")) or {},
            _bad_rows(cfg, key),
            key,
        )
    if source == "sql":
        return read_sql(str(_required(cfg, "url", key)), cfg.get("table"), cfg.get("query"), key)
    if source == "synthetic":
        params = _plain(cfg.get("synthetic")) or {}
        frame = synthetic_frame(params, str(cfg.get("target") or "label"), seed)
        return Table(frame, f"synthetic ({len(frame)} rows, seed {seed})", 0)
    raise StageError(f"{key}.source: unknown source {source!r} ({' | '.join(SOURCES)})")


def _required(cfg: Mapping[str, Any], name: str, key: str) -> Any:
    value = cfg.get(name)
    if value in (None, ""):
        raise StageError(f"{key}.{name}: required for {key}.source={cfg.get('source')}")
    return value


def _plain(value: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _bad_rows(cfg: Mapping[str, Any], key: str) -> str:
    mode = cfg.get("bad_rows") or "fail"
    if mode not in ("fail", "drop"):
        raise StageError(f"{key}.bad_rows: {mode!r} is not fail | drop")
    return mode


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- bundled ---------------------------------------------------------------------------------


def load_digits_frame() -> pd.DataFrame:
    """The handwritten digits bundled with scikit-learn (no network needed)."""
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame


# -- files: local paths, globs, partitioned Parquet folders, fsspec URLs ----------------------


def read_files(
    path: str,
    fmt: str = "auto",
    storage_options: dict | None = None,
    bad_rows: str = "fail",
    key: str = "data",
) -> Table:
    """One file, a glob, a partitioned Parquet folder or an fsspec URL as one table.

    Args:
        path: a path or URL (s3://bucket/key.csv); may hold a glob (*.csv).
        fmt: csv | parquet | jsonl | auto (from the suffix; a folder means parquet).
        storage_options: fsspec options without credentials (e.g. client_kwargs.endpoint_url).
        bad_rows: fail | drop, for CSV and JSON-lines rows that cannot be parsed.
        key: the config's place in params.yaml, for messages.
    """

    if fmt not in (*FORMATS, "auto"):
        raise StageError(
            f"{path}: unknown format {fmt!r}; set {key}.format to csv | parquet | jsonl"
        )
    fs, root = open_url(path, storage_options or {}, key)
    remote = "://" in path and not path.startswith("file://")
    try:
        return _read_files(fs, root, path, fmt, bad_rows, key)
    except StageError:
        raise
    except Exception as err:
        raise StageError(f"{path}: {storage_problem(err, remote)}") from None


def open_url(path: str, storage_options: dict, key: str) -> tuple[Any, str]:
    """The fsspec filesystem of `path` (a local path or URL) and the path within it; URLs
    and options holding credentials are refused (`key`: the config's place, for messages)."""
    import fsspec

    parts = urlsplit(path)
    if parts.password or (parts.username and "://" in path):
        raise StageError(f"{key}.path: holds credentials; set them in the environment instead")
    options = _storage_options(path, storage_options, key)
    try:
        return fsspec.core.url_to_fs(path, **options)
    except (ImportError, ValueError) as err:
        raise StageError(f"{path}: cannot open this URL: {_first_line(err)}") from None


def _storage_options(path: str, user: dict, key: str) -> dict:
    """The user's fsspec options (nulls dropped) over our defaults; credentials are refused."""
    user = _without_nulls(user)
    found = SECRET_KEYS & {*user, *(user.get("client_kwargs") or {})}
    if found:
        raise StageError(
            f"{key}.storage_options: {sorted(found)} look like credentials; they belong in the "
            f"environment ({S3_ENV}), not in params.yaml"
        )
    if not path.startswith(("s3://", "s3a://")):
        return dict(user)
    config = {**S3_DEFAULTS["config_kwargs"], **(user.get("config_kwargs") or {})}
    return {**S3_DEFAULTS, **user, "config_kwargs": config}


def _without_nulls(options: dict) -> dict:
    return {
        k: _without_nulls(v) if isinstance(v, dict) else v
        for k, v in options.items()
        if v is not None
    }


def storage_problem(err: Exception, remote: bool) -> str:
    """One line for a filesystem or object-store failure."""
    kinds = {cls.__name__ for cls in type(err).__mro__}
    msg = _first_line(err)
    if "NoCredentialsError" in kinds:
        return f"no credentials: set {S3_ENV} in the environment"
    if isinstance(err, PermissionError):
        if remote:
            return f"access denied ({msg}); check {S3_ENV} and the bucket's policy"
        return f"permission denied ({msg})"
    if isinstance(err, FileNotFoundError):
        return "bucket not found" if "bucket" in msg.lower() else "not found"
    unreachable = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}
    unreachable |= {"ClientConnectorError", "ServerDisconnectedError", "ProxyConnectionError"}
    if unreachable & kinds or isinstance(err, ConnectionError | TimeoutError):
        return f"cannot reach the storage endpoint ({msg})"
    return f"cannot read: {msg}"


def _display(fs: Any, path: str) -> str:
    """A file's name for messages: relative to the working directory when local."""
    if _is_local(fs):
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else rel
    return fs.unstrip_protocol(path)


def _format_of(path: str, fmt: str, name: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    base = path.lower()
    for ext in COMPRESSIONS:
        base = base.removesuffix(ext)
    found = SUFFIXES.get(os.path.splitext(base)[1], "")
    if not found:
        raise StageError(
            f"{name}: unknown format (suffix); set {key}.format to csv | parquet | jsonl"
        )
    return found


def _list_files(fs: Any, root: str, name: str, fmt: str) -> dict[str, tuple[str, Any]] | None:
    """The files `root` names (shown name -> path, size), in name order; None for a folder
    (a partitioned Parquet dataset)."""
    if any(ch in root for ch in "*?["):
        found = fs.glob(root, detail=True)
        files = {
            _display(fs, path): (path, info.get("size"))
            for path, info in sorted(found.items())
            if info.get("type") != "directory"
        }
        if not files:
            raise StageError(f"{name}: no files match")
        return files
    if fs.isdir(root):
        if fmt not in ("auto", "parquet"):
            raise StageError(f"{name}: is a folder; only partitioned Parquet folders are read")
        return None
    return {name: (root, fs.info(root).get("size"))}  # FileNotFoundError when missing


def _same_columns(frame: pd.DataFrame, shown: str, first: tuple[str, list] | None) -> tuple:
    """`frame` with the first file's column order, and that first file; a file whose
    columns differ from the first's is a StageError naming both."""
    if first is None:
        return frame, (shown, list(frame.columns))
    if set(frame.columns) != set(first[1]):
        extra = sorted(set(frame.columns) - set(first[1]), key=str)
        missing = sorted(set(first[1]) - set(frame.columns), key=str)
        raise StageError(
            f"{shown}: columns differ from {first[0]} (extra {extra}, missing {missing})"
        )
    return frame[first[1]], first


def _read_files(fs: Any, root: str, name: str, fmt: str, bad_rows: str, key: str) -> Table:
    files = _list_files(fs, root, name, fmt)
    if files is None:
        frame = _parquet(fs, root, name)
        if frame.empty:
            raise StageError(f"{name}: no data rows")
        return Table(frame, name, 0)
    frames, first, bad = [], None, 0
    for shown, (path, size) in files.items():
        if size == 0:
            raise StageError(f"{shown}: empty file")
        kind = _format_of(path, fmt, shown, key)
        if kind == "parquet":
            frame, dropped = _parquet(fs, path, shown), 0
        elif kind == "csv":
            frame, dropped = _csv(fs, path, shown, bad_rows, key)
        else:
            frame, dropped = _jsonl(fs, path, shown, bad_rows, key)
        frame, first = _same_columns(frame, shown, first)
        frames.append(frame)
        bad += dropped
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if frame.empty:
        raise StageError(f"{name}: no data rows")
    return Table(frame, name, bad)


def iter_source(
    cfg: Mapping[str, Any], seed: int, key: str, text: Iterable[str] = ()
) -> tuple[str, Iterator[pd.DataFrame]]:
    """The source's rows in order, as frames of a bounded size: files stream (Parquet row
    groups, CSV blocks, JSON lines), so any file size fits in memory; other sources are read
    whole (`read_source`). Returns the source's name for messages and the frames.

    Args:
        text: columns a CSV file gives as text, whatever its first block holds (a text value
            in a later block of a number column would fail a streamed read); the caller types
            them.
    """
    if cfg.get("source") != "file":
        table = read_source(cfg, seed, key)
        return table.name, iter([table.frame])
    path = str(_required(cfg, "path", key))
    fmt, bad_rows = cfg.get("format") or "auto", _bad_rows(cfg, key)
    if fmt not in (*FORMATS, "auto"):
        raise StageError(
            f"{path}: unknown format {fmt!r}; set {key}.format to {' | '.join(FORMATS)}"
        )
    fs, root = open_url(path, _plain(cfg.get("storage_options")) or {}, key)
    remote = "://" in path and not path.startswith("file://")
    try:
        files = _list_files(fs, root, path, fmt)
    except StageError:
        raise
    except Exception as err:
        raise StageError(f"{path}: {storage_problem(err, remote)}") from None

    def frames() -> Iterator[pd.DataFrame]:
        try:
            yield from _stream_files(fs, root, files, path, fmt, bad_rows, key, set(text))
        except StageError:
            raise
        except Exception as err:
            raise StageError(f"{path}: {storage_problem(err, remote)}") from None

    return path, frames()


BLOCK_BYTES = 16 << 20  # CSV bytes parsed at a time when streaming (pyarrow's default: 1 MB)
JSON_LINES = 65_536  # JSON lines per frame when streaming
PARQUET_BATCH = 65_536  # Parquet rows per frame when streaming


def _stream_files(
    fs: Any,
    root: str,
    files: dict[str, tuple[str, Any]] | None,
    name: str,
    fmt: str,
    bad_rows: str,
    key: str,
    text: set[str],
) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.dataset as pds

    local = None if _is_local(fs) else fs
    if files is None:  # a partitioned Parquet folder; one batch read ahead, not 16
        dataset = pds.dataset(root, format="parquet", partitioning="hive", filesystem=local)
        for batch in dataset.to_batches(batch_readahead=1, fragment_readahead=1):
            yield _arrow_to_pandas(pa.Table.from_batches([batch]))
        return
    first = None
    for shown, (path, size) in files.items():
        if size == 0:
            raise StageError(f"{shown}: empty file")
        kind = _format_of(path, fmt, shown, key)
        if kind == "parquet":  # 5M rows in 1M-row groups: 0.66 GB peak (a dataset: 3.4 GB)
            batches = _parquet_batches(fs, path)
        elif kind == "csv":
            batches = _csv_blocks(fs, path, shown, bad_rows, key, text)
        else:
            batches = _jsonl_blocks(fs, path, shown, bad_rows, key)
        for batch in batches:
            frame = batch if isinstance(batch, pd.DataFrame) else _arrow_to_pandas(pa.table(batch))
            frame, first = _same_columns(frame, shown, first)
            yield frame


def _parquet_batches(fs: Any, path: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH)


def _csv_blocks(
    fs: Any, path: str, name: str, bad_rows: str, key: str, text: set[str]
) -> Iterator[Any]:
    """A CSV file's record batches, read a block at a time (`pyarrow.csv.open_csv`); rows
    with the wrong number of fields fail (naming the line) or are dropped, as in `_csv`."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    bad: list[Any] = []

    def skip(row: Any) -> str:
        bad.append(row)
        return "skip" if bad_rows == "drop" else "error"

    def reader(threads: bool) -> Any:
        with fs.open(path, "rb", compression="infer") as f:  # the header: which are `text`
            names = pcsv.open_csv(
                f,
                read_options=pcsv.ReadOptions(block_size=1 << 16),
                parse_options=pcsv.ParseOptions(
                    newlines_in_values=True, invalid_row_handler=lambda _: "skip"
                ),
            ).schema
        convert = pcsv.ConvertOptions(
            strings_can_be_null=True,
            column_types={c: pa.string() for c in names.names if c in text},
        )
        f = fs.open(path, "rb", compression="infer")
        try:  # open_csv parses the first block: a bad line there raises here
            return f, pcsv.open_csv(
                f,
                read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=threads),
                parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip),
                convert_options=convert,
            )
        except BaseException:
            f.close()
            raise

    try:
        f, batches = reader(True)
        with f:
            yield from batches
    except pa.ArrowInvalid as err:
        if bad and bad_rows == "fail":
            bad.clear()  # again in one thread, which knows the line's number
            with contextlib.suppress(pa.ArrowInvalid):  # raised at the line, once it is seen
                f, batches = reader(False)
                with f:
                    for _ in batches:
                        pass
            raise (_bad_line(name, bad[0], key) if bad else _unparsed(name, err)) from None
        raise _unparsed(name, err) from None
    except (pa.ArrowException, UnicodeDecodeError) as err:
        raise _unparsed(name, err) from None


def _jsonl_blocks(
    fs: Any,
    path: str,
    name: str,
    bad_rows: str,
    key: str,
    lines: int | None = JSON_LINES,
    dropped: list[int] | None = None,
) -> Iterator[pd.DataFrame]:
    """A JSON-lines file as frames of `lines` objects (None: one frame); blank lines are
    skipped, other lines that are not an object fail or are dropped (counted in `dropped`)."""
    records = []
    try:
        with fs.open(path, "rt", compression="infer", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                elif bad_rows == "drop":
                    if dropped is not None:
                        dropped[0] += 1
                else:
                    raise StageError(
                        f"{name}: line {number}: not a JSON object "
                        f"({key}.bad_rows=drop skips such lines)"
                    )
                if len(records) == lines:
                    yield pd.DataFrame.from_records(records)
                    records = []
    except UnicodeDecodeError:
        raise StageError(f"{name}: cannot read as jsonl: not UTF-8 text") from None
    if records:
        yield pd.DataFrame.from_records(records)


def _is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return "file" in protocols


def _arrow_to_pandas(table: Any) -> pd.DataFrame:
    """Dictionary columns (Parquet partition keys, categoricals) decoded to plain values."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            plain = table.column(i).cast(field.type.value_type)
            table = table.set_column(i, field.name, plain)
    frame = table.to_pandas(date_as_object=False)
    if isinstance(frame.index, pd.RangeIndex):  # a new index: `reset_index` copies the data
        frame.index = pd.RangeIndex(len(frame))
        return frame
    return frame.reset_index()


def _parquet(fs: Any, path: str, name: str) -> pd.DataFrame:
    """A Parquet file, or a folder of them with hive-style `key=value/` partitions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, filesystem=None if _is_local(fs) else fs)
    except (pa.ArrowException, ValueError) as err:
        raise StageError(f"{name}: cannot read as parquet: {_first_line(err)}") from None
    return _arrow_to_pandas(table)


def _csv(fs: Any, path: str, name: str, bad_rows: str, key: str) -> tuple[pd.DataFrame, int]:
    """A CSV file with its header; rows with the wrong number of fields fail or are dropped."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    def read(threads: bool, handler: Any) -> Any:
        parse = pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=handler)
        opts = {
            "read_options": pcsv.ReadOptions(use_threads=threads),
            "parse_options": parse,
            "convert_options": pcsv.ConvertOptions(strings_can_be_null=True),
        }
        if _is_local(fs):
            return pcsv.read_csv(path, **opts)
        with fs.open(path, "rb", compression="infer") as f:
            return pcsv.read_csv(f, **opts)

    bad: list[Any] = []

    def skip(row: Any) -> str:
        bad.append(row)
        return "skip" if bad_rows == "drop" else "error"

    try:
        try:
            table = read(True, skip)
        except pa.ArrowInvalid:
            if bad_rows == "drop" or not bad:
                raise
            bad.clear()
            read(False, skip)  # again in one thread, which knows the row's line number
            raise
    except pa.ArrowInvalid as err:
        if bad and bad_rows == "fail":
            raise _bad_line(name, bad[0], key) from None
        raise _unparsed(name, err) from None
    except (pa.ArrowException, UnicodeDecodeError) as err:
        raise _unparsed(name, err) from None
    return _arrow_to_pandas(table), len(bad)


def _bad_line(name: str, row: Any, key: str) -> StageError:
    """A CSV line with the wrong number of fields (pyarrow's InvalidRow), without its text."""
    return StageError(
        f"{name}: line {row.number}: expected {row.expected_columns} fields, found "
        f"{row.actual_columns} ({key}.bad_rows=drop skips such rows)"
    )


def _unparsed(name: str, err: BaseException) -> StageError:
    return StageError(f"{name}: cannot read as csv: {_first_line(err)}")


def _jsonl(fs: Any, path: str, name: str, bad_rows: str, key: str) -> tuple[pd.DataFrame, int]:
    """JSON lines: one object per line; blank lines are skipped, other lines fail or drop."""
    dropped = [0]
    frames = list(_jsonl_blocks(fs, path, name, bad_rows, key, None, dropped))
    return (frames[0] if frames else pd.DataFrame()), dropped[0]


# -- SQL databases through SQLAlchemy ---------------------------------------------------------


def read_sql(
    url: str, table: str | None = None, query: str | None = None, key: str = "data"
) -> Table:
    """A table or a query's result from the database at a SQLAlchemy `url`.

    Args:
        url: e.g. postgresql+psycopg://user@host:5432/db or sqlite:///path.db; without the
            password, which the driver reads from the environment (PGPASSWORD, ~/.pgpass).
        table: a table name, optionally schema-qualified (schema.table).
        query: a SELECT statement; exactly one of table and query.
    """
    import sqlalchemy as sa

    parsed = sql_url(url, key)
    shown = parsed.render_as_string(hide_password=True)
    if (table is None) == (query is None):
        raise StageError(f"{shown}: set exactly one of {key}.table and {key}.query")
    name = f"{shown} table {table}" if table else f"{shown} query"
    engine = sql_engine(parsed, name, must_exist=True)
    try:
        with engine.connect() as conn:
            if table:
                schema, _, bare = table.rpartition(".")
                try:
                    tbl = sa.Table(bare, sa.MetaData(), schema=schema or None, autoload_with=conn)
                except sa.exc.NoSuchTableError:
                    raise StageError(f"{name}: table not found") from None
                frame = pd.read_sql(sa.select(tbl), conn)
            else:
                frame = pd.read_sql(sa.text(query), conn)
    except StageError:
        raise
    except sa.exc.DBAPIError as err:
        raise StageError(f"{name}: {db_problem(err, parsed)}") from None
    except sa.exc.SQLAlchemyError as err:
        raise StageError(f"{name}: {_first_line(err)}") from None
    finally:
        engine.dispose()
    if frame.empty:
        raise StageError(f"{name}: no data rows")
    return Table(frame, name, 0)


def sql_url(url: str, key: str) -> Any:
    """`url` parsed by SQLAlchemy; one holding a password is refused (`key`: its config key)."""
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        raise StageError(
            f"{key}.url: not a SQLAlchemy URL (dialect+driver://user@host/db)"
        ) from None
    if parsed.password:
        raise StageError(
            f"{key}.url: holds a password; remove it and set it in the environment "
            "(PGPASSWORD for PostgreSQL)"
        )
    return parsed


def sql_engine(parsed: Any, name: str, must_exist: bool) -> Any:
    """An engine for the parsed URL (no pool; a 5 s connect timeout where the driver takes
    one); `must_exist`: a SQLite file that is not there is a StageError naming `name`."""
    import sqlalchemy as sa

    backend = parsed.get_backend_name()
    local_db = backend == "sqlite" and parsed.database not in (None, "", ":memory:")
    if must_exist and local_db and not os.path.isfile(parsed.database):
        raise StageError(f"{name}: database file {parsed.database} not found")
    connect_args = {}
    if backend in ("postgresql", "mysql", "mariadb") and "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        return sa.create_engine(parsed, poolclass=sa.pool.NullPool, connect_args=connect_args)
    except Exception as err:  # a missing driver module, an unknown dialect
        raise StageError(f"{name}: cannot use this URL: {_first_line(err)}") from None


def db_problem(err: Any, url: Any) -> str:
    """One line for a database failure: unreachable, authentication, or a bad query."""
    msg = _first_line(err.orig) if err.orig is not None else _first_line(err)
    low = msg.lower()
    if "password authentication failed" in low or "authentication failed" in low:
        return f"authentication failed for user {url.username!r} (check PGPASSWORD or ~/.pgpass)"
    if "no password supplied" in low:
        return f"authentication failed: no password for user {url.username!r} (set PGPASSWORD)"
    if "does not exist" in low and "database" in low:
        return f"database {url.database!r} not found"
    unreachable = ("connection refused", "timeout expired", "could not connect", "timed out")
    unreachable += ("could not translate host name", "no route to host", "network is unreach")
    if any(s in low for s in unreachable):
        return f"cannot reach the database server ({msg})"
    if "unable to open database file" in low:
        return f"cannot open the database ({msg})"
    return f"bad query: {msg}"


# -- synthetic --------------------------------------------------------------------------------


def synthetic_frame(params: Mapping[str, Any], target: str, seed: int) -> pd.DataFrame:
    """A seeded table whose target is learnable from its features.

    Numeric features are standard normal (float32); each categorical feature takes
    `categories` string values. Class scores are a random linear function of the numeric
    features plus a random offset per category value, with Gumbel noise; the label is
    their argmax (`classes` > 1), or the first score plus Gaussian noise (`classes` 0:
    a regression target). Values are then set missing at `missing_rate`. Optional
    `time` adds an increasing `timestamp` column and `groups` an integer `group` column.
    Everything is vectorised: millions of rows take seconds.

    Args:
        params: `data.synthetic`: rows, numeric, categorical, categories, classes,
            missing_rate, time, groups.
        target: the target column's name.
        seed: the generator's seed.
    """
    rows = _int(params, "rows", 1000, 1)
    numeric = _int(params, "numeric", 10, 0)
    categorical = _int(params, "categorical", 0, 0)
    categories = _int(params, "categories", 5, 1)
    classes = _int(params, "classes", 2, 0)
    groups = _int(params, "groups", 0, 0)
    missing = float(params.get("missing_rate") or 0.0)
    if numeric + categorical == 0:
        raise StageError("data.synthetic: set numeric or categorical to at least 1")
    if classes == 1:
        raise StageError("data.synthetic.classes: 1 is not a task; use 0 (regression) or >= 2")
    if not 0 <= missing < 1:
        raise StageError(f"data.synthetic.missing_rate: {missing} is not in [0, 1)")
    rng = np.random.default_rng(seed)
    scores_n = max(classes, 1)
    x = rng.standard_normal((numeric, rows), dtype=np.float32)  # one feature per row of x
    weights = rng.standard_normal((numeric, scores_n))
    weights *= 2.0 / np.maximum(np.linalg.norm(weights, axis=0), 1e-9)  # balanced classes
    scores = x.T @ weights.astype(np.float32)
    values = np.array([f"v{k}" for k in range(categories)], dtype=object)
    cats = {}
    for j in range(categorical):
        codes = rng.integers(0, categories, rows)
        offsets = rng.standard_normal((categories, scores_n)).astype(np.float32)
        offsets -= offsets.mean(0)  # no class favoured on average
        scores += offsets[codes]
        cats[f"cat_{j}"] = values[codes]
    if classes:
        label = (scores + 0.5 * rng.gumbel(size=scores.shape).astype(np.float32)).argmax(1)
    else:
        label = scores[:, 0].astype(np.float64) + 0.1 * rng.standard_normal(rows)
    if missing:
        for row in x:
            row[rng.random(rows, dtype=np.float32) < missing] = np.nan
        for col in cats.values():
            col[rng.random(rows, dtype=np.float32) < missing] = None
    columns: list[pd.DataFrame | pd.Series] = []
    if params.get("time"):
        seconds = np.cumsum(rng.integers(1, 120, rows))
        stamps = np.datetime64("2024-01-01T00:00:00", "ns") + seconds.astype("timedelta64[s]")
        columns.append(pd.Series(stamps, name="timestamp"))
    if groups:
        columns.append(pd.Series(rng.integers(0, groups, rows), name="group"))
    columns.append(pd.DataFrame(x.T, columns=[f"num_{j}" for j in range(numeric)], copy=False))
    columns.append(pd.DataFrame(cats))
    columns.append(pd.Series(label.astype(np.int64) if classes else label, name=target))
    frame = pd.concat(columns, axis=1, copy=False)
    if frame.columns.duplicated().any():
        raise StageError(f"data.target: {target!r} clashes with a generated column name")
    return frame


def _int(params: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = params.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise StageError(f"data.synthetic.{key}: {value!r} is not an integer >= {low}")
    return int(value)
