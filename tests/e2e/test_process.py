"""Loom as it really runs: ``twistd`` in a child process, measured from /proc."""

import os
import shutil
import socket
import sys
import time

import pytest
import pytest_twisted
import treq

from tests.helpers import (
    child_environment,
    chunk,
    ChunkPump,
    CURL,
    Follow,
    raw_connect,
    REPO,
    run,
    spawn,
    start_producer,
    start_server_process,
    TWISTD,
)

MiB = 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_stalled_consumer_costs_no_memory(tmp_path):
    """200 MiB flow into a stream a consumer stopped reading: server RSS grows < 20 MiB."""
    server = await start_server_process(tmp_path / "data")
    try:
        producer = await start_producer(server.port, b"big", b"start\n")
        stalled = await raw_connect(server.port)
        stalled.send(b"GET /stream/big HTTP/1.1\r\nHost: x\r\n\r\n")
        await stalled.wait_for(b"start\n")
        stalled.transport.pauseProducing()  # stop reading: the server's writes back up
        reader = spawn(CURL + ["--no-buffer", "-o", "/dev/null", "-w", "%{size_download}",
                               server.url + "/stream/big"])
        baseline = server.rss_kib()
        piece = b"z" * (64 * 1024)
        pump = ChunkPump(producer, 200 * MiB, lambda: piece)
        pump.start()
        await pump.finished
        await producer.wait_for(b"0\r\n\r\n")  # stored and complete
        result = await reader.wait(120)
        growth_mib = (server.peak_rss_kib() - baseline) / 1024
        assert bytes(result.out) == str(200 * MiB + 6).encode()  # the other consumer kept up
        print(f"server memory grew {growth_mib:.1f} MiB while 200 MiB flowed")
        assert growth_mib < 20, f"server memory grew {growth_mib:.1f} MiB"
        stalled.transport.abortConnection()
        producer.transport.loseConnection()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_kill_9_then_restart_keeps_every_byte_and_interrupts_live_streams(tmp_path):
    """After SIGKILL, a restarted server has every byte a follower saw; the stream is interrupted."""
    data_dir = tmp_path / "data"
    server = await start_server_process(data_dir)
    producer = await start_producer(server.port, b"crash",
                                    headers=b'X-Stream-Metadata: {"job": 7}\r\n')
    follower = Follow()
    await follower.start(server.url + "/stream/crash")
    sent = b""
    for index in range(200):
        piece = b"line %04d\n" % index
        producer.send(chunk(piece))
        sent += piece
    await follower.until(len(sent))
    await server.stop("KILL")
    assert server.process.protocol.exit_signal == 9
    restarted = await start_server_process(data_dir)
    try:
        response = await treq.get(restarted.url + "/stream/crash")
        body = await response.content()
        assert response.headers.getRawHeaders("x-stream-state") == ["interrupted"]
        assert response.headers.getRawHeaders("x-stream-metadata") == ['{"job":7}']
        assert body == sent  # everything the follower saw, nothing more
    finally:
        await restarted.stop()
        producer.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_sigterm_interrupts_live_streams_and_cuts_followers(tmp_path):
    """SIGTERM: exit within 5 s, live streams interrupted with all bytes, followers cut."""
    data_dir = tmp_path / "data"
    server = await start_server_process(data_dir)
    producer = await start_producer(server.port, b"term", b"before term\n")
    curl = spawn(CURL + ["--no-buffer", server.url + "/stream/term"])
    await curl.protocol.wait_for_output("before term")
    signalled = time.monotonic()
    server.process.signal("TERM")
    ended = await server.process.wait(5)
    print(f"SIGTERM to exit: {time.monotonic() - signalled:.2f} s")
    assert ended.exit_code == 0 or ended.exit_signal == 15  # twistd re-raises the signal
    follower = await curl.wait()
    assert follower.exit_code == 18  # closed without the final chunk
    await producer.closed
    restarted = await start_server_process(data_dir)
    try:
        response = await treq.get(restarted.url + "/stream/term")
        assert await response.content() == b"before term\n"
        assert response.headers.getRawHeaders("x-stream-state") == ["interrupted"]
    finally:
        await restarted.stop()


@pytest_twisted.ensureDeferred
async def test_config_errors_are_one_line_without_traceback(tmp_path):
    """An unknown key, a bad value or an unreadable file: one line on stderr, exit 1."""
    bad = tmp_path / "bad.yml"
    for text, expected in [("prot: 1\n", "unknown key 'prot'"),
                           ("port: -1\n", "port: -1 is out of range")]:
        bad.write_text(text)
        code, out, err = await run(TWISTD + ["-n", "--pidfile=", "loom", "-c", str(bad)],
                                   cwd=str(tmp_path))
        assert code == 1
        assert err.decode().strip().count("\n") == 0 and expected in err.decode()
        assert b"Traceback" not in out + err
    code, out, err = await run(TWISTD + ["-n", "--pidfile=", "loom", "-c", "nowhere.yml"],
                               cwd=str(tmp_path))
    assert code == 1 and b"nowhere.yml: cannot read it" in err and b"Traceback" not in err


