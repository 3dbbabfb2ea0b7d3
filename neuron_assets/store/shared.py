"""The small files that writers on several machines share beside the tables: writer locks and
resume markers, under the store's root whether it is a local folder or an fsspec URL.

    files = SharedFiles(root)                    # a local folder, or s3://..., file://..., memory://...
    files.create("locks/corpus.lock", text)      # exclusive: False when the file is there already
    files.write("markers/corpus/all.json", text) # replaces the file whole
    files.read("markers/corpus/all.json")        # None when it is not there

Every write is whole: locally a temporary file renamed (or, for an exclusive create, linked)
onto its target; on a URL a temporary key moved onto it (on an object store an object appears
whole when its upload completes). An exclusive create is ``os.link`` locally and fsspec's
``open(path, "xb")`` on a URL, which local folders and ``memory://`` honour and which S3
(s3fs) implements with a conditional write; a filesystem whose ``"xb"`` does not refuse an
existing file is refused (:class:`NoExclusiveCreate`), checked once per filesystem and process.

A ``file://`` URL goes through fsspec's local filesystem here, as an object store would:
a folder on a disk that several machines mount (NFS) is shared that way. ``memory://`` lives
in one process: several processes can never share it.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path


class NoExclusiveCreate(RuntimeError):
    """The filesystem cannot create a file only if it is absent, so no lock can work on it."""


_CHECKED: dict[str, bool] = {}


class SharedFiles:
    """Small whole-file reads and writes under a store's root (see the module's docstring)."""

    def __init__(self, root: str | os.PathLike):
        text = str(root)
        if "://" in text and not isinstance(root, Path):
            import fsspec

            self.fs, base = fsspec.core.url_to_fs(text)
            self.protocol = text.split("://", 1)[0]
            self.root: Path | str = text.rstrip("/")
            self._base = base.rstrip("/")
        else:
            self.fs = None
            self.root = Path(root)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def path(self, relative: str) -> Path | str:
        """Where a file lives: a local path, or its URL."""
        return f"{self.root}/{relative}" if self.remote else self.root / relative

    def _key(self, relative: str) -> str:
        return f"{self._base}/{relative}"

    # -- reading -----------------------------------------------------------------------------
    def read(self, relative: str) -> str | None:
        try:
            if self.remote:
                return self.fs.cat_file(self._key(relative)).decode()
            return (self.root / relative).read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self._key(relative)) if self.remote else (self.root / relative).exists()

    def age_s(self, relative: str) -> float | None:
        """Seconds since the file was last written (None when it is not there)."""
        try:
            if self.remote:
                modified = self.fs.modified(self._key(relative)).timestamp()
            else:
                modified = (self.root / relative).stat().st_mtime
        except (FileNotFoundError, NotImplementedError):
            return None
        return time.time() - modified

    def size(self, relative: str) -> int | None:
        """A file's size, -1 for a folder, None when it is not there."""
        if self.remote:
            key = self._key(relative)
            if not self.fs.exists(key):
                return None
            return -1 if self.fs.isdir(key) else int(self.fs.size(key))
        path = self.root / relative
        if not path.exists():
            return None
        return path.stat().st_size if path.is_file() else -1

    def find(self, folder: str, suffix: str) -> list[str]:
        """The files under ``folder`` whose names end with ``suffix``, relative to the root, sorted."""
        if self.remote:
            base = self._key(folder)
            if not self.fs.exists(base):
                return []
            return sorted(key[len(self._base) + 1:] for key in self.fs.find(base) if key.endswith(suffix))
        path = self.root / folder
        if not path.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in path.rglob(f"*{suffix}") if p.is_file())

    # -- writing -----------------------------------------------------------------------------
    def write(self, relative: str, text: str) -> None:
        """Replace the file whole: a reader sees the old content or the new, never a part."""
        if self.remote:
            key = self._key(relative)
            folder, name = key.rsplit("/", 1)
            tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
            self._makedirs(folder)
            try:
                self.fs.pipe_file(tmp, text.encode())
                self.fs.mv(tmp, key)
            finally:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            return
        target = self.root / relative
        tmp = self._local_temp(target, text)
        try:
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def create(self, relative: str, text: str) -> bool:
        """Create the file with ``text`` only if it is absent: True when this call made it."""
        if self.remote:
            self._check_exclusive()
            key = self._key(relative)
            self._makedirs(key.rsplit("/", 1)[0])
            try:
                with self.fs.open(key, "xb") as handle:
                    handle.write(text.encode())
            except FileExistsError:
                return False
            return True
        target = self.root / relative
        tmp = self._local_temp(target, text)
        try:
            os.link(tmp, target)  # fails if the target exists; never shows a part-written file
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def remove(self, relative: str) -> None:
        if self.remote:
            try:
                self.fs.rm(self._key(relative))
            except FileNotFoundError:
                pass
            return
        (self.root / relative).unlink(missing_ok=True)

    # -- helpers -----------------------------------------------------------------------------
    def _makedirs(self, folder: str) -> None:
        if self.protocol in ("file", "local"):  # object stores have no folders to make
            self.fs.makedirs(folder, exist_ok=True)

    @staticmethod
    def _local_temp(target: Path, text: str) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return Path(name)

    def _check_exclusive(self) -> None:
        """Once per filesystem and process: does ``open(path, "xb")`` refuse an existing file?"""
        if self.protocol in _CHECKED:
            if not _CHECKED[self.protocol]:
                raise NoExclusiveCreate(self._no_exclusive())
            return
        probe = self._key(f"locks/.exclusive-probe-{uuid.uuid4().hex}")
        self._makedirs(probe.rsplit("/", 1)[0])
        try:
            with self.fs.open(probe, "xb") as handle:
                handle.write(b"1")
            try:
                with self.fs.open(probe, "xb") as handle:
                    handle.write(b"2")
                _CHECKED[self.protocol] = False
            except FileExistsError:
                _CHECKED[self.protocol] = True
        except (ValueError, NotImplementedError, TypeError):  # "xb" not a mode it knows
            _CHECKED[self.protocol] = False
        finally:
            try:
                self.fs.rm(probe)
            except FileNotFoundError:
                pass
        if not _CHECKED[self.protocol]:
            raise NoExclusiveCreate(self._no_exclusive())

    def _no_exclusive(self) -> str:
        return (f"{self.protocol}:// cannot create a file only if it is absent (fsspec's open(..., 'xb') did not "
                f"refuse an existing file), so no writer lock can work under {self.root}; use a filesystem that "
                "can (a local or mounted folder, file://, s3:// with s3fs's conditional writes)")
