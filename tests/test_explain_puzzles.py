"""The few-shot puzzle pool: generated puzzles have exact ground truth; files load or fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuron_assets.config import ExplainConfig
from neuron_assets.explain.best_of_k import corpus_sample
from neuron_assets.explain.planted import planted_feature, word_tokens
from neuron_assets.explain.puzzles import (
    PuzzleFileError,
    generate_puzzles,
    load_puzzle_file,
    puzzle_pool,
    puzzles_to_json,
)
from tests.support.tiny_models import sample_texts


@pytest.fixture(scope="module")
def corpus():
    texts = sample_texts(300, seed=3)
    return corpus_sample([planted_feature(texts, ["dog"], prefix=["<s>"])]).records


def test_generated_puzzles_cover_every_rule_kind(corpus):
    puzzles = generate_puzzles(corpus, seed=0)
    kinds = {p.name.split(":")[0] for p in puzzles}
    assert kinds == {"word_set", "after", "char_class", "position"}
    assert len(puzzles) >= 10
    assert [p.name for p in generate_puzzles(corpus, seed=0)] == [p.name for p in puzzles], "deterministic"
    assert [p.name for p in generate_puzzles(corpus, seed=1)] != [p.name for p in puzzles]


def test_generated_puzzles_have_exact_activations(corpus):
    """Re-derive every activation from the puzzle's rule: the ground truth is exact."""
    for puzzle in generate_puzzles(corpus, seed=0):
        kind, _, arg = puzzle.name.partition(":")
        assert 3 <= sum(r.activations.any() for r in puzzle.records) <= 6
        for record in puzzle.records:
            assert record.prefix_len == 0 and "<s>" not in record.tokens, "the corpus prefix is dropped"
            for i, token in enumerate(record.tokens):
                key = token.strip().lower()
                if kind == "word_set":
                    nxt = record.tokens[i + 1] if i + 1 < len(record.tokens) else " "
                    expected = key in arg.split("|") and not nxt[:1].isalnum()
                elif kind == "after":
                    expected = i > 0 and record.tokens[i - 1].strip().lower() == arg and bool(key)
                elif arg == "digit":
                    expected = any(c.isdigit() for c in token)
                elif arg == "punctuation":
                    expected = bool(key) and not any(c.isalnum() for c in token)
                elif arg == "capitalized":
                    expected = token.strip().isalpha() and token.strip()[0].isupper()
                else:
                    expected = i == 0
                assert record.activations[i] == (10.0 if expected else 0.0), (puzzle.name, record.tokens, i)
        for word in arg.split("|") if kind == "word_set" else ():
            assert f'"{word}"' in puzzle.description


def test_a_solved_puzzle_highlights_every_active_token(corpus):
    punctuation = next(p for p in generate_puzzles(corpus) if p.name == "char_class:punctuation")
    solved = punctuation.solved()
    assert solved.shown.threshold == 10.0
    marked = sum(int((e.activations >= solved.shown.threshold).sum()) for e in solved.shown.positives)
    assert marked == sum(int(r.activations.astype(bool).sum()) for r in punctuation.records)


def test_user_puzzle_file_replaces_the_generated_pool(tmp_path, corpus):
    path = tmp_path / "puzzles.json"
    path.write_text(json.dumps([
        {"name": "animals", "description": "animal names",
         "sentences": [[["The", 0], [" cat", 10], [" sat", 0]], [["A", 0], [" dog", 7.5]]]},
    ]))
    config = ExplainConfig(puzzle_file=str(path))
    [puzzle] = puzzle_pool(config, corpus)
    assert puzzle.name == "animals" and puzzle.description == "animal names"
    assert puzzle.records[1].tokens == ("A", " dog")
    np.testing.assert_array_equal(puzzle.records[1].activations, [0, 7.5])
    assert puzzle_pool(config.model_copy(update={"few_shot": False}), corpus) == []
    assert len(puzzle_pool(ExplainConfig(), corpus)) >= 10


def test_generated_puzzles_round_trip_through_the_file_format(tmp_path, corpus):
    puzzles = generate_puzzles(corpus)[:3]
    path = tmp_path / "exported.json"
    path.write_text(puzzles_to_json(puzzles))
    loaded = load_puzzle_file(path)
    assert [(p.name, p.description) for p in loaded] == [(p.name, p.description) for p in puzzles]
    for a, b in zip(loaded, puzzles):
        assert [r.tokens for r in a.records] == [r.tokens for r in b.records]
        assert all(np.array_equal(x.activations, y.activations) for x, y in zip(a.records, b.records))


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read"),
    ("[]", "non-empty list"),
    ('[{"name": "x", "description": "y"}]', "needs the keys"),
    ('[{"name": "x", "description": "y", "sentences": [[["a", "high"]]]}]', r"\[\[token, activation\]"),
    ('[{"name": "x", "description": "y", "sentences": [[["a", -1]]]}]', "negative"),
    ('[{"name": "x", "description": "y", "sentences": [[["a", 0]]]}]', "no sentence has a non-zero"),
])
def test_bad_puzzle_files_fail_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PuzzleFileError, match=message):
        load_puzzle_file(path)


def test_word_tokens_concatenate_to_the_text():
    text = 'He said: "go 2 times", then left.\n'
    assert "".join(word_tokens(text)) == text
