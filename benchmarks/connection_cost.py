"""What one websocket connection costs the server in Python, without the network.

    python benchmarks/connection_cost.py            # microseconds per connection
    python benchmarks/connection_cost.py --profile  # and where they go (cProfile)

Each connection is a handshake request through the Flask app, one 32-byte text
message echoed, and the client's close frame, over an in-memory socket. It is
compared with the same request to a bare Flask view, and with pushing and
popping Flask's request context alone: the floor for any design that gives
handlers ``request``, ``session`` and ``g``. This is what limits the
connection rate (scenario ``rate`` in benchmarks/README.md).
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flask import Flask  # noqa: E402

from flask_websockets import WebSockets  # noqa: E402

MASK = b"\x01\x02\x03\x04"


def client_frame(opcode, payload):
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + MASK + masked


CLIENT_BYTES = client_frame(0x1, b"x" * 32) + client_frame(0x8, (1000).to_bytes(2, "big"))


class MemorySocket:
    """The upgraded socket: the client's bytes are already there."""

    def __init__(self):
        self.inbox = CLIENT_BYTES
        self.sent = []

    def recv(self, n):
        data, self.inbox = self.inbox[:n], self.inbox[n:]
        return data

    def send(self, data):
        self.sent.append(bytes(data))
        return len(data)

    def sendall(self, data):
        pass

    def shutdown(self, how):
        pass

    def gettimeout(self):
        return None

    def settimeout(self, timeout):
        pass


class Upgraded:
    """environ["wsgi.websocket"] as gevent-websocket's handler leaves it."""

    def __init__(self):
        self.closed = False
        self.handler = self
        self.socket = MemorySocket()
        self.rfile = io.BufferedReader(io.BytesIO(b""))


def environ():
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
        "wsgi.websocket": Upgraded(),
    }


def ignore(status, headers, exc_info=None):
    pass


echo_app = Flask("echo")
WebSockets(echo_app, path="/ws").on_message(lambda message: message)
bare_app = Flask("bare")
bare_app.add_url_rule("/ws", "ws", lambda: "", websocket=True)


def flask_websockets_connection():
    list(echo_app(environ(), ignore))


def bare_flask_request():
    list(bare_app(environ(), ignore))


def request_context_only():
    with bare_app.request_context(environ()):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args()
    check = environ()
    list(echo_app(check, ignore))
    sent = check["wsgi.websocket"].socket.sent
    assert sent == [b"\x81\x20" + b"x" * 32, b"\x88\x02\x03\xe8"], sent  # the echo, the close reply
    for case in (flask_websockets_connection, bare_flask_request, request_context_only):
        best = min(timeit.repeat(case, number=args.n, repeat=5)) / args.n
        print(f"{case.__name__:30} {best * 1e6:6.1f} us per connection")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [flask_websockets_connection() for _ in range(args.n)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
