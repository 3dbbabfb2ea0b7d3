"""Explainer backends: the statistical baseline on planted features, the openai backend against
a local endpoint that fails on purpose, the transformers backend on a tiny model, and the
best-of-k table."""

from __future__ import annotations

import json
import sys
import re
import threading
import time
import typing

import numpy as np
import polars as pl
import pytest

from neuron_assets.config import ExplainConfig
from neuron_assets.explain import (
    CANDIDATE_SCHEMA,
    EXPLAINERS,
    ExplainerUnavailable,
    explain_features,
    incomplete_features,
    make_explainer,
    summarize_candidates,
)
from neuron_assets.explain.best_of_k import corpus_sample
from neuron_assets.explain.planted import planted_feature, word_tokens
from neuron_assets.explain.statistical import WordCounts, describe_by_lift, words_of
from neuron_assets.types import ActivationRecord, Polarity, Split
from tests.support.openai_endpoint import LocalEndpoint, chat_completion
from tests.support.tiny_models import sample_texts

TEXTS = sample_texts(600, seed=5)


def test_registry_matches_the_config_choices():
    choices = typing.get_args(ExplainConfig.model_fields["backend"].annotation)
    assert set(choices) == set(EXPLAINERS)
    assert all(EXPLAINERS[name].backend == name for name in EXPLAINERS)


# -- statistical -------------------------------------------------------------------------------


@pytest.mark.parametrize("polarity", list(Polarity))
def test_statistical_explainer_names_a_planted_token_set(polarity):
    planted = planted_feature(TEXTS, ["teacher", "doctor", "pilot"], layer=1, index=4, polarity=polarity)
    decoy = planted_feature(TEXTS, ["red", "green", "blue"], layer=1, index=5, polarity=polarity)
    frame = explain_features([planted, decoy], ExplainConfig(k=4), progress=False)
    assert frame.height == 8 and frame["failure"].null_count() == 8
    for description in frame.filter(pl.col("neuron") == 4)["description"]:
        named = {w for w in ("teacher", "doctor", "pilot") if f'"{w}"' in description}
        assert len(named) >= 2, description
        listed = description.split(", mostly after")[0]  # these words do all follow "the" in TEXTS
        assert '"the"' not in listed and '"red"' not in listed, description
    assert any(all(f'"{w}"' in d for w in ("teacher", "doctor", "pilot"))
               for d in frame.filter(pl.col("neuron") == 4)["description"])
    decoy_descriptions = frame.filter(pl.col("neuron") == 5)["description"]
    assert all('"green"' in d or '"red"' in d or '"blue"' in d for d in decoy_descriptions)


def test_statistical_variants_differ_in_exemplars_and_threshold():
    planted = planted_feature(TEXTS, ["teacher", "doctor", "pilot", "baker", "king"], index=2)
    frame = explain_features([planted], ExplainConfig(k=4), progress=False)
    assert frame["candidate"].to_list() == [0, 1, 2, 3]
    assert len({tuple(ids) for ids in frame["exemplar_seq_ids"].to_list()}) == 4
    assert all(10 <= len(ids) <= 20 for ids in frame["exemplar_seq_ids"])
    train_top = {e.record.seq_id for e in planted.top(Split.TRAIN)}
    assert all(set(ids) <= train_top for ids in frame["exemplar_seq_ids"]), "only train top exemplars are shown"
    assert frame["prompt_format"].null_count() == 4 and frame["puzzle"].null_count() == 4
    assert frame["backend"].unique().to_list() == ["statistical"]


def test_statistical_explainer_merges_fragments_and_names_a_consistent_context():
    def fragments(text: str) -> list[str]:  # " teacher" -> " teach" + "er"
        out = []
        for token in planted_feature.__globals__["word_tokens"](text):
            out += [token[:-2], token[-2:]] if len(token.strip()) > 5 else [token]
        return out

    # Active on the last fragment of the word after "the": "the" + [" teach", "er"].
    texts = [t.lower() for t in TEXTS] + [f"and the teacher said: {t.lower()}" for t in TEXTS[:60]]
    after_the = planted_feature(
        texts, lambda tokens, i: tokens[i] == "er" and tokens[i - 1] == " teach" and tokens[i - 2].strip() == "the",
        tokenize=fragments, index=3,
    )
    frame = explain_features([after_the], ExplainConfig(k=2), progress=False)
    for description in frame["description"]:
        assert description.startswith('the word "teacher"'), description
        assert description.endswith(', mostly after "the"'), description
    assert [w.text for w in words_of([" the", " teach", "er", ",", " a", "2", "b"])] == ["the", "teacher", ",", "a2b"]


