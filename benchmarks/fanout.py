"""Fan-out through Redis: Flask-Websockets' message queue beside Flask-SocketIO's, in one run.

    python benchmarks/fanout.py                      # the three stacks, 2 processes x 500 clients
    python benchmarks/fanout.py --stacks ours-redis --messages 1000

Each stack serves clients that receive every message a publisher sends from a
third process, and the script reports, per stack: delivered messages per
second (deliveries, not publishes: a message to 1,000 clients is 1,000), the
publish-to-receive latency (p50/p99), and the servers' CPU per delivered
message.

- ours-redis: Flask-Websockets, two ``serve()`` processes with
  ``WEBSOCKETS_MESSAGE_QUEUE``; the publisher is ``flask_websockets.Publisher``.
- ours-local: the same app in one process, no queue, all the clients; the
  publisher sends each message over a websocket, and a handler broadcasts it.
- socketio-redis: Flask-SocketIO on gevent (gevent-websocket), two processes
  with ``message_queue``; the publisher is ``SocketIO(message_queue=...)``, and
  the clients speak Engine.IO 4 / Socket.IO 5 over a websocket.

With ``--rooms 1,1000,10000`` it measures instead how the queue's cost grows
with the rooms a process serves (Flask-Websockets only, ``--module`` for
another checkout): the clients join rooms of ``--room-size`` members each
(every room the same size, so every message makes as many deliveries), spread
over the two server processes, and a publisher sends ``--rate`` messages a
second for ``--seconds`` to random rooms. Reported per room count: server CPU
per delivery, publish-to-receive p50/p99, and the servers' idle CPU (percent
of a core, per process) with those rooms joined and nothing sent.

With ``--pin``, the servers and Redis run on core 0 and the clients and the
publisher on core 1, as ``../shared/bench`` does: without it they share both
cores, and the one client process bounds the fastest stack.

The publisher sends ``--messages`` messages of 100 bytes as fast as it can,
each with its send time; the clients, picows and uvloop in one process,
record when each arrives. A private redis-server is
started for the run. Needs: flask, gevent, gevent-websocket, redis,
flask-socketio, picows, uvloop, websockets (benchmarks/run.sh's venv, plus
``pip install flask-socketio redis``).
"""
import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from _common import cpu_seconds, free_port

HERE = os.path.dirname(os.path.abspath(__file__))

OURS = """\
import sys
sys.path.insert(0, __MODULE__)
from gevent import monkey
monkey.patch_all()
from flask import Flask
import flask_websockets
app = Flask(__name__)
app.config["WEBSOCKETS_MESSAGE_QUEUE"] = __QUEUE__
sockets = flask_websockets.WebSockets(app, path="/ws")

@sockets.on_message("^PUBLISH ")
def publish(message):
    sockets.broadcast(message[8:])

@sockets.on_message("^JOINS ")
def joins(message):
    for room in message[6:].split(","):
        flask_websockets.ws.join(room)
    return f"joined {len(flask_websockets.ws.rooms)}"

flask_websockets.serve(app, port=0, log=None)
"""

SOCKETIO = """\
from gevent import monkey
monkey.patch_all()
from flask import Flask
from flask_socketio import SocketIO
app = Flask(__name__)
socketio = SocketIO(app, async_mode="gevent", message_queue=__QUEUE__, logger=False, engineio_logger=False)
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
print(f" * Serving on http://127.0.0.1:{port}/", flush=True)
socketio.run(app, host="127.0.0.1", port=port, log_output=False)
"""




class Redis:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fanout-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


#: With --pin: the servers and Redis on one core, the clients and the publisher on the other.
SERVERS_CORE, CLIENTS_CORE = 0, 1
PINNING = False


def pin(proc, core):
    if PINNING:
        os.sched_setaffinity(proc.pid, {core})
    return proc


def start_servers(source, count, queue, module):
    procs, ports = [], []
    for _ in range(count):
        code = source.replace("__MODULE__", repr(module)).replace("__QUEUE__", repr(queue))
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        pin(proc, SERVERS_CORE)
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        procs.append(proc)
        ports.append(port)
    return procs, ports


