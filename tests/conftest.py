import pytest
import pytest_twisted

from tests.helpers import start_server


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    """A Loom server on a loopback ephemeral port, data in a fresh directory."""
    running = await start_server(tmp_path / "data")
    yield running
    await running.service.stopService()


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")
