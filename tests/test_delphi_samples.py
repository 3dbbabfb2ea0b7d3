"""Detection and fuzzing as delphi defines them, on samples made by the real exemplar pass.

A tiny Llama has one neuron planted to fire on " old" (and a neighbour on " small"); the
corpus, the exemplar pass, the exemplars table and its reader make every sample the scorers
see. The val reservoir is larger than the number of val sequences, so it holds every
activating one and the deciles the collector draws from are exact: they are checked
against brute-force per-sequence extremes.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from neuron_assets.config import config_from_dict
from neuron_assets.exemplars import load_feature_exemplars
from neuron_assets.stages import make_corpus, make_exemplars
from neuron_assets.score import (
    DetectionScorer,
    FuzzingScorer,
    activating_and_quiet,
    activating_threshold,
    judged_candidates,
    JudgeSample,
)
from neuron_assets.store import Store
from neuron_assets.subject import load_subject
from tests.support.judges import QuotedWordJudge
from neuron_assets.types import Partition, Polarity, Sample, Split
from tests.support.planted_model import PlantedNeuron, plant_neurons
from tests.support.tiny_models import make_tiny_llama, sample_texts

OLD = PlantedNeuron(0, 5, " old")
TEACHER = PlantedNeuron(0, 9, " small")
BINS = 10
FRACTION = 0.2


@pytest.fixture(scope="module")
def collected(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("delphi")
    text_corpus = folder / "texts"  # 200 documents: enough val sequences with " old" for ten deciles
    text_corpus.mkdir()
    sentences = sample_texts(1600, seed=3)
    for i in range(200):
        (text_corpus / f"doc{i:03d}.txt").write_text(" ".join(sentences[i * 8 : (i + 1) * 8]))
    model = plant_neurons(make_tiny_llama(folder / "model", tiny_tokenizer, num_layers=1, hidden=64, intermediate=32,
                                          heads=1), [OLD, TEACHER])
    config = config_from_dict({
        "name": "delphi",
        "storage": {"root": str(folder / "home")},
        "subject": {"model": str(model), "batch_size": 16},
        "corpus": {"sources": [{"name": "texts", "kind": "text", "path": str(text_corpus)}], "seq_len": 32,
                   "chat_prefix": None, "sequences_per_split": 150},
        "features": {"layers": [0], "neurons": [3, OLD.index, TEACHER.index]}, "sae": {"layers": []},
        "exemplars": {"top_k": 4, "random_per_split": 3, "quantile_bins": BINS, "per_quantile": 1,
                      "quantile_reservoir": 150, "quiet_per_split": 8, "activating_fraction": FRACTION,
                      "stats_token_sample": 256},
    })
    (folder / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    make_corpus(config, "test")
    make_exemplars(config, [(0, Polarity.POS)], "test", progress=False)
    store = Store(config.root)
    features = {f.feature.index: f for f in load_feature_exemplars(store, 0, Polarity.POS)}
    return config, store, features


def _val_extremes(config, store, neuron: int) -> dict[int, float]:
    """Brute force: each val sequence's max activation after its prefix, one sequence at a time."""
    subject = load_subject(config.subject)
    sequences = store.read("sequences").filter(pl.col("split") == "val")
    out = {}
    for row in sequences.iter_rows(named=True):
        ids = torch.tensor([row["token_ids"]])
        acts = subject.activations(ids, torch.ones_like(ids), {0: torch.tensor([neuron])})[0][0, :, 0]
        out[row["seq_id"]] = float(acts[row["prefix_len"] :].float().max())
    return out


