"""A 16 MiB echo from a fast client: the server's own time for Autobahn case 9.1.6's message.

    python benchmarks/large_echo.py                      # ours, websockets, picows; text, utf8, binary; 5 each
    python benchmarks/large_echo.py --servers ours --kinds text --reps 10
    python benchmarks/large_echo.py --module /tmp/fw-base   # another checkout as "ours"

Autobahn's case 9.1.6 (one 16 MiB text message, echoed) is timed by its
Python 2.7 client from the open to the end of the connection, and most of
that time is the client's: it builds and masks the whole frame before
sending a byte, then validates the echo's UTF-8 (see "Autobahn 9.1.6 beside
`websockets` and picows" in README.md). This client leaves its own work out
of the clock: the frame is masked beforehand, goes out with one ``sendall``,
and the echo is read with ``recv_into`` into a buffer made beforehand. It
reports the wall time from the first byte sent to the last byte of the echo
received, and the server's CPU time meanwhile
(``/proc/PID/task/*/schedstat``, nanoseconds), for:

- text: ASCII, Autobahn's own pattern ("BAsd7&jh23" repeated);
- utf8: two-byte characters ("é"), where decoding costs the most;
- binary: random bytes (Autobahn 9.2.6: no UTF-8 work on the server).

Servers, each in its own process pinned to core 0 (the client on core 1):

- ours: ``echo_server.py --handler flask_websockets`` with a 16 MiB limit
  (the speedups extra when installed, as ``autobahn.sh`` runs it);
- websockets: ``../shared/bench/servers/websockets_asyncio.py`` (its limit is 16 MiB);
- picows: ``../shared/bench/servers/picows_server.py`` on uvloop: Cython, it
  echoes frame by frame without assembling the message or checking its
  UTF-8, so it is the floor rather than a peer.

A server that is not installed is skipped with a line saying so. Each
connection sends one message, checks the echo byte for byte, and closes.
"""

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # _common, beside this script
from _common import free_port, handshake, wait_listening  # noqa: E402

SHARED_SERVERS = os.path.join(HERE, "..", "..", "shared", "bench", "servers")
SIZE = 16 * 2**20
SERVER_CORE, CLIENT_CORE = 0, 1


def payload(kind):
    """The message and its opcode (1 text, 2 binary)."""
    if kind == "text":
        return (b"BAsd7&jh23" * (SIZE // 10 + 1))[:SIZE], 1
    if kind == "utf8":
        return ("\u00e9" * (SIZE // 2)).encode("utf-8"), 1
    return os.urandom(SIZE), 2


def masked(data, mask):
    """``data`` XOR the repeated 4-byte mask, as one big integer (no C speedup needed)."""
    key = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def server_command(name, port, checkout):
    """The server's command line and its websocket path."""
    if name == "ours":
        command = [os.path.join(checkout, "benchmarks", "echo_server.py"), "--port", str(port)]
        return command + ["--handler", "flask_websockets", "--max-message-size", str(SIZE)], "/ws"
    if name == "websockets":
        return [os.path.join(SHARED_SERVERS, "websockets_asyncio.py"), "--port", str(port)], "/"
    return [os.path.join(SHARED_SERVERS, "picows_server.py"), "--port", str(port)], "/"


def server_ns(pid):
    """The server process's CPU time (all threads), in nanoseconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def echo_once(port, path, data, opcode, pid):
    """One connection, one message: (wall seconds, server CPU seconds) from the first byte out to the last in."""
    sock, rest = handshake(port, path, 60)
    with sock:
        mask = os.urandom(4)
        frame = bytes([0x80 | opcode, 0xFF]) + struct.pack("!Q", len(data)) + mask + masked(data, mask)
        expected = bytes([0x80 | opcode, 127]) + struct.pack("!Q", len(data))
        received = bytearray(len(expected) + len(data))
        received[: len(rest)] = rest
        view, got = memoryview(received), len(rest)
        cpu, start = server_ns(pid), time.perf_counter()
        sock.sendall(frame)
        while got < len(received):
            n = sock.recv_into(view[got:])
            if not n:
                raise RuntimeError("closed before the whole echo came")
            got += n
        wall, cpu = time.perf_counter() - start, (server_ns(pid) - cpu) / 1e9
        if bytes(received[: len(expected)]) != expected or received[len(expected) :] != data:
            raise RuntimeError("the echo differs from the message (or came in several frames)")
        sock.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000))
        return wall, cpu


def run_server(name, kinds, reps, checkout):
    port = free_port()
    command, path = server_command(name, port, checkout)
    errors = tempfile.TemporaryFile()  # not a pipe: a server that logs much would block on a full one
    proc = subprocess.Popen(
        ["taskset", "-c", str(SERVER_CORE), sys.executable, *command],
        stdout=subprocess.DEVNULL,
        stderr=errors,
        start_new_session=True,
    )
    try:
        try:
            wait_listening(proc, port, name)
        except RuntimeError:
            errors.seek(0)
            print(f"{name}: skipped, it did not start: {errors.read().decode().strip()[-200:]}")
            return
        for kind in kinds:
            data, opcode = payload(kind)
            walls, cpus = [], []
            for _ in range(reps):
                wall, cpu = echo_once(port, path, data, opcode, proc.pid)
                walls.append(wall * 1000)
                cpus.append(cpu * 1000)
                time.sleep(0.2)  # the connection's end, out of the next one's clock
            print(
                f"{name:10} {kind:6} wall ms median {statistics.median(walls):6.1f} "
                f"(min {min(walls):.1f}, max {max(walls):.1f}), server CPU ms median {statistics.median(cpus):6.1f} "
                f"(min {min(cpus):.1f}, max {max(cpus):.1f})",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errors.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="ours,websockets,picows")
    parser.add_argument("--kinds", default="text,utf8,binary")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--module", default=os.path.join(HERE, ".."), help="the checkout whose server is 'ours'")
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CORE})
    for name in args.servers.split(","):
        run_server(name, args.kinds.split(","), args.reps, args.module)


if __name__ == "__main__":
    main()