def test_statistical_failure_is_recorded_when_nothing_is_active():
    silent = planted_feature(TEXTS[:90], ["no-such-word"], index=9)
    frame = explain_features([silent], ExplainConfig(k=2), progress=False)
    assert frame["description"].null_count() == 2
    assert frame["failure"].to_list()[0].startswith("no token at or above the threshold")
    assert incomplete_features(frame, [9], 2) == [], "a recorded failure counts as a candidate"
    assert incomplete_features(frame, [9, 10], 2) == [10]


def test_describe_by_lift_names_the_over_represented_word_when_every_word_is_weakly_active():
    planted = planted_feature(TEXTS, ["king"], index=1)
    weak = [
        ActivationRecord(r.seq_id, r.tokens, r.token_ids, np.where(r.activations > 0, r.activations, 1.5), r.prefix_len)
        for r in (e.record for e in planted.top(Split.TRAIN))
    ]
    corpus = WordCounts.from_records(ActivationRecord(i, word_tokens(t), (), np.zeros(0)) for i, t in enumerate(TEXTS))
    assert describe_by_lift(weak, Polarity.POS, corpus, threshold=1.0) == 'the word "king", mostly after "the"'
    # Against the exemplars' own words, frequent words look over-represented: the stage uses
    # the corpus, and leaves the described exemplars out of the background.
    biased = corpus_sample([planted]).word_counts
    assert not describe_by_lift(weak, Polarity.POS, biased, threshold=1.0).startswith('the word "king"')
    assert describe_by_lift(weak, Polarity.POS, biased.without(weak), threshold=1.0).startswith('the word "king"')


# -- openai, against an endpoint that fails on purpose -------------------------------------------


SECRET = "sk-test-Secret-0123456789"


class FlakyEndpoint(LocalEndpoint):
    """Each feature's marker word (in the prompt) picks a script of responses, one per attempt;
    the last one repeats."""

    SCRIPTS = {
        "alpha": [429, 500, "garbage", "no-tag", "ok"],
        "beta": [500],
        "gamma": [400],
        "delta": ["empty"],
        "epsilon": ["slow", "ok"],
        "zeta": ["ok"],
        "eta": [401],
        "theta": [404],
    }

    def __init__(self, delay_s: float = 0.0):
        super().__init__()
        self.attempts: dict[str, int] = {}
        self.arrivals: dict[str, list[float]] = {}
        self.in_flight = self.max_in_flight = 0
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def handle(self, handler, body):
        with self.lock:
            self.bodies.append(body)
            self.auth.add(handler.headers.get("Authorization", ""))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            prompt = body["messages"][-1]["content"]
            marker = next(m for m in self.SCRIPTS if re.search(rf"\b{m}\b", prompt))
            self.arrivals.setdefault(marker, []).append(time.monotonic())
            attempt = self.attempts.get(marker, 0)
            self.attempts[marker] = attempt + 1
        script = self.SCRIPTS[marker]
        counted = [True]

        def leave():
            with self.lock:
                if counted[0]:
                    self.in_flight -= 1
                counted[0] = False

        try:
            time.sleep(self.delay_s)
            self.respond(handler, script[min(attempt, len(script) - 1)], marker, leave)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first
            pass
        finally:
            leave()

    @staticmethod
    def respond(handler, action, marker, leave):
        if isinstance(action, int):
            message = f"Incorrect API key provided: {SECRET}" if action == 401 else f"error {action}"
            wait = {"Retry-After": "0.4"} if action == 429 else {}
            return handler.send(action, json.dumps({"error": {"message": message, "type": "x"}}), wait)
        if action == "garbage":
            return handler.send(200, "<html>this is not json")
        if action == "slow":  # the client gives up after its 1 s timeout and frees its slot
            time.sleep(1.0)
            leave()
            time.sleep(0.5)
        content = {"ok": f"[DESCRIPTION]: the word {marker}", "no-tag": "I think it is about words.",
                   "empty": "", "slow": "[DESCRIPTION]: too late"}[action]
        handler.send(200, json.dumps(chat_completion(content, "flaky", 100, 7)))


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def marker_features(markers, texts=TEXTS[:120]):
    return [planted_feature([f"{t[:-1]} {m}." for t in texts], [m], layer=0, index=i) for i, m in enumerate(markers)]


