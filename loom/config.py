"""Loom's configuration: defaults < YAML files (in order) < LOOM_* variables < command line.

``load_config`` is the only entry point. It reads the named files and nothing
else, checks every value, and returns one frozen ``Config``; anything wrong
raises ``ConfigError`` with one line naming the file or variable and the key.

About 500 lines, most of them the SETTINGS table (each setting's key, variable,
parser and help, which ``twistd loom --help`` prints) beside the parsers it names:
kept together so that a setting is added in one place.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import yaml

from loom.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3060
FSYNC_POLICIES = ("always", "interval", "never")


@dataclass(frozen=True)
class Config:
    """Everything the server needs to know, already checked."""

    listen: tuple[str, ...] = (f"tcp:{DEFAULT_PORT}:interface={DEFAULT_HOST}",)
    data_dir: str = "./data"
    tokens: tuple[Token, ...] = ()
    fsync: str = "interval"
    fsync_interval: float = 1.0
    max_metadata_bytes: int = 8192
    producer_idle_timeout: float | None = 3600.0
    idle_timeout: float = 60.0
    header_timeout: float = 30.0
    stalled_reader_timeout: float | None = 600.0
    max_connections: int = 10000
    max_connections_per_client: int | None = 1000
    trusted_proxies: tuple[str, ...] = ()
    max_stream_bytes: int | None = None
    reader_send_buffer: int | None = 256 * 1024
    direct_send: bool = True
    retention: float | None = None
    resume_window: float | None = 30.0
    storage_compress: bool = False
    storage_tail_timeout: float | None = None
    storage_reserve: int = 8 * 1024 * 1024


# --- value parsers: (value, where) -> typed value; `where` names the source ---


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"expected a non-empty string, got {value!r}")
    return value


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise _fail(where, f"{value} is out of range ({low} to {high})")
    return value


def _port(value: Any, where: str) -> int:
    return _integer(value, where, 0, 65535)


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
    raise _fail(where, f"expected true or false, got {value!r}")


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: Any, where: str) -> float:
    """Seconds, as a number or a string such as ``90``, ``1.5s``, ``10m``, ``2h``."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if match:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise _fail(
            where, f"expected a duration such as 30, 30s, 10m or 2h, got {value!r}"
        )
    return seconds


def _positive_duration(value: Any, where: str) -> float:
    seconds = _duration(value, where)
    if seconds <= 0:
        raise _fail(where, "must be greater than zero")
    return seconds


def _optional_timeout(value: Any, where: str) -> float | None:
    """A duration where 0 means "never"."""
    seconds = _duration(value, where)
    return seconds or None


_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}  # fmt: skip


def _size(value: Any, where: str, low: int, high: int) -> int:
    """Bytes, as a number or a string such as ``8192``, ``8KiB`` or ``10MB``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value)
        unit = match and _SIZE_UNITS.get(match.group(2).lower())
        if not unit:
            raise _fail(where, f"expected a size such as 8192, 8KiB or 10MB, got {value!r}")
        value = int(match.group(1)) * unit
    return _integer(value, where, low, high)


def _stream_limit(value: Any, where: str) -> int | None:
    """A size where 0 means "no limit"."""
    return _size(value, where, 0, 2**62) or None


def _reserve(value: Any, where: str) -> int:
    return _size(value, where, 0, 2**40)


def _connection_limit(value: Any, where: str) -> int:
    return _integer(value, where, 1, 10**6)


def _optional_connection_limit(value: Any, where: str) -> int | None:
    """A connection limit where 0 means "none"."""
    return _integer(value, where, 0, 10**6) or None


# Metadata is sent back in one header line; 16 KiB is the line (Twisted) or
# head (Node.js) limit of common clients, so what Loom accepts stays readable.
MAX_METADATA_LIMIT = 15 * 1024


def _metadata_limit(value: Any, where: str) -> int:
    return _size(value, where, 2, MAX_METADATA_LIMIT)


_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}\Z")
SCOPES = ("read", "write", "replace", "spy", "admin")


@dataclass(frozen=True)
class Token:
    """A bearer token and what it may do. A bare token in the config may do everything."""

    secret: str
    scopes: frozenset[str] = frozenset(SCOPES)

    def __repr__(self) -> str:  # never show the secret
        return f"Token(scopes={sorted(self.scopes)})"


def _token_secret(value: Any, where: str, index: int) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise _fail(
            where,
            f"token #{index + 1} must be 1-4096 printable ASCII characters without spaces",
        )
    return value


def _tokens(value: Any, where: str) -> tuple[Token, ...]:
    """Bearer tokens: bare strings (every scope) or {token: ..., scopes: [...]}."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(where, "expected a list of tokens")
    tokens = []
    for index, entry in enumerate(value):
        if isinstance(entry, dict):
            unknown = set(entry) - {"token", "scopes"}
            if unknown:
                # Not named: a token written as a key ({secret: [write]}) must not be echoed.
                raise _fail(where, f"token #{index + 1} has {len(unknown)} unknown key(s); "
                                   "only token and scopes are allowed")
            scopes = entry.get("scopes")
            if not isinstance(scopes, list) or not scopes or not all(
                scope in SCOPES for scope in scopes
            ):
                raise _fail(where, f"token #{index + 1}: scopes must be a list drawn from "
                                   f"{', '.join(SCOPES)}")
            tokens.append(Token(_token_secret(entry.get("token"), where, index),
                                frozenset(scopes)))
        else:
            tokens.append(Token(_token_secret(entry, where, index)))
    if len({token.secret for token in tokens}) != len(tokens):
        raise _fail(where, "the same token is listed twice")
    return tuple(tokens)


