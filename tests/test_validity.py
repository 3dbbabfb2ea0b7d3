"""Scorer validity and the semantic simulator: true descriptions against false ones."""

from __future__ import annotations

import json
from collections import Counter

import dagster as dg
import numpy as np
import pytest
import yaml

from neuron_assets.cli import main
from neuron_assets.config import load_config
from neuron_assets.defs.validity_assets import selecting_check
from neuron_assets.simulate import build_simulator
from neuron_assets.simulate.lexical import LexicalSimulator
from neuron_assets.simulate.semantic import HybridSimulator, SemanticSimulator
from neuron_assets.types import ActivationRecord
from neuron_assets.score.validity import (
    FALSE_KINDS,
    FIT,
    HELDOUT,
    PuzzleFileError,
    ValidityReport,
    project_corpus as _project_corpus,
    clear_margin,
    correlation_scorer,
    load_openai_puzzles,
    measure_validity,
    project_puzzles,
    true_first_credit,
)

# An outside check in OpenAI's layout: concepts the project's set does not have.
OPENAI_PUZZLES = {
    "animals": {
        "explanation": "animals",
        "false_explanations": ["colours", "the word \"the\""],
        "sentences": [
            ["The", [" cat", 10], " sat", " on", " the", " mat", "."],
            ["A", [" dog", 9], " and", " a", [" horse", 8], " ran", "."],
            ["We", " saw", " a", " red", " car", " today", "."],
        ],
    },
    "colours": {
        "explanation": "names of colours",
        "false_explanations": ["animals", "verbs of motion"],
        "sentences": [
            ["The", [" red", 10], " car", " was", " fast", "."],
            ["Her", [" blue", 10], " coat", " and", [" green", 7], " hat", "."],
            ["The", " dog", " ran", " home", "."],
        ],
    },
}


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("validity") / "config.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(path.parent / "home")}}))
    return path


@pytest.fixture(scope="module")
def puzzles(demo_config):
    config = load_config(str(demo_config))
    return project_puzzles(_project_corpus(config), seed=config.corpus.seed)


@pytest.fixture(scope="module")
def semantic():
    return SemanticSimulator(device="cpu")


@pytest.fixture
def openai_file(tmp_path):
    path = tmp_path / "puzzles.json"
    path.write_text(json.dumps(OPENAI_PUZZLES))
    return path


class ConstantSimulator:
    name = "constant"

    def simulate(self, descriptions, records):
        return [[np.full(len(r.tokens), 5.0, np.float32) for r in records] for _ in descriptions]


def test_project_set_has_rule_and_concept_puzzles_with_every_false_kind(puzzles):
    assert {p.family for p in puzzles} == {"rule", "concept"}
    assert sum(p.family == "concept" for p in puzzles) >= 8
    for puzzle in puzzles:
        assert [f.kind for f in puzzle.false_descriptions] == list(FALSE_KINDS)
        assert puzzle.description not in [f.text for f in puzzle.false_descriptions]
        assert any(r.activations.any() for r in puzzle.records)
    ids = [r.seq_id for p in puzzles for r in p.records]
    assert len(ids) == len(set(ids)), "every window has its own sequence id"


def test_the_project_set_is_split_into_a_fit_half_and_a_held_out_half(puzzles):
    assert len(puzzles) >= 100
    for family in ("rule", "concept"):
        halves = Counter(p.split for p in puzzles if p.family == family)
        assert set(halves) == {FIT, HELDOUT} and abs(halves[FIT] - halves[HELDOUT]) <= 1, (family, halves)
    rows = measure_validity(puzzles, {"correlation/constant": correlation_scorer(ConstantSimulator())})
    assert [(r.split, r.puzzles) for r in rows] == [(HELDOUT, sum(p.split == HELDOUT for p in puzzles)),
                                                     (FIT, sum(p.split == FIT for p in puzzles))]


