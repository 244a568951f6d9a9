"""Test helpers: a Loom site on fakes, raw-byte clients, loopback servers and processes.

Nothing here sleeps: every wait is on an event, with a timeout only as a
guard against a hung test.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from loom.client import LoomClient
from loom.config import Config
from loom.testing import (  # noqa: F401 (the fakes, for the tests)
    FakeSite,
    FakeTCPTransport,
    FaultyFileSystem,
    ManualRunners,
    RecordingSink,
    read_all,
)
from loom import testing
from loom.service import LoomService

REPO = Path(__file__).resolve().parent.parent
GUARD_SECONDS = 30.0
# Every token in the tests contains this, so the log of the whole run can be searched for it.
SECRET_MARK = "sekrit"
# Everything child processes printed, for that search.
CHILD_OUTPUT: list[str] = []
# Every child process started, so that none outlives the test run.
CHILDREN: list = []


# CI installs every tool the suite can use and sets this: a missing one fails there.
REQUIRE_ALL = os.environ.get("TESTS_REQUIRE_ALL") == "1"
# TESTS_DIRECT_SEND=0 runs every server of the suite with directSend off (CI runs both).
DIRECT_SEND = os.environ.get("TESTS_DIRECT_SEND", "1") != "0"


def make_fake_site(**options) -> FakeSite:
    """loom.testing.make_fake_site, with the direct send as this run says (TESTS_DIRECT_SEND)."""
    options.setdefault("direct_send", DIRECT_SEND)
    return testing.make_fake_site(**options)


def unavailable(reason: str):
    """Skip a test that needs something this machine lacks (``reason``: what, and the
    install step) -- or fail it where everything must be there (TESTS_REQUIRE_ALL=1, CI)."""
    import pytest

    if REQUIRE_ALL:
        pytest.fail(f"{reason} (TESTS_REQUIRE_ALL=1: it must be installed here)")
    pytest.skip(reason)


def program(name: str, install: str) -> str:
    """The path of the program ``name``, or skip (fail in CI) saying how to install it."""
    import shutil

    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        unavailable(f"{name} is not installed ({install})")
    return path


def guard(d: Deferred, seconds: float = GUARD_SECONDS) -> Deferred:
    """Fail ``d`` instead of hanging forever if the event never comes."""
    return d.addTimeout(seconds, reactor)


# --- a site on fakes, fed raw bytes -------------------------------------------






def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names; last wins) and raw body of the first response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def cut_off(transport) -> bool:
    """Whether the server ended its answer so that no client takes it for a clean end: the
    connection reset, or its write side closed without the chunked body's last chunk."""
    if transport.disconnected:
        return True
    closed = getattr(transport, "write_closed", False) or transport.disconnecting
    return closed and not transport.value().endswith(b"\r\n0\r\n\r\n")


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body; also say whether the terminating chunk was seen."""
    out, rest = bytearray(), body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out), True
        out += rest[:size]
        rest = rest[size + 2 :]
    return bytes(out), False


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- loopback clients -----------------------------------------------------------


class RawClient(Protocol):
    """A raw TCP client: send exact bytes, wait for what comes back."""

    def __init__(self):
        self.received = bytearray()
        self.closed: Deferred = Deferred()
        self._waiters: list[tuple[object, Deferred]] = []

    def dataReceived(self, data):
        self.received += data
        self._check()

    def connectionLost(self, reason):
        self.reason = reason
        self.closed.callback(None)
        self._check(final=True)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def wait_for(self, condition) -> Deferred:
        """Fire when ``condition(received)`` is true, or with bytes: when they appear."""
        if isinstance(condition, bytes):
            needle = condition
            condition = lambda received: needle in received  # noqa: E731
        d = Deferred()
        self._waiters.append((condition, d))
        self._check()
        return guard(d)

    def _check(self, final: bool = False):
        for item in list(self._waiters):
            condition, d = item
            if condition(bytes(self.received)):
                self._waiters.remove(item)
                d.callback(bytes(self.received))
            elif final:
                self._waiters.remove(item)
                d.errback(AssertionError(f"connection closed; got {bytes(self.received)!r}"))


async def raw_connect(port: int) -> RawClient:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


# --- in-process and subprocess servers -------------------------------------------


@dataclass
class RunningServer:
    service: LoomService
    data_dir: str

    @property
    def port(self) -> int:
        return self.service.ports[0].getHost().port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_server(data_dir: str, **settings) -> RunningServer:
    """A server in this process. Followers of an aborted stream are cut at once
    (resume_window 0) unless the test asks for a resume window."""
    settings.setdefault("resume_window", None)
    settings.setdefault("direct_send", DIRECT_SEND)
    config = Config(
        listen=("tcp:0:interface=127.0.0.1",), data_dir=str(data_dir), **settings
    )
    service = LoomService(config, reactor)
    service.startService()
    return RunningServer(service, str(data_dir))


class _Collector(ProcessProtocol):
    def __init__(self, on_line=None):
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred = Deferred()
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self._line_waiters: list[tuple[re.Pattern, Deferred]] = []

    def outReceived(self, data):
        self.out += data
        self._check()

    def errReceived(self, data):
        self.err += data
        self._check()

    def _check(self):
        text = (self.out + self.err).decode("utf-8", "replace")
        for item in list(self._line_waiters):
            pattern, d = item
            match = pattern.search(text)
            if match:
                self._line_waiters.remove(item)
                d.callback(match)

    def processEnded(self, reason):
        CHILD_OUTPUT.append((self.out + self.err).decode("utf-8", "replace"))
        self.exit_code = reason.value.exitCode
        self.exit_signal = reason.value.signal
        for pattern, d in self._line_waiters:
            d.errback(AssertionError(
                f"process ended before printing {pattern.pattern!r}:\n"
                + (self.out + self.err).decode("utf-8", "replace")
            ))
        self._line_waiters = []
        self.ended.callback(self)

    def wait_for_output(self, pattern: str, seconds: float = GUARD_SECONDS) -> Deferred:
        d = Deferred()
        self._line_waiters.append((re.compile(pattern), d))
        self._check()
        return guard(d, seconds)


def child_environment(**extra) -> dict[str, str]:
    """The environment for child processes: this checkout first on the path, no LOOM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if not DIRECT_SEND:
        env["LOOM_DIRECT_SEND"] = "false"
    env.update(extra)
    return env


