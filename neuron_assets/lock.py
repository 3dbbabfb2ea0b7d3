"""Writer locks: one per table partition, naming the run that holds it, kept in the store itself.

A writing run holds a lock file per thing it writes: ``<root>/locks/<asset>/<layer>-<polarity>.lock``
for a partition of a per-feature table, ``<root>/locks/<asset>.lock`` for a one-file table
(the corpus; ``simulator_checkpoints``, which a run reads, extends and writes back). The root is
the store's: a local folder or an fsspec URL (``s3://``, ``file://``, see
:mod:`neuron_assets.store.shared`), so every machine that writes to a store sees the same locks.
Runs over different layer x polarity partitions write side by side; two runs (or two machines)
over the same partition exclude each other. The file says who holds it (pid, machine, run id,
start time, command), so a refused run can say whom it waits for. Readers (``sql``, ``show``)
never look at the locks: every table file is replaced atomically, so they never block.

**Leases.** A holder renews its locks from a heartbeat thread every quarter of its lease
($NEURON_ASSETS_LOCK_LEASE_S, default 120 s), writing ``renewed_at`` into the file. A lock whose
holder can be checked (same machine: its pid is gone, or runs another program since) is taken
over at once with a warning; one from another machine only once its lease has expired (not
renewed for ``lease_s`` seconds: that machine died or lost the store). A record without a lease
(written before leases) is never guessed dead: the message names the file to delete.
The machine's name is the host name, or $NEURON_ASSETS_NODE where several workers share one
host but must count as separate machines (containers, the celery test tier).

Several locks are taken in sorted order, so two runs that wait for each other's locks cannot
deadlock. A lock is re-entrant for the process that holds it and for the same run on the same
machine: the CLI takes its partitions' locks for the whole run, and the asset bodies of that run
(in the same process, or in step processes of the same Dagster run) pass through. The same run
on another machine (a step delivered twice by a distributed executor) waits like any other.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from neuron_assets.store.shared import SharedFiles

LOCKS_DIR = "locks"
LEASE_ENV = "NEURON_ASSETS_LOCK_LEASE_S"
NODE_ENV = "NEURON_ASSETS_NODE"
DEFAULT_LEASE_S = 120.0


class StoreLocked(RuntimeError):
    """Another live run writes to this part of the store."""


def node() -> str:
    """This machine's name in lock records."""
    return os.environ.get(NODE_ENV, "").strip() or socket.gethostname()


def lease_s() -> float:
    try:
        return max(1.0, float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S)))
    except ValueError:
        raise ValueError(f"{LEASE_ENV} must be a number of seconds, not {os.environ[LEASE_ENV]!r}") from None


@contextmanager
def writer_lock(root: str | os.PathLike, run_id: str, scopes: Iterable[str], command: str = "",
                wait_s: float = 0.0, on_wait=None) -> Iterator[dict]:
    """Hold the writer locks of ``scopes`` (see :func:`scope`) under the store ``root`` for the
    block, renewing their lease meanwhile; yields the holder record. With ``wait_s``, locks held
    by another live run are waited for (up to that many seconds in all, ``on_wait(message)``
    told once) instead of refused: two Dagster runs over the same partition, or over a
    one-file table, must queue, not fail."""
    files = SharedFiles(root)
    record = _record(run_id, command)
    deadline = time.monotonic() + wait_s
    warned: set = set()
    owned: list[str] = []
    told = [False]
    heartbeat = _Heartbeat(files, record, owned)
    try:
        for name in sorted(set(scopes)):
            relative = _relative(name)
            if _acquire_waiting(files, name, relative, record, deadline, on_wait, told, warned):
                owned.append(relative)
        heartbeat.start()
        yield record
    finally:
        heartbeat.stop()
        for relative in reversed(owned):
            _release(files, relative, record)


def scope(asset: str, partition: str | None = None) -> str:
    """The lock name of a table partition ('exemplars/3|pos') or of a one-file table ('corpus')."""
    return asset if partition is None else f"{asset}/{partition}"


def _relative(name: str) -> str:
    return f"{LOCKS_DIR}/{name.replace('|', '-')}.lock"


def lock_path(root: str | os.PathLike, name: str) -> Path | str:
    """Where a lock lives: a local path, or its URL on a URL root."""
    return SharedFiles(root).path(_relative(name))


def held_locks(root: str | os.PathLike) -> list[Path | str]:
    """The lock files present under a store (held, or left by a run that died)."""
    files = SharedFiles(root)
    return [files.path(relative) for relative in files.find(LOCKS_DIR, ".lock")]


def read_holder(files: SharedFiles, relative: str) -> dict | None:
    """The lock's record; None when there is none (or it is being written: look again)."""
    text = files.read(relative)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # a torn file from before whole-file creates: its writer died, or is writing now
        age = files.age_s(relative)
        if age is None or age <= 5:
            return None
        return {"pid": -1, "host": node(), "run_id": "?", "started_at": "?", "token": f"torn-{age:.0f}"}


