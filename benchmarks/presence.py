"""Users and presence at scale: a room of 10,000 identified connections over two processes.

    python benchmarks/presence.py                      # 10,000 connections, 2 processes
    python benchmarks/presence.py --connections 2000 --module /tmp/other-checkout

Two ``serve()`` processes share a private redis-server. The script opens
``--connections`` raw websockets (half to each process), each identified as
its own user and a member of the room ``big``, and reports:

- ``presence("big")``: how long the call takes in a server process (the other
  process's share read from Redis, its own counted in memory), over 50 calls;
- propagation: a connection on one process joins a fresh room, and the script
  polls the other process's ``presence()`` of that room until it shows the
  user; 100 times;
- upkeep: each process's CPU over ``--idle`` seconds with nothing happening, with
  every connection open, and with none.

Needs flask, gevent, gevent-websocket and redis (benchmarks/run.sh's venv,
plus ``pip install redis``), and Debian's redis-server.
"""
import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from _common import cpu_seconds, free_port

HERE = os.path.dirname(os.path.abspath(__file__))

SERVER = """\
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
sys.path.insert(0, __MODULE__)
from flask import Flask, request
import flask_websockets
from flask_websockets import WebSockets, ws

app = Flask(__name__)
app.config.update(WEBSOCKETS_MESSAGE_QUEUE=__QUEUE__, WEBSOCKETS_PING_INTERVAL=None)
sockets = WebSockets(app, path="/ws")

@sockets.on_open
def who():
    ws.identify(request.args["user"])
    if "room" in request.args:
        ws.join(request.args["room"])

@sockets.on_message("^JOIN (.+)")
def join(message):
    ws.join(message[5:])

@app.get("/presence")
def presence():
    room = request.args.get("room")
    start = time.perf_counter()
    users = sockets.presence(room)
    took = time.perf_counter() - start
    return json.dumps({"users": len(users), "connections": sum(users.values()), "ms": took * 1000})

flask_websockets.serve(app, port=0, log=None)
"""

HANDSHAKE = (
    "GET /ws?user={user}&room={room} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


def websocket(port, user, room):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(HANDSHAKE.format(user=user, room=room).encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer[:100]
    return sock


def text_frame(message):
    payload = message.encode()
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # masked with a zero key


def presence(port, room):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/presence?room={room}", timeout=30) as response:
        return json.loads(response.read())


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured")
    parser.add_argument("--module", default=os.path.join(HERE, ".."))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    folder = tempfile.mkdtemp(prefix="presence-redis-")
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )
    servers, ports, sockets = [], [], []
    try:
        time.sleep(0.5)
        code = SERVER.replace("__MODULE__", repr(args.module)).replace("__QUEUE__", repr(f"redis://127.0.0.1:{redis_port}/0"))
        for _ in range(2):
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            servers.append(proc)
            ports.append(int(re.search(r":(\d+)/", proc.stdout.readline()).group(1)))
        time.sleep(1)
        idle_before = [cpu_seconds(p.pid) for p in servers]
        time.sleep(args.idle)
        idle_empty = [(cpu_seconds(p.pid) - b) / args.idle * 100 for p, b in zip(servers, idle_before)]
        start = time.monotonic()
        for i in range(args.connections):
            sockets.append(websocket(ports[i % 2], f"user{i}", "big"))
        opened = time.monotonic() - start
        while presence(ports[0], "big")["connections"] < args.connections:
            time.sleep(0.1)
        calls = [presence(ports[i % 2], "big") for i in range(50)]
        assert all(c["users"] == c["connections"] == args.connections for c in calls), calls[0]
        delays = []
        probe = websocket(ports[1], "probe", "probe-0")
        for k in range(100):
            room = f"probe-{k + 1}"
            sent = time.monotonic()
            probe.sendall(text_frame(f"JOIN {room}"))
            while presence(ports[0], room)["users"] < 1:
                pass
            delays.append(time.monotonic() - sent)
        idle_before = [cpu_seconds(p.pid) for p in servers]
        time.sleep(args.idle)
        idle_full = [(cpu_seconds(p.pid) - b) / args.idle * 100 for p, b in zip(servers, idle_before)]
        ms = [c["ms"] for c in calls]
        print(f"{args.connections:,} connections opened in {opened:.1f} s, each its own user, all in room 'big'")
        p50, p99 = percentile(ms, 0.5), percentile(ms, 0.99)
        print(f"presence('big') in a server: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(ms):.1f} ms")
        print(
            "propagation of a join to the other process (seen by its presence()):"
            f" p50 {percentile(delays, 0.5) * 1000:.1f} ms,"
            f" p99 {percentile(delays, 0.99) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms"
        )
        show = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
        print(f"idle CPU per process, % of a core: no connections {show(idle_empty)}; all open {show(idle_full)}")
    finally:
        for sock in sockets:
            sock.close()
        for proc in [*servers, redis]:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
