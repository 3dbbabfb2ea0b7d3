"""Prompt formats of the explainer: golden strings, highlight thresholds, display, fitting."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from neuron_assets.config import ExplainConfig, PromptFormat
from neuron_assets.excerpts import (
    MIN_HIGHLIGHTED,
    Excerpt,
    TokenDisplay,
    excerpt_of,
    highlight_threshold,
    highlighted_text,
)
from neuron_assets.explain import MalformedAnswer, parse_description
from neuron_assets.explain.backends import ChatTokenCounter
from neuron_assets.explain.best_of_k import PromptTooLong, fit_prompt, plan_candidate
from neuron_assets.explain.formats import ChatMessage, prompt_builder_for
from neuron_assets.explain.puzzles import Puzzle
from neuron_assets.types import (
    ActivationRecord,
    Exemplar,
    Sample,
    FeatureExemplars,
    FeatureId,
    FeatureStats,
    Polarity,
    Split,
)

# Three exemplars of a feature for floor coverings, peak 9. The highlight ladder (fractions of
# the shown peak) marks 1 position down to 0.7 (6.3), 2 at 0.6 and 0.5 ("mat", "rug"), and 3 at
# 0.4 (3.6): "mat", "door", "rug"; the "mat" of "doormat" (3.5) stays below it.
ROWS = [
    [("The", 0), (" cat", 0.2), (" sat", 0), (" on", 0), (" the", 0), (" mat", 9.0), (".", 0)],
    [("A", 0), (" dog", 0), (" ran", 0), (" past", 0), (" the", 0), (" door", 4.0), ("mat", 3.5), (" quickly", 0)],
    [("Its", 0), (" fur", 0), (" was", 0), (" on", 0), (" the", 1.0), (" rug", 6.0), (" again", 0)],
]
QUANTILES = {0.5: 0.0, 0.9: 2.0, 0.99: 5.0, 0.999: 8.0}

PUZZLE = Puzzle(
    "word_set:blue|red",
    'the words "red" and "blue"',
    (
        ActivationRecord(-1, ("A", " red", " car", " drove", " down", " the", " road"), (-1,) * 7,
                         np.array([0, 10, 0, 0, 0, 0, 0], np.float32)),
        ActivationRecord(-2, ("The", " sky", " is", " blue", " today"), (-1,) * 5,
                         np.array([0, 0, 0, 10, 0], np.float32)),
        ActivationRecord(-3, ("No", " colour", " here"), (-1, -1, -1), np.array([0, 0, 0], np.float32)),
    ),
)

HIGHLIGHT_SYSTEM = (
    "We are studying a feature of a neural network language model: a number computed at every token of a text, "
    "large where the text holds some particular pattern. Below are excerpts of text on which the feature is "
    "strongly active, with the tokens where it is active marked {{like this}}. Describe what the feature responds "
    "to: what the marked tokens have in common, and the context before them when it matters. Write one concise "
    "phrase, specific enough that a reader could predict which tokens of a new text the feature is active on.\n"
    "\n"
    "Special tokens of a chat format are shown as ⟨name⟩, line breaks as \\n and tabs as \\t.\n"
    "\n"
    "Answer with one line: [DESCRIPTION]: followed by the description."
)
HIGHLIGHT_FEATURE = (
    "Excerpt 1: The cat sat on the {{mat}}.\n"
    "Excerpt 2: A dog ran past the {{door}}mat quickly\n"
    "Excerpt 3: Its fur was on the {{rug}} again"
)


def record(seq_id: int, pairs, sign: int = 1, prefix_len: int = 0) -> ActivationRecord:
    tokens = tuple(t for t, _ in pairs)
    return ActivationRecord(seq_id, tokens, tuple(range(len(tokens))),
                            np.array([sign * a for _, a in pairs], np.float32), prefix_len)


def feature(rows, polarity: Polarity = Polarity.POS, quantiles=QUANTILES, extra=()) -> FeatureExemplars:
    """Train top exemplars from ``rows`` (activations given in the polarity's orientation)."""
    records = [record(i, r, polarity.sign) for i, r in enumerate(rows)]
    exemplars = [Exemplar(Split.TRAIN, Sample.TOP, i, float(np.max(np.abs(r.activations))), r)
                 for i, r in enumerate(records)]
    stats = FeatureStats(max=9.0, mean=0.1, std=1.0, frac_active=0.05, quantiles=dict(quantiles))
    return FeatureExemplars(FeatureId(2, 7, polarity), stats, tuple(exemplars) + tuple(extra))


def messages_for(fmt: PromptFormat, feat: FeatureExemplars, cot: bool = False, puzzle=PUZZLE, seed=0):
    builder = prompt_builder_for(ExplainConfig(prompt_format=fmt, cot=cot))
    excerpts = [excerpt_of(e.record, feat.feature.polarity) for e in feat.top(Split.TRAIN)]
    shown = builder.show(feat, excerpts, TokenDisplay(), random.Random(seed))
    return builder.messages(shown, puzzle.solved() if puzzle else None)


def as_pairs(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


# -- golden prompts ------------------------------------------------------------------------


def test_highlight_prompt_golden():
    assert as_pairs(messages_for(PromptFormat.HIGHLIGHT, feature(ROWS))) == [
        ("system", HIGHLIGHT_SYSTEM),
        ("user", "Excerpt 1: A {{red}} car drove down the road\nExcerpt 2: The sky is {{blue}} today"),
        ("assistant", '[DESCRIPTION]: the words "red" and "blue"'),
        ("user", HIGHLIGHT_FEATURE),
    ]


def test_negative_polarity_uses_the_same_format_on_the_min_side():
    # The neg feature's activations are the negated ROWS, plus large *positive* values that a
    # neg description must ignore.
    rows = [list(r) for r in ROWS]
    rows[0][1] = (" cat", -50.0)  # in neg orientation: +50 * -1 -> a positive activation
    neg = feature(rows, Polarity.NEG)
    assert neg.top(Split.TRAIN)[0].record.activations[1] == pytest.approx(50.0)
    assert neg.top(Split.TRAIN)[0].record.activations[5] == pytest.approx(-9.0)
    messages = messages_for(PromptFormat.HIGHLIGHT, neg)
    assert messages[-1].content == HIGHLIGHT_FEATURE
    assert as_pairs(messages) == as_pairs(messages_for(PromptFormat.HIGHLIGHT, feature(ROWS)))


def test_output_tokens_follow_the_excerpts_when_asked():
    """explain.output_tokens: the feature's logit-lens tokens end its excerpt list (the few-shot
    puzzle has none), and the system prompt says what they are; off, the prompt is unchanged."""
    from dataclasses import replace

    from neuron_assets.explain.formats import OUTPUT_TOKENS_NOTE

    feat = replace(feature(ROWS), output_tokens=(" mat", "\n", " rug"))
    builder = prompt_builder_for(ExplainConfig(prompt_format=PromptFormat.HIGHLIGHT, output_tokens=True))
    excerpts = [excerpt_of(e.record, feat.feature.polarity) for e in feat.top(Split.TRAIN)]
    messages = builder.messages(builder.show(feat, excerpts, TokenDisplay(), random.Random(0)), PUZZLE.solved())
    assert messages[0].content == HIGHLIGHT_SYSTEM.replace("\\t.\n", "\\t.\n\n" + OUTPUT_TOKENS_NOTE + "\n")
    assert messages[1].content.startswith("Excerpt 1: A {{red}}") and "Output tokens" not in messages[1].content
    assert messages[-1].content == HIGHLIGHT_FEATURE + '\n\nOutput tokens the feature promotes: " mat", "\\n", " rug"'
    assert as_pairs(messages_for(PromptFormat.HIGHLIGHT, feat)) == as_pairs(messages_for(PromptFormat.HIGHLIGHT, feature(ROWS)))
    with pytest.raises(ValueError, match="output_tokens"):
        ExplainConfig(prompt_format=PromptFormat.TRANSLUCE_DISTILLED, few_shot=False, cot=False, output_tokens=True)


def test_token_activation_prompt_golden():
    messages = messages_for(PromptFormat.TOKEN_ACTIVATION, feature(ROWS))
    assert messages[0].content == (
        "We are studying a feature of a neural network language model: a number computed at every token of a text, "
        "large where the text holds some particular pattern. Below are excerpts of text on which the feature is "
        "strongly active, one token per line as token<tab>activation, between <start> and <end>. Activations go "
        "from 0 to 10; the higher the value, the stronger the match. Describe what the feature responds to: what "
        "the tokens with high activations have in common, and the context before them when it matters. Write one "
        "concise phrase, specific enough that a reader could predict which tokens of a new text the feature is "
        "active on.\n\nSpecial tokens of a chat format are shown as ⟨name⟩, line breaks as \\n and tabs as \\t.\n\n"
        "Answer with one line: [DESCRIPTION]: followed by the description."
    )
    # The puzzle: 2 of 12 tokens non-zero (< 20%), so the non-zero pairs come again.
    assert messages[1].content == (
        "Excerpt 1:\n<start>\nA\t0\n red\t10\n car\t0\n drove\t0\n down\t0\n the\t0\n road\t0\n<end>\n\n"
        "Excerpt 2:\n<start>\nThe\t0\n sky\t0\n is\t0\n blue\t10\n today\t0\n<end>\n\n"
        "Same activations, but with all zeros filtered out:\n"
        "Excerpt 1:\n<start>\n red\t10\n<end>\n\n"
        "Excerpt 2:\n<start>\n blue\t10\n<end>"
    )
    assert messages[2].content == '[DESCRIPTION]: the words "red" and "blue"'
    # The feature: 5 of 22 tokens non-zero (>= 20%): one list; floor(10 * a / 9).
    assert messages[3].content == (
        "Excerpt 1:\n<start>\nThe\t0\n cat\t0\n sat\t0\n on\t0\n the\t0\n mat\t10\n.\t0\n<end>\n\n"
        "Excerpt 2:\n<start>\nA\t0\n dog\t0\n ran\t0\n past\t0\n the\t0\n door\t4\nmat\t3\n quickly\t0\n<end>\n\n"
        "Excerpt 3:\n<start>\nIts\t0\n fur\t0\n was\t0\n on\t0\n the\t1\n rug\t6\n again\t0\n<end>"
    )
    neg = messages_for(PromptFormat.TOKEN_ACTIVATION, feature(ROWS, Polarity.NEG))
    assert as_pairs(neg) == as_pairs(messages)


def test_contrastive_prompt_golden():
    # A random train sequence that holds "mat" and "rug" where the feature stays quiet: a hard
    # negative (cut to a window around "mat"); one with no shared token: a random negative.
    hard = record(10, [("A", 0), (" mat", 0.0), (" and", 0), (" a", 0), (" rug", 0.1), (" lay", 0), (" there", 0)])
    calm = record(11, [("Nothing", 0), (" to", 0), (" see", 0), (".", 0)])
    active = record(12, [("Some", 0), (" mat", 8.0)])  # active: neither kind of negative
    extra = [Exemplar(Split.TRAIN, Sample.RANDOM, i, 0.0, r) for i, r in enumerate((hard, calm, active))]
    extra.append(Exemplar(Split.VAL, Sample.RANDOM, 0, 0.0, record(13, [("Val", 0), (" mat", 0)])))
    messages = messages_for(PromptFormat.CONTRASTIVE, feature(ROWS, extra=extra))
    assert messages[0].content.startswith(
        "We are studying a feature of a neural network language model: a number computed at every token of a text, "
        "large where the text holds some particular pattern. Below are excerpts of text on which the feature is "
        "strongly active, with the tokens where it is active marked {{like this}}, followed by excerpts on which it "
        "is not active at all; some of those contain the same words as the marked tokens. Describe what the feature "
        "responds to, and in particular what separates the active excerpts from the inactive ones."
    )
    assert messages[1].content == (
        "Active excerpts:\nExcerpt 1: A {{red}} car drove down the road\nExcerpt 2: The sky is {{blue}} today\n\n"
        "Inactive excerpts:\nExcerpt 3: No colour here"
    )
    assert messages[3].content == (
        "Active excerpts:\n" + HIGHLIGHT_FEATURE + "\n\n"
        "Inactive excerpts:\n"
        "Excerpt 4: A mat and a rug lay there\n"
        "Excerpt 5: Nothing to see."
    )


def test_chain_of_thought_prompt_golden():
    messages = messages_for(PromptFormat.HIGHLIGHT, feature(ROWS), cot=True)
    assert messages[0].content == HIGHLIGHT_SYSTEM.replace(
        "Answer with one line: [DESCRIPTION]: followed by the description.",
        "First reason step by step: which tokens are most active, what they have in common, what comes before "
        "them; check the idea against every excerpt. Then end with one line: [DESCRIPTION]: followed by the "
        "description.",
    )
    assert messages[2].content == (
        'Step 1: the most active tokens are "blue" and "red".\n'
        'Step 2: what they have in common, checked against every excerpt: the words "red" and "blue".\n'
        '[DESCRIPTION]: the words "red" and "blue"'
    )
    assert messages[3].content == HIGHLIGHT_FEATURE
    assert prompt_builder_for(ExplainConfig(cot=True)).name == "highlight+cot"
    assert not ExplainConfig().cot, "chain of thought is off by default"


def test_chat_special_tokens_cannot_be_mistaken_for_control_tokens():
    # A Llama-3 chat: the header is the fixed prefix (never shown); <|eot_id|> and the next
    # header are special tokens inside the text; "<|eot_id|>" also occurs as plain text,
    # split over ordinary tokens, which the explainer's tokenizer would still read as one.
    pairs = [("<|begin_of_text|>", 0), ("<|start_header_id|>", 0), ("user", 0), ("<|end_header_id|>", 0),
             ("\n\n", 0), ("Hi", 0), (" there", 3.0), ("<|eot_id|>", 5.0), ("<|start_header_id|>", 0),
             ("assistant", 0), ("<|end_header_id|>", 0), ("\n\n", 0), ("Type", 0), (" <|", 4.0), ("eot", 4.0),
             ("_id", 0), ("|>", 0), ("\tok", 2.0)]
    chat = record(0, pairs, prefix_len=5)
    special_ids = {0, 1, 3, 7, 8, 10}  # the positions of the special tokens (ids = positions here)
    display = TokenDisplay(special_ids)
    text = highlighted_text(excerpt_of(chat, Polarity.POS, display), threshold=2.0)
    assert text == "Hi {{there⟨eot_id⟩}}⟨start_header_id⟩assistant⟨end_header_id⟩\\n\\nType {{⟨eot}}_id⟩{{\\tok}}"
    # Without the tokenizer's ids, control-token shapes are still recognized.
    assert highlighted_text(excerpt_of(chat, Polarity.POS, TokenDisplay()), 2.0) == text
    assert "<|" not in text and "|>" not in text


class FakeTokenizer:
    all_special_ids = [0, 2]
    added_tokens_decoder = {5: type("Added", (), {"special": True})(), 6: type("Added", (), {"special": False})()}


def test_token_display_reads_special_ids_from_the_tokenizer():
    display = TokenDisplay.for_tokenizer(FakeTokenizer())
    assert display.special_ids == {0, 2, 5}
    assert display.show("<s>", 0) == "⟨s⟩" and display.show(" END", 5) == " ⟨END⟩" and display.show("x", 6) == "x"
    assert display.show("a\tb\nc") == "a\\tb\\nc"


# -- long exemplars: fitting the context window ------------------------------------------------


def long_feature(polarity: Polarity = Polarity.POS) -> FeatureExemplars:
    rows = []
    for i in range(6):
        words = [(f" w{i}x{j}", 0.0) for j in range(60)]
        words[40] = (" PEAK", 9.0)
        words[41] = (f" after{i}", 3.0)
        rows.append(words)
    return feature(rows, polarity)


def fitted(budget: int, fmt=PromptFormat.HIGHLIGHT, polarity=Polarity.POS, puzzle=PUZZLE):
    feat = long_feature(polarity)
    builder = prompt_builder_for(ExplainConfig(prompt_format=fmt))
    records = [e.record for e in feat.top(Split.TRAIN)]
    return fit_prompt(builder, feat, records, puzzle.solved() if puzzle else None, TokenDisplay(),
                      random.Random(0), ChatTokenCounter(), budget)


def test_long_exemplars_are_dropped_whole_to_fit():
    full = fitted(10_000)
    assert full.seq_ids == (0, 1, 2, 3, 4, 5) and full.puzzle == "word_set:blue|red"
    smaller = fitted(full.tokens - 1)
    assert smaller.tokens <= full.tokens - 1
    assert smaller.seq_ids == (0, 1, 2, 3, 4), "the last exemplar is dropped, whole"
    assert smaller.messages[-1].content == "\n".join(full.messages[-1].content.splitlines()[:5])


def test_a_single_long_exemplar_is_shortened_by_whole_tokens_around_its_peak():
    one = fitted(320)
    assert one.seq_ids == (0,) and one.puzzle is None and one.tokens <= 320
    line = one.messages[-1].content
    assert line == (
        "Excerpt 1: w0x27 w0x28 w0x29 w0x30 w0x31 w0x32 w0x33 w0x34 w0x35 w0x36 w0x37 w0x38 w0x39 {{PEAK after0}} "
        "w0x42 w0x43 w0x44 w0x45 w0x46 w0x47 w0x48 w0x49 w0x50 w0x51 w0x52 w0x53 w0x54 w0x55 w0x56 w0x57 w0x58 w0x59"
    )
    for word in line.removeprefix("Excerpt 1: ").replace("{{", "").replace("}}", "").split():
        assert word in {"PEAK", "after0"} or word.startswith("w0x"), f"cut inside a token: {word}"
    assert one.messages[-1].content == fitted(320, polarity=Polarity.NEG).messages[-1].content
    with pytest.raises(PromptTooLong, match="budget is 250"):
        fitted(250)


def test_prompt_tokens_are_counted_with_the_explainers_tokenizer(tiny_tokenizer):
    counter = ChatTokenCounter(tiny_tokenizer)
    messages = [ChatMessage("system", "Describe."), ChatMessage("user", "Excerpt 1: The {{cat}} sat.")]
    ids = tiny_tokenizer.apply_chat_template([m.as_dict() for m in messages], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert counter(messages) == len(ids) > 10
    assert counter.exact and not ChatTokenCounter().exact


# -- highlight thresholds ------------------------------------------------------------------


def test_threshold_starts_high_and_steps_down_the_ladder_of_the_shown_peak():
    excerpts = [excerpt_of(record(i, r), Polarity.POS) for i, r in enumerate(ROWS)]
    assert highlight_threshold(excerpts) == pytest.approx(0.4 * 9.0), "0.4 of the peak is the first rung that marks 3"
    assert highlight_threshold(excerpts, (0.9, 0.5)) == pytest.approx(0.5 * 9.0), "the last rung is a floor"
    assert highlight_threshold(excerpts[:1]) == pytest.approx(0.1 * 9.0), "one excerpt: its own peak, its own floor"
    assert highlight_threshold(excerpts[2:]) == pytest.approx(0.1 * 6.0), "the shown peak, not the feature's"
    assert highlight_threshold([Excerpt(0, ("a",), np.zeros(1, np.float32))]) == math.inf
    for bad in ((), (0.5, 0.8), (1.5,), (0.5, 0.0)):
        with pytest.raises(ValueError, match="highlight ladder"):
            highlight_threshold(excerpts, bad)


def _random_excerpts(rng: np.random.Generator) -> list[Excerpt]:
    vocabulary = [f" t{i}" for i in range(int(rng.integers(1, 9)))]
    excerpts = []
    for i in range(int(rng.integers(1, 6))):
        n = int(rng.integers(1, 12))
        tokens = tuple(rng.choice(vocabulary, n))
        values = np.where(rng.random(n) < 0.3, rng.exponential(2.0, n), 0.0).astype(np.float32)
        excerpts.append(Excerpt(i, tokens, values))
    return excerpts


@pytest.mark.parametrize("seed", range(60))
def test_per_prompt_rule_on_random_cases(seed):
    """The threshold is the highest rung (x the shown peak) that marks >= 3 token positions;
    when none does, the lowest rung, which may mark fewer; never a zero, never below the floor."""
    rng = np.random.default_rng(seed)
    excerpts = _random_excerpts(rng)
    ladder = tuple(sorted(set(np.round(rng.uniform(0.05, 1.0, int(rng.integers(1, 6))), 3).tolist()), reverse=True))
    threshold = highlight_threshold(excerpts, ladder)
    values = np.concatenate([e.activations for e in excerpts])
    peak = float(values.max())
    if peak <= 0:
        assert threshold == math.inf
        return
    marked = int((values >= threshold).sum())
    counts = [int((values >= f * peak).sum()) for f in ladder]
    expected = next((f for f, c in zip(ladder, counts) if c >= MIN_HIGHLIGHTED), ladder[-1])
    assert threshold == pytest.approx(expected * peak)
    assert marked >= 1 and all(a > 0 for a in values[values >= threshold]), "a zero is never marked"
    if any(c >= MIN_HIGHLIGHTED for c in counts):
        assert marked >= MIN_HIGHLIGHTED
        assert all(c < MIN_HIGHLIGHTED for f, c in zip(ladder, counts) if f > expected), "no higher rung marks 3"
    else:
        assert marked == counts[-1] < MIN_HIGHLIGHTED, "below the floor nothing is marked"
    assert "{{" in " ".join(highlighted_text(e, threshold) for e in excerpts)


@pytest.mark.parametrize("seed", range(20))
def test_positions_count_not_distinct_strings(seed):
    """One repeated token at three positions is enough to stop the ladder."""
    rng = np.random.default_rng(seed)
    peak = float(rng.uniform(1, 20))
    excerpts = [Excerpt(i, (" a", " er"), np.array([0.0, peak], np.float32)) for i in range(3)]
    excerpts.append(Excerpt(3, (" b",), np.array([0.55 * peak], np.float32)))
    threshold = highlight_threshold(excerpts)
    assert threshold == pytest.approx(0.9 * peak)
    assert [highlighted_text(e, threshold) for e in excerpts] == [" a {{er}}"] * 3 + [" b"]


def test_the_fixed_prefix_is_never_highlighted():
    bos = record(0, [("<s>", 9.0), ("Hi", 1.0), (" you", 0)], prefix_len=1)
    excerpt = excerpt_of(bos, Polarity.POS)
    assert excerpt.tokens == ("Hi", " you")
    assert highlighted_text(excerpt, highlight_threshold([excerpt])) == "{{Hi}} you"


def test_consecutive_tokens_merge_and_spaces_stay_outside_the_braces():
    excerpt = Excerpt(0, ("The", " big", " red", " dog ", "barked"), np.array([0, 5, 6, 5, 0], np.float32))
    assert highlighted_text(excerpt, 5.0) == "The {{big red dog}} barked"


# -- parsing answers and planning candidates ---------------------------------------------------


def test_parse_description():
    assert parse_description("[DESCRIPTION]: the word \"cat\"") == 'the word "cat"'
    assert parse_description("Step 1: ...\n[description]:  \"animal names\"  \nmore") == "animal names"
    assert parse_description("[DESCRIPTION]: a\n[DESCRIPTION]: b") == "b"
    for bad in ("", "   ", None, "the word cat", "[DESCRIPTION]:   ", "[DESCRIPTION]: " + "x" * 500):
        with pytest.raises(MalformedAnswer):
            parse_description(bad)


class CountingExplainer:
    backend, model, reads_prompts = "fake", "fake-model", True
    count_tokens = ChatTokenCounter()


def test_each_candidate_gets_its_own_random_subset_order_and_puzzle():
    rows = [[(f" a{i}", 0.0), (f" b{i}", 5.0 + i)] for i in range(25)]
    feat = feature(rows)
    config = ExplainConfig(exemplars_min=10, exemplars_max=20, k=8)
    builder = prompt_builder_for(config)
    puzzles = [PUZZLE.solved(), Puzzle("other", "other", PUZZLE.records).solved()]
    plans = [plan_candidate(feat, c, config, builder, puzzles, TokenDisplay(), CountingExplainer()) for c in range(8)]
    assert all(10 <= len(p.records) <= 20 for p in plans)
    assert len({tuple(p.seq_ids) for p in plans}) == 8
    assert {p.prompt.puzzle for p in plans} == {"word_set:blue|red", "other"}
    assert any(list(p.seq_ids) != sorted(p.seq_ids) for p in plans), "exemplars come in random order"
    again = plan_candidate(feat, 3, config, builder, puzzles, TokenDisplay(), CountingExplainer())
    assert again.prompt == plans[3].prompt and again.seed == plans[3].seed, "planning is deterministic"
    assert plan_candidate(feat, 0, config.model_copy(update={"seed": 1}), builder, puzzles, TokenDisplay(),
                          CountingExplainer()).seq_ids != plans[0].seq_ids


def test_with_fewer_than_three_positions_above_the_floor_only_those_are_marked():
    excerpts = [Excerpt(0, ("a", " er", " b", " er"), np.array([0, 8.0, 0, 0.5], np.float32)),
                Excerpt(1, ("c", " er"), np.array([0.0, 5.0], np.float32))]
    threshold = highlight_threshold(excerpts)
    assert threshold == pytest.approx(0.1 * 8.0), "the floor: 0.5 stays unmarked, not every positive token"
    assert [highlighted_text(e, threshold) for e in excerpts] == ["a {{er}} b er", "c {{er}}"]