def test_the_collector_samples_every_exact_decile_and_quiet_sequences_below_the_threshold(collected):
    config, store, features = collected
    feature = features[OLD.index]
    threshold = activating_threshold(feature, FRACTION)
    assert threshold > 0
    truth = _val_extremes(config, store, OLD.index)
    activating = np.sort([e for e in truth.values() if e > threshold])
    assert len(activating) >= BINS, "the corpus has too few val sequences with the planted token"
    quantiles = feature.quantile(Split.VAL)
    assert sorted(e.bin for e in quantiles) == list(range(BINS)), "one sample from every decile"
    for exemplar in quantiles:  # each sample lies in its equal-count bin of the activating val sequences
        lo, hi = exemplar.bin * len(activating) // BINS, (exemplar.bin + 1) * len(activating) // BINS
        assert activating[lo] - 1e-3 <= exemplar.extreme <= activating[hi - 1] + 1e-3, exemplar.bin
        assert exemplar.extreme == pytest.approx(truth[exemplar.record.seq_id], abs=2e-3)
        assert "old" in exemplar.record.text
    quiet = feature.quiet(Split.VAL)
    assert len(quiet) == 8 and len({e.record.seq_id for e in quiet}) == 8
    for exemplar in quiet:
        assert exemplar.extreme <= threshold and truth[exemplar.record.seq_id] <= threshold + 1e-3
        assert " old" not in exemplar.record.tokens
    # the table holds the kind; every split has its own quiet sample
    table = store.read("exemplars", 0, "pos").filter(pl.col("sample") == Sample.QUIET.value)
    assert set(table["split"].unique()) == {"train", "val", "test"}
    for split in Split:  # train is gated against the running max: still below the final threshold
        assert all(e.extreme <= threshold for e in feature.quiet(split))
        assert all(e.extreme > threshold for e in feature.quantile(split))


def test_detection_and_fuzzing_show_every_decile_and_the_top(collected):
    _, _, features = collected
    feature = features[OLD.index]
    import random

    positives, negatives, threshold = activating_and_quiet(feature, Split.VAL, JudgeSample(BINS + 1, 8, FRACTION),
                                                           random.Random(0))
    top_ids = {e.record.seq_id for e in feature.top(Split.VAL)}
    assert any(e.sample is Sample.TOP for e in positives) and top_ids & {e.record.seq_id for e in positives}
    shown_bins = {e.bin for e in positives if e.sample is Sample.QUANTILE}
    # a top exemplar may also be the sample of the top decile: then that decile is shown by it
    top_decile = {e.record.seq_id for e in feature.quantile(Split.VAL) if e.bin == BINS - 1}
    assert shown_bins | ({BINS - 1} if top_decile & top_ids else set()) == set(range(BINS))
    assert all(e.extreme > threshold for e in positives)
    assert negatives and all(e.extreme <= threshold for e in negatives)
    assert all(e.sample is Sample.QUIET for e in negatives)
    assert not {e.record.seq_id for e in positives} & {e.record.seq_id for e in negatives}
    # fewer wanted than strata: the top and the strongest deciles first, never only the weakest
    few, _, _ = activating_and_quiet(feature, Split.VAL, JudgeSample(4, 0, FRACTION), random.Random(0))
    assert few[0].sample is Sample.TOP and min(e.extreme for e in few) >= sorted(
        e.extreme for e in feature.quantile(Split.VAL))[BINS - 4] - 1e-6


def test_a_true_description_beats_a_shuffled_one(collected):
    _, _, features = collected
    for cls in (DetectionScorer, FuzzingScorer):
        scorer = cls(QuotedWordJudge(), examples=50, quiet=50, batch=5, fraction=FRACTION)
        true, shuffled = scorer.score(features[OLD.index], ['the word "old"', 'the word "small"'], Split.VAL)
        assert true.value > 0.9 and not true.flags, (cls.name, true)
        assert shuffled.value < true.value - 0.3, (cls.name, shuffled)
        assert true.n_examples >= BINS + 8


def test_judges_see_only_the_selectors_best_candidates(collected):
    from neuron_assets.score.select import score_candidates

    _, _, features = collected

    class _Length:  # a selector that prefers long descriptions
        name, simulator = "length", None

        def score(self, feature, descriptions, split):
            from neuron_assets.score import Score

            return [Score(len(d) / 100) for d in descriptions]

    feature = features[OLD.index]
    candidates = {feature.feature: ['the word "old"', None, 'words that name the royal "old"', 'x']}
    frame = score_candidates([feature], candidates, [_Length()], Split.VAL)
    best = judged_candidates(frame, candidates, _Length(), 1)[feature.feature]
    assert best == [None, None, 'words that name the royal "old"', None]
    two = judged_candidates(frame, candidates, _Length(), 2)[feature.feature]
    assert two == ['the word "old"', None, 'words that name the royal "old"', None]
    assert judged_candidates(frame, candidates, _Length(), "all") == candidates


