#!/usr/bin/env bash
# Create .venv with everything prefq and its tests need, from this repository's own files. Re-runnable.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel on this machine's disk.
"${pip[@]}" torch==2.13.0
# DeepSpeed's setup.py imports torch, so it builds against the torch above (no isolated build env).
"${pip[@]}" --no-build-isolation deepspeed==0.19.8
"${pip[@]}" -e '.[train,deepspeed,dev]'
# The dashboard's browser tests drive Debian's chromium (Playwright's own browser download cannot work offline).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; else echo "setup: chromium missing; run: sudo apt-get install -y chromium" >&2; fi
fi
