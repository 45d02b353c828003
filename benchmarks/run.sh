#!/usr/bin/env bash
# Echo benchmark: Flask-Websockets, in pure Python and with the speedups extra,
# against the websockets library, raw gevent-websocket, flask-sock and picows,
# in one run, with the harness in ../shared/bench (each server pinned to core
# 0, the load generator to core 1; ratios to websockets measured in the same
# repetition). See benchmarks/README.md.
#
#   benchmarks/run.sh                              # the full run: 3 repetitions, ~12 min
#   benchmarks/run.sh --quick --scenarios e100     # a smoke run; extra arguments go to run.py
#   BEFORE=/tmp/fw-old benchmarks/run.sh           # and another checkout's module, as "before"
#
# (git worktree add --detach /tmp/fw-old <commit> makes such a checkout; it is
# served in pure Python, as releases before the speedups extra were.)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH_DIR:-$HERE/../../shared/bench}
VENV=${BENCH_VENV:-/tmp/flask-websockets-bench-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q flask gevent gevent-websocket flask-sock simple-websocket websockets picows uvloop
fi
"$VENV/bin/pip" list 2>/dev/null | grep -iE '^(flask|werkzeug|gevent|gevent-websocket|greenlet|flask-sock|websockets|picows) '
PY="$VENV/bin/python"
SERVERS=(
    --server "flask_websockets=$PY $HERE/echo_server.py --port {port} --handler flask_websockets --pure-python"
    --server "flask_websockets+speedups=$PY $HERE/echo_server.py --port {port} --handler flask_websockets"
)
if [ -n "${BEFORE:-}" ]; then
    SERVERS+=(--server "before=$PY $BEFORE/benchmarks/echo_server.py --port {port} --handler flask_websockets --pure-python")
fi
exec "$PY" "$BENCH/run.py" \
    --builtin raw_gevent,flask_sock_gevent,websockets_asyncio,picows_server \
    "${SERVERS[@]}" \
    --baseline websockets_asyncio --path /ws \
    --scenarios e100,e10x64k,idle1k,rate --reps 3 "$@"
