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

Each connection runs in its own greenlet inside the request context of its
handshake, so ``request``, ``session``, ``g`` and ``current_app`` work in
handlers as they do in views.

This file is the whole library and its reference manual. It reads top to
bottom: the current connection (``ws``), the extension (``WebSockets``), the
connection object (``Connection``), serving (``WebSocketHandler``,
``serve``, ``GunicornWorker``), how servers hand a connection over, and last
the RFC 6455 wire protocol.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import io
import logging
import os
import re
import socket
import struct
import sys
import threading
from contextvars import ContextVar
from collections.abc import Iterable
from typing import Any, Callable, NamedTuple, TypeVar, Union

import gevent
import gevent.event
import gevent.socket
from flask import Blueprint, Flask, Response, abort, current_app, request, session
from gevent.lock import Semaphore
from gevent.pywsgi import WSGIHandler
from geventwebsocket.handler import WebSocketHandler as _GeventWebSocketHandler
from werkzeug.local import LocalProxy
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

#: Configuration keys, set on ``app.config`` by :meth:`WebSockets.init_app`
#: unless already there. ``None`` turns a limit or the keepalive off.
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
}


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
    """

    def __init__(
        self,
        app: Flask | Blueprint | None = None,
        match_one: bool = False,
        path: str = "/",
        subprotocols: Iterable[str] = (),
        endpoint: str = "websocket",
    ) -> None:
        self.match_one = match_one
        self.path = path
        self.subprotocols = list(subprotocols)
        self.endpoint = endpoint
        self._apps: list[Flask] = []
        self._error_handlers: dict[type[BaseException], Callable[[Any], Reply]] = {}
        self._connect_hooks: list[Hook] = []
        self._text_patterns: list[tuple[re.Pattern[Any], Handler]] = []  # str patterns
        self._binary_patterns: list[tuple[re.Pattern[Any], Handler]] = []  # bytes patterns
        self._catch_all: list[Handler] = []
        self._open_hooks: list[Hook] = []
        self._close_hooks: list[Hook] = []
        self._connections: set[Connection] = set()
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

    def _set_up(self, app: Flask) -> None:
        for key, default in _CONFIG_DEFAULTS.items():
            app.config.setdefault(key, default)
        app.extensions.setdefault("websockets", self)
        if _close_unserved_upgrade not in app.after_request_funcs.get(None, []):
            app.after_request(_close_unserved_upgrade)
        self._apps.append(app)

    # -- registering handlers ------------------------------------------------

    def on_message(
        self, pattern: None | str | bytes | re.Pattern[Any] | Handler = None, flags: int = 0
    ) -> Any:
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
            def image(data):
                store(data)
        """
        if callable(pattern) and not isinstance(pattern, (str, bytes, re.Pattern)):
            self._catch_all.append(_check_handler(pattern))
            return pattern
        if pattern is None and flags:
            raise TypeError("on_message(flags=...) needs a pattern")
        regex = None if pattern is None else re.compile(pattern, flags)

        def decorator(handler: F) -> F:
            _check_handler(handler)
            if regex is None:
                self._catch_all.append(handler)
            elif isinstance(regex.pattern, str):
                self._text_patterns.append((regex, handler))
            else:
                self._binary_patterns.append((regex, handler))
            return handler

        return decorator

    def errorhandler(self, exception: type[BaseException]) -> Callable[[F], F]:
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
            raise TypeError(f"errorhandler() takes an exception class, not {exception!r}")

        def decorator(handler: F) -> F:
            self._error_handlers[exception] = _check_handler(handler)
            return handler

        return decorator

    def before_connect(self, hook: F) -> F:
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
        self._connect_hooks.append(_check_handler(hook))
        return hook

    def on_open(self, hook: F) -> F:
        """Register a function called with no arguments when a client connects.

        It runs before the first message is handled, with ``ws``, ``request``
        and ``session`` bound. If it raises and no :meth:`errorhandler`
        handles the error, it is logged and the connection is closed with
        1011 (internal error)::

            @sockets.on_open
            def greet():
                ws.send(f"hello {request.remote_addr}")
        """
        self._open_hooks.append(_check_handler(hook))
        return hook

    def on_close(self, hook: F) -> F:
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
        self._close_hooks.append(_check_handler(hook))
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
        """
        return list(self._connections)

    def broadcast(self, message: Reply, to: Callable[[Connection], bool] | None = None) -> int:
        """Send ``message`` to every open connection; return how many got it.

        ``to`` picks the connections: a function that takes a
        :class:`Connection` and returns whether it gets the message. It works
        from handlers, HTTP views and background greenlets, and takes the same
        types as a handler's reply. A connection that is closed or dead is
        skipped and forgotten::

            @app.post("/notify/<int:user_id>")
            def notify(user_id):
                n = sockets.broadcast(request.form["text"], to=lambda c: c.session.get("user_id") == user_id)
                return f"sent to {n} of the user's tabs"
        """
        frame = _encode(message, "broadcast()")
        if frame is None:
            return 0
        sent = 0
        for conn in list(self._connections):
            if to is not None and not to(conn):
                continue
            try:
                conn._send_frame(frame)
                sent += 1
            except ConnectionClosed:
                self._connections.discard(conn)
        return sent

    # -- testing --------------------------------------------------------------

    def test_client(
        self,
        path: str | None = None,
        headers: dict | None = None,
        query_string: Any = None,
        environ_overrides: dict | None = None,
        http_client: Any = None,
    ) -> WebSocketTestClient:
        """Open a connection to this endpoint for a test, without a server.

        ``path`` defaults to the endpoint's own (give it when the path has
        URL variables). ``headers``, ``query_string`` and
        ``environ_overrides`` go into the handshake request, as with Flask's
        test client. To carry a session, pass the ``http_client``
        (``app.test_client()``) that logged in. A refused handshake raises
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
            http_client, path, headers=headers, query_string=query_string, environ_overrides=environ_overrides
        )

    def _own_path(self, app: Flask) -> str:
        rules = [r for r in app.url_map.iter_rules() if app.view_functions.get(r.endpoint) == self._serve]
        if len(rules) != 1 or rules[0].arguments:
            raise ValueError(f"give test_client() a path: the endpoint's rules are {[r.rule for r in rules]}")
        return rules[0].rule

    # -- serving a connection -----------------------------------------------

    def _serve(self, **_view_args: Any) -> Response:
        """The view of the websocket endpoint: the handshake, then the connection."""
        handover = _handover(request.environ)
        if handover is None:
            return _not_served_response()
        refusal = handover.check() or self._refusal()
        if refusal is not None:
            return refusal  # an HTTP answer; after gevent-websocket's 101, a close with 1008
        subprotocol = self._choose_subprotocol() if handover.answers_handshake else None
        sock, pending = handover.accept(subprotocol)
        config = current_app.config
        conn = Connection(
            request.environ,
            sock,
            pending,
            request=request._get_current_object(),  # type: ignore[attr-defined]
            session=dict(session),
            subprotocol=subprotocol,
            max_size=config["WEBSOCKETS_MAX_MESSAGE_SIZE"],
            close_timeout=config["WEBSOCKETS_CLOSE_TIMEOUT"],
            runtime=handover.runtime,
        )
        if config["WEBSOCKETS_PING_INTERVAL"]:
            conn._start_keepalive(config["WEBSOCKETS_PING_INTERVAL"], config["WEBSOCKETS_PING_TIMEOUT"])
        token = _cv_socket.set(conn)
        self._connections.add(conn)
        try:
            self._run(conn)
        except gevent.GreenletExit:  # the server is stopping: no time to wait for the peer
            conn._finish(1001, "server shutting down", drain=False)
            raise
        finally:
            conn._finish(1011, "internal error")  # no-op unless a handler error propagated
            response = handover.end()
            self._connections.discard(conn)
            try:
                for hook in self._close_hooks:
                    self._call(conn, hook)
            finally:
                _cv_socket.reset(token)
        return response

    def _refusal(self) -> Response | None:
        """Why this handshake is refused, as a response; ``None`` to accept it."""
        allowed = current_app.config["WEBSOCKETS_ALLOWED_ORIGINS"]
        origin = request.headers.get("Origin")
        if not _origin_allowed(origin, allowed, request.host):
            logger.warning(
                "websocket handshake from origin %s refused: %s may connect. To allow it, set"
                " WEBSOCKETS_ALLOWED_ORIGINS to a list of origins that includes it, or to '*'.",
                origin,
                f"only {request.host}" if allowed is None else f"only {allowed}",
            )
            abort(403, description=f"Origin {origin} may not open a websocket here.")
        for hook in self._connect_hooks:
            answer = hook()
            if answer is not None:
                return current_app.make_response(answer)
        return None

    def _choose_subprotocol(self) -> str | None:
        offered = request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        return next((p.strip() for p in offered if p.strip() in self.subprotocols), None)

    def _run(self, conn: Connection) -> None:
        for hook in self._open_hooks:
            if not self._call(conn, hook):
                conn.close(1011, "internal error")  # the connection is not set up
                break
        while True:
            message = conn._receive()
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

    def _call(self, conn: Connection, function: Callable[..., Any], *args: Any) -> bool:
        """Run a handler (its return value is the reply) or a hook (``args`` empty).

        An error goes to the most specific error handler, whose return value
        is the reply; failing that, it is logged (or propagates, see
        ``_propagate``). Returns whether no error was left unhandled.
        """
        try:
            reply = function(*args)
            if args:
                conn._send_reply(reply, function)
            return True
        except ConnectionClosed:
            # The peer is gone or the app closed the connection: not an app
            # error. The receive loop notices and ends the connection.
            logger.debug("reply dropped: connection closed", exc_info=True)
            return True
        except Exception as error:
            handler = self._error_handler(error)
            if handler is None:
                _handle_error()
                return False
            try:
                conn._send_reply(handler(error), handler)
                return True
            except ConnectionClosed:
                return True
            except Exception:  # logged with the original error as its context
                _handle_error()
                return False

    def _error_handler(self, error: Exception) -> Callable[[Any], Reply] | None:
        for cls in type(error).__mro__:  # the most specific class first
            if cls in self._error_handlers:
                return self._error_handlers[cls]
        return None


