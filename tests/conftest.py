import os
import tempfile

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from loom.testing import FakeSite
from tests.helpers import CHILD_OUTPUT, SECRET_MARK, kill_children, start_server

_LOG_PATH = os.path.join(tempfile.gettempdir(), f"loom-tests-{os.getpid()}.log")
_log_file = None


def _record(event):
    _log_file.write(f"{formatEvent(event)} {event!r}\n")


def pytest_configure(config):
    """Keep every log event of the run in one file, to search it for secrets at the end."""
    global _log_file
    _log_file = open(_LOG_PATH, "w", encoding="utf-8", errors="replace")
    globalLogPublisher.addObserver(_record)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a token reached any log line, in this process or a child's output;
    and leave no child process behind."""
    kill_children()
    globalLogPublisher.removeObserver(_record)
    with open(_LOG_PATH, "a", encoding="utf-8", errors="replace") as f:
        for output in CHILD_OUTPUT:
            f.write(output + "\n")
    _log_file.close()
    with open(_LOG_PATH, encoding="utf-8") as f:
        leaks = [line.strip()[:200] for line in f if SECRET_MARK in line]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaks:
        if reporter:
            reporter.write_line(f"TOKENS LEAKED INTO THE LOG ({_LOG_PATH}):", red=True)
            for line in leaks[:10]:
                reporter.write_line("  " + line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        os.unlink(_LOG_PATH)
        if reporter:
            reporter.write_line("log check: no token appears in any log line of this run")


@pytest.fixture(autouse=True)
def close_fake_sites():
    """Each test's fake sites let go of their files after it, so that a long run never
    runs out of file descriptors."""
    yield
    FakeSite.close_all()


@pytest.fixture
def failures():
    """Log events with a failure (a traceback) while the test runs."""
    seen = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    """A Loom server on a loopback ephemeral port, data in a fresh directory."""
    running = await start_server(tmp_path / "data")
    yield running
    await running.service.stopService()


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")
