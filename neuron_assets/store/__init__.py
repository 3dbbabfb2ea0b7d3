"""Parquet is the storage of record; DuckDB is the query layer over it.

Layout under the storage root::

    data/<table>/data.parquet                               unpartitioned tables
    data/<table>/layer=<L>/polarity=<P>/data.parquet        per layer x polarity
    catalog.duckdb                                          views from sql/*.sql
    checkpoints/                                            resumable long runs

Every file is written to a temporary name beside its target and renamed into place, so a
reader never sees half a file and parallel partitions never contend for a lock. The
catalog holds only views (plus ``store_files`` and ``store_info``, its record of the files and
the root it was built for); it is rebuilt from ``sql/*.sql`` at any time, and by any reader
that finds it out of date or built for another root (a copied or moved store). A file that
cannot be read is left out of its view and named, so the rest of the database still answers.

Readers get a contained connection (:meth:`Store.connect`): it reads the store's Parquet
files and nothing else, and :func:`read_only_statements` refuses, with a message, every
statement of a user's query that is not a read.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from neuron_assets.store.checksums import CHECKSUMS_DIR, content_problem, decode_problem, record_checksum  # noqa: F401
from neuron_assets.store.partition_columns import (
    PARTITION_COLUMNS_KEY,
    schema_without_partition_columns,
    with_partition_columns,
    without_partition_columns,
)

DATA_FILE = "data.parquet"


def sql_dir() -> Path:
    """The folder of view definitions: packaged inside the wheel, or the repository's sql/."""
    package = Path(__file__).resolve().parent.parent  # neuron_assets/
    packaged = package / "sql"
    return packaged if packaged.is_dir() else package.parent / "sql"


class MissingTableError(LookupError):
    """A table that no run has written yet."""


class DamagedTableError(ValueError):
    """A table file whose bytes are not those its writer wrote: read, it would give garbage."""


