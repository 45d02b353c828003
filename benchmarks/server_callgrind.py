"""Instructions the real echo server executes per message and per connection, under callgrind.

    python benchmarks/server_callgrind.py                    # this checkout, with the speedups extra if installed
    python benchmarks/server_callgrind.py --module /tmp/old  # another checkout
    python benchmarks/server_callgrind.py --pure-python --keep /tmp/cg.out   # and keep the profile

Unlike connection_cost.py (one process, a socket pair, the client's cost
included), this runs benchmarks/echo_server.py as the echo benchmark does:
gevent's pywsgi, our handler, real TCP on 127.0.0.1, every connection in its
own greenlet. Only the server runs under valgrind, with instrumentation off
until the clients are ready (callgrind_control turns it on), so that start-up
and handshakes do not count:

- message: 100 connections send a 32-byte text message each, then read the
  100 echoes, 100 rounds (the shape of ../shared/bench's e100);
- connection: 300 connections one after another, each a handshake, one
  32-byte echo and the client's close (the shape of its rate scenario).

Counts do not move between runs (PYTHONHASHSEED=0), whatever else the machine
does; what they leave out is the kernel's share (see benchmarks/README.md).
Needs valgrind (apt-get install valgrind). About a minute each.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

from _common import free_port, handshake, wait_listening

HERE = os.path.dirname(os.path.abspath(__file__))
MASK = b"\x01\x02\x03\x04"


def masked(opcode, payload):
    return bytes((0x80 | opcode, 0x80 | len(payload))) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


MESSAGE, CLOSE = masked(1, b"x" * 32), masked(8, (1000).to_bytes(2, "big"))
ECHO = bytes((0x81, 32)) + b"x" * 32


def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def echo_rounds(socks, rounds):
    for _ in range(rounds):
        for sock in socks:
            sock.sendall(MESSAGE)
        for sock in socks:
            assert read_exactly(sock, len(ECHO)) == ECHO


def connection(port):
    sock, _ = handshake(port, "/ws", 120)
    sock.sendall(MESSAGE)
    assert read_exactly(sock, len(ECHO)) == ECHO
    sock.sendall(CLOSE)
    assert read_exactly(sock, 4)[:1] == b"\x88"
    while sock.recv(4096):  # until the server closes TCP
        pass
    sock.close()


def measure(args, what):
    port = free_port()
    out = tempfile.mktemp(prefix="server-callgrind.")
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
         os.path.join(args.module, "benchmarks", "echo_server.py"), "--port", str(port),
         "--handler", "flask_websockets"] + (["--pure-python"] if args.pure_python else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip

    def control(*flags):  # instrumentation on or off, or a dump
        subprocess.run(["callgrind_control", *flags, str(server.pid)], check=True, capture_output=True)

    try:
        wait_listening(server, port, "echo_server.py under valgrind", timeout=120)
        if what == "message":
            socks = [handshake(port, "/ws", 120)[0] for _ in range(100)]
            echo_rounds(socks, 5)  # warm
            control("-i", "on")
            echo_rounds(socks, 100)
            units = 100 * 100
        else:
            for _ in range(20):
                connection(port)
            control("-i", "on")
            for _ in range(300):
                connection(port)
            units = 300
        control("-d")
        control("-i", "off")
        if what == "message":
            for sock in socks:
                sock.close()
    finally:
        server.terminate()
        server.wait(30)
    dump = out + ".1"
    total = int(re.search(r"^totals: (\d+)", open(dump).read(), re.M).group(1))
    if args.keep:
        os.replace(dump, f"{args.keep}.{what}")
    else:
        os.unlink(dump)
    if os.path.exists(out):
        os.unlink(out)
    return total // units


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default=os.path.join(HERE, ".."), help="the checkout whose server runs")
    parser.add_argument("--pure-python", action="store_true", help="unmask in pure Python, even with speedups")
    parser.add_argument("--only", choices=["message", "connection"])
    parser.add_argument("--keep", help="keep the profiles as KEEP.message and KEEP.connection (callgrind_annotate)")
    args = parser.parse_args()
    for what in [args.only] if args.only else ["message", "connection"]:
        print(f"{what}: {measure(args, what)} server instructions each", flush=True)


if __name__ == "__main__":
    main()
