#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian/Python 3.11 machine: the system libraries that headless
# Qt + OpenGL need (Xvfb, Mesa, xcb), then a virtualenv in .venv with the project installed
# editable. Re-running it is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
          libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0
          libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 libglib2.0-0
          dicom3tools)  # dciodvfy: the phantom tests validate our DICOM against the IODs
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing system packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# Reinstall only when the dependency list changed (stamp = hash of pyproject.toml).
stamp=".venv/.mammodino-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv (first run takes a few minutes)" >&2
  pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }  # this host's pip.conf is noisy
  pip install -q --upgrade pip
  pip install -q -e ".[samples,test]"
  echo "$want" > "$stamp"
fi
