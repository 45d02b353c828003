"""Echo server built with Flask-Websockets: for the benchmark and the Autobahn suite.

    python benchmarks/echo_server.py --port 8765              # ws://127.0.0.1:8765/ws
    python benchmarks/echo_server.py --port 9001 --max-message-size 0
    python benchmarks/echo_server.py --port 9001 --compression --compression-min-size 0

Every message comes back as it came (text as text, binary as binary) through
an ordinary catch-all handler, served by gevent's pywsgi with
gevent-websocket's handler, like the reference servers in ../shared/bench.
`--compression` turns permessage-deflate on (WEBSOCKETS_COMPRESSION) and
implies `--handler flask_websockets`: gevent-websocket's handler answers the
handshake before the app sees it, so it cannot negotiate an extension.
"""
from gevent import monkey

monkey.patch_all()  # as the reference servers do

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--pure-python" in sys.argv:  # measure without the optional accelerator, even where installed
    sys.modules["wsaccel.xormask"] = None  # type: ignore[assignment]  # older versions' accelerator
    sys.modules["websockets.speedups"] = None  # type: ignore[assignment]  # the speedups extra's

from flask import Flask  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

from flask_websockets import WebSockets  # noqa: E402

app = Flask(__name__)
sockets = WebSockets(app, path="/ws")


@sockets.on_message
def echo(message):
    return message


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument(
        "--max-message-size", type=int, default=None, help="WEBSOCKETS_MAX_MESSAGE_SIZE in bytes; 0 means no limit"
    )
    parser.add_argument("--pure-python", action="store_true", help="unmask in pure Python, even with speedups")
    parser.add_argument(
        "--handler",
        choices=["gevent-websocket", "flask_websockets"],
        default="gevent-websocket",
        help="the pywsgi handler: gevent-websocket's own (as the reference servers use), or flask_websockets'",
    )
    parser.add_argument("--compression", action="store_true", help="WEBSOCKETS_COMPRESSION = True (our handler)")
    parser.add_argument(
        "--compression-min-size", type=int, default=None, help="WEBSOCKETS_COMPRESSION_MIN_SIZE in bytes"
    )
    parser.add_argument(
        "--no-context-takeover", action="store_true", help="WEBSOCKETS_COMPRESSION_CONTEXT_TAKEOVER = False"
    )
    args = parser.parse_args()
    if args.compression:
        args.handler = "flask_websockets"
        app.config["WEBSOCKETS_COMPRESSION"] = True
        if args.compression_min_size is not None:
            app.config["WEBSOCKETS_COMPRESSION_MIN_SIZE"] = args.compression_min_size
        if args.no_context_takeover:
            app.config["WEBSOCKETS_COMPRESSION_CONTEXT_TAKEOVER"] = False
    if args.max_message_size is not None:
        app.config["WEBSOCKETS_MAX_MESSAGE_SIZE"] = args.max_message_size or None
    import flask_websockets

    handler = flask_websockets.WebSocketHandler if args.handler == "flask_websockets" else WebSocketHandler
    server = WSGIServer((args.host, args.port), app, handler_class=handler, log=None, backlog=args.backlog)
    accelerated = flask_websockets._unmask is not flask_websockets._unmask_python
    print(
        f"flask_websockets echo on ws://{args.host}:{args.port}/ws, {args.handler}'s handler, unmasking with"
        f" {'C (speedups)' if accelerated else 'pure Python'}, compression {'on' if args.compression else 'off'}",
        file=sys.stderr,
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
