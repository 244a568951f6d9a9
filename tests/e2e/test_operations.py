"""Loom as an operator runs it: under systemd's socket activation, and backed up while live."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import pytest_twisted
import treq

from loom.backup import backup, check
from loom.store.datadir import stream_file
from tests.helpers import (
    REPO,
    child_environment,
    program,
    raw_connect,
    run,
    spawn,
    start_producer,
    start_server_process,
)

UNITS = REPO / "contrib" / "systemd"


def unit_settings(name: str) -> dict[str, str]:
    """The settings of a unit file (continuation lines joined; the last of a key wins)."""
    text = (UNITS / name).read_text().replace("\\\n", " ")
    return {key.strip(): value.strip() for key, _, value in
            (line.partition("=") for line in text.splitlines()
             if "=" in line and not line.lstrip().startswith("#"))}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_socket_activation_serves_through_the_inherited_socket(tmp_path):
    """The service's own ExecStart, started by systemd-socket-activate on the socket unit's
    named socket, serves clients on that socket (a connection made before Loom runs waits
    in its backlog), and stops cleanly on SIGTERM."""
    activate = program("systemd-socket-activate", "apt-get install systemd")
    socket_unit, service = unit_settings("loom.socket"), unit_settings("loom.service")
    name = socket_unit["FileDescriptorName"]
    twistd_args = service["ExecStart"].split()[1:]  # twistd's own options onwards
    config = tmp_path / "loom.yml"
    config.write_text("")  # as the installation steps make it: defaults
    twistd_args[twistd_args.index("/etc/loom/loom.yml")] = str(config)
    assert f"systemd:domain=INET:name={name}" in twistd_args
    port = free_port()
    env = child_environment()
    argv = [activate, "-l", f"127.0.0.1:{port}", f"--fdname={name}",
            "-E", f"PYTHONPATH={env['PYTHONPATH']}", "-E", f"LOOM_DATA_DIR={tmp_path / 'data'}",
            sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
            "sys.argv[0] = 'twistd'; run()", *twistd_args]
    activated = spawn(argv, cwd=str(tmp_path))
    try:
        await activated.protocol.wait_for_output(f"Listening on 127.0.0.1:{port}")
        client = await raw_connect(port)  # Loom is not running yet: this starts it
        client.send(b"POST /stream/activated HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert (await client.wait_for(b"\r\n0\r\n\r\n")).startswith(b"HTTP/1.1 201")
        response = await treq.get(f"http://127.0.0.1:{port}/stream/activated")
        assert await response.content() == b"hello"
        assert re.search(rf"Loom ready: .* listening on 127\.0\.0\.1:{port}", activated.text())
    finally:
        activated.signal("TERM")
        ended = await activated.wait()
    # twistd ends by the signal that stopped it, which systemd counts as a clean stop.
    assert ended.exit_signal == 15 and "Loom stopped" in activated.text()


@pytest_twisted.ensureDeferred
async def test_the_unit_files_are_valid_systemd_units(tmp_path):
    """systemd-analyze verify accepts both units, every directive and sandbox option."""
    analyze = program("systemd-analyze", "apt-get install systemd")
    for name in ("loom.socket", "loom.service"):
        text = (UNITS / name).read_text()
        # Only the twistd path is this machine's; everything else is as shipped.
        text = text.replace("/opt/loom/bin/twistd", shutil.which("true") or "/bin/true")
        (tmp_path / name).write_text(text)
    code, out, err = await run([analyze, "verify", str(tmp_path / "loom.socket"),
                                str(tmp_path / "loom.service")])
    assert code == 0 and not (out + err).strip(), (out + err).decode()


@pytest_twisted.ensureDeferred
async def test_a_backup_taken_while_loom_writes_starts_as_a_loom(tmp_path):
    """loom-backup copies a data directory in use: the copy checks whole, starts as a Loom,
    holds every finished stream byte-exact and the live one as interrupted."""
    server = await start_server_process(tmp_path / "data")
    try:
        for index in range(20):
            producer = await raw_connect(server.port)
            body = b"stream %d\n" % index * (1000 + index)
            producer.send(b"POST /stream/done-%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                          b"\r\n\r\n%s" % (index, len(body), body))
            await producer.wait_for(b"\r\n0\r\n\r\n")
        live = await start_producer(server.port, b"live", b"written before the copy\n")
        await _stored(server.port, b"live", 24)
        code, out, err = await run([sys.executable, "-m", "loom.backup", server.data_dir,
                                    str(tmp_path / "copy")], env=child_environment())
        assert code == 0, err.decode()
        assert b"copied 21 streams" in out
        live.transport.write(b"17\r\nwritten after the copy\n\r\n")  # not in the copy
        code, out, _ = await run([sys.executable, "-m", "loom.backup", "--check",
                                  str(tmp_path / "copy")], env=child_environment())
        assert code == 0 and b"whole data directory" in out
    finally:
        await server.stop()
    restored = await start_server_process(tmp_path / "copy")
    try:
        for index in (0, 7, 19):
            response = await treq.get(f"{restored.url}/stream/done-{index}")
            assert await response.content() == b"stream %d\n" % index * (1000 + index)
        response = await treq.get(f"{restored.url}/stream/live")
        assert await response.content() == b"written before the copy\n"
        assert response.headers.getRawHeaders("x-stream-state") == ["interrupted"]
    finally:
        await restored.stop()


@pytest_twisted.ensureDeferred
async def test_a_stream_deleted_during_the_copy_is_left_out(tmp_path):
    """A stream whose file goes away between the catalog's snapshot and its copy is dropped
    from the copy, which stays whole."""
    data = (await _data_dir(tmp_path, {"kept": b"kept", "deleted": b"deleted"}))
    os.unlink(stream_file(data, _storage(data, "deleted")))  # as a DELETE after the snapshot
    said = []
    assert backup(data, str(tmp_path / "copy"), said.append) == 1
    assert "1 deleted meanwhile were left out" in said[-1]
    assert check(str(tmp_path / "copy")) == []
    assert _ids(str(tmp_path / "copy")) == {"kept"}


@pytest_twisted.ensureDeferred
async def test_check_names_what_is_missing_short_or_foreign(tmp_path):
    """--check finds a missing file, a short one and a file no stream owns."""
    data = (await _data_dir(tmp_path, {"a": b"aaaa", "b": b"bbbb", "c": b"cccc"}))
    os.unlink(stream_file(data, _storage(data, "a")))
    with open(stream_file(data, _storage(data, "b")), "r+b") as f:
        f.truncate(2)
    stray = os.path.join(data, "streams", "00", "stray.data")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    open(stray, "wb").close()
    problems = check(data)
    assert len(problems) == 3
    assert "stream a: its data file is missing (4 bytes recorded)" in problems
    assert "stream b (complete): its file holds 2 of the 4 bytes recorded" in problems
    assert any("stray.data belongs to no stream" in problem for problem in problems)


@pytest_twisted.ensureDeferred
async def test_backup_refuses_what_it_cannot_do(tmp_path):
    """No catalog, or a target that exists: one clear sentence, nothing written."""
    from loom.backup import BackupError

    with pytest.raises(BackupError, match="not a Loom data directory"):
        backup(str(tmp_path), str(tmp_path / "copy"))
    data = (await _data_dir(tmp_path, {"a": b"a"}))
    os.makedirs(tmp_path / "taken")
    with pytest.raises(BackupError, match="exists already"):
        backup(data, str(tmp_path / "taken"))
    result = subprocess.run([sys.executable, "-m", "loom.backup", data], capture_output=True,
                            env=child_environment(), text=True)
    assert result.returncode == 2 and "new directory" in result.stderr


async def _data_dir(tmp_path, streams: dict[str, bytes]) -> str:
    """A data directory made by a store, holding complete ``streams``."""
    from twisted.internet.task import Clock

    from loom.store import DiskStore, InlineRunners
    
    data = str(tmp_path / "data")
    store = DiskStore(data, Clock(), InlineRunners())
    store.start()
    for stream_id, content in streams.items():
        stream = (await store.create(stream_id, "{}"))
        stream.append(content)
        (await stream.complete())
    (await store.stop())
    return data


def _storage(data_dir: str, stream_id: str) -> str:
    import sqlite3

    with sqlite3.connect(os.path.join(data_dir, "catalog.sqlite3")) as db:
        return db.execute("SELECT storage FROM streams WHERE id = ?", (stream_id,)).fetchone()[0]


def _ids(data_dir: str) -> set[str]:
    import sqlite3

    with sqlite3.connect(os.path.join(data_dir, "catalog.sqlite3")) as db:
        return {row[0] for row in db.execute("SELECT id FROM streams")}


async def _stored(port: int, stream_id: bytes, size: int) -> None:
    """Wait until the server holds ``size`` bytes of the stream: a follower from byte
    ``size - 1`` receives one."""
    reader = await raw_connect(port)
    reader.send(b"GET /stream/" + stream_id + b"?offset=%d HTTP/1.0\r\n\r\n" % (size - 1))
    await reader.wait_for(lambda got: len(got.partition(b"\r\n\r\n")[2]) >= 1)
    reader.transport.loseConnection()


@pytest.mark.parametrize("endpoint", ["systemd:domain=INET:name=loom",
                                      "systemd:domain=INET:index=0"])
@pytest_twisted.ensureDeferred
async def test_a_systemd_endpoint_without_systemd_is_one_line(tmp_path, endpoint):
    """Started without a socket from systemd, a systemd: endpoint is one clear line, exit 1."""
    from tests.helpers import TWISTD

    code, out, err = await run(TWISTD + ["--nodaemon", "--pidfile=", "loom", "--data-dir",
                                         str(tmp_path / "data"), "--listen", endpoint],
                               cwd=str(tmp_path))
    text = (out + err).decode()
    assert code == 1 and "systemd passed no such socket" in text and "Traceback" not in text