def _acquire_waiting(files: SharedFiles, name: str, relative: str, record: dict, deadline: float, on_wait,
                     told: list, warned: set) -> bool:
    while True:
        try:
            return _acquire(files, name, relative, record, warned)
        except StoreLocked as err:
            if time.monotonic() >= deadline:
                raise
            if not told[0] and on_wait is not None:
                on_wait(f"waiting for the writer lock: {err}")
                told[0] = True
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def _acquire(files: SharedFiles, name: str, relative: str, record: dict, warned: set) -> bool:
    """Take the lock; False when this process or run already holds it (nothing to release)."""
    for _ in range(5):  # a lost race against a take-over or a release is tried again
        if files.create(relative, json.dumps(record)):
            return True
        holder = read_holder(files, relative)
        if holder is None:  # being written or just released: look again
            time.sleep(0.05)
            continue
        if _same_holder(holder, record):
            return False
        why = _stale_because(holder)
        if why is None:
            raise StoreLocked(_refusal(files, name, relative, holder))
        _take_over(files, relative, holder, why, warned)
    raise StoreLocked(f"could not take the writer lock {files.path(relative)}: it changes hands too fast; try again")


def _release(files: SharedFiles, relative: str, record: dict) -> None:
    holder = read_holder(files, relative)
    if holder is not None and holder.get("token") == record["token"]:
        files.remove(relative)


def _record(run_id: str, command: str) -> dict:
    pid = os.getpid()
    now = time.time()
    return {
        "pid": pid, "host": node(), "run_id": run_id,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv), "process_start": _process_start(pid),
        "token": os.urandom(8).hex(), "lease_s": lease_s(), "renewed_at": now,
    }


def _same_holder(holder: dict, record: dict) -> bool:
    if holder.get("host") != record["host"]:
        return False
    if holder.get("run_id") == record["run_id"]:
        return True
    return holder.get("pid") == record["pid"] and holder.get("process_start") == record["process_start"]


def _stale_because(holder: dict) -> str | None:
    """Why the holder is known gone (None: it may be alive). On this machine: its pid is gone, or
    reused by another process. Elsewhere: its lease expired."""
    if holder.get("host") == node():
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return "which is no longer running"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "which is no longer running"
        except PermissionError:
            return None  # alive, another user's
        if _process_state(pid) == "Z":  # exited, not yet reaped by its parent: gone all the same
            return "which is no longer running"
        started = holder.get("process_start")
        if started is not None and _process_start(pid) not in (None, started):
            return "which is no longer running"
        return None
    lease, renewed = holder.get("lease_s"), holder.get("renewed_at")
    if not isinstance(lease, (int, float)) or not isinstance(renewed, (int, float)):
        return None  # a record without a lease: never guessed dead
    late = time.time() - (renewed + lease)
    return f"whose lease of {lease:.0f} s expired {late:.0f} s ago" if late > 0 else None


def _take_over(files: SharedFiles, relative: str, holder: dict, why: str, warned: set) -> None:
    """Remove a stale lock so that the next exclusive create can take it. Of several runs taking
    over one stale lock only one goes on: each first creates ``<lock>.takeover-<stale token>``,
    exclusively; the others find it there and look again."""
    claim = f"{relative}.takeover-{holder.get('token')}"
    if not files.create(claim, json.dumps({"pid": os.getpid(), "host": node()})):
        age = files.age_s(claim)
        if age is not None and age > 30:  # a taker that died half way
            files.remove(claim)
        time.sleep(0.1)
        return
    try:
        current = read_holder(files, relative)
        if current is None or current.get("token") != holder.get("token"):
            return  # released, or taken by someone else meanwhile: the next round decides
        files.remove(relative)
    finally:
        files.remove(claim)
    if holder.get("token") in warned:  # one warning per dead run, not one per partition it held
        return
    warned.add(holder.get("token"))
    warnings.warn(f"taking over the writer lock of {files.root}: it was left by pid {holder.get('pid')} on "
                  f"{holder.get('host')} (run {holder.get('run_id')}, started {holder.get('started_at')}), {why}",
                  stacklevel=4)


class _Heartbeat:
    """Renews the lease of the locks a block holds, every quarter of the lease."""

    def __init__(self, files: SharedFiles, record: dict, owned: list[str]):
        self.files, self.record, self.owned = files, record, owned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.owned:
            self._thread = threading.Thread(target=self._run, name="writer-lock-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        interval = max(0.25, self.record["lease_s"] / 4)
        while not self._stop.wait(interval):
            self.record["renewed_at"] = time.time()
            for relative in list(self.owned):
                try:
                    holder = read_holder(self.files, relative)
                    if holder is None or holder.get("token") != self.record["token"]:
                        continue  # taken over: this machine was presumed dead; never write over the new holder
                    self.files.write(relative, json.dumps(self.record))
                except OSError as err:  # the store is unreachable for a moment: the next beat tries again
                    warnings.warn(f"could not renew the writer lock {self.files.path(relative)}: {err}", stacklevel=1)


def _refusal(files: SharedFiles, name: str, relative: str, holder: dict) -> str:
    here = holder.get("host") == node()
    leased = isinstance(holder.get("lease_s"), (int, float)) and isinstance(holder.get("renewed_at"), (int, float))
    if here:
        fix = "wait for it to finish, or stop it"
    elif leased:
        until = datetime.fromtimestamp(holder["renewed_at"] + holder["lease_s"], timezone.utc)
        fix = (f"wait for it to finish; it renews its lease of {holder['lease_s']:.0f} s while it runs, and if its "
               f"machine is gone the lock is taken over once the lease expires (not before {until.isoformat(timespec='seconds')})")
    else:
        fix = (f"wait for it to finish; if that run is gone (its host is not this one, so it cannot be checked), "
               f"delete {files.path(relative)}")
    return (f"another run is writing to {files.root}: pid {holder.get('pid')} on {holder.get('host')}, "
            f"run {holder.get('run_id')}, started {holder.get('started_at')}"
            + (f" ({holder['command']})" if holder.get("command") else "")
            + (f", and holds {name}" if name else "") + f"; {fix}. "
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
