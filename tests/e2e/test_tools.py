"""bin/stream and bin/spy, run for real in subprocesses against a loopback server."""

import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.protocol import Factory

from tests.helpers import (
    child_environment,
    ErrorPage,
    Follow,
    guard,
    make_tls_files,
    program,
    raw_connect,
    REPO,
    run,
    spawn,
    start_producer,
    start_server,
    TWISTD,
)

STREAM = [sys.executable, str(REPO / "bin" / "stream")]
SPY = [sys.executable, str(REPO / "bin" / "spy")]
ANSI = re.compile(rb"\x1b\[[0-9;]*m")


def assert_failed(err: bytes, total: int, reason: str) -> None:
    """bin/stream's standard error is its failure, said once when it happened (unless the
    input had ended by then) and once at the end, with the bytes of input read."""
    lines = err.decode().splitlines()
    assert lines[-1] == f"loom-stream: upload failed after {total} bytes of input: {reason}"
    assert lines[:-1] in (
        [], [f"loom-stream: {reason}; reading the input to its end, without storing it"]), lines


async def body_of(server, stream_id):
    response = await treq.get(f"{server.url}/stream/{stream_id}")
    return await response.content(), response.headers


@pytest_twisted.ensureDeferred
async def test_original_usage_with_a_shell_loop(server):
    """The original README's pipeline works unchanged, with and without --force."""
    loop = "for i in 1 2 3 4 5; do echo $i; sleep 0.05; done"
    command = f"{loop} | {sys.executable} {REPO / 'bin' / 'stream'} {server.url} streamid"
    code, out, err = await run(["/bin/sh", "-c", command])
    assert code == 0, err
    assert (await body_of(server, "streamid"))[0] == b"1\n2\n3\n4\n5\n"
    code, out, err = await run(["/bin/sh", "-c", command])
    assert code == 1 and err.decode().splitlines()[-1] == (
        "loom-stream: upload failed after 10 bytes of input: "
        "stream streamid already exists (--force replaces it)")
    code, out, err = await run(["/bin/sh", "-c", command + " --force"])
    assert code == 0, err
    assert b"replaced" in err


@pytest_twisted.ensureDeferred
async def test_each_line_reaches_a_follower_within_200_ms(server):
    """Lines written to stdin arrive at a live follower in real time, one by one."""
    process = spawn(STREAM + [server.url, "realtime"])
    process.write(b"line 0\n")
    await process.protocol.wait_for_output(r"stream realtime: ")
    follower = Follow()
    await follower.start(server.url + "/stream/realtime")
    await follower.until(7)
    delays = []
    expected = b"line 0\n"
    for index in range(1, 21):
        line = b"line %d\n" % index
        expected += line
        sent = time.monotonic()
        process.write(line)
        delays.append(await follower.until(len(expected)) - sent)
    process.close_stdin()
    result = await process.wait()
    assert result.exit_code == 0, process.text()
    await guard(follower.done)
    assert follower.data == expected
    assert max(delays) < 0.2, delays


