"""Loom behind real nginx and HAProxy, configured as docs/deployment.md says.

Each proxy is this module's own process on a free loopback port, started from
the configuration block of docs/deployment.md with only the addresses, the
certificate paths and the default timeouts changed (60 s becomes 1 s, so that
a quiet stream outlives a default only thanks to its route's own timeout).
Loom is a real ``twistd loom``; the clients are real curl and bin/stream, over
TLS to the proxy. Not installed here: skipped, with the command that installs it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.helpers import (
    REPO,
    Process,
    ServerProcess,
    chunk,
    make_tls_files,
    program,
    run,
    spawn,
    start_producer,
    start_server_process,
)

DEPLOYMENT = REPO / "docs" / "deployment.md"
NGINX_BLOCK = "# /etc/nginx/conf.d/loom.conf"
HAPROXY_BLOCK = "# appended to /etc/haproxy/haproxy.cfg"
STREAM = [sys.executable, str(REPO / "bin" / "stream")]
BIG = 200 * 1024 * 1024
SHORT_DEFAULT = "1s"  # stands in for the proxies' 60 s defaults
QUIET_SECONDS = 2.5  # well past SHORT_DEFAULT
UPLOAD_GUARD = 180.0

PROXIES = ["nginx", "haproxy"]
TARGETS = ["direct", *PROXIES]


def documented_config(first_line: str) -> str:
    """The fenced block of docs/deployment.md that starts with ``first_line``."""
    match = re.search(r"```\w+\n(" + re.escape(first_line) + r".*?)```",
                      DEPLOYMENT.read_text(), re.S)
    assert match, f"docs/deployment.md has no configuration block starting {first_line!r}"
    return match.group(1)


def substitute(config: str, old: str, new: str, count: int = 1) -> str:
    """Replace ``old``, which the documented configuration must hold exactly ``count`` times
    (so that a change to the docs that the test no longer follows fails loudly)."""
    assert config.count(old) == count, f"expected {old!r} {count} time(s) in:\n{config}"
    return config.replace(old, new)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    """Where clients send their requests: Loom itself, or a proxy in front of it."""

    name: str
    url: str
    cacert: str | None = None
    process: Process | None = None

    @property
    def curl(self) -> list[str]:
        curl = program("curl", "apt-get install curl")
        return [curl, "--silent", "--show-error"] + (["--cacert", self.cacert]
                                                      if self.cacert else [])

    @property
    def stream(self) -> list[str]:
        return STREAM + (["--cacert", self.cacert] if self.cacert else [])

    async def stop(self) -> None:
        if self.process is not None and self.process.protocol.exit_code is None \
                and self.process.protocol.exit_signal is None:
            self.process.signal("TERM")
            await self.process.wait()


def nginx_config(directory: Path, port: int, loom_port: int, key: str, cert: str,
                 changes=()) -> str:
    site = documented_config(NGINX_BLOCK)
    site = substitute(site, "listen 443 ssl", f"listen 127.0.0.1:{port} ssl")
    site = substitute(site, "server 127.0.0.1:3060;", f"server 127.0.0.1:{loom_port};")
    site = substitute(site, "/etc/ssl/loom/fullchain.pem", cert)
    site = substitute(site, "/etc/ssl/loom/privkey.pem", key)
    site = substitute(site, " 60s;", f" {SHORT_DEFAULT};", count=3)
    for old, new in changes:
        site = substitute(site, old, new)
    temp_paths = "\n".join(f"    {kind}_temp_path {directory}/{kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # The nginx.conf around it: Debian's, reduced to what a private instance needs.
    return f"""\
