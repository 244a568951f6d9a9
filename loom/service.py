"""LoomService: the store, the site and the listening endpoints, started and stopped in order."""

from __future__ import annotations

import resource
from dataclasses import fields

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from loom.store.catalog_db import CatalogError
from loom.config import Config
from loom.store.datadir import DataDirectoryError
from loom.errors import ConfigError
from loom.store.faults import CrashPoints
from loom.store import DiskStore, ThreadRunners
from loom.web.auth import BearerAuth
from loom.web.resources import LoomApp, Root
from loom.web.proxies import TrustedProxies
from loom.web.site import LoomSite

log = Logger()


def describe_address(address) -> str:
    """``127.0.0.1:3060``, ``[::1]:3060`` or a socket path, for log lines."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(getattr(address, "name", address))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StartupError(Exception):
    """Loom cannot start; the message says why in one line."""


# Descriptors kept out of the connections' share: the catalog's connections and
# their journals, thread pools' pipes, listening sockets, logs, and Twisted's
# reserve for accepting when descriptors run out.
RESERVED_FILES = 64
# A connection may hold two: its socket, and the data file it reads or writes.
FILES_PER_CONNECTION = 2


def connection_budget(wanted: int, file_limit: int) -> tuple[int, str | None]:
    """How many connections the open-file limit allows, at most ``wanted``; and a warning
    when that is fewer, so that running out of descriptors is a 503, never a reset."""
    allowed = max(1, (file_limit - RESERVED_FILES) // FILES_PER_CONNECTION)
    if allowed >= wanted:
        return wanted, None
    return allowed, (f"the open-file limit ({file_limit}) allows {allowed} connections "
                     f"({FILES_PER_CONNECTION} files each): maxConnections {wanted} is lowered "
                     f"to {allowed}; raise the limit (ulimit -n, or LimitNOFILE= under "
                     "systemd) to allow more")


class LoomService(MultiService):
    """Runs Loom: reconciles storage, then listens; on stop, interrupts live streams."""

    def __init__(
        self,
        config: Config,
        reactor,
        store=None,
        warnings: tuple[str, ...] = (),
        crash: CrashPoints | None = None,
        reload_config=None,
        rebuild_catalog: bool = False,
    ):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.store = store or DiskStore(
            config.data_dir,
            reactor,
            ThreadRunners(reactor),
            fsync=config.fsync,
            fsync_interval=config.fsync_interval,
            max_stream_bytes=config.max_stream_bytes,
            crash=crash,
            resume_window=config.resume_window,
            retention=config.retention,
            reserve=config.storage_reserve,
            rebuild_catalog=rebuild_catalog,
        )
        self.auth = BearerAuth(config.tokens)
        max_connections, self._files_warning = connection_budget(
            config.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.app = LoomApp(
            self.store,
            reactor,
            self.auth,
            max_metadata_bytes=config.max_metadata_bytes,
            producer_idle_timeout=config.producer_idle_timeout,
            stalled_reader_timeout=config.stalled_reader_timeout,
            reader_send_buffer=config.reader_send_buffer,
        )
        self.site = LoomSite(
            Root(self.app),
            reactor,
            counters=self.app.site_counters,
            idle_timeout=config.idle_timeout,
            header_timeout=config.header_timeout,
            max_connections=max_connections,
            max_connections_per_client=config.max_connections_per_client,
            trusted_proxies=TrustedProxies(config.trusted_proxies),
            direct_send=config.direct_send,
            # Room for the largest metadata plus ordinary headers, so that
            # oversized metadata gets its 413 instead of a dropped connection.
            max_head_bytes=max(64 * 1024, config.max_metadata_bytes + 8192),
        )
        self.ports: list = []
        self._warnings = warnings
        self._reload_config = reload_config

    def startService(self) -> None:
        """Listen on every endpoint, then reconcile storage; StartupError if either fails.

        Binding first means a taken port fails before any storage is touched.
        Nothing is accepted before this method returns, so storage is always
        reconciled before the first request is served.
        """
        for warning in self._warnings:
            log.warn("config: {warning}", warning=warning)
        if self._files_warning:
            log.warn("{warning}", warning=self._files_warning)
        try:
            for description in self.config.listen:
                self.ports.append(self._listen(description))
        except StartupError:
            self._stop_listening()
            raise
        try:
            self.store.start()
        except DataDirectoryError as e:
            self._stop_listening()
            raise StartupError(str(e))  # it names the directory or the file itself
        except (OSError, CatalogError) as e:
            self._stop_listening()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise StartupError(f"cannot open the data directory {self.config.data_dir}: {reason}")
        super().startService()
        if self.auth.enabled:
            log.info("bearer tokens required ({count} configured)", count=self.auth.count)
        else:
            log.warn("no tokens configured: anyone who can connect may read and write")
        log.info(
            "Loom ready: data in {data_dir}, fsync {fsync}, listening on {addresses}",
            data_dir=self.config.data_dir,
            fsync=self.config.fsync,
            addresses=", ".join(describe_address(port.getHost()) for port in self.ports),
        )

    def reload_tokens(self) -> None:
        """Read the configuration again and use its tokens (SIGHUP); connections stay open.

        Other settings only change on a restart; a configuration that no
        longer loads leaves the current tokens in place.
        """
        if self._reload_config is None:
            log.warn("reload asked for, but this service has no configuration to reload")
            return
        try:
            loaded = self._reload_config()
        except ConfigError as e:
            log.error("reload failed, keeping the current tokens: {error}", error=e)
            return
        self.auth.replace(loaded.config.tokens)
        log.info("tokens reloaded: {count} configured", count=self.auth.count)
        changed = [field.name for field in fields(Config) if field.name != "tokens"
                   and getattr(loaded.config, field.name) != getattr(self.config, field.name)]
        if changed:
            log.warn("these settings change only on a restart: {names}",
                     names=", ".join(changed))

    def _listen(self, description: str):
        try:
            endpoint = serverFromString(self.reactor, description)
        except (IndexError, KeyError) as e:
            if description.startswith("systemd:"):
                # Twisted looks the socket up by position or name and finds nothing.
                raise StartupError(
                    f"{description!r}: systemd passed no such socket (LISTEN_FDS and "
                    "LISTEN_FDNAMES, from a socket unit with FileDescriptorName=); start "
                    "Loom through its socket unit, or listen on a tcp: endpoint")
            raise StartupError(f"invalid listen endpoint {description!r}: {e}")
        except (ValueError, TypeError) as e:
            raise StartupError(f"invalid listen endpoint {description!r}: {e}")
        outcome: list = []
        endpoint.listen(self.site).addBoth(outcome.append)
        if not outcome:
            raise StartupError(f"listening on {description!r} did not complete at start-up")
        if isinstance(outcome[0], Failure):
            reason = outcome[0].value
            raise StartupError(
                f"cannot listen on {description!r}: {getattr(reason, 'socketError', reason)}"
            )
        return outcome[0]

    def _stop_listening(self) -> Deferred:
        ports, self.ports = self.ports, []
        return DeferredList(
            [port.stopListening() for port in ports], consumeErrors=True
        )

    def stopService(self) -> Deferred:
        """Stop listening, then interrupt live streams and close the store."""
        if not self.running:
            return succeed(None)
        super().stopService()

        async def stop():
            await self._stop_listening()
            await self.store.stop()
            await self.site.close_connections()
            log.info("Loom stopped")

        return Deferred.fromCoroutine(stop())
