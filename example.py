"""Flask-Websockets example: echo, commands, a long task, JSON, broadcast and who is online.

    python example.py                 # http://127.0.0.1:5000
    python example.py --port 8000 --host 0.0.0.0 --reload
    python example.py --certfile cert.pem --keyfile key.pem   # https and wss

Open the page in two tabs to see broadcasts reach both, and both listed as
online; http://127.0.0.1:5000/?name=ann names the tab's user.
"""
from gevent import monkey

monkey.patch_all()  # first: makes time.sleep and other blocking calls cooperative

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from flask import Flask, jsonify, render_template_string, request  # noqa: E402

from flask_websockets import WebSockets, has_socket_context, serve, ws  # noqa: E402

app = Flask(__name__)
# Compress messages of 1 KiB or more for clients that offer to: every browser does.
app.config["WEBSOCKETS_COMPRESSION"] = True
sockets = WebSockets(app, match_one=True)  # one handler per message: the first that matches


@app.route("/")
def index():
    return render_template_string(PAGE)


@sockets.on_message("^ECHO (.*)")
def echo_command(message):
    """``ECHO <text>`` replies with the text alone."""
    return message[len("ECHO ") :]


@sockets.on_message("^WORK$")
def long_task(message):
    """A long task that streams status updates before its reply."""
    for step in range(1, 4):
        ws.send(f"working: step {step} of 3")
        time.sleep(0.4)  # cooperative thanks to monkey.patch_all(): other clients go on
    return "work done"


@sockets.on_message("^JSON (.*)")
def json_reply(message):
    """A Flask response as the reply: its JSON body is sent as a text message."""
    text = message[len("JSON ") :]
    return jsonify(text=text, words=len(text.split()), upper=text.upper())


@sockets.on_message("^CLOSE$")
def close(message):
    """The server closes the connection, with a code and a reason."""
    ws.close(1000, "closed by the server")


@sockets.on_message
def echo(message):
    """Anything else comes back unchanged."""
    return message


@app.post("/broadcast")
def broadcast():
    """An HTTP view that sends to every open websocket."""
    count = notify(f"broadcast: {request.form['text']}")
    return jsonify(clients=count)


def notify(text):
    """Works from a websocket handler and from an HTTP view alike."""
    if has_socket_context():
        ws.send(text)
        return 1
    return sockets.broadcast(text)


visitors = itertools.count(1)


@sockets.on_open
def greet():
    ws.identify(request.args.get("name") or f"visitor {next(visitors)}")  # a real app: its signed-in user
    ws.send(f"welcome, {request.remote_addr}")
    show_who_is_online()


@sockets.on_close
def left():
    show_who_is_online()


