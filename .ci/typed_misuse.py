"""Misuse that `mypy` must reject once it sees the installed library's types.

CI expects exactly these errors: without the types, mypy would pass `ws.jion`
(or fail on something else), and the check would prove nothing.
"""
from __future__ import annotations

from flask import Flask

from flask_websockets import WebSockets, ws

sockets = WebSockets(Flask(__name__))


@sockets.on_message
def echo(message: str) -> str:
    ws.jion("room")  # error: "Connection" has no attribute "jion"
    return message


@sockets.on_message("^PNG")
def image(data: bytes) -> bytes:  # error: a str pattern's handler gets str
    return data
