"""Broadcast to N clients: the server's CPU per delivery, Flask-Websockets beside the `websockets` library.

    python benchmarks/broadcast.py                                # 100, 1,000, 5,000 clients, 3 repetitions
    python benchmarks/broadcast.py --clients 5000 --reps 1 --servers ours
    python benchmarks/broadcast.py --module /tmp/fw-base --label 442102b   # another checkout's module

N clients connect to one server; then one of them (itself a receiver too)
sends "burst M SIZE", and the server's handler broadcasts M messages of SIZE
bytes of text to every connection in a tight loop. The script reports, per
server and N: the server's CPU time from just before the trigger until every
client has received all M messages, divided by the deliveries (M x N), the
deliveries per second of wall time, and a check that every client got all M,
in order.

- ours: Flask-Websockets (``--module DIR``, default this checkout) on gevent's
  pywsgi with its own ``WebSocketHandler``, as ``echo_server.py`` serves it;
  a catch-all ``@sockets.on_message`` calls ``sockets.broadcast(payload)`` M
  times.
- websockets: the ``websockets`` library's asyncio server on the default
  asyncio loop, as ``../shared/bench/servers/websockets_asyncio.py`` runs it;
  the handler keeps a set of connections and calls
  ``websockets.asyncio.server.broadcast(connections, payload)`` M times.
- raw_gevent: gevent-websocket with a plain WSGI app, no framework: a set of
  ``environ["wsgi.websocket"]`` and ``ws.send(payload)`` to each in a loop.

Each server runs in its own process pinned to core 0, started afresh for every
repetition (``--reps``; the summary is the median), and the clients, picows and
uvloop in one process, on core 1, as ``../shared/bench`` does. Nobody offers
permessage-deflate. The server's CPU time is read from
``/proc/PID/task/*/schedstat`` (nanoseconds on the CPU, user and system):
``/proc/PID/stat`` counts in 10 ms ticks, too coarse for a burst to 100
clients; the per-run lines show both.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # _common, beside this script
from _common import cpu_seconds, free_port, wait_listening  # noqa: E402

SERVER_CORE, CLIENT_CORE = 0, 1
CONNECT_CONCURRENCY = 100  # handshakes in flight at once, as wsbench.py's idle mode


def raise_fd_limit():
    """5,000 connections need more descriptors than the usual soft limit of 1,024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def payloads(trigger):
    """The messages a "burst M SIZE" asks for: message i is i on 8 digits, padded with x to SIZE bytes."""
    _, count, size = trigger.split()
    return [f"{i:08d}".ljust(int(size), "x") for i in range(int(count))]


# -- the servers ---------------------------------------------------------------
#
# Each builds its list of payloads first, so that the loop measured is the
# broadcasts alone, the same in all three.


def serve_ours(port, backlog, module):
    sys.path.insert(0, module)
    from gevent import monkey

    monkey.patch_all()  # as echo_server.py does
    from flask import Flask
    from gevent.pywsgi import WSGIServer

    import flask_websockets

    app = Flask(__name__)
    sockets = flask_websockets.WebSockets(app, path="/ws")

    @sockets.on_message
    def burst(message):
        if isinstance(message, str) and message.startswith("burst "):
            for payload in payloads(message):
                sockets.broadcast(payload)

    # An older checkout may predate the module's own handler: gevent-websocket's then.
    handler = getattr(flask_websockets, "WebSocketHandler", None)
    if handler is None:
        from geventwebsocket.handler import WebSocketHandler as handler
    WSGIServer(("127.0.0.1", port), app, handler_class=handler, log=None, backlog=backlog).serve_forever()


def serve_websockets(port, backlog):
    import asyncio

    from websockets.asyncio.server import broadcast, serve
    from websockets.exceptions import ConnectionClosed

    connections = set()

    async def handler(ws):
        connections.add(ws)
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("burst "):
                    for payload in payloads(message):
                        broadcast(connections, payload)
        except ConnectionClosed:  # the clients leave without a closing handshake: not worth a traceback
            pass
        finally:
            connections.discard(ws)

    async def main():
        # The reference server's settings; compression=None only says what the clients' offer makes so anyway.
        async with serve(handler, "127.0.0.1", port, backlog=backlog, max_size=2**24, compression=None):
            await asyncio.Future()

    asyncio.run(main())  # the default loop, what most users run


def serve_raw_gevent(port, backlog):
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.handler import WebSocketHandler

    connections = set()

    def app(environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"websocket only\n"]
        connections.add(ws)
        try:
            while True:
                message = ws.receive()
                if message is None:
                    break
                if isinstance(message, str) and message.startswith("burst "):
                    for payload in payloads(message):
                        for other in list(connections):  # a send may yield, and a client leave meanwhile
                            other.send(payload)
        finally:
            connections.discard(ws)
        return []

    WSGIServer(("127.0.0.1", port), app, handler_class=WebSocketHandler, log=None, backlog=backlog).serve_forever()


