"""The report asset: the static HTML report (neuron_assets.report.site) of every partition,
linked from its metadata. The body stays thin: build, mark complete, return the paths."""

import dagster as dg

from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings
from neuron_assets.report.site import build_report, report_index
from neuron_assets.store import Store


@dg.asset(
    deps=["exemplars", "candidate_descriptions", "description_scores", "neuron_descriptions"],
    description="The static HTML report under <root>/report/: an index, one page per layer x polarity (score "
    "histograms, the best-of-k curve, a sortable table of neurons) and neuron pages (descriptions, every score, "
    "statistics, exemplars as token heat-maps). Self-contained pages; open index.html in a browser, or run "
    "`neuron-assets report --open`.",
    kinds={"html"},
)
def neuron_report(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig, run: RunSettings) -> dg.MaterializeResult:
    config = settings.load()
    store = Store(config.store_root)
    with run.stage(context, config) as stage:
        if not stage.todo():
            index = report_index(store)
            return dg.MaterializeResult(metadata={"skipped": "up to date", **_links(index), **stage.metadata()})
        written = build_report(store)
        stage.complete(None, [written.index.parent])
    return dg.MaterializeResult(
        metadata={**_links(written.index), "partition_pages": written.partition_pages,
                  "neuron_pages": written.neuron_pages, "seconds": round(written.seconds, 1), "config_hash": config.hash},
        data_version=dg.DataVersion(f"{config.hash}-{written.index.stat().st_mtime_ns}"),
    )


def _links(index) -> dict:
    return {"index": dg.MetadataValue.path(str(index)), "open": dg.MetadataValue.url(index.resolve().as_uri())}
