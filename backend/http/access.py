"""Who may call the backend: HTTP basic auth (what Label Studio sends) and/or a static bearer token.

Label Studio can only send basic auth to an ML backend (`auth_method: BASIC_AUTH`); the bearer token
serves other callers (scripts, a reverse proxy's health checks). Secrets are compared as SHA-256
digests with `hmac.compare_digest`, so neither their content nor their length shows in the timing,
and they never appear in a log line or an answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress

from backend.config import Settings


def _same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(
        hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest(),
    )


class AccessControl:
    """Checks an Authorization header against the configured credentials; open when none are set."""

    def __init__(self, basic_user: str = "", basic_pass: str = "", bearer_token: str = "") -> None:
        self._basic = (basic_user, basic_pass) if basic_user else None
        self._bearer = bearer_token or None

    @property
    def enabled(self) -> bool:
        return self._basic is not None or self._bearer is not None

    def allows(self, authorization: str) -> bool:
        if not self.enabled:
            return True
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and self._basic is not None:
            return self._basic_matches(credentials.strip())
        if scheme == "bearer" and self._bearer is not None:
            return _same_secret(credentials.strip(), self._bearer)
        return False

    def _basic_matches(self, credentials: str) -> bool:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, separator, password = decoded.partition(":")
        expected_user, expected_pass = self._basic  # type: ignore[misc]
        # Both comparisons always run so the timing says nothing about which part was wrong.
        user_ok = _same_secret(user, expected_user)
        pass_ok = _same_secret(password, expected_pass)
        return bool(separator) and user_ok and pass_ok

    def challenge(self) -> str:
        """The WWW-Authenticate value naming every scheme that would be accepted."""
        schemes = []
        if self._basic is not None:
            schemes.append('Basic realm="sam-backend"')
        if self._bearer is not None:
            schemes.append('Bearer realm="sam-backend"')
        return ", ".join(schemes)


def _loopback(bind: str) -> bool:
    """Whether a gunicorn-style bind ("host:port", "[::1]:port", "unix:path") is reachable from this machine only."""
    if bind.startswith("unix:"):
        return True
    if bind.startswith("["):  # [::1]:9090
        host = bind[1:].partition("]")[0]
    elif bind.count(":") == 1:  # 0.0.0.0:9090
        host = bind.partition(":")[0]
    else:  # a bare host or IPv6 address
        host = bind
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to may be reachable
        return False


def open_to_the_network(binds: list[str], settings: Settings) -> str | None:
    """The start-up warning when anyone who can reach an address the backend listens on may call it: no credentials
    are set and the address is not loopback. None otherwise."""
    access = AccessControl(settings.basic_auth_user, settings.basic_auth_pass, settings.bearer_token)
    exposed = [bind for bind in binds if not _loopback(bind)]
    if access.enabled or not exposed:
        return None
    return (
        f"listening on {', '.join(exposed)} without authentication: anyone who can reach it may call the backend; "
        "set BASIC_AUTH_USER and BASIC_AUTH_PASS (or BEARER_TOKEN), or HOST=127.0.0.1 (docs/security.md)"
    )
