"""Flask-Websockets: raw WebSockets with a Flask-style API, on gevent.

Message handlers are registered like Flask views, and what they return is
sent back as the reply::

    from flask import Flask, jsonify
    from flask_websockets import WebSockets, ws

    app = Flask(__name__)
    sockets = WebSockets(app)

    @sockets.on_message                 # every message
    def echo(message):
        return message

    @sockets.on_message("^ECHO .*")     # messages matching a regex
    def command(message):
        ws.send("working")              # `ws` is the current connection
        return jsonify(reply=message.split(" ", 1)[1])

Serve it with gevent (``flask run --debug`` and gunicorn work too)::

    from flask_websockets import serve
    serve(app)          # http://127.0.0.1:5000, until Ctrl-C

Each connection lives inside the request context of its handshake, so
``request``, ``session``, ``g`` and ``current_app`` work in handlers as they
do in views. Its messages are handled one at a time and in order; a handler
that waits holds back its own connection only.

This file is the whole library and its reference manual. It reads top to
bottom, a section each: the current connection (``ws``); the extension
(``WebSockets``); the connection and its life cycle (``Connection``, with how
it all works); serving (``WebSocketHandler``, ``serve``, ``GunicornWorker``);
the handover, how servers hand a connection over; the message queue
(``Publisher``); metrics for Prometheus; the test client
(``WebSocketTestClient``); settings and
replies; and last the RFC 6455 protocol core, which knows nothing of Flask,
gevent or sockets. The extension uses the connection, the connection uses the
protocol core, never the other way.
"""
from __future__ import annotations

import atexit
import base64
import binascii
import codecs
import collections
import contextlib
import enum
import functools
import hashlib
import http.client
import inspect
import io
import logging
import os
import re
import signal
import socket
import _socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import Context, ContextVar
from typing import Any, Callable, NamedTuple, TypeVar, Union, overload

import gevent
import gevent.event
import gevent.monkey
import gevent.pywsgi
import gevent.socket
from flask import Blueprint, Flask, Response, abort, current_app, got_request_exception, request, session
from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler as _GeventWebSocketHandler
from werkzeug.exceptions import HTTPException
from werkzeug.local import LocalProxy
from werkzeug.routing import WebsocketMismatch
from werkzeug.wrappers import Response as _WerkzeugResponse

__version__ = "2.0.0.dev0"
__all__ = [
    "WebSockets",
    "Connection",
    "ConnectionClosed",
    "WebSocketHandler",
    "serve",
    "WebSocketTestClient",
    "HandshakeRefused",
    "Publisher",
    "ws",
    "has_socket_context",
]

logger = logging.getLogger(__name__)

#: What a handler receives: ``str`` for a text message, ``bytes`` for binary.
Message = Union[str, bytes]
#: What a handler may return or pass to ``ws.send``. ``None`` sends nothing.
Reply = Union[None, str, bytes, bytearray, memoryview, _WerkzeugResponse]
F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------
# The current connection
# ---------------------------------------------------------------------------

_cv_socket: ContextVar[Connection] = ContextVar("flask_websockets.ws")

_no_socket_message = """\
Working outside of websocket context.

This typically means that you used `ws` outside a websocket handler, for
example in an HTTP view or in a greenlet you spawned. Check with
has_socket_context(). To reach connections from elsewhere, use
sockets.connections or sockets.broadcast(message), or keep a reference to the
connection object inside a handler: `conn = ws._get_current_object()`.\
"""

#: The connection whose message is being handled, like ``flask.request`` for
#: the request. It is a :class:`Connection`, bound in ``on_open``,
#: ``on_message`` and ``on_close`` handlers::
#:
#:     @sockets.on_message("^LONG")
#:     def long_task(message):
#:         ws.send("started")          # a status update before the reply
#:         ...
#:         return "done"
#:
#: Using it anywhere else raises ``RuntimeError`` ("Working outside of
#: websocket context").
ws: Connection = LocalProxy(_cv_socket, unbound_message=_no_socket_message)  # type: ignore[assignment]


def has_socket_context() -> bool:
    """Whether code runs inside a websocket handler, where ``ws`` is bound.

    Like :func:`flask.has_request_context`, it tells a websocket handler from an
    HTTP view when both call the same function::

        def notify(text):
            if has_socket_context():
                ws.send(text)
            else:
                flash(text)
    """
    return _cv_socket.get(None) is not None


# ---------------------------------------------------------------------------
# The extension
# ---------------------------------------------------------------------------

Handler = Callable[[Message], Reply]
Hook = Callable[[], Any]

# What the registering decorators take and give back unchanged, named as Flask
# names its own (T_route...). Type variables, so that a decorated function keeps
# its type, and a type checker checks the handler's parameter and reply: one
# annotated ``-> dict`` is an error, as its reply would be at run time. A
# catch-all handler gets str and bytes, yet one annotated ``message: str`` is
# accepted: only the app knows whether its clients send binary. A str pattern's
# handler gets str, a bytes pattern's bytes.
T_handler = TypeVar("T_handler", bound=Callable[[Any], Reply])
T_text_handler = TypeVar("T_text_handler", bound=Callable[[str], Reply])
T_binary_handler = TypeVar("T_binary_handler", bound=Callable[[bytes], Reply])
T_error_handler = TypeVar("T_error_handler", bound=Callable[[Any], Reply])
T_hook = TypeVar("T_hook", bound=Hook)

class WebSockets:
    """The Flask-Websockets extension: one websocket endpoint of an app.

    ``WebSockets(app)`` adds a websocket endpoint named ``"websocket"`` at
    ``/``, or at ``path``: ``WebSockets(app, path="/ws")``. An HTTP view at the
    same path keeps working: the endpoint only answers websocket handshakes.
    ``url_for("websocket")`` gives its ``ws://`` URL, or ``wss://`` when the
    page was served over https. The path may have URL variables
    (``"/rooms/<room>"``), which handlers find in ``request.view_args``.

    An app may have several, each with its own path, ``endpoint`` name,
    handlers and connections: ``WebSockets(app, path="/chat", endpoint="chat")``.
    On a blueprint, ``WebSockets(bp)`` lives under the blueprint's
    ``url_prefix`` and is named ``"<blueprint name>.websocket"``. The first one
    registered on an app is ``app.extensions["websockets"]``. The application
    factory pattern works as usual::

        sockets = WebSockets()          # or WebSockets(match_one=True)

        def create_app():
            app = Flask(__name__)
            sockets.init_app(app)
            return app

    Every message goes through the handlers registered with
    :meth:`on_message`: first the pattern handlers whose regex matches, in
    registration order, then the catch-all handlers. By default every matching
    handler runs and each non-``None`` return value is sent as its own reply.
    With ``match_one=True`` only the first matching pattern handler runs, or,
    if no pattern matched, only the first catch-all handler.

    ``subprotocols`` lists the subprotocols the server speaks. The first one
    the client offers that is in the list is chosen (the client's order wins),
    sent back in the handshake, and available as ``ws.subprotocol``::

        sockets = WebSockets(app, subprotocols=["chat.v2", "chat.v1"])

    ``message_queue`` (or ``WEBSOCKETS_MESSAGE_QUEUE``) is a Redis URL: then
    :meth:`broadcast` reaches the connections of every process and host that
    serve this endpoint with the same queue (see :class:`Publisher`)::

        sockets = WebSockets(app, message_queue="redis://localhost:6379/0")
    """

    def __init__(
        self,
        app: Flask | Blueprint | None = None,
        match_one: bool = False,
        path: str = "/",
        subprotocols: Iterable[str] = (),
        endpoint: str = "websocket",
        message_queue: str | None = None,
    ) -> None:
        self.match_one = match_one
        self.path = path
        self.subprotocols = list(subprotocols)
        self.endpoint = endpoint
        if message_queue is not None:
            _check_queue_url(message_queue, "WebSockets(message_queue=...)")
        self.message_queue = message_queue
        self._apps: list[Flask] = []
        self._error_handlers: dict[type[BaseException], Callable[[Any], Reply]] = {}
        self._connect_hooks: list[Hook] = []
        self._text_patterns: list[tuple[re.Pattern[Any], Handler]] = []  # str patterns
        self._binary_patterns: list[tuple[re.Pattern[Any], Handler]] = []  # bytes patterns
        self._catch_all: list[Handler] = []
        self._open_hooks: list[Hook] = []
        self._close_hooks: list[Hook] = []
        # The open connections and the members of each room, in this process. Any thread may
        # change them (Werkzeug's server has one per connection): under the lock.
        self._connections: set[Connection] = set()
        self._rooms: dict[str, set[Connection]] = {}
        self._users: dict[str, set[Connection]] = {}  # the connections of each identified user
        self._windows: dict[tuple[int, int], int] = {}  # compression windows in use: connections each
        self._lock = _thread_lock()
        # What connections that have ended received and sent, and events counted: for stats().
        self._totals: dict[str, Any] = dict.fromkeys(("connections_opened", "slow_clients_closed", *_COUNTS), 0)
        self._totals.update(closes={}, handshakes_refused={})
        self._queue: _MessageQueue | None = None  # started with the first connection, if configured
        self._queue_checked = False
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask | Blueprint) -> None:
        """Add the websocket endpoint to ``app``, or to a blueprint.

        One extension may serve any number of apps: handlers are shared, and
        :meth:`broadcast` reaches the connections of all of them. On a
        blueprint, the app is set up when it registers the blueprint.
        """
        if self.endpoint in app.view_functions:
            raise ValueError(f"{app.name} has an endpoint {self.endpoint!r} already: pass another endpoint=")
        app.add_url_rule(self.path, endpoint=self.endpoint, view_func=self._serve, websocket=True)
        if isinstance(app, Blueprint):
            app.record_once(lambda state: self._set_up(state.app))  # type: ignore[arg-type]
        else:
            self._set_up(app)

    #: Timers for keepalive and timeouts: ``None`` for the event loop's. Tests
    #: put a fake clock here, with ``call_later(seconds, f, *args)`` (returning
    #: an object with ``close()``) and ``now()``.
    _clock: Any = None

    def _set_up(self, app: Flask) -> None:
        for key, default in _CONFIG_DEFAULTS.items():
            app.config.setdefault(key, default)
        settings = _settings(app)  # a bad value fails here, at start-up, naming its key
        if self.message_queue or settings.message_queue:
            _import_redis()  # so does a queue without redis-py, which would serve one process quietly
        if settings.metrics:
            _export_metrics(self)
        if _to_app_log.app_logger is None:
            _to_app_log.app_logger = app.logger
            logger.addHandler(_to_app_log)
        app.extensions.setdefault("websockets", self)
        if _close_unserved_upgrade not in app.after_request_funcs.get(None, []):
            app.after_request(_close_unserved_upgrade)
        # A plain GET of the endpoint: an explanation (an app's own handler, registered later, wins).
        app.register_error_handler(WebsocketMismatch, _explain_websocket_endpoint)
        self._apps.append(app)

    # -- registering handlers ------------------------------------------------

    @overload
    def on_message(self, handler: T_handler, /) -> T_handler: ...
    @overload
    def on_message(self, pattern: None = None) -> Callable[[T_handler], T_handler]: ...
    @overload
    def on_message(
        self, pattern: str | re.Pattern[str], flags: int = 0
    ) -> Callable[[T_text_handler], T_text_handler]: ...
    @overload
    def on_message(
        self, pattern: bytes | re.Pattern[bytes], flags: int = 0
    ) -> Callable[[T_binary_handler], T_binary_handler]: ...
    def on_message(self, pattern: Any = None, flags: int = 0) -> Any:
        """Register a message handler, the websocket's view function.

        The handler gets the message (``str`` for text, ``bytes`` for binary)
        and its return value is the reply: ``None`` sends nothing, ``str`` a
        text message, ``bytes``/``bytearray``/``memoryview`` a binary one, and a
        Flask response (``jsonify(...)``, ``make_response(...)``) its body, as
        text for ``text/*`` and JSON, else as binary. Anything else is a
        ``TypeError``, logged like any handler error, and nothing is sent.

        Without a pattern the handler sees every message::

            @sockets.on_message             # or @sockets.on_message()
            def echo(message):
                return message

        With a pattern it sees the messages that ``re.match`` it. A ``str``
        pattern sees only text messages; a ``bytes`` pattern only binary ones::

            @sockets.on_message("^ECHO (.*)", flags=re.DOTALL)
            def echo_command(message):
                return message[5:]

            @sockets.on_message(re.compile(rb"^\\x89PNG"))
            def image(data: bytes) -> None:
                store(data)

        Annotated handlers type-check (mypy, pyright): a ``str`` pattern's
        handler takes ``str``, a ``bytes`` pattern's ``bytes``, and each
        returns a reply. A bad registration fails at once, naming the
        handler: an invalid regex is a ``ValueError``, a handler that is
        async or cannot take the message a ``TypeError``.
        """
        if callable(pattern) and not isinstance(pattern, (str, bytes, re.Pattern)):
            # The bare decorator, @sockets.on_message over the handler itself.
            if flags:
                raise TypeError(f"on_message(flags=...) needs a pattern, and was given the handler {_name(pattern)}")
            handler: Any = pattern  # Any: callable() narrows it to `(...) -> object`, which is no Handler
            self._catch_all.append(_check_handler(handler, "on_message", ("message",)))
            return handler
        if pattern is not None and not isinstance(pattern, (str, bytes, re.Pattern)):
            raise TypeError(
                "on_message() takes a handler, or a pattern (str, bytes or re.Pattern) then a handler;"
                f" not {type(pattern).__name__} {pattern!r:.40}"
            )
        if pattern is None and flags:
            raise TypeError("on_message(flags=...) needs a pattern")
        if isinstance(flags, bool) or not isinstance(flags, int):
            raise TypeError(f"on_message({pattern!r}, flags=...) takes re flags such as re.I, not {flags!r:.40}")
        call = f"on_message({pattern!r}{f', flags={flags!r}' if flags else ''})"

        def decorator(handler: Any) -> Any:
            _check_handler(handler, call, ("message",))
            # Compiled here, where the handler is known, so that an invalid regex
            # names the registration that failed. re's own errors name neither.
            try:
                regex = None if pattern is None else re.compile(pattern, flags)
            except (re.error, ValueError, TypeError) as error:
                raise ValueError(f"{call} over {_name(handler)}: not a valid pattern: {error}") from error
            if regex is None:
                self._catch_all.append(handler)
            elif isinstance(regex.pattern, str):
                self._text_patterns.append((regex, handler))
            else:
                self._binary_patterns.append((regex, handler))
            return handler

        return decorator

    def errorhandler(self, exception: type[BaseException]) -> Callable[[T_error_handler], T_error_handler]:
        """Register a function that handles an error in this endpoint's handlers.

        Like Flask's ``errorhandler``: the handler of the most specific class
        in the error's class hierarchy wins, and gets the error. What it
        returns is sent as the reply, as a message handler's would be, and it
        may close the connection. An error no handler handles is logged, and
        the connection goes on, as without error handlers::

            @sockets.errorhandler(ValueError)
            def bad_input(error):
                return jsonify(error=str(error))

            @sockets.errorhandler(PermissionError)
            def forbidden(error):
                ws.close(1008, "forbidden")
        """
        if not (isinstance(exception, type) and issubclass(exception, BaseException)):
            if inspect.isfunction(exception) or inspect.ismethod(exception):  # @sockets.errorhandler, no class
                raise TypeError(
                    f"errorhandler() takes an exception class, then the handler {_name(exception)}:"
                    " @sockets.errorhandler(ValueError)"
                )
            raise TypeError(f"errorhandler() takes an exception class, not {exception!r:.40}")
        call = f"errorhandler({exception.__name__})"

        def decorator(handler: T_error_handler) -> T_error_handler:
            self._error_handlers[exception] = _check_handler(handler, call, ("error",))
            return handler

        return decorator

    def before_connect(self, hook: T_hook) -> T_hook:
        """Register a function that may refuse a handshake, called with no arguments.

        It runs in the handshake's request context, after the origin check
        and before the connection opens. To refuse, it calls ``abort()`` or
        returns a response; ``None`` lets the connection open. With
        :class:`WebSocketHandler` the client then gets that HTTP answer and
        never a 101::

            @sockets.before_connect
            def members_only():
                if "user_id" not in session:
                    abort(401)
        """
        self._connect_hooks.append(_check_handler(hook, "before_connect"))
        return hook

    def on_open(self, hook: T_hook) -> T_hook:
        """Register a function called with no arguments when a client connects.

        It runs before the first message is handled, with ``ws``, ``request``
        and ``session`` bound. If it raises and no :meth:`errorhandler`
        handles the error, it is logged and the connection is closed with
        1011 (internal error)::

            @sockets.on_open
            def greet():
                ws.send(f"hello {request.remote_addr}")
        """
        self._open_hooks.append(_check_handler(hook, "on_open"))
        return hook

    def on_close(self, hook: T_hook) -> T_hook:
        """Register a function called with no arguments when a connection ends.

        It runs exactly once per connection, however it ended: a close from
        either side, an abrupt disconnect, a protocol error or a handler
        error. ``ws`` is still bound (sending raises :class:`ConnectionClosed`)
        and ``ws.close_code`` tells why it ended (1006 for a lost
        connection)::

            @sockets.on_close
            def gone():
                sockets.broadcast(f"{request.remote_addr} left ({ws.close_code})")
        """
        self._close_hooks.append(_check_handler(hook, "on_close"))
        return hook

    # -- sending to many ----------------------------------------------------

    @property
    def connections(self) -> list[Connection]:
        """The open connections of this endpoint, as a list taken now.

        Each :class:`Connection` has its handshake's ``request``, its
        ``session`` as it was then, and a ``state`` dict for the app's own
        data, so that a view can pick connections and ``send`` to them::

            @app.post("/kick/<user>")
            def kick(user):
                for conn in sockets.connections:
                    if conn.session.get("user") == user:
                        conn.close(4000, "kicked")
                return ""

        A connection leaves the list as soon as it is closed (``closed``),
        before its closing handshake is over and its ``on_close`` has run.
        """
        return [conn for conn in list(self._connections) if not conn.closed]

    def broadcast(
        self,
        message: Reply,
        room: str | None = None,
        to: Callable[[Connection], bool] | None = None,
        skip: Connection | None = None,
        local: bool = False,
        compress: bool = True,
        user: str | None = None,
    ) -> int:
        """Send ``message`` to every open connection, a room's or a user's; return how many here got it.

        ``room`` picks the members of a room (see :meth:`Connection.join`),
        ``user`` the connections of a user, every tab and device (see
        :meth:`Connection.identify`), both the user's in the room, and
        ``skip`` leaves one connection out: the sender, for a chat. ``to`` picks
        the connections of this process with a function that takes a
        :class:`Connection`. It works from handlers, HTTP views, background
        greenlets and other threads, and takes the same types as a handler's
        reply. The frame is built once::

            @sockets.on_message
            def say(message):
                sockets.broadcast(message, room=ws.state["room"], skip=ws)

            @app.post("/notify/<user_id>")
            def notify(user_id):
                n = sockets.broadcast(request.form["text"], user=user_id)
                return f"sent to {n} of the user's tabs here"

        It never waits for a client: each connection takes the message into
        its send buffer and returns. The broadcasts of one turn of the event
        loop (a handler that sends a hundred updates) reach each client in
        one write, after what was sent to it before and before what follows.
        A client whose buffer would pass ``WEBSOCKETS_MAX_SEND_BUFFER`` does
        not get it and is closed as too slow (1008, "client too slow"). A
        connection that is closed is skipped; it leaves the connections and
        its rooms as it ends.

        With a message queue, the message also goes to every other process
        that serves this endpoint, never waiting for Redis either, and the
        count is this process's. A function in ``to`` cannot travel there:
        with a queue, ``to`` raises ``ValueError`` unless ``local=True`` says
        that this process's connections are enough. ``local=True`` keeps any
        broadcast in this process.

        With compression on, the message is compressed once for all the
        connections that agreed to it, unless ``compress=False``: as with
        :meth:`Connection.send`, for a message with a secret in it.
        """
        content = _payload(message, "broadcast()")
        if content is None:
            return 0
        _check_audience(room, user, "broadcast()")
        if isinstance(skip, LocalProxy):  # skip=ws: the connection behind it
            skip = skip._get_current_object()  # type: ignore[attr-defined]
        queue = None if local else self._message_queue()
        if queue is not None and to is not None:
            raise ValueError(
                "broadcast(to=...) picks connections with a function, which other processes cannot run:"
                " with a message queue, broadcast to a room, or pass local=True for this process's connections"
            )
        prepared = _Prepared(*content, compress=compress)
        if compress and len(prepared.payload) > _COMPRESS_PIECE:
            self._compress_ahead([prepared], _pause())  # in pieces, here rather than in the event loop
        sent = self._deliver(prepared, room, to, skip, user)
        if queue is not None:
            queue.publish(room, user, *content, compress)
        return sent

    def disconnect(self, user: str | None = None, room: str | None = None, code: int = 1000, reason: str = "") -> int:
        """Close the connections of a user, or of a room, on every process; return how many here.

        Both given, the user's connections in the room. ``code`` and
        ``reason`` are those of :meth:`Connection.close`, and each
        connection's ``on_close`` runs as usual. With a message queue, every
        process that serves the endpoint closes its own, a Redis round trip
        later; a logout handled elsewhere uses :meth:`Publisher.disconnect`::

            @app.post("/logout")
            def logout():
                sockets.disconnect(user=str(session.pop("user_id")), code=4001, reason="signed out")
                return redirect("/")
        """
        _check_disconnect(room, user, code, reason, "disconnect()")
        closed = 0
        for conn in self._members(room, user):
            if not conn.closed:
                conn.close(code, reason)
                closed += 1
        queue = self._message_queue()
        if queue is not None:
            queue.publish_close(room, user, code, reason)
        return closed

    def presence(self, room: str | None = None) -> dict[str, int]:
        """The identified users connected to the endpoint, or in a room, with their number of connections.

        Across every process with a message queue (see "Users and presence" in
        the documentation for how fresh); this process's own, exactly, without.
        Connections that did not :meth:`~Connection.identify` are counted by
        :meth:`count` only::

            @sockets.on_message("^JOIN (.+)")
            def join(message):
                ws.join(message[5:])
                sockets.broadcast(json.dumps(sorted(sockets.presence(message[5:]))), room=message[5:])
        """
        return self._presence(room, "presence()")[0]

    def count(self, room: str | None = None) -> int:
        """How many connections the endpoint or a room has, identified or not; across processes as :meth:`presence`."""
        return self._presence(room, "count()")[1]

    def stats(self) -> dict[str, Any]:
        """This endpoint's figures in this process, for a dashboard or an alert.

        ``connections`` open now; since the process started:
        ``connections_opened``, ``closes`` (close code to count),
        ``messages_received``, ``messages_sent``, ``bytes_received`` and
        ``bytes_sent`` (frames, as on the wire), ``slow_clients_closed`` (too
        slow to read what was sent), ``rate_limited`` (times a client's
        reading paused for ``WEBSOCKETS_RATE_LIMIT``) and
        ``handshakes_refused`` (HTTP status to count). With a message queue,
        ``queue_connected`` and ``queue_lag_ms`` (how old the newest message
        from another process was when it was read)::

            @app.get("/health")
            def health():
                return sockets.stats()

        ``WEBSOCKETS_METRICS = True`` exports the same to Prometheus.
        """
        with self._lock:
            figures = dict(self._totals, closes=dict(self._totals["closes"]))
            figures["handshakes_refused"] = dict(self._totals["handshakes_refused"])
            open_ = list(self._connections)
        figures["connections"] = len(open_)
        for conn in open_:
            for key, value in zip(_COUNTS, _counts(conn)):
                figures[key] += value
        queue = self._queue
        if self.message_queue is not None or any(_settings(app).message_queue for app in self._apps):
            figures["queue_connected"] = queue is not None and queue.connected
            figures["queue_lag_ms"] = queue.lag_ms if queue is not None else 0.0
        return figures

    def _count(self, event: str, key: Any = None) -> None:
        """Count an event for stats(): ``key`` counts it in a dict (a close code, an HTTP status)."""
        with self._lock:
            if key is None:
                self._totals[event] += 1
            else:
                counts = self._totals[event]
                counts[key] = counts.get(key, 0) + 1

    def _presence(self, room: str | None, who: str) -> tuple[dict[str, int], int]:
        _check_room(room, who)
        users, total = self._presence_here(room)
        queue = self._message_queue()
        if queue is not None:
            for user, connections in _off_the_loop(queue.presence_elsewhere, room).items():
                if user:
                    users[user] = users.get(user, 0) + connections
                total += connections
        return users, total

    def _deliver(
        self,
        message: _Prepared,
        room: str | None,
        to: Callable[[Connection], bool] | None = None,
        skip: Connection | None = None,
        user: str | None = None,
    ) -> int:
        sent = 0
        for conn in self._members(room, user):
            if conn is skip or (to is not None and not to(conn)):
                continue
            try:
                if conn._send_prepared((message,)):
                    sent += 1
            except ConnectionClosed:  # it leaves the connections and its rooms as it ends
                pass
        return sent

    def _compress_ahead(self, messages: list[_Prepared], pause: Callable[[], Any] | None = None) -> None:
        """Compress messages for every window the connections agreed to, before they are delivered."""
        for message in messages:
            for bits, min_size in list(self._windows):
                if message.compress and len(message.payload) >= min_size:
                    message.deflated(bits, pause)

    def _message_queue(self) -> _MessageQueue | None:
        """This process's queue for the endpoint: made at first use, again after a fork; one, whichever thread asks."""
        queue = self._queue
        if queue is not None and queue.pid == os.getpid():
            return queue
        if self._queue_checked and queue is None:
            return None
        with _queue_lock:
            if self._queue is None or self._queue.pid != os.getpid():
                app = current_app._get_current_object() if current_app else (self._apps[0] if self._apps else None)  # type: ignore[attr-defined]
                url = self.message_queue or (app and _settings(app).message_queue)
                queue = _MessageQueue(url, self) if url else None
                with self._lock:  # from now on, changes to presence go to it (its first write waits for this)
                    self._queue = queue
                    self._queue_checked = True
                if queue is not None:
                    queue._wake_writer()
            return self._queue

    def _deliver_remote(self, batch: list[tuple[str | None, str | None, Any]]) -> list[Connection]:
        """What other processes sent, in order, to this process's connections: messages each in one write, closes."""
        writes: dict[Connection, list[_Prepared]] = {}

        def flush(conns: Iterable[Connection]) -> None:
            for conn in conns:
                messages = writes.pop(conn, None)
                if messages:
                    try:
                        conn._send_prepared(messages)
                    except ConnectionClosed:
                        pass

        written = set()
        for room, user, item in batch:
            members = self._members(room, user)
            if isinstance(item, _Prepared):
                for conn in members:
                    writes.setdefault(conn, []).append(item)
                    written.add(conn)
            else:  # a disconnect: (code, reason), after the messages before it
                flush(members)
                for conn in members:
                    conn.close(*item)
        flush(list(writes))
        return list(written)

    # -- the connections, their rooms and their users ---------------------------

    def _members(self, room: str | None, user: str | None = None) -> list[Connection]:
        """The connections of the endpoint, a room, a user, or a user's in a room, in this process (a copy)."""
        if user is None:
            return list(self._connections if room is None else self._rooms.get(room, ()))
        conns = list(self._users.get(user, ()))
        return conns if room is None else [conn for conn in conns if room in (conn._rooms or ())]

    def _reaches(self, room: str | None, user: str | None) -> bool:
        """Whether a message for ``room`` and ``user`` has anyone to go to here (a look-up, no copy)."""
        if user is not None:
            conns = self._users.get(user)
            return bool(conns) and (room is None or any(room in (c._rooms or ()) for c in list(conns)))  # type: ignore[union-attr]
        return bool(self._connections) if room is None else room in self._rooms

    def _add(self, conn: Connection) -> None:
        with self._lock:
            self._connections.add(conn)
            self._totals["connections_opened"] += 1
            window = conn._window()
            if window is not None:
                self._windows[window] = self._windows.get(window, 0) + 1
            self._present(None, None, 1)

    def _forget(self, conn: Connection) -> None:
        """Take a connection that has closed out of the connections, rooms and users; it keeps its ``rooms``."""
        with self._lock:
            if conn not in self._connections:
                return
            self._connections.discard(conn)
            totals = self._totals
            for key, value in zip(_COUNTS, _counts(conn)):
                totals[key] += value
            closes = totals["closes"]
            closes[conn.close_code] = closes.get(conn.close_code, 0) + 1
            window = conn._window()
            if window is not None:
                self._windows[window] -= 1
                if not self._windows[window]:
                    del self._windows[window]
            user = conn._user_id
            self._present(None, user, -1)
            for room in conn._rooms or ():
                self._remove_member(conn, room)
            if user is not None:
                self._remove_from(self._users, user, conn)

    def _join(self, conn: Connection, room: str) -> None:
        with self._lock:  # not while _forget runs: a room must never keep a connection that has gone
            if conn.closed:
                raise ConnectionClosed(f"{conn!r} is closed ({conn.close_code}): it may not join {room!r}")
            if conn._rooms is None:
                conn._rooms = set()
            if room not in conn._rooms:
                conn._rooms.add(room)
                self._rooms.setdefault(room, set()).add(conn)
                self._present(room, conn._user_id, 1)

    def _leave(self, conn: Connection, room: str) -> None:
        with self._lock:
            if conn._rooms and room in conn._rooms and conn in self._connections:
                conn._rooms.discard(room)
                self._remove_member(conn, room)
            elif conn._rooms:  # it has ended: only its own record
                conn._rooms.discard(room)

    def _remove_member(self, conn: Connection, room: str) -> None:  # under the lock
        self._remove_from(self._rooms, room, conn)
        self._present(room, conn._user_id, -1)

    def _identify(self, conn: Connection, user: str) -> None:
        with self._lock:
            if conn.closed:
                raise ConnectionClosed(f"{conn!r} is closed ({conn.close_code}): it may not identify as {user!r}")
            old = conn._user_id
            if old == user:
                return
            if old is not None:
                self._remove_from(self._users, old, conn)
            self._users.setdefault(user, set()).add(conn)
            conn._user_id = user
            for room in [None, *(conn._rooms or ())]:
                self._present(room, old, -1)
                self._present(room, user, 1)

    @staticmethod
    def _remove_from(index: dict[str, set[Connection]], key: str, conn: Connection) -> None:  # under the lock
        members = index.get(key)
        if members is not None:
            members.discard(conn)
            if not members:
                del index[key]

    def _present(self, room: str | None, user: str | None, change: int) -> None:  # under the lock
        """Tell the message queue, if any, how this process's presence changed."""
        queue = self._queue
        if queue is not None and queue.pid == os.getpid():  # not a parent's, copied by a fork
            queue.presence_changed(room, user, change)

    def _presence_snapshot(self) -> dict[str | None, dict[str, int]]:  # under the lock
        """This process's presence whole, for the message queue: per scope (``None``: the endpoint), per user id."""
        snapshot: dict[str | None, dict[str, int]] = {}
        for conn in self._connections:
            user = conn._user_id or ""
            for room in [None, *(conn._rooms or ())]:
                users = snapshot.setdefault(room, {})
                users[user] = users.get(user, 0) + 1
        return snapshot

    def _presence_here(self, room: str | None) -> tuple[dict[str, int], int]:
        """This process's open connections of the endpoint or a room: connections per user, and how many in all."""
        users: dict[str, int] = {}
        total = 0
        for conn in self._members(room):
            if conn.closed:
                continue
            total += 1
            user = conn._user_id
            if user is not None:
                users[user] = users.get(user, 0) + 1
        return users, total

    # -- testing --------------------------------------------------------------

    def test_client(
        self,
        path: str | None = None,
        headers: dict | None = None,
        query_string: Any = None,
        environ_overrides: dict | None = None,
        http_client: Any = None,
        compression: bool = False,
    ) -> WebSocketTestClient:
        """Open a connection to this endpoint for a test, without a server.

        ``path`` defaults to the endpoint's own (give it when the path has
        URL variables). ``headers``, ``query_string`` and
        ``environ_overrides`` go into the handshake request, as with Flask's
        test client. To carry a session, pass the ``http_client``
        (``app.test_client()``) that logged in. With ``compression=True`` it
        offers permessage-deflate as browsers do, and compresses what it
        sends if the endpoint agrees. A refused handshake raises
        :class:`HandshakeRefused`::

            def test_greeting():
                with sockets.test_client(query_string={"name": "ada"}) as client:
                    assert client.receive() == "hello ada"
        """
        if http_client is None:
            if len(self._apps) != 1:
                raise RuntimeError(f"the endpoint is on {len(self._apps)} apps: pass http_client=app.test_client()")
            http_client = self._apps[0].test_client()
        if path is None:
            path = self._own_path(http_client.application)
        return WebSocketTestClient(
            http_client,
            path,
            compression=compression,
            headers=headers,
            query_string=query_string,
            environ_overrides=environ_overrides,
        )

    def _own_path(self, app: Flask) -> str:
        rules = [r for r in app.url_map.iter_rules() if app.view_functions.get(r.endpoint) == self._serve]
        if len(rules) != 1 or rules[0].arguments:
            raise ValueError(f"give test_client() a path: the endpoint's rules are {[r.rule for r in rules]}")
        return rules[0].rule

    # -- serving a connection -----------------------------------------------

    def _serve(self, **_view_args: Any) -> Response:
        """The view of the websocket endpoint: the handshake, then the connection."""
        req = request._get_current_object()  # type: ignore[attr-defined]
        handover = _handover(req.environ)
        if handover is None:
            return _not_served_response()
        if _metrics_copier is not None and _metrics_copier[0] != os.getpid():
            _copy_metrics_from_here()  # a gunicorn worker's first handshake, refused or not (multi-process mode)
        settings = _settings(current_app._get_current_object())  # type: ignore[attr-defined]
        try:
            refusal = handover.check() or self._refusal(req, settings)
        except HTTPException as error:  # abort(403) and the like
            self._count("handshakes_refused", error.code)
            raise
        if refusal is not None:
            self._count("handshakes_refused", refusal.status_code)
            return refusal  # an HTTP answer; after gevent-websocket's 101, a close with 1008
        subprotocol = deflate = None
        if handover.answers_handshake:  # else the 101 went out without them
            subprotocol = self._choose_subprotocol(req)
            if settings.compression:
                offers = req.headers.get("Sec-WebSocket-Extensions", "")
                deflate = _agree_deflate(offers, settings.compression_takeover, settings.compression_min_size)
        sock, pending = handover.accept(subprotocol, deflate.header if deflate else None)
        conn = Connection(
            req.environ,
            sock,
            pending,
            sockets=self,
            subprotocol=subprotocol,
            deflate=deflate,
            settings=settings,
            request=req,
            session=dict(session._get_current_object()),  # type: ignore[attr-defined]  # (the proxy's own copy is slow)
            clock=self._clock,
        )
        token = _cv_socket.set(conn)
        self._add(conn)
        _open_connections.add(conn)
        self._message_queue()  # so that broadcasts from other processes reach this one
        wait = True
        try:
            self._run(conn)
        except gevent.GreenletExit:  # the server is stopping: no time to wait for the peer
            conn._close(1001, "server shutting down")
            wait = False
            raise
        finally:
            # Each step runs, whatever the others raise: on_close runs exactly once, each hook.
            _run_all(
                lambda: conn._end(wait),
                lambda: self._forget(conn),  # nothing reaches it any more; its ``rooms`` stay for on_close
                *[functools.partial(self._call, conn, hook) for hook in self._close_hooks],
                lambda: _open_connections.discard(conn),
                lambda: conn._linger() if wait else None,  # before the server closes the socket
                handover.end,
                lambda: _cv_socket.reset(token),
            )
        return handover.response()

    def _refusal(self, req: Any, settings: _Settings) -> Response | None:
        """Why this handshake is refused, as a response; ``None`` to accept it."""
        origin = req.environ.get("HTTP_ORIGIN")
        if origin is not None and not _origin_allowed(origin, settings.allowed_origins, req):
            _log_summarised(
                logging.WARNING,
                "websocket handshakes refused for their origin",
                "websocket handshake from origin %s refused: %s may connect. To allow it, set"
                " WEBSOCKETS_ALLOWED_ORIGINS to a list of origins that includes it, or to '*'.",
                origin,
                f"only {req.scheme}://{req.host}"
                if settings.allowed_origins is None
                else f"only {current_app.config['WEBSOCKETS_ALLOWED_ORIGINS']}",
            )
            abort(403, description=f"Origin {origin} may not open a websocket here.")
        for hook in self._connect_hooks:
            answer = hook()
            if answer is not None:
                return current_app.make_response(answer)
        return None

    def _choose_subprotocol(self, req: Any) -> str | None:
        if not self.subprotocols:
            return None
        offered = req.headers.get("Sec-WebSocket-Protocol", "").split(",")
        return next((p.strip() for p in offered if p.strip() in self.subprotocols), None)

    def _run(self, conn: Connection) -> None:
        for hook in self._open_hooks:
            if not self._call(conn, hook):
                conn._close(1011, "internal error")  # the connection is not set up
                break
        # The view's own context, not a copy: what a handler sets in a ContextVar, the view, the
        # next handlers, on_close and teardown see, as when handlers ran in the view's greenlet.
        conn._context = gevent.getcurrent().gr_context
        while True:  # (a loop, not a generator: the greenlet's stack, copied at each switch, stays shallow)
            message = conn._next_message()
            if message is None:
                return
            self._dispatch(conn, message)

    def _dispatch(self, conn: Connection, message: Message) -> None:
        patterns = self._text_patterns if isinstance(message, str) else self._binary_patterns
        for regex, handler in patterns:
            if regex.match(message) is not None:  # type: ignore[arg-type]
                self._call(conn, handler, message)
                if self.match_one:
                    return
        for handler in self._catch_all:
            self._call(conn, handler, message)
            if self.match_one:
                return

    def _call(self, conn: Connection, function: Callable[..., Any], message: Message | None = None) -> bool:
        """Run a handler with its message (its return value is the reply) or a hook (no message).

        An error goes to the most specific error handler, whose return value
        is the reply; failing that, it is logged (or propagates, see
        ``_propagate``). Returns whether no error was left unhandled. Errors
        that are not ``Exception`` count too (``gevent.Timeout``), but not
        those that stop a greenlet or the process.
        """
        try:
            if message is None:
                function()
            else:  # (not function(*args), which would nest a C frame: a handler that waits carries it)
                conn._send_reply(function(message), function)
            return True
        except ConnectionClosed:
            # The peer is gone or the app closed the connection: not an app
            # error. The receive loop notices and ends the connection.
            logger.debug("reply dropped: connection closed", exc_info=True)
            return True
        except _STOPPING:
            raise
        except BaseException as error:
            handler = self._error_handler(error)
            if handler is None:
                _handle_error(error, function)
                return False
            try:
                conn._send_reply(handler(error), handler)
                return True
            except ConnectionClosed:
                return True
            except _STOPPING:
                raise
            except BaseException as handler_error:  # logged with the original error as its context
                _handle_error(handler_error, handler)
                return False

    def _error_handler(self, error: BaseException) -> Callable[[Any], Reply] | None:
        for cls in type(error).__mro__:  # the most specific class first
            if cls in self._error_handlers:
                return self._error_handlers[cls]
        return None