def _check_handler(func: F) -> F:
    if not callable(func):
        raise TypeError(f"a handler must be callable, not {type(func).__name__}")
    if getattr(func, "__code__", None) is not None and func.__code__.co_flags & 0x180:
        # CO_COROUTINE | CO_ITERABLE_COROUTINE: gevent runs plain functions concurrently.
        raise TypeError(f"{_name(func)} is async: websocket handlers must be plain functions")
    return func


def _name(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}"


def _propagate() -> bool:
    """Whether handler errors propagate, as ``PROPAGATE_EXCEPTIONS`` says.

    Unset, they propagate when testing. Unlike Flask views, not in debug mode:
    a websocket has no debugger page, and the connection should survive.
    """
    propagate = current_app.config.get("PROPAGATE_EXCEPTIONS")
    return current_app.testing if propagate is None else bool(propagate)


def _handle_error() -> None:
    """Log the exception being handled through Flask, or re-raise it."""
    if _propagate():
        raise  # noqa: PLE0704 - called from an except block
    current_app.log_exception(sys.exc_info())  # type: ignore[arg-type]


_NOT_SERVED = """\
This server cannot serve websockets.

Serve the app with flask_websockets.serve(app), gevent's WSGIServer with
handler_class=flask_websockets.WebSocketHandler, `flask run`, or gunicorn with
-k flask_websockets.GunicornWorker.
"""


