"""The LLM client layer's own contract: the one retry loop, the registry, the model cache."""

from __future__ import annotations

import pytest

from neuron_assets import runtime
from neuron_assets.llm import (
    BACKENDS,
    LLMSettings,
    LLMUnavailable,
    Reply,
    Request,
    ask,
    attempt_seed,
    mask_secrets,
    open_llm,
)


class ScriptedLLM:
    """Answers each request's prompt from a script, one entry per attempt (the last repeats)."""

    backend, model, count_tokens_exactly = "scripted", "scripted", True

    def __init__(self, scripts):
        self.scripts = scripts
        self.rounds: list[list[tuple[str, int | None, int]]] = []

    def generate(self, batch):
        self.rounds.append([(r.prompt, r.seed, budget) for r, budget in batch])
        replies = []
        for request, _ in batch:
            script = self.scripts[request.prompt]
            seen = sum(1 for rnd in self.rounds for p, _, _ in rnd if p == request.prompt)
            replies.append(script[min(seen, len(script)) - 1])
        return replies


def parse_number(reply: Reply) -> int:
    return int(reply.text)  # ValueError: unusable


def test_ask_retries_unusable_answers_with_new_seeds_and_sums_what_was_paid():
    llm = ScriptedLLM({
        "good": [Reply("7", 10, 2)],
        "late": [Reply("seven", 10, 3), Reply("", 10, 0, attempts=2), Reply("8", 10, 1)],
        "never": [Reply("x", 5, 1)],
        "refused": [Reply(None, failure="HTTP 400: too long", retryable=False)],
    })
    finished = []
    answers = ask(llm, [Request(prompt=p, seed=3) for p in ("good", "late", "never", "refused")], parse_number, 4,
                  finished.append)
    good, late, never, refused = answers
    assert good.value == 7 and good.ok and good.attempts == 1 and good.prompt_tokens == 10
    # a reply may carry the backend's own transport retries: they come out of the same budget
    assert late.value == 8 and late.attempts == 4 and late.prompt_tokens == 30 and late.completion_tokens == 4
    assert never.value is None and never.attempts == 4 and never.prompt_tokens == 20
    assert never.failure == "malformed answer: invalid literal for int() with base 10: 'x' (after 4 attempts)"
    assert refused.failure == "HTTP 400: too long (after 1 attempts)" and refused.attempts == 1
    assert sum(finished) == 4
    late_rounds = [(seed, budget) for rnd in llm.rounds for p, seed, budget in rnd if p == "late"]
    assert late_rounds == [(3, 4), (attempt_seed(3, 1), 3), (attempt_seed(3, 3), 1)], "new seed, shrinking budget"


def test_backends_are_chosen_by_name_and_explain_what_is_missing(monkeypatch):
    assert set(BACKENDS) == {"openai", "vllm", "transformers"}
    with pytest.raises(LLMUnavailable, match="unknown LLM backend 'nope' in explain"):
        open_llm(LLMSettings(backend="nope", model="m"))
    monkeypatch.delenv("NEURON_TEST_KEY", raising=False)
    with pytest.raises(LLMUnavailable, match=r"\$NEURON_TEST_KEY \(simulate.prompted.api_key_env\)"):
        open_llm(LLMSettings(backend="openai", model="m", api_key_env="NEURON_TEST_KEY", setting="simulate.prompted"))
    with pytest.raises(LLMUnavailable, match="explain.model '/no/such/folder'"):
        open_llm(LLMSettings(backend="transformers", model="/no/such/folder"))
    assert mask_secrets("Incorrect API key provided: sk-abc123456789xyz") == "Incorrect API key provided: ***"


def test_a_request_has_messages_or_a_prompt():
    with pytest.raises(ValueError, match="either messages"):
        Request()
    with pytest.raises(ValueError, match="either messages"):
        Request(messages=({"role": "user", "content": "hi"},), prompt="hi")


def test_the_model_cache_builds_once_and_releases():
    built = []

    class Model:
        stopped = False

        def shutdown(self):
            Model.stopped = True

    key = runtime.cache_key("test", "model")
    first = runtime.shared(key, lambda: built.append(1) or Model())
    assert runtime.shared(key, lambda: built.append(1) or Model()) is first and built == [1]
    assert key in runtime.loaded() and runtime.release(key) and Model.stopped
    assert key not in runtime.loaded() and not runtime.release(key)
