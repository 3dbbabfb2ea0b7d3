"""Effects of descriptions in Dagster: the `description_effects` asset (partitioned like
`neuron_descriptions`); neuron_assets.steer.effects measures and writes."""

import dagster as dg

from neuron_assets.defs.template import Call, Report, stage_asset
from neuron_assets.report.metadata import location
from neuron_assets.steer.effects import EFFECTS_TABLE, make_description_effects


def compute_effects(call: Call):
    return make_description_effects(call.config, call.todo, call.run_id, log=call.log, on_partition=call.stage.complete)


def report_effects(call: Call, written) -> Report:
    settings = call.config.effects
    rows = sum(w.rows for w in written)
    seconds = sum(w.seconds for w in written)
    metadata = {"descriptions": rows, "partitions": len(written), "seconds": round(seconds, 2),
                "seconds_per_feature": round(seconds / rows, 3) if rows else None, "exemplars": settings.exemplars,
                "prompts": len(settings.prompts), "n_tokens": settings.n_tokens, "strength": settings.strength}
    paths = [w.path for w in written if w.path is not None]
    if paths:
        metadata["path"] = location(paths[0])
    return Report(metadata)


def effects_assets(partitions: dg.MultiPartitionsDefinition, config=None) -> list[dg.AssetsDefinition]:
    return [stage_asset(
        EFFECTS_TABLE, compute_effects, report_effects, config=config, partitions=partitions, pool="gpu",
        description="What each selected description's feature does when it is changed (table `description_effects`): "
        "the next-token loss change and KL when it is ablated on its top test exemplars; whether steering it up "
        "(q99 x effects.strength) moves neutral continuations toward its description more than toward the control "
        "description; its promoted tokens against the description. On demand unless effects.in_run.",
        kinds={"pytorch", "parquet"},
    )]