def serve(args):
    raise_fd_limit()
    if args.serve == "ours":
        serve_ours(args.port, args.backlog, args.module)
    elif args.serve == "websockets":
        serve_websockets(args.port, args.backlog)
    else:
        serve_raw_gevent(args.port, args.backlog)


# -- the clients -----------------------------------------------------------------


def server_cpu(pid):
    """The CPU time of the server process (all its threads), in seconds: schedstat's nanoseconds, stat's ticks."""
    precise = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                precise += int(f.read().split()[0])
        except OSError:  # a thread that ended
            pass
    return precise / 1e9, cpu_seconds(pid)


async def receive(args):
    """Open the clients, send the trigger, wait for every message; return the measurements."""
    import asyncio

    from picows import WSListener, WSMsgType, ws_connect

    CONTROL = (WSMsgType.PING, WSMsgType.PONG, WSMsgType.CLOSE)
    loop = asyncio.get_running_loop()
    expected, size = args.messages, args.size
    state = {"complete": 0, "disordered": 0, "disconnected": 0, "errors": {}}
    done = loop.create_future()

    class Receiver(WSListener):
        def on_ws_connected(self, transport):
            self.transport, self.got, self.in_order = transport, 0, True

        def on_ws_disconnected(self, transport):
            state["disconnected"] += 1

        def on_ws_frame(self, transport, frame):
            if frame.msg_type in CONTROL:  # the servers' keepalive, or a close (counted as it disconnects)
                return
            data = frame.get_payload_as_bytes()
            if self.in_order and (frame.msg_type is not WSMsgType.TEXT or len(data) != size or
                                  int(data[:8]) != self.got):  # fmt: skip
                self.in_order = False
                state["disordered"] += 1
            self.got += 1
            if self.got == expected:
                state["complete"] += 1
                if state["complete"] == args.count and not done.done():
                    done.set_result(time.perf_counter())

    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect():
        async with gate:
            try:
                _, receiver = await ws_connect(Receiver, args.url, websocket_handshake_timeout=30)
                return receiver
            except Exception as e:  # noqa: BLE001 (counted and reported: the run fails below)
                state["errors"][type(e).__name__] = state["errors"].get(type(e).__name__, 0) + 1

    started = time.perf_counter()
    receivers = [r for r in await asyncio.gather(*(connect() for _ in range(args.count))) if r is not None]
    connect_seconds = time.perf_counter() - started
    if len(receivers) < args.count:
        return {"error": f"{len(receivers)} of {args.count} connected: {state['errors']}"}
    # Every handshake has been answered; let the server register the last connections before the burst.
    await asyncio.sleep(0.5)

    cpu_before, ticks_before = server_cpu(args.server_pid)
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    receivers[0].transport.send(WSMsgType.TEXT, f"burst {expected} {size}".encode())
    try:
        finished = await asyncio.wait_for(done, args.timeout)
    except asyncio.TimeoutError:
        finished = None
    cpu_after, ticks_after = server_cpu(args.server_pid)
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "connect_seconds": connect_seconds,
        "complete": state["complete"],
        "in_order": args.count - state["disordered"],
        "disconnected": state["disconnected"],
        "received": sum(r.got for r in receivers),
        "cpu": cpu_after - cpu_before,
        "cpu_ticks": ticks_after - ticks_before,
        "client_cpu": (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime),
    }
    if finished is None:
        result["error"] = f"timed out after {args.timeout} s: {state['complete']} of {args.count} clients got all"
    else:
        result["wall"] = finished - start
    return result


def run_receivers(args):
    raise_fd_limit()
    import uvloop

    print(json.dumps(uvloop.run(receive(args))), flush=True)


# -- the run -------------------------------------------------------------------


def start_server(name, args):
    port = free_port()
    command = ["taskset", "-c", str(SERVER_CORE), sys.executable, os.path.abspath(__file__), "--serve", name]
    command += ["--port", str(port), "--backlog", str(args.backlog), "--module", args.module]
    proc = subprocess.Popen(command, start_new_session=True)
    wait_listening(proc, port, f"the {name} server")
    return proc, port


