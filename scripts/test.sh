#!/usr/bin/env bash
# Runs the test suite after set-up. Inside a private network namespace when we can make
# one (root + unshare), which also proves the tests need no network; ROS 2 stays on
# loopback with its own domain id either way.
#
#   scripts/test.sh [pytest args...]      e.g. scripts/test.sh -k ros
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

export HF_HUB_OFFLINE=1 MUJOCO_GL="${MUJOCO_GL:-egl}" PYTHONUNBUFFERED=1
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 101 ))}"
export FASTDDS_DEFAULT_PROFILES_FILE="$PWD/real/config/fastdds_loopback.xml"

cmd=(.venv/bin/python -m pytest "$@")
if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
  echo "[test] running in a private network namespace (loopback only), ROS_DOMAIN_ID=$ROS_DOMAIN_ID" >&2
  exec unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh "${cmd[@]}"
fi
echo "[test] no private network namespace available; ROS 2 limited to localhost, ROS_DOMAIN_ID=$ROS_DOMAIN_ID" >&2
exec "${cmd[@]}"
