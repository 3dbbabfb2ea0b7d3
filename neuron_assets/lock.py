"""Writer locks: one per table partition, naming the run that holds it.

A writing run holds a lock file per thing it writes: ``<root>/locks/<asset>/<layer>-<polarity>.lock``
for a partition of a per-feature table, ``<root>/locks/<asset>.lock`` for a one-file table
(the corpus; ``simulator_checkpoints``, which a run reads, extends and writes back). Runs over
different layer x polarity partitions therefore write side by side, while two runs over the
same partition exclude each other. The file says who holds it (pid, host, run id, start time,
command), so a refused run can say whom it waits for. A lock left by a process that is gone
(same host, pid no longer running, or running a different program since) is taken over with a
warning; one from another host is never guessed dead. Readers (``sql``, ``show``) never look
at the locks: every table file is replaced atomically, so they never block.

Several locks are taken in sorted order, so two runs that wait for each other's locks cannot
deadlock. A lock is re-entrant for the process and the run that hold it: the CLI takes its
partitions' locks for the whole run, and the asset bodies of that run (in the same process, or
in step processes of the same Dagster run) pass through.
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
from typing import Iterable, Iterator

LOCKS_DIR = "locks"


class StoreLocked(RuntimeError):
    """Another live run writes to this part of the store."""


@contextmanager
def writer_lock(root: str | os.PathLike, run_id: str, scopes: Iterable[str], command: str = "",
                wait_s: float = 0.0, on_wait=None) -> Iterator[dict]:
    """Hold the writer locks of ``scopes`` (see :func:`scope`) for the block; yields the holder
    record. With ``wait_s``, locks held by another live run are waited for (up to that many
    seconds in all, ``on_wait(message)`` told once) instead of refused: two Dagster runs over
    the same partition, or over a one-file table, must queue, not fail.

    On a store on a URL (object storage) no lock file can exclude anyone (no exclusive
    create, no pid to check): the lock is a no-op with a warning, and Dagster's partitions
    and run coordination (one run per partition, a run queue) are what keep writers apart."""
    from neuron_assets.store import is_url

    if is_url(root):
        warnings.warn(f"no writer locks on {root}: file locks cannot work on object storage; "
                      "run one writer per partition (Dagster's run queue and partitions keep writers apart)",
                      stacklevel=3)
        yield _record(run_id, command)
        return
    root = Path(root)
    record = _record(run_id, command)
    deadline = time.monotonic() + wait_s
    warned: set = set()
    owned: list[Path] = []
    told = [False]
    try:
        for name in sorted(set(scopes)):
            path = lock_path(root, name)
            if _acquire_waiting(root, name, path, record, deadline, on_wait, told, warned):
                owned.append(path)
        yield record
    finally:
        for path in reversed(owned):
            release(path, record)


def scope(asset: str, partition: str | None = None) -> str:
    """The lock name of a table partition ('exemplars/3|pos') or of a one-file table ('corpus')."""
    return asset if partition is None else f"{asset}/{partition}"


def lock_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / LOCKS_DIR / f"{name.replace('|', '-')}.lock"


def held_locks(root: str | os.PathLike) -> list[Path]:
    """The lock files present under a store (held, or left by a run that died)."""
    folder = Path(root) / LOCKS_DIR
    return sorted(folder.rglob("*.lock")) if folder.exists() else []


def _acquire_waiting(root: Path, name: str, path: Path, record: dict, deadline: float, on_wait, told: list,
                     warned: set) -> bool:
    while True:
        try:
            return acquire(path, record, root=root, name=name, warned=warned)
        except StoreLocked as err:
            if time.monotonic() >= deadline:
                raise
            if not told[0] and on_wait is not None:
                on_wait(f"waiting for the writer lock: {err}")
                told[0] = True
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def acquire(path: Path, record: dict, root: Path | None = None, name: str = "", warned: set | None = None) -> bool:
    """Take the lock; False when this process or run already holds it (nothing to release)."""
    root = path.parent if root is None else root
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
                raise StoreLocked(_refusal(root, name, path, holder))
            _take_over(root, path, holder, set() if warned is None else warned)
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


def _take_over(root: Path, path: Path, holder: dict, warned: set) -> None:
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
    if holder.get("token") in warned:  # one warning per dead run, not one per partition it held
        return
    warned.add(holder.get("token"))
    warnings.warn(f"taking over the writer lock of {root}: it was left by pid {holder.get('pid')} on "
                  f"{holder.get('host')} (run {holder.get('run_id')}, started {holder.get('started_at')}), "
                  "which is no longer running", stacklevel=3)


def _refusal(root: Path, name: str, path: Path, holder: dict) -> str:
    here = holder.get("host") == socket.gethostname()
    fix = ("wait for it to finish, or stop it" if here else
           f"wait for it to finish; if that run is gone (its host is not this one, so it cannot be checked), "
           f"delete {path}")
    return (f"another run is writing to {root}: pid {holder.get('pid')} on {holder.get('host')}, "
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
