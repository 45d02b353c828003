"""What a websocket connection and its messages cost the server in Python, without the network.

    python benchmarks/connection_cost.py                 # microseconds per connection and per message
    python benchmarks/connection_cost.py --profile       # and where they go (cProfile)
    python benchmarks/connection_cost.py --module /tmp/old-checkout   # another checkout's module
    valgrind --tool=callgrind python benchmarks/connection_cost.py --only echo_64k -n 300

One process, one core, a socket pair instead of TCP: the figures move far less
between runs than the network benchmark's (benchmarks/run.sh), and under
callgrind they are instruction counts, the same on every run. Measured:

- connection: a handshake request through the Flask app, one 32-byte text
  message echoed, and the client's close frame, answered;
- bare_flask_request, request_context_only: the same request to a bare Flask
  view, and Flask's request context pushed and popped alone, the floor for any
  design that gives handlers ``request``, ``session`` and ``g``;
- echo_32, echo_64k: one message echoed on an open connection, 32-byte text
  and 64 KiB binary, the client's side (precomputed frames) included;
- idle_memory: the bytes Python allocates (tracemalloc) for each of 1,000 open,
  idle connections, after one echo each: the server's side, the request
  context included, the greenlets' stacks not.

Both sides run in greenlets of one gevent loop, the client sending a frame and
reading its echo in turn. What the client costs is the same for any version of
the module, so differences are the server's.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--profile", action="store_true")
parser.add_argument("--only", help="one measurement, by name (for callgrind)")
parser.add_argument("-n", type=int, default=0, help="iterations (default: enough for about a second)")
parser.add_argument("--pure-python", action="store_true", help="unmask in pure Python, even with the speedups extra")
parser.add_argument("--module", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ARGS = parser.parse_args()
sys.path.insert(0, ARGS.module)
if ARGS.pure_python:
    sys.modules["wsaccel.xormask"] = None  # type: ignore[assignment]  # older versions' accelerator
    sys.modules["websockets.speedups"] = None  # type: ignore[assignment]  # the speedups extra's

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
from flask import Flask  # noqa: E402

import flask_websockets  # noqa: E402
from flask_websockets import WebSockets  # noqa: E402

MASK = b"\x01\x02\x03\x04"


def client_frame(opcode, payload):
    """A masked frame, built once: the client's cost stays out of the figures."""
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    else:
        length = b"\xfe" + n.to_bytes(2, "big") if n < 65536 else b"\xff" + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + length + MASK + masked


def server_frame_size(n):
    return 2 + n if n < 126 else 4 + n if n < 65536 else 10 + n


CLOSE = client_frame(0x8, (1000).to_bytes(2, "big"))


def environ(accept):
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/ws",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8765",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8765",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "flask_websockets.accept": accept,  # as flask_websockets.WebSocketHandler hands the socket over
    }


def ignore(status, headers, exc_info=None):
    pass


echo_app = Flask("echo")
WebSockets(echo_app, path="/ws").on_message(lambda message: message)
bare_app = Flask("bare")
bare_app.add_url_rule("/ws", "ws", lambda: "", websocket=True)


def read_exactly(sock, n, buffer):
    view = memoryview(buffer)[:n]
    while view:
        got = sock.recv_into(view)
        assert got, "the server closed the connection"
        view = view[got:]


class Connection:
    """An open connection to echo_app: the server in a greenlet, the client is us."""

    def __init__(self):
        self.client, server = gevent.socket.socketpair()
        self.buffer = bytearray(1 << 17)

        def serve():
            try:
                # (subprotocol, extensions): the extensions argument is new with compression
                list(echo_app(environ(lambda subprotocol, extensions=None: (server, io.BytesIO())), ignore))
            finally:
                server.close()

        self.server = gevent.spawn(serve)

    def echo(self, frame, reply_size):
        self.client.sendall(frame)
        read_exactly(self.client, reply_size, self.buffer)

    def close(self):
        self.client.sendall(CLOSE)
        read_exactly(self.client, 4, self.buffer)  # the close frame's answer
        self.client.close()  # as a client does after the closing handshake: the server waits for it
        self.server.join()


TEXT_32 = client_frame(0x1, b"x" * 32)
BINARY_64K = client_frame(0x2, bytes(range(256)) * 256)


def connection(n):
    for _ in range(n):
        conn = Connection()
        conn.echo(TEXT_32, server_frame_size(32))
        conn.close()


def bare_flask_request(n):
    for _ in range(n):
        list(bare_app(environ(None), ignore))


def request_context_only(n):
    for _ in range(n):
        with bare_app.request_context(environ(None)):
            pass


def echo_messages(frame, reply_size):
    def measure(n):
        conn = Connection()
        try:
            for _ in range(n):
                conn.echo(frame, reply_size)
        finally:
            conn.close()

    return measure


def idle_memory():
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    conns = []
    for _ in range(1000):
        conn = Connection()
        conn.echo(TEXT_32, server_frame_size(32))
        conns.append(conn)
    gc.collect()
    per_connection = (tracemalloc.get_traced_memory()[0] - before) / len(conns)
    client_side = sum(len(conn.buffer) for conn in conns) / len(conns)  # the test client's own buffer
    tracemalloc.stop()
    for conn in conns:
        conn.close()
    return per_connection - client_side


CASES = {
    "connection": (connection, 2000, "connection"),
    "bare_flask_request": (bare_flask_request, 5000, "connection"),
    "request_context_only": (request_context_only, 10000, "connection"),
    "echo_32": (echo_messages(TEXT_32, server_frame_size(32)), 20000, "message"),
    "echo_64k": (echo_messages(BINARY_64K, server_frame_size(65536)), 2000, "message"),
}


def main():
    conn = Connection()  # check the echo before measuring it
    conn.echo(BINARY_64K, server_frame_size(65536))
    assert bytes(conn.buffer[10 : 10 + 65536]) == bytes(range(256)) * 256
    conn.close()
    accelerated = flask_websockets._unmask is not flask_websockets._unmask_python
    where = os.path.abspath(flask_websockets.__file__)
    print(f"flask_websockets from {where}, {'C (the speedups extra)' if accelerated else 'pure Python'}")
    for name, (case, default_n, unit) in CASES.items():
        if ARGS.only and name != ARGS.only:
            continue
        n = ARGS.n or default_n
        best = float("inf")
        for _ in range(1 if ARGS.only else 5):
            start = time.process_time()
            case(n)
            best = min(best, (time.process_time() - start) / n)
        print(f"{name:22} {best * 1e6:8.1f} us per {unit}", flush=True)
    if not ARGS.only or ARGS.only == "idle_memory":
        print(f"{'idle_memory':22} {idle_memory():8.0f} bytes allocated per idle connection (tracemalloc)")
    if ARGS.profile:
        profile = cProfile.Profile()
        profile.runcall(CASES[ARGS.only or "echo_32"][0], ARGS.n or 3000)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