# -- the clients -----------------------------------------------------------------
#
# picows and uvloop, one process: a message costs the clients about a
# microsecond, so that the servers, not the clients, set the pace.


def make_listener(protocol, count, state):
    from picows import WSListener, WSMsgType

    class Client(WSListener):
        def on_ws_connected(self, transport):
            self.transport, self.got = transport, 0
            if protocol == "raw":
                state["ready"] += 1

        def on_ws_frame(self, transport, frame):
            if frame.msg_type is not WSMsgType.TEXT:
                return
            text = frame.get_payload_as_ascii_text()
            if protocol == "socketio":
                if text == "2":  # Engine.IO ping
                    transport.send(WSMsgType.TEXT, b"3")
                    return
                if text.startswith("0"):  # Engine.IO open: connect to the default namespace
                    transport.send(WSMsgType.TEXT, b"40")
                    return
                if text.startswith("40"):
                    state["ready"] += 1
                    return
                if not text.startswith('42["news","'):
                    return
                text = text[len('42["news","') :]
            state["latencies"].append(time.time() - float(text.split(" ", 2)[1]))
            self.got += 1
            if self.got == count:
                state["complete"] += 1

    return Client


async def clients_main(urls, protocol, count, timeout):
    from picows import ws_connect

    state = {"ready": 0, "complete": 0, "latencies": []}
    listener = make_listener(protocol, count, state)
    for i in range(0, len(urls), 100):  # at most 100 handshakes at a time
        await asyncio.gather(*(ws_connect(listener, url, enable_auto_ping=False) for url in urls[i : i + 100]))
    while state["ready"] < len(urls):
        await asyncio.sleep(0.05)
    print("READY", flush=True)
    deadline = time.monotonic() + timeout
    while state["complete"] < len(urls) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    print(json.dumps({"latencies": state["latencies"], "complete": state["complete"]}))


def run_clients(urls, protocol, count, timeout):
    code = (
        "import asyncio, json, sys, uvloop; sys.path.insert(0, %r); import fanout; "
        "uvloop.run(fanout.clients_main(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))"
        % HERE
    )
    args = [sys.executable, "-c", code, json.dumps(urls), protocol, str(count), str(timeout)]
    return pin(subprocess.Popen(args, stdout=subprocess.PIPE, text=True), CLIENTS_CORE)


# -- the publishers ----------------------------------------------------------------


def publish(stack, queue, ports, count, module):
    padding = "x" * 70
    if stack == "ours-redis":
        code = (
            f"import sys, time; sys.path.insert(0, {module!r}); from flask_websockets import Publisher\n"
            f"p = Publisher({queue!r}, endpoint='websocket')\n"
            f"for i in range({count}): p.broadcast(f'{{i}} {{time.time():.6f}} {padding}')\n"
        )
    elif stack == "socketio-redis":
        code = (
            "import time; from flask_socketio import SocketIO\n"
            f"s = SocketIO(message_queue={queue!r})\n"
            f"for i in range({count}): s.emit('news', f'{{i}} {{time.time():.6f}} {padding}')\n"
        )
    else:  # ours-local: over a websocket, to a handler that broadcasts
        code = (
            "import asyncio, time, websockets\n"
            "async def main():\n"
            f"    async with websockets.connect('ws://127.0.0.1:{ports[0]}/ws', compression=None) as ws:\n"
            f"        for i in range({count}):\n"
            f"            await ws.send(f'PUBLISH {{i}} {{time.time():.6f}} {padding}')\n"
            "        await asyncio.sleep(30)\n"
            "asyncio.run(main())\n"
        )
    return pin(subprocess.Popen([sys.executable, "-c", code]), CLIENTS_CORE)