def test_semantic_and_hybrid_beat_chance_clearly_on_held_out_puzzles_and_constant_is_at_chance(puzzles, semantic):
    hybrid = HybridSimulator(device="cpu")
    rows = {r.scorer: r for r in measure_validity(puzzles, {
        "correlation/semantic": correlation_scorer(semantic),
        "correlation/hybrid": correlation_scorer(hybrid),
        "correlation/constant": correlation_scorer(ConstantSimulator()),
    }) if r.split == HELDOUT}
    assert rows["correlation/hybrid"].beats_chance, rows["correlation/hybrid"]
    # the selector reads concepts no worse than semantic on puzzles nothing was fitted on
    assert rows["correlation/hybrid"].per_family["concept"] >= rows["correlation/semantic"].per_family["concept"]
    sem, constant = rows["correlation/semantic"], rows["correlation/constant"]
    assert sem.beats_chance and sem.true_first >= clear_margin(sem.chance, sem.puzzles), sem
    assert sem.mean_margin > 0
    assert constant.true_first == pytest.approx(constant.chance) and not constant.beats_chance

    warned = selecting_check(ValidityReport((constant,), "correlation/constant", {}))
    assert not warned.passed and warned.severity == dg.AssetCheckSeverity.WARN
    assert warned.metadata["true_first"].value == pytest.approx(constant.chance, abs=1e-3)
    assert selecting_check(ValidityReport((sem,), "correlation/semantic", {})).passed
    unmeasured = selecting_check(ValidityReport((), "correlation/finetuned", {"correlation/finetuned": "no checkpoint"}))
    assert not unmeasured.passed and unmeasured.severity == dg.AssetCheckSeverity.WARN


def test_ties_share_the_credit():
    assert true_first_credit(np.array([0.5, 0.1, 0.2])) == 1.0
    assert true_first_credit(np.array([0.5, 0.5, 0.2])) == 0.5
    assert true_first_credit(np.array([0.0, 0.0, 0.0, 0.0])) == 0.25
    assert true_first_credit(np.array([0.1, 0.5])) == 0.0