@pytest_twisted.ensureDeferred
async def test_a_damaged_catalog_is_one_line_and_exit_1(tmp_path):
    """A corrupt catalog stops start-up with one line naming it, not a traceback."""
    data = tmp_path / "data"
    server = await start_server_process(data)
    response = await treq.post(server.url + "/stream/x", data=b"x")
    await response.content()
    await server.stop()
    catalog = data / "catalog.sqlite3"
    size = catalog.stat().st_size
    with open(catalog, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * (size - 4096))
    code, out, err = await run(TWISTD + ["-n", "--pidfile=", "loom", "--data-dir", str(data),
                                         "-p", "0"], cwd=str(tmp_path))
    text = (out + err).decode()
    assert code == 1 and "Traceback" not in text
    assert "loom: cannot open the data directory" in text and "catalog" in text


@pytest_twisted.ensureDeferred
async def test_address_in_use_is_one_line_and_exit_1(tmp_path):
    """A port that is taken stops start-up with one line naming the endpoint."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        code, out, err = await run(
            TWISTD + ["-n", "--pidfile=", "loom", "--data-dir", str(tmp_path / "d"),
                      "-p", str(port)], cwd=str(tmp_path))
    finally:
        blocker.close()
    text = (out + err).decode()
    assert code == 1
    assert f"loom: cannot listen on 'tcp:{port}:interface=127.0.0.1'" in text
    assert "Traceback" not in text


@pytest_twisted.ensureDeferred
async def test_open_server_says_so_at_start_up(tmp_path):
    """Without tokens the start-up log warns that the server is open."""
    server = await start_server_process(tmp_path / "data")
    await server.stop()
    assert "no tokens configured" in server.process.text()


@pytest_twisted.ensureDeferred
async def test_twistd_tac_starts_the_same_service(tmp_path):
    """``twistd -ny loom.tac`` runs the same service, configured by LOOM_* variables."""
    env = child_environment(LOOM_LISTEN="tcp:0:interface=127.0.0.1",
                            LOOM_DATA_DIR=str(tmp_path / "data"))
    process = spawn(TWISTD + ["-ny", str(REPO / "loom.tac"), "--pidfile="], env=env,
                    cwd=str(tmp_path))
    try:
        match = await process.protocol.wait_for_output(r"Loom ready: .* listening on .*:(\d+)")
        url = f"http://127.0.0.1:{match.group(1)}"
        response = await treq.post(url + "/stream/tac", data=b"via tac")
        assert response.code == 201
        await response.content()
        assert await (await treq.get(url + "/stream/tac")).content() == b"via tac"
        assert os.path.isdir(tmp_path / "data" / "streams")
    finally:
        process.signal("TERM")
        await process.wait()


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest_twisted.ensureDeferred
async def test_defaults_serve_127_0_0_1_3060_with_data_in_dot_data(tmp_path):
    """``twistd -n loom`` with no options listens on 127.0.0.1:3060 and stores in ./data."""
    if not _port_is_free(3060):
        pytest.skip("port 3060 is in use on this machine")
    process = spawn(TWISTD + ["-n", "--pidfile=", "loom"], cwd=str(tmp_path))
    try:
        await process.protocol.wait_for_output(r"listening on 127\.0\.0\.1:3060")
        response = await treq.post("http://127.0.0.1:3060/stream/default", data=b"d")
        assert response.code == 201
        await response.content()
        assert os.path.exists(tmp_path / "data" / "catalog.sqlite3")
    finally:
        process.signal("TERM")
        await process.wait()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_non_editable_install_exposes_the_plugin_and_scripts(tmp_path):
    """``pip install .`` (not editable): ``twistd loom --help`` and the console scripts work."""
    venv = tmp_path / "venv"
    code, out, err = await run([sys.executable, "-m", "venv", str(venv)], seconds=120)
    assert code == 0, err
    # Reuse this environment's dependencies (no network); install Loom itself for real.
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = os.path.dirname(os.path.dirname(__import__("twisted").__file__))
    (site / "deps.pth").write_text(deps + "\n")
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "data", ".venv", "dropin.cache"))
    env = {k: v for k, v in child_environment().items() if k != "PYTHONPATH"}
    code, out, err = await run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-build-isolation",
         str(source)], env=env, cwd=str(tmp_path), seconds=180)
    assert code == 0, err
    twistd = [str(venv / "bin" / "python")] + TWISTD[1:]
    code, out, err = await run(twistd + ["loom", "--help"], env=env, cwd=str(tmp_path))
    assert code == 0, err
    for option in (b"--port", b"-p", b"--config", b"-c", b"--host", b"--listen", b"--data-dir"):
        assert option in out
    code, out, err = await run(
        [str(venv / "bin" / "python"), "-c", "import loom, sys; print(loom.__file__)"],
        env=env, cwd=str(tmp_path))
    assert str(venv) in out.decode()
    # The console scripts are the same code as bin/stream and bin/spy.
    for script, marker in (("loom-stream", b"exit status"), ("loom-spy", b"--no-color")):
        code, out, err = await run([str(venv / "bin" / script), "--help"], env=env,
                                   cwd=str(tmp_path))
        assert code == 0 and marker in out, err
