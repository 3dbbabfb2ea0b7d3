"""Description search: sentence vectors of the descriptions, searched by meaning (cosine
similarity, an IVF index per partition) or by words (BM25).

    make_description_embeddings(config, partitions, run_id)   each partition's vectors (Parquet)
    build_index(store)                                             the search index over every partition
    search(store, "closing brackets", top=10, layer=12)            ranked hits, semantic or --text

The vectors are a table of their own, ``description_embeddings`` (``data/description_embeddings/
layer=L/polarity=P/data.parquet``): one row per selected description (and, with
``search.candidates``, per candidate), keyed by the SHA-256 of its text, so a re-materialization
embeds only the texts it has not seen (a rescore that changes a few selections re-embeds a few).

The *search index* is derived from that table, as the catalog is derived from all of them:
one shard per partition under ``data/description_index/`` (:mod:`neuron_assets.description_index`:
the vectors in a faiss IVF index, BM25 postings, the rows), and ``index.json``, the manifest of
the shards and the embedding files they were built from. A re-scored partition's new file gets
a new shard; the others stay. A reader that finds the manifest stale updates it (or, where the
store cannot be written, searches the Parquet files exactly). Delete the folder and the next
search builds it again. Filters (layer, polarity, kind, score range) apply inside each shard's
search; the simulator filter, which reads ``neuron_descriptions``, scans exactly.
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
from neuron_assets.store import Store, atomic_path, with_lineage
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
    """The index's manifest: the shards it holds (neuron_assets.description_index), written last."""
    return store.local_dir / "data" / INDEX_NAME / "index.json"  # local also on a URL root


def _shards_dir(store: Store) -> Path:
    return index_path(store).parent / "shards"


@dataclass(frozen=True)
class IndexBuilt:
    path: Path
    rows: int
    shards: int
    built: int  # shards built this time (the others were current)
    seconds: float


def build_index(store: Store, log: Log = _quiet, threads: int | None = None) -> IndexBuilt:
    """Bring the search index up to date: a shard for every embeddings partition that has none for
    its current file (a re-scored partition's, a new one's), shards of files gone removed, then the
    manifest. Each shard is written whole under a temporary name and renamed."""
    from neuron_assets import description_index as DI

    started = time.perf_counter()
    files = _embedding_files(store)
    if not files:
        raise LookupError(f"no description embeddings under {store.table_dir(EMBEDDINGS_TABLE)}; materialize "
                          f"them first (neuron-assets run, or the '{EMBEDDINGS_TABLE}' asset in the Dagster UI)")
    folder = _shards_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    try:  # the rows of shards built before, so the count needs no shard loaded
        previous = json.loads(index_path(store).read_text())
        known = {entry["shard"]: entry.get("rows") for entry in previous.get("shards", [])}
    except (OSError, ValueError):
        previous, known = None, {}
    shards, built = [], 0
    for layer, polarity, path, size, modified in files:
        name = DI.shard_name(layer, polarity, path, size, modified)
        target = folder / name
        rows = known.get(name) if target.exists() else None
        if rows is None:
            frame = store.read(EMBEDDINGS_TABLE, layer, polarity)
            with atomic_path(target) as tmp:
                rows = DI.build_shard(frame, tmp, threads)
            built += 1
            log(f"search index: layer {layer} {polarity}: {rows} descriptions indexed")
        shards.append({"layer": layer, "polarity": polarity, "shard": name, "file": [path, size, modified],
                       "rows": rows})
    manifest = {"format": DI.FORMAT, "shards": shards}
    if manifest != previous:  # unchanged: a reader watching the manifest need not reopen
        with atomic_path(index_path(store)) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
    wanted = {entry["shard"] for entry in shards}
    for old in folder.glob("*.npz"):
        if old.name not in wanted:  # a reader holding it open keeps reading it (POSIX)
            old.unlink(missing_ok=True)
    rows = sum(entry["rows"] for entry in shards)
    done = IndexBuilt(index_path(store), rows, len(shards), built, time.perf_counter() - started)
    log(f"search index: {rows} descriptions in {len(shards)} shards ({built} built, {done.seconds:.1f} s)")
    return done


