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


# -- Ctrl-C during a round of requests -----------------------------------------------------------


class _Interrupted(BaseException):
    """What Dagster's step handler raises on SIGINT (DagsterExecutionInterruptedError is a
    BaseException too): asyncio swallows such an exception when it lands in one of its callbacks."""


class _BusyEndpoint:
    """A local OpenAI-compatible server that answers at once with long texts, so the client's
    event loop is busy in its callbacks when the signal lands; ``hang`` prompts never answer."""

    def __init__(self, hang=()):
        import json
        import threading

        from tests.support.openai_endpoint import LocalEndpoint, chat_completion

        hang_event = threading.Event()
        self.requests = 0

        class Endpoint(LocalEndpoint):
            def handle(inner, handler, body):
                self.requests += 1
                content = body["messages"][-1]["content"]
                if content in hang:
                    hang_event.wait(30)
                    return
                try:
                    handler.send(200, json.dumps(chat_completion(f"answer to {content} " + "x" * 4000, "m", 10, 5)))
                except OSError:  # the client went away
                    pass

        self.hang_event = hang_event
        self.endpoint = Endpoint().__enter__()
        self.base_url = self.endpoint.base_url

    def close(self):
        self.hang_event.set()
        self.endpoint.close()


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_ctrl_c_during_a_round_always_stops_it_at_once(no_proxy, caplog):
    """Before the round held the signal, 2 of 3 such interrupts were swallowed by asyncio
    ("Exception in callback ...") and the round ran to its end."""
    import os
    import random
    import signal
    import threading
    import time

    def raising(signum, frame):
        raise _Interrupted()

    server = _BusyEndpoint()
    previous = signal.signal(signal.SIGINT, raising)
    try:
        llm = open_llm(LLMSettings(backend="openai", model="m", base_url=server.base_url, concurrency=8, timeout_s=30))
        requests = [(Request(messages=({"role": "user", "content": f"q{i}"},)), 1) for i in range(300)]
        rng = random.Random(0)
        for trial in range(8):
            sent = []
            timer = threading.Timer(rng.uniform(0.05, 0.4),
                                    lambda: sent.append(time.monotonic()) or os.kill(os.getpid(), signal.SIGINT))
            timer.start()
            with pytest.raises(_Interrupted):
                llm.generate(requests)
            assert sent and time.monotonic() - sent[0] < 5.0, f"trial {trial}: the round went on after Ctrl-C"
            timer.join()
            assert signal.getsignal(signal.SIGINT) is raising, "the handler the round displaced is back"
    finally:
        signal.signal(signal.SIGINT, previous)
        server.close()
    assert "Exception in callback" not in caplog.text
