#!/usr/bin/env bash
# Debian's Chromium and its driver, for the browser test tier (tests/test_ui_browser.py).
# Selenium is pointed at /usr/bin/chromedriver, so no browser is ever downloaded. Does
# nothing when both are installed; installing needs root (apt-get), as CI has.
set -euo pipefail
if command -v chromium >/dev/null && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
