"""The connection engine under hostile and slow clients, against a real server in its own process.

    python benchmarks/engine.py fairness       # 20 s: one client floods, another streams 64 KiB, a third measures
    python benchmarks/engine.py long-handler   # 60 s: a handler that runs 60 s, ping interval and timeout 1 s
    python benchmarks/engine.py memory         # about 70 s: announced megabytes, fragment floods
    python benchmarks/engine.py broadcast      # 2,000 broadcasts of 64 KiB, 50 readers and one that never reads
    python benchmarks/engine.py slow-headers   # 1,000 clients that send half a request line, a byte now and then
    python benchmarks/engine.py all --module /tmp/old-checkout   # another checkout's flask_websockets

fairness: one client pipelines 100-byte echoes as fast as it can, another
streams 64 KiB messages and reads their echoes, both from processes of their
own. Meanwhile a third client measures echo round trips (every 10 ms) and a
fourth opens a new connection every 200 ms: p50/p99/max of both.

long-handler: a handler runs 60 s (gevent.sleep) with WEBSOCKETS_PING_INTERVAL
and WEBSOCKETS_PING_TIMEOUT at 1 s. A live client answers pings and must get the
reply; a client that stops reading and answering 5 s into the handler must be
closed (1011) about 2 s later.

memory: the server's RSS (from /proc) while 200 connections each announce a
1 MB message and send nothing more; while clients stream empty continuation
frames for 60 s (reconnecting each time the server closes them with 1009); and
1-byte fragments.

broadcast: 50 clients read everything, one never reads (it sends a pong now
and then, which keepalive counts as life). The server broadcasts 2,000 messages
of 64 KiB, 2 ms apart, each numbered: the duration of each broadcast() call
(p50/p99/max), what the 50 received (all, in order?), when and how the slow
one was closed, and the server's peak RSS over its baseline. A version that
blocks on the slow client is reported as hung after --seconds.

slow-headers: 1,000 sockets send "GET / HT" and then a byte every 2 s, to a
server with the default handshake_timeout (10 s); meanwhile a client opens a
websocket and echoes every 200 ms: when the 1,000 were closed, and the good
client's handshake and echo times.

The clients are raw sockets with their own minimal framing, so that the same
script measures any version of the module. Results print as one line each.
"""
import argparse
import json
import multiprocessing
import select
import os
import re
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HANDSHAKE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()


# -- the server --------------------------------------------------------------


def serve(args):
    sys.path.insert(0, args.module)
    from gevent import monkey

    monkey.patch_all()
    import json

    import flask
    import gevent
    from flask import Flask

    import flask_websockets

    app = Flask(__name__)
    app.config.update(
        WEBSOCKETS_PING_INTERVAL=args.ping_interval,
        WEBSOCKETS_PING_TIMEOUT=args.ping_interval,
        WEBSOCKETS_MAX_MESSAGE_SIZE=args.max_size or None,
    )
    sockets = flask_websockets.WebSockets(app, match_one=True)
    closed = []

    @sockets.on_close
    def record_close():
        closed.append((time.monotonic(), flask.request.args.get("role"), flask_websockets.ws.close_code))

    @sockets.on_message("^BROADCAST ")
    def broadcast(message):
        count, size, pause = message.split()[1:]
        durations, reached, start = [], [], time.monotonic()
        for i in range(int(count)):
            payload = i.to_bytes(8, "big") + b"x" * (int(size) - 8)
            before = time.monotonic()
            reached.append(sockets.broadcast(payload, to=lambda c: c.request.args.get("role") != "control"))
            durations.append(time.monotonic() - before)
            gevent.sleep(float(pause))
        closes = [(t - start, role, code) for t, role, code in closed]
        return json.dumps({"durations": durations, "reached": reached, "closed": closes})

    @sockets.on_message("^LONG ")
    def long_task(message):
        gevent.sleep(float(message.split()[1]))
        return "done"

    @sockets.on_message
    def echo(message):
        return message

    print(f"server {flask_websockets.__file__}", file=sys.stderr, flush=True)
    limits = {"max_connections": args.max_connections} if args.max_connections else {}
    flask_websockets.serve(app, port=0, log=None, **limits)


class Server:
    """``engine.py serve`` in a subprocess, pinned to core 0 where taskset exists."""

    def __init__(self, args, ping_interval=25.0, max_size=1 << 20):
        command = [sys.executable, os.path.abspath(__file__), "serve", "--module", args.module]
        command += ["--ping-interval", str(ping_interval), "--max-size", str(max_size)]
        if getattr(args, "max_connections", None):
            command += ["--max-connections", str(args.max_connections)]
        if args.pin:
            command = ["taskset", "-c", "0"] + command
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.port = int(re.search(r":(\d+)/", self.proc.stdout.readline()).group(1))

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as status:
            return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