def measure(stack, args, redis):
    processes = 1 if stack == "ours-local" else 2
    source = SOCKETIO if stack == "socketio-redis" else OURS
    queue = None if stack == "ours-local" else redis.url
    servers, ports = start_servers(source, processes, queue, args.module)
    clients = publisher = None
    try:
        per_server = args.clients // processes
        if stack == "socketio-redis":
            path = "/socket.io/?EIO=4&transport=websocket"
            urls = [f"ws://127.0.0.1:{p}{path}" for p in ports for _ in range(per_server)]
        else:
            urls = [f"ws://127.0.0.1:{p}/ws" for p in ports for _ in range(per_server)]
        clients = run_clients(urls, "socketio" if stack == "socketio-redis" else "raw", args.messages, args.timeout)
        assert clients.stdout.readline().strip() == "READY"
        time.sleep(0.5)
        cpu_before = sum(cpu_seconds(p.pid) for p in servers)
        start = time.time()
        publisher = publish(stack, redis.url, ports, args.messages, args.module)
        result = json.loads(clients.stdout.readline())
        cpu = sum(cpu_seconds(p.pid) for p in servers) - cpu_before
        latencies = sorted(result["latencies"])
        delivered = len(latencies)
        last = start + max(latencies) if latencies else time.time()  # roughly, when the last one arrived
        elapsed = max(last - start, 1e-6)
        p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
        return {
            "stack": stack,
            "clients": len(urls),
            "delivered": delivered,
            "expected": len(urls) * args.messages,
            "msgs_per_s": delivered / elapsed,
            "p50_ms": p(0.5),
            "p99_ms": p(0.99),
            "cpu_us_per_delivery": cpu / max(delivered, 1) * 1e6,
        }
    finally:
        for proc in [publisher, clients, *servers]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


# -- rooms: the queue's cost against the number of rooms -----------------------------


async def rooms_clients_main(urls, rooms):
    """Clients that join their rooms, then record each message's latency until the parent says stop."""
    from picows import WSListener, WSMsgType, ws_connect

    state = {"ready": 0, "latencies": []}

    class Client(WSListener):
        def __init__(self, joins):
            self.joins = joins

        def on_ws_connected(self, transport):
            if self.joins:
                transport.send(WSMsgType.TEXT, ("JOINS " + ",".join(self.joins)).encode())
            else:
                state["ready"] += 1

        def on_ws_frame(self, transport, frame):
            text = frame.get_payload_as_ascii_text()
            if text.startswith("joined"):
                state["ready"] += 1
            else:
                state["latencies"].append(time.time() - float(text.split(" ", 2)[1]))

    for i in range(0, len(urls), 100):
        batch = range(i, min(i + 100, len(urls)))
        connecting = [ws_connect(lambda j=j: Client(rooms[j]), urls[j], enable_auto_ping=False) for j in batch]
        await asyncio.gather(*connecting)
    while state["ready"] < len(urls):
        await asyncio.sleep(0.05)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the parent says when
    print(json.dumps({"latencies": state["latencies"]}), flush=True)


