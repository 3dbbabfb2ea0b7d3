"""Pay for an LLM answer once: every answer kept on disk, keyed by what determines it.

A resumed run asks again for what it asked before (a partition whose answers were written
but not yet marked done when the run was killed; a scoring stage run again). With
:class:`CachedLLM` around a backend, such a request is answered from the
:class:`AnswerCache` instead: the same text (or logprobs), so the same candidates, at no
cost. A cached reply says so (``Reply.cached``) and counts 0 tokens; :attr:`CachedLLM.hits`
counts them for the run log.

The key is a hash of everything that shapes the answer: the backend, the model, the
messages or prompt, the seed, temperature, max_tokens and the extra request body (or, for
logprobs, the prompt, offsets, choices and the number of alternatives a server returns).
Not the server's URL: the same model served elsewhere gives the same kind of answer. Only
answers are kept (text or logprobs that came back), never failures: a timeout or a 5xx is
asked again on the next run.

The cache is one SQLite file (``<root>/llm_cache/answers.sqlite``, write-ahead log): each
answer is committed in its own transaction as it arrives, so a killed run keeps every
answer it received and never leaves half of one readable, and runs over other layers of
the same root share it. A file that is not a readable cache is set aside and a new one
started (its answers are asked again).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from neuron_assets.llm.base import LLM, ChoiceRequest, LogprobReply, LogprobRequest, Reply, Request

log = logging.getLogger(__name__)

CACHE_FOLDER = "llm_cache"
CACHE_FILE = "answers.sqlite"
BUSY_TIMEOUT_S = 60.0  # another run writing to the same cache holds it for a commit at a time
SCHEMA = "create table if not exists answers (key text primary key, answer text not null, created real not null)"


class AnswerCache:
    """Answers by key in one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = self._open()

    @classmethod
    def under(cls, root: Path) -> AnswerCache:
        """The cache of a store's local root: ``<root>/llm_cache/answers.sqlite``."""
        return cls(Path(root) / CACHE_FOLDER / CACHE_FILE)

    def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        wanted = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(wanted), 500):  # SQLite's limit on bound parameters
                chunk = wanted[start : start + 500]
                rows = self._connection.execute(
                    f"select key, answer from answers where key in ({','.join('?' * len(chunk))})", chunk).fetchall()
                for key, answer in rows:
                    try:
                        found[key] = json.loads(answer)
                    except ValueError:  # cannot happen short of a damaged disk: ask again
                        continue
        return found

    def put(self, key: str, answer: Mapping[str, object]) -> None:
        """Keep one answer, committed at once (its own transaction)."""
        text = json.dumps(answer, separators=(",", ":"))
        with self._lock:
            self._connection.execute("insert or ignore into answers (key, answer, created) values (?, ?, ?)",
                                     (key, text, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._connection.execute("select count(*) from answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def _open(self) -> sqlite3.Connection:
        try:
            return _connect(self.path)
        except sqlite3.DatabaseError as err:  # not a database, or damaged: set it aside, start again
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            log.warning("the LLM answer cache %s could not be read (%s); it was set aside as %s and a new one "
                        "started: its answers will be asked again", self.path, err, aside.name)
            return _connect(self.path)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level None: every statement commits by itself, so an answer is in or out, whole
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    connection.execute("pragma journal_mode=wal")
    connection.execute("pragma synchronous=normal")  # with the WAL: durable when the process is killed
    connection.execute(SCHEMA)
    connection.execute("select count(*) from answers").fetchone()  # a damaged file fails here, not later
    return connection


class CachedLLM:
    """An LLM backend whose answers are kept in, and served from, an :class:`AnswerCache`.
    Everything else (tokenizer, token counting, the loaded model) is the backend's."""

    def __init__(self, llm: LLM, cache: AnswerCache):
        self.llm = llm
        self.cache = cache
        self.hits = 0  # requests answered from the cache
        self.misses = 0  # requests sent to the model
        self._identity = _identity(llm)
        self._streams = "on_reply" in inspect.signature(llm.generate).parameters

    def __getattr__(self, name):  # backend, model, count_chat_tokens, tokenizer, lm, ...
        if name == "llm":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.llm, name)

    def generate(self, requests: Sequence[tuple[Request, int]], on_reply=None) -> list[Reply]:
        keys = [self.key(request) for request, _ in requests]
        found = self.cache.get_many(keys)
        replies: list[Reply | None] = [_cached_reply(found[k]) if k in found else None for k in keys]
        for i, reply in enumerate(replies):
            if reply is not None and on_reply is not None:
                on_reply(i, reply)
        asked = [i for i, reply in enumerate(replies) if reply is None]
        self.hits += len(requests) - len(asked)
        self.misses += len(asked)
        if asked:

            def keep(j: int, reply: Reply) -> None:
                self._keep(keys[asked[j]], _reply_record(reply) if reply.failure is None and reply.text is not None
                           else None)
                if on_reply is not None:
                    on_reply(asked[j], reply)

            batch = [requests[i] for i in asked]
            fresh = self.llm.generate(batch, on_reply=keep) if self._streams else self.llm.generate(batch)
            if not self._streams:
                for j, reply in enumerate(fresh):
                    keep(j, reply)
            for i, reply in zip(asked, fresh):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    def continuation_logprobs(self, requests: Sequence[LogprobRequest], max_attempts: int = 1) -> list[LogprobReply]:
        return self._logprobs(requests, lambda asked: self.llm.continuation_logprobs(asked, max_attempts))

    def choice_logprobs(self, requests: Sequence[ChoiceRequest], max_attempts: int = 1) -> list[LogprobReply]:
        return self._logprobs(requests, lambda asked: self.llm.choice_logprobs(asked, max_attempts))

    def key(self, request: Request | LogprobRequest | ChoiceRequest) -> str:
        """The hash of everything that shapes the answer to ``request`` from this model."""
        if isinstance(request, Request):
            what = {"kind": "chat" if request.messages is not None else "completion",
                    "messages": [dict(m) for m in request.messages] if request.messages is not None else None,
                    "prompt": request.prompt, "seed": request.seed, "temperature": request.temperature,
                    "max_tokens": request.max_tokens}
        elif isinstance(request, LogprobRequest):
            what = {"kind": "continuation_logprobs", "prompt": request.prompt, "offsets": list(request.offsets),
                    "continuations": list(request.continuations)}
        else:
            what = {"kind": "choice_logprobs", "messages": [dict(m) for m in request.messages],
                    "choices": list(request.choices)}
        text = json.dumps({**self._identity, **what}, sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def _logprobs(self, requests, ask) -> list[LogprobReply]:
        keys = [self.key(r) for r in requests]
        found = self.cache.get_many(keys)
        replies: list[LogprobReply | None] = [_cached_logprobs(found[k]) if k in found else None for k in keys]
        asked = [i for i, reply in enumerate(replies) if reply is None]
        self.hits += len(requests) - len(asked)
        self.misses += len(asked)
        if asked:
            for i, reply in zip(asked, ask([requests[i] for i in asked])):
                replies[i] = reply
                self._keep(keys[i], _logprobs_record(reply) if reply.logprobs is not None else None)
        return replies  # type: ignore[return-value]

    def _keep(self, key: str, record: dict | None) -> None:
        if record is None:  # a failure: asked again next time
            return
        try:
            self.cache.put(key, record)
        except sqlite3.Error as err:  # a full disk, say: the answer is used, only not kept
            log.warning("could not keep an LLM answer in %s (%s); a rerun asks for it again", self.cache.path, err)


def with_answer_cache(llm: LLM, cache: AnswerCache | None) -> LLM:
    """``llm`` behind ``cache`` (unchanged when ``cache`` is None)."""
    if cache is None:
        return llm
    if isinstance(llm, CachedLLM):
        llm = llm.llm
    return CachedLLM(llm, cache)


def _identity(llm: LLM) -> dict:
    settings = getattr(llm, "settings", None)
    return {
        "backend": getattr(llm, "backend", None), "model": getattr(llm, "model", None),
        "extra_body": dict(getattr(settings, "extra_body", None) or {}),
        "engine": {"dtype": getattr(settings, "dtype", None),
                   "engine_kwargs": dict(getattr(settings, "engine_kwargs", None) or {})},
        "top_logprobs": getattr(llm, "top_logprobs", None),
    }


def _reply_record(reply: Reply) -> dict:
    return {"text": reply.text, "finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens}


def _cached_reply(record: Mapping) -> Reply:
    # what the first run paid is in the record; this run pays nothing
    return Reply(record["text"], 0, 0, 0.0, 1, record.get("finish_reason"), cached=True)


def _logprobs_record(reply: LogprobReply) -> dict:
    table = np.asarray(reply.logprobs, dtype=np.float64)
    return {"shape": list(table.shape), "logprobs": [v if math.isfinite(v) else None for v in table.ravel().tolist()],
            "prompt_tokens": reply.prompt_tokens}


def _cached_logprobs(record: Mapping) -> LogprobReply:
    values = np.array([-np.inf if v is None else v for v in record["logprobs"]], dtype=np.float64)
    return LogprobReply(values.reshape(record["shape"]), cached=True)
