"""Description search: sentence vectors of the descriptions, searched by meaning (cosine
similarity, an HNSW index) or by words (BM25).

    make_description_embeddings(config, partitions, run_id)   each partition's vectors (Parquet)
    build_index(store)                                             the search index over every partition
    search(store, "closing brackets", top=10, layer=12)            ranked hits, semantic or --text

The vectors are a table of their own, ``description_embeddings`` (``data/description_embeddings/
layer=L/polarity=P/data.parquet``): one row per selected description (and, with
``search.candidates``, per candidate), keyed by the SHA-256 of its text, so a re-materialization
embeds only the texts it has not seen (a rescore that changes a few selections re-embeds a few).

The *search index* is a DuckDB file derived from that table, as the catalog is derived from all
of them: ``data/description_index/index.duckdb`` holds the rows in a table with an HNSW index
(cosine, from the pinned ``vss`` extension) and a BM25 full-text index (the pinned ``fts``
extension). It lives under ``data/`` because the contained read connection
(:meth:`Store.connect`) may open files there and nowhere else. It records the embedding files
it was built from; a reader that finds it stale builds it again (or, where the store cannot be
written, searches the Parquet files exactly). Delete it and the next search rebuilds it.

Filtered semantic searches (a layer, a polarity, a least score) scan the matching rows exactly:
the HNSW index of DuckDB's vss applies a WHERE clause after taking its top k, which would return
fewer than k hits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import duckdb
import numpy as np
import polars as pl

from neuron_assets.config import Config
from neuron_assets.store import Store, atomic_path, pinned_extension_path, sql_string, with_lineage
from neuron_assets.types import Partition, Polarity

EMBEDDINGS_TABLE = "description_embeddings"
DESCRIPTIONS_TABLE = "neuron_descriptions"
CANDIDATES_TABLE = "candidate_descriptions"
INDEX_NAME = "description_index"  # the attached database's name in a search connection
SELECTED, CANDIDATE = "selected", "candidate"
ENCODE_CHUNK = 4096  # texts per call to the encoder: bounded memory at Llama scale

Log = Callable[[str], None]
Mode = Literal["semantic", "text"]


def _quiet(_: str) -> None:
    pass


# -- the embeddings table ------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingsWritten:
    layer: int
    polarity: str
    path: Path
    rows: int
    embedded: int  # texts sent to the encoder
    reused: int  # texts whose vector came from the table's previous version
    seconds: float


def make_description_embeddings(config: Config, partitions: list[Partition], run_id: str,
                                encoder: Callable[[Sequence[str]], np.ndarray] | None = None, log: Log = _quiet,
                                on_partition=None) -> list[EmbeddingsWritten]:
    """The description_embeddings stage: each partition embedded and written in turn
    (``on_partition(partition, files)`` hears of each as it is done)."""
    written = []
    for partition in map(Partition.of, partitions):
        written.append(embed_partition(config, partition, run_id, encoder, log))
        if on_partition is not None:
            on_partition(partition, [written[-1].path])
    return written


def embed_partition(config: Config, partition: Partition, run_id: str,
                    encoder: Callable[[Sequence[str]], np.ndarray] | None = None,
                    log: Log = _quiet) -> EmbeddingsWritten:
    """Embed one partition's selected descriptions (and candidates, with ``search.candidates``),
    reusing the vectors of texts the partition's previous embeddings already hold."""
    layer, polarity = partition
    started = time.perf_counter()
    store = Store(config.store_root)
    polarity = Polarity(polarity).value
    texts = descriptions_to_embed(store, layer, polarity, candidates=config.search.candidates)
    model = config.search.embedding_model
    known = _previous_vectors(store, layer, polarity, model)
    missing = sorted(set(texts["text_hash"].to_list()) - set(known))
    if missing:
        encode = encoder
        if encode is None:
            from neuron_assets.embedding import sentence_encoder

            encode = sentence_encoder(model)
        text_of = dict(zip(texts["text_hash"].to_list(), texts["description"].to_list()))
        for start in range(0, len(missing), ENCODE_CHUNK):
            chunk = missing[start:start + ENCODE_CHUNK]
            vectors = np.asarray(encode([text_of[h] for h in chunk]), dtype=np.float32)
            known.update(zip(chunk, vectors))
    frame = embeddings_frame(texts, known, model)
    frame = with_lineage(frame, config.subject.model, config.hash, run_id)
    path = store.write(EMBEDDINGS_TABLE, frame, layer, polarity)
    log(f"layer {layer} {polarity}: {frame.height} description vectors ({len(missing)} embedded, "
        f"{texts['text_hash'].n_unique() - len(missing)} reused)")
    return EmbeddingsWritten(layer, polarity, path, frame.height, len(missing),
                             texts["text_hash"].n_unique() - len(missing), time.perf_counter() - started)


