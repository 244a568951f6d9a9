"""loom-stream never hurts the build it watches: real servers that stop, crash, stay away or
refuse, a network that loses bytes or answers, and a real command piping into bin/stream."""

import re
import shlex
import socket
import sys

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from loom.config import Token
from tests.helpers import (
    REPO,
    guard,
    program,
    raw_connect,
    spawn,
    start_producer,
    start_server,
    start_server_process,
)

STREAM = [sys.executable, str(REPO / "bin" / "stream")]

# A build step that writes what the test tells it to, one command a line, and would die of
# SIGPIPE, as a shell's commands do, if its output were closed under it. It also checks that
# the output it shares with loom-stream (its stderr is loom-stream's stdout) stays blocking.
BUILD = r'''
import fcntl, os, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
blocking = True
while True:
    command = sys.stdin.buffer.readline()
    if not command:
        break
    if command.startswith(b"bulk "):
        command = b"x" * (int(command.split()[1]) - 1) + b"\n"
    sys.stdout.buffer.write(command)
    sys.stdout.buffer.flush()
    blocking = blocking and not fcntl.fcntl(2, fcntl.F_GETFL) & os.O_NONBLOCK
sys.stderr.write(f"build done, its output blocking: {blocking}\n")
'''


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pipeline(tmp_path, stream_args: list[str]):
    """``build | bin/stream ...`` in bash, the build's stderr shared with bin/stream's
    stdout; bash reports both exit statuses as ``pipeline <build> <stream>``."""
    build = tmp_path / "build.py"
    build.write_text(BUILD)
    bash = program("bash", "apt-get install bash")
    command = (f"exec 3>&1; {shlex.quote(sys.executable)} {shlex.quote(str(build))} 2>&3 | "
               f"{shlex.join(STREAM + stream_args)}; "
               'echo "pipeline ${PIPESTATUS[*]}" >&2')
    return spawn([bash, "-c", command])


async def _stored(port: int, stream_id: str, ending: bytes) -> None:
    """Wait until the server has stored the stream up to ``ending``."""
    reader = await raw_connect(port)
    reader.send(f"GET /stream/{stream_id} HTTP/1.0\r\n\r\n".encode())
    await reader.wait_for(lambda got: got.endswith(ending))
    reader.transport.loseConnection()


async def _content(url: str, stream_id: str) -> tuple[bytes, str]:
    response = await treq.get(f"{url}/stream/{stream_id}")
    return await response.content(), response.headers.getRawHeaders("x-stream-state")[0]