def load_index(store: Store):
    """The current shards as one :class:`neuron_assets.description_index.ShardedIndex`, or None
    when the manifest or a shard it names is missing."""
    from neuron_assets import description_index as DI

    try:
        manifest = json.loads(index_path(store).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != DI.FORMAT:
        return None
    try:
        shards = [DI.load_shard(_shards_dir(store) / entry["shard"], entry["layer"], entry["polarity"])
                  for entry in manifest["shards"]]
    except (OSError, ValueError, KeyError):
        return None
    return DI.ShardedIndex(shards)


def index_stale(store: Store) -> bool:
    """True when the manifest is missing or was written for other embedding files."""
    from neuron_assets import description_index as DI

    try:
        manifest = json.loads(index_path(store).read_text())
    except (OSError, ValueError):
        return True
    recorded = [tuple(entry["file"]) for entry in manifest.get("shards", [])]
    current = [(path, size, modified) for _, _, path, size, modified in _embedding_files(store)]
    return manifest.get("format") != DI.FORMAT or recorded != current


def _embedding_files(store: Store) -> list[tuple[int, str, str, int, int]]:
    """(layer, polarity, path or URL, size, modification time) of every embeddings partition."""
    return sorted((int(entry.layer), str(entry.polarity), Path(entry.path).as_posix() if not store.remote else entry.path,
                   entry.size, entry.modified_ns)
                  for entry in store.data_files() if entry.table == EMBEDDINGS_TABLE and entry.layer is not None)



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
    method: str  # ivf | exact | bm25 | ilike
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
    with open_search(store, log) as session:
        if mode == "text":
            return session.text(query, top, filters)
        model = session.embedding_model()
        if encoder is None:
            from neuron_assets.embedding import sentence_encoder

            encoder = sentence_encoder(model)
        vector = np.asarray(encoder([query]), dtype=np.float32)[0]
        return session.semantic(vector, top, filters)


def open_search(store: Store, log: Log = _quiet, rebuild: bool = True) -> "SearchSession":
    """A contained read connection (the catalog's views) and the search index, brought up to date
    first. ``rebuild=False`` (a server beside a run that writes the store) writes nothing: a
    stale index answers from the descriptions it was built from until the description_embeddings
    stage that made it stale brings it up to date."""
    if not _embedding_files(store):
        raise LookupError(f"no description embeddings under {store.table_dir(EMBEDDINGS_TABLE)}; run "
                          "`neuron-assets run` (or materialize the 'description_embeddings' asset) first")
    notes = []
    if index_stale(store):
        if not rebuild:
            notes.append("the search index is older than the newest description embeddings (or missing); it "
                         "answers from what it was built from until the description_embeddings stage updates it")
        else:
            try:
                build_index(store, log)
            except OSError as err:  # a read-only copy of a store: exact search over the Parquet files
                notes.append(f"the search index could not be updated ({err}); searching the Parquet files exactly")
    index = load_index(store)
    if index is None and not notes:
        notes.append("the search index cannot be read; searching the Parquet files exactly")
    return SearchSession(store.connect(), index, notes)


class SearchSession:
    """Queries over one contained connection (the catalog's views) and the search index's
    shards, when there are any."""

    def __init__(self, con: duckdb.DuckDBPyConnection, index, notes: list[str]):
        self.con = con
        self.notes = notes
        self.index = index  # a description_index.ShardedIndex, or None: exact scans of the Parquet files
        self.table = EMBEDDINGS_TABLE

    def over(self, con: duckdb.DuckDBPyConnection) -> "SearchSession":
        """This session's index over another cursor of its connection (a server answers on a
        cursor per request)."""
        session = copy.copy(self)
        session.con, session.notes = con, list(self.notes)
        return session

    def __enter__(self) -> "SearchSession":
        return self

    def __exit__(self, *exc) -> None:
        self.con.close()

    def embedding_model(self) -> str:
        if self.index is not None:
            models = sorted(self.index.embedding_models())
        else:
            models = [row[0] for row in self.con.execute(f"SELECT DISTINCT embedding_model FROM {self.table}").fetchall()]
        if len(models) > 1:
            raise ValueError(f"the store's description vectors come from several models ({', '.join(models)}); "
                             "re-materialize description_embeddings with one search.embedding_model")
        if not models:
            raise LookupError("the description embeddings table is empty: no neuron has a description yet")
        return models[0]

    def _want(self, filters: Filters):
        """The index's form of ``filters``; None where the index cannot apply them (the
        simulator filter reads neuron_descriptions: such a search scans exactly)."""
        from neuron_assets.description_index import Want

        if self.index is None or filters.simulator is not None:
            return None
        return Want(layers=None if filters.layer is None else (filters.layer,),
                    polarity=None if filters.polarity is None else Polarity(filters.polarity).value,
                    kind=filters.kind, min_score=filters.min_score, max_score=filters.max_score)

    def semantic(self, vector: np.ndarray, top: int, filters: Filters = Filters(), exact: bool = False) -> SearchResult:
        """Nearest by cosine similarity: the index's IVF shards (filters applied inside them),
        else (or when ``exact``) a scan of every matching row."""
        want = None if exact else self._want(filters)
        if want is not None:
            return SearchResult(_index_hits(self.index.semantic(vector, top, want)), "ivf", self.notes)
        dim = int(vector.shape[0])
        # The vector goes in once, as a variable: a prepared parameter is converted from Python on
        # every execution.
        self.con.execute(f"SET VARIABLE search_vector = [{', '.join(repr(float(x)) for x in vector)}]::FLOAT[{dim}]")
        where, params = filters.where()
        rows = self.con.execute(
            f"SELECT array_cosine_similarity(embedding::FLOAT[{dim}], getvariable('search_vector')) AS match, layer, "
            f"polarity, neuron, kind, source, candidate, description, score FROM {self.table} WHERE {where} "
            f"ORDER BY match DESC, layer, polarity, neuron LIMIT {int(top)}", params).fetchall()
        return SearchResult(_hits(rows), "exact", self.notes)

    def text(self, query: str, top: int, filters: Filters = Filters()) -> SearchResult:
        """BM25 over the descriptions (the index's postings); without the index, every word by ILIKE."""
        want = self._want(filters)
        if want is not None:
            return SearchResult(_index_hits(self.index.text(query, top, want)), "bm25", self.notes)
        where, params = filters.where()
        words = [w for w in re.findall(r"\w+", query.lower()) if w] or [query.strip().lower()]
        if self.index is None:
            self.notes.append("BM25 needs the search index; ranked by ILIKE word matches instead")
        matched = " + ".join("(description ILIKE ? ESCAPE '\\')::INTEGER" for _ in words)
        rows = self.con.execute(
            f"SELECT match, layer, polarity, neuron, kind, source, candidate, description, score FROM ("
            f"SELECT *, ({matched})::DOUBLE + (description ILIKE ? ESCAPE '\\')::INTEGER AS match FROM {self.table}) "
            f"WHERE match > 0 AND {where} ORDER BY match DESC, score DESC NULLS LAST, layer, neuron LIMIT {int(top)}",
            [*(f"%{_like_escape(w)}%" for w in words), f"%{_like_escape(query.strip())}%", *params]).fetchall()
        return SearchResult(_hits(rows), "ilike", self.notes)


def _index_hits(found) -> list[Hit]:
    return [Hit(rank, hit.match, hit.row["layer"], hit.row["polarity"], hit.row["neuron"], hit.row["source"],
                hit.row["candidate"], hit.row["description"], hit.row["score"], hit.row["kind"])
            for rank, hit in enumerate(found, 1)]


def _hits(rows) -> list[Hit]:
    return [Hit(rank, float(match), int(layer), polarity, int(neuron), source, candidate, description, score, kind)
            for rank, (match, layer, polarity, neuron, kind, source, candidate, description, score)
            in enumerate(rows, 1)]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