def descriptions_to_embed(store: Store, layer: int, polarity: str, candidates: bool = False) -> pl.DataFrame:
    """layer, polarity, kind, neuron, source (selected | candidate), candidate, description, score
    (the selected description's test score; null for a candidate), text_hash."""
    selected = store.read(DESCRIPTIONS_TABLE, layer, polarity)
    frames = [selected.select(
        "kind", pl.col("neuron").cast(pl.Int64), pl.lit(SELECTED).alias("source"),
        pl.col("candidate").cast(pl.Int64) if "candidate" in selected.columns else pl.lit(None, pl.Int64).alias("candidate"),
        pl.col("description").cast(pl.String), pl.col("test_score").cast(pl.Float64).alias("score"))]
    if candidates and store.exists(CANDIDATES_TABLE, layer, polarity):
        pool = store.read(CANDIDATES_TABLE, layer, polarity)
        frames.append(pool.select(
            "kind", pl.col("neuron").cast(pl.Int64), pl.lit(CANDIDATE).alias("source"), pl.col("candidate").cast(pl.Int64),
            pl.col("description").cast(pl.String), pl.lit(None, pl.Float64).alias("score")))
    rows = pl.concat(frames).filter(pl.col("description").is_not_null() & (pl.col("description").str.strip_chars() != ""))
    return rows.with_columns(pl.lit(layer, pl.Int64).alias("layer"), pl.lit(polarity).alias("polarity"),
                             pl.col("description").map_elements(text_hash, return_dtype=pl.String).alias("text_hash")
                             ).select("layer", "polarity", "kind", "neuron", "source", "candidate", "description",
                                      "score", "text_hash")


def embeddings_frame(texts: pl.DataFrame, vectors: dict[str, np.ndarray], model: str) -> pl.DataFrame:
    """The table's rows: ``texts`` (as from :func:`descriptions_to_embed`) with each text's
    vector as a fixed-size float32 array."""
    if texts.height:
        matrix = np.stack([vectors[h] for h in texts["text_hash"].to_list()]).astype(np.float32, copy=False)
    else:
        matrix = np.zeros((0, 0), dtype=np.float32)
    dim = matrix.shape[1]
    return texts.with_columns(pl.lit(model).alias("embedding_model"),
                              pl.Series("embedding", matrix, dtype=pl.Array(pl.Float32, dim)))


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _previous_vectors(store: Store, layer: int, polarity: str, model: str) -> dict[str, np.ndarray]:
    """text hash -> vector from the partition's current file, if it was made with ``model``."""
    if not store.exists(EMBEDDINGS_TABLE, layer, polarity):
        return {}
    try:
        old = store.read(EMBEDDINGS_TABLE, layer, polarity, columns=["text_hash", "embedding_model", "embedding"])
    except Exception:  # a damaged or older file: embed again
        return {}
    old = old.filter(pl.col("embedding_model") == model).unique("text_hash")
    if old.height == 0:
        return {}
    matrix = np.asarray(old["embedding"].to_numpy(), dtype=np.float32).reshape(old.height, -1)
    return dict(zip(old["text_hash"].to_list(), matrix))


# -- the search index ------------------------------------------------------------------------


def index_path(store: Store) -> Path:
    return store.local_dir / "data" / INDEX_NAME / "index.duckdb"  # DuckDB needs a real file: local on a URL root


@dataclass(frozen=True)
class IndexBuilt:
    path: Path
    rows: int
    dim: int
    hnsw: bool
    fts: bool
    seconds: float