@pytest_twisted.ensureDeferred
async def test_without_resume_a_stopped_server_never_breaks_the_builds_pipe(tmp_path):
    """--no-resume --tee, the server stopped mid-stream: the build writes on (a megabyte,
    far more than a pipe holds) and exits 0, the copy on stdout is whole, and only
    loom-stream's status (4) and one last line say the upload failed."""
    server = await start_server_process(tmp_path / "data")
    pipeline = _pipeline(tmp_path, [server.url, "build-1", "--no-resume", "--tee"])
    try:
        pipeline.write(b"line 1\n")
        await pipeline.protocol.wait_for_output("stream build-1: ")
        await server.stop("TERM")
        await pipeline.protocol.wait_for_output(
            r"server aborted the stream \(--no-resume: not retrying\); "
            "reading the input to its end, without storing it")
        pipeline.write(b"bulk 1000000\nlast line\n")
        pipeline.close_stdin()
        result = await pipeline.wait()
        out, err = bytes(result.out), bytes(result.err).decode()
        assert err.splitlines()[-2:] == [
            "loom-stream: upload failed after 1000017 bytes of input: server aborted the "
            "stream (--no-resume: not retrying)",
            "pipeline 0 4"], pipeline.text()
        # The build's last words (on the output it shares) may land amid the copy.
        done = b"build done, its output blocking: True\n"
        assert done in out
        assert out.replace(done, b"") == b"line 1\n" + b"x" * 999999 + b"\nlast line\n"
    finally:
        if pipeline.protocol.exit_code is None:
            pipeline.signal("KILL")
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_resuming_is_the_default_and_every_outage_gets_a_fresh_budget(tmp_path):
    """The server stopped (SIGTERM), then killed (kill -9), each time down for three
    retries of --retries 5: both outages are resumed (never turned into "already exists"),
    the second again from a 0.5 s pause and retry 1, nothing is lost or doubled, and the
    build never notices."""
    port = _free_port()
    listen = f"tcp:{port}:interface=127.0.0.1"
    url = f"http://127.0.0.1:{port}"
    server = await start_server_process(tmp_path / "data", "--listen", listen)
    pipeline = _pipeline(tmp_path, [url, "outages", "--retries", "5"])
    wait_for = pipeline.protocol.wait_for_output
    try:
        pipeline.write(b"line 1\n")
        await wait_for("stream outages: ")
        await _stored(port, "outages", b"line 1\n")
        await server.stop("TERM")
        pipeline.write(b"line 2, while the server is away\n")
        await wait_for(r"connection refused; resuming in 2s \(retry 3 of 5\)")
        server = await start_server_process(tmp_path / "data", "--listen", listen)
        await wait_for("resumed stream outages at byte 7", seconds=60)
        pipeline.write(b"line 3\n")
        await _stored(port, "outages", b"line 3\n")
        await server.stop("KILL")
        pipeline.write(b"line 4, after a crash\n")
        after_first = r"resumed stream outages at byte 7\n[\s\S]*"
        await wait_for(after_first + r"resuming in 2s \(retry 3 of 5\)")
        server = await start_server_process(tmp_path / "data", "--listen", listen)
        await wait_for(after_first + "resumed stream outages at byte 47", seconds=60)
        pipeline.write(b"bulk 200000\n")
        pipeline.close_stdin()
        result = await pipeline.wait(60)
        text = pipeline.text()
        second_outage = text[text.index("at byte 7\n"):]
        assert "; resuming in 0.5s (retry 1 of 5)" in second_outage, text
        assert "already exists" not in text
        assert bytes(result.err).decode().splitlines()[-1] == "pipeline 0 0", text
        assert "build done, its output blocking: True" in text
        assert await _content(url, "outages") == (
            b"line 1\nline 2, while the server is away\nline 3\nline 4, after a crash\n"
            + b"x" * 199999 + b"\n", "complete")
    finally:
        if pipeline.protocol.exit_code is None:
            pipeline.signal("KILL")
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_input_beyond_the_replay_buffer_while_the_server_is_away_is_read_and_reported(
        tmp_path):
    """More than --replay-buffer arrives while the server is away: the stream cannot be
    completed, which is said at once, the input is still read to its end, and the tool
    exits 4 with one last line."""
    server = await start_server(tmp_path / "data")
    tool = spawn(STREAM + [server.url, "overflow", "--replay-buffer", "1KiB"])
    tool.write(b"first\n")
    await tool.protocol.wait_for_output("stream overflow: ")
    await server.service.stopService()
    await tool.protocol.wait_for_output(r"resuming in 0\.5s")
    tool.write(b"y" * 4095 + b"\n")
    reason = ("cannot resume stream overflow: more than --replay-buffer (1KiB) of input "
              "arrived while the server was away, so bytes 6 to 3078 can no longer be sent")
    await tool.protocol.wait_for_output(re.escape(reason) + "; reading the input to its end")
    tool.write(b"z" * 1_000_000)
    tool.close_stdin()
    result = await tool.wait()
    assert result.exit_code == 4
    assert bytes(result.err).decode().splitlines()[-1] == (
        f"loom-stream: upload failed after 1004102 bytes of input: {reason}")


@pytest_twisted.ensureDeferred
async def test_a_refusal_is_reported_at_once_and_the_input_still_read_to_its_end(tmp_path):
    """409 (exists), 401 and 403 are reported as soon as the server answers, before any
    input; the input is then read to its end (the build is not cut off) and the tool
    exits 1."""
    server = await start_server(tmp_path / "data", tokens=(
        "sekrit-all", Token("sekrit-reader", frozenset({"read"}))))
    try:
        code = (await treq.post(server.url + "/stream/taken", data=b"old",
                                headers={"Authorization": "Bearer sekrit-all"})).code
        assert code == 201
        for args, reason in [
            (["taken", "--token", "sekrit-all"], "stream taken already exists (--force "
                                                 "replaces it)"),
            (["new", "--token", "sekrit-wrong"], "unauthorized (the token: --token or "
                                                 "$LOOM_TOKEN)"),
            (["new", "--token", "sekrit-reader"], "forbidden: This token may not write "
                                                  "streams: it needs the write scope (or "
                                                  "admin, or replace)."),
        ]:
            tool = spawn(STREAM + [server.url] + args)
            await tool.protocol.wait_for_output(
                re.escape(reason) + "; reading the input to its end")
            tool.write(b"w" * 300_000)
            tool.close_stdin()
            result = await tool.wait()
            assert result.exit_code == 1
            assert bytes(result.err).decode().splitlines()[-1] == (
                f"loom-stream: upload failed after 300000 bytes of input: {reason}")
    finally:
        await server.service.stopService()


