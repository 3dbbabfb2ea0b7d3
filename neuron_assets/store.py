"""Parquet is the storage of record; DuckDB is the query layer over it.

Layout under the storage root::

    data/<table>/data.parquet                               unpartitioned tables
    data/<table>/layer=<L>/polarity=<P>/data.parquet        per layer x polarity
    catalog.duckdb                                          views from sql/*.sql
    checkpoints/                                            resumable long runs

Every file is written to a temporary name beside its target and renamed into place, so a
reader never sees half a file and parallel partitions never contend for a lock. The
catalog holds only views; it is rebuilt from ``sql/*.sql`` at any time.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl

DATA_FILE = "data.parquet"


def sql_dir() -> Path:
    """The folder of view definitions: packaged inside the wheel, or the repository's sql/."""
    packaged = Path(__file__).resolve().parent / "sql"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "sql"


class MissingTableError(LookupError):
    """A table that no run has written yet."""


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.catalog_path = self.root / "catalog.duckdb"
        self.checkpoint_dir = self.root / "checkpoints"

    # -- paths -------------------------------------------------------------------------
    def path(self, table: str, layer: int | None = None, polarity: str | None = None) -> Path:
        folder = self.data_dir / table
        if layer is not None:
            folder = folder / f"layer={layer}"
        if polarity is not None:
            folder = folder / f"polarity={polarity}"
        return folder / DATA_FILE

    def partitions(self, table: str) -> list[tuple[int, str]]:
        """(layer, polarity) of every partition file a table has."""
        found = []
        for path in sorted((self.data_dir / table).glob(f"layer=*/polarity=*/{DATA_FILE}")):
            layer = int(path.parent.parent.name.split("=", 1)[1])
            found.append((layer, path.parent.name.split("=", 1)[1]))
        return sorted(found)

    # -- reading and writing -------------------------------------------------------------
    def write(self, table: str, frame: pl.DataFrame, layer: int | None = None, polarity: str | None = None) -> Path:
        target = self.path(table, layer, polarity)
        with atomic_path(target) as tmp:
            frame.write_parquet(tmp, compression="zstd", statistics=True)
        return target

    def read(self, table: str, layer: int | None = None, polarity: str | None = None) -> pl.DataFrame:
        path = self.path(table, layer, polarity)
        if not path.exists():
            where = "" if layer is None else f" for layer {layer}" + ("" if polarity is None else f", polarity {polarity}")
            raise MissingTableError(
                f"no '{table}' table{where} under {self.data_dir}; materialize it first "
                f"(neuron-assets run, or the '{table}' asset in the Dagster UI)"
            )
        return pl.read_parquet(path)

    def exists(self, table: str, layer: int | None = None, polarity: str | None = None) -> bool:
        return self.path(table, layer, polarity).exists()

    # -- the DuckDB catalog --------------------------------------------------------------
    def build_catalog(self) -> list[str]:
        """(Re)create catalog.duckdb with a view per sql/*.sql whose data exists.

        Returns the names of the views created. Views whose Parquet files are not written
        yet are left out; a view built on another view is retried once that one exists.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        pending = {p.stem: p.read_text() for p in sorted(sql_dir().glob("*.sql"))}
        created: list[str] = []
        with atomic_path(self.catalog_path) as tmp:
            con = duckdb.connect(str(tmp))
            try:
                progress = True
                while pending and progress:
                    progress = False
                    for name, text in list(pending.items()):
                        try:
                            con.execute(text.replace("{data}", self.data_dir.as_posix()))
                        except (duckdb.IOException, duckdb.CatalogException, duckdb.BinderException):
                            continue
                        created.append(name)
                        del pending[name]
                        progress = True
            finally:
                con.close()
        return created

    def connect(self, read_only: bool = True) -> duckdb.DuckDBPyConnection:
        """A connection to the catalog, (re)built first if it is missing or older than a table
        (a table written from the UI or another process since the last build)."""
        if self.catalog_stale():
            self.build_catalog()
        return duckdb.connect(str(self.catalog_path), read_only=read_only)

    def catalog_stale(self) -> bool:
        if not self.catalog_path.exists():
            return True
        built = self.catalog_path.stat().st_mtime
        return any(path.stat().st_mtime > built for path in self.data_dir.rglob(f"*{DATA_FILE}"))

    def views(self) -> list[str]:
        with self.connect() as con:
            return [row[0] for row in con.execute("select view_name from duckdb_views() where not internal order by 1").fetchall()]


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



def with_lineage(frame: pl.DataFrame, model: str, config_hash: str, run_id: str) -> pl.DataFrame:
    """Every stored row says which model, configuration and run made it."""
    return frame.with_columns(
        pl.lit(model).alias("model"), pl.lit(config_hash).alias("config_hash"), pl.lit(run_id).alias("run_id")
    )
