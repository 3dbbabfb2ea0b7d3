"""Exports of the description database: one Parquet or JSONL file of every selected description
with its provenance, or Neuronpedia's explanation layout.

    export(store, "parquet", Path("descriptions.parquet"))
    export(store, "neuronpedia", Path("np_export"))          np_export/<modelId>/<sourceId>/explanations/...
    read_neuronpedia(Path("np_export"))                      the same rows back, for checking

**Neuronpedia.** Its exporter (``utils/neuronpedia-utils/.../export-data.py`` in
hijohnnylin/neuronpedia) writes ``{modelId}/{sourceId}/explanations/batch-{n}.jsonl.gz``: gzipped
JSONL batches of 1,024 rows ordered by feature index, each row a record of its ``Explanation``
table. This module writes the same, one source per layer, and the scores as records of its
``ExplanationScore`` table in ``{modelId}/{sourceId}/explanation_scores/batch-{n}.jsonl.gz``:

=====================  ========================================================================
Neuronpedia field      from
=====================  ========================================================================
modelId                ``--model-id``, else the subject model's name: its last path part,
                       lowercased, ``-instruct`` shortened to ``-it`` and ``llama-3`` to
                       ``llama3`` (``meta-llama/Llama-3.1-8B-Instruct`` -> ``llama3.1-8b-it``)
layer (source id)      ``{layer}-mlp``: an MLP neuron of that layer (Neuronpedia's style, e.g. ``12-mlp``)
index                  the neuron, as a string
description            the selected description
typeName               ``neuron_assets-{explainer backend}-{polarity}``: both polarities of a neuron are
                       explanations of the same feature; the type says which end it describes
explanationModelName   the explainer's model (``explain.model``), else its backend name
id                     ``na-{config_hash}-{layer}-{polarity}-{neuron}`` (stable across exports)
score records          one per split (val, test): ``explanationId``, ``value`` (the correlation),
                       ``explanationScoreTypeName`` ``neuron_assets-{scorer}-{split}``,
                       ``explanationScoreModelName`` the simulator, ``jsonDetails`` (the shuffled
                       control's score, the simulator version, the run)
=====================  ========================================================================
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from neuron_assets.store import Store, atomic_path

Format = Literal["parquet", "jsonl", "neuronpedia"]
FORMATS = ("parquet", "jsonl", "neuronpedia")
BATCH_ROWS = 1024  # Neuronpedia's FEATURES_EXPLANATIONS_BATCH_SIZE
TYPE_PREFIX = "neuron_assets"
PROVENANCE = ("model", "config_hash", "run_id", "explainer", "simulator_version")
# The columns an export leads with; the view's other columns follow.
LEADING = ("layer", "polarity", "neuron", "description", "val_score", "test_score", "control_val_score",
           "control_test_score", "scorer", "simulator", *PROVENANCE, "test_simulator_version",
           "explainer_backend", "explainer_model", "candidate", "n_candidates")


@dataclass(frozen=True)
class Exported:
    path: Path
    rows: int
    files: int


def export(store: Store, format: Format, out: Path, model_id: str | None = None) -> Exported:
    """Write every selected description with its provenance to ``out`` (a file for parquet and
    jsonl, a folder for neuronpedia), atomically: a failed export leaves nothing at ``out``."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    frame = descriptions_with_provenance(store)
    if format == "neuronpedia":
        return _export_neuronpedia(frame, out, model_id)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name for --format {format} (e.g. descriptions.{format})")
    with atomic_path(out) as tmp:
        if format == "parquet":
            frame.write_parquet(tmp, compression="zstd")
        else:
            frame.write_ndjson(tmp)
    return Exported(out, frame.height, 1)


def descriptions_with_provenance(store: Store) -> pl.DataFrame:
    """The ``neuron_descriptions`` view, ordered by layer, polarity and neuron, with an
    ``explainer`` column (the explainer's model, else its backend) beside the other provenance."""
    if not store.has_data():
        raise LookupError(f"no data under {store.root}; run `neuron-assets run` first")
    with store.connect() as con:
        views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        if "neuron_descriptions" not in views:
            raise LookupError(f"no neuron_descriptions table under {store.data_dir}; run `neuron-assets run` "
                              "(or materialize the neuron_descriptions asset) first")
        frame = con.sql("SELECT * FROM neuron_descriptions ORDER BY layer, polarity, neuron").pl()
    missing = [c for c in ("layer", "polarity", "neuron", "description", "model", "config_hash", "run_id")
               if c not in frame.columns]
    if missing:
        raise ValueError(f"the neuron_descriptions table lacks the column(s) {missing}; re-materialize it with "
                         "this version (neuron-assets run --select neuron_descriptions --force)")
    for column in ("explainer_backend", "explainer_model", "simulator_version"):
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, pl.String).alias(column))
    frame = frame.with_columns(pl.coalesce("explainer_model", "explainer_backend").alias("explainer"))
    leading = [c for c in LEADING if c in frame.columns]
    return frame.select(*leading, *[c for c in frame.columns if c not in leading])


# -- Neuronpedia -------------------------------------------------------------------------------