@dataclass
class Process:
    """A child process run through the reactor (never blocking it)."""

    protocol: _Collector
    transport: object
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.transport.pid

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close_stdin(self) -> None:
        self.transport.closeStdin()

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    async def wait(self, seconds: float = GUARD_SECONDS) -> _Collector:
        return await guard(self.protocol.ended, seconds)

    def text(self) -> str:
        return (self.protocol.out + self.protocol.err).decode("utf-8", "replace")


def spawn(argv: list[str], env: dict | None = None, cwd: str | None = None,
          use_pty: bool = False) -> Process:
    """Start ``argv``; with ``use_pty`` its output is a terminal (stdout and stderr in one)."""
    protocol = _Collector()
    transport = reactor.spawnProcess(
        protocol, argv[0], argv, env=env or child_environment(), path=cwd, usePTY=use_pty
    )
    CHILDREN.append(transport)
    return Process(protocol, transport, argv)


def kill_children() -> int:
    """SIGKILL every child process still running (after a failed test); how many."""
    killed = 0
    for transport in CHILDREN:
        if transport.pid is not None:
            try:
                transport.signalProcess("KILL")
                killed += 1
            except ProcessExitedAlready:  # it ended between the check and the signal
                pass
    return killed


async def run(argv, env=None, cwd=None, stdin: bytes | None = None, seconds=GUARD_SECONDS):
    """Run a command to completion; return (exit code, stdout, stderr)."""
    process = spawn(argv, env, cwd)
    if stdin is not None:
        process.write(stdin)
    process.close_stdin()
    result = await process.wait(seconds)
    return result.exit_code, bytes(result.out), bytes(result.err)


# The twistd script of the environment running the tests, with this checkout on the path.
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()"]