def test_show_lists_a_features_quiet_sequences(collected, capsys):
    from neuron_assets.cli import main

    config, _, features = collected
    path = config.root.parent / "config.yaml"
    assert main(["--config", str(path), "show", "0", str(OLD.index), "--split", "val", "--sample", "quiet", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "quiet val exemplars" in out
    shown = [line for line in out.splitlines() if re.match(r"^\s*\d+\s+-?\d+\.\d+\s", line)]
    assert len(shown) == 3 and all(" old" not in line for line in shown)


@pytest.mark.slow
def test_smollm2_judges_the_collected_samples_in_prompts_it_can_read(collected):
    """The real SmolLM2 judge on collected samples: every example's prompt fits its context and
    is decided through the logprobs of "0" and "1", so none is left unanswered. A 135M model
    judges poorly; this holds it to the prompt format and the accounting, not to quality."""
    from neuron_assets.builtin_models import BUILTIN_SMOLLM2
    from neuron_assets.config import ExplainConfig
    from neuron_assets.score import LLMJudge

    _, _, features = collected
    judge = LLMJudge(ExplainConfig(backend="transformers", model=BUILTIN_SMOLLM2, max_retries=0, context_window=2048,
                                   device="cpu", temperature=0.0))
    for cls in (DetectionScorer, FuzzingScorer):
        [score] = cls(judge, examples=5, quiet=5, batch=5, fraction=FRACTION).score(
            features[OLD.index], ['the word "old"'], Split.VAL)
        assert score.n_examples == 10 and 0.0 <= score.value <= 1.0
        assert not any(flag.startswith("unanswered") for flag in score.flags), score.flags
    assert judge.decided_by_logprobs == 20 and judge.unanswered == 0, judge.failures
    assert 0 < judge.prompt_tokens / 20 < 2048


def test_the_scoring_stage_judges_only_the_best_candidate_and_the_control(collected):
    from neuron_assets.config import config_from_dict
    from neuron_assets.score.crossfit import Scoring
    from neuron_assets.stages import make_description_scores

    config, store, features = collected
    raw = config.model_dump(mode="json")
    raw["simulate"] = {"backend": "lexical", "compare_with": []}
    raw["score"].update(scorers=["correlation", "detection", "fuzzing"], judge_examples=10, judge_quiet=10)
    config = config_from_dict(raw)
    candidates = ['the word "small"', 'the word "old"', 'commas']
    store.write("candidate_descriptions", pl.DataFrame(
        {"neuron": [n for n in sorted(features) for _ in candidates], "candidate": [0, 1, 2] * len(features),
         "description": candidates * len(features)}), 0, "pos")
    [written] = make_description_scores(config, [Partition(0, Polarity.POS)], "test",
                                        Scoring.build(config, store, judge=QuotedWordJudge()))
    frame = store.read("description_scores", 0, "pos").filter(pl.col("split") == "val")
    planted = frame.filter(pl.col("neuron") == OLD.index)
    judged = planted.filter(pl.col("scorer").is_in(["detection", "fuzzing"]))
    assert sorted(judged.filter(pl.col("role") == "candidate")["candidate"].to_list()) == [1, 1], "only the best"
    assert judged.filter(pl.col("role") == "shuffled_control").height == 2, "the control is judged too"
    assert planted.filter(pl.col("scorer") == "correlation").height == len(candidates) + 1
    assert (judged.filter(pl.col("role") == "candidate")["score"] > 0.9).all()
    assert written.features == len(features)


def test_the_selector_scores_a_literal_description_of_a_token_exact_feature_like_the_lexical_rule(collected):
    """A neuron planted to fire on one token, collected by the real pass: the description that
    names its trigger scores what the exact rule gives it under the hybrid selector; the
    semantic simulator, which mixes in similarity everywhere, underrates it."""
    from neuron_assets.config import Config
    from neuron_assets.score import CorrelationScorer
    from neuron_assets.simulate import build_simulator

    _, _, features = collected
    feature = features[OLD.index]
    scores = {}
    for name in ("lexical", "hybrid", "semantic"):
        scorer = CorrelationScorer(build_simulator(Config(), None, name))
        scores[name] = scorer.score(feature, ['the word "old"'], Split.VAL)[0].value
    assert scores["lexical"] > 0.8, scores
    assert scores["hybrid"] == pytest.approx(scores["lexical"], abs=0.02), scores
    assert scores["semantic"] < scores["hybrid"], scores
