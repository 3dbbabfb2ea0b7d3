"""The explorer on a described store, for the API and browser tests: a copy of the
`described_run` store with its description embeddings (and search index) made, and
uvicorn serving `create_app` on a free port in a thread of the test process."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from neuron_assets.cli import main


def searchable_copy(described_run: Path, folder: Path) -> Path:
    """A copy of the described run's store and config, with description_embeddings made; its config path."""
    raw = yaml.safe_load(Path(described_run).read_text())
    shutil.copytree(Path(raw["storage"]["root"]), folder / "home")
    raw["storage"]["root"] = str(folder / "home")
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path), "run", "--select", "description_embeddings"]) == 0
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_explorer(config_path: Path):
    """Yields (base URL, app) of the explorer served by uvicorn on 127.0.0.1."""
    import uvicorn

    from neuron_assets.config import load_config
    from neuron_assets.serve.app import create_app

    app = create_app(load_config(str(config_path)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
