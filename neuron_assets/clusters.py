"""Families of descriptions: the selected descriptions' search vectors (table
``description_embeddings``, source ``selected``) clustered by average linkage on cosine
distance, cut at ``clusters.distance`` (Transluce's description "linter").

    make_description_clusters(config, run_id)     the description_clusters stage: cluster, label, write
    cluster_vectors(vectors, 0.5)                 cluster number per row (-1: left out), plain NumPy
    read_clusters(store)                          the table, or a LookupError naming the command to run

The table ``description_clusters`` (``data/description_clusters/data.parquet``) has one row per
member: its cluster (numbered from 1, largest first), the cluster's label, coherence and size,
the member's feature (layer, polarity, kind, neuron), description, test score, cosine distance
to the cluster's centroid and rank by it (1: nearest), and the run's lineage.

- *Coherence* is the mean pairwise cosine similarity of a cluster's members, computed from the
  sum of their unit vectors (``(|sum|^2 - n) / (n (n - 1))``), so no pairwise matrix is built.
- *Label*: the member nearest the centroid (``centroid``), or a short name from the explain
  section's LLM (``llm``; ``auto`` picks it when explain.backend is an LLM backend).
- *Memory*: one linkage over n vectors holds n (n - 1) / 2 float64 distances, and SciPy copies
  them once: 2.1 GB at ``clusters.max_points`` = 16384. A group (every description with scope
  ``all``, one layer x polarity with ``layer_polarity``) larger than that clusters a seeded sample
  of max_points; every other description joins the cluster whose mean vector it is nearest
  (``1 - x . mean``: exactly its average-linkage distance to the cluster) if that is within the
  cut, else it stays alone. docs/clusters.md gives the figures at Llama scale.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from neuron_assets.config import Config
from neuron_assets.search import EMBEDDINGS_TABLE, SELECTED
from neuron_assets.store import Store, with_lineage

CLUSTERS_TABLE = "description_clusters"
ASSIGN_CHUNK = 4096  # rows compared with the cluster means at once when assigning the rest of a sampled group
DISTANCE_BLOCK = 1024  # rows of the distance matrix computed per matrix product

Log = Callable[[str], None]
# One call names many clusters: each cluster's member descriptions (nearest the centroid first)
# -> its label, or None where none came.
Labeler = Callable[[Sequence[Sequence[str]]], list[str | None]]

SCHEMA = {
    "cluster": pl.Int64, "label": pl.String, "label_source": pl.String, "coherence": pl.Float64, "size": pl.Int64,
    "member_rank": pl.Int64, "layer": pl.Int64, "polarity": pl.String, "kind": pl.String, "neuron": pl.Int64,
    "description": pl.String, "score": pl.Float64, "centroid_distance": pl.Float64,
}


def _quiet(_: str) -> None:
    pass


# -- clustering (plain NumPy and SciPy) --------------------------------------------------------


def check_distance(distance: float) -> float:
    """The cut, checked: a cosine distance strictly between 0 and 2."""
    if not (isinstance(distance, (int, float)) and 0 < distance < 2):
        raise ValueError(f"clusters.distance must be a cosine distance between 0 and 2 (exclusive), got {distance}; "
                         "0.5 joins descriptions whose members are on average at least 0.5 similar")
    return float(distance)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 rows scaled to length 1 (a zero row stays zero); rows that are unit already (the
    stored vectors are) come back without a copy."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected one vector per row (a 2-d array), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("a description vector holds NaN or infinity; re-materialize description_embeddings")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-4):
        return matrix
    return matrix / np.where(norms > 0, norms, 1.0)


def cosine_condensed(unit: np.ndarray) -> np.ndarray:
    """The condensed cosine distance matrix of unit rows (as ``scipy.spatial.distance.pdist(X,
    'cosine')`` gives it), through blocked matrix products instead of a loop per pair."""
    n = unit.shape[0]
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)
    at = 0
    for start in range(0, n, DISTANCE_BLOCK):
        block = unit[start:start + DISTANCE_BLOCK] @ unit[start:].T  # rows start.. against columns start..
        for offset in range(block.shape[0]):
            row = block[offset, offset + 1:]
            out[at:at + row.size] = 1.0 - row
            at += row.size
    return np.clip(out, 0.0, 2.0, out=out)


def cluster_vectors(vectors: np.ndarray, distance: float, max_points: int = 16384, seed: int = 0) -> np.ndarray:
    """Average-linkage clustering on cosine distance (SciPy's ``linkage(method='average')``
    over cosine distances, ``fcluster(criterion='distance')`` at ``distance``): a cluster
    number per row, 0..k-1. A group larger than ``max_points`` clusters a seeded sample and
    assigns each other row to its nearest cluster by average-linkage distance (a row farther
    than ``distance`` from every cluster gets a cluster of its own)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    distance = check_distance(distance)
    if max_points < 2:
        raise ValueError(f"clusters.max_points must be at least 2, got {max_points}")
    unit = unit_rows(vectors)
    n = unit.shape[0]
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    sampled = n > max_points
    sample = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False)) if sampled else np.arange(n)
    tree = linkage(cosine_condensed(unit[sample]), method="average")
    flat = fcluster(tree, t=distance, criterion="distance").astype(np.int64) - 1
    if not sampled:
        return flat
    labels = np.full(n, -1, dtype=np.int64)
    labels[sample] = flat
    count = int(flat.max()) + 1
    means = np.zeros((count, unit.shape[1]), dtype=np.float64)
    np.add.at(means, flat, unit[sample])
    means /= np.bincount(flat, minlength=count)[:, None]
    means = means.astype(np.float32)
    rest = np.setdiff1d(np.arange(n), sample)
    for start in range(0, rest.size, ASSIGN_CHUNK):
        rows = rest[start:start + ASSIGN_CHUNK]
        similarity = unit[rows] @ means.T  # mean cosine similarity to each cluster's members
        best = similarity.argmax(axis=1)
        near = 1.0 - similarity[np.arange(rows.size), best] <= distance
        labels[rows[near]] = best[near]
    alone = np.flatnonzero(labels < 0)
    labels[alone] = count + np.arange(alone.size)
    return labels


