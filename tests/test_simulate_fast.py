"""Fast scoring equals the direct path: the fine-tuned simulator's pairs batched across
features (parts encoded once, length buckets, one host copy) and the semantic and lexical
simulators' shared work give the former paths' numbers, on the collector's real exemplars."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from neuron_assets.config import load_config
from neuron_assets.exemplars import load_feature_exemplars
from neuron_assets.score import CorrelationScorer, evaluation_records
from neuron_assets.score.select import score_candidates
from neuron_assets.simulate import LexicalSimulator
from neuron_assets.simulate.alignment import NOT_READ, CharOffsetEncoder, last_subtoken_positions
from neuron_assets.simulate.finetuned import FinetunedSimulator, _length_buckets
from neuron_assets.stages import make_corpus, make_exemplars
from neuron_assets.store import Store
from neuron_assets.types import Polarity, Split
from tests.support.reference_paths import FormerLexical, lexical_per_token, semantic_per_pair

DESCRIPTIONS = ['the word "the"', "verbs and nouns", "", "a long description of what fires " * 12,
                'the token "<|eot_id|>" after "of"']


@pytest.fixture(scope="module")
def collected(tmp_path_factory, tiny_llama, text_corpus):
    """The tiny Llama's exemplars as the collector writes them (layers 0 and 1, pos and neg)."""
    import yaml

    folder = tmp_path_factory.mktemp("fast-scoring")
    raw = {"name": "fast", "storage": {"root": str(folder / "home")}, "subject": {"model": str(tiny_llama), "batch_size": 8},
           "corpus": {"sources": [{"name": "texts", "kind": "text", "path": str(text_corpus)}], "seq_len": 24,
                      "chat_prefix": None, "sequences_per_split": 24},
           "features": {"layers": [0, 1], "neurons": {"sample": 4, "seed": 0}}, "sae": {"layers": []},
           "exemplars": {"top_k": 6, "random_per_split": 2, "per_quantile": 1, "quantile_bins": 4, "quiet_per_split": 2,
                         "quantile_reservoir": 8, "stats_token_sample": 64}}
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(folder / "config.yaml")
    make_corpus(config, "run-1")
    make_exemplars(config, [(0, Polarity.POS), (1, Polarity.NEG)], "run-1", progress=False, log=lambda *a: None)
    store = Store(config.root)
    return load_feature_exemplars(store, 0, Polarity.POS) + load_feature_exemplars(store, 1, Polarity.NEG)


class _Former:
    """A simulator that only has the direct path (no simulate_many): what scoring did before."""

    def __init__(self, simulate):
        self.name, self.simulate = "former", simulate


def _scores(frame):
    return frame.sort(["layer", "polarity", "neuron", "candidate", "role"])["score"].to_numpy()


@pytest.mark.parametrize("head, alignment", [("lm_head_slots", "subject_ids"), ("token_classification", "char_offsets")])
def test_batched_scoring_equals_the_direct_path_on_collected_exemplars(collected, tiny_llama, head, alignment):
    features = collected[::3]  # both layers and polarities
    simulator = FinetunedSimulator.from_backbone(str(tiny_llama), head=head, alignment=alignment, max_length=48,
                                                 added_tokens=["⟨eot_id⟩"], batch_size=16)
    candidates = {f.feature: [DESCRIPTIONS[(i + c) % len(DESCRIPTIONS)] for c in range(3)] for i, f in enumerate(features)}
    fast = score_candidates(features, candidates, [CorrelationScorer(simulator, 6, 2)], Split.VAL)
    former = score_candidates(features, candidates, [CorrelationScorer(_Former(simulator.simulate_pairwise), 6, 2)],
                              Split.VAL)
    described = sum(1 for f in features for d in candidates[f.feature] if d)  # empty candidates are not scored
    assert fast.height == former.height == described >= 6
    np.testing.assert_allclose(_scores(fast), _scores(former), atol=1e-5)
    # per token on test: new records next to the cached val ones, in rounds of a few jobs
    simulator.PAIRS_PER_ROUND = 20
    jobs = [(candidates[f.feature], evaluation_records(f, Split.TEST, 6, 2)) for f in features]
    for fast_job, (descriptions, records) in zip(simulator.simulate_many(jobs), jobs):
        for fast_d, former_d in zip(fast_job, simulator.simulate_pairwise(descriptions, records)):
            for a, b in zip(fast_d, former_d):
                assert a.shape == (len(b),)
                np.testing.assert_allclose(a, b, atol=1e-5)
    seen = {r.seq_id for f in features for split in (Split.VAL, Split.TEST) for r in evaluation_records(f, split, 6, 2)}
    assert len(simulator._records) == len(seen)  # each exemplar encoded once for all candidates and calls


