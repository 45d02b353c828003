"""permessage-deflate: bytes on the wire, server CPU and idle memory, beside `websockets`.

    /tmp/flask-websockets-bench-venv/bin/python benchmarks/compression.py --reps 3

Each server runs in its own process (pinned to core 0; the clients to core 1):

- `off`: Flask-Websockets, `benchmarks/echo_server.py`, compression off (the default);
- `on`: the same with `WEBSOCKETS_COMPRESSION = True` (messages under the
  1 KiB default threshold go uncompressed);
- `on-all`: the same with `WEBSOCKETS_COMPRESSION_MIN_SIZE = 0`, every
  message compressed, as `websockets` does;
- `websockets`: the `websockets` library with its defaults (deflate on,
  window 12, memLevel 5), `../shared/bench/servers/websockets_asyncio.py`.

The clients are the `websockets` library's, which offer permessage-deflate
by default and compress what they send. Two measurements per server:

1. **chat**: a corpus of JSON chat messages of 100 B to 10 KiB (sizes spread
   evenly on a log scale, a fixed seed), echoed over `--connections`
   connections, each sending its next message when the previous echo came
   back. A relay in the client process counts the bytes on the wire both
   ways; the server's CPU time (user + system, /proc) divided by the messages
   gives its cost per message (one message in, one out).
2. **idle**: `--idle` connections opened and left idle; the growth of the
   server's resident memory divided by their number, once right after the
   handshakes (`fresh`) and once after each connection echoed two 4 KiB
   messages (`used`: the compression windows are full).

Ratios are taken within a repetition, medians over repetitions.
"""
import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

from _common import cpu_seconds, free_port, rss_kib, wait_listening  # beside this script

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("BENCH_DIR", os.path.join(HERE, "..", "..", "shared", "bench"))
ECHO = os.path.join(HERE, "echo_server.py")
SERVERS = {
    "off": [ECHO, "--handler", "flask_websockets"],
    "on": [ECHO, "--compression"],
    "on-all": [ECHO, "--compression", "--compression-min-size", "0"],
    "websockets": [os.path.join(SHARED, "servers", "websockets_asyncio.py")],
}
WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or had by"
    " hot word but what some we can out other were all there when up use your how said an each she which do"
    " their time if will way about many then them write would like so these her long make thing see him two"
    " has look more day could go come did number sound no most people my over know water than call first who"
    " may down side been now find any new work part take get place made live where after back little only"
    " round man year came show every good me give our under name very through just form sentence great think"
    " deploy release server client socket message room join leave typing online offline meeting tomorrow lunch"
    " ok thanks sure yes link review merge branch test build failed passed ticket bug fix feature"
).split()
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]


# -- the corpus --------------------------------------------------------------------


def chat_message(rng, seq):
    user = rng.choice(NAMES)
    return {
        "type": "message",
        "id": f"{rng.getrandbits(64):016x}",
        "seq": seq,
        "room": rng.choice(["general", "random", "deploys", "support"]),
        "user": {"id": NAMES.index(user) + 1000, "name": user, "avatar": f"https://example.com/avatars/{user}.png"},
        "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))).capitalize() + ".",
        "ts": 1_795_000_000 + seq * 7 + rng.randint(0, 6),
        "reactions": {emoji: rng.randint(1, 9) for emoji in rng.sample(["+1", "tada", "eyes", "heart"], 2)},
    }


def corpus(count, seed=1, low=100, high=10 * 1024):
    """JSON chat messages of about `low` to `high` bytes: one message, or a history page of several."""
    rng = random.Random(seed)
    messages, seq = [], 0
    for _ in range(count):
        target = int(low * (high / low) ** rng.random())
        page = {"type": "history", "room": "general", "messages": []}
        while True:
            seq += 1
            page["messages"].append(chat_message(rng, seq))
            text = json.dumps(page, separators=(",", ":"))
            if len(text) >= target:
                break
        if len(page["messages"]) == 1:  # one message is enough: send it bare
            text = json.dumps(page["messages"][0], separators=(",", ":"))
            if len(text) > target:  # shorter than a full message: a chat line, as long as asked
                line = {"type": "message", "user": rng.choice(NAMES), "text": ""}
                while len(json.dumps(line, separators=(",", ":"))) < target:
                    line["text"] = (line["text"] + " " + rng.choice(WORDS)).strip()
                text = json.dumps(line, separators=(",", ":"))
        messages.append(text)
    return messages


# -- servers and the wire ------------------------------------------------------------





def start_server(name):
    port = free_port()
    cmd = ["taskset", "-c", "0", sys.executable, *SERVERS[name], "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(proc, port, name)
    return proc, port


class Relay:
    """A TCP relay that counts the bytes each way: what the compression saves."""

    def __init__(self, port):
        self.target, self.up, self.down = port, 0, 0

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, client_reader, client_writer):
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src, dst, direction):
            while data := await src.read(65536):
                setattr(self, direction, getattr(self, direction) + len(data))
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(client_reader, writer, "up"), pipe(reader, client_writer, "down"))