def coherence(unit: np.ndarray) -> float | None:
    """Mean pairwise cosine similarity of unit rows (None for fewer than two)."""
    n = unit.shape[0]
    if n < 2:
        return None
    total = unit.astype(np.float64).sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


# -- the table -----------------------------------------------------------------------------


def read_selected_vectors(store: Store) -> tuple[pl.DataFrame, np.ndarray]:
    """Every partition's selected descriptions (layer, polarity, kind, neuron, description,
    score) and their vectors, in the same order."""
    partitions = store.partitions(EMBEDDINGS_TABLE)
    if not partitions:
        raise LookupError(f"no description embeddings under {store.table_dir(EMBEDDINGS_TABLE)}; run `neuron-assets "
                          "run` (or `neuron-assets run --select description_embeddings`) first")
    frames, matrices = [], []
    for layer, polarity in partitions:  # each partition's vectors taken out on their own: no second copy of all
        frame = store.read(EMBEDDINGS_TABLE, layer, polarity)
        if "kind" not in frame.columns:  # older files: neurons only
            frame = frame.with_columns(pl.lit("neuron").alias("kind"))
        frame = frame.filter(pl.col("source") == SELECTED).select(
            pl.lit(layer, pl.Int64).alias("layer"), pl.lit(polarity).alias("polarity"),
            pl.col("kind").fill_null("neuron").cast(pl.String), pl.col("neuron").cast(pl.Int64),
            pl.col("description").cast(pl.String), pl.col("score").cast(pl.Float64),
            pl.col("embedding_model").cast(pl.String), "embedding").sort("kind", "neuron")
        if frame.height:
            matrices.append(np.asarray(frame["embedding"].to_numpy(), dtype=np.float32).reshape(frame.height, -1))
        frames.append(frame.drop("embedding"))
    rows = pl.concat(frames, how="vertical_relaxed")  # in (layer, polarity, kind, neuron) order
    models = rows["embedding_model"].unique().drop_nulls().to_list()
    if len(models) > 1:
        raise ValueError(f"the store's description vectors come from several models ({', '.join(sorted(models))}); "
                         "re-materialize description_embeddings with one search.embedding_model")
    if rows.height == 0:
        return rows.drop("embedding_model"), np.zeros((0, 0), dtype=np.float32)
    return rows.drop("embedding_model"), np.concatenate(matrices)


