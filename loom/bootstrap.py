"""Start a tool from a checkout (``bin/stream``, ``bin/spy``) with nothing but the standard library.

If this Python lacks Loom's dependencies, the checkout's own virtualenv
(``.venv``, as the README makes it) runs the tool instead; without one, the
tool says exactly what to run. ``loom-stream`` that cannot start still reads
its input to the end, so the command feeding it is not killed by SIGPIPE.
"""

from __future__ import annotations

import os
import shlex
import sys

_REEXEC = "_LOOM_BIN_REEXEC"  # set once we re-ran in the virtualenv: never loop


def run_tool(entry: str, program: str, script: str) -> int:
    """Run ``loom.cli.<entry>``; ``script`` is the bin/ file being run."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    try:
        from loom import cli
    except ImportError as e:
        missing = e
    else:
        return getattr(cli, entry)()
    venv = os.path.join(checkout, ".venv")
    for python in (os.path.join(venv, "bin", "python"),
                   os.path.join(venv, "Scripts", "python.exe")):
        if (os.path.exists(python) and not os.environ.get(_REEXEC)
                and os.path.realpath(sys.prefix) != os.path.realpath(venv)):
            os.environ[_REEXEC] = "1"
            os.execv(python, [python, os.path.abspath(script), *sys.argv[1:]])
    here = shlex.quote(checkout)
    sys.stderr.write(
        f"{program}: Loom's dependencies are not installed for {sys.executable} "
        f"({missing}). Run once:\n"
        f"    python3 -m venv {here}/.venv && {here}/.venv/bin/pip install {here}\n"
        f"and {os.path.relpath(os.path.abspath(script))} runs with that virtualenv from "
        f"then on (or run {here}/.venv/bin/{program}).\n"
    )
    sys.stderr.flush()
    if entry == "stream_main":
        drain_stdin(tee="--tee" in sys.argv[1:])
    return 2


def drain_stdin(tee: bool) -> None:
    """Read standard input to its end (copying it with ``tee``) so its writer lives on."""
    if sys.stdin is None or os.isatty(0):
        return
    while True:
        try:
            data = os.read(0, 65536)
        except OSError:
            return
        if not data:
            return
        if tee:
            try:
                os.write(1, data)
            except OSError:
                tee = False