# -- the measurements ----------------------------------------------------------------


async def chat(name, pid, port, messages, connections, rounds):
    from websockets.asyncio.client import connect

    relay = Relay(port)
    relay_port = await relay.start()
    uri = f"ws://127.0.0.1:{relay_port}/ws"
    sockets = [await connect(uri, max_size=2**24) for _ in range(connections)]
    extensions = sockets[0].response.headers.get("Sec-WebSocket-Extensions")
    relay.up = relay.down = 0

    async def talk(ws, offset):
        for i in range(rounds):
            message = messages[(offset + i) % len(messages)]
            await ws.send(message)
            if await ws.recv() != message:
                raise AssertionError(f"{name}: the echo differs")

    before = cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(talk(ws, n * 97) for n, ws in enumerate(sockets)))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - before
    count = connections * rounds
    sent = (messages[(n * 97 + i) % len(messages)] for n in range(connections) for i in range(rounds))
    payload = sum(len(message.encode()) for message in sent)
    for ws in sockets:
        await ws.close()
    relay.server.close()
    return {
        "extensions": extensions,
        "cpu_us": cpu / count * 1e6,
        "msgs_s": count / elapsed,
        "payload_mb": payload / 1e6,
        "wire_up_mb": relay.up / 1e6,
        "wire_down_mb": relay.down / 1e6,
        "ratio": (relay.up + relay.down) / (2 * payload),
    }


async def idle(name, pid, port, count, settle):
    from websockets.asyncio.client import connect

    uri = f"ws://127.0.0.1:{port}/ws"
    for _ in range(3):  # warm up: imports, first-request setup, allocator pools
        async with connect(uri) as ws:
            await ws.send("x" * 4096)
            await ws.recv()
    await asyncio.sleep(settle)
    base = rss_kib(pid)
    sockets = []
    for _ in range(count):
        sockets.append(await connect(uri, ping_interval=None, max_size=2**24))
    extensions = sockets[0].response.headers.get("Sec-WebSocket-Extensions")
    await asyncio.sleep(settle)
    fresh = rss_kib(pid)
    text = json.dumps({"history": [chat_message(random.Random(n), n) for n in range(12)]})[:4096]
    for ws in sockets:
        for variant in ("a", "b"):
            await ws.send(variant + text)
            await ws.recv()
    await asyncio.sleep(settle)
    used = rss_kib(pid)
    for ws in sockets:
        await ws.close()
    return {"extensions": extensions, "fresh_kib": (fresh - base) / count, "used_kib": (used - base) / count}


def measure(name, args, messages):
    proc, port = start_server(name)
    try:
        result = asyncio.run(chat(name, proc.pid, port, messages, args.connections, args.rounds))
        result.update(asyncio.run(idle(name, proc.pid, port, args.idle, args.settle)))
        return result
    finally:
        proc.terminate()
        proc.wait(10)


def median(rows, key):
    return statistics.median(row[key] for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--corpus", type=int, default=500, help="distinct messages")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1000, help="messages per connection")
    parser.add_argument("--idle", type=int, default=1000, help="connections for the idle-memory figure")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading RSS")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    messages = corpus(args.corpus)
    sizes = sorted(len(m.encode()) for m in messages)
    print(
        f"corpus: {len(messages)} JSON messages, {sizes[0]}-{sizes[-1]} bytes, median {sizes[len(sizes) // 2]};"
        f" {args.connections} connections x {args.rounds} echoes; idle: {args.idle} connections",
        flush=True,
    )
    names = args.servers.split(",")
    results = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotate the order
            row = measure(name, args, messages)
            results[name].append(row)
            rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
            print(f"rep {rep + 1} {name}: {json.dumps(rounded)}", flush=True)
    reference = results.get("websockets")
    print()
    print("| server | negotiated | wire / payload | server CPU µs/msg | msgs/s | idle KiB/conn fresh | used |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rows = results[name]
        cells = [
            name,
            f"`{rows[0]['extensions']}`" if rows[0]["extensions"] else "none",
            f"{median(rows, 'ratio'):.3f}",
            f"{median(rows, 'cpu_us'):.1f}",
            f"{median(rows, 'msgs_s'):,.0f}",
            f"{median(rows, 'fresh_kib'):.1f}",
            f"{median(rows, 'used_kib'):.1f}",
        ]
        if reference and name != "websockets":
            for key, index in (("cpu_us", 3), ("fresh_kib", 5), ("used_kib", 6)):
                ratio = statistics.median(r[key] / w[key] for r, w in zip(rows, reference))
                cells[index] += f" ({ratio:.2f})"
        print("| " + " | ".join(cells) + " |")
    if reference:
        print("\n(in brackets: the ratio to websockets in the same repetition, median)")


if __name__ == "__main__":
    main()
