"""Resume across stages: which asset partitions are up to date, from completion markers.

When a stage has written a partition's tables it writes a marker,
``<root>/markers/<asset>/<partition>.json``, after the data (whole, as every file). The root is
the store's, a local folder or an fsspec URL alike (:mod:`neuron_assets.store.shared`), so a
rerun on any machine that sees the store skips what another machine finished:

- ``config``: the hash of the config sections the stage reads (``Config.sections_hash``;
  for the corpus also the size and modification time of the user's source files);
- ``inputs``: the tokens of the upstream markers it was computed from;
- ``files``: the files it wrote, relative to the root (URLs on a remote root), with their sizes;
- ``token``: new for every completion, so a recomputed upstream makes its downstream stale.

A partition is *up to date* when its marker is there, its config hash is the current one,
its files are there with those sizes, and every upstream partition is up to date with the
token the marker recorded. A rerun skips those; everything else (stale or missing, and all
that depends on it) is computed again. A stage removes a partition's marker before it
recomputes it, so a run killed half way leaves that partition stale, never falsely done.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from neuron_assets.config import Config
from neuron_assets.stages.graph import STAGES, stage_active, stage_version
from neuron_assets.store import Store, is_url
from neuron_assets.store.shared import SharedFiles

MARKERS = "markers"
ALL = None  # the partition of an unpartitioned asset


class Markers:
    """The completion markers of one store, judged against one config and partition set."""

    def __init__(self, config: Config, partitions: Sequence[str]):
        self.config = config
        self.root = config.root  # the local folder: files recorded relative to it (checkpoints on a URL root)
        self.store = Store(config.store_root)
        self.files = SharedFiles(config.store_root)  # the markers live in the store, local or on its URL
        self.partitions = list(partitions)
        self._fresh: dict[tuple[str, str | None], bool] = {}

    # -- reading -------------------------------------------------------------------------
    def up_to_date(self, asset: str, partition: str | None = ALL) -> bool:
        key = (asset, partition)
        if key not in self._fresh:
            self._fresh[key] = self._judge(asset, partition)
        return self._fresh[key]

    def stale(self, assets: Iterable[str]) -> dict[str, list[str | None]]:
        """asset -> its partitions that are not up to date (assets with none left out)."""
        out = {}
        for asset in assets:
            todo = [p for p in self._partitions_of(asset) if not self.up_to_date(asset, p)]
            if todo:
                out[asset] = todo
        return out

    def read(self, asset: str, partition: str | None) -> dict | None:
        text = self.files.read(self._marker(asset, partition))
        try:
            return None if text is None else json.loads(text)
        except json.JSONDecodeError:
            return None

    def path(self, asset: str, partition: str | None) -> Path | str:
        """Where a marker lives: under the store's root, a local path or a URL."""
        return self.files.path(self._marker(asset, partition))

    @staticmethod
    def _marker(asset: str, partition: str | None) -> str:
        name = "all" if partition is None else partition.replace("|", "-")
        return f"{MARKERS}/{asset}/{name}.json"

    # -- writing -------------------------------------------------------------------------
    def invalidate(self, asset: str, partition: str | None) -> None:
        """Before a partition is recomputed: until its new marker lands, it is stale."""
        self.files.remove(self._marker(asset, partition))
        self._fresh.clear()

    def complete(self, asset: str, partition: str | None, files: Iterable[str | os.PathLike], run_id: str) -> None:
        """After a partition's files are all written: record what they were made from."""
        listed = {}
        for file in files:
            size = self._size(file)
            listed[self._relative(file)] = -1 if size is None else size
        marker = {
            "asset": asset, "partition": partition, "config": self._config_hash(asset),
            "inputs": {self._input_key(u, q): (self.read(u, q) or {}).get("token")
                       for u, q in self._inputs(asset, partition)},
            "files": listed, "run_id": run_id, "token": os.urandom(8).hex(),
            "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.files.write(self._marker(asset, partition), json.dumps(marker, indent=1, sort_keys=True))
        self._fresh.clear()

    # -- helpers -------------------------------------------------------------------------
    def _judge(self, asset: str, partition: str | None) -> bool:
        marker = self.read(asset, partition)
        if marker is None or marker.get("config") != self._config_hash(asset):
            return False
        for relative, size in marker.get("files", {}).items():
            found = self._size(relative if is_url(relative) else self.root / relative)
            if found is None or (size >= 0 and found != size):
                return False
        recorded = marker.get("inputs", {})
        for upstream, part in self._inputs(asset, partition):
            current = self.read(upstream, part)
            if current is None or recorded.get(self._input_key(upstream, part)) != current.get("token"):
                return False
            if not self.up_to_date(upstream, part):
                return False
        return True

    def _inputs(self, asset: str, partition: str | None) -> list[tuple[str, str | None]]:
        inputs = []
        for upstream in STAGES[asset].upstream:
            if not stage_active(upstream, self.config):
                continue
            if not STAGES[upstream].partitioned:
                inputs.append((upstream, ALL))
            elif STAGES[asset].partitioned:
                inputs.append((upstream, partition))
            else:
                inputs += [(upstream, p) for p in self.partitions]
        return inputs

    def _partitions_of(self, asset: str) -> list[str | None]:
        return list(self.partitions) if STAGES[asset].partitioned else [ALL]

    def _config_hash(self, asset: str) -> str:
        return stage_version(self.config, asset)

    def _size(self, file: str | os.PathLike) -> int | None:
        """A file's size, -1 for a folder, None when it is not there (local or on the store's URL)."""
        if is_url(file):
            if not self.store.remote or not self.store.fs.exists(file):
                return None
            return -1 if self.store.fs.isdir(file) else int(self.store.fs.size(file))
        file = Path(file)
        if not file.exists():
            return None
        return file.stat().st_size if file.is_file() else -1

    def _relative(self, file: str | os.PathLike) -> str:
        if is_url(file):
            return str(file)
        try:
            return Path(file).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(file)

    @staticmethod
    def _input_key(asset: str, partition: str | None) -> str:
        return asset if partition is None else f"{asset}/{partition}"