def cluster_members(rows: pl.DataFrame, vectors: np.ndarray, config: Config) -> tuple[pl.DataFrame, int]:
    """The table's rows without labels (label null): every cluster of at least
    clusters.min_size members, numbered from 1 (largest first, then most coherent); and how many
    descriptions were left out in smaller clusters."""
    settings = config.clusters
    if rows.height != vectors.shape[0]:
        raise ValueError(f"{rows.height} descriptions but {vectors.shape[0]} vectors")
    unit = unit_rows(vectors) if rows.height else vectors
    groups = ([np.arange(rows.height)] if settings.scope == "all" else
              [np.flatnonzero(mask) for mask in _partition_masks(rows)])
    clusters: list[np.ndarray] = []  # each cluster's row numbers
    for index, group in enumerate(groups):
        if group.size == 0:
            continue
        subset = unit if group.size == rows.height else unit[group]  # the whole matrix is not copied
        flat = cluster_vectors(subset, settings.distance, settings.max_points, settings.seed + index)
        order = np.argsort(flat, kind="stable")
        bounds = np.flatnonzero(np.diff(flat[order])) + 1
        clusters += [group[members] for members in np.split(order, bounds)]
    kept = [members for members in clusters if members.size >= settings.min_size]
    left_out = rows.height - sum(members.size for members in kept)
    described = []
    for members in kept:
        centroid = unit[members].astype(np.float64).sum(axis=0)
        centroid /= np.linalg.norm(centroid) or 1.0
        to_centroid = 1.0 - unit[members].astype(np.float64) @ centroid
        described.append((members, to_centroid, coherence(unit[members])))
    # largest first, then most coherent, then by the first member's place (layer, polarity, kind, neuron)
    described.sort(key=lambda item: (-item[0].size, -(item[2] if item[2] is not None else 1.0), int(item[0].min())))
    parts = []
    for number, (members, to_centroid, coherent) in enumerate(described, 1):
        order = np.lexsort((members, to_centroid))
        parts.append(rows[members[order].tolist()].with_columns(
            pl.lit(number, pl.Int64).alias("cluster"), pl.lit(None, pl.String).alias("label"),
            pl.lit(None, pl.String).alias("label_source"), pl.lit(coherent, pl.Float64).alias("coherence"),
            pl.lit(members.size, pl.Int64).alias("size"),
            pl.Series("member_rank", np.arange(1, members.size + 1), pl.Int64),
            pl.Series("centroid_distance", to_centroid[order], pl.Float64)))
    if not parts:
        return pl.DataFrame(schema=SCHEMA), left_out
    return pl.concat(parts).select(list(SCHEMA)), left_out


def _partition_masks(rows: pl.DataFrame) -> list[np.ndarray]:
    keys = rows.select("layer", "polarity").unique(maintain_order=True).iter_rows()
    return [((rows["layer"] == layer) & (rows["polarity"] == polarity)).to_numpy() for layer, polarity in keys]


def with_labels(members: pl.DataFrame, labeler: Labeler | None, shown: int) -> pl.DataFrame:
    """Each cluster's label: ``labeler``'s name for it where it gives one, else the description
    of the member nearest the centroid (member_rank 1)."""
    if members.height == 0:
        return members
    nearest = members.filter(pl.col("member_rank") == 1).select("cluster", pl.col("description").alias("nearest"))
    named = pl.DataFrame(schema={"cluster": pl.Int64, "named": pl.String})
    if labeler is not None:
        grouped = members.sort("cluster", "member_rank").group_by("cluster", maintain_order=True).agg(
            pl.col("description").head(shown))
        names = labeler(grouped["description"].to_list())
        named = pl.DataFrame({"cluster": grouped["cluster"], "named": pl.Series(names, dtype=pl.String)})
    return (members.drop("label", "label_source").join(nearest, on="cluster").join(named, on="cluster", how="left")
            .with_columns(pl.coalesce("named", "nearest").alias("label"),
                          pl.when(pl.col("named").is_not_null()).then(pl.lit("llm")).otherwise(pl.lit("centroid"))
                          .alias("label_source"))
            .select(list(SCHEMA)).sort("cluster", "member_rank"))


# -- LLM labels ---------------------------------------------------------------------------------


LABEL_SYSTEM = ("You name groups of descriptions of neurons of a language model. Each description says what makes "
                "a neuron activate. Answer with one short name for what the descriptions in a group share.")
LABEL_MAX_CHARS = 120


def label_prompt(descriptions: Sequence[str]) -> tuple[dict[str, str], ...]:
    listed = "\n".join(f"- {text}" for text in descriptions)
    return ({"role": "system", "content": LABEL_SYSTEM},
            {"role": "user", "content": f"Descriptions of neurons that activate on similar things:\n{listed}\n\n"
                                        "Name what they share in at most eight words, on one line starting with "
                                        "'Label:'."})


def parse_label(text: str | None) -> str:
    """The name after 'Label:' (or the answer's first line), without quotes; ValueError if empty."""
    answer = (text or "").strip()
    found = re.search(r"label\s*:\s*(.+)", answer, re.IGNORECASE)
    line = (found.group(1) if found else next((line for line in answer.splitlines() if line.strip()), "")).strip()
    line = line.strip("\"'`*. ").strip()
    if not line:
        raise ValueError("no label in the answer")
    return line[:LABEL_MAX_CHARS]


