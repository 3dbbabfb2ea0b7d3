"""Every table of a store as frames to compare: two runs of one config must agree on them."""

import polars as pl

from neuron_assets.store import Store

TABLES = ("sequences", "exemplars", "neuron_stats", "candidate_descriptions", "description_scores",
          "neuron_descriptions")
VOLATILE = ("run_id", "latency_s")  # differ between two runs of the same config


def store_tables(root, tables=TABLES, volatile=VOLATILE) -> dict[str, pl.DataFrame]:
    """table -> all its partitions, volatile columns dropped, sorted by the first six columns."""
    store = Store(root)
    out = {}
    for table in tables:
        parts = store.partitions(table) or [(None, None)]
        frame = pl.concat([store.read(table, *p) for p in parts], how="diagonal_relaxed")
        frame = frame.drop([c for c in volatile if c in frame.columns])
        out[table] = frame.sort(frame.columns[:6])
    return out