#: The counters of stats() that each connection keeps while it is open (see _counts).
_COUNTS = ("messages_received", "bytes_received", "messages_sent", "bytes_sent", "rate_limited")


def _counts(conn: Connection) -> tuple[int, ...]:
    return conn._received, conn._received_bytes, conn._sent, conn._sent_bytes, conn._rate_limited


def _check_handler(func: F, registration: str, arguments: tuple[str, ...] | None = None) -> F:
    """Check a function given to ``registration`` (``"on_open"``, ``"on_message('^ECHO')"``...).

    It runs at registration, at import time, so that a mistake fails there and
    names the function, not at the first message. ``arguments`` names what a
    handler is called with, ``("message",)`` say, and its signature must take
    them. Hooks get no arguments, and their signatures are not checked: every
    hook registration that worked before still does.
    """
    if not callable(func):
        raise TypeError(f"{registration} takes a function, not {type(func).__name__} {func!r:.40}")
    code = getattr(func, "__code__", None)
    if (
        inspect.iscoroutinefunction(func)
        or inspect.isasyncgenfunction(func)
        or (code is not None and code.co_flags & inspect.CO_ITERABLE_COROUTINE)
    ):
        # gevent runs plain functions concurrently; a coroutine would be the reply.
        raise TypeError(f"{registration}: {_name(func)} is async: websocket handlers must be plain functions")
    if arguments is None:
        return func
    try:
        # The function's own signature: a decorator's wrapper may take other arguments than what it wraps.
        signature = inspect.signature(func, follow_wrapped=False)
    except (TypeError, ValueError):  # some built-in callables have none: called as they are
        return func
    try:
        signature.bind(*arguments)
    except TypeError as error:
        called = " and ".join(arguments)
        raise TypeError(f"{registration}: {_name(func)}{signature} cannot take the {called}: {error}") from None
    return func


def _check_user(user: Any, who: str) -> None:
    if not isinstance(user, str):
        raise TypeError(f"{who}: a user id is a str, not {type(user).__name__} {user!r:.40}")
    if not user or len(user.encode("utf-8")) > 1024:
        raise ValueError(f"{who}: a user id is 1 to 1,024 bytes of UTF-8, not {len(user.encode('utf-8'))}")


def _check_room(room: Any, who: str) -> None:
    if room is not None and (not isinstance(room, str) or not room):
        raise TypeError(f"{who}: a room is a non-empty str, not {room!r:.40}")


def _check_audience(room: Any, user: Any, who: str) -> None:
    """A room (``None``: everyone) and a user (``None``: anyone) that a message goes to."""
    _check_room(room, who)
    if user is not None:
        _check_user(user, who)


def _check_disconnect(room: Any, user: Any, code: Any, reason: Any, who: str) -> None:
    _check_close(code, reason)
    if user is None and room is None:
        raise TypeError(f"{who} needs user= or room= (or both): whose connections to close")
    _check_audience(room, user, who)


def _check_close(code: Any, reason: Any) -> None:
    if isinstance(code, bool) or not isinstance(code, int) or not _is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent: use 1000-1003, 1007-1014 or 3000-4999")
    if not isinstance(reason, str) or len(reason.encode("utf-8")) > 123:
        raise ValueError("a close reason is at most 123 bytes of UTF-8")


def _name(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}"


def _propagate() -> bool:
    """Whether handler errors propagate, as ``PROPAGATE_EXCEPTIONS`` says.

    Unset, they propagate when testing. Unlike Flask views, not in debug mode:
    a websocket has no debugger page, and the connection should survive.
    """
    propagate = current_app.config.get("PROPAGATE_EXCEPTIONS")
    return current_app.testing if propagate is None else bool(propagate)


def _handle_error(error: BaseException, function: Callable[..., Any]) -> None:
    """Report an unhandled error as Flask does for views: signal, then log or re-raise.

    Error trackers that listen to ``got_request_exception`` (Sentry, Rollbar)
    see it. The app's logger logs it with the handler's name and the
    endpoint's path (Flask's own line, ``Exception on / [GET]``, would read
    like a failed HTTP request). Called from the ``except`` block that caught it.
    """
    got_request_exception.send(current_app._get_current_object(), exception=error)  # type: ignore[attr-defined]
    if _propagate():
        raise  # noqa: PLE0704 - called from an except block
    current_app.logger.error("Exception in %s, websocket %s", _name(function), request.path, exc_info=sys.exc_info())


#: Errors that stop a greenlet or the process: never handled as handler errors.
_STOPPING = (gevent.GreenletExit, KeyboardInterrupt, SystemExit)


def _run_all(*steps: Callable[[], Any]) -> None:
    """Run every step, even when some raise; then raise the first error."""
    error: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as exc:  # noqa: PERF203 - cleanup must go on
            error = error or exc
    if error is not None:
        raise error


_NOT_SERVED = """\
This server cannot serve websockets.

Serve the app with flask_websockets.serve(app), gevent's WSGIServer with
handler_class=flask_websockets.WebSocketHandler, `flask run`, or gunicorn with
-k flask_websockets.GunicornWorker.
"""


def _log_summarised(level: int, kind: str, message: str, *args: Any) -> None:
    """Log a line that clients can repeat at will (refusals, drops) once per interval, then a count.

    The first line of a kind in ``_SUMMARY_INTERVAL`` seconds is logged; the
    ones after it are counted, and the next one after the interval says how
    many there were: a log's volume is not an attacker's to choose.
    """
    now = _monotonic()
    since, count = _summaries.get(kind, (None, 0))
    if since is not None and now - since < _SUMMARY_INTERVAL:
        _summaries[kind] = since, count + 1
        return
    _summaries[kind] = now, 0
    if count:
        logger.log(level, "%d more like the last in %d s: %s", count, round(now - since), kind)  # type: ignore[operator]
    logger.log(level, message, *args)


_SUMMARY_INTERVAL = 60.0
_monotonic = time.monotonic  # the summaries' clock (a test's fake one)
_summaries: dict[str, tuple[float, int]] = {}  # kind -> (when its interval began, lines not logged since)


class _ToAppLog(logging.Handler):
    """The library's log lines, handed to the app logger's handlers (or gunicorn's), in their format.

    Only when nothing else would show them: a handler of the app's logging
    configuration on ``flask_websockets`` or the root logger takes them as
    usual, and this one then does nothing. Without it they would reach
    Python's last-resort handler, as bare messages without time or level.
    """

    app_logger: logging.Logger | None = None  # the first app's
    gunicorn_logger: logging.Logger | None = None  # under GunicornWorker: "gunicorn.error"

    def emit(self, record: logging.LogRecord) -> None:
        current: logging.Logger | None = logger
        while current is not None:
            if any(handler is not self for handler in current.handlers):
                return  # configured: propagation shows it
            current = current.parent if current.propagate else None  # type: ignore[assignment]
        target = self.app_logger
        if target is None or (self.gunicorn_logger is not None and _flask_default_handler_only(target)):
            target = self.gunicorn_logger
        if target is not None:
            target.handle(record)


def _flask_default_handler_only(app_logger: logging.Logger) -> bool:
    from flask.logging import default_handler

    return app_logger.handlers == [default_handler]


_to_app_log = _ToAppLog()


def _not_served_response() -> Response:
    # A websocket handshake reached the app through a server that cannot hand
    # over its connection (the Flask test client, gunicorn's sync workers).
    logger.warning("websocket handshake for %s refused: the server cannot serve websockets", request.path)
    return current_app.response_class(_NOT_SERVED, status=501, mimetype="text/plain")


def _explain_websocket_endpoint(error: Exception) -> Response:
    """A plain HTTP request to a websocket endpoint: say what it is, with 426 Upgrade Required."""
    url = request.url.replace("http", "ws", 1)
    text = (
        f"This is a websocket endpoint: {url}\n\n"
        "It speaks the WebSocket protocol, not plain HTTP. Connect with a websocket\n"
        f'client, such as a page\'s JavaScript: new WebSocket("{url}")\n'
    )
    return current_app.response_class(text, 426, {"Upgrade": "websocket"}, mimetype="text/plain")


def _close_unserved_upgrade(response: Response) -> Response:
    """Close, with a code, a connection gevent-websocket upgraded but the app refused.

    gevent-websocket's own handler answers every handshake with 101 before
    the app runs. When the app then answers with an error (no websocket
    endpoint at that path: 404; a foreign origin: 403; a ``before_connect``
    refusal), gevent-websocket would send a close frame with no code. Send
    1008 (policy violation) for a 4xx, 1011 for a 5xx, 1000 otherwise.
    """
    upgraded = request.environ.get("wsgi.websocket")
    if upgraded is not None and not upgraded.closed:
        status = response.status_code
        code = 1011 if status >= 500 else 1008 if status >= 400 else 1000
        if status >= 400:
            logger.warning("websocket to %s closed after its handshake: %s", request.path, response.status)
        try:
            proto = _Protocol()
            proto.send_close(code, response.status)
            upgraded.handler.socket.sendall(proto.data_to_send())
        except OSError:
            pass
        upgraded.closed = True
    return response


def _origin_allowed(origin: str, allowed: Any, req: Any) -> bool:
    """Whether a page from ``origin`` may connect; ``allowed`` is from ``_Settings``."""
    if allowed == "*":
        return True
    key = _origin_key(origin)
    if allowed is None:  # same origin: scheme, host and port of the page equal the request's
        return key is not None and key == _origin_key(f"{req.scheme}://{req.host}")
    return key in allowed