def test_split_encoding_equals_the_whole_text(collected, tiny_tokenizer):
    from transformers import AutoTokenizer

    from neuron_assets.subject import resolve_model_path

    records = [r for f in collected for r in evaluation_records(f, Split.VAL, 6, 2)]
    minilm = AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    for tokenizer in (minilm, tiny_tokenizer):  # WordPiece, and a byte-level BPE
        encoder = CharOffsetEncoder(tokenizer, max_length=40)
        for description in DESCRIPTIONS:
            assert encoder.description_part(description).splits
            for record in records[:10]:
                split, whole = encoder.encode(description, record), encoder.encode_whole(description, record)
                assert split.input_ids == whole.input_ids and (split.read_at == whole.read_at).all()


def test_vectorized_alignment_equals_the_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = np.sort(rng.choice(np.arange(1, 60), size=12, replace=False))
        offsets = [(0, 0)] + [(int(a), int(b)) for a, b in itertools.pairwise(cuts) if rng.random() > 0.2] + [(0, 0)]
        special = [1] + [0] * (len(offsets) - 2) + [1]
        edges = np.sort(rng.choice(np.arange(0, 62), size=9, replace=False))
        spans = [(int(a), int(b)) for a, b in itertools.pairwise(edges)]
        expected = []
        usable = [(i, s, e) for i, ((s, e), sp) in enumerate(zip(offsets, special)) if not sp and e > s and s >= 5]
        for a, b in spans:
            overlapping = [i for i, s, e in usable if s < b and e > a]
            before = [i for i, s, e in usable if s < max(b, a + 1)]
            expected.append(overlapping[-1] if overlapping else before[-1] if before else NOT_READ)
        assert last_subtoken_positions(spans, offsets, special, input_start=5).tolist() == expected


def test_length_buckets_hold_a_token_budget_longest_first():
    lengths = np.array([10, 50, 20, 50, 30, 200])
    order = np.argsort(-lengths, kind="stable")
    batches = list(_length_buckets(order, lengths, budget=100))
    assert batches == [[5], [1, 3], [4, 2, 0]]  # one pair over the budget goes alone
    assert sorted(i for b in batches for i in b) == list(range(6))


def test_semantic_and_lexical_equal_their_former_paths(collected):
    from neuron_assets.simulate.semantic import SemanticSimulator

    semantic = SemanticSimulator(device="cpu")
    jobs = [(DESCRIPTIONS[:3], evaluation_records(f, Split.VAL, 6, 2)) for f in collected[:4]]
    with FormerLexical():
        former = [semantic_per_pair(semantic, d, r) for d, r in jobs]
    for fast_job, former_job in zip(semantic.simulate_many(jobs), former):
        for fast_d, former_d in zip(fast_job, former_job):
            for a, b in zip(fast_d, former_d):
                np.testing.assert_allclose(a, b, atol=1e-4)
    lexical = LexicalSimulator()
    from neuron_assets.simulate.lexical import named_terms

    for description in DESCRIPTIONS:
        for record in jobs[0][1]:
            [[fast]] = lexical.simulate([description], [record])
            assert (fast == lexical_per_token(named_terms(description), record)).all()


def test_prompted_simulator_sends_every_feature_s_prompts_in_one_call(collected):
    from neuron_assets.simulate.prompted import PromptedSimulator

    class Source:  # a logprob source whose answer depends only on the prompt
        name, calls = "fake", []

        def value_probabilities(self, prompts):
            self.calls.append(len(prompts))
            return [np.random.default_rng(len(p.text)).random((len(p.placeholder_offsets), 11)) for p in prompts]

    simulator = PromptedSimulator(Source())
    jobs = [(DESCRIPTIONS[:2], evaluation_records(f, Split.VAL, 3, 1)) for f in collected[:3]]
    together = simulator.simulate_many(jobs)
    assert Source.calls == [sum(len(d) * len(r) for d, r in jobs)]
    for (descriptions, records), job in zip(jobs, together):
        for alone_d, job_d in zip(simulator.simulate(descriptions, records), job):
            for a, b in zip(alone_d, job_d):
                assert (a == b).all()
