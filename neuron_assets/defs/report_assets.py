"""The report asset: the static HTML report (neuron_assets.report.site) of every partition,
linked from its metadata."""

from neuron_assets.defs.template import Call, Report, stage_asset
from neuron_assets.report.metadata import report_links, report_metadata
from neuron_assets.report.site import build_report, report_index


def compute_report(call: Call):
    if not call.todo:
        return None
    written = build_report(call.store)
    call.stage.complete(None, [written.index.parent])
    return written


def report_report(call: Call, written) -> Report:
    index = report_index(call.store) if written is None else written.index
    metadata = {"skipped": "up to date", **report_links(index)} if written is None else report_metadata(call.config, written)
    return Report(metadata, data_version=f"{call.version}-{index.stat().st_mtime_ns}" if index.exists() else None)


neuron_report = stage_asset(
    "neuron_report", compute_report, report_report, always=True,
    description="The static HTML report under <root>/report/: an index, one page per layer x polarity (score "
    "histograms, the best-of-k curve, a sortable table of neurons) and neuron pages (descriptions, every score, "
    "statistics, exemplars as token heat-maps). Self-contained pages; open index.html in a browser, or run "
    "`neuron-assets report --open`.",
    kinds={"html"},
)
