"""Resume across stages: which asset partitions are up to date, from completion markers.

When a stage has written a partition's tables it writes a marker,
``<root>/markers/<asset>/<partition>.json``, after the data (atomically, as every file):

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from neuron_assets.config import Config
from neuron_assets.store import Store, atomic_path, is_url

MARKERS = "markers"
ALL = None  # the partition of an unpartitioned asset


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # the config sections the stage reads
    upstream: tuple[str, ...]
    partitioned: bool


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("corpus", ("subject", "corpus"), (), False),
    Stage("sae_checkpoint", ("subject", "corpus", "sae"), ("corpus",), False),
    Stage("exemplars", ("subject", "corpus", "features", "exemplars", "sae"), ("corpus", "sae_checkpoint"), True),
    Stage("candidate_descriptions", ("subject", "explain"), ("exemplars", "corpus"), True),
    Stage("simulator_training_data", ("simulate",), ("exemplars", "candidate_descriptions"), False),
    Stage("simulator_checkpoint", ("subject", "simulate"), ("simulator_training_data",), False),
    Stage("description_scores", ("explain", "simulate", "score"),
          ("candidate_descriptions", "exemplars", "simulator_checkpoint"), True),
    Stage("neuron_descriptions", ("explain", "simulate", "score"),
          ("description_scores", "exemplars", "simulator_checkpoint"), True),
    Stage("description_embeddings", ("subject", "search"),
          ("neuron_descriptions", "candidate_descriptions"), True),
    Stage("scorer_validity", ("subject", "corpus", "simulate", "score"), ("corpus", "simulator_checkpoint"), False),
    Stage("neuron_report", (), ("exemplars", "candidate_descriptions", "description_scores", "neuron_descriptions"), False),
    Stage("explainer_distilled", ("subject", "explain", "distill"), ("neuron_descriptions", "exemplars"), False),
    Stage("distilled_explainer_eval", ("subject", "explain", "simulate", "score", "distill"),
          ("explainer_distilled", "exemplars", "simulator_checkpoint"), False),
)}
ON_DEMAND = ("explainer_distilled", "distilled_explainer_eval")  # in a run only when selected, or with distill.in_run


def stage_active(name: str, config: Config) -> bool:
    """Whether a config has the stage at all: sae_checkpoint only when it names SAE layers."""
    return name != "sae_checkpoint" or bool(config.sae.layers)


def in_plain_run(name: str, config: Config) -> bool:
    """Whether `neuron-assets run` without --select materializes the stage: the distilled
    explainer's stages only with distill.in_run (they take minutes on CPU)."""
    return name not in ON_DEMAND or config.distill.in_run


class Markers:
    """The completion markers of one store, judged against one config and partition set."""

    def __init__(self, config: Config, partitions: Sequence[str]):
        self.config = config
        self.root = config.root  # markers are local files: on a URL root, its local scratch folder
        self.store = Store(config.store_root)
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
        try:
            return json.loads(self.path(asset, partition).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def path(self, asset: str, partition: str | None) -> Path:
        name = "all" if partition is None else partition.replace("|", "-")
        return self.root / MARKERS / asset / f"{name}.json"

    # -- writing -------------------------------------------------------------------------
    def invalidate(self, asset: str, partition: str | None) -> None:
        """Before a partition is recomputed: until its new marker lands, it is stale."""
        self.path(asset, partition).unlink(missing_ok=True)
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
        with atomic_path(self.path(asset, partition)) as tmp:
            tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
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
        digest = self.config.sections_hash(*STAGES[asset].sections)
        if asset == "corpus":
            digest += "-" + _sources_listing(self.config)
        return digest

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


def _sources_listing(config: Config) -> str:
    """Size and modification time of every file the corpus reads, hashed: an edited source
    makes the corpus stale even though the config did not change."""
    import hashlib

    digest = hashlib.sha256()
    for source in config.corpus.sources:
        if source.kind == "builtin":
            continue
        root = Path(source.path).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue  # the corpus stage names a missing source
            digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
