"""The scorer-validity asset: how often each simulator and scorer ranks a true description
above false ones, on the project's puzzles, and a check that warns when the selecting
simulator does not beat chance clearly.

The body stays thin: neuron_assets.score.validity measures, the store writes, metadata is a table.
"""


import dagster as dg

from neuron_assets.defs.resources import NeuronAssetsConfig
from neuron_assets.defs.runs import RunSettings
from neuron_assets.report.render import markdown_table
from neuron_assets.store import Store, with_lineage
from neuron_assets.score.validity import VALIDITY_TABLE, ValidityReport, report_frame, report_table, validate_scorers

SELECTING_BEATS_CHANCE = "selecting_simulator_beats_chance"


@dg.asset(
    deps=["corpus", "simulator_checkpoint"],  # measures the trained simulator when there is one
    description="Scorer validity (table `scorer_validity`): on the project's puzzles (exact-rule puzzles from the "
    "corpus and concept puzzles, each with one true description and false ones that are too broad, too narrow, "
    "name wrong tokens or a neighbour's), the share of puzzles where each simulator's correlation (and the "
    "embedding scorer) ranks the true description highest, and the mean margin over the best false one.",
    check_specs=[dg.AssetCheckSpec(SELECTING_BEATS_CHANCE, asset="scorer_validity",
                                   description="the simulator that selects (simulate.backend) ranks true descriptions "
                                   "first clearly more often than chance on the project's puzzles")],
    kinds={"parquet"},
)
def scorer_validity(context: dg.AssetExecutionContext, settings: NeuronAssetsConfig,
                    run: RunSettings) -> dg.MaterializeResult:
    config = settings.load()
    with run.stage(context, config) as stage:
        if not stage.todo():
            return dg.MaterializeResult(metadata={"skipped": "up to date", **stage.metadata()})
        report = validate_scorers(config, log=context.log.info)
        frame = with_lineage(report_frame(report), config.subject.model, config.hash, context.run_id)
        path = Store(config.store_root).write(VALIDITY_TABLE, frame)
        stage.complete(None, [path])
    header, rows = report_table(report)
    return dg.MaterializeResult(
        metadata={"validity": dg.MetadataValue.md(markdown_table(header, rows)), "rows": frame.height,
                  "skipped": dict(report.skipped) or "none", "path": dg.MetadataValue.path(str(path)),
                  "config_hash": config.hash},
        check_results=[selecting_check(report)],
    )


def selecting_check(report: ValidityReport) -> dg.AssetCheckResult:
    """WARN (not an error: the pipeline still runs) when the selecting simulator is at chance
    or could not be measured."""
    row = report.row(report.selecting)
    passed = bool(row is not None and row.beats_chance)
    metadata = {"selecting": report.selecting}
    if row is not None:
        metadata |= {"true_first": round(row.true_first, 3), "chance": round(row.chance, 3),
                     "mean_margin": round(row.mean_margin, 4), "puzzles": row.puzzles}
    else:
        metadata["why"] = report.skipped.get(report.selecting, "not measured")
    return dg.AssetCheckResult(check_name=SELECTING_BEATS_CHANCE, passed=passed,
                               severity=dg.AssetCheckSeverity.WARN, metadata=metadata)