@functools.lru_cache(maxsize=256)  # a browser sends its page's origin with every handshake: a few, again and again
def _origin_key(origin: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of an origin, default ports filled in; ``None`` if malformed."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    if not scheme or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


_DEFAULT_PORTS = {"http": 80, "https": 443}


# ---------------------------------------------------------------------------
# The connection and its life cycle
# ---------------------------------------------------------------------------
#
# How it works: the life of a connection.
#
# Handshake. The endpoint is an ordinary Flask view on a ``websocket=True``
# rule, so routing, ``before_request`` and the request context are Flask's.
# The view (``WebSockets._serve``) checks the handshake (RFC 6455, origin,
# ``before_connect``) while an HTTP answer is still possible.
#
# Handover. The server hands over the socket (``_Handover``): our handler and
# the test client send the 101 when the view asks; gevent-websocket's handler
# has sent it already; Werkzeug's server lends its socket to its thread. The
# view keeps the bytes that came behind the handshake and reads the socket
# itself from then on.
#
# Receiving. A new ``Connection`` makes the socket non-blocking and watches it
# from the event loop of the thread that serves it: ``_on_readable`` feeds
# what arrives to the protocol core (``_Protocol``), which answers pings, and
# queues messages in the inbox. While the connection is open and the view
# waits, the event loop queues the connection with its thread's ``_Runner``,
# whose worker greenlets run the handlers in the view's context (request,
# session, g, ``ws``), one message at a time per connection, many connections
# per greenlet switch. The view's greenlet (``WebSockets._run``) runs
# ``on_open``, then the handlers of what waits when it is done, and of what is
# left once the connection closes (FINISHING, or dropped), and ends it. It
# takes no message while a worker runs one of the connection's handlers.
# When 16 messages wait, or a limit's worth of bytes,
# reading pauses until the handlers catch up: TCP pushes back on the client,
# and memory stays bounded.
# Keepalive (``_Keepalive``) and the close timeout are timers in the same loop.
#
# Sending. The protocol core frames every message: ``_Protocol.encode`` one of
# this connection's own, ``_Protocol.prepared`` a ``_Prepared`` message that a
# broadcast framed once for many. The frame goes to the socket at once; what
# the socket does not take waits in the connection's ``_SendBuffer``, bounded
# by WEBSOCKETS_MAX_SEND_BUFFER. Other threads hand their sends and closes to
# the connection's event loop.
#
# Closing. The connection's life cycle is one ``_Life`` state, and only
# ``Connection._become`` changes it:
#
#   state      what is true                              next       when
#   ---------  ----------------------------------------  ---------  ----------------------------------------------
#   OPEN       messages flow both ways                   CLOSING    close(), or a protocol error: our close frame
#                                                                   is out
#                                                        FINISHING  the peer's close frame or a protocol error came
#                                                                   behind messages the handlers have not taken
#                                                        CLOSED     the peer's close frame, answered at once; the
#                                                                   connection lost
#   FINISHING  the handlers finish the messages that     CLOSING    they are done, or close(): the held close frame
#              came first; our close frame waits                    of a protocol error goes out
#                                                        CLOSED     the same, the held frame answering the peer's
#   CLOSING    our close frame is out; what comes is     CLOSED     the peer's close frame, the close timeout, the
#              skipped until the peer's                             connection lost
#                                                        ENDED      the server stops: no time to wait for the peer
#   CLOSED     no frame goes either way; what is         ENDED      the view's cleanup, once the handlers are done
#              buffered still drains                                and the buffer is empty (or at the close timeout,
#                                                                   or the send timeout: the client reads nothing)
#   ENDED      released: no event loop, watcher, timer   -
#              or buffer; threads no longer reach it
#
# Once ENDED, the connection leaves the endpoint's connections and rooms,
# ``on_close`` runs once, and the view returns to the server, which closes the
# socket. The public methods, called from any thread:
#
#               OPEN, FINISHING              CLOSING, CLOSED, ENDED
#   send        sends (may wait for room)    raises ConnectionClosed
#   close       starts the closing handshake does nothing
#   join        enters the room              raises ConnectionClosed
#   leave       leaves the room              leaves it (it leaves them all as it ends)
#   closed      False                        True


class ConnectionClosed(Exception):
    """Raised when sending on a connection that is closed or closing, or joining a room with it.

    Inside a handler it needs no handling: a reply to a connection that has
    gone is dropped quietly.
    """


class Connection:
    """One websocket connection: the object behind :data:`ws`.

    Attributes:
        request: the handshake's request (``request.args``, ``.headers``,
            ``.cookies``, ``.remote_addr``, ``.view_args``), also outside
            the connection's own context, as in ``sockets.connections``.
        session: the session as it was at the handshake, as a dict.
        state: a dict for the app's own data about this connection.
        environ: the WSGI environ of the handshake request.
        path: the request path of the handshake, like ``request.path``.
        origin: the ``Origin`` header of the handshake, or ``None``.
        subprotocol: the subprotocol agreed in the handshake, or ``None``
            (see ``WebSockets(subprotocols=...)``).
        compression: the permessage-deflate parameters agreed in the
            handshake, as the server's answer said them
            (``"permessage-deflate; client_max_window_bits=12"``), or
            ``None`` when messages are not compressed.
        closed: ``True`` once a close frame was sent or received, or the
            connection was lost. Sending then raises :class:`ConnectionClosed`.
        close_code: the close code the connection ended with: the peer's (1005
            if its close frame had none), yours, or 1006 if it was lost.
        close_reason: the reason that came with ``close_code``.
        buffered_amount: bytes accepted by ``send`` but not yet taken by the
            network, like the browser's ``WebSocket.bufferedAmount``.
        rooms: the rooms it is in, as a frozenset (see :meth:`join`); once
            it is closed, those it was in then.

    Every method may be called from any thread, in any state: on a closed
    connection ``send`` and ``join`` raise :class:`ConnectionClosed`, and
    ``close`` and ``leave`` do nothing.
    """

    __slots__ = (
        "request", "session", "environ", "path", "origin", "subprotocol", "_state", "_sockets", "_rooms",
        "_life", "_proto", "_sock", "_settings", "_clock", "_now", "_hub", "_loop", "_thread", "_timeout",
        "_tls_pending", "_reader", "_reading", "_resumer", "_inbox", "_inbox_size", "_inbox_bytes", "_waiter", "_held",
        "_runner", "_turn", "_worker", "_context", "_error",
        "_io", "_buffer", "_corked", "_corked_size", "_keepalive", "_close_timer", "_user_id", "_received",
        "_received_bytes", "_sent", "_sent_bytes", "_rate_limited", "_tokens", "_tokens_at", "_rate_timer",
    )  # fmt: skip

    def __init__(
        self,
        environ: dict,
        sock: Any,
        pending: bytes = b"",
        *,
        sockets: WebSockets | None = None,
        subprotocol: str | None = None,
        deflate: _Deflate | None = None,
        settings: _Settings | None = None,
        request: Any = None,
        session: dict | None = None,
        clock: Any = None,
    ) -> None:
        """Take over the upgraded socket and begin reading; in the view's greenlet, right after the 101.

        Made without a socket (``Connection({}, None)``, in a test), it is
        ENDED from the start: every method does what it does once a
        connection has ended.
        """
        self.request = request
        self.session = {} if session is None else session
        self.environ = environ
        self.path: str = environ.get("PATH_INFO") or "/"
        self.origin: str | None = environ.get("HTTP_ORIGIN")
        self.subprotocol = subprotocol
        self._state: dict | None = None  # made on first use: most connections never need one
        self._sockets = sockets  # its endpoint, which keeps the rooms' members
        self._rooms: set[str] | None = None
        self._user_id: str | None = None
        self._settings = settings or _DEFAULT_SETTINGS
        self._proto = _Protocol(max_size=self._settings.max_message_size, deflate=deflate)
        self._sock = sock  # the upgraded TCP (or TLS) socket
        self._io = sock  # what reads and writes it without blocking (see _raw_socket)
        self._clock = clock  # timers: None for the event loop's, or a fake clock in tests
        self._now: Callable[[], float] = time.monotonic if clock is None else clock.now
        # Messages received, waiting for the handlers. A deque: a list would allocate and free its
        # storage for each message as it goes from empty to one message and back.
        self._inbox: collections.deque[Message] = collections.deque()
        self._inbox_size = 0
        self._inbox_bytes = self._settings.max_message_size or 1 << 20  # may wait for them before reading pauses
        self._waiter: Any = None  # the greenlet waiting in _wait()
        # Who runs the handlers while the view waits: a worker of the thread's _Runner (see _pump).
        self._turn = _IDLE  # whether the connection waits for a worker, or one runs its handler
        self._worker: Any = None  # the worker greenlet that runs one of its handlers (RUNNING)
        self._context: Context | None = None  # the view's context, in which workers run its handlers
        self._error: BaseException | None = None  # an error that propagated out of a worker's handler
        # FINISHING: the close frame that answers the peer's close frame or its protocol
        # error, held until the handlers are done with the messages that came before it.
        self._held = b""
        self._buffer: _SendBuffer | None = None  # made at the first write the socket does not take whole
        # Broadcast frames of this turn of the event loop, sent together at its end (see _cork).
        self._corked: list[bytes] | None = None
        self._corked_size = 0
        self._close_timer: Any = None
        self._reading = False
        self._resumer: Any = None  # a zero-delay timer, made when reading first pauses
        self._keepalive = _Keepalive(self._now())
        # What it received and sent, in messages and bytes (frames, as on the wire): for stats().
        self._received = self._received_bytes = self._sent = self._sent_bytes = self._rate_limited = 0
        # WEBSOCKETS_RATE_LIMIT's token bucket: messages it may receive now, and when that was reckoned.
        self._tokens = float(self._settings.rate_limit[1]) if self._settings.rate_limit else 0.0
        self._tokens_at = self._now()
        self._rate_timer: Any = None  # to read on once a token is there again
        if sock is None:
            self._life, self._hub, self._loop, self._thread, self._reader = _ENDED, None, None, None, None
            self._runner: _Runner = None  # type: ignore[assignment]  # (never queued)
            return
        self._life = _OPEN
        # The event loop of the thread that serves the connection, where all its I/O happens.
        self._hub = gevent.get_hub()
        self._loop = self._hub.loop
        self._runner = _Runner.of(self._hub)
        self._thread: int | None = _get_ident()
        self._timeout = sock.gettimeout()  # the socket's own, given back at the end
        sock.settimeout(0.0)
        self._io = _raw_socket(sock)
        # A TLS socket's bytes decrypted but not read (a plain gevent socket would look it up in vain, slowly).
        self._tls_pending = getattr(sock, "pending", None) if self._io is sock else None
        self._reader = _read_watcher(sock, self._loop)
        self._keepalive.start(self)
        if pending:
            self._received_bytes += len(pending)
            self._proto.receive_data(pending)
        self._pump()  # parses what came with the handshake, and starts the reader

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} from {self.environ.get('REMOTE_ADDR')} {self._life.value}>"

    @property
    def state(self) -> dict:
        """A dict for the app's own data about this connection.

        Set in a handler, read by whoever picks connections::

            @sockets.on_message("^JOIN (.*)")
            def join(message):
                ws.state["room"] = message[5:]

            sockets.broadcast("hi", to=lambda c: c.state.get("room") == "kitchen")
        """
        if self._state is None:
            self._state = {}
        return self._state

    # Handlers see the connection as it was when their message arrived: open
    # while FINISHING, the peer's close frame held behind their messages.

    @property
    def closed(self) -> bool:
        life = self._life
        return life is not _OPEN and life is not _FINISHING

    @property
    def close_code(self) -> int | None:
        return None if self._life is _FINISHING else self._proto.close_code

    @property
    def close_reason(self) -> str:
        return "" if self._life is _FINISHING else self._proto.close_reason

    @property
    def buffered_amount(self) -> int:
        return self._corked_size + (0 if self._buffer is None else self._buffer.size)

    @property
    def compression(self) -> str | None:
        return None if self._proto.deflate is None else self._proto.deflate.header

    @property
    def rooms(self) -> frozenset[str]:
        return frozenset(self._rooms or ())

    def join(self, room: str) -> None:
        """Enter a room: ``sockets.broadcast(message, room=room)`` reaches it.

        A room is a name, made when its first member joins. A connection may be
        in any number of rooms, and leaves them all as it ends, before its
        ``on_close``; joining a room once it is closed raises
        :class:`ConnectionClosed`. With a message
        queue, a room spans every process that serves the endpoint::

            @sockets.on_message("^JOIN (.+)")
            def join(message):
                ws.join(message[5:])
                sockets.broadcast(f"{session['user']} is here", room=message[5:])
        """
        if not isinstance(room, str) or not room:
            raise TypeError(f"a room is a non-empty str, not {room!r}")
        if self._sockets is None:  # made by hand: ended from the start
            raise ConnectionClosed(f"{self!r} is closed: it may not join {room!r}")
        self._sockets._join(self, room)

    def leave(self, room: str) -> None:
        """Leave a room; leaving a room it is not in does nothing."""
        if self._sockets is not None:
            self._sockets._leave(self, room)

    @property
    def user_id(self) -> str | None:
        """The user this connection belongs to (see :meth:`identify`), or ``None``."""
        return self._user_id

    def identify(self, user_id: str) -> None:
        """Tie this connection to a user: ``broadcast(user=...)``, ``disconnect(user=...)`` and ``presence()`` know it.

        From ``on_open`` or any handler, with the id your app knows the user
        by, a non-empty ``str`` of at most 1 KiB; identifying again replaces
        it. A user may have any number of connections (tabs, devices), on any
        process. Once the connection is closed it raises
        :class:`ConnectionClosed`::

            @sockets.on_open
            def who():
                if "user_id" in session:
                    ws.identify(str(session["user_id"]))  # or flask_login.current_user.get_id()
        """
        _check_user(user_id, "identify()")
        if self._sockets is None:  # made by hand: ended from the start
            raise ConnectionClosed(f"{self!r} is closed: it may not identify as {user_id!r}")
        self._sockets._identify(self, user_id)

    def send(self, message: Reply, compress: bool = True) -> None:
        """Send a message, converted as a handler's return value is.

        ``str`` goes as text, ``bytes``/``bytearray``/``memoryview`` as binary,
        a Flask response as its body; ``None`` sends nothing. Other types raise
        ``TypeError``. On a closed connection it raises
        :class:`ConnectionClosed`::

            ws.send("step 1 of 3 done")
            ws.send(jsonify(progress=0.33))

        It returns once the message is handed to the network, or queued: if the
        client reads slowly and ``WEBSOCKETS_MAX_SEND_BUFFER`` bytes already
        wait, it waits for room. A client that takes nothing for
        ``WEBSOCKETS_SEND_TIMEOUT`` seconds is closed as too slow, and the
        waiting ``send`` raises :class:`ConnectionClosed`. It may be called from
        any greenlet, and from other threads (it then waits for the
        connection's own thread to send it).

        With compression agreed (``WEBSOCKETS_COMPRESSION``), a message of
        ``WEBSOCKETS_COMPRESSION_MIN_SIZE`` bytes or more is compressed.
        ``compress=False`` sends it as it is: do so for a message that
        carries a secret next to text an attacker chose, which compression
        would let them guess from its size (see Compression in the documentation)::

            ws.send(json.dumps({"csrf": token, "echo": message}), compress=False)
        """
        self._send_reply(message, "ws.send()", compress)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with a status code and a reason.

        It returns at once: the close frame goes out after what is already
        queued. The connection ends when the client answers with its own close
        frame, or after ``WEBSOCKETS_CLOSE_TIMEOUT`` seconds (default 5).
        Messages that arrive meanwhile are discarded. Closing a closed
        connection does nothing, from any thread. ``code`` must be one a
        server may send (1000-1003, 1007-1014, 3000-4999) and the UTF-8
        ``reason`` at most 123 bytes, or ``ValueError`` is raised::

            @sockets.on_message("^QUIT")
            def quit(message):
                ws.close(1000, "bye")
        """
        _check_close(code, reason)
        if _get_ident() == self._thread:
            self._close(code, reason)
        else:
            self._hand_to_loop(self._close, code, reason)  # nothing to do once it has ended

    # -- internals: the life cycle (see the table at the head of this section) ----

    def _become(self, life: _Life) -> None:
        """Move the life cycle on, and do what entering ``life`` takes."""
        if life is _ENDED:
            with _handoff_lock:  # no thread hands anything to the event loop after this
                self._life = life
            self._release()
            return
        self._life = life
        if self._buffer is not None:  # a pong still parked would follow the close frame: none is owed now
            self._buffer.pong = None
        if life is _CLOSING:
            self._arm_close_timer()
            self._wake_senders()
        elif life is _CLOSED:
            self._stop_reading()
            self._stop_timers()
            self._wake_senders()
            self._uncork()  # now, not at the turn's end: what is left to send decides when the socket goes
            if self._waiter is not None and self._turn is not _RUNNING:  # later: not inside this callback
                self._wake(at_once=False)
            elif not self.buffered_amount:
                self._let_go()

    def _follow_protocol(self) -> None:
        """The protocol core closed or failed: follow it, unless its close frame is held (FINISHING)."""
        state, life = self._proto.state, self._life
        if state is _P_CLOSED and (life is _OPEN or life is _CLOSING):
            self._become(_CLOSED)
        elif state is _P_CLOSING and life is _OPEN:  # a protocol error: our close frame is out
            self._become(_CLOSING)

    def _hand_to_loop(self, function: Callable[..., Any], *args: Any) -> bool:
        """From another thread: run ``function(*args)`` in the connection's event loop; False once it has ended."""
        with _handoff_lock:
            if self._life is _ENDED:  # its loop may be gone with its thread (Werkzeug's)
                return False
            self._loop.run_callback_threadsafe(function, *args)
            return True

    # -- internals: receiving --------------------------------------------------

    def _on_readable(self) -> None:  # in the event loop: must never block
        try:
            data = self._io.recv(65536)
        except _WOULD_BLOCK:
            return
        except OSError:
            data = b""
        if data:
            self._keepalive.heard_at = self._now()
            self._received_bytes += len(data)
            self._proto.receive_data(data)
        else:
            self._proto.receive_eof()
        self._pump()
        if self._tls_pending is not None and self._reading and self._tls_pending():
            self._loop.run_callback(self._read_pending)  # decrypted bytes the socket no longer signals

    def _read_pending(self) -> None:  # in the event loop
        if self._reading:  # not paused, nor ended, meanwhile
            self._on_readable()

    def _pump(self) -> None:
        """Turn received bytes into messages in the inbox, up to its bound (and the rate limit's)."""
        proto, inbox, inbox_bytes = self._proto, self._inbox, self._inbox_bytes
        rate, limited = self._settings.rate_limit, False
        while len(inbox) < _INBOX_MESSAGES and self._inbox_size < inbox_bytes:
            if rate is not None and self._life is _OPEN and not self._may_receive(rate) and proto.data_waiting():
                limited = True  # pings and close frames go on: only messages wait for a token
                break
            event = proto.next_event()
            if event is None:
                break
            kind, data = event
            if kind == _OP_TEXT or kind == _OP_BINARY:
                inbox.append(data)
                self._inbox_size += len(data)
                self._received += 1
                if rate is not None:
                    self._tokens -= 1.0
            elif kind == _OP_PING:
                self._pong(proto.data_to_send())
            elif kind == _OP_CLOSE or kind == _FAILED:
                if kind == _FAILED:
                    _log_summarised(logging.INFO, f"closed with {data[0]}", "closing %r with %d: %s", self, *data)
                if inbox and self._life is _OPEN:  # replies to the messages before it go first
                    self._become(_FINISHING)
        output = proto.data_to_send()  # close frames: now, or once the handlers are done
        if self._life is _FINISHING:
            self._held += output
        else:
            if output:
                self._write(output)
            if proto.state is not _P_OPEN:
                self._follow_protocol()
        if proto.state is _P_CLOSED:
            self._stop_reading()
        elif len(inbox) >= _INBOX_MESSAGES or self._inbox_size >= inbox_bytes:
            self._stop_reading()  # the handlers lag behind: TCP pushes back on the client
        elif limited:
            self._pause_for_rate(rate)  # type: ignore[arg-type]
        elif not self._reading:
            self._reading = True
            self._reader.start(self._on_readable)
        if self._waiter is not None and inbox:  # the view waits for messages, or for the end
            if self._life is _OPEN:
                if self._turn is _IDLE:  # a worker runs the handlers (a busy one sees these messages)
                    self._turn = _QUEUED
                    self._runner.add(self)
            elif self._turn is not _RUNNING:
                self._wake()  # the view finishes them itself (FINISHING), or skips them (CLOSING)

    def _may_receive(self, rate: tuple[float, float]) -> bool:
        """Whether the rate limit lets one more message in (each message takes a token as it comes)."""
        per_second, burst = rate
        now = self._now()
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * per_second)
        self._tokens_at = now
        return self._tokens > 0.999_999  # not 1.0: the timer that waited for a token may wake a rounding early

    def _pause_for_rate(self, rate: tuple[float, float]) -> None:
        """Over the rate limit: stop reading until a token is there; TCP pushes back on this client alone."""
        self._stop_reading()
        if self._rate_timer is None:
            self._rate_limited += 1
            self._rate_timer = self._call_later((1.0 - self._tokens) / rate[0], self._read_on)

    def _read_on(self) -> None:  # a timer: the rate limit lets a message in again
        self._rate_timer = None
        self._resume_reading()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._reader.stop()

    def _resume_soon(self) -> None:
        """Read on after the other connections had their turn.

        A zero-delay timer runs with the I/O events of the loop's next turn;
        a callback would run before them, so a flooding client could take
        several turns in a row.
        """
        if self._resumer is None:
            self._resumer = self._loop.timer(0.0)
        if not self._resumer.active:
            self._resumer.start(self._resume_reading)

    def _resume_reading(self) -> None:  # in the event loop
        life = self._life
        if (life is _OPEN or life is _CLOSING) and not self._reading:
            self._pump()

    def _next_message(self) -> Message | None:
        """The next message for the view's greenlet, in order; ``None`` once the connection is closed.

        While it waits in here and the connection is open, workers take the
        messages instead (``_handle_next``). It takes none while a worker runs
        one of the handlers: one message at a time, in order.
        """
        while True:
            if self._turn is not _RUNNING:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                if self._inbox:
                    return self._take()
                life = self._life
                if life is _FINISHING:
                    self._release_held()
                    continue
                if life is _CLOSED:
                    return None
            self._wait()

    def _take(self) -> Message:
        """The first message of the inbox, taken out of it."""
        inbox = self._inbox
        message = inbox.popleft()
        self._inbox_size -= len(message)
        if not inbox and not self._reading and self._life is _OPEN:
            self._resume_soon()  # reading stopped at the inbox's bound
        return message

    def _handle_next(self, worker: Any) -> None:
        """Run the handlers for the next message, in the view's context; in a worker of the ``_Runner``.

        Workers take messages only while the connection is open and the view
        waits in ``_next_message``: not before ``on_open`` is done, nor once the
        connection closes, when the view takes the rest (FINISHING) and ends it.
        """
        self._turn = _IDLE
        if self._waiter is not None and self._life is _OPEN and self._inbox:
            self._turn, self._worker = _RUNNING, worker
            worker.gr_context = self._context  # as Context.run would, without nesting the interpreter in C
            try:
                self._sockets._dispatch(self, self._take())  # type: ignore[union-attr]
            except BaseException as error:  # it propagated (PROPAGATE_EXCEPTIONS), SystemExit...: the view raises it
                if self._life is _OPEN or not isinstance(error, gevent.GreenletExit):  # (not _interrupt's: closed)
                    self._error = error
                    self._close(1011, "internal error")
            self._turn, self._worker = _IDLE, None
        if self._waiter is None:  # the view runs, or is about to: it sees to the rest
            return
        if self._life is not _OPEN:
            self._wake(at_once=False)  # the view ends the connection, or takes the rest (FINISHING)
        elif self._inbox:
            self._turn = _QUEUED  # behind the others that wait: one message each in turn
            self._runner.again(self)

    def _release_held(self) -> None:
        """Send the close frame held behind the messages the handlers were on: FINISHING is over."""
        data, self._held = self._held, b""
        if data:
            self._write(data)
        if self._life is _FINISHING:  # not dropped meanwhile
            self._become(_CLOSING if self._proto.state is _P_CLOSING else _CLOSED)
        if self._life is _CLOSING and not self._reading:
            self._resume_soon()  # to read the peer's close frame

    def _wait(self) -> None:
        """Let the event loop run until :meth:`_wake`."""
        self._waiter = gevent.getcurrent()
        try:
            self._hub.switch()
        finally:
            self._waiter = None

    def _wake(self, at_once: bool = True) -> None:
        """Wake the view's greenlet from ``_wait``: at once, or from a callback of the event loop.

        At once only from the event loop, which alone may switch to a waiting
        greenlet: its callers are the loop's watchers and timers (``_pump``,
        the send buffer's writer), and they ask no greenlet which one is running.
        The callback wakes the view only if it still waits in ``_wait``: woken
        otherwise meanwhile (a server's kill), it may be waiting on something
        else by then, in an ``on_close`` hook say.
        """
        if at_once:
            waiter, self._waiter = self._waiter, None
            waiter.switch()
        else:
            self._loop.run_callback(_wake_if_waiting, self, self._waiter)

    # -- internals: sending ----------------------------------------------------

    def _send_reply(self, reply: Reply, who: str | Callable[..., Any], compress: bool = True) -> None:
        """Send a handler's reply or what ``send`` was given, converted (see ``_payload``)."""
        if type(reply) is str:  # the common cases, without the detour
            self._send_data(_OP_TEXT, reply.encode("utf-8"), compress)
        elif type(reply) is bytes:
            self._send_data(_OP_BINARY, reply, compress)
        elif reply is not None:
            content = _payload(reply, who)
            if content is not None:
                self._send_data(*content, compress)

    def _send_data(self, opcode: int, payload: bytes, compress: bool = True) -> None:
        """Send a message of this connection's own, waiting for room in the send buffer."""
        if _get_ident() != self._thread:
            self._send_from_thread(self._send_data, opcode, payload, compress)
            return
        deflate = self._proto.deflate
        if (
            deflate is not None and compress and len(payload) > _COMPRESS_PIECE and len(payload) >= deflate.min_size
            and gevent.getcurrent() is not self._hub and not self.closed
        ):  # fmt: skip
            # Long: compressed on its own, in pieces between which other greenlets run (and other
            # messages may go out), then sent as a broadcast's message would be.
            message = _Prepared(opcode, payload)
            message.deflated(deflate.send_bits, _pause())
            self._send_prepared((message,), wait=True)
        elif (self._buffer is None and self._life is _OPEN) or self._make_room(len(payload), wait=True):
            self._sent += 1  # (no buffer yet: the socket has taken everything so far, there is room)
            if len(payload) < _LARGE or self._tls_pending is not None:
                self._write(self._proto.encode(opcode, payload, compress))
            else:
                self._write(*self._proto.encode_parts(opcode, payload, compress))

    def _send_prepared(self, messages: Sequence[_Prepared], wait: bool = False) -> bool:
        """Send messages prepared for many connections, in one write; whether they were taken.

        The one way the endpoint and the message queue send. Without ``wait``
        it never waits: a client whose send buffer is full is closed as too
        slow, and from another thread the messages are handed to the
        connection's event loop.
        """
        if _get_ident() != self._thread:
            if wait:
                return self._send_from_thread(self._send_prepared, messages, True)
            if self.closed or not self._hand_to_loop(self._offer, messages):
                raise ConnectionClosed(f"{self!r} is closed ({self.close_code})")
            return True
        size = len(messages[0].payload) if len(messages) == 1 else sum(len(m.payload) for m in messages)
        if not self._make_room(size, wait):
            return False
        prepared = self._proto.prepared
        self._sent += len(messages)
        self._cork(prepared(messages[0]) if len(messages) == 1 else b"".join([prepared(m) for m in messages]))
        return True

    def _cork(self, data: bytes) -> None:
        """Send a broadcast's frames at the end of this turn of the event loop, with the others of the turn.

        A burst of broadcasts (a handler that sends a hundred updates, the
        message queue's batches) then costs each client one system call, not
        one per message. Any other write sends what is corked first, so
        frames keep their order. A frame of ``_LARGE`` bytes or more is not
        corked: joined with others it would become a copy per client, where
        the send buffers share it.
        """
        corked = self._corked
        if len(data) >= _LARGE:
            self._write(data)
        elif corked is None:
            self._corked, self._corked_size = [data], len(data)
            _uncork_later(self)
        else:
            corked.append(data)
            self._corked_size += len(data)
            if self._corked_size >= _LARGE:
                self._uncork()

    def _uncork(self) -> None:
        corked = self._corked
        if corked is not None:
            self._corked, self._corked_size = None, 0
            self._write(corked[0] if len(corked) == 1 else b"".join(corked))

    def _offer(self, messages: Sequence[_Prepared]) -> None:  # a broadcast from another thread, in the loop
        try:
            self._send_prepared(messages)
        except ConnectionClosed:
            pass

    def _make_room(self, size: int, wait: bool) -> bool:
        """Whether ``size`` more bytes fit the send buffer of this open connection.

        When they do not, ``wait`` waits for room (in a greenlet); otherwise,
        or in the event loop, the client is closed as too slow. A message
        counts as its payload's size.
        """
        life = self._life
        if life is not _OPEN and life is not _FINISHING:
            raise ConnectionClosed(f"{self!r} is closed ({self.close_code})")
        buffer = self._buffer
        if buffer is not None and buffer.size and buffer.size + size > self._settings.max_send_buffer:
            if not wait or gevent.getcurrent() is self._hub:
                self._too_slow()
                return False
            buffer.wait_for_room(size)
        return True

    def _write(self, data: bytes, tail: bytes = b"") -> None:
        """Send ``data``, then ``tail``, after what is buffered, without ever blocking.

        ``tail`` is a large frame's payload (``encode_parts``): header and
        payload go in one ``sendmsg`` without being joined, a 64 KiB message
        copied once less. (Plain TCP only: a TLS socket has no ``sendmsg``.)
        """
        if self._corked is not None:
            self._uncork()
        size = len(data) + len(tail)
        self._sent_bytes += size
        buffer = self._buffer
        if buffer is not None and buffer.size:  # after what waits (the watcher drains it)
            buffer.chunks.append(data)
            if tail:
                buffer.chunks.append(tail)
            buffer.size += size
            return
        try:
            sent = self._io.sendmsg((data, tail)) if tail else self._io.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError:
            self._drop()
            return
        if sent < size:  # the socket's buffer is full: the rest waits, written when it has room
            if buffer is None:
                buffer = self._buffer = _SendBuffer(self)
            for part in (data, tail):
                if sent < len(part):
                    buffer.append(memoryview(part)[sent:])
                sent = max(0, sent - len(part))

    def _pong(self, frame: bytes) -> None:
        """Answer a ping: at once, or after what the socket has not taken yet.

        Only the latest ping waiting for its pong is answered (RFC 6455
        5.5.3): a client that floods pings and reads nothing costs one pong.
        """
        buffer = self._buffer
        if buffer is not None and buffer.size:
            buffer.pong = frame
        else:
            self._write(frame)

    def _send_from_thread(self, send: Callable[..., Any], *args: Any) -> bool:
        """Call ``send(*args)`` from another thread, in a greenlet of the connection's own loop; wait for it."""
        if self.closed:
            raise ConnectionClosed(f"{self!r} is closed ({self.close_code})")
        done, outcome = _Waker(), []  # type: tuple[_Waker, list[Any]]

        def run() -> None:
            try:
                outcome.append(send(*args))
            except BaseException as error:  # raised again in the sending thread
                outcome.append(error)
            finally:
                done.wake()

        try:
            if not self._hand_to_loop(gevent.spawn, run):
                raise ConnectionClosed(f"{self!r} is closed ({self.close_code})")
            while not done.wait(0.05):
                if self._life is _ENDED:  # it ended before its loop ran the send
                    raise ConnectionClosed(f"{self!r} is closed ({self.close_code})")
        finally:
            done.close()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return True

    def _too_slow(self) -> None:
        """Close a connection whose client does not read: its buffered messages are dropped."""
        if self._life is not _OPEN:
            return
        wait = self.buffered_amount
        _log_summarised(logging.INFO, "clients too slow", "closing %r: too slow (%d bytes wait to be sent)", self, wait)
        if self._sockets is not None:
            self._sockets._count("slow_clients_closed")
        if self._buffer is not None:
            self._buffer.trim()
        self._close(1008, "client too slow")

    def _wake_senders(self) -> None:
        if self._buffer is not None:
            self._buffer.wake_senders()

    # What the endpoint and the message queue may ask of a connection.

    def _window(self) -> tuple[int, int] | None:
        """The window and size threshold of the messages it sends compressed, or ``None``."""
        deflate = self._proto.deflate
        return None if deflate is None else (deflate.send_bits, deflate.min_size)

    def _backlogged(self) -> bool:
        """Whether over half its send buffer is taken: the message queue waits for it to drain."""
        return self.buffered_amount > self._settings.max_send_buffer // 2

    # -- internals: closing ----------------------------------------------------

    def _close(self, code: int, reason: str) -> None:
        """Send a close frame; never blocks. Messages not yet handled are dropped."""
        if self._life is _FINISHING:  # the peer closed (or failed) already: answer it now
            self._inbox.clear()
            self._inbox_size = 0
            self._release_held()
            return
        if self._life is not _OPEN:
            return
        self._proto.send_close(code, reason)
        self._inbox.clear()
        self._inbox_size = 0
        self._become(_CLOSING)
        self._write(self._proto.data_to_send())
        if self._life is _CLOSING and not self._reading:
            self._resume_soon()  # to read the client's close frame

    def _arm_close_timer(self) -> None:
        if self._settings.close_timeout is not None and self._close_timer is None:
            self._close_timer = self._call_later(self._settings.close_timeout, self._on_close_timeout)

    def _on_close_timeout(self) -> None:  # a timer
        self._close_timer = None
        if self._life is not _CLOSING:
            return
        if self._proto.close_now():  # an oversized message that does not end
            self._write(self._proto.data_to_send())
            self._arm_close_timer()  # now for the client's close frame
            return
        _log_summarised(logging.INFO, "no close frame", "dropping %r: no close frame from the client", self)
        self._drop()

    def _drop(self) -> None:
        """Drop the TCP connection: the peer is gone, or took too long."""
        if self._life is _ENDED or (self._life is _CLOSED and not self.buffered_amount):
            return
        self._proto.abort()
        self._held = b""
        self._corked, self._corked_size = None, 0
        if self._buffer is not None:
            self._buffer.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._become(_CLOSED)

    def _end(self, wait: bool) -> None:
        """Release everything, once the handlers are done; in the view's greenlet.

        With ``wait``, give the closing handshake and the last frames up to the
        close timeout to complete.
        """
        if self._life is _OPEN:
            self._close(1011, "internal error")  # a handler error propagated
        try:
            while self._turn is _RUNNING:  # only when the view stopped on an error: it stops the handler too
                self._loop.run_callback(_interrupt, self, self._worker)  # type: ignore[union-attr]
                self._wait()  # woken when the handler is over
            if wait:
                while self._next_message() is not None:  # until CLOSED: the peer's close frame, or the timeout
                    pass
                self._uncork()  # now: the buffer's watcher wakes this greenlet, a callback would not
                if self.buffered_amount:
                    with gevent.Timeout(self._settings.close_timeout, False):
                        while self.buffered_amount and self._life is _CLOSED:
                            self._wait()  # woken when the buffer empties, or the client is dropped
        finally:
            self._become(_ENDED)

    def _release(self) -> None:
        """ENDED: give back the watchers, the timers and the buffer; the socket its timeout."""
        self._stop_reading()
        self._stop_timers()
        if self._reader is not getattr(self._sock, "_read_event", None):  # gevent's own stays the socket's
            self._reader.close()
        if self._resumer is not None:
            self._resumer.close()
        if self._buffer is not None:
            self._buffer.close()
        self._inbox.clear()
        self._context = None  # (it holds the connection: no cycle left for the garbage collector)
        self._corked, self._corked_size = None, 0
        _forget_corked(self)  # its loop may never run again (a Werkzeug thread's): keep no reference
        self._reader = self._resumer = self._buffer = None  # type: ignore[assignment]
        try:
            self._sock.settimeout(self._timeout)  # the server may still use it
        except OSError:
            pass

    def _let_go(self) -> None:
        """CLOSED while a handler still runs: close the socket now, not when the handler returns.

        Nothing more goes either way, and a handler that never returns must not
        keep a file descriptor per departed client. (``on_close`` still waits
        for the handler; a server's later close of the socket does nothing.)
        """
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the FIN goes now, even where the fd outlives close()
        except OSError:
            pass
        try:
            self._sock.close()  # under Werkzeug its reader keeps the fd until the thread ends
        except OSError:
            pass

    def _linger(self) -> None:
        """Close our side of TCP, then read until the client closes its own; after ``_end``.

        A client may still be sending when the connection ends without its
        close frame (a browser in the middle of a large message, when the
        close timeout ran out). Closing a socket with unread data makes the
        kernel reset the connection, and the client would see an unclean
        close: so the server reads on, and discards, up to the close timeout.
        A client whose close frame came sends nothing more: the kernel sees
        its side of TCP close.
        """
        try:
            self._sock.shutdown(socket.SHUT_WR)
            if self._proto.peer_closed and self._io is not self._sock:  # the C socket: no timer needed
                try:
                    if not self._io.recv(65536):
                        return
                except _WOULD_BLOCK:
                    return  # nothing unread: no reset
                # bytes after its close frame: read on
            deadline = time.monotonic() + (self._settings.close_timeout or 5.0)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._sock.settimeout(left)
                if not self._sock.recv(65536):
                    return
        except OSError:  # reset, or timed out
            pass

    # -- internals: timers -----------------------------------------------------

    def _call_later(self, seconds: float, function: Callable[..., Any], *args: Any) -> Any:
        """A timer in the connection's event loop (a callback, not a greenlet), or on the test's fake clock."""
        if self._clock is not None:
            return self._clock.call_later(seconds, function, *args)
        timer = self._loop.timer(seconds)
        timer.start(function, *args)
        return timer

    def _stop_timers(self) -> None:
        self._keepalive.stop()
        if self._rate_timer is not None:
            self._rate_timer.close()
            self._rate_timer = None
        if self._close_timer is not None:
            self._close_timer.close()
            self._close_timer = None