def _listen(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(where, "expected an endpoint string or a list of them")
    return tuple(_string(item, where) for item in value)


def _networks(value: Any, where: str) -> tuple[str, ...]:
    """IP addresses or networks, as a list (or one string), normalised (``10.0.0.0/8``)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(where, "expected a list of IP addresses or networks")
    networks = []
    for item in value:
        try:
            networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise _fail(where, f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def _fsync(value: Any, where: str) -> str:
    if value not in FSYNC_POLICIES:
        raise _fail(where, f"expected one of {', '.join(FSYNC_POLICIES)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    """One configuration key: its YAML name, its variable, its parser, its help."""

    key: str
    env: str
    parse: Callable[[Any, str], Any]
    help: str
    env_is_list: bool = False  # the variable holds a comma-separated list


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "LOOM_HOST", _string,
            f"Interface to listen on (default {DEFAULT_HOST})."),
    Setting("port", "LOOM_PORT", _port, f"TCP port to listen on (default {DEFAULT_PORT})."),
    Setting("listen", "LOOM_LISTEN", _listen,
            "Twisted endpoint strings to listen on, instead of host and port "
            "(variable: comma-separated).", env_is_list=True),
    Setting("storageDataDir", "LOOM_DATA_DIR", _string,
            "Directory for the catalog and stream data (default ./data)."),
    Setting("tokens", "LOOM_TOKENS", _tokens,
            "Bearer tokens; when set, every request needs one. A bare token may do "
            "everything; {token: T, scopes: [read, write, replace, spy, admin]} limits it "
            "(variable: comma-separated, full access).", env_is_list=True),
    Setting("retention", "LOOM_RETENTION", _optional_timeout,
            "Finished streams older than this are deleted, e.g. 30d; 0 = keep forever "
            "(default)."),
    Setting("resumeWindow", "LOOM_RESUME_WINDOW", _optional_timeout,
            "How long followers of a stream whose producer dropped wait for it to "
            "resume (POST ?append=true) before they are cut off; 0 = at once (default 30s)."),
    Setting("fsync", "LOOM_FSYNC", _fsync,
            "When stream data is synced to disk: always, interval (default) or never."),
    Setting("fsyncInterval", "LOOM_FSYNC_INTERVAL", _positive_duration,
            "How often live streams are synced with fsync: interval (default 1s)."),
    Setting("maxMetadataBytes", "LOOM_MAX_METADATA_BYTES", _metadata_limit,
            "Largest X-Stream-Metadata accepted, as Loom sends it back with non-ASCII "
            "characters escaped (default 8KiB; at most 15KiB)."),
    Setting("producerIdleTimeout", "LOOM_PRODUCER_IDLE_TIMEOUT", _optional_timeout,
            "A producer silent for this long is disconnected; 0 = never (default 1h)."),
    Setting("idleTimeout", "LOOM_IDLE_TIMEOUT", _positive_duration,
            "An idle keep-alive connection is closed after this long (default 60s)."),
    Setting("headerTimeout", "LOOM_HEADER_TIMEOUT", _positive_duration,
            "A request's headers must arrive within this long of its first byte (default 30s)."),
    Setting("stalledReaderTimeout", "LOOM_STALLED_READER_TIMEOUT", _optional_timeout,
            "A reader that accepts no data for this long while data waits is "
            "disconnected; 0 = never (default 10m)."),
    Setting("maxConnections", "LOOM_MAX_CONNECTIONS", _connection_limit,
            "Connections beyond this many are answered 503 and closed (default 10000)."),
    Setting("maxConnectionsPerClient", "LOOM_MAX_CONNECTIONS_PER_CLIENT",
            _optional_connection_limit,
            "Connections from one client address beyond this many are answered 503, so no "
            "single client can fill maxConnections (default 1000; 0 = no limit). Behind a "
            "reverse proxy every connection comes from the proxy: raise it."),
    Setting("trustedProxies", "LOOM_TRUSTED_PROXIES", _networks,
            "Reverse proxies (addresses or networks, e.g. 127.0.0.1 or 10.0.0.0/8) whose "
            "Forwarded / X-Forwarded-For headers name the client, for the access log and "
            "maxConnectionsPerClient; from anyone else those headers are ignored (variable: "
            "comma-separated).", env_is_list=True),
    Setting("maxStreamBytes", "LOOM_MAX_STREAM_BYTES", _stream_limit,
            "Largest stream stored; a longer one is cut there. 0 = no limit (default)."),
    Setting("readerSendBuffer", "LOOM_READER_SEND_BUFFER", _stream_limit,
            "Kernel send buffer of each reader's socket (default 256KiB): a reader that "
            "stops reading holds at most this much. 0 = let the kernel decide."),
    Setting("directSend", "LOOM_DIRECT_SEND", _boolean,
            "Send readers' bytes straight to their sockets when nothing is queued for them "
            "(default true); false sends every byte through Twisted's transport, a slower "
            "path kept for diagnosis."),
    Setting("storageReserve", "LOOM_STORAGE_RESERVE", _reserve,
            "Disk space kept in reserve so that ends of streams, deletions and start-up "
            "can be recorded on a full disk; new data waits until twice this is free "
            "(default 8MiB; 0 = no reserve)."),
    Setting("storageCompress", "LOOM_STORAGE_COMPRESS", _boolean,
            "Accepted for compatibility with the original service; has no effect."),
    Setting("storageTailTimeout", "LOOM_STORAGE_TAIL_TIMEOUT", _duration,
            "Accepted for compatibility; Loom knows when a stream ends, so it is unused."),
)  # fmt: skip

_BY_KEY = {setting.key: setting for setting in SETTINGS}

# Keys of the original service's configuration (its RethinkDB storage) that mean
# nothing to Loom: accepted in files, so the original's files start Loom
# unchanged, and named in one warning.
ORIGINAL_ONLY = frozenset({"dbHost", "dbPort", "dbName", "storageMetaTable", "storageLogsTable"})

# Variables that are not settings: the clients' own.
CLIENT_VARIABLES = frozenset({"LOOM_TOKEN", "LOOM_CONFIG", "LOOM_SERVER"})


_QUOTED = re.compile(r"'([^']*)'")


def _redact(problem: str) -> str:
    """A YAML problem without the words it quotes from the file (``found undefined alias
    'x'``, ``the tag '!x'``): they may be part of a token. Single characters, the parser's
    own names (``'<stream end>'``) and standard tags stay."""

    def keep_or_hide(match: re.Match) -> str:
        quoted = match.group(1)
        if len(quoted) <= 2 or quoted.startswith(("<", "tag:yaml.org,2002:")):
            return match.group(0)
        return "'…'"

    return _QUOTED.sub(keep_or_hide, problem)


def read_config_file(path: str) -> dict[str, Any]:
    """Parse one YAML file into a mapping of known keys (safe loader only)."""
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror})")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = _redact(getattr(e, "problem", None) or str(e).splitlines()[0])
        raise ConfigError(f"config file {path}: invalid YAML{at}: {problem}")
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values")
    for key in document:
        if key not in _BY_KEY and key not in ORIGINAL_ONLY:
            raise ConfigError(
                f"config file {path}: unknown key {key!r} "
                f"(known keys: {', '.join(sorted(_BY_KEY))})"
            )
    return document


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    by_env = {setting.env: setting for setting in SETTINGS}
    values, unknown = {}, []
    for name, value in environ.items():
        if not name.startswith("LOOM_") or name in CLIENT_VARIABLES:
            continue
        setting = by_env.get(name)
        if setting is None:
            unknown.append(name)
        elif setting.env_is_list:
            values[setting.key] = [part.strip() for part in value.split(",") if part.strip()]
        else:
            values[setting.key] = value
    return values, sorted(unknown)


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    warnings: tuple[str, ...]


def load_config(
    files: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Merge defaults, files, environment and command line into one checked Config.

    ``cli`` maps YAML key names to values given on the command line. Warnings
    (unknown LOOM_* variables, settings that do nothing) are returned, not
    logged, so the caller decides where they go.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    for path in files:
        layers.append((f"config file {path}", read_config_file(path)))
    env_values, unknown_env = _env_layer(environ or {})
    layers.append(("environment", env_values))
    layers.append(("command line", dict(cli or {})))

    values: dict[str, Any] = {}
    level: dict[str, int] = {}
    ignored: set[str] = set()
    for index, (source, layer) in enumerate(layers, start=1):
        for key, raw in layer.items():
            if key in ORIGINAL_ONLY:
                ignored.add(key)
                continue
            setting = _BY_KEY[key]
            where = f"{source}: {setting.env if source == 'environment' else key}"
            values[key] = setting.parse(raw, where)
            level[key] = index

    warnings = [f"ignoring unknown environment variable {name}" for name in unknown_env]
    if values.get("storageCompress"):
        ignored.add("storageCompress")
    if "storageTailTimeout" in values:
        ignored.add("storageTailTimeout")  # Loom knows when a stream ends
    if ignored:
        warnings.append("these settings of the original service have no effect in Loom: "
                        + ", ".join(sorted(ignored)))

    return LoadedConfig(
        Config(
            listen=_resolve_listen(values, level, layers),
            data_dir=values.get("storageDataDir", Config.data_dir),
            tokens=values.get("tokens", ()),
            fsync=values.get("fsync", Config.fsync),
            fsync_interval=values.get("fsyncInterval", Config.fsync_interval),
            max_metadata_bytes=values.get("maxMetadataBytes", Config.max_metadata_bytes),
            producer_idle_timeout=values.get(
                "producerIdleTimeout", Config.producer_idle_timeout
            ),
            idle_timeout=values.get("idleTimeout", Config.idle_timeout),
            header_timeout=values.get("headerTimeout", Config.header_timeout),
            stalled_reader_timeout=values.get(
                "stalledReaderTimeout", Config.stalled_reader_timeout
            ),
            max_connections=values.get("maxConnections", Config.max_connections),
            max_connections_per_client=values.get(
                "maxConnectionsPerClient", Config.max_connections_per_client
            ),
            trusted_proxies=values.get("trustedProxies", ()),
            max_stream_bytes=values.get("maxStreamBytes", Config.max_stream_bytes),
            reader_send_buffer=values.get("readerSendBuffer", Config.reader_send_buffer),
            direct_send=values.get("directSend", Config.direct_send),
            retention=values.get("retention"),
            resume_window=values.get("resumeWindow", Config.resume_window),
            storage_compress=values.get("storageCompress", False),
            storage_tail_timeout=values.get("storageTailTimeout"),
            storage_reserve=values.get("storageReserve", Config.storage_reserve),
        ),
        tuple(warnings),
    )


def _resolve_listen(
    values: dict[str, Any], level: dict[str, int], layers: list[tuple[str, dict]]
) -> tuple[str, ...]:
    """The endpoints come from whichever of listen / host+port was set last.

    A source that sets both ``listen`` and ``host``/``port`` is ambiguous and
    refused; otherwise the most specific source wins, and host and port fill
    each other in from lower levels.
    """
    listen_level = level.get("listen", 0)
    address_level = max(level.get("host", 0), level.get("port", 0))
    if listen_level and listen_level == address_level:
        source = layers[listen_level - 1][0]
        raise ConfigError(f"{source}: give either listen or host/port, not both")
    if listen_level > address_level:
        return values["listen"]
    host = values.get("host", DEFAULT_HOST)
    port = values.get("port", DEFAULT_PORT)
    return (f"tcp:{port}:interface={_escape_endpoint(host)}",)


def _escape_endpoint(value: str) -> str:
    # Endpoint strings use ':' and '=' as separators; IPv6 addresses need escaping.
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")
