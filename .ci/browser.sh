#!/usr/bin/env bash
# The browser the UI test drives (tests/test_deploy.py): Debian's chromium, run headless by Playwright (a dev extra,
# whose bundled driver needs no download). Nothing to do if it is there already.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
sudo=()
if [[ $(id -u) != 0 ]]; then sudo=(sudo); fi
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
/usr/bin/chromium --version
