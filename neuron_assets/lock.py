"""One writer per store: a lock file in the storage root naming the run that holds it.

A writing run (``neuron-assets run``, or an asset materialized from the Dagster UI) holds
``<root>/writer.lock`` while it writes. The file says who holds it (pid, host, run id,
start time, command), so a refused run can say whom it waits for. A lock left by a process
that is gone (same host, pid no longer running, or running a different program since) is
taken over with a warning; one from another host is never guessed dead. Readers (``sql``,
``show``) never look at it: every table file is replaced atomically, so they never block.

The lock is re-entrant for the process and the run that hold it: the CLI takes it for the
whole run, and the asset bodies of that run (in the same process, or in step processes of
the same Dagster run) pass through.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

LOCK_FILE = "writer.lock"


class StoreLocked(RuntimeError):
    """Another live run writes to this store."""


@contextmanager
def writer_lock(root: str | os.PathLike, run_id: str, command: str = "", wait_s: float = 0.0,
                on_wait=None) -> Iterator[dict]:
    """Hold the store's writer lock for the block; yields the holder record. With ``wait_s``,
    a lock held by another live run is waited for (up to that many seconds, ``on_wait(message)``
    told once) instead of refused: Dagster launches a UI backfill of a layer x polarity range as
    one run per polarity, and those runs must queue, not fail."""
    path = Path(root) / LOCK_FILE
    record = _record(run_id, command)
    owned = _acquire_waiting(path, record, wait_s, on_wait)
    try:
        yield record
    finally:
        if owned:
            release(path, record)


def _acquire_waiting(path: Path, record: dict, wait_s: float, on_wait) -> bool:
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return acquire(path, record)
        except StoreLocked as err:
            if time.monotonic() >= deadline:
                raise
            if not told and on_wait is not None:
                on_wait(f"waiting for the writer lock: {err}")
                told = True
            time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))


def acquire(path: Path, record: dict) -> bool:
    """Take the lock; False when this process or run already holds it (nothing to release)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a lost race against a take-over or a release is tried again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder is None:  # being written or just released: look again
                continue
            if _same_holder(holder, record):
                return False
            if not _is_stale(holder):
                raise StoreLocked(_refusal(path, holder))
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        return True
    raise StoreLocked(f"could not take the writer lock {path}: it changes hands too fast; try again")


def release(path: Path, record: dict) -> None:
    holder = read_holder(path)
    if holder is not None and holder.get("token") == record["token"]:
        path.unlink(missing_ok=True)


def read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        # an empty or torn file: its writer died between create and write, or is writing now
        try:
            age = datetime.now().timestamp() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"pid": -1, "host": socket.gethostname(), "run_id": "?", "started_at": "?"} if age > 5 else None


def _record(run_id: str, command: str) -> dict:
    pid = os.getpid()
    return {
        "pid": pid, "host": socket.gethostname(), "run_id": run_id,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv), "process_start": _process_start(pid),
        "token": os.urandom(8).hex(),
    }


def _same_holder(holder: dict, record: dict) -> bool:
    if holder.get("run_id") == record["run_id"]:
        return True
    return holder.get("host") == record["host"] and holder.get("pid") == record["pid"] \
        and holder.get("process_start") == record["process_start"]


def _is_stale(holder: dict) -> bool:
    """Only a holder on this host can be known dead: its pid is gone, or reused by another process."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    if _process_state(pid) == "Z":  # exited, not yet reaped by its parent: gone all the same
        return True
    started = holder.get("process_start")
    return started is not None and _process_start(pid) not in (None, started)


def _take_over(path: Path, holder: dict) -> None:
    """Move the stale lock aside (one rename: of two runs taking over, only one succeeds)."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    taken = read_holder(aside)
    if taken is not None and taken.get("token") != holder.get("token"):
        # we moved a fresh lock someone took meanwhile: put it back, the next round refuses
        try:
            os.link(aside, path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    warnings.warn(f"taking over the writer lock of {path.parent}: it was left by pid {holder.get('pid')} on "
                  f"{holder.get('host')} (run {holder.get('run_id')}, started {holder.get('started_at')}), "
                  "which is no longer running", stacklevel=3)


def _refusal(path: Path, holder: dict) -> str:
    here = holder.get("host") == socket.gethostname()
    fix = ("wait for it to finish, or stop it" if here else
           f"wait for it to finish; if that run is gone (its host is not this one, so it cannot be checked), "
           f"delete {path}")
    return (f"another run is writing to {path.parent}: pid {holder.get('pid')} on {holder.get('host')}, "
            f"run {holder.get('run_id')}, started {holder.get('started_at')}"
            + (f" ({holder['command']})" if holder.get("command") else "") + f"; {fix}. "
            "Queries (neuron-assets sql, show) work meanwhile.")


def _process_state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...) on Linux; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