@pytest_twisted.ensureDeferred
async def test_a_quiet_pipe_keeps_the_stream_open(tmp_path):
    """A producer silent for longer than the idle timeout is not cut off."""
    server = await start_server(tmp_path / "data", idle_timeout=0.5)
    try:
        process = spawn(STREAM + [server.url, "quiet"])
        process.write(b"before\n")
        await process.protocol.wait_for_output("stream quiet: ")
        idle = await raw_connect(server.port)
        await guard(idle.closed)  # the server closed an idle connection: the timeout ran
        process.write(b"after\n")
        process.close_stdin()
        result = await process.wait()
        assert result.exit_code == 0, process.text()
        assert (await body_of(server, "quiet"))[0] == b"before\nafter\n"
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_generated_id_metadata_and_token(tmp_path):
    """No id: the server's id is printed to stderr; --meta, -m and $LOOM_TOKEN are sent."""
    server = await start_server(tmp_path / "data", tokens=("sekrit-t0ken",))
    try:
        code, out, err = await run(
            STREAM + [server.url, "--meta", '{"job": "build", "n": 1}', "-m", "branch=main",
                      "-m", "n=2"],
            env=child_environment(LOOM_TOKEN="sekrit-t0ken"), stdin=b"payload\n")
        assert code == 0, err
        stream_id = re.search(rb"stream (loom-[\w-]+): ", err).group(1).decode()
        response = await treq.get(f"{server.url}/stream/{stream_id}",
                                  headers={"Authorization": "Bearer sekrit-t0ken"})
        assert await response.content() == b"payload\n"
        import json

        assert json.loads(response.headers.getRawHeaders("x-stream-metadata")[0]) == {
            "job": "build", "n": "2", "branch": "main"}
        unauthorized = ("loom-stream: upload failed after 1 bytes of input: "
                        "unauthorized (the token: --token or $LOOM_TOKEN)")
        code, out, err = await run(STREAM + [server.url, "x", "--token", "wrong"], stdin=b"x")
        assert code == 1 and err.decode().splitlines()[-1] == unauthorized
        code, out, err = await run(STREAM + [server.url, "x"], stdin=b"x")
        assert code == 1 and err.decode().splitlines()[-1] == unauthorized
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_connection_refused_and_usage_errors(server):
    """Unreachable server (--no-resume): one line and status 3; bad options: status 2."""
    port = server.port
    await server.service.stopService()
    code, out, err = await run(STREAM + [f"http://127.0.0.1:{port}", "x", "--no-resume"],
                               stdin=b"data")
    assert code == 3
    assert_failed(err, 4, "connection refused (--no-resume: not retrying)")
    code, out, err = await run(STREAM + [f"http://127.0.0.1:{port}", "--meta", "[1]"], stdin=b"")
    assert code == 2 and b"--meta must be a JSON object" in err
    code, out, err = await run(STREAM + [f"http://127.0.0.1:{port}", "-m", "novalue"], stdin=b"")
    assert code == 2 and b"KEY=VALUE" in err


@pytest_twisted.ensureDeferred
async def test_server_aborting_the_stream_is_reported(server):
    """If the server cuts the stream (here: replaced, and complete), the tool says so, reads
    its input to the end and exits 4; with --no-resume without trying to resume."""
    for flags, reason in [
        ([], "cannot resume stream victim: Stream victim is complete: only an aborted or "
             "interrupted stream can be appended to."),
        (["--no-resume"], "server aborted the stream (--no-resume: not retrying)"),
    ]:
        process = spawn(STREAM + [server.url, "victim", "--force"] + flags)
        process.write(b"doomed\n")
        await process.protocol.wait_for_output("stream victim: ")
        response = await treq.post(server.url + "/stream/victim?force=true", data=b"new")
        await response.content()
        await process.protocol.wait_for_output("reading the input to its end")
        process.write(b"more\n")
        process.close_stdin()
        result = await process.wait()
        assert result.exit_code == 4
        assert bytes(result.err).decode().splitlines()[-1] == (
            f"loom-stream: upload failed after 12 bytes of input: {reason}")
        assert (await body_of(server, "victim"))[0] == b"new"


@pytest_twisted.ensureDeferred
async def test_ctrl_c_ends_the_stream_cleanly_and_exits_130(server):
    """SIGINT: the body is finished, the stream is complete with every byte, status 130."""
    process = spawn(STREAM + [server.url, "interrupted"])
    process.write(b"work in progress\n")
    await process.protocol.wait_for_output("stream interrupted: ")
    follower = Follow()
    await follower.start(server.url + "/stream/interrupted")
    await follower.until(17)
    process.signal("INT")
    result = await process.wait()
    assert result.exit_code == 130, process.text()
    assert "Traceback" not in process.text()
    body, headers = await body_of(server, "interrupted")
    assert body == b"work in progress\n"
    assert headers.getRawHeaders("x-stream-state") == ["complete"]


@pytest_twisted.ensureDeferred
async def test_tee_copies_input_to_stdout(server):
    """--tee keeps the build log on the terminal while it streams."""
    code, out, err = await run(STREAM + [server.url, "teed", "--tee", "-q"], stdin=b"a\nb\n")
    assert (code, out, err) == (0, b"a\nb\n", b"")


@pytest_twisted.ensureDeferred
async def test_help_has_examples():
    """--help explains the tool with examples and exit statuses."""
    code, out, err = await run(STREAM + ["--help"])
    assert code == 0 and b"examples:" in out and b"--force" in out and b"exit status" in out
    code, out, err = await run(SPY + ["--help"])
    assert code == 0 and b"examples:" in out and b"--no-color" in out


