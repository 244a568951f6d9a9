"""The command-line tools: ``loom-stream`` (bin/stream, loom.cli.stream) and ``loom-spy``
(bin/spy, loom.cli.spy); loom.cli.common has what they share.

Only the ``*_main`` entry functions touch the global reactor.
"""

from loom.cli.spy import spy_main
from loom.cli.stream import stream_main

__all__ = ["spy_main", "stream_main"]