def show_who_is_online():
    """Every tab gets the users online, each with their number of tabs."""
    sockets.broadcast(json.dumps({"online": sockets.presence()}))


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Flask-Websockets example</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  main { max-width: 760px; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
  p.lead { margin: 0 0 1.25rem; color: #4b5466; }
  .card { background: #fff; border-radius: 10px; padding: 1rem 1.25rem; margin-bottom: 1rem;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
  #state { display: inline-block; padding: .15rem .6rem; border-radius: 999px; font-weight: 600; }
  #state.connecting { background: #fff4d6; color: #7a5a00; }
  #state.open { background: #dcf5e3; color: #17693a; }
  #state.closed { background: #fde2e2; color: #9b1c1c; }
  form { display: flex; gap: .5rem; margin: .5rem 0; align-items: center; }
  label { width: 9.5rem; font-weight: 600; }
  h2 { font-size: 1rem; margin: 0 0 .5rem; color: #4b5466; }
  input[type=text] { flex: 1; padding: .4rem .5rem; border: 1px solid #c9ceda; border-radius: 6px; }
  button { padding: .4rem .8rem; border: 0; border-radius: 6px; background: #3056d3; color: #fff;
           cursor: pointer; }
  button.secondary { background: #5b6476; }
  #log { list-style: none; padding: 0; margin: 0; font-family: ui-monospace, monospace; font-size: 13px;
         max-height: 36rem; overflow-y: auto; }
  #log li { padding: .25rem .4rem; border-bottom: 1px solid #eef0f4; white-space: pre-wrap; }
  #log li.sent { color: #3056d3; }
  #log li.sent::before { content: "\\2192  "; }
  #log li.received::before { content: "\\2190  "; }
  #log li.json { background: #f3f6ff; }
  #log li.broadcast { background: #fff8e6; }
  #log li.system { color: #6b7385; font-style: italic; }
</style>
</head>
<body>
<main>
  <h1>Flask-Websockets example</h1>
  <p class="lead">A Flask app talking over a raw WebSocket at
    <code id="url">{{ url_for('websocket') }}</code></p>

  <div class="card">
    Connection: <span id="state" class="connecting">connecting</span>
    <button id="reconnect" class="secondary" hidden>Reconnect</button>
    <div>Online now: <span id="online">nobody yet</span></div>
  </div>

  <div class="card">
    <h2>Try it</h2>
    <form id="echo-form"><label for="echo">Echo</label>
      <input type="text" id="echo" value="Hello, websocket!"><button>Send</button></form>
    <form id="command-form"><label for="command">ECHO command</label>
      <input type="text" id="command" value="only this part comes back"><button>Send</button></form>
    <form id="json-form"><label for="json">JSON reply</label>
      <input type="text" id="json" value="jsonify works as a reply"><button>Send</button></form>
    <form id="broadcast-form"><label for="broadcast">Broadcast</label>
      <input type="text" id="broadcast" value="hello, every open tab"><button>Send to all</button></form>
    <form id="actions"><label>Actions</label>
      <button type="button" id="work">Run long task</button>
      <button type="button" id="close" class="secondary">Server-side close</button></form>
  </div>

  <div class="card"><h2>Messages (&rarr; sent, &larr; received)</h2><ul id="log"></ul></div>
</main>
<script>
const url = document.getElementById("url").textContent;
const state = document.getElementById("state");
const log = document.getElementById("log");
let socket = null;

function show(text, kind) {
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = text;
  log.appendChild(item);
  log.scrollTop = log.scrollHeight;
}

function showOnline(users) {
  document.getElementById("online").textContent = Object.entries(users).sort()
    .map(([user, tabs]) => tabs > 1 ? user + " (" + tabs + " tabs)" : user).join(", ") || "nobody";
}

function setState(name, detail) {
  state.className = name;
  state.textContent = detail ? name + " (" + detail + ")" : name;
  document.getElementById("reconnect").hidden = name !== "closed";
}

function connect() {
  setState("connecting");
  socket = new WebSocket(url + location.search);  // ?name=ann: who this tab is
  socket.onopen = () => setState("open");
  socket.onmessage = (event) => {
    let data = event.data;
    try {
      const parsed = JSON.parse(data);
      if (parsed && parsed.online) {
        return showOnline(parsed.online);
      }
      if (parsed && typeof parsed === "object") {
        return show("JSON " + JSON.stringify(parsed, null, 1), "received json");
      }
    } catch (e) { /* plain text */ }
    show(data, data.startsWith("broadcast: ") ? "received broadcast" : "received");
  };
  socket.onclose = (event) => {
    setState("closed", "code " + event.code + (event.reason ? ", " + event.reason : ""));
    show("connection closed with code " + event.code, "system");
  };
}

function send(text) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return show("not connected", "system");
  show(text, "sent");
  socket.send(text);
}

function onSubmit(id, handler) {
  document.getElementById(id).addEventListener("submit", (event) => {
    event.preventDefault();
    handler();
  });
}
onSubmit("echo-form", () => send(document.getElementById("echo").value));
onSubmit("command-form", () => send("ECHO " + document.getElementById("command").value));
onSubmit("json-form", () => send("JSON " + document.getElementById("json").value));
onSubmit("broadcast-form", () => {
  const body = new URLSearchParams({text: document.getElementById("broadcast").value});
  fetch("{{ url_for('broadcast') }}", {method: "POST", body})
    .then((response) => response.json())
    .then((result) => show("broadcast sent to " + result.clients + " client(s)", "system"));
});
document.getElementById("work").addEventListener("click", () => send("WORK"));
document.getElementById("close").addEventListener("click", () => send("CLOSE"));
document.getElementById("reconnect").addEventListener("click", connect);
connect();
</script>
</body>
</html>
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--reload", action="store_true", help="restart when the code changes")
    parser.add_argument("--certfile", help="a TLS certificate: serve https and wss")
    parser.add_argument("--keyfile", help="the certificate's private key")
    args = parser.parse_args()
    serve(app, args.host, args.port, certfile=args.certfile, keyfile=args.keyfile, reload=args.reload)


if __name__ == "__main__":
    main()