@dataclass
class ServerProcess:
    """``twistd -n loom`` in a child process, on an ephemeral loopback port."""

    process: Process
    port: int
    data_dir: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        return _proc_status(self.process.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return _proc_status(self.process.pid, "VmHWM")

    async def stop(self, signal_name: str = "TERM") -> _Collector:
        if self.process.protocol.exit_code is None and self.process.protocol.exit_signal is None:
            self.process.signal(signal_name)
        return await self.process.wait()


def _proc_status(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def crashing_twistd(point: str, count: int = 1) -> list[str]:
    """``twistd`` whose Loom kills itself the ``count``-th time it reaches crash point
    ``point`` (loom.testing.CrashAt): the switch exists only here, never in the server."""
    return [sys.executable, "-c",
            "import functools, sys; from loom import tap; from loom.testing import CrashAt; "
            f"tap.makeService = functools.partial(tap.makeService, crash=CrashAt({point!r}, "
            f"{count})); from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


async def start_server_process(data_dir: str, *args: str, cwd: str | None = None,
                               env: dict | None = None,
                               twistd: list[str] = TWISTD) -> ServerProcess:
    """``twistd loom`` on ``data_dir`` and a loopback ephemeral port, once it is ready."""
    argv = twistd + ["--nodaemon", "--pidfile=", "loom", "--data-dir", str(data_dir),
                     "--listen", "tcp:0:interface=127.0.0.1", *args]
    env = env or child_environment()
    env.setdefault("LOOM_RESUME_WINDOW", "0")  # cut followers of aborted streams at once
    process = spawn(argv, env=env, cwd=cwd or os.path.dirname(str(data_dir)))
    match = await process.protocol.wait_for_output(r"Loom ready: .* listening on .*:(\d+)")
    return ServerProcess(process, int(match.group(1)), str(data_dir))




def mount_tmpfs(path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path``; False where that is not allowed (not root)."""
    import subprocess

    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


def unmount(path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill_up(directory, name: str = "filler") -> str:
    """Write a file in ``directory`` until not one more byte fits; return its path."""
    path = os.path.join(str(directory), name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    block = b"\0" * 65536
    try:
        while block:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return path


def json_body(body: bytes) -> dict:
    return json.loads(body.decode("utf-8"))


def make_tls_files(directory, with_ip: bool = True) -> tuple[str, str]:
    """A self-signed certificate for localhost and (``with_ip``) 127.0.0.1: (key path,
    certificate path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost")]
            + ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if with_ip else [])
        ), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path = os.path.join(str(directory), "key.pem")
    cert_path = os.path.join(str(directory), "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


async def start_producer(port: int, stream_id: bytes, first: bytes = b"",
                         headers: bytes = b"") -> RawClient:
    """A raw producer that has sent its headers (and ``first``) and received its 201."""
    producer = await raw_connect(port)
    producer.send(b"POST /stream/" + stream_id + b" HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n" + headers + b"\r\n"
                  + (chunk(first) if first else b""))
    await producer.wait_for(b"201 Created")
    return producer



@implementer(IPushProducer)
class ChunkPump:
    """Writes ``total`` bytes to a raw producer as chunked-encoding chunks, honouring
    back-pressure, then the final chunk. ``piece()`` makes each chunk's payload."""

    def __init__(self, client: RawClient, total: int, piece):
        self.client = client
        self.total = self.remaining = total
        self.piece = piece
        self.paused = False
        self.finished = guard(Deferred(), 300)
        self.halfway = None  # when half the bytes had gone out

    def start(self):
        self.started = time.monotonic()
        self.client.transport.registerProducer(self, True)
        self._pump()

    def _pump(self):
        burst = 0
        while not self.paused and self.remaining > 0:
            payload = self.piece()
            self.client.send(chunk(payload))
            self.remaining -= len(payload)
            burst += len(payload)
            if self.halfway is None and self.remaining <= self.total // 2:
                self.halfway = time.monotonic()
            if burst >= 4 * 1024 * 1024:
                reactor.callLater(0, self._pump)  # let the reactor breathe
                return
        if self.remaining <= 0 and not self.finished.called:
            self.client.transport.unregisterProducer()
            self.client.send(b"0\r\n\r\n")
            self.seconds = time.monotonic() - self.started
            self.finished.callback(None)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._pump()

    def stopProducing(self):
        self.paused = True


@implementer(IBodyProducer, IPushProducer)
class ControlledBody:
    """A request body the test writes into, piece by piece, and ends when it likes."""

    length = UNKNOWN_LENGTH

    def __init__(self):
        self.consumer = None
        self.finished = Deferred()
        self.started = Deferred()

    def startProducing(self, consumer):
        self.consumer = consumer
        self.started.callback(None)
        return self.finished

    def write(self, data: bytes):
        self.consumer.write(data)

    def end(self):
        self.finished.callback(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


async def open_push(client: LoomClient, stream_id: str, first: bytes):
    """A push the server has accepted (201) and whose body has sent ``first`` and stays
    open: (the body, the Deferred of the push)."""
    source = ControlledBody()
    created = Deferred()
    pushing = Deferred.fromCoroutine(client.push(source, stream_id, on_created=created.callback))
    await guard(created)
    await guard(source.started)
    source.write(first)
    return source, pushing


def body(data: bytes):
    from io import BytesIO

    return FileBodyProducer(BytesIO(data))


class ErrorPage(Protocol):
    """A proxy in front of a Loom that is down: nginx's 502 page for every request, sent
    as soon as the request's head has arrived, as nginx does."""

    PAGE = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
            b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>"
            b"\r\n</body>\r\n</html>\r\n")

    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received:
            self.transport.write(
                b"HTTP/1.1 502 Bad Gateway\r\nServer: nginx/1.25.3\r\n"
                b"Content-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % len(self.PAGE) + self.PAGE)
            self.transport.loseConnection()
            self.received = b""


CURL = ["/usr/bin/curl", "--silent", "--show-error"]


class Follow:
    """A treq follower that records every chunk with its arrival time."""

    def __init__(self):
        self.chunks: list[tuple[float, bytes]] = []
        self._waiters: list[tuple[int, Deferred]] = []
        self.done: Deferred | None = None

    @property
    def data(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def received(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))
        for item in list(self._waiters):
            size, d = item
            if len(self.data) >= size:
                self._waiters.remove(item)
                d.callback(time.monotonic())

    def until(self, size: int) -> Deferred:
        d = Deferred()
        self._waiters.append((size, d))
        self.received(b"")
        return guard(d)

    async def start(self, url: str, **kwargs):
        response = await treq.get(url, unbuffered=True, **kwargs)
        self.response = response
        self.done = treq.collect(response, self.received)
        return response


class ShortSink(RecordingSink):
    """A consumer whose connection takes at most ``take`` bytes of a write and pauses its
    producer when it took fewer than offered, as a full socket does."""

    def __init__(self, take):
        super().__init__()
        self.take = take
        self.paused = False

    def write(self, parts, size):
        assert not self.paused, "written to while paused"
        data = b"".join(parts)[: self.take]
        super().write([data], len(data))
        if len(data) < size:
            self.paused = True
            self.producer.pauseProducing()
        return len(data)

    def resume_until_done(self, clock, done, rounds=10000):
        """Let the consumer take more, again and again, until ``done()``."""
        for _ in range(rounds):
            if done():
                return
            if self.paused:
                self.paused = False
                self.producer.resumeProducing()
            run_pending(clock)
        raise AssertionError("never done")


def run_pending(clock):
    """Run the calls scheduled for now (a producer yielding between turns)."""
    while any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
        clock.advance(0)


def fake_produce(fake, stream_id=b"s1", data=b"", end=True, metadata=None):
    channel, transport = fake.connect()
    extra = b"X-Stream-Metadata: " + metadata + b"\r\n" if metadata else b""
    channel.dataReceived(
        b"POST /stream/" + stream_id + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + extra + b"\r\n" + (chunk(data) if data else b"") + (b"0\r\n\r\n" if end else b"")
    )
    return channel, transport


def fake_get(fake, target=b"/stream/s1", transport=None):
    channel, transport = fake.connect(transport)
    channel.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return channel, transport