user root;  # workers must reach the temp paths inside the test's private directory
worker_processes 1;
pid {directory}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp_paths}
{site}
}}
"""


def haproxy_config(port: int, loom_port: int, pem: str, changes=()) -> str:
    config = documented_config(HAPROXY_BLOCK)
    config = substitute(config, "bind :443 ssl crt /etc/haproxy/certs/loom.pem",
                        f"bind 127.0.0.1:{port} ssl crt {pem}")
    config = substitute(config, "127.0.0.1:3060", f"127.0.0.1:{loom_port}", count=2)
    config = substitute(config, "timeout server 60s", f"timeout server {SHORT_DEFAULT}")
    for old, new in changes:
        config = substitute(config, old, new)
    return config


async def start_nginx(directory: Path, loom: ServerProcess, tls, changes=()) -> Target:
    binary = program("nginx", "apt-get install nginx")
    directory.mkdir(parents=True)
    port = free_port()
    key, cert, _ = tls
    config = directory / "nginx.conf"
    config.write_text(nginx_config(directory, port, loom.port, key, cert, changes))
    process = spawn([binary, "-p", str(directory), "-c", str(config), "-g", "daemon off;"])
    # The master binds its sockets before it starts its workers.
    await process.protocol.wait_for_output(r"start worker process")
    return Target("nginx", f"https://127.0.0.1:{port}", cert, process)


async def start_haproxy(directory: Path, loom: ServerProcess, tls, changes=()) -> Target:
    binary = program("haproxy", "apt-get install haproxy")
    directory.mkdir(parents=True)
    port = free_port()
    _, cert, pem = tls
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_config(port, loom.port, pem, changes))
    # Master-worker mode says "Loading success." once its sockets are bound.
    process = spawn([binary, "-W", "-db", "-f", str(config)])
    await process.protocol.wait_for_output(r"Loading success")
    return Target("haproxy", f"https://127.0.0.1:{port}", cert, process)


STARTERS = {"nginx": start_nginx, "haproxy": start_haproxy}


@dataclass
class Site:
    """One Loom process for the module, and the proxies started in front of it on demand."""

    loom: ServerProcess
    tls: tuple[str, str, str]
    directory: Path
    targets: dict[str, Target] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)

    async def target(self, name: str) -> Target:
        if name == "direct":
            return Target("direct", self.loom.url)
        if name not in self.targets:
            self.targets[name] = await STARTERS[name](self.directory / name, self.loom, self.tls)
        return self.targets[name]

    async def variant(self, name: str, label: str, changes) -> Target:
        """A proxy of its own whose configuration differs from the documented one."""
        target = await STARTERS[name](self.directory / f"{name}-{label}", self.loom, self.tls,
                                      changes)
        self.targets[f"{name}-{label}"] = target
        return target


@pytest_twisted.async_yield_fixture(scope="module")
async def site(tmp_path_factory, request):
    directory = tmp_path_factory.mktemp("proxies")
    key, cert = make_tls_files(directory)
    pem = directory / "loom.pem"  # HAProxy wants the certificate and its key in one file
    pem.write_text(Path(cert).read_text() + Path(key).read_text())
    loom = await start_server_process(directory / "data")
    running = Site(loom, (key, cert, str(pem)), directory)
    yield running
    for target in running.targets.values():
        await target.stop()
    await loom.stop()
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and running.figures:
        with capture.global_and_fixture_disabled():  # the figures, even without -s
            reporter.write_line("")
            for line in running.figures:
                reporter.write_line("proxies: " + line)


@dataclass
class BigFile:
    path: str
    sha256: str


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> BigFile:
    path = tmp_path_factory.mktemp("upload") / "big.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG // (4 * 1024 * 1024)):
            block = os.urandom(4 * 1024 * 1024)
            digest.update(block)
            f.write(block)
    return BigFile(str(path), digest.hexdigest())


async def sha256_through(target: Target, stream_id: str) -> str:
    """The SHA-256 of what ``GET /stream/<id>`` returns through ``target``."""
    command = shlex.join(target.curl + ["--fail", f"{target.url}/stream/{stream_id}"])
    code, out, err = await run(["/bin/bash", "-c", f"set -o pipefail; {command} | sha256sum"],
                               seconds=UPLOAD_GUARD)
    assert code == 0, err
    return out.split()[0].decode()


async def state_through(target: Target, stream_id: str) -> str:
    code, out, err = await run(target.curl + ["--head", f"{target.url}/stream/{stream_id}"])
    assert code == 0, err
    return re.search(rb"(?im)^x-stream-state: (\w+)", out).group(1).decode()


async def delete(target: Target, stream_id: str) -> None:
    code, out, err = await run(target.curl + ["--fail", "-X", "DELETE",
                                              f"{target.url}/stream/{stream_id}"])
    assert code == 0, err


def throughput(seconds: float) -> str:
    return f"{BIG / seconds / 1e6:.0f} MB/s ({seconds:.2f} s)"


@dataclass
class Live:
    """A loom-stream producer, a /spy watcher and a curl follower, all through one target."""

    producer: Process
    spy: Process
    follower: Process

    async def end(self) -> None:
        self.spy.signal("TERM")
        await self.spy.wait()


async def go_live(target: Target, stream_id: str, first: bytes = b"first\n") -> Live:
    """Start producing ``stream_id`` through ``target`` and have a follower receive ``first``.

    The producer's 201 comes only at the end behind a proxy, so /spy says when the stream
    exists: its START line comes whether the stream began before or after it connected.
    """
    producer = spawn(target.stream + [target.url, stream_id])
    spy = spawn(target.curl + ["--no-buffer", f"{target.url}/spy"])
    await spy.protocol.wait_for_output(rf"(?m)^START {re.escape(stream_id)} ")
    follower = spawn(target.curl + ["--no-buffer", f"{target.url}/stream/{stream_id}"])
    producer.write(first)
    await follower.protocol.wait_for_output(re.escape(first.decode()))
    return Live(producer, spy, follower)


# --- big uploads ---------------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", TARGETS)
async def test_a_fast_200_mib_curl_upload_arrives_byte_exact(site, big_file, via):
    """curl --data-binary @file (200 MiB, as fast as it goes) completes, stored byte-exact."""
    target = await site.target(via)
    stream_id = f"curl-{via}"
    started = time.monotonic()
    code, out, err = await run(
        target.curl + ["--output", "/dev/null", "--write-out", "%{http_code}",
                       "--data-binary", f"@{big_file.path}", f"{target.url}/stream/{stream_id}"],
        seconds=UPLOAD_GUARD,
    )
    seconds = time.monotonic() - started
    assert (code, out) == (0, b"201"), err
    assert await state_through(target, stream_id) == "complete"
    assert await sha256_through(target, stream_id) == big_file.sha256
    site.figures.append(f"curl --data-binary, 200 MiB, {via}: {throughput(seconds)}")
    await delete(target, stream_id)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", TARGETS)
async def test_a_fast_200_mib_loom_stream_upload_arrives_byte_exact(site, big_file, via):
    """loom-stream < file (200 MiB, chunked, as fast as it goes) completes, byte-exact."""
    target = await site.target(via)
    stream_id = f"tool-{via}"
    command = shlex.join(target.stream + [target.url, stream_id, "--quiet"])
    started = time.monotonic()
    code, out, err = await run(
        ["/bin/sh", "-c", f"exec {command} < {shlex.quote(big_file.path)}"],
        seconds=UPLOAD_GUARD,
    )
    seconds = time.monotonic() - started
    assert code == 0, err
    assert await state_through(target, stream_id) == "complete"
    assert await sha256_through(target, stream_id) == big_file.sha256
    site.figures.append(f"loom-stream, 200 MiB, {via}: {throughput(seconds)}")
    await delete(target, stream_id)


# --- live streams ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", TARGETS)
async def test_a_live_upload_reaches_followers_and_spy_within_tens_of_ms(site, via):
    """Lines written to loom-stream reach a curl follower and /spy within tens of ms."""
    target = await site.target(via)
    stream_id = f"live-{via}"
    live = await go_live(target, stream_id, b"line 0\n")
    delays = []
    for index in range(1, 31):
        line = b"line %d\n" % index
        sent = time.monotonic()
        live.producer.write(line)
        await live.follower.protocol.wait_for_output(rf"(?m)^line {index}$")
        delays.append(time.monotonic() - sent)
    live.producer.close_stdin()
    assert (await live.producer.wait()).exit_code == 0, live.producer.text()
    assert (await live.follower.wait()).exit_code == 0, live.follower.text()
    expected = b"".join(b"line %d\n" % index for index in range(31))
    assert bytes(live.follower.protocol.out) == expected
    await live.spy.protocol.wait_for_output(
        rf"(?m)^END {stream_id} complete {len(expected)}$")
    spied = live.spy.text()
    assert all(f"{stream_id} | line {index}\n" in spied for index in range(31)), spied
    await live.end()
    delays.sort()
    site.figures.append(f"live line to follower via {via}: median "
                        f"{delays[len(delays) // 2] * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")
    assert max(delays) < 0.1, delays


@pytest.mark.slow
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", PROXIES)
async def test_a_quiet_producer_and_its_followers_outlast_the_default_timeouts(site, via):
    """A producer, follower and /spy quiet past the (shortened) default timeouts carry on."""
    target = await site.target(via)
    stream_id = f"quiet-{via}"
    live = await go_live(target, stream_id)
    await deferLater(reactor, QUIET_SECONDS)  # the silence under test, not a wait for an event
    live.producer.write(b"second\n")
    live.producer.close_stdin()
    assert (await live.producer.wait()).exit_code == 0, live.producer.text()
    assert (await live.follower.wait()).exit_code == 0, live.follower.text()
    assert bytes(live.follower.protocol.out) == b"first\nsecond\n"
    await live.spy.protocol.wait_for_output(rf"(?m)^{stream_id} \| second$")
    await live.end()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via, change", [
    ("nginx", ("        proxy_read_timeout 1h;\n        send_timeout 10m;\n    }\n\n"
               "    location = /spy", "        send_timeout 10m;\n    }\n\n    location = /spy")),
    ("haproxy", ("    use_backend loom_live if", "    # use_backend loom_live if")),
], ids=PROXIES)
async def test_without_the_stream_routes_timeout_a_quiet_follower_is_cut(site, via, change):
    """Without the stream routes' long timeout, a quiet follower is cut off and curl fails."""
    target = await site.variant(via, "no-long-timeout", [change])
    stream_id = f"cut-by-timeout-{via}"
    loom = await site.target("direct")
    producer = await start_producer(site.loom.port, stream_id.encode(), b"first\n")
    follower = spawn(target.curl + ["--no-buffer", f"{target.url}/stream/{stream_id}"])
    result = await follower.wait()
    assert result.exit_code == 18 and bytes(result.out) == b"first\n", follower.text()
    producer.send(b"0\r\n\r\n")
    await producer.wait_for(b"0\r\n\r\n")
    producer.transport.loseConnection()
    await delete(loom, stream_id)