# -- a minimal client ----------------------------------------------------------

MASK = b"\x11\x22\x33\x44"


def frame(opcode, payload, fin=True):
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([0x80 | n]) if n < 126 else struct.pack("!BH", 0xFE, n) if n < 65536 else struct.pack("!BQ", 0xFF, n)
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes((MASK * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    return head + MASK + masked


def connect(port, timeout=30.0, query=""):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(HANDSHAKE.replace(b"GET / ", f"GET /{query} ".encode()))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response[:40]
    return sock, response.split(b"\r\n\r\n", 1)[1]


class Reader:
    """Reads server frames: (opcode, payload); answers pings unless told not to."""

    def __init__(self, sock, buffered=b"", answer_pings=True):
        self.sock, self.buf, self.answer_pings = sock, buffered, answer_pings

    def _take(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def next(self):
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._take(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._take(8))[0]
            opcode, payload = b0 & 0x0F, self._take(n)
            if opcode == 0x9 and self.answer_pings:
                self.sock.sendall(frame(0xA, payload))
                continue
            return opcode, payload


# -- fairness ------------------------------------------------------------------


def pipeline(port, seconds):
    """Load: pipelined 100-byte echoes, as fast as the server takes them.

    The replies are read by a process of their own, so that the server never
    waits to write them: it always has input, and nothing else slows it down.
    """
    sock, _ = connect(port)
    burst = frame(0x1, b"x" * 100) * 200
    reader = os.fork()
    if reader == 0:
        try:
            while sock.recv(1 << 20):
                pass
        finally:
            os._exit(0)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            sock.sendall(burst)
    except OSError:
        pass
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    os.waitpid(reader, 0)


def stream(port, seconds):
    """Load: 64 KiB binary messages, each echo read before the next is sent."""
    sock, buffered = connect(port)
    reader, message, count = Reader(sock, buffered), frame(0x2, os.urandom(65536)), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.sendall(message)
        reader.next()
        count += 1
    sock.close()


def percentiles(samples):
    samples = sorted(samples)
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1000  # noqa: E731
    return f"p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {samples[-1] * 1000:.1f} ms ({len(samples)} samples)"


def fairness(args):
    server = Server(args)
    try:
        loads = [
            multiprocessing.Process(target=pipeline, args=(server.port, args.seconds + 1)),
            multiprocessing.Process(target=stream, args=(server.port, args.seconds + 1)),
        ]
        for load in loads:
            load.start()
        time.sleep(1)  # the loads are under way
        sock, buffered = connect(server.port)
        reader = Reader(sock, buffered)
        echoes, handshakes = [], []
        end = time.monotonic() + args.seconds
        next_connect = time.monotonic()
        try:
            while time.monotonic() < end:
                start = time.monotonic()
                sock.sendall(frame(0x1, b"my turn"))
                assert reader.next() == (0x1, b"my turn")
                echoes.append(time.monotonic() - start)
                if time.monotonic() >= next_connect:
                    start = time.monotonic()
                    fresh, _ = connect(server.port)
                    handshakes.append(time.monotonic() - start)
                    fresh.close()
                    next_connect = start + 0.2
                time.sleep(0.01)
        except (OSError, EOFError) as error:  # a server that never answered: timed out (30 s)
            print(f"fairness: starved: {type(error).__name__} after {time.monotonic() - start:.1f} s of waiting")
        sock.close()
        for load in loads:
            load.join(10)
        if echoes:
            print(f"fairness: third client's echo round trip {percentiles(echoes)}")
        if handshakes:
            print(f"fairness: a new connection's handshake {percentiles(handshakes)}")
    finally:
        server.stop()


# -- long handler --------------------------------------------------------------


def long_handler(args):
    server = Server(args, ping_interval=1.0)
    try:
        import threading

        live, buffered = connect(server.port, timeout=args.seconds + 30)
        start = time.monotonic()
        live.sendall(frame(0x1, f"LONG {args.seconds}".encode()))
        replies = []
        live_reader = threading.Thread(
            target=lambda: replies.append((Reader(live, buffered).next(), time.monotonic()))
        )
        live_reader.start()  # it answers pings while it waits for the reply
        silent, silent_buffered = connect(server.port, timeout=args.seconds + 30)
        silent.sendall(frame(0x1, f"LONG {args.seconds}".encode()))
        # The silent client answers pings for 5 s, then neither reads nor answers.
        silent_reader = Reader(silent, silent_buffered)
        silent.settimeout(0.2)
        while time.monotonic() - start < 5:
            try:
                opcode, payload = silent_reader.next()
            except socket.timeout:
                continue
            except EOFError:
                opcode, payload = 0x8, b""
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if payload else None
                print(f"long-handler: a client that answered every ping was closed (code {code}) after "
                      f"{time.monotonic() - start:.1f} s of the handler")  # fmt: skip
                return
        went_silent = time.monotonic()
        silent.settimeout(args.seconds + 30)
        closed_after = None

        def wait_for_close():
            nonlocal closed_after
            reader = Reader(silent, silent_reader.buf, answer_pings=False)
            try:
                while True:
                    opcode, payload = reader.next()
                    if opcode == 0x8:
                        closed_after = (time.monotonic() - went_silent, struct.unpack("!H", payload[:2])[0])
                        return
            except (EOFError, OSError):
                closed_after = closed_after or (time.monotonic() - went_silent, None)

        watcher = threading.Thread(target=wait_for_close)
        watcher.start()
        live_reader.join(args.seconds + 30)
        (opcode, reply), took = replies[0][0], replies[0][1] - start
        if opcode == 0x8:
            reply = f"closed with {struct.unpack('!H', reply[:2])[0]}"
        watcher.join(5)
        print(f"long-handler: a {args.seconds} s handler, ping interval 1 s: the live client got {reply!r} "
              f"after {took:.1f} s; the silent one was closed {closed_after[0]:.2f} s after it went silent "
              f"(code {closed_after[1]})")  # fmt: skip
    finally:
        server.stop()


# -- memory --------------------------------------------------------------------


def memory(args):
    server = Server(args)
    try:
        def barrier():
            sock, buffered = connect(server.port)
            sock.sendall(frame(0x1, b"barrier"))
            Reader(sock, buffered).next()
            sock.close()

        for _ in range(20):
            barrier()
        baseline = server.rss_mib()
        announced = []
        for _ in range(200):
            sock, _ = connect(server.port)
            sock.sendall(bytes([0x82, 0xFF]) + (1_000_000).to_bytes(8, "big") + MASK)
            announced.append(sock)
        barrier()
        time.sleep(0.5)
        grown = server.rss_mib() - baseline
        for sock in announced:
            sock.close()
        print(f"memory: 200 connections announcing 1 MB each: RSS +{grown:.1f} MiB (baseline {baseline:.1f} MiB)")
        for name, payload in (("empty continuation frames", b""), ("1-byte fragments", b"x")):
            barrier()
            before, peak, closes = server.rss_mib(), 0.0, 0
            chunk = frame(0x0, payload, fin=False) * 1000
            end = time.monotonic() + (args.seconds if payload == b"" else 5)
            while time.monotonic() < end:
                sock, _ = connect(server.port)
                sock.sendall(frame(0x2, payload, fin=False))
                try:
                    while time.monotonic() < end:
                        sock.sendall(chunk)
                        peak = max(peak, server.rss_mib())
                        if select.select([sock], [], [], 0)[0]:  # the server's close frame: 1009
                            sock.sendall(frame(0x8, b"\x03\xf1"))
                            closes += 1
                            break
                except OSError:
                    pass
                sock.close()
            seconds = args.seconds if payload == b"" else 5
            print(f"memory: {name} for {seconds} s, reconnecting after each 1009: RSS peak"
                  f" +{peak - before:.1f} MiB; the server closed {closes} flooding connections with 1009")  # fmt: skip
    finally:
        server.stop()


# -- broadcast -----------------------------------------------------------------


def read_broadcasts(port, connections, count, ready, results):
    """A reader process: ``connections`` clients that read every message, checking the numbering."""
    import selectors

    selector = selectors.DefaultSelector()
    for _ in range(connections):
        sock, buffered = connect(port, query="?role=reader")
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, {"buf": bytearray(buffered), "next": 0, "ok": True})
    ready.put(connections)
    open_count = connections
    while open_count:
        for key, _ in selector.select(timeout=60):
            state = key.data
            try:
                chunk = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                selector.unregister(key.fileobj)
                open_count -= 1
                continue
            buf = state["buf"]
            buf += chunk
            while len(buf) >= 2:
                n, head = buf[1] & 0x7F, 2
                if n == 126:
                    n, head = struct.unpack_from("!H", buf, 2)[0], 4
                elif n == 127:
                    n, head = struct.unpack_from("!Q", buf, 2)[0], 10
                if len(buf) < head + n:
                    break
                if buf[0] & 0x0F == 0x2:
                    state["ok"] &= int.from_bytes(buf[head : head + 8], "big") == state["next"]
                    state["next"] += 1
                del buf[: head + n]
            if state["next"] == count:
                results.put((state["next"], state["ok"]))
                selector.unregister(key.fileobj)
                key.fileobj.close()
                open_count -= 1
        else:
            if not selector.get_map():
                break


def broadcast(args):
    server = Server(args)
    count, readers_per_process, processes = 2000, 10, 5
    try:
        ready, results = multiprocessing.Queue(), multiprocessing.Queue()
        reader_args = (server.port, readers_per_process, count, ready, results)
        workers = [multiprocessing.Process(target=read_broadcasts, args=reader_args) for _ in range(processes)]
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=30)
        slow, _ = connect(server.port, query="?role=slow")  # it never reads
        control, buffered = connect(server.port, timeout=args.seconds, query="?role=control")
        baseline = peak = server.rss_mib()
        control.sendall(frame(0x1, f"BROADCAST {count} 65536 0.002".encode()))
        control.settimeout(0.1)
        reader, start = Reader(control, buffered), time.monotonic()
        report = None
        while report is None and time.monotonic() - start < args.seconds:
            peak = max(peak, server.rss_mib())
            try:
                report = json.loads(reader.next()[1])
            except socket.timeout:
                pass
            if int(time.monotonic() - start) % 2 == 0:
                try:
                    slow.sendall(frame(0xA, b"still here"))  # keepalive counts a pong as life
                except OSError:
                    pass
        if report is None:
            print(f"broadcast: hung: no report after {args.seconds} s (peak RSS +{peak - baseline:.0f} MiB)")
            return
        received = [results.get(timeout=30) for _ in range(processes * readers_per_process)]
        complete = sum(1 for got, in_order in received if got == count and in_order)
        slow_closes = [c for c in report["closed"] if c[1] == "slow"]
        reached = report["reached"]
        at = next((i for i, n in enumerate(reached) if n < len(received) + 1), None)
        print(f"broadcast: {count} broadcasts of 64 KiB to 50 readers and 1 client that never reads: broadcast() "
              f"{percentiles(report['durations'])}; {complete} of 50 readers got all {count}, in order; the slow "
              f"client was closed with {slow_closes[0][2] if slow_closes else None} at broadcast #{at}, "
              f"{slow_closes[0][0] if slow_closes else float('nan'):.2f} s in (its on_close ran "
              f"{len(slow_closes)} time(s)); server RSS peak +{peak - baseline:.0f} MiB over its baseline")  # fmt: skip
        slow.close()
        control.close()
    finally:
        for worker in workers:
            worker.terminate()
        server.stop()


# -- slow headers --------------------------------------------------------------


def slow_headers(args):
    import threading

    server = Server(args)
    try:
        slow = []
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(b"GET / HT")
            slow.append(sock)
        start = time.monotonic()
        closed_at = []

        def trickle_and_watch():
            pending = list(slow)
            while pending and time.monotonic() - start < 30:
                for sock in pending:
                    try:
                        sock.sendall(b"T")
                    except OSError:
                        pass
                readable = select.select(pending, [], [], 2.0)[0]
                for sock in readable:
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        closed_at.append(time.monotonic() - start)
                        pending.remove(sock)
                        sock.close()

        watcher = threading.Thread(target=trickle_and_watch)
        watcher.start()
        handshakes, echoes = [], []
        while watcher.is_alive():
            t0 = time.monotonic()
            sock, buffered = connect(server.port)
            handshakes.append(time.monotonic() - t0)
            t0 = time.monotonic()
            sock.sendall(frame(0x1, b"still here"))
            Reader(sock, buffered).next()
            echoes.append(time.monotonic() - t0)
            sock.close()
            time.sleep(0.2)
        last = f"the last {max(closed_at):.1f} s after they had all connected" if closed_at else "in 30 s"
        print(f"slow-headers: {len(closed_at)} of 1000 slow-header sockets closed, {last} (handshake_timeout"
              f" 10 s, each counted from its own connection); meanwhile a good client's handshake"
              f" {percentiles(handshakes)}, echo {percentiles(echoes)}")  # fmt: skip
        for sock in slow:
            sock.close()
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenario", choices=["fairness", "long-handler", "memory", "broadcast", "slow-headers", "all", "serve"]
    )
    parser.add_argument("--module", default=os.path.join(HERE, ".."), help="the checkout whose module to serve")
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--ping-interval", type=float, default=25.0, help=argparse.SUPPRESS)
    parser.add_argument("--max-size", type=int, default=1 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--max-connections", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the server to core 0")
    args = parser.parse_args()
    if args.scenario == "serve":
        return serve(args)
    args.pin = args.pin and os.path.exists("/usr/bin/taskset")
    scenarios = {"fairness": (fairness, 20), "long-handler": (long_handler, 60), "memory": (memory, 60)}
    scenarios["broadcast"] = (broadcast, 120)
    scenarios["slow-headers"] = (slow_headers, 30)
    for name, (scenario, seconds) in scenarios.items():
        if args.scenario in (name, "all"):
            scenario(argparse.Namespace(**{**vars(args), "seconds": args.seconds or seconds}))


if __name__ == "__main__":
    main()
