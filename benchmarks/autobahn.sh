#!/usr/bin/env bash
# RFC 6455 / RFC 7692 conformance: the Autobahn TestSuite fuzzingclient
# against benchmarks/echo_server.py, with the harness in ../shared/autobahn
# (wstest is Python 2.7; its setup script builds /tmp/ab27-venv and
# /tmp/srv-venv once per machine). Prints the summary table; reports go to
# /tmp/autobahn-reports/NAME/ (NAME below).
#
#   benchmarks/autobahn.sh                  # cases 1-10, gevent-websocket's handler, about 40 s
#   benchmarks/autobahn.sh --cases '7.*'    # extra arguments go to run_autobahn.py
#   benchmarks/autobahn.sh --handler        # 1-10 with our own handler (flask_websockets.WebSocketHandler)
#   benchmarks/autobahn.sh --compression    # 1-10 with permessage-deflate on (implies our handler)
#   benchmarks/autobahn.sh --compression --cases '12.*,13.*' --exclude '' --timeout 3600
#                                           # the 216 compression cases, 15-30 minutes
#
# The first of --handler / --compression must come before the arguments for
# run_autobahn.py. With --compression every reply is compressed, however small
# (WEBSOCKETS_COMPRESSION_MIN_SIZE = 0), so that the cases exercise the server's
# compressor as well as its decompressor.
#
# The message size limit is raised to 16 MiB: cases 9.1.6 and 9.2.6 send
# 16 MiB messages. With the default 1 MiB, the 9.* cases over 1 MiB end with
# a 1009 close, which is what the limit is for, and Autobahn reports them FAILED.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
AB=${AUTOBAHN_DIR:-$HERE/../../shared/autobahn}
NAME=flask-websockets
SERVER_ARGS=()
case "${1:-}" in
    --handler) shift; NAME=flask-websockets-handler; SERVER_ARGS=(--handler flask_websockets) ;;
    --compression) shift; NAME=flask-websockets-deflate; SERVER_ARGS=(--compression --compression-min-size 0) ;;
esac
bash "$AB/setup_envs.sh" > /tmp/flask-websockets-autobahn-setup.log 2>&1 \
    || { cat /tmp/flask-websockets-autobahn-setup.log; exit 1; }
exec "$AB/run_autobahn.py" --name "$NAME" --port "${PORT:-19310}" --path /ws "$@" -- \
    /tmp/srv-venv/bin/python "$HERE/echo_server.py" --port '{port}' --max-message-size 16777216 "${SERVER_ARGS[@]}"