def uses_llm(config: Config) -> bool:
    """Whether the clusters are named by the explain section's LLM (clusters.labels)."""
    labels = config.clusters.labels
    if labels == "llm" and config.explain.backend == "statistical":
        raise ValueError("clusters.labels: llm needs an LLM explainer (explain.backend openai, vllm or transformers "
                         "with explain.model); set clusters.labels: centroid (or auto) to label clusters offline")
    return labels == "llm" or (labels == "auto" and config.explain.backend != "statistical")


def llm_labeler(config: Config, log: Log = _quiet) -> Labeler:
    """Names from the explain section's model, through the one LLM client layer (with the answer
    cache when explain.answer_cache is on); a cluster whose answers all fail gets None."""
    from neuron_assets.llm import AnswerCache, Request, ask, open_llm, settings_from_explain, with_answer_cache

    explain = config.explain
    if not explain.model:
        raise ValueError(f"clusters.labels names clusters with explain.model, which is not set for the "
                         f"{explain.backend} backend; set explain.model, or clusters.labels: centroid")
    cache = AnswerCache.under(config.root) if explain.answer_cache else None
    llm = with_answer_cache(open_llm(settings_from_explain(explain)), cache)

    def label(groups: Sequence[Sequence[str]]) -> list[str | None]:
        requests = [Request(messages=label_prompt(texts), max_tokens=32, temperature=0.0, seed=explain.seed)
                    for texts in groups]
        answers = ask(llm, requests, lambda reply: parse_label(reply.text), explain.max_retries + 1)
        failed = [a.failure for a in answers if not a.ok]
        if failed:
            log(f"{len(failed)} of {len(answers)} cluster labels failed (e.g. {failed[0]}); those clusters are "
                "labelled by the description nearest their centroid")
        return [a.value if a.ok else None for a in answers]

    return label


# -- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClustersWritten:
    path: Path
    rows: int  # members stored
    clusters: int
    descriptions: int  # selected descriptions clustered
    left_out: int  # in clusters smaller than clusters.min_size
    label_source: str  # centroid | llm
    seconds: float


def make_description_clusters(config: Config, run_id: str, labeler: Labeler | None = None,
                              log: Log = _quiet) -> ClustersWritten:
    """The description_clusters stage: read the selected descriptions' vectors, cluster, label
    (``labeler``, default: clusters.labels), write the table."""
    started = time.perf_counter()
    check_distance(config.clusters.distance)
    store = Store(config.store_root)
    rows, vectors = read_selected_vectors(store)
    members, left_out = cluster_members(rows, vectors, config)
    if labeler is None and members.height and uses_llm(config):
        labeler = llm_labeler(config, log)
    members = with_labels(members, labeler, config.clusters.label_members)
    frame = with_lineage(members, config.subject.model, config.hash, run_id)
    path = store.write(CLUSTERS_TABLE, frame)
    count = members["cluster"].n_unique() if members.height else 0
    written = ClustersWritten(path, members.height, count, rows.height, left_out,
                              "llm" if labeler is not None else "centroid", time.perf_counter() - started)
    log(f"description clusters: {count} clusters of at least {config.clusters.min_size} from {rows.height} "
        f"descriptions at cosine distance {config.clusters.distance} ({members.height} members, {left_out} left out; "
        f"{written.seconds:.1f} s)")
    return written


def read_clusters(store: Store) -> pl.DataFrame:
    """The description_clusters table; a LookupError naming the command that writes it."""
    if not store.exists(CLUSTERS_TABLE):
        raise LookupError(f"no description clusters under {store.table_dir(CLUSTERS_TABLE)}; run `neuron-assets run` "
                          "(or `neuron-assets run --select description_clusters`) first")
    return store.read(CLUSTERS_TABLE)


def cluster_summaries(members: pl.DataFrame, min_size: int = 1, top: int | None = None,
                      shown: int = 3) -> list[dict]:
    """One dict per cluster of at least ``min_size`` members (largest first): cluster, size,
    coherence, label, label_source, layers, polarities, and the ``shown`` members nearest the
    centroid (layer, polarity, kind, neuron, description, score)."""
    if members.height == 0:
        return []
    chosen = members.filter(pl.col("size") >= min_size).sort("cluster", "member_rank")
    out = []
    for cluster, group in chosen.group_by("cluster", maintain_order=True):
        first = group.row(0, named=True)
        out.append({
            "cluster": int(cluster[0]), "size": first["size"], "coherence": first["coherence"],
            "label": first["label"], "label_source": first["label_source"],
            "layers": sorted(set(group["layer"].to_list())), "polarities": sorted(set(group["polarity"].to_list())),
            "members": group.head(shown).select("layer", "polarity", "kind", "neuron", "description", "score",
                                                "centroid_distance").to_dicts(),
        })
        if top is not None and len(out) >= top:
            break
    return out
