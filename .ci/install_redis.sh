#!/usr/bin/env bash
# Debian's redis-server, the broker of the celery test tier (tests/test_celery.py), which starts
# its own server on a free port (the package's system service is not used). Does nothing when it
# is installed; installing needs root (apt-get), as CI has.
set -euo pipefail
if command -v redis-server >/dev/null; then
  exit 0
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server
