#!/usr/bin/env bash
# Autobahn cases 9.1.6 and 9.2.6 (one 16 MiB message, text then binary, echoed)
# against ours (echo_server.py, our handler, 16 MiB limit, as autobahn.sh
# --handler runs it), the `websockets` library and picows, taking turns, so
# that each round compares the three on the same machine at the same moment.
# wstest's time for these cases is mostly its own (Python 2.7: it builds and
# masks the whole frame before sending a byte, then validates the echo's
# UTF-8), so only a figure beside the others in the same run says anything;
# large_echo.py measures the servers' own part.
#
#   benchmarks/autobahn_large.sh            # 7 rounds
#   benchmarks/autobahn_large.sh 3 /tmp/ab-large
#
# Uses ../shared/autobahn (its setup script builds /tmp/ab27-venv and
# /tmp/srv-venv once per machine) and installs picows and uvloop into
# /tmp/srv-venv. Prints one line per server and round, then the medians.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
AB=${AUTOBAHN_DIR:-$HERE/../../shared/autobahn}
SERVERS=${BENCH_SERVERS:-$HERE/../../shared/bench/servers}
ROUNDS=${1:-7}
OUT=${2:-/tmp/autobahn-large}
V=/tmp/srv-venv/bin/python
bash "$AB/setup_envs.sh" > /tmp/flask-websockets-autobahn-setup.log 2>&1 \
    || { cat /tmp/flask-websockets-autobahn-setup.log; exit 1; }
$V -c "import picows, uvloop" 2>/dev/null || /tmp/srv-venv/bin/pip install -q picows uvloop
rm -rf "$OUT"
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
    for server in ours websockets picows; do
        case $server in
            ours) path=/ws; cmd=($V "$HERE/echo_server.py" --port '{port}' --max-message-size 16777216 --handler flask_websockets) ;;
            websockets) path=/; cmd=($V "$SERVERS/websockets_asyncio.py" --port '{port}') ;;
            picows) path=/; cmd=($V "$SERVERS/picows_server.py" --port '{port}') ;;
        esac
        "$AB/run_autobahn.py" --name "$server" --port "${PORT:-19320}" --path "$path" --cases '9.1.6,9.2.6' \
            --outdir "$OUT/$round" -- "${cmd[@]}" > "$OUT/$round-$server.log" 2>&1 \
            || { cat "$OUT/$round-$server.log"; exit 1; }
    done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
times = {}
for r in range(1, rounds + 1):
    for server in ("ours", "websockets", "picows"):
        perf = json.load(open(f"{out}/{r}/{server}/summary.json"))["results"][server]["perf"]
        line = []
        for case in ("9.1.6", "9.2.6"):
            result = perf[case]
            times.setdefault((server, case), []).append(result["duration"])
            line.append(f"{case} {result['duration']} ms ({result['behavior']})")
        print(f"round {r} {server:10} " + ", ".join(line))
for (server, case), ms in sorted(times.items()):
    print(f"{server:10} {case}: median {statistics.median(ms)} ms, min {min(ms)}, max {max(ms)}")
PY