def test_openai_layout_loads(openai_file, semantic):
    loaded = load_openai_puzzles(openai_file)
    assert [p.name for p in loaded] == ["animals", "colours"]
    animals = loaded[0]
    assert animals.descriptions == ["animals", "colours", 'the word "the"'] and animals.chance == pytest.approx(1 / 3)
    assert animals.records[0].tokens == ("The", " cat", " sat", " on", " the", " mat", ".")
    assert animals.records[0].activations.tolist() == [0, 10, 0, 0, 0, 0, 0]
    rows = measure_validity(loaded, {"correlation/semantic": correlation_scorer(semantic)}, "puzzles.json")
    assert rows[0].puzzles == 2 and -1 <= rows[0].mean_margin <= 1


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "is not JSON"),
    ("[1, 2]", "non-empty JSON object"),
    ('{"a": {"explanation": "x", "sentences": [["t"]]}}', "puzzle 'a': missing false_explanations"),
    ('{"a": {"explanation": "", "false_explanations": ["y"], "sentences": [[["t", 1]]]}}', "non-empty string"),
    ('{"a": {"explanation": "x", "false_explanations": [], "sentences": [[["t", 1]]]}}', "false_explanations"),
    ('{"a": {"explanation": "x", "false_explanations": ["y"], "sentences": [[["t", -1]]]}}', "sentence 0, token 0"),
    ('{"a": {"explanation": "x", "false_explanations": ["y"], "sentences": [[["t", "hi"]]]}}', "[token, activation]"),
    ('{"a": {"explanation": "x", "false_explanations": ["y"], "sentences": [["t", "u"]]}}', "no token has a non-zero"),
    ('{"a": {"explanation": "x", "false_explanations": ["y"], "sentences": [[]]}}', "non-empty list of tokens"),
])
def test_malformed_openai_files_error_clearly(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PuzzleFileError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_openai_puzzles(path)
    assert str(path) in str(err.value)
    with pytest.raises(PuzzleFileError, match="cannot read"):
        load_openai_puzzles(tmp_path / "missing.json")


def test_semantic_is_independent_of_the_subject_tokenizer(semantic):
    """Units come from the text, so two tokenizations of one text predict the same per character."""
    words = ("⟨bos⟩", "The", " cat", " sat", " on", " the", " mat", " at", " nine")
    pieces = ("⟨bos⟩", "Th", "e", " c", "at", " sat", " o", "n", " the", " ma", "t", " at", " ni", "ne")
    records = [ActivationRecord(0, words, (-1,) * len(words), np.zeros(len(words), np.float32), prefix_len=1),
               ActivationRecord(1, pieces, (-1,) * len(pieces), np.zeros(len(pieces), np.float32), prefix_len=1)]
    first, second = semantic.simulate(["animals such as cats"], records)[0]
    assert first[0] == second[0] == 0, "the fixed prefix is never predicted"

    def per_character(tokens, values):
        return np.concatenate([np.full(len(t), v) for t, v in zip(tokens[1:], values[1:])])

    np.testing.assert_allclose(per_character(words, first), per_character(pieces, second), atol=1e-5)
    assert first[2] == first.max(), "'cat' is the token most like 'animals such as cats'"
    again = semantic.simulate(["animals such as cats"], records)[0]
    np.testing.assert_array_equal(again[0], first)


def test_quoted_tokens_and_tokens_placed_after_them(semantic):
    tokens = ("I", " sat", " on", " the", " mat", " by", " the", " door")
    record = ActivationRecord(0, tokens, (-1,) * len(tokens), np.zeros(len(tokens), np.float32))
    quoted, after = semantic.simulate(['the word "mat"', 'the token right after "the"'], [record])
    assert quoted[0][4] == 10
    assert after[0][4] == after[0][7] == 10 and after[0][3] < 10, "after: the next token, not the quoted one"


def test_semantic_is_registered(demo_config):
    config = load_config(str(demo_config))
    assert isinstance(build_simulator(config, name="semantic"), SemanticSimulator)
    assert isinstance(build_simulator(config, name="lexical"), LexicalSimulator)


def test_validate_scorers_cli(demo_config, openai_file, capsys, monkeypatch):
    """The whole command on real simulators; the project's set cut to its first puzzles of
    each family for time (the full set is measured above)."""
    import neuron_assets.score.validity as validity

    full = validity.project_puzzles
    monkeypatch.setattr(validity, "project_puzzles", lambda corpus, seed=0: [
        p for family in ("rule", "concept") for p in [q for q in full(corpus, seed) if q.family == family][:2]])
    assert main(["--config", str(demo_config), "validate-scorers", "--puzzles", str(openai_file),
                 "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["puzzle_set"], r["split"], r["scorer"]): r for r in report["rows"]}
    for scorer in ("correlation/lexical", "correlation/semantic", "correlation/hybrid", "embedding"):
        assert ("puzzles.json", "heldout", scorer) in rows, "an outside file is held out whole"
    assert sum(rows[("project", split, "correlation/semantic")]["puzzles"] for split in ("fit", "heldout")
               if ("project", split, "correlation/semantic") in rows) == 4
    assert report["selecting"] == f"correlation/{load_config(str(demo_config)).simulate.backend}"
    assert "correlation/finetuned" in report["skipped"], "no checkpoint here: skipped with the reason"
    assert main(["--config", str(demo_config), "validate-scorers", "--puzzles", str(openai_file)]) == 0
    table = capsys.readouterr().out
    assert "true first" in table and "correlation/semantic" in table and "(selects)" in table
    assert main(["--config", str(demo_config), "validate-scorers", "--puzzles", str(openai_file) + ".missing"]) == 1
    assert "cannot read puzzle file" in capsys.readouterr().err