# --- a network the test controls ------------------------------------------------------


class _Relay:
    """A TCP relay in front of a server, standing in for the network: it can swallow what
    a connection sends from some moment on (bytes lost in flight), and lose the answer to
    the next connection (the server acted on the request; the client never hears of it)."""

    def __init__(self, server_port: int):
        self.server_port = server_port
        self.connections: list[_ClientSide] = []
        self.lose_next_answer = False
        self.answer_lost = Deferred()
        self.port = reactor.listenTCP(0, Factory.forProtocol(lambda: _ClientSide(self)),
                                      interface="127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"


class _ClientSide(Protocol):
    def __init__(self, relay: _Relay):
        self.relay = relay
        self.lose_answer, relay.lose_next_answer = relay.lose_next_answer, False
        self.server = None
        self.pending: list[bytes] = []
        self.swallowed: Deferred | None = None  # set: swallow, and fire on the first bytes

    def connectionMade(self):
        self.relay.connections.append(self)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.server_port)
        connectProtocol(endpoint, _ServerSide(self)).addCallbacks(
            self._connected, lambda failure: self.transport.abortConnection())

    def _connected(self, server):
        self.server = server
        for data in self.pending:
            server.transport.write(data)

    def dataReceived(self, data):
        if self.swallowed is not None:
            if not self.swallowed.called:
                self.swallowed.callback(data)
        elif self.server is None:
            self.pending.append(data)
        else:
            self.server.transport.write(data)

    def connectionLost(self, reason):
        # A swallowing link leaves the server's side open: to the server, a silent producer.
        if self.server is not None and self.swallowed is None:
            self.server.transport.loseConnection()


class _ServerSide(Protocol):
    def __init__(self, client: _ClientSide):
        self.client = client

    def dataReceived(self, data):
        if self.client.lose_answer:
            self.client.transport.abortConnection()
            self.transport.abortConnection()
            if not self.client.relay.answer_lost.called:
                self.client.relay.answer_lost.callback(None)
            return
        self.client.transport.write(data)

    def connectionLost(self, reason):
        self.client.transport.loseConnection()


async def _drop_with_bytes_in_flight(server, relay: _Relay, stream_id: str, token: str):
    """bin/stream through the relay has sent ``line 1`` (stored); then the link swallows
    ``line 2`` and is cut on the tool's side only: the server still holds a live stream of
    7 bytes, the tool has sent more. Returns the tool."""
    tool = spawn(STREAM + [relay.url, stream_id, "--token", token])
    tool.write(b"line 1\n")
    await tool.protocol.wait_for_output(f"stream {stream_id}: ")
    reader = await raw_connect(server.port)
    reader.send(b"GET /stream/" + stream_id.encode() + b" HTTP/1.0\r\n"
                b"Authorization: Bearer sekrit-admin\r\n\r\n")
    await reader.wait_for(b"line 1\n")  # stored
    [link] = relay.connections
    link.swallowed = Deferred()
    tool.write(b"line 2, lost in flight\n")
    await guard(link.swallowed)
    link.transport.abortConnection()
    reader.transport.loseConnection()
    return tool


def _scoped_server_tokens():
    return ("sekrit-admin", Token("sekrit-rw", frozenset({"write", "read"})),
            Token("sekrit-w", frozenset({"write"})))