def _raw_socket(sock: Any) -> Any:
    """The C socket inside a gevent socket, which the connection reads and writes without blocking.

    Set to time out at once, gevent's socket calls the C socket's methods
    and raises what they raise: reading it directly skips a Python call per
    read and per write, 4 % of a small echo's instructions. TLS sockets, and
    others, stay as they are.
    """
    inner = getattr(sock, "_sock", None)
    if type(sock) is gevent.socket.socket and isinstance(inner, _socket.socket):
        return inner
    return sock


def _read_watcher(sock: Any, loop: Any) -> Any:
    """The event loop's watcher for the socket becoming readable.

    A gevent socket has one already, which its own blocking calls wait on
    (none are made while the connection reads it): making another would cost
    a system call (libev checks the file descriptor).
    """
    watcher = getattr(sock, "_read_event", None)
    if watcher is not None and watcher.loop is loop:
        return watcher
    return loop.io(sock.fileno(), 1)


#: Per event loop, the connections with corked frames, sent at the end of the loop's turn (``_cork``).
_to_uncork: dict[Any, dict[Connection, None]] = {}


def _uncork_later(conn: Connection) -> None:
    loop: Any = conn._loop  # open: it has one
    corked = _to_uncork.get(loop)
    if corked is None:
        corked = _to_uncork[loop] = {}
        loop.run_callback(_uncork_all, loop)
    corked[conn] = None


def _uncork_all(loop: Any) -> None:  # a callback of the event loop, once a turn
    for conn in _to_uncork.pop(loop, ()):
        conn._uncork()


def _forget_corked(conn: Connection) -> None:  # the connection has ended
    corked = _to_uncork.get(conn._loop)
    if corked is not None:
        corked.pop(conn, None)
        if not corked:
            _to_uncork.pop(conn._loop, None)


class _Life(enum.Enum):
    """Where a connection is in its life: the table at the head of this section."""

    OPEN = "open"
    FINISHING = "finishing"
    CLOSING = "closing"
    CLOSED = "closed"
    ENDED = "ended"


_OPEN, _FINISHING, _CLOSING, _CLOSED, _ENDED = _Life


class _Turn(enum.Enum):
    """Where a connection is with the workers that run its handlers (``_Runner``)."""

    IDLE = "idle"  # no worker has it: its view takes the messages, or none wait
    QUEUED = "queued"  # messages wait for a worker
    RUNNING = "running"  # a worker runs one of its handlers (the view takes none meanwhile)


_IDLE, _QUEUED, _RUNNING = _Turn


class _Runner:
    """Runs the handlers of one thread's connections in a few worker greenlets.

    A connection's view waits in ``_next_message`` while the connection is
    open. Rather than switching to that view and back for each message (two
    switches of a greenlet whose stack holds the whole WSGI call), the event
    loop queues the connection here; at the end of the loop's turn one
    worker runs the handlers of every connection queued, one message each
    in turn, in each view's context (``Connection._handle_next``). A handler
    that waits (``gevent.sleep``, a query, ``ws.send`` waiting for room) holds
    its worker and its connection's next messages, not the others': the next
    turn starts another worker. Up to ``_IDLE_WORKERS`` idle ones are kept.

    What the app sees: ``flask.request``, ``g``, ``session`` and ``ws`` are
    in a handler what they are in the view. A handler may run in a
    different greenlet from one message to the next: per-connection data
    belongs in ``ws.state`` or ``g``, not in a greenlet-local (``gevent.local``).
    """

    __slots__ = ("_hub", "_ready", "_idle", "_scheduled")

    #: Idle workers kept for the next turns (more are made while handlers wait, and end once idle).
    _IDLE_WORKERS = 8

    @staticmethod
    def of(hub: Any) -> _Runner:
        """The runner of ``hub``'s thread, made at its first connection."""
        runner = getattr(hub, "_flask_websockets_runner", None)
        if runner is None:
            runner = hub._flask_websockets_runner = _Runner(hub)
        return runner

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._ready: collections.deque[Connection] = collections.deque()  # queued, in the order they came
        self._idle: list[Any] = []  # workers that wait for the next turn
        self._scheduled = False  # whether _start runs at the end of this turn

    def add(self, conn: Connection) -> None:
        """Queue a connection whose messages wait; from the event loop."""
        self._ready.append(conn)
        if not self._scheduled:
            self._schedule()

    def again(self, conn: Connection) -> None:
        """Queue a connection again, from the worker that just ran its handler (that worker goes on)."""
        self._ready.append(conn)

    def _start(self) -> None:  # a callback of the event loop: once this turn's reads are done
        self._scheduled = False
        while self._ready:  # (a worker that waits in a handler comes back here: the next one goes on)
            (self._idle.pop() if self._idle else gevent.Greenlet(self._work)).switch()

    def _schedule(self) -> None:  # (callers check _scheduled: the check stays inline on the hot path)
        self._scheduled = True
        self._hub.loop.run_callback(self._start)

    def _work(self) -> None:
        ready, me = self._ready, gevent.getcurrent()
        try:
            while True:
                while ready:
                    if len(ready) > 1 and not self._scheduled:  # should a handler wait, another worker goes on
                        self._schedule()
                    ready.popleft()._handle_next(me)  # (no local name: an idle worker keeps no connection)
                if len(self._idle) >= self._IDLE_WORKERS:  # enough wait already
                    return
                me.gr_context = None  # (nor its context)
                self._idle.append(me)
                self._hub.switch()  # until _start
        finally:
            if me in self._idle:
                self._idle.remove(me)
            if ready and not self._scheduled:  # it stopped on an error: the others' messages go on
                self._schedule()


