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


# -- the answer cache: pay for an answer once --------------------------------------------------


def test_cached_answers_cost_nothing_and_failures_are_asked_again(tmp_path):
    from neuron_assets.llm import AnswerCache, CachedLLM

    def scripted():
        return ScriptedLLM({
            "good": [Reply("7", 10, 2, finish_reason="stop")],
            "late": [Reply("seven", 10, 3), Reply("8", 10, 1)],
            "down": [Reply(None, failure="HTTP 503: busy", retryable=False)],
        })

    first = CachedLLM(scripted(), AnswerCache.under(tmp_path))
    requests = [Request(prompt=p, seed=3) for p in ("good", "late", "down")]
    paid = ask(first, requests, parse_number, 2)
    assert [a.value for a in paid] == [7, 8, None] and [a.cached for a in paid] == [0, 0, 0]
    assert (first.hits, first.misses) == (0, 4) and len(first.cache) == 3, "answers kept, the 503 not"
    assert (tmp_path / "llm_cache" / "answers.sqlite").is_file()

    backend = scripted()
    again = CachedLLM(backend, AnswerCache.under(tmp_path))  # a new run on the same root
    resumed = ask(again, requests, parse_number, 2)
    assert [a.value for a in resumed] == [7, 8, None]
    assert [(a.attempts, a.cached, a.prompt_tokens, a.completion_tokens) for a in resumed[:2]] == [
        (1, 1, 0, 0), (2, 2, 0, 0)], "the same attempts, each from the cache, 0 tokens"
    assert [p for rnd in backend.rounds for p, _, _ in rnd] == ["down"], "only the failure is asked again"
    assert (again.hits, again.misses) == (3, 1)
    assert resumed[2].failure == "HTTP 503: busy (after 1 attempts)"


def test_the_cache_key_is_prompt_model_seed_and_sampling(tmp_path):
    from neuron_assets.llm import AnswerCache, CachedLLM

    llm = CachedLLM(ScriptedLLM({}), AnswerCache.under(tmp_path))
    base = Request(messages=({"role": "user", "content": "hi"},), seed=1, temperature=1.0, max_tokens=9)
    keys = {llm.key(base), llm.key(Request(messages=({"role": "user", "content": "ho"},), seed=1, temperature=1.0,
                                           max_tokens=9)),
            llm.key(Request(messages=base.messages, seed=2, temperature=1.0, max_tokens=9)),
            llm.key(Request(messages=base.messages, seed=1, temperature=0.5, max_tokens=9)),
            llm.key(Request(messages=base.messages, seed=1, temperature=1.0, max_tokens=10))}
    assert len(keys) == 5
    other_model = ScriptedLLM({})
    other_model.model = "another"
    assert CachedLLM(other_model, llm.cache).key(base) != llm.key(base)
    assert llm.key(Request(messages=base.messages, seed=1, temperature=1.0, max_tokens=9)) == llm.key(base)


def test_a_damaged_cache_file_is_set_aside(tmp_path, caplog):
    from neuron_assets.llm import AnswerCache

    path = tmp_path / "llm_cache" / "answers.sqlite"
    path.parent.mkdir()
    path.write_bytes(b"this is not a database" * 100)
    cache = AnswerCache(path)
    assert len(cache) == 0 and "set aside" in caplog.text
    assert [p.name for p in path.parent.iterdir() if "damaged" in p.name]


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


def test_an_interrupted_round_keeps_the_answers_that_came(no_proxy, tmp_path):
    import os
    import signal
    import threading

    from neuron_assets.llm import AnswerCache, CachedLLM

    server = _BusyEndpoint(hang={"slow"})
    try:
        settings = LLMSettings(backend="openai", model="m", base_url=server.base_url, concurrency=4, timeout_s=30)
        llm = CachedLLM(open_llm(settings), AnswerCache.under(tmp_path))
        requests = [(Request(messages=({"role": "user", "content": c},), seed=1), 1) for c in ("a", "b", "slow")]
        timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):  # Python's own handler, displaced during the round
            llm.generate(requests)
        timer.join()
        assert len(llm.cache) == 2, "each answer is kept as it arrives, before the round ends"
        server.hang_event.set()
        asked = server.requests
        again = CachedLLM(open_llm(settings), AnswerCache.under(tmp_path))
        replies = again.generate(requests)
        assert server.requests == asked + 1, "only the answer that never came is asked again"
        assert [r.cached for r in replies] == [True, True, False] and replies[0].text.startswith("answer to a ")
    finally:
        server.close()
