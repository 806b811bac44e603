#!/usr/bin/env bash
# The main job: set up (idempotent), then run the whole pipeline on the default task.
#   scripts/demo.sh [--quick] [--fresh] [--stage NAME] [--out DIR]   (report: outputs/demo/report)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}"
exec .venv/bin/robopolicy demo "$@"
