"""Assets of the foundation: the corpus and the per-layer exemplar tables (one asset template:
neuron_assets.defs.template)."""

from neuron_assets.checks import EQUAL_SPLITS, EVERY_FEATURE_HAS_EXEMPLARS, equal_splits, every_feature_has_exemplars
from neuron_assets.defs.template import Call, Report, stage_asset
from neuron_assets.report.metadata import corpus_metadata, exemplars_metadata, exemplars_partition_metadata, split_sizes
from neuron_assets.stages import make_corpus, make_exemplars
from neuron_assets.store import Store


def compute_corpus(call: Call):
    if not call.todo:  # another run may have written it while this one waited for its lock
        return None
    written = make_corpus(call.config, call.run_id)
    call.stage.complete(None, [written.path])
    return written


def report_corpus(call: Call, written) -> Report:
    sizes = split_sizes(call.store)
    return Report(corpus_metadata(call.config, call.store, sizes, up_to_date=written is None), [equal_splits(sizes)])


corpus = stage_asset(
    "corpus", compute_corpus, report_corpus, always=True,  # its metadata and check also when up to date
    description="The corpus: fixed-length token sequences in equal train / val / test splits (table `sequences`).",
    checks={EQUAL_SPLITS: "train, val and test hold as many sequences each"},
    kinds={"parquet"},  # single-run backfill: `dagster asset materialize --partition-range` may select corpus too
)


def compute_exemplars(call: Call):
    """One forward pass over the corpus for every requested partition."""
    call.log(f"one forward pass for {len(call.todo)} partitions: {[p.key for p in call.todo]}")
    with call.stage.progress.task("activations", _activation_batches(call.store, call.config), "batch") as task:
        run = make_exemplars(call.config, call.todo, call.run_id, subject=call.resources.subject.load(call.config),
                             progress=False, on_batch=lambda done: task.advance(done - task.done), log=call.log)
    for partition in call.todo:
        call.stage.complete(partition, [w.path for w in run.written
                                        if (w.layer, w.polarity) == (partition.layer, partition.polarity.value)])
    return run


def report_exemplars(call: Call, run) -> Report:
    checks, by_partition = every_feature_has_exemplars(call.store, run.written, call.todo)
    return Report(exemplars_metadata(call.config, call.store, run, call.todo), checks, by_partition,
                  partition_metadata=exemplars_partition_metadata(call.store, run, call.todo))


def exemplar_assets(partitions, config=None) -> list:
    """``config`` decides whether the exemplar pass reads SAEs (then it follows sae_checkpoint)."""
    return [stage_asset(
        "exemplars", compute_exemplars, report_exemplars, config=config, partitions=partitions, pool="gpu",
        resources=("subject",), up_to_date="every partition is up to date",
        description="Per feature (neuron, or SAE latent: kind) x polarity x split: top-k, random and "
        "activation-decile exemplars with per-token activations (table `exemplars`), plus per-feature statistics "
        "(table `neuron_stats`). Materializing many partitions is one run and one forward pass over the corpus.",
        checks={EVERY_FEATURE_HAS_EXEMPLARS: None},
        kinds={"pytorch", "parquet"},
    )]


def _activation_batches(store: Store, config) -> int:
    """Forward passes of the activation pass: each split in batches of subject.batch_size."""
    per_split = store.scan("sequences").group_by("split").len().collect()["len"].to_list()
    return sum(-(-n // config.subject.batch_size) for n in per_split)