def measure_rooms(count, args, redis):
    """Clients in ``count`` rooms of ``--room-size`` members over two processes; a publisher to random rooms."""
    servers, ports = start_servers(OURS, 2, redis.url, args.module)
    clients = publisher = None
    try:
        urls = [f"ws://127.0.0.1:{p}/ws" for p in ports for _ in range(args.clients // 2)]
        rooms = [[] for _ in urls]
        for r in range(count):  # room r: members r*size .. r*size+size-1, round the clients
            for k in range(args.room_size):
                rooms[(r * args.room_size + k) % len(urls)].append(f"room {r}")
        plan = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # too long for argv
        with plan:
            json.dump([urls, rooms], plan)
        code = (
            "import json, sys, uvloop; sys.path.insert(0, %r); import fanout; "
            "uvloop.run(fanout.rooms_clients_main(*json.load(open(sys.argv[1]))))" % HERE
        )
        clients = subprocess.Popen(
            [sys.executable, "-c", code, plan.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        pin(clients, CLIENTS_CORE)
        assert clients.stdout.readline().strip() == "READY"
        time.sleep(2)  # the joins settle
        idle_before = [cpu_seconds(p.pid) for p in servers]
        time.sleep(args.idle_seconds)
        idle = [(cpu_seconds(p.pid) - b) / args.idle_seconds * 100 for p, b in zip(servers, idle_before)]
        total = int(args.rate * args.seconds)
        code = (
            f"import random, sys, time; sys.path.insert(0, {args.module!r}); from flask_websockets import Publisher\n"
            f"p, rng, pad = Publisher({redis.url!r}), random.Random(1), 'x' * 70\n"
            "start = time.time()\n"
            f"for i in range({total}):\n"
            f"    time.sleep(max(0, start + i / {args.rate} - time.time()))\n"
            f"    p.broadcast(f'{{i}} {{time.time():.6f}} {{pad}}', room=f'room {{rng.randrange({count})}}')\n"
        )
        cpu_before = sum(cpu_seconds(p.pid) for p in servers)
        publisher = pin(subprocess.Popen([sys.executable, "-c", code]), CLIENTS_CORE)
        publisher.wait(args.seconds * 3 + 60)
        time.sleep(3)  # the last ones arrive
        cpu = sum(cpu_seconds(p.pid) for p in servers) - cpu_before
        clients.stdin.write("\n")
        clients.stdin.flush()
        latencies = sorted(json.loads(clients.stdout.readline())["latencies"])

        def p(q):
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

        return {
            "rooms": count,
            "per_client": len(rooms[0]),
            "delivered": len(latencies),
            "expected": total * args.room_size,
            "p50_ms": p(0.5),
            "p99_ms": p(0.99),
            "cpu_us_per_delivery": cpu / max(len(latencies), 1) * 1e6,
            "idle_cpu_percent": sum(idle) / len(idle),
        }
    finally:
        for proc in [publisher, clients, *servers]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def main_rooms(args, redis):
    print(
        "| rooms | rooms per client | delivered | p50 ms | p99 ms | server CPU µs/delivery | idle CPU % per process |"
    )
    print("|---|---|---|---|---|---|---|")
    for _ in range(args.reps):
        for count in [int(c) for c in args.rooms.split(",")]:
            r = measure_rooms(count, args, redis)
            print(
                f"| {r['rooms']:,} | {r['per_client']} | {r['delivered']:,} of {r['expected']:,} | {r['p50_ms']:.1f}"
                f" | {r['p99_ms']:.1f} | {r['cpu_us_per_delivery']:.1f} | {r['idle_cpu_percent']:.2f} |",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", default="ours-redis,ours-local,socketio-redis")
    parser.add_argument("--clients", type=int, default=1000, help="in all: split over the processes")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--module", default=os.path.join(HERE, ".."), help="the checkout whose module to serve")
    parser.add_argument("--rooms", help="room counts, e.g. 1,1000,10000: the rooms benchmark instead")
    parser.add_argument("--room-size", type=int, default=100, help="members per room, for --rooms")
    parser.add_argument("--rate", type=float, default=100, help="messages a second, for --rooms")
    parser.add_argument("--seconds", type=float, default=10, help="of publishing, for --rooms")
    parser.add_argument("--idle-seconds", type=float, default=10, help="of idle CPU measured, for --rooms")
    parser.add_argument("--pin", action="store_true", help="servers and Redis on core 0, clients and publisher on 1")
    args = parser.parse_args()
    global PINNING
    PINNING = args.pin
    redis = Redis()
    pin(redis.proc, SERVERS_CORE)
    if args.rooms:
        try:
            main_rooms(args, redis)
        finally:
            redis.stop()
        return
    try:
        print("| stack | clients | delivered | msgs/s | p50 ms | p99 ms | server CPU µs/delivery |")
        print("|---|---|---|---|---|---|---|")
        for _ in range(args.reps):
            for stack in args.stacks.split(","):
                r = measure(stack, args, redis)
                delivered = f"{r['delivered']:,} of {r['expected']:,}"
                print(
                    f"| {r['stack']} | {r['clients']} | {delivered} | {r['msgs_per_s']:,.0f}"
                    f" | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_us_per_delivery']:.1f} |",
                    flush=True,
                )
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