def measure(name, clients, args):
    """One repetition: a fresh server, the clients, one burst."""
    server, port = start_server(name, args)
    try:
        command = ["taskset", "-c", str(CLIENT_CORE), sys.executable, os.path.abspath(__file__), "--receive"]
        command += [f"ws://127.0.0.1:{port}/ws", "--count", str(clients), "--server-pid", str(server.pid)]
        command += ["--messages", str(args.messages), "--size", str(args.size), "--timeout", str(args.timeout)]
        # The handshakes take seconds for thousands of clients; the burst has --timeout on top.
        out = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True, timeout=args.timeout + 300).stdout
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(30)
    deliveries = args.messages * clients
    result.update(server=name, clients=clients, deliveries=deliveries)
    ok = "error" not in result and result["in_order"] == clients and result["disconnected"] == 0
    result["ok"] = ok
    if "wall" in result:
        result["us_per_delivery"] = result["cpu"] / deliveries * 1e6
        result["deliveries_per_s"] = deliveries / result["wall"]
    return result


def print_run(r, rep):
    if "wall" not in r:
        print(f"| {r['server']} | {r['clients']:,} | {rep} | FAILED: {r['error']} | | | | | |", flush=True)
        return
    check = f"{r['complete']:,} all, {r['in_order']:,} in order"
    if r["disconnected"]:
        check += f", {r['disconnected']} closed"
    print(
        f"| {r['server']} | {r['clients']:,} | {rep} | {r['us_per_delivery']:.3f} | {r['deliveries_per_s']:,.0f}"
        f" | {r['cpu'] * 1000:.0f} ({r['cpu_ticks'] * 1000:.0f}) | {r['cpu'] / r['wall'] * 100:.0f}"
        f" | {r['client_cpu'] / r['wall'] * 100:.0f} | {check} |",
        flush=True,
    )


def summary(results, servers, counts, args):
    """Per N: each server's median µs per delivery, ours over websockets, and their growth from least N to most."""
    median = {}
    for name in servers:
        for n in counts:
            values = [r["us_per_delivery"] for r in results if r["server"] == name and r["clients"] == n and r["ok"]]
            median[name, n] = statistics.median(values) if values else None

    def fmt(v, spec=".3f"):
        return "–" if v is None else format(v, spec)

    def ratio(a, b):
        return a / b if a is not None and b else None

    compare = "ours" in servers and "websockets" in servers
    head = [f"{name} µs/delivery" for name in servers] + (["ours/websockets"] if compare else [])
    title = f"{args.label}: " if args.label else ""
    print(f"\n{title}broadcast of {args.messages} messages of {args.size} B, server CPU per delivery,"
          f" median of {args.reps}\n")  # fmt: skip
    print("| clients | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for n in counts:
        cells = [fmt(median[name, n]) for name in servers]
        if compare:
            cells.append(fmt(ratio(median["ours", n], median["websockets", n]), ".2f"))
        print(f"| {n:,} | " + " | ".join(cells) + " |")
    if len(counts) > 1:
        low, high = counts[0], counts[-1]
        growth = {name: ratio(median[name, high], median[name, low]) for name in servers}
        cells = [fmt(growth[name], ".2f") for name in servers]
        if compare:
            cells.append(fmt(ratio(growth["ours"], growth["websockets"]), ".2f"))
        print(f"| growth {low:,} → {high:,} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000,5000", help="the numbers of clients, comma separated")
    parser.add_argument("--servers", default="ours,websockets,raw_gevent", help="of ours, websockets, raw_gevent")
    parser.add_argument("--messages", type=int, default=100, help="broadcasts in the burst")
    parser.add_argument("--size", type=int, default=32, help="bytes of each message (8 or more)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, each with a fresh server")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for every client to get the burst")
    parser.add_argument("--module", default=os.path.join(HERE, ".."), help="the checkout whose module `ours` serves")
    parser.add_argument("--label", default="", help="a name for this run, in the summary's title")
    parser.add_argument("--backlog", type=int, default=1024, help="the servers' listen backlog")
    parser.add_argument("--serve", choices=["ours", "websockets", "raw_gevent"], help="run that server (internal)")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--receive", dest="url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.module = os.path.abspath(args.module)
    if args.serve:
        return serve(args)
    if args.url:
        return run_receivers(args)
    if args.size < 8:
        parser.error("--size must be 8 or more: each message starts with its index on 8 digits")

    servers = args.servers.split(",")
    counts = sorted(int(n) for n in args.clients.split(","))
    print(f"server on core {SERVER_CORE}, clients on core {CLIENT_CORE}; ours from {args.module}\n")
    print("| server | clients | rep | CPU µs/delivery | deliveries/s | server CPU ms (stat) | server CPU % of wall"
          " | client CPU % of wall | clients that got all M, in order |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for rep in range(1, args.reps + 1):  # servers interleaved, so that the machine's moods touch them alike
        for n in counts:
            for name in servers:
                r = measure(name, n, args)
                print_run(r, rep)
                results.append(r)
    summary(results, servers, counts, args)
    if not all(r["ok"] for r in results):
        print("\nsome runs failed or lost messages: see above", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