@pytest_twisted.ensureDeferred
async def test_a_drop_that_lost_bytes_in_flight_resumes_from_what_the_server_holds(tmp_path):
    """The network drops the connection and the bytes in flight: the tool appends, learns
    from the 416 that the server holds fewer bytes, checks they are its own, takes the live
    stream over and resends the rest: the stream is whole."""
    server = await start_server(tmp_path / "data", tokens=_scoped_server_tokens())
    relay = _Relay(server.port)
    try:
        tool = await _drop_with_bytes_in_flight(server, relay, "in-flight", "sekrit-rw")
        await tool.protocol.wait_for_output("resumed stream in-flight at byte 7")
        tool.write(b"line 3\n")
        tool.close_stdin()
        result = await tool.wait()
        assert result.exit_code == 0, tool.text()
        response = await treq.get(server.url + "/stream/in-flight",
                                  headers={"Authorization": "Bearer sekrit-admin"})
        assert await response.content() == b"line 1\nline 2, lost in flight\nline 3\n"
        assert response.headers.getRawHeaders("x-stream-state") == ["complete"]
    finally:
        await relay.port.stopListening()
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_write_only_token_is_told_what_resuming_needs(tmp_path):
    """The same drop with a token that may only write, to which the server does not tell
    its size: the tool says in one line which token resuming needs (rather than looping),
    reads its input to the end and exits 4."""
    server = await start_server(tmp_path / "data", tokens=_scoped_server_tokens())
    relay = _Relay(server.port)
    try:
        tool = await _drop_with_bytes_in_flight(server, relay, "write-only", "sekrit-w")
        reason = ("cannot resume stream write-only: the server does not hold the 30 bytes "
                  "sent, and tells how many it holds only to a token that may also read the "
                  "stream: resuming needs a token with the write and read scopes")
        await tool.protocol.wait_for_output(re.escape(reason) + "; reading the input to its end")
        tool.write(b"line 3\n")
        tool.close_stdin()
        result = await tool.wait()
        assert result.exit_code == 4
        assert bytes(result.err).decode().splitlines()[-1] == (
            f"loom-stream: upload failed after 37 bytes of input: {reason}")
    finally:
        await relay.port.stopListening()
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_created_by_an_unanswered_attempt_is_resumed_not_refused(tmp_path):
    """The server creates the stream, but its 201 is lost on the way: the retry's "already
    exists" is the tool's own stream (same metadata, same bytes), so it is resumed, and the
    stream holds the input exactly once."""
    server = await start_server(tmp_path / "data")
    relay = _Relay(server.port)
    relay.lose_next_answer = True
    try:
        tool = spawn(STREAM + [relay.url, "unanswered", "-m", "job=7"])
        tool.write(b"line 1\n")
        await guard(relay.answer_lost)
        await tool.protocol.wait_for_output(
            r"stream unanswered was created by an unanswered attempt; resuming it at byte \d")
        await tool.protocol.wait_for_output("resumed stream unanswered at byte")
        tool.write(b"line 2\n")
        tool.close_stdin()
        result = await tool.wait()
        assert result.exit_code == 0, tool.text()
        assert await _content(server.url, "unanswered") == (b"line 1\nline 2\n", "complete")
    finally:
        await relay.port.stopListening()
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_replaced_under_the_tool_is_never_taken_back(tmp_path):
    """Someone replaces the stream (--force) while the tool writes it: resuming finds bytes
    that are not its input, so it stops (status 4) instead of taking over and mixing the
    two streams; the new producer carries on undisturbed."""
    server = await start_server(tmp_path / "data")
    try:
        tool = spawn(STREAM + [server.url, "contested"])
        tool.write(b"mine 1\nmine 2\n")
        await tool.protocol.wait_for_output("stream contested: ")
        reader = await raw_connect(server.port)
        reader.send(b"GET /stream/contested HTTP/1.0\r\n\r\n")
        await reader.wait_for(b"mine 2\n")
        rival = await start_producer(server.port, b"contested?force=true", b"theirs\n")
        reason = ("cannot resume stream contested: the 7 bytes it holds are not this "
                  "input's (was it replaced?)")
        await tool.protocol.wait_for_output(re.escape(reason))
        tool.close_stdin()
        result = await tool.wait()
        assert result.exit_code == 4
        rival.send(b"5\r\nmore\n\r\n0\r\n\r\n")
        await rival.wait_for(lambda got: got.endswith(b"\r\n0\r\n\r\n"))
        assert await _content(server.url, "contested") == (b"theirs\nmore\n", "complete")
        rival.transport.loseConnection()
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stream_deleted_under_the_tool_is_reported_once(tmp_path):
    """The live stream is deleted: resuming finds it gone, which the tool says in one line;
    it reads its input to the end and exits 4."""
    server = await start_server(tmp_path / "data")
    try:
        tool = spawn(STREAM + [server.url, "doomed"])
        tool.write(b"first\n")
        await tool.protocol.wait_for_output("stream doomed: ")
        response = await treq.delete(server.url + "/stream/doomed")
        assert response.code == 204
        await response.content()
        reason = "cannot resume stream doomed: the server no longer has it (deleted?)"
        await tool.protocol.wait_for_output(re.escape(reason) + "; reading the input")
        tool.write(b"second\n")
        tool.close_stdin()
        result = await tool.wait()
        assert result.exit_code == 4
        assert bytes(result.err).decode().splitlines()[-1] == (
            f"loom-stream: upload failed after 13 bytes of input: {reason}")
    finally:
        await server.service.stopService()
