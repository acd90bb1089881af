#!/usr/bin/env bash
# Make sure Debian's chromium is at /usr/bin/chromium for the browser test (tests/test_page.py).
# Idempotent: does nothing when it is already there. We use the distribution's package, not
# `playwright install`, because the latter downloads a browser from a CDN that CI cannot reach.
# fonts-dejavu-core: without any font installed, pages render as empty boxes.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi

how_to() {
    echo "chromium is missing ($CHROMIUM); the browser test needs it." >&2
    echo "Install it as root on Debian/Ubuntu:  apt-get update && apt-get install -y chromium" >&2
    echo "(on another system, install Chromium so that $CHROMIUM exists)" >&2
}

if ! command -v apt-get >/dev/null 2>&1; then
    echo "no apt-get on this machine." >&2
    how_to
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)  # passwordless sudo only: a password prompt would hang `make test`
else
    echo "not root, and no passwordless sudo." >&2
    how_to
    exit 1
fi

echo "installing Debian's chromium for the browser test..." >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

if [ ! -x "$CHROMIUM" ]; then
    echo "apt-get installed chromium, but $CHROMIUM is still missing." >&2
    how_to
    exit 1
fi
echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")" >&2
