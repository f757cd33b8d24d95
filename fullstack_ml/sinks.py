"""Data sinks: where a stage writes a table batch by batch (the predict stage's predictions and
rejects), the counterpart of `sources.py`.

A sink replaces its destination atomically: `write()` batches, `finish()` with the columns
(written alone when no batch came), then `commit()` puts the whole table in place, or
`discard()` leaves the previous one (or none). A reader never sees half a table.
- `TableFile`: a .parquet or .csv file, a local path or an fsspec URL (s3://...);
- `SqlTable`: a table of a SQLAlchemy database, replaced in one transaction.
Every failure is a StageError with one line naming the file, URL, table or key at fault;
credentials come from the environment, as for sources.
"""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from fullstack_ml.sources import db_problem, open_url, sql_engine, sql_url, storage_problem
from fullstack_ml.stage import UMASK, StageError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


class TableFile:
    """A table written batch by batch to a local temporary file that replaces `dest` on
    `commit()` (a rename beside a local `dest`; one upload to a URL), and is removed on
    `discard()`: a reader of `dest` sees the previous file or the whole new one."""

    def __init__(self, dest: str, key: str, storage_options: dict | None = None) -> None:
        suffix = os.path.splitext(dest.lower())[1]
        if suffix not in FORMATS:
            raise StageError(f"{key}: {dest}: write .parquet or .csv")
        self.dest, self.key, self.format = dest, key, FORMATS[suffix]
        self.remote = "://" in dest and not dest.startswith("file://")
        self.options = storage_options or {}
        folder = None if self.remote else Path(dest).parent
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{Path(dest).name}.tmp-", dir=folder)
        os.close(fd)
        self.writer: Any = None  # a Parquet file's
        self.started, self.rows = False, 0

    def write(self, frame: pd.DataFrame) -> None:
        if self.format == "csv":  # the header once, then rows
            frame.to_csv(
                self.tmp, mode="a" if self.started else "w", header=not self.started, index=False
            )
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, table.schema.remove_metadata())
            self.writer.write_table(table.cast(self.writer.schema))
        self.started = True
        self.rows += len(frame)

    def finish(self, empty: pd.DataFrame) -> None:
        """Close the file; `empty` (no rows, the columns) is written when nothing was."""
        if not self.started:
            self.write(empty)
        if self.writer is not None:
            self.writer.close()
        os.chmod(self.tmp, 0o666 & ~UMASK)

    def commit(self) -> None:
        """Move the finished file into place."""
        if not self.remote:
            os.replace(self.tmp, self.dest)
            return
        fs, path = open_url(self.dest, self.options, self.key)
        try:
            fs.put_file(self.tmp, path)
        except Exception as err:
            raise StageError(f"{self.dest}: {storage_problem(err, remote=True)}") from None
        finally:
            Path(self.tmp).unlink(missing_ok=True)

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):  # already closed
                self.writer.close()
        Path(self.tmp).unlink(missing_ok=True)


class SqlTable:
    """A table written batch by batch to a staging table that replaces `table` in one
    transaction on `commit()` (PostgreSQL and SQLite change tables transactionally) and is
    dropped on `discard()`: a reader sees the previous table or the whole new one."""

    def __init__(self, url: str, table: str, key: str) -> None:
        self.parsed = sql_url(url, key)
        self.where = f"{self.parsed.render_as_string(hide_password=True)} table {table}"
        self.engine = sql_engine(self.parsed, self.where, must_exist=False)
        schema, _, self.name = table.rpartition(".")
        self.schema = schema or None
        self.staging = f"{self.name}__predict_{os.getpid()}"
        self.started, self.rows = False, 0

    def _run(self, action: Any) -> None:
        import sqlalchemy as sa

        try:
            action()
        except sa.exc.DBAPIError as err:
            raise StageError(f"{self.where}: {db_problem(err, self.parsed)}") from None
        except sa.exc.SQLAlchemyError as err:
            raise StageError(f"{self.where}: {str(err).splitlines()[0]}") from None

    def write(self, frame: pd.DataFrame) -> None:
        mode = "append" if self.started else "replace"
        self._run(
            lambda: frame.to_sql(
                self.staging, self.engine, schema=self.schema, if_exists=mode, index=False
            )
        )
        self.started, self.rows = True, self.rows + len(frame)

    def finish(self, empty: pd.DataFrame) -> None:
        if not self.started:
            self.write(empty)

    def commit(self) -> None:
        import sqlalchemy as sa

        quote = self.engine.dialect.identifier_preparer.quote
        staging = ".".join(quote(p) for p in (self.schema, self.staging) if p)

        def swap() -> None:
            with self.engine.begin() as conn:
                target = sa.Table(self.name, sa.MetaData(), schema=self.schema)
                conn.execute(sa.schema.DropTable(target, if_exists=True))
                conn.execute(sa.text(f"ALTER TABLE {staging} RENAME TO {quote(self.name)}"))

        self._run(swap)
        self.engine.dispose()

    def discard(self) -> None:
        import sqlalchemy as sa

        with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:
            staging = sa.Table(self.staging, sa.MetaData(), schema=self.schema)
            conn.execute(sa.schema.DropTable(staging, if_exists=True))
        self.engine.dispose()


Sink = TableFile | SqlTable
