"""Content checksums of the store's data files.

A file whose footer reads can still hold damaged pages, and DuckDB then returns what the damaged
bytes decode to (40 bytes overwritten in an exemplars file made sum(extreme) -1.78e31). So the
writer records each data file's SHA-256 before renaming it into place, in
checksums/<path from the root>.json, outside data/ (polars refuses a table folder holding other
files). A whole-file hash taken by the writer rather than Parquet page checksums: verifying page
CRCs means decoding every page (a full read of a multi-GB exemplars file each time a run ends),
DuckDB does not check them, and they do not cover page headers or the footer. The hash is taken
again only for a file whose size or modification time differs from what its writer recorded,
so opening a store just written costs nothing; `neuron-assets verify` hashes every file. The
record keeps the entry of the file it replaces too: it is renamed into place just before the
data file, so a reader in between still finds the old file vouched for. On a URL root an object
is replaced whole and the object store checks its uploads: no records there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

CHECKSUMS_DIR = "checksums"


def checksum_record(root: Path, relative: str) -> Path:
    return Path(root) / CHECKSUMS_DIR / f"{relative}.json"


def sha256_of(path: Path | str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def record_checksum(root: Path, relative: str, written: Path) -> None:
    """Record the size, modification time and SHA-256 of ``written``, the file about to be
    renamed onto ``relative`` (a rename keeps both), beside the entry of the file it replaces."""
    stat = os.stat(written)
    entry = {"bytes": stat.st_size, "modified_ns": stat.st_mtime_ns, "sha256": sha256_of(written)}
    record = checksum_record(root, relative)
    kept = [e for e in _checksum_entries(record) if e["sha256"] != entry["sha256"]][:1]
    _write_atomically(record, json.dumps({"file": relative, "entries": [entry, *kept]}, indent=1))


def _checksum_entries(record: Path) -> list[dict]:
    try:
        entries = json.loads(record.read_text())["entries"]
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("sha256"), str)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def content_problem(root: Path, relative: str, path: Path | str, size: int, modified_ns: int,
                    known: str | None = None, thorough: bool = False) -> tuple[str | None, str | None]:
    """(why the file is not what its writer wrote or None, its SHA-256 where known). Hashed only
    when its size or modification time differs from the record (always when ``thorough``), unless
    ``known`` gives its hash at this size and time. (None, None): no record (an older store)."""
    entries = _checksum_entries(checksum_record(root, relative))
    if not entries:
        return None, None
    if not thorough:
        same = next((e for e in entries if e.get("bytes") == size and e.get("modified_ns") == modified_ns), None)
        if same is not None:
            return None, same["sha256"]
    found = known if known is not None and not thorough else sha256_of(path)
    if any(e["sha256"] == found for e in entries):
        return None, found
    return (f"its content changed after it was written: sha256 {found[:12]}... where its writer recorded "
            f"{entries[0]['sha256'][:12]}... ({checksum_record(root, relative)})"), found


def decode_problem(path: Path | str, fs=None) -> str | None:
    """Why a Parquet file's pages do not all decode (and match their page checksums, where the
    writer wrote any), or None when they do: the check for a file with no checksum record."""
    try:
        with (fs.open(path, "rb") if fs is not None else open(path, "rb")) as handle:
            for _ in pq.ParquetFile(handle, page_checksum_verification=True).iter_batches(batch_size=65_536):
                pass
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    return None


def _write_atomically(target: Path, text: str) -> None:
    """Write to a temporary name beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