def build_index(store: Store, log: Log = _quiet, hnsw: bool = True) -> IndexBuilt:
    """(Re)build the search index over every embeddings partition, atomically; ``hnsw=False``
    leaves out the HNSW index (semantic search then scans exactly)."""
    started = time.perf_counter()
    files = _embedding_files(store)
    if not files:
        raise LookupError(f"no description embeddings under {store.table_dir(EMBEDDINGS_TABLE)}; materialize "
                          f"them first (neuron-assets run, or the '{EMBEDDINGS_TABLE}' asset in the Dagster UI)")
    target = index_path(store)
    with atomic_path(target) as tmp:
        con = duckdb.connect(str(tmp), config={"autoinstall_known_extensions": False,
                                               "autoload_known_extensions": False})
        try:
            loaded = _load_extensions(con)
            if store.remote:
                con.register_filesystem(store.fs)
            sources = "[" + ", ".join(sql_string(path) for path, _, _ in files) + "]"
            dim = con.execute(f"SELECT max(len(embedding)) FROM read_parquet({sources})").fetchone()[0] or 0
            columns = {row[0] for row in con.execute(
                f"DESCRIBE SELECT * FROM read_parquet({sources}, union_by_name = true)").fetchall()}
            kind = "coalesce(kind, 'neuron')" if "kind" in columns else "'neuron'"  # older files: neurons only
            con.execute(f"""
                CREATE TABLE descriptions AS
                SELECT row_number() OVER () AS doc_id, layer::INTEGER AS layer, polarity,
                       {kind} AS kind, neuron::BIGINT AS neuron,
                       source, candidate::BIGINT AS candidate, description, score, text_hash, embedding_model,
                       embedding::FLOAT[{dim}] AS embedding
                FROM read_parquet({sources}, union_by_name = true)
                ORDER BY layer, polarity, neuron, source DESC, candidate""")
            rows = con.execute("SELECT count(*) FROM descriptions").fetchone()[0]
            hnsw = hnsw and "vss" in loaded and rows > 0
            if hnsw:
                con.execute("SET hnsw_enable_experimental_persistence = true")
                con.execute("CREATE INDEX descriptions_hnsw ON descriptions USING HNSW (embedding) "
                            "WITH (metric = 'cosine')")
            fts = "fts" in loaded and rows > 0
            if fts:
                con.execute("PRAGMA create_fts_index('descriptions', 'doc_id', 'description', overwrite = 1)")
            con.execute("CREATE TABLE index_info (files VARCHAR, dim INTEGER, hnsw BOOLEAN, fts BOOLEAN, "
                        "built_at TIMESTAMPTZ)")
            con.execute("INSERT INTO index_info VALUES (?, ?, ?, ?, now())", [_listing(files), dim, hnsw, fts])
            con.execute("CHECKPOINT")
        finally:
            con.close()
    # Beside the index, what it was built from: a reader checks it without opening the index.
    with atomic_path(_listing_path(store)) as tmp:
        tmp.write_text(_listing(files))
    built = IndexBuilt(target, rows, dim, hnsw, fts, time.perf_counter() - started)
    log(f"search index: {rows} descriptions, {dim}-d, HNSW {'yes' if hnsw else 'no'}, BM25 {'yes' if fts else 'no'} "
        f"({built.seconds:.1f} s)")
    return built


def index_stale(store: Store) -> bool:
    """True when the index is missing, unreadable, or was built from other embedding files."""
    if not index_path(store).exists():
        return True
    try:
        recorded = _listing_path(store).read_text()
    except (OSError, UnicodeDecodeError):
        return True
    return recorded != _listing(_embedding_files(store))


def _listing_path(store: Store) -> Path:
    return index_path(store).with_name("index.files.json")


def _embedding_files(store: Store) -> list[tuple[str, int, int]]:
    """(path or URL, size, modification time) of every embeddings partition."""
    return [(Path(entry.path).as_posix() if not store.remote else entry.path, entry.size, entry.modified_ns)
            for entry in store.data_files() if entry.table == EMBEDDINGS_TABLE and entry.layer is not None]


def _listing(files: list[tuple[str, int, int]]) -> str:
    return json.dumps([[path, size, mtime] for path, size, mtime in files])


