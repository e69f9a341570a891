"""The Authorization header for Label Studio's API, for either kind of API key.

A legacy token is sent as `Token <key>`. A personal access token (a JWT refresh token, the default
since Label Studio 1.23 turned legacy tokens off) is exchanged at `POST /api/token/refresh/` for a
short-lived access token sent as `Bearer`, and exchanged again shortly before that one expires.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time

import requests

from backend.errors import AuthError

REFRESH_MARGIN_S = 30.0


def _jwt_claims(token: str) -> dict | None:
    """The payload of a JWT, unverified (only Label Studio verifies it), or None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or "alg" not in header or not isinstance(payload, dict):
        return None
    return payload


class LabelStudioAuth:
    """Thread-safe source of the current Authorization header for one Label Studio and key."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.is_personal_access_token = _jwt_claims(api_key) is not None
        self._access_token = ""
        self._expires_at = 0.0
        self._mutex = threading.Lock()

    def header(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not self.is_personal_access_token:
            return {"Authorization": f"Token {self.api_key}"}
        with self._mutex:
            if time.time() > self._expires_at - REFRESH_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access_token}"}

    def invalidate(self) -> None:
        """Forget the access token, e.g. after a 401, so the next header() exchanges anew."""
        with self._mutex:
            self._expires_at = 0.0

    def _refresh(self) -> None:
        response = requests.post(
            f"{self.base_url}/api/token/refresh/", json={"refresh": self.api_key}, timeout=self.timeout_s
        )
        if response.status_code != 200:
            raise AuthError(
                f"Label Studio refused the personal access token (HTTP {response.status_code} from /api/token/refresh/)"
            )
        access = response.json().get("access", "")
        claims = _jwt_claims(access) or {}
        self._access_token = access
        # Label Studio's access tokens live 5 minutes; assume that if the token does not say.
        self._expires_at = float(claims.get("exp", time.time() + 300))
