"""Exports of the description database: Parquet and JSONL with provenance, and Neuronpedia's
explanation batches, each read back."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from neuron_assets.cli import main
from neuron_assets.export import BATCH_ROWS, export, neuronpedia_model_id, read_neuronpedia
from neuron_assets.store import Store

MODEL = "builtin:SmolLM2-135M-Instruct"


def write_descriptions(root, sizes: dict[tuple[int, str], int]) -> pl.DataFrame:
    store = Store(root)
    frames = []
    for (layer, polarity), n in sizes.items():
        frame = pl.DataFrame({
            "layer": layer, "polarity": polarity, "neuron": [3 * i + 1 for i in range(n)], "candidate": 1,
            "description": [f"tokens of kind {i} in layer {layer} ({polarity})" for i in range(n)],
            "scorer": "correlation", "simulator": "semantic", "val_score": [0.5 + i / (10 * n) for i in range(n)],
            "test_score": [0.4 - i / (10 * n) for i in range(n)], "control_val_score": 0.01, "control_test_score": -0.02,
            "n_candidates": 4, "explainer_backend": "statistical", "explainer_model": None,
            "simulator_version": "sim-1", "test_simulator_version": "sim-1",
            "model": MODEL, "config_hash": "abc123", "run_id": "run-7"})
        store.write("neuron_descriptions", frame, layer, polarity)
        frames.append(frame)
    return pl.concat(frames).sort("layer", "polarity", "neuron")


def test_parquet_and_jsonl_round_trip_with_provenance(tmp_path):
    planted = write_descriptions(tmp_path / "store", {(0, "pos"): 5, (2, "neg"): 3})
    store = Store(tmp_path / "store")
    for format, read in (("parquet", pl.read_parquet), ("jsonl", pl.read_ndjson)):
        out = tmp_path / f"descriptions.{format}"
        written = export(store, format, out)
        back = read(out)
        assert written.rows == back.height == planted.height
        assert {"model", "config_hash", "run_id", "explainer", "simulator_version"} <= set(back.columns)
        assert back["explainer"].unique().to_list() == ["statistical"]  # no explainer model: its backend
        assert back.columns[:4] == ["layer", "polarity", "neuron", "description"]
        assert back.select(planted.columns).sort("layer", "polarity", "neuron").equals(planted.select(
            [pl.col(c).cast(back.schema[c]) for c in planted.columns]))


def test_neuronpedia_export_round_trips_in_batches_of_1024(tmp_path):
    sizes = {(12, "pos"): BATCH_ROWS + 7, (12, "neg"): 2, (3, "pos"): 4}
    planted = write_descriptions(tmp_path / "store", sizes)
    out = tmp_path / "np"
    assert main(["--config", str(_config(tmp_path)), "export", "--format", "neuronpedia", str(out)]) == 0
    model_id = "smollm2-135m-it"
    batches = sorted((out / model_id / "12-mlp" / "explanations").iterdir())
    assert [p.name for p in batches] == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    first = [json.loads(line) for line in gzip.decompress(batches[0].read_bytes()).decode().splitlines()]
    assert len(first) == BATCH_ROWS
    assert {"modelId", "layer", "index", "description", "typeName", "explanationModelName"} <= set(first[0])
    assert first[0]["modelId"] == model_id and first[0]["layer"] == "12-mlp" and first[0]["index"] == "1"
    assert first[0]["typeName"] in ("neuron_assets-statistical-pos", "neuron_assets-statistical-neg")
    assert [int(r["index"]) for r in first] == sorted(int(r["index"]) for r in first)  # ordered by index
    scores = [json.loads(line) for line in gzip.decompress(
        (out / model_id / "12-mlp" / "explanation_scores" / "batch-0.jsonl.gz").read_bytes()).decode().splitlines()]
    assert {s["explanationId"] for s in scores} <= {r["id"] for r in first} | {None}
    assert (out / model_id / "3-mlp" / "explanations" / "batch-0.jsonl.gz").exists()

    back = read_neuronpedia(out).sort("layer", "polarity", "neuron")
    assert back.height == planted.height
    assert back.select("layer", "polarity", "neuron", "description", "val_score", "test_score").equals(
        planted.select("layer", "polarity", "neuron", "description", "val_score", "test_score"))
    assert back["explainer"].unique().to_list() == ["statistical"]


def test_export_refuses_a_used_folder_and_leaves_nothing_half_written(tmp_path):
    write_descriptions(tmp_path / "store", {(0, "pos"): 2})
    store = Store(tmp_path / "store")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        export(store, "neuronpedia", used)
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="is a folder"):
        export(store, "parquet", used)
    with pytest.raises(ValueError, match="may hold only"):
        export(store, "neuronpedia", tmp_path / "np", model_id="bad id/")
    assert not (tmp_path / "np").exists() and not list(tmp_path.glob(".np.*"))
    with pytest.raises(LookupError, match="neuron-assets run"):
        export(Store(tmp_path / "empty"), "jsonl", tmp_path / "x.jsonl")


def test_neuronpedia_model_ids():
    assert neuronpedia_model_id("meta-llama/Llama-3.1-8B-Instruct") == "llama3.1-8b-it"
    assert neuronpedia_model_id(MODEL) == "smollm2-135m-it"
    assert neuronpedia_model_id("/models/gpt2/") == "gpt2"


def _config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"storage:\n  root: {tmp_path / 'store'}\n")
    return path