def _not_served_response() -> Response:
    # A websocket handshake reached the app through a server that cannot hand
    # over its connection (the Flask test client, gunicorn's sync workers).
    logger.warning("websocket handshake for %s refused: the server cannot serve websockets", request.path)
    return current_app.response_class(_NOT_SERVED, status=501, mimetype="text/plain")


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
            upgraded.handler.socket.sendall(_close_frame(code, response.status))
        except OSError:
            pass
        upgraded.closed = True
    return response


def _origin_allowed(origin: str | None, allowed: Any, host: str) -> bool:
    if origin is None or allowed == "*":
        return True  # not a browser, or anyone may connect
    if allowed is None:  # same origin: the page's host is the one it connects to
        return origin.partition("://")[2].rstrip("/").lower() == host.lower()
    return origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed}


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------


class ConnectionClosed(Exception):
    """Raised when sending on a connection that is closed or closing.

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
        closed: ``True`` once a close frame was sent or received, or the
            connection was lost. Sending then raises :class:`ConnectionClosed`.
        close_code: the close code the connection ended with: the peer's (1005
            if its close frame had none), yours, or 1006 if it was lost.
        close_reason: the reason that came with ``close_code``.
    """

    __slots__ = (
        "request", "session", "_state", "environ", "path", "origin", "closed", "close_code", "close_reason",
        "subprotocol", "_sock", "_buf", "_pos", "_max_size", "_close_timeout", "_runtime", "_send_lock",
        "_close_sent", "_cancel_close", "_heard", "_cancel_keepalive", "_ping_interval", "_ping_timeout",
    )  # fmt: skip

    def __init__(
        self,
        environ: dict,
        sock: Any,
        pending: bytes = b"",
        *,
        subprotocol: str | None = None,
        max_size: int | None = 1 << 20,
        close_timeout: float = 5.0,
        runtime: _Runtime | None = None,
        request: Any = None,
        session: dict | None = None,
    ) -> None:
        self.request = request
        self.session = {} if session is None else session
        self._state: dict | None = None  # made on first use: most connections never need one
        self.environ = environ
        self.path: str = environ.get("PATH_INFO") or "/"
        self.origin: str | None = environ.get("HTTP_ORIGIN")
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.subprotocol = subprotocol
        self._sock = sock  # the upgraded TCP (or TLS) socket, read and written directly
        self._buf, self._pos = pending, 0  # received bytes, and how far they are parsed
        self._max_size = max_size
        self._close_timeout = close_timeout
        self._runtime = runtime or _GEVENT  # greenlets, or threads under Werkzeug's server
        self._send_lock = self._runtime.lock()  # frames from several senders must not interleave
        self._close_sent = False
        self._cancel_close: Callable[[], Any] | None = None  # the close timeout's timer
        self._heard = False  # a frame arrived since the last keepalive check
        self._cancel_keepalive: Callable[[], Any] | None = None  # the keepalive's timer
        self._ping_interval = self._ping_timeout = 0.0

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.path} from {self.environ.get('REMOTE_ADDR')} {state}>"

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

    def send(self, message: Reply) -> None:
        """Send a message now, converted as a handler's return value is.

        ``str`` goes as text, ``bytes``/``bytearray``/``memoryview`` as binary,
        a Flask response as its body; ``None`` sends nothing. Other types raise
        ``TypeError``. On a closed connection it raises
        :class:`ConnectionClosed`::

            ws.send("step 1 of 3 done")
            ws.send(jsonify(progress=0.33))
        """
        self._send_reply(message, "ws.send()")

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with a status code and a reason.

        The connection stops sending at once; it ends when the client answers
        with its own close frame, or after ``WEBSOCKETS_CLOSE_TIMEOUT`` seconds
        (default 5). Closing a closed connection does nothing. ``code`` must be
        one a server may send (1000-1003, 1007-1014, 3000-4999) and the UTF-8
        ``reason`` at most 123 bytes, or ``ValueError`` is raised::

            @sockets.on_message("^QUIT")
            def quit(message):
                ws.close(1000, "bye")
        """
        if not _is_valid_close_code(code):
            raise ValueError(f"close code {code} may not be sent: use 1000-1003, 1007-1014 or 3000-4999")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        self._send_close(code, reason)

    # -- internals: sending and closing --------------------------------------

    def _send_reply(self, reply: Reply, who: str | Callable[..., Any]) -> None:
        frame = _encode(reply, who)
        if frame is not None:
            self._send_frame(frame)

    def _send_frame(self, frame: bytes) -> None:
        with self._send_lock:
            if self.closed:
                raise ConnectionClosed(f"{self!r} is closed ({self.close_code})")
            try:
                self._write(frame)
            except OSError as err:
                self._lost()
                raise ConnectionClosed(f"{self!r} was lost: {err}") from err

    def _write(self, frame: bytes) -> None:
        # One send() nearly always takes a whole frame. gevent's sendall()
        # would add a getsockopt() system call and a chunking loop to each.
        sent = self._sock.send(frame)
        if sent < len(frame):
            self._sock.sendall(memoryview(frame)[sent:])

    def _send_close(self, code: int, reason: str) -> None:
        with self._send_lock:
            if self._close_sent:
                return
            self._close_sent = True
            if not self.closed:  # we start the closing handshake
                self.closed = True
                self.close_code, self.close_reason = code, reason
                # A peer that never answers must not hold the connection open.
                self._cancel_close = self._runtime.call_later(self._close_timeout, self._abort)
            try:
                self._write(_close_frame(code, reason))
            except OSError:
                self._lost()

    def _abort(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # blocked reads and writes return
        except OSError:
            pass

    def _lost(self) -> None:
        self.closed = True
        if self.close_code is None:
            self.close_code = 1006
        self._abort()  # a write failed: the reader must not wait on a dead peer

    def _finish(self, code: int, reason: str, drain: bool = True) -> None:
        """End the connection: close it with ``code`` if it is still open."""
        if not self.closed:
            self._send_close(code, reason)
            if drain:
                self._drain()
        for cancel in (self._cancel_keepalive, self._cancel_close):
            if cancel is not None:
                cancel()

    # -- internals: receiving ------------------------------------------------

    def _receive(self) -> Message | None:
        """Return the next message, or ``None`` once the connection is over."""
        try:
            message = self._read_message()
            while message is not None and self._close_sent:
                # RFC 6455 5.5.1: after our close frame, data is discarded.
                message = self._read_message()
            return message
        except _ProtocolError as err:
            logger.info("closing %r with %d: %s", self, err.code, err.reason)
            self._send_close(err.code, err.reason)
            if err.unread is not None:  # else the bad frame was the peer's close: it sends no more
                self._drain(err.unread)
        except (OSError, EOFError, ConnectionClosed):
            self._lost()
        return None

    def _drain(self, unread: int = 0) -> None:
        """Discard input until the peer's close frame, within the close timeout."""
        try:
            self._skip(unread)
            while self._read_message() is not None:
                pass
        except Exception:
            pass

    def _read(self, count: int) -> bytes:
        """Return exactly ``count`` bytes (``EOFError`` if the peer hangs up first)."""
        pos = self._pos
        end = pos + count
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        return self._read_more(count)

    def _read_more(self, count: int) -> bytes:
        # One recv() usually brings a whole small message, or several.
        data = self._buf[self._pos :]
        self._buf, self._pos = b"", 0  # an idle connection holds no buffer
        if count - len(data) > 65536:  # a long payload: straight into its own buffer
            out = bytearray(count)
            out[: len(data)] = data
            view = memoryview(out)[len(data) :]
            while view:
                got = self._sock.recv_into(view)
                if not got:
                    raise EOFError
                view = view[got:]
            return out  # type: ignore[return-value]  # a bytearray: _unmask may work in place
        while len(data) < count:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError
            data = data + chunk if data else chunk
        self._buf, self._pos = data, count
        return data[:count]

    def _skip(self, count: int) -> None:
        """Discard ``count`` bytes, never holding more than 64 KiB of them."""
        buffered = len(self._buf) - self._pos
        if count <= buffered:
            self._pos += count
            return
        count -= buffered
        self._buf, self._pos = b"", 0
        while count:
            chunk = self._sock.recv(min(count, 65536))
            if not chunk:
                raise EOFError
            count -= len(chunk)

    def _read_message(self) -> Message | None:
        """Read frames until a whole message; ``None`` after a close frame.

        Pings are answered and pongs ignored on the way. A text message is
        decoded once, incrementally when fragmented, so invalid UTF-8 fails
        with 1007 at the first bad fragment. The message may not grow over
        ``max_size`` bytes.
        """
        budget = self._max_size
        opcode = 0  # of the fragmented message being assembled
        parts: list[Any] = []
        decoder = None
        while True:
            fin, op, payload = self._read_frame(budget)
            if op >= _OP_CLOSE:
                if op == _OP_CLOSE:
                    self._on_close_frame(payload)
                    return None
                if op == _OP_PING and not self.closed:
                    self._send_frame(_frame(_OP_PONG, payload))
                elif op > _OP_PONG:
                    raise _ProtocolError(1002, f"reserved opcode {op}")
                continue
            if op == _OP_CONTINUATION:
                if not opcode:
                    raise _ProtocolError(1002, "continuation frame outside a fragmented message")
            elif op > _OP_BINARY:
                raise _ProtocolError(1002, f"reserved opcode {op}")
            elif opcode:
                raise _ProtocolError(1002, "new message inside a fragmented message")
            elif fin:  # a whole message in one frame, the common case
                return _decode_utf8(payload) if op == _OP_TEXT else payload
            else:
                opcode = op
                if op == _OP_TEXT:
                    decoder = _utf8_decoder()
            if budget is not None:
                budget -= len(payload)
            if decoder is not None:
                try:
                    parts.append(decoder.decode(payload, bool(fin)))
                except UnicodeDecodeError:
                    raise _ProtocolError(1007, "invalid UTF-8 in a text message") from None
            else:
                parts.append(payload)
            if fin:
                return "".join(parts) if decoder is not None else b"".join(parts)

    def _read_frame(self, budget: int | None) -> tuple[int, int, bytes]:
        """Read one frame: ``(fin, opcode, unmasked payload)``.

        A data frame longer than ``budget`` fails with 1009 before its payload
        is read. After our close frame, data payloads are skipped unread.
        """
        b0, b1 = self._read(2)
        op = b0 & 0x0F
        length = b1 & 0x7F
        if length >= 126:
            length = int.from_bytes(self._read(2 if length == 126 else 8), "big")
        if b0 & 0x70 or not b1 & 0x80 or (op >= _OP_CLOSE and (length > 125 or not b0 & 0x80)) or length >> 63:
            # The header is whole, so the rest of the frame can still be skipped.
            unread = None if op == _OP_CLOSE else 0 if length >> 63 else (b1 >> 7) * 4 + length
            raise _ProtocolError(1002, _header_error(b0, b1, length), unread=unread)
        self._heard = True
        if op < _OP_CLOSE:
            if self._close_sent:
                self._skip(4 + length)
                return b0 & 0x80, op, b""
            if budget is not None and length > budget:
                raise _ProtocolError(1009, f"message over {self._max_size} bytes", unread=4 + length)
        mask = self._read(4)
        if not length:
            return b0 & 0x80, op, b""
        return b0 & 0x80, op, _unmask(self._read(length), mask)

    def _on_close_frame(self, payload: bytes) -> None:
        """Answer the peer's close frame: the closing handshake is then complete.

        The answer carries the peer's code (1000 if it sent none), and the
        server drops the TCP connection first, as RFC 6455 7.1.1 asks.
        """
        code, reason = _parse_close(payload)
        if not self.closed:
            self.closed = True
            self.close_code, self.close_reason = code, reason
        self._send_close(1000 if code == 1005 else code, "")

    # -- internals: keepalive ------------------------------------------------
    #
    # One timer per connection (under gevent, in its loop), and nobody waiting:
    # receiving a frame costs one attribute store (`_heard`). A connection
    # silent for a ping interval gets a ping; if nothing at all arrives within
    # the ping timeout after it, the peer is gone.

    def _start_keepalive(self, interval: float, timeout: float) -> None:
        self._ping_interval, self._ping_timeout = interval, timeout
        self._arm(interval, pinged=False)

    def _arm(self, seconds: float, pinged: bool) -> None:
        if self._cancel_keepalive is not None:
            self._cancel_keepalive()
        self._cancel_keepalive = self._runtime.call_later(seconds, self._check_alive, pinged)

    def _check_alive(self, pinged: bool) -> None:  # in gevent's hub: must not block
        if self.closed:
            return
        if self._heard:  # alive: look again a ping interval from now
            self._heard = False
            self._arm(self._ping_interval, pinged=False)
        elif not pinged:  # silent for a whole interval: ping it
            self._runtime.spawn(self._ping)
            self._arm(self._ping_timeout, pinged=True)
        else:  # no answer to the ping
            self._runtime.spawn(self._expire)

    def _ping(self) -> None:
        try:
            self._send_frame(_PING)
        except ConnectionClosed:
            pass

    def _expire(self) -> None:
        logger.info("closing %r: no answer to a ping within %s s", self, self._ping_timeout)
        # A dead peer may not even take the close frame: give it the close timeout.
        self._runtime.call_later(self._close_timeout, self._abort)
        self._send_close(1011, "keepalive ping timeout")
        self._abort()


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


