#!/bin/sh
# Install Debian's headless-capable Chromium and its chromedriver when missing (the chat page test
# drives them through selenium; no browser is downloaded by any test tool).
# Idempotent, quiet and non-interactive.
#   .ci/install-chromium.sh
set -eu
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]
