#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite headless (napari on a virtual X screen).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k reader`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest tests "$@"
