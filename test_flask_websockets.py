"""Tests for flask_websockets.

Unit tests drive the protocol core (``_Protocol``) with bytes, and the
extension through Flask's test client over a socket pair: the test plays the
client (`RawClient`), writes raw RFC 6455 frames and reads back what the
server wrote, parsed and checked by the module's own protocol core, client
side. Timers run on a fake clock (`FakeClock`).

Integration tests start a real server on 127.0.0.1 (port 0) in a background
thread (`serving`) and talk to it with `websocket-client` and raw sockets.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import gc
import http.client
import inspect
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import types
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import gevent
import gevent.event
import gevent.pool
import flask
import gevent.socket
import pytest
import trustme
import websocket
from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    g,
    got_request_exception,
    jsonify,
    make_response,
    render_template_string,
    request,
    session,
    url_for,
)
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler as GeventWebSocketHandler
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import make_server
from werkzeug.wrappers import Response

if os.environ.get("FLASK_WEBSOCKETS_PURE_PYTHON"):  # CI's Python 3.9: unmask as a vendored copy without the extra does
    sys.modules["websockets.speedups"] = None  # type: ignore[assignment]
import flask_websockets  # noqa: E402
from flask_websockets import Connection, ConnectionClosed, HandshakeRefused, WebSockets, has_socket_context, ws
from flask_websockets import _Protocol, _State  # the protocol core, tested on its own

# An exception nobody could see (say, in a socket's finalizer) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

HERE = Path(__file__).resolve().parent
# Subprocesses import this checkout's flask_websockets, installed or not.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade"}
HANDSHAKE = {**UPGRADE, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
KINDS = {TEXT: "text", BINARY: "binary", PING: "ping", PONG: "pong"}


# ---------------------------------------------------------------------------
# The test as the client: raw frames over a socket pair
# ---------------------------------------------------------------------------


def client_frame(opcode, payload=b"", fin=True, rsv=0, masked=True, mask=b"\x37\xfa\x21\x3d"):
    """A frame as a client sends it (masked unless told otherwise), by the module's encoder."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return flask_websockets._encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask if masked else None)


def close_payload(code, reason=""):
    return code.to_bytes(2, "big") + reason.encode("utf-8")


def parse_server_frames(data, compression=None):
    """What a server wrote, as readable tuples, checked by the protocol core (client side).

    A frame that breaks RFC 6455 fails the test, and so does a close frame
    without a code, or anything after the server's close frame.
    ``compression`` is the permessage-deflate the server agreed to, if any.
    """
    deflate = flask_websockets._client_deflate(compression) if compression else None
    proto = _Protocol(client=True, max_size=None, deflate=deflate)
    proto.receive_data(bytes(data))
    out = []
    while True:
        event = proto.next_event()
        if event is None:
            break
        kind, value = event
        assert kind != flask_websockets._FAILED, f"the server broke RFC 6455: {value}"
        if kind == CLOSE:
            assert value[0] != 1005, "every close frame the server sends carries a code"
            out.append(("close", *value))
        else:
            out.append((KINDS[kind], value))
    assert not proto._buf[proto._pos :] or proto.state is not _State.CLOSED, "bytes after the close frame"
    return out


class RawClient:
    """One connection to an endpoint, served in a greenlet; the test writes raw frames.

    ``received`` has every byte the server wrote, ``frames`` the frames in
    it. ``status`` is the handshake's HTTP status once the view returned
    (101, or the status of a refusal).
    """

    def __init__(self, sock, greenlet):
        self.sock, self.greenlet = sock, greenlet
        self.received = bytearray()
        self.eof = False
        self.answer = {}  # the 101's subprotocol and extensions

    def feed(self, *frames):
        self.sock.sendall(b"".join(frames))

    def send(self, message):
        self.feed(client_frame(TEXT if isinstance(message, str) else BINARY, message))

    def disconnect(self):
        """Half-close: the server reads EOF, and the test can still read what it sends."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def read(self, timeout=2.0):
        """Read once (or until EOF); False if nothing came within ``timeout``."""
        with gevent.Timeout(timeout, False):
            data = self.sock.recv(65536)
            self.received += data
            self.eof = self.eof or not data
            return True
        return False

    def poll(self):
        """Read what the server has written by now, without waiting; return all its frames."""
        self.sock.settimeout(0.0)
        try:
            while not self.eof:
                data = self.sock.recv(65536)
                self.received += data
                self.eof = not data
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(None)
        return self.frames

    def read_until_eof(self, timeout=5.0):
        with gevent.Timeout(timeout, AssertionError(f"the server never closed; it sent {self.frames}")):
            while not self.eof:
                self.read(timeout)

    @property
    def frames(self):
        return parse_server_frames(self.received, self.answer.get("extensions"))

    @property
    def messages(self):
        return [f[1] for f in self.frames if f[0] in ("text", "binary")]

    def wait_for(self, count, timeout=2.0):
        """Read until the server has written ``count`` frames."""
        with gevent.Timeout(timeout, AssertionError(f"expected {count} frames, got {self.frames}")):
            while len(self.frames) < count and not self.eof:
                self.read(timeout)
        return self.frames

    def end(self, timeout=5.0):
        """Hang up, wait for the view to return; raise what it raised."""
        self.disconnect()  # the server reads until the client's side is closed too
        self.greenlet.join(timeout)
        assert self.greenlet.dead, "the view is still serving the connection"
        self.sock.close()
        if self.greenlet.exception is not None:
            raise self.greenlet.exception
        response = self.greenlet.value
        self.status = response.status_code
        return self


def connect(app, path="/", headers=None, buffered=b"", via="ours", **kwargs):
    """Open a connection whose client is the test; the endpoint runs in a greenlet.

    ``via="ours"`` hands it over as flask_websockets.WebSocketHandler does (the
    101 is sent when the app accepts); ``"gevent-websocket"`` as that
    library's handler does (the 101 went out before the app ran).
    ``buffered`` bytes came with the handshake, in the server's reader.
    """
    client_sock, server_sock = gevent.socket.socketpair()
    reader = io.BytesIO(buffered)
    answer = {}  # what the 101 would carry

    def accept(subprotocol, extensions=None):
        answer.update(subprotocol=subprotocol, extensions=extensions)
        return server_sock, reader

    if via == "ours":
        overrides = {"flask_websockets.accept": accept}
    else:
        stub = types.SimpleNamespace(handler=types.SimpleNamespace(socket=server_sock, rfile=reader), closed=False)
        overrides = {"wsgi.websocket": stub}

    def serve():
        try:
            return app.test_client().get(
                path, headers={**HANDSHAKE, **(headers or {})}, environ_overrides=overrides, **kwargs
            )
        finally:
            server_sock.close()  # as the server does once the view returns

    raw = RawClient(client_sock, gevent.spawn(serve))
    raw.answer = answer
    gevent.sleep(0)
    return raw


def run(app, *frames, **kwargs):
    """Serve one connection whose client sends ``frames``, then hangs up; wait until it ends."""
    raw = connect(app, **kwargs)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a refused handshake reads nothing
        raw.feed(*frames)
    raw.disconnect()
    raw.read_until_eof()
    return raw.end()


def text(message):
    return client_frame(TEXT, message)


def binary(data):
    return client_frame(BINARY, data)


def close(code=1000, reason=""):
    return client_frame(CLOSE, close_payload(code, reason))


def make_app(**kwargs):
    app = Flask(__name__)
    app.secret_key = "test"
    return app, WebSockets(app, **kwargs)


class FakeClock:
    """Timers for the tests: time moves only when the test says so.

    Set as ``sockets._clock``: the endpoint's keepalive, close and send
    timeouts then wait for ``advance()``.
    """

    class Timer:
        def __init__(self, when, function, args):
            self.when, self.function, self.args, self.active = when, function, args, True

        def close(self):
            self.active = False

    def __init__(self):
        self.time = 0.0
        self.timers = []

    def now(self):
        return self.time

    def call_later(self, seconds, function, *args):
        timer = self.Timer(self.time + seconds, function, args)
        self.timers.append(timer)
        return timer

    def advance(self, seconds):
        """Move time on by ``seconds``, running each timer when it comes due, in order."""
        end = self.time + seconds
        while True:
            due = [t for t in self.timers if t.active and t.when <= end]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.time, timer.active = max(self.time, timer.when), False
            gevent.get_hub().loop.run_callback(timer.function, *timer.args)  # in the event loop, as a timer runs
            gevent.idle()  # what the timer set off (a ping, a close) happens before time goes on
        self.time = end
        gevent.idle()


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def test_init_app_adds_websocket_rule_and_extension():
    app, sockets = make_app()
    rule = next(r for r in app.url_map.iter_rules() if r.endpoint == "websocket")
    assert rule.rule == "/" and rule.websocket
    assert app.extensions["websockets"] is sockets


def test_path_chooses_where_the_endpoint_lives():
    app = Flask(__name__)
    sockets = WebSockets(app, path="/ws")
    sockets.on_message(lambda message: f"{message} at {request.path}, {url_for('websocket')}")
    assert run(app, text("hi"), path="/ws").messages == ["hi at /ws, ws://localhost/ws"]
    refused = run(app, text("hi"), path="/")
    assert refused.status == 404 and refused.frames == []
    # gevent-websocket's own handler has sent its 101: the app can only close.
    refused = run(app, text("hi"), path="/", via="gevent-websocket")
    assert refused.status == 404 and refused.frames == [("close", 1008, "404 NOT FOUND")]


def test_factory_pattern_serves_several_apps_with_shared_handlers():
    sockets = WebSockets()

    @sockets.on_message
    def echo(message):
        return f"{message} from {request.host}"

    apps = []
    for _ in range(2):
        app = Flask(__name__)
        sockets.init_app(app)
        apps.append(app)
    assert run(apps[0], text("a"), base_url="http://one").messages == ["a from one"]
    assert run(apps[1], text("b"), base_url="http://two").messages == ["b from two"]


@pytest.mark.parametrize("route_first", [True, False])
def test_app_http_index_keeps_working(route_first):
    app = Flask(__name__)
    if route_first:
        app.add_url_rule("/", "index", lambda: "index page")
    sockets = WebSockets(app)
    if not route_first:
        app.add_url_rule("/", "index", lambda: "index page")

    @sockets.on_message
    def echo(message):
        return message

    assert app.test_client().get("/").data == b"index page"
    assert run(app, text("hi")).messages == ["hi"]


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def test_patterns_first_in_order_then_catch_alls_each_reply_sent():
    app, sockets = make_app()
    calls = []

    @sockets.on_message
    def catch_all(message):
        calls.append("catch_all")
        return "catch_all"

    @sockets.on_message("^ECHO")
    def first(message):
        calls.append("first")
        return "first"

    @sockets.on_message("^ECHO (.*)")
    def second(message):
        calls.append("second")
        return None

    @sockets.on_message("^NOPE")
    def unmatched(message):
        calls.append("unmatched")

    fake = run(app, text("ECHO x"), text("other"))
    assert calls == ["first", "second", "catch_all", "catch_all"]
    assert fake.messages == ["first", "catch_all", "catch_all"]


def test_re_match_semantics_anchor_at_start():
    app, sockets = make_app()

    @sockets.on_message("ECHO")
    def echo(message):
        return "matched"

    assert run(app, text("ECHO"), text("no ECHO")).messages == ["matched"]


def test_match_one_runs_first_matching_pattern_only():
    app, sockets = make_app(match_one=True)

    @sockets.on_message
    def catch_all(message):
        return "catch_all"

    @sockets.on_message
    def second_catch_all(message):
        return "second_catch_all"

    @sockets.on_message("^A")
    def a(message):
        return "a"

    @sockets.on_message("^AB")
    def ab(message):
        return "ab"

    assert run(app, text("ABC"), text("Z")).messages == ["a", "catch_all"]


def test_decorator_forms():
    app, sockets = make_app()

    @sockets.on_message()
    def with_parens(message):
        return "parens"

    @sockets.on_message("^hello", flags=re.IGNORECASE)
    def flags(message):
        return "flags"

    @sockets.on_message(re.compile(r"^\d+$"))
    def compiled(message):
        return "compiled"

    assert run(app, text("HELLO"), text("42")).messages == ["flags", "parens", "compiled", "parens"]


def test_decorators_return_the_function():
    app, sockets = make_app()

    def f(message):
        return None

    assert sockets.on_message(f) is f
    assert sockets.on_message("x")(f) is f
    assert sockets.on_open(f) is f
    assert sockets.on_close(f) is f


def test_bad_registrations_fail_at_import_time():
    app, sockets = make_app()
    with pytest.raises(TypeError, match="async"):

        @sockets.on_message
        async def coroutine(message):
            return message

    with pytest.raises(TypeError, match="needs a pattern"):
        sockets.on_message(flags=re.I)
    with pytest.raises(ValueError, match="unclosed"):  # compiled where the handler is known, to name it
        sockets.on_message("(unclosed")(lambda message: message)


def test_str_patterns_see_text_bytes_patterns_see_binary():
    app, sockets = make_app()
    seen = []

    @sockets.on_message(".*")
    def any_text(message):
        seen.append(("text pattern", message))

    @sockets.on_message(rb"\x89PNG")
    def png(data):
        seen.append(("bytes pattern", data))

    @sockets.on_message
    def catch_all(message):
        seen.append(("catch-all", message))

    run(app, binary(b"\x89PNG..."), binary(b"\xff"), text("\u00e9"))
    assert seen == [
        ("bytes pattern", b"\x89PNG..."),
        ("catch-all", b"\x89PNG..."),
        ("catch-all", b"\xff"),
        ("text pattern", "\u00e9"),
        ("catch-all", "\u00e9"),
    ]
    assert all(type(m) is bytes for kind, m in seen if kind != "text pattern" and m != "\u00e9")


def test_binary_message_with_str_pattern_keeps_connection_alive():
    app, sockets = make_app()

    @sockets.on_message("^ECHO")
    def echo(message):
        return message

    @sockets.on_message
    def kind(message):
        return type(message).__name__

    fake = run(app, binary(b"ECHO"), text("ECHO"))
    assert fake.messages == ["bytes", "ECHO", "str"]


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("héllo", ("text", "héllo")),
        (b"\x00\x01", ("binary", b"\x00\x01")),
        (bytearray(b"ba"), ("binary", b"ba")),
        (memoryview(b"mv"), ("binary", b"mv")),
        ("", ("text", "")),
    ],
)
def test_reply_types(reply, expected):
    app, sockets = make_app()
    sockets.on_message(lambda message: reply)
    assert run(app, text("x")).frames[0] == expected


def test_none_reply_sends_nothing():
    app, sockets = make_app()
    sockets.on_message(lambda message: None)
    assert run(app, text("x")).frames == []


def test_flask_responses_send_their_body():
    app, sockets = make_app()
    replies = {
        "json": lambda: jsonify(reply="ok", n=1),
        "html": lambda: make_response("<b>hi</b>"),
        "latin1": lambda: Response("caf\u00e9".encode("latin-1"), content_type="text/plain; charset=latin-1"),
        "octets": lambda: Response(b"\x00\xff", mimetype="application/octet-stream"),
        "problem+json": lambda: Response('{"e":1}', mimetype="application/problem+json"),
    }
    sockets.on_message(lambda message: replies[message]())
    frames = run(app, *(text(k) for k in replies)).frames
    assert frames[0][0] == "text" and json.loads(frames[0][1]) == {"reply": "ok", "n": 1}
    assert frames[1:] == [
        ("text", "<b>hi</b>"),
        ("text", "caf\u00e9"),
        ("binary", b"\x00\xff"),
        ("text", '{"e":1}'),
    ]


@pytest.mark.parametrize("bad", [5, 1.5, {"a": 1}, ["x"], ("body", 200)])
def test_bad_reply_type_is_logged_sends_nothing_and_connection_survives(bad, caplog):
    app, sockets = make_app()

    @sockets.on_message("^bad")
    def bad_reply(message):
        return bad

    @sockets.on_message("^good")
    def good(message):
        return "still here"

    fake = run(app, text("bad"), text("good"))
    assert fake.frames == [("text", "still here")]
    [record] = [r for r in caplog.records if r.exc_info]
    err = record.exc_info[1]
    assert isinstance(err, TypeError)
    assert "bad_reply" in str(err) and type(bad).__name__ in str(err)


def test_ws_send_uses_the_same_coercion(caplog):
    app, sockets = make_app()

    @sockets.on_message
    def handler(message):
        ws.send("text")
        ws.send(b"bin")
        ws.send(jsonify(a=1))
        ws.send(None)
        ws.send(7)  # TypeError: nothing sent, error logged

    fake = run(app, text("go"))
    assert fake.frames[:2] == [("text", "text"), ("binary", b"bin")]
    assert json.loads(fake.frames[2][1]) == {"a": 1}
    assert len(fake.frames) == 3
    [record] = [r for r in caplog.records if r.exc_info]
    assert "ws.send() got int" in str(record.exc_info[1])


# ---------------------------------------------------------------------------
# Contexts
# ---------------------------------------------------------------------------


def test_handlers_run_in_the_handshake_request_context():
    app, sockets = make_app()

    @app.route("/login")
    def login():
        session["user"] = "ada"
        return "ok"

    @sockets.on_open
    def opened():
        g.count = 0

    @sockets.on_message
    def handler(message):
        g.count += 1
        return json.dumps(
            {
                "app": current_app.name,
                "path": request.path,
                "args": request.args.to_dict(),
                "header": request.headers.get("X-Test"),
                "cookie": request.cookies.get("theme"),
                "user": session.get("user"),
                "count": g.count,
                "url": url_for("websocket"),
            }
        )

    http = app.test_client()
    http.get("/login")
    http.set_cookie("theme", "dark")
    with sockets.test_client(http_client=http, query_string={"room": "7"}, headers={"X-Test": "yes"}) as client:
        client.send("a")
        client.send("b")
        first, second = json.loads(client.receive()), json.loads(client.receive())
    assert first == {
        "app": app.name,
        "path": "/",
        "args": {"room": "7"},
        "header": "yes",
        "cookie": "dark",
        "user": "ada",
        "count": 1,
        "url": "ws://localhost/",
    }
    assert second["count"] == 2


def test_flask_request_hooks_wrap_the_whole_connection():
    app, sockets = make_app()
    events = []

    @app.before_request
    def load_user():
        g.user = request.args.get("user")
        events.append("before_request")

    sockets.on_open(lambda: events.append(f"open {g.user}"))
    sockets.on_message(lambda message: f"{g.user}: {message}")
    sockets.on_close(lambda: events.append("close"))

    @app.after_request
    def after(response):
        events.append(f"after_request {response.status_code}")
        return response

    @app.teardown_request
    def teardown(exc):
        events.append("teardown_request")

    fake = run(app, text("hi"), path="/?user=ada")
    assert fake.status == 101 and fake.messages == ["ada: hi"]
    assert events == ["before_request", "open ada", "close", "after_request 101", "teardown_request"]


def test_on_a_real_server_handlers_see_the_handshakes_request_session_g_and_hooks_as_a_view_would():
    """Through WebSocketHandler's own header reading: headers, cookies, the session, g and the request hooks."""
    app, sockets = make_app()
    events = []

    @app.route("/login")
    def login():
        session["user"] = "ada"
        return "ok"

    @app.before_request
    def load():
        g.loaded = request.args.get("room")

    @app.teardown_request
    def teardown(exc):
        events.append(("teardown", request.path))

    @sockets.on_message
    def handler(message):
        if message == "fail":
            raise KeyError("boom")
        return json.dumps(
            {
                "app": current_app.name,
                "args": request.args.to_dict(),
                "header": request.headers.get("X-Test"),
                "repeated": request.headers.get("X-Repeated"),
                "cookie": request.cookies.get("theme"),
                "user": session.get("user"),
                "g": g.loaded,
                "remote": request.remote_addr,
            }
        )

    sockets.errorhandler(KeyError)(lambda error: f"handled {error}")
    with serving(app) as url:
        http_url = url.replace("ws://", "http://")
        with urllib.request.urlopen(f"{http_url}/login", timeout=5) as answer:
            session_cookie = answer.headers["Set-Cookie"].split(";")[0]
        headers = ["X-Test: yes", "X-Repeated: 1", "X-Repeated: 2", f"Cookie: {session_cookie}; theme=dark"]
        c = client(f"{url}/?room=7", header=headers)
        c.send("hi")
        assert json.loads(c.recv()) == {
            "app": app.name,
            "args": {"room": "7"},
            "header": "yes",
            "repeated": "1,2",
            "cookie": "dark",
            "user": "ada",
            "g": "7",
            "remote": "127.0.0.1",
        }
        c.send("fail")
        assert c.recv() == "handled 'boom'"
        c.close()
        wait_until(lambda: ("teardown", "/") in events, timeout=5)


def test_before_request_abort_refuses_the_connection():
    app, sockets = make_app()
    opened = []
    sockets.on_open(lambda: opened.append(request.full_path))

    @app.before_request
    def members_only():
        if "member" not in request.args:
            abort(403)

    fake = run(app, text("hi"))
    assert fake.status == 403 and fake.frames == []
    fake = run(app, text("hi"), via="gevent-websocket")
    assert fake.status == 403 and fake.frames == [("close", 1008, "403 FORBIDDEN")]
    fake = run(app, text("hi"), path="/?member")
    assert fake.status == 101 and fake.frames == []
    assert opened == ["/?member"], "the refused connection never opened"


def test_custom_response_class():
    class MyResponse(Response):
        pass

    app, sockets = make_app()
    app.response_class = MyResponse
    sockets.on_message(lambda message: message)
    assert run(app, text("hi")).messages == ["hi"]


def test_ws_outside_a_websocket_raises_a_helpful_error():
    app, sockets = make_app()
    with pytest.raises(RuntimeError, match="Working outside of websocket context"):
        ws.send("x")

    @app.route("/view")
    def view():
        try:
            return ws.path
        except RuntimeError as err:
            return str(err)

    message = app.test_client().get("/view").get_data(as_text=True)
    assert "has_socket_context()" in message and "broadcast" in message


def test_has_socket_context_in_handlers_and_views():
    app, sockets = make_app()
    seen = []
    sockets.on_open(lambda: seen.append(("open", has_socket_context())))
    sockets.on_message(lambda m: seen.append(("message", has_socket_context())))
    sockets.on_close(lambda: seen.append(("close", has_socket_context())))

    @app.route("/view")
    def view():
        seen.append(("view", has_socket_context()))
        return ""

    run(app, text("x"))
    app.test_client().get("/view")
    assert seen == [("open", True), ("message", True), ("close", True), ("view", False)]
    assert has_socket_context() is False


def test_concurrent_connections_see_their_own_ws_request_and_g():
    app, sockets = make_app()

    @sockets.on_open
    def opened():
        g.name = request.args["name"]

    @sockets.on_message
    def handler(message):
        mine = ws._get_current_object()
        gevent.sleep(0.01)  # let the other connection run in between
        assert ws._get_current_object() is mine
        return f"{g.name}:{request.args['name']}:{ws.environ['QUERY_STRING']}"

    alice = sockets.test_client(query_string="name=alice")
    bob = sockets.test_client(query_string="name=bob")
    for _ in range(3):
        alice.send("x")
        bob.send("x")
    assert [alice.receive() for _ in range(3)] == ["alice:alice:name=alice"] * 3
    assert [bob.receive() for _ in range(3)] == ["bob:bob:name=bob"] * 3
    alice.close()
    bob.close()


# ---------------------------------------------------------------------------
# The connection object
# ---------------------------------------------------------------------------


def test_connection_attributes():
    app, sockets = make_app()
    app.config["WEBSOCKETS_ALLOWED_ORIGINS"] = ["http://example.com"]
    seen = {}

    @sockets.on_message
    def handler(message):
        seen.update(
            path=ws.path,
            origin=ws.origin,
            subprotocol=ws.subprotocol,
            closed=ws.closed,
            environ_is_request_environ=ws.environ is request.environ,
            type=type(ws._get_current_object()),
        )

    run(app, text("x"), headers={"Origin": "http://example.com"})
    assert seen == {
        "path": "/",
        "origin": "http://example.com",
        "subprotocol": None,
        "closed": False,
        "environ_is_request_environ": True,
        "type": Connection,
    }


def test_close_sends_code_and_reason_and_completes_the_handshake():
    app, sockets = make_app()
    after = []

    @sockets.on_message
    def handler(message):
        ws.close(4000, "bye \u00e9")
        after.append((ws.closed, ws.close_code, ws.close_reason))
        with pytest.raises(ConnectionClosed):
            ws.send("too late")
        ws.close()  # closing twice does nothing
        return "dropped: the connection is closing"

    @sockets.on_message
    def second(message):
        return "dropped too"

    fake = connect(app)
    fake.send("quit")
    fake.send("ignored: sent after the server's close frame")
    assert fake.wait_for(1) == [("close", 4000, "bye \u00e9")]
    gevent.idle()
    assert not fake.greenlet.dead, "the server waits for the client's close frame"
    fake.feed(close(4000))
    fake.read_until_eof()
    assert fake.end().frames == [("close", 4000, "bye \u00e9")]
    assert after == [(True, 4000, "bye \u00e9")]


def test_close_gives_up_on_a_silent_client_after_the_close_timeout():
    app, sockets = make_app()
    sockets._clock = clock = FakeClock()
    app.config["WEBSOCKETS_CLOSE_TIMEOUT"] = 3
    sockets.on_message(lambda message: ws.close(1001))
    fake = connect(app)
    fake.send("x")
    assert fake.wait_for(1) == [("close", 1001, "")]
    clock.advance(2.9)
    assert not fake.greenlet.dead, "the server waits for the client's close frame"
    clock.advance(0.1)
    fake.read_until_eof()
    assert fake.end().frames == [("close", 1001, "")]


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2000, 5000])
def test_close_rejects_codes_a_server_may_not_send(code):
    conn = Connection({}, sock=None)
    with pytest.raises(ValueError, match="may not be sent"):
        conn.close(code)


def test_close_rejects_a_long_reason():
    conn = Connection({}, sock=None)
    with pytest.raises(ValueError, match="123 bytes"):
        conn.close(1000, "\u00e9" * 62)


# ---------------------------------------------------------------------------
# Lifecycle, broadcast
# ---------------------------------------------------------------------------


def lifecycle_app():
    app, sockets = make_app(match_one=True)
    events = []

    @sockets.on_open
    def opened():
        events.append("open")

    @sockets.on_message("^boom")
    def boom(message):
        raise KeyError("boom")

    @sockets.on_message
    def handler(message):
        events.append(message)
        return message

    @sockets.on_close
    def closed():
        events.append(("close", ws.close_code))

    return app, sockets, events


def test_on_close_once_after_a_clean_close():
    app, sockets, events = lifecycle_app()
    fake = run(app, text("hi"), close(1000, "done"))
    assert events == ["open", "hi", ("close", 1000)]
    assert fake.frames == [("text", "hi"), ("close", 1000, "")]
    assert sockets._connections == set()


def test_on_close_once_after_an_abrupt_disconnect():
    app, sockets, events = lifecycle_app()
    fake = run(app, text("hi"), text("cut mid-fra")[:-3])
    assert events == ["open", "hi", ("close", 1006)]
    assert fake.frames == [("text", "hi")]
    assert sockets._connections == set()


def test_on_close_once_after_a_protocol_error():
    app, sockets, events = lifecycle_app()
    fake = run(app, client_frame(TEXT, b"x", masked=False))
    assert events == ["open", ("close", 1002)]
    assert fake.frames == [("close", 1002, "client frames must be masked")]


def test_on_close_once_after_a_propagated_handler_error():
    app, sockets, events = lifecycle_app()
    app.testing = True
    fake = connect(app)
    fake.send("boom")
    assert fake.wait_for(1) == [("close", 1011, "internal error")]
    fake.feed(close(1011))
    with pytest.raises(KeyError, match="boom"):
        fake.end()
    assert events == ["open", ("close", 1011)]
    assert sockets._connections == set()


def test_zero_argument_hooks_and_failing_on_open_closes_with_1011(caplog):
    app, sockets = make_app()
    events = []

    @sockets.on_open
    def opened():
        raise ValueError("no database")

    @sockets.on_message
    def never(message):
        events.append(message)

    @sockets.on_close
    def closed():
        events.append("close")

    fake = run(app, text("x"))
    assert fake.frames == [("close", 1011, "internal error")]
    assert events == ["close"]
    assert "no database" in caplog.text


def test_failing_on_close_hook_is_logged_and_others_still_run(caplog):
    app, sockets = make_app()
    events = []
    sockets.on_close(lambda: 1 / 0)
    sockets.on_close(lambda: events.append("second"))
    run(app)
    assert events == ["second"]
    assert "ZeroDivisionError" in caplog.text


def test_each_on_close_hook_runs_even_when_one_raises_with_errors_propagating():
    app, sockets = make_app()
    app.testing = True  # errors propagate
    events = []
    sockets.on_close(lambda: events.append("first"))
    sockets.on_close(lambda: 1 / 0)
    sockets.on_close(lambda: events.append("third"))
    client_ = sockets.test_client()
    with pytest.raises(ZeroDivisionError):
        client_.close()
    assert events == ["first", "third"]
    assert sockets._connections == set()


@pytest.mark.parametrize("origins", [list, tuple, set, frozenset])
def test_settings_are_checked_once_whatever_the_type_of_allowed_origins(origins, monkeypatch):
    checks = []
    check = flask_websockets._check_settings
    monkeypatch.setattr(flask_websockets, "_check_settings", lambda values: checks.append(1) or check(values))
    app, sockets = make_app()
    app.config["WEBSOCKETS_ALLOWED_ORIGINS"] = origins(["https://a.example"])
    sockets.on_message(lambda message: message)
    for _ in range(3):
        with sockets.test_client(headers={"Origin": "https://a.example"}) as client_:
            client_.send("hi")
            assert client_.receive() == "hi"
    assert len(checks) == 2, "once at init_app, once after the change: not at every handshake"
    if origins in (list, set):  # changed in place: noticed
        allowed = app.config["WEBSOCKETS_ALLOWED_ORIGINS"]
        allowed.append("https://b.example") if origins is list else allowed.add("https://b.example")
        with sockets.test_client(headers={"Origin": "https://b.example"}):
            pass
        assert len(checks) == 3
    with pytest.raises(HandshakeRefused):
        sockets.test_client(headers={"Origin": "https://c.example"})


def test_broadcast_reaches_every_open_connection_and_drops_dead_ones():
    app, sockets = make_app()
    sockets.on_message("^all (.*)")(lambda m: sockets.broadcast(m[4:]) and None)
    a, b, dead = connect(app), connect(app), connect(app)
    gevent.idle()
    assert len(sockets._connections) == 3
    dead.sock.close()  # gone without a word
    assert sockets.broadcast("first") in (2, 3)  # 3 if the server has not noticed yet
    dead.greenlet.join(timeout=2)
    assert len(sockets._connections) == 2, "the dead connection was dropped"
    a.send("all hello")
    a.wait_for(2)
    b.wait_for(2)
    assert a.messages == b.messages == ["first", "hello"]
    assert sockets.broadcast(b"\x01") == 2
    assert sockets.broadcast(None) == 0
    with pytest.raises(TypeError, match="broadcast"):
        sockets.broadcast(3)
    for fake in (a, b):
        fake.disconnect()
        fake.read_until_eof()
        fake.end()
    assert a.messages == b.messages == ["first", "hello", b"\x01"]
    assert sockets._connections == set()
    assert sockets.broadcast("nobody") == 0


def test_broadcast_from_an_http_view():
    app, sockets = make_app()

    @app.post("/announce")
    def announce():
        return f"sent to {sockets.broadcast(request.form['text'])}"

    with sockets.test_client() as client:
        response = app.test_client().post("/announce", data={"text": "hello all"})
        assert response.data == b"sent to 1"
        assert client.receive() == "hello all"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_handler_error_is_logged_through_flask_and_connection_survives(caplog):
    app, sockets, events = lifecycle_app()
    fake = run(app, text("boom"), text("after"))
    assert events == ["open", "after", ("close", 1006)]
    assert fake.frames == [("text", "after")]
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.name == app.logger.name
    assert record.getMessage() == "Exception in test_flask_websockets.lifecycle_app.<locals>.boom, websocket /"
    assert isinstance(record.exc_info[1], KeyError), "with its traceback"


def test_handler_error_does_not_affect_other_connections():
    app, sockets, events = lifecycle_app()
    with sockets.test_client() as a, sockets.test_client() as b:
        a.send("boom")
        b.send("still fine")
        assert b.receive() == "still fine"
        a.send("fine too")
        assert a.receive() == "fine too"


def test_a_send_to_a_closed_connection_in_a_handler_is_dropped_quietly(caplog):
    app, sockets = make_app()
    sent = []

    @sockets.on_message
    def chatty(message):
        ws.close(4000, "bye")
        ws.send("after the close")  # raises ConnectionClosed, which the endpoint drops
        sent.append("not reached")

    with sockets.test_client() as client_:
        client_.send("hi")
        with pytest.raises(ConnectionClosed):
            client_.receive()
        assert client_.close_code == 4000
    assert sent == [] and "Traceback" not in caplog.text and "Exception" not in caplog.text


def test_errors_in_on_open_and_on_close_go_to_the_error_handlers():
    app, sockets = make_app()
    handled = []
    sockets.on_open(lambda: 1 / 0)
    sockets.on_close(lambda: {}["missing"])

    @sockets.errorhandler(ArithmeticError)
    def arithmetic(error):
        handled.append(type(error).__name__)
        return "on_open failed"

    @sockets.errorhandler(LookupError)
    def lookup(error):
        handled.append(type(error).__name__)

    with sockets.test_client() as client_:
        assert client_.receive() == "on_open failed"  # handled: the connection goes on
        client_.send("x")
    assert handled == ["ZeroDivisionError", "KeyError"]


def test_with_errors_propagating_a_failing_on_open_closes_with_1011_and_the_test_sees_it():
    app, sockets = make_app()
    app.testing = True
    closes = []
    sockets.on_open(lambda: 1 / 0)
    sockets.on_close(lambda: closes.append(ws.close_code))
    client_ = sockets.test_client()
    with pytest.raises(ZeroDivisionError):
        client_.receive()
    assert client_.close_code == 1011 and closes == [1011]


@pytest.mark.parametrize(
    "testing, propagate, raises",
    [(True, None, True), (False, True, True), (True, False, False), (False, None, False)],
)
def test_propagation_follows_testing_and_propagate_exceptions(testing, propagate, raises):
    app, sockets, events = lifecycle_app()
    app.testing = testing
    app.config["PROPAGATE_EXCEPTIONS"] = propagate
    app.debug = True  # debug alone never propagates
    if raises:
        with pytest.raises(KeyError):
            run(app, text("boom"))
    else:
        assert run(app, text("boom"), text("ok")).messages == ["ok"]


# ---------------------------------------------------------------------------
# Workers: the greenlets that run the handlers while the views wait
# ---------------------------------------------------------------------------


def test_a_handler_that_waits_holds_its_own_connection_not_the_others():
    app, sockets = make_app()
    release, order = gevent.event.Event(), []

    @sockets.on_message
    def handler(message):
        if message == "wait":
            assert release.wait(5)
        order.append((request.args["who"], message))
        return message

    with sockets.test_client(query_string={"who": "a"}) as a, sockets.test_client(query_string={"who": "b"}) as b:
        a.send("wait")
        a.send("after")
        for message in ("one", "two", "three"):
            b.send(message)
            assert b.receive() == message  # served while a's handler waits
        assert order == [("b", "one"), ("b", "two"), ("b", "three")], "a's next message waits for its handler"
        release.set()
        assert [a.receive(), a.receive()] == ["wait", "after"]
    assert order[3:] == [("a", "wait"), ("a", "after")]


def test_handlers_that_wait_hold_nobody_whose_message_came_in_the_same_turn():
    """A worker waits in a handler: the messages queued behind it in that turn go to another worker."""
    app, sockets = make_app()
    release = gevent.event.Event()
    sockets.on_message(lambda message: release.wait(5) and message if message == "wait" else message)
    clients = [sockets.test_client() for _ in range(20)]
    try:
        for i, c in enumerate(clients):
            c.send("wait" if i % 2 == 0 else str(i))  # all read in the loop's next turn
        for i, c in enumerate(clients[1::2]):
            assert c.receive(timeout=2) == str(2 * i + 1)
        release.set()
        assert [c.receive(timeout=2) for c in clients[::2]] == ["wait"] * 10
    finally:
        for c in clients:
            c.close()


def test_handlers_of_many_connections_interleaved_each_see_their_own_context_in_order():
    """300 connections x 20 messages, a third of the handlers yielding: each reply once, in order, in its context."""
    app, sockets = make_app()
    rng = random.Random(7)

    @app.before_request
    def start():
        g.count = 0

    @sockets.on_message
    def handler(message):
        g.count += 1
        if rng.random() < 0.3:
            gevent.sleep(0)  # its worker waits: another takes the other connections' messages
        return f"{request.args['who']}:{g.count}:{ws.state.setdefault('who', request.args['who'])}:{message}"

    clients = [sockets.test_client(query_string={"who": str(i)}) for i in range(300)]
    try:
        for n in range(20):
            for c in clients:
                c.send(str(n))
        for i, c in enumerate(clients):
            assert [c.receive(timeout=5) for _ in range(20)] == [f"{i}:{n + 1}:{i}:{n}" for n in range(20)]
    finally:
        for c in clients:
            c.close()


def test_a_propagated_error_from_a_handler_reaches_the_view_and_the_test_while_others_go_on():
    app, sockets = make_app()
    app.testing = True
    sockets.on_message(lambda message: {}[message] if message == "missing" else message)
    with sockets.test_client() as other:
        client_ = sockets.test_client()
        client_.send("missing")
        other.send("fine")
        with pytest.raises(KeyError, match="missing"):
            client_.receive()
        assert client_.close_code == 1011
        assert other.receive() == "fine"


def test_an_error_propagating_after_the_handler_closed_its_connection_still_reaches_the_test():
    app, sockets = make_app()
    app.testing = True
    closes = []
    sockets.on_message(lambda message: ws.close(4000, "bye") or 1 / 0)
    sockets.on_close(lambda: closes.append(ws.close_code))
    client_ = sockets.test_client()
    client_.send("x")
    with pytest.raises(ZeroDivisionError):
        client_.receive()
    assert client_.close_code == 4000 and closes == [4000]


def test_a_context_variable_a_handler_sets_is_seen_by_the_next_handlers_on_close_and_teardown():
    """Handlers run in the view's own context, as when they ran in its greenlet (structlog, tracing scopes)."""
    app, sockets = make_app()
    request_id, seen = contextvars.ContextVar("request_id", default=None), []

    @sockets.on_message
    def handler(message):
        seen.append(("handler", request_id.get()))
        request_id.set(message)
        return "ok"

    sockets.on_close(lambda: seen.append(("on_close", request_id.get())))
    app.teardown_request(lambda error: seen.append(("teardown", request_id.get())))
    with sockets.test_client() as client_:
        for message in ("a", "b"):
            client_.send(message)
            assert client_.receive() == "ok"
    assert seen == [("handler", None), ("handler", "a"), ("on_close", "b"), ("teardown", "b")]


def test_an_on_close_hook_that_waits_is_not_woken_by_a_wake_meant_for_the_view():
    """The view is killed (a server's stop) in the turn a worker's handler closed the connection and woke it."""
    app, sockets = make_app()
    views, events = [], []

    @sockets.on_message
    def close_and_kill(message):
        views[0].kill(block=False)  # the kill runs before the view's wake, in the loop's next callbacks
        ws.close(1000)

    def waiting_hook():
        gevent.sleep(0.05)  # a hook that waits: a stray switch into it would break the sleep
        events.append("on_close slept")

    sockets.on_close(waiting_hook)
    client_ = sockets.test_client()
    views.append(client_._server)
    client_.send("x")
    client_._server.join(5)
    client_._sock.close()  # (the test client's own end; its server is gone)
    assert client_._server.dead and events == ["on_close slept"]


@pytest.mark.slow
def test_real_a_stopping_server_interrupts_a_waiting_handler_before_on_close_and_teardown():
    """As when the handler ran in the view's greenlet: GreenletExit in the handler, then on_close, then teardown."""
    app, sockets = make_app()
    events, waiting = [], threading.Event()

    @sockets.on_message
    def stuck(message):
        waiting.set()
        try:
            gevent.sleep(60)
        except gevent.GreenletExit:
            events.append(("interrupted", request.args["who"]))
            raise

    sockets.on_close(lambda: events.append(("on_close", request.args["who"])))
    app.teardown_request(lambda error: events.append(("teardown", request.args.get("who"))))
    with serving(app) as url:
        c = client(url + "/?who=ada")
        c.send("x")
        assert waiting.wait(5)
    assert events == [("interrupted", "ada"), ("on_close", "ada"), ("teardown", "ada")]


# ---------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------


def echo_app():
    app, sockets = make_app()
    sockets.on_message(lambda message: message)
    return app


def test_fragmented_messages_and_control_frames_in_between():
    fake = run(
        echo_app(),
        client_frame(TEXT, "h\u00e9".encode()[:2], fin=False),
        client_frame(PING, b"p"),
        client_frame(0, "h\u00e9".encode()[2:] + b"llo", fin=True),
        client_frame(BINARY, b"\x00", fin=False),
        client_frame(0, b"\x01", fin=False),
        client_frame(0, b"", fin=True),
        close(1001),
    )
    assert fake.frames == [
        ("pong", b"p"),
        ("text", "h\u00e9llo"),
        ("binary", b"\x00\x01"),
        ("close", 1001, ""),
    ]


def test_client_close_without_code_is_answered_with_1000():
    fake = run(echo_app(), client_frame(CLOSE, b""))
    assert fake.frames == [("close", 1000, "")]


def test_invalid_utf8_closes_with_1007():
    fake = run(echo_app(), text("ok"), client_frame(TEXT, b"\xff\xfe"))
    assert fake.frames == [("text", "ok"), ("close", 1007, "invalid UTF-8 in a text message")]


def test_invalid_utf8_fragment_fails_before_the_message_ends():
    fake = connect(echo_app())
    fake.feed(client_frame(TEXT, b"valid ", fin=False), client_frame(0, b"\xc0\xaf", fin=False))
    assert fake.wait_for(1) == [("close", 1007, "invalid UTF-8 in a text message")]
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


def test_invalid_utf8_fails_at_the_bad_byte_of_a_frame_still_arriving():
    """Autobahn 6.4.3/6.4.4: no waiting for the end of the frame."""
    fake = connect(echo_app())
    frame = client_frame(TEXT, b"valid, then \xf4\x90\x80\x80 and more" + b"x" * 1000)
    fake.feed(frame[:30])  # the header and the bad sequence, of a frame announced as 1,037 bytes
    assert fake.wait_for(1) == [("close", 1007, "invalid UTF-8 in a text message")]
    fake.feed(frame[30:], close(1007))
    fake.read_until_eof()
    fake.end()


def test_truncated_utf8_sequence_at_message_end_closes_with_1007():
    fake = run(echo_app(), client_frame(TEXT, b"\xe2\x82", fin=False), client_frame(0, b"", fin=True))
    assert fake.frames == [("close", 1007, "invalid UTF-8 in a text message")]


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([client_frame(TEXT, b"x", masked=False)], "client frames must be masked"),
        ([client_frame(TEXT, b"x", rsv=0x40)], "reserved bits set without an extension"),
        ([client_frame(3, b"x")], "reserved opcode 3"),
        ([client_frame(0xB, b"x")], "reserved opcode 11"),
        ([client_frame(0, b"x")], "continuation frame outside a fragmented message"),
        (
            [client_frame(TEXT, b"x", fin=False), client_frame(TEXT, b"y")],
            "new message inside a fragmented message",
        ),
        ([client_frame(PING, b"x", fin=False)], "control frames must be whole and at most 125 bytes"),
        ([client_frame(PING, b"x" * 126)], "control frames must be whole and at most 125 bytes"),
        ([client_frame(CLOSE, b"\x03")], "close frame with a 1-byte payload"),
        ([client_frame(CLOSE, close_payload(1005))], "invalid close code 1005"),
        ([client_frame(CLOSE, close_payload(999))], "invalid close code 999"),
    ],
)
def test_protocol_violations_close_with_1002(frames, reason):
    fake = run(echo_app(), *frames, text("never handled"))
    assert fake.frames == [("close", 1002, reason)]


@pytest.mark.parametrize(
    "bad_close, answer",
    [
        (client_frame(CLOSE, b"\x03"), (1002, "close frame with a 1-byte payload")),
        (client_frame(CLOSE, close_payload(1004)), (1002, "invalid close code 1004")),
        (client_frame(CLOSE, b"\x03\xe8\xff"), (1007, "invalid UTF-8 in the close reason")),
        (
            client_frame(CLOSE, close_payload(1000, "x" * 124)),  # a 126-byte control frame
            (1002, "control frames must be whole and at most 125 bytes"),
        ),
    ],
)
def test_a_malformed_close_frame_is_answered_and_the_connection_ends_at_once(bad_close, answer):
    app, sockets, events = lifecycle_app()
    app.config["WEBSOCKETS_CLOSE_TIMEOUT"] = None  # waiting for another close frame would hang the test
    fake = connect(app)
    fake.feed(bad_close)  # the client's last frame: it sends nothing more, and keeps TCP open
    fake.read_until_eof()
    assert fake.end().frames == [("close", *answer)]
    assert events == ["open", ("close", answer[0])]


@pytest.mark.parametrize(
    "bad_frame",
    [
        client_frame(TEXT, b"Hello, world!", rsv=0x40),
        # Its mask parses as the header of a 16-byte frame, longer than what follows:
        # reading on from the bad header, instead of skipping the frame, would wait forever.
        client_frame(TEXT, b"abcd", rsv=0x40, mask=b"\x82\x90\x00\x00"),
        client_frame(BINARY, b"x" * 300, rsv=0x10),  # a 16-bit extended length
        client_frame(TEXT, b"unmasked frame", masked=False),
        client_frame(PING, b"p" * 126),
    ],
)
def test_after_a_bad_frame_the_rest_of_it_is_skipped_to_read_the_clients_close(bad_frame):
    app, sockets, events = lifecycle_app()
    app.config["WEBSOCKETS_CLOSE_TIMEOUT"] = None
    fake = connect(app)
    fake.feed(bad_frame)
    assert fake.wait_for(1)[0][:2] == ("close", 1002)
    fake.feed(close(1002))  # the client answers the server's close
    fake.read_until_eof()  # the server closed as soon as the client's close frame came
    fake.end()
    assert events == ["open", ("close", 1002)]


@pytest.mark.parametrize("via", ["ours", "gevent-websocket"])
def test_bytes_that_came_with_the_handshake_are_read_first(via):
    """A client may send its first frame right behind the handshake, into the server's reader."""
    first = text("early")
    assert run(echo_app(), first[3:], text("later"), buffered=first[:3], via=via).messages == ["early", "later"]


def test_large_frames_use_extended_lengths():
    big, huge = "x" * 300, b"y" * 70000
    fake = run(echo_app(), text(big), binary(huge))
    assert fake.messages == [big, huge]
    assert fake.received[1] == 126 and fake.received[2 + 2 + 300 + 1] == 127


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 399, 400, 401, 1025, 4099, 65536, 65539])
def test_unmask_matches_the_rfc_definition(size):
    payload, mask = os.urandom(size), os.urandom(4)
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    for unmask in (flask_websockets._unmask_python, flask_websockets._unmask):  # _unmask: C's, if installed
        assert unmask(payload, mask) == expected
        result = unmask(bytearray(payload), mask)  # long payloads arrive in a bytearray
        assert result == expected and type(result) is bytes


def test_with_the_speedups_extra_unmasking_runs_in_c():
    if os.environ.get("FLASK_WEBSOCKETS_PURE_PYTHON"):
        assert flask_websockets._unmask is flask_websockets._unmask_python
        pytest.skip("pure Python asked for")
    try:
        from websockets.speedups import apply_mask
    except ImportError:
        missing("the websockets library's C speedups: pip install \".[speedups]\"", "speedups")
    assert flask_websockets._unmask is apply_mask  # the C function itself, no Python frame between
    assert apply_mask(b"abcd", b"\x01\x01\x01\x01") == flask_websockets._unmask(b"abcd", b"\x01\x01\x01\x01")


@pytest.mark.parametrize("size, start, phase", [(1, 0, 0), (7, 3, 1), (401, 5, 2), (4099, 0, 3), (70000, 17, 5)])
def test_unmasking_on_the_way_into_a_message_from_any_point_of_a_frame(size, start, phase):
    payload, mask = os.urandom(size), os.urandom(4)
    expected = bytes(b ^ mask[(phase + i) % 4] for i, b in enumerate(payload))
    for append_unmasked in (flask_websockets._append_unmasked_python, flask_websockets._append_unmasked):
        data = bytearray(b"h" * start)
        append_unmasked(data, memoryview(b"..." + payload)[3:], mask, phase)
        assert data == b"h" * start + expected


# ---------------------------------------------------------------------------
# The protocol core, driven with bytes
# ---------------------------------------------------------------------------


def events(proto, *chunks):
    """Feed ``chunks`` one by one; return every event, as it came."""
    out = []
    for chunk in chunks:
        proto.receive_data(chunk)
        while (event := proto.next_event()) is not None:
            out.append(event)
    return out


def one_byte_at_a_time(data):
    return [data[i : i + 1] for i in range(len(data))]


CONVERSATION = b"".join(
    [
        client_frame(TEXT, "h\u00e9".encode()[:2], fin=False),
        client_frame(PING, b"p"),
        client_frame(0, "h\u00e9".encode()[2:] + b"llo"),
        client_frame(BINARY, b"\x00" * 300),
        client_frame(BINARY, b"\x01", fin=False),
        client_frame(0, b"", fin=False),
        client_frame(0, b"\x02"),
        client_frame(CLOSE, close_payload(1001, "bye")),
    ]
)
CONVERSATION_EVENTS = [
    (PING, b"p"),
    (TEXT, "h\u00e9llo"),
    (BINARY, b"\x00" * 300),
    (BINARY, b"\x01\x02"),
    (CLOSE, (1001, "bye")),
]


@pytest.mark.parametrize("chunking", ["whole", "byte by byte", "uneven"])
def test_the_protocol_core_gives_the_same_events_however_the_bytes_arrive(chunking):
    proto = _Protocol()
    chunks = {
        "whole": [CONVERSATION],
        "byte by byte": one_byte_at_a_time(CONVERSATION),
        "uneven": [CONVERSATION[i : i + 7] for i in range(0, len(CONVERSATION), 7)],
    }[chunking]
    assert events(proto, *chunks) == CONVERSATION_EVENTS
    assert proto.state is _State.CLOSED and (proto.close_code, proto.close_reason) == (1001, "bye")
    # It answered the ping and the close frame, the latter with the client's code.
    assert parse_server_frames(proto.data_to_send()) == [("pong", b"p"), ("close", 1001, "")]
    proto.receive_data(text("after the close"))
    assert proto.next_event() is None, "nothing comes after the closing handshake"


@pytest.mark.parametrize("chunking", ["whole", "byte by byte", "uneven"])
def test_one_frame_messages_back_to_back_come_whole_and_in_order(chunking):
    """A whole message in one frame takes the parser's shortest path: its edges, at each length field's size."""
    sizes = (0, 1, 2, 5, 124, 125, 126, 127, 250, 65535, 65536, 70000)
    messages = [("\u00e9" * (n // 2) if n % 3 else bytes(i % 256 for i in range(n))) for n in sizes]
    data = b"".join(text(m) if isinstance(m, str) else binary(m) for m in messages)
    chunks = {
        "whole": [data],
        "byte by byte": one_byte_at_a_time(data),
        "uneven": [data[i : i + 5] for i in range(0, len(data), 5)],
    }[chunking]
    assert events(_Protocol(), *chunks) == [(TEXT if isinstance(m, str) else BINARY, m) for m in messages]


def test_a_one_frame_message_fails_as_any_other_over_a_low_limit_unmasked_or_not_utf8():
    failed = flask_websockets._FAILED
    assert events(_Protocol(max_size=10), text("x" * 10), text("x" * 11), text("never")) == [
        (TEXT, "x" * 10),
        (failed, (1009, "message over 10 bytes")),
    ]
    for size in (3, 300, 70000):  # whatever the size of its length field
        assert events(_Protocol(), client_frame(TEXT, b"a" * size, masked=False)) == [
            (failed, (1002, "client frames must be masked"))
        ]
    assert events(_Protocol(max_size=200), client_frame(BINARY, b"x" * 201)) == [
        (failed, (1009, "message over 200 bytes"))
    ]
    assert events(_Protocol(), client_frame(BINARY, b"ok"), client_frame(TEXT, b"\xff")) == [
        (BINARY, b"ok"),
        (failed, (1007, "invalid UTF-8 in a text message")),
    ]
    client = _Protocol(client=True, max_size=None)  # a client's input: unmasked frames from the server
    assert events(client, bytes([0x81, 3]) + b"abc" + bytes([0x82, 0])) == [(TEXT, "abc"), (BINARY, b"")]


def test_a_payload_arriving_in_tiny_pieces_is_never_copied_over_again():
    """Reassembly is linear: the parse buffer holds a partial header at most."""
    proto = _Protocol()
    frame = binary(bytes(range(256)) * 256)
    largest_buffer = 0
    out = []
    for piece in one_byte_at_a_time(frame):
        proto.receive_data(piece)
        while (event := proto.next_event()) is not None:
            out.append(event)
        largest_buffer = max(largest_buffer, len(proto._buf) - proto._pos)
    assert out == [(BINARY, bytes(range(256)) * 256)]
    assert largest_buffer <= 14


def test_invalid_utf8_fails_within_the_bad_sequence_not_at_the_end_of_the_frame():
    proto = _Protocol()
    frame = client_frame(TEXT, "ok \u00e9 ".encode() + b"\xed\xa0\x80" + b"x" * 100)  # a surrogate: invalid
    bad_sequence = 2 + 4 + len("ok \u00e9 ".encode())  # after the header (7-bit length, then the mask)
    seen = []
    for i, piece in enumerate(one_byte_at_a_time(frame)):  # noqa: B007 - i is read after the loop
        seen += events(proto, piece)
        if seen:
            break
    assert seen == [(flask_websockets._FAILED, (1007, "invalid UTF-8 in a text message"))]
    assert bad_sequence <= i < bad_sequence + 3, "failed within the bad sequence, 100 bytes before the frame's end"
    assert parse_server_frames(proto.data_to_send()) == [("close", 1007, "invalid UTF-8 in a text message")]


def test_a_message_is_held_in_one_buffer_that_grows_as_bytes_arrive():
    proto = _Protocol(max_size=1 << 20)
    header = bytes([0x82, 0xFF]) + (1 << 20).to_bytes(8, "big") + b"mask"  # announces 1 MiB
    assert events(proto, header, b"\x00" * 1000) == []
    assert len(proto._message) == 1000, "nothing is allocated for bytes that have not arrived"


def test_no_limit_never_allocates_for_an_announced_length():
    proto = _Protocol(max_size=None)
    assert events(proto, bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big") + b"mask", b"abc") == []
    assert len(proto._message) == 3


def test_small_fragments_count_as_64_bytes_against_the_limit():
    proto = _Protocol(max_size=1 << 20)
    frames = [client_frame(BINARY, b"", fin=False)] + [client_frame(0, b"", fin=False)] * 20_000
    failure = (flask_websockets._FAILED, (1009, "message over 1048576 bytes"))
    assert events(proto, *frames) == [failure]
    assert proto.state is _State.CLOSING
    # The 16,385th empty fragment was one too many: 16,384 x 64 bytes is the limit.
    proto = _Protocol(max_size=1 << 20)
    assert events(proto, *frames[:16_385]) == []
    assert events(proto, frames[16_385]) == [failure]


def test_an_oversized_message_fails_at_once_but_its_close_frame_waits_for_its_end():
    proto = _Protocol(max_size=1000)
    failure = (flask_websockets._FAILED, (1009, "message over 1000 bytes"))
    assert events(proto, client_frame(BINARY, b"x" * 800, fin=False), client_frame(0, b"x" * 800)[:300]) == [failure]
    assert proto.state is _State.CLOSING and proto.data_to_send() == b"", "the client is still sending"
    assert events(proto, client_frame(0, b"x" * 800)[300:]) == []  # the rest of its last frame, skipped
    assert parse_server_frames(proto.data_to_send()) == [("close", 1009, "message over 1000 bytes")]
    proto = _Protocol(max_size=1000)
    assert events(proto, client_frame(BINARY, b"x" * 800, fin=False), client_frame(0, b"x" * 800)[:100]) == [failure]
    assert proto.close_now() and parse_server_frames(proto.data_to_send())[0][:2] == ("close", 1009)
    assert not proto.close_now(), "only once"


@pytest.mark.parametrize("length", [1001, 1 << 20, 1 << 62])
def test_a_single_frame_announcing_more_than_the_limit_gets_its_1009_at_once(length):
    """Its end may never come (2**62 bytes): only a message growing fragment by fragment waits for its end."""
    for first in (True, False):
        proto = _Protocol(max_size=1000)
        opening = [] if first else [client_frame(BINARY, b"x" * 10, fin=False)]
        header = bytes([0x82 if first else 0x00, 0xFF]) + length.to_bytes(8, "big") + b"mask"
        assert events(proto, *opening, header) == [(flask_websockets._FAILED, (1009, "message over 1000 bytes"))]
        assert parse_server_frames(proto.data_to_send()) == [("close", 1009, "message over 1000 bytes")]
        assert events(proto, b"\x00" * 500) == [] and proto.data_to_send() == b"", "what follows is skipped"


def test_the_deferred_1009_goes_out_when_the_client_closes_in_the_middle_of_the_oversized_message():
    server = _Protocol(max_size=1000)
    server.receive_data(client_frame(TEXT, b"y" * 800, fin=False) + client_frame(0, b"y" * 800, fin=False))
    assert server.next_event() == (flask_websockets._FAILED, (1009, "message over 1000 bytes"))
    assert server.next_event() is None and server.data_to_send() == b"", "deferred to the message's end"
    server.receive_data(close(1000, "bye"))  # the client gives up on its message
    assert server.next_event()[0] == CLOSE and server.state is _State.CLOSED
    assert parse_server_frames(server.data_to_send()) == [("close", 1009, "message over 1000 bytes")]


def test_after_its_close_frame_the_server_skips_whatever_arrives_until_the_clients():
    proto = _Protocol(max_size=100)
    proto.send_close(1009, "too big")
    assert proto.state is _State.CLOSING
    garbage = [
        client_frame(BINARY, b"x" * 200_000),  # over the limit
        client_frame(TEXT, b"\xff", masked=False),  # unmasked, invalid UTF-8
        client_frame(3, b"x", rsv=0x70),  # reserved bits and opcode
        client_frame(PING, b"not answered"),
    ]
    assert events(proto, *garbage) == []
    assert events(proto, close(1009)) == [(CLOSE, (1009, "too big"))]
    assert proto.state is _State.CLOSED
    assert parse_server_frames(proto.data_to_send()) == [("close", 1009, "too big")], "no pong, no second close"


def test_chromium_s_2_mib_in_17_fragments_is_refused_and_closes_cleanly():
    proto = _Protocol()  # 1 MiB
    fragments = [client_frame(BINARY if i == 0 else 0, b"x" * 131072, fin=i == 16) for i in range(17)]
    out = events(proto, *[chunk for f in fragments for chunk in (f[:5000], f[5000:])], close(1009))
    reason = "message over 1048576 bytes"
    assert out == [(flask_websockets._FAILED, (1009, reason)), (CLOSE, (1009, reason))]
    assert proto.state is _State.CLOSED


def test_a_lost_connection_is_1006_and_a_close_after_ours_keeps_our_code():
    proto = _Protocol()
    events(proto, text("half a frame")[:5])
    proto.receive_eof()
    assert proto.next_event() is None
    assert (proto.state, proto.close_code) == (_State.CLOSED, 1006)
    proto = _Protocol()
    proto.send_close(4000, "mine")
    proto.receive_eof()
    assert proto.next_event() is None
    assert (proto.state, proto.close_code, proto.close_reason) == (_State.CLOSED, 4000, "mine")


def test_the_client_side_masks_its_frames_and_refuses_masked_ones():
    client = _Protocol(client=True)
    frame = client.message("hi")
    assert frame[1] & 0x80, "client frames are masked"
    server = _Protocol()
    assert events(server, frame) == [(TEXT, "hi")]
    assert events(client, server.frame(TEXT, b"back")) == [(TEXT, "back")]
    assert events(client, client_frame(TEXT, b"masked")) == [
        (flask_websockets._FAILED, (1002, "server frames must not be masked"))
    ]


def test_a_long_close_reason_is_cut_between_characters():
    payload = flask_websockets._close_payload(1000, "\u00e9" * 100)  # 200 bytes of UTF-8
    assert len(payload) == 2 + 122 and payload[2:].decode("utf-8") == "\u00e9" * 61


# ---------------------------------------------------------------------------
# Compression: permessage-deflate (RFC 7692)
# ---------------------------------------------------------------------------

agree = flask_websockets._agree_deflate


def deflated(message, bits=12, final=False):
    """A message compressed on its own, as a client sends it (RSV1 goes on its frame).

    ``final`` ends it with a final deflate block, as RFC 7692 7.2.3.4 allows.
    """
    compressor = zlib.compressobj(6, zlib.DEFLATED, -bits)
    data = compressor.compress(message.encode() if isinstance(message, str) else message)
    return data + compressor.flush() if final else (data + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest.mark.parametrize(
    "offers, answer",
    [
        ("permessage-deflate", "permessage-deflate"),
        ("permessage-deflate; client_max_window_bits", "permessage-deflate; client_max_window_bits=12"),
        ("permessage-deflate; client_max_window_bits=10", "permessage-deflate; client_max_window_bits=10"),
        ("permessage-deflate; client_max_window_bits=15", "permessage-deflate; client_max_window_bits=12"),
        ('permessage-deflate; client_max_window_bits="9"', "permessage-deflate; client_max_window_bits=9"),
        ("permessage-deflate; server_max_window_bits=15", "permessage-deflate; server_max_window_bits=12"),
        ("permessage-deflate; server_max_window_bits=9", "permessage-deflate; server_max_window_bits=9"),
        ("permessage-deflate; server_max_window_bits=8", "permessage-deflate; server_max_window_bits=8"),
        ("permessage-deflate; server_no_context_takeover", "permessage-deflate; server_no_context_takeover"),
        ("permessage-deflate; client_no_context_takeover", "permessage-deflate; client_no_context_takeover"),
        (
            "permessage-deflate; client_no_context_takeover; server_no_context_takeover; server_max_window_bits=10;"
            " client_max_window_bits",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10;"
            " client_max_window_bits=12",
        ),
        ("Permessage-Deflate ;  Client_Max_Window_Bits = 11 ", "permessage-deflate; client_max_window_bits=11"),
        # Several offers: the first acceptable one wins; others are skipped, never fatal.
        (
            "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=12",
        ),
        (
            "permessage-deflate; foo, permessage-deflate; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover",
        ),
        ("permessage-deflate; server_max_window_bits=7, permessage-deflate", "permessage-deflate"),
        # Malformed offers are declined.
        ("permessage-deflate; server_max_window_bits", None),  # a value is required
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; client_max_window_bits=7", None),
        ("permessage-deflate; client_max_window_bits=09", None),  # no leading zeros
        ("permessage-deflate; client_max_window_bits=ten", None),
        ("permessage-deflate; server_no_context_takeover=1", None),  # takes no value
        ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", None),  # repeated
        ("permessage-deflate; x_unknown", None),
        ("permessage-deflate;", None),
        ("x-webkit-deflate-frame", None),
        ("", None),
    ],
)
def test_negotiation_follows_rfc_7692(offers, answer):
    deflate = agree(offers)
    assert (deflate and deflate.header) == answer
    if deflate is not None:  # the client reads the answer as the server meant it: each end's
        client = flask_websockets._client_deflate(answer)  # window fits what the other sends
        assert client.send_bits <= deflate.receive_bits and deflate.send_bits <= client.receive_bits
        assert (client.send_takeover, client.receive_takeover) == (deflate.receive_takeover, deflate.send_takeover)


def test_negotiation_without_context_takeover_asks_it_of_both_ends():
    deflate = agree("permessage-deflate; client_max_window_bits", takeover=False)
    assert deflate.header == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=12"
    )
    assert not deflate.send_takeover and not deflate.receive_takeover


def deflate_pair(offer="permessage-deflate; client_max_window_bits", server_max_size=1 << 20, **agreement):
    """A server's and a client's protocol with permessage-deflate agreed between them."""
    deflate = agree(offer, **agreement)
    server = _Protocol(max_size=server_max_size, deflate=deflate)
    client = _Protocol(client=True, max_size=None, deflate=flask_websockets._client_deflate(deflate.header))
    return server, client


def frame_headers(data):
    """The first byte (FIN, RSV, opcode) and payload length of each frame in ``data``."""
    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        length, pos = b1 & 0x7F, pos + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length, pos = int.from_bytes(data[pos : pos + size], "big"), pos + size
        pos += (4 if b1 & 0x80 else 0) + length
        out.append((b0, length))
    return out


FOX = "the quick brown fox jumps over the lazy dog "
CHAT = [
    json.dumps({"user": f"user{i % 7}", "room": "kitchen", "text": FOX * (i % 5 + 1)})
    for i in range(20)
]


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_max_window_bits=8",  # zlib has no raw 256-byte window: runs only
        "permessage-deflate; server_max_window_bits=9; client_max_window_bits=9",
        "permessage-deflate; server_max_window_bits=15",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    ],
)
def test_what_the_server_compresses_a_plain_zlib_stream_inflates_and_the_other_way(offer):
    """Against zlib streams that live as long as the connection, as browsers keep them."""
    server, client = deflate_pair(offer)
    deflate = server.deflate
    inflater = zlib.decompressobj(-deflate.send_bits)  # zlib inflates with a 256-byte window
    for message in CHAT + ["x" * 70_000, os.urandom(3000).hex()]:
        data = server.message(message)
        b0, length = frame_headers(data)[0]
        assert b0 == 0xC1, "FIN, RSV1, text"
        if not deflate.send_takeover:
            inflater = zlib.decompressobj(-deflate.send_bits)
        assert inflater.decompress(data[-length:] + b"\x00\x00\xff\xff").decode() == message
    # The way back: compressed by a zlib stream with the client's window.
    compressor = zlib.compressobj(6, zlib.DEFLATED, -deflate.receive_bits)
    for message in CHAT:
        if not deflate.receive_takeover:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -deflate.receive_bits)
        payload = (compressor.compress(message.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
        assert events(server, client_frame(TEXT, payload, rsv=0x40)) == [(TEXT, message)]


def test_context_takeover_makes_a_repeated_message_small_and_without_it_nothing_carries_over():
    message = CHAT[3] * 3
    for takeover, repeated in [(True, lambda first, second: second < first / 5), (False, lambda f, s: s == f)]:
        server, client = deflate_pair(takeover=takeover)
        first, second = (frame_headers(server.message(message))[0][1] for _ in range(2))
        assert repeated(first, second), (takeover, first, second)
        sent_first, sent_second = client.message(message), client.message(message)
        assert events(server, sent_first, sent_second) == [(TEXT, message), (TEXT, message)]


def test_between_messages_no_zlib_object_is_kept_only_each_ways_window_of_bytes():
    server, client = deflate_pair()
    for message in CHAT:
        events(server, client.message(message * 50))
        client.receive_data(server.message(message * 50))
        assert client.next_event() == (TEXT, message * 50)
    assert server._inflater is None and client._inflater is None
    assert len(server.deflate._sent) == len(server.deflate._received) == 4096  # client_max_window_bits=12
    assert set(server.deflate.__slots__) >= {"_sent", "_received"} and not hasattr(server.deflate, "__dict__")


@pytest.mark.parametrize("chunking", ["whole", "byte by byte"])
def test_a_compressed_message_in_fragments_with_control_frames_between(chunking):
    server, client = deflate_pair()
    message = " ".join(CHAT)
    payload = deflated(message)
    pieces = [payload[i : i + 50] for i in range(0, len(payload), 50)]
    data = client_frame(TEXT, pieces[0], fin=False, rsv=0x40) + client_frame(PING, b"p")
    data += b"".join(client_frame(0, piece, fin=False) for piece in pieces[1:-1]) + client_frame(0, pieces[-1])
    data += client_frame(TEXT, "plain, after it")
    chunks = [data] if chunking == "whole" else one_byte_at_a_time(data)
    assert events(server, *chunks) == [(PING, b"p"), (TEXT, message), (TEXT, "plain, after it")]


@pytest.mark.parametrize(
    "frames, code, reason",
    [
        ([client_frame(TEXT, b"a", fin=False), client_frame(0, b"b", rsv=0x40)], 1002, "RSV1 set on a frame"),
        ([client_frame(PING, b"", rsv=0x40)], 1002, "RSV1 set on a frame"),
        ([client_frame(TEXT, b"a", rsv=0x20)], 1002, "reserved bits"),
        ([client_frame(TEXT, b"a", rsv=0x60)], 1002, "reserved bits"),
        ([client_frame(BINARY, b"\xff\xfe not deflate", rsv=0x40)], 1007, "invalid compressed data"),
        ([client_frame(TEXT, deflated(b"ok \xff\xfe"), rsv=0x40)], 1007, "invalid UTF-8"),
        # A final block (BFINAL), then bytes after it
        ([client_frame(TEXT, deflated("ok", final=True) + b"\x00\x00", rsv=0x40)], 1007, "data after the end"),
    ],
)
def test_compressed_frames_that_break_the_rules(frames, code, reason):
    server, _ = deflate_pair()
    kind, (got_code, got_reason) = events(server, *frames)[-1]
    assert kind == flask_websockets._FAILED and got_code == code and got_reason.startswith(reason)


def test_a_final_deflate_block_ends_a_message_and_the_next_one_still_refers_to_it():
    server, _ = deflate_pair()
    data = deflated("hello hello hello", final=True)  # the sender's stream ends with the message
    second = zlib.compressobj(6, zlib.DEFLATED, -12, zdict=b"hello hello hello")  # a new one, same window
    more = second.compress(b"hello hello!") + second.flush(zlib.Z_SYNC_FLUSH)
    assert events(server, client_frame(TEXT, data, rsv=0x40), client_frame(TEXT, more[:-4], rsv=0x40)) == [
        (TEXT, "hello hello hello"),
        (TEXT, "hello hello!"),
    ]


def test_rsv1_without_compression_agreed_is_a_protocol_error():
    proto = _Protocol()
    assert events(proto, client_frame(TEXT, deflated("hi"), rsv=0x40)) == [
        (flask_websockets._FAILED, (1002, "reserved bits set without an extension"))
    ]


def test_a_decompression_bomb_fails_with_1009_having_inflated_no_more_than_the_limit(monkeypatch):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(b"\0" * (64 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 70_000, "64 MiB of zeros, in 64 KB"
    inflated = []
    real = flask_websockets._Deflate.inflater
    monkeypatch.setattr(flask_websockets._Deflate, "inflater", lambda self: InflaterSpy(real(self), inflated))
    for fragments in (1, 16):  # in one frame, and in fragments
        server, _ = deflate_pair("permessage-deflate")
        size = -(-len(bomb) // fragments)
        pieces = [bomb[i : i + size] for i in range(0, len(bomb), size)]
        frames = [client_frame(BINARY if i == 0 else 0, p, fin=i == len(pieces) - 1, rsv=0x40 if i == 0 else 0)
                  for i, p in enumerate(pieces)]  # fmt: skip
        tracemalloc.start()
        try:
            got = events(server, *frames)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert got == [(flask_websockets._FAILED, (1009, "message over 1048576 bytes"))]
        assert sum(inflated) <= (1 << 20) + 1, "it stopped at the limit, not at 64 MiB"
        assert peak < 4 << 20, f"{peak} bytes at the peak"
        assert parse_server_frames(server.data_to_send()) == [("close", 1009, "message over 1048576 bytes")]
        inflated.clear()


class InflaterSpy:
    """A zlib decompressor that counts what it inflates."""

    def __init__(self, inflater, counts):
        self._inflater, self._counts = inflater, counts

    def decompress(self, data, max_length=0):
        out = self._inflater.decompress(data, max_length)
        self._counts.append(len(out))
        return out

    def __getattr__(self, name):
        return getattr(self._inflater, name)


def test_a_compressed_message_that_inflates_to_nothing_still_ends_at_the_size_limit_on_the_wire():
    """Empty stored blocks, forever: nothing is inflated, but the wire bytes count (limit + 1/8)."""
    server, _ = deflate_pair("permessage-deflate", server_max_size=10_000)
    empty_blocks = b"\x00\x00\x00\xff\xff" * 200  # 1000 bytes that inflate to nothing
    frames = [client_frame(BINARY, empty_blocks, fin=False, rsv=0x40)]
    frames += [client_frame(0, empty_blocks, fin=False) for _ in range(11)]
    assert events(server, *frames) == [(flask_websockets._FAILED, (1009, "message over 10000 bytes"))]


def compressing_app(**config):
    app, sockets = make_app()
    app.config.update(WEBSOCKETS_COMPRESSION=True, **config)
    return app, sockets


OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


def test_compression_is_off_by_default_and_offers_are_then_ignored():
    app, sockets = make_app()
    sockets.on_message(lambda message: message)
    with sockets.test_client(compression=True) as client:
        assert client.compression is None
        client.send("x" * 5000)
        assert client.receive() == "x" * 5000
    fake = run(app, text("y" * 5000), headers=OFFER)
    assert fake.answer["extensions"] is None and [b0 for b0, _ in frame_headers(fake.received)][0] == 0x81


def test_with_compression_on_long_messages_go_compressed_and_short_ones_as_they_are():
    app, sockets = compressing_app()
    sockets.on_message(lambda message: message)
    big, small = "x" * 1024, "y" * 1023  # WEBSOCKETS_COMPRESSION_MIN_SIZE: 1024
    fake = connect(app, headers=OFFER)
    fake.feed(client_frame(TEXT, deflated(big), rsv=0x40))
    fake.send(small)
    fake.wait_for(2)
    assert fake.answer["extensions"] == "permessage-deflate; client_max_window_bits=12"
    assert [b0 for b0, _ in frame_headers(fake.received)] == [0xC1, 0x81]
    assert fake.messages == [big, small]
    fake.end()




def test_the_test_client_negotiates_compression_and_it_works_both_ways():
    app, sockets = compressing_app(WEBSOCKETS_COMPRESSION_MIN_SIZE=0)
    seen = []

    @sockets.on_message
    def echo(message):
        seen.append(ws.compression)
        return message

    with sockets.test_client(compression=True) as client:
        assert client.compression == "permessage-deflate; client_max_window_bits=12"
        for message in [*CHAT, "", b"\x00" * 200_000, "h\u00e9llo " * 5000]:
            client.send(message)
            assert client.receive() == message
    assert seen[0] == "permessage-deflate; client_max_window_bits=12"


def test_compress_false_sends_a_message_as_it_is_from_send_and_broadcast():
    app, sockets = compressing_app()
    secret = json.dumps({"csrf": "s3cr3t", "echo": "x" * 2000})

    @sockets.on_message
    def reply(message):
        ws.send(secret, compress=False)
        ws.send(secret)
        sockets.broadcast(secret, compress=False)
        sockets.broadcast(secret)

    fake = connect(app, headers=OFFER)
    fake.send("go")
    fake.wait_for(4)
    assert [b0 for b0, _ in frame_headers(fake.received)] == [0x81, 0xC1, 0x81, 0xC1]
    assert fake.messages == [secret] * 4
    fake.end()


def test_a_broadcast_is_compressed_once_per_window_size_and_every_client_inflates_it(monkeypatch):
    app, sockets = compressing_app()
    calls = []
    real = flask_websockets._compress

    def counting(payload, bits, *args, **kwargs):
        calls.append(bits)
        return real(payload, bits, *args, **kwargs)

    monkeypatch.setattr(flask_websockets, "_compress", counting)
    sockets.on_message(lambda message: message)
    offers = [OFFER] * 5 + [{"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=10"}] * 2
    fakes = [connect(app, headers=offer) for offer in offers] + [connect(app)]  # and one without compression
    gevent.idle()
    news = json.dumps({"news": CHAT})
    for i in range(3):
        assert sockets.broadcast(f"{i} {news}") == 8
    assert sorted(calls) == [10, 10, 10, 12, 12, 12], "once per window size, not per connection"
    for fake in fakes:
        fake.send("after the broadcasts, " + news)  # replies compressed against what came before
        fake.wait_for(4)
        assert fake.messages == [f"{i} {news}" for i in range(3)] + ["after the broadcasts, " + news]
    assert [b0 for b0, _ in frame_headers(fakes[0].received)] == [0xC1] * 4
    assert [b0 for b0, _ in frame_headers(fakes[-1].received)] == [0x81] * 4
    for fake in fakes:
        fake.end()


def test_without_context_takeover_nothing_is_kept_between_messages():
    app, sockets = compressing_app(WEBSOCKETS_COMPRESSION_CONTEXT_TAKEOVER=False, WEBSOCKETS_COMPRESSION_MIN_SIZE=0)
    conns = []

    @sockets.on_message
    def echo(message):
        conns.append(ws._get_current_object())
        return message

    with sockets.test_client(compression=True) as client:
        assert "server_no_context_takeover; client_no_context_takeover" in client.compression
        for message in CHAT:
            client.send(message)
            assert client.receive() == message
        deflate = conns[0]._proto.deflate
        assert deflate._sent == deflate._received == b""


def test_a_long_compression_lets_other_greenlets_run_between_its_pieces():
    app, sockets = compressing_app()
    order = []

    @sockets.on_message
    def send_big(message):
        gevent.spawn(order.append, "another greenlet ran")
        ws.send(b"\x00" * (4 << 20), compress=message == "compressed")
        order.append("sent")

    expectations = [("compressed", ["another greenlet ran", "sent"]), ("plain", ["sent", "another greenlet ran"])]
    for how, expected in expectations:
        order.clear()
        with sockets.test_client(compression=True) as client:
            client.send(how)
            assert client.receive(timeout=5) == b"\x00" * (4 << 20)
            gevent.sleep(0)
        assert order == expected, how


def test_send_from_another_thread_with_compression():
    app, sockets = compressing_app()
    sockets.on_message(lambda message: message)
    fake = connect(app, headers=OFFER)
    gevent.idle()
    conn = sockets.connections[0]
    big = "z" * 100_000
    sender = threading.Thread(target=lambda: [conn.send(CHAT[0] * 40), conn.send(big), sockets.broadcast(CHAT[1] * 40)])
    sender.start()
    while sender.is_alive():
        gevent.sleep(0.01)
    fake.wait_for(3)
    assert fake.messages == [CHAT[0] * 40, big, CHAT[1] * 40]
    assert [b0 for b0, _ in frame_headers(fake.received)] == [0xC1] * 3
    fake.end()


# ---------------------------------------------------------------------------
# Limits and keepalive
# ---------------------------------------------------------------------------


def limited_app(max_size):
    app, sockets = make_app()
    app.config["WEBSOCKETS_MAX_MESSAGE_SIZE"] = max_size
    sockets.on_message(lambda message: f"got {len(message)}")
    return app


def test_config_defaults_are_set_on_init_app():
    app, sockets = make_app()
    assert app.config["WEBSOCKETS_MAX_MESSAGE_SIZE"] == 1024 * 1024
    assert app.config["WEBSOCKETS_PING_INTERVAL"] == 25.0
    assert app.config["WEBSOCKETS_PING_TIMEOUT"] == 20.0
    assert app.config["WEBSOCKETS_CLOSE_TIMEOUT"] == 5.0
    app = Flask(__name__)
    app.config["WEBSOCKETS_MAX_MESSAGE_SIZE"] = None
    WebSockets(app)
    assert app.config["WEBSOCKETS_MAX_MESSAGE_SIZE"] is None


def test_message_at_the_limit_passes_one_byte_over_closes_with_1009():
    fake = run(limited_app(1000), binary(b"x" * 1000), binary(b"x" * 1001), text("never handled"))
    assert fake.frames == [("text", "got 1000"), ("close", 1009, "message over 1000 bytes")]


def test_huge_frame_header_is_refused_before_its_payload_is_read():
    app = limited_app(1 << 20)
    sockets = app.extensions["websockets"]
    sockets._clock = clock = FakeClock()
    closed = []
    sockets.on_close(lambda: closed.append(ws.close_code))
    fake = connect(app)
    fake.feed(bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big") + b"mask")  # announces 4 EiB
    gevent.idle()
    assert sockets.connections == [], "refused at once: no handler sees any of it"
    fake.feed(b"\x00" * 300_000)  # the payload starts to arrive: skipped as it comes, never kept
    gevent.idle()
    [conn] = sockets._connections
    assert conn._proto._message is None and len(conn._proto._buf) <= 65536
    assert fake.poll() == [("close", 1009, "message over 1048576 bytes")], "at once: that end never comes"
    clock.advance(5)  # no answer: dropped at the close timeout
    fake.read_until_eof()
    fake.end()
    assert closed == [1009]


def test_the_1009_goes_out_once_the_client_has_sent_the_whole_oversized_message():
    """A browser that gets the close frame in the middle of its message reports an unclean close."""
    fake = connect(limited_app(100))
    fake.feed(client_frame(BINARY, b"x" * 80, fin=False), client_frame(0, b"x" * 80, fin=False))  # 160 > 100
    gevent.idle()
    assert fake.poll() == []
    fake.feed(client_frame(0, b"x" * 80, fin=False), client_frame(PING, b"skipped"), client_frame(0, b"end"))
    assert fake.wait_for(1) == [("close", 1009, "message over 100 bytes")]
    fake.feed(close(1009))
    fake.read_until_eof()
    assert fake.end().frames == [("close", 1009, "message over 100 bytes")]


def test_once_the_closing_handshake_is_over_the_request_ends_without_waiting_for_the_clients_tcp_close():
    """The client's close frame came, so it sends nothing more: the server closes TCP (RFC 6455 7.1.1) and
    the request ends at once, with no close timeout to wait out for a client that keeps its socket open."""
    app = Flask(__name__)
    app.config["WEBSOCKETS_CLOSE_TIMEOUT"] = 30
    WebSockets(app).on_message(lambda message: message)
    ended = threading.Event()
    app.teardown_request(lambda error: ended.set())
    with serving(app) as url:
        sock = raw_handshake(url)
        sock.sendall(client_frame(CLOSE, close_payload(1000)))
        assert ended.wait(5)  # this client never closed its socket
        answer = b""
        while chunk := sock.recv(4096):  # up to the server's FIN
            answer += chunk
        assert parse_server_frames(answer) == [("close", 1000, "")]


def test_limit_counts_all_fragments_of_a_message():
    fake = run(
        limited_app(100),
        client_frame(TEXT, "12345", fin=False),
        client_frame(0, "x" * 60, fin=False),  # 65 bytes so far
        client_frame(0, "1", fin=True),  # a small frame counts as 64 bytes: 129
    )
    assert fake.frames == [("close", 1009, "message over 100 bytes")]
    fake = run(limited_app(10), client_frame(TEXT, "12345", fin=False), client_frame(0, "12345"))
    assert fake.frames == [("close", 1009, "message over 10 bytes")], "fragments are at least 64 bytes"
    fake = run(limited_app(200), client_frame(TEXT, "x" * 100, fin=False), client_frame(0, "x" * 100))
    assert fake.messages == ["got 200"], "fragments of 64 bytes or more count as they are"


def test_no_limit_when_set_to_none():
    fake = run(limited_app(None), binary(b"x" * 3_000_000))
    assert fake.messages == ["got 3000000"]


def test_oversized_frame_is_skipped_while_waiting_for_the_close_frame():
    """After 1009 the rest of the frame is discarded, then the client's close is read."""
    fake = connect(limited_app(100))
    fake.feed(binary(b"x" * 200_000), close(1009))
    fake.read_until_eof()  # the server read on to the client's close frame, and closed TCP
    assert fake.end().frames == [("close", 1009, "message over 100 bytes")]


def keepalive_app(interval=25, timeout=20):
    app, sockets = make_app()
    sockets._clock = clock = FakeClock()
    app.config.update(WEBSOCKETS_PING_INTERVAL=interval, WEBSOCKETS_PING_TIMEOUT=timeout)
    events = []
    sockets.on_message(lambda message: message)
    sockets.on_close(lambda: events.append((ws.close_code, ws.close_reason)))
    return app, clock, events


def test_ping_timeout_closes_a_silent_peer_and_runs_on_close():
    app, clock, events = keepalive_app()
    fake = connect(app)
    clock.advance(24.9)
    assert fake.poll() == []
    clock.advance(0.1)
    assert fake.poll() == [("ping", b"keepalive")]
    clock.advance(19.9)
    assert fake.poll() == [("ping", b"keepalive")] and not fake.greenlet.dead
    clock.advance(0.1)  # 45 s: the interval and the timeout
    fake.read_until_eof()
    assert fake.end().frames == [("ping", b"keepalive"), ("close", 1011, "keepalive ping timeout")]
    assert events == [(1011, "keepalive ping timeout")]


def test_idle_peer_that_answers_pings_is_kept():
    app, clock, events = keepalive_app()
    fake = connect(app)
    answered = 0
    while clock.time < 1000:  # forty ping intervals
        clock.advance(5)
        if fake.poll().count(("ping", b"keepalive")) > answered:
            fake.feed(client_frame(PONG, b"keepalive"))
            answered += 1
            gevent.idle()
    assert answered == 40  # a ping 25 s after each answer
    assert not fake.greenlet.dead
    fake.send("still here")
    fake.wait_for(answered + 1)
    assert fake.messages == ["still here"]
    fake.feed(close())
    fake.read_until_eof()
    fake.end()
    assert events == [(1000, "")]


def test_a_talking_peer_is_not_pinged():
    app, clock, events = keepalive_app(interval=10, timeout=10)
    fake = connect(app)
    for i in range(20):
        fake.send(str(i))
        gevent.idle()
        clock.advance(9)
    assert [f[0] for f in fake.poll()] == ["text"] * 20
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


def test_keepalive_off():
    app, clock, events = keepalive_app(interval=None)
    fake = connect(app)
    clock.advance(10_000)
    assert fake.poll() == [] and not fake.greenlet.dead
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


def test_ping_without_a_timeout_keeps_pinging_a_silent_peer():
    app, clock, events = keepalive_app(interval=10, timeout=None)
    fake = connect(app)
    clock.advance(100)
    assert fake.poll() == [("ping", b"keepalive")] * 10 and not fake.greenlet.dead
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


# ---------------------------------------------------------------------------
# The engine: reading while handlers run, bounded memory, failure-safe cleanup
# ---------------------------------------------------------------------------


def long_task_app(interval=25, timeout=20):
    """An app whose LONG handler runs until the test sets ``done``."""
    app, clock, events = keepalive_app(interval, timeout)
    sockets = app.extensions["websockets"]
    done = gevent.event.Event()

    @sockets.on_message("^LONG")
    def long_task(message):
        done.wait()
        return "finished"

    return app, sockets, clock, events, done


def answer_pings(fake, clock, until, step=5):
    """Play a live client: move time on in steps, answering each ping the server sends."""
    answered = 0
    while clock.time < until:
        clock.advance(step)
        if fake.poll().count(("ping", b"keepalive")) > answered:
            fake.feed(client_frame(PONG, b"keepalive"))
            answered += 1
            gevent.idle()
    return answered


def test_a_long_handler_keeps_a_live_client_and_its_reply_arrives():
    app, sockets, clock, events, done = long_task_app()
    fake = connect(app)
    fake.send("LONG")
    gevent.idle()
    assert answer_pings(fake, clock, until=250) >= 5, "pinged all along: ten ping intervals"
    fake.feed(client_frame(PING, b"are you there?"))  # the client's own keepalive
    gevent.idle()
    assert fake.poll()[-1] == ("pong", b"are you there?"), "answered while the handler runs"
    done.set()
    fake.wait_for(len(fake.frames) + 2)
    assert fake.messages == ["finished", "LONG"]
    fake.feed(close())
    fake.read_until_eof()
    fake.end()
    assert events == [(1000, "")]


def test_a_client_that_goes_silent_during_a_long_handler_is_dropped_in_time():
    app, sockets, clock, events, done = long_task_app()
    fake = connect(app)
    fake.send("LONG")
    gevent.idle()
    clock.advance(25)
    assert fake.poll() == [("ping", b"keepalive")]
    clock.advance(20)  # no pong: interval + timeout after the client's last word
    fake.read_until_eof()
    assert fake.frames == [("ping", b"keepalive"), ("close", 1011, "keepalive ping timeout")]
    assert events == [], "on_close runs once the handler is done"
    done.set()
    fake.end()  # the handler's reply was dropped quietly
    assert events == [(1011, "keepalive ping timeout")]


def test_messages_wait_for_a_long_handler_in_order_and_reading_pauses_at_16():
    app, sockets, clock, events, done = long_task_app()
    fake = connect(app)
    fake.send("LONG")
    fake.feed(*(text(f"m{i}") for i in range(30)), client_frame(PING, b"behind them"))
    gevent.idle()
    [conn] = sockets.connections
    assert len(conn._inbox) == 15 and not conn._reading, "16 with LONG: TCP pushes back on the client"
    clock.advance(100)  # the silence is the server's: no ping, no close
    assert fake.poll() == []
    done.set()
    fake.wait_for(2 + 30 + 1)
    assert fake.messages == ["finished", "LONG"] + [f"m{i}" for i in range(30)]
    assert ("pong", b"behind them") in fake.frames, "a pong goes out as soon as its ping is read"
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


def test_an_announced_payload_that_never_arrives_holds_nothing_and_times_out():
    app, clock, events = keepalive_app()
    fake = connect(app)
    fake.feed(bytes([0x82, 0xFE]) + (60000).to_bytes(2, "big") + b"mask" + b"x" * 10)  # 10 of 60,000 bytes
    gevent.idle()
    [conn] = app.extensions["websockets"].connections
    assert len(conn._proto._message) == 10
    clock.advance(45)
    fake.read_until_eof()
    assert fake.end().frames == [("ping", b"keepalive"), ("close", 1011, "keepalive ping timeout")]


def test_close_returns_at_once_and_later_messages_are_not_handled():
    app, sockets = make_app()
    steps = []

    @sockets.on_message
    def handler(message):
        steps.append(message)
        if message == "quit":
            ws.close(4000, "bye")
            steps.append("close returned")

    fake = connect(app)
    fake.send("quit")
    fake.send("after quit")
    assert fake.wait_for(1) == [("close", 4000, "bye")]
    assert steps == ["quit", "close returned"]
    fake.feed(close(4000))
    fake.read_until_eof()
    fake.end()
    assert steps == ["quit", "close returned"]


def test_replies_to_messages_before_the_clients_close_go_out_before_the_answer():
    app, sockets = make_app()
    sockets.on_message(lambda message: gevent.sleep(0.001) or message.upper())
    seen = []
    sockets.on_close(lambda: seen.append((ws.closed, ws.close_code)))

    @sockets.on_message
    def state(message):
        seen.append((ws.closed, ws.close_code))  # as it was when the message came: open

    fake = run(app, text("a"), text("b"), close(1000, "done"))
    assert fake.frames == [("text", "A"), ("text", "B"), ("close", 1000, "")]
    assert seen == [(False, None), (False, None), (True, 1000)]
    fake = run(app, text("a"), client_frame(3, b"?"))  # a protocol error after a message
    assert fake.frames == [("text", "A"), ("close", 1002, "reserved opcode 3")]


@pytest.mark.parametrize("failing", ["_end", "handover"])
def test_on_close_runs_once_even_when_cleanup_fails(failing, monkeypatch, caplog):
    app, sockets = make_app()
    events = []
    sockets.on_message(lambda message: message)
    sockets.on_close(lambda: events.append(("close", ws.close_code)))
    app.teardown_request(lambda exc: events.append(("teardown", has_socket_context())))

    def broken(*args):
        raise RuntimeError("cleanup failed")

    if failing == "_end":
        monkeypatch.setattr(Connection, "_end", broken)
    else:
        monkeypatch.setattr(flask_websockets._OurHandlerHandover, "end", broken)
    fake = connect(app)
    fake.send("hi")
    fake.wait_for(1)
    fake.feed(close())
    fake.read_until_eof()
    assert fake.end().status == 500, "the error is Flask's, as in any view: logged, and a 500 nobody reads"
    assert "cleanup failed" in caplog.text
    assert events == [("close", 1000), ("teardown", False)], "on_close once; ws unbound afterwards"
    assert sockets.connections == []


def test_memoryview_of_wide_items_is_sent_as_its_bytes():
    import array

    app, sockets = make_app()
    numbers = array.array("I", [1, 2, 3])
    sockets.on_message(lambda message: memoryview(numbers))
    assert run(app, text("x")).messages == [numbers.tobytes()]


def test_a_gevent_timeout_in_a_handler_goes_to_its_error_handler():
    app, sockets = make_app()

    @sockets.on_message
    def slow(message):
        with gevent.Timeout(0.001):
            gevent.sleep(1)

    sockets.errorhandler(gevent.Timeout)(lambda error: "timed out")
    with sockets.test_client() as client:
        client.send("x")
        assert client.receive() == "timed out"


def test_unhandled_handler_errors_are_sent_to_got_request_exception(caplog):
    app, sockets = make_app()
    sockets.on_message(lambda message: {}[message])
    sockets.errorhandler(ValueError)(lambda error: "handled")
    seen = []

    def receiver(sender, exception, **extra):
        seen.append((sender, type(exception)))

    with got_request_exception.connected_to(receiver, app):
        with sockets.test_client() as client:
            client.send("missing")
            client.send("x")
    assert seen == [(app, KeyError), (app, KeyError)], "as for views: error trackers see them"


def test_close_and_ping_timeouts_may_be_none():
    app, clock, events = keepalive_app(interval=10, timeout=None)
    app.config["WEBSOCKETS_CLOSE_TIMEOUT"] = None
    sockets = app.extensions["websockets"]
    sockets.on_message("^quit")(lambda message: ws.close(1000))
    fake = connect(app)
    fake.send("quit")
    fake.wait_for(1)
    clock.advance(10_000)  # no close timeout: the server waits for the client
    assert not fake.greenlet.dead
    fake.feed(close())
    fake.read_until_eof()
    fake.end()
    assert events == [(1000, "")]


@pytest.mark.parametrize(
    "key, value",
    [
        ("WEBSOCKETS_MAX_MESSAGE_SIZE", 0),
        ("WEBSOCKETS_MAX_MESSAGE_SIZE", 1.5),
        ("WEBSOCKETS_MAX_MESSAGE_SIZE", True),
        ("WEBSOCKETS_PING_INTERVAL", -1),
        ("WEBSOCKETS_PING_TIMEOUT", "20"),
        ("WEBSOCKETS_CLOSE_TIMEOUT", float("nan")),
        ("WEBSOCKETS_ALLOWED_ORIGINS", "https://example.com"),  # a str, not a list of them
        ("WEBSOCKETS_ALLOWED_ORIGINS", ["example.com"]),  # no scheme
        ("WEBSOCKETS_MAX_SEND_BUFFER", None),
        ("WEBSOCKETS_SEND_TIMEOUT", 0),
        ("WEBSOCKETS_COMPRESSION", "yes"),
        ("WEBSOCKETS_COMPRESSION_MIN_SIZE", -1),
        ("WEBSOCKETS_COMPRESSION_MIN_SIZE", None),
        ("WEBSOCKETS_COMPRESSION_CONTEXT_TAKEOVER", 0),
    ],
)
def test_bad_settings_are_refused_at_init_app_and_when_a_connection_opens(key, value):
    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(ValueError, match=key):
        WebSockets(app)
    app = Flask(__name__)
    sockets = WebSockets(app)
    sockets.on_message(lambda message: message)
    assert run(app, text("fine")).messages == ["fine"]
    app.config[key] = value  # changed after init_app
    app.testing = True
    with pytest.raises(ValueError, match=key):
        run(app, text("x"))


@pytest.mark.parametrize(
    "url, origin, accepted",
    [
        ("http://example.com/", "http://example.com", True),
        ("http://example.com/", "http://example.com:80", True),  # the default port, spelt out
        ("https://example.com/", "https://example.com:443", True),
        ("http://example.com:8080/", "http://example.com:8080", True),
        ("https://example.com/", "http://example.com", False),  # an http page, a wss:// socket
        ("http://example.com/", "https://example.com", False),
        ("http://example.com/", "http://example.com:8080", False),
        ("http://example.com/", "http://evil.example", False),
    ],
)
def test_same_origin_compares_scheme_host_and_port(url, origin, accepted):
    app, sockets = make_app()
    sockets.on_message(lambda message: message)
    fake = run(app, text("hi"), base_url=url, headers={"Origin": origin})
    assert (fake.status, fake.messages) == ((101, ["hi"]) if accepted else (403, []))


# ---------------------------------------------------------------------------
# Slow clients: bounded send buffers, a broadcast that never blocks
# ---------------------------------------------------------------------------


def slow_client_app(max_send_buffer=1 << 20, send_timeout=10):
    app, sockets = make_app()
    sockets._clock = clock = FakeClock()
    app.config.update(WEBSOCKETS_MAX_SEND_BUFFER=max_send_buffer, WEBSOCKETS_SEND_TIMEOUT=send_timeout)
    events = []
    sockets.on_close(lambda: events.append((request.args.get("name"), ws.close_code, ws.close_reason)))
    return app, sockets, clock, events


def small_socket_buffers(fake):
    """Make the socket pair hold little, so that a client that does not read fills it at once."""
    fake.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


class CountingSocket:
    """A connection's socket that counts the writes (system calls) it makes."""

    def __init__(self, sock):
        self.sock, self.writes = sock, 0

    def send(self, data):
        self.writes += 1
        return self.sock.send(data)

    def sendmsg(self, buffers):
        self.writes += 1
        return self.sock.sendmsg(buffers)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_burst_of_broadcasts_goes_out_in_one_write_per_client_in_order_before_what_follows():
    app = Flask(__name__)
    sockets = WebSockets(app)

    @sockets.on_message
    def burst(message):
        for i in range(100):
            sockets.broadcast(f"update {i}")
        ws.send("sent")  # after the burst, though the burst waits for the end of the loop's turn
        sockets.broadcast("last")
        return "reply"

    clients = [connect(app) for _ in range(3)]
    counted = []
    for conn in sockets.connections:
        conn._io = CountingSocket(conn._io)  # what the connection writes with
        counted.append(conn._io)
    clients[0].send("go")
    updates = [f"update {i}" for i in range(100)]
    clients[0].wait_for(103)
    assert clients[0].messages == [*updates, "sent", "last", "reply"]
    for other in clients[1:]:
        other.wait_for(101)
        assert other.messages == [*updates, "last"]
    assert sorted(sock.writes for sock in counted) == [1, 1, 4], "the others: one write for all 101 messages"
    for client in clients:
        client.disconnect()
        client.read_until_eof()
        client.end()


def test_a_burst_in_one_turn_to_clients_that_never_read_stays_within_the_send_buffer_and_closes_them():
    """Corked frames are bounded too: 2 MiB broadcast in one turn, nobody reading, a 100 kB send buffer."""
    app, sockets, clock, events = slow_client_app(max_send_buffer=100_000)
    fakes = [connect(app, query_string={"name": f"c{i}"}) for i in range(3)]
    for fake in fakes:
        small_socket_buffers(fake)
    gevent.idle()
    conns = sockets.connections
    most = 0
    for i in range(2000):  # no yield: one turn of the loop
        sockets.broadcast(i.to_bytes(2, "big") * 512)
        most = max(most, *(conn.buffered_amount for conn in conns))
    assert most <= 100_000 + 16 * 1024 + 1024, f"{most} bytes waited for one client"
    assert [(c.close_code, c.close_reason) for c in conns] == [(1008, "client too slow")] * 3
    assert sockets.connections == [], "they leave the connections as they end"
    clock.advance(5)  # the close timeout: they never read their close frames
    for fake in fakes:
        fake.greenlet.join(5)
        fake.sock.close()
    assert sorted(events) == [(f"c{i}", 1008, "client too slow") for i in range(3)]


def test_bursts_from_eight_threads_and_a_handler_reach_each_client_exactly_once_in_each_senders_order():
    """Corking merges what threads hand to the loop: per sender, every client gets everything once, in order."""
    app, sockets = make_app()

    @sockets.on_open
    def join():
        for room in HOSTILE_ROOMS:
            ws.join(room)
        for i in range(100):  # and 2,000 rooms of one client each
            ws.join(f"{request.args['k']}/{i}")

    @sockets.on_message
    def burst(message):
        for i in range(200):
            sockets.broadcast(f"h:{i}")

    with serving(app) as url:
        clients = [client(f"{url}/?k={k}") for k in range(20)]
        wait_until(lambda: sorted(len(c.rooms) for c in sockets.connections) == [110] * 20)

        def publish(t):
            for i in range(200):
                sockets.broadcast(f"{t}:{i}", room=HOSTILE_ROOMS[t])

        threads = [threading.Thread(target=publish, args=(t,)) for t in range(8)]
        clients[0].send("go")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        for c in clients:
            got = collections.defaultdict(list)
            for _ in range(9 * 200):
                sender, i = c.recv().split(":")
                got[sender].append(int(i))
            assert got == {sender: list(range(200)) for sender in ["h", *map(str, range(8))]}
            c.close()


def test_a_client_gone_in_the_turn_of_a_corked_broadcast_has_its_socket_let_go_while_the_handler_runs():
    """The corked frame counted as unsent: the socket of a client that left stayed open until the handler returned."""
    app = Flask(__name__)
    sockets = WebSockets(app)
    forever = gevent.event.Event()
    sockets.on_message(lambda message: forever.wait())
    fake = connect(app)
    fake.send("block")
    gevent.sleep(0.05)
    [conn] = sockets.connections
    fake.disconnect()  # EOF, read below in the same turn as the broadcast
    sockets.broadcast("tick")
    conn._on_readable()
    gevent.sleep(0.1)
    assert conn.closed and conn.buffered_amount == 0
    assert conn._sock.fileno() == -1, "the socket is let go, though the handler still runs"
    forever.set()
    fake.read_until_eof()
    fake.end()


def test_a_large_broadcast_after_a_small_one_is_shared_by_the_send_buffers_not_copied_per_client():
    app = Flask(__name__)
    app.config["WEBSOCKETS_MAX_SEND_BUFFER"] = 8 << 20
    sockets = WebSockets(app)
    clients = [connect(app) for _ in range(50)]
    gevent.sleep(0.05)
    for conn in sockets.connections:  # clients that read nothing: most of the frame waits in our buffers
        conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for fake in clients:
        fake.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sockets.broadcast("small")
        sockets.broadcast("x" * (512 * 1024))  # in the same turn: the small one is still corked
        gevent.sleep(0.05)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    waiting = sum(conn.buffered_amount for conn in sockets.connections)
    assert waiting > 20 << 20, "most of 50 x 512 KiB waits to be sent"
    assert grown < 4 << 20, f"one frame shared by every buffer, not a copy each ({grown} bytes)"
    for fake in clients:
        fake.sock.close()
        fake.greenlet.join(5)


def test_under_werkzeug_a_connection_that_ends_with_frames_corked_leaves_nothing_behind():
    """A thread's event loop never ran again: the list of corked connections kept each one, and the loop, for ever."""
    app = Flask(__name__)
    sockets = WebSockets(app)

    @sockets.on_message
    def chat(message):
        sockets.broadcast(f"said: {message}")

    with serving(app, server="werkzeug") as url:
        for _ in range(3):
            c = client(url)
            # The message and the close frame in one write: read together, the handler's broadcast is corked.
            c.sock.sendall(
                websocket.ABNF.create_frame("hi", websocket.ABNF.OPCODE_TEXT).format()
                + websocket.ABNF.create_frame(b"\x03\xe8", websocket.ABNF.OPCODE_CLOSE).format()
            )
            assert c.recv() == "said: hi"
            with contextlib.suppress(websocket.WebSocketConnectionClosedException):
                c.recv()
            c.close()
        wait_until(lambda: not sockets.connections, timeout=5)
        wait_until(lambda: not flask_websockets._to_uncork, timeout=5)


def test_a_client_that_never_reads_is_closed_by_broadcast_and_the_others_get_everything():
    app, sockets, clock, events = slow_client_app()
    good, slow = connect(app, query_string={"name": "good"}), connect(app, query_string={"name": "slow"})
    small_socket_buffers(slow)
    gevent.idle()
    slow_conn = next(c for c in sockets.connections if c.request.args["name"] == "slow")
    payload = b"x" * 65536
    sent = []
    got = []

    def read_good():
        while len(got) < 100:
            good.read()
            got[:] = good.messages

    reader = gevent.spawn(read_good)
    for i in range(100):
        start = time.monotonic()
        sent.append(sockets.broadcast(payload[:-2] + i.to_bytes(2, "big")))
        assert time.monotonic() - start < 1, "broadcast never waits for a client"
        gevent.idle()
    reader.join(5)
    assert got == [payload[:-2] + i.to_bytes(2, "big") for i in range(100)], "all of them, in order"
    assert sent[0] == 2 and sent[-1] == 1, "the slow client was dropped on the way"
    assert [c.request.args["name"] for c in sockets.connections] == ["good"]
    assert (slow_conn.closed, slow_conn.close_code, slow_conn.close_reason) == (True, 1008, "client too slow")
    clock.advance(5)  # the close timeout: it never read its close frame either
    slow.greenlet.join(2)
    assert events == [("slow", 1008, "client too slow")], "on_close ran once"
    good.disconnect()
    good.read_until_eof()
    good.end()
    slow.end()


def test_a_handlers_send_waits_for_room_then_fails_after_the_send_timeout():
    app, sockets, clock, events = slow_client_app(max_send_buffer=100_000)
    outcome = []

    @sockets.on_message
    def flood(message):
        try:
            for i in range(100):
                ws.send(b"x" * 50_000)
                outcome.append(i)
        except ConnectionClosed:
            outcome.append(("closed", ws.close_code, ws.close_reason))

    fake = connect(app)
    small_socket_buffers(fake)
    fake.send("go")
    gevent.idle()
    [conn] = sockets.connections
    stuck = len(outcome)
    assert 0 < stuck < 10 and 0 < conn.buffered_amount <= 150_000, "waiting for room, not queueing forever"
    clock.advance(9.9)
    assert len(outcome) == stuck, "still waiting: the client may read yet"
    clock.advance(0.1)  # 10 s without the socket taking a byte
    assert outcome[-1] == ("closed", 1008, "client too slow")
    fake.read_until_eof()  # dropped at once: it took nothing for the send timeout
    fake.end()
    assert events == [(None, 1008, "client too slow")]


def test_a_ping_flood_that_reads_nothing_costs_one_pong_and_is_closed_as_too_slow():
    """Pongs used to queue one by one outside the send buffer's bound: 220 MiB in 15 s for one client."""
    app, sockets, clock, events = slow_client_app()
    sockets.on_message(lambda message: message)
    fake = connect(app)
    small_socket_buffers(fake)
    fake.feed(b"".join(client_frame(PING, b"%06d" % i) for i in range(50_000)))  # 600 KB, read by none
    gevent.idle()
    [conn] = sockets.connections
    assert not conn.closed and 0 < conn.buffered_amount < 1000, "one pong waits, whatever the flood"
    assert conn._buffer.pong == client_frame(PONG, b"049999", masked=False), "the latest ping's"
    clock.advance(10)  # the send timeout: the client took nothing
    assert (conn.close_code, conn.close_reason) == (1008, "client too slow")
    fake.read_until_eof()
    fake.end()
    assert events == [(None, 1008, "client too slow")]


def test_no_pong_follows_the_close_frame():
    """A pong parked behind a large reply used to go out after the close frame that followed it."""
    app, sockets, clock, events = slow_client_app()
    sockets.on_message(lambda message: "x" * 300_000 if message == "big" else ws.close(1000, "bye"))
    fake = connect(app)
    small_socket_buffers(fake)
    fake.send("big")
    gevent.idle()
    fake.feed(client_frame(PING, b"1"), text("close"))
    gevent.idle()
    assert [f[0] for f in fake.wait_for(2)] == ["text", "close"]
    fake.feed(close(1000))
    fake.read_until_eof()
    assert [f[0] for f in fake.frames] == ["text", "close"], "parse_server_frames fails on a byte after the close"
    fake.end()


def test_pongs_wait_behind_what_is_buffered_and_only_the_latest_ping_is_answered():
    app, sockets, clock, events = slow_client_app()
    sockets.on_message(lambda message: "x" * 300_000 if message == "big" else message)
    fake = connect(app)
    small_socket_buffers(fake)
    fake.send("big")
    gevent.idle()
    fake.feed(client_frame(PING, b"1"), client_frame(PING, b"2"), text("after"))
    gevent.idle()
    with gevent.Timeout(5):
        while len(fake.frames) < 3:
            fake.read()
    assert sorted(f[:2] for f in fake.frames[1:]) == [("pong", b"2"), ("text", "after")], "one pong: the latest"
    assert fake.frames[0] == ("text", "x" * 300_000)
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


class FirstSendTakesOneByte:
    """A socket whose first sendmsg takes one byte: a large frame's header is cut short."""

    def __init__(self, sock):
        self._sock, self.calls = sock, 0

    def sendmsg(self, parts):
        self.calls += 1
        return self._sock.send(parts[0][:1]) if self.calls == 1 else self._sock.sendmsg(parts)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.parametrize("size", [16 * 1024, 300_000])
def test_a_large_message_goes_out_as_header_and_payload_whatever_the_socket_takes(size):
    app, sockets, clock, events = slow_client_app()
    sockets.on_message(lambda message: b"x" * size if message == b"big" else None)
    fake = connect(app)
    gevent.idle()
    [conn] = sockets.connections
    conn._io = sock = FirstSendTakesOneByte(conn._io)  # what the connection writes with
    fake.feed(binary(b"big"), binary(b"big"))
    with gevent.Timeout(5):
        while len(fake.frames) < 2:
            fake.read()
    expected = b"x" * size
    assert fake.frames == [("binary", expected), ("binary", expected)], "whole, in order"
    assert sock.calls >= 1, "header and payload went out as parts, the first cut short"
    assert conn.buffered_amount == 0
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


def test_a_slow_but_reading_client_gets_everything_in_order():
    app, sockets, clock, events = slow_client_app(max_send_buffer=100_000)

    @sockets.on_message
    def mixed(message):
        for i in range(20):
            ws.send(f"send {i}")
            sockets.broadcast(f"broadcast {i}")  # never over the buffer: it drains as sends wait
            ws.send(b"y" * 20_000)
        return "done"

    fake = connect(app)
    small_socket_buffers(fake)
    fake.send("go")
    [conn] = sockets.connections
    gevent.idle()
    assert conn.buffered_amount > 0
    while "done" not in fake.messages:
        gevent.sleep(0)  # a slow reader: one read per turn of the loop
        fake.read(timeout=1)
    expected = [m for i in range(20) for m in (f"send {i}", f"broadcast {i}", b"y" * 20_000)] + ["done"]
    assert fake.messages == expected
    assert conn.buffered_amount == 0
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


def test_close_from_a_view_returns_at_once_even_when_the_client_reads_nothing():
    app, sockets, clock, events = slow_client_app()

    @app.post("/kick")
    def kick():
        for conn in sockets.connections:
            conn.close(4000, "kicked")
        return "kicked"

    fake = connect(app)
    small_socket_buffers(fake)
    gevent.idle()
    for _ in range(10):
        sockets.broadcast(b"z" * 65536)
    assert app.test_client().post("/kick").data == b"kicked"
    assert sockets.connections == []
    clock.advance(5)  # its close frame is stuck behind 640 KiB: dropped at the close timeout
    fake.read_until_eof()
    fake.end()
    assert events == [(None, 4000, "kicked")]


@pytest.mark.slow
@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
def test_send_and_broadcast_from_another_thread(server):
    """A native thread (here the test's own: the server runs in another) hands its sends over."""
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        c = client(url)
        wait_until(lambda: len(sockets.connections) == 1)
        [conn] = sockets.connections
        conn.send("from a thread")
        assert sockets.broadcast(b"broadcast from a thread") == 1
        assert [c.recv(), c.recv()] == ["from a thread", b"broadcast from a thread"]
        conn.close(4002, "from a thread")
        assert recv_close(c) == (4002, "from a thread")
        with pytest.raises(ConnectionClosed):
            conn.send("too late")


# ---------------------------------------------------------------------------
# Rooms
# ---------------------------------------------------------------------------


def rooms_app():
    app, sockets = make_app()

    @sockets.on_message("^JOIN (.+)")
    def join(message):
        ws.join(message[5:])
        return f"in {sorted(ws.rooms)}"

    @sockets.on_message("^LEAVE (.+)")
    def leave(message):
        ws.leave(message[6:])
        return f"in {sorted(ws.rooms)}"

    @sockets.on_message("^SAY ")
    def say(message):
        room, text = message[4:].split(" ", 1)
        sockets.broadcast(text, room=room, skip=ws)

    return app, sockets


def test_rooms_join_leave_and_a_broadcast_to_a_room_skipping_the_sender():
    app, sockets = rooms_app()
    with sockets.test_client() as ann, sockets.test_client() as bob, sockets.test_client() as cid:
        ann.send("JOIN kitchen")
        assert ann.receive() == "in ['kitchen']"
        bob.send("JOIN kitchen")
        bob.send("JOIN hall")
        assert [bob.receive(), bob.receive()] == ["in ['kitchen']", "in ['hall', 'kitchen']"]
        ann.send("SAY kitchen dinner is ready")
        assert bob.receive() == "dinner is ready"
        with pytest.raises(TimeoutError):
            ann.receive(timeout=0.05)  # skipped: the sender
        with pytest.raises(TimeoutError):
            cid.receive(timeout=0.05)  # not a member
        assert sockets.broadcast(b"\x00", room="kitchen") == 2 and ann.receive() == bob.receive() == b"\x00"
        assert sockets.broadcast("nobody", room="attic") == 0
        bob.send("LEAVE kitchen")
        assert bob.receive() == "in ['hall']"
        assert sockets.broadcast("only ann", room="kitchen") == 1 and ann.receive() == "only ann"
    assert sockets._rooms == {}, "a connection leaves its rooms when it ends"


def test_on_close_still_knows_the_rooms_and_a_room_ends_with_its_last_member():
    app, sockets = rooms_app()
    left = []
    sockets.on_close(lambda: left.append(sorted(ws.rooms)))
    with sockets.test_client() as ann:
        ann.send("JOIN kitchen")
        ann.receive()
        assert set(sockets._rooms) == {"kitchen"}
    assert left == [["kitchen"]] and sockets._rooms == {}


def test_a_room_is_a_non_empty_str():
    app, sockets = make_app()
    caught = []

    @sockets.on_message
    def join(message):
        for room in ("", None, 3):
            try:
                ws.join(room)
            except TypeError as error:
                caught.append(str(error))

    with sockets.test_client() as client:
        client.send("x")
        gevent.idle()
    assert len(caught) == 3 and "non-empty str" in caught[0]


HOSTILE_ROOMS = ["x:all", "all", ":all", "room:x", "{braces}", "a b", "\u00e9t\u00e9 \U0001f600", "*", "\x00"]
HOSTILE_ROOMS.append("r" * 1024)


def test_any_str_is_just_a_room_name_and_reaches_only_that_rooms_members():
    app, sockets = rooms_app()
    with sockets.test_client() as everyone, sockets.test_client() as member:
        for room in HOSTILE_ROOMS:
            member.send(f"JOIN {room}")
            member.receive()
        for room in HOSTILE_ROOMS:
            assert sockets.broadcast(f"to {room}", room=room) == 1
            assert member.receive() == f"to {room}"
        with pytest.raises(TimeoutError):
            everyone.receive(timeout=0.05)
        assert sockets.broadcast("to a room nobody is in", room="x") == 0
        for room in ("", 3, b"kitchen"):
            with pytest.raises(TypeError, match="broadcast"):
                sockets.broadcast("hi", room=room)
    assert sockets._rooms == {}


def test_thousands_of_rooms_each_reach_only_their_members_and_all_are_left_at_the_end():
    app, sockets = make_app()

    @sockets.on_message("^JOIN (\\d+) (\\d+)")
    def join_many(message):
        _, start, step = message.split()
        for n in range(int(start), 3000, int(step)):
            ws.join(f"room {n}")
        return str(len(ws.rooms))

    with sockets.test_client() as odd, sockets.test_client() as every_third:
        odd.send("JOIN 1 2")
        every_third.send("JOIN 0 3")
        assert (odd.receive(), every_third.receive()) == ("1500", "1000")
        assert len(sockets._rooms) == 2000  # 500 rooms have both
        for n in (0, 1, 3, 9, 2998, 2999):
            expected = [c for c in (odd, every_third) if (c is odd and n % 2) or (c is every_third and n % 3 == 0)]
            assert sockets.broadcast(f"to {n}", room=f"room {n}") == len(expected)
            for c in expected:
                assert c.receive() == f"to {n}"
        with pytest.raises(TimeoutError):
            odd.receive(timeout=0.05)
    assert sockets._rooms == {} and sockets._connections == set()


def test_rooms_after_the_close_are_those_it_was_in_and_leave_then_does_nothing():
    app, sockets = rooms_app()
    seen = []

    @sockets.on_close
    def gone():
        seen.append(sorted(ws.rooms))
        assert sockets.broadcast("left", room="kitchen") == 0, "a closed connection is out of its rooms"
        ws.leave("kitchen")  # does nothing
        seen.append(sorted(ws.rooms))

    with sockets.test_client() as ann:
        ann.send("JOIN kitchen")
        ann.receive()
        ann.send("JOIN hall")
        ann.receive()
    assert seen == [["hall", "kitchen"], ["hall"]]
    assert sockets._rooms == {}


# ---------------------------------------------------------------------------
# Concurrency: threads against connections that come and go
# ---------------------------------------------------------------------------


def kept_connection_app():
    """An app that keeps each connection (as a view would from ``sockets.connections``) and tells when it ended."""
    app, sockets = make_app()
    kept, ended = [], threading.Event()

    @sockets.on_open
    def keep():
        kept.append(ws._get_current_object())
        ws.join("lobby")

    @sockets.on_message
    def echo(message):
        return message

    @app.teardown_request
    def done(error):  # after the view returned: the connection's loop may be gone (Werkzeug's threads)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ended.set()

    return app, sockets, kept, ended


@pytest.mark.slow
@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
def test_every_call_from_another_thread_on_an_ended_connection_is_defined(server):
    """close() does nothing, send() and join() raise ConnectionClosed, and the connection stays out of every room.

    Under Werkzeug (``flask run``) each connection's event loop is destroyed
    with its thread: a call that reached for it raised ``ValueError``.
    """
    app, sockets, kept, ended = kept_connection_app()
    with serving(app, server) as url:
        c = client(url)
        c.send("hi")
        assert c.recv() == "hi"
        c.close()
        assert ended.wait(5)
        [conn] = kept
        assert conn.closed and conn.close_code == 1000
        outcome = {}

        def from_a_thread():
            try:
                conn.close()  # does nothing
                conn.close(4000, "again")
                conn.leave("lobby")  # does nothing
                for call in (lambda: conn.send("late"), lambda: conn.join("kitchen")):
                    with pytest.raises(ConnectionClosed):
                        call()
                outcome["ok"] = True
            except BaseException as error:  # the test's own thread: report it
                outcome["error"] = error

        thread = threading.Thread(target=from_a_thread)
        start = time.monotonic()
        thread.start()
        thread.join(5)
        assert outcome == {"ok": True}, outcome
        assert time.monotonic() - start < 1, "a send to an ended connection raises at once"
        assert "kitchen" not in conn.rooms
        assert sockets._rooms == {} and sockets._connections == set()
        assert sockets.broadcast("anyone?", room="kitchen") == 0 and sockets.broadcast("anyone?") == 0


def test_join_from_a_handler_after_the_close_raises_and_the_room_stays_empty():
    app, sockets = make_app()
    caught = []

    @sockets.on_message("^QUIT")
    def quit(message):
        ws.close()
        try:
            ws.join("kitchen")
        except ConnectionClosed as error:
            caught.append(str(error))

    @sockets.on_close
    def joins_too_late():
        with pytest.raises(ConnectionClosed):
            ws.join("attic")
        caught.append("on_close")

    with sockets.test_client() as client_:
        client_.send("QUIT")
        with pytest.raises(ConnectionClosed):
            client_.receive()
    assert len(caught) == 2 and caught[1] == "on_close"
    assert sockets._rooms == {}


def test_two_handlers_sending_to_each_others_connection_under_werkzeug_do_not_deadlock():
    """Under flask run each connection has its thread and loop: a send to another waits for that loop."""
    app, sockets = make_app()
    barrier = threading.Barrier(2)

    @sockets.on_message
    def relay(message):
        barrier.wait(5)  # both handlers at the same moment
        for conn in sockets.connections:
            if conn is not ws._get_current_object():
                conn.send(f"from {message}")

    with serving(app, "werkzeug") as url:
        a, b = client(url), client(url)
        wait_until(lambda: len(sockets.connections) == 2)
        a.send("a")
        b.send("b")
        assert (a.recv(), b.recv()) == ("from b", "from a")


def test_a_closed_client_that_reads_nothing_is_dropped_at_the_send_timeout_without_a_close_timeout():
    app, sockets = make_app()
    app.config.update(WEBSOCKETS_CLOSE_TIMEOUT=None, WEBSOCKETS_SEND_TIMEOUT=10, WEBSOCKETS_PING_INTERVAL=None)
    sockets._clock = clock = FakeClock()
    ended = []
    sockets.on_close(lambda: ended.append(ws.close_code))
    sockets.on_message(lambda message: [ws.send(b"x" * (512 * 1024)) for _ in range(8)] and None)
    fake = connect(app)
    fake.send("go")
    gevent.sleep(0.1)  # the buffer is full: the handler waits for room
    fake.feed(close(1000))  # the client closes, and reads nothing more
    gevent.sleep(0.1)
    clock.advance(10)
    fake.greenlet.join(2)
    assert fake.greenlet.dead and ended == [1000], "the send timeout applies once the connection is closed"
    fake.sock.close()


def test_no_timer_outlives_a_connection_that_ended_from_inside_a_timer():
    """A keepalive ping whose write fails ends the connection: the view must not finish inside the timer."""
    app, sockets = make_app()
    app.config.update(WEBSOCKETS_PING_INTERVAL=1, WEBSOCKETS_PING_TIMEOUT=5)
    sockets._clock = clock = FakeClock()
    fake = connect(app)
    gevent.idle()
    [conn] = sockets._connections

    class Resetting:  # the peer reset: sending fails, the rest is the real socket's
        def __init__(self, sock):
            self._sock = sock

        def send(self, data):
            raise ConnectionResetError(104, "reset by peer")

        def __getattr__(self, name):
            return getattr(self._sock, name)

    conn._io = Resetting(conn._io)  # what the connection writes with
    clock.advance(1)  # the ping's write fails
    fake.greenlet.join(2)
    assert fake.greenlet.dead
    assert [t for t in clock.timers if t.active] == [], "no timer left running for an ended connection"
    fake.sock.close()


def test_with_compression_a_long_message_under_the_size_threshold_is_never_compressed(monkeypatch):
    compressed = []
    real = flask_websockets._compress
    monkeypatch.setattr(
        flask_websockets,
        "_compress",
        lambda payload, *a, **k: compressed.append(len(payload)) or real(payload, *a, **k),
    )
    app, sockets = make_app()
    app.config.update(WEBSOCKETS_COMPRESSION=True, WEBSOCKETS_COMPRESSION_MIN_SIZE=8 << 20)
    sockets.on_message(lambda message: "y" * (512 * 1024))
    with sockets.test_client(compression=True) as client_:
        client_.send("go")
        assert len(client_.receive()) == 512 * 1024
    assert [n for n in compressed if n > 2] == [], "only the client's own 'go' was compressed"


def churn(url, sockets, kept, seconds, errors, clients=40):
    """Threads that send, broadcast, close, join and leave while clients connect and go, for ``seconds``.

    The threads pick among the open connections and the last few that were
    ``kept`` (closed or ended, some of them). Each records any error but
    ``ConnectionClosed``. Returns how many clients came and went.
    """
    stop = threading.Event()

    def worker(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            conns = sockets.connections + kept[-10:]
            conn = rng.choice(conns) if conns else None
            action = rng.randrange(7)
            try:
                if action == 0:
                    sockets.broadcast(f"all {seed}")
                elif action == 1:
                    sockets.broadcast(b"room", room=f"r{rng.randrange(5)}")
                elif conn is None:
                    time.sleep(0.001)
                elif action == 2:
                    conn.send(f"to one {seed}")
                elif action == 3:
                    conn.join(f"r{rng.randrange(5)}")
                elif action == 4:
                    conn.leave(f"r{rng.randrange(5)}")
                elif action == 5 and rng.random() < 0.05:
                    conn.close(4000 + seed, "churn")
                else:
                    conn.send(b"\x00" * rng.randrange(1, 70000))
            except ConnectionClosed:
                pass
            except BaseException as error:  # noqa: BLE001 - the test reports every other error
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(8)]
    for thread in threads:
        thread.start()
    checked = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline or checked < clients:
            c = client(url, skip_utf8_validation=True)
            if checked % 3 == 0:
                c.sock.close()  # gone without a word
            else:
                with contextlib.suppress(websocket.WebSocketException, OSError):
                    c.send("ping")
                    c.close(timeout=1)
            checked += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    return checked


@pytest.mark.slow
@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
def test_eight_threads_send_broadcast_close_and_join_while_connections_come_and_go(server, caplog):
    app, sockets, kept, ended = kept_connection_app()
    errors = []
    with serving(app, server) as url:
        churn(url, sockets, kept, seconds=3, errors=errors)
        wait_until(lambda: not sockets._connections, timeout=10)
        assert errors == []
        assert sockets._rooms == {}, "every connection left every room it was in"
        c = client(url)
        c.send("still serving")
        assert c.recv() == "still serving"
        c.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


GUNICORN_CHURN_APP = """\
import json, random, threading
import gevent, gevent.threadpool
from flask import Flask
from flask_websockets import ConnectionClosed, WebSockets, ws

app = Flask(__name__)
sockets = WebSockets(app)
errors, finished, kept = [], [], []

@sockets.on_open
def lobby():
    ws.join("lobby")
    kept.append(ws._get_current_object())

@sockets.on_message
def echo(message):
    return message

def churn(seed, seconds):
    rng = random.Random(seed)
    deadline = __import__("time").monotonic() + seconds
    while __import__("time").monotonic() < deadline:
        conns = sockets.connections + kept[-10:]
        try:
            if not conns:
                gevent.sleep(0.001) if seed % 2 else __import__("time").sleep(0.001)
                continue
            conn = rng.choice(conns)
            [lambda: sockets.broadcast("all"), lambda: sockets.broadcast(b"r", room="r1"), lambda: conn.send("one"),
             lambda: conn.join("r1"), lambda: conn.leave("r1"),
             lambda: rng.random() < 0.05 and conn.close(4000, "churn")][rng.randrange(6)]()
            gevent.sleep(0) if seed % 2 else __import__("time").sleep(0.0001)  # a greenlet lets the server run
        except ConnectionClosed:
            pass
        except BaseException as error:
            errors.append(repr(error))
    finished.append(seed)

@app.post("/churn")
def start():
    pool = gevent.threadpool.ThreadPool(4)  # real threads
    for seed in range(4):
        pool.spawn(churn, seed, 3)
        gevent.spawn(churn, seed + 1, 3)  # and greenlets
    return "started"

@app.get("/state")
def state():
    return json.dumps({"errors": errors, "finished": len(finished), "registered": len(sockets._connections),
                       "rooms": sorted(sockets._rooms)})
"""


@pytest.mark.slow
def test_under_gunicorn_threads_and_greenlets_churn_while_connections_come_and_go(tmp_path):
    (tmp_path / "gapp.py").write_text(GUNICORN_CHURN_APP)
    port = free_port()
    with process(gunicorn_command(port, "-w", "1", "gapp:app"), tmp_path) as proc:
        connect_when_up(f"ws://127.0.0.1:{port}/", proc).close()
        assert urlopen(f"http://127.0.0.1:{port}/churn", data=b"").read() == b"started"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            c = client(f"ws://127.0.0.1:{port}/", skip_utf8_validation=True)
            with contextlib.suppress(websocket.WebSocketException, OSError):
                c.send("x")
                c.sock.close() if random.random() < 0.3 else c.close(timeout=1)

        def state():
            return json.loads(urlopen(f"http://127.0.0.1:{port}/state").read())

        wait_until(lambda: state()["finished"] == 8 and state()["registered"] == 0, 10)
        assert state() == {"errors": [], "finished": 8, "registered": 0, "rooms": []}
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        assert "Traceback" not in proc.stderr.read()


# ---------------------------------------------------------------------------
# Blueprints, several endpoints, error handlers, targeted sends
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
def test_blueprint_endpoint_under_its_url_prefix(server):
    bp = Blueprint("chat", __name__, url_prefix="/chat")
    sockets = WebSockets(bp)
    sockets.on_message(lambda message: f"{message} at {request.path} ({request.endpoint})")
    bp.add_url_rule("/page", "page", lambda: url_for("chat.websocket"))
    app = Flask(__name__)
    app.register_blueprint(bp)
    assert app.extensions["websockets"] is sockets
    assert app.config["WEBSOCKETS_MAX_MESSAGE_SIZE"] == 1 << 20, "set up when the blueprint registered"
    with serving(app, server) as url:
        websocket_url = urlopen(url.replace("ws://", "http://") + "/chat/page", timeout=5).read()
        assert websocket_url.decode() == url + "/chat/"
        c = client(websocket_url.decode())
        c.send("hi")
        assert c.recv() == "hi at /chat/ (chat.websocket)"
        c.close()
        assert refused_status(url + "/") == 404  # nothing outside the prefix


def test_two_endpoints_in_one_app_each_with_its_own_handlers_and_connections():
    app = Flask(__name__)
    chat = WebSockets(app, path="/chat", endpoint="chat")
    feed = WebSockets(app, path="/feed", endpoint="feed", match_one=True)
    chat.on_message(lambda message: f"chat: {message}")
    feed.on_message("^x")(lambda message: "feed x")
    feed.on_message(lambda message: "feed other")
    closed = []
    chat.on_close(lambda: closed.append("chat"))
    feed.on_close(lambda: closed.append("feed"))
    with serving(app) as url:
        c, f = client(url + "/chat"), client(url + "/feed")
        wait_until(lambda: len(chat.connections) == len(feed.connections) == 1)
        c.send("x")
        f.send("x")
        assert c.recv() == "chat: x" and f.recv() == "feed x"
        assert chat.broadcast("to chat") == 1
        assert c.recv() == "to chat"
        c.close()
        wait_until(lambda: closed == ["chat"])
        f.close()
        wait_until(lambda: closed == ["chat", "feed"])
    with app.test_request_context():
        assert url_for("chat") == "ws://localhost/chat" and url_for("feed") == "ws://localhost/feed"


def test_two_endpoints_with_one_name_get_a_clear_error():
    app = Flask(__name__)
    WebSockets(app, path="/a")
    with pytest.raises(ValueError, match="endpoint="):
        WebSockets(app, path="/b")


def test_url_variables_are_view_args():
    app = Flask(__name__)
    sockets = WebSockets(app, path="/rooms/<room>")
    sockets.on_message(lambda message: f"{request.view_args['room']}: {message}")
    with sockets.test_client("/rooms/kitchen") as client:
        client.send("hi")
        assert client.receive() == "kitchen: hi"
    with app.test_request_context():
        assert url_for("websocket", room="hall") == "ws://localhost/rooms/hall"


def test_error_handlers_most_specific_wins_and_its_return_is_the_reply():
    app, sockets = make_app()

    @sockets.on_message
    def fail(message):
        raise {"key": KeyError, "lookup": LookupError, "value": ValueError}[message](message)

    @sockets.errorhandler(LookupError)
    def lookup(error):
        return f"lookup handled {type(error).__name__}"

    @sockets.errorhandler(KeyError)
    def key(error):
        return jsonify(error="key", detail=str(error))

    with sockets.test_client() as client:
        client.send("key")
        assert json.loads(client.receive()) == {"error": "key", "detail": "'key'"}
        client.send("lookup")
        assert client.receive() == "lookup handled LookupError"
        client.send("value")  # no handler: logged as before, and the connection goes on
        client.send("key")
        assert json.loads(client.receive())["error"] == "key"


def test_error_handler_may_close_the_connection():
    app, sockets = make_app()
    sockets.on_message(lambda message: 1 / 0)
    closed = []
    sockets.on_close(lambda: closed.append(ws.close_code))

    @sockets.errorhandler(ZeroDivisionError)
    def close_it(error):
        ws.close(4002, "cannot divide")

    with sockets.test_client() as client:
        client.send("x")
        with pytest.raises(ConnectionClosed):
            client.receive()
        assert (client.close_code, client.close_reason) == (4002, "cannot divide")
    assert closed == [4002]


def test_error_handler_covers_bad_reply_types_and_hooks(caplog):
    app, sockets = make_app()
    sockets.on_open(lambda: int("not a number"))
    sockets.on_message(lambda message: {"a": "dict"})  # TypeError: not a websocket message
    sockets.errorhandler(TypeError)(lambda error: "type error handled")
    sockets.errorhandler(ValueError)(lambda error: ws.send("on_open failed, handled") or None)
    with sockets.test_client() as client:
        assert client.receive() == "on_open failed, handled"  # handled: the connection stays open
        client.send("x")
        assert client.receive() == "type error handled"
    assert not [r for r in caplog.records if r.exc_info]


def test_an_error_in_an_error_handler_is_logged_with_the_original(caplog):
    app, sockets = make_app()
    sockets.on_message(lambda message: {}["missing"])
    sockets.errorhandler(KeyError)(lambda error: 1 / 0)
    with sockets.test_client() as client:
        client.send("x")
    [record] = [r for r in caplog.records if r.exc_info]
    assert isinstance(record.exc_info[1], ZeroDivisionError)
    assert isinstance(record.exc_info[1].__context__, KeyError)


def test_errorhandler_takes_exception_classes_only():
    app, sockets = make_app()
    with pytest.raises(TypeError, match="exception class"):
        sockets.errorhandler(404)


def test_connections_carry_the_handshake_request_session_and_state():
    app, sockets = make_app()

    @app.route("/login/<name>")
    def login(name):
        session["user"] = name
        return ""

    @sockets.on_message("^ROOM (.*)")
    def room(message):
        ws.state["room"] = message[5:]
        session["changed"] = True  # not the snapshot
        return "in"

    http = app.test_client()
    http.get("/login/ada")
    with sockets.test_client(http_client=http, query_string={"tab": "2"}, headers={"X-Tab": "two"}) as client:
        client.send("ROOM kitchen")
        assert client.receive() == "in"
        [conn] = sockets.connections
        assert conn.session == {"user": "ada"}
        assert conn.state == {"room": "kitchen"}
        assert (conn.request.path, conn.request.args["tab"], conn.request.headers["X-Tab"]) == ("/", "2", "two")
        assert conn.request.remote_addr == "127.0.0.1"
    assert sockets.connections == []


def test_broadcast_to_the_chosen_connections_from_an_http_view():
    app, sockets = make_app()

    @app.route("/login/<int:user_id>")
    def login(user_id):
        session["user_id"] = user_id
        return ""

    @app.post("/notify/<int:user_id>")
    def notify(user_id):
        count = sockets.broadcast(request.form["text"], to=lambda c: c.session.get("user_id") == user_id)
        return f"sent to {count}"

    users = {}
    for user_id in (1, 2):
        http = app.test_client()
        http.get(f"/login/{user_id}")
        users[user_id] = [sockets.test_client(http_client=http) for tab in range(2)]  # two tabs each
    assert app.test_client().post("/notify/2", data={"text": "for 2"}).data == b"sent to 2"
    for tab in users[2]:
        assert tab.receive() == "for 2"
    for tab in users[1]:
        with pytest.raises(TimeoutError):
            tab.receive(timeout=0.1)
    for tab in users[1] + users[2]:
        tab.close()


def test_sending_from_a_background_greenlet():
    app, sockets = make_app()
    with sockets.test_client() as client:
        [conn] = sockets.connections
        gevent.spawn(lambda: (conn.send("direct"), sockets.broadcast("to all"))).join()
        assert [client.receive(), client.receive()] == ["direct", "to all"]


# ---------------------------------------------------------------------------
# The test client
# ---------------------------------------------------------------------------


def test_test_client_drives_an_app_with_its_hooks():
    app, sockets = make_app(subprotocols=["v2"])
    events = []

    @sockets.before_connect
    def members_only():
        if request.args.get("member") != "yes":
            abort(401)

    @sockets.on_open
    def opened():
        events.append("open")
        ws.send(f"welcome, you speak {ws.subprotocol}")

    @sockets.on_message
    def echo(message):
        events.append(message)
        return message

    @sockets.on_close
    def closed():
        events.append(("close", ws.close_code))

    with pytest.raises(HandshakeRefused) as refused:
        sockets.test_client()
    assert refused.value.status_code == 401
    with pytest.raises(HandshakeRefused) as refused:
        sockets.test_client(query_string="member=yes", headers={"Origin": "http://evil.example"})
    assert refused.value.status_code == 403
    client = sockets.test_client(query_string="member=yes", headers={"Sec-WebSocket-Protocol": "v1, v2"})
    assert client.subprotocol == "v2"
    assert client.receive() == "welcome, you speak v2"
    client.send("text")
    client.send(b"\x00binary")
    assert [client.receive(), client.receive()] == ["text", b"\x00binary"]
    assert not client.closed
    client.close(4000, "done")
    assert (client.closed, client.close_code) == (True, 4000)
    assert events == ["open", "text", b"\x00binary", ("close", 4000)], "on_close ran before close() returned"


def test_test_client_sees_a_server_close_and_times_out_politely():
    app, sockets = make_app()
    sockets.on_message("^bye")(lambda message: ws.close(4001, "bye"))
    sockets.on_message(lambda message: None)
    with sockets.test_client() as client:
        client.send("nothing comes back")
        with pytest.raises(TimeoutError):
            client.receive(timeout=0.05)
        client.send("bye")
        with pytest.raises(ConnectionClosed):
            client.receive()
        assert (client.closed, client.close_code, client.close_reason) == (True, 4001, "bye")


def test_test_client_raises_a_propagated_handler_error():
    app, sockets = make_app()
    app.testing = True
    sockets.on_message(lambda message: {}[message])
    client = sockets.test_client()
    client.send("missing")
    with pytest.raises(KeyError, match="missing"):
        client.receive()
    assert client.close_code == 1011


def test_test_client_needs_a_path_for_url_variables_and_one_app():
    app = Flask(__name__)
    sockets = WebSockets(app, path="/rooms/<room>")
    with pytest.raises(ValueError, match="path"):
        sockets.test_client()
    shared = WebSockets()
    shared.init_app(Flask("one"))
    shared.init_app(Flask("two"))
    with pytest.raises(RuntimeError, match="http_client"):
        shared.test_client()


# ---------------------------------------------------------------------------
# URLs and servers that cannot upgrade
# ---------------------------------------------------------------------------


def test_url_for_gives_ws_and_wss():
    app, sockets = make_app()
    with app.test_request_context("/"):
        assert url_for("websocket") == "ws://localhost/"
        assert url_for("websocket", _external=True, _scheme="ws") == "ws://localhost/"
    with app.test_request_context("/", base_url="https://example.com"):
        assert url_for("websocket") == "wss://example.com/"


@pytest.mark.parametrize("wrap_first", [True, False])
def test_proxyfix_before_or_after_init_app(wrap_first):
    app = Flask(__name__)
    if wrap_first:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)
    sockets = WebSockets(app)
    if not wrap_first:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)
    sockets.on_message(lambda m: url_for("websocket"))
    fake = run(app, text("x"), headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example"})
    assert fake.messages == ["wss://chat.example/"]


def test_handshake_without_gevent_websocket_gets_a_clear_501(caplog):
    app, sockets = make_app()
    response = app.test_client().get("/", headers={**UPGRADE, "Sec-WebSocket-Version": "13"})
    assert response.status_code == 501
    body = response.get_data(as_text=True)
    assert "flask_websockets.serve(app)" in body and "handler_class=flask_websockets.WebSocketHandler" in body
    assert "refused" in caplog.text


def test_importing_configures_no_logging():
    code = (
        "import logging, flask_websockets as m\n"
        "log = logging.getLogger('flask_websockets')\n"
        "assert log.handlers == [] and log.level == logging.NOTSET, log\n"
        "assert logging.getLogger().handlers == []\n"
        "assert logging.getLogger('geventwebsocket').handlers == []\n"
        "import gevent.monkey; assert not gevent.monkey.is_anything_patched()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=SUBPROCESS_ENV)


# ---------------------------------------------------------------------------
# Integration: a real gevent server and websocket-client
# ---------------------------------------------------------------------------


SERVERS = ["flask_websockets", "gevent-websocket", "werkzeug"]


@contextlib.contextmanager
def serving(app, server="flask_websockets", **server_kwargs):
    """Serve ``app`` in a thread on 127.0.0.1; yield its ws:// URL (wss:// with a certfile).

    ``server``: gevent's WSGIServer with ``flask_websockets.WebSocketHandler``,
    or with gevent-websocket's own handler, or Werkzeug's threaded
    development server (what ``flask run`` uses).
    """
    scheme = "wss" if "ssl_context" in server_kwargs else "ws"
    if server == "werkzeug":
        dev = make_server("127.0.0.1", 0, app, threaded=True, **server_kwargs)
        thread = threading.Thread(target=dev.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"{scheme}://127.0.0.1:{dev.server_port}"
        finally:
            dev.shutdown()
            dev.server_close()
        return
    handler = flask_websockets.WebSocketHandler if server == "flask_websockets" else GeventWebSocketHandler
    server_kwargs.setdefault("log", None)
    started = threading.Event()
    box = {}

    def serve():
        server = pywsgi.WSGIServer(
            ("127.0.0.1", 0), app, handler_class=handler, spawn=gevent.pool.Pool(1000), **server_kwargs
        )
        server.start()
        box.update(server=server, hub=gevent.get_hub())
        started.set()
        try:
            server.serve_forever()
        finally:
            gc.collect()  # close the handlers' leftover sockets while their loop still exists
            gevent.get_hub().destroy(destroy_loop=True)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield f"{scheme}://127.0.0.1:{box['server'].server_port}"
    finally:
        box["hub"].loop.run_callback_threadsafe(gevent.spawn, box["server"].stop, 1)
        thread.join(10)
        assert not thread.is_alive()


OPENED = []  # sockets and connections a test opened, closed after it (see `close_what_the_test_opened`)


@pytest.fixture(autouse=True)
def close_what_the_test_opened():
    flask_websockets._summaries.clear()  # each test sees the first log line of each kind
    yield
    while OPENED:
        opened = OPENED.pop()
        with contextlib.suppress(Exception):
            opened.shutdown() if isinstance(opened, websocket.WebSocket) else opened.close()


def urlopen(url, data=None, timeout=5, context=None):
    """An HTTP request, its response read and closed: ``.read()``, ``.headers``, ``.status``."""
    with urllib.request.urlopen(url, data=data, timeout=timeout, context=context) as response:
        body = response.read()
    response.read = lambda: body
    return response


def client(url, **kwargs):
    """A websocket-client connection, closed after the test at the latest."""
    conn = websocket.WebSocket(**{k: kwargs.pop(k) for k in ("sslopt", "skip_utf8_validation") if k in kwargs})
    OPENED.append(conn)
    conn.settimeout(5)
    conn.connect(url, **kwargs)
    return conn


def recv_close(conn):
    """The server's close frame as (code, reason)."""
    op, data = conn.recv_data(control_frame=True)
    assert op == websocket.ABNF.OPCODE_CLOSE, (op, data)
    return int.from_bytes(data[:2], "big"), data[2:].decode()


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def demo_app(**kwargs):
    app = Flask(__name__)
    sockets = WebSockets(app, **kwargs)
    events = []

    @sockets.on_message
    def echo(message):
        return message

    @sockets.on_message("^ECHO .*")
    def cmd(message):
        ws.send("Starting work")
        return jsonify(reply=message.split(" ", 1)[1])

    @sockets.on_message("^SLOW")
    def slow(message):
        for i in range(3):
            ws.send(f"step {i}")
            gevent.sleep(0.1)
        return "done"

    @sockets.on_message("^CLOSE")
    def close_it(message):
        ws.close(4001, "closed by server")

    @sockets.on_close
    def closed():
        events.append(ws.close_code)

    return app, sockets, events


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_echo_text_binary_and_commands(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        c = client(url + "/")
        c.send("hello \u00e9")
        assert c.recv() == "hello \u00e9"
        c.send_binary(b"\x00\xff" * 40000)
        assert c.recv() == b"\x00\xff" * 40000
        c.send("ECHO yo")
        assert [c.recv(), json.loads(c.recv()), c.recv()] == ["Starting work", {"reply": "yo"}, "ECHO yo"]
        c.close(status=1000)
        wait_until(lambda: events == [1000])
    assert sockets._connections == set()


def test_real_match_one():
    app, sockets, events = demo_app(match_one=True)
    with serving(app) as url:
        c = client(url)
        c.send("ECHO yo")
        assert [c.recv(), json.loads(c.recv())] == ["Starting work", {"reply": "yo"}]
        c.send("plain")
        assert c.recv() == "plain"
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_status_updates_while_another_connection_stays_responsive(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        slow, quick = client(url), client(url)
        slow.send("SLOW")
        assert slow.recv() == "step 0"
        started = time.monotonic()
        for i in range(5):
            quick.send(f"ping {i}")
            assert quick.recv() == f"ping {i}"
        assert time.monotonic() - started < 0.1, "the other connection waited for the slow handler"
        assert [slow.recv() for _ in range(4)] == ["step 1", "step 2", "done", "SLOW"]
        slow.close()
        quick.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_invalid_utf8_closes_with_1007(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        c = client(url)
        c.send(b"\xed\xa0\x80", opcode=websocket.ABNF.OPCODE_TEXT)  # a UTF-16 surrogate
        assert recv_close(c) == (1007, "invalid UTF-8 in a text message")
        wait_until(lambda: events == [1007])


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_close_codes_both_ways(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        c = client(url)
        c.send("CLOSE")
        assert recv_close(c) == (4001, "closed by server")
        c.send_close(4001)
        c2 = client(url)
        c2.send_close(3003, b"client leaving")
        assert recv_close(c2) == (3003, "")
        wait_until(lambda: sorted(events) == [3003, 4001])


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_abrupt_disconnect_runs_on_close_and_empties_registry(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        clients = [client(url) for _ in range(3)]
        wait_until(lambda: len(sockets._connections) == 3)
        for c in clients:
            c.sock.shutdown(socket.SHUT_RDWR)
            c.sock.close()
        wait_until(lambda: events == [1006] * 3)
        assert sockets._connections == set()


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_fifty_concurrent_clients_lose_and_reorder_nothing(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        errors = []

        def talk(n):
            try:
                c = client(url)
                for i in range(20):
                    c.send(f"{n}-{i}")
                got = [c.recv() for _ in range(20)]
                assert got == [f"{n}-{i}" for i in range(20)], got
                c.close()
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=talk, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        wait_until(lambda: len(events) == 50)
        assert sockets._connections == set()


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_oversized_message_closes_with_1009_and_server_keeps_serving(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        other = client(url)
        big = client(url)
        big.send_binary(b"x" * (3 << 20))  # the default limit is 1 MiB
        assert recv_close(big) == (1009, "message over 1048576 bytes")
        other.send("fine")
        assert other.recv() == "fine"
        other.close()
        wait_until(lambda: sorted(events) == [1000, 1009])


def raw_handshake(url, receive_buffer=None):
    """A bare TCP client that completes the handshake, then neither reads nor writes.

    ``receive_buffer`` shrinks its socket's receive buffer, and so its TCP
    window: a client that does not read then holds little in the network.
    """
    parts = urllib.parse.urlsplit(url)
    sock = socket.socket()
    OPENED.append(sock)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(5)
    sock.connect((parts.hostname, parts.port))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sock.sendall(
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".encode()
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


ECHO_SERVER = """\
from flask import Flask
import flask_websockets
app = Flask(__name__)
flask_websockets.WebSockets(app).on_message(lambda message: message)
flask_websockets.serve(app, port=0, log=None)
"""


@contextlib.contextmanager
def echo_server_process(tmp_path):
    """An echo server in a process of its own, whose memory the test can read: yield (url, pid)."""
    (tmp_path / "echo_server.py").write_text(ECHO_SERVER)
    with process([sys.executable, "echo_server.py"], tmp_path, stdout=subprocess.PIPE) as proc:
        port = re.search(r":(\d+)/", proc.stdout.readline()).group(1)
        yield f"ws://127.0.0.1:{port}", proc.pid


def rss_kib(pid):
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


def warmed_up_rss_kib(url, pid):
    """The server's memory once it has served a few connections (what they allocate once is there)."""
    for _ in range(20):
        echo_round_trip(url)
    return rss_kib(pid)


def echo_round_trip(url, message="barrier"):
    """Also a barrier: once it returns, the server has read what came before it."""
    c = client(url)
    c.send(message)
    assert c.recv() == message
    c.close()


def read_close_then_eof(sock):
    """The server's close frame, then a clean end of the TCP stream (not a reset)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    [frame] = parse_server_frames(data)
    return frame


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_real_memory_stays_bounded_whatever_the_client_sends(tmp_path):
    with echo_server_process(tmp_path) as (url, pid):
        before = warmed_up_rss_kib(url, pid)
        # 200 connections, each announcing a 1 MB message and sending nothing more.
        announced = [raw_handshake(url) for _ in range(200)]
        for sock in announced:
            sock.sendall(bytes([0x82, 0xFF]) + (1_000_000).to_bytes(8, "big") + b"mask")
        echo_round_trip(url)
        assert rss_kib(pid) - before < 20 * 1024, "200 announced megabytes committed nothing"
        for sock in announced:
            sock.close()
        # Empty continuation frames, then 1-byte fragments: each costs 64 bytes of the limit.
        for fragment in (b"", b"x"):
            flood = raw_handshake(url)
            before = rss_kib(pid)
            flood.sendall(client_frame(BINARY, fragment, fin=False) + client_frame(0, fragment, fin=False) * 20_000)
            flood.sendall(client_frame(0, fragment))  # the end of the message: now the server answers
            flood.sendall(close(1009))
            assert read_close_then_eof(flood) == ("close", 1009, "message over 1048576 bytes")
            assert rss_kib(pid) - before < 5 * 1024
        echo_round_trip(url, "still serving")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_real_a_ping_flood_that_reads_nothing_stays_bounded_and_others_are_served(tmp_path):
    """Each ping's pong used to wait in memory: 41 -> 262 MiB in 15 s for one such client."""
    with echo_server_process(tmp_path) as (url, pid):
        before = warmed_up_rss_kib(url, pid)
        flood = raw_handshake(url, receive_buffer=4096)
        burst = client_frame(PING, b"flood") * 10_000
        for _ in range(200):  # 2,000,000 pings; the client reads none of their pongs
            flood.sendall(burst)
        echo_round_trip(url)  # the server has read them all
        assert rss_kib(pid) - before < 8 * 1024, "one pong waits, not 2,000,000"
        echo_round_trip(url, "still serving")


STUCK_HANDLER_SERVER = """\
import gevent
from flask import Flask
import flask_websockets
app = Flask(__name__)
sockets = flask_websockets.WebSockets(app)
sockets.on_message(lambda message: gevent.sleep(3600))  # never returns while the test runs
sockets.on_close(lambda: print("on_close", flush=True))
flask_websockets.serve(app, port=0, log=None)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts the server's file descriptors in /proc")
@pytest.mark.parametrize("leave", ["hang up", "close frame"])
def test_real_a_handler_that_never_returns_keeps_no_socket_once_its_client_has_gone(tmp_path, leave):
    """200 such clients left 208 fds open 15 s later: the socket waited for the handler."""
    (tmp_path / "app.py").write_text(STUCK_HANDLER_SERVER)
    with process([sys.executable, "app.py"], tmp_path, stdout=subprocess.PIPE) as proc:
        url = "ws://127.0.0.1:%s" % re.search(r":(\d+)/", proc.stdout.readline()).group(1)
        fds = lambda: len(os.listdir(f"/proc/{proc.pid}/fd"))  # noqa: E731
        before = fds()
        clients = [client(url) for _ in range(100)]
        for c in clients:
            c.send("stuck")  # each connection's handler now never returns
        echo = client(url)
        wait_until(lambda: fds() >= before + 100)
        for c in clients:
            if leave == "hang up":
                c.sock.close()
            else:
                c.close(timeout=5)
        wait_until(lambda: fds() <= before + 1, timeout=5)  # released at once, not when handlers return
        echo.close()


def test_real_a_frame_announcing_more_than_the_limit_gets_its_1009_at_once():
    """Its end never comes: the close used to wait for it, 4.4 s, up to the close timeout."""
    app, sockets, events = demo_app()
    with serving(app) as url:
        sock = raw_handshake(url)
        sock.sendall(bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big") + b"mask" + b"\x00" * 1000)
        sock.settimeout(1.0)  # under 100 ms here; well under the close timeout anywhere
        assert parse_server_frames(sock.recv(4096)) == [("close", 1009, "message over 1048576 bytes")]
        echo_round_trip(url, "still serving")


def test_real_a_client_flooding_echoes_starves_nobody(tmp_path):
    """One client pipelines echoes as fast as it can: others still get theirs, and new ones connect."""
    with echo_server_process(tmp_path) as (url, pid):
        flood = raw_handshake(url)
        flood.settimeout(None)
        burst = client_frame(TEXT, b"x" * 100) * 200
        stop, flowing = threading.Event(), threading.Event()

        def send_forever():
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    flood.sendall(burst)

        def read_forever():
            with contextlib.suppress(OSError):
                while flood.recv(65536) and not stop.is_set():
                    flowing.set()

        threads = [threading.Thread(target=send_forever), threading.Thread(target=read_forever)]
        for thread in threads:
            thread.start()
        try:
            assert flowing.wait(5)
            slowest = 0.0
            for i in range(10):
                start = time.monotonic()
                echo_round_trip(url, f"my turn {i}")  # a new connection, and an echo on it
                slowest = max(slowest, time.monotonic() - start)
            # Before the engine, the flood held the server: a new client waited more than 10 s.
            assert slowest < 2.0, f"a fresh connection and its echo took {slowest:.2f} s"
        finally:
            stop.set()
            flood.shutdown(socket.SHUT_RDWR)
            for thread in threads:
                thread.join(5)


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_2_mib_in_17_fragments_closes_cleanly_with_1009(server):
    """As Chromium sends a 2 MiB message: the server skips the rest, reads the client's close, closes TCP."""
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        for _ in range(5):
            sock = raw_handshake(url)
            for i in range(17):
                sock.sendall(client_frame(BINARY if i == 0 else 0, b"x" * 131072, fin=i == 16))
            sock.sendall(close(1009))  # the client answers the close frame it got meanwhile
            assert read_close_then_eof(sock) == ("close", 1009, "message over 1048576 bytes")
        wait_until(lambda: events == [1009] * 5)


@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
@pytest.mark.parametrize("method, extra, status", [
    ("GET", {"Content-Length": "5"}, 400),
    ("GET", {"Transfer-Encoding": "chunked"}, 400),
    ("HEAD", {}, 405),
])  # fmt: skip
@pytest.mark.slow
def test_real_a_handshake_that_is_not_a_bodiless_get_is_refused_before_any_101(server, method, extra, status, capfd):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        conn = http.client.HTTPConnection(*url[len("ws://") :].split(":"), timeout=5)
        OPENED.append(conn)
        conn.putrequest(method, "/", skip_accept_encoding=True)
        for name, value in {**HANDSHAKE, **extra}.items():
            conn.putheader(name, value)
        conn.endheaders(b"hello" if "Content-Length" in extra else b"5\r\nhello\r\n0\r\n\r\n" if extra else None)
        response = conn.getresponse()
        assert response.status == status
        if status == 405:
            assert response.getheader("Allow") == "GET"
        body = response.read()
        assert b"Internal Server Error" not in body
    assert events == [], "no connection opened"
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_keepalive_drops_a_silent_peer_and_keeps_a_live_one(server):
    app, sockets, events = demo_app()
    app.config.update(WEBSOCKETS_PING_INTERVAL=0.1, WEBSOCKETS_PING_TIMEOUT=0.1)
    with serving(app, server) as url:
        live = client(url)
        received = []
        reader = threading.Thread(target=lambda: received.append(live.recv()))
        reader.start()  # websocket-client answers pings while it waits in recv()
        silent = raw_handshake(url)
        wait_until(lambda: events == [1011], timeout=3)
        data = b""
        while True:  # what the silent peer was sent: a ping, the close frame, then EOF
            chunk = silent.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"\x89\x09keepalive")
        assert data.endswith(b"\x88\x18\x03\xf3keepalive ping timeout")
        time.sleep(0.5)  # the live peer idles through more pings, answering each
        assert len(sockets._connections) == 1
        live.send("still here")
        reader.join(5)
        assert received == ["still here"]
        live.close()
        wait_until(lambda: events == [1011, 1000])


def refused_status(url, **kwargs):
    """The HTTP status a refused handshake got (failing if it was accepted)."""
    with pytest.raises(websocket.WebSocketBadStatusException) as refusal:
        client(url, **kwargs).close()
    return refusal.value.status_code


def handshake_app():
    app, sockets, events = demo_app()

    @sockets.before_connect
    def gate():
        if request.args.get("token") == "none":
            abort(401)
        if request.args.get("token") == "busy":
            return "try again later", 429

    return app, sockets, events


@pytest.mark.slow
@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
def test_refused_handshakes_get_an_http_status_and_no_101(server):
    app, sockets, events = handshake_app()
    with serving(app, server) as url:
        assert refused_status(url + "/nowhere") == 404
        assert refused_status(url + "/", origin="http://evil.example") == 403
        assert refused_status(url + "/?token=none") == 401
        assert refused_status(url + "/?token=busy") == 429
        c = client(url + "/?token=good")
        c.send("in")
        assert c.recv() == "in"
        c.close()
        wait_until(lambda: events == [1000])  # only the accepted connection opened


def test_refused_handshakes_with_gevent_websockets_handler_close_with_1008():
    """Its 101 goes out before the app runs: a refusal can only close the connection."""
    app, sockets, events = handshake_app()
    with serving(app, "gevent-websocket") as url:
        assert recv_close(client(url + "/nowhere")) == (1008, "404 NOT FOUND")
        assert recv_close(client(url + "/", origin="http://evil.example")) == (1008, "403 FORBIDDEN")
        assert recv_close(client(url + "/?token=none")) == (1008, "401 UNAUTHORIZED")
        assert recv_close(client(url + "/?token=busy")) == (1008, "429 TOO MANY REQUESTS")
        assert events == []


@pytest.mark.slow
@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
def test_malformed_handshakes_get_426_or_400(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        port = int(url.rsplit(":", 1)[1])

        def handshake(version, key):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(
                "GET",
                "/",
                headers={
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Version": version,
                    "Sec-WebSocket-Key": key,
                },
            )
            response = conn.getresponse()
            conn.close()
            return response.status, response.getheader("Sec-WebSocket-Version")

        assert handshake("8", "dGhlIHNhbXBsZSBub25jZQ==") == (426, "13")
        assert handshake("13", "dG9vIHNob3J0")[0] == 400  # 9 bytes, not 16
        assert handshake("13", "not base64!!")[0] == 400
        assert events == []


@pytest.mark.parametrize(
    "allowed, origin, accepted",
    [
        (None, None, True),  # a client that is not a browser
        (None, "http://localhost", True),  # the same origin
        (None, "http://localhost:8080", False),  # another port is another origin
        (None, "http://evil.example", False),
        (None, "null", False),  # a sandboxed page
        (["https://app.example", "http://localhost:3000/"], "http://localhost:3000", True),
        (["https://app.example"], "HTTPS://APP.EXAMPLE", True),
        (["https://app.example"], "http://app.example", False),
        ("*", "http://anyone.example", True),
    ],
)
def test_allowed_origins(allowed, origin, accepted):
    app, sockets = make_app()
    app.config["WEBSOCKETS_ALLOWED_ORIGINS"] = allowed
    sockets.on_message(lambda message: message)
    fake = run(app, text("hi"), headers={"Origin": origin} if origin else {})
    if accepted:
        assert fake.status == 101 and fake.messages == ["hi"]
    else:
        assert fake.status == 403 and fake.frames == []


def test_origin_refusal_log_names_the_setting(caplog):
    app, sockets = make_app()
    run(app, headers={"Origin": "http://evil.example"})
    [record] = [r for r in caplog.records if "evil.example" in r.getMessage()]
    assert record.levelname == "WARNING" and "WEBSOCKETS_ALLOWED_ORIGINS" in record.getMessage()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["flask_websockets", "werkzeug"])
def test_subprotocol_negotiation(server):
    app = Flask(__name__)
    sockets = WebSockets(app, subprotocols=["chat.v1", "chat.v2"])
    sockets.on_message(lambda message: f"{message} over {ws.subprotocol}")
    with serving(app, server) as url:
        c = client(url, subprotocols=["chat.v3", "chat.v2", "chat.v1"])  # the client's order wins
        assert c.getsubprotocol() == "chat.v2"
        c.send("hi")
        assert c.recv() == "hi over chat.v2"
        c.close()
        c = client(url)  # none offered
        assert c.getsubprotocol() is None
        c.send("hi")
        assert c.recv() == "hi over None"
        c.close()
        c = client(url, suppress_origin=True)
        with pytest.raises(websocket.WebSocketException):  # offered only unknown ones: no header,
            client(url, subprotocols=["chat.v9"])  # which websocket-client (like browsers) rejects
        c.close()


def test_access_log_has_one_line_per_websocket_connection():
    app, sockets, events = demo_app()
    log = io.StringIO()
    with serving(app, log=log) as url:
        c = client(url + "/?room=1")
        c.send("x")
        assert c.recv() == "x"
        time.sleep(0.05)
        c.close()
        wait_until(lambda: '"GET /?room=1 HTTP/1.1" 101' in log.getvalue())
        with pytest.raises(urllib.error.HTTPError):  # an ordinary request, logged as pywsgi does
            urlopen(url.replace("ws://", "http://") + "/nowhere", timeout=5)
    websocket_line, http_line = log.getvalue().splitlines()
    assert re.fullmatch(r'127\.0\.0\.1 - - \[.*\] "GET /\?room=1 HTTP/1\.1" 101 - (\d+\.\d+)', websocket_line)
    assert float(websocket_line.rsplit(" ", 1)[1]) >= 0.05, "the duration is the connection's"
    assert '"GET /nowhere HTTP/1.1" 404' in http_line


def test_our_handler_leaves_loggers_alone():
    app, sockets, events = demo_app()
    logger = logging.getLogger("geventwebsocket.handler")
    mine = logging.NullHandler()
    logger.addHandler(mine)
    try:
        with serving(app) as url:
            assert refused_status(url + "/nowhere") == 404
            client(url).close()
        assert mine in logger.handlers
    finally:
        logger.removeHandler(mine)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost, and its CA."""
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("tls")
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(folder / "server.pem")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    return folder / "server.pem", folder / "ca.pem"


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_wss_echo_with_a_self_signed_certificate(server, certificate):
    pem, ca = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    app, sockets, events = demo_app()
    sockets.on_message("^URL$")(lambda message: url_for("websocket"))
    app.add_url_rule("/page", "page", lambda: render_template_string("{{ url_for('websocket') }}"))
    with serving(app, server, ssl_context=context) as url:
        assert url.startswith("wss://")
        c = client(url.replace("127.0.0.1", "localhost"), sslopt={"ca_certs": str(ca)})
        c.send("URL")
        assert [c.recv(), c.recv()] == [url.replace("127.0.0.1", "localhost") + "/", "URL"]
        c.send_binary(b"\x00" * 100_000)
        assert c.recv() == b"\x00" * 100_000
        c.close()
        page = urlopen(
            url.replace("wss://", "https://") + "/page", context=ssl.create_default_context(cafile=str(ca)), timeout=5
        )
        assert page.read().decode().startswith("wss://127.0.0.1:")
        wait_until(lambda: events == [1000])


def test_real_proxyfix_and_url_for():
    app, sockets, events = demo_app()
    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1)
    sockets.on_message("^URL")(lambda m: url_for("websocket", _external=True))
    with serving(app) as url:
        c = client(
            url,
            header=["X-Forwarded-Proto: https", "X-Forwarded-Host: chat.example"],
            origin="https://chat.example",  # the page's origin, as a browser behind the proxy sends it
        )
        c.send("URL")
        assert c.recv() == "wss://chat.example/"
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_http_index_and_websocket_share_the_root(server):
    app, sockets, events = demo_app()
    app.add_url_rule("/", "index", lambda: "index page")
    with serving(app, server) as url:
        http = url.replace("ws://", "http://") + "/"
        assert urlopen(http, timeout=5).read() == b"index page"
        c = client(url)
        c.send("x")
        assert c.recv() == "x"
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS[:2])
def test_real_server_stop_closes_open_connections_with_1001(server):
    app, sockets, events = demo_app()
    with serving(app, server) as url:
        c = client(url)
        wait_until(lambda: len(sockets._connections) == 1)
    assert recv_close(c) == (1001, "server shutting down")
    assert events == [1001]


class WireTap:
    """A TCP relay in front of a server that keeps every byte of every connection, each way.

    ``streams`` has one ``[to_server, to_client]`` pair of bytearrays per
    connection the client made, in the order it made them.
    """

    def __init__(self, port):
        self.port_behind = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.streams, self.sockets = [], []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:  # closed: the tap is done
                return
            upstream = socket.create_connection(("127.0.0.1", self.port_behind))
            self.sockets += [downstream, upstream]
            pair = [bytearray(), bytearray()]
            self.streams.append(pair)
            for source, sink, record in ((downstream, upstream, pair[0]), (upstream, downstream, pair[1])):
                thread = threading.Thread(target=self._pump, args=(source, sink, record), daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(source, sink, record):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                record += data
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def websocket(self):
        """The bytes of the (last) connection upgraded to a websocket, each way, after the handshake."""
        upgraded = [pair for pair in self.streams if pair[1].startswith(b"HTTP/1.1 101")]
        assert upgraded, "no websocket went through the tap"
        to_server, to_client = upgraded[-1]
        return bytes(to_server.split(b"\r\n\r\n", 1)[1]), bytes(to_client.split(b"\r\n\r\n", 1)[1])

    def close(self):
        self.listener.close()
        for sock in self.sockets:  # a browser keeps its connections open
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(5)
        for sock in self.sockets:
            sock.close()


@contextlib.contextmanager
def tapped(port):
    tap = WireTap(port)
    try:
        yield tap
    finally:
        tap.close()


def data_frames(data):
    """``(compressed, opcode)`` of each data frame's first frame in ``data``, control frames left out."""
    return [(bool(b0 & 0x40), b0 & 0x0F) for b0, _ in frame_headers(data) if b0 & 0x0F in (TEXT, BINARY)]


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS)
def test_real_the_websockets_library_compresses_both_ways_as_the_wire_shows(server):
    from websockets.sync.client import connect as websockets_connect

    app, sockets = compressing_app()
    sockets.on_message(lambda message: message)
    messages = [CHAT[1], "\u00e9" * 600, CHAT[2] * 10, b"\x00\x01" * 100_000, "x" * 600_000]
    with serving(app, server) as url, tapped(int(url.rsplit(":", 1)[1])) as tap:
        with websockets_connect(f"ws://127.0.0.1:{tap.port}/", max_size=None, open_timeout=5) as c:
            agreed = [extension.name for extension in c.protocol.extensions]
            for message in messages:
                c.send(message)
                assert c.recv(timeout=5) == message
    to_server, to_client = tap.websocket()
    if server == "gevent-websocket":  # its 101 went out before the app could answer the offer
        assert agreed == []
        assert data_frames(to_client) == [(False, TEXT)] * 3 + [(False, BINARY), (False, TEXT)]
        return
    assert agreed == ["permessage-deflate"]
    assert data_frames(to_server) == [(True, TEXT)] * 3 + [(True, BINARY), (True, TEXT)], "it compresses all"
    # The server leaves messages under 1 KiB as they are.
    assert data_frames(to_client) == [(False, TEXT), (True, TEXT), (True, TEXT), (True, BINARY), (True, TEXT)]
    assert len(to_client) < 20_000, "700 KiB of repetitive messages took little room"


def offering_websocket(port, offer):
    """A socket after a handshake that offered ``offer``; and the server's answer to it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    OPENED.append(sock)
    head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nSec-WebSocket-Extensions: {offer}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in HANDSHAKE.items())
    sock.sendall(head.encode() + b"\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    answer = re.search(rb"Sec-WebSocket-Extensions: ([^\r]*)", response)
    return sock, answer and answer.group(1).decode()


@pytest.mark.slow
def test_real_broadcasts_through_redis_are_compressed_where_agreed_and_compress_false_travels(redis_server, tmp_path):
    compressing = QUEUE_APP.replace("sockets = ", 'app.config["WEBSOCKETS_COMPRESSION"] = True\nsockets = ')
    with queue_servers(tmp_path, redis_server.url, app=compressing) as (ports, procs):
        socks = []
        for port in ports:
            for offer in (
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; server_max_window_bits=10",
                "x-nothing",
            ):
                sock, answer = offering_websocket(port, offer)
                sock.sendall(client_frame(TEXT, "PID"))  # once answered, the process reads the queue
                deflate = answer and flask_websockets._client_deflate(answer)
                socks.append((sock, _Protocol(client=True, max_size=None, deflate=deflate)))
        for sock, proto in socks:
            proto.receive_data(sock.recv(100))
            assert proto.next_event()[0] == TEXT
        publisher = flask_websockets.Publisher(redis_server.url)
        news = json.dumps({"news": CHAT})
        publisher.broadcast(news)
        publisher.broadcast("secret " + news, compress=False)
        post(ports[0], text="from a view " + news)
        for i, (sock, proto) in enumerate(socks):
            received, got = b"", []
            while len(got) < 3:
                data = sock.recv(65536)
                assert data, "the server closed"
                received += data
                proto.receive_data(data)
                while (event := proto.next_event()) is not None:
                    got.append(event[1])
            compressed = i % 3 != 2  # the third of each process offered nothing it knows
            flags = [flag for flag, _ in data_frames(received)]
            assert sorted(zip(got, flags)) == [  # two publishers: each one's order, not one order
                ("from a view " + news, compressed),
                ("secret " + news, False),
                (news, compressed),
            ]
        publisher.close()


# ---------------------------------------------------------------------------
# The README's snippets and example.py, run as a user would
# ---------------------------------------------------------------------------


def documents():
    """The README and every page of the documentation site, as text."""
    return [HERE / "README.rst", *sorted((HERE / "docs").glob("*.rst"))]


def readme_snippets():
    """Every Python block of the README and the docs, by the name in its ``.. snippet:`` comment."""
    snippets = {}
    for path in documents():
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"^\.\. snippet: (\S+)\n\n\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text, re.M)
        assert len(found) == text.count(".. code-block:: python"), f"{path.name}: every Python block needs a name"
        for name, body in found:
            code = "".join(line[4:] + "\n" for line in body.splitlines()).rstrip("\n") + "\n"
            assert snippets.setdefault(name, code) == code, f"snippet {name} differs between pages"
    return snippets


SERVE_SNIPPET = """\
import runpy, sys
import flask_websockets
flask_websockets.serve(runpy.run_path(sys.argv[1], run_name="snippet")["app"], port=0)
"""


@contextlib.contextmanager
def subprocess_server(args, tmp_path, cwd=HERE):
    """Run a server process that prints its port (or a URL) on its first line."""
    out = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=out,
        text=True,
        start_new_session=True,
    )
    try:
        first = proc.stdout.readline()
        port = re.search(r"(\d+)/?\W*$", first.split("(")[0].strip() + " ")
        assert port, f"no port in {first!r}; log: {(tmp_path / 'server.log').read_text()}"
        yield int(port.group(1)), lambda: (tmp_path / "server.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        out.close()


def serve_snippet(name, tmp_path):
    path = tmp_path / f"{name}.py"
    path.write_text(readme_snippets()[name])
    runner = tmp_path / "serve_snippet.py"
    runner.write_text(SERVE_SNIPPET)
    return subprocess_server([str(runner), str(path)], tmp_path, cwd=tmp_path)


def test_every_readme_snippet_is_tested():
    tested = {n[len("test_readme_") :].replace("_", "-") for n in globals() if n.startswith("test_readme_")}
    tested |= {"scaling-out", "publisher"}  # test_readme_scaling_out_and_publisher
    assert set(readme_snippets()) <= tested


@pytest.mark.slow
def test_readme_quickstart(tmp_path):
    """Copied into app.py and run with `python app.py`, on a free port instead of 5000."""
    source = readme_snippets()["quickstart"]
    assert "serve(app, port=5000)" in source
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "app.py").write_text(source.replace("5000", str(port)))
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "app.py")], cwd=tmp_path, env=SUBPROCESS_ENV, start_new_session=True
    )
    try:
        c = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
        c.send("hello")
        assert c.recv() == "hello"
        c.send("ECHO hi")
        assert [c.recv() for _ in range(3)] == ["Starting work", '{"reply":"hi"}\n', "ECHO hi"]
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_readme_handlers(tmp_path):
    with serve_snippet("handlers", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/")
        png = b"\x89PNG" + b"\x00" * 1230
        c.send("HELLO there")
        c.send("21")
        c.send_binary(png)
        c.send("what?")
        c.send_binary(b"\x00")
        assert [c.recv() for _ in range(5)] == [
            "hello to you",
            "42",
            "a PNG of 1234 bytes",
            "unknown str message",
            "unknown bytes message",
        ]
        c.close()


@pytest.mark.slow
def test_readme_long_task(tmp_path):
    with serve_snippet("long-task", tmp_path) as (port, log):
        slow, other = client(f"ws://127.0.0.1:{port}/"), client(f"ws://127.0.0.1:{port}/")
        slow.send("REPORT")
        assert slow.recv() == "loading"
        other.send("REPORT")  # time.sleep is cooperative: both reports run at once
        assert other.recv() == "loading"
        assert [slow.recv() for _ in range(3)] == ["computing", "rendering", "report ready"]
        assert [other.recv() for _ in range(3)] == ["computing", "rendering", "report ready"]
        http = urlopen(f"http://127.0.0.1:{port}/report", timeout=5)
        assert http.read() == b"report ready"
        slow.close()
        other.close()


def test_readme_contexts(tmp_path):
    with serve_snippet("contexts", tmp_path) as (port, log):
        login = urlopen(f"http://127.0.0.1:{port}/login/ada", timeout=5)
        cookie = login.headers["Set-Cookie"].split(";")[0]
        c = client(f"ws://127.0.0.1:{port}/?room=kitchen", cookie=cookie)
        anonymous = client(f"ws://127.0.0.1:{port}/")
        c.send("hi")
        anonymous.send("yo")
        c.send("again")
        assert [c.recv(), c.recv()] == ["ada in kitchen, message 1: hi", "ada in kitchen, message 2: again"]
        assert anonymous.recv() == "anonymous in lobby, message 1: yo"
        c.close()
        anonymous.close()


def test_readme_chat(tmp_path):
    with serve_snippet("chat", tmp_path) as (port, log):
        ann = client(f"ws://127.0.0.1:{port}/?name=ann")
        assert ann.recv() == "ann joined"
        bob = client(f"ws://127.0.0.1:{port}/?name=bob")
        assert ann.recv() == bob.recv() == "bob joined"
        bob.send("hi")
        assert ann.recv() == bob.recv() == "bob: hi"
        answer = urlopen(f"http://127.0.0.1:{port}/announce", data=b"text=lunch", timeout=5)
        assert answer.read() == b"sent to 2 clients"
        assert ann.recv() == bob.recv() == "announcement: lunch"
        bob.close()
        assert ann.recv() == "bob left (1000)"
        ann.close()


@pytest.mark.slow
def test_readme_chat_goes_on_while_a_client_reads_nothing(tmp_path):
    """Before bounded send buffers, every chatter blocked in broadcast() and was dropped by keepalive."""
    with serve_snippet("chat", tmp_path) as (port, log):
        url = f"ws://127.0.0.1:{port}/"
        raw_handshake(url + "?name=slow", receive_buffer=4096)  # joins, then never reads
        chatters = [client(f"{url}?name={name}") for name in ("ann", "bob", "cid")]
        heard = {name: [] for name in ("ann", "bob", "cid")}
        text = "x" * 12_000  # 3 x 200 of them: 7.2 MB for the slow client: TCP holds ~3 MB, the server 1 MiB
        own = {name: 0 for name in heard}  # how many of its own messages each chatter has heard back
        progress = threading.Condition()

        def listen(name, conn):
            while len([m for m in heard[name] if text in m]) < 600:
                message = conn.recv()
                with progress:
                    heard[name].append(message)
                    own[name] += message.startswith(f"{name}: ")
                    progress.notify_all()

        def talk(name, conn):
            for i in range(200):
                conn.send(f"{i} {text}")
                with progress:  # people wait to see their line: readers keep up, the slow one falls behind
                    assert progress.wait_for(lambda i=i: own[name] > i, timeout=20), f"{name} never heard line {i}"

        threads = [threading.Thread(target=f, args=(n, c)) for f in (listen, talk) for n, c in zip(heard, chatters)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for name in heard:
            said = [m.split(" ", 2)[:2] for m in heard[name] if text in m]
            for speaker in heard:  # everyone heard everything, each speaker in order
                assert [int(i) for who, i in said if who == f"{speaker}:"] == list(range(200))
        chatters[0].settimeout(10)  # the slow one's on_close comes after the close timeout (5 s)
        while not any(m.startswith("slow left") for m in heard["ann"]):
            heard["ann"].append(chatters[0].recv())
        assert [m for m in heard["ann"] if " left " in m] == ["slow left (1008)"], "only the slow one went"
        for conn in chatters:
            conn.close()


def test_readme_errors(tmp_path):
    with serve_snippet("errors", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/")
        for message in ("4", "0", "5"):
            c.send(message)
        assert [c.recv(), c.recv()] == ["25", "20"]
        assert "Exception in snippet.divide, websocket /" in log() and "ZeroDivisionError" in log()
        c.close()


@pytest.mark.slow
def test_readme_limits(tmp_path):
    with serve_snippet("limits", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/")
        c.send_binary(b"x" * 60 * 1024)
        assert c.recv() == "61440 bytes"
        c.send_binary(b"x" * 100 * 1024)
        assert recv_close(c) == (1009, "message over 65536 bytes")


@pytest.mark.slow
def test_readme_rate_limit(tmp_path):
    with serve_snippet("rate-limit", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/")
        start = time.monotonic()
        for i in range(60):
            c.send(str(i))
        assert [c.recv() for _ in range(40)] == [str(i) for i in range(40)]
        burst = time.monotonic() - start
        assert [c.recv() for _ in range(40, 60)] == [str(i) for i in range(40, 60)], "none lost, in order"
        assert time.monotonic() - start > burst + 0.5, "the 20 after the burst came at 20 a second"
        c.close()


@pytest.mark.slow
def test_readme_metrics(tmp_path, prometheus):
    with serve_snippet("metrics", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/")
        c.send("hi")
        assert c.recv() == "hi"
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
        assert metrics[("flask_websockets_messages_received_total", (("endpoint", "websocket"),))] == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert json.loads(response.read())["connections"] == 1
        c.close()


@pytest.mark.slow
def test_readme_slow_clients(tmp_path):
    with serve_snippet("slow-clients", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/")
        c.send("HISTORY")
        events = [c.recv() for _ in range(1001)]
        assert [e.split(":")[0] for e in events] == [f"event {n}" for n in range(1000)] + ["done"]
        lagging = raw_handshake(f"ws://127.0.0.1:{port}/", receive_buffer=4096)  # reads nothing
        lagging.sendall(text("HISTORY"))
        answers = []
        while b"sent to 1" not in answers:  # until the server has filled what TCP holds for it
            answers.append(urlopen(f"http://127.0.0.1:{port}/news", data=b"text=hello").read())
            assert len(answers) < 100
        assert answers[-1] == b"sent to 1", "the client that lags behind is skipped"
        assert [c.recv() for _ in answers] == ["hello"] * len(answers), "the other one got each"
        c.close()


@pytest.mark.slow
def test_readme_compression(tmp_path):
    """The websockets library offers compression as browsers do; the wire shows what went compressed."""
    from websockets.sync.client import connect as websockets_connect

    with serve_snippet("compression", tmp_path) as (port, log), tapped(port) as tap:
        with websockets_connect(f"ws://127.0.0.1:{tap.port}/", open_timeout=5) as c:
            assert c.response.headers["Sec-WebSocket-Extensions"] == "permessage-deflate; client_max_window_bits=12"
            c.send("HISTORY")
            history = c.recv(timeout=5)
            c.send("SEARCH cats")
            search = c.recv(timeout=5)
    assert json.loads(history)["messages"][99] == {"user": "bob", "text": "message 99"}
    assert json.loads(search) == {"query": "cats", "csrf": ""}
    to_client = [(b0 & 0x40 != 0, length) for b0, length in frame_headers(tap.websocket()[1]) if b0 & 0x0F == TEXT]
    (history_compressed, history_size), (search_compressed, search_size) = to_client
    assert history_compressed and 3000 < len(history.encode()) and history_size < len(history.encode()) / 10
    assert not search_compressed and search_size == len(search.encode())


def readme_block(name, language):
    """A block of another language in the README or the docs, by its ``.. snippet:`` name."""
    pattern = rf"^\.\. snippet: {name}\n\n\.\. code-block:: {language}\n\n((?:    .*\n|\n)+)"
    texts = [path.read_text(encoding="utf-8") for path in documents()]
    bodies = {m.group(1).rstrip("\n") for text in texts for m in re.finditer(pattern, text, re.M)}
    assert len(bodies) == 1, f"snippet {name}: {len(bodies)} versions"
    return "".join(line[4:] + "\n" for line in bodies.pop().splitlines())


@contextlib.contextmanager
def nginx(server_block, tmp_path):
    """A real nginx, in the foreground, with ``server_block`` in its http block; yield its port."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if binary is None:
        missing("nginx: apt-get install nginx", kind="nginx")
    port = free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in kinds)
    server_block = server_block.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (prefix / "nginx.conf").write_text(
        f"daemon off; master_process off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;\n"
        f"events {{}}\nhttp {{\n access_log {prefix}/access.log; {temp}\n{server_block}\n}}\n"
    )
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


@pytest.mark.slow
def test_readme_deploy(tmp_path):
    """The README's nginx server block, a real nginx, in front of the README's app."""
    program, app_port = run_snippet_as_a_program("deploy", tmp_path, 8000)
    server_block = readme_block("nginx", "nginx").replace("127.0.0.1:8000", f"127.0.0.1:{app_port}")
    with program as app_proc:
        connect_when_up(f"ws://127.0.0.1:{app_port}/", app_proc, origin=f"http://127.0.0.1:{app_port}").close()
        with nginx(server_block, tmp_path) as port:
            page = f"http://127.0.0.1:{port}"
            c = client(f"ws://127.0.0.1:{port}/", origin=page)  # a page served through nginx
            c.send("hi")
            assert c.recv() == f"ws://127.0.0.1:{port}/ from 127.0.0.1"
            c.close()
            assert refused_status(f"ws://127.0.0.1:{port}/", origin="http://evil.example") == 403


def test_readme_db_per_message(tmp_path):
    with serve_snippet("db-per-message", tmp_path) as (port, log):
        clients = [client(f"ws://127.0.0.1:{port}/") for _ in range(3)]
        for i, c in enumerate(clients):
            c.send(f"NOTE note {i}")
            assert c.recv() == f"{i + 1} notes"
        for c in clients:
            c.close()


def test_readme_token_auth(tmp_path):
    with serve_snippet("token-auth", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/", subprotocols=["bearer", "s3cr3t-t0ken"])
        assert c.subprotocol == "bearer"
        c.send("hi")
        assert c.recv() == "backup-robot"
        c.close()
        assert refused_status(f"ws://127.0.0.1:{port}/", subprotocols=["bearer", "wrong"]) == 401
        assert refused_status(f"ws://127.0.0.1:{port}/") == 401
        assert "s3cr3t-t0ken" not in log(), "the token stays out of the access log"


@pytest.mark.slow
def test_readme_rooms(tmp_path):
    with serve_snippet("rooms", tmp_path) as (port, log):
        ann, bob, cid = (client(f"ws://127.0.0.1:{port}/?name={name}") for name in ("ann", "bob", "cid"))
        ann.send("JOIN kitchen")
        assert ann.recv() == "you are in kitchen"
        bob.send("JOIN kitchen")
        assert bob.recv() == "you are in kitchen" and ann.recv() == "bob joined kitchen"
        bob.send("SAY kitchen hi")
        cid.send("SAY kitchen not a member")
        assert ann.recv() == "bob: hi"
        assert_nothing_more(ann, bob, cid)
        for c in (ann, bob, cid):
            c.close()


def signed_in(port, name):
    """A session cookie from the snippet's /login/<name>."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/login/{name}", timeout=5) as response:
        return response.headers["Set-Cookie"].split(";", 1)[0]


@pytest.mark.slow
def test_readme_users_chat(tmp_path):
    with serve_snippet("users-chat", tmp_path) as (port, log):
        assert refused_status(f"ws://127.0.0.1:{port}/") == 401, "signed-in users only"
        ann = client(f"ws://127.0.0.1:{port}/", cookie=signed_in(port, "ann"))
        bob = client(f"ws://127.0.0.1:{port}/", cookie=signed_in(port, "bob"))
        bob2 = client(f"ws://127.0.0.1:{port}/", cookie=signed_in(port, "bob"))
        ann.send("JOIN kitchen")
        assert json.loads(ann.recv()) == {"room": "kitchen", "online": ["ann"]}
        both = {"room": "kitchen", "online": ["ann", "bob"]}
        bob.send("JOIN kitchen")
        assert json.loads(ann.recv()) == json.loads(bob.recv()) == both
        bob2.send("JOIN kitchen")
        assert json.loads(ann.recv()) == json.loads(bob.recv()) == json.loads(bob2.recv()) == both, "bob once"
        bob.send("SAY hi")
        assert ann.recv() == bob2.recv() == "bob: hi"
        bob.close()
        bob2.close()
        assert json.loads(ann.recv()) == both, "bob still has a tab"
        assert json.loads(ann.recv()) == {"room": "kitchen", "online": ["ann"]}
        ann.close()


@pytest.mark.slow
def test_readme_users_logout(tmp_path):
    (tmp_path / "logout_app.py").write_text(
        readme_snippets()["users-logout"]
        + '\n@app.get("/login/<name>")\ndef login(name):\n    session["user_id"] = name\n    return ""\n'
    )
    (tmp_path / "serve_snippet.py").write_text(SERVE_SNIPPET)
    with subprocess_server(
        [str(tmp_path / "serve_snippet.py"), str(tmp_path / "logout_app.py")], tmp_path, cwd=tmp_path
    ) as (port, log):
        ann_cookie = signed_in(port, "ann")
        tabs = [client(f"ws://127.0.0.1:{port}/", cookie=ann_cookie) for _ in range(2)]
        bob = client(f"ws://127.0.0.1:{port}/", cookie=signed_in(port, "bob"))
        request_ = urllib.request.Request(f"http://127.0.0.1:{port}/logout", data=b"", headers={"Cookie": ann_cookie})
        with contextlib.suppress(urllib.error.HTTPError):  # the redirect to / finds no page there
            urllib.request.urlopen(request_, timeout=5).close()
        for c in tabs:
            assert recv_close(c) == (4001, "signed out")
        bob.send("still here")
        assert_nothing_more(bob)
        bob.close()


def test_readme_users_notify(redis_server):
    app, sockets = make_app(message_queue=redis_server.url)
    sockets.on_open(lambda: ws.identify(request.args["user"]))
    namespace = {}
    exec(readme_snippets()["users-notify"].replace("redis://localhost:6379/0", redis_server.url), namespace)
    tab1, other = (sockets.test_client(query_string={"user": user}) for user in ("42", "7"))
    with tab1, other:
        wait_until(lambda: namespace["notifier"].count() == 2)
        assert namespace["report_ready"]("42", "/reports/1") == 2
        assert tab1.receive(timeout=10) == "your report is ready: /reports/1"
        with pytest.raises(TimeoutError):
            other.receive(timeout=0.3)
    namespace["notifier"].close()


def test_readme_users_testing(tmp_path):
    (tmp_path / "test_users.py").write_text(readme_snippets()["users-testing"])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_users.py"],
        cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def serve_snippet_with_queue(name, tmp_path, url):
    path = tmp_path / f"{name}.py"
    path.write_text(readme_snippets()[name].replace("redis://localhost:6379/0", url))
    (tmp_path / "serve_snippet.py").write_text(SERVE_SNIPPET)
    return process([sys.executable, "serve_snippet.py", str(path)], tmp_path, stdout=subprocess.PIPE)


@pytest.mark.slow
def test_readme_scaling_out_and_publisher(redis_server, tmp_path):
    """Two processes of the snippet, as two gunicorn workers would be; then the publisher script."""
    with serve_snippet_with_queue("scaling-out", tmp_path, redis_server.url) as one, serve_snippet_with_queue(
        "scaling-out", tmp_path, redis_server.url
    ) as two:
        ports = [int(re.search(r":(\d+)/", proc.stdout.readline()).group(1)) for proc in (one, two)]
        clients = [client(f"ws://127.0.0.1:{port}/") for port in ports]
        announce = urlopen(f"http://127.0.0.1:{ports[0]}/announce", data=b"text=lunch").read()
        assert announce == b"sent to 1 here, and to every other worker"
        assert [c.recv() for c in clients] == ["lunch", "lunch"]
        script = readme_snippets()["publisher"].replace("redis://localhost:6379/0", redis_server.url)
        subprocess.run([sys.executable, "-c", script], check=True, env=SUBPROCESS_ENV, timeout=30)
        assert [c.recv() for c in clients] == ["the servers restart at 2:00"] * 2, "no room member: not the kitchen's"
        assert_nothing_more(*clients)
        for c in clients:
            c.close()


def run_snippet_as_a_program(name, tmp_path, port_in_snippet, **replacements):
    """Write the snippet to app.py, on a free port; return `python app.py` (to run with `with`) and the port."""
    source = readme_snippets()[name]
    assert str(port_in_snippet) in source
    port = free_port()
    source = source.replace(str(port_in_snippet), str(port))
    for old, new in replacements.items():
        source = source.replace(old, new)
    (tmp_path / "app.py").write_text(source)
    return process([sys.executable, "app.py"], tmp_path), port


def test_readme_handshake(tmp_path):
    with serve_snippet("handshake", tmp_path) as (port, log):
        url = f"ws://127.0.0.1:{port}/"
        login = urlopen(f"http://127.0.0.1:{port}/login?name=ada", timeout=5)
        cookie = login.headers["Set-Cookie"].split(";")[0]
        assert refused_status(url, origin="https://app.example.com") == 401  # no session
        assert refused_status(url, cookie=cookie, origin="https://evil.example") == 403
        c = client(url, cookie=cookie, origin="https://app.example.com", subprotocols=["chat.v1", "chat.v2"])
        assert c.getsubprotocol() == "chat.v1"
        c.send("hi")
        assert c.recv() == "ada (chat.v1): hi"
        c.close()


@pytest.mark.slow
def test_readme_tls(tmp_path, certificate):
    pem, ca = certificate
    shutil.copy(pem, tmp_path / "cert.pem")  # the certificate and its key, in one file
    shutil.copy(pem, tmp_path / "key.pem")
    program, port = run_snippet_as_a_program("tls", tmp_path, 8443)
    with program as proc:
        url = f"wss://localhost:{port}/"
        c = connect_when_up(url, proc, sslopt={"ca_certs": str(ca)}, origin=f"https://localhost:{port}")
        c.send("where?")
        assert c.recv() == url
        c.close()


@pytest.mark.slow
def test_readme_gevent(tmp_path):
    program, port = run_snippet_as_a_program("gevent", tmp_path, 5000)
    with program as proc:
        c = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
        c.send("hi")
        assert c.recv() == "hi"
        assert refused_status(f"ws://127.0.0.1:{port}/nowhere") == 404  # flask_websockets' handler
        c.close()


@pytest.mark.slow
def test_readme_targeted(tmp_path):
    with serve_snippet("targeted", tmp_path) as (port, log):
        base = f"http://127.0.0.1:{port}"

        def logged_in(name):
            cookie = urlopen(f"{base}/login/{name}", timeout=5).headers["Set-Cookie"].split(";")[0]
            return client(f"ws://127.0.0.1:{port}/", cookie=cookie)

        ada_tabs = [logged_in("ada"), logged_in("ada")]
        bob = logged_in("bob")
        bob.send("TOPIC cats")
        assert bob.recv() == "following cats"
        tell = urlopen(f"{base}/tell/ada", data=b"text=dinner", timeout=5).read()
        assert tell == b"2 tabs"
        assert [tab.recv() for tab in ada_tabs] == ["dinner", "dinner"]
        news = urlopen(f"{base}/news/cats", data=b"text=new+cat", timeout=5).read()
        assert news == b"1 followers"
        assert bob.recv() == "new cat"
        for c in ada_tabs:  # nothing else came to ada
            c.settimeout(0.2)
            with pytest.raises(websocket.WebSocketTimeoutException):
                c.recv()
            c.close()
        bob.close()


@pytest.mark.slow
def test_readme_blueprints(tmp_path):
    with serve_snippet("blueprints", tmp_path) as (port, log):
        game = client(f"ws://127.0.0.1:{port}/game/")
        game.send("e4")
        assert game.recv() == f"move e4 (ws://127.0.0.1:{port}/game/)"
        kitchen = [client(f"ws://127.0.0.1:{port}/rooms/kitchen") for _ in range(2)]
        hall = client(f"ws://127.0.0.1:{port}/rooms/hall")
        kitchen[0].send("hi")
        assert [c.recv() for c in kitchen] == ["kitchen: hi", "kitchen: hi"]
        hall.send("yo")
        assert hall.recv() == "hall: yo"
        for c in kitchen:
            c.settimeout(0.2)
            with pytest.raises(websocket.WebSocketTimeoutException):
                c.recv()  # the hall's message stayed in the hall
        for c in (game, hall, *kitchen):
            c.close()


@pytest.mark.slow
def test_readme_errorhandlers(tmp_path):
    with serve_snippet("errorhandlers", tmp_path) as (port, log):
        c = client(f"ws://127.0.0.1:{port}/")
        c.send("4")
        c.send("0")
        c.send("x")
        assert [c.recv(), json.loads(c.recv()), c.recv()] == [
            "25",
            {"error": "arithmetic", "detail": "integer division or modulo by zero"},
            "send a number",
        ]
        c.send("secret")
        assert recv_close(c) == (4003, "forbidden")
        assert "Traceback" not in log(), "handled errors are not logged"


@pytest.mark.slow
def test_readme_testing(tmp_path):
    """The README's test file, run by pytest as a user would run it."""
    (tmp_path / "test_chat.py").write_text(readme_snippets()["testing"])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_chat.py"],
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_readme_proxyfix(tmp_path):
    with serve_snippet("proxyfix", tmp_path) as (port, log):
        c = client(
            f"ws://127.0.0.1:{port}/",
            header=["X-Forwarded-Proto: https", "X-Forwarded-Host: public.host"],
            origin="https://public.host",
        )
        c.send("URL")
        assert c.recv() == "wss://public.host/"
        c.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_when_up(url, proc, timeout=20, **kwargs):
    """A websocket to a server that is still starting (or restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client(url, **kwargs)
        except (OSError, websocket.WebSocketException):
            assert proc.poll() is None, f"the server exited with {proc.returncode}{server_output(proc)}"
            assert time.monotonic() < deadline, f"the server did not come up in {timeout} s{server_output(proc)}"
            time.sleep(0.1)


@contextlib.contextmanager
def process(args, cwd, env=SUBPROCESS_ENV, **kwargs):
    """A server process in its own process group, stopped with all its children.

    What it writes to its pipes reaches the test as usual, and a copy is
    kept: a test that fails shows it (``server_output``).
    """
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True, **kwargs
    )
    keep_output(proc)
    try:
        yield proc
    except BaseException as error:
        stop_process(proc)
        if hasattr(error, "add_note") and "--- the server's" not in str(error):  # Python 3.11+: pytest shows it
            error.add_note(server_output(proc).lstrip("\n"))
        raise
    finally:
        stop_process(proc)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def stop_process(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)


def keep_output(proc):
    """Put a thread between each of ``proc``'s pipes and the test: it passes the output on and keeps a copy."""
    proc.kept, proc.tees = [], []
    for name in ("stdout", "stderr"):
        pipe = getattr(proc, name)
        if pipe is None:
            continue
        read_end, write_end = os.pipe()
        tee = threading.Thread(target=pass_on, args=(pipe, write_end, name, proc.kept), daemon=True)
        tee.start()
        proc.tees.append(tee)
        setattr(proc, name, open(read_end, encoding=pipe.encoding, errors=pipe.errors))


def pass_on(pipe, write_end, name, kept):
    with pipe, open(write_end, "wb", buffering=0) as out:
        while True:
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                return
            kept.append((name, chunk))
            try:
                out.write(chunk)  # a pipe's blocking write writes it all
            except OSError:  # the test closed its end: keep reading, for the copy
                pass


def server_output(proc, limit=20_000):
    """What a ``process`` wrote to its pipes, for a failure message: the end of each."""
    if not hasattr(proc, "kept"):
        return "\n(its output was not piped: see pytest's captured output)"
    if proc.poll() is not None:
        for tee in proc.tees:
            tee.join(1)  # the last words (a process's children may hold the pipes open longer)
    text = ""
    for name in ("stdout", "stderr"):
        if any(n == name for n, _ in proc.kept):
            data = b"".join(chunk for n, chunk in list(proc.kept) if n == name).decode(errors="replace")
            text += f"\n--- the server's {name}{' (its end)' if len(data) > limit else ''} ---\n{data[-limit:]}"
    return text or "\n(it wrote nothing to its pipes)"


VERSIONED_APP = """\
from flask import Flask
import flask_websockets

app = Flask(__name__)
sockets = flask_websockets.WebSockets(app)
VERSION = "v1"


@sockets.on_message
def echo(message):
    return f"{VERSION}: {message}"


if __name__ == "__main__":
    flask_websockets.serve(app, port=PORT, reload=RELOAD)
"""


def wait_for_version(url, proc, version, timeout=20):
    """Reconnect until the server that answers runs the given version of the code."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = connect_when_up(url, proc, timeout=max(0.1, deadline - time.monotonic()))
            c.send("hi")
            reply = c.recv()
            c.close()
            if reply == f"{version}: hi":
                return
        except (OSError, websocket.WebSocketException):
            pass  # the old process is going away
        assert time.monotonic() < deadline, f"never saw {version}"
        time.sleep(0.2)


def edit_version(path, version):
    path.write_text(path.read_text().replace('VERSION = "v1"', f'VERSION = "{version}"'))
    later = time.time() + 2
    os.utime(path, (later, later))  # an mtime the reloader cannot miss


@pytest.mark.slow
def test_serve_prints_its_url_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    (tmp_path / "app.py").write_text(VERSIONED_APP.replace("PORT", str(port)).replace("RELOAD", "False"))
    with process([sys.executable, "app.py"], tmp_path, stdout=subprocess.PIPE) as proc:
        assert proc.stdout.readline().strip() == f"* Serving on http://127.0.0.1:{port}/ (press Ctrl-C to quit)"
        c = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
        c.send("hi")
        assert c.recv() == "v1: hi"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
        assert recv_close(c) == (1001, "server shutting down")
        assert "Traceback" not in proc.stderr.read()


def raw_websocket(port, path="/"):
    sock = raw_handshake(f"ws://127.0.0.1:{port}{path}")
    sock.settimeout(10)
    return sock


def answer_the_close(sock):
    """Play a well-behaved client: read until the server's close frame, answer it, read to the end.

    Returns every frame the server sent; fails if anything came after its
    close frame, or if the connection was reset rather than closed.
    """
    data, answered = b"", False
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()  # as clients do once the server has closed
            break
        data += chunk
        if not answered and any(f[0] == "close" for f in parse_server_frames(data)):
            sock.sendall(close(1001))
            answered = True
    return parse_server_frames(data)


def stop_with_open_websockets(proc, port, signum, within, close=(1001, "server shutting down"), group=False):
    """Three clients each get a reply; the signal comes right after the last one; each gets ``close``.

    With ``group``, the signal goes to every process of the group, as Ctrl-C's does.
    """
    clients = [raw_websocket(port) for _ in range(3)]
    for i, sock in enumerate(clients):
        sock.sendall(text(f"hi {i}"))
    replies = [parse_server_frames(sock.recv(4096)) for sock in clients]
    os.killpg(proc.pid, signum) if group else proc.send_signal(signum)  # the racy moment: handlers have just replied
    start = time.monotonic()
    ends = [answer_the_close(sock) for sock in clients]
    assert proc.wait(within) == 0
    assert time.monotonic() - start < within
    for reply, end in zip(replies, ends):
        assert len(reply) == 1 and reply[0][0] == "text"
        assert end == [("close", *close)], "one close frame, then the end: nothing else"
    for sock in clients:
        sock.close()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_with_1001_on_sigint_and_sigterm_every_time(signum, tmp_path):
    (tmp_path / "app.py").write_text(VERSIONED_APP.replace("PORT", "0").replace("RELOAD", "False"))
    for round in range(10):
        with process([sys.executable, "app.py"], tmp_path, stdout=subprocess.PIPE) as proc:
            port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
            stop_with_open_websockets(proc, port, signum, within=3)
            assert "Traceback" not in proc.stderr.read(), f"round {round}"


GUNICORN_APP = """\
from flask import Flask
from flask_websockets import WebSockets
app = Flask(__name__)
WebSockets(app).on_message(lambda message: f"echo {message}")
"""


def gunicorn_command(port, *options):
    args = [sys.executable, "-m", "gunicorn", "-k", "flask_websockets.GunicornWorker", "-b", f"127.0.0.1:{port}"]
    usage = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True).stdout
    if "--no-control-socket" in usage:  # gunicorn 24+: not its one shared ~/.gunicorn/gunicorn.ctl
        args.append("--no-control-socket")
    return args + list(options)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, close",
    [(signal.SIGTERM, (1012, "service restart")), (signal.SIGINT, (1001, "server shutting down"))],
    ids=["SIGTERM", "SIGINT"],
)
def test_gunicorn_workers_close_with_1012_on_sigterm_and_1001_on_sigint(signum, close, tmp_path):
    """A graceful SIGTERM or a quick SIGINT: close frames at once, not a drop after 30 s.

    The workers get SIGTERM from a reload too, and cannot tell: 1012, "come back".
    """
    (tmp_path / "gapp.py").write_text(GUNICORN_APP)
    for round in range(10):
        port = free_port()
        args = gunicorn_command(port, "-w", "1", "--graceful-timeout", "30", "gapp:app")
        with process(args, tmp_path) as proc:
            connect_when_up(f"ws://127.0.0.1:{port}/", proc).close()
            stop_with_open_websockets(proc, port, signum, within=5, close=close)
            assert "Traceback" not in proc.stderr.read(), f"round {round}"


def header_block_as_parsed(parse, block):
    try:
        m = parse(io.BytesIO(block))
    except Exception as error:  # noqa: BLE001 - the same error from both is the same behaviour
        return repr(error)
    return m.status, list(m.headers), m.items(), m.typeheader, m.get_payload(), [repr(d) for d in m.defects]


def test_request_headers_are_read_exactly_as_pywsgis_own_parser_reads_them():
    """WebSocketHandler reads plain header lines itself (the email parser was a tenth of a connection's cost)."""
    blocks = [
        b"Host: a\r\nUpgrade: websocket\r\nX:  padded  \r\nEmpty:\r\n\r\n",
        b"Cookie: a=1\r\nCookie: b=2\r\nContent-Type: text/plain\r\n\r\n",
        b"Host: a\r\n folded\r\n\r\n",  # obsolete line folding
        b"Bad line\r\nHost: x\r\n\r\n",  # no colon: the email parser stops reading headers
        b"From me\r\nHost: x\r\n\r\n",
        b"X: a\rb\r\nY: c\r\n\r\n",  # a bare CR ends a line for the email parser
        b"Name : v\r\n\r\n",
        b"A: \xe9\xff\r\n\n",
        b"X" * 70000 + b"\r\n\r\n",  # "Line too long": pywsgi answers 400
        b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n",  # more than 100 headers
        b"".join(b"H%d: v\r\n" % i for i in range(99)) + b"\r\n",
    ]
    rng = random.Random(22)
    pieces = [b"A", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"From ", b"\xe9", b"-", b"_", b"\x00", b"("]
    pieces.append(b"Host: x\r\n")
    blocks += [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(3000)]
    for block in blocks:
        expected = header_block_as_parsed(pywsgi.headers_factory, block)
        assert header_block_as_parsed(flask_websockets._read_headers, block) == expected, block
        assert header_block_as_parsed(read_after_request_line, block) == expected, block


def test_the_handlers_reader_once_taken_over_reads_like_a_closed_file():
    """A middleware that reads an upgrade's wsgi.input after the websocket took it must not read the websocket."""
    client, served = gevent.socket.socketpair()
    with client, served:
        client.sendall(b"GET / HTTP/1.1\r\n\r\nframe bytes")
        reader = flask_websockets._Reader(served)
        assert reader.readline() == b"GET / HTTP/1.1\r\n" and reader.readline() == b"\r\n"
        assert reader.take() == b"frame bytes"
        client.sendall(b"the websocket's")
        with pytest.raises(ValueError):
            reader.read(10)
        assert served.recv(100) == b"the websocket's"


def read_after_request_line(stream):
    """Headers read as WebSocketHandler reads them: from its reader, which holds them all after the request line."""

    class Socket:
        def recv(self, size):
            return stream.read(size)

    stream = io.BytesIO(b"GET / HTTP/1.1\r\n" + stream.read())
    reader = flask_websockets._Reader(Socket())
    reader.readline()
    return flask_websockets._read_headers(flask_websockets._HeadReader(reader, 1 << 20))


def served_by(handler_class, request_bytes, cuts=()):
    """What a WSGI app sees of a request served by ``handler_class``, and the bytes the client gets back.

    The client sends the request in pieces, cut at ``cuts``, letting the server read between them.
    """
    seen = []

    def app(environ, start_response):
        stream = environ["wsgi.input"]
        try:
            body = stream.read() if environ.get("wsgi.input_terminated") else stream.readline()
        except OSError as error:  # a body shorter than its Content-Length
            body = repr(error)
        plain = {k: v for k, v in environ.items() if isinstance(v, (str, bool, tuple)) and not k.startswith("flask_")}
        seen.append((plain, body))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr(body).encode()]

    server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.environ.update(SERVER_NAME="test", SERVER_PORT="80")
    client, served = gevent.socket.socketpair()

    def send():
        start = 0
        with contextlib.suppress(OSError):  # the server may answer 400 and close before the rest
            for end in [*cuts, len(request_bytes)]:
                client.sendall(request_bytes[start:end])
                start = end
                gevent.sleep(0.001)  # the server reads what came
            client.shutdown(socket.SHUT_WR)

    with client, served:
        sender = gevent.spawn(send)
        with gevent.Timeout(5):
            handler_class(served, ("127.0.0.1", 4321), server).handle()
            sender.join()
            answer = client.recv(1 << 20)
    return seen, re.sub(rb"Date: [^\r]*\r\n", b"", answer)


def test_requests_reach_the_app_exactly_as_through_pywsgis_own_handler(monkeypatch):
    """WebSocketHandler reads requests through its own reader, and websocket handshakes of the usual form at once."""
    at_once = []
    handle_handshake = flask_websockets.WebSocketHandler._handle_handshake
    monkeypatch.setattr(
        flask_websockets.WebSocketHandler,
        "_handle_handshake",
        lambda self, *head: at_once.append(head[1]) or handle_handshake(self, *head),
    )
    handshake = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    heads = [
        b"GET /ws?x=%41&y HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n" + handshake,
        b"GET /a%2Fb HTTP/1.1\r\nCookie: a=1\r\nCookie: b=2\r\nX-A: 1\r\nX-A:2 \r\nX_B: no\r\nUpgrade: websocket\r\n",
        b"GET /close HTTP/1.1\r\nUpgrade: websocket\r\nConnection: close\r\n" + handshake,
        b"GET /twice HTTP/1.1\r\nUpgrade: websocket\r\nUpgrade: websocket\r\n" + handshake,
        b"GET /body HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 5\r\n" + handshake,
        b"GET /bare-lf HTTP/1.1\nUpgrade: websocket\n" + handshake,
        b"GET /trailing HTTP/1.1\r\nUpgrade: websocket \r\nConnection: keep-alive\r\n" + handshake,
        b"GET /p%C3%A9?q=1&r HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2\r\nX-A: 1\r\nX-A: 2\r\nX_B: hidden\r\n",
        b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nX:  padded  \t\r\n",
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        b"GET /f HTTP/1.0\r\nHost: a\r\n folded\r\nUpgrade: websocket\r\n",
        b"GET /e HTTP/1.1\r\nEmpty:\r\nA: \xe9\xff\r\nUpgrade: h2c\r\n",
    ]
    bodies = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"line one\nline two\n", b"x" * 100000]
    requests = [head + b"\r\n" + body for head in heads for body in bodies]
    rng = random.Random(22)
    pieces = [b"A", b":", b" ", b"\t", b"-", b"_", b"\xe9", b"\r\n", b"Upgrade: websocket\r\n"]
    pieces.append(b"Content-Length: 3\r\n")
    for _ in range(300):
        block = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        requests.append(b"GET /r HTTP/1.1\r\nHost: x\r\n" + block + b"\r\n\r\nabcdef")
    for i, request_bytes in enumerate(requests):
        cuts = sorted(rng.sample(range(1, len(request_bytes)), min(4, len(request_bytes) - 1))) if i % 3 else ()
        ours = served_by(flask_websockets.WebSocketHandler, request_bytes, cuts)
        assert ours == served_by(pywsgi.WSGIHandler, request_bytes, cuts), (request_bytes, cuts)
        assert ours[0] or b"400" in ours[1] or not ours[1], request_bytes  # the app saw it, or a 400
    assert {"/ws?x=%41&y", "/a%2Fb", "/close"} <= set(at_once)  # the usual handshakes were read at once
    assert not {"/twice", "/body", "/bare-lf", "/trailing"} & set(at_once)  # pywsgi read the others


SLOW_HEADERS_APP = """\
from flask import Flask
import flask_websockets
app = Flask(__name__)
flask_websockets.WebSockets(app).on_message(lambda message: message)
flask_websockets.serve(app, port=0, log=None, handshake_timeout=1.0, max_connections=MAX)
"""


@pytest.mark.slow
def test_slow_header_clients_are_closed_at_the_handshake_deadline_and_others_are_served(tmp_path):
    (tmp_path / "app.py").write_text(SLOW_HEADERS_APP.replace("MAX", "None"))
    with process([sys.executable, "app.py"], tmp_path, stdout=subprocess.PIPE) as proc:
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        slow = []
        for _ in range(200):  # half a request line, then a byte now and then
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            OPENED.append(sock)
            sock.sendall(b"GET / HT")
            slow.append(sock)
        start = time.monotonic()
        echo_round_trip(f"ws://127.0.0.1:{port}", "served meanwhile")
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.sendall(b"T")
        for sock in slow:  # each closed at its deadline, 1 s after it connected: no request line, no answer
            assert sock.recv(4096) == b""
        assert time.monotonic() - start < 5
        echo_round_trip(f"ws://127.0.0.1:{port}", "still serving")


@pytest.mark.slow
def test_max_connections_bounds_websockets_and_idle_sockets_lock_nobody_out(tmp_path):
    """With max_connections=3, idle sockets used to fill the pool: handshakes and HTTP timed out."""
    app = SLOW_HEADERS_APP.replace("MAX", "3").replace("handshake_timeout=1.0", "handshake_timeout=30")
    (tmp_path / "app.py").write_text(app)
    with process([sys.executable, "app.py"], tmp_path, stdout=subprocess.PIPE) as proc:
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]  # send nothing
        OPENED.extend(idle)
        url = f"ws://127.0.0.1:{port}/"
        open_ = [client(url, timeout=5) for _ in range(3)]  # each within 5 s, though 20 sockets wait idle
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            client(url, timeout=5)
        assert refused.value.status_code == 503 and refused.value.resp_headers["retry-after"] == "1"
        with pytest.raises(urllib.error.HTTPError) as plain:  # plain HTTP is served too
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        plain.value.close()
        assert plain.value.code == 426, "the endpoint's answer to a plain GET"
        open_[0].close()
        wait_until(lambda: client_or_none(url) is not None, timeout=5)  # its place is free again
        for c in open_[1:]:
            c.send("still here")
            assert c.recv() == "still here"
            c.close()


def client_or_none(url):
    """A websocket client, closed at once, or None if the handshake was refused."""
    try:
        c = client(url, timeout=5)
    except websocket.WebSocketBadStatusException:
        return None
    c.close()
    return c


HANDSHAKE_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("headers, status", [(60 * 1024, b"101"), (70 * 1024, b"400"), (6 * 1024 * 1024, b"400")])
def test_handshakes_over_64_kib_of_headers_get_400(headers, status):
    app, sockets, events = demo_app()
    with serving(app) as url:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
        OPENED.append(sock)
        lines = b"".join(b"X-Padding-%d: %s\r\n" % (i, b"x" * 1000) for i in range(headers // 1024))
        with contextlib.suppress(OSError):  # refused before it has sent them all
            sock.sendall(HANDSHAKE_REQUEST[:-2] + lines + b"\r\n")
        assert sock.recv(4096).split(b" ")[1] == status


def test_a_plain_get_of_the_endpoint_explains_what_it_is():
    app = Flask(__name__)
    WebSockets(app, path="/ws")
    response = app.test_client().get("/ws")
    assert response.status_code == 426 and response.headers["Upgrade"] == "websocket"
    assert 'new WebSocket("ws://localhost/ws")' in response.get_data(as_text=True)
    app = Flask(__name__)
    WebSockets(app)
    app.add_url_rule("/", "index", lambda: "the page")  # an HTTP view at the same path still wins
    assert app.test_client().get("/").data == b"the page"


@pytest.mark.slow
def test_a_gunicorn_reload_closes_the_old_workers_websockets_with_1012(tmp_path):
    (tmp_path / "gapp.py").write_text(GUNICORN_APP.replace('f"echo {message}"', 'f"{os.getpid()}"') + "import os\n")
    port = free_port()
    args = gunicorn_command(port, "-w", "1", "--graceful-timeout", "30", "gapp:app")
    with process(args, tmp_path) as proc:
        old = [connect_when_up(f"ws://127.0.0.1:{port}/", proc) for _ in range(2)]
        for c in old:
            c.send("pid?")
        old_pid = {c.recv() for c in old}
        proc.send_signal(signal.SIGHUP)  # a deploy: new workers, the old ones told to stop
        start = time.monotonic()
        assert [recv_close(c) for c in old] == [(1012, "service restart")] * 2
        assert time.monotonic() - start < 5
        for c in old:
            c.shutdown()  # the closing handshake is over: close TCP, and reconnect, as clients do on 1012
        new = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
        new.send("pid?")
        assert {new.recv()} != old_pid, "a new worker serves the clients that reconnect"
        new.close()


# ---------------------------------------------------------------------------
# Scaling out: several processes, a real Redis
# ---------------------------------------------------------------------------


class RedisServer:
    """A redis-server of the test's own, on a free port, that the test stops and starts again."""

    def __init__(self, tmp_path, port=None):
        self.binary = shutil.which("redis-server") or next(
            (p for p in ("/usr/bin/redis-server",) if os.path.exists(p)), None
        )
        if self.binary is None:
            missing("redis-server: apt-get install redis-server", kind="redis")
        self.port, self.dir, self.proc = port or free_port(), tmp_path / "redis", None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self, keep_data=True):
        if not keep_data:
            shutil.rmtree(self.dir)
        self.dir.mkdir(exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]  # what it had survives a restart
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.ping():
            assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)

    def ping(self):
        import redis

        with contextlib.suppress(redis.RedisError), redis.Redis(port=self.port, socket_timeout=1) as client:
            return client.ping()
        return False

    def command(self, *args):
        import redis

        with redis.Redis(port=self.port, socket_timeout=5) as client:
            return client.execute_command(*args)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)

    def flush(self):
        self.command("FLUSHALL")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


QUEUE_APP = """\
import os
from flask import Flask, request
from flask_websockets import WebSockets, ws, serve

app = Flask(__name__)
app.config["WEBSOCKETS_MESSAGE_QUEUE"] = "QUEUE_URL"
sockets = WebSockets(app)

@sockets.on_message("^PID$")
def pid(message):
    return str(os.getpid())

@sockets.on_message("^BUSY ")
def busy(message):  # keeps the process's loop from accepting: the next connection goes to another
    import time
    end = time.monotonic() + float(message[5:])
    while time.monotonic() < end:
        pass

@sockets.on_message("^JOIN (.+)")
def join(message):
    ws.join(message[5:])
    return f"joined {message[5:]}"

@sockets.on_message("^SAY ")
def say(message):
    room, text = message[4:].split(" ", 1)
    sockets.broadcast(text, room=room, skip=ws._get_current_object())

@sockets.on_open
def who():
    if "user" in request.args:
        ws.identify(request.args["user"])

@sockets.on_message("^IDENTIFY (.+)")
def identify(message):
    ws.identify(message[9:])
    return f"identified as {message[9:]}"

@sockets.on_message("^LEAVE (.+)")
def leave(message):
    ws.leave(message[6:])
    return f"left {message[6:]}"

@app.post("/broadcast")
def broadcast():
    form = request.form
    return str(sockets.broadcast(form["text"], room=form.get("room"), user=form.get("user")))

@app.post("/disconnect")
def disconnect():
    form = request.form
    closed = sockets.disconnect(form.get("user"), form.get("room"), int(form["code"]), form["reason"])
    return str(closed)

@app.get("/presence")
def presence():
    import json
    room = request.args.get("room")
    return json.dumps({"presence": sockets.presence(room), "count": sockets.count(room)})

if __name__ == "__main__":
    serve(app, port=0, log=None)
"""


@contextlib.contextmanager
def queue_servers(tmp_path, url, count=2, patch=False, app=QUEUE_APP):
    """``count`` serve() processes of QUEUE_APP sharing the queue at ``url``: yield their ports and processes."""
    source = app.replace("QUEUE_URL", url)
    if patch:
        source = "from gevent import monkey\nmonkey.patch_all()\n" + source
    (tmp_path / "qapp.py").write_text(source)
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(process([sys.executable, "qapp.py"], tmp_path, stdout=subprocess.PIPE))]
        for _ in range(count - 1):
            procs.append(stack.enter_context(process([sys.executable, "qapp.py"], tmp_path, stdout=subprocess.PIPE)))
        ports = [int(re.search(r":(\d+)/", proc.stdout.readline()).group(1)) for proc in procs]
        yield ports, procs


def post(port, **form):
    return urlopen(f"http://127.0.0.1:{port}/broadcast", data=urllib.parse.urlencode(form).encode()).read()


def assert_nothing_more(*clients):
    """Exactly once: nothing else comes within a moment."""
    for c in clients:
        c.settimeout(0.3)
        with pytest.raises(websocket.WebSocketTimeoutException):
            got = c.recv()
            pytest.fail(f"one message too many: {got!r}")
        c.settimeout(5)


@pytest.mark.slow
@pytest.mark.parametrize("patch", [False, True], ids=["plain", "monkey-patched"])
def test_broadcasts_and_rooms_reach_every_process_through_redis(patch, redis_server, tmp_path):
    with queue_servers(tmp_path, redis_server.url, patch=patch) as (ports, procs):
        a = [client(f"ws://127.0.0.1:{ports[0]}/") for _ in range(2)]
        b = [client(f"ws://127.0.0.1:{ports[1]}/") for _ in range(2)]
        everyone = a + b
        for c in everyone:  # once each has its answer, each process reads the queue
            c.send("PID")
            c.recv()
        assert post(ports[0], text="from an HTTP view") == b"2", "two here, the others elsewhere"
        assert [c.recv() for c in everyone] == ["from an HTTP view"] * 4
        publisher = flask_websockets.Publisher(redis_server.url)
        publisher.broadcast("from a script")
        publisher.broadcast(b"\x00\xffbinary")
        assert [(c.recv(), c.recv()) for c in everyone] == [("from a script", b"\x00\xffbinary")] * 4
        assert_nothing_more(*everyone)
        a[0].send("JOIN kitchen")
        b[0].send("JOIN kitchen")
        assert a[0].recv() == b[0].recv() == "joined kitchen"
        a[0].send("SAY kitchen dinner")  # to the room, but not to its sender
        assert b[0].recv() == "dinner"
        publisher.broadcast("to the kitchen", room="kitchen")
        assert a[0].recv() == b[0].recv() == "to the kitchen"
        assert_nothing_more(*everyone)
        publisher.close()
        for c in everyone:
            c.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(5) == 0
            assert "Traceback" not in proc.stderr.read()


@pytest.mark.slow
def test_a_publishers_order_is_kept_and_a_slow_client_delays_nobody(redis_server, tmp_path):
    with queue_servers(tmp_path, redis_server.url) as (ports, procs):
        # Readers that keep up: without wsaccel, websocket-client checks UTF-8 in Python at about 3 MB/s,
        # slower than the pace at which the queue delivers to clients that lag (see _MessageQueue._hand_over).
        readers = [client(f"ws://127.0.0.1:{port}/", skip_utf8_validation=True) for port in ports for _ in range(2)]
        slow = raw_handshake(f"ws://127.0.0.1:{ports[1]}/", receive_buffer=4096)  # never reads
        slow.sendall(text("PID"))
        for c in readers:
            c.send("PID")
            c.recv()
        got = {c: [] for c in readers}
        threads = [threading.Thread(target=lambda c=c: got[c].extend(c.recv()[:3] for _ in range(200))) for c in got]
        for thread in threads:  # each client reads as it comes, as clients do, from before the first message
            thread.start()
        publisher = flask_websockets.Publisher(redis_server.url)
        payload = "x" * 60_000
        for i in range(200):  # 12 MB for the slow client: it is closed, the others get everything, in order
            publisher.broadcast(f"{i:03} {payload}")
        for thread in threads:
            thread.join(30)
        assert all(messages == [f"{i:03}" for i in range(200)] for messages in got.values())
        publisher.close()
        for c in readers:
            c.close()


def test_a_broadcast_that_picks_connections_with_a_function_cannot_use_the_queue(redis_server):
    app, sockets = make_app(message_queue=redis_server.url)
    with sockets.test_client() as client:
        with pytest.raises(ValueError, match="local=True"):
            sockets.broadcast("hi", to=lambda conn: True)
        assert sockets.broadcast("hi", to=lambda conn: True, local=True) == 1
        assert client.receive() == "hi"


@pytest.mark.slow
def test_gunicorn_workers_share_broadcasts_through_redis(redis_server, tmp_path):
    """The issue's case: under gunicorn -w 2, a broadcast from a POST reached 3 of 4 clients, then 1 of 4."""
    (tmp_path / "qapp.py").write_text(QUEUE_APP.replace("QUEUE_URL", redis_server.url))
    port = free_port()
    with process(gunicorn_command(port, "-w", "3", "qapp:app"), tmp_path) as proc:
        clients, pids = [], set()
        while len(pids) < 2 or len(clients) < 6:  # clients on at least two workers
            c = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
            c.send("PID")
            pids.add(c.recv())
            clients.append(c)
            c.send("BUSY 0.3")  # the kernel hands most connections to one worker: not while it is busy
            assert len(clients) < 100, "the connections all went to one worker"
        for i in range(5):  # each POST lands on whichever worker: its publisher
            post(port, text=f"news {i}")
        for c in clients:  # order is per publisher: its own worker's come first
            assert sorted(c.recv() for _ in range(5)) == [f"news {i}" for i in range(5)]
        assert_nothing_more(*clients)
        for c in clients:
            c.close()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["restart keeping its data", "restart losing its data", "client kill"])
def test_broadcasts_survive_a_redis_outage_exactly_once_and_in_order(fault, redis_server, tmp_path, caplog):
    with queue_servers(tmp_path, redis_server.url) as (ports, procs):
        here, there = client(f"ws://127.0.0.1:{ports[0]}/"), client(f"ws://127.0.0.1:{ports[1]}/")
        for c in (here, there):
            c.send("PID")
            c.recv()
        post(ports[0], text="before")
        assert here.recv() == there.recv() == "before"
        if fault == "client kill":
            redis_server.command("CLIENT", "KILL", "TYPE", "normal")  # every process's reader and writer
            post(ports[0], text="during 0")
        else:
            redis_server.stop()
            for i in range(3):  # published while Redis is down: here at once, there later
                assert post(ports[0], text=f"during {i}") == b"1"
                assert here.recv() == f"during {i}"
            time.sleep(5)  # the outage
            redis_server.start(keep_data=fault == "restart keeping its data")
        sent = 1 if fault == "client kill" else 3
        if fault == "client kill":
            assert here.recv() == "during 0"
        there.settimeout(15)  # the processes reconnect by themselves, with backoff
        assert [there.recv() for _ in range(sent)] == [f"during {i}" for i in range(sent)]
        post(ports[1], text="after")
        assert here.recv() == there.recv() == "after"
        assert_nothing_more(here, there)
        here.close()
        there.close()
        logs = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)
            logs.append(proc.stderr.read())
        if fault != "client kill":  # one warning for the outage, one when it is over: here, where it mattered
            assert logs[0].count("unreachable") == 1 and logs[0].count("reachable again") == 1, logs[0]


# ---------------------------------------------------------------------------
# The message queue at its edges: threads, order, hostile rooms, bounds, managed Redis
# ---------------------------------------------------------------------------


def free_port_pair():
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port < 55535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


def redis_binary():
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        missing("redis-server: apt-get install redis-server", kind="redis")
    return binary


def redis_command(port, *args, decode=False):
    """One command to the Redis server on ``port``."""
    import redis

    with redis.Redis(port=port, socket_timeout=2, decode_responses=decode) as client:
        return client.execute_command(*args)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class RedisClusterServers:
    """Three redis-server masters made a Redis Cluster by redis-cli, on free ports; stopped at the end."""

    def __init__(self, tmp_path):
        binary = redis_binary()
        cli = shutil.which("redis-cli") or missing("redis-cli: apt-get install redis-server", kind="redis")
        self.ports, self.procs = [free_port_pair() for _ in range(3)], []
        for port in self.ports:
            folder = tmp_path / f"cluster-{port}"
            folder.mkdir()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        for port in self.ports:
            wait_for(lambda port=port: self.command(port, "PING"), 10, f"redis-server on {port}")
        create = [cli, "--cluster", "create", *[f"127.0.0.1:{port}" for port in self.ports]]
        subprocess.run(
            create + ["--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        for port in self.ports:
            wait_for(lambda port=port: b"cluster_state:ok" in self.command(port, "CLUSTER", "INFO"), 20, "the cluster")
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    command = staticmethod(lambda port, *args: redis_command(port, *args, decode=False))

    def flush(self):
        for port in self.ports:
            self.command(port, "FLUSHALL")

    def stop(self):
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def redis_cluster(tmp_path):
    servers = RedisClusterServers(tmp_path)
    yield servers
    servers.stop()


class RedisSentinelServers:
    """A master, its replica and a sentinel that watches them, on free ports; stopped at the end."""

    def __init__(self, tmp_path):
        binary = redis_binary()
        self.master, self.replica, self.sentinel = free_port(), free_port(), free_port()
        self.procs = {}
        for name, port, extra in [
            ("master", self.master, []),
            ("replica", self.replica, ["--replicaof", "127.0.0.1", str(self.master)]),
        ]:
            folder = tmp_path / name
            folder.mkdir()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "", *extra]
            self.procs[name] = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor mymaster 127.0.0.1 {self.master} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 3000\n"
        )
        self.procs["sentinel"] = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        wait_for(
            lambda: self.command(self.replica, "INFO", "replication")["master_link_status"] == "up", 10, "the replica"
        )
        wait_for(lambda: self.master_port() == self.master, 10, "the sentinel")
        # It learns of the replica from the master's INFO (every 10 s at first): no failover before that.
        wait_for(
            lambda: self.command(self.sentinel, "SENTINEL", "replicas", "mymaster"),
            30,
            "the sentinel to know the replica",
        )
        self.url = f"redis+sentinel://127.0.0.1:{self.sentinel}/0/mymaster"

    command = staticmethod(lambda port, *args: redis_command(port, *args, decode=True))

    def master_port(self):
        return int(self.command(self.sentinel, "SENTINEL", "get-master-addr-by-name", "mymaster")[1])

    def kill_master(self):
        self.procs["master"].kill()
        self.procs["master"].wait(10)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def redis_sentinel(tmp_path):
    servers = RedisSentinelServers(tmp_path)
    yield servers
    servers.stop()


THREADS_APP = QUEUE_APP.replace(
    """if __name__ == "__main__":""",
    """@app.post("/threads")
def from_threads():
    import sys, threading

    sys.setswitchinterval(1e-5)  # threads take turns often: a race shows up every run

    def burst(t):
        for i in range(300):
            sockets.broadcast(f"{t} {i}")

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return "sent"


if __name__ == "__main__":""",
)


def receive_all(c, count, timeout=20):
    c.settimeout(timeout)
    return [c.recv() for _ in range(count)]


def assert_each_thread_in_order(messages, threads=8, each=300):
    assert len(messages) == threads * each and len(set(messages)) == threads * each, "exactly once"
    for t in range(threads):
        assert [m for m in messages if m.split()[0] == str(t)] == [f"{t} {i}" for i in range(each)]


@pytest.mark.slow
def test_one_publisher_shared_by_eight_threads_loses_nothing_and_keeps_each_threads_order(redis_server, tmp_path):
    with queue_servers(tmp_path, redis_server.url) as (ports, procs):
        c = client(f"ws://127.0.0.1:{ports[1]}/", skip_utf8_validation=True)
        c.send("PID")
        c.recv()
        publisher = flask_websockets.Publisher(redis_server.url)

        def burst(t):
            for i in range(300):
                publisher.broadcast(f"{t} {i}")

        threads = [threading.Thread(target=burst, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert_each_thread_in_order(receive_all(c, 2400))
        assert_nothing_more(c)
        publisher.close()


@pytest.mark.slow
def test_broadcasts_from_eight_threads_of_a_server_reach_the_other_process_exactly_once(redis_server, tmp_path):
    with queue_servers(tmp_path, redis_server.url, app=THREADS_APP) as (ports, procs):
        here, there = (client(f"ws://127.0.0.1:{port}/", skip_utf8_validation=True) for port in ports)
        for c in (here, there):
            c.send("PID")
            c.recv()
        assert urlopen(f"http://127.0.0.1:{ports[0]}/threads", data=b"", timeout=30).read() == b"sent"
        assert_each_thread_in_order(receive_all(here, 2400))
        assert_each_thread_in_order(receive_all(there, 2400))
        assert_nothing_more(here, there)


@pytest.mark.slow
def test_a_publishers_order_holds_across_rooms_and_everyone(redis_server, tmp_path):
    with queue_servers(tmp_path, redis_server.url) as (ports, procs):
        member = client(f"ws://127.0.0.1:{ports[1]}/")
        member.send("JOIN kitchen")
        assert member.recv() == "joined kitchen"
        publisher = flask_websockets.Publisher(redis_server.url)
        for i in range(20):
            publisher.broadcast(f"m{i}", room="kitchen" if i % 2 else None)
        assert [member.recv() for _ in range(20)] == [f"m{i}" for i in range(20)]
        for i in range(20):  # and from the other server process, through its queue
            post(ports[0], text=f"n{i}", **({"room": "kitchen"} if i % 2 else {}))
        assert [member.recv() for _ in range(20)] == [f"n{i}" for i in range(20)]
        publisher.close()


@pytest.mark.slow
def test_any_room_name_reaches_only_that_rooms_members_on_every_process(redis_server, tmp_path):
    with queue_servers(tmp_path, redis_server.url) as (ports, procs):
        bystander = client(f"ws://127.0.0.1:{ports[1]}/")  # in no room
        members = {room: client(f"ws://127.0.0.1:{ports[1]}/") for room in HOSTILE_ROOMS}
        for room, c in members.items():
            c.send(f"JOIN {room}")
            assert c.recv() == f"joined {room}"
        bystander.send("PID")
        bystander.recv()
        publisher = flask_websockets.Publisher(redis_server.url)
        for room in members:
            publisher.broadcast(f"to {room}", room=room)
            post(ports[0], text=f"via {room}", room=room)
        for room, c in members.items():  # two publishers: no order between them
            assert sorted([c.recv(), c.recv()]) == [f"to {room}", f"via {room}"]
        assert_nothing_more(bystander, *members.values())
        publisher.broadcast("everyone")
        assert all(c.recv() == "everyone" for c in [bystander, *members.values()])
        publisher.close()


@pytest.mark.slow
def test_reads_name_a_few_streams_however_many_rooms_have_members(redis_server, tmp_path):
    """Every read used to name the stream of every room with a member in the process."""
    import redis

    with queue_servers(tmp_path, redis_server.url, count=1) as (ports, procs):
        c = client(f"ws://127.0.0.1:{ports[0]}/")
        for n in range(300):
            c.send(f"JOIN room {n}")
            c.recv()
        with redis.Redis(port=redis_server.port, socket_timeout=5) as monitor_client:
            with monitor_client.monitor() as monitor:
                reads = []
                while len(reads) < 3:
                    command = monitor.next_command()["command"]
                    if command.upper().startswith("XREAD "):
                        reads.append(command)
        assert all(read.count("flask_websockets") <= 8 for read in reads), reads[0][:300]


@pytest.mark.slow
def test_a_thousand_short_lived_publishers_leave_no_state_in_a_server(redis_server):
    app, sockets = make_app(message_queue=redis_server.url)
    with sockets.test_client() as client_:
        sockets.broadcast("warm up")
        assert client_.receive() == "warm up"

        def publishers(n):
            for i in range(n):
                publisher = flask_websockets.Publisher(redis_server.url)
                publisher.broadcast(f"p{i}")
                publisher.close()
            got = [client_.receive(timeout=10) for _ in range(n)]  # publishers are not ordered among themselves
            assert sorted(got) == sorted(f"p{i}" for i in range(n))

        publishers(100)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        publishers(1000)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(
            stat.size_diff
            for stat in after.compare_to(before, "filename")
            if stat.traceback[0].filename.endswith("flask_websockets.py")
        )
        assert grown < 20_000, f"{grown} bytes kept for 1,000 publishers"
    import redis

    with redis.Redis(port=redis_server.port) as r:
        keys = [key for key in r.scan_iter("flask_websockets*:publisher:*")]
        assert len(keys) >= 1000 and all(0 < r.ttl(key) <= 3600 for key in keys), "a publisher's key expires"


class Blackhole:
    """A TCP server on a port that accepts connections and never answers: a Redis that hangs."""

    def __init__(self, port=None):
        self.server = socket.create_server(("127.0.0.1", port or 0))
        self.port = self.server.getsockname()[1]
        self.conns, self.stopped = [], False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                self.conns.append(conn)

    def close(self):
        self.server.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.thread.join(5)


OUTAGE_APP = QUEUE_APP.replace(
    """if __name__ == "__main__":""",
    """@app.post("/many")
def many():
    start, count = int(request.form["start"]), int(request.form["count"])
    for i in range(start, start + count):
        sockets.broadcast(f"m{i}")
    return "sent"


if __name__ == "__main__":""",
)


@pytest.mark.slow
def test_while_redis_hangs_the_outbox_keeps_the_last_10000_and_sends_them_once_in_order(tmp_path):
    blackhole = Blackhole()
    url = f"redis://127.0.0.1:{blackhole.port}/0"
    redis = None
    try:
        with queue_servers(tmp_path, url, app=OUTAGE_APP) as (ports, procs):
            there = client(f"ws://127.0.0.1:{ports[1]}/", skip_utf8_validation=True)
            there.send("PID")
            there.recv()
            for start in range(0, 15_000, 1_000):  # while the writer waits for an answer that never comes
                post_form(ports[0], "/many", start=start, count=1000)
                time.sleep(0.3)
            blackhole.close()
            redis = RedisServer(tmp_path, port=blackhole.port)  # Redis is back
            assert receive_all(there, 10_000, timeout=30) == [f"m{i}" for i in range(5_000, 15_000)]
            assert_nothing_more(there)
    finally:
        blackhole.close()
        if redis is not None:
            redis.stop()


def post_form(port, path, **form):
    return urlopen(f"http://127.0.0.1:{port}{path}", data=urllib.parse.urlencode(form).encode(), timeout=30).read()


@pytest.mark.slow
def test_a_publisher_facing_a_redis_that_hangs_raises_connection_error_in_its_timeout():
    import redis

    blackhole = Blackhole()
    try:
        publisher = flask_websockets.Publisher(f"redis://127.0.0.1:{blackhole.port}/0", timeout=0.5)
        start = time.monotonic()
        with pytest.raises(redis.ConnectionError, match=f"127.0.0.1:{blackhole.port}"):
            publisher.broadcast("hello?")
        assert time.monotonic() - start < 2
        publisher.close()
    finally:
        blackhole.close()


def test_a_queue_without_redis_py_fails_when_the_extension_is_set_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed
    app = Flask(__name__)
    app.config["WEBSOCKETS_MESSAGE_QUEUE"] = "redis://127.0.0.1:6379/0"
    with pytest.raises(ImportError, match=r'pip install "Flask-Websockets\[redis\]"'):
        WebSockets(app)
    with pytest.raises(ImportError, match=r'pip install "Flask-Websockets\[redis\]"'):
        WebSockets(Flask(__name__), message_queue="redis://127.0.0.1:6379/0")


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:6379",
        "redis",
        "redis+cluster://",
        "redis+sentinel://localhost:26379",
        "redis+sentinel://localhost:26379/0",
        "redis+sentinel://localhost:26379/zero/mymaster",
        42,
    ],
)
def test_a_bad_queue_url_is_refused_at_set_up_by_argument_and_by_key(url):
    with pytest.raises(ValueError, match="message_queue"):
        WebSockets(Flask(__name__), message_queue=url)
    app = Flask(__name__)
    app.config["WEBSOCKETS_MESSAGE_QUEUE"] = url
    with pytest.raises(ValueError, match="WEBSOCKETS_MESSAGE_QUEUE"):
        WebSockets(app)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "rediss://user:secret@cache.example:6380/2",
        "unix:///run/redis.sock",
        "valkey://localhost:6379/0",
        "valkeys://localhost:6380",
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
        "rediss+cluster://:secret@10.0.0.1:7000",
        "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/0/mymaster",
        "redis+sentinel://user:secret@10.0.0.1:26379/1/mymaster",
    ],
)
def test_queue_urls_of_every_kind_are_accepted(url):
    WebSockets(Flask(__name__), message_queue=url)


def test_log_lines_name_the_queues_host_and_port_and_never_its_password(caplog):
    port = free_port()  # nothing listens there
    app, sockets = make_app(message_queue=f"redis://:hunter2@127.0.0.1:{port}/0")
    with caplog.at_level(logging.WARNING, logger="flask_websockets"):
        with sockets.test_client():
            wait_until(lambda: "unreachable" in caplog.text)
    assert f"message queue redis://127.0.0.1:{port}/0 unreachable" in caplog.text and "hunter2" not in caplog.text


def test_the_first_broadcasts_of_eight_threads_make_one_queue(redis_server, monkeypatch):
    made = []
    real = flask_websockets._MessageQueue

    class Counted(real):
        def __init__(self, *args, **kwargs):
            made.append(self)
            time.sleep(0.05)  # a slow start: the other threads arrive meanwhile
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(flask_websockets, "_MessageQueue", Counted)
    app, sockets = make_app(message_queue=redis_server.url)
    barrier = threading.Barrier(8)

    def first_broadcast():
        barrier.wait()
        sockets.broadcast("hi")

    threads = [threading.Thread(target=first_broadcast) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(made) == 1

    def published():  # every first broadcast went to Redis, none was left out while the queue was made
        keys = [key for key in redis_server.command("KEYS", "flask_websockets*")]
        return sum(redis_server.command("XLEN", key) for key in keys if redis_server.command("TYPE", key) == b"stream")

    wait_until(lambda: published() == 8)


@pytest.mark.slow
def test_valkey_urls_work_as_redis_urls(redis_server, tmp_path):
    url = redis_server.url.replace("redis://", "valkey://")
    with queue_servers(tmp_path, url) as (ports, procs):
        there = client(f"ws://127.0.0.1:{ports[1]}/")
        there.send("PID")
        there.recv()
        assert post(ports[0], text="hi") == b"0"
        assert there.recv() == "hi"
        publisher = flask_websockets.Publisher(url)
        publisher.broadcast("from a valkey:// publisher")
        assert there.recv() == "from a valkey:// publisher"
        publisher.close()


@pytest.mark.slow
def test_redis_cluster_carries_broadcasts_and_rooms_between_processes(redis_cluster, tmp_path):
    with queue_servers(tmp_path, redis_cluster.url) as (ports, procs):
        here, there = (client(f"ws://127.0.0.1:{port}/") for port in ports)
        there.send("JOIN kitchen")
        assert there.recv() == "joined kitchen"
        here.send("PID")
        here.recv()
        publisher = flask_websockets.Publisher(redis_cluster.url)
        for i in range(40):  # 40 publishers' worth of traffic: spread over the masters' slots
            other = flask_websockets.Publisher(redis_cluster.url)
            other.broadcast(f"p{i}", room="kitchen")
            other.close()
        assert sorted(there.recv() for _ in range(40)) == sorted(f"p{i}" for i in range(40))
        for i in range(10):
            publisher.broadcast(f"m{i}", room="kitchen" if i % 2 else None)
        assert [there.recv() for _ in range(10)] == [f"m{i}" for i in range(10)]
        assert [here.recv() for _ in range(5)] == [f"m{i}" for i in range(0, 10, 2)]
        post(ports[0], text="from a server")
        assert here.recv() == there.recv() == "from a server"
        assert_nothing_more(here, there)
        used = [RedisClusterServers.command(port, "DBSIZE") for port in redis_cluster.ports]
        assert sum(1 for keys in used if keys) >= 2, f"the endpoint's traffic spread over the masters: {used}"
        publisher.close()


@pytest.mark.slow
def test_through_a_sentinel_failover_traffic_flows_on_the_promoted_master(redis_sentinel, tmp_path):
    import redis

    url = redis_sentinel.url
    with queue_servers(tmp_path, url) as (ports, procs):
        here, there = (client(f"ws://127.0.0.1:{port}/") for port in ports)
        for c in (here, there):
            c.send("PID")
            c.recv()
        publisher = flask_websockets.Publisher(url)
        publisher.broadcast("before")
        assert here.recv() == there.recv() == "before"
        redis_sentinel.kill_master()
        wait_for(lambda: redis_sentinel.master_port() == redis_sentinel.replica, 20, "the failover")
        deadline = time.monotonic() + 20
        while True:  # the publisher's call fails until its client finds the new master
            try:
                publisher.broadcast("after")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        here.settimeout(20)
        there.settimeout(20)
        assert here.recv() == there.recv() == "after"
        post(ports[0], text="from a server, after")
        assert there.recv() == "from a server, after"
        publisher.close()


# ---------------------------------------------------------------------------
# Users and presence
# ---------------------------------------------------------------------------


def users_app():
    app, sockets = rooms_app()
    closes = []

    @sockets.on_open
    def who():
        if "user" in request.args:
            ws.identify(request.args["user"])

    @sockets.on_message("^IDENTIFY (.+)")
    def identify(message):
        ws.identify(message[9:])
        return f"identified as {ws.user_id}"

    @sockets.on_close
    def gone():
        closes.append((ws.user_id, ws.close_code, ws.close_reason))

    return app, sockets, closes


def tab(sockets, user=None):
    return sockets.test_client(query_string={"user": user} if user else None)


def test_a_user_is_reached_on_every_tab_and_nobody_else_in_one_process():
    app, sockets, closes = users_app()
    ann1, ann2, bob, anonymous = tab(sockets, "ann"), tab(sockets, "ann"), tab(sockets, "bob"), tab(sockets)
    with ann1, ann2, bob, anonymous:
        assert sockets.broadcast("for ann", user="ann") == 2
        assert ann1.receive() == ann2.receive() == "for ann"
        sender = next(conn for conn in sockets.connections if conn.user_id == "ann")
        assert sockets.broadcast("not for the sender", user="ann", skip=sender) == 1
        got = []
        for c in (ann1, ann2):
            with contextlib.suppress(TimeoutError):
                got.append(c.receive(timeout=0.05))
        assert got == ["not for the sender"]
        for c in (bob, anonymous):
            with pytest.raises(TimeoutError):
                c.receive(timeout=0.05)
        assert sockets.presence() == {"ann": 2, "bob": 1} and sockets.count() == 4
        ann1.send("JOIN kitchen")
        ann1.receive()
        anonymous.send("JOIN kitchen")
        anonymous.receive()
        assert sockets.presence("kitchen") == {"ann": 1} and sockets.count("kitchen") == 2
        assert sockets.broadcast("kitchen, ann", user="ann", room="kitchen") == 1
        ann2.send("IDENTIFY carol")  # identifying again replaces
        assert ann2.receive() == "identified as carol"
        assert sockets.presence() == {"ann": 1, "bob": 1, "carol": 1}
        assert sockets.presence("nowhere") == {} and sockets.count("nowhere") == 0
    assert sockets.presence() == {} and sockets.count() == 0 and sockets._users == {}


def test_presence_changes_at_once_when_a_tab_closes():
    app, sockets, closes = users_app()
    with tab(sockets, "ann"):
        first = tab(sockets, "bob")
        assert sockets.presence() == {"ann": 1, "bob": 1}
        first.close()
        assert sockets.presence() == {"ann": 1} and sockets.count() == 1


def test_disconnect_closes_a_users_or_a_rooms_connections_with_its_code_and_reason():
    app, sockets, closes = users_app()
    ann1, ann2, bob, cid = tab(sockets, "ann"), tab(sockets, "ann"), tab(sockets, "bob"), tab(sockets, "cid")
    for c in (ann2, cid):
        c.send("JOIN kitchen")
        c.receive()
    assert sockets.disconnect(user="ann", room="kitchen", code=4002, reason="left the kitchen") == 1
    with pytest.raises(ConnectionClosed):
        ann2.receive()
    assert (ann2.close_code, ann2.close_reason) == (4002, "left the kitchen")
    assert sockets.disconnect(user="ann", code=4001, reason="signed out") == 1
    with pytest.raises(ConnectionClosed):
        ann1.receive()
    assert (ann1.close_code, ann1.close_reason) == (4001, "signed out")
    assert sockets.disconnect(room="kitchen", code=1001, reason="closing time") == 1
    with pytest.raises(ConnectionClosed):
        cid.receive()
    assert not bob.closed and sockets.presence() == {"bob": 1}
    bob.close()
    assert sorted(closes) == [("ann", 4001, "signed out"), ("ann", 4002, "left the kitchen"), ("bob", 1000, ""),
                              ("cid", 1001, "closing time")]  # fmt: skip


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda s, c: c.identify(3), TypeError, "identify()"),
        (lambda s, c: c.identify(""), ValueError, "identify()"),
        (lambda s, c: c.identify("u" * 1025), ValueError, "identify()"),
        (lambda s, c: c.identify(b"ann"), TypeError, "identify()"),
        (lambda s, c: s.broadcast("x", user=3), TypeError, "broadcast()"),
        (lambda s, c: s.disconnect(user=""), ValueError, "disconnect()"),
        (lambda s, c: s.disconnect(), TypeError, "disconnect()"),
        (lambda s, c: s.disconnect(room=3), TypeError, "disconnect()"),
        (lambda s, c: s.disconnect(user="ann", code=999), ValueError, "close code"),
        (lambda s, c: s.presence(room=""), TypeError, "presence()"),
        (lambda s, c: s.count(room=3), TypeError, "count()"),
        (
            lambda s, c: flask_websockets.Publisher("redis://127.0.0.1:1/0").broadcast("x", user=3),
            TypeError,
            "Publisher.broadcast()",
        ),
        (
            lambda s, c: flask_websockets.Publisher("redis://127.0.0.1:1/0").disconnect(user=""),
            ValueError,
            "Publisher.disconnect()",
        ),
    ],
)
def test_bad_user_ids_and_arguments_are_refused_naming_the_function(call, error, words):
    app, sockets, closes = users_app()
    with tab(sockets) as client_:
        client_.send("x")  # a handler's ws, kept
        [conn] = sockets.connections
        with pytest.raises(error, match=re.escape(words)):
            call(sockets, conn)


def test_a_user_id_of_1_kib_of_any_characters_is_just_an_id():
    app, sockets, closes = users_app()
    for user in ["\u00e9" * 512, "x:all", "{ann}", "*", "a b", "\x00"]:
        with tab(sockets) as c:
            c.send(f"IDENTIFY {user}")
            assert c.receive() == f"identified as {user}"
            assert sockets.presence() == {user: 1}
            assert sockets.broadcast("hi", user=user) == 1 and c.receive() == "hi"


def test_identify_once_closed_raises_and_the_connection_is_counted_nowhere():
    app, sockets, closes = users_app()
    caught = []

    @sockets.on_message("^QUIT")
    def quit(message):
        ws.close()
        try:
            ws.identify("mallory")
        except ConnectionClosed:
            caught.append(ws.user_id)

    with tab(sockets, "ann") as c:
        c.send("QUIT")
        with pytest.raises(ConnectionClosed):
            c.receive()
    assert caught == ["ann"] and sockets.presence() == {} and sockets._users == {}
    assert Connection({}, None).user_id is None
    with pytest.raises(ConnectionClosed):
        Connection({}, None).identify("ann")


def presence_of(port, room=None):
    query = "" if room is None else "?" + urllib.parse.urlencode({"room": room})
    return json.loads(urlopen(f"http://127.0.0.1:{port}/presence{query}").read())


def expect_presence(ports, expected, room=None, within=1.0):
    """Poll both processes until each reports ``expected`` ({"presence": ..., "count": ...}); return how long."""
    start = time.monotonic()
    while True:
        seen = [presence_of(port, room) for port in ports]
        if all(s == expected for s in seen):
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"after {within} s: {seen}, expected {expected}"
        time.sleep(0.01)


def queue_url(kind, redis_server, redis_cluster):
    return redis_server.url if kind == "standalone" else redis_cluster.url


@pytest.fixture(params=["standalone", "cluster"])
def any_redis(request, tmp_path):
    """A standalone redis-server, or a three-master Redis Cluster (``.url``, ``.flush()``)."""
    servers = RedisServer(tmp_path) if request.param == "standalone" else RedisClusterServers(tmp_path)
    yield servers
    servers.stop()


@pytest.mark.slow
def test_a_user_with_tabs_on_two_processes_gets_each_message_once_and_is_signed_out_everywhere(any_redis, tmp_path):
    any_redis = any_redis.url
    with queue_servers(tmp_path, any_redis) as (ports, procs):
        ann = [client(f"ws://127.0.0.1:{port}/?user=ann") for port in ports for _ in range(2)]
        bob = [client(f"ws://127.0.0.1:{port}/?user=bob") for port in ports]
        everyone = ann + bob
        expect_presence(ports, {"presence": {"ann": 4, "bob": 2}, "count": 6})
        assert post(ports[0], text="for ann", user="ann") == b"2", "two here, two elsewhere"
        assert [c.recv() for c in ann] == ["for ann"] * 4
        publisher = flask_websockets.Publisher(any_redis)
        publisher.broadcast("ann, from a script", user="ann")
        publisher.broadcast("bob, from a script", user="bob")
        assert [c.recv() for c in ann] == ["ann, from a script"] * 4
        assert [c.recv() for c in bob] == ["bob, from a script"] * 2
        assert_nothing_more(*everyone)
        assert publisher.presence() == {"ann": 4, "bob": 2} and publisher.count() == 6
        urlopen(f"http://127.0.0.1:{ports[1]}/disconnect", data=b"user=ann&code=4001&reason=signed+out")
        for c in ann:
            assert recv_close(c) == (4001, "signed out")
        expect_presence(ports, {"presence": {"bob": 2}, "count": 2})
        publisher.disconnect(user="bob", code=4003, reason="banned")
        for c in bob:
            assert recv_close(c) == (4003, "banned")
        expect_presence(ports, {"presence": {}, "count": 0})
        publisher.close()


@pytest.mark.slow
def test_presence_and_counts_agree_on_both_processes_within_a_second_of_every_change(any_redis, tmp_path):
    with queue_servers(tmp_path, any_redis.url) as (ports, procs):
        here = client(f"ws://127.0.0.1:{ports[0]}/?user=ann")
        there = client(f"ws://127.0.0.1:{ports[1]}/")
        delays = [expect_presence(ports, {"presence": {"ann": 1}, "count": 2})]
        there.send("IDENTIFY bob")
        assert there.recv() == "identified as bob"
        delays.append(expect_presence(ports, {"presence": {"ann": 1, "bob": 1}, "count": 2}))
        for c in (here, there):
            c.send("JOIN x:all")
            c.recv()
        delays.append(expect_presence(ports, {"presence": {"ann": 1, "bob": 1}, "count": 2}, room="x:all"))
        here.send("LEAVE x:all")
        here.recv()
        delays.append(expect_presence(ports, {"presence": {"bob": 1}, "count": 1}, room="x:all"))
        there.close()  # a clean close counts at once
        delays.append(expect_presence(ports, {"presence": {"ann": 1}, "count": 1}))
        delays.append(expect_presence(ports, {"presence": {}, "count": 0}, room="x:all"))
        assert max(delays) < 1.0


@pytest.mark.slow
def test_after_a_kill_9_a_process_users_leave_presence_within_15_seconds(redis_server, tmp_path):
    with queue_servers(tmp_path, redis_server.url) as (ports, procs):
        client(f"ws://127.0.0.1:{ports[0]}/?user=ann")  # the survivor
        victims = [client(f"ws://127.0.0.1:{ports[1]}/?user=bob") for _ in range(3)]
        expect_presence(ports, {"presence": {"ann": 1, "bob": 3}, "count": 4})
        publisher = flask_websockets.Publisher(redis_server.url)
        assert publisher.presence() == {"ann": 1, "bob": 3}
        procs[1].kill()  # no clean-up: its share stays in Redis until its stamp is stale
        procs[1].wait(5)
        killed = time.monotonic()
        for c in victims:
            c.sock.close()
        while publisher.presence() != {"ann": 1}:
            assert time.monotonic() - killed < 16, publisher.presence()
            time.sleep(0.2)
        assert presence_of(ports[0]) == {"presence": {"ann": 1}, "count": 1}
        assert time.monotonic() - killed > 5, "not before its stamp is stale: a live process counts meanwhile"
        publisher.close()


@pytest.mark.slow
def test_presence_comes_back_by_itself_when_redis_loses_it(any_redis, tmp_path):
    """Redis lost its data (a restart without persistence, a failover), or took a paused process for dead."""
    with queue_servers(tmp_path, any_redis.url) as (ports, procs):
        ann = client(f"ws://127.0.0.1:{ports[0]}/?user=ann")
        bob = client(f"ws://127.0.0.1:{ports[1]}/?user=bob")
        for c in (ann, bob):
            c.send("JOIN kitchen")
            c.recv()
        both = {"presence": {"ann": 1, "bob": 1}, "count": 2}
        expect_presence(ports, both)
        any_redis.flush()  # every key gone, the processes none the wiser
        expect_presence(ports, both, within=8)  # a heartbeat (every 5 s) finds its stamp gone
        expect_presence(ports, both, room="kitchen", within=1)
        post(ports[0], text="still flowing", room="kitchen")
        assert ann.recv() == bob.recv() == "still flowing"
        ann.close()
        expect_presence(ports, {"presence": {"bob": 1}, "count": 1})


def test_a_batch_of_presence_changes_counts_once_however_often_it_reaches_redis(redis_server):
    """A late copy of a batch (a retried write, a delayed segment) must not count its connections twice."""
    import redis

    with redis.Redis(port=redis_server.port) as r:
        _, share, hashes, applied = flask_websockets._presence_keys("websocket", "p1")
        batch = ["EVAL", flask_websockets._PRESENCE_SCRIPT, 3, applied, hashes, share]
        assert r.execute_command(*batch, 1, "ann", 1) == 1
        assert r.execute_command(*batch, 1, "ann", 1) == 0, "the same batch again: nothing"
        assert r.execute_command(*batch, 2, "ann", -1) == 1
        assert r.hgetall(share) == {} and r.smembers(hashes) == set(), "an empty share leaves no trace"


def test_a_publishers_retry_after_a_lost_answer_delivers_once(redis_server, monkeypatch):
    publish, calls = flask_websockets._publish, []

    def answer_lost_once(*args):
        publish(*args)  # Redis took it...
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("...but its answer never came")

    monkeypatch.setattr(flask_websockets, "_publish", answer_lost_once)
    publisher = flask_websockets.Publisher(redis_server.url)
    publisher.broadcast("once")
    publisher.close()
    stream = flask_websockets._shard_keys("websocket", flask_websockets._shard_of(publisher._origin))[0]
    assert len(calls) == 2 and redis_server.command("XLEN", stream) == 1


def test_while_redis_is_away_presence_answers_at_once_with_this_process_and_one_warning(caplog):
    app, sockets = make_app(message_queue=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    sockets.on_open(lambda: ws.identify(request.args["user"]))
    with caplog.at_level(logging.WARNING, logger="flask_websockets"), tab(sockets, "ann"):
        wait_until(lambda: "unreachable" in caplog.text)
        start = time.monotonic()
        assert all(sockets.presence() == {"ann": 1} and sockets.count() == 1 for _ in range(100))
        assert time.monotonic() - start < 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 2, caplog.text


def test_a_process_that_joins_and_leaves_many_rooms_keeps_nothing_of_them_in_redis(redis_server):
    app, sockets = make_app(message_queue=redis_server.url)
    sockets.on_message("^JOIN (.+)")(lambda m: ws.join(m[5:]) or "joined")
    sockets.on_message("^LEAVE (.+)")(lambda m: ws.leave(m[6:]) or "left")
    with sockets.test_client() as c:
        hashes = flask_websockets._presence_keys("websocket", sockets._queue._origin)[2]
        wait_until(lambda: redis_server.command("SCARD", hashes) == 1)  # the endpoint's share, written
        for n in range(300):
            c.send(f"JOIN room {n}")
            c.receive()
            wait_until(lambda: redis_server.command("SCARD", hashes) == 2)
            c.send(f"LEAVE room {n}")
            assert c.receive() == "left"
        wait_until(lambda: redis_server.command("SCARD", hashes) == 1)  # the endpoint's hash only


@pytest.mark.slow
def test_user_ids_and_room_names_never_reach_a_redis_key(redis_server, tmp_path):
    names = ["x:all", "{ann}", "*", "a b", "\u00e9t\u00e9"]
    with queue_servers(tmp_path, redis_server.url) as (ports, procs):
        clients = []
        for name in names:
            c = client(f"ws://127.0.0.1:{ports[1]}/?" + urllib.parse.urlencode({"user": name}))
            c.send(f"JOIN {name}")
            assert c.recv() == f"joined {name}"
            clients.append(c)
        expect_presence(ports, {"presence": {name: 1 for name in names}, "count": len(names)})
        for name in names:
            expect_presence(ports, {"presence": {name: 1}, "count": 1}, room=name)
        keys = [key.decode() for key in redis_server.command("KEYS", "*")]
        assert not [key for key in keys for name in names if name in key.split("}", 1)[-1]], keys


@pytest.mark.slow
@pytest.mark.parametrize("how", ["serve(reload=True)", "flask run --debug"])
def test_code_changes_reload(how, tmp_path):
    port = free_port()
    path = tmp_path / "chatapp.py"
    path.write_text(VERSIONED_APP.replace("PORT", str(port)).replace("RELOAD", "True"))
    if how == "flask run --debug":
        args = [sys.executable, "-m", "flask", "--app", "chatapp", "run", "--debug", "--port", str(port)]
    else:
        args = [sys.executable, "chatapp.py"]
    with process(args, tmp_path) as proc:
        url = f"ws://127.0.0.1:{port}/"
        wait_for_version(url, proc, "v1")
        edit_version(path, "v2")
        wait_for_version(url, proc, "v2")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["app.run(debug=True)", "flask run --debug"])
def test_the_development_server_serves_websockets_and_logs_them_with_101(how, tmp_path):
    port = free_port()
    serving_line = "flask_websockets.serve(app, port=PORT, reload=RELOAD)"
    source = VERSIONED_APP.replace(serving_line, f"app.run(port={port}, debug=True)")
    (tmp_path / "app.py").write_text(source)
    args = [sys.executable, "app.py"]
    if how == "flask run --debug":
        args = [sys.executable, "-m", "flask", "--app", "app", "run", "--debug", "--port", str(port)]
    with process(args, tmp_path) as proc:
        c = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
        c.send_binary(b"\x00\x01")
        c.send("hi")
        assert [c.recv(), c.recv()] == ["v1: b'\\x00\\x01'", "v1: hi"]
        c.close()
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
        reader.start()
        wait_until(lambda: any(" 101 " in line for line in lines))  # once the connection's view is over
        with pytest.raises(urllib.error.HTTPError) as error:  # a browser tab on the websocket URL
            urlopen(f"http://127.0.0.1:{port}/")
        assert error.value.code == 426
        error.value.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        reader.join(5)
    log = re.sub("\x1b\\[[0-9;]*m", "", "".join(lines))  # Werkzeug's colours
    # Werkzeug's debugger would turn an error after the websocket into a 500 line and a traceback.
    assert '"GET / HTTP/1.1" 101 -' in log and " 500 " not in log and "Traceback" not in log


@pytest.mark.slow
def test_gunicorn_with_two_workers(tmp_path):
    (tmp_path / "gapp.py").write_text(
        "import os\n"
        "from flask import Flask\n"
        "from flask_websockets import WebSockets\n"
        "app = Flask(__name__)\n"
        "WebSockets(app).on_message(lambda message: f'{os.getpid()}: {message}')\n"
    )
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "-k", "flask_websockets.GunicornWorker", "-w", "2"]
    args += ["-b", f"127.0.0.1:{port}", "--access-logfile", "-", "--graceful-timeout", "5"]
    usage = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True).stdout
    if "--no-control-socket" in usage:  # gunicorn 24+: not its one shared ~/.gunicorn/gunicorn.ctl
        args.append("--no-control-socket")
    args.append("gapp:app")
    with process(args, tmp_path, stdout=subprocess.PIPE) as proc:
        clients = [connect_when_up(f"ws://127.0.0.1:{port}/", proc) for _ in range(10)]
        for i, c in enumerate(clients):
            c.send(f"hi {i}")
        replies = [c.recv() for c in clients]
        pids = {reply.split(":")[0] for reply in replies}
        assert [reply.split(": ")[1] for reply in replies] == [f"hi {i}" for i in range(10)]
        for c in clients:
            c.close()
        assert refused_status(f"ws://127.0.0.1:{port}/nowhere") == 404
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        access_log, errors = proc.stdout.read(), proc.stderr.read()
    workers = set(re.findall(r"Booting worker with pid: (\d+)", errors))
    assert len(workers) == 2 and pids <= workers
    assert access_log.count('"GET / HTTP/1.1" 101') == 10


@pytest.mark.slow
def test_example_py(tmp_path):
    """`python example.py` serves the page and every feature it shows."""
    with subprocess_server(["example.py", "--port", "0"], tmp_path) as (port, log):
        page = urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert f"ws://127.0.0.1:{port}/" in page
        c = client(f"ws://127.0.0.1:{port}/?name=ann")
        assert c.recv() == "welcome, 127.0.0.1"
        assert json.loads(c.recv()) == {"online": {"ann": 1}}
        c.send("Hello")
        c.send("ECHO only this")
        c.send("JSON a b")
        assert [c.recv(), c.recv(), json.loads(c.recv())] == [
            "Hello",
            "only this",
            {"text": "a b", "words": 2, "upper": "A B"},
        ]
        other = client(f"ws://127.0.0.1:{port}/")
        assert other.recv() == "welcome, 127.0.0.1"
        online = {"online": {"ann": 1, "visitor 1": 1}}
        assert json.loads(other.recv()) == json.loads(c.recv()) == online, "who is online, on every tab"
        c.send("WORK")
        assert c.recv() == "working: step 1 of 3"
        other.send("still responsive")
        assert other.recv() == "still responsive"
        assert [c.recv() for _ in range(3)] == ["working: step 2 of 3", "working: step 3 of 3", "work done"]
        answer = urlopen(f"http://127.0.0.1:{port}/broadcast", data=b"text=hi+all", timeout=5)
        assert json.loads(answer.read()) == {"clients": 2}
        assert c.recv() == other.recv() == "broadcast: hi all"
        c.send("CLOSE")
        assert recv_close(c) == (1000, "closed by the server")
        assert json.loads(other.recv()) == {"online": {"visitor 1": 1}}
        other.close()


# ---------------------------------------------------------------------------
# The example in a real browser: python -m pytest -m browser
# ---------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's: apt-get install chromium
ARTIFACTS = HERE / "test-artifacts"


def missing(what, kind="browser"):
    """Skip a test for lack of ``what``; where it must run, fail it.

    ``FLASK_WEBSOCKETS_REQUIRE`` lists the kinds that must run, as CI does:
    ``browser`` (chromium and playwright), ``nginx``, ``redis`` (redis-server),
    ``docs`` (sphinx and the Pallets theme, to build the site), ``speedups``
    (the C unmasking of the ``speedups`` extra).
    """
    message = f"{kind} tests need {what}"
    if kind in os.environ.get("FLASK_WEBSOCKETS_REQUIRE", "").split(","):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium driven by Playwright, or a skip that says what is missing."""
    if not os.path.exists(CHROMIUM):
        missing(f"Debian's chromium at {CHROMIUM}: apt-get install chromium")
    try:
        from playwright import sync_api
    except ImportError:
        missing("playwright: python -m pip install -e '.[test,browser]'")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            # As root, and on a machine whose only network is loopback.
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
            + ["--disable-component-update", "--disable-sync"],
        )
        yield browser, sync_api.expect
        browser.close()


def open_example(browser, expect, url):
    """A fresh browser (its own context: a second user) on the example page, connected."""
    page = browser.new_context(ignore_https_errors=True, viewport={"width": 900, "height": 1000}).new_page()
    page.goto(url)
    expect(page.locator("#state")).to_have_text("open")
    return page


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_browser_drives_the_example_page(scheme, chromium, certificate, tmp_path):
    browser, expect = chromium
    pem, ca = certificate
    tls = ["--certfile", str(pem), "--keyfile", str(pem)] if scheme == "https" else []
    with subprocess_server(["example.py", "--port", "0", *tls], tmp_path) as (port, log):
        page = open_example(browser, expect, f"{scheme}://127.0.0.1:{port}/")
        # The page connected to the URL that url_for('websocket') rendered.
        ws_url = f"{'wss' if scheme == 'https' else 'ws'}://127.0.0.1:{port}/"
        expect(page.locator("#url")).to_have_text(ws_url)
        received = page.locator("#log li.received")
        expect(received.last).to_have_text("welcome, 127.0.0.1")

        page.fill("#echo", "hello from the browser")
        page.click("#echo-form button")
        expect(received.last).to_have_text("hello from the browser")

        page.fill("#command", "just this part")
        page.click("#command-form button")
        expect(received.last).to_have_text("just this part")

        page.click("#work")
        expect(received.last).to_have_text("work done")
        steps = received.all_text_contents()[-4:]
        assert steps == ["working: step 1 of 3", "working: step 2 of 3", "working: step 3 of 3", "work done"]

        page.fill("#json", "rendered as JSON")
        page.click("#json-form button")
        json_reply = page.locator("#log li.json").last
        expect(json_reply).to_contain_text('"upper": "RENDERED AS JSON"')
        expect(json_reply).to_contain_text('"words": 3')

        expect(page.locator("#online")).to_have_text("visitor 1")
        other = open_example(browser, expect, f"{scheme}://127.0.0.1:{port}/?name=ann")
        for tab in (page, other):  # who is online, on every tab
            expect(tab.locator("#online")).to_have_text("ann, visitor 1")
        other.fill("#broadcast", "hello, both tabs")
        other.click("#broadcast-form button")
        expect(received.last).to_have_text("broadcast: hello, both tabs")
        expect(other.locator("#log li.system").last).to_have_text("broadcast sent to 2 client(s)")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"example-{scheme}.png"), full_page=True)
        page.click("#close")
        expect(page.locator("#state")).to_have_text("closed (code 1000, closed by the server)")
        expect(other.locator("#online")).to_have_text("ann")
        page.screenshot(path=str(ARTIFACTS / f"example-{scheme}-closed.png"), full_page=True)
        assert '"GET / HTTP/1.1" 101' in log(), "the access log has the websocket connections"


@pytest.mark.slow
@pytest.mark.browser
def test_browser_a_2_mib_message_closes_cleanly_with_1009(chromium, tmp_path):
    """Chromium sends 2 MiB as 128 KB fragments; the server's 1009 must reach it cleanly, every time."""
    browser, expect = chromium
    with subprocess_server(["example.py", "--port", "0"], tmp_path) as (port, log):
        page = open_example(browser, expect, f"http://127.0.0.1:{port}/")
        for attempt in range(10):
            closed = page.evaluate(
                """() => new Promise((resolve) => {
                    const ws = new WebSocket(document.getElementById("url").textContent);
                    ws.onopen = () => ws.send(new Uint8Array(2 * 1024 * 1024));
                    ws.onclose = (event) => resolve([event.code, event.reason, event.wasClean]);
                })"""
            )
            assert closed == [1009, "message over 1048576 bytes", True], f"attempt {attempt}"


@pytest.mark.slow
@pytest.mark.browser
def test_browser_exchanges_compressed_messages_with_the_example_as_the_wire_shows(chromium, tmp_path):
    browser, expect = chromium
    with subprocess_server(["example.py", "--port", "0"], tmp_path) as (port, log), tapped(port) as tap:
        page = open_example(browser, expect, f"http://127.0.0.1:{tap.port}/")  # the page, through the tap
        long_text = "the quick brown fox jumps over the lazy dog " * 100
        replies = page.evaluate(
            """(long) => new Promise((resolve) => {
                const ws = new WebSocket(document.getElementById("url").textContent), got = [];
                ws.onopen = () => { ws.send("short"); ws.send("ECHO " + long); ws.send(new Uint8Array(300000)); };
                ws.binaryType = "arraybuffer";
                ws.onmessage = (event) => {
                    got.push(typeof event.data === "string" ? event.data : event.data.byteLength);
                    if (got.length === 5) { resolve([ws.extensions, got]); ws.close(); }
                };
            })""",
            long_text,
        )
        extensions, got = replies
        assert json.loads(got.pop(1)) == {"online": {"visitor 1": 1, "visitor 2": 1}}, "the page's tab and this"
        assert [extensions, got] == [
            "permessage-deflate; client_max_window_bits=12",
            ["welcome, 127.0.0.1", "short", long_text, 300000],
        ]
    to_server, to_client = tap.websocket()
    assert data_frames(to_server) == [(True, TEXT), (True, TEXT), (True, BINARY)], "Chromium compresses all"
    assert data_frames(to_client) == [(False, TEXT), (False, TEXT), (False, TEXT), (True, TEXT), (True, BINARY)]
    assert len(to_server) < 3000 and len(to_client) < 3000, "300 KB of zeros and 4 KB of text took little room"


@pytest.mark.slow
@pytest.mark.browser
def test_browser_sees_1001_when_the_server_is_stopped_with_ctrl_c(chromium, tmp_path):
    browser, expect = chromium
    with process([sys.executable, str(HERE / "example.py"), "--port", "0"], tmp_path, stdout=subprocess.PIPE) as proc:
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        page = open_example(browser, expect, f"http://127.0.0.1:{port}/")
        proc.send_signal(signal.SIGINT)
        expect(page.locator("#state")).to_have_text("closed (code 1001, server shutting down)")
        assert proc.wait(5) == 0
        assert "Traceback" not in proc.stderr.read()


# ---------------------------------------------------------------------------
# The docstring examples: they are the API reference's, so each one runs
# ---------------------------------------------------------------------------


def docstring_examples():
    """Every ``::`` example block of a public docstring, by (public name, index)."""
    found = {}
    for name in flask_websockets.__all__:
        if name == "ws":  # a proxy: its documentation is in the module's reference
            continue
        obj = getattr(flask_websockets, name)
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [(f"{name}.{k}", v) for k, v in vars(obj).items() if not k.startswith("_") or k == "__init__"]
        for qualname, member in members:
            doc = inspect.getdoc(member.fget if isinstance(member, property) else member) or ""
            for index, body in enumerate(re.findall(r"::\n\n((?:    .*\n|\n)+)", doc + "\n")):
                found[(qualname, index)] = textwrap.dedent(body)
    return found


def example_app(**config):
    app = Flask(__name__)
    app.config.update(SECRET_KEY="docs", **config)

    @app.route("/login/<user>/<int:user_id>")
    def login(user, user_id):
        session.update(user=user, user_id=user_id)
        return ""

    return app


def run_example(code, app=None, **names):
    """Execute an example as a user's module would, with the names it assumes imported."""
    namespace = {"__name__": "example", "json": json, "re": re, "pytest": pytest, "flask_websockets": flask_websockets}
    flask_names = ("Flask", "jsonify", "session", "request", "abort", "flash", "redirect")
    namespace.update({name: getattr(flask, name) for name in flask_names})
    namespace.update({name: getattr(flask_websockets, name) for name in flask_websockets.__all__})
    if app is not None:
        namespace["app"] = app
    namespace.update(names)
    exec(compile(code, "<docstring example>", "exec"), namespace)
    return namespace


def with_sockets(**config):
    app = example_app(**config)
    return app, WebSockets(app)


def logged_in(app, user="bob", user_id=1):
    http = app.test_client()
    http.get(f"/login/{user}/{user_id}")
    return http


def check_init_app(code):
    ns = run_example(code)
    ns["create_app"]()
    ns["sockets"].on_message(lambda message: message)
    with ns["sockets"].test_client() as client:
        client.send("hi")
        assert client.receive() == "hi"


def check_subprotocols(code):
    ns = run_example(code, example_app())
    with ns["sockets"].test_client(headers={"Sec-WebSocket-Protocol": "chat.v0, chat.v1"}) as client:
        assert client.subprotocol == "chat.v1"


def check_echo(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with sockets.test_client() as client:
        client.send("hi")
        assert client.receive() == "hi"


def check_patterns(code):
    app, sockets = with_sockets()
    stored = []
    run_example(code, app, sockets=sockets, store=stored.append)
    with sockets.test_client() as client:
        client.send("ECHO two\nlines")
        assert client.receive() == "two\nlines"
        client.send(b"\x89PNG\r\n")
        client.send("ECHO done")
        assert client.receive() == "done"
    assert stored == [b"\x89PNG\r\n"]


def check_errorhandler(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)

    @sockets.on_message
    def fail(message):
        raise {"value": ValueError("not a number"), "permission": PermissionError()}[message]

    with sockets.test_client() as client:
        client.send("value")
        assert client.receive() == '{"error":"not a number"}\n'
        client.send("permission")
        with pytest.raises(ConnectionClosed):
            client.receive()
        assert (client.close_code, client.close_reason) == (1008, "forbidden")


def check_before_connect(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with pytest.raises(HandshakeRefused) as refused:
        sockets.test_client()
    assert refused.value.status_code == 401
    with sockets.test_client(http_client=logged_in(app)) as client:
        assert not client.closed


def check_on_open(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with sockets.test_client() as client:
        assert client.receive() == "hello 127.0.0.1"


def check_on_close(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with sockets.test_client() as staying:
        with sockets.test_client():
            pass
        assert staying.receive() == "127.0.0.1 left (1000)"


def check_kick(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with sockets.test_client(http_client=logged_in(app, "bob")) as bob, sockets.test_client() as other:
        assert app.test_client().post("/kick/bob").status_code == 200
        with pytest.raises(ConnectionClosed):
            bob.receive()
        assert (bob.close_code, bob.close_reason, other.closed) == (4000, "kicked", False)


def check_broadcast(code):
    app, sockets = with_sockets()

    @sockets.on_open
    def enter():
        ws.state["room"] = "kitchen"
        ws.join("kitchen")
        if "user_id" in session:
            ws.identify(str(session["user_id"]))

    run_example(code, app, sockets=sockets)
    with sockets.test_client(http_client=logged_in(app, "bob", 7)) as bob, sockets.test_client() as ann:
        bob.send("dinner")
        assert ann.receive() == "dinner"
        answer = app.test_client().post("/notify/7", data={"text": "for bob"})
        assert answer.get_data(as_text=True) == "sent to 1 of the user's tabs here"
        assert bob.receive() == "for bob", "the sender was skipped: the next message is the notice"


def check_test_client_example(code):
    app, sockets = with_sockets()
    sockets.on_open(lambda: ws.send(f"hello {request.args['name']}"))
    run_example(code, app, sockets=sockets)["test_greeting"]()


def check_state(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)  # registers JOIN; its broadcast finds nobody yet
    sockets.on_message("^PING$")(lambda message: "PONG")
    with sockets.test_client() as client:
        client.send("JOIN kitchen")
        client.send("JOIN garden")
        client.send("JOIN kitchen")
        client.send("PING")
        assert client.receive() == "PONG", "the JOINs before it were handled"
        run_example(code.split("\n\n")[-1], app, sockets=sockets)  # the broadcast line, now
        assert client.receive() == "hi"


def check_join(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with sockets.test_client(http_client=logged_in(app, "bob")) as bob:
        bob.send("JOIN kitchen")
        assert bob.receive() == "bob is here"
        assert sockets.broadcast("hello", room="kitchen") == 1


def in_handler(code, **names):
    """A test client whose every message runs ``code`` in a message handler."""
    app, sockets = with_sockets()

    @sockets.on_message
    def handler(message):
        run_example(code, app, sockets=sockets, ws=ws, message=message, **names)

    return sockets.test_client()


def check_identify(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with sockets.test_client(http_client=logged_in(app, "bob", 7)) as bob, sockets.test_client() as anonymous:
        assert sockets.broadcast("for 7", user="7") == 1 and bob.receive() == "for 7"
        assert sockets.presence() == {"7": 1} and sockets.count() == 2
        with pytest.raises(TimeoutError):
            anonymous.receive(timeout=0.05)


def check_presence(code):
    app, sockets = with_sockets()
    sockets.on_open(lambda: ws.identify(request.args["name"]))
    run_example(code, app, sockets=sockets)
    ann, bob = (sockets.test_client(query_string={"name": name}) for name in ("ann", "bob"))
    with ann, bob:
        ann.send("JOIN kitchen")
        assert json.loads(ann.receive()) == ["ann"]
        bob.send("JOIN kitchen")
        assert json.loads(ann.receive()) == json.loads(bob.receive()) == ["ann", "bob"]


def check_disconnect(code):
    app, sockets = with_sockets()
    sockets.on_open(lambda: ws.identify(str(session["user_id"])) if "user_id" in session else None)
    run_example(code, app, sockets=sockets)
    http = logged_in(app, "bob", 7)
    with sockets.test_client(http_client=http) as tab1, sockets.test_client(http_client=http) as tab2:
        with sockets.test_client(http_client=logged_in(app, "ann", 8)) as ann:
            assert http.post("/logout").status_code == 302
            for tab in (tab1, tab2):
                with pytest.raises(ConnectionClosed):
                    tab.receive()
                assert (tab.close_code, tab.close_reason) == (4001, "signed out")
            assert not ann.closed and sockets.presence() == {"8": 1}


def check_send(code):
    with in_handler(code) as client:
        client.send("go")
        assert [client.receive(), client.receive()] == ["step 1 of 3 done", '{"progress":0.33}\n']


def check_send_secret(code):
    app, sockets = with_sockets(WEBSOCKETS_COMPRESSION=True)
    sockets.on_message(lambda message: run_example(code, app, ws=ws, message=message, token="s3cr3t") and None)
    with sockets.test_client(compression=True) as client:
        client.send("x" * 2000)
        assert json.loads(client.receive()) == {"csrf": "s3cr3t", "echo": "x" * 2000}


def check_close(code):
    app, sockets = with_sockets()
    run_example(code, app, sockets=sockets)
    with sockets.test_client() as client:
        client.send("QUIT")
        with pytest.raises(ConnectionClosed):
            client.receive()
        assert (client.close_code, client.close_reason) == (1000, "bye")


def check_server_example(code, port, tmp_path):
    """A server example run as a program: it answers a websocket on its port."""
    free = free_port()
    script = "from flask import Flask\nimport flask_websockets\nfrom flask_websockets import WebSockets\n"
    script += "app = Flask(__name__)\nWebSockets(app).on_message(lambda message: message.upper())\n"
    (tmp_path / "example.py").write_text(script + code.replace(str(port), str(free)))
    proc = subprocess.Popen([sys.executable, "example.py"], cwd=tmp_path, env=SUBPROCESS_ENV, start_new_session=True)
    try:
        c = connect_when_up(f"ws://127.0.0.1:{free}/", proc)
        c.send("hi")
        assert c.recv() == "HI"
        c.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def check_echo_test(code):
    app, sockets = with_sockets()
    sockets.on_message(lambda message: message)
    run_example(code, app, sockets=sockets)["test_echo"]()


def check_refused(code):
    app, sockets = with_sockets()
    sockets.before_connect(lambda: abort(401))
    run_example(code, app, sockets=sockets)


def check_has_socket_context(code):
    app, sockets = with_sockets()
    notify = run_example(code, app)["notify"]
    sockets.on_message(lambda message: notify(message))

    @app.route("/notify")
    def view():
        notify("from a view")
        return repr(flask.get_flashed_messages())

    with sockets.test_client() as client:
        client.send("from a handler")
        assert client.receive() == "from a handler"
    assert app.test_client().get("/notify").get_data(as_text=True) == "['from a view']"


def check_stats(code):
    app, sockets = with_sockets()
    sockets.on_message(lambda message: message)
    run_example(code, app, sockets=sockets)
    with sockets.test_client() as client:
        client.send("hi")
        assert client.receive() == "hi"
        health = app.test_client().get("/health").get_json()
        assert health["connections"] == 1 and health["messages_received"] == health["messages_sent"] == 1


DOCSTRING_CHECKS = {
    ("WebSockets", 0): check_init_app,
    ("WebSockets", 1): check_subprotocols,
    ("WebSockets.on_message", 0): check_echo,
    ("WebSockets.on_message", 1): check_patterns,
    ("WebSockets.errorhandler", 0): check_errorhandler,
    ("WebSockets.before_connect", 0): check_before_connect,
    ("WebSockets.on_open", 0): check_on_open,
    ("WebSockets.on_close", 0): check_on_close,
    ("WebSockets.connections", 0): check_kick,
    ("WebSockets.broadcast", 0): check_broadcast,
    ("WebSockets.test_client", 0): check_test_client_example,
    ("Connection.state", 0): check_state,
    ("Connection.join", 0): check_join,
    ("Connection.identify", 0): check_identify,
    ("WebSockets.presence", 0): check_presence,
    ("WebSockets.disconnect", 0): check_disconnect,
    ("WebSockets.stats", 0): check_stats,
    ("Connection.send", 0): check_send,
    ("Connection.send", 1): check_send_secret,
    ("Connection.close", 0): check_close,
    ("WebSocketHandler", 0): lambda code, tmp_path: check_server_example(code, 5000, tmp_path),
    ("serve", 0): lambda code, tmp_path: check_server_example(
        code.replace('if __name__ == "__main__":\n    ', ""), 8000, tmp_path
    ),
    ("WebSocketTestClient", 0): check_echo_test,
    ("HandshakeRefused", 0): check_refused,
    ("has_socket_context", 0): check_has_socket_context,
}


def test_every_docstring_example_is_checked():
    with_redis = {("WebSockets", 2), ("Publisher", 0)}  # below
    assert set(docstring_examples()) == set(DOCSTRING_CHECKS) | with_redis


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(DOCSTRING_CHECKS), ids=lambda key: f"{key[0]}-{key[1]}")
def test_docstring_example(key, tmp_path):
    code, check = docstring_examples()[key], DOCSTRING_CHECKS[key]
    check(code, tmp_path) if "tmp_path" in inspect.signature(check).parameters else check(code)


def test_docstring_examples_of_the_message_queue(redis_server):
    """``WebSockets(app, message_queue=...)``, then a ``Publisher`` reaches its connections through Redis."""
    examples = docstring_examples()
    local = "redis://localhost:6379/0"
    sockets = run_example(examples[("WebSockets", 2)].replace(local, redis_server.url), example_app())["sockets"]
    sockets.on_open(lambda: ws.join("kitchen") or ws.identify("42"))
    with sockets.test_client() as client:
        run_example(examples[("Publisher", 0)].replace(local, redis_server.url))["news"].close()
        received = [client.receive(timeout=10) for _ in range(3)]
        assert received == ["the servers restart at 2:00", b"\x89PNG...", "your report is ready"]
        with pytest.raises(ConnectionClosed):
            client.receive(timeout=10)
        assert (client.close_code, client.close_reason) == (4001, "password changed")


# ---------------------------------------------------------------------------
# The documentation site: built with warnings as errors, read in Chromium
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built_docs(tmp_path_factory):
    """The Sphinx site, built from docs/ with -W: the directory of its HTML."""
    if sys.version_info < (3, 10):
        pytest.skip("the docs build needs Python 3.10 or newer (the Pallets theme does)")
    try:
        import pallets_sphinx_themes  # noqa: F401
        import sphinx  # noqa: F401
    except ImportError:
        missing("sphinx and pallets-sphinx-themes: python -m pip install -e '.[docs]'", kind="docs")
    out = tmp_path_factory.mktemp("docs") / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"sphinx -W failed:\n{build.stdout}{build.stderr}"
    return out


def page_text(path):
    """A built page as the reader sees it: tags gone, entities decoded, spaces collapsed."""
    import html

    text = re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8"))
    return " ".join(html.unescape(text).split())


@pytest.mark.slow
def test_docs_api_page_has_every_public_name_with_its_examples_and_no_private_one(built_docs):
    api = (built_docs / "api.html").read_text(encoding="utf-8")
    for name in flask_websockets.__all__:
        assert f'id="flask_websockets.{name}"' in api, name
    assert 'id="flask_websockets._' not in api and not re.search(r'id="flask_websockets\.\w+\._', api)
    text = page_text(built_docs / "api.html")
    for key, code in docstring_examples().items():
        for line in code.splitlines():
            assert " ".join(line.split()) in text, f"{key}: {line!r} is not on the API page"
    assert "flask_websockets.ws: Connection" in text, "ws is documented, as a Connection"
    assert text.count("Working outside of websocket context") == 1, "only where ws's text says so: never evaluated"


def test_docs_pages_render_every_snippet(built_docs):
    """What the tests run is what a reader of the site sees."""
    shown = " ".join(page_text(path) for path in built_docs.glob("*.html"))
    for name, code in readme_snippets().items():
        for line in code.splitlines():
            assert " ".join(line.split()) in shown, f"snippet {name}: {line!r} is not on the site"


@pytest.mark.slow
@pytest.mark.browser
def test_browser_reads_the_docs_index_and_api_with_no_broken_internal_link(chromium, built_docs):
    browser, expect = chromium
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    ids_of = {}

    def ids(path):
        if path not in ids_of:
            page.goto(path.as_uri())
            ids_of[path] = set(page.evaluate("() => [...document.querySelectorAll('[id]')].map(e => e.id)"))
        return ids_of[path]

    checked = 0
    for start in ("index.html", "api.html"):
        page.goto((built_docs / start).as_uri())
        expect(page.locator("h1")).to_be_visible()
        links = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
        for link in links:
            if not link.startswith("file://"):
                continue  # external: flask.palletsprojects.com and the like, not fetched here
            target, _, fragment = urllib.parse.unquote(link[len("file://") :]).partition("#")
            target = Path(target)
            assert target.is_file(), f"{start}: {link} points to no file"
            assert not fragment or fragment in ids(target), f"{start}: {link} points to no element"
            checked += 1
    assert checked > 50
    page.goto((built_docs / "quickstart.html").as_uri())
    expect(page.locator("h1")).to_have_text("Quickstart¶")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs-quickstart.png"), full_page=True)


# ---------------------------------------------------------------------------
# Metrics and the rate limit (issue 21)
# ---------------------------------------------------------------------------


def test_stats_count_connections_messages_bytes_closes_refusals_and_slow_clients():
    app, sockets, clock, events = slow_client_app(max_send_buffer=100_000)
    sockets.on_message(lambda message: message)
    sockets.before_connect(lambda: ("no", 401) if request.args.get("refuse") else None)
    assert sockets.stats() == {
        "connections": 0, "connections_opened": 0, "closes": {}, "messages_received": 0, "messages_sent": 0,
        "bytes_received": 0, "bytes_sent": 0, "slow_clients_closed": 0, "rate_limited": 0, "handshakes_refused": {},
    }  # fmt: skip
    fake = connect(app)
    fake.send("hello")
    assert fake.wait_for(1) == [("text", "hello")]
    stats = sockets.stats()
    assert (stats["connections"], stats["connections_opened"]) == (1, 1)
    assert (stats["messages_received"], stats["messages_sent"]) == (1, 1)
    assert stats["bytes_received"] == len(text("hello")) and stats["bytes_sent"] == 2 + 5, "frames, as on the wire"
    fake.feed(close(1000))
    fake.read_until_eof()
    fake.end()
    run(app, headers={"Sec-WebSocket-Version": "8"})  # 426
    run(app, query_string={"refuse": "1"})  # 401
    with pytest.raises(HandshakeRefused):
        with sockets.test_client(headers={"Origin": "https://evil.example"}):  # 403
            pass
    slow = connect(app)
    small_socket_buffers(slow)
    gevent.idle()
    [slow_conn] = sockets.connections
    while not slow_conn.closed:  # it reads nothing: closed as too slow
        sockets.broadcast("x" * 65536)
        gevent.idle()
    clock.advance(5)
    slow.greenlet.join(2)
    stats = sockets.stats()
    assert stats["connections"] == 0 and stats["connections_opened"] == 2, "refused handshakes open none"
    assert stats["closes"] == {1000: 1, 1008: 1}
    assert stats["handshakes_refused"] == {426: 1, 401: 1, 403: 1}
    assert stats["slow_clients_closed"] == 1
    assert stats["messages_received"] == 1 and stats["messages_sent"] > 2, "what ended connections counted stays"
    slow.end()


def test_stats_with_a_queue_say_whether_it_is_connected_and_its_lag(redis_server):
    app, sockets = make_app(message_queue=redis_server.url)
    assert sockets.stats()["queue_connected"] is False, "not started before the first connection"
    other = flask_websockets.Publisher(redis_server.url)
    with sockets.test_client() as client:
        wait_until(lambda: sockets.stats()["queue_connected"], timeout=10)
        other.broadcast("from elsewhere")
        assert client.receive(timeout=10) == "from elsewhere"
        assert 0 <= sockets.stats()["queue_lag_ms"] < 5000
    other.close()


def rate_limited_app(rate):
    app, sockets = make_app()
    sockets._clock = clock = FakeClock()
    app.config["WEBSOCKETS_RATE_LIMIT"] = rate
    seen = []
    sockets.on_message(lambda message: seen.append((clock.time, message)))
    return app, sockets, clock, seen


def test_the_rate_limit_lets_a_burst_then_the_rate_through_and_loses_nothing():
    app, sockets, clock, seen = rate_limited_app((20, 40))
    fake = connect(app)
    fake.feed(*[text(str(i)) for i in range(200)])
    with gevent.Timeout(2):
        while len(seen) < 40:
            gevent.sleep(0.001)
    gevent.sleep(0.05)  # time passes only on the fake clock: nothing more may come
    assert len(seen) == 40, "the burst"
    [conn] = sockets.connections
    assert not conn._reading, "the server stopped reading this client: TCP pushes back"
    clock.advance(1.0)
    assert len(seen) == 60, "then 20 a second"
    for second in range(7):
        clock.advance(1.0)
    assert [m for _, m in seen] == [str(i) for i in range(200)], "none lost, in order"
    per_second = collections.Counter(int(t) for t, _ in seen)
    assert max(per_second.values()) <= 20 + 40
    assert sockets.stats()["rate_limited"] >= 8
    fake.disconnect()
    clock.advance(1.0)  # its hanging up is read as its next message would be
    fake.read_until_eof()
    fake.end()


def test_a_rate_limited_client_still_answers_the_server_and_closes_cleanly():
    app, sockets, clock, seen = rate_limited_app((1, 1))
    fake = connect(app)
    fake.feed(text("a"), text("b"), close(1000))
    gevent.idle()
    assert [m for _, m in seen] == ["a"]
    clock.advance(1.0)
    assert [m for _, m in seen] == ["a", "b"]
    fake.read_until_eof()  # the close frame behind them needs no token
    fake.end()
    assert fake.frames == [("close", 1000, "")]


def test_the_rate_limit_holds_back_messages_never_pings_or_the_close_handshake():
    """With a slow limit, the client's answer to ws.close() waited for a token: dropped at the close timeout."""
    app, sockets, clock, seen = rate_limited_app((0.1, 1))
    sockets.on_message(lambda message: ws.close(1000, "done") if message == "bye" else None)
    fake = connect(app)
    fake.feed(text("a"), client_frame(PING, b"still there?"))
    assert fake.wait_for(1) == [("pong", b"still there?")], "answered at once, though no token is left"
    fake.feed(text("bye"))
    clock.advance(10.0)  # the token for "bye"
    assert fake.wait_for(2)[1] == ("close", 1000, "done")
    fake.feed(close(1000))  # the client answers at once: read at once, no drop at the close timeout
    fake.read_until_eof()
    fake.end()
    assert sockets.stats()["closes"] == {1000: 1}


def test_a_client_within_its_rate_is_never_paused():
    app, sockets, clock, seen = rate_limited_app((1, 1))
    fake = connect(app)
    for i in range(5):
        fake.send(str(i))
        gevent.idle()
        clock.advance(2.0)  # half the rate it may have
    assert [m for _, m in seen] == [str(i) for i in range(5)]
    assert sockets.stats()["rate_limited"] == 0
    fake.disconnect()
    fake.read_until_eof()
    fake.end()


@pytest.mark.parametrize("value", [(0, 10), (10, 0), (10,), "20/s", (True, 5), [5, None]])
def test_a_bad_rate_limit_is_refused_naming_the_key(value):
    app = Flask(__name__)
    app.config["WEBSOCKETS_RATE_LIMIT"] = value
    with pytest.raises(ValueError, match="WEBSOCKETS_RATE_LIMIT"):
        WebSockets(app)


@pytest.fixture
def prometheus():
    """prometheus_client, and no endpoint left exporting after the test."""
    prometheus_client = pytest.importorskip("prometheus_client")
    yield prometheus_client
    for collector in list(prometheus_client.REGISTRY._collector_to_names):
        if isinstance(collector, flask_websockets._Collector):
            prometheus_client.REGISTRY.unregister(collector)
    flask_websockets._metered.clear()


def scrape(url):
    """The metrics a Prometheus scrape of ``url`` gets: {(name, labels as a sorted tuple): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_prometheus_scrape_shows_the_endpoints_stats(prometheus):
    app = Flask(__name__)
    app.config["WEBSOCKETS_METRICS"] = True
    sockets = WebSockets(app)
    sockets.on_message(lambda message: message)
    app.add_url_rule("/metrics", "metrics", lambda: (prometheus.generate_latest(), {"Content-Type": "text/plain"}))
    with serving(app) as url:
        first, second = client(url), client(url)
        for c in (first, second):
            c.send("hi")
            assert c.recv() == "hi"
        first.close()
        wait_until(lambda: sockets.stats()["connections"] == 1)
        metrics = scrape(url.replace("ws://", "http://") + "/metrics")
        endpoint = (("endpoint", "websocket"),)
        assert metrics[("flask_websockets_connections", endpoint)] == 1
        assert metrics[("flask_websockets_connections_opened_total", endpoint)] == 2
        assert metrics[("flask_websockets_messages_received_total", endpoint)] == 2
        assert metrics[("flask_websockets_messages_sent_total", endpoint)] == 2
        assert metrics[("flask_websockets_closes_total", (("code", "1000"), ("endpoint", "websocket")))] == 1
        assert metrics[("flask_websockets_bytes_received_total", endpoint)] > 0
        assert ("flask_websockets_queue_connected", endpoint) not in metrics, "no queue"
        second.close()


def test_metrics_without_prometheus_client_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    app = Flask(__name__)
    app.config["WEBSOCKETS_METRICS"] = True
    with pytest.raises(ImportError, match=r"Flask-Websockets\[metrics\]"):
        WebSockets(app)


def refused(url):
    """Whether a handshake from a foreign origin got its 403 (False while the server is not up)."""
    try:
        client(url, origin="http://evil.example").close()
    except websocket.WebSocketBadStatusException as error:
        return error.status_code == 403
    except OSError:
        return False
    raise AssertionError("a foreign origin was let in")


METRICS_GUNICORN_APP = """\
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from flask_websockets import WebSockets
app = Flask(__name__)
app.config["WEBSOCKETS_METRICS"] = True
WebSockets(app).on_message(lambda message: message)

@app.get("/metrics")
def metrics():
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), {"Content-Type": "text/plain"}
"""


@pytest.mark.slow
def test_prometheus_multi_process_mode_under_gunicorn_adds_up_the_workers(prometheus, tmp_path):
    (tmp_path / "mapp.py").write_text(METRICS_GUNICORN_APP)
    (tmp_path / "metrics").mkdir()
    port = free_port()
    env = {**SUBPROCESS_ENV, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    args = gunicorn_command(port, "-w", "2", "mapp:app")
    with process(args, tmp_path, env=env) as proc:
        wait_until(lambda: refused(f"ws://127.0.0.1:{port}/"), timeout=20)  # the first worker's first handshake
        clients = [connect_when_up(f"ws://127.0.0.1:{port}/", proc) for _ in range(6)]
        for c in clients:
            c.send("hi")
            assert c.recv() == "hi"
        url, endpoint = f"http://127.0.0.1:{port}/metrics", (("endpoint", "websocket"),)

        def counted():
            metrics = scrape(url)
            refusals = ("flask_websockets_handshakes_refused_total", (("endpoint", "websocket"), ("status", "403")))
            return (
                metrics.get(("flask_websockets_connections", endpoint)) == 6
                and metrics.get(("flask_websockets_messages_received_total", endpoint)) == 6
                and metrics.get(refusals) == 1  # counted, though that worker may have opened none
            )

        wait_until(counted, timeout=10)  # each worker copies its figures every second
        for c in clients:
            c.close()


# ---------------------------------------------------------------------------
# Logs (issue 21)
# ---------------------------------------------------------------------------


def test_refusals_a_client_can_repeat_are_logged_once_per_interval_then_counted(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(flask_websockets, "_monotonic", lambda: now[0])
    app, sockets = make_app()
    for _ in range(50):
        run(app, headers={"Origin": "http://evil.example"})
    lines = [r.getMessage() for r in caplog.records if r.name == "flask_websockets"]
    assert len(lines) == 1 and "evil.example" in lines[0], "one line, not fifty"
    now[0] += 61
    run(app, headers={"Origin": "http://evil.example"})
    lines = [r.getMessage() for r in caplog.records if r.name == "flask_websockets"]
    assert lines[1] == "49 more like the last in 61 s: websocket handshakes refused for their origin"
    assert "evil.example" in lines[2] and len(lines) == 3


@pytest.mark.parametrize("url, shown", [
    ("redis://:secret@localhost/0", "redis://localhost:6379/0"),
    ("rediss://user:secret@cache.example:6380", "rediss://cache.example:6380"),
    ("redis+cluster://:secret@a:7000,b", "redis+cluster://a:7000,b:6379"),
    ("redis+sentinel://s1,s2:5000/0/main", "redis+sentinel://s1:26379,s2:5000/0/main"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
])  # fmt: skip
def test_queue_urls_are_logged_with_host_and_port_and_never_a_password(url, shown):
    assert flask_websockets._check_queue_url(url, "test") == shown


SLOW_HEADERS_LOGGING_APP = """\
import logging
from flask import Flask
import flask_websockets
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
app = Flask(__name__)
flask_websockets.WebSockets(app).on_message(lambda message: message)
flask_websockets.serve(app, port=0, log=None, handshake_timeout=0.5)
"""


@pytest.mark.slow
def test_real_slow_header_clients_get_a_summarised_line_not_one_each(tmp_path):
    """21,000 slow sockets wrote 21,000 lines: a log volume the attacker chose."""
    (tmp_path / "app.py").write_text(SLOW_HEADERS_LOGGING_APP)
    with process([sys.executable, "app.py"], tmp_path, stdout=subprocess.PIPE) as proc:
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        slow = []
        for i in range(60):  # half of them without a request line, half without their headers' end
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            OPENED.append(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET / HT")
            slow.append(sock)
        for sock in slow:  # each dropped at the deadline
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
        echo_round_trip(f"ws://127.0.0.1:{port}", "served meanwhile")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log = proc.stderr.read()
    assert "Invalid request" not in log, "pywsgi's line per socket"
    summarised = [line for line in log.splitlines() if "flask_websockets" in line]
    assert 1 <= len(summarised) <= 2, summarised


GUNICORN_LOG_APP = """\
from flask import Flask
from flask_websockets import WebSockets
app = Flask(__name__)
WebSockets(app).on_message(lambda message: message)
"""


@pytest.mark.slow
def test_under_gunicorn_the_librarys_lines_have_gunicorns_format(tmp_path):
    (tmp_path / "gapp.py").write_text(GUNICORN_LOG_APP)
    port = free_port()
    with process(gunicorn_command(port, "-w", "1", "gapp:app"), tmp_path) as proc:
        connect_when_up(f"ws://127.0.0.1:{port}/", proc).close()
        with pytest.raises(websocket.WebSocketBadStatusException):
            client(f"ws://127.0.0.1:{port}/", origin="http://evil.example")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log = proc.stderr.read()
    [line] = [line for line in log.splitlines() if "evil.example" in line]
    # gunicorn's own: [2026-12-03 14:00:00 +0000] [1234] [WARNING] websocket handshake from origin ...
    assert re.match(r"\[\d{4}-\d\d-\d\d [\d:]+ [+-]\d{4}\] \[\d+\] \[WARNING\] websocket handshake from origin", line)


RATE_LIMITED_SERVER = """\
from flask import Flask
import flask_websockets
app = Flask(__name__)
app.config["WEBSOCKETS_RATE_LIMIT"] = (20, 40)
flask_websockets.WebSockets(app).on_message(lambda message: message)
flask_websockets.serve(app, port=0, log=None)
"""


@pytest.mark.slow
def test_real_a_rate_limited_flood_beside_an_innocent_clients_echo(tmp_path):
    (tmp_path / "app.py").write_text(RATE_LIMITED_SERVER)
    with process([sys.executable, "app.py"], tmp_path, stdout=subprocess.PIPE) as proc:
        url = "ws://127.0.0.1:%s" % re.search(r":(\d+)/", proc.stdout.readline()).group(1)
        flood = raw_handshake(url)
        flood.settimeout(None)
        burst = client_frame(TEXT, b"x" * 100) * 100
        stop, echoed = threading.Event(), []

        def send_forever():
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    flood.sendall(burst)  # blocks once the server stops reading it: TCP pushes back

        def read_forever():
            data = b""
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    chunk = flood.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    echoed.append((time.monotonic(), data.count(b"x" * 100)))

        threads = [threading.Thread(target=send_forever), threading.Thread(target=read_forever)]
        for thread in threads:
            thread.start()
        try:
            innocent = client(url)
            start, rtts = time.monotonic(), []
            for i in range(60):
                sent = time.monotonic()
                innocent.send(f"ping {i}")
                assert innocent.recv() == f"ping {i}"
                rtts.append(time.monotonic() - sent)
                time.sleep(0.02)  # about 1.5 s of flood
            elapsed = time.monotonic() - start
            innocent.close()
        finally:
            stop.set()
            flood.shutdown(socket.SHUT_RDWR)
            for thread in threads:
                thread.join(5)
        p99 = sorted(rtts)[int(len(rtts) * 0.99) - 1]
        assert p99 < 0.05, f"the innocent client's p99 was {p99 * 1000:.1f} ms"
        handled = echoed[-1][1] if echoed else 0
        assert 0 < handled <= 40 + 20 * (elapsed + 1), f"{handled} echoes in {elapsed:.1f} s: at most burst + rate"


# -- restarts (issue 21) --

# VERSIONED_APP, whose answers also say which process gave them (the reloader's child or not).
RESTART_APP = (
    VERSIONED_APP.replace("import flask_websockets\n", "import os\nimport flask_websockets\n")
    .replace('f"{VERSION}: {message}"', 'f"{VERSION} {os.getpid()}: {message}"')
    .replace("RELOAD", "True")
)


def hello(c):
    """The version of the code and the process that answer on ``c``."""
    c.send("hi")
    version, pid = c.recv().split(":")[0].split()
    return version, int(pid)


def as_a_background_job():
    """What ``python app.py &`` in a shell script does to the program: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["serve(reload=True)", "serve(reload=True), monkey-patched", "flask run --debug"])
def test_a_code_change_closes_every_websocket_with_1012_and_clients_reconnect_to_the_new_code(how, tmp_path):
    port = free_port()
    path = tmp_path / "chatapp.py"
    source = RESTART_APP.replace("PORT", str(port))
    if how.endswith("monkey-patched"):  # as example.py is: the server a greenlet of the main thread
        source = "from gevent import monkey\nmonkey.patch_all()\n" + source
    path.write_text(source)
    args = [sys.executable, "chatapp.py"]
    if how == "flask run --debug":
        args = [sys.executable, "-m", "flask", "--app", "chatapp", "run", "--debug", "--port", str(port)]
    with process(args, tmp_path) as proc:
        url = f"ws://127.0.0.1:{port}/"
        clients = [connect_when_up(url, proc) for _ in range(3)]
        old = {hello(c) for c in clients}
        assert len(old) == 1 and old.pop()[0] == "v1"
        edit_version(path, "v2")
        for c in clients:
            c.settimeout(10)  # the reloader looks every second
            assert recv_close(c) == (1012, "service restart")  # websocket-client answers it
            c.shutdown()
        new = connect_when_up(url, proc)  # refused until the new child listens (serve), or queued (flask run)
        version, pid = hello(new)
        assert version == "v2", "the first connection after the close reaches the new code"
        new.close()
        assert proc.poll() is None, "the reloader's parent serves on"
        assert "Traceback" not in server_output(proc)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, group, background",
    [
        (signal.SIGINT, False, True),  # kill -INT to a server started in the background
        (signal.SIGINT, True, False),  # Ctrl-C in a terminal: both processes get it
        (signal.SIGTERM, False, False),  # systemd, docker stop
    ],
    ids=["SIGINT in the background", "Ctrl-C", "SIGTERM"],
)
def test_a_signal_to_serve_with_reload_closes_with_1001_and_ends_both_processes(signum, group, background, tmp_path):
    port = free_port()
    (tmp_path / "app.py").write_text(RESTART_APP.replace("PORT", str(port)))
    with process(
        [sys.executable, "app.py"], tmp_path, preexec_fn=as_a_background_job if background else None
    ) as proc:
        c = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
        child = hello(c)[1]
        c.close()
        assert child != proc.pid, "the server runs in the reloader's child"
        stop_with_open_websockets(proc, port, signum, within=5, group=group)  # 1001 each, and the parent exits 0
        with pytest.raises(ProcessLookupError):  # the parent waited for its child: it has gone
            os.kill(child, 0)
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.slow
def test_sigterm_to_serve_closes_with_1001(tmp_path):
    port = free_port()
    (tmp_path / "app.py").write_text(RESTART_APP.replace("PORT", str(port)).replace("reload=True", "reload=False"))
    with process([sys.executable, "app.py"], tmp_path) as proc:
        c = connect_when_up(f"ws://127.0.0.1:{port}/", proc)
        assert hello(c) == ("v1", proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert recv_close(c) == (1001, "server shutting down")
        assert proc.wait(5) == 0
        assert "Traceback" not in proc.stderr.read()


# -- misuse and typing (issue 21) --


def test_an_invalid_regex_names_its_registration_and_handler():
    app, sockets = make_app()
    with pytest.raises(ValueError, match=r"on_message\('\^\(unclosed'\) over .*\.broken: .*missing \)") as caught:

        @sockets.on_message("^(unclosed")
        def broken(message):
            return message

    assert isinstance(caught.value.__cause__, re.error), "re's own error stays as the cause"
    with pytest.raises(ValueError, match=r"flags=re\.IGNORECASE\) over .*\.compiled: .*flags"):

        @sockets.on_message(re.compile("^x"), flags=re.IGNORECASE)  # the flags belong in re.compile
        def compiled(message):
            return message

    @sockets.on_message
    def echo(message):
        return message

    with sockets.test_client() as client:  # the failed registrations left nothing behind
        client.send("x")
        assert client.receive() == "x"
        client.send(b"y")
        assert client.receive() == b"y"


def test_a_pattern_of_the_wrong_type_says_what_was_given_and_what_is_accepted():
    app, sockets = make_app()
    with pytest.raises(TypeError, match=r"on_message\(\) takes a handler, or a pattern \(str, bytes or re\.Pattern\)"):
        sockets.on_message(42)
    with pytest.raises(TypeError, match="not int 42"):
        sockets.on_message(42)
    with pytest.raises(TypeError, match="re flags"):
        sockets.on_message("^x", flags="i")


def test_flags_without_a_pattern_name_the_handler():
    app, sockets = make_app()

    def echo(message):
        return message

    with pytest.raises(TypeError, match=r"needs a pattern, and was given the handler .*\.echo"):
        sockets.on_message(echo, flags=re.IGNORECASE)
    with pytest.raises(TypeError, match="needs a pattern"):
        sockets.on_message(flags=re.IGNORECASE)


def test_bad_handlers_name_themselves_and_their_registration():
    import functools

    app, sockets = make_app()

    async def coroutine(message):
        return message

    async def stream(message):
        yield message

    def no_message():
        return "pong"

    def two(message, extra):
        return message

    with pytest.raises(TypeError, match=r"on_message\('\^x'\) takes a function, not int 42"):
        sockets.on_message("^x")(42)
    with pytest.raises(TypeError, match=r"on_message: .*\.coroutine is async"):
        sockets.on_message(coroutine)
    with pytest.raises(TypeError, match=r"on_message\(b'x'\): .*\.stream is async"):
        sockets.on_message(b"x")(stream)
    with pytest.raises(TypeError, match=r"on_message\('\^ping'\): .*\.no_message\(\) cannot take the message"):
        sockets.on_message("^ping")(no_message)
    with pytest.raises(TypeError, match=r"on_message: .*\.two\(message, extra\) cannot take the message"):
        sockets.on_message(two)

    # What takes the message is fine, whatever its kind, and so is a wrapper
    # that takes other arguments than the function it wraps.
    def with_prefix(prefix, message):
        return prefix + message

    def wraps_something_else(function):
        @functools.wraps(function)
        def wrapper(message):
            return function("> ", message)

        return wrapper

    class Callable:
        def __call__(self, message, extra=None):
            return message

    for handler in (functools.partial(with_prefix, "> "), wraps_something_else(with_prefix), Callable(), print):
        assert sockets.on_message(handler) is handler


def test_error_handlers_and_hooks_name_what_is_wrong():
    app, sockets = make_app()

    def bad_input(error):
        return str(error)

    with pytest.raises(TypeError, match=r"takes an exception class, then the handler .*\.bad_input"):
        sockets.errorhandler(bad_input)  # @sockets.errorhandler without its class
    with pytest.raises(TypeError, match="takes an exception class, not 404"):
        sockets.errorhandler(404)
    with pytest.raises(TypeError, match=r"errorhandler\(ValueError\): .*\.<lambda>\(\) cannot take the error"):
        sockets.errorhandler(ValueError)(lambda: "oops")
    with pytest.raises(TypeError, match=r"errorhandler\(KeyError\) takes a function, not str 'oops'"):
        sockets.errorhandler(KeyError)("oops")

    async def opened():
        pass

    with pytest.raises(TypeError, match="on_open takes a function, not int 42"):
        sockets.on_open(42)
    with pytest.raises(TypeError, match=r"on_open: .*\.opened is async"):
        sockets.on_open(opened)
    with pytest.raises(TypeError, match=r"on_close: .*\.opened is async"):
        sockets.on_close(opened)
    with pytest.raises(TypeError, match="before_connect takes a function, not NoneType None"):
        sockets.before_connect(None)
    assert sockets.errorhandler(ValueError)(bad_input) is bad_input


TYPED_APP = '''\
import re
from typing import Union

from flask import Flask, Response, jsonify
from flask_websockets import WebSockets, ws

app = Flask(__name__)
sockets = WebSockets(app)


@sockets.on_message
def echo(message: str) -> str:
    return message


@sockets.on_message()
def log(message: Union[str, bytes]) -> None:
    ws.join("room")


@sockets.on_message("^x")
def text(message: str) -> str:
    return message


@sockets.on_message(re.compile(rb"x"))
def binary(data: bytes) -> bytes:
    return data


@sockets.on_message("^JSON", flags=re.IGNORECASE)
def json_reply(message: str) -> Response:
    return jsonify(reply=message)


@sockets.errorhandler(ValueError)
def bad_input(error: ValueError) -> Response:
    return jsonify(error=str(error))


@sockets.on_open
def greet() -> None:
    ws.send("hello")


sockets.on_message(lambda message: message)
reveal_type(echo)
reveal_type(binary)
'''

TYPED_MISUSE = '''\
from flask import Flask
from flask_websockets import WebSockets, ws

sockets = WebSockets(Flask(__name__))


@sockets.on_message
def echo(message: str) -> str:
    ws.jion("room")
    return message


@sockets.on_message("^x")
def binary(data: bytes) -> bytes:
    return data
'''


@pytest.mark.slow
def test_mypy_checks_handlers_against_the_module_types(tmp_path):
    """mypy reads the module's annotations: the documented API passes, a typo does not."""
    import importlib.util

    if importlib.util.find_spec("mypy") is None:
        pytest.skip("the typing test needs mypy: python -m pip install mypy")
    (tmp_path / "typed_app.py").write_text(TYPED_APP)
    (tmp_path / "typed_misuse.py").write_text(TYPED_MISUSE)

    def mypy(path):
        # This work tree's module, through MYPYPATH, whatever is installed. Its own
        # errors are not the point here (silent): how it types its users' code is.
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", path],
            cwd=tmp_path,
            env={**os.environ, "MYPYPATH": str(HERE)},
            capture_output=True,
            text=True,
            timeout=300,
        )

    result = mypy("typed_app.py")
    assert result.returncode == 0, result.stdout + result.stderr
    # The decorated functions keep their own types (older mypy spells str builtins.str).
    assert re.search(r'Revealed type is "def \(message: (builtins\.)?str\) -> (builtins\.)?str"', result.stdout)
    assert re.search(r'Revealed type is "def \(data: (builtins\.)?bytes\) -> (builtins\.)?bytes"', result.stdout)
    result = mypy("typed_misuse.py")
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'typed_misuse.py:9: error: "Connection" has no attribute "jion"' in result.stdout
    assert "typed_misuse.py:13: error:" in result.stdout and "T_text_handler" in result.stdout, result.stdout


def test_readme_deploy_replies_with_each_senders_address(tmp_path):
    """The ProxyFix snippet answers each client with its own address, not the first client's."""
    with serve_snippet("deploy", tmp_path) as (port, log):
        url, page = f"ws://127.0.0.1:{port}/", f"http://127.0.0.1:{port}"
        first = client(url, origin=page, header=["X-Forwarded-For: 203.0.113.1"])
        second = client(url, origin=page, header=["X-Forwarded-For: 203.0.113.2"])
        for conn, address in ((second, "203.0.113.2"), (first, "203.0.113.1")):
            conn.send("hi")
            assert conn.recv() == f"ws://127.0.0.1:{port}/ from {address}"
        first.close()
        second.close()


@pytest.mark.parametrize("server", ["flask_websockets", "gevent-websocket"])
def test_the_access_log_as_serving_docs_tell_it(server, caplog):
    """Our handler logs plain requests and websockets; gevent-websocket's writes no access log at all."""
    app, sockets, events = demo_app()
    app.get("/hello")(lambda: "hello")
    log = io.StringIO()
    with caplog.at_level(logging.INFO, logger="geventwebsocket.handler"), serving(app, server, log=log) as url:
        assert urlopen(url.replace("ws://", "http://") + "/hello").read() == b"hello"
        c = client(url)
        c.send("x")
        assert c.recv() == "x"
        c.close()
        wait_until(lambda: len(events) == 1)  # its on_close has run
        if server == "flask_websockets":
            wait_until(lambda: '"GET / HTTP/1.1" 101' in log.getvalue())
    handed_to_its_logger = [r.getMessage() for r in caplog.records if r.name == "geventwebsocket.handler"]
    if server == "flask_websockets":
        assert '"GET /hello HTTP/1.1" 200' in log.getvalue()
        assert handed_to_its_logger == []
    else:
        assert log.getvalue() == "", "neither the request nor the websocket"
        [line] = handed_to_its_logger  # the plain request, at INFO, on a logger that prints nothing by itself
        assert '"GET /hello HTTP/1.1" 200' in line
