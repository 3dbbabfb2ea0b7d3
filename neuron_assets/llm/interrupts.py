"""Running one async round of requests from plain code, so that Ctrl-C always stops it.

Dagster turns SIGINT inside a step into a ``DagsterExecutionInterruptedError`` raised, once,
wherever the main thread happens to be. During a round that is usually inside asyncio:
in one of the event loop's own callbacks (a socket became writable, a connection was lost)
asyncio logs any exception that is not KeyboardInterrupt or SystemExit ("Exception in
callback ...") and goes on, and in a ``__del__`` Python prints "Exception ignored in ..."
and goes on. Either way the interrupt was spent: the round ran to its end and the run
finished with exit code 0.

So while a round runs, :func:`run_coroutine` holds SIGINT (and SIGTERM, when it shares a
Python handler) itself: the signal only cancels the round's task, which closes every
connection at once, and once the loop has stopped the signal goes to the handler it
displaced (Dagster's raises its interrupt there, Python's default raises
KeyboardInterrupt), at a point where nothing can swallow it. A second Ctrl-C during the
cancellation stops the loop without waiting for the connections to close.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CANCEL_WAIT_S = 10.0  # how long an interrupted round's worker thread may take to close its connections


def run_coroutine(make: Callable[[], Awaitable[T]]) -> T:
    """``make()``'s coroutine run to completion on a new event loop: in this thread, or, when
    this thread already runs a loop (a notebook), in a worker thread. An interrupt cancels
    the round and is raised here, after every connection is closed."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(make)
    return _run_in_thread(make)


def _run_here(make: Callable[[], Awaitable[T]]) -> T:
    loop = asyncio.new_event_loop()
    task = loop.create_task(make())
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        try:  # the first cancels the round; a second stops the loop without waiting for that
            loop.call_soon_threadsafe(task.cancel if len(received) == 1 else loop.stop)
        except RuntimeError:  # the loop is closed already: the interrupt is delivered below
            pass

    displaced = _hold(on_signal) if threading.current_thread() is threading.main_thread() else {}
    result = None
    try:
        try:
            result = loop.run_until_complete(task)
        except (asyncio.CancelledError, RuntimeError):  # RuntimeError: stopped by a second Ctrl-C
            if not received:
                raise
        finally:
            _close(loop, wait=len(received) < 2)
    finally:
        _restore(displaced)
    if received:
        _deliver(displaced.get(received[0]), received[0])
    return result  # type: ignore[return-value]


def _run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """The round in a worker thread; if this thread is interrupted while it waits, the round
    is cancelled (not waited for) and the interrupt goes on."""
    loop = asyncio.new_event_loop()
    outcome: dict[str, object] = {}

    def work():
        asyncio.set_event_loop(loop)
        try:
            outcome["result"] = loop.run_until_complete(task)
        except BaseException as err:  # handed to the waiting thread, which raises it
            outcome["error"] = err
        finally:
            _close(loop)

    task = loop.create_task(make())
    worker = threading.Thread(target=work, name="llm-round", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except BaseException:
        try:
            loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:  # the round had just ended
            pass
        worker.join(CANCEL_WAIT_S)
        raise
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _hold(handler) -> dict[int, object]:
    """Install ``handler`` for SIGINT, and for SIGTERM where it shares SIGINT's Python handler
    (Dagster maps SIGTERM to it); the handlers it displaced, by signal."""
    current = {s: signal.getsignal(s) for s in HELD_SIGNALS}
    held = {s: h for s, h in current.items() if callable(h) and (s == signal.SIGINT or h == current[signal.SIGINT])}
    for signum in held:
        signal.signal(signum, handler)
    return held


def _restore(displaced: dict[int, object]) -> None:
    for signum, handler in displaced.items():
        signal.signal(signum, handler)


def _deliver(handler, signum: int):
    """Hand the signal to the handler it was meant for (Python's default when none was held);
    if that handler only takes note of it (Dagster outside a step), the round is gone all
    the same: stop with KeyboardInterrupt."""
    (handler if callable(handler) else signal.default_int_handler)(signum, None)
    raise KeyboardInterrupt


def _close(loop: asyncio.AbstractEventLoop, wait: bool = True) -> None:
    """Cancel what is left on the loop (a failed gather leaves its siblings running), let it
    unwind (unless ``wait`` is False: a second Ctrl-C), then close the loop."""
    try:
        if wait:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
    except RuntimeError:  # stopped by a second Ctrl-C while unwinding
        pass
    finally:
        loop.close()
