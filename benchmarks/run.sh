#!/usr/bin/env bash
# Echo benchmark: Flask-Websockets against raw gevent-websocket, flask-sock and
# websockets, in one run, with the harness in ../shared/bench (each server
# pinned to core 0, the load generator to core 1; ratios to raw gevent-websocket
# measured in the same repetition). See benchmarks/README.md.
#
#   benchmarks/run.sh                         # the full run: 3 repetitions, ~25 min
#   benchmarks/run.sh --quick --scenarios e100 # a smoke run; extra arguments go to run.py
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH_DIR:-$HERE/../../shared/bench}
VENV=${BENCH_VENV:-/tmp/flask-websockets-bench-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q flask gevent gevent-websocket flask-sock simple-websocket websockets picows uvloop wsaccel
fi
"$VENV/bin/pip" list 2>/dev/null | grep -iE '^(flask|werkzeug|gevent|gevent-websocket|greenlet|flask-sock|websockets|picows|wsaccel) '
PY="$VENV/bin/python"
exec "$PY" "$BENCH/run.py" \
    --builtin raw_gevent,flask_sock_gevent,websockets_asyncio \
    --server "flask_websockets=$PY $HERE/echo_server.py --port {port} --pure-python" \
    --server "flask_websockets+wsaccel=$PY $HERE/echo_server.py --port {port}" \
    --baseline raw_gevent --path /ws \
    --scenarios e100,e10x64k,idle1k,idle10k,rate --reps 3 "$@"
