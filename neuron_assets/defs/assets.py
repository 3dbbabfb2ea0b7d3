"""Assets of the foundation: the corpus and the per-layer exemplar tables.

Asset bodies stay thin: read the config, call the core in neuron_assets.stages, return
metadata. Partitioned assets are built by a factory because the partition set (the model's
layers) comes from the config.
"""


import warnings

import dagster as dg
import polars as pl

from neuron_assets.defs.partitions import parse_partition_keys, partition_key
from neuron_assets.defs.resources import NeuronAssetsConfig, SubjectModelResource
from neuron_assets.defs.runs import RunSettings
from neuron_assets.stages import Written, make_corpus, make_exemplars
from neuron_assets.report.render import markdown_table
from neuron_assets.store import Store
from neuron_assets.types import Split

warnings.filterwarnings("ignore", category=dg.BetaWarning)  # BackfillPolicy is beta in dagster 1.13


@dg.asset(
    description="The corpus: fixed-length token sequences in equal train / val / test splits (table `sequences`).",
    check_specs=[dg.AssetCheckSpec("equal_splits", asset="corpus", description="train, val and test hold as many sequences each")],
    kinds={"parquet"},
    backfill_policy=dg.BackfillPolicy.single_run(),  # lets `dagster asset materialize --partition-range` select corpus too
)
def corpus(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig, run: RunSettings) -> dg.MaterializeResult:
    config = settings.load()
    with run.stage(context, config) as stage:
        # another run over other layers may have written it while this one waited for its lock
        written = make_corpus(config, context.run_id) if stage.todo() else None
        if written is not None:
            stage.complete(None, [written.path])
    store = Store(config.store_root)
    sizes = store.scan("sequences").group_by("split", "source").len().sort("split", "source").collect()
    per_split = sizes.group_by("split").agg(pl.col("len").sum())["len"].to_list()
    return dg.MaterializeResult(
        metadata={
            **({"skipped": "up to date"} if written is None else {}),
            "rows": int(sizes["len"].sum()),
            "path": dg.MetadataValue.path(str(store.path("sequences"))),
            "config_hash": config.hash,
            "split_sizes": dg.MetadataValue.md(markdown_table(sizes.columns, sizes.iter_rows())),
            **stage.metadata(),
        },
        data_version=dg.DataVersion(config.sections_hash("subject", "corpus")),
        check_results=[dg.AssetCheckResult(check_name="equal_splits", passed=len(set(per_split)) == 1 and len(per_split) == len(Split),
                                           metadata={"per_split": str(per_split)})],
    )


