"""Who the client is when a trusted reverse proxy stands in front: Forwarded and X-Forwarded-For.

A proxy's connection carries many clients. When its address is one of
``trustedProxies``, the client is read from the ``Forwarded`` header (RFC 7239),
or else ``X-Forwarded-For``: walking the chain of addresses from the right (the
hop closest to Loom), every trusted proxy is passed over, and the first
address that is not one is the client (if every one is, the farthest). From
anyone else these headers are ignored: a client cannot choose the address its
limits are counted against.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

# An identity taken from a header is cut to this length: it keys a counter.
_MAX_IDENTITY = 64


class TrustedProxies:
    """The proxies whose forwarding headers Loom believes (``networks``: checked strings
    such as ``127.0.0.1/32`` or ``10.0.0.0/8``, from the configuration)."""

    def __init__(self, networks: Iterable[str] = ()):
        self._networks = tuple(ipaddress.ip_network(network) for network in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, host: str | None) -> bool:
        address = _address(host)
        return address is not None and any(address in network for network in self._networks)

    def client(self, peer: str, forwarded: list[bytes], forwarded_for: list[bytes]) -> str:
        """The client's address for a request that ``peer`` sent, given the raw values of its
        Forwarded and X-Forwarded-For headers (in the order they came)."""
        if not self.trusts(peer):
            return peer
        if forwarded:
            chain = [hop for value in forwarded for hop in _forwarded_for(value)]
        else:
            chain = [hop.strip().decode("latin-1") for value in forwarded_for
                     for hop in value.split(b",")]
        hops = [_host_of(hop) for hop in chain if hop]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop[:_MAX_IDENTITY]
        # Every hop is a trusted proxy (a client inside the proxies' own network): the
        # farthest one is the client.
        return hops[0][:_MAX_IDENTITY] if hops else peer


def _forwarded_for(value: bytes) -> list[str]:
    """The ``for=`` node of each element of a Forwarded header value, in order."""
    nodes = []
    for element in value.decode("latin-1").split(","):
        for pair in element.split(";"):
            name, _, node = pair.partition("=")
            if name.strip().lower() == "for":
                nodes.append(node.strip().strip('"'))
    return nodes


def _host_of(node: str) -> str:
    """The address of a forwarded node: ``[2001:db8::1]:4711`` and ``192.0.2.1:80`` lose
    their port; ``unknown`` and obfuscated names stay as they are."""
    if node.startswith("["):
        return node[1:].partition("]")[0]
    if node.count(":") == 1:
        return node.partition(":")[0]
    return node


def _address(host: str | None):
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    # An IPv4 client of a dual-stack socket appears as ::ffff:a.b.c.d.
    return getattr(address, "ipv4_mapped", None) or address