@pytest_twisted.ensureDeferred
async def test_stream_over_https(tmp_path):
    """bin/stream works over https with --cacert."""
    key, cert = make_tls_files(tmp_path)
    from loom.config import Config
    from loom.service import LoomService

    service = LoomService(Config(
        listen=(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",),
        data_dir=str(tmp_path / "data")), reactor)
    service.startService()
    try:
        url = f"https://localhost:{service.ports[0].getHost().port}"
        code, out, err = await run(STREAM + [url, "secure", "--cacert", cert], stdin=b"tls\n")
        assert code == 0, err
        code, out, err = await run(STREAM + [url, "secure2"], stdin=b"tls\n")
        assert code == 3 and b"TLS" in err
    finally:
        await service.stopService()


async def _spy_once(server, stream_id: str, flags: list[str], env: dict,
                    use_pty: bool = False) -> bytes:
    """What bin/spy prints while one short stream comes and goes."""
    process = spawn(SPY + [server.url] + flags, env=child_environment(**env), use_pty=use_pty)
    await process.protocol.wait_for_output("connected to")
    code, _, err = await run(STREAM + [server.url, stream_id, "-q"], stdin=b"hello\n")
    assert code == 0, err
    await process.protocol.wait_for_output(f"END {stream_id} complete")
    process.signal("INT")
    result = await process.wait()
    assert result.exit_code == 0 and b"Traceback" not in bytes(result.out + result.err)
    return bytes(result.out)


@pytest_twisted.ensureDeferred
async def test_spy_in_colour_and_without(server):
    """bin/spy paints a terminal (a pty) but writes plain text to a pipe, so grep works,
    unless --color; --no-color and NO_COLOR turn colour off."""
    out = await _spy_once(server, "tty", [], {}, use_pty=True)
    assert b"\x1b[" in out and b"tty | hello" in ANSI.sub(b"", out)
    for index, (flags, env, coloured) in enumerate([
        ([], {}, False), (["--color"], {}, True), (["--no-color"], {}, False),
        ([], {"NO_COLOR": "1"}, False), (["--color"], {"NO_COLOR": "1"}, True),
    ]):
        stream_id = f"c{index}"
        out = await _spy_once(server, stream_id, flags, env)
        assert (b"\x1b[" in out) == coloured, (flags, env)
        assert ANSI.sub(b"", out).splitlines() == [
            f"START {stream_id} {{}}".encode(), f"{stream_id} | hello".encode(),
            f"END {stream_id} complete 6".encode()]


@pytest_twisted.ensureDeferred
async def test_spy_ends_quietly_when_its_reader_has_had_enough(server):
    """bin/spy | head -1: once head has its line, spy exits at once with status 0 and no
    traceback, without waiting for more output."""
    bash = program("bash", "apt-get install bash")
    pipeline = spawn([bash, "-c", f"{shlex.join(SPY + [server.url])} | head -1; "
                                  'echo "pipeline ${PIPESTATUS[*]}" >&2'])
    await pipeline.protocol.wait_for_output("connected to")
    producer = await start_producer(server.port, b"headed", b"one\ntwo\n")
    result = await pipeline.wait()
    assert result.exit_code == 0
    assert bytes(result.out) == b"START headed {}\n"
    assert bytes(result.err).decode().splitlines()[-1] == "pipeline 0 0", pipeline.text()
    assert "Traceback" not in pipeline.text() and "Error" not in pipeline.text()
    producer.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_one_line_and_not_retried(tmp_path):
    """An https server whose certificate is not trusted: bin/stream and bin/spy each say so
    in one line (with what to do) and exit 3 at once, instead of reconnecting forever."""
    key, cert = make_tls_files(tmp_path)
    from loom.config import Config
    from loom.service import LoomService

    service = LoomService(Config(
        listen=(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",),
        data_dir=str(tmp_path / "data")), reactor)
    service.startService()
    try:
        host = f"localhost:{service.ports[0].getHost().port}"
        untrusted = (f"the TLS certificate of {host} is not trusted (certificate verify "
                     f"failed); --cacert FILE trusts a private CA")
        code, out, err = await run(STREAM + [f"https://{host}", "secure"], stdin=b"tls\n")
        assert code == 3
        assert_failed(err, 4, untrusted)
        code, out, err = await run(SPY + [f"https://{host}"])
        assert code == 3 and err.decode().splitlines() == [f"loom-spy: {untrusted}"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_proxys_error_page_is_one_line_and_retried():
    """A proxy answering its HTML 502 page: bin/stream and bin/spy print one line with the
    status and the proxy, never the page, and try again (Loom may be restarting)."""
    port = reactor.listenTCP(0, Factory.forProtocol(ErrorPage), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    summary = "502 Bad Gateway from the proxy nginx/1.25.3, not from Loom"
    try:
        code, out, err = await run(STREAM + [url, "proxied", "--retries", "1"], stdin=b"x\n")
        assert code == 3
        assert err.decode().splitlines() == [
            f"loom-stream: {summary}; retrying in 0.5s (retry 1 of 1)",
            f"loom-stream: upload failed after 2 bytes of input: gave up after 1 retry: "
            f"{summary}"]
        spy = spawn(SPY + [url])
        await spy.protocol.wait_for_output(r"reconnecting in 1s")
        spy.signal("INT")
        await spy.wait()
        assert spy.text().splitlines()[:2] == [
            f"loom-spy: {summary}; reconnecting in 0.5s",
            f"loom-spy: {summary}; reconnecting in 1s"]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_every_tool_tells_its_version():
    """twistd loom, bin/stream and bin/spy --version print loom.__version__ and exit 0."""
    from loom import __version__

    for argv, expected in [(TWISTD + ["loom", "--version"], "loom"),
                           (STREAM + ["--version"], "loom-stream"),
                           (SPY + ["--version"], "loom-spy")]:
        code, out, err = await run(argv)
        assert code == 0, err
        assert out.decode().split()[:2] == [expected, __version__]


def _copy_checkout(tmp_path) -> Path:
    checkout = tmp_path / "checkout"
    for part in ("bin", "loom", "twisted"):
        shutil.copytree(REPO / part, checkout / part,
                        ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    return checkout


@pytest_twisted.ensureDeferred
async def test_bin_tools_without_dependencies_say_exactly_what_to_run(tmp_path):
    """bin/stream run by a Python without Loom's dependencies (and no .venv in the checkout)
    prints the commands that make one, and still reads its input to the end."""
    checkout = _copy_checkout(tmp_path)
    python = [sys.executable, "-S"]  # -S: this Python's packages are out of sight
    code, out, err = await run(python + [str(checkout / "bin" / "stream"), "--tee",
                                         "http://127.0.0.1:1", "x"], stdin=b"z" * 300_000)
    assert code == 2 and out == b"z" * 300_000
    assert (f"python3 -m venv {checkout}/.venv && {checkout}/.venv/bin/pip install {checkout}"
            in err.decode())
    code, out, err = await run(python + [str(checkout / "bin" / "spy"), "--version"])
    assert code == 2 and f"{checkout}/.venv/bin/pip install {checkout}" in err.decode()


@pytest_twisted.ensureDeferred
async def test_bin_tools_use_the_checkouts_virtualenv(tmp_path):
    """bin/stream and bin/spy started by a Python without Loom's dependencies run with the
    checkout's .venv (as the README makes it) instead."""
    checkout = _copy_checkout(tmp_path)
    venv = checkout / ".venv"
    code, out, err = await run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                               seconds=120)
    assert code == 0, err
    # This environment's packages stand in for `pip install` (no network in tests).
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = os.path.dirname(os.path.dirname(__import__("twisted").__file__))
    (site / "deps.pth").write_text(deps + "\n")
    from loom import __version__

    for tool, name in (("stream", "loom-stream"), ("spy", "loom-spy")):
        code, out, err = await run([sys.executable, "-S", str(checkout / "bin" / tool),
                                    "--version"])
        assert (code, out.decode().split()) == (0, [name, __version__]), err


@pytest_twisted.ensureDeferred
async def test_spy_reconnects_when_the_server_restarts(tmp_path):
    """bin/spy reports a lost server in one line, retries, and resumes when it is back."""
    server = await start_server(tmp_path / "data")
    port, url = server.port, server.url
    process = spawn(SPY + [url, "--no-color"])
    try:
        await process.protocol.wait_for_output("connected to")
        await server.service.stopService()
        await process.protocol.wait_for_output("lost the connection to the server; reconnecting")
        await process.protocol.wait_for_output("connection refused; reconnecting")
        from loom.config import Config
        from loom.service import LoomService

        again = LoomService(Config(listen=(f"tcp:{port}:interface=127.0.0.1",),
                                   data_dir=str(tmp_path / "data")), reactor)
        again.startService()
        try:
            await process.protocol.wait_for_output("reconnected", seconds=60)
            code, _, err = await run(STREAM + [url, "back", "-q"], stdin=b"again\n")
            assert code == 0, err
            await process.protocol.wait_for_output("back | again")
        finally:
            await again.stopService()
    finally:
        process.signal("INT")
        await process.wait()
    assert "Traceback" not in process.text()
