"""What the explorer reads, as plain Python: search, a feature, the layer and cluster overviews.

    explorer = Explorer(Store(root))
    explorer.search("closing brackets", mode="semantic", filters=Filters(layer=1), page=1, size=20)
    explorer.feature(1, "neg", 17, kind="neuron")
    explorer.layers(); explorer.clusters(); explorer.cluster(3)

Read-only beside a run that writes the store:

- One contained read connection (:func:`neuron_assets.search.open_search`, the connection
  `neuron-assets sql` uses, with the pinned extensions loaded once) stays open; every query
  runs on a cursor of its own, so requests answer in parallel and none reloads an extension.
  No writer lock is taken: the store writes every file to a temporary name and renames it into
  place, so a reader sees the old file or the new one, never half of one (a temporary file's
  name matches no view's glob).
- At most every ``refresh_seconds`` the data files are listed; when a table appeared or went,
  or the search index was rebuilt, the connection is opened again, so a new table
  (description_clusters) or the new index is seen. A file replaced in place needs nothing: the
  views read their files by glob at every query. The server never builds the search index (``rebuild=False``): a stale index is
  searched as it is until the run's description_embeddings stage rebuilds it.
- A feature is read with Polars scans filtered to its rows (the same code as `neuron-assets
  show`), retried once when a file was replaced between listing and reading.

Every search goes through :meth:`Explorer.search`; another index sits behind it alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import duckdb
import numpy as np
import polars as pl

from neuron_assets.report.neuron import load_neuron
from neuron_assets.search import Filters, SearchSession, index_path, open_search
from neuron_assets.serve.feature import feature_json, plain
from neuron_assets.serve.links import feature_path, layer_path
from neuron_assets.store import DamagedTableError, Store
from neuron_assets.types import Polarity

MAX_PAGE_SIZE = 100
MAX_RESULTS = 1_000  # page x size: deeper pages than this are refused (narrow the search instead)
EFFECTS_TABLE, CLUSTERS_TABLE = "description_effects", "description_clusters"
SUMMARY_VIEW = "description_cluster_summary"  # one row per cluster, where the store has it
CLUSTER_ID_COLUMNS = ("cluster", "cluster_id")  # whichever the clusters table names its id
NOT_COMPUTED = ("not computed: the store has no {table} table yet (materialize the {table} asset, "
                "or run neuron-assets run with it selected)")


class BadRequest(ValueError):
    """A request the explorer cannot answer as asked; the message says what to change."""


class TableGone(LookupError):
    """A table whose files were removed after the connection listed its view."""


class Explorer:
    """The explorer's reads over one store; safe to call from many threads at once."""

    def __init__(self, store: Store, refresh_seconds: float = 1.0,
                 encoder: Callable[[Sequence[str]], np.ndarray] | None = None):
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._encoder = encoder
        self._encoder_lock = threading.Lock()  # the encoder keeps caches of its own: one text at a time
        self._lock = threading.Lock()
        self._session: SearchSession | None = None
        self._database = "memory"
        self._signature: tuple | None = None
        self._checked = 0.0
        self._problem: str | None = None

    # -- the warm connection ---------------------------------------------------------------
    def _current(self) -> SearchSession:
        """The open session, opened again when a table appeared or went or the search index was
        rebuilt (checked at most every ``refresh_seconds``). Without description embeddings it
        holds the catalog alone, and ``_problem`` says why search cannot answer."""
        now = time.monotonic()
        if self._session is not None and now - self._checked < self.refresh_seconds:
            return self._session
        with self._lock:
            if self._session is not None and time.monotonic() - self._checked < self.refresh_seconds:
                return self._session
            signature = self._files_signature()
            if self._session is None or signature != self._signature:
                self._open(signature)
            self._checked = time.monotonic()
            return self._session

    def _files_signature(self) -> tuple:
        index = index_path(self.store)
        listing = index.with_name("index.files.json")
        stamp = (listing.stat().st_mtime_ns if listing.exists() else None,
                 index.stat().st_mtime_ns if index.exists() else None)
        # The views read their tables' files by glob at each query: only a table appearing or
        # going (or a rebuilt index) needs a new connection, not every file a run replaces.
        return tuple(sorted({f.table for f in self.store.data_files()})), stamp

    def _open(self, signature: tuple) -> None:
        try:
            session = open_search(self.store, rebuild=False)
        except LookupError as err:  # no embeddings yet: the catalog alone answers the rest
            self._problem = str(err)
            con = self.store.connect()
            session = SearchSession(con, None, [])
        else:
            self._problem = None
        self._database = session.con.execute("SELECT current_database()").fetchone()[0]
        # The previous session is left to close when its last cursor is done with it.
        self._session, self._signature = session, signature

    @contextmanager
    def cursor(self) -> Iterator[SearchSession]:
        """A session over a cursor of its own: the views, the search index, the extensions."""
        session = self._current()
        with self._lock:
            con = session.con.cursor()
        try:
            con.execute(f'USE "{self._database}"')
            yield session.over(con)
        except duckdb.IOException as err:
            if "No files found" not in str(err):
                raise
            # A view whose files were all removed since the connection was opened.
            raise TableGone(f"a table was removed from the store meanwhile ({str(err).splitlines()[0]})") from None
        finally:
            con.close()

    def warm(self) -> None:
        """Open the connection and load the sentence encoder now, so the first requests do not wait
        for them (a server calls this in the background as it starts)."""
        try:
            self._current()
            if self._problem is None:
                with self.cursor() as session:
                    self._encode(session, "warm up")
        except Exception:  # noqa: BLE001 - the request that needs it reports the problem
            pass

    def views(self) -> set[str]:
        with self.cursor() as session:
            return {row[0] for row in session.con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = current_database()"
            ).fetchall()}

    # -- search ------------------------------------------------------------------------------
    def search(self, query: str, mode: str = "semantic", filters: Filters = Filters(), page: int = 1,
               size: int = 20) -> dict:
        """Ranked hits ``(page - 1) * size`` to ``page * size``, each with its feature's page."""
        if not query.strip():
            raise BadRequest("the search text is empty; give a few words, e.g. q=closing brackets")
        if mode not in ("semantic", "text"):
            raise BadRequest(f"mode must be semantic or text, not {mode!r}")
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise BadRequest(f"size must be from 1 to {MAX_PAGE_SIZE}, got {size}; ask for the next page instead")
        if page < 1:
            raise BadRequest(f"page counts from 1, got {page}")
        if page * size > MAX_RESULTS:
            raise BadRequest(f"page {page} of size {size} reaches past the first {MAX_RESULTS} results; "
                             "narrow the search with filters (layer, polarity, kind, score) instead")
        if filters.min_score is not None and filters.max_score is not None and filters.min_score > filters.max_score:
            raise BadRequest(f"min_score {filters.min_score} is above max_score {filters.max_score}")
        self._current()
        if self._problem is not None:
            raise LookupError(self._problem)
        top = page * size + 1  # one more than the page: whether a next page exists
        with self.cursor() as session:
            if mode == "text":
                result = session.text(query, top, filters)
            else:
                vector = self._encode(session, query)
                result = session.semantic(vector, top, filters)
        hits = result.hits[(page - 1) * size:page * size]
        return {"query": query, "mode": mode, "method": result.method, "page": page, "size": size,
                "has_more": len(result.hits) > page * size, "notes": list(dict.fromkeys(result.notes)),
                "hits": [{**hit.as_dict(), "page": feature_path(hit.layer, hit.polarity, hit.neuron, hit.kind)}
                         for hit in hits]}

    def _encode(self, session: SearchSession, query: str) -> np.ndarray:
        with self._encoder_lock:
            if self._encoder is None:
                from neuron_assets.embedding import sentence_encoder

                self._encoder = sentence_encoder(session.embedding_model())
            return np.asarray(self._encoder([query]), dtype=np.float32)[0]

    def filter_choices(self) -> dict:
        """What the search filters can be set to: the layers, polarities, kinds and simulators described."""
        views = self.views()
        if "neuron_descriptions" not in views:
            return {"layers": [], "polarities": [], "kinds": [], "simulators": [], "described": False}
        with self.cursor() as session:
            rows = session.con.execute(
                "SELECT DISTINCT layer, polarity, coalesce(kind, 'neuron'), coalesce(simulator, '') "
                "FROM neuron_descriptions").fetchall()
        return {"layers": sorted({r[0] for r in rows}), "polarities": sorted({r[1] for r in rows}, reverse=True),
                "kinds": sorted({r[2] for r in rows}), "simulators": sorted({r[3] for r in rows}), "described": True}

    # -- a feature ---------------------------------------------------------------------------
    def feature(self, layer: int, polarity: str, index: int, kind: str = "neuron") -> dict:
        """A feature's page: its description, every candidate and score, statistics, histogram,
        exemplars, output tokens, and its effects and cluster (or why they are not there)."""
        polarity = Polarity(polarity)
        view = _retried(lambda: load_neuron(self.store, layer, index, polarity, kind, other_polarity=False))
        collected = self.store.partitions("neuron_stats")
        others = [p for p in Polarity if p is not polarity and (layer, p.value) in collected and kind == "neuron"]
        data = feature_json(view, polarity, others)
        data["effects"] = self.effects(layer, polarity.value, index, kind)
        data["cluster"] = self.cluster_of(layer, polarity.value, index, kind)
        return data

    def effects(self, layer: int, polarity: str, index: int, kind: str = "neuron") -> dict:
        """The feature's rows of description_effects, or ``computed: false`` and why."""
        try:
            return self._effects(layer, polarity, index, kind)
        except TableGone:
            return {"computed": False, "message": NOT_COMPUTED.format(table=EFFECTS_TABLE)}

    def _effects(self, layer: int, polarity: str, index: int, kind: str) -> dict:
        if EFFECTS_TABLE not in self.views():
            return {"computed": False, "message": NOT_COMPUTED.format(table=EFFECTS_TABLE)}
        columns, rows = self._feature_rows(EFFECTS_TABLE, layer, polarity, index, kind)
        if not rows:
            return {"computed": False, "message": f"{EFFECTS_TABLE} has no row for this feature (its partition "
                                                  "was not computed yet, or the feature has no description)"}
        return {"computed": True, "columns": columns, "rows": rows}

    def cluster_of(self, layer: int, polarity: str, index: int, kind: str = "neuron") -> dict:
        """The cluster the feature's description belongs to, with its members, or ``computed: false``."""
        try:
            return self._cluster_of(layer, polarity, index, kind)
        except TableGone:
            return {"computed": False, "message": NOT_COMPUTED.format(table=CLUSTERS_TABLE)}

    def _cluster_of(self, layer: int, polarity: str, index: int, kind: str) -> dict:
        if CLUSTERS_TABLE not in self.views():
            return {"computed": False, "message": NOT_COMPUTED.format(table=CLUSTERS_TABLE)}
        columns, rows = self._feature_rows(CLUSTERS_TABLE, layer, polarity, index, kind)
        key = self._cluster_key()
        if not rows or key is None:
            return {"computed": False, "message": f"{CLUSTERS_TABLE} has no row for this feature"}
        cluster = self._cluster(rows[0][key])
        return {"computed": True, **cluster}

    def _feature_rows(self, table: str, layer: int, polarity: str, index: int, kind: str) -> tuple[list[str], list[dict]]:
        with self.cursor() as session:
            frame = session.con.execute(
                f"SELECT * FROM {table} WHERE layer = ? AND polarity = ? AND neuron = ?",
                [layer, polarity, index]).pl()
        if "kind" in frame.columns:
            frame = frame.filter(pl.col("kind").fill_null("neuron") == kind)
        elif kind != "neuron":
            frame = frame.clear()
        return frame.columns, _rows(frame)

    # -- overviews -----------------------------------------------------------------------------
    def layers(self) -> dict:
        """Per layer x polarity x kind: how well its descriptions score (the layer_summary view)."""
        if "layer_summary" not in self.views():
            return {"described": False, "message": "no feature is described yet: run `neuron-assets run` (through "
                                                   "neuron_descriptions) first", "layers": []}
        with self.cursor() as session:
            frame = session.con.execute("SELECT * FROM layer_summary ORDER BY layer, polarity DESC, kind").pl()
        rows = _rows(frame)
        for row in rows:
            row["page"] = layer_path(row["layer"], row["polarity"], row["kind"])
        return {"described": True, "layers": rows}

    def layer_features(self, layer: int, polarity: str, kind: str = "neuron", page: int = 1, size: int = 50,
                       order: str = "test_score") -> dict:
        """One layer x polarity's described features of ``kind``, best (by ``order``) first, a page at a time."""
        orders = {"test_score": "test_score DESC NULLS LAST, neuron", "neuron": "neuron",
                  "val_score": "val_score DESC NULLS LAST, neuron"}
        if order not in orders:
            raise BadRequest(f"order must be one of {', '.join(orders)}, not {order!r}")
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise BadRequest(f"size must be from 1 to {MAX_PAGE_SIZE}, got {size}")
        if page < 1:
            raise BadRequest(f"page counts from 1, got {page}")
        polarity = Polarity(polarity).value
        if "neuron_descriptions" not in self.views():
            raise LookupError("no feature is described yet: run `neuron-assets run` (through neuron_descriptions) first")
        where = "layer = ? AND polarity = ? AND coalesce(kind, 'neuron') = ?"
        with self.cursor() as session:
            total = session.con.execute(f"SELECT count(*) FROM neuron_descriptions WHERE {where}",
                                        [layer, polarity, kind]).fetchone()[0]
            frame = session.con.execute(
                f"SELECT neuron, description, scorer, simulator, val_score, test_score, control_test_score, "
                f"n_candidates FROM neuron_descriptions WHERE {where} ORDER BY {orders[order]} "
                f"LIMIT {int(size)} OFFSET {int((page - 1) * size)}", [layer, polarity, kind]).pl()
        if total == 0:
            raise LookupError(f"layer {layer} {polarity} has no described {kind} features; see /api/layers for those described")
        rows = _rows(frame)
        for row in rows:
            row["page"] = feature_path(layer, polarity, row["neuron"], kind)
        return {"layer": layer, "polarity": polarity, "kind": kind, "page": page, "size": size, "total": total,
                "order": order, "features": rows}

    def clusters(self) -> dict:
        """Every cluster: its id, size, label and coherence (as the clusters table has them)."""
        try:
            return self._clusters()
        except TableGone:
            return {"computed": False, "message": NOT_COMPUTED.format(table=CLUSTERS_TABLE), "clusters": []}

    def _clusters(self) -> dict:
        if CLUSTERS_TABLE not in self.views():
            return {"computed": False, "message": NOT_COMPUTED.format(table=CLUSTERS_TABLE), "clusters": []}
        key = self._cluster_key()
        if key is None:
            return {"computed": False, "clusters": [], "message": f"{CLUSTERS_TABLE} has no cluster id column "
                                                                  f"(one of {', '.join(CLUSTER_ID_COLUMNS)})"}
        if SUMMARY_VIEW in self.views():
            query = f"SELECT {key} AS id, * EXCLUDE ({key}) FROM {SUMMARY_VIEW} ORDER BY size DESC, id"
        else:
            columns = self._columns(CLUSTERS_TABLE)
            extra = "".join(f", any_value({c}) AS {c}" for c in ("label", "coherence") if c in columns)
            query = f"SELECT {key} AS id, count(*) AS size{extra} FROM {CLUSTERS_TABLE} GROUP BY {key} ORDER BY size DESC, id"
        with self.cursor() as session:
            frame = session.con.execute(query).pl()
        rows = _rows(frame)
        for row in rows:
            row["page"] = f"/clusters/{row['id']}"
        return {"computed": True, "clusters": rows}

    def cluster(self, cluster_id) -> dict:
        """One cluster and its members, each with its feature's page."""
        try:
            return self._cluster(cluster_id)
        except TableGone:
            raise LookupError(NOT_COMPUTED.format(table=CLUSTERS_TABLE)) from None

    def _cluster(self, cluster_id) -> dict:
        if CLUSTERS_TABLE not in self.views():
            raise LookupError(NOT_COMPUTED.format(table=CLUSTERS_TABLE))
        key = self._cluster_key()
        if key is None:
            raise LookupError(f"{CLUSTERS_TABLE} has no cluster id column (one of {', '.join(CLUSTER_ID_COLUMNS)})")
        with self.cursor() as session:
            frame = session.con.execute(f"SELECT * FROM {CLUSTERS_TABLE} WHERE CAST({key} AS VARCHAR) = ?",
                                        [str(cluster_id)]).pl()
        if frame.height == 0:
            raise LookupError(f"no cluster {cluster_id}; /api/clusters lists them")
        members = _rows(frame.sort("member_rank") if "member_rank" in frame.columns else frame)
        for row in members:
            if {"layer", "polarity", "neuron"} <= row.keys():
                row["page"] = feature_path(row["layer"], row["polarity"], row["neuron"], row.get("kind") or "neuron")
        first = members[0]
        return {"id": first[key], "size": len(members), "label": first.get("label"),
                "coherence": first.get("coherence"), "page": f"/clusters/{first[key]}", "columns": frame.columns,
                "members": members}

    def _columns(self, table: str) -> list[str]:
        with self.cursor() as session:
            return [row[0] for row in session.con.execute(f"DESCRIBE {table}").fetchall()]

    def _cluster_key(self) -> str | None:
        columns = self._columns(CLUSTERS_TABLE)
        return next((c for c in CLUSTER_ID_COLUMNS if c in columns), None)


def _retried(read: Callable, attempts: int = 3):
    """``read()``, again when a file it read was replaced by a writer meanwhile (the old one
    vanished between listing and opening, or a changed file met its new checksum record)."""
    for attempt in range(attempts):
        try:
            return read()
        except (FileNotFoundError, pl.exceptions.ComputeError, DamagedTableError, duckdb.IOException):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _rows(frame: pl.DataFrame) -> list[dict]:
    return [{key: plain(value) for key, value in row.items()} for row in frame.iter_rows(named=True)]
