"""Scorers and selection: Pearson over concatenated tokens, polarity, flags, best-of-k, AUC."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import polars as pl
import pytest
from scipy.stats import pearsonr

from neuron_assets.score import (
    CONSTANT_ACTIVATION,
    CONSTANT_PREDICTION,
    CorrelationScorer,
    DetectionScorer,
    EmbeddingScorer,
    FuzzingScorer,
    balanced_accuracy,
    correlation_score,
    evaluation_records,
    parse_judgements,
    pearson_over_tokens,
    roc_auc,
)
from neuron_assets.score.select import (
    CANDIDATE,
    SHUFFLED_CONTROL,
    best_of_k_curve,
    expected_best_of_k,
    rows_of,
    score_candidates,
    select_best,
    selected_by_feature,
    shuffled_controls,
)
from neuron_assets.simulate import LexicalSimulator
from neuron_assets.types import ActivationRecord, Polarity, Split
from tests.support.judges import ConstantJudge, InvertedJudge, QuotedWordJudge
from tests.support.openai_endpoint import LocalEndpoint, chat_completion
from tests.support.planted import planted_candidates, planted_corpus, planted_feature, planted_words


def _record(tokens, activations, prefix_len=0, seq_id=0):
    return ActivationRecord(seq_id, tuple(tokens), tuple(range(len(tokens))), np.asarray(activations, np.float32), prefix_len)


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus(per_split=60)


# -- correlation ------------------------------------------------------------------------------


def test_pearson_over_concatenated_tokens_equals_scipy():
    rng = np.random.default_rng(0)
    predicted = [rng.uniform(0, 10, n) for n in (5, 9, 3)]
    true = [rng.normal(size=n) for n in (5, 9, 3)]
    score = pearson_over_tokens(predicted, true)
    expected = pearsonr(np.concatenate(predicted), np.concatenate(true)).statistic
    assert score.value == pytest.approx(expected, abs=1e-12)
    assert score.n_tokens == 17 and score.n_examples == 3 and score.flags == ()
    # concatenation is not the mean of per-record correlations
    per_record = np.mean([pearsonr(p, t).statistic for p, t in zip(predicted, true)])
    assert abs(score.value - per_record) > 1e-3


def test_correlation_uses_relu_of_the_polarity_and_skips_the_prefix():
    tokens = ["<bos>", "a", "b", "c", "d", "e"]
    signed = [9.0, 2.0, -3.0, 0.5, -1.0, 0.0]
    record = _record(tokens, signed, prefix_len=1)
    predicted = np.array([10.0, 1.0, 7.0, 0.0, 4.0, 2.0])
    pos = correlation_score([predicted], [record], Polarity.POS)
    neg = correlation_score([predicted], [record], Polarity.NEG)
    assert pos.value == pytest.approx(pearsonr(predicted[1:], [2.0, 0.0, 0.5, 0.0, 0.0]).statistic)
    assert neg.value == pytest.approx(pearsonr(predicted[1:], [0.0, 3.0, 0.0, 1.0, 0.0]).statistic)
    assert pos.n_tokens == 5  # the prefix token is not counted
    # the neg true activations are relu(-a): a predictor of -a scores 1 on neg
    assert correlation_score([-np.asarray(signed)], [record], Polarity.NEG).value < 1.0  # not relu'd: imperfect
    assert correlation_score([np.maximum(-np.asarray(signed), 0)], [record], Polarity.NEG).value == pytest.approx(1.0)


def test_constant_predictions_score_zero_and_are_flagged():
    record = _record(["a", "b", "c"], [1.0, 0.0, 2.0])
    score = correlation_score([np.full(3, 4.0)], [record], Polarity.POS)
    assert score.value == 0.0 and CONSTANT_PREDICTION in score.flags
    quiet = _record(["a", "b", "c"], [-1.0, -2.0, -3.0])  # never positive: constant relu(a)
    score = correlation_score([np.array([1.0, 2.0, 3.0])], [quiet], Polarity.POS)
    assert score.value == 0.0 and CONSTANT_ACTIVATION in score.flags
    assert not np.isnan(score.value)


def test_evaluation_set_is_top_20_plus_5_random(corpus):
    feature = planted_feature(corpus, "cat", 0, top_k=25)
    records = evaluation_records(feature, Split.VAL, 20, 5)
    tops = [e.record.seq_id for e in feature.top(Split.VAL)[:20]]
    randoms = [e.record.seq_id for e in feature.random(Split.VAL)[:5]]
    assert [r.seq_id for r in records] == list(dict.fromkeys(tops + randoms))
    assert all(r.seq_id // 100_000 == 1 for r in records)  # val only


def test_lexical_simulator_scores_planted_features_far_above_the_shuffled_control(corpus):
    words = planted_words(corpus)[:12]
    features = [planted_feature(corpus, w, i) for i, w in enumerate(words)]
    candidates = {f.feature: planted_candidates(w, k=3) for f, w in zip(features, words)}
    scorer = CorrelationScorer(LexicalSimulator())
    frame = score_candidates(features, candidates, [scorer], Split.VAL)
    selected = selected_by_feature(select_best(frame, "correlation", "lexical"), features)
    controls = shuffled_controls(features, selected, seed=0)
    frame = pl.concat([frame, score_candidates(features, {}, [scorer], Split.VAL, controls)])
    assert frame.height == 12 * 4
    assert frame["score"].is_nan().sum() == 0
    assert frame["score"].min() >= -1 and frame["score"].max() <= 1
    described = frame.filter(pl.col("role") == CANDIDATE)["score"].mean()
    control = frame.filter(pl.col("role") == SHUFFLED_CONTROL)["score"].mean()
    assert described > 0.8 and control < 0.2, (described, control)
    for feature in features:  # every control is the description selected for another feature
        source = controls[feature.feature].source
        assert source != feature.feature
        assert (controls[feature.feature].candidate, controls[feature.feature].description) == selected[source]
    best = select_best(frame, "correlation", "lexical")
    assert best.height == 12 and best["control_val_score"].null_count() == 0


def test_a_repeated_candidate_is_scored_once_and_best_of_k_counts_distinct_texts(corpus):
    words = planted_words(corpus)[:3]
    features = [planted_feature(corpus, w, i) for i, w in enumerate(words)]
    first = {f.feature: planted_candidates(w, k=2) for f, w in zip(features, words)}
    # the explainer answered the same text again (case and spacing aside), and once not at all
    repeated = {f: [a, b, "  " + a.upper() + " ", None, b] for f, (a, b) in first.items()}
    scorer = CorrelationScorer(LexicalSimulator())
    frame = score_candidates(features, repeated, [scorer], Split.VAL)
    assert frame.height == 3 * 2
    assert sorted(set(frame["candidate"].to_list())) == [0, 1]
    assert frame.equals(score_candidates(features, first, [scorer], Split.VAL))
    best = select_best(frame, "correlation", "lexical")
    assert best["n_candidates"].to_list() == [2, 2, 2]


def test_select_best_takes_the_highest_val_score_and_breaks_ties_by_candidate():
    frame = pl.DataFrame({
        "neuron": [1, 1, 1, 2, 2, 2], "candidate": [0, 1, -1, 0, 1, -1],
        "role": [CANDIDATE, CANDIDATE, SHUFFLED_CONTROL] * 2, "description": list("abcdef"),
        "source_neuron": [1, 1, 2, 2, 2, 1], "scorer": ["correlation"] * 6, "simulator": ["lexical"] * 6,
        "score": [0.2, 0.7, 0.1, 0.5, 0.5, 0.0], "flags": [[]] * 6,
    })
    other = frame.with_columns(pl.lit("finetuned").alias("simulator"), (1 - pl.col("score")).alias("score"))
    best = select_best(pl.concat([frame, other]), "correlation", "lexical")
    assert best["candidate"].to_list() == [1, 0]
    assert best["val_score"].to_list() == [0.7, 0.5]
    assert best["control_val_score"].to_list() == [0.1, 0.0]
    assert best["n_candidates"].to_list() == [2, 2]


# -- best of k ----------------------------------------------------------------------------------


def test_expected_best_of_k_equals_the_mean_over_all_subsets():
    values = [0.3, -0.1, 0.9, 0.5, 0.2]
    for k in range(1, 6):
        brute = np.mean([max(s) for s in itertools.combinations(values, k)])
        assert expected_best_of_k(values, k) == pytest.approx(brute)


def test_expected_best_of_k_reports_the_val_best_of_each_subset():
    val, test = [0.3, -0.1, 0.9, 0.5, 0.3], [0.0, 1.0, 0.2, 0.4, 0.8]
    for k in range(1, 6):
        brute = []
        for subset in itertools.combinations(range(5), k):
            best = max(subset, key=lambda i: (val[i], -i))  # select_best: highest val, then lower candidate
            brute.append(test[best])
        assert expected_best_of_k(val, k, test) == pytest.approx(np.mean(brute))


def _val_and_test_rows(neurons: int = 20, candidates: int = 6):
    rows = []
    for neuron in range(neurons):
        rng = np.random.default_rng(neuron)
        quality = rng.uniform(0.1, 0.9, candidates)
        for candidate, value in enumerate(quality):
            for simulator, shift in (("lexical", 0.0), ("finetuned", -0.5)):
                for split, noise in (("val", rng.normal(0, 0.05)), ("test", rng.normal(0, 0.05))):
                    rows.append({"layer": 0, "polarity": "pos", "neuron": neuron, "candidate": candidate,
                                 "role": CANDIDATE, "scorer": "correlation", "simulator": simulator, "split": split,
                                 "score": float(value) + shift + float(noise), "description": f"d{candidate}",
                                 "source_neuron": neuron, "flags": []})
    return pl.DataFrame(rows)


def test_best_of_k_curve_reports_test_scores_of_val_selected_candidates_and_power_law_fit():
    frame = _val_and_test_rows()
    curve = best_of_k_curve(frame, "correlation", "lexical")
    assert curve.k == (1, 2, 3, 4, 5, 6)
    assert all(a < b for a, b in zip(curve.mean_best, curve.mean_best[1:]))
    assert curve.fit_b is not None and 0 < curve.fit_b < 1
    assert curve.fitted(1) == pytest.approx(curve.mean_best[0], rel=0.1)
    lexical = rows_of(frame, "correlation", "lexical")
    assert curve.mean_best[0] == pytest.approx(lexical.filter(pl.col("split") == "test")["score"].mean())
    best = select_best(frame, "correlation", "lexical")
    test = lexical.filter(pl.col("split") == "test").join(best.select("neuron", "candidate"), on=["neuron", "candidate"])
    assert curve.mean_best[-1] == pytest.approx(test["score"].mean()), "k = n: the test score of the val-best"
    assert curve.mean_best[-1] < best["val_score"].mean(), "the val score of the val-best is biased upward"
    shifted = best_of_k_curve(frame, "correlation", "finetuned")  # simulators are kept apart
    assert shifted.mean_best[0] == pytest.approx(curve.mean_best[0] - 0.5, abs=0.02)
    assert best_of_k_curve(frame.filter(pl.col("split") == "val"), "correlation", "lexical").k == (), \
        "no test scores, no curve"


# -- classification and embedding scorers ----------------------------------------------------------


def test_balanced_accuracy_and_judgement_parsing():
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]).value == pytest.approx(0.75)
    score = balanced_accuracy([True, False, False], [True, None, False])
    assert score.value == 1.0 and score.flags == ("unanswered:1",)
    assert parse_judgements("Sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_judgements("[1, 0]", 3) == [None] * 3
    assert parse_judgements(None, 2) == [None, None]


def test_detection_and_fuzzing_with_an_oracle_judge(corpus):
    feature = planted_feature(corpus, "cat", 0)
    for scorer in (DetectionScorer(QuotedWordJudge(), examples=6), FuzzingScorer(QuotedWordJudge(), examples=6)):
        right, wrong = scorer.score(feature, ['the word "cat"', 'the word "table"'], Split.VAL)
        assert right.value > 0.9, (scorer.name, right)
        assert wrong.value < right.value - 0.3, (scorer.name, wrong)
        assert 0 <= wrong.value <= 1


def test_balanced_accuracy_tells_a_correct_judge_from_a_constant_or_inverted_one(corpus):
    feature = planted_feature(corpus, "cat", 0)
    for cls in (DetectionScorer, FuzzingScorer):
        [right] = cls(QuotedWordJudge(), examples=6).score(feature, ['the word "cat"'], Split.VAL)
        [inverted] = cls(InvertedJudge(), examples=6).score(feature, ['the word "cat"'], Split.VAL)
        assert right.value == pytest.approx(1.0, abs=0.05) and not right.flags, (cls.name, right)
        assert inverted.value == pytest.approx(0.0, abs=0.05), (cls.name, inverted)
        for value in (0, 1):  # always the same answer: chance, however the examples are balanced
            [constant] = cls(ConstantJudge(value), examples=6).score(feature, ['the word "cat"'], Split.VAL)
            assert constant.value == pytest.approx(0.5), (cls.name, value, constant)


class _JudgeEndpoint(LocalEndpoint):
    """The user turn's first word picks the answer (ok: a list; transient: 503; refused: 401;
    missing: 404)."""

    def __init__(self):
        super().__init__()
        self.bodies, self.requests = [], {}
        self.__enter__()

    def handle(self, handler, body):
        import json

        self.bodies.append(body)
        word = body["messages"][-1]["content"].split()[0]
        self.requests[word] = self.requests.get(word, 0) + 1
        status = {"ok": 200, "transient": 503, "refused": 401, "missing": 404}[word]
        reply = chat_completion("[1, 0]", "judge-model", 11, 5) if status == 200 else {"error": {"message": f"no: {status}"}}
        handler.send(status, json.dumps(reply))


def test_openai_judge_leaves_transient_failures_unanswered_and_raises_on_the_rest(monkeypatch):
    from neuron_assets.config import ExplainConfig
    from neuron_assets.llm import LLMConfigurationError
    from neuron_assets.score import LLMJudge

    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    endpoint = _JudgeEndpoint()
    try:
        config = ExplainConfig(backend="openai", model="judge-model", base_url=endpoint.base_url,
                               extra_body={"top_k": 1}, max_retries=1, backoff_s=0.01, timeout_s=5)
        judge = LLMJudge(config)
        asked = [[{"role": "user", "content": f"{word} example"}] for word in ("ok", "transient", "ok")]
        assert judge.answer(asked) == ["[1, 0]", None, "[1, 0]"]
        assert endpoint.requests == {"ok": 2, "transient": 2}, "a 503 is retried by the client, then unanswered"
        assert judge.unanswered == 1 and judge.failures[0].startswith("HTTP 503")
        assert judge.prompt_tokens == 22 and judge.completion_tokens == 10, "the server's usage, summed"
        assert endpoint.bodies[0]["top_k"] == 1, "explain.extra_body is sent"
        assert endpoint.bodies[0]["model"] == "judge-model" and endpoint.bodies[0]["temperature"] == 0.0
        for word, setting in (("refused", "api_key_env"), ("missing", "explain.model")):
            with pytest.raises(LLMConfigurationError, match=setting):
                judge.answer([[{"role": "user", "content": f"{word} example"}]])
    finally:
        endpoint.close()


def test_roc_auc_matches_pairwise_counting():
    rng = random.Random(0)
    scores = np.array([rng.random() for _ in range(30)] + [0.5, 0.5])
    labels = np.array([rng.random() < 0.4 for _ in range(30)] + [True, False])
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(pairwise)


def test_embedding_scorer_prefers_the_right_description(corpus):
    words = planted_words(corpus)
    vocabulary = sorted({t.strip().lower() for seqs in corpus.sequences.values() for s in seqs for t in s[1:]})

    def bag_of_words(texts):  # a stand-in embedder: normalized word counts
        out = np.zeros((len(texts), len(vocabulary)))
        for i, text in enumerate(texts):
            for token in text.lower().replace('"', " ").split():
                if token.strip(".,?") in vocabulary:
                    out[i, vocabulary.index(token.strip(".,?"))] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    feature = planted_feature(corpus, words[3], 3, top_k=10)
    scorer = EmbeddingScorer(bag_of_words, top=5, random_count=5)  # "blue" fires in 7 val sequences
    right, wrong = scorer.score(feature, [f"the word {words[3]}", f"the word {words[9]}"], Split.VAL)
    assert right.value > 0.8 and right.value > wrong.value


def test_detection_through_a_local_chat_model_and_skipped_without_one(corpus, tiny_llama):
    from neuron_assets.config import ExplainConfig, config_from_dict
    from neuron_assets.score import LLMJudge, ScoringContext, build_scorers

    judge = LLMJudge(ExplainConfig(backend="transformers", model=str(tiny_llama)))
    feature = planted_feature(corpus, "cat", 0)
    [score] = DetectionScorer(judge, examples=3, batch=3).score(feature, ['the word "cat"'], Split.VAL)
    assert 0 <= score.value <= 1 and score.n_examples >= 4  # a random model's answers: counted or flagged
    config = config_from_dict({"score": {"scorers": ["correlation", "detection", "fuzzing"]}})
    context = ScoringContext(config, lambda name: LexicalSimulator(), ("lexical",))
    scorers, skipped = build_scorers(config.score, context)
    assert [s.name for s in scorers] == ["correlation"]
    assert set(skipped) == {"detection", "fuzzing"} and "explain.backend 'statistical'" in skipped["detection"]


def test_metadata_figures_are_png_images():
    from neuron_assets.report.plots import best_of_k_figure, loss_curve_figure, markdown_image, score_histograms, val_test_scatter
    from neuron_assets.score.select import BestOfKCurve

    figures = [
        score_histograms({0: [0.1, 0.5], 3: [0.2]}, {0: [0.0], 3: [-0.1]}),
        best_of_k_figure(BestOfKCurve((1, 2, 3), (0.2, 0.25, 0.27), (5, 5, 5), 0.2, 0.28)),
        val_test_scatter([0.1, 0.6], [0.2, 0.5], [0.0], [0.05]),
        loss_curve_figure({"stage1": [2.0, 1.5, 1.0], "stage2": [0.9, 0.8]}),
    ]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in figures)
    assert markdown_image(figures[0], "h").startswith("![h](data:image/png;base64,iVBOR")


def test_shuffled_controls_need_two_described_features(corpus):
    one = planted_feature(corpus, "cat", 0)
    assert shuffled_controls([one], {one.feature: (0, '"cat"')}) == {}
    two = planted_feature(corpus, "dog", 1)
    controls = shuffled_controls([one, two], {one.feature: (0, '"cat"'), two.feature: (1, '"dog"')}, seed=3)
    assert controls[one.feature].description == '"dog"' and controls[one.feature].candidate == 1
    assert controls[two.feature].source == one.feature


def test_config_names_match_the_scorer_and_simulator_registries():
    import typing

    from neuron_assets.config import ScoreConfig, SimulateConfig, config_from_dict
    from neuron_assets.score import SCORERS
    from neuron_assets.simulate import SIMULATORS

    assert set(typing.get_args(SimulateConfig.model_fields["backend"].annotation)) == set(SIMULATORS)
    assert set(typing.get_args(ScoreConfig.model_fields["select_by"].annotation)) == set(SCORERS)
    for bad, where in (({"simulate": {"backend": "finetunned"}}, "backend"),
                       ({"simulate": {"compare_with": ["lexical", "nope"]}}, "compare_with"),
                       ({"score": {"scorers": ["correlation", "detecton"]}}, "scorers"),
                       ({"score": {"scorers": ["correlation"], "select_by": "embedding"}}, "select_by")):
        with pytest.raises(Exception, match=where):
            config_from_dict(bad)


# -- judges that read logprobs ----------------------------------------------------------------------


class LogprobWordJudge(QuotedWordJudge):
    """QuotedWordJudge's reading of one-example prompts, as a probability of "1" (0.9 right,
    0.2 otherwise); None (no logprobs) for the examples ``missing`` picks. Counts list prompts."""

    def __init__(self, missing=lambda text: False):
        self.missing = missing
        self.listed = 0

    def probabilities(self, conversations):
        out = []
        for messages in conversations:
            user = messages[-1]["content"]
            word = re.search(r'"(\w+)"', user.splitlines()[0]).group(1)
            text = next(line for line in user.splitlines() if line.startswith("Example: "))[len("Example: "):]
            marked = re.findall(r"<<([^>]*)>>", text)
            yes = (all(m.strip().lower() == word for m in marked) if marked
                   else re.search(rf"\b{word}\b", text, re.I) is not None)
            out.append(None if self.missing(text) else (0.9 if yes else 0.2))
        return out

    def answer(self, conversations):
        self.listed += sum(line.startswith("Example ") for m in conversations for line in m[-1]["content"].splitlines())
        return super().answer(conversations)


def test_a_logprob_judge_decides_each_example_and_falls_back_to_lists_per_example(corpus):
    feature = planted_feature(corpus, "cat", 0)
    for cls in (DetectionScorer, FuzzingScorer):
        [listed] = cls(QuotedWordJudge(), examples=6).score(feature, ['the word "cat"'], Split.VAL)
        judge = LogprobWordJudge()
        [read] = cls(judge, examples=6).score(feature, ['the word "cat"'], Split.VAL)
        assert read.value == listed.value == pytest.approx(1.0) and read.flags == () and judge.listed == 0, cls.name
        [judged] = cls(judge, examples=6).judgements(feature, ['the word "cat"'], Split.VAL)
        assert {j.by for j in judged} == {"logprobs"} and {j.probability for j in judged} == {0.9, 0.2}
        # a server without logprobs for some examples: those, and only those, are asked as lists
        judge = LogprobWordJudge(missing=lambda text: len(text) % 2 == 0)
        [mixed] = cls(judge, examples=6).score(feature, ['the word "cat"'], Split.VAL)
        [judged] = cls(judge, examples=6).judgements(feature, ['the word "cat"'], Split.VAL)
        by_chat = sum(j.by == "chat" for j in judged)
        assert 0 < by_chat < len(judged) and judge.listed == 2 * by_chat, cls.name
        assert mixed.value == pytest.approx(1.0) and mixed.flags == (f"chat_answers:{by_chat}",), (cls.name, mixed)


def test_a_judge_that_always_says_yes_scores_chance(corpus):
    class Yes(LogprobWordJudge):
        def probabilities(self, conversations):
            return [0.93] * len(conversations)  # SmolLM2-135M's habit

    feature = planted_feature(corpus, "cat", 0)
    [score] = DetectionScorer(Yes(), examples=6).score(feature, ['the word "cat"'], Split.VAL)
    assert score.value == 0.5 and score.flags == ()


class _ChatLogprobEndpoint(LocalEndpoint):
    """Chat completions with logprobs of the first answer token (or a 400 when ``refuse``),
    and plain chat answers as lists."""

    def __init__(self, refuse=False):
        super().__init__()
        self.refuse, self.bodies = refuse, []
        self.__enter__()

    def handle(self, handler, body):
        import json

        self.bodies.append(body)
        if body.get("logprobs"):
            if self.refuse:
                return handler.send(400, json.dumps({"error": {"message": "logprobs are not supported"}}))
            reply = chat_completion("1", "judge-model", 30, 1)
            reply["choices"][0]["logprobs"] = {"content": [{
                "token": "1", "logprob": -0.1, "bytes": None,
                "top_logprobs": [{"token": "1", "logprob": -0.1, "bytes": None},
                                 {"token": "0", "logprob": -2.4, "bytes": None},
                                 {"token": " 0", "logprob": -3.0, "bytes": None}]}]}
            return handler.send(200, json.dumps(reply))
        shown = sum(line.startswith("Example ") for line in body["messages"][-1]["content"].splitlines())
        handler.send(200, json.dumps(chat_completion(str([1] * shown), "judge-model", 40, 9)))


def test_openai_judge_reads_chat_logprobs_or_falls_back_to_lists(corpus, monkeypatch, caplog):
    from neuron_assets.config import ExplainConfig
    from neuron_assets.score import LLMJudge

    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    feature = planted_feature(corpus, "cat", 0)
    for refuse in (False, True):
        endpoint = _ChatLogprobEndpoint(refuse)
        try:
            config = ExplainConfig(backend="openai", model="judge-model", base_url=endpoint.base_url, max_retries=0,
                                   timeout_s=5)
            judge = LLMJudge(config)
            [judged] = DetectionScorer(judge, examples=3, batch=3).judgements(feature, ['the word "cat"'], Split.VAL)
            asked = [b for b in endpoint.bodies if b.get("logprobs")]
            assert len(asked) == len(judged)
            assert asked[0]["max_completion_tokens"] == 1 and asked[0]["top_logprobs"] == 20
            if not refuse:
                p = 1 / (1 + np.exp(np.logaddexp(-2.4, -3.0) + 0.1))  # " 0" counts as "0"
                assert [j.probability for j in judged] == pytest.approx([p] * len(judged))
                assert {j.by for j in judged} == {"logprobs"} and judge.reads_logprobs
                assert judge.prompt_tokens == 30 * len(judged) and judge.completion_tokens == len(judged)
            else:  # every example asked again as a list, and the judge stops asking for logprobs
                assert {j.by for j in judged} == {"chat"} and all(j.answer for j in judged)
                assert not judge.reads_logprobs and "gives no logprobs" in caplog.text
                before = len(endpoint.bodies)
                DetectionScorer(judge, examples=3, batch=3).score(feature, ['the word "cat"'], Split.VAL)
                assert not [b for b in endpoint.bodies[before:] if b.get("logprobs")]
        finally:
            endpoint.close()