class _SendBuffer:
    """What a connection's socket has not taken yet, and the back-pressure it puts on senders.

    Made at the connection's first write that the socket did not take whole,
    and kept. It owns the bytes that wait (``size`` of them), the event loop's
    write watcher that drains them, the event that senders waiting for room
    wait on (room: less than ``WEBSOCKETS_MAX_SEND_BUFFER``), and the send
    timeout's timer: a client that takes nothing for
    ``WEBSOCKETS_SEND_TIMEOUT`` seconds is closed as too slow and dropped.
    """

    __slots__ = ("_conn", "chunks", "size", "pong", "_writer", "_room", "_progress_at", "_timer")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.chunks: collections.deque = collections.deque()
        self.size = 0
        self.pong: bytes | None = None  # the answer to the latest ping, sent once the rest has gone
        self._writer = conn._loop.io(conn._sock.fileno(), 2)
        self._room: Any = None  # an Event for senders waiting for room, made when one waits
        self._progress_at = 0.0  # when the socket last took something
        self._timer: Any = None

    def append(self, data: bytes | memoryview) -> None:
        if not self.chunks:  # it was empty: drain it as the socket takes more
            self._writer.start(self._on_writable)
            conn = self._conn
            self._progress_at = conn._now()
            if conn._settings.send_timeout is not None and self._timer is None:
                self._timer = conn._call_later(conn._settings.send_timeout, self._check_progress)
        self.chunks.append(data)
        self.size += len(data)

    def _on_writable(self) -> None:  # in the event loop
        chunks, sock = self.chunks, self._conn._io
        progress = False
        try:
            while chunks or self.pong:
                if not chunks:
                    chunks.append(self.pong)
                    self.size, self.pong = len(self.pong), None  # type: ignore[arg-type]
                    self._conn._sent_bytes += self.size
                head = chunks[0]
                sent = sock.send(head)
                if not sent:
                    break
                progress = True
                self.size -= sent
                if sent < len(head):
                    chunks[0] = memoryview(head)[sent:]
                    break
                chunks.popleft()
        except _WOULD_BLOCK:
            pass
        except OSError:
            self._conn._drop()
            return
        if progress:
            self._progress_at = self._conn._now()
        if not chunks:
            self._writer.stop()
            conn = self._conn
            if conn._life is _CLOSED:  # the last bytes are out
                if conn._waiter is not None and conn._turn is not _RUNNING:
                    conn._wake()  # the view's end waits for them
                else:
                    conn._let_go()
        if self._room is not None and self.size <= self._conn._settings.max_send_buffer // 2:
            self.wake_senders()

    def wait_for_room(self, size: int) -> None:
        """Wait until ``size`` more bytes fit, or it is empty; raise ConnectionClosed if it closes meanwhile."""
        conn = self._conn
        while self.size and self.size + size > conn._settings.max_send_buffer:
            if self._room is None:
                self._room = gevent.event.Event()
            self._room.wait()
            if conn.closed:
                raise ConnectionClosed(f"{conn!r} is closed ({conn.close_code})")

    def wake_senders(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def _check_progress(self) -> None:  # a timer: has the socket taken nothing for the send timeout?
        self._timer = None
        conn = self._conn
        if not self.chunks or conn._life is _ENDED:
            return
        timeout = conn._settings.send_timeout
        assert timeout is not None
        stalled = conn._now() - self._progress_at
        if stalled < timeout:
            self._timer = conn._call_later(timeout - stalled, self._check_progress)
            return
        _log_summarised(logging.INFO, "clients took nothing", "dropping %r: it took nothing for %s s", conn, timeout)
        conn._too_slow()  # a close frame, if it is still open (it will not be read)
        conn._drop()

    def trim(self) -> None:
        """Drop what waits, but the frame the socket has begun to take (the client is too slow)."""
        self.pong = None
        if len(self.chunks) > 1:
            head = self.chunks[0]
            self.chunks.clear()
            self.chunks.append(head)
            self.size = len(head)

    def clear(self) -> None:
        """Drop everything that waits (the connection is dropped)."""
        self.chunks.clear()
        self.size, self.pong = 0, None
        self._writer.stop()

    def close(self) -> None:
        """The connection has ended: release the watcher and the timer, and let waiting senders fail."""
        self.clear()
        self._writer.close()
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self.wake_senders()


class _Keepalive:
    """A connection's keepalive: it pings a silent client, and drops it when a ping goes unanswered.

    It owns the keepalive timer, when bytes last came from the client
    (``heard_at``) and when the last ping went. One timer per connection, and
    nobody waiting: when nothing has come from the client for a ping interval,
    it gets a ping; if nothing at all comes within the ping timeout after that,
    it is gone. While reading is paused because the handlers lag behind, the
    silence is ours, not the client's. (It keeps no reference to its
    connection, which its timer passes it: no cycle for the garbage collector.)
    """

    __slots__ = ("_timer", "heard_at", "_pinged_at")

    def __init__(self, now: float) -> None:
        self._timer: Any = None
        self.heard_at = self._pinged_at = now

    def start(self, conn: Connection) -> None:
        interval = conn._settings.ping_interval
        if interval:
            self._timer = conn._call_later(interval, self._check, conn, False)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _check(self, conn: Connection, pinged: bool) -> None:  # a timer
        self._timer = None
        if conn._life is not _OPEN:
            return
        interval, timeout = conn._settings.ping_interval, conn._settings.ping_timeout
        assert interval is not None
        now = conn._now()
        if not conn._reading:
            self.heard_at = now
        if pinged and self.heard_at < self._pinged_at:
            conn._on_readable()  # a loop held up by a slow handler may not have read yet
            if conn._life is not _OPEN:
                return
            if self.heard_at < self._pinged_at:  # no answer to the ping
                _log_summarised(
                    logging.INFO, "pings unanswered", "closing %r: no answer to a ping within %s s", conn, timeout
                )
                conn._close(1011, "keepalive ping timeout")
                conn._drop()  # a dead peer: the close frame goes out if it can, no waiting
                return
        silent = now - self.heard_at
        if silent < interval:
            self._timer = conn._call_later(interval - silent, self._check, conn, False)
            return
        conn._write(conn._proto.ping(b"keepalive"))  # silent for a whole interval
        self._pinged_at = now
        if timeout is None:
            self._timer = conn._call_later(interval, self._check, conn, False)
        else:
            self._timer = conn._call_later(timeout, self._check, conn, True)


class _Waker:
    """Wakes a thread waiting for another thread's event loop; its own loop, if it runs one, runs meanwhile.

    A handler under Werkzeug's server (a thread and a loop per connection)
    that sends to another thread's connection must not block its own loop:
    that other thread may be sending to this connection at the same moment.
    """

    __slots__ = ("_event", "_watcher", "_lock")

    def __init__(self) -> None:
        self._event = self._watcher = self._lock = None  # type: Any
        if _cv_socket.get(None) is not None or isinstance(gevent.getcurrent(), gevent.Greenlet):
            self._event = gevent.event.Event()
            self._watcher = gevent.get_hub().loop.async_()  # its send() is the one thread-safe way in
            self._watcher.start(self._event.set)
        else:  # a plain thread (a view's, a worker's): no loop of its own to keep running
            self._lock = _thread_lock()
            self._lock.acquire()

    def wake(self) -> None:  # from the other thread
        if self._watcher is not None:
            self._watcher.send()
        else:
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        if self._watcher is not None:
            return bool(self._event.wait(timeout))
        return bool(self._lock.acquire(timeout=timeout))

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()


def _off_the_loop(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, which blocks (on Redis), run where it cannot stall an event loop.

    In a greenlet or a handler, in a thread of gevent's pool while the loop
    runs on; in a plain thread (a view's, a script's), right there.
    """
    if _cv_socket.get(None) is not None or isinstance(gevent.getcurrent(), gevent.Greenlet):
        return gevent.get_hub().threadpool.apply(function, args)
    return function(*args)


def _pause() -> Callable[[], Any] | None:
    """What lets other greenlets run during a long computation, if any can: ``gevent.sleep``."""
    return gevent.sleep if isinstance(gevent.getcurrent(), gevent.Greenlet) else None


def _wake_if_waiting(conn: Connection, waiter: Any) -> None:  # a callback: Connection._wake, later
    if conn._waiter is waiter:  # still waiting in _wait (woken otherwise, it may wait on something else now)
        conn._waiter = None
        waiter.switch()


def _interrupt(conn: Connection, worker: Any) -> None:  # a callback: the view of conn stopped on an error
    if conn._worker is worker and not worker.dead:  # still in that handler
        worker.throw(gevent.GreenletExit)


#: At most this many messages wait for the handlers; then reading pauses.
_INBOX_MESSAGES = 16
#: A message this long or longer goes out as header and payload, not joined (``_write``), nor corked (``_cork``).
_LARGE = 16 * 1024
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# The real thread's identity and lock, even where gevent's monkey-patching made threads greenlets.
_get_ident = gevent.monkey.get_original("_thread", "get_ident")
_thread_lock = gevent.monkey.get_original("_thread", "allocate_lock")
#: Held while a thread hands work to a connection's event loop, and while a connection ends:
#: no thread reaches for a loop that its connection's end may destroy.
_handoff_lock = _thread_lock()


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


class WebSocketHandler(_GeventWebSocketHandler):
    """gevent-websocket's handler, letting the app answer each handshake.

    The recommended ``handler_class`` for gevent's ``WSGIServer``, and what
    :func:`serve` and :data:`GunicornWorker` use::

        from gevent.pywsgi import WSGIServer
        WSGIServer(("127.0.0.1", 5000), app, handler_class=flask_websockets.WebSocketHandler).serve_forever()

    gevent-websocket's own handler sends ``101 Switching Protocols`` before
    the app runs, so the app can only close a connection it does not want.
    With this one the app answers first: a path without a websocket endpoint
    gets 404, a foreign ``Origin`` 403, and a ``before_connect`` function may
    answer 401; the client then never gets a 101. The 101 carries the chosen
    subprotocol. Every websocket connection gets one access-log line with
    status 101 and its duration, and no logger's handlers are touched.

    A websocket handshake of the usual form (``GET``, HTTP/1.1, ``Name:
    value`` header lines, no body) that came whole is read at once, and its
    environ is the one pywsgi would make; pywsgi reads any other request as
    ever (its generic reading was a tenth of what a connection cost).

    It also bounds what a client may cost before the app sees its request:
    a connection that has not sent a whole request line and headers within
    ``handshake_timeout`` seconds is closed (an idle keep-alive connection
    too), and a request line and headers over ``max_handshake_size`` bytes get
    400. With ``max_connections``, a websocket handshake while that many
    websockets are open in the process gets ``503 Service Unavailable``
    (``Retry-After: 1``); plain HTTP requests are served as ever. Set them on
    a subclass, or on this class (in a gunicorn config file, say):
    ``WebSocketHandler.handshake_timeout = 20``.
    """

    #: Seconds a connection may take to send its request line and headers (``None`` for no limit).
    handshake_timeout: float | None = 10.0
    #: Bytes of request line and headers a request may have.
    max_handshake_size: int = 64 * 1024
    #: Websockets this process may serve at once (``None`` for no limit); past it, handshakes get 503.
    max_connections: int | None = None
    #: Websocket handshakes and connections under way in this process, all servers together.
    _websockets = 0

    _upgraded = False
    _deadline: Any = None
    socket: Any  # pywsgi's, set per connection (and the status of its response)
    rfile: Any
    status: Any

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        super().__init__(sock, address, server, _Reader(sock) if rfile is None else rfile)

    def handle_one_request(self) -> Any:
        try:
            handshake = self._plain_handshake(wait=False)  # usually there by now: no deadline to set
            if handshake is None and self.handshake_timeout:  # a timer that throws here, as gevent.Timeout does
                self._deadline = gevent.get_hub().loop.timer(self.handshake_timeout)
                self._deadline.start(gevent.getcurrent().throw, _SlowRequest)
            if handshake is None and type(self.rfile) is _Reader and not self.rfile._data:  # nothing came yet
                try:
                    handshake = self._plain_handshake(wait=True)
                except OSError:  # as pywsgi: a reset or a timeout before the request is nothing to answer
                    return None
            if handshake is None:
                return super().handle_one_request()
            self._cancel_deadline()
            requestline, target, pairs = handshake  # (not f(*handshake): a C frame more on every parked greenlet)
            return self._handle_handshake(requestline, target, pairs)
        except _SlowRequest:  # no request line yet: nothing to answer
            _log_summarised(
                logging.INFO,
                "connections without a request",
                "closing a connection from %s: no request in %s s",
                self.client_address,
                self.handshake_timeout,
            )
            return None
        finally:
            self._cancel_deadline()
            if self._upgraded:  # the websocket is over: close its socket now (pywsgi would read it once more)
                sock, self.socket = self.socket, None
                sock.close()

    def _plain_handshake(self, wait: bool) -> tuple[str, str, list[tuple[str, str]]] | None:
        """The request ahead, if it is a websocket handshake of the usual form and came whole; else ``None``.

        Returns its request line, its target and its headers, and takes them
        from the reader; with ``None``, pywsgi reads the request as ever.
        With nothing read yet, it reads what has come, or with ``wait``, waits
        for the first bytes.
        """
        reader = self.rfile
        if type(reader) is not _Reader or reader.closed:
            return None
        if not reader._data:
            try:
                if not reader._fill(wait):  # waiting: _SlowRequest at the deadline
                    return None
            except OSError:
                if wait:
                    raise
                return None  # pywsgi's reading meets it again, and answers it
        if not reader._data.startswith(b"GET "):  # (a plain HTTP request costs no decoding here)
            return None
        head = _HANDSHAKE.match(reader._data.decode("latin-1"))
        if head is None or head.end() > self.max_handshake_size or head.end() > _MAX_HEADER_LINE:
            return None
        pairs = _PLAIN_PAIR.findall(head[3])
        names = [name.lower() for name, _ in pairs]
        if len(pairs) >= _MAX_HEADERS or names.count("upgrade") != 1 or not _NO_BODY.isdisjoint(names):
            return None
        if pairs[names.index("upgrade")][1].lower() != "websocket":  # as pywsgi compares it: unstripped
            return None
        del reader._data[: head.end()]
        return head[1], head[2], pairs

    def _handle_handshake(self, requestline: str, target: str, pairs: list[tuple[str, str]]) -> Any:
        """pywsgi's ``handle_one_request`` for what :meth:`_plain_handshake` read: the app answers it."""
        self.requestline, self.command, self.path, self.request_version = requestline, "GET", target, "HTTP/1.1"
        self.headers = message = _PlainHeaders.of(pairs)
        self.content_length = None
        self.close_connection = message.get("Connection", "").lower() == "close"
        self.response_length = 0
        if type(self).get_environ is WSGIHandler.get_environ:
            self.environ = self._handshake_environ(target)
        else:  # a subclass adds to it (gunicorn's handler does)
            self.environ = self.get_environ()
        self.application = self.server.application
        self._respond()
        return None if self.close_connection or self.rfile.closed else True

    def _handshake_environ(self, target: str) -> dict:
        """pywsgi's ``get_environ`` for a request without a body that asks for an upgrade."""
        environ = self.server.get_environ()
        path, _, query = target.partition("?")
        environ.update(
            REQUEST_METHOD="GET",
            SCRIPT_NAME="",
            PATH_INFO=urllib.parse.unquote(path, "latin-1"),
            QUERY_STRING=query,
            SERVER_PROTOCOL="HTTP/1.1",
        )
        if isinstance(self.client_address, tuple):
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = map(str, self.client_address[:2])
        for key, value in self._headers():
            if key in environ:  # a repeated header: its values joined
                environ[key] += ("; " if "COOKIE" in key else ",") + value
            else:
                environ[key] = value
        environ["wsgi.input"] = self.rfile  # an upgrade's: pywsgi reads no body for the app
        environ["wsgi.input_terminated"] = False
        return environ

    def _respond(self) -> None:
        """pywsgi's ``handle_one_response`` for a request without a body: run the app, log the request."""
        self.time_start = time.time()
        self.status, self.result, self.headers_sent = None, None, False
        self.response_use_chunked = self.connection_upgraded = False
        try:
            self.run_application()
        except OSError as error:
            if error.args and error.args[0] in self.ignored_socket_errors:  # the client left
                self.close_connection = True
            else:
                self.handle_error(*sys.exc_info())  # type: ignore[arg-type]
        except BaseException:  # noqa: BLE001 - as pywsgi: a 500 for the client, a traceback for the log
            self.handle_error(*sys.exc_info())  # type: ignore[arg-type]
        finally:
            self.time_finish = time.time()
            self.log_request()

    def read_request(self, raw_requestline: str) -> Any:
        reader = self.rfile
        self.rfile = _HeadReader(reader, self.max_handshake_size - len(raw_requestline))
        try:
            return super().read_request(raw_requestline)
        except (_SlowRequest, _LongRequest) as error:  # pywsgi would log a line for each: clients choose how many
            if isinstance(error, _LongRequest):
                _log_summarised(logging.INFO, "requests too long", "400 for %s: %s", self.client_address, error)
            else:
                _log_summarised(
                    logging.INFO,
                    "requests too slow",
                    "400 for %s: no whole request within %s s",
                    self.client_address,
                    self.handshake_timeout,
                )
            return False  # pywsgi answers 400
        finally:
            self.rfile = reader

    def MessageClass(self, reader: Any, *args: Any) -> Any:  # pywsgi's name for its header parser
        return _read_headers(reader)

    def _headers(self) -> Iterator[tuple[str, str]]:  # pywsgi's: the request's headers for its environ
        if type(self.headers) is _PlainHeaders:
            return self.headers.environ_items()  # type: ignore[no-any-return]
        return super()._headers()  # type: ignore[misc, no-any-return]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None

    def run_application(self) -> None:
        self._cancel_deadline()  # the request is in: the app takes the time it needs
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            WSGIHandler.run_application(self)
            return
        self.environ["flask_websockets.accept"] = self._accept
        limit = self.max_connections
        if limit is not None and WebSocketHandler._websockets >= limit:
            self.environ["flask_websockets.full"] = limit  # the app answers 503
        # Counted from the handshake on, so that handshakes under way cannot overshoot the limit.
        WebSocketHandler._websockets += 1
        try:
            WSGIHandler.run_application(self)  # pywsgi's: gevent-websocket's would send the 101 now
        finally:
            WebSocketHandler._websockets -= 1

    def _accept(self, subprotocol: str | None, extensions: str | None = None) -> tuple[Any, Any]:
        """Send the 101; return the socket and the server's reader."""
        headers = _handshake_headers(self.environ, subprotocol, extensions)
        _send_all(self.socket, _switching_protocols(headers))
        self._upgraded = True
        # What pywsgi's (or gunicorn's) access log reads about the response.
        self._orig_status, self.status, self.code = "101 Switching Protocols", b"101 Switching Protocols", 101
        self.response_headers = headers
        self.headers_sent = self.close_connection = True
        self.__dict__.pop("headers", None)  # the app has them in its environ: keep no second copy
        return self.socket, self.rfile

    def start_response(self, status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
        if self._upgraded:  # the app's response after a websocket has nowhere to go
            return lambda data: None
        return super().start_response(status, headers, exc_info)  # type: ignore[no-any-return]

    def process_result(self) -> None:
        if not self._upgraded:
            super().process_result()

    def handle_error(self, kind: type, error: BaseException, tb: Any) -> None:
        if not self._upgraded:
            super().handle_error(kind, error, tb)
            return
        # pywsgi would write a 500 page, after the websocket's close frame.
        if not isinstance(error, gevent.GreenletExit):  # killed: the server is stopping
            logger.error("error after a websocket connection", exc_info=(kind, error, tb))
        self.close_connection = True

    def log_request(self) -> None:
        # gevent-websocket leaves 101s out of the access log: log them like any
        # request, with the next handler's log (pywsgi's, or gunicorn's). With
        # WSGIServer(log=None), pywsgi would format the line and drop it.
        if not isinstance(getattr(self.server, "log", None), _NO_ACCESS_LOG):
            super(_GeventWebSocketHandler, self).log_request()

    @property
    def logger(self) -> logging.Logger:
        # gevent-websocket's own property replaces its logger's handlers (gevent-websocket#16).
        return logging.getLogger("geventwebsocket.handler")


#: pywsgi's stand-in for an access log when a server is made with ``log=None`` (private, hence the getattr).
_NO_ACCESS_LOG: Any = getattr(gevent.pywsgi, "_NoopLog", ())
#: Limits on the request's header lines, as ``http.client`` reads them.
_MAX_HEADER_LINE, _MAX_HEADERS = 65536, 100
#: A header line that the email parser, which pywsgi uses, reads as a name and a value.
_PLAIN_HEADER = re.compile(rb"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n?")
#: A websocket handshake's usual request line and plain headers: what WebSocketHandler reads at once.
_HANDSHAKE = re.compile(r"(GET ([!-~]{1,8000}) HTTP/1\.1)\r\n((?:[!-9;-~]+:[^\r\n]*\r\n)*)\r\n")
#: Headers that announce a body: a request with one goes through pywsgi's reading, which reads bodies.
_NO_BODY = frozenset(("content-length", "transfer-encoding", "content-type", "expect"))
#: Plain header lines up to the blank line that ends them; and one of them, with its name and value.
_PLAIN_HEAD = re.compile(r"(?:[!-9;-~]+:[^\r\n]*\r?\n)*\r?\n")
_PLAIN_PAIR = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")


def _read_headers(reader: Any) -> Any:
    """Read the request's headers into pywsgi's message class, as its parser does, but quicker.

    pywsgi parses headers with the email package: a tenth of what a
    websocket connection costs the server. Lines of the plain form
    ``Name: value`` go straight into the message; anything else (a folded
    line, a line without a colon) goes through pywsgi's parser, so that a
    strange request is read exactly as before.
    """
    message = _plain_head(reader)
    if message is not None:
        return message
    lines = []
    while True:
        line = reader.readline(_MAX_HEADER_LINE + 1)
        if len(line) > _MAX_HEADER_LINE:
            return gevent.pywsgi.headers_factory(io.BytesIO(line))  # its "Line too long": 400
        lines.append(line)
        if len(lines) > _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            break
    pairs = []
    for line in lines[:-1]:
        match = _PLAIN_HEADER.fullmatch(line)
        if match is None:  # (a name has no space: "From " lines, which start an mbox message, go there too)
            return gevent.pywsgi.headers_factory(io.BytesIO(b"".join(lines)))
        pairs.append((match[1].decode("latin-1"), match[2].decode("latin-1")))
    return _PlainHeaders.of(pairs)


def _plain_head(reader: Any) -> Any:
    """The headers at once, if :class:`_Reader` holds all of them, each a plain line within the limits; else ``None``.

    The usual request: its head comes in one packet.
    """
    inner = reader._reader if isinstance(reader, _HeadReader) else reader
    if not isinstance(inner, _Reader):
        return None
    head = _PLAIN_HEAD.match(inner._data.decode("latin-1"))  # latin-1: a byte a character, as pywsgi reads them
    limit = min(_MAX_HEADER_LINE, reader._left if inner is not reader else _MAX_HEADER_LINE)
    if head is None or head.end() > limit:
        return None  # not all there, not plain, or near a limit: read line by line, to the same answer
    pairs = _PLAIN_PAIR.findall(head[0])
    if len(pairs) >= _MAX_HEADERS:
        return None
    del inner._data[: head.end()]
    if inner is not reader:
        reader._left -= head.end()
    return _PlainHeaders.of(pairs)


#: The class of pywsgi's parsed headers (an ``http.client.HTTPMessage`` with the older API pywsgi reads).
_HEADERS_CLASS: Any = type(WSGIHandler.headers)


class _PlainHeaders(_HEADERS_CLASS):  # type: ignore[misc, valid-type]
    """pywsgi's headers, read by :func:`_read_headers` from plain ``Name: value`` lines only."""

    @classmethod
    def of(cls, pairs: list[tuple[str, str]]) -> _PlainHeaders:
        """The headers ``(name, value)``, in order: what ``set_raw`` for each, then ``set_payload("")``, make."""
        message = cls()
        message._headers = pairs
        message._payload = ""
        return message

    def environ_items(self) -> Iterator[tuple[str, str]]:
        """The headers' environ keys and values, as pywsgi's ``_headers`` makes them from its parser's headers.

        pywsgi formats each header as a line and splits it again; with one
        value a line, that comes to this.
        """
        for name, value in self._headers:
            if "_" not in name:  # pywsgi leaves out names with "_", which a proxy could not tell from "-"
                key = name.replace("-", "_").upper()
                if key != "CONTENT_TYPE" and key != "CONTENT_LENGTH":
                    yield "HTTP_" + key, value.strip()


class _SlowRequest(ValueError):
    """A client that took too long to send its request (pywsgi answers a ValueError with 400)."""


class _LongRequest(ValueError):
    """A request line and headers over ``max_handshake_size`` (pywsgi answers a ValueError with 400)."""


class _Reader:
    """What :class:`WebSocketHandler` reads requests from, in place of pywsgi's ``socket.makefile("rb")``.

    A buffered reader of the socket, like the file it replaces, that gives
    a websocket the bytes it read past the handshake without a system call
    (a buffered file cannot say what it holds without reading the socket),
    and costs less to make. pywsgi reads request lines, headers and bodies
    through it; an app reads it as ``wsgi.input`` of a request that asks for
    an upgrade, as PEP 3333 describes the input stream.
    """

    __slots__ = ("_sock", "_data", "closed")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = bytearray()  # read but not yet taken (taking from the front of a bytearray is cheap)
        self.closed = False

    def readline(self, size: int | None = -1) -> bytes:
        end = self._data.find(b"\n") + 1
        while not end and (size is None or size < 0 or len(self._data) < size):
            start = len(self._data)
            if not self._fill():
                break
            end = self._data.find(b"\n", start) + 1
        return self._take(end or len(self._data), size)

    def read(self, size: int | None = -1) -> bytes:
        while (size is None or size < 0 or len(self._data) < size) and self._fill():
            pass
        return self._take(len(self._data), size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(self)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def take(self) -> bytes:
        """The bytes read past what was asked for; the reader is closed."""
        data = bytes(self._data)
        self.close()
        return data

    def close(self) -> None:
        self.closed = True
        self._data = bytearray()

    def _fill(self, wait: bool = True) -> bool:
        """Read what the socket has (without ``wait``, only if that takes no waiting); whether anything came."""
        if self.closed:  # taken over by a websocket, or closed: as a closed file
            raise ValueError("I/O operation on closed file")
        if wait:
            data = self._sock.recv(65536)
        else:
            sock = _raw_socket(self._sock)
            if sock is self._sock:  # not a plain gevent socket: no read that cannot wait
                return False
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return False
        self._data += data
        return bool(data)

    def _take(self, end: int, size: int | None) -> bytes:
        if size is not None and 0 <= size < end:
            end = size
        data = bytes(self._data[:end])
        del self._data[:end]
        return data


class _HeadReader:
    """The server's reader while it reads a request's headers: at most ``left`` more bytes."""

    def __init__(self, reader: Any, left: int) -> None:
        self._reader, self._left = reader, left

    def readline(self, size: int | None = -1) -> bytes:
        limit = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        line: bytes = self._reader.readline(limit)
        self._left -= len(line)
        if self._left < 0:
            raise _LongRequest("request line and headers too long")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    ssl_context: Any = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    reload: bool = False,
    handshake_timeout: float | None = 10.0,
    max_connections: int | None = None,
    max_handshake_size: int = 64 * 1024,
    shutdown_timeout: float = 3.0,
    **server_kwargs: Any,
) -> None:
    """Serve ``app`` with gevent and :class:`WebSocketHandler` until Ctrl-C or SIGTERM.

    It prints the URL, passes ``ssl_context`` or ``certfile`` and ``keyfile``
    on for https and wss, and ``server_kwargs`` to gevent's ``WSGIServer``
    (``log=None`` silences the access log). ``reload=True`` restarts the
    server when a source file changes, with Werkzeug's reloader::

        if __name__ == "__main__":
            flask_websockets.serve(app, port=8000, reload=True)

    ``handshake_timeout`` and ``max_handshake_size`` bound what a client may
    take before the app sees its request (see :class:`WebSocketHandler`).
    With ``max_connections``, at most that many websockets are open at once:
    past it, a handshake gets ``503 Service Unavailable``, and plain HTTP is
    served as ever. Sockets that have not sent a request yet do not count
    (``handshake_timeout`` bounds them), so idle ones cannot lock clients out.

    On SIGINT (Ctrl-C) or SIGTERM it stops accepting, closes every websocket
    with 1001 ("server shutting down") and waits for their clients' close
    frames, for up to ``shutdown_timeout`` seconds (or their close timeout,
    if shorter). Connections still open then are dropped; nothing follows
    their close frame, and every ``on_close`` runs once. Then it returns.

    With ``reload=True`` the server runs in a child process, started again
    when the code changes. A change closes every websocket with 1012
    ("service restart"): the clients may reconnect at once, and reach the
    new code. SIGINT or SIGTERM, to either process, closes them with 1001
    as above; then both processes exit.

    Like any gevent program, call ``gevent.monkey.patch_all()`` first thing
    if handlers use blocking libraries (``time.sleep``, database drivers).
    """
    tls = {k: v for k, v in dict(ssl_context=ssl_context, certfile=certfile, keyfile=keyfile).items() if v}
    run = functools.partial(
        _run_server,
        app,
        host,
        port,
        tls=tls,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        max_handshake_size=max_handshake_size,
        shutdown_timeout=shutdown_timeout,
        server_kwargs=server_kwargs,
    )
    if reload:
        _serve_with_reloader(run, shutdown_timeout)
    else:
        run(_ServerStop(), signals=True)


def _run_server(
    app: Any,
    host: str,
    port: int,
    stop: _ServerStop,
    signals: bool,
    *,
    tls: dict[str, Any],
    handshake_timeout: float | None,
    max_connections: int | None,
    max_handshake_size: int,
    shutdown_timeout: float,
    server_kwargs: dict[str, Any],
) -> None:
    """What :func:`serve` runs: until ``stop`` is called, or with ``signals``, SIGINT or SIGTERM."""
    from gevent.pywsgi import WSGIServer

    try:
        handler = type(
            "WebSocketHandler",
            (WebSocketHandler,),
            {
                "handshake_timeout": handshake_timeout,
                "max_handshake_size": max_handshake_size,
                "max_connections": max_connections,
            },
        )
        server = WSGIServer((host, port), app, handler_class=handler, **tls, **server_kwargs)
        server.start()  # bind first, so that port 0 prints the port it got
        scheme = "https" if tls else "http"
        print(f" * Serving on {scheme}://{host}:{server.server_port}/ (press Ctrl-C to quit)", flush=True)
        # The event loop catches the signals: no KeyboardInterrupt in whatever greenlet happens to run.
        handlers = [gevent.signal_handler(signum, stop, *_SHUTDOWN) for signum in _STOP_SIGNALS] if signals else []
        try:
            stop.wait()
        finally:
            for signal_handler in handlers:
                signal_handler.cancel()
            server.close()  # no new connections
            _shut_down_websockets(shutdown_timeout, stop.code, stop.reason)
            server.stop(timeout=0.5)  # what is left: idle keep-alive requests, clients that did not answer
    finally:
        stop.finished.set()


#: The close code and reason of a server that stops, and of one that restarts (RFC 6455 7.4.1, IANA's registry).
_SHUTDOWN = (1001, "server shutting down")
_RESTART = (1012, "service restart")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: What Werkzeug's reloader child exits with to be started again.
_RELOAD_EXIT = 3


class _ServerStop:
    """Stops a server that :func:`serve` runs, from any thread or a signal handler, with its websockets' close code."""

    def __init__(self) -> None:
        self.code, self.reason = _SHUTDOWN
        #: Set once the server has stopped, or failed to start. (``threading``'s as it is now:
        #: a real thread's event, or under monkey-patching a greenlet's, like the server's thread.)
        self.finished = threading.Event()
        self._requested = False
        self._loop: Any = None  # the server's loop while it waits
        self._event: Any = None
        self._lock = _thread_lock()

    def __call__(self, code: int, reason: str) -> None:
        with self._lock:
            if not self._requested:  # the first reason to stop is the one the clients get
                self._requested = True
                self.code, self.reason = code, reason
            if self._loop is not None:
                self._loop.run_callback_threadsafe(self._event.set)

    def wait(self) -> None:
        """In the server's thread: until the server is asked to stop."""
        event = gevent.event.Event()
        with self._lock:
            if self._requested:
                return
            self._loop, self._event = gevent.get_hub().loop, event
        try:
            event.wait()
        finally:
            with self._lock:
                self._loop = None


def _serve_with_reloader(run: Callable[..., None], shutdown_timeout: float) -> None:
    """``serve(reload=True)``: a parent process that starts the server in a child, again after each code change.

    The child runs Werkzeug's reloader loop in its main thread and the server
    in another. When the loop sees a change it raises ``SystemExit(3)``: the
    server closes its websockets with 1012 first, then the child exits 3 and
    the parent starts a new one. SIGINT or SIGTERM closes them with 1001 and
    ends both. The parent is this module's, not Werkzeug's: Werkzeug's kills
    its child a quarter of a second after Ctrl-C, and at once on SIGTERM,
    cutting the closing handshakes short.
    """
    from werkzeug.serving import is_running_from_reloader

    if not is_running_from_reloader():
        sys.exit(_restart_after_changes(shutdown_timeout))
    # Werkzeug has no public API to reload a server other than its own.
    from werkzeug._reloader import run_with_reloader

    stop = _ServerStop()
    previous = [(signum, signal.getsignal(signum)) for signum in _STOP_SIGNALS]
    signal.signal(signal.SIGINT, _exit_on_signal)  # SIGTERM: Werkzeug's sys.exit(0)
    ended: BaseException | None = None
    try:
        run_with_reloader(functools.partial(run, stop, False))
    except BaseException as error:  # SystemExit(3): a change; SystemExit(0): a signal
        ended = error
    finally:
        ended = _ignore_stop_signals(ended)  # nothing may cut the shutdown short now
        restart = isinstance(ended, SystemExit) and ended.code == _RELOAD_EXIT
        stop(*(_RESTART if restart else _SHUTDOWN))
        stop.finished.wait(shutdown_timeout + 1.0)
    if restart or not isinstance(ended, (SystemExit, KeyboardInterrupt, type(None))):
        raise ended  # type: ignore[misc]  # the exit code the parent restarts on, or an error
    for signum, handler in previous:  # serve() returns, as without reload: what follows may be interrupted
        if handler is not None:
            signal.signal(signum, handler)


def _exit_on_signal(signum: int, frame: Any) -> None:
    """SIGINT in the reloader's child: leave Werkzeug's loop like its SIGTERM does.

    Not a ``KeyboardInterrupt``: gevent's hub, if that is what the signal
    interrupts, would print it.
    """
    _ignore_stop_signals(None)  # and a second Ctrl-C, or the parent's copy of this one, do nothing
    raise SystemExit(0)


def _ignore_stop_signals(ended: BaseException | None) -> BaseException | None:
    """Ignore SIGINT and SIGTERM from now on; return ``ended``, or what a signal raised meanwhile."""
    while True:
        try:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            return ended
        except (SystemExit, KeyboardInterrupt) as error:  # a second signal, before the first was ignored
            ended = error


def _restart_after_changes(shutdown_timeout: float) -> int:
    """The reloader's parent: run this program in a child until it exits other than to be reloaded.

    Returns the child's exit status. SIGINT and SIGTERM are passed on to the
    child as SIGINT, and it is killed if it has not exited a few seconds after
    its shutdown timeout.
    """
    env = {**os.environ, "WERKZEUG_RUN_MAIN": "true"}  # what werkzeug.serving.is_running_from_reloader() reads
    child: Any = None
    stopping: list[float] = []  # the deadline, once told to stop
    told: set[int] = set()  # the children told

    def tell_child() -> None:
        if child is not None and child.pid not in told and child.returncode is None:
            told.add(child.pid)
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGINT)

    def on_signal(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(time.monotonic() + shutdown_timeout + 3.0)
        tell_child()

    for signum in _STOP_SIGNALS:
        signal.signal(signum, on_signal)
    while True:
        child = subprocess.Popen(_command_line(), env=env, close_fds=False)  # inherited sockets stay open
        while True:
            if stopping:
                tell_child()  # a signal that came before it started
            try:
                status = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() > stopping[0]:
                    child.kill()
        if status != _RELOAD_EXIT or stopping:
            return status if status >= 0 else 128 - status  # killed by a signal: as a shell reports it


def _command_line() -> list[str]:
    """How this program was started, to start it again, as Werkzeug's reloader does."""
    if hasattr(sys, "orig_argv"):  # Python 3.10+
        return [sys.executable, *sys.orig_argv[1:]]
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:  # python -m package.module
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [sys.executable, "-m", name, *sys.argv[1:]]
    return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]


def _shut_down_websockets(timeout: float, code: int = _SHUTDOWN[0], reason: str = _SHUTDOWN[1]) -> None:
    """Close every websocket of this process (1001 unless told); wait up to ``timeout`` for them to end.

    They end when their clients answer (or at their close timeouts), after
    their ``on_close``: the server may then stop without cutting a closing
    handshake short. Callable from any thread.
    """
    for conn in list(_open_connections):
        try:
            conn.close(code, reason)
        except Exception:  # one connection must not keep the others open
            logger.exception("closing %r", conn)
    deadline = time.monotonic() + timeout
    while _open_connections and time.monotonic() < deadline:
        gevent.sleep(0.05)


def _close_websockets_at_exit() -> None:
    """Under Werkzeug's server (``flask run``): once, close the websockets when the process exits.

    Its request threads are daemons, cut off at exit without a close frame.
    A reloader's child (``flask run --debug``) exits to be replaced by a new
    one when the code changes: its websockets get 1012. It cannot tell that
    from Ctrl-C, which its parent follows with SIGKILL a quarter of a second
    later: they get 1012 then too. Without the reloader, 1001.
    """
    global _closing_at_exit
    if not _closing_at_exit:
        _closing_at_exit = True
        atexit.register(_close_at_exit)


_closing_at_exit = False
#: How long an exiting Werkzeug server waits for its websockets' closing handshakes.
_EXIT_TIMEOUT = 3.0


def _close_at_exit() -> None:
    from werkzeug.serving import is_running_from_reloader

    if _open_connections:
        _shut_down_websockets(_EXIT_TIMEOUT, *(_RESTART if is_running_from_reloader() else _SHUTDOWN))


#: The connections this process serves, whatever their endpoint: for shutting down.
_open_connections: set[Connection] = set()


def __getattr__(name: str) -> Any:
    """``GunicornWorker``: gunicorn's gevent worker with :class:`WebSocketHandler`.

    ``gunicorn -k flask_websockets.GunicornWorker -w 4 app:app``. When the
    worker is told to stop, it closes its websockets at once and waits for
    their closing handshakes, instead of dropping them at the graceful
    timeout. Told gracefully (SIGTERM), it closes them with 1012 ("service
    restart"): that is how gunicorn's master replaces its workers on a reload
    (``kill -HUP``) or a deploy, and the clients should reconnect, to a new
    worker. The master's own graceful stop reaches the worker as the same
    SIGTERM, and the worker cannot tell the two apart: 1012 then too, right
    for a restart, where the service comes back. Told quickly (SIGINT,
    SIGQUIT: the master was stopped with Ctrl-C), it closes them with 1001
    ("server shutting down"). Gunicorn is imported only when the worker is
    asked for: it is not a dependency.
    """
    if name != "GunicornWorker":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from gunicorn.workers.base import Worker
    from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

    class GunicornHandler(WebSocketHandler, PyWSGIHandler):
        """Our handshake, gunicorn's access log and environ."""

    class GunicornServer(PyWSGIServer):
        started: list[Any] = []  # this worker process's servers, to stop accepting at once

        def start(self) -> None:
            super().start()
            self.started.append(self)

    class GunicornWorker(GeventPyWSGIWorker):
        server_class = GunicornServer
        wsgi_handler = GunicornHandler

        def init_process(self) -> None:
            _ToAppLog.gunicorn_logger = self.log.error_log  # our lines in gunicorn's format, with its pid
            super().init_process()

        # Gunicorn's signal handlers run in whichever greenlet the signal
        # interrupts: they only hand the work to a greenlet of its own.
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM: a reload, a deploy, or the master's stop
            super().handle_exit(sig, frame)  # the worker stops once its connections end, or at the graceful timeout
            gevent.spawn(self._stop_serving, 0.0, *_RESTART)

        def handle_quit(self, sig: int, frame: Any) -> None:  # SIGINT, SIGQUIT: the master's quick stop
            gevent.spawn(self._quit, sig, frame)

        def _stop_serving(self, timeout: float, code: int, reason: str) -> None:
            for server in GunicornServer.started:  # now, not at the worker's next check: clients
                server.close()  # that reconnect on 1012 must reach the new workers
            _shut_down_websockets(timeout, code, reason)

        def _quit(self, sig: int, frame: Any) -> None:
            self.alive = False
            self._stop_serving(3.0, *_SHUTDOWN)
            Worker.handle_quit(self, sig, frame)  # exits

    globals()["GunicornWorker"] = GunicornWorker
    return GunicornWorker


# ---------------------------------------------------------------------------
# The handover: how servers hand a connection over
# ---------------------------------------------------------------------------


class _Handover:
    """How a server hands the connection over once the app accepts the handshake.

    Subclasses for :class:`WebSocketHandler`, gevent-websocket's handler and
    Werkzeug's development server.
    """

    answers_handshake = True  # no 101 has been sent: the app's answer is the server's

    def __init__(self, environ: dict) -> None:
        self.environ = environ

    def check(self) -> Response | None:
        """A 400 or 426 for a handshake that is not RFC 6455's, else ``None``."""
        return _handshake_error(self.environ)

    def accept(self, subprotocol: str | None, extensions: str | None) -> tuple[Any, bytes]:
        """Send the 101; return the socket and the bytes already received."""
        raise NotImplementedError

    def end(self) -> None:
        """Tidy up after the connection."""

    def response(self) -> Response:
        """What the view returns once the connection is over."""
        return _Upgraded(status=101)


class _OurHandlerHandover(_Handover):
    """:class:`WebSocketHandler` (and the test client): it sends the 101 when asked."""

    def check(self) -> Response | None:
        limit = self.environ.get("flask_websockets.full")
        if limit is not None:  # WebSocketHandler.max_connections
            return Response(f"This server has its {limit} websockets open: try again soon.", 503, {"Retry-After": "1"})
        return super().check()

    def accept(self, subprotocol: str | None, extensions: str | None) -> tuple[Any, bytes]:
        sock, reader = self.environ["flask_websockets.accept"](subprotocol, extensions)
        return sock, _take_over(sock, reader)


class _GeventWebsocketHandover(_Handover):
    """gevent-websocket's own handler: its 101 went out before the app ran."""

    answers_handshake = False

    def check(self) -> None:
        return None

    def accept(self, subprotocol: str | None, extensions: str | None) -> tuple[Any, bytes]:
        handler = self.environ["wsgi.websocket"].handler
        return handler.socket, _take_over(handler.socket, handler.rfile)

    def end(self) -> None:
        self.environ["wsgi.websocket"].closed = True  # it must not send its own close frame


class _WerkzeugHandover(_Handover):
    """Werkzeug's development server (``flask run``): a thread per request.

    The connection runs its I/O in that thread's own gevent event loop, made
    for it and destroyed with it (unless gevent's monkey-patching made the
    thread a greenlet of the main loop).
    """

    def accept(self, subprotocol: str | None, extensions: str | None) -> tuple[Any, bytes]:
        _close_websockets_at_exit()
        sock = self.environ["werkzeug.socket"]
        _send_all(sock, _switching_protocols(_handshake_headers(self.environ, subprotocol, extensions)))
        # Werkzeug reads on from its reader after the app: leave it open.
        return sock, _take_over(sock, self.environ["wsgi.input"], close=False)

    def end(self) -> None:
        try:
            self.environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)  # Werkzeug's next read ends
        except OSError:
            pass
        if gevent.getcurrent().parent is None:  # a real thread: its event loop was made for this connection
            gevent.get_hub().destroy()

    def response(self) -> Response:
        return _Dropped(status=101)


def _handover(environ: dict) -> _Handover | None:
    if "flask_websockets.accept" in environ:
        return _OurHandlerHandover(environ)
    if environ.get("wsgi.websocket") is not None:
        return _GeventWebsocketHandover(environ)
    if environ.get("werkzeug.socket") is not None:
        return _WerkzeugHandover(environ)
    return None


def _handshake_error(environ: dict) -> Response | None:
    """An HTTP answer for a handshake that is not RFC 6455's, else ``None``."""
    if environ.get("REQUEST_METHOD") != "GET":  # HEAD, say: RFC 6455 4.1 asks for GET
        return Response("A websocket handshake is a GET request.", 405, {"Allow": "GET"})
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ:
        # The server would read the body from what is now the websocket's stream.
        return Response("A websocket handshake has no body.", 400)
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        return Response("This server speaks websocket version 13.", 426, {"Sec-WebSocket-Version": "13"})
    try:
        valid = len(base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", ""), validate=True)) == 16
    except binascii.Error:
        valid = False
    return None if valid else Response("Sec-WebSocket-Key must be 16 bytes in base64.", 400)


def _handshake_headers(environ: dict, subprotocol: str | None, extensions: str | None) -> list[tuple[str, str]]:
    digest = hashlib.sha1(environ["HTTP_SEC_WEBSOCKET_KEY"].encode() + _WEBSOCKET_GUID).digest()
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", base64.b64encode(digest).decode()),
    ]
    if subprotocol:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    if extensions:
        headers.append(("Sec-WebSocket-Extensions", extensions))
    return headers


def _switching_protocols(headers: list[tuple[str, str]]) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 4.2.2


def _send_all(sock: Any, data: bytes) -> None:
    """``sock.sendall(data)`` without the syscall that gevent's sendall makes first, for a short answer."""
    sent = sock.send(data)  # a fresh socket takes a 101 whole
    if sent < len(data):
        sock.sendall(data[sent:])


def _take_over(sock: Any, reader: Any, close: bool = True) -> bytes:
    """Return what the server's reader buffered past the handshake, and close it.

    From here on the connection reads the socket itself: one Python layer
    less per read, and closing the reader frees its 8 KiB buffer, a third
    of what an idle connection costs. The socket stays open.
    """
    if isinstance(reader, _Reader):
        return reader.take()
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # take only what is already there
    try:
        pending = reader.read1(65536) or b""
    except OSError:  # nothing there (TLS says so with an error)
        pending = b""
    finally:
        sock.settimeout(timeout)
    if close:
        reader.close()
    return pending


class _Upgraded(Response):
    """What the websocket view returns once the connection is over.

    Flask runs ``after_request`` functions on it as on any response. The
    server has switched protocols long before, so nobody reads its headers:
    building them is skipped.
    """

    default_mimetype = None  # a 101 has no body, so no Content-Type

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> list[bytes]:  # type: ignore[override]
        start_response(self.status, [])
        return []


class _Dropped(_Upgraded):
    """For Werkzeug's server, which writes the response's status line after the view.

    Its socket is shut down by then: Werkzeug logs the request with status
    101, fails to write the line, and drops the request quietly. Raising
    instead would show Werkzeug's debugger a 500 (``flask run --debug``).
    """

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> list[bytes]:  # type: ignore[override]
        start_response("101 Switching Protocols", [])
        return []


# ---------------------------------------------------------------------------
# The message queue: scaling out through Redis
# ---------------------------------------------------------------------------
#
# How it works. An endpoint's broadcasts travel through a fixed number of
# Redis streams, its shards (``_SHARDS``). A publisher (the queue of a server
# process, or a ``Publisher``) writes all its messages to one shard, picked by
# its id, so a connection gets what one publisher sends in the order it was
# sent, rooms and everyone mixed. A message's room is a field of its entry,
# never part of a key: any name is only a name. Every process reads every
# shard of the endpoint and keeps what has members here. So its cost grows with
# the endpoint's traffic, never with the rooms it serves: a read is one XREAD
# over all the shards, or on a Redis Cluster, which refuses a command over keys
# in different slots, one XREAD per shard, each in a thread of its own. Each
# shard's keys share a hash tag (``{websocket:3}``), so that every command is
# legal on a cluster, and the shards, in different slots, spread an endpoint's
# traffic over its masters.
#
# Exactly once. Each entry carries its publisher's id and a sequence number,
# and is added by a Lua script only if its number is above the last one that
# publisher wrote: a batch written again after a write whose answer was lost
# adds nothing twice. Readers keep no state per publisher. A process that lost
# Redis reads on from the last entry it saw (from the start of a stream that
# Redis lost with its data), and what it published meanwhile waits in its
# outbox, at most ``_STREAM_LENGTH`` messages, the newest.
#
# What Redis keeps: per shard a stream of about ``_STREAM_LENGTH`` entries, and
# per publisher a key with its last number, for ``_PUBLISHER_TTL`` seconds
# after its last message. All Redis I/O runs in real threads (a writer, and a
# reader per group of shards), never in gevent's loop, with or without
# monkey-patching: ``broadcast`` only hands the message over.

#: Streams per endpoint. Every process reads all of them; each publisher writes to one.
_SHARDS = 8
#: Entries each stream keeps (about), and messages an outbox keeps while Redis is away.
_STREAM_LENGTH = 10_000
#: Seconds a publisher's last sequence number is kept in Redis after its last message.
_PUBLISHER_TTL = 3600
#: Adds an entry unless its publisher wrote that number already. KEYS: the stream, the
#: publisher's key; ARGV: the number, the key's TTL, the stream's length, the entry's fields.
_PUBLISH_SCRIPT = """\
if tonumber(ARGV[1]) <= tonumber(redis.call('GET', KEYS[2]) or '0') then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
return 1
"""


class Publisher:
    """Broadcast to an endpoint's connections from outside a server, and see who is online.

    From a Celery task, a cron script or a shell: no gevent, no Flask app, only
    redis-py (``pip install "Flask-Websockets[redis]"``) and the servers'
    message queue URL. ``endpoint`` is the name of the endpoint to reach, as in
    ``url_for``::

        from flask_websockets import Publisher

        news = Publisher("redis://localhost:6379/0")     # endpoint="websocket"
        news.broadcast("the servers restart at 2:00")
        news.broadcast(b"\\x89PNG...", room="kitchen")
        news.broadcast("your report is ready", user="42")
        news.disconnect(user="42", code=4001, reason="password changed")

    ``broadcast`` and ``disconnect`` take what ``WebSockets.broadcast`` and
    ``WebSockets.disconnect`` take, and return once Redis has the message.
    A call whose first try fails tries once more, with the same sequence
    number, so that a message whose answer was lost is delivered once. When
    Redis cannot be reached within ``timeout`` seconds, they raise redis-py's
    ``ConnectionError`` (a timeout too, and a cluster's errors): the message
    may then have reached Redis or not, and retrying is the caller's call. Every
    process that serves the endpoint delivers what one publisher sends in the
    order it was sent, rooms, users and everyone mixed. One publisher may be
    shared by threads: their messages go one at a time, each thread's in its
    order. ``presence`` and ``count`` are those of ``WebSockets``, from every
    process.
    """

    def __init__(self, url: str, endpoint: str = "websocket", timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self._where = _check_queue_url(url, "Publisher(url)")
        self._redis = _redis_client(url, timeout)
        self._origin = uuid.uuid4().hex
        self._keys = _shard_keys(endpoint, _shard_of(self._origin), self._origin)
        self._sequence = 0
        self._lock = threading.Lock()  # a number and its write, one thread at a time

    def broadcast(
        self, message: Reply, room: str | None = None, compress: bool = True, user: str | None = None
    ) -> None:
        """Send ``message`` to every connection of the endpoint, a room's or a user's (see ``WebSockets.broadcast``)."""
        content = _payload(message, "Publisher.broadcast()")
        if content is None:
            return
        _check_audience(room, user, "Publisher.broadcast()")
        self._send(lambda sequence: _entry(self._origin, sequence, room, user, *content, compress))

    def disconnect(self, user: str | None = None, room: str | None = None, code: int = 1000, reason: str = "") -> None:
        """Close the connections of a user, or of a room, on every process (see ``WebSockets.disconnect``)."""
        _check_disconnect(room, user, code, reason, "Publisher.disconnect()")
        self._send(lambda sequence: _close_entry(self._origin, sequence, room, user, code, reason))

    def presence(self, room: str | None = None) -> dict[str, int]:
        """The identified users connected to the endpoint, or a room, on every process (see ``WebSockets.presence``)."""
        _check_room(room, "Publisher.presence()")
        return {user: n for user, n in self._query(room).items() if user}

    def count(self, room: str | None = None) -> int:
        """How many connections the endpoint, or a room, has on every process (see ``WebSockets.count``)."""
        _check_room(room, "Publisher.count()")
        return sum(self._query(room).values())

    def close(self) -> None:
        """Close the connection to Redis."""
        self._redis.close()

    def _send(self, entry: Callable[[int], list[Any]]) -> None:
        """Write an entry; once more, with the same number, if the first try fails (its answer may be lost)."""
        with self._lock:
            self._sequence += 1
            fields = entry(self._sequence)
            with self._reaching():
                try:
                    _publish(self._redis, self._keys, self._sequence, fields)
                except Exception:  # noqa: BLE001 - Redis added it or not: the script adds it once
                    _publish(self._redis, self._keys, self._sequence, fields)

    def _query(self, room: str | None) -> dict[str, int]:
        with self._reaching():
            return _presence_in(self._redis, self.endpoint, room)

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Every failure to reach Redis as redis-py's ``ConnectionError``, naming the queue."""
        redis = _import_redis()
        try:
            yield
        except redis.ConnectionError:
            raise
        except (
            redis.TimeoutError, redis.exceptions.ClusterError, redis.exceptions.ReadOnlyError,
            redis.exceptions.RedisClusterException,
        ) as error:  # fmt: skip
            raise redis.ConnectionError(f"message queue {self._where}: {error}") from error


def _shard_of(origin: str) -> int:
    return zlib.crc32(origin.encode()) % _SHARDS


def _shard_keys(endpoint: str, shard: int, origin: str = "") -> tuple[str, str]:
    """A shard's stream, and a publisher's key beside it: one hash tag, one cluster slot."""
    tag = f"flask_websockets:{{{urllib.parse.quote(endpoint, safe='')}:{shard}}}"
    return f"{tag}:stream", f"{tag}:publisher:{origin}"


def _entry(
    origin: str, sequence: int, room: str | None, user: str | None, opcode: int, payload: bytes, compress: bool = True
) -> list[Any]:
    """A message's stream entry, fields and values, format 2: no pickle, text and binary as they are."""
    entry = _entry_head(origin, sequence, room, user) + [b"t", b"text" if opcode == _OP_TEXT else b"binary"]
    if not compress:
        entry += [b"c", b"0"]  # never compressed: it carries a secret
    return entry + [b"d", payload]


def _close_entry(origin: str, sequence: int, room: str | None, user: str | None, code: int, reason: str) -> list[Any]:
    """A disconnect's stream entry: its kind (``k``) says it is no message."""
    return _entry_head(origin, sequence, room, user) + [b"k", b"close", b"code", code, b"why", reason.encode("utf-8")]


def _entry_head(origin: str, sequence: int, room: str | None, user: str | None) -> list[Any]:
    head: list[Any] = [b"v", b"2", b"o", origin, b"n", sequence]
    if room is not None:
        head += [b"r", room.encode("utf-8")]
    if user is not None:
        head += [b"u", user.encode("utf-8")]
    return head


def _publish(redis: Any, keys: tuple[str, str], sequence: int, entry: list[Any]) -> None:
    """Add an entry to a shard, unless its publisher wrote it already (a client or a pipeline)."""
    # EVAL by name: a cluster's pipeline has no eval(), but routes the command by its keys.
    redis.execute_command("EVAL", _PUBLISH_SCRIPT, 2, *keys, sequence, _PUBLISHER_TTL, _STREAM_LENGTH, *entry)


# -- presence ----------------------------------------------------------------------
#
# Each process keeps its own share of the endpoint's presence in Redis: for the
# endpoint and for each room with members there, a hash from user id ("" for
# connections that did not identify) to that process's number of connections,
# changed as connections identify, join, leave and end (``HINCRBY``, through the
# writer thread), and written whole again after the writer lost Redis. A room's
# hash is named by a digest of the room: names stay data. Each process stamps
# its id in a sorted set every ``_HEARTBEAT`` seconds, in Redis's clock;
# ``presence()`` adds up the hashes of the processes stamped within
# ``_PRESENCE_STALE`` seconds, and its own process's connections, exactly. A
# process killed without cleaning up stops counting once its stamp is that old,
# and a later heartbeat of another process deletes its keys. All an endpoint's
# presence keys share one hash tag: one cluster slot.

#: Seconds between a process's heartbeats, and since the last one, when a process no longer counts.
_HEARTBEAT, _PRESENCE_STALE = 5.0, 15.0
#: A batch of changes to a process's shares, applied once: KEYS: the process's last batch applied,
#: its set of hashes, then a hash for each change; ARGV: the batch's number, then user and change each.
_PRESENCE_SCRIPT = """\
if tonumber(ARGV[1]) <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
for i = 3, #KEYS do
  local user, change = ARGV[2 * i - 4], ARGV[2 * i - 3]
  if redis.call('HINCRBY', KEYS[i], user, change) <= 0 then redis.call('HDEL', KEYS[i], user) end
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('SADD', KEYS[2], KEYS[i])
  else redis.call('SREM', KEYS[2], KEYS[i]) end
end
return 1
"""
#: A process's shares written whole, unless a later batch was: KEYS: its last batch, its set of
#: hashes, its old hashes (ARGV[2] of them), its new ones; ARGV: the number, then per new hash
#: how many users, and each user and count.
_REWRITE_SCRIPT = """\
if tonumber(ARGV[1]) <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
local old = tonumber(ARGV[2])
for i = 3, 2 + old do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[2])
local a = 3
for i = 3 + old, #KEYS do
  for j = 1, tonumber(ARGV[a]) do redis.call('HSET', KEYS[i], ARGV[a + 2 * j - 1], ARGV[a + 2 * j]) end
  a = a + 1 + 2 * tonumber(ARGV[a])
  redis.call('SADD', KEYS[2], KEYS[i])
end
return 1
"""


def _presence_keys(endpoint: str, origin: str, room: str | None = None) -> tuple[str, str, str, str]:
    """The processes' stamps; a process's hash for the endpoint or a room, its set of hashes, its last batch."""
    tag = f"flask_websockets:{{{urllib.parse.quote(endpoint, safe='')}:presence}}"
    scope = "endpoint" if room is None else "room:" + hashlib.sha256(room.encode("utf-8")).hexdigest()[:32]
    return f"{tag}:processes", f"{tag}:{origin}:{scope}", f"{tag}:{origin}:hashes", f"{tag}:{origin}:applied"


def _presence_in(redis: Any, endpoint: str, room: str | None, exclude: str | None = None) -> dict[str, int]:
    """Connections per user id ("" for unidentified) of the endpoint or a room, of every live process but one."""
    redis = _node(redis, _presence_keys(endpoint, "")[0])
    processes = _presence_keys(endpoint, "")[0]
    seconds, microseconds = redis.time()
    live = redis.zrangebyscore(processes, (seconds - _PRESENCE_STALE) * 1000 + microseconds // 1000, "+inf")
    origins = [origin.decode() for origin in live if origin.decode() != exclude]
    pipeline = redis.pipeline(transaction=False)
    for origin in origins:
        pipeline.hgetall(_presence_keys(endpoint, origin, room)[1])
    counts: dict[str, int] = {}
    for share in pipeline.execute() if origins else ():
        for user, connections in share.items():
            user = user.decode("utf-8")
            counts[user] = counts.get(user, 0) + int(connections)
    return counts


def _drop_process(redis: Any, endpoint: str, origin: str) -> None:
    """Delete what a process keeps of presence: its stamp, its hashes, their set, its last batch."""
    processes, _, hashes, applied = _presence_keys(endpoint, origin)
    for key in [*redis.smembers(hashes), hashes, applied]:
        redis.delete(key)
    redis.zrem(processes, origin)


def _node(redis: Any, key: str) -> Any:
    """The client for the node that holds ``key``, on a Redis Cluster; else the client itself.

    A cluster's own pipeline asks a node for the keys of every EVAL it queues
    (a round trip each): a node's client pipelines them as a server's does.
    Keys that moved meanwhile fail the command, and the caller starts over.
    """
    if hasattr(redis, "get_node_from_key"):
        return redis.get_redis_connection(redis.get_node_from_key(key))
    return redis


class _MessageQueue:
    """One process's link to an endpoint's shards: a writer thread, and reader threads.

    The writer sends this process's broadcasts, in order, to its shard, and
    keeps its share of the endpoint's presence. A reader reads a group of
    shards (all of them, or one on a Redis Cluster) and hands what it reads to
    the event loop, at the pace the clients read.
    """

    def __init__(self, url: str, sockets: WebSockets) -> None:
        self.pid = os.getpid()  # threads do not survive a fork: a child makes its own queue
        self._url, self._sockets, self._endpoint = url, sockets, sockets.endpoint
        self._where = _check_queue_url(url, "message queue")
        _import_redis()  # here, not in a thread: its absence is the app's error
        self._origin = uuid.uuid4().hex
        self._keys = _shard_keys(self._endpoint, _shard_of(self._origin), self._origin)
        self._sequence = 0
        self._outbox: collections.deque = collections.deque()  # (sequence, entry), for the writer
        self._presence: dict[tuple[str | None, str], int] = {}  # changes not yet written: (room, user) -> delta
        self._resync = True  # this process's presence is to be written whole (at first, after an outage)
        self._presence_batch = 0  # the number of the last batch of changes to it (Redis applies each once)
        self._stamped = False  # whether it has stamped itself alive yet
        self._heartbeat_at = 0.0  # when the next heartbeat is due (time.monotonic)
        self._lock = _thread_lock()  # a number and its place in the outbox, one thread at a time
        self._work = _thread_lock()  # released when the writer has something to do
        self._work.acquire()
        self._query: Any = None  # a client for presence(), made at first use
        self._since = time.time()  # what was published from now on is for this process
        self._failing: set[str] = set()  # the threads that cannot reach Redis: one warning per outage
        self._reached = False  # a read has succeeded
        #: How old the newest entry of the last read was, in ms (Redis's clock against this host's): stats().
        self.lag_ms = 0.0
        self._dropped = 0  # broadcasts dropped from the outbox in this outage
        # Deliver in the loop of the thread that made the queue, if it runs one (under gevent's
        # servers: every connection's); else from the reader threads (Werkzeug: each its own).
        self._loop = gevent.get_hub().loop if gevent.getcurrent().parent is not None else None
        self._stopping = False
        streams = [_shard_keys(self._endpoint, shard)[0] for shard in range(_SHARDS)]
        groups = [[stream] for stream in streams] if _is_cluster(url) else [streams]
        self._running = []  # a lock each, held while its thread runs
        for loop in [self._write_forever] + [self._reader(group) for group in groups]:
            running = _thread_lock()
            running.acquire()
            self._running.append(running)
            _start_thread(self._run_thread, (loop, running))
        self._wake_writer()  # its first turn: this process's presence, and its heartbeat
        atexit.register(self._stop)

    def _run_thread(self, loop: Callable[[], None], running: Any) -> None:
        try:
            loop()
        finally:
            running.release()

    def _stop(self) -> None:
        """At exit, let every thread end its turn: one still running while the interpreter
        is torn down can crash it (seen with gevent 23.9). Redis keeps what was not read."""
        if os.getpid() != self.pid:  # a forked child's copy: its threads never ran here
            return
        self._stopping = True
        self._wake_writer()
        for running in self._running:
            if running.acquire(timeout=1.0):
                running.release()

    # -- writing: broadcasts and presence --------------------------------------------

    def publish(self, room: str | None, user: str | None, opcode: int, payload: bytes, compress: bool = True) -> None:
        """Hand a broadcast over to the writer thread; never blocks, from any thread."""
        self._enqueue(lambda sequence: _entry(self._origin, sequence, room, user, opcode, payload, compress))

    def publish_close(self, room: str | None, user: str | None, code: int, reason: str) -> None:
        """Hand a disconnect over to the writer thread, after the broadcasts before it."""
        self._enqueue(lambda sequence: _close_entry(self._origin, sequence, room, user, code, reason))

    def _enqueue(self, entry: Callable[[int], list[Any]]) -> None:
        with self._lock:
            self._sequence += 1
            self._outbox.append((self._sequence, entry(self._sequence)))
            self._trim_outbox()
        self._wake_writer()

    def presence_changed(self, room: str | None, user: str | None, change: int) -> None:
        """A connection of ``user`` (``None``: not identified) came to or left the endpoint or a room."""
        key = (room, user or "")
        with self._lock:
            total = self._presence.get(key, 0) + change
            if total:
                self._presence[key] = total
            else:
                self._presence.pop(key, None)
        self._wake_writer()

    def _trim_outbox(self) -> None:  # under the lock
        """Redis has been away a while: the oldest broadcasts go (a warning now, their count once it is back)."""
        while len(self._outbox) > _STREAM_LENGTH:
            if not self._dropped:
                logger.warning("message queue %s: %d broadcasts wait, the oldest go", self._where, _STREAM_LENGTH)
            self._outbox.popleft()
            self._dropped += 1

    def _wake_writer(self) -> None:
        try:
            self._work.release()
        except RuntimeError:  # released already
            pass

    def _write_forever(self) -> None:
        redis, backoff = None, 0.1
        while not self._stopping or self._outbox:
            self._work.acquire(timeout=1.0)
            with self._lock:
                batch, changes = list(self._outbox), self._presence
                self._outbox.clear()
                self._presence = {}
            heartbeat = time.monotonic() >= self._heartbeat_at
            if not (batch or changes or heartbeat or self._resync):
                continue
            try:
                redis = redis or _redis_client(self._url)
                if batch:
                    pipeline = _node(redis, self._keys[0]).pipeline(transaction=False)
                    for sequence, entry in batch:
                        _publish(pipeline, self._keys, sequence, entry)
                    pipeline.execute()
                if self._resync:
                    self._rewrite_presence(redis)
                elif changes:
                    self._write_changes(redis, changes)
                if heartbeat or self._resync:
                    self._heartbeat(redis)
            except Exception as error:  # noqa: BLE001 - whatever Redis does, retry later
                with self._lock:
                    self._outbox.extendleft(reversed(batch))  # in order, before what came since (added once)
                    self._trim_outbox()
                    self._resync = True  # which changes Redis took is not known: write them whole
                if self._stopping:  # the process is exiting: no later to retry in
                    break
                redis, backoff = None, self._retry_later("writer", error, backoff)
                continue
            self._recovered("writer")
            backoff = 0.1
            if self._dropped:
                logger.warning(
                    "message queue %s: %d broadcasts were dropped while it was away", self._where, self._dropped
                )
                self._dropped = 0
        self._withdraw(redis)

    def _write_changes(self, redis: Any, changes: dict[tuple[str | None, str], int]) -> None:
        """Apply a batch of changes to this process's shares, once, even if a late copy of it arrives."""
        self._presence_batch += 1
        _, _, hashes, applied = _presence_keys(self._endpoint, self._origin)
        shares = [_presence_keys(self._endpoint, self._origin, room)[1] for room, _ in changes]
        values = [value for (_, user), change in changes.items() for value in (user, change)]
        client = _node(redis, applied)
        client.execute_command("EVAL", _PRESENCE_SCRIPT, 2 + len(shares), applied, hashes, *shares,
                               self._presence_batch, *values)  # fmt: skip

    def _rewrite_presence(self, redis: Any) -> None:
        """Write this process's shares whole: at first, after an outage, or when Redis lost them."""
        with self._sockets._lock, self._lock:  # the registry and its changes, at one moment
            if self._sockets._queue is not self:  # not yet the endpoint's: changes would not reach it
                return
            snapshot = self._sockets._presence_snapshot()
            self._presence = {}
            self._resync = False
            self._presence_batch += 1
        _, _, hashes, applied = _presence_keys(self._endpoint, self._origin)
        client = _node(redis, applied)
        old = client.smembers(hashes)
        shares = [_presence_keys(self._endpoint, self._origin, room)[1] for room in snapshot]
        values: list[Any] = []
        for users in snapshot.values():
            values.append(len(users))
            for user, count in users.items():
                values += [user, count]
        try:
            client.execute_command("EVAL", _REWRITE_SCRIPT, 2 + len(old) + len(shares), applied, hashes, *old,
                                   *shares, self._presence_batch, len(old), *values)  # fmt: skip
        except Exception:
            with self._lock:
                self._resync = True
            raise

    def _heartbeat(self, redis: Any) -> None:
        """Stamp this process alive, in Redis's clock; clear away what dead processes left.

        A stamp that was missing (Redis lost its data, or another process took
        this one for dead during a long pause) means its shares may be gone
        too: they are written whole again.
        """
        processes = _presence_keys(self._endpoint, "")[0]
        client = _node(redis, processes)
        seconds, microseconds = client.time()
        now = seconds * 1000 + microseconds // 1000
        if client.zadd(processes, {self._origin: now}) and self._stamped:
            with self._lock:
                self._resync = True
            self._wake_writer()
        self._stamped = True
        for dead in client.zrangebyscore(processes, "-inf", now - 4 * _PRESENCE_STALE * 1000):
            _drop_process(client, self._endpoint, dead.decode())
        self._heartbeat_at = time.monotonic() + _HEARTBEAT

    def _withdraw(self, redis: Any) -> None:
        """The process is exiting: its connections no longer count (a best effort)."""
        if redis is None or os.getpid() != self.pid:
            return
        try:
            _drop_process(_node(redis, _presence_keys(self._endpoint, "")[0]), self._endpoint, self._origin)
        except Exception:  # noqa: BLE001 - a dead process's keys are cleared by the others
            pass

    def presence_elsewhere(self, room: str | None) -> dict[str, int]:
        """Connections per user id ("" for unidentified) in every other live process; ``{}`` without Redis."""
        if self._failing:  # Redis is away: do not wait for it, and say so once (when it went)
            return {}
        try:
            if self._query is None:
                self._query = _redis_client(self._url)
            return _presence_in(self._query, self._endpoint, room, exclude=self._origin)
        except Exception as error:  # noqa: BLE001 - presence is then this process's
            if not self._failing:
                logger.warning("message queue %s: no presence from other processes (%s)", self._where, error)
            return {}

    # -- reading ---------------------------------------------------------------------

    def _reader(self, streams: list[str]) -> Callable[[], None]:
        return lambda: self._read_forever(streams)

    def _read_forever(self, streams: list[str]) -> None:
        redis, backoff, origin = None, 0.1, self._origin.encode()
        positions: dict[str, str] = {}  # stream -> the last entry read
        while not self._stopping:
            try:
                if redis is None:
                    redis = _redis_client(self._url)
                    positions = self._positions(redis, streams, positions)
                response = redis.xread(positions, count=1000, block=1000)
            except Exception as error:  # noqa: BLE001
                redis, backoff = None, self._retry_later("reader", error, backoff)
                continue
            self._recovered("reader")
            self._reached, backoff = True, 0.1
            self._deliver(response or (), positions, origin)
            del response  # nothing read is kept while the next read waits

    def _deliver(self, response: Any, positions: dict[str, Any], origin: bytes) -> None:
        """Deliver what a read gave, but this process's own entries (done at once), and note where it got."""
        batch: list[tuple[str | None, str | None, Any]] = []
        newest = 0
        for key, entries in response:
            if entries:
                newest = max(newest, _entry_id(entries[-1][0])[0])
            for entry_id, fields in entries:
                positions[key.decode() if isinstance(key, bytes) else key] = entry_id
                if fields.get(b"v") != b"2" or fields.get(b"o") == origin:
                    continue  # another format, or our own
                room, user = fields.get(b"r"), fields.get(b"u")
                room, user = room and room.decode("utf-8"), user and user.decode("utf-8")
                if not self._sockets._reaches(room, user):
                    continue  # nobody here it is for: the event loop is not even woken
                kind = fields.get(b"k")
                if kind is None:
                    opcode = _OP_TEXT if fields[b"t"] == b"text" else _OP_BINARY
                    batch.append((room, user, _Prepared(opcode, fields[b"d"], compress=fields.get(b"c") != b"0")))
                elif kind == b"close":
                    batch.append((room, user, (int(fields[b"code"]), fields.get(b"why", b"").decode("utf-8"))))
                # another kind: a later version's, which this one does not know
        self.lag_ms = max(0.0, time.time() * 1000 - newest) if newest else 0.0  # nothing new: caught up
        for part in _parts(batch, 256 * 1024):
            self._sockets._compress_ahead([item for _, _, item in part if isinstance(item, _Prepared)])
            self._hand_over(part)

    def _positions(self, redis: Any, streams: list[str], positions: dict[str, str]) -> dict[str, str]:
        """Where to read each stream from, on (re)connecting.

        From the last entry read; from the start of a stream that Redis lost
        with its data (a restart without persistence, a failover to a replica
        that had not caught up), whose newest entry is older than that; at
        first, from when this queue began, in Redis's clock (which makes entry
        ids), 50 ms early: the estimate is good to a round trip.
        """
        seconds, microseconds = redis.time()
        start = f"{int((seconds + microseconds / 1e6 - (time.time() - self._since)) * 1000) - 50}-0"
        fresh = {}
        for stream in streams:
            last = positions.get(stream)
            if last is None:
                fresh[stream] = start
                continue
            newest = redis.xrevrange(stream, count=1)
            newest_id = newest[0][0] if newest else b"0-0"
            fresh[stream] = last if _entry_id(newest_id) >= _entry_id(last) else "0-0"
        return fresh

    def _hand_over(self, batch: list[tuple[str | None, str | None, Any]]) -> None:
        """Deliver, at the pace the clients read: the rest waits in Redis, not in memory.

        A broadcast in this process cannot wait; these can. The next part goes
        once the connections' send buffers are less than half full, or after
        100 ms: a client that reads slowly then falls behind alone, and is
        closed as too slow once its buffer is full.
        """
        if self._loop is None:
            self._sockets._deliver_remote(batch)
            return
        delivered = _thread_lock()  # released by the loop once the batch is delivered
        delivered.acquire()
        try:
            self._loop.run_callback_threadsafe(self._deliver_paced, batch, delivered)
        except ValueError:  # the loop is gone (its thread ended): deliver from here from now on
            self._loop = None
            self._sockets._deliver_remote(batch)
            return
        delivered.acquire(timeout=10)  # the loop is gone if it takes that long

    def _deliver_paced(self, batch: list[tuple[str | None, str | None, Any]], delivered: Any) -> None:  # in the loop
        written = self._sockets._deliver_remote(batch)
        if any(conn._backlogged() for conn in written):
            gevent.spawn(self._wait_for_buffers, written, delivered)
        else:
            delivered.release()

    def _wait_for_buffers(self, written: list[Connection], delivered: Any) -> None:
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline and any(conn._backlogged() for conn in written):
            gevent.sleep(0.005)
        delivered.release()

    def _retry_later(self, thread: str, error: Exception, backoff: float) -> float:
        """Note that Redis failed ``thread``, wait twice ``backoff`` (up to 2 s), and return that."""
        if not self._failing:
            logger.warning(
                "message queue %s unreachable (%s): broadcasts reach this process only, until it is back",
                self._where,
                error,
            )
        self._failing.add(thread)
        backoff = min(backoff * 2, 2.0)
        _sleep(backoff)
        return backoff

    @property
    def connected(self) -> bool:
        """Whether it reads from Redis: it has, and no thread of it fails to now."""
        return self._reached and not self._failing

    def _recovered(self, thread: str) -> None:
        if thread in self._failing:
            self._failing.discard(thread)
            if not self._failing:
                logger.warning("message queue %s reachable again", self._where)


def _entry_id(entry_id: bytes | str) -> tuple[int, int]:
    milliseconds, _, sequence = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(milliseconds), int(sequence or 0)


def _parts(batch: list[Any], size: int) -> Iterator[list[Any]]:
    """Cut a batch of ``(room, user, _Prepared or a close)`` into parts of about ``size`` bytes of payload."""
    part: list[Any] = []
    total = 0
    for item in batch:
        part.append(item)
        total += len(item[2].payload) if isinstance(item[2], _Prepared) else 0
        if total >= size:
            yield part
            part, total = [], 0
    if part:
        yield part


# -- queue URLs ----------------------------------------------------------------

#: The URL schemes of a message queue: a server (Valkey's are Redis's), a Redis
#: Cluster, or the master that Redis Sentinel names; an ``s`` for TLS.
_QUEUE_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "redis+cluster", "rediss+cluster",
                  "redis+sentinel", "rediss+sentinel")  # fmt: skip


def _check_queue_url(url: Any, what: str) -> str:
    """Check a queue URL without connecting; return it as log lines show it: no password.

    A ``ValueError`` names ``what`` (the setting or the argument) and the forms
    that work.
    """
    scheme, separator, _ = url.partition("://") if isinstance(url, str) else (None, None, None)
    try:
        if not separator or scheme not in _QUEUE_SCHEMES:
            raise ValueError("unknown scheme")
        if "+" in scheme:
            nodes, _, _, path = _nodes_and_path(url)
            return f"{scheme}://{','.join(f'{host}:{port}' for host, port in nodes)}{'/' if path else ''}{path}"
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        if scheme != "unix" and parts.port is None:  # where it really goes: the port too
            netloc = f"{netloc or 'localhost'}:6379"
        return f"{scheme}://{netloc}{parts.path}"
    except ValueError as error:
        raise ValueError(
            f"{what} must be None or a redis://, rediss://, unix://, valkey://, valkeys:// URL, a"
            " redis+cluster://host:port[,host:port...] or a redis+sentinel://host:port[,host:port...]/db/service_name"
            f" URL (rediss+ with TLS), not {url!r} ({error})"
        ) from None


def _nodes_and_path(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, str]:
    """A cluster's or a sentinel's URL: its nodes, user name, password, and path."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for node in hosts.split(","):
        host, colon, port = node.rpartition(":")
        if not colon:
            host, port = port, ""
        if not host or (port and not port.isdigit()):
            raise ValueError(f"not a host:port: {node!r}")
        nodes.append((host, int(port) if port else 26379 if "sentinel" in scheme else 6379))
    if "sentinel" in scheme:
        db, _, service = path.partition("/")
        if not db.isdigit() or not service or "/" in service:
            raise ValueError("a sentinel URL ends with /db/service_name")
    unquote = urllib.parse.unquote
    return nodes, unquote(username) or None, unquote(password) or None, path


def _is_cluster(url: str) -> bool:
    return url.partition("://")[0].endswith("+cluster")


def _redis_client(url: str, timeout: float = 5.0) -> Any:
    """A redis-py client for a queue URL: a server, a Redis Cluster, or the master Sentinel names.

    Its timeout (5 s) outlasts a reader's blocking read (1 s): a connection
    gone silent is noticed.
    """
    redis = _import_redis()
    options: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout)
    scheme, _, rest = url.partition("://")
    tls = scheme.startswith(("rediss", "valkeys"))
    if scheme in ("valkey", "valkeys"):
        url = ("rediss" if tls else "redis") + "://" + rest
    if "+" not in scheme:
        return redis.Redis.from_url(url, **options)
    nodes, username, password, path = _nodes_and_path(url)
    if scheme.endswith("+cluster"):
        from redis.cluster import ClusterNode, RedisCluster

        startup = [ClusterNode(host, port) for host, port in nodes]
        return RedisCluster(startup_nodes=startup, username=username, password=password, ssl=tls, **options)
    from redis.sentinel import Sentinel

    db, _, service = path.partition("/")
    sentinel = Sentinel(nodes, sentinel_kwargs=dict(options, ssl=tls), ssl=tls, **options)
    return sentinel.master_for(service, db=int(db), username=username, password=password)


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError('a message queue needs redis-py: python -m pip install "Flask-Websockets[redis]"') from None
    return redis


_start_thread = gevent.monkey.get_original("_thread", "start_new_thread")
_sleep = gevent.monkey.get_original("time", "sleep")
_queue_lock = _thread_lock()  # one queue per endpoint and process, whichever threads ask at once


# ---------------------------------------------------------------------------
# Metrics: stats() for Prometheus
# ---------------------------------------------------------------------------

# With ``WEBSOCKETS_METRICS = True``, every such endpoint's ``stats()`` are in
# prometheus_client's default registry, labelled with the endpoint's name. In
# one process, a collector reads ``stats()`` at each scrape: nothing on the
# hot path. Under gunicorn's multi-process mode (``PROMETHEUS_MULTIPROC_DIR``
# set) a scrape reads the files that every worker writes, so each worker copies
# its figures into prometheus_client's own metrics, every
# ``_METRICS_INTERVAL`` seconds, from a thread started by its first connection.

#: (stats() key, metric name, kind, help, label of a dict's keys, how workers add up, scale).
_METRICS = [
    ("connections", "connections", "gauge", "Websockets open now", None, "livesum", 1),
    ("connections_opened", "connections_opened", "counter", "Websockets opened", None, "", 1),
    ("closes", "closes", "counter", "Websockets ended, by close code", "code", "", 1),
    ("messages_received", "messages_received", "counter", "Messages received", None, "", 1),
    ("messages_sent", "messages_sent", "counter", "Messages sent", None, "", 1),
    ("bytes_received", "bytes_received", "counter", "Bytes received, frames as on the wire", None, "", 1),
    ("bytes_sent", "bytes_sent", "counter", "Bytes sent, frames as on the wire", None, "", 1),
    ("slow_clients_closed", "slow_clients_closed", "counter", "Clients closed as too slow", None, "", 1),
    ("rate_limited", "rate_limited", "counter", "Pauses of a client's reading for the rate limit", None, "", 1),
    ("handshakes_refused", "handshakes_refused", "counter", "Handshakes refused, by HTTP status", "status", "", 1),
    ("queue_connected", "queue_connected", "gauge", "1 while the message queue reads Redis", None, "livemin", 1),
    ("queue_lag_ms", "queue_lag_seconds", "gauge", "Age of the newest queue message read", None, "livemax", 1e-3),
]
_METRICS_INTERVAL = 1.0
_metered: list[WebSockets] = []  # the endpoints whose stats() are exported
_metrics_copier: list[Any] | None = None  # multi-process mode: [pid of the copying thread, the metrics]


def _export_metrics(sockets: WebSockets) -> None:
    """Export an endpoint's stats() to Prometheus (``WEBSOCKETS_METRICS``); the first also sets it up."""
    global _metrics_copier
    prometheus = _import_prometheus()
    with _queue_lock:
        if sockets in _metered:
            return
        _metered.append(sockets)
        if len(_metered) > 1:
            return
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            _metrics_copier = [None, _worker_metrics(prometheus)]
        else:
            prometheus.REGISTRY.register(_Collector())


class _Collector:
    """prometheus_client's custom collector: the endpoints' stats() at each scrape."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = [(sockets.endpoint, sockets.stats()) for sockets in list(_metered)]
        for key, name, kind, text, label, _, scale in _METRICS:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                f"flask_websockets_{name}", text, labels=["endpoint"] + ([label] if label else [])
            )
            for endpoint, stats in figures:
                if key not in stats:
                    continue  # no queue
                if label:
                    for value, count in sorted(stats[key].items(), key=str):
                        family.add_metric([endpoint, str(value)], count)
                else:
                    family.add_metric([endpoint], float(stats[key]) * scale)
            yield family


def _worker_metrics(prometheus: Any) -> dict[str, Any]:
    metrics = {}
    for key, name, kind, text, label, mode, _ in _METRICS:
        labels = ["endpoint"] + ([label] if label else [])
        if kind == "gauge":
            metrics[key] = prometheus.Gauge(f"flask_websockets_{name}", text, labels, multiprocess_mode=mode)
        else:
            metrics[key] = prometheus.Counter(f"flask_websockets_{name}", text, labels)
    return metrics


def _copy_metrics_from_here() -> None:
    """Multi-process mode: start this process's thread that copies stats() into its metric files."""
    with _queue_lock:
        assert _metrics_copier is not None
        if _metrics_copier[0] == os.getpid():
            return
        _metrics_copier[0] = os.getpid()
    _start_thread(_copy_metrics_forever, (_metrics_copier[1],))


def _copy_metrics_forever(metrics: dict[str, Any]) -> None:
    copied: dict[tuple[str, ...], float] = {}  # what each counter has been given so far
    while True:
        try:
            for sockets in list(_metered):
                _copy_metrics(sockets.endpoint, sockets.stats(), metrics, copied)
        except Exception:  # noqa: BLE001 - metrics must never stop; say why they lag
            logger.exception("copying metrics for prometheus_client")
        _sleep(_METRICS_INTERVAL)


def _copy_metrics(endpoint: str, stats: dict[str, Any], metrics: dict[str, Any], copied: dict) -> None:
    for key, _, kind, _, label, _, scale in _METRICS:
        if key not in stats:
            continue
        values = {(endpoint, str(k)): v for k, v in stats[key].items()} if label else {(endpoint,): stats[key]}
        for labels, value in values.items():
            if kind == "gauge":
                metrics[key].labels(*labels).set(float(value) * scale)
            else:  # counters only go up: add what came since the last copy
                metrics[key].labels(*labels).inc(value - copied.get((key, *labels), 0))
                copied[(key, *labels)] = value


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ImportError(
            'WEBSOCKETS_METRICS needs prometheus_client: python -m pip install "Flask-Websockets[metrics]"'
        ) from None
    return prometheus_client


# ---------------------------------------------------------------------------
# The test client
# ---------------------------------------------------------------------------


class HandshakeRefused(Exception):
    """The app answered a test client's handshake with an HTTP response.

    ``status_code`` is its status, and ``response`` the Flask test response::

        with pytest.raises(HandshakeRefused) as refused:
            sockets.test_client()
        assert refused.value.status_code == 401
    """

    def __init__(self, response: Any) -> None:
        super().__init__(f"the handshake was refused: {response.status}")
        self.response = response
        self.status_code: int = response.status_code


class WebSocketTestClient:
    """A connection to a websocket endpoint for tests: ``sockets.test_client()``.

    It goes through the endpoint's real code: handshake checks, contexts,
    hooks, handlers, error handlers and broadcasts, without a server. Its
    socket is one end of a socket pair, and the endpoint runs in a greenlet,
    so tests need no server and no threads::

        def test_echo():
            with sockets.test_client() as client:
                client.send("hi")
                assert client.receive() == "hi"

    Attributes:
        subprotocol: the subprotocol the endpoint chose, or ``None``.
        compression: the permessage-deflate parameters the endpoint agreed
            to, or ``None``: it did not, or the client did not offer.
        closed: whether the connection is closed.
        close_code: the code it was closed with (1006 if dropped).
        close_reason: the reason that came with it.
    """

    __test__ = False  # not a test class, for pytest

    def __init__(self, http_client: Any, path: str, compression: bool = False, **request: Any) -> None:
        self.subprotocol: str | None = None
        self.compression: str | None = None
        self._proto = _Protocol(client=True, max_size=None)  # the server's own codec, checking its frames
        self._messages: list[Message] = []
        self._error: BaseException | None = None
        self._sock, server_sock = gevent.socket.socketpair()
        accepted = gevent.event.Event()

        def accept(subprotocol: str | None, extensions: str | None = None) -> tuple[Any, Any]:
            self.subprotocol, self.compression = subprotocol, extensions
            accepted.set()
            return server_sock, io.BytesIO()  # nothing came with the handshake

        def serve() -> Any:
            request["environ_overrides"] = {**(request["environ_overrides"] or {}), "flask_websockets.accept": accept}
            offer = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"} if compression else {}
            request["headers"] = {**_TEST_HANDSHAKE, **offer, **(request["headers"] or {})}
            try:
                return http_client.get(path, **request)
            except BaseException as error:  # raised again in the test, where it belongs
                self._error = error
            finally:
                server_sock.close()

        self._server = gevent.spawn(serve)
        gevent.wait([accepted, self._server], count=1)
        if not accepted.is_set():
            self._server.join()
            self._sock.close()
            self._raise_server_error()
            raise HandshakeRefused(self._server.value)
        if self.compression is not None:  # checked as a browser would: an answer it did not offer fails
            self._proto.deflate = _client_deflate(self.compression if compression else "")

    @property
    def closed(self) -> bool:
        return self._proto.state is not _P_OPEN

    @property
    def close_code(self) -> int | None:
        return self._proto.close_code

    @property
    def close_reason(self) -> str:
        return self._proto.close_reason

    def __enter__(self) -> WebSocketTestClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self.close()
        except Exception:
            if exc_info[0] is None:  # else the test's own error matters more
                raise

    def send(self, message: str | bytes, compress: bool = True) -> None:
        """Send a text (``str``) or binary (``bytes``) message to the endpoint.

        With compression agreed, it goes compressed unless ``compress=False``.
        """
        if self._proto.state is not _P_OPEN:
            raise ConnectionClosed(f"the connection is closed: {self.close_code} {self.close_reason}")
        self._sock.sendall(self._proto.message(message, compress))

    def receive(self, timeout: float = 1.0) -> Message:
        """Return the next message from the endpoint: ``str`` or ``bytes``.

        Waits up to ``timeout`` seconds, then raises ``TimeoutError``. Once
        the endpoint has closed the connection, it raises
        :class:`ConnectionClosed` (``close_code`` says how), or the handler
        error that closed it, if errors propagate (``app.testing``). A frame
        that breaks RFC 6455 closes it with 1002 and the reason.
        """
        try:
            with gevent.Timeout(timeout, TimeoutError(f"no message within {timeout} s")):
                while not self._messages and self._proto.state is not _P_CLOSED:
                    self._read()
        finally:
            if self._proto.state is _P_CLOSED and not self._messages:
                self._finish()
        if not self._messages:
            raise ConnectionClosed(f"the endpoint closed the connection: {self.close_code} {self.close_reason}")
        return self._messages.pop(0)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection, and wait until the endpoint is done with it.

        Its ``on_close`` hooks have run when this returns. A handler error
        that propagated (``app.testing``) is raised here.
        """
        if self._proto.state is _P_OPEN:
            self._proto.send_close(code, reason)
            self._sock.sendall(self._proto.data_to_send())
        with gevent.Timeout(5, False):
            while self._proto.state is not _P_CLOSED:
                self._read()
        self._finish()

    def _finish(self) -> None:
        self._sock.close()  # the endpoint reads until the client's side is closed
        self._server.join(timeout=5)
        self._raise_server_error()

    def _raise_server_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _read(self) -> None:
        try:
            data = self._sock.recv(65536)
        except TimeoutError:  # receive()'s timeout, an OSError
            raise
        except OSError:  # reset: as good as closed
            data = b""
        if data:
            self._proto.receive_data(data)
        else:
            self._proto.receive_eof()
        while True:
            event = self._proto.next_event()
            if event is None:
                break
            if event[0] == _OP_TEXT or event[0] == _OP_BINARY:
                self._messages.append(event[1])
        answer = self._proto.data_to_send()  # pongs, and the answer to a close frame
        if answer:
            try:
                self._sock.sendall(answer)
            except OSError:
                pass


_TEST_HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


# ---------------------------------------------------------------------------
# Settings and replies
# ---------------------------------------------------------------------------

#: Configuration keys, set on ``app.config`` by :meth:`WebSockets.init_app`
#: unless already there. ``None`` turns a limit or a timeout off. They are
#: checked at ``init_app`` and again when a connection opens (apps may change
#: their config in between): a bad value is a ``ValueError`` naming the key.
_CONFIG_DEFAULTS: dict[str, Any] = {
    # Largest message accepted, in bytes; a larger one closes with 1009.
    "WEBSOCKETS_MAX_MESSAGE_SIZE": 1 << 20,
    # Seconds of silence before the server pings the client.
    "WEBSOCKETS_PING_INTERVAL": 25.0,
    # Seconds the client has to answer that ping before it is closed with 1011.
    "WEBSOCKETS_PING_TIMEOUT": 20.0,
    # Seconds to wait for the client's close frame after the server's.
    "WEBSOCKETS_CLOSE_TIMEOUT": 5.0,
    # Origins whose pages may connect: None for the page's own origin only
    # (a handshake without Origin, from a non-browser client, is allowed),
    # a list such as ["https://example.com"], or "*" for any.
    "WEBSOCKETS_ALLOWED_ORIGINS": None,
    # Bytes that may wait for a slow client, per connection: past them
    # ws.send() waits, and broadcast() closes the client as too slow.
    "WEBSOCKETS_MAX_SEND_BUFFER": 1 << 20,
    # Seconds a client may take nothing at all before it is closed as too slow.
    "WEBSOCKETS_SEND_TIMEOUT": 10.0,
    # (messages per second, burst): past it, the server stops reading a client's
    # socket until it may go on; its handlers see at most that. None: no limit.
    "WEBSOCKETS_RATE_LIMIT": None,
    # A Redis URL: broadcasts reach the connections of every process that
    # serves the endpoint with the same one. redis://, rediss:// (TLS),
    # unix://, valkey://, valkeys://, redis+cluster://host:port[,host:port...]
    # or redis+sentinel://host:port[,host:port...]/db/service_name.
    "WEBSOCKETS_MESSAGE_QUEUE": None,
    # Whether stats() go to prometheus_client's default registry (it must be installed).
    "WEBSOCKETS_METRICS": False,
    # Whether to compress messages when the client offers to (permessage-deflate).
    "WEBSOCKETS_COMPRESSION": False,
    # With compression, messages shorter than this many bytes go as they are.
    "WEBSOCKETS_COMPRESSION_MIN_SIZE": 1024,
    # With compression, whether a message may refer to earlier ones (context
    # takeover): smaller messages, and 4 KiB more per connection each way.
    "WEBSOCKETS_COMPRESSION_CONTEXT_TAKEOVER": True,
}


class _Settings(NamedTuple):
    """The ``WEBSOCKETS_*`` configuration of an app, checked."""

    max_message_size: int | None
    ping_interval: float | None
    ping_timeout: float | None
    close_timeout: float | None
    allowed_origins: Any  # None, "*", or a frozenset of _origin_key()s
    max_send_buffer: int
    send_timeout: float | None
    rate_limit: tuple[float, float] | None
    message_queue: str | None
    metrics: bool
    compression: bool
    compression_min_size: int
    compression_takeover: bool


def _settings(app: Flask) -> _Settings:
    """The app's settings, checked again when its config changed; a ``ValueError`` names a bad key."""
    get = app.config.get
    raw = [get(key) for key in _CONFIG_DEFAULTS]
    cached = app.extensions.get("flask_websockets.settings")
    if cached is None or cached[0] != raw:
        settings = _check_settings({key: get(key, default) for key, default in _CONFIG_DEFAULTS.items()})
        # A copy of a list, set or dict, of the same type (a list never equals a set): a change in place shows.
        copies = [value.copy() if isinstance(value, (list, set, dict)) else value for value in raw]
        cached = app.extensions["flask_websockets.settings"] = copies, settings
    return cached[1]  # type: ignore[no-any-return]


def _check_settings(values: dict[str, Any]) -> _Settings:
    def positive(key: str, integer: bool = False, optional: bool = True) -> Any:
        value = values[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not 0 < value < 1e18:
            what = "a positive whole number of bytes" if integer else "a positive number of seconds"
            raise ValueError(f"{key} must be {what}{' or None' if optional else ''}, not {value!r}")
        return value

    origins = values["WEBSOCKETS_ALLOWED_ORIGINS"]
    if origins is not None and origins != "*":
        example = "None, '*' or a list of origins such as ['https://example.com']"
        if isinstance(origins, (str, bytes)) or not isinstance(origins, Iterable):
            raise ValueError(f"WEBSOCKETS_ALLOWED_ORIGINS must be {example}, not {origins!r}")
        keys = [_origin_key(origin) if isinstance(origin, str) else None for origin in origins]
        for origin, key in zip(origins, keys):
            if key is None:
                raise ValueError(f"WEBSOCKETS_ALLOWED_ORIGINS: {origin!r} is not an origin like 'https://example.com'")
        origins = frozenset(keys)
    for switch in ("WEBSOCKETS_COMPRESSION", "WEBSOCKETS_COMPRESSION_CONTEXT_TAKEOVER", "WEBSOCKETS_METRICS"):
        if not isinstance(values[switch], bool):
            raise ValueError(f"{switch} must be True or False, not {values[switch]!r}")
    min_size = values["WEBSOCKETS_COMPRESSION_MIN_SIZE"]
    if isinstance(min_size, bool) or not isinstance(min_size, int) or not 0 <= min_size < 1e18:
        raise ValueError(f"WEBSOCKETS_COMPRESSION_MIN_SIZE must be a number of bytes, 0 or more, not {min_size!r}")
    queue = values["WEBSOCKETS_MESSAGE_QUEUE"]
    if queue is not None:
        _check_queue_url(queue, "WEBSOCKETS_MESSAGE_QUEUE")
    return _Settings(
        max_message_size=positive("WEBSOCKETS_MAX_MESSAGE_SIZE", integer=True),
        ping_interval=positive("WEBSOCKETS_PING_INTERVAL"),
        ping_timeout=positive("WEBSOCKETS_PING_TIMEOUT"),
        close_timeout=positive("WEBSOCKETS_CLOSE_TIMEOUT"),
        allowed_origins=origins,
        max_send_buffer=positive("WEBSOCKETS_MAX_SEND_BUFFER", integer=True, optional=False),
        send_timeout=positive("WEBSOCKETS_SEND_TIMEOUT"),
        rate_limit=_check_rate_limit(values["WEBSOCKETS_RATE_LIMIT"]),
        message_queue=queue,
        metrics=values["WEBSOCKETS_METRICS"],
        compression=values["WEBSOCKETS_COMPRESSION"],
        compression_min_size=min_size,
        compression_takeover=values["WEBSOCKETS_COMPRESSION_CONTEXT_TAKEOVER"],
    )


def _check_rate_limit(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    numbers = isinstance(value, (tuple, list)) and len(value) == 2
    if numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        rate, burst = value
        if 0 < rate < 1e9 and 1 <= burst < 1e9:
            return float(rate), float(burst)
    raise ValueError(
        f"WEBSOCKETS_RATE_LIMIT must be None or (messages per second, burst), such as (20, 40), not {value!r}"
    )


_DEFAULT_SETTINGS = _check_settings(dict(_CONFIG_DEFAULTS))


def _payload(value: Reply, who: str | Callable[..., Any]) -> tuple[int, bytes] | None:
    """``(opcode, payload)`` for a sent message or a handler's reply, or ``None`` for ``None``.

    ``who`` is the sending function's name, or the handler, for the error message.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _OP_TEXT, value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return _OP_BINARY, bytes(value) if isinstance(value, bytearray) else value
    if isinstance(value, memoryview):
        return _OP_BINARY, value.tobytes()  # its bytes, whatever its item size or shape
    if isinstance(value, _WerkzeugResponse):
        body = value.get_data()
        if (value.mimetype or "").startswith("text/") or value.is_json:
            # Text frames are UTF-8, whatever charset the response declares.
            charset = value.mimetype_params.get("charset", "utf-8")
            return _OP_TEXT, body.decode(charset).encode("utf-8")
        return _OP_BINARY, body
    if callable(who):
        who = f"message handler {_name(who)}()"
    raise TypeError(
        f"{who} got {type(value).__name__}: a websocket message must be str (text),"
        " bytes, bytearray or memoryview (binary), or a Flask response such as"
        " jsonify(...); return None to send nothing"
    )


# ---------------------------------------------------------------------------
# The protocol core: RFC 6455 without I/O
# ---------------------------------------------------------------------------
#
# Everything below knows nothing of Flask, gevent or sockets: it turns bytes
# into events and messages into bytes. The server's connection and the test
# client both use it, so the test client checks every frame the server sends.

_OP_CONTINUATION, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA
_RSV1 = 0x40  # in a message's first frame: the message is compressed (RFC 7692)
_FAILED = -1  # the kind of event that reports a protocol error

#: Each frame after the first of a message counts as at least this many bytes
#: against the size limit: a flood of tiny or empty fragments ends in 1009.
_MIN_FRAME_COST = 64


class _State(enum.Enum):
    """Where a connection is in its life (RFC 6455 section 7)."""

    OPEN = "open"  # messages flow both ways
    CLOSING = "closing"  # our close frame is out: input is discarded until the peer's
    CLOSED = "closed"  # close frames exchanged, or the connection failed or was lost


# The protocol core's states, P for protocol (a connection's own life cycle is a _Life).
_P_OPEN, _P_CLOSING, _P_CLOSED = _State.OPEN, _State.CLOSING, _State.CLOSED


class _Protocol:
    """One end of a websocket connection, as bytes in and events out.

    Feed it what the socket received with :meth:`receive_data` (and
    :meth:`receive_eof` at the end), take events from :meth:`next_event` until
    it returns ``None``, and send what :meth:`data_to_send` returns. An event
    is a tuple ``(kind, data)``:

    ========================  ==========================================================
    ``(_OP_TEXT, str)``       a text message; ``(_OP_BINARY, bytes)`` a binary one
    ``(_OP_PING, bytes)``     a ping, already answered: the pong is in ``data_to_send()``
    ``(_OP_PONG, bytes)``     a pong
    ``(_OP_CLOSE, (c, r))``   the peer's close frame, with its code and reason; if the
                              peer started the closing handshake, the answer is queued
    ``(_FAILED, (c, r))``     the peer broke RFC 6455 or the size limit: the close frame
                              with code ``c`` is queued, and input is discarded
    ========================  ==========================================================

    ``state`` goes from OPEN to CLOSING when this end sends its close frame
    (:meth:`send_close`, or a failure), and to CLOSED when the closing
    handshake is over or the connection ends. In CLOSING, frames are skipped
    unread until the peer's close frame, whatever they are.

    The parser is lazy: it parses only as far as the next event, so a caller
    that stops asking bounds what it holds. A message under way is kept in one
    buffer that grows as its bytes arrive (nothing is allocated for an
    announced length), unmasked and, for text, checked for UTF-8 on the way:
    invalid text fails at the first bad byte. ``max_size`` bounds it, counting
    each frame after the first as at least ``_MIN_FRAME_COST`` bytes.

    A message over ``max_size`` fails at once (1009). When it grew past the
    limit fragment by fragment, its close frame waits until the client has
    sent the rest of that message, which is skipped: a browser cut short in
    the middle of a message would see an unclean close. :meth:`close_now`
    sends it without waiting any longer. A single frame that announces more
    than the limit gets its close frame at once.

    With ``deflate`` (a :class:`_Deflate`, once permessage-deflate is agreed),
    messages with RSV1 set are inflated as their bytes arrive, and the
    inflated size counts against ``max_size``: a decompression bomb fails
    with 1009 once it has inflated ``max_size`` bytes, not at its end.
    """

    __slots__ = (
        "client", "max_size", "deflate", "state", "close_code", "close_reason", "_buf", "_pos", "_eof",
        "_output", "_mask_bit", "_left", "_fin", "_mask", "_phase", "_skip", "_opcode", "_message", "_size",
        "_decoder", "_inflater", "_deferred", "peer_closed", "_mask_size",
    )  # fmt: skip

    def __init__(self, client: bool = False, max_size: int | None = 1 << 20, deflate: _Deflate | None = None) -> None:
        self.client = client
        self.max_size = max_size
        self.deflate = deflate  # permessage-deflate, if agreed
        self.state = _P_OPEN
        self.close_code: int | None = None  # this end's, if it closed first; else the peer's (1006: lost)
        self.close_reason = ""
        self.peer_closed = False  # the peer's close frame came: it sends nothing more (RFC 6455 5.5.1)
        self._buf: bytes = b""  # received bytes, parsed up to _pos
        self._pos = 0
        self._eof = False
        self._output: list[bytes] = []  # automatic answers: pongs and close frames
        self._mask_bit = 0 if client else 0x80  # clients mask every frame; servers never do
        self._mask_size = 0 if client else 4
        # The frame whose payload is arriving:
        self._left = 0  # payload bytes still to come
        self._fin = 0
        self._mask: bytes | None = None
        self._phase = 0  # payload bytes unmasked so far (where the mask stands)
        self._skip = False  # its payload is discarded
        # The message being assembled from one or more frames:
        self._opcode = 0  # 0: none
        self._message: bytearray | None = None
        self._size = 0  # its cost against max_size
        self._decoder: Any = None  # an incremental UTF-8 decoder, for text
        self._inflater: Any = None  # a zlib decompressor, for a compressed message
        self._deferred: bytes | None = None  # a 1009 close frame, until the oversized message ends

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes received from the peer."""
        if self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:  # a partial header, or frames the caller has not asked for yet
            self._buf = self._buf[self._pos :] + data
            self._pos = 0

    def data_waiting(self) -> bool:
        """Whether what is buffered starts or continues a data frame (what a rate limit may hold back)."""
        if self._left:
            return not self._skip
        return self._pos < len(self._buf) and not self._buf[self._pos] & 0x08

    def receive_eof(self) -> None:
        """The peer closed the TCP connection: events end after what it sent."""
        self._eof = True

    def abort(self) -> None:
        """This end drops the connection: nothing more is read or sent."""
        if self.state is _P_OPEN:
            self.close_code = 1006
        self.state = _P_CLOSED
        self._buf, self._pos, self._message, self._decoder, self._output = b"", 0, None, None, []
        self._deferred = self._inflater = None

    def next_event(self) -> tuple[int, Any] | None:
        """The next event, or ``None`` until more data arrives (or for good, once CLOSED)."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf) and not self._eof:
            return None  # the usual answer, after each message: nothing more to parse
        if not self._left and not self._opcode and self.state is _P_OPEN and len(buf) - pos >= 2:
            # The common case first: a whole message in one frame, all of it here.
            b0, b1 = buf[pos], buf[pos + 1]
            length, start = b1 & 0x7F, pos + 2  # the mask, if any, starts at start
            if length > 125:
                start += 2 if length == 126 else 8
                length = int.from_bytes(buf[pos + 2 : start], "big")  # (cut short: then start is past the end)
            end = start + self._mask_size + length  # of the payload
            if (
                (b0 == 0x81 or b0 == 0x82) and b1 & 0x80 == self._mask_bit and len(buf) >= end
                and (self.max_size is None or length <= self.max_size)
            ):  # fmt: skip
                self._pos = end
                payload = buf[end - length : end]
                if self._mask_size:
                    payload = _unmask(payload, buf[start : start + 4])
                if b0 == 0x82:
                    return _OP_BINARY, payload
                try:
                    return _OP_TEXT, payload.decode("utf-8")
                except UnicodeDecodeError:
                    return self._fail(1007, "invalid UTF-8 in a text message")
        while self.state is not _P_CLOSED:
            if self._left:
                event = self._receive_payload()
                if event is not None or self._left:
                    return event
                continue
            buf, pos = self._buf, self._pos
            available = len(buf) - pos
            if available < 2:
                return self._end_of_input() if self._eof else None
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 2 + (0 if length < 126 else 2 if length == 126 else 8)  # the mask, if any
            end = start + (4 if b1 & 0x80 else 0)  # the payload
            if len(buf) < end:
                return self._end_of_input()
            if length >= 126:
                length = int.from_bytes(buf[pos + 2 : start], "big")
            if b0 & 0x08 and length <= 125 and len(buf) < end + length:
                return self._end_of_input()  # control frames are handled whole
            mask = buf[start:end] if end > start else None
            if self.state is _P_CLOSING:
                event = self._frame_while_closing(b0, length, end)
            else:  # (a whole message in one frame took the shortcut above)
                event = self._frame(b0, b1, length, mask, end)
            if event is not None:
                return event
        return None

    def _end_of_input(self) -> tuple[int, Any] | None:
        """No event until more data arrives; if none will, the connection is over."""
        if self._eof:  # the peer hung up: after its close frame, or not (1006)
            if self.state is _P_OPEN:
                self.close_code = 1006
            self.state = _P_CLOSED
        return None

    def _frame(self, b0: int, b1: int, length: int, mask: bytes | None, end: int) -> tuple[int, Any] | None:
        """Check a frame header and act on it; its payload starts at ``end``."""
        opcode = b0 & 0x0F
        error = self._header_error(b0, b1, opcode, length)
        if error is not None:
            self._pos = end
            # A bad close frame is still the peer's last frame: answer it and stop.
            return self._fail(1002, error, skip=None if opcode == _OP_CLOSE else length)
        if opcode >= _OP_CLOSE:
            self._pos = end + length
            payload = self._buf[end : end + length]
            return self._control(opcode, payload if mask is None else _unmask(payload, mask))
        cost = length if opcode else max(length, _MIN_FRAME_COST)
        limit = self.max_size
        if limit is not None and (b0 & _RSV1 if opcode else self._inflater is not None):
            limit += limit >> 3  # compressed: deflate may grow incompressible data a little
        if limit is not None and self._size + cost > limit:
            self._pos = end
            # A frame over the limit on its own is refused at once: no browser sends one, and the
            # end of a frame that announces 2**62 bytes never comes. A message that grows past
            # the limit fragment by fragment (Chromium's 2 MiB) gets its close at its end.
            return self._fail(
                1009, f"message over {self.max_size} bytes", skip=length, fin=b0 & 0x80, defer=length <= limit
            )
        self._pos = end
        if opcode:  # the first frame of a message
            self._opcode, self._message, self._size = opcode, bytearray(), 0
            self._decoder = _utf8_decoder() if opcode == _OP_TEXT else None
            if b0 & _RSV1:
                assert self.deflate is not None
                self._inflater = self.deflate.inflater()
        self._size += cost
        self._fin, self._mask, self._phase, self._skip = b0 & 0x80, mask, 0, False
        self._left = length
        if length:
            return None  # next_event() goes on with the payload
        return self._end_of_frame()

    def _header_error(self, b0: int, b1: int, opcode: int, length: int) -> str | None:
        if b0 & 0x70:
            if b0 & 0x70 != _RSV1 or self.deflate is None:
                return "reserved bits set without an extension"
            if not opcode or opcode > _OP_BINARY:
                return "RSV1 set on a frame that does not start a message"  # RFC 7692 6.1
        if b1 & 0x80 != self._mask_bit:
            return "server frames must not be masked" if self.client else "client frames must be masked"
        if length >> 63:
            return "frame length over 2**63"
        if opcode >= _OP_CLOSE:
            if not b0 & 0x80 or length > 125:
                return "control frames must be whole and at most 125 bytes"
            if opcode > _OP_PONG:
                return f"reserved opcode {opcode}"
        elif opcode > _OP_BINARY:
            return f"reserved opcode {opcode}"
        elif not opcode and not self._opcode:
            return "continuation frame outside a fragmented message"
        elif opcode and self._opcode:
            return "new message inside a fragmented message"
        return None

    def _receive_payload(self) -> tuple[int, Any] | None:
        """Take what has arrived of the current frame's payload."""
        buf, pos = self._buf, self._pos
        take = min(self._left, len(buf) - pos)
        if not take:
            return self._end_of_input()
        self._pos = pos + take
        self._left -= take
        if self._skip:
            if not self._left:
                self._skipped_frame()
        elif self._inflater is not None:
            data = buf[pos : pos + take]
            if self._mask is not None:
                phase = self._phase & 3
                self._phase += take
                data = _unmask(data, self._mask[phase:] + self._mask[:phase] if phase else self._mask)
            event = self._inflate(data)
            if event is not None:
                return event
        else:
            message = self._message
            assert message is not None
            start = len(message)
            if self._mask is None:
                message += memoryview(buf)[pos : pos + take]
            else:
                _append_unmasked(message, memoryview(buf)[pos : pos + take], self._mask, self._phase)
                self._phase += take
            if self._decoder is not None:
                try:
                    with memoryview(message) as view:
                        self._decoder.decode(view[start:])
                except UnicodeDecodeError:
                    return self._fail(1007, "invalid UTF-8 in a text message", skip=self._left)
        if self._left:
            return None
        return self._end_of_frame()

    def _skipped_frame(self) -> None:
        if self._fin and self._deferred is not None:  # the end of the oversized message
            self._output.append(self._deferred)
            self._deferred = None

    def _inflate(self, data: bytes) -> tuple[int, Any] | None:
        """Inflate compressed bytes into the message, never past ``max_size``."""
        message, inflater = self._message, self._inflater
        assert message is not None and inflater is not None
        try:
            if self.max_size is None:
                inflated = inflater.decompress(data)
            else:  # a byte more than fits: too much, and no more is inflated
                room = self.max_size - len(message)
                inflated = inflater.decompress(data, room + 1)
                if len(inflated) > room:
                    return self._fail(
                        1009, f"message over {self.max_size} bytes", skip=self._left, fin=self._fin, defer=True
                    )
        except zlib.error:
            return self._fail(1007, "invalid compressed data", skip=self._left)
        if inflated:
            message += inflated
            if self._decoder is not None:
                try:
                    self._decoder.decode(inflated)
                except UnicodeDecodeError:
                    return self._fail(1007, "invalid UTF-8 in a text message", skip=self._left)
        return None

    def _end_of_frame(self) -> tuple[int, Any] | None:
        if self._skip or not self._fin:
            return None
        inflater = self._inflater
        if inflater is not None:  # RFC 7692 7.2.2: the sender removed these 4 bytes
            event = None if inflater.eof else self._inflate(b"\x00\x00\xff\xff")
            if event is None and inflater.unused_data:
                event = self._fail(1007, "data after the end of a compressed message")
            if event is not None:
                return event
            self._inflater = None
        opcode, message, decoder = self._opcode, self._message, self._decoder
        assert message is not None
        self._opcode, self._message, self._decoder = 0, None, None
        if inflater is not None:
            self.deflate.received(message)  # type: ignore[union-attr]
        if decoder is None:
            return opcode, bytes(message)
        try:
            decoder.decode(b"", True)  # a sequence cut off at the end
        except UnicodeDecodeError:
            return self._fail(1007, "invalid UTF-8 in a text message")
        return opcode, message.decode("utf-8")

    def _control(self, opcode: int, payload: bytes) -> tuple[int, Any]:
        if opcode == _OP_PING:
            self._output.append(self.frame(_OP_PONG, payload))
            return opcode, payload
        if opcode == _OP_PONG:
            return opcode, payload
        try:
            code, reason = _parse_close(payload)
        except _ProtocolError as error:
            return self._fail(error.code, error.reason, skip=None)
        if self.state is _P_OPEN:  # the peer starts the closing handshake: answer it
            self.close_code, self.close_reason = code, reason
            self._output.append(self._close_frame(1000 if code == 1005 else code, ""))
        self.state, self.peer_closed = _P_CLOSED, True
        return opcode, (code, reason)

    def _frame_while_closing(self, b0: int, length: int, end: int) -> tuple[int, Any] | None:
        """After our close frame: skip every frame but the peer's close frame."""
        if b0 & 0x0F == _OP_CLOSE and length <= 125:
            self._pos = end + length
            self.close_now()  # a 1009 that waited for the end of a message the peer gave up on
            self.state, self.peer_closed = _P_CLOSED, True
            return _OP_CLOSE, (self.close_code, self.close_reason)  # its content no longer matters
        self._pos = end
        self._fin = b0 & 0x80 if b0 & 0x0F < _OP_CLOSE else 0  # a control frame ends no message
        self._left, self._skip = length, True
        if not length:
            self._skipped_frame()
        return None

    def _fail(self, code: int, reason: str, skip: int | None = 0, fin: int = 0, defer: bool = False) -> tuple[int, Any]:
        """Fail the connection: queue a close frame with ``code``, discard what follows.

        ``skip`` is what is left of the offending frame's payload, or ``None``
        when that frame was the peer's close frame, its last. With ``defer``
        the close frame waits for the end of the message (``fin``: this frame
        is its last).
        """
        if self.state is _P_OPEN:
            self.close_code, self.close_reason = code, reason
            if defer:
                self._deferred = self._close_frame(code, reason)
            else:
                self._output.append(self._close_frame(code, reason))
        self._opcode, self._message, self._decoder, self._inflater = 0, None, None, None
        if skip is None:
            self.state = _P_CLOSED
        else:
            self.state = _P_CLOSING
            self._fin, self._left, self._skip = fin, skip, True
            if not skip:
                self._skipped_frame()
        return _FAILED, (code, reason)

    def close_now(self) -> bool:
        """Send the close frame that waits for the end of an oversized message; whether one waited."""
        if self._deferred is None:
            return False
        self._output.append(self._deferred)
        self._deferred = None
        return True

    # -- output --------------------------------------------------------------

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake: the close frame waits in :meth:`data_to_send`."""
        if self.state is _P_OPEN:
            self.state = _P_CLOSING
            self.close_code, self.close_reason = code, reason
            self._output.append(self._close_frame(code, reason))

    def data_to_send(self) -> bytes:
        """What the protocol itself has to send: pongs and close frames."""
        if not self._output:
            return b""
        data = b"".join(self._output)
        self._output.clear()
        return data

    def message(self, message: str | bytes, compress: bool = True) -> bytes:
        """The frame of a whole text (``str``) or binary message from this end (see :meth:`encode`)."""
        if isinstance(message, str):
            return self.encode(_OP_TEXT, message.encode("utf-8"), compress)
        return self.encode(_OP_BINARY, message, compress)

    def encode(self, opcode: int, payload: bytes, compress: bool = True) -> bytes:
        """The frame of a whole message from this end: ``_OP_TEXT`` (UTF-8) or ``_OP_BINARY``.

        With permessage-deflate agreed, it is compressed after the messages
        before it, unless ``compress`` is false or it is shorter than the
        agreement's ``min_size``. Send frames in the order they were made.
        """
        deflate = self.deflate
        if deflate is not None and compress and len(payload) >= deflate.min_size:
            return self.frame(opcode, deflate.compress(payload), rsv=_RSV1)
        if self.client:
            return self.frame(opcode, payload)
        return _frame(opcode, payload)

    def encode_parts(self, opcode: int, payload: bytes, compress: bool = True) -> tuple[bytes, bytes]:
        """The frame of :meth:`encode` as ``(header, payload)`` when it is a plain server frame, else ``(frame, b"")``.

        For large messages: the caller sends the two without joining them.
        """
        deflate = self.deflate
        if self.client or (deflate is not None and compress and len(payload) >= deflate.min_size):
            return self.encode(opcode, payload, compress), b""
        return _frame_header(opcode, len(payload)), payload

    def prepared(self, message: _Prepared) -> bytes:
        """The frame of a message prepared for many ends: framed (and compressed) once for all of them."""
        deflate = self.deflate
        if self.client:  # a client masks each frame: nothing to share
            return self.encode(message.opcode, message.payload, message.compress)
        if deflate is None or not message.compress or len(message.payload) < deflate.min_size:
            return message.plain()
        frame = message.deflated(deflate.send_bits)
        deflate.sent(message.payload)
        return frame

    def ping(self, payload: bytes = b"") -> bytes:
        """A ping frame; the peer's pong comes as an event."""
        return self.frame(_OP_PING, payload)

    def frame(self, opcode: int, payload: Any, rsv: int = 0) -> bytes:
        """A whole frame from this end: masked for a client, as RFC 6455 requires."""
        return _encode_frame(opcode, payload, rsv=rsv, mask=os.urandom(4) if self.client else None)

    def _close_frame(self, code: int, reason: str) -> bytes:
        return self.frame(_OP_CLOSE, _close_payload(code, reason))


class _ProtocolError(Exception):
    """A close frame that breaks RFC 6455: fail the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code, self.reason = code, reason


def _encode_frame(opcode: int, payload: Any, *, fin: bool = True, rsv: int = 0, mask: bytes | None = None) -> bytes:
    """One frame. ``rsv`` sets reserved bits (0x40, 0x20, 0x10); ``mask`` masks it."""
    n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0 if mask is None else 0x80
    if n < 126:
        header = bytes((b0, mask_bit | n))
    elif n < 65536:
        header = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", b0, mask_bit | 127, n)
    if mask is None:
        return header + payload
    return header + mask + _unmask(bytes(payload), mask)


def _frame(opcode: int, payload: Any) -> bytes:
    """A whole, unmasked frame, as servers send them: the fast path of :func:`_encode_frame`."""
    n = len(payload)
    if n < 126:  # the common case, without a call
        return bytes((0x80 | opcode, n)) + payload
    return _frame_header(opcode, n) + payload


def _frame_header(opcode: int, n: int) -> bytes:
    """The header of a whole, unmasked frame of ``n`` bytes."""
    if n < 126:
        return bytes((0x80 | opcode, n))
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n)
    return struct.pack("!BBQ", 0x80 | opcode, 127, n)


def _close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload; a long reason is cut at 123 bytes, between characters."""
    encoded = reason.encode("utf-8")
    if len(encoded) > 123:
        encoded = encoded[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + encoded


def _parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame (1005 and "" when it has none)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise _ProtocolError(1002, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _is_valid_close_code(code):
        raise _ProtocolError(1002, f"invalid close code {code}")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtocolError(1007, "invalid UTF-8 in the close reason") from None


def _is_valid_close_code(code: int) -> bool:
    # RFC 6455 7.4 and the IANA registry: 1004-1006 and 1015 are never sent.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# -- permessage-deflate (RFC 7692) -----------------------------------------------
#
# No zlib object outlives a message. What context takeover needs of the
# messages before is their last bytes, as many as the window holds: each
# message's compressor (or decompressor) starts with them as its dictionary,
# which costs about 2 microseconds. So an idle connection holds at most a
# window of bytes each way (4 KiB by default), where two live zlib streams
# would hold about 40 KiB; and a broadcast compressed once, on its own, is
# valid on every connection, which then only adds it to its window.

#: The LZ77 window (base-2 log) the server compresses with, and asks clients
#: to compress with: 4 KiB, as in the ``websockets`` library. With memory
#: level 5 and level 6, it compresses a JSON chat corpus to 20.5 % at 57 us a
#: message; a 32 KiB window (15) gets 18.8 % for 3 times the CPU.
_WINDOW_BITS = 12
_MEM_LEVEL, _LEVEL = 5, 6
#: A longer message is compressed in pieces this long, and other greenlets run between them.
_COMPRESS_PIECE = 64 * 1024
_DEFLATE_PARAMS = ("server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits",
                   "client_max_window_bits")  # fmt: skip
_WINDOW_VALUES = {str(bits): bits for bits in range(8, 16)}  # no leading zeros, RFC 7692 7.1.2


class _Deflate:
    """permessage-deflate as agreed, for one end of a connection.

    ``send_bits`` is the window of what this end compresses, ``receive_bits``
    that of what it inflates; ``send_takeover`` and ``receive_takeover`` say
    whether a message may refer to those before it (context takeover).
    Messages shorter than ``min_size`` bytes are sent as they are. ``header``
    is the agreement, as the server's ``Sec-WebSocket-Extensions`` said it.
    """

    __slots__ = ("send_bits", "receive_bits", "send_takeover", "receive_takeover", "min_size", "header", "_sent",
                 "_received")  # fmt: skip

    def __init__(
        self,
        send_bits: int = _WINDOW_BITS,
        receive_bits: int = 15,
        send_takeover: bool = True,
        receive_takeover: bool = True,
        min_size: int = 0,
        header: str = "permessage-deflate",
    ) -> None:
        self.send_bits, self.receive_bits = send_bits, receive_bits
        self.send_takeover, self.receive_takeover = send_takeover, receive_takeover
        self.min_size, self.header = min_size, header
        self._sent = self._received = b""  # the last bytes of the messages compressed each way

    def compress(self, payload: bytes) -> bytes:
        """Compress a message that goes out next, after the messages before it."""
        data = _compress(payload, self.send_bits, self._sent)
        self.sent(payload)
        return data

    def sent(self, payload: bytes) -> None:
        """Note that a compressed message went out: the next ones may refer to it."""
        if self.send_takeover:
            self._sent = _window(self._sent, payload, self.send_bits)

    def inflater(self) -> Any:
        """A decompressor for the next compressed message that comes in."""
        return zlib.decompressobj(-self.receive_bits, zdict=self._received)

    def received(self, message: bytes | bytearray) -> None:
        """Note that a compressed message came in, inflated."""
        if self.receive_takeover:
            self._received = _window(self._received, message, self.receive_bits)


def _window(window: bytes, data: bytes | bytearray, bits: int) -> bytes:
    """The last ``2**bits`` bytes of ``window`` followed by ``data``."""
    size = 1 << bits
    if len(data) >= size:
        return bytes(data[-size:])
    return (window + data)[-size:]


def _compress(payload: bytes, bits: int, window: bytes = b"", pause: Callable[[], Any] | None = None) -> bytes:
    """A message's payload, deflated as RFC 7692 sends it; ``window``: what came before.

    ``pause``, if given, is called between pieces of a long payload. zlib has
    no 256-byte window for raw deflate: for 8 bits it finds runs only
    (Z_RLE), whose matches reach back 1 byte, which any window holds.
    """
    wbits, strategy = (-bits, zlib.Z_DEFAULT_STRATEGY) if bits > 8 else (-9, zlib.Z_RLE)
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, wbits, _MEM_LEVEL, strategy, window)
    if pause is None or len(payload) <= _COMPRESS_PIECE:
        return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    pieces = []
    with memoryview(payload) as view:
        for start in range(0, len(view), _COMPRESS_PIECE):
            pieces.append(compressor.compress(view[start : start + _COMPRESS_PIECE]))
            pause()
    pieces.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(pieces)[:-4]  # RFC 7692 7.2.1: the flush's 00 00 ff ff, which the receiver puts back


def _agree_deflate(offers: str, takeover: bool = True, min_size: int = 0) -> _Deflate | None:
    """A server's answer to the client's ``Sec-WebSocket-Extensions``; ``None`` declines.

    The first permessage-deflate offer that it can accept wins (RFC 7692 5).
    An offer with an unknown or repeated parameter, or a bad value, is
    declined, never the handshake. The server compresses with a 4 KiB window,
    or the smaller one the client asks for, and asks the client for 4 KiB if
    it may. Without ``takeover``, no message may refer to those before it,
    either way.
    """
    for offer in offers.split(","):
        name, *items = offer.split(";")
        params = _deflate_params(items)
        if name.strip().lower() != "permessage-deflate" or params is None:
            continue
        answer = ["permessage-deflate"]
        send_takeover = takeover and "server_no_context_takeover" not in params
        receive_takeover = takeover and "client_no_context_takeover" not in params
        if not send_takeover:
            answer.append("server_no_context_takeover")
        if not receive_takeover:
            answer.append("client_no_context_takeover")
        send_bits, receive_bits = _WINDOW_BITS, 15
        if "server_max_window_bits" in params:
            send_bits = min(send_bits, params["server_max_window_bits"] or 15)
            answer.append(f"server_max_window_bits={send_bits}")
        if "client_max_window_bits" in params:  # only then may the answer limit the client's window
            receive_bits = min(_WINDOW_BITS, params["client_max_window_bits"] or 15)
            answer.append(f"client_max_window_bits={receive_bits}")
        return _Deflate(send_bits, receive_bits, send_takeover, receive_takeover, min_size, "; ".join(answer))
    return None


def _client_deflate(answer: str) -> _Deflate:
    """A client's side of the server's answer to ``permessage-deflate; client_max_window_bits``.

    Raises ``ValueError`` if the answer is not one RFC 7692 allows.
    """
    name, *items = answer.split(";")
    params = _deflate_params(items)
    if (
        name.strip().lower() != "permessage-deflate"
        or params is None
        or ("client_max_window_bits" in params and params["client_max_window_bits"] is None)  # a value, in answers
    ):
        raise ValueError(f"invalid permessage-deflate answer: {answer!r}")
    return _Deflate(
        send_bits=min(_WINDOW_BITS, params.get("client_max_window_bits") or 15),
        receive_bits=params.get("server_max_window_bits") or 15,
        send_takeover="client_no_context_takeover" not in params,
        receive_takeover="server_no_context_takeover" not in params,
        header=answer,
    )


def _deflate_params(items: list[str]) -> dict[str, int | None] | None:
    """The parameters of a permessage-deflate offer or answer; ``None`` if one is wrong."""
    params: dict[str, int | None] = {}
    for item in items:
        key, equals, value = (part.strip() for part in item.partition("="))
        key = key.lower()
        if len(value) > 2 and value[0] == value[-1] == '"':  # a quoted-string
            value = value[1:-1]
        if key in params or key not in _DEFLATE_PARAMS:
            return None
        if not equals:
            if key == "server_max_window_bits":
                return None
            params[key] = None
        elif key.endswith("_window_bits") and value in _WINDOW_VALUES:
            params[key] = _WINDOW_VALUES[value]
        else:
            return None
    return params


class _Prepared:
    """A message prepared once for many connections: framed once, compressed once per window size.

    :meth:`_Protocol.prepared` takes it. Compressed on its own, it refers to
    no earlier message, so that one compression serves every connection with
    that window, whatever each sent before; each then adds it to its window.
    """

    __slots__ = ("opcode", "payload", "compress", "_plain", "_deflated")

    def __init__(self, opcode: int, payload: bytes, compress: bool = True) -> None:
        self.opcode, self.payload, self.compress = opcode, payload, compress
        self._plain: bytes | None = None
        self._deflated: dict[int, bytes] = {}

    def plain(self) -> bytes:
        """Its frame as it is."""
        if self._plain is None:
            self._plain = _frame(self.opcode, self.payload)
        return self._plain

    def deflated(self, bits: int, pause: Callable[[], Any] | None = None) -> bytes:
        """Its frame compressed with a ``2**bits`` window; ``pause`` lets others run while a long one is."""
        frame = self._deflated.get(bits)
        if frame is None:
            frame = self._deflated[bits] = _frame(_RSV1 | self.opcode, _compress(self.payload, bits, pause=pause))
        return frame


_utf8_decoder = codecs.getincrementaldecoder("utf-8")

# XOR with one key byte, as a bytes.translate() table, for each of the 256 keys.
_XOR_TABLES = [
    (int.from_bytes(bytes(range(256)), "big") ^ key * int.from_bytes(b"\x01" * 256, "big")).to_bytes(256, "big")
    for key in range(256)
]


def _unmask_python(payload: bytes, mask: bytes) -> bytes:
    """XOR the payload with the repeated 4-byte mask, at C speed.

    Python has no vectorised XOR for bytes. A short payload is XORed as one big
    integer. A longer one is cut into the 4 byte lanes that share a mask byte,
    and each lane is translated by that byte's XOR table, in a bytearray
    (whose translate is twice as fast as bytes'): 0.9 GB/s, 3 times the big
    integer's speed at 64 KiB.
    """
    n = len(payload)
    if n < 400:
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    data = bytearray(payload)
    for lane in range(4):
        data[lane::4] = data[lane::4].translate(_XOR_TABLES[mask[lane]])
    return bytes(data)


def _append_unmasked_python(data: bytearray, chunk: memoryview, mask: bytes, phase: int) -> None:
    """Append ``chunk`` to ``data``, unmasked; ``phase`` bytes of the frame came before it."""
    start = len(data)
    data += chunk
    if phase & 3:
        mask = mask[phase & 3 :] + mask[: phase & 3]
    n = len(data) - start
    if n < 400:
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        data[start:] = (int.from_bytes(data[start:], "big") ^ key).to_bytes(n, "big")
        return
    for lane in range(4):
        data[start + lane :: 4] = data[start + lane :: 4].translate(_XOR_TABLES[mask[lane]])


_unmask: Callable[[Any, bytes], bytes]  # bytes, a bytearray or a memoryview in; bytes out

try:  # the speedups extra: the websockets library's C apply_mask, 60 times the lanes' speed
    from websockets.speedups import apply_mask as _apply_mask

    _unmask = _apply_mask  # itself, not wrapped: one Python call less per message

    def _append_unmasked(data: bytearray, chunk: memoryview, mask: bytes, phase: int) -> None:
        if phase & 3:
            mask = mask[phase & 3 :] + mask[: phase & 3]
        data += _apply_mask(chunk, mask)  # unmasked on the way in: no second pass

except ImportError:
    _unmask, _append_unmasked = _unmask_python, _append_unmasked_python
