"""A small app on the documented API, fully annotated: `mypy --strict` must pass it.

CI type-checks it against a `pip install .` of the library, from outside the
repository, so that the types can only come from the installed package.
"""
from __future__ import annotations

import re

from flask import Flask, Response, abort, jsonify, request, session

from flask_websockets import ConnectionClosed, WebSockets, serve, ws

app = Flask(__name__)
app.secret_key = "not a secret"
sockets = WebSockets(app, path="/ws", subprotocols=["chat.v1"])


@sockets.before_connect
def members_only() -> None:
    if "user_id" not in session:
        abort(401)


@sockets.on_open
def greet() -> None:
    ws.join("lobby")
    ws.send(f"hello {request.remote_addr}")


@sockets.on_message
def echo(message: str) -> str:
    return message


@sockets.on_message("^JSON (.*)", flags=re.DOTALL)
def json_reply(message: str) -> Response:
    return jsonify(text=message[5:], rooms=sorted(ws.rooms))


@sockets.on_message(re.compile(rb"^\x89PNG"))
def image(data: bytes) -> bytes | None:
    return data[:8] if ws.subprotocol == "chat.v1" else None


@sockets.on_message("^SAY ")
def say(message: str) -> None:
    sockets.broadcast(message[4:], room="lobby", skip=ws)


@sockets.errorhandler(ValueError)
def bad_input(error: ValueError) -> Response:
    return jsonify(error=str(error))


@sockets.on_close
def gone() -> None:
    sockets.broadcast(f"{request.remote_addr} left ({ws.close_code})", room="lobby")


@app.post("/kick/<user>")
def kick(user: str) -> str:
    for conn in sockets.connections:
        if conn.session.get("user_id") == user:
            conn.close(4000, "kicked")
    return f"{sockets.count('lobby')} left in the lobby"


def test_echo() -> None:
    with sockets.test_client() as client:
        client.send("hi")
        assert client.receive() == "hi"


def send_safely(text: str) -> bool:
    try:
        ws.send(text)
    except ConnectionClosed:
        return False
    return True


if __name__ == "__main__":
    serve(app, port=5000)