def exemplar_assets(partitions: dg.MultiPartitionsDefinition, config=None) -> list[dg.AssetsDefinition]:
    """``config`` decides whether the exemplar pass reads SAEs (then it follows sae_checkpoint)."""
    deps = [corpus] + ([dg.AssetKey("sae_checkpoint")] if config is not None and config.sae.layers else [])

    @dg.asset(
        deps=deps,
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="gpu",
        description="Per feature (neuron, or SAE latent: feature_kind) x polarity x split: top-k, random and "
        "activation-decile exemplars with per-token activations (table `exemplars`), plus per-feature statistics "
        "(table `neuron_stats`). Materializing many partitions is one run and one forward pass over the corpus.",
        check_specs=[dg.AssetCheckSpec("every_feature_has_exemplars", asset="exemplars")],
        kinds={"pytorch", "parquet"},
    )
    def exemplars(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig, subject: SubjectModelResource,
                  run: RunSettings) -> dg.MaterializeResult:
        config = settings.load()
        requested = parse_partition_keys(context.partition_keys)
        if not requested:
            raise dg.Failure("no partitions in the requested range: a layer x polarity range is a rectangle and "
                             "polarity runs pos...neg, e.g. '0|pos...5|neg'")
        store = Store(config.store_root)
        with run.stage(context, config) as stage:
            requested = stage.todo(requested)
            if not requested:
                return dg.MaterializeResult(metadata={"skipped": "every partition is up to date", **stage.metadata()})
            context.log.info(f"one forward pass for {len(requested)} partitions: {[f'{l}|{p.value}' for l, p in requested]}")
            with stage.progress.task("activations", _activation_batches(store, config), "batch") as task:
                collected = make_exemplars(config, requested, context.run_id, subject=subject.load(config),
                                           progress=False, on_batch=lambda done: task.advance(done - task.done),
                                           log=context.log.info)
            written = collected.written
            for layer, polarity in requested:
                stage.complete((layer, polarity), [w.path for w in written if (w.layer, w.polarity) == (layer, polarity.value)])
        missing = _features_without_exemplars(store, written)
        log_partition_checks(context, "every_feature_has_exemplars",
                             {partition_key(layer, polarity): not any((l, p) == (layer, polarity.value) for l, p, _ in missing)
                              for layer, polarity in requested})
        return dg.MaterializeResult(
            metadata={
                "partitions": len(requested),
                "rows": sum(w.rows for w in written if w.table == "exemplars"),
                "config_hash": config.hash,
                "written": dg.MetadataValue.md(_written_table(written)),
                "preview": dg.MetadataValue.md(_preview(store, *requested[0])),
                "root": dg.MetadataValue.path(str(store.table_dir("exemplars"))),
                "passes": collected.plan.passes,
                "plan": dg.MetadataValue.md("```\n" + collected.plan.describe() + "\n```"),
                "plan_json": dg.MetadataValue.json(collected.plan.as_dict()),
                **stage.metadata(),
            },
            data_version=dg.DataVersion(config.sections_hash("subject", "corpus", "features", "exemplars", "sae")),
            check_results=[dg.AssetCheckResult(check_name="every_feature_has_exemplars", passed=not missing,
                                               metadata={"features_without_top_exemplars": len(missing)})],
        )

    return [exemplars]


def _activation_batches(store: Store, config) -> int:
    """Forward passes of the activation pass: each split in batches of subject.batch_size."""
    per_split = store.scan("sequences").group_by("split").len().collect()["len"].to_list()
    return sum(-(-n // config.subject.batch_size) for n in per_split)


def log_partition_checks(context: dg.AssetExecutionContext, check_name: str, passed_by_key: dict) -> None:
    """Record a check per partition in a range run, where Dagster stores the returned result
    without a partition (a single-partition run records it itself)."""
    if len(context.partition_keys) > 1:  # a resumed range run may compute only one of them
        for key, passed in passed_by_key.items():
            context.log_event(dg.AssetCheckEvaluation(asset_key=context.asset_key, check_name=check_name,
                                                      passed=bool(passed), partition=key))


def _features_without_exemplars(store: Store, written: list[Written]) -> list[tuple]:
    missing = []
    for w in written:
        if w.table != "neuron_stats":
            continue
        from neuron_assets.exemplars import with_feature_kind

        stats = with_feature_kind(store.read("neuron_stats", w.layer, w.polarity)).select(pl.col("kind").alias("feature_kind"), "neuron")
        top = with_feature_kind(store.read("exemplars", w.layer, w.polarity), "feature_kind").filter(
            pl.col("kind") == "top").select("feature_kind", "neuron").unique()
        missing += [(w.layer, w.polarity, n) for n in
                    stats.join(top, on=["feature_kind", "neuron"], how="anti")["neuron"].to_list()]
    return missing


def _written_table(written: list[Written]) -> str:
    return markdown_table(["table", "layer", "polarity", "rows", "path"],
                          [(w.table, w.layer, w.polarity, w.rows, f"`{w.path}`") for w in written])


def _preview(store: Store, layer: int, polarity) -> str:
    """The first neuron's three strongest train exemplars, activating tokens in bold."""
    from neuron_assets.exemplars import load_feature_exemplars
    from neuron_assets.report.render import highlight_markdown

    first = store.read("neuron_stats", layer, polarity.value, columns=["neuron"])["neuron"].min()
    features = load_feature_exemplars(store, layer, polarity, neurons=[first])
    if not features:
        return "no features"
    feature = features[0]
    lines = [f"**{feature.feature}** (max {feature.stats.max:.3f})", ""]
    for exemplar in feature.top(Split.TRAIN)[:3]:
        lines.append(f"- {exemplar.extreme:.3f}: " + highlight_markdown(exemplar.record, feature.feature.polarity))
    return "\n".join(lines)