def neuronpedia_model_id(model: str) -> str:
    """A Neuronpedia-style model id from a Hugging Face name or path."""
    name = re.split(r"[/\\:]", model.rstrip("/\\"))[-1].lower()
    name = re.sub(r"-instruct$", "-it", name)
    name = re.sub(r"^llama-(\d)", r"llama\1", name)
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-") or "model"


def source_id(layer: int) -> str:
    return f"{layer}-mlp"


def _export_neuronpedia(frame: pl.DataFrame, out: Path, model_id: str | None) -> Exported:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; remove it or give a new folder")
    models = frame["model"].unique().drop_nulls().to_list() if frame.height else []
    if model_id is None:
        if len(models) > 1:
            raise ValueError(f"the store holds descriptions of several models ({', '.join(sorted(models))}); "
                             "export one at a time with --model-id")
        model_id = neuronpedia_model_id(models[0] if models else "model")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", model_id):
        raise ValueError(f"--model-id '{model_id}' may hold only letters, digits, '.', '_' and '-'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    files = 0
    try:
        for (layer,), rows in frame.sort("layer", "neuron", "polarity").group_by("layer", maintain_order=True):
            folder = tmp / model_id / source_id(int(layer))
            explanations = [_explanation_record(row, model_id) for row in rows.iter_rows(named=True)]
            scores = [score for row, record in zip(rows.iter_rows(named=True), explanations)
                      for score in _score_records(row, record["id"])]
            files += _write_batches(folder / "explanations", explanations)
            files += _write_batches(folder / "explanation_scores", scores)
        manifest = {"format": "neuronpedia explanations (neuron_assets export)", "modelId": model_id,
                    "models": models, "sources": sorted({source_id(int(l)) for l in frame["layer"].unique()}),
                    "explanations": frame.height, "batch_rows": BATCH_ROWS}
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # an empty folder the user made for it
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Exported(out, frame.height, files + 1)


def _explanation_record(row: dict, model_id: str) -> dict:
    backend = row.get("explainer_backend") or "unknown"
    kind = row.get("kind") or "neuron"  # an SAE latent is its own Neuronpedia source, <layer>-mlp-sae
    kind_tag = "" if kind == "neuron" else f"{kind}-"
    return {
        "id": f"na-{row['config_hash']}-{row['layer']}-{row['polarity']}-{kind_tag}{row['neuron']}",
        "modelId": model_id,
        "layer": source_id(int(row["layer"])) + ("" if kind == "neuron" else f"-{kind}"),
        "index": str(int(row["neuron"])),
        "description": row["description"],
        "typeName": f"{TYPE_PREFIX}-{backend}-{row['polarity']}",
        "explanationModelName": row.get("explainer") or backend,
        "notes": json.dumps({"model": row["model"], "config_hash": row["config_hash"], "run_id": row["run_id"]}),
    }


def _score_records(row: dict, explanation_id: str) -> list[dict]:
    records = []
    for split in ("val", "test"):
        value = row.get(f"{split}_score")
        if value is None:
            continue
        simulator = row.get("simulator") or "unknown"
        version = row.get("simulator_version" if split == "val" else "test_simulator_version")
        records.append({
            "id": f"{explanation_id}-{split}",
            "explanationId": explanation_id,
            "value": float(value),
            "explanationScoreTypeName": f"{TYPE_PREFIX}-{row.get('scorer') or 'score'}-{split}",
            "explanationScoreModelName": simulator,
            "jsonDetails": json.dumps({"split": split, "control_score": row.get(f"control_{split}_score"),
                                       "simulator_version": version, "run_id": row["run_id"]}),
        })
    return records


def _write_batches(folder: Path, records: list[dict]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    batches = 0
    for start in range(0, len(records), BATCH_ROWS):
        text = "".join(json.dumps(record) + "\n" for record in records[start:start + BATCH_ROWS])
        (folder / f"batch-{batches}.jsonl.gz").write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=5))
        batches += 1
    return batches


def read_neuronpedia(folder: Path) -> pl.DataFrame:
    """The explanations of a Neuronpedia export, one row per explanation: layer, polarity,
    neuron, description, explainer, val_score, test_score (from the score records)."""
    folder = Path(folder)
    rows = []
    for path in sorted(folder.glob("*/*/explanations/batch-*.jsonl.gz"), key=_batch_order):
        for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    scores = {}
    for path in folder.glob("*/*/explanation_scores/batch-*.jsonl.gz"):
        for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                split = record["explanationScoreTypeName"].rsplit("-", 1)[1]
                scores[(record["explanationId"], split)] = record["value"]
    return pl.DataFrame([{
        "model_id": r["modelId"], "layer": int(r["layer"].split("-", 1)[0]), "polarity": r["typeName"].rsplit("-", 1)[1],
        "neuron": int(r["index"]), "description": r["description"], "explainer": r["explanationModelName"],
        "val_score": scores.get((r["id"], "val")), "test_score": scores.get((r["id"], "test")),
    } for r in rows], schema={"model_id": pl.String, "layer": pl.Int64, "polarity": pl.String, "neuron": pl.Int64,
                              "description": pl.String, "explainer": pl.String, "val_score": pl.Float64,
                              "test_score": pl.Float64})


def _batch_order(path: Path) -> tuple:
    return (path.parent.parent.parent.name, int(path.parent.parent.name.split("-", 1)[0]),
            int(path.name.split("-")[1].split(".")[0]))
