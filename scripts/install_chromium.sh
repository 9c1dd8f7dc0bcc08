#!/usr/bin/env bash
# Install Debian's Chromium for the Prefect UI browser test (tests/test_prefect_ui.py), if missing.
#
# Idempotent: does nothing when a Chromium binary is already there. Never fails the caller
# (`make test`): when it cannot install, it says why and the browser test skips with that reason.
# Override the binary with GEOSEG_CHROMIUM=/path/to/chromium.
set -u

CHROMIUM="${GEOSEG_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ -n "${GEOSEG_CHROMIUM:-}" ]; then
    echo "install_chromium: GEOSEG_CHROMIUM=$CHROMIUM is not an executable file; not installing anything." >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium: $CHROMIUM is missing and we are not root; run 'sudo apt-get install chromium'" \
         "(the browser test skips until then)." >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: $CHROMIUM is missing and apt-get is not available; install Chromium with" \
         "your package manager and set GEOSEG_CHROMIUM (the browser test skips until then)." >&2
    exit 0
fi

echo "install_chromium: installing Debian's chromium (apt-get) ..."
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
if apt-get update -qq >"$log" 2>&1 && apt-get install -y -qq chromium >>"$log" 2>&1; then
    echo "install_chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
else
    tail -n 5 "$log" >&2
    echo "install_chromium: apt-get could not install chromium (offline or no such package);" \
         "the browser test skips until it is installed." >&2
fi
rm -f "$log"
exit 0
