"""Partition columns: what a partition file is written without, and how it is read back.

A partition file's folder names its layer and polarity (hive layout), so the file does not hold
them as columns too: pandas (pyarrow datasets) refuses a folder where `layer` is both a column
and a hive key of another type. What the file was written without, and at which place and type,
is in its key-value metadata, and Store.read / Store.scan put the columns back as they were.
"""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

PARTITION_COLUMNS_KEY = "neuron_assets.partition_columns"
_RESTORABLE = {str(dtype): dtype for dtype in (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16,
                                                pl.UInt32, pl.UInt64, pl.String)}


def _partition_values(layer, polarity) -> dict:
    values = {} if layer is None else {"layer": int(layer)}
    if polarity is not None:
        values["polarity"] = str(getattr(polarity, "value", polarity))
    return values


def without_partition_columns(frame: pl.DataFrame, layer, polarity) -> tuple[pl.DataFrame, dict[str, str]]:
    """The frame without the columns its partition folder names (where every row holds the
    partition's value), and the file metadata that says how to put them back."""
    dropped = []
    for name, value in _partition_values(layer, polarity).items():
        if name not in frame.columns or str(frame.schema[name]) not in _RESTORABLE:
            continue
        column = frame.get_column(name)
        if column.null_count() or (len(column) and (column.n_unique() != 1 or column[0] != value)):
            continue
        dropped.append({"name": name, "index": frame.columns.index(name), "dtype": str(frame.schema[name])})
    if not dropped:
        return frame, {}
    return frame.drop([d["name"] for d in dropped]), {PARTITION_COLUMNS_KEY: json.dumps(dropped)}


def schema_without_partition_columns(schema: pa.Schema, layer, polarity):
    """As :func:`without_partition_columns`, for a table written in record batches: (the schema
    to write, a function that takes the columns out of each batch)."""
    dropped, values = [], _partition_values(layer, polarity)
    for name in values:
        index = schema.get_field_index(name)
        dtype = str(pl.from_arrow(pa.array([], type=schema.field(index).type)).dtype) if index >= 0 else ""
        if dtype in _RESTORABLE:
            dropped.append({"name": name, "index": index, "dtype": dtype})
    if not dropped:
        return schema, lambda batch: batch
    kept = pa.schema([field for field in schema if field.name not in {d["name"] for d in dropped}],
                     metadata={**(schema.metadata or {}), PARTITION_COLUMNS_KEY: json.dumps(dropped)})

    def strip(batch: pa.RecordBatch) -> pa.RecordBatch:
        for spec in dropped:
            column = batch.column(spec["name"])
            if column.null_count or pc.all(pc.equal(column, values[spec["name"]])).as_py() is False:
                raise ValueError(f"a row of the partition layer={layer}/polarity={polarity} holds another "
                                 f"{spec['name']}; each partition file holds its own partition's rows")
        return pa.RecordBatch.from_arrays([batch.column(name) for name in kept.names], schema=kept)

    return kept, strip


def with_partition_columns(frame, dropped: list[dict], layer, polarity):
    """Put back, at their places and with their types, the columns a partition file was written
    without (a DataFrame or a LazyFrame)."""
    values = _partition_values(layer, polarity)
    dropped = [d for d in dropped if d.get("name") in values and d.get("dtype") in _RESTORABLE]
    if not dropped:
        return frame
    order = list(frame.collect_schema().names() if isinstance(frame, pl.LazyFrame) else frame.columns)
    for spec in sorted(dropped, key=lambda d: d["index"]):
        order.insert(min(spec["index"], len(order)), spec["name"])
    return frame.with_columns(pl.lit(values[d["name"]], dtype=_RESTORABLE[d["dtype"]]).alias(d["name"])
                              for d in dropped).select(order)