class WebSocketHandler(_GeventWebSocketHandler):
    """gevent-websocket's handler, letting the app answer each handshake.

    The recommended ``handler_class`` for gevent's ``WSGIServer``, and what
    :func:`serve` uses::

        from gevent.pywsgi import WSGIServer
        WSGIServer(("127.0.0.1", 5000), app, handler_class=flask_websockets.WebSocketHandler).serve_forever()

    gevent-websocket's own handler sends ``101 Switching Protocols`` before
    the app runs, so the app can only close a connection it does not want.
    With this one the app answers first: a path without a websocket endpoint
    gets 404, a foreign ``Origin`` 403, and a ``before_connect`` function may
    answer 401; the client then never gets a 101. The 101 carries the chosen
    subprotocol. Every websocket connection gets one access-log line with
    status 101 and its duration, and no logger's handlers are touched.
    """

    _upgraded = False

    def run_application(self) -> None:
        if self.environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            self.environ["flask_websockets.accept"] = self._accept
        WSGIHandler.run_application(self)  # pywsgi's: gevent-websocket's would send the 101 now

    def _accept(self, subprotocol: str | None) -> tuple[Any, Any]:
        """Send the 101; return the socket and the server's reader."""
        headers = _handshake_headers(self.environ, subprotocol)
        self.socket.sendall(_switching_protocols(headers))
        self._upgraded = True
        # What pywsgi's (or gunicorn's) access log reads about the response.
        self._orig_status, self.status, self.code = "101 Switching Protocols", b"101 Switching Protocols", 101
        self.response_headers = headers
        self.headers_sent = self.close_connection = True
        return self.socket, self.rfile

    def start_response(self, status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
        if self._upgraded:  # the app's response after a websocket has nowhere to go
            return lambda data: None
        return super().start_response(status, headers, exc_info)  # type: ignore[no-any-return]

    def process_result(self) -> None:
        if not self._upgraded:
            super().process_result()

    def log_request(self) -> None:
        # gevent-websocket leaves 101s out of the access log: log them like any
        # request, with the next handler's log (pywsgi's, or gunicorn's).
        super(_GeventWebSocketHandler, self).log_request()

    @property
    def logger(self) -> logging.Logger:
        # gevent-websocket's own property replaces its logger's handlers (gevent-websocket#16).
        return logging.getLogger("geventwebsocket.handler")


def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    ssl_context: Any = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    reload: bool = False,
    **server_kwargs: Any,
) -> None:
    """Serve ``app`` with gevent and :class:`WebSocketHandler` until Ctrl-C.

    It prints the URL, passes ``ssl_context`` or ``certfile`` and ``keyfile``
    on for https and wss, and ``server_kwargs`` to gevent's ``WSGIServer``
    (``log=None`` silences the access log). ``reload=True`` restarts the
    process when a source file changes, with Werkzeug's reloader::

        if __name__ == "__main__":
            flask_websockets.serve(app, port=8000, reload=True)

    Like any gevent program, call ``gevent.monkey.patch_all()`` first thing
    if handlers use blocking libraries (``time.sleep``, database drivers).
    """
    tls = {k: v for k, v in dict(ssl_context=ssl_context, certfile=certfile, keyfile=keyfile).items() if v}
    if reload:
        # Werkzeug has no public API to reload a server other than its own.
        from werkzeug._reloader import run_with_reloader

        run_with_reloader(lambda: serve(app, host, port, **tls, **server_kwargs))
        return
    from gevent.pool import Pool
    from gevent.pywsgi import WSGIServer

    # In a pool, connections still open when the server stops are closed with 1001.
    server_kwargs.setdefault("spawn", Pool())
    server = WSGIServer((host, port), app, handler_class=WebSocketHandler, **tls, **server_kwargs)
    server.start()  # bind first, so that port 0 prints the port it got
    scheme = "https" if tls else "http"
    print(f" * Serving on {scheme}://{host}:{server.server_port}/ (press Ctrl-C to quit)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(timeout=1)


def __getattr__(name: str) -> Any:
    """``GunicornWorker``: gunicorn's gevent worker with :class:`WebSocketHandler`.

    ``gunicorn -k flask_websockets.GunicornWorker -w 4 app:app``. Gunicorn is
    imported only when the worker is asked for: it is not a dependency.
    """
    if name != "GunicornWorker":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

    class GunicornHandler(WebSocketHandler, PyWSGIHandler):
        """Our handshake, gunicorn's access log and environ."""

    class GunicornWorker(GeventPyWSGIWorker):
        wsgi_handler = GunicornHandler

    globals()["GunicornWorker"] = GunicornWorker
    return GunicornWorker


# ---------------------------------------------------------------------------
# Testing
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
        closed: whether the connection is closed.
        close_code: the code it was closed with (1006 if dropped).
        close_reason: the reason that came with it.
    """

    __test__ = False  # not a test class, for pytest

    def __init__(self, http_client: Any, path: str, **request: Any) -> None:
        self.subprotocol: str | None = None
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._messages: list[Message] = []
        self._buf = b""
        self._close_sent = False
        self._error: BaseException | None = None
        self._sock, server_sock = gevent.socket.socketpair()
        accepted = gevent.event.Event()

        def accept(subprotocol: str | None) -> tuple[Any, Any]:
            self.subprotocol = subprotocol
            accepted.set()
            return server_sock, io.BytesIO()  # nothing came with the handshake

        def serve() -> Any:
            request["environ_overrides"] = {**(request["environ_overrides"] or {}), "flask_websockets.accept": accept}
            request["headers"] = {**_TEST_HANDSHAKE, **(request["headers"] or {})}
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
            self._raise_server_error()
            raise HandshakeRefused(self._server.value)

    def __enter__(self) -> WebSocketTestClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self.close()
        except Exception:
            if exc_info[0] is None:  # else the test's own error matters more
                raise

    def send(self, message: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) message to the endpoint."""
        if isinstance(message, str):
            self._write(_OP_TEXT, message.encode("utf-8"))
        else:
            self._write(_OP_BINARY, bytes(message))

    def receive(self, timeout: float = 1.0) -> Message:
        """Return the next message from the endpoint: ``str`` or ``bytes``.

        Waits up to ``timeout`` seconds, then raises ``TimeoutError``. Once
        the endpoint has closed the connection, it raises
        :class:`ConnectionClosed` (``close_code`` says how), or the handler
        error that closed it, if errors propagate (``app.testing``).
        """
        try:
            with gevent.Timeout(timeout, TimeoutError(f"no message within {timeout} s")):
                while not self._messages and not self.closed:
                    self._read_frame()
        finally:
            if self.closed and not self._messages:
                self._finish()
        if not self._messages:
            raise ConnectionClosed(f"the endpoint closed the connection: {self.close_code} {self.close_reason}")
        return self._messages.pop(0)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection, and wait until the endpoint is done with it.

        Its ``on_close`` hooks have run when this returns. A handler error
        that propagated (``app.testing``) is raised here.
        """
        if not self.closed and not self._close_sent:
            self._write(_OP_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8"))
            self._close_sent = True
            with gevent.Timeout(5, False):
                while not self.closed:
                    self._read_frame()
        self._finish()

    def _finish(self) -> None:
        self._server.join(timeout=5)
        self._sock.close()
        self._raise_server_error()

    def _raise_server_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write(self, opcode: int, payload: bytes) -> None:
        """Send a frame as clients do, masked."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        self._sock.sendall(header + mask + _unmask_python(payload, mask))

    def _read_frame(self) -> None:
        try:
            b0, b1 = self._recv(2)
            length = b1 & 0x7F
            if length >= 126:
                length = int.from_bytes(self._recv(2 if length == 126 else 8), "big")
            payload = self._recv(length)
        except EOFError:  # dropped without a close frame
            self.closed, self.close_code = True, self.close_code or 1006
            return
        opcode = b0 & 0x0F
        if opcode == _OP_TEXT:
            self._messages.append(payload.decode("utf-8"))
        elif opcode == _OP_BINARY:
            self._messages.append(payload)
        elif opcode == _OP_PING:
            self._write(_OP_PONG, payload)
        elif opcode == _OP_CLOSE:
            self.closed = True
            self.close_code, self.close_reason = _parse_close(payload)
            if not self._close_sent:  # answer it, as clients do
                self._write(_OP_CLOSE, payload[:2])
                self._close_sent = True

    def _recv(self, count: int) -> bytes:
        while len(self._buf) < count:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        data, self._buf = self._buf[:count], self._buf[count:]
        return data


_TEST_HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


# ---------------------------------------------------------------------------
# How servers hand a connection over
# ---------------------------------------------------------------------------


class _Runtime(NamedTuple):
    """Locks and timers for greenlets, or for threads."""

    lock: Callable[[], Any]
    spawn: Callable[[Callable[[], Any]], Any]
    call_later: Callable[..., Callable[[], Any]]  # (seconds, function, *args) -> cancel()


def _gevent_call_later(seconds: float, function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    timer = gevent.get_hub().loop.timer(seconds)  # a callback in the hub, not a greenlet
    timer.start(function, *args)
    return timer.close  # type: ignore[no-any-return]


def _thread_call_later(seconds: float, function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    timer = threading.Timer(seconds, function, args)
    timer.daemon = True
    timer.start()
    return timer.cancel


_GEVENT = _Runtime(Semaphore, gevent.spawn, _gevent_call_later)
_THREADS = _Runtime(threading.Lock, lambda f: threading.Thread(target=f, daemon=True).start(), _thread_call_later)


class _Handover:
    """How a server hands the connection over once the app accepts the handshake.

    Subclasses for :class:`WebSocketHandler`, gevent-websocket's handler and
    Werkzeug's development server.
    """

    answers_handshake = True  # no 101 has been sent: the app's answer is the server's
    runtime = _GEVENT

    def __init__(self, environ: dict) -> None:
        self.environ = environ

    def check(self) -> Response | None:
        """A 400 or 426 for a handshake that is not RFC 6455's, else ``None``."""
        return _handshake_error(self.environ)

    def accept(self, subprotocol: str | None) -> tuple[Any, bytes]:
        """Send the 101; return the socket and the bytes already received."""
        raise NotImplementedError

    def end(self) -> Response:
        """Tidy up after the connection; return what the view answers."""
        return _Upgraded(status=101)


class _OurHandlerHandover(_Handover):
    """:class:`WebSocketHandler` (and the test client): it sends the 101 when asked."""

    def accept(self, subprotocol: str | None) -> tuple[Any, bytes]:
        sock, reader = self.environ["flask_websockets.accept"](subprotocol)
        return sock, _take_over(sock, reader)


class _GeventWebsocketHandover(_Handover):
    """gevent-websocket's own handler: its 101 went out before the app ran."""

    answers_handshake = False

    def check(self) -> None:
        return None

    def accept(self, subprotocol: str | None) -> tuple[Any, bytes]:
        handler = self.environ["wsgi.websocket"].handler
        return handler.socket, _take_over(handler.socket, handler.rfile)

    def end(self) -> Response:
        self.environ["wsgi.websocket"].closed = True  # it must not send its own close frame
        return super().end()


class _WerkzeugHandover(_Handover):
    """Werkzeug's development server (``flask run``): a thread per request."""

    runtime = _THREADS

    def accept(self, subprotocol: str | None) -> tuple[Any, bytes]:
        sock = self.environ["werkzeug.socket"]
        sock.sendall(_switching_protocols(_handshake_headers(self.environ, subprotocol)))
        # Werkzeug reads on from its reader after the app: leave it open.
        return sock, _take_over(sock, self.environ["wsgi.input"], close=False)

    def end(self) -> Response:
        try:
            self.environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)  # Werkzeug's next read ends
        except OSError:
            pass
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
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        return Response("This server speaks websocket version 13.", 426, {"Sec-WebSocket-Version": "13"})
    try:
        valid = len(base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", ""), validate=True)) == 16
    except binascii.Error:
        valid = False
    return None if valid else Response("Sec-WebSocket-Key must be 16 bytes in base64.", 400)


def _handshake_headers(environ: dict, subprotocol: str | None) -> list[tuple[str, str]]:
    digest = hashlib.sha1(environ["HTTP_SEC_WEBSOCKET_KEY"].encode() + _WEBSOCKET_GUID).digest()
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", base64.b64encode(digest).decode()),
    ]
    if subprotocol:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    return headers


def _switching_protocols(headers: list[tuple[str, str]]) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 4.2.2


def _take_over(sock: Any, reader: Any, close: bool = True) -> bytes:
    """Return what the server's reader buffered past the handshake, and close it.

    From here on the connection reads the socket itself: one Python layer
    less per read, and closing the reader frees its 8 KiB buffer, a third
    of what an idle connection costs. The socket stays open.
    """
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

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> list[bytes]:  # type: ignore[override]
        start_response(self.status, [])
        return []


class _Dropped(_Upgraded):
    """For Werkzeug's server, which would write a response after the websocket."""

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> list[bytes]:  # type: ignore[override]
        raise ConnectionError("the websocket is over")  # Werkzeug drops the request quietly


# ---------------------------------------------------------------------------
# RFC 6455 wire protocol
# ---------------------------------------------------------------------------

_OP_CONTINUATION, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class _ProtocolError(Exception):
    """The peer broke RFC 6455 or a limit: fail the connection with ``code``.

    ``unread`` counts the bytes of the offending frame still to be skipped
    before the peer's answering close frame; ``None`` if the offending frame
    was the peer's close frame.
    """

    def __init__(self, code: int, reason: str, unread: int | None = 0) -> None:
        super().__init__(code, reason)
        self.code, self.reason, self.unread = code, reason, unread


def _header_error(b0: int, b1: int, length: int) -> str:
    if b0 & 0x70:
        return "reserved bits set without an extension"
    if not b1 & 0x80:
        return "client frames must be masked"
    if length >> 63:
        return "frame length over 2**63"
    return "control frames must be whole and at most 125 bytes"


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
    data = payload if type(payload) is bytearray else bytearray(payload)  # a bytearray is ours to change
    for lane in range(4):
        data[lane::4] = data[lane::4].translate(_XOR_TABLES[mask[lane]])
    return bytes(data)


try:  # an optional accelerator, written in C: pip install wsaccel
    from wsaccel.xormask import XorMaskerSimple as _XorMasker

    def _unmask(payload: bytes, mask: bytes) -> bytes:
        return _XorMasker(mask).process(payload)  # type: ignore[no-any-return]

except ImportError:
    _unmask = _unmask_python


def _decode_utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtocolError(1007, "invalid UTF-8 in a text message") from None


def _parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame (1005 and "" when it has none).

    A malformed close frame is still the peer's last frame: the error says
    so (``unread=None``), and it is answered without waiting for another.
    """
    if not payload:
        return 1005, ""
    code = int.from_bytes(payload[:2], "big")
    if len(payload) == 1:
        raise _ProtocolError(1002, "close frame with a 1-byte payload", unread=None)
    if not _is_valid_close_code(code):
        raise _ProtocolError(1002, f"invalid close code {code}", unread=None)
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtocolError(1007, "invalid UTF-8 in the close reason", unread=None) from None


def _frame(opcode: int, payload: Any) -> bytes:
    """A whole, unmasked frame (servers never mask)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def _close_frame(code: int, reason: str) -> bytes:
    return _frame(_OP_CLOSE, code.to_bytes(2, "big") + reason.encode("utf-8")[:123])


_PING = _frame(_OP_PING, b"keepalive")


def _is_valid_close_code(code: int) -> bool:
    # RFC 6455 7.4 and the IANA registry: 1004-1006 and 1015 are never sent.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _encode(value: Reply, who: str | Callable[..., Any]) -> bytes | None:
    """The frame for a sent message or a handler's reply, or ``None`` for ``None``.

    ``who`` is the sending function's name, or the handler, for the error message.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _frame(_OP_TEXT, value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _frame(_OP_BINARY, value)
    if isinstance(value, _WerkzeugResponse):
        body = value.get_data()
        if (value.mimetype or "").startswith("text/") or value.is_json:
            # Text frames are UTF-8, whatever charset the response declares.
            charset = value.mimetype_params.get("charset", "utf-8")
            return _frame(_OP_TEXT, body.decode(charset).encode("utf-8"))
        return _frame(_OP_BINARY, body)
    if callable(who):
        who = f"message handler {_name(who)}()"
    raise TypeError(
        f"{who} got {type(value).__name__}: a websocket message must be str (text),"
        " bytes, bytearray or memoryview (binary), or a Flask response such as"
        " jsonify(...); return None to send nothing"
    )
