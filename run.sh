#!/usr/bin/env bash
# Set-up and entry points. On a fresh machine each command installs what it needs first:
#   bash run.sh demo    the main job: an OpenAI-Five-like policy through five surgeries
#   bash run.sh map     map that policy and print its interaction table
#   bash run.sh test    the whole test suite (what CI runs)
#   bash run.sh bench   the benchmarks
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    # torch first and pinned, so that nothing below can resolve a CUDA build of it.
    if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
        $PY -m pip install -q -c constraints.txt torch==2.13.0
    fi
    if ! $PY -c "import hypothesis, pytest, sympy, tabulate, transformers, scipy, expecttest" 2>/dev/null; then
        $PY -m pip install -q -c constraints.txt -e ".[test]"
    fi
    # The installed fxsurgery (and its command) must be this checkout's.
    here=$(pwd -P)
    if [ "$(cd / && $PY -c 'import fxsurgery, os; print(os.path.dirname(os.path.dirname(os.path.realpath(fxsurgery.__file__))))' 2>/dev/null)" != "$here" ]; then
        $PY -m pip install -q --no-deps -e .
    fi
}

case "${1:-test}" in
    demo)  setup
           # matplotlib is for the examples only: the package does not depend on it.
           $PY -c "import matplotlib" 2>/dev/null || $PY -m pip install -q matplotlib
           $PY examples/five_surgery.py ;;
    map)   setup; $PY examples/map_five.py ;;
    test)  setup; $PY -m pytest -q -p no:cacheprovider ;;
    bench) setup; $PY benchmarks/bench_map.py ;;
    *) echo "usage: bash run.sh demo|test|map|bench" >&2; exit 2 ;;
esac
