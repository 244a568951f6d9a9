"""``twistd loom``: command-line options in, a LoomService out. The only place the global reactor is used."""

from __future__ import annotations

import os
import resource
import signal
import sys

from twisted import version as twisted_version
from twisted.python import usage

from loom import __version__
from loom.config import SETTINGS, load_config
from loom.errors import ConfigError
from loom.store.faults import CrashPoints
from loom.service import LoomService, StartupError


def _settings_help() -> str:
    lines = ["Configuration keys (YAML file key, environment variable):"]
    for setting in SETTINGS:
        lines.append(f"  {setting.key}, {setting.env}\n      {setting.help}")
    return "\n".join(lines)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Loom: a server for live data streams. Producers POST a stream and keep "
        "writing; consumers GET it live or later.\n\n"
        "Settings come from built-in defaults, then YAML files (-c, in order; "
        "LOOM_CONFIG when no -c is given), then LOOM_* environment variables, "
        "then these options."
    )
    optParameters = [
        ["port", "p", None, "TCP port to listen on [default: 3060]."],
        ["host", None, None, "Interface to listen on [default: 127.0.0.1]."],
        ["data-dir", None, None, "Directory for the catalog and stream data [default: ./data]."],
        ["fsync", None, None, "When to fsync stream data: always, interval or never."],
    ]
    optFlags = [
        ["rebuild-catalog", None,
         "If the catalog is missing, empty or lists none of the data files, rebuild it from "
         "the data files (streams come back interrupted, without metadata) instead of "
         "refusing to start. For this one start; the old catalog is kept in quarantine/."],
    ]

    def __init__(self):
        super().__init__()
        self["config"] = []
        self["listen"] = []

    def getUsage(self, width=None):
        # The settings table is appended as is: longdesc would be re-wrapped.
        return super().getUsage(width) + "\n" + _settings_help() + "\n"

    def opt_version(self) -> None:
        """Print Loom's version and exit."""
        print(f"loom {__version__} (Twisted {twisted_version.short()})")
        raise SystemExit(0)

    def opt_config(self, path: str) -> None:
        """A YAML configuration file; repeatable, later files win."""
        self["config"].append(path)

    opt_c = opt_config

    def opt_listen(self, description: str) -> None:
        """A Twisted endpoint to listen on (e.g. tcp:3060:interface=0.0.0.0, unix:/run/loom.sock); repeatable."""
        self["listen"].append(description)

    def command_line_settings(self) -> dict:
        """The settings given as options, keyed like the YAML file."""
        given = {
            "port": self["port"],
            "host": self["host"],
            "storageDataDir": self["data-dir"],
            "fsync": self["fsync"],
            "listen": self["listen"] or None,
        }
        return {key: value for key, value in given.items() if value is not None}


class _CommandLineService(LoomService):
    """Under twistd: a start-up failure is one line on stderr and exit status 1, and
    SIGHUP reloads the tokens."""

    def startService(self):
        try:
            super().startService()
        except StartupError as e:
            raise SystemExit(f"loom: {e}")
        from twisted.internet import reactor

        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload_tokens))


# How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms).
# Catalog reads run on a reader thread, and each of its SQLite calls takes the GIL back from
# a busy reactor thread: at 5 ms a turn, /health under a flood of one-byte chunks took p50
# 25 ms, p99 100 ms; at 0.5 ms, p50 8.7 ms, p99 47-49 ms (before catalog reads left the
# reactor thread: p50 5.5 ms, p99 48-60 ms). With one thread busy it changes nothing.
GIL_SWITCH_INTERVAL = 0.0005


def _raise_open_file_limit() -> None:
    # Every follower and producer is a socket; the default soft limit of 1024 is low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def makeService(options: Options, crash: CrashPoints | None = None) -> LoomService:
    """twistd's entry point. ``crash``: crash points, armed only by the crash tests
    (tests/helpers.py ``crashing_twistd``)."""
    files = options["config"]
    if not files and os.environ.get("LOOM_CONFIG"):
        files = [path for path in os.environ["LOOM_CONFIG"].split(os.pathsep) if path]
    cli = options.command_line_settings()

    def load():
        return load_config(files, os.environ, cli)

    try:
        loaded = load()
    except ConfigError as e:
        raise SystemExit(f"loom: {e}")
    _raise_open_file_limit()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    from twisted.internet import reactor

    return _CommandLineService(
        loaded.config,
        reactor,
        warnings=loaded.warnings,
        crash=crash,
        reload_config=load,
        rebuild_catalog=bool(options["rebuild-catalog"]),
    )


__all__ = ["Options", "makeService"]