class Store:
    """The store under a local folder, or under a URL (``s3://bucket/prefix``, ``memory://...``:
    any fsspec filesystem; see :func:`is_url`). On a URL the tables are read and written
    through fsspec, each write to a temporary key moved onto its target (see
    docs/deploy_k8s.md for what object stores guarantee); there is no catalog.duckdb there:
    every reader builds the views in memory over the URLs; checkpoints stay on local disk."""

    def __init__(self, root: str | os.PathLike):
        if is_url(root):
            import fsspec

            self.fs, self._base = fsspec.core.url_to_fs(str(root))
            self.root = str(root).rstrip("/")
            self.data_dir = f"{self.root}/data"
            self.catalog_path = None
            self.local_dir = local_scratch(self.root)
            self.checkpoint_dir = self.local_dir / "checkpoints"
            return
        self.fs = None
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.catalog_path = self.root / "catalog.duckdb"
        self.local_dir = self.root  # what must be a real folder: checkpoints, the report, the search index
        self.checkpoint_dir = self.root / "checkpoints"

    @property
    def remote(self) -> bool:
        return self.fs is not None

    # -- paths -------------------------------------------------------------------------
    def path(self, table: str, layer: int | None = None, polarity: str | None = None) -> Path:
        if self.remote:
            parts = [self.data_dir, table] + ([f"layer={layer}"] if layer is not None else []) \
                + ([f"polarity={polarity}"] if polarity is not None else []) + [DATA_FILE]
            return "/".join(parts)
        folder = self.data_dir / table
        if layer is not None:
            folder = folder / f"layer={layer}"
        if polarity is not None:
            folder = folder / f"polarity={polarity}"
        return folder / DATA_FILE

    def table_dir(self, table: str) -> Path | str:
        """A table's folder: a local path, or a URL on a remote root."""
        return f"{self.data_dir}/{table}" if self.remote else self.data_dir / table

    def has_data(self) -> bool:
        """Whether any stage has written here."""
        return self.fs.exists(self.data_dir) if self.remote else self.data_dir.exists()

    def partitions(self, table: str) -> list[tuple[int, str]]:
        """(layer, polarity) of every partition file a table has."""
        found = []
        if self.remote:
            for path in self.fs.glob(f"{self.data_dir}/{table}/layer=*/polarity=*/{DATA_FILE}"):
                layer, polarity = path.split("/")[-3:-1]
                found.append((int(layer.split("=", 1)[1]), polarity.split("=", 1)[1]))
            return sorted(found)
        for path in sorted((self.data_dir / table).glob(f"layer=*/polarity=*/{DATA_FILE}")):
            layer = int(path.parent.parent.name.split("=", 1)[1])
            found.append((layer, path.parent.name.split("=", 1)[1]))
        return sorted(found)

    # -- reading and writing -------------------------------------------------------------
    def write(self, table: str, frame: pl.DataFrame, layer: int | None = None, polarity: str | None = None) -> Path:
        target = self.path(table, layer, polarity)
        frame, metadata = without_partition_columns(frame, layer, polarity)
        options = {"compression": "zstd", "statistics": True, "metadata": metadata or None}
        if self.remote:
            with remote_atomic_key(self.fs, target) as tmp, self.fs.open(tmp, "wb") as handle:
                frame.write_parquet(handle, **options)
            return target
        with atomic_path(target) as tmp:
            frame.write_parquet(tmp, **options)
            self._record_checksum(target, tmp)
        return target

    def write_batches(self, table: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch],
                      layer: int | None = None, polarity: str | None = None) -> Path:
        """Write a table from Arrow record batches, one Parquet row group each, without
        holding the table in memory; atomically, like :meth:`write`."""
        target = self.path(table, layer, polarity)
        schema, strip = schema_without_partition_columns(schema, layer, polarity)

        def write(where) -> None:
            with pq.ParquetWriter(where, schema, compression="zstd") as writer:
                for batch in batches:
                    writer.write_batch(strip(batch), row_group_size=max(batch.num_rows, 1))

        if self.remote:
            with remote_atomic_key(self.fs, target) as tmp, self.fs.open(tmp, "wb") as handle:
                write(handle)
            return target
        with atomic_path(target) as tmp:
            write(tmp)
            self._record_checksum(target, tmp)
        return target

    def read(self, table: str, layer: int | None = None, polarity: str | None = None,
             columns: list[str] | None = None) -> pl.DataFrame:
        path = self.path(table, layer, polarity)
        if not self.exists(table, layer, polarity):
            where = "" if layer is None else f" for layer {layer}" + ("" if polarity is None else f", polarity {polarity}")
            raise MissingTableError(
                f"no '{table}' table{where} under {self.data_dir}; materialize it first "
                f"(neuron-assets run, or the '{table}' asset in the Dagster UI)"
            )
        if columns is not None:  # through the lazy scan: an older file's columns are renamed first
            return self.scan(table, layer, polarity).select(columns).collect()
        if self.remote:
            with self.fs.open(path, "rb") as handle:
                frame = pl.read_parquet(handle)
        else:
            self._refuse_changed(table, layer, polarity)
            frame = pl.read_parquet(path)
        frame = with_partition_columns(frame, self._partition_columns(path, layer, polarity), layer, polarity)
        return upgrade_legacy_columns(table, frame)

    def scan(self, table: str, layer: int | None = None, polarity: str | None = None) -> pl.LazyFrame:
        """A lazy frame over a table (partition): locally Polars reads only the row groups and
        columns a query needs; on a remote root the file is fetched whole through fsspec."""
        if self.remote:
            return self.read(table, layer, polarity).lazy()
        if not self.exists(table, layer, polarity):
            self.read(table, layer, polarity)  # raises the error that says how to make the table
        self._refuse_changed(table, layer, polarity)
        path = self.path(table, layer, polarity)
        frame = with_partition_columns(pl.scan_parquet(path), self._partition_columns(path, layer, polarity), layer, polarity)
        return upgrade_legacy_columns(table, frame)

    def _refuse_changed(self, table: str, layer: int | None, polarity: str | None) -> None:
        """Raise DamagedTableError for a file whose content is not what its writer recorded, so
        no stage computes on the garbage a damaged page can decode to."""
        path = self.path(table, layer, polarity)
        problem = self._changed_since_written(path)
        if problem is not None:
            damaged = DamagedFile(table, path, layer, polarity, problem)
            partition = f" --partition '{damaged.partition}'" if damaged.partition else ""
            raise DamagedTableError(
                f"{path} is damaged ({problem}); write it again: dagster asset materialize -m neuron_assets.defs "
                f"--select {damaged.asset}{partition} (with this store's DAGSTER_HOME), or delete the file and "
                "rerun neuron-assets run, which then computes that partition again")

    def _changed_since_written(self, path: Path) -> str | None:
        """Why a local file is not what its writer recorded (a stat and a small JSON read; a hash
        only when it changed since it was written), or None."""
        relative = None if self.remote else self._relative(path)
        if relative is None:
            return None
        stat = Path(path).stat()
        return content_problem(self.root, relative, path, stat.st_size, stat.st_mtime_ns)[0]

    def _partition_columns(self, path, layer: int | None, polarity: str | None) -> list[dict]:
        """The partition columns a file was written without (see :func:`without_partition_columns`)."""
        if layer is None and polarity is None:
            return []
        try:
            if self.remote:
                with self.fs.open(path, "rb") as handle:
                    metadata = pq.read_metadata(handle).metadata
            else:
                metadata = pq.read_metadata(path).metadata
        except Exception:  # a damaged footer: the read itself says so
            return []
        raw = (metadata or {}).get(PARTITION_COLUMNS_KEY.encode())
        return json.loads(raw) if raw else []

    def _record_checksum(self, target: Path, written: Path) -> None:
        """Before ``written`` is renamed onto ``target``: its checksum record (see :func:`record_checksum`)."""
        relative = self._relative(target)
        if relative is not None:  # else a data folder linked from outside the root: the footer check remains
            record_checksum(self.root, relative, written)

    def exists(self, table: str, layer: int | None = None, polarity: str | None = None) -> bool:
        if self.remote:
            return self.fs.exists(self.path(table, layer, polarity))
        return self.path(table, layer, polarity).exists()

    # -- the DuckDB catalog --------------------------------------------------------------
    def build_catalog(self) -> list[str]:
        """(Re)create catalog.duckdb with a view per sql/*.sql whose data exists.

        Returns the names of the views created. Views whose Parquet files are not written
        yet are left out; a view built on another view is retried once that one exists. A
        file whose Parquet footer cannot be read is left out of its view and recorded in the
        catalog's ``store_files`` table (see :meth:`damaged`), so the other files and views
        still answer. The catalog also records the root it was built for: a copied or moved
        root is rebuilt on its next read instead of answering from the old place.
        """
        if self.remote:  # nothing is written: readers build the views in memory
            with duckdb.connect(":memory:") as con:
                con.register_filesystem(self.fs)
                return self._create_views(con)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.catalog_path) as tmp:
            con = duckdb.connect(str(tmp))
            try:
                created = self._create_views(con)
            finally:
                con.close()
        return created

    def connect(self, extensions: Iterable[str] = ()) -> duckdb.DuckDBPyConnection:
        """A contained, read-only connection to the catalog: it reads the store's Parquet files
        and nothing else.

        The catalog is (re)built first when it is missing, out of date (a table written from
        the UI or another process since the last build) or was built for another root (a
        copied or moved store); where the store cannot be written, the views are built in
        memory instead. The connection then has external access off except for the store's
        data folder, no extension loading or installing but the pinned ``extensions`` (a
        subset of :data:`PINNED_EXTENSIONS`, loaded from their packages), and its
        configuration locked, so no statement can read other files, reach the network or
        lift these limits. The catalog is attached read-only. Writing a file inside the data
        folder (COPY ... TO) is not stopped here: pass a user's query through
        :func:`read_only_statements` first, as ``neuron-assets sql`` does.
        """
        unknown = set(extensions) - set(PINNED_EXTENSIONS)
        if unknown:
            raise ValueError(f"extension(s) {sorted(unknown)} are not available; the pinned ones are {list(PINNED_EXTENSIONS)}")
        # A fresh in-memory database per connection: its settings are its own, so locking
        # them never touches another connection of this process.
        # DuckDB may read its temp directory whatever allowed_directories says, and its default
        # is `.tmp` of the working directory: it spills to a folder of this process's own instead.
        con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                                 "autoload_known_extensions": False,
                                                 "allow_community_extensions": False,
                                                 "temp_directory": private_temp_directory()})
        try:
            if self.remote:
                con.register_filesystem(self.fs)
                self._create_views(con)
            elif self._attached_catalog_stale(con):
                try:
                    self.build_catalog()
                    self._attach_catalog(con)
                except OSError:  # a read-only copy of a store: views in memory, nothing written
                    self._create_views(con)
            for name in extensions:
                con.execute(f"LOAD {sql_string(pinned_extension_path(name))}")
            allowed = [self._data_text() + "/"]
            if self.remote:  # the search index, which DuckDB keeps in a local file
                allowed.append((self.local_dir / "data").as_posix() + "/")
            con.execute(f"SET allowed_directories = [{', '.join(sql_string(d) for d in allowed)}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except BaseException:
            con.close()
            raise
        return con

    def catalog_stale(self) -> bool:
        """True when the catalog is missing, was built for another root, or its record of the
        data files (path, size, modification time) differs from the files there now."""
        if self.remote:
            return True  # never written: built in memory by every reader
        with duckdb.connect(":memory:") as con:
            return self._attached_catalog_stale(con)

    def _attach_catalog(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"ATTACH {sql_string(self.catalog_path)} AS {CATALOG_NAME} (READ_ONLY)")
        con.execute(f"USE {CATALOG_NAME}")

    def _attached_catalog_stale(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Attach the catalog to ``con`` and say whether it is stale; a stale one is detached."""
        if not self.catalog_path.exists():
            return True
        try:
            self._attach_catalog(con)
            root = con.execute("SELECT root FROM store_info").fetchone()
            recorded = set(con.execute("SELECT path, bytes, modified_ns FROM store_files").fetchall())
        except duckdb.Error:  # an older or damaged catalog: build it again
            root = None
        stale = (root is None or root[0] != self.root.resolve().as_posix()
                 or recorded != {(entry.relative, entry.size, entry.modified_ns) for entry in self.data_files()})
        if stale and CATALOG_NAME in {row[0] for row in con.execute("SELECT database_name FROM duckdb_databases()").fetchall()}:
            con.execute("USE memory")
            con.execute(f"DETACH {CATALOG_NAME}")
        return stale

    def views(self) -> list[str]:
        with self.connect() as con:
            return [row[0] for row in con.execute(
                "select view_name from duckdb_views() where not internal and database_name = current_database() order by 1"
            ).fetchall()]

    def damaged(self) -> list[DamagedFile]:
        """The data files the catalog left out of its views because they cannot be read."""
        with self.connect() as con:
            rows = con.execute("SELECT table_name, path, layer, polarity, problem FROM store_files "
                               "WHERE problem IS NOT NULL ORDER BY path").fetchall()
        return [DamagedFile(table, self.file_at(path), layer, polarity, problem) for table, path, layer, polarity, problem in rows]

    def file_at(self, relative: str) -> Path | str:
        """A file of the store from its path relative to the root: a local path or a URL."""
        return f"{self.root}/{relative}" if self.remote else self.root / relative

    def check_readable(self, table: str, layer: int | None = None, polarity: str | None = None) -> DamagedFile | None:
        """The file of a table (partition) as a DamagedFile when its Parquet footer cannot be
        read or its content is not what its writer wrote; None when it reads (or is not written yet)."""
        path = self.path(table, layer, polarity)
        if not self.exists(table, layer, polarity):
            return None
        problem = parquet_problem(path, self.fs) or self._changed_since_written(path)
        return None if problem is None else DamagedFile(table, path, layer, polarity, problem)

    def _relative(self, path: Path) -> str | None:
        """A local file's path from the root, as the catalog and the checksum records name it."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:  # a data folder linked from outside the root
            return None

    def missing_files(self) -> list[DamagedFile]:
        """The data files a completion marker (markers/<asset>/<partition>.json) says a run wrote
        and that are not there: without this a deleted partition would drop out of its view
        without a word. The markers are only read."""
        found: dict[str, DamagedFile] = {}
        for marker_path in sorted((self.local_dir / "markers").glob("*/*.json")):
            try:
                marker = json.loads(marker_path.read_text())
                listed = list(marker["files"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for name in listed:
                relative = self._listed_data_file(str(name))
                if relative is None or relative in found:
                    continue
                path = self.file_at(relative)
                if (self.fs.exists(path) if self.remote else Path(path).exists()):
                    continue
                table, layer, polarity = partition_of(relative)
                when = f" on {marker['completed_at']}" if marker.get("completed_at") else ""
                found[relative] = DamagedFile(
                    table, path, layer, polarity,
                    f"its completion marker {marker_path} says run {marker.get('run_id', '?')} wrote it{when}",
                    writer=marker.get("asset"), missing=True)
        return list(found.values())

    def _listed_data_file(self, name: str) -> str | None:
        """A marker's file as a path relative to the root, when it is a table's data file."""
        if self.remote:
            name = name[len(self.root) + 1:] if name.startswith(self.root + "/") else ""
        return name if name.startswith("data/") and name.endswith("/" + DATA_FILE) else None

    def verify(self) -> tuple[int, list[DamagedFile]]:
        """Every data file checked in full: its footer, its whole content against the checksum
        its writer recorded (decoded page by page where there is no record), and every file a
        completion marker lists is there. Returns (files checked, the damaged and missing ones)."""
        problems = []
        files = self.data_files()
        for entry in files:
            problem = parquet_problem(entry.path, self.fs)
            if problem is None and not self.remote:
                problem, checksum = content_problem(self.root, entry.relative, entry.path, entry.size,
                                                    entry.modified_ns, thorough=True)
                if problem is None and checksum is None:
                    problem = decode_problem(entry.path)
            elif problem is None:
                problem = decode_problem(entry.path, self.fs)
            if problem is not None:
                problems.append(DamagedFile(entry.table, entry.path, entry.layer, entry.polarity, problem))
        return len(files), problems + self.missing_files()

    def _data_dir_resolved(self) -> Path:
        return self.data_dir.resolve()

    def _data_text(self) -> str:
        """The data folder as the views name it: a resolved local path, or the URL."""
        return self.data_dir if self.remote else self._data_dir_resolved().as_posix()

    def _root_text(self) -> str:
        return self.root if self.remote else self.root.resolve().as_posix()

    def _remote_data_files(self) -> list[DataFile]:
        found = []
        base = self._base.rstrip("/")
        for key in sorted(self.fs.find(self.data_dir)):
            if not key.endswith("/" + DATA_FILE):
                continue
            relative = key[len(base):].lstrip("/")
            parts = dict(part.split("=", 1) for part in relative.split("/")[2:-1] if "=" in part)
            layer = int(parts["layer"]) if parts.get("layer", "").isdigit() else None
            info = self.fs.info(key)
            try:
                modified_ns = int(self.fs.modified(key).timestamp() * 1e9)
            except (NotImplementedError, AttributeError, OSError):
                modified_ns = 0
            found.append(DataFile(f"{self.root}/{relative}", relative, relative.split("/")[1], layer,
                                  parts.get("polarity"), int(info.get("size") or 0), modified_ns))
        return found

    def data_files(self) -> list[DataFile]:
        """Every data file under data/, with its table, partition, size and modification time."""
        if self.remote:
            return self._remote_data_files() if self.fs.exists(self.data_dir) else []
        found = []
        if not self.data_dir.is_dir():
            return found
        root = self.root.resolve()
        for path in sorted(self._data_dir_resolved().glob(f"*/**/{DATA_FILE}")):
            stat = path.stat()
            relative = path.relative_to(root).as_posix()
            parts = dict(part.split("=", 1) for part in path.parent.relative_to(self._data_dir_resolved()).parts[1:] if "=" in part)
            layer = int(parts["layer"]) if parts.get("layer", "").isdigit() else None
            found.append(DataFile(path, relative, path.relative_to(self._data_dir_resolved()).parts[0], layer,
                                   parts.get("polarity"), stat.st_size, stat.st_mtime_ns))
        return found

    def _known_checksums(self) -> dict[tuple[str, int, int], str]:
        """(path, bytes, modified_ns) -> sha256, as the catalog being replaced recorded them: a file
        hashed once (a store copied without its modification times, say) is not hashed again."""
        if not self.catalog_path.exists():
            return {}
        try:
            with duckdb.connect(":memory:") as con:
                con.execute(f"ATTACH {sql_string(self.catalog_path)} AS previous (READ_ONLY)")
                rows = con.execute("SELECT path, bytes, modified_ns, sha256 FROM previous.store_files "
                                   "WHERE sha256 IS NOT NULL").fetchall()
        except duckdb.Error:  # an older catalog without checksums, or a damaged one
            return {}
        return {(path, size, modified): checksum for path, size, modified, checksum in rows}

    def _create_views(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        """Record the root and the data files (each checked), then create the views over the
        readable files; returns the names of the views created."""
        files = self.data_files()
        problems = {entry.path: parquet_problem(entry.path, self.fs) for entry in files}
        checksums: dict = {}
        if not self.remote:  # content checks: a hash only for a file changed since its writer recorded it
            known = self._known_checksums()
            for entry in files:
                if problems[entry.path] is None:
                    stat = (entry.relative, entry.size, entry.modified_ns)
                    problems[entry.path], checksums[entry.path] = content_problem(
                        self.root, entry.relative, entry.path, entry.size, entry.modified_ns, known.get(stat))
        con.execute("CREATE TABLE store_info (root VARCHAR, built_at TIMESTAMPTZ)")
        con.execute("INSERT INTO store_info VALUES (?, now())", [self._root_text()])
        con.execute("CREATE TABLE store_files (table_name VARCHAR, layer INTEGER, polarity VARCHAR, path VARCHAR, "
                    "bytes BIGINT, modified_ns BIGINT, problem VARCHAR, sha256 VARCHAR)")
        if files:
            con.executemany("INSERT INTO store_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                [entry.table, entry.layer, entry.polarity, entry.relative, entry.size, entry.modified_ns,
                 problems[entry.path], checksums.get(entry.path)] for entry in files
            ])
        damaged_tables = {entry.table for entry in files if problems[entry.path]}
        readable = {table: [entry.path for entry in files if entry.table == table and not problems[entry.path]]
                    for table in damaged_tables}
        data = self._data_text()

        def source(match: re.Match) -> str:
            # The view's glob, except that a table with a damaged file lists its readable files.
            table = match.group(1)
            if table in readable:
                return "[" + ", ".join(sql_string(path) for path in readable[table]) + "]"
            return sql_string(data + match.group(0)[len("'{data}"):-1])

        pending = {p.stem: _DATA_GLOB.sub(source, p.read_text()) for p in sorted(sql_dir().glob("*.sql"))}
        created: list[str] = []
        progress = True
        while pending and progress:
            progress = False
            for name, text in list(pending.items()):
                try:
                    con.execute(text)
                except duckdb.Error:  # no files yet, an upstream view missing, or no readable file
                    continue
                created.append(name)
                del pending[name]
                progress = True
        return created


# A view's data source in sql/*.sql: '{data}/<table>/<glob>'.
_DATA_GLOB = re.compile(r"'\{data\}/(\w+)/[^']*'")
CATALOG_NAME = "catalog"
PINNED_EXTENSIONS = ("fts", "vss")


# The statements a user's query may hold. The rest are refused before the store is opened, with
# the way to do what the user wanted; the contained connection (Store.connect) would refuse
# reading or writing outside the store anyway, but not a COPY over one of the store's own files.
_READ_STATEMENTS = {"SELECT", "EXPLAIN"}
_REFUSED = {
    "COPY": "COPY ... TO writes files, and a query only reads; to save a result run the query with "
            "neuron-assets sql ... --format csv|json|parquet --output FILE (or > FILE)",
    "EXPORT": "EXPORT DATABASE writes files, and a query only reads; to save a result run the query with "
              "neuron-assets sql ... --format csv|json|parquet --output FILE (or > FILE)",
    "ATTACH": "ATTACH opens another database, and a query reads only this store's catalog",
    "DETACH": "DETACH changes the databases open, and a query reads only this store's catalog",
    "SET": "settings are locked; a query runs with the store's own settings",
    "VARIABLE_SET": "settings are locked; a query runs with the store's own settings",
}


def read_only_statements(query: str) -> tuple[list[str], list[str]]:
    """The statements of a user's query, and the pinned extensions its LOAD (or INSTALL)
    statements ask for. Only SELECT (DESCRIBE, SHOW, SUMMARIZE, FROM ...) and EXPLAIN run; a
    statement that would write, open another database or change settings raises
    RefusedStatement."""
    try:
        parsed = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise ValueError(f"SQL error: {str(err).splitlines()[0]}") from None
    statements, extensions = [], []
    for statement in parsed:
        kind = statement.type.name
        text = statement.query.strip()
        if kind in _READ_STATEMENTS:
            statements.append(text)
        elif kind == "LOAD":
            match = re.fullmatch(r"(?is)\s*(force\s+)?(install|load)\s+['\"]?(\w+)['\"]?\s*;?\s*", text)
            if not match or match.group(3).lower() not in PINNED_EXTENSIONS:
                raise RefusedStatement(f"refused `{_first_line(text)}`: only the pinned extensions "
                                       f"({', '.join(PINNED_EXTENSIONS)}) can be loaded, from their installed packages "
                                       "(write LOAD fts); nothing is installed from the network")
            if match.group(3).lower() not in extensions:
                extensions.append(match.group(3).lower())
        else:
            reason = _REFUSED.get(kind, f"{kind} statements change the database, and the catalog is read-only "
                                        "(its views are rebuilt from sql/*.sql by `neuron-assets run`)")
            raise RefusedStatement(f"refused `{_first_line(text)}`: {reason}")
    return statements, extensions


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 80 else line[:77] + "..."


class RefusedStatement(ValueError):
    """A statement a read-only query may not run; the message says what to do instead."""


def pinned_extension_path(name: str) -> Path:
    """The DuckDB extension file shipped by the pinned duckdb-extension-<name> package."""
    try:
        package = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        raise ValueError(f"the {name} extension is not installed; pip install duckdb-extension-{name}=={duckdb.__version__}") from None
    path = Path(package.__path__[0]) / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.is_file():
        raise ValueError(f"duckdb-extension-{name} has no build for DuckDB {duckdb.__version__} ({path}); "
                         f"pip install duckdb-extension-{name}=={duckdb.__version__}")
    return path


# Which asset writes each table: the fix for a damaged file is to materialize it again.
ASSET_OF_TABLE = {
    "sequences": "corpus", "exemplars": "exemplars", "neuron_stats": "exemplars", "output_tokens": "exemplars",
    "candidate_descriptions": "candidate_descriptions", "simulator_training_data": "simulator_training_data",
    "simulator_checkpoints": "simulator_checkpoint", "description_scores": "description_scores",
    "neuron_descriptions": "neuron_descriptions",
}


@dataclass(frozen=True)
class DamagedFile:
    """A data file that cannot be read (or, with ``missing``, is not there although a run wrote
    it), and which asset partition writes it again."""

    table: str
    path: Path
    layer: int | None
    polarity: str | None
    problem: str
    writer: str | None = None  # the asset that wrote it, where a marker says so
    missing: bool = False

    @property
    def asset(self) -> str:
        return self.writer or ASSET_OF_TABLE.get(self.table, self.table)

    @property
    def partition(self) -> str | None:
        """The Dagster partition key (layer|polarity) of a partitioned table's file."""
        return None if self.layer is None or self.polarity is None else f"{self.layer}|{self.polarity}"


@dataclass(frozen=True)
class DataFile:
    """One Parquet file of the store; ``relative`` is its path from the root."""

    path: Path
    relative: str
    table: str
    layer: int | None
    polarity: str | None
    size: int
    modified_ns: int


def parquet_problem(path: Path | str, fs=None) -> str | None:
    """Why a Parquet file cannot be read (its footer and schema), or None when it can;
    ``fs``: the fsspec filesystem of a URL."""
    try:
        if fs is not None:
            with fs.open(path, "rb") as handle:
                pq.read_metadata(handle)
        else:
            pq.read_metadata(path)
    except Exception as err:  # pyarrow raises several types for a torn or foreign file
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    return None


def partition_of(relative: str) -> tuple[str, int | None, str | None]:
    """(table, layer, polarity) of a data file from its path relative to the root."""
    parts = relative.split("/")
    keys = dict(part.split("=", 1) for part in parts[2:-1] if "=" in part)
    layer = int(keys["layer"]) if keys.get("layer", "").isdigit() else None
    return parts[1], layer, keys.get("polarity")


def private_temp_directory() -> str:
    """A folder of this process's own for DuckDB to spill to, removed when the process ends."""
    pid = os.getpid()
    if pid not in _TEMP_DIRECTORIES:
        folder = tempfile.mkdtemp(prefix="neuron_assets-duckdb-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _TEMP_DIRECTORIES[pid] = folder
    return _TEMP_DIRECTORIES[pid]


_TEMP_DIRECTORIES: dict[int, str] = {}


def upgrade_legacy_columns(table: str, frame: pl.DataFrame | pl.LazyFrame):
    """A table as this version names its columns, whatever version wrote it, so that no reader
    has to know: ``kind`` is always the feature kind (neuron, sae). In exemplars written before
    the rename, ``kind`` was how the row was drawn (now ``sample``) and the feature kind was
    ``feature_kind`` (and simulator_training_data called it ``exemplar_kind``); per-feature
    tables written before features had kinds hold only neurons.
    Applied lazily to a scan, so a reader still reads only the columns it selects."""
    names = frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns
    if table == "exemplars" and "sample" not in names and "kind" in names:
        frame = frame.rename({"kind": "sample", **({"feature_kind": "kind"} if "feature_kind" in names else {})})
        names = [{"kind": "sample", "feature_kind": "kind"}.get(n, n) for n in names]
    if table == "simulator_training_data" and "exemplar_kind" in names:
        frame = frame.rename({"exemplar_kind": "sample"})
    if "neuron" in names and "kind" not in names:
        frame = frame.with_columns(pl.lit("neuron").alias("kind"))
    return frame


def sql_string(value) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def is_url(root) -> bool:
    """A root on an fsspec filesystem (``s3://``, ``gs://``, ``memory://``, ...) rather than a
    local folder; ``file://`` and plain paths are local."""
    text = str(root)
    return "://" in text and not text.startswith("file://") and not isinstance(root, Path)


def local_scratch(url: str) -> Path:
    """A local folder for what a store on a URL keeps on disk (checkpoints): under
    $NEURON_ASSETS_SCRATCH, else the system's temporary folder, one per URL."""
    import hashlib

    base = Path(os.environ.get("NEURON_ASSETS_SCRATCH") or tempfile.gettempdir()) / "neuron_assets-scratch"
    return base / hashlib.sha256(url.encode()).hexdigest()[:16]


@contextmanager
def remote_atomic_key(fs, target: str) -> Iterator[str]:
    """A temporary key beside ``target`` on an fsspec filesystem, moved onto it only if the
    block succeeds (and removed if it fails). On an object store each object appears whole
    when its upload completes, and the move is a server-side copy then a delete: a reader
    sees the old object or the new one, never a part, and a failed write leaves no target."""
    import uuid

    folder, name = target.rsplit("/", 1)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        fs.mv(tmp, target)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed onto it only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # writers such as DuckDB want to create the file themselves
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
        wal = tmp.with_name(tmp.name + ".wal")
        if wal.exists():
            wal.unlink()



def set_aside(path: Path) -> Path:
    """Rename a damaged file or folder to ``<name>.damaged`` (``.damaged-2``, ... when taken)
    beside it, out of the way of a rerun but kept for the user to inspect; returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.damaged")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{n}")
        n += 1
    os.replace(path, target)
    return target


def with_lineage(frame: pl.DataFrame, model: str, config_hash: str, run_id: str) -> pl.DataFrame:
    """Every stored row says which model, configuration and run made it."""
    return frame.with_columns(
        pl.lit(model).alias("model"), pl.lit(config_hash).alias("config_hash"), pl.lit(run_id).alias("run_id")
    )
