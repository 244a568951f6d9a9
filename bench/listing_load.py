"""A follower's delivery latency while catalog listings run: the measurement behind
bench W6 and tests/soak/test_listing_load.py.

``follow_latency`` writes to a live stream through one raw socket and reads it
back through another, one chunk at a time (the next chunk is sent once the last
one arrived), and returns each chunk's delivery time. ``python -m
bench.listing_load hammer PORT QUERY...`` requests the listing QUERYs (paths
such as ``/streams?meta.branch=main``) in a loop over one keep-alive connection
until it is killed (telling every tenth answer); it runs in its own process, so that its work never delays
the measuring one.
"""

from __future__ import annotations

import http.client
import socket
import sys
import time

HEAD_END = b"\r\n\r\n"


def _connect(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(request)
    return sock


def _read_head(sock: socket.socket, what: str) -> bytes:
    """Read a response's head; return the bytes that followed it."""
    data = b""
    while HEAD_END not in data:
        more = sock.recv(65536)
        if not more:
            raise RuntimeError(f"the {what} connection closed: {data[:200]!r}")
        data += more
    head, rest = data.split(HEAD_END, 1)
    status = head.split(b" ", 2)[1]
    if status not in (b"200", b"201"):
        raise RuntimeError(f"the {what} was answered {head[:200]!r}")
    return rest


def follow_latency(port: int, stream_id: str, seconds: float) -> list[float]:
    """Seconds from writing each chunk to reading it from a follower, for chunks sent one
    after the other during ``seconds``."""
    producer = _connect(port, f"POST /stream/{stream_id} HTTP/1.1\r\nHost: loom\r\n"
                              "Transfer-Encoding: chunked\r\n\r\n".encode())
    _read_head(producer, "producer")  # 201 comes at once, before the body
    follower = _connect(port, f"GET /stream/{stream_id} HTTP/1.1\r\nHost: loom\r\n\r\n"
                              .encode())
    received = _read_head(follower, "follower")
    latencies = []
    try:
        index, until = 0, time.perf_counter() + seconds
        while time.perf_counter() < until:
            index += 1
            line = b"%09d\n" % index
            started = time.perf_counter()
            producer.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            while line not in received:  # (the follower's body is chunked too)
                more = follower.recv(65536)
                if not more:
                    raise RuntimeError("the follower's connection closed")
                received += more
            latencies.append(time.perf_counter() - started)
            received = received[received.index(line) + len(line):]
        producer.sendall(b"0\r\n\r\n")
        _read_rest(producer)
    finally:
        producer.close()
        follower.close()
    return latencies


def _read_rest(sock: socket.socket) -> None:
    """Wait until the server ended the producer's response (its stream is complete)."""
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        more = sock.recv(65536)
        if not more:
            return
        data += more


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def hammer(port: int, queries: list[str]) -> None:
    """Request ``queries`` in turn, forever, printing one line per ten answers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    count = 0
    while True:
        for query in queries:
            connection.request("GET", query)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise SystemExit(f"{query}: {response.status} {body[:200]!r}")
            count += 1
            if count % 10 == 0:
                print(f"{count} listings", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "hammer":
        print(__doc__, file=sys.stderr)
        return 2
    hammer(int(argv[1]), argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
