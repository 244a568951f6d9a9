"""Bearer tokens: who may use Loom, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac

from twisted.web.iweb import IRequest

from loom.errors import BadRequest, Unauthorized


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-length digests keeps the time independent of the
    # length of the token as well as of its content.
    return hashlib.sha256(secret).digest()


class BearerAuth:
    """Checks ``Authorization: Bearer <token>`` against the configured tokens.

    With no tokens configured every request is allowed. Tokens are kept only
    as digests, and never logged.
    """

    def __init__(self, tokens: tuple[str, ...] = ()):
        self._digests = tuple(_digest(token.encode("ascii")) for token in tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, request: IRequest) -> None:
        """Return if the request may proceed; raise Unauthorized or BadRequest if not."""
        if not self._digests:
            return
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
        matched = False
        for known in self._digests:
            # No early exit: every token is compared whatever the outcome.
            matched |= hmac.compare_digest(offered, known)
        if not matched:
            raise Unauthorized("The bearer token is not valid.")
