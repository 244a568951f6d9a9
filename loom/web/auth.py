"""Bearer tokens: who may use Loom and for what, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac

from twisted.web.iweb import IRequest

from loom.config import SCOPES, Token
from loom.errors import BadRequest, Forbidden, Unauthorized

ALL_SCOPES = frozenset(SCOPES)

# What each scope lets a token do, for the 403 sentence.
_ACTIONS = {
    "read": "read streams",
    "write": "write streams",
    "replace": "replace streams (force=true)",
    "spy": "watch /spy",
    "admin": "delete streams",
}
# Scopes that include others: admin may do everything, replace may also write.
_IMPLIED_BY = {scope: {"admin"} for scope in SCOPES}
_IMPLIED_BY["write"].add("replace")


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-length digests keeps the time independent of the
    # length of the token as well as of its content.
    return hashlib.sha256(secret).digest()


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` against the configured tokens.

    With no tokens configured every request may do everything. Tokens are
    kept only as digests, and never logged. ``replace`` swaps the tokens in
    place (SIGHUP), without touching open connections.
    """

    def __init__(self, tokens=()):
        self.replace(tokens)

    def replace(self, tokens) -> None:
        entries = []
        for token in tokens:
            if isinstance(token, str):
                token = Token(token)
            entries.append((_digest(token.secret.encode("ascii")), token.scopes))
        self._entries = tuple(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @property
    def count(self) -> int:
        return len(self._entries)

    def check(self, request: IRequest) -> frozenset[str]:
        """The scopes the request's token grants; Unauthorized or BadRequest if none.

        Also sets ``request.token_id``: which token it was (its digest, never
        the token), so a stream can be tied to the token that writes it.
        """
        request.token_id = None
        if not self._entries:
            return ALL_SCOPES
        values = request.requestHeaders.getRawHeaders(b"authorization")
        if not values:
            raise Unauthorized("This server needs an Authorization: Bearer <token> header.")
        if len(values) > 1:
            raise BadRequest("Send one Authorization header, not several.")
        scheme, _, credentials = values[0].partition(b" ")
        if scheme.lower() != b"bearer" or not credentials:
            raise Unauthorized("Use Authorization: Bearer <token>.")
        if getattr(request, "authorization_padded", False):
            raise Unauthorized("The bearer token is not valid.")  # "token " is not "token"
        offered = _digest(credentials)
        granted = None
        for known, scopes in self._entries:
            # No early exit: every token is compared whatever the outcome.
            if hmac.compare_digest(offered, known):
                granted = scopes
        if granted is None:
            raise Unauthorized("The bearer token is not valid.")
        request.token_id = offered
        return granted


def may(request, scope: str) -> bool:
    """Whether the request's token grants ``scope`` (admin grants all, replace grants write)."""
    scopes = getattr(request, "scopes", ALL_SCOPES)
    return scope in scopes or not _IMPLIED_BY[scope].isdisjoint(scopes)


def require(request, scope: str) -> None:
    """Raise Forbidden unless the request's token grants ``scope``."""
    if not may(request, scope):
        others = sorted(_IMPLIED_BY[scope] - {scope})
        also = f" (or {', or '.join(others)})" if others else ""
        raise Forbidden(f"This token may not {_ACTIONS[scope]}: it needs the {scope} "
                        f"scope{also}.")