# --- streams that end badly ---------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", PROXIES)
async def test_a_stream_cut_off_makes_curl_and_loom_stream_fail(site, via):
    """A live stream deleted: the follower's curl exits 18, the producer's loom-stream 4."""
    target = await site.target(via)
    stream_id = f"deleted-{via}"
    live = await go_live(target, stream_id)
    await delete(target, stream_id)
    follower = await live.follower.wait()
    assert follower.exit_code == 18, live.follower.text()
    assert bytes(follower.out) == b"first\n"
    live.producer.close_stdin()  # loom-stream reads its input to the end, whatever happens
    producer = await live.producer.wait()
    assert producer.exit_code == 4 and "server aborted the stream" in live.producer.text()
    await live.end()


@pytest_twisted.ensureDeferred
async def test_over_http_1_0_a_cut_stream_is_reset_never_clean(site):
    """nginx speaking HTTP/1.0 to Loom: a cut stream fails curl (reset), a complete one not."""
    target = await site.variant("nginx", "http10",
                                [("proxy_http_version 1.1;", "proxy_http_version 1.0;")])
    for stream_id, clean in (("http10-clean", True), ("http10-cut", False)):
        producer = await start_producer(site.loom.port, stream_id.encode(), b"first\n")
        follower = spawn(target.curl + ["--no-buffer", f"{target.url}/stream/{stream_id}"])
        await follower.protocol.wait_for_output("first")
        if clean:
            producer.send(chunk(b"last\n") + b"0\r\n\r\n")
        else:
            producer.transport.abortConnection()  # the producer vanishes: the stream is cut
        result = await follower.wait()
        if clean:
            assert result.exit_code == 0 and bytes(result.out) == b"first\nlast\n"
            producer.transport.loseConnection()
        else:
            assert result.exit_code == 18 and bytes(result.out) == b"first\n", follower.text()
    await target.process.protocol.wait_for_output(r"Connection reset by peer\) while reading "
                                                  r"upstream.*http10-cut")
    code, out, err = await run(target.curl + [
        "--fail", "--data-binary", "sent over 1.0", f"{target.url}/stream/http10-upload"])
    assert code == 0, err
    code, out, err = await run(target.curl + [f"{target.url}/stream/http10-upload"])
    assert out == b"sent over 1.0"
