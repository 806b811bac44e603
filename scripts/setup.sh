#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages, a Python 3.12 venv in .venv,
# and every pip package the project needs (pinned in pyproject.toml). Quick when done:
# a stamp keyed on pyproject.toml's hash skips pip, dpkg-query skips apt.
#
#   scripts/setup.sh            # then: .venv/bin/robopolicy ...
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --- Debian packages ----------------------------------------------------------------------
# EGL + Mesa for headless MuJoCo rendering (MUJOCO_GL=egl), OSMesa as the fallback
# (MUJOCO_GL=osmesa), iproute2/util-linux for the private network namespace the tests use.
DEBS=(libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libosmesa6 libglib2.0-0 iproute2 util-linux)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python 3.12 --------------------------------------------------------------------------
# lerobot 0.6 needs Python >= 3.12 (and ROS 2 Kilted on Ubuntu 24.04 runs 3.12 too).
find_python() {
  # A candidate counts only if it runs and is 3.12 (pyenv shims exist for versions not selected).
  for c in "${ROBOPOLICY_PYTHON:-}" "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 \
      && { command -v "$c"; return; }
  done
  return 1
}
if [ ! -x .venv/bin/python ]; then
  PY=$(find_python) || { echo "setup: Python 3.12 not found (set ROBOPOLICY_PYTHON=/path/to/python3.12)" >&2; exit 1; }
  log "creating .venv with $PY"
  "$PY" -m venv .venv
fi

# --- pip packages -------------------------------------------------------------------------
stamp=.venv/.robopolicy-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages into .venv (first run: several GB, ~10 minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
