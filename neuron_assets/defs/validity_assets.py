"""The scorer-validity asset: how often each simulator and scorer ranks a true description
above false ones, on the project's puzzles, and a check that warns when the selecting
simulator does not beat chance clearly (neuron_assets.score.validity measures)."""

import dagster as dg

from neuron_assets import checks
from neuron_assets.checks import SELECTING_BEATS_CHANCE
from neuron_assets.defs.template import Call, Report, check_result, stage_asset
from neuron_assets.report.metadata import validity_metadata
from neuron_assets.score.validity import VALIDITY_TABLE, ValidityReport, report_frame, validate_scorers
from neuron_assets.store import with_lineage


def compute_validity(call: Call):
    report = validate_scorers(call.config, log=call.log, progress=call.stage.progress)
    frame = with_lineage(report_frame(report), call.config.subject.model, call.config.hash, call.run_id)
    path = call.store.write(VALIDITY_TABLE, frame)
    call.stage.complete(None, [path])
    return report, frame.height, path


def report_validity(call: Call, result) -> Report:
    report, rows, path = result
    return Report(validity_metadata(call.config, report, rows, path), [checks.selecting_check(report)])


scorer_validity = stage_asset(
    "scorer_validity", compute_validity, report_validity,  # measures the trained simulator when there is one
    description="Scorer validity (table `scorer_validity`): on the project's puzzles (exact-rule puzzles from the "
    "corpus and concept puzzles, each with one true description and false ones that are too broad, too narrow, "
    "name wrong tokens or a neighbour's), the share of puzzles where each simulator's correlation (and the "
    "embedding scorer) ranks the true description highest, and the mean margin over the best false one.",
    checks={SELECTING_BEATS_CHANCE: "the simulator that selects (simulate.backend) ranks true descriptions "
                                    "first clearly more often than chance on the project's puzzles"},
    kinds={"parquet"},
)


def selecting_check(report: ValidityReport) -> dg.AssetCheckResult:
    """neuron_assets.checks.selecting_check as Dagster's check result (a WARN)."""
    return check_result(checks.selecting_check(report))