def _load_extensions(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Load the pinned vss and fts extensions from their packages; those that cannot load are
    left out (semantic search then scans exactly, text search uses ILIKE)."""
    loaded = set()
    for name in ("vss", "fts"):
        try:
            con.execute(f"LOAD {sql_string(pinned_extension_path(name))}")
        except (ValueError, duckdb.Error):
            continue
        loaded.add(name)
    return loaded


# -- searching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    rank: int
    match: float  # cosine similarity (semantic), BM25 score (text) or words matched (ILIKE)
    layer: int
    polarity: str
    neuron: int
    source: str
    candidate: int | None
    description: str
    score: float | None  # the description's test score (null for a candidate)
    kind: str = "neuron"  # the feature's kind: neuron, or sae (an SAE latent; neuron is its index)

    @property
    def show_command(self) -> str:
        feature = "" if self.kind == "neuron" else f" --feature {self.kind}"
        return f"neuron-assets show {self.layer} {self.neuron} --polarity {self.polarity}{feature}"

    def as_dict(self) -> dict:
        return {"rank": self.rank, "match": self.match, "layer": self.layer, "polarity": self.polarity,
                "kind": self.kind, "neuron": self.neuron, "source": self.source, "candidate": self.candidate,
                "description": self.description, "score": self.score, "show": self.show_command}


@dataclass
class SearchResult:
    hits: list[Hit]
    method: str  # hnsw | exact | bm25 | ilike
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Filters:
    layer: int | None = None
    polarity: str | None = None
    min_score: float | None = None
    kind: str | None = None  # neuron, sae
    max_score: float | None = None
    simulator: str | None = None  # the simulator of the feature's selecting scorer (neuron_descriptions.simulator)

    @property
    def any(self) -> bool:
        return any(value is not None for value in (self.layer, self.polarity, self.min_score, self.kind,
                                                   self.max_score, self.simulator))

    def where(self) -> tuple[str, list]:
        """A WHERE clause over the columns layer, polarity, kind, neuron and score; the simulator
        filter reads the catalog's neuron_descriptions view."""
        clauses, params = ["TRUE"], []
        if self.layer is not None:
            clauses.append("layer = ?")
            params.append(self.layer)
        if self.polarity is not None:
            clauses.append("polarity = ?")
            params.append(Polarity(self.polarity).value)
        if self.kind is not None:
            clauses.append("kind = ?")
            params.append(self.kind)
        if self.min_score is not None:
            clauses.append("score >= ?")
            params.append(self.min_score)
        if self.max_score is not None:
            clauses.append("score <= ?")
            params.append(self.max_score)
        if self.simulator is not None:
            clauses.append("(layer, polarity, kind, neuron) IN (SELECT layer, polarity, coalesce(kind, 'neuron'), neuron "
                           "FROM neuron_descriptions WHERE coalesce(simulator, '') = ?)")
            params.append(self.simulator)
        return " AND ".join(clauses), params


def search(store: Store, query: str, top: int = 10, mode: Mode = "semantic", filters: Filters = Filters(),
           encoder: Callable[[Sequence[str]], np.ndarray] | None = None, log: Log = _quiet) -> SearchResult:
    """The ``top`` descriptions nearest ``query`` in meaning (``semantic``) or by BM25 (``text``)."""
    if not query.strip():
        raise ValueError("the search text is empty; give a few words, e.g. neuron-assets search \"closing brackets\"")
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    # Each extension costs its load on every connection: only the one the search uses.
    with open_search(store, log, extensions=("fts",) if mode == "text" else ("vss",)) as session:
        if mode == "text":
            return session.text(query, top, filters)
        model = session.embedding_model()
        if encoder is None:
            from neuron_assets.embedding import sentence_encoder

            encoder = sentence_encoder(model)
        vector = np.asarray(encoder([query]), dtype=np.float32)[0]
        return session.semantic(vector, top, filters)


def open_search(store: Store, log: Log = _quiet, extensions: Sequence[str] = ("vss", "fts"),
                rebuild: bool = True) -> "SearchSession":
    """A contained read connection with the search index attached (rebuilt first when stale),
    and those of the pinned ``extensions`` that load. ``rebuild=False`` (a server beside a run
    that writes the store) writes nothing: a stale index is searched as it is, the rows it was
    built from, until the description_embeddings stage that made it stale rebuilds it."""
    if not _embedding_files(store):
        raise LookupError(f"no description embeddings under {store.table_dir(EMBEDDINGS_TABLE)}; run "
                          "`neuron-assets run` (or materialize the 'description_embeddings' asset) first")
    notes = []
    current = not index_stale(store)
    if not current and not rebuild and index_path(store).exists():
        current = True
        notes.append("the search index is older than the newest description embeddings; it answers from the "
                     "descriptions it was built from until the description_embeddings stage rebuilds it")
    elif not current and not rebuild:
        notes.append("no search index yet; searching the Parquet files exactly")
    elif not current:
        try:
            build_index(store, log)
            current = True
        except OSError as err:  # a read-only copy of a store: exact search over the Parquet files
            notes.append(f"the search index could not be rebuilt ({err}); searching the Parquet files exactly")
    loaded = tuple(name for name in _loadable_extensions() if name in extensions)
    while True:
        try:
            con = store.connect(extensions=loaded)
            break
        except duckdb.Error as err:  # an extension file that does not load here: go on without it
            if not loaded:
                raise
            notes.append(f"the {loaded[-1]} extension does not load ({str(err).splitlines()[0]})")
            loaded = loaded[:-1]
    return SearchSession(con, index_path(store) if current else None, set(loaded), notes)


def _loadable_extensions() -> tuple[str, ...]:
    """The pinned extensions whose packages are installed."""
    names = []
    for name in ("vss", "fts"):
        try:
            pinned_extension_path(name)
        except ValueError:
            continue
        names.append(name)
    return tuple(names)


class SearchSession:
    """Queries over one contained connection: the catalog's views, plus the index when current."""

    def __init__(self, con: duckdb.DuckDBPyConnection, index: Path | None, extensions: set[str], notes: list[str]):
        self.con = con
        self.notes = notes
        self.vss, self.fts_loaded = "vss" in extensions, "fts" in extensions
        self.info = None
        path = index
        if path is not None:
            try:
                con.execute(f"ATTACH {sql_string(path.resolve().as_posix())} AS {INDEX_NAME} (READ_ONLY)")
                files, dim, hnsw, fts = con.execute(
                    f"SELECT files, dim, hnsw, fts FROM {INDEX_NAME}.index_info").fetchone()
                self.info = {"dim": dim, "hnsw": hnsw and self.vss, "fts": fts and self.fts_loaded}
            except duckdb.Error as err:
                self.notes.append(f"the search index {path} cannot be read ({str(err).splitlines()[0]}); "
                                  "searching the Parquet files exactly")
        # Rows come from the index's table, or straight from the Parquet files through the view.
        self.table = f"{INDEX_NAME}.main.descriptions" if self.info else EMBEDDINGS_TABLE

    def over(self, con: duckdb.DuckDBPyConnection) -> "SearchSession":
        """This session's index and extensions over another cursor of its connection (a server
        answers on a cursor per request; a cursor sees the attached index and loaded extensions)."""
        session = copy.copy(self)
        session.con, session.notes = con, list(self.notes)
        return session

    def __enter__(self) -> "SearchSession":
        return self

    def __exit__(self, *exc) -> None:
        self.con.close()

    def embedding_model(self) -> str:
        models = [row[0] for row in self.con.execute(
            f"SELECT DISTINCT embedding_model FROM {self.table}").fetchall()]
        if len(models) > 1:
            raise ValueError(f"the store's description vectors come from several models ({', '.join(models)}); "
                             "re-materialize description_embeddings with one search.embedding_model")
        if not models:
            raise LookupError("the description embeddings table is empty: no neuron has a description yet")
        return models[0]

    def semantic(self, vector: np.ndarray, top: int, filters: Filters = Filters(), exact: bool = False) -> SearchResult:
        """Nearest by cosine similarity: the HNSW index when unfiltered, else (or when ``exact``)
        a scan of every matching row."""
        dim = int(vector.shape[0])
        # The vector goes in once, as a variable: a literal in both places it is used costs its
        # parsing twice, and a prepared parameter is converted from Python on every execution.
        self.con.execute(f"SET VARIABLE search_vector = [{', '.join(repr(float(x)) for x in vector)}]::FLOAT[{dim}]")
        literal = "getvariable('search_vector')"
        where, params = filters.where()
        # The HNSW scan is chosen for ORDER BY <distance to a constant> LIMIT k, with no filter.
        method = "hnsw" if self.info and self.info["hnsw"] and not filters.any and not exact else "exact"
        embedding = "embedding" if self.info else f"embedding::FLOAT[{dim}]"
        if method == "hnsw":
            # min_by(row, distance, k) is answered by the index alone; ORDER BY ... LIMIT k is
            # too, but DuckDB then joins the k row ids back with a scan of the whole table.
            rows = self.con.execute(
                f"SELECT 1 - array_cosine_distance(hit.embedding, {literal}), hit.layer, hit.polarity, hit.neuron, hit.kind, "
                f"hit.source, hit.candidate, hit.description, hit.score FROM (SELECT unnest(min_by(d, "
                f"array_cosine_distance(d.embedding, {literal}), {int(top)})) AS hit FROM {self.table} AS d)").fetchall()
            return SearchResult(_hits(rows), method, self.notes)
        # Ordered by similarity, not distance: the optimizer maps only ORDER BY <distance> LIMIT k to
        # the HNSW index, which would apply the filter to its top k and return fewer hits.
        rows = self.con.execute(
            f"SELECT array_cosine_similarity({embedding}, {literal}) AS match, layer, polarity, neuron, kind, source, "
            f"candidate, description, score FROM {self.table} WHERE {where} "
            f"ORDER BY match DESC, layer, polarity, neuron LIMIT {int(top)}", params).fetchall()
        return SearchResult(_hits(rows), method, self.notes)

    def text(self, query: str, top: int, filters: Filters = Filters()) -> SearchResult:
        """BM25 over the descriptions (the fts index); where it is not there, every word by ILIKE."""
        where, params = filters.where()
        if self.info and self.info["fts"]:
            rows = self.con.execute(_BM25_TOP.format(fts=f"{INDEX_NAME}.fts_main_descriptions",
                                                     table=f"{INDEX_NAME}.main.descriptions", where=where,
                                                     top=int(top)), [query, *params]).fetchall()
            return SearchResult(_hits(rows), "bm25", self.notes)
        words = [w for w in re.findall(r"\w+", query.lower()) if w] or [query.strip().lower()]
        self.notes.append("BM25 full-text search is not available here (the fts extension or the search index is "
                          "missing); ranked by ILIKE word matches instead")
        matched = " + ".join("(description ILIKE ? ESCAPE '\\')::INTEGER" for _ in words)
        rows = self.con.execute(
            f"SELECT match, layer, polarity, neuron, kind, source, candidate, description, score FROM ("
            f"SELECT *, ({matched})::DOUBLE + (description ILIKE ? ESCAPE '\\')::INTEGER AS match FROM {self.table}) "
            f"WHERE match > 0 AND {where} ORDER BY match DESC, score DESC NULLS LAST, layer, neuron LIMIT {int(top)}",
            [*(f"%{_like_escape(w)}%" for w in words), f"%{_like_escape(query.strip())}%", *params]).fetchall()
        return SearchResult(_hits(rows), "ilike", self.notes)


# BM25 straight from the fts index's term tables: only the documents holding a query term are
# scored, in one grouped pass. fts's own ``match_bm25`` macro is a lookup per description row.
# The formula, the tokenizer, the Porter stemmer and k = 1.2, b = 0.75 are the macro's, so the scores are equal to it (a test holds them equal). The top k
# are chosen over the filter columns alone; only their k rows are read whole.
_BM25_TOP = """
WITH tokens AS (SELECT DISTINCT stem(unnest({fts}.tokenize(?)), 'porter') AS term),
     term_tf AS (SELECT t.termid, t.docid, count(*) AS tf
                 FROM {fts}.terms AS t JOIN {fts}.dict AS d ON t.termid = d.termid JOIN tokens ON d.term = tokens.term
                 GROUP BY t.termid, t.docid),
     scores AS (SELECT docs.name AS doc_id,
                       sum(log(((stats.num_docs - d.df) + 0.5) / (d.df + 0.5) + 1)
                           * (tf * (1.2 + 1)) / (tf + 1.2 * (1 - 0.75 + 0.75 * (docs.len / stats.avgdl)))) AS match
                FROM term_tf JOIN {fts}.docs AS docs ON term_tf.docid = docs.docid
                     JOIN {fts}.dict AS d ON term_tf.termid = d.termid, {fts}.stats AS stats
                GROUP BY docs.name),
     best AS (SELECT doc_id, match FROM scores JOIN (SELECT doc_id, layer, polarity, kind, neuron, score FROM {table}) USING (doc_id)
              WHERE {where} ORDER BY match DESC, doc_id LIMIT {top})
SELECT match, layer, polarity, neuron, kind, source, candidate, description, score
FROM best JOIN {table} AS descriptions USING (doc_id) ORDER BY match DESC, doc_id"""


def _hits(rows) -> list[Hit]:
    return [Hit(rank, float(match), int(layer), polarity, int(neuron), source, candidate, description, score, kind)
            for rank, (match, layer, polarity, neuron, kind, source, candidate, description, score)
            in enumerate(rows, 1)]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