def openai_config(base_url: str, **overrides) -> ExplainConfig:
    settings = dict(backend="openai", model="flaky", base_url=base_url, api_key_env="NEURON_TEST_KEY", k=1,
                    max_retries=4, backoff_s=0.01, timeout_s=1.0, concurrency=2, exemplars_min=3, exemplars_max=4)
    return ExplainConfig(**(settings | overrides))


def test_openai_backend_retries_then_records_failures(no_proxy, monkeypatch, caplog):
    monkeypatch.setenv("NEURON_TEST_KEY", SECRET)
    markers = [m for m in FlakyEndpoint.SCRIPTS if m not in ("eta", "theta")]
    with FlakyEndpoint(delay_s=0.05) as endpoint:
        frame = explain_features(marker_features(markers), openai_config(endpoint.base_url), progress=False)
    assert frame.schema == pl.Schema(CANDIDATE_SCHEMA)
    rows = {markers[row["neuron"]]: row for row in frame.iter_rows(named=True)}
    # 429, 500, a body that is not JSON, an answer without the tag: all retried, then success.
    assert rows["alpha"]["description"] == "the word alpha" and rows["alpha"]["attempts"] == 5
    assert rows["alpha"]["failure"] is None
    first, second, third = endpoint.arrivals["alpha"][:3]
    assert second - first >= 0.4 > third - second, "the 429's Retry-After is honoured, the 500 has none"
    assert rows["alpha"]["prompt_tokens"] == 200 and rows["alpha"]["completion_tokens"] == 14, "paid attempts summed"
    # A persistent 5xx and an always-empty answer: failures after every retry, recorded.
    assert rows["beta"]["description"] is None and rows["beta"]["attempts"] == 5
    assert rows["beta"]["failure"] == "HTTP 500: error 500 (after 5 attempts)"
    assert rows["delta"]["failure"] == "malformed answer: empty answer (after 5 attempts)"
    # A 400 is not retried.
    assert rows["gamma"]["attempts"] == 1 and rows["gamma"]["failure"].startswith("HTTP 400")
    # A timeout is retried.
    assert rows["epsilon"]["description"] == "the word epsilon" and rows["epsilon"]["attempts"] == 2
    assert rows["zeta"]["attempts"] == 1 and rows["zeta"]["latency_s"] > 0
    assert endpoint.attempts == {"alpha": 5, "beta": 5, "gamma": 1, "delta": 5, "epsilon": 2, "zeta": 1}
    # Bounded concurrency, and concurrency for real.
    assert endpoint.max_in_flight == 2
    # Every request: the model, temperature 1, one sampled puzzle; the client's transport
    # retries resend the same request, a malformed answer is sampled again with a new seed.
    alpha = [b for b in endpoint.bodies if "alpha" in b["messages"][-1]["content"]]
    assert {b["model"] for b in alpha} == {"flaky"} and {b["temperature"] for b in alpha} == {1.0}
    assert [b["seed"] for b in alpha][:3] == [alpha[0]["seed"]] * 3, "429, 500, not-JSON: one request resent"
    assert len({b["seed"] for b in alpha}) == 3 and [m["role"] for m in alpha[0]["messages"]] == [
        "system", "user", "assistant", "user"]
    assert rows["alpha"]["puzzle"] and rows["alpha"]["prompt_format"] == "highlight"
    # The key went to the server, and nowhere else.
    assert endpoint.auth == {f"Bearer {SECRET}"}
    assert "Secret" not in str(frame.to_dicts()) and "Secret" not in caplog.text
    summary = summarize_candidates(frame, openai_config(endpoint.base_url, usd_per_million_prompt_tokens=1.0))
    assert summary.failed == 3 and summary.described == 3 and summary.cost_usd == pytest.approx(
        summary.prompt_tokens / 1e6)
    assert "the word alpha" in summary.examples_markdown and "HTTP 500" in summary.failures_markdown


