#!/usr/bin/env bash
# Set up (idempotent), then open napari on the real CBIS-DDSM exam in the hanging protocol.
#   bash scripts/demo.sh                      # a napari window
#   bash scripts/demo.sh --headless [PNG]     # render the same view to PNG (default out/hanging_protocol.png)
# MAMMODINO_HEADLESS=1 does the same as --headless; without a display, headless is implied.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=("$@")
if [ "${MAMMODINO_HEADLESS:-0}" = 1 ] && [[ " ${args[*]-} " != *" --headless"* ]]; then args+=(--headless); fi
if [ -z "${DISPLAY:-}" ] && [[ " ${args[*]-} " != *" --headless"* ]]; then
  echo "demo: no display found; rendering headless instead" >&2
  args+=(--headless)
fi
if [[ " ${args[*]-} " == *" --headless"* ]]; then
  # napari draws through OpenGL: a virtual X screen with Mesa stands in for a monitor.
  exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m napari_mammodino.demo "${args[@]}"
fi
exec .venv/bin/python -m napari_mammodino.demo "${args[@]}"
