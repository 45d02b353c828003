#!/usr/bin/env bash
# Instructions per unit, with callgrind (they do not move between runs, unlike
# wall-clock figures): a 32-byte echo, a 64 KiB echo, a connection (handshake,
# one echo, close), each as the difference of two runs (2000/1000, 200/100,
# 300/100 iterations: what start-up costs cancels out); then the Python bytes
# allocated per idle connection (tracemalloc). PYTHONHASHSEED=0: hash seeds
# move the counts by about 1 %.
#
#   benchmarks/callgrind.sh [MODULE_DIR] [--pure-python]   # MODULE_DIR: another checkout (default: this one)
#
# Needs valgrind (apt-get install valgrind). Takes about 4 minutes.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODULE=${1:-$HERE/..}
shift || true
EXTRA=("$@")  # --pure-python
export PYTHONHASHSEED=0
PY=$(python -c 'import sys; print(sys.executable)')  # the interpreter itself, not a shim valgrind would trace
instructions() {  # case, iterations
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$PY" "$HERE/connection_cost.py" \
        --module "$MODULE" --only "$1" -n "$2" "${EXTRA[@]}" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
for spec in "echo_32 2000 1000" "echo_64k 200 100" "connection 300 100"; do
    set -- $spec
    more=$(instructions "$1" "$2"); less=$(instructions "$1" "$3")
    echo "$1: $(( (more - less) / ($2 - $3) )) instructions each"
done
"$PY" "$HERE/connection_cost.py" --module "$MODULE" --only idle_memory "${EXTRA[@]}"