@pytest.mark.parametrize("marker, status, setting", [("eta", 401, r"\$NEURON_TEST_KEY \(explain.api_key_env\)"),
                                                     ("theta", 404, "explain.model and explain.base_url")])
def test_a_refused_key_or_model_stops_with_the_setting_to_fix(no_proxy, monkeypatch, marker, status, setting):
    from neuron_assets.llm import LLMConfigurationError

    monkeypatch.setenv("NEURON_TEST_KEY", SECRET)
    with FlakyEndpoint() as endpoint:
        with pytest.raises(LLMConfigurationError, match=setting) as raised:
            explain_features(marker_features([marker, "zeta"]), openai_config(endpoint.base_url, concurrency=1),
                             progress=False)
    assert f"HTTP {status}" in str(raised.value) and "flaky" in str(raised.value)
    assert "Secret" not in str(raised.value), "the key the server echoes is masked"
    assert endpoint.attempts[marker] == 1, "a refusal is not retried"


def test_openai_backend_sends_sequentially_with_concurrency_one(no_proxy, monkeypatch):
    monkeypatch.setenv("NEURON_TEST_KEY", SECRET)
    with FlakyEndpoint(delay_s=0.02) as endpoint:
        frame = explain_features(marker_features(["zeta"] * 1), openai_config(endpoint.base_url, concurrency=1, k=4),
                                 progress=False)
    assert endpoint.max_in_flight == 1 and frame["description"].to_list() == ["the word zeta"] * 4
    assert frame["puzzle"].n_unique() > 1 or len({tuple(ids) for ids in frame["exemplar_seq_ids"].to_list()}) == 4


def test_openai_backend_needs_a_key_only_for_openais_api(monkeypatch):
    monkeypatch.delenv("NEURON_TEST_KEY", raising=False)
    with pytest.raises(ExplainerUnavailable, match=r"\$NEURON_TEST_KEY"):
        make_explainer(ExplainConfig(backend="openai", model="gpt-4o-mini", api_key_env="NEURON_TEST_KEY"))
    with pytest.raises(ExplainerUnavailable, match="explain.model is required"):
        make_explainer(ExplainConfig(backend="openai", base_url="http://127.0.0.1:9/v1"))
    explainer = make_explainer(ExplainConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1"))
    assert not hasattr(explainer, "api_key") and SECRET not in repr(vars(explainer))


def test_vllm_backend_explains_how_to_install_it_on_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, as where it is not installed
    with pytest.raises(ExplainerUnavailable, match="neuron-assets\\[gpu\\]"):
        make_explainer(ExplainConfig(backend="vllm", model="some/model"))


# -- transformers, on a tiny random model --------------------------------------------------------


def test_transformers_backend_runs_a_local_model_and_records_gibberish_as_failures(tiny_llama):
    config = ExplainConfig(backend="transformers", model=str(tiny_llama), k=2, max_tokens=8, max_retries=1,
                           exemplars_min=2, exemplars_max=3, context_window=1024, device="cpu")
    features = marker_features(["zeta"], TEXTS[:60])
    frame = explain_features(features, config, progress=False)
    assert frame.height == 2 and frame["explainer_model"].to_list() == [str(tiny_llama)] * 2
    for row in frame.iter_rows(named=True):
        assert row["attempts"] == 2 and row["completion_tokens"] > 0 and row["prompt_tokens"] > 100
        assert row["description"] is None and row["failure"].startswith("malformed answer")
        assert row["prompt_tokens"] <= 2 * (1024 - 8), "each attempt's prompt fits the context window"


def test_vllm_model_resolves_locally_or_fails_before_any_download(tmp_path, monkeypatch):
    from neuron_assets.llm import LLMUnavailable
    from neuron_assets.llm.vllm_offline import local_model_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(LLMUnavailable, match="allow_download"):
        local_model_path("someone/not-downloaded-model")
    assert local_model_path("someone/not-downloaded-model", allow_download=True) == "someone/not-downloaded-model"
